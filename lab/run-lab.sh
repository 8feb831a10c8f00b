#!/bin/bash
# husk nested lab: proves husk-vmm under hardware-assisted KVM on a host
# whose own /dev/kvm cannot run a standard guest (PVM). QEMU/TCG emulates an
# AMD CPU with SVM; the L1 guest runs Debian's cloud kernel with kvm-amd
# (from the linux-image-cloud-amd64 package, cached by version) and an
# initramfs carrying busybox, husk-vmm and our guest image; inside L1,
# husk-vmm boots our guest (L2). Results come back on L1's serial console;
# every failed step fails the lab.
#
# usage: lab/run-lab.sh <static bin dir with husk-vmm and husk> <guest dir with vmlinux, initramfs.cpio>
set -euo pipefail

BIN=${1:?usage: run-lab.sh <static bin dir> <guest dir>}
GUEST=${2:?usage: run-lab.sh <static bin dir> <guest dir>}
VMM=$BIN/husk-vmm
HUSK=$BIN/husk
CACHE=${HUSK_LAB_CACHE:-/var/cache/husk/lab}
TIMEOUT=${HUSK_LAB_TIMEOUT:-900}

fail() { echo "lab: FAILED: $*" >&2; exit 1; }
DAEMONS="$(command -v virtiofsd || true) $(command -v vhost-device-vsock || true)"
for f in "$VMM" "$HUSK" "$GUEST/vmlinux" "$GUEST/initramfs.cpio" /bin/busybox $DAEMONS; do
    [ -f "$f" ] || fail "$f is missing (make lab builds the static binaries; make deps installs the rest)"
done
[ "$(echo $DAEMONS | wc -w)" = 2 ] || fail "virtiofsd and vhost-device-vsock must be in PATH (make deps)"
for f in "$VMM" "$HUSK"; do
    file -b "$f" | grep -qE "static(-pie)? linked|statically linked" || fail "$f must be statically linked (make lab builds it)"
done

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
mkdir -p "$S"/{bin,proc,sys,dev,tmp,run,husk,modules,etc/husk}
cp /bin/busybox "$S/bin/busybox"
for a in sh mount insmod cat cut grep sed echo poweroff sleep ls head awk pidof seq timeout tail; do
    ln -s busybox "$S/bin/$a"
done
for m in virt/lib/irqbypass arch/x86/kvm/kvm arch/x86/kvm/kvm-amd; do
    src=$L1/lib/modules/$KVER/kernel/$m.ko
    [ -f "$src" ] || fail "module $m.ko missing from $PKG"
    cp "$src" "$S/modules/"
done
cp "$VMM" "$HUSK" "$S/bin/"
cp "$GUEST/vmlinux" "$GUEST/initramfs.cpio" "$S/husk/"
# The daemons are Debian-built and dynamic: bring their libraries along.
for d in $DAEMONS; do
    cp "$d" "$S/bin/"
    for lib in $(ldd "$d" | grep -oE '/[^ ]+\.so[^ ]*'); do
        cp --parents -L "$lib" "$S/"
    done
done
cat > "$S/etc/husk/config.toml" <<'CONF'
# auto: L1's KVM has SVM, so husk picks husk-vmm.
hypervisor = "auto"
state_dir = "/run/husk"
[guest]
kernel = "/husk/vmlinux"
initramfs = "/husk/initramfs.cpio"
vcpus = 2
memory_mib = 256
[agent]
boot_timeout_ms = 120000
rpc_timeout_ms = 60000
CONF
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
mount -t tmpfs tmpfs /run
start=$(up)
husk-vmm --kernel /husk/vmlinux --initramfs /husk/initramfs.cpio \
    --memory-mib 256 --vcpus 2 --console /dev/ttyS0 \
    --cmdline "console=ttyS0 reboot=t panic=-1"
