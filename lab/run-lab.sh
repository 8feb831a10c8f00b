#!/bin/bash
# husk nested lab: proves husk-vmm under hardware-assisted KVM on a host
# whose own /dev/kvm cannot run a standard guest (PVM). QEMU/TCG emulates an
# AMD CPU with SVM; the L1 guest runs Debian's cloud kernel with kvm-amd
# (from the linux-image-cloud-amd64 package, cached by version) and an
# initramfs carrying busybox, husk-vmm and our guest image; inside L1,
# husk-vmm boots our guest (L2). Results come back on L1's serial console;
# every failed step fails the lab.
#
# usage: lab/run-lab.sh <husk-vmm (static)> <guest dir with vmlinux, initramfs.cpio>
set -euo pipefail

VMM=${1:?usage: run-lab.sh <husk-vmm> <guest dir>}
GUEST=${2:?usage: run-lab.sh <husk-vmm> <guest dir>}
CACHE=${HUSK_LAB_CACHE:-/var/cache/husk/lab}
TIMEOUT=${HUSK_LAB_TIMEOUT:-900}

fail() { echo "lab: FAILED: $*" >&2; exit 1; }
for f in "$VMM" "$GUEST/vmlinux" "$GUEST/initramfs.cpio" /bin/busybox; do
    [ -f "$f" ] || fail "$f is missing (make build guest-image; apt-get install busybox-static)"
done
file -b "$VMM" | grep -qE "static(-pie)? linked|statically linked" || fail "$VMM must be statically linked (make lab builds it)"

# L1 kernel and KVM modules from Debian's cloud kernel package.
PKG=$(apt-cache depends linux-image-cloud-amd64 | awk '/Depends: linux-image-/ {print $2; exit}')
[ -n "$PKG" ] || fail "cannot resolve linux-image-cloud-amd64 (apt-get update?)"
mkdir -p "$CACHE"
if [ ! -d "$CACHE/$PKG" ]; then
    (cd "$CACHE" && apt-get download -q "$PKG" 2>/dev/null) || fail "apt-get download $PKG"
    dpkg-deb -x "$CACHE/${PKG}"_*.deb "$CACHE/$PKG.tmp"
    mv "$CACHE/$PKG.tmp" "$CACHE/$PKG"
    rm -f "$CACHE/${PKG}"_*.deb
fi
L1=$CACHE/$PKG
KVER=${PKG#linux-image-}
VMLINUZ=$L1/boot/vmlinuz-$KVER
[ -f "$VMLINUZ" ] || fail "$VMLINUZ missing from $PKG"

WORK=$(mktemp -d /tmp/husk-lab.XXXXXX)
trap 'rm -rf "$WORK"' EXIT
S=$WORK/stage
mkdir -p "$S"/{bin,proc,sys,dev,tmp,husk,modules}
cp /bin/busybox "$S/bin/busybox"
for a in sh mount insmod cat cut grep sed echo poweroff sleep ls head; do
    ln -s busybox "$S/bin/$a"
done
for m in virt/lib/irqbypass arch/x86/kvm/kvm arch/x86/kvm/kvm-amd; do
    src=$L1/lib/modules/$KVER/kernel/$m.ko
    [ -f "$src" ] || fail "module $m.ko missing from $PKG"
    cp "$src" "$S/modules/"
done
cp "$VMM" "$S/husk/husk-vmm"
cp "$GUEST/vmlinux" "$GUEST/initramfs.cpio" "$S/husk/"
cat > "$S/init" <<'INIT'
#!/bin/sh
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
up() { cut -d' ' -f1 /proc/uptime; }
echo "LAB: L1 up at $(up) s"
grep -qw svm /proc/cpuinfo && echo "LAB: L1 cpu has svm" || echo "LAB: FAIL: no svm flag in L1"
for m in irqbypass kvm kvm-amd; do
    insmod /modules/$m.ko || echo "LAB: FAIL: insmod $m"
done
[ -c /dev/kvm ] && echo "LAB: /dev/kvm ready (kvm-amd)" || echo "LAB: FAIL: no /dev/kvm"
start=$(up)
/husk/husk-vmm --kernel /husk/vmlinux --initramfs /husk/initramfs.cpio \
    --memory-mib 256 --vcpus 2 --console /dev/ttyS0 \
    --cmdline "console=ttyS0 reboot=k panic=-1"
rc=$?
echo "LAB: husk-vmm exit $rc after $start .. $(up) s (L1 uptime)"
echo "LAB: done"
poweroff -f
INIT
chmod +x "$S/init"
(cd "$S" && find . | cpio -o -H newc --quiet) > "$WORK/l1.cpio"

echo "lab: booting L1 ($PKG) under QEMU/TCG with emulated SVM; timeout ${TIMEOUT}s"
LOG=$WORK/l1.log
start=$(date +%s.%N)
timeout "$TIMEOUT" qemu-system-x86_64 \
    -machine q35,accel=tcg -cpu EPYC,+svm,+npt -smp 1 -m 2048 \
    -nodefaults -no-user-config -display none -no-reboot \
    -serial "file:$LOG" \
    -kernel "$VMLINUZ" -initrd "$WORK/l1.cpio" \
    -append "console=ttyS0 panic=-1 quiet" || fail "L1 QEMU did not finish: $(tail -5 "$LOG")"
end=$(date +%s.%N)
cp "$LOG" "${HUSK_LAB_LOG:-/tmp/husk-lab-l1.log}"
tr -d '\r' < "$LOG" | grep -E "^LAB:" | tee "$WORK/result"
grep -q "LAB: FAIL" "$WORK/result" && fail "a step in L1 failed"
grep -q "LAB: done" "$WORK/result" || fail "L1 did not finish its script (log: ${HUSK_LAB_LOG:-/tmp/husk-lab-l1.log})"
# What the L2 guest printed, with its own clock, through husk-vmm's serial.
l2() { tr -d '\r' < "$LOG" | grep -m1 -E "$1" || true; }
kvm=$(l2 "Booting paravirtualized kernel on KVM")
init=$(l2 "Run /init as init process")
cpus=$(l2 "smpboot: Total of [0-9]+ processors activated")
agent=$(l2 "^husk-agent:")
[ -n "$kvm" ] || fail "the L2 guest did not detect KVM"
[ -n "$init" ] || fail "the L2 guest kernel did not reach /init under husk-vmm"
[ -n "$agent" ] || fail "husk-agent printed nothing in L2"
echo "$cpus" | grep -q "Total of 2 processors" || fail "the L2 guest did not bring up its 2 vCPUs: ${cpus:-no smpboot line}"
grep -q "LAB: husk-vmm exit 0 " "$WORK/result" || fail "husk-vmm did not end with the guest's power-off (exit 0)"
echo "lab: L2 $init"
echo "lab: L2 ${cpus:-smpboot line missing}"
echo "lab: L2 agent said: $agent"
echo "lab: husk-vmm booted the guest kernel to /init under SVM KVM and ended on its reset; total $(echo "$end - $start" | bc) s"
