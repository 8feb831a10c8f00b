#!/bin/bash
# Builds device-flood.c (a PVH guest kernel that resets every virtio-mmio
# device with bad rings, for ever) into <out>: 32-bit code with no
# libraries, linked at 1 MiB by device-flood.ld, then an ELF64 file
# (linux-loader, husk-vmm's, loads only ELF64; QEMU takes either).
# usage: build-device-flood.sh <out>
set -euo pipefail
out=${1:?usage: build-device-flood.sh <out>}
here=$(dirname "$0")
gcc -m32 -ffreestanding -fno-pic -fno-pie -no-pie -fno-stack-protector \
    -fno-asynchronous-unwind-tables -nostdlib -static -O2 -Wall -Wextra -Werror \
    -Wl,--build-id=none -Wl,--no-warn-rwx-segments -Wl,-T,"$here/device-flood.ld" \
    -o "$out.32" "$here/device-flood.c"
objcopy -O elf64-x86-64 "$out.32" "$out"
rm -f "$out.32"
