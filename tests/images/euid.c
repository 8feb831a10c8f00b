/* Prints the real and effective user and group ids of the process, one
 * line: "ruid=R euid=E rgid=G egid=H". Installed setuid-root in the test
 * image (/bin/euid-suid) to show whether a setuid program escalates. */
#include <stdio.h>
#include <unistd.h>

int main(void)
{
    printf("ruid=%d euid=%d rgid=%d egid=%d\n", (int)getuid(), (int)geteuid(),
           (int)getgid(), (int)getegid());
    return 0;
}
