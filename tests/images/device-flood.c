/*
 * A guest kernel that is hostile from its first instruction (issue 28):
 * booted by the PVH entry (32-bit protected mode, paging off, %ebx at
 * the hvm_start_info), it finds the virtio-mmio devices the VMM put on
 * its command line (`virtio_mmio.device=<size>@<addr>:<irq>`, as both
 * husk-vmm and QEMU's microvm write them), or else at microvm's fixed
 * windows, and then, for ever, resets each one and brings it up on rings
 * whose every descriptor points beyond guest memory and chains to itself,
 * offering one buffer and notifying each queue. A VMM (or vhost-user
 * daemon) that logs every refusal writes a line or a few per cycle.
 *
 * On the serial port (COM1) it says which devices it found and, every
 * FLOOD_EVERY cycles, how many cycles it has done, so a test can tell
 * how hard the host was pushed.
 *
 * Built by build-device-flood.sh (gcc -m32 freestanding, linked at 1 MiB
 * by device-flood.ld, then made an ELF64: linux-loader reads only ELF64).
 */

typedef unsigned char u8;
typedef unsigned int u32;
typedef unsigned long long u64;

#define FLOOD_EVERY 256u
#define MAX_DEVICES 32

/* virtio-mmio registers (virtio 1.2, 4.2.2). */
#define MAGIC 0x000
#define VERSION 0x004
#define DEVICE_ID 0x008
#define DEVICE_FEATURES_SEL 0x014
#define GUEST_PAGE_SIZE 0x028 /* legacy */
#define DRIVER_FEATURES 0x020
#define DRIVER_FEATURES_SEL 0x024
#define QUEUE_SEL 0x030
#define QUEUE_NUM_MAX 0x034
#define QUEUE_NUM 0x038
#define QUEUE_ALIGN 0x03c /* legacy */
#define QUEUE_PFN 0x040   /* legacy */
#define QUEUE_READY 0x044
#define QUEUE_NOTIFY 0x050
#define STATUS 0x070
#define QUEUE_DESC_LOW 0x080
#define QUEUE_DESC_HIGH 0x084
#define QUEUE_AVAIL_LOW 0x090
#define QUEUE_AVAIL_HIGH 0x094
#define QUEUE_USED_LOW 0x0a0
#define QUEUE_USED_HIGH 0x0a4

#define ACKNOWLEDGE 1u
#define DRIVER 2u
#define DRIVER_OK 4u
#define FEATURES_OK 8u

#define VIRT_MAGIC 0x74726976u /* "virt" */

/* QEMU microvm's windows (hw/i386/microvm.c: VIRTIO_MMIO_BASE, 512 bytes each). */
#define MICROVM_BASE 0xfeb00000u
#define MICROVM_WINDOWS 24u

#define COM1 0x3f8

/* The PVH entry note: Xen's XEN_ELFNOTE_PHYS32_ENTRY (18). */
__asm__(".pushsection .note.pvh, \"a\", @note\n"
        ".balign 4\n"
        ".long 4\n"      /* name size: "Xen\0" */
        ".long 4\n"      /* desc size */
        ".long 18\n"     /* XEN_ELFNOTE_PHYS32_ENTRY */
        ".asciz \"Xen\"\n"
        ".balign 4\n"
        ".long pvh_start\n"
        ".popsection\n");

/* Entry: a stack, then flood(start_info). */
__asm__(".pushsection .text.entry, \"ax\"\n"
        ".globl pvh_start\n"
        "pvh_start:\n"
        "  cli\n"
        "  movl $stack_top, %esp\n"
        "  pushl %ebx\n"
        "  call flood\n"
        "1: hlt\n"
        "  jmp 1b\n"
        ".popsection\n");

static u8 stack[16384] __attribute__((aligned(16), used));
__asm__(".pushsection .data\n.globl stack_top\n.set stack_top, stack + 16384\n.popsection\n");

static inline void outb(unsigned short port, u8 v)
{
    __asm__ volatile("outb %0, %1" : : "a"(v), "Nd"(port));
}

static inline u8 inb(unsigned short port)
{
    u8 v;
    __asm__ volatile("inb %1, %0" : "=a"(v) : "Nd"(port));
    return v;
}