rc=$?
echo
echo "LAB: husk-vmm exit $rc after $start .. $(up) s (L1 uptime)"
# A guest kernel panic (no init) must read as a crash: exit 3.
# One hang (no exit within the lab's 15 min) was seen in ~12 runs and is not
# understood yet: a run that times out is reported and tried once more.
for attempt in 1 2; do
    timeout 60 husk-vmm --kernel /husk/vmlinux --initramfs /husk/initramfs.cpio \
        --memory-mib 128 --console /tmp/panic.log \
        --cmdline "console=ttyS0 reboot=t panic=-1 rdinit=/nonexistent"
    rc=$?
    echo "LAB: panic run: husk-vmm exit $rc"
    tail -3 /tmp/panic.log | sed 's/^/LAB: panic run: /'
    [ $rc = 143 ] || [ $rc = 124 ] || break
    echo "LAB: panic run: attempt $attempt timed out (known open bug), trying again"
done
husk-vmm --kernel /nonexistent/vmlinux
echo "LAB: bad kernel run: husk-vmm exit $?"
husk check 2>&1 | sed 's/^/LAB: check: /'
husk vm-ping > /tmp/ping 2>&1
rc=$?
sed 's/^/LAB: ping: /' /tmp/ping
[ $rc = 0 ] || { echo "LAB: FAIL: husk vm-ping exit $rc"; for f in /run/husk/*/console.log /run/husk/*/vmm.log; do [ -f $f ] && sed "s|^|LAB: $f: |" $f; done; }
# A container command through the agent, rootfs on virtio-fs.
mkdir -p /rootfs/bin /rootfs/proc /rootfs/sys /rootfs/dev /rootfs/tmp /rootfs/etc
cp /bin/busybox /rootfs/bin/
for a in sh uname echo cat; do ln -s busybox /rootfs/bin/$a; done
start=$(up)
husk run --rootfs /rootfs -- sh -c 'echo container on $(uname -r) sees $(cat /proc/cpuinfo | grep -c ^processor) cpus' > /tmp/run 2>&1
rc=$?
sed 's/^/LAB: run: /' /tmp/run
echo "LAB: husk run exit $rc, $start .. $(up) s (L1 uptime)"
[ $rc = 0 ] || echo "LAB: FAIL: husk run exit $rc"
# husk-vmm's own memory while a container runs: PSS outside the guest RAM
# memfd, and the guest RAM it has touched.
husk run --rootfs /rootfs -- sleep 10 > /tmp/sleeper 2>&1 &
measured=
for i in $(seq 60); do
    sleep 0.5
    ls /run/husk/*/shared/*/rootfs/bin > /dev/null 2>&1 || continue
    pid=$(pidof husk-vmm)
    [ -n "$pid" ] && [ -r /proc/$pid/smaps ] || continue
    awk '/^[0-9a-f]+-[0-9a-f]+ / { g = ($6 ~ /^\/memfd:husk-guest-ram/) }
        /^Pss:/ { if (g) guest += $2; else own += $2 }
        END { if (own > 0) print "LAB: mem: husk-vmm own PSS " own " KiB, guest RAM PSS " guest " KiB" }' \
        /proc/$pid/smaps > /tmp/mem 2>/dev/null
    grep -q "LAB: mem" /tmp/mem && { cat /tmp/mem; measured=1; break; }
done
[ -n "$measured" ] || { echo "LAB: FAIL: no running husk-vmm to measure"; sed 's/^/LAB: sleeper: /' /tmp/sleeper; }
wait
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
grep -q "LAB: panic run: husk-vmm exit 3" "$WORK/result" || fail "a guest panic did not end husk-vmm with status 3"
grep -q "LAB: bad kernel run: husk-vmm exit 1" "$WORK/result" || fail "a bad kernel path did not end husk-vmm with status 1"
mem=$(grep -m1 "LAB: mem:" "$WORK/result" || true)
[ -n "$mem" ] || fail "husk-vmm's memory was not measured"
echo "lab: ${mem#LAB: mem: }"
grep -q "LAB: ping: agent ready" "$WORK/result" || fail "husk vm-ping did not get an answer from the agent"
grep -qE "LAB: run: container on [^ ]+-husk sees 2 cpus" "$WORK/result" || fail "husk run did not run the container command"
grep -m1 "LAB: ping: agent ready" "$WORK/result" | sed 's/^LAB: ping: /lab: /'
grep -m1 "LAB: run: container" "$WORK/result" | sed 's/^LAB: run: /lab: container said: /' 
echo "lab: husk-vmm booted the guest kernel to /init under SVM KVM and ended on its reset; total $(echo "$end - $start" | bc) s"
