/* Does a program run its own code when its page-cache pages held another
 * program's code a moment ago? Each round runs X (/bin/letter-a or -b) a
 * few times, drops Y's then X's page cache (posix_fadvise DONTNEED frees
 * exactly their pages, X's last), reads Y whole at once (its pages are the
 * ones just freed, taken back in reverse, so Y's code page lands where
 * X's code was), then runs Y: it must print its own letter. An emulator
 * that keeps translated code past a write it did not see (QEMU/TCG and
 * virtiofsd's writes into guest memory) prints X's letter.
 *
 *   code-reuse [ROUNDS]   -> "rounds=N wrong=W", a line per wrong round */
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

static char file[1 << 16];

/* Runs `path`; its first output byte into `*out`; its wait status. */
static int run(const char *path, char *out)
{
    int p[2];
    if (pipe(p) != 0)
        return -1;
    pid_t pid = fork();
    if (pid == 0) {
        dup2(p[1], 1);
        execl(path, path, (char *)0);
        _exit(127);
    }
    close(p[1]);
    char buf[8];
    ssize_t n = read(p[0], buf, sizeof buf);
    close(p[0]);
    int st = -1;
    waitpid(pid, &st, 0);
    *out = n > 0 ? buf[0] : '?';
    return st;
}

static void drop(const char *path)
{
    int fd = open(path, O_RDONLY);
    if (fd >= 0) {
        posix_fadvise(fd, 0, 0, POSIX_FADV_DONTNEED);
        close(fd);
    }
}

/* Reads `path` whole, into its page cache. */
static void fill(const char *path)
{
    int fd = open(path, O_RDONLY);
    if (fd >= 0) {
        while (read(fd, file, sizeof file) > 0) {
        }
        close(fd);
    }
}

int main(int argc, char **argv)
{
    int rounds = argc > 1 ? atoi(argv[1]) : 100, wrong = 0;
    const char *paths[2] = {"/bin/letter-a", "/bin/letter-b"};
    memset(file, 1, sizeof file);
    for (int r = 0; r < rounds; r++) {
        const char *x = paths[r % 2], *y = paths[1 - r % 2];
        char out;
        for (int i = 0; i < 3; i++)
            run(x, &out);
        drop(y);
        drop(x);
        fill(y);
        int st = run(y, &out);
        char want = y[strlen(y) - 1];
        if (st != 0 || out != want) {
            wrong++;
            printf("round %d: %s printed '%c' (wait status %d)\n", r, y, out, st);
        }
    }
    printf("rounds=%d wrong=%d\n", rounds, wrong);
    return 0;
}