static void putc_serial(char c)
{
    /* Wait (boundedly) for the transmit holding register. */
    for (u32 i = 0; i < 100000 && !(inb(COM1 + 5) & 0x20); i++)
        ;
    outb(COM1, (u8)c);
}

static void puts_serial(const char *s)
{
    while (*s)
        putc_serial(*s++);
}

static void putu(u32 v)
{
    char buf[24];
    int n = 0;
    do {
        buf[n++] = (char)('0' + v % 10);
        v /= 10;
    } while (v);
    while (n)
        putc_serial(buf[--n]);
}

static inline u32 rd(u32 base, u32 off)
{
    return *(volatile u32 *)(base + off);
}

static inline void wr(u32 base, u32 off, u32 v)
{
    *(volatile u32 *)(base + off) = v;
}

static int starts_with(const char *s, const char *prefix)
{
    while (*prefix)
        if (*s++ != *prefix++)
            return 0;
    return 1;
}

/* A number as the kernel's memparse reads it: decimal or 0x hex, an
 * optional K/M/G suffix. Sets *end past it. */
static u64 number(const char *s, const char **end)
{
    u64 v = 0;
    if (s[0] == '0' && (s[1] == 'x' || s[1] == 'X')) {
        s += 2;
        for (;;) {
            char c = *s;
            if (c >= '0' && c <= '9')
                v = v * 16 + (u64)(c - '0');
            else if (c >= 'a' && c <= 'f')
                v = v * 16 + (u64)(c - 'a' + 10);
            else if (c >= 'A' && c <= 'F')
                v = v * 16 + (u64)(c - 'A' + 10);
            else
                break;
            s++;
        }
    } else {
        while (*s >= '0' && *s <= '9')
            v = v * 10 + (u64)(*s++ - '0');
    }
    switch (*s) {
    case 'K': case 'k': v <<= 10; s++; break;
    case 'M': case 'm': v <<= 20; s++; break;
    case 'G': case 'g': v <<= 30; s++; break;
    }
    *end = s;
    return v;
}

static u32 devices[MAX_DEVICES];
static u32 ndevices;

static void add_device(u64 addr)
{
    /* Paging is off: only windows below 4 GiB are in reach. */
    if (addr >= 0x100000000ull || ndevices == MAX_DEVICES)
        return;
    u32 base = (u32)addr;
    if (rd(base, MAGIC) != VIRT_MAGIC || rd(base, DEVICE_ID) == 0)
        return;
    devices[ndevices++] = base;
}

static void find_devices(const char *cmdline)
{
    static const char key[] = "virtio_mmio.device=";
    for (const char *s = cmdline; s && *s; s++) {
        if ((s == cmdline || s[-1] == ' ') && starts_with(s, key)) {
            const char *p = s + sizeof key - 1;
            number(p, &p);
            if (*p == '@')
                add_device(number(p + 1, &p));
        }
    }
    if (ndevices == 0)
        for (u32 i = 0; i < MICROVM_WINDOWS; i++)
            add_device(MICROVM_BASE + i * 512u);
}

/* Rings in guest memory whose every descriptor is bad twice over: its
 * buffer lies far beyond guest memory, and it chains to itself. One 8 KiB
 * block per device and queue from RINGS: the descriptor table and the
 * available ring in its first page, the used ring in the second (the
 * layout a legacy device computes from QUEUE_ALIGN 4096 for RING_SIZE). */
#define RINGS 0x200000u
#define RING_SIZE 16u
#define MAX_QUEUES 4u

struct desc {
    u64 addr;
    u32 len;
    unsigned short flags;
    unsigned short next;
};

static u32 ring_block(u32 device, u32 queue)
{
    return RINGS + (device * MAX_QUEUES + queue) * 8192u;
}

static void write_bad_rings(void)
{
    for (u32 d = 0; d < ndevices; d++)
        for (u32 q = 0; q < MAX_QUEUES; q++) {
            u32 block = ring_block(d, q);
            volatile struct desc *table = (volatile struct desc *)block;
            for (u32 i = 0; i < RING_SIZE; i++) {
                table[i].addr = 0xfffffffff000ull;
                table[i].len = 4096;
                table[i].flags = 1; /* VIRTQ_DESC_F_NEXT */
                table[i].next = (unsigned short)i;
            }
            volatile unsigned short *avail = (volatile unsigned short *)(block + RING_SIZE * 16);
            avail[0] = 0; /* flags */
            for (u32 i = 0; i < RING_SIZE; i++)
                avail[2 + i] = (unsigned short)i;
        }
}

