#!/bin/bash
# husk nested lab: proves husk-vmm under hardware-assisted KVM on a host
# whose own /dev/kvm cannot run a standard guest (PVM). QEMU/TCG emulates an
# AMD CPU with SVM; the L1 guest runs Debian's cloud kernel with kvm-amd
# (from the linux-image-cloud-amd64 package, cached by version) and an
# initramfs carrying busybox, husk-vmm, Debian's QEMU and our guest image;
# inside L1, husk-vmm boots our guest (L2). Results come back on L1's serial
# console; every failed step fails the lab (an L1 boot the emulator spoiled
# is taken again, see lab_phase). A second L1 boot benchmarks husk-vmm
# against QEMU microvm (KVM in L1): boot to agent-ready; the checks measure
# VMM memory.
#
# usage: lab/run-lab.sh <static bin dir with husk-vmm and husk> <guest dir with vmlinux, bzImage, initramfs.cpio>
#
# Environment: HUSK_LAB_RUNS (boots per VMM in the benchmark, default 5),
# HUSK_LAB_LOG (where the checks' L1 log is kept, default
# /tmp/husk-lab-l1.log), HUSK_LAB_L1_CPUS (default 2), HUSK_LAB_TIMEOUT (s
# per L1 boot, default 900), HUSK_LAB_STALL (s of silence that mean a stalled
# L1, default 60), HUSK_LAB_CACHE (default /var/cache/husk/lab).
set -euo pipefail

BIN=${1:?usage: run-lab.sh <static bin dir> <guest dir>}
GUEST=${2:?usage: run-lab.sh <static bin dir> <guest dir>}
VMM=$BIN/husk-vmm
HUSK=$BIN/husk
CACHE=${HUSK_LAB_CACHE:-/var/cache/husk/lab}
TIMEOUT=${HUSK_LAB_TIMEOUT:-900}
RUNS=${HUSK_LAB_RUNS:-5}
# L1's CPUs (multi-threaded TCG, one host thread each): two make the lab
# about a third faster than one.
L1_CPUS=${HUSK_LAB_L1_CPUS:-2}
QEMU=$(command -v qemu-system-x86_64 || true)
# microvm's firmware (bios-microvm.bin links to qboot.rom) and the option
# ROMs of a direct kernel boot.
MICROVM_BIOS=/usr/share/qemu/qboot.rom
QEMU_DATA="$MICROVM_BIOS /usr/share/qemu/bios-microvm.bin /usr/share/qemu/pvh.bin /usr/share/qemu/linuxboot_dma.bin"

fail() { echo "lab: FAILED: $*" >&2; exit 1; }
DAEMONS="$(command -v virtiofsd || true) $(command -v vhost-device-vsock || true)"
for f in "$VMM" "$HUSK" "$GUEST/vmlinux" "$GUEST/bzImage" "$GUEST/initramfs.cpio" /bin/busybox $DAEMONS "$QEMU" $QEMU_DATA; do
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
mkdir -p "$S"/{bin,proc,sys,dev,tmp,run,husk,modules,etc/husk,usr/bin,usr/share/qemu}
cp /bin/busybox "$S/bin/busybox"
for a in sh mount insmod cat cut grep sed echo poweroff sleep ls head awk pidof seq timeout tail kill wc ip ping mkdir cp touch switch_root dmesg chown chmod; do
    ln -s busybox "$S/bin/$a"
done
for m in virt/lib/irqbypass arch/x86/kvm/kvm arch/x86/kvm/kvm-amd drivers/net/tun; do
    src=$L1/lib/modules/$KVER/kernel/$m.ko
    [ -f "$src" ] || fail "module $m.ko missing from $PKG"
    cp "$src" "$S/modules/"
done
cp "$VMM" "$HUSK" "$S/bin/"
cp "$GUEST/vmlinux" "$GUEST/bzImage" "$GUEST/initramfs.cpio" "$S/husk/"
# The device flood's guest: a kernel of its own, hostile from its first
# instruction (tests/images/device-flood.c).
bash "$(dirname "$0")/../tests/images/build-device-flood.sh" "$S/husk/device-flood.elf" || fail "building the device-flood guest"
# The virtio-net check's L2 userland: busybox as /init that only waits (the
# kernel sets the address from ip=; husk's agent would end the VM without
# its virtio-fs share).
N=$WORK/l2net
mkdir -p "$N/bin" "$N/proc"
cp /bin/busybox "$N/bin/busybox"
printf '#!/bin/busybox sh\n/bin/busybox sleep 600\n' > "$N/init"
chmod +x "$N/init"
(cd "$N" && find . | cpio -o -H newc --quiet) > "$S/husk/net-initramfs.cpio"
# QEMU for the benchmark, in /usr/bin: it looks for its firmware in
# ../share/qemu next to itself.
cp -L $QEMU_DATA "$S/usr/share/qemu/"
cp "$QEMU" "$S/usr/bin/"
# The daemons and QEMU are Debian-built and dynamic: bring their libraries.
for d in $DAEMONS $QEMU; do
    [ "$d" = "$QEMU" ] || cp "$d" "$S/bin/"
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
# L2 under L1 under TCG answers in seconds, not milliseconds: the health
# check gets the same deadline as any RPC here.
health_timeout_ms = 60000
CONF
# The benchmark's baseline: QEMU microvm on L1's KVM, same guest.
sed -e 's/^hypervisor = .*/hypervisor = "qemu"/' -e '/^# auto/d' "$S/etc/husk/config.toml" > "$S/etc/husk/qemu.toml"
printf '[qemu]\npath = "/usr/bin/qemu-system-x86_64"\naccel = "kvm"\n' >> "$S/etc/husk/qemu.toml"
# The benchmark's own copies: a healthy boot takes 2-4 s here, so 30 s
# tells a broken one without waiting two minutes.
for vmm in husk-vmm qemu; do
    src=$S/etc/husk/config.toml
    [ $vmm = qemu ] && src=$S/etc/husk/qemu.toml
    sed 's/^boot_timeout_ms = .*/boot_timeout_ms = 30000/' "$src" > "$S/etc/husk/bench-$vmm.toml"
