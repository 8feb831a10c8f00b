/* Watches a directory with inotify, as a reloading server (nginx, envoy)
 * watches its configMap, and prints one line per event on an entry of it:
 * "create NAME", "delete NAME", "moved_from NAME", "moved_to NAME", each
 * flushed at once; first "watching DIR" once the watch is in place.
 * Installed in the test image as /bin/inotify-watch. */
#include <stdio.h>
#include <sys/inotify.h>
#include <unistd.h>

int main(int argc, char **argv)
{
    if (argc != 2) {
        fprintf(stderr, "usage: inotify-watch DIR\n");
        return 2;
    }
    int fd = inotify_init1(IN_CLOEXEC);
    if (fd < 0 || inotify_add_watch(fd, argv[1], IN_CREATE | IN_DELETE | IN_MOVED_FROM | IN_MOVED_TO) < 0) {
        perror(argv[1]);
        return 1;
    }
    printf("watching %s\n", argv[1]);
    fflush(stdout);
    char buf[4096] __attribute__((aligned(8)));
    for (;;) {
        ssize_t n = read(fd, buf, sizeof buf);
        if (n <= 0) {
            perror("read");
            return 1;
        }
        for (char *p = buf; p < buf + n;) {
            const struct inotify_event *e = (const struct inotify_event *)p;
            const char *what = e->mask & IN_CREATE       ? "create"
                               : e->mask & IN_DELETE     ? "delete"
                               : e->mask & IN_MOVED_FROM ? "moved_from"
                               : e->mask & IN_MOVED_TO   ? "moved_to"
                                                         : "other";
            printf("%s %s\n", what, e->len ? e->name : "");
            p += sizeof *e + e->len;
        }
        fflush(stdout);
    }
}