/* One hostile bring-up: reset, negotiate no more than VERSION_1, every
 * queue on its bad rings with one buffer offered, DRIVER_OK, a kick for
 * each. A legacy device (version 1, QEMU microvm's default) takes its
 * rings as a page number, a modern one as three addresses. */
static void bring_up_badly(u32 device)
{
    u32 base = devices[device];
    u32 legacy = rd(base, VERSION) == 1;
    wr(base, STATUS, 0);
    wr(base, STATUS, ACKNOWLEDGE);
    wr(base, STATUS, ACKNOWLEDGE | DRIVER);
    if (legacy) {
        wr(base, GUEST_PAGE_SIZE, 4096);
        wr(base, DRIVER_FEATURES_SEL, 0);
        wr(base, DRIVER_FEATURES, 0);
    } else {
        wr(base, DRIVER_FEATURES_SEL, 1);
        wr(base, DRIVER_FEATURES, 1); /* VIRTIO_F_VERSION_1 (bit 32) */
        wr(base, DRIVER_FEATURES_SEL, 0);
        wr(base, DRIVER_FEATURES, 0);
        wr(base, STATUS, ACKNOWLEDGE | DRIVER | FEATURES_OK);
    }
    for (u32 q = 0; q < MAX_QUEUES; q++) {
        wr(base, QUEUE_SEL, q);
        u32 max = rd(base, QUEUE_NUM_MAX);
        if (max < RING_SIZE)
            break;
        u32 block = ring_block(device, q);
        /* One new buffer since the reset. */
        ((volatile unsigned short *)(block + RING_SIZE * 16))[1] = 1;
        wr(base, QUEUE_NUM, RING_SIZE);
        if (legacy) {
            wr(base, QUEUE_ALIGN, 4096);
            wr(base, QUEUE_PFN, block >> 12);
            continue;
        }
        wr(base, QUEUE_DESC_LOW, block);
        wr(base, QUEUE_DESC_HIGH, 0);
        wr(base, QUEUE_AVAIL_LOW, block + RING_SIZE * 16);
        wr(base, QUEUE_AVAIL_HIGH, 0);
        wr(base, QUEUE_USED_LOW, block + 4096);
        wr(base, QUEUE_USED_HIGH, 0);
        wr(base, QUEUE_READY, 1);
    }
    wr(base, STATUS, ACKNOWLEDGE | DRIVER | (legacy ? 0 : FEATURES_OK) | DRIVER_OK);
    for (u32 q = 0; q < MAX_QUEUES; q++)
        wr(base, QUEUE_NOTIFY, q);
}

struct hvm_start_info {
    u32 magic;
    u32 version;
    u32 flags;
    u32 nr_modules;
    u64 modlist_paddr;
    u64 cmdline_paddr;
};

void flood(const struct hvm_start_info *info) __attribute__((used, noreturn));

void flood(const struct hvm_start_info *info)
{
    const char *cmdline = 0;
    if (info && info->magic == 0x336ec578u && info->cmdline_paddr &&
        info->cmdline_paddr < 0x100000000ull)
        cmdline = (const char *)(u32)info->cmdline_paddr;
    find_devices(cmdline);
    puts_serial("husk-flood: devices ");
    putu(ndevices);
    puts_serial("\n");
    for (u32 i = 0; i < ndevices; i++) {
        puts_serial("husk-flood: device type ");
        putu(rd(devices[i], DEVICE_ID));
        puts_serial(" version ");
        putu(rd(devices[i], VERSION));
        puts_serial("\n");
    }
    write_bad_rings();
    for (u32 cycle = 1;; cycle++) {
        for (u32 i = 0; i < ndevices; i++)
            bring_up_badly(i);
        if (cycle % FLOOD_EVERY == 0) {
            puts_serial("husk-flood: cycles ");
            putu(cycle);
            puts_serial("\n");
        }
    }
}