done
# Density: the same husk-vmm pods with free page reporting on (the
# default) and off.
cp "$S/etc/husk/config.toml" "$S/etc/husk/density-on.toml"
sed '/^\[guest\]/a free_page_reporting = false' "$S/etc/husk/config.toml" > "$S/etc/husk/density-off.toml"
printf 'RUNS=%s\n' "$RUNS" > "$S/etc/lab.env"
cat > "$S/init" <<'INIT'
#!/bin/sh
export PATH=/bin:/usr/bin
# Off the initramfs first: pivot_root (virtiofsd's namespace sandbox,
# husk's jails) refuses an initramfs root. The files move to a tmpfs and
# switch_root frees the initramfs; this script then runs again from there.
if [ ! -e /.tmpfs-root ]; then
    mkdir -p /newroot
    mount -t tmpfs -o mode=0755 root /newroot
    for d in /*; do
        case $d in /newroot|/proc|/sys|/dev|/run|/tmp) mkdir -p /newroot$d ;; *) cp -a $d /newroot/ ;; esac
    done
    touch /newroot/.tmpfs-root
    exec switch_root /newroot /init
fi
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
up() { cut -d' ' -f1 /proc/uptime; }
# Two L1 boots share this script: lab=checks runs the functional steps,
# lab=bench the benchmark.
phase=$(sed -n 's/.*lab=\([a-z]*\).*/\1/p' /proc/cmdline)
echo "LAB: L1 up at $(up) s ($phase)"
# A heartbeat tells a stuck step from a stuck L1 in the log.
(while :; do sleep 15; echo "HEARTBEAT: L1 uptime $(up) s"; done) &
grep -qw svm /proc/cpuinfo && echo "LAB: L1 cpu has svm" || echo "LAB: FAIL: no svm flag in L1"
# kvm-amd on shadow paging (npt=0): the emulator's nested paging is what
# breaks (see the host's notes at lab_phase). Both VMMs' guests run the
# same way; husk-vmm's side of KVM does not change with it.
insmod /modules/irqbypass.ko || echo "LAB: FAIL: insmod irqbypass"
insmod /modules/kvm.ko || echo "LAB: FAIL: insmod kvm"
insmod /modules/kvm-amd.ko npt=0 || echo "LAB: FAIL: insmod kvm-amd"
insmod /modules/tun.ko || echo "LAB: FAIL: insmod tun"
# What udev's rule does on a distribution (GROUP="kvm", MODE="0660"): a
# VMM under its sandbox's uid reaches KVM through the device's group.
[ -c /dev/kvm ] && chown 0:36 /dev/kvm && chmod 0660 /dev/kvm
[ -c /dev/kvm ] && echo "LAB: /dev/kvm ready (kvm-amd, npt=$(cat /sys/module/kvm_amd/parameters/npt))" || echo "LAB: FAIL: no /dev/kvm"
mount -t tmpfs tmpfs /run
# Boot to agent-ready, husk-vmm and QEMU microvm interleaved, same guest,
# same L1 KVM. A sample is a measurement, not a check (the checks phase has
# those): a boot that breaks (seen once: a QEMU-booted L2 whose second
# vCPU never ran again, RCU stall, agent never up) is reported as
# "bench-broken" with its reason and taken again, twice per VMM at most;
# the host lists them under the table.
bench() {
    . /etc/lab.env
    for i in $(seq $RUNS); do
        for vmm in husk-vmm qemu; do
            for try in 1 2 3; do
                if HUSK_CONFIG=/etc/husk/bench-$vmm.toml husk vm-ping --json --id bench-$vmm-$i-$try > /tmp/bench 2>&1; then
                    echo "LAB: bench: $vmm $(cat /tmp/bench)"
                    break
                fi
                sed 's/^/LAB: bench-log: /' /tmp/bench
                echo "LAB: bench-broken: $vmm run $i try $try: $(head -1 /tmp/bench | cut -c1-200)"
                echo >> /tmp/broken-$vmm
                [ $(wc -l < /tmp/broken-$vmm) -le 2 ] || { echo "LAB: FAIL: bench: $vmm: more than two broken boots"; break; }
            done
        done
    done
}
# The emulated machine crashed L2 guests on their own now and then: a
# triple fault with no kernel message, seen with both VMMs (one boot in
# about 50 with NPT; none seen since npt=0). A step whose guest ends that
# way ends this L1 boot as spoiled by the emulator, and the host runs the
# phase again; a kernel panic, or any other failure, is the step's own.
# usage: spurious_crash <step> <files with the step's output>
spurious_crash() {
    step=$1
    shift
    grep -qa "Kernel panic" "$@" 2>/dev/null && return 0
    grep -qaE "the guest crashed \(shutdown or triple fault\)|VM exited \(exit status: 0\) before the agent answered" "$@" 2>/dev/null || return 0
    echo "LAB: L2 crashed on its own: $step"
    tail -q -n 15 "$@" 2>/dev/null | sed 's/^/LAB: L2 crash log: /'
    poweroff -f
}
# A busybox container root for `husk run`: sleep too, the memory checks run
# `sleep` in a container (without it the container failed at once and the
# check raced the sandbox teardown).
make_rootfs() {
    mkdir -p /rootfs/bin /rootfs/proc /rootfs/sys /rootfs/dev /rootfs/tmp /rootfs/etc
    cp /bin/busybox /rootfs/bin/
    for a in sh uname echo cat sleep dd; do ln -sf busybox /rootfs/bin/$a; done
}
# Density: $DENSITY_PODS idle pods (`husk run ... sleep`, one VM each) at
# once; once L1's MemAvailable settles, the PSS of every process of each
# pod (husk, husk-vmm, the daemons) split into guest RAM (the memfd) and
# their own, and the drop in MemAvailable. usage: density <on|off>
DENSITY_PODS=3
mem_available() { awk '/^MemAvailable:/ {print $2}' /proc/meminfo; }
settled() {
    local last now i
    last=$(mem_available)
    for i in $(seq 24); do
        sleep 5; now=$(mem_available)
        [ $((now > last ? now - last : last - now)) -lt 2048 ] && break
        last=$now
    done
    echo $now
}
# PSS in KiB of processes $2...: "own guest", guest being their mappings of
# the guest RAM memfd named $1.
pss() {
    local ram="^/memfd:$1( |\$)"
    shift
    for p; do cat /proc/$p/smaps 2>/dev/null; done |
        awk -v ram="$ram" '/^[0-9a-f]+-[0-9a-f]+ / { g = ($6 ~ ram) } /^Pss:/ { if (g) guest += $2; else own += $2 } END { print own + 0, guest + 0 }'
}
# The pids of $1 and everything below it.
tree() {
    for s in /proc/[0-9]*/stat; do cut -d' ' -f1,4 $s 2>/dev/null; done |
        awk -v root=$1 '{ pp[$1] = $2 } END { t[root] = 1; do { n = 0; for (p in pp) if ((pp[p] in t) && !(p in t)) { t[p] = 1; n++ } } while (n); for (p in t) print p }'
}
# Bytes the VMMs of the pods whose state directories are $1... have been
# given back so far, all together.
discarded() {
    local d t=0 b
    for d; do
        b=$(husk-vmm ctl $d/sock/vmm.sock status 2>/dev/null | sed -n 's/.*balloon_discarded_bytes=\([0-9]*\).*/\1/p')
        t=$((t + ${b:-0}))
    done
    echo $t
}
# Free page reporting works in passes a few seconds apart: waits (at most
# 60 s) until a 10 s window gives back less than 1 MiB more.
reported() {
    local last now i
    last=$(discarded /run/husk/_husk/density-on-*)
    for i in $(seq 6); do
        sleep 10; now=$(discarded /run/husk/_husk/density-on-*)
        [ $((now - last)) -lt 1048576 ] && break
        last=$now
    done
}
density() {
    local mode=$1 before after pids i own=0 guest=0 pod failed alive
    rm -f /rootfs/density-stop
    before=$(settled)
    pids=
    for i in $(seq $DENSITY_PODS); do
        HUSK_CONFIG=/etc/husk/density-$mode.toml husk run --id density-$mode-$i --rootfs /rootfs -- \
            sh -c 'while [ ! -e /density-stop ]; do sleep 1; done' > /tmp/density-$i 2>&1 &
        pids="$pids $!"
    done
    for i in $(seq 240); do
        [ $(ls -d /run/husk/_husk/density-$mode-*/shared/*/rootfs/bin 2>/dev/null | wc -l) -ge $DENSITY_PODS ] && break
        sleep 0.5
    done
    [ $mode = off ] || reported
    after=$(settled)
    for p in $pids; do
        pod=$(pss husk-guest-ram $(tree $p))
        own=$((own + ${pod% *})) guest=$((guest + ${pod#* }))
    done
    # The pods end once they see the file through virtio-fs.
    touch /rootfs/density-stop
    for i in $(seq 120); do
        alive=
        for p in $pids; do kill -0 $p 2>/dev/null && alive=1; done
        [ -n "$alive" ] || break
        sleep 0.5
    done
    for p in $pids; do kill -9 $p 2>/dev/null; done
    failed=0
    for p in $pids; do wait $p || failed=1; done
    # A measurement, as the boot benchmark's: a pod the emulator broke is
    # reported and the round taken again once; the host wants both rounds.
    if [ $failed = 0 ]; then
        echo "LAB: density: $mode pods $DENSITY_PODS own_kib $own guest_kib $guest drop_kib $((before - after))"
    else
        echo "LAB: density-broken: $mode: $(cat /tmp/density-* | tr '\n' ' ' | cut -c1-300)"
        [ -n "$2" ] || density $mode again
    fi
}
if [ "$phase" = bench ]; then
    bench
    make_rootfs
    density off
    density on
    echo "LAB: done"
    poweroff -f
fi
start=$(up)
husk-vmm --kernel /husk/vmlinux --initramfs /husk/initramfs.cpio \
    --memory-mib 256 --vcpus 2 --console /tmp/first.log \
    --cmdline "console=ttyS0 reboot=t panic=-1" 2> /tmp/first.err
rc=$?
# L2's console into L1's, where the host reads what the guest said.
cat /tmp/first.log
echo
[ $rc = 3 ] && spurious_crash "first run" /tmp/first.log /tmp/first.err
echo "LAB: husk-vmm exit $rc after $start .. $(up) s (L1 uptime)"
sed 's/^/LAB: first run: /' /tmp/first.err
# A guest kernel panic (no init) must read as a crash: exit 3. (The hang
# once seen here was most likely L1 itself freezing, which boot_l1 below
# deals with.)
timeout 60 husk-vmm --kernel /husk/vmlinux --initramfs /husk/initramfs.cpio \
    --memory-mib 128 --console /tmp/panic.log \
    --cmdline "console=ttyS0 reboot=t panic=-1 rdinit=/nonexistent" 2> /tmp/panic.err
rc=$?
# Exit 3 without the panic is a crash of the emulator's making, unless the
# guest printed the panic's cause: then husk-vmm lost the console's last
# lines (it once exited before its console writer wrote them, and the lab
# took that for the emulator's doing in most runs).
if [ $rc = 3 ] && ! grep -qa "Kernel panic" /tmp/panic.log && grep -qa "VFS: Cannot open root device" /tmp/panic.log; then
    echo "LAB: FAIL: panic run: the guest reached its panic but the console lost the message"
elif [ $rc = 3 ]; then
    spurious_crash "panic run" /tmp/panic.log /tmp/panic.err
fi
echo "LAB: panic run: husk-vmm exit $rc"
tail -3 /tmp/panic.log | sed 's/^/LAB: panic run: /'
husk-vmm --kernel /nonexistent/vmlinux
echo "LAB: bad kernel run: husk-vmm exit $?"
# The same guest from its bzImage, through the 64-bit boot protocol.
start=$(up)
timeout 120 husk-vmm --kernel /husk/bzImage --initramfs /husk/initramfs.cpio \
    --memory-mib 256 --vcpus 2 --console /tmp/bz.log \
    --cmdline "console=ttyS0 reboot=t panic=-1" 2> /tmp/bz.err
rc=$?
[ $rc = 3 ] && spurious_crash "bzImage run" /tmp/bz.log /tmp/bz.err
echo "LAB: bzimage run: husk-vmm exit $rc after $start .. $(up) s (L1 uptime)"
grep -m1 -E "Run /init as init process" /tmp/bz.log | sed 's/^/LAB: bzimage run: /'
grep -m1 -E "Total of [0-9]+ processors activated" /tmp/bz.log | sed 's/^/LAB: bzimage run: /'
# The agent's own lines: its ready line, or an event it logged (tracing
# names the module: husk_agent...).
grep -m1 -E "^husk-agent:| husk_agent[a-z_:]*: " /tmp/bz.log | sed 's/^/LAB: bzimage run: agent: /'
# The control socket on a guest that spins at 100% (panic=0 loops for
# ever): paused, its vCPU thread takes no CPU time; resumed, it does;
# shutdown ends husk-vmm with status 0 and removes the socket.
husk-vmm --kernel /husk/vmlinux --initramfs /husk/initramfs.cpio \
    --memory-mib 128 --console /tmp/spin.log --api-socket /run/vmm.sock \
    --cmdline "console=ttyS0 panic=0 rdinit=/nonexistent" 2> /tmp/spin.err &
vpid=$!
for i in $(seq 120); do grep -q "end Kernel panic" /tmp/spin.log 2>/dev/null && break; sleep 0.5; done
# This guest panics on purpose: only husk-vmm's word tells a crash.
kill -0 $vpid 2>/dev/null || { wait $vpid; spurious_crash "control socket" /tmp/spin.err; }
vcpu_ticks() {
    for t in /proc/$vpid/task/*; do
        [ "$(cat $t/comm)" = vcpu0 ] && awk '{print $14 + $15}' $t/stat
    done
}
ctl() { echo "LAB: ctl: $1 -> $(husk-vmm ctl /run/vmm.sock $1)"; }
ctl status
ctl pause
a=$(vcpu_ticks); sleep 2; b=$(vcpu_ticks)
ctl resume
sleep 2; c=$(vcpu_ticks)
echo "LAB: ctl: vCPU ticks over 2 s: paused $((b - a)), running $((c - b))"
ctl shutdown
wait $vpid
rc=$?
[ $rc = 3 ] && spurious_crash "control socket" /tmp/spin.err
echo "LAB: ctl: husk-vmm exit $rc"
[ -e /run/vmm.sock ] && echo "LAB: FAIL: control socket left behind"
husk check 2>&1 | sed 's/^/LAB: check: /'
husk vm-ping > /tmp/ping 2>&1
rc=$?
[ $rc = 0 ] || spurious_crash "husk vm-ping" /tmp/ping
sed 's/^/LAB: ping: /' /tmp/ping
[ $rc = 0 ] || { echo "LAB: FAIL: husk vm-ping exit $rc"; for f in /run/husk/_husk/*/console.log /run/husk/_husk/*/vmm.log; do [ -f $f ] && sed "s|^|LAB: $f: |" $f; done; }
# A container command through the agent, rootfs on virtio-fs.
make_rootfs
start=$(up)
husk run --rootfs /rootfs -- sh -c 'echo container on $(uname -r) sees $(cat /proc/cpuinfo | grep -c ^processor) cpus' > /tmp/run 2>&1
rc=$?
[ $rc = 0 ] || spurious_crash "husk run" /tmp/run
sed 's/^/LAB: run: /' /tmp/run
echo "LAB: husk run exit $rc, $start .. $(up) s (L1 uptime)"
[ $rc = 0 ] || echo "LAB: FAIL: husk run exit $rc"
# husk-vmm's own virtio-net: L2 takes a static address from its kernel
# command line (ip=) and only waits; L1 pings it through the tap husk-vmm
# opened, small and MTU-sized packets, then stops it.
husk-vmm --kernel /husk/vmlinux --initramfs /husk/net-initramfs.cpio \
    --memory-mib 256 --console /tmp/net.log --api-socket /run/net.sock \
    --net tap=hvtap0,mac=02:00:0a:00:63:02,mtu=1500 \
    --cmdline "console=ttyS0 reboot=t panic=-1 ip=10.0.99.2::10.0.99.1:255.255.255.0::eth0:off" 2> /tmp/net.err &
npid=$!
for i in $(seq 120); do ip link show hvtap0 > /dev/null 2>&1 && break; sleep 0.5; done
ip addr add 10.0.99.1/24 dev hvtap0
ip link set hvtap0 up
for i in $(seq 240); do grep -q "IP-Config: Complete" /tmp/net.log 2>/dev/null && break; kill -0 $npid 2>/dev/null || break; sleep 0.5; done
grep -m1 -A1 "IP-Config: Complete" /tmp/net.log | sed 's/^/LAB: net: L2 /'
ping -c 5 -W 5 10.0.99.2 > /tmp/ping-small 2>&1
small=$?
ping -c 20 -i 0.2 -W 5 -s 1472 10.0.99.2 > /tmp/ping-big 2>&1
big=$?
tail -2 /tmp/ping-small | sed 's/^/LAB: net: 84-byte pings: /'
tail -2 /tmp/ping-big | sed 's/^/LAB: net: 1500-byte pings: /'
echo "LAB: net: L1 neighbour: $(ip neigh show 10.0.99.2)"
echo "LAB: net: ping exits $small $big"
husk-vmm ctl /run/net.sock shutdown > /dev/null 2>&1 || kill $npid
wait $npid
rc=$?
[ $rc = 3 ] && spurious_crash "net run" /tmp/net.log /tmp/net.err
sed 's/^/LAB: net: vmm: /' /tmp/net.err
echo "LAB: net: husk-vmm exit $rc"
[ $small = 0 ] && [ $big = 0 ] || { echo "LAB: FAIL: no ping through husk-vmm's virtio-net"; tail -20 /tmp/net.log | sed 's/^/LAB: net: L2 console: /'; }
# A VMM's own memory while a container runs: PSS outside the guest RAM
# memfd (husk-vmm: husk-guest-ram; QEMU: memory-backend-memfd), and the guest
# RAM it has touched.  usage: measure <config> <process name> <memfd name>
measure() {
    HUSK_CONFIG=$1 husk run --rootfs /rootfs -- sleep 10 > /tmp/sleeper 2>&1 &
    sleeper=$!
    measured=
    for i in $(seq 120); do
        sleep 0.5
        ls /run/husk/_husk/*/shared/*/rootfs/bin > /dev/null 2>&1 || continue
        pid=$(pidof $2)
        [ -n "$pid" ] && [ -r /proc/$pid/smaps ] || continue
        mem=$(pss $3 $pid)
        [ "${mem% *}" -gt 0 ] && { echo "LAB: mem: $2 own PSS ${mem% *} KiB, guest RAM PSS ${mem#* } KiB"; measured=1; break; }
    done
    # What confines the running pod's processes, and husk-vmm's threads
    # one by one (each has a seccomp filter of its own kind).
    husk check 2>&1 | sed "s/^/LAB: check: $2: /"
    # How the VMM reaches KVM: husk-vmm through the descriptor the shim
    # opened (no group), QEMU through /dev/kvm's group.
    [ -n "$measured" ] && echo "LAB: kvm: $2 groups [$(sed -n 's/^Groups:[[:space:]]*//p' /proc/$pid/status | xargs)] kvm fds $(ls -l /proc/$pid/fd 2>/dev/null | grep -c ' -> /dev/kvm$')"
    if [ -n "$measured" ] && [ "$2" = husk-vmm ]; then
        for t in /proc/$pid/task/*; do
            echo "LAB: thread: $(cat $t/comm) seccomp $(awk '/^Seccomp:/ {print $2}' $t/status) filters $(awk '/^Seccomp_filters:/ {print $2}' $t/status)"
        done
    fi
    # The runtime gives each husk-vmm its control socket in the sandbox's
    # socket dir.
    for sock in /run/husk/_husk/*/sock/vmm.sock; do
        [ -S "$sock" ] && echo "LAB: ctl: sandbox $(basename $(dirname $(dirname $sock))) -> $(husk-vmm ctl $sock status 2>&1)"
    done
    wait $sleeper
    [ -n "$measured" ] || {
        spurious_crash "memory of $2" /tmp/sleeper
        echo "LAB: FAIL: no running $2 to measure"
        sed 's/^/LAB: sleeper: /' /tmp/sleeper
    }
}
measure /etc/husk/config.toml husk-vmm husk-guest-ram
measure /etc/husk/qemu.toml qemu-system-x86_64 memory-backend-memfd
# husk-vmm's free page reporting with the real guest: once the guest's
# first report of its free memory is done, a container touches 96 MiB (dd's
# buffer) and frees it; husk-vmm must punch it out of the guest RAM memfd
# (its counter grows by at least 64 MiB: reports take only whole free 4 MiB
# blocks, so the edges of the buffer may stay) and the guest RAM it holds
# falls back to within 16 MiB of what it was at rest.
guest_ram() { local m; m=$(pss husk-guest-ram $1); echo ${m#* }; }
rm -f /rootfs/fpr-go /rootfs/fpr-stop
husk run --id fpr --rootfs /rootfs -- sh -c 'while [ ! -e /fpr-go ]; do sleep 1; done; dd if=/dev/zero of=/dev/null bs=96M count=1 2>/dev/null; while [ ! -e /fpr-stop ]; do sleep 1; done' > /tmp/fpr 2>&1 &
fpid=$!
for i in $(seq 240); do
    ls /run/husk/_husk/fpr/shared/*/rootfs/bin > /dev/null 2>&1 && break
    sleep 0.5
done
# The container runs, so the guest has booted; its first report (all the
# memory free at boot) ends when the counter stops moving.
last=-1
for i in $(seq 60); do
    sleep 2
    now=$(discarded /run/husk/_husk/fpr)
    [ "${now:-0}" -gt 0 ] && [ "$now" = "$last" ] && break
    last=${now:--1}
done
vpid=$(pidof husk-vmm)
rest=$(guest_ram $vpid)
before=$(discarded /run/husk/_husk/fpr)
touch /rootfs/fpr-go
after=$before
for i in $(seq 120); do
    sleep 1
    after=$(discarded /run/husk/_husk/fpr)
    [ "${after:-0}" -ge $((${before:-0} + (64 << 20))) ] && [ "$(guest_ram $vpid)" -lt $((rest + (16 << 10))) ] && break
done
echo "LAB: fpr: guest RAM PSS at rest $rest KiB, after dd $(guest_ram $vpid) KiB; given back by husk-vmm $(( (${after:-0} - ${before:-0}) >> 20 )) MiB after dd, ${before:-0} bytes before"
touch /rootfs/fpr-stop
wait $fpid || { echo "LAB: FAIL: fpr: the container failed"; sed 's/^/LAB: fpr: /' /tmp/fpr; }
# A guest that resets every device with rings outside its memory, in a
# loop, for 20 s (device-flood.elf, no agent: the boot times out), through
# the runtime as a pod's VM is run: husk-vmm logs a refusal the first time
# and then at each power of two, so its log holds a few lines for
# thousands of cycles. The logs are copied each second while it runs (the
# sandbox directory goes with the failed boot).
sed -e 's|^kernel = .*|kernel = "/husk/device-flood.elf"|' -e 's/^boot_timeout_ms = .*/boot_timeout_ms = 20000/' \
    /etc/husk/config.toml > /etc/husk/flood.toml
HUSK_CONFIG=/etc/husk/flood.toml husk vm-ping --id flood > /tmp/flood 2>&1 &
fpid=$!
fd=/run/husk/_husk/flood
while kill -0 $fpid 2>/dev/null; do
    cp $fd/vmm.log /tmp/flood-vmm.log 2>/dev/null
    cat $fd/console.log.1 $fd/console.log > /tmp/flood-console.log 2>/dev/null
    sleep 1
done
wait $fpid
rc=$?
fdev=$(grep -o "husk-flood: devices [0-9]*" /tmp/flood-console.log | tail -1 | awk '{print $3}')
fcyc=$(grep -o "husk-flood: cycles [0-9]*" /tmp/flood-console.log | tail -1 | awk '{print $3}')
echo "LAB: flood: vm-ping exit $rc devices ${fdev:-0} cycles ${fcyc:-0} vmm_log_lines $(cat /tmp/flood-vmm.log 2>/dev/null | wc -l) bytes $(cat /tmp/flood-vmm.log 2>/dev/null | wc -c)"
echo "LAB: flood: vm-ping said: $(grep -v '^ *$' /tmp/flood | head -1 | cut -c1-200)"
sed 's/^/LAB: flood: vmm: /' /tmp/flood-vmm.log 2>/dev/null | head -40
[ -e $fd ] && echo "LAB: FAIL: flood: the sandbox directory stayed after the failed boot"
# Every call a seccomp filter refused (or, with --seccomp-log, let through)
# in the steps above, from the kernel's log: each is a missing entry.
dmesg | grep "type=1326" | sed 's/.*\(pid=.*\)/LAB: FAIL: seccomp refused: \1/'
# A husk-vmm thread that makes a call outside its filter kills husk-vmm,
# with the real guest: the vCPU thread before the guest's first
# instruction, the virtio-net worker as it starts.
for kind in vcpu net; do
    extra=
    [ $kind = net ] && extra="--net tap=hvtap1,mac=02:00:0a:00:63:03"
    timeout 60 husk-vmm --kernel /husk/vmlinux --initramfs /husk/initramfs.cpio \
        --memory-mib 128 --console /tmp/sec.log --test-seccomp $kind $extra \
        --cmdline "console=ttyS0 reboot=t panic=-1" 2> /tmp/sec.err
    echo "LAB: seccomp test: $kind exit $?"
    sed "s/^/LAB: seccomp test: $kind: /" /tmp/sec.err
    dmesg | grep "type=1326" | tail -1 | sed "s/.*\(pid=.*\)/LAB: seccomp test: $kind: kernel: \1/"
done
echo "LAB: done"
poweroff -f
INIT
chmod +x "$S/init"
(cd "$S" && find . | cpio -o -H newc --quiet) > "$WORK/l1.cpio"

echo "lab: L1 is $PKG on $L1_CPUS CPUs under QEMU/TCG with emulated SVM; timeout ${TIMEOUT}s a boot"
# Each phase's L1 log is kept: the checks' at $KEEP, the benchmark's next
# to it; spoiled attempts as .attemptN.
KEEP=${HUSK_LAB_LOG:-/tmp/husk-lab-l1.log}
keep_of() { [ "$1" = checks ] && echo "$KEEP" || echo "${KEEP%.log}-$1.log"; }
LOG=$WORK/l1-checks.log
trap 'for p in checks bench; do cp "$WORK/l1-$p.log" "$(keep_of $p)" 2>/dev/null; done; rm -rf "$WORK"' EXIT
# Runs L1 once for phase $1 (checks or bench): 0 when QEMU ended by itself,
# 1 on a QEMU failure or the overall timeout, 2 when L1 stalled: no word
# from L1's script (a LAB line, or the heartbeat it prints every 15 s) for
# $STALL seconds. Kernel messages do not count: a broken L1 can go on
# printing soft-lockup and RCU-stall reports for ever while its script is
# dead (seen: CPU 1 stuck in the L2 QEMU's KVM_RUN, CPU 0's timers dead).
# A soft lockup of a minute or more counts as a stall on its own.
STALL=${HUSK_LAB_STALL:-60}
boot_l1() {
    : > "$LOG"
    qemu-system-x86_64 \
        -machine q35,accel=tcg -cpu EPYC,+svm,+npt -smp "$L1_CPUS" -m 2048 \
        -nodefaults -no-user-config -display none -no-reboot \
        -serial "file:$LOG" \
        -kernel "$VMLINUZ" -initrd "$WORK/l1.cpio" \
        -append "console=ttyS0 panic=-1 quiet lab=$1" &
    local qemu=$! said=-1 quiet=0 waited=0
    while kill -0 $qemu 2>/dev/null; do
        sleep 5
        waited=$((waited + 5))
        local now
        now=$(grep -acE '(LAB|HEARTBEAT):' "$LOG" || true)
        if [ "$now" = "$said" ]; then quiet=$((quiet + 5)); else quiet=0; said=$now; fi
        # A CPU stuck for a minute in a VMM's KVM_RUN (soft lockup) is the
        # same stall with the heartbeat still going (seen in the benchmark:
        # CPU 0 stuck 600 s in an L2 vCPU thread while the step waited).
        grep -aqE 'soft lockup - CPU#[0-9]+ stuck for ([6-9][0-9]|[0-9]{3,})s' "$LOG" && quiet=$STALL
        if [ $quiet -ge "$STALL" ] || [ $waited -ge "$TIMEOUT" ]; then
            kill $qemu 2>/dev/null
            sleep 2
            kill -9 $qemu 2>/dev/null
            wait $qemu 2>/dev/null
            [ $quiet -ge "$STALL" ] && return 2
            return 1
        fi
    done
    wait $qemu
}
# The emulated machine under the lab is not sound. With kvm-amd on nested
# paging (NPT), L1's own kernel died now and then right after one of its
# KVM guests (L2, either VMM) exited: as a crash, "BUG: TASK stack guard
# page was hit" with page faults recursing on a %gs access in
# exc_page_fault in the VMM's thread (L1's GS base still held the L2
# kernel's per-CPU address after the exit), as a silent reset (QEMU ended,
# -no-reboot, with no message), or as a stall (both L1 CPUs busy, no
# output; once with soft-lockup reports, see boot_l1). L2 guests also crashed on their own (see spurious_crash in L1's
# script). Stress runs of back-to-back boots, husk-vmm and QEMU
# alternating: with NPT, L1 died after 74, 7 and 14 boots and lost one
# husk-vmm and one QEMU guest in 95 boots (QEMU 10.0 from backports as the
# emulator: L1 died after 14); with npt=0, 222 boots (80, 62 and 80 in
# three L1 boots) lost no guest, and L1 stalled once. So L1 runs kvm-amd
# with npt=0, and the lab keeps its guard:
# it runs in two L1 boots, the checks (about ten L2 boots) and the
# benchmark, and a phase whose L1 stalled, ended before its script did, or
# lost a guest to a spurious crash is reported, its log kept, and run
# again, eight attempts at most. Every check must pass within one attempt;
# a step that fails any other way (a "LAB: FAIL" line) or hangs while L1
# lives is not retried.
l1_complaint() {
    local c
    c=$(grep -aoE -m1 '(soft lockup|rcu: INFO|BUG: |Kernel panic).*' "$LOG" | tr -d '\r' | cut -c1-80 || true)
    echo "${c:-no kernel message}"
}
l1_last_words() { grep -aE -m1 '^\[ *[0-9.]+\] (Kernel panic|BUG: )' "$LOG" | tr -d '\r' || echo "no panic message (reset)"; }
# usage: lab_phase <checks|bench>; appends the phase's LAB lines to $WORK/result.
lab_phase() {
    local phase=$1 keep rc why l2
    keep=$(keep_of "$phase")
    LOG=$WORK/l1-$phase.log
    echo "lab: $phase: booting L1"
    for attempt in 1 2 3 4 5 6 7 8; do
        rc=0
        boot_l1 "$phase" || rc=$?
        why=
        l2=$(tr -d '\r' < "$LOG" | grep -a -m1 "^LAB: L2 crashed on its own: " || true)
        [ $rc = 2 ] && why="L1 stalled: its script silent for ${STALL}s ($(l1_complaint))"
        [ $rc = 0 ] && [ -n "$l2" ] && why="an L2 guest crashed on its own (triple fault, no kernel message) in step: ${l2#LAB: L2 crashed on its own: }"
        [ $rc = 0 ] && [ -z "$why" ] && ! grep -qa "LAB: done" "$LOG" && why="L1 ended before its script did: $(l1_last_words)"
        [ -n "$why" ] || break
        cp "$LOG" "$keep.attempt$attempt"
        echo "lab: $phase attempt $attempt: $why, after: $(tr -d '\r' < "$LOG" | grep -aE '^(LAB|HEARTBEAT):' | grep -v "L2 crash" | tail -1 | cut -c1-100) (log: $keep.attempt$attempt)"
        echo "$phase attempt $attempt: $why" >> "$WORK/spoiled"
        [ $attempt = 8 ] && fail "$phase: L1 failed eight times in a row (logs: $keep.attempt*)"
        echo "lab: $phase: running it again"
    done
    [ $rc = 0 ] || fail "$phase: L1 QEMU did not finish (failed or timed out; whole L1 log: $keep): $(tail -5 "$LOG")"
    tr -d '\r' < "$LOG" | grep -E "^LAB:" | sed 's/^LAB: done$/LAB: done '"$phase"'/' | tee -a "$WORK/result"
    grep -q "LAB: FAIL" "$WORK/result" && fail "a step in L1 failed ($phase)"
    grep -q "LAB: done $phase" "$WORK/result" || fail "L1 did not finish its $phase script (log: $keep)"
}
start=$(date +%s.%N)
lab_phase checks
lab_phase bench
end=$(date +%s.%N)
# The host's checks below read the L2 console from the checks phase.
LOG=$WORK/l1-checks.log
# What the L2 guest printed, with its own clock, through husk-vmm's serial.
l2() { tr -d '\r' < "$LOG" | grep -m1 -E "$1" || true; }
kvm=$(l2 "Booting paravirtualized kernel on KVM")
init=$(l2 "Run /init as init process")
cpus=$(l2 "smpboot: Total of [0-9]+ processors activated")
agent=$(l2 "^husk-agent:| husk_agent[a-z_:]*: ")
[ -n "$kvm" ] || fail "the L2 guest did not detect KVM"
[ -n "$init" ] || fail "the L2 guest kernel did not reach /init under husk-vmm"
[ -n "$agent" ] || fail "husk-agent printed nothing in L2"
echo "$cpus" | grep -q "Total of 2 processors" || fail "the L2 guest did not bring up its 2 vCPUs: ${cpus:-no smpboot line}"
grep -q "LAB: husk-vmm exit 0 " "$WORK/result" || fail "husk-vmm did not end with the guest's power-off (exit 0)"
grep -m1 "LAB: first run: .*husk_vmm: guest starts" "$WORK/result" | sed "s/^LAB: first run: .*husk_vmm: /lab: husk-vmm: /" || true
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
grep -q "LAB: bzimage run: husk-vmm exit 0 " "$WORK/result" || fail "the bzImage boot did not end with the guest's power-off (exit 0)"
grep -q "LAB: bzimage run: .*Run /init" "$WORK/result" || fail "the bzImage guest did not reach /init"
grep -q "LAB: bzimage run: .*Total of 2 processors" "$WORK/result" || fail "the bzImage guest did not bring up 2 vCPUs"
grep -q "LAB: bzimage run: agent: " "$WORK/result" || fail "husk-agent printed nothing in the bzImage guest"
grep "LAB: bzimage run: husk-vmm exit" "$WORK/result" | sed 's/^LAB: /lab: /'
for r in "status -> ok running" "pause -> ok paused" "resume -> ok running" "shutdown -> ok stopping"; do
    grep -q "LAB: ctl: $r" "$WORK/result" || fail "control socket: expected '$r'"
done
grep -q "LAB: ctl: husk-vmm exit 0" "$WORK/result" || fail "control socket: shutdown did not end husk-vmm with status 0"
grep -q "LAB: net: ping exits 0 0" "$WORK/result" || fail "virtio-net: L1 could not ping the husk-vmm guest through the tap"
grep -qi "LAB: net: L1 neighbour: 10.0.99.2 dev hvtap0 lladdr 02:00:0a:00:63:02" "$WORK/result" || fail "virtio-net: the guest did not answer with its MAC"
grep "LAB: net: 1500-byte pings: .*packets" "$WORK/result" | sed 's/^LAB: net: /lab: virtio-net: /'
grep "LAB: net: 1500-byte pings: round-trip" "$WORK/result" | sed 's/^LAB: net: /lab: virtio-net: /'
grep -qE "LAB: ctl: sandbox [^ ]+ -> ok running" "$WORK/result" || fail "the runtime's husk-vmm did not answer on its control socket"
ticks=$(grep -m1 "LAB: ctl: vCPU ticks" "$WORK/result" || true)
paused=$(echo "$ticks" | sed -n 's/.*paused \([0-9-]*\),.*/\1/p')
running=$(echo "$ticks" | sed -n 's/.*running \([0-9-]*\)$/\1/p')
[ -n "$paused" ] && [ -n "$running" ] || fail "control socket: vCPU time not measured: $ticks"
# 2 s is 200 ticks: a paused vCPU may finish one time slice, no more.
[ "$paused" -le 5 ] || fail "control socket: a paused vCPU ran for $paused ticks in 2 s"
[ "$running" -ge 40 ] || fail "control socket: a resumed vCPU ran for only $running ticks in 2 s"
echo "lab: control socket: ${ticks#LAB: ctl: }; shutdown exit 0"
# husk-vmm's threads, each under its own filter, and the filters' test.
threads=$(grep "LAB: thread: " "$WORK/result" || true)
[ -n "$threads" ] || fail "husk-vmm's threads were not listed"
for t in husk-vmm vcpu0 vcpu1 control signals console; do
    echo "$threads" | grep -q "LAB: thread: $t seccomp 2 filters 1$" || fail "husk-vmm thread $t not under one seccomp filter: $threads"
done
echo "$threads" | grep -v "seccomp 2 filters 1$" && fail "a husk-vmm thread without its filter"
echo "lab: husk-vmm's threads under their filters: $(echo "$threads" | sed 's/LAB: thread: \([^ ]*\) .*/\1/' | tr '\n' ' ')"
for kind in vcpu net; do
    # 159: killed by SIGSYS (128 + 31), as the shell reports it.
    grep -q "LAB: seccomp test: $kind exit 159" "$WORK/result" || fail "husk-vmm's $kind thread made a forbidden call and was not killed: $(grep "seccomp test: $kind" "$WORK/result")"
    grep -q "LAB: seccomp test: $kind: kernel: .*sig=31 .*syscall=41 " "$WORK/result" || fail "the kernel did not log the $kind thread's kill"
    grep -m1 "LAB: seccomp test: $kind: kernel:" "$WORK/result" | sed 's/^LAB: /lab: /'
done
grep "LAB: check: husk-vmm: " "$WORK/result" | sed 's/^LAB: check: husk-vmm: /lab: husk check (husk-vmm pod): /'
grep "LAB: check: husk-vmm: .*husk-vmm: seccomp filter, capabilities none, .*mount ns own" "$WORK/result" > /dev/null || fail "husk check does not show husk-vmm filtered, without capabilities, in its own mount namespace"
# The same jail as under QEMU: the sandbox's own uid and gid (not root's),
# pid 1 of its own PID namespace, its own IPC and an empty network one.
for p in husk-vmm vhost-device-vs; do
    grep -E "LAB: check: husk-vmm: .* $p: seccomp filter, capabilities none, no_new_privs on, uid [1-9][0-9]*, gid [1-9][0-9]*, mount ns own, pid ns own, ipc ns own, net ns own" "$WORK/result" > /dev/null || fail "husk check does not show $p under its sandbox's uid in its own PID, IPC and network namespaces"
done
for p in vhost-device-vs virtiofsd; do
    grep "LAB: check: husk-vmm: .* $p: seccomp filter, .*mount ns own" "$WORK/result" > /dev/null || fail "husk check does not show $p filtered in its own mount namespace"
done
# husk-vmm runs KVM on the descriptor the shim opened: no supplementary
# group (L1's /dev/kvm is 0660 root:36, so the node is out of its reach).
grep "LAB: kvm: " "$WORK/result" | sed 's/^LAB: /lab: /'
grep -qE "LAB: kvm: husk-vmm groups \[\] kvm fds [1-9]" "$WORK/result" || fail "husk-vmm does not run on a /dev/kvm descriptor without the device's group: $(grep 'LAB: kvm: husk-vmm' "$WORK/result")"
# The device flood: the guest found its devices and reset them hundreds
# of times or more; husk-vmm lived through it (the boot ended by its
# timeout) and logged about log2(cycles) lines per device, where a line
# per refusal would be one per device per cycle.
flood=$(grep -m1 "LAB: flood: vm-ping exit" "$WORK/result" || true)
[ -n "$flood" ] || fail "the device flood did not run"
read -r fdev fcyc flines <<< "$(echo "$flood" | sed -n 's/.*devices \([0-9]*\) cycles \([0-9]*\) vmm_log_lines \([0-9]*\).*/\1 \2 \3/p')"
[ "${fdev:-0}" -ge 3 ] || fail "device flood: the guest found ${fdev:-no} virtio devices, not virtio-fs, vsock and the balloon: $flood"
# Nested, a cycle's 50-odd device exits take a few ms (about 1500 cycles
# in 20 s were seen): the guest says its count every 256.
[ "${fcyc:-0}" -ge 256 ] || fail "device flood: only ${fcyc:-no} cycles: $flood"
grep -q "LAB: flood: vm-ping said: .*did not answer" "$WORK/result" || fail "device flood: the boot did not end by its timeout (husk-vmm died?): $(grep -m1 'LAB: flood: vm-ping said' "$WORK/result")"
fbound=$(awk -v d="$fdev" -v c="$fcyc" 'BEGIN { printf "%d", d * 2 * (log(c * 64) / log(2) + 1) + 10 }')
[ "$flines" -le "$fbound" ] || fail "device flood: husk-vmm wrote $flines log lines for $fcyc cycles of $fdev devices (bound $fbound)"
echo "lab: device flood under husk-vmm: ${flood#LAB: flood: } (bound $fbound lines)"
grep "LAB: flood: vmm: " "$WORK/result" | head -5 | sed 's/^LAB: flood: vmm: /lab: device flood: husk-vmm said: /'
fpr=$(grep -m1 "LAB: fpr: guest RAM" "$WORK/result" || true)
[ -n "$fpr" ] || fail "husk-vmm's free page reporting was not measured"
echo "lab: free page reporting: ${fpr#LAB: fpr: }"
read -r at_rest after_dd given_mib <<< "$(echo "$fpr" | sed -n 's/.*at rest \([0-9]*\) KiB, after dd \([0-9]*\) KiB; given back by husk-vmm \([0-9-]*\) MiB.*/\1 \2 \3/p')"
[ -n "$given_mib" ] || fail "free page reporting: unreadable: $fpr"
[ "$given_mib" -ge 64 ] || fail "free page reporting: husk-vmm gave back $given_mib MiB of the 96 MiB the guest freed"
[ "$after_dd" -lt $((at_rest + 16384)) ] || fail "free page reporting: the guest RAM husk-vmm holds stayed up: $after_dd KiB after dd, $at_rest KiB at rest"
qmem=$(grep -m1 "LAB: mem: qemu" "$WORK/result" || true)
[ -n "$qmem" ] || fail "QEMU's memory was not measured"
echo "lab: ${qmem#LAB: mem: }"
# The benchmark table: medians of boot to agent-ready.
median() { sort -n | awk '{ v[NR] = $1 } END { if (NR == 0) print "-"; else if (NR % 2) printf "%.0f\n", v[(NR + 1) / 2]; else printf "%.0f\n", (v[NR / 2] + v[NR / 2 + 1]) / 2 }'; }
field() { grep "LAB: bench: $1 {" "$WORK/result" | grep -oE "\"$2\":[0-9.]+" | cut -d: -f2; }
for vmm in husk-vmm qemu; do
    n=$(field $vmm total_ms | wc -l)
    [ "$n" -ge "$RUNS" ] || fail "benchmark: $n of $RUNS $vmm boots answered"
    n=$(field $vmm vmm_ready_ms | wc -l)
    [ "$n" -ge "$RUNS" ] || fail "benchmark: $vmm said when it ran the guest (its ready socket) in $n of $RUNS boots"
done
echo "lab: boot to agent-ready, $RUNS runs each, interleaved, L2 on emulated-SVM KVM:"
echo "lab: | VMM | median ms to agent-ready | median ms guest kernel to /init | median ms VMM start | of which VMM ready | median ms connect | median ms host overhead |"
for vmm in husk-vmm qemu; do
    echo "lab: | $vmm | $(field $vmm total_ms | median) | $(field $vmm kernel_to_init_ms | median) | $(field $vmm vmm_start_ms | median) | $(field $vmm vmm_ready_ms | median) | $(field $vmm connect_ms | median) | $(field $vmm host_overhead_ms | median) |"
done
h=$(field husk-vmm total_ms | median); q=$(field qemu total_ms | median)
grep "LAB: bench-broken:" "$WORK/result" | sed 's/^LAB: bench-broken: /lab: broken boot taken again: /' || true
# Density of husk-vmm pods in L1, free page reporting off and on.
dfield() { grep -m1 "LAB: density: $1 pods" "$WORK/result" | grep -oE " $2 [0-9-]+" | awk '{print $2}'; }
for mode in off on; do
    [ -n "$(dfield $mode pods)" ] || fail "density: the round with free page reporting $mode was not measured"
done
echo "lab: density, $(dfield on pods) idle husk-vmm pods at once in L1, per pod (MiB):"
echo "lab: | free page reporting | PSS (all) | of which guest RAM | MemAvailable drop | pods/GiB (PSS) | pods/GiB (drop) |"
for mode in off on; do
    awk -v m=$mode -v n="$(dfield $mode pods)" -v own="$(dfield $mode own_kib)" -v g="$(dfield $mode guest_kib)" -v d="$(dfield $mode drop_kib)" \
        'BEGIN { all = (own + g) / n / 1024; drop = d / n / 1024
                 printf "lab: | %s | %.1f | %.1f | %.1f | %.1f | %.1f |\n", m, all, g / n / 1024, drop, 1024 / all, (drop > 0 ? 1024 / drop : 0) }'
done
grep "LAB: density-broken:" "$WORK/result" | sed 's/^LAB: density-broken: /lab: density round taken again: /' || true
# No check on the difference: an idle guest frees little after boot, and
# with free page reporting on it held within noise of off (on < off in 3
# of 4 runs, on > off by 0.3 MiB in one). The fpr step above checks the
# giving back itself.
[ -f "$WORK/spoiled" ] && sed 's/^/lab: spoiled by the emulator, run again: /' "$WORK/spoiled"
# A benchmark figure, not a check: both VMMs boot under emulated SVM in an
# emulated L1, whose noise a pass/fail bound would turn into flakes. The
# goal the project tracks in its notes is at most 0.8.
ratio=$(echo "scale=2; $h / $q" | bc | sed 's/^\./0./')
met=$(echo "$ratio <= 0.8" | bc)
echo "lab: husk-vmm / QEMU boot time: $ratio (goal at most 0.8: $([ "$met" = 1 ] && echo met || echo NOT met); a benchmark figure, not enforced)"
echo "lab: husk-vmm booted the guest kernel to /init under SVM KVM and ended on its reset; total $(echo "$end - $start" | bc) s"
