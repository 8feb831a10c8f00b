/* A program of one page of code that prints its letter (LETTER, an
 * immediate in the code, so two builds differ in their code page and
 * nowhere else that runs) and nothing else: no libc. Built twice into the
 * test image, /bin/letter-a and /bin/letter-b, for code-reuse.c. */
#ifndef LETTER
#define LETTER 'a'
#endif

void _start(void)
{
    volatile char msg[2];
    msg[0] = LETTER;
    msg[1] = '\n';
    long ret;
    __asm__ volatile("syscall" : "=a"(ret) : "a"(1), "D"(1), "S"(msg), "d"(2) : "rcx", "r11", "memory");
    __asm__ volatile("syscall" : : "a"(60), "D"(0) : "rcx", "r11", "memory");
    for (;;) {
    }
}
