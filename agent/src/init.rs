//! PID 1 duties: the guest's mounts, and the way out of the VM.

use std::fs;
use std::path::Path;
use std::time::Duration;

use nix::mount::{mount, MsFlags};
use nix::sys::reboot::{reboot, RebootMode};
use nix::sys::signal::{kill, Signal};
use nix::sys::stat::Mode;
use nix::time::{clock_gettime, ClockId};
use nix::unistd::{sync, Pid};

use husk_protocol::SHARE_TAG;

/// Mount point of the pod's virtio-fs share (tag [`SHARE_TAG`]).
pub const SHARE_DIR: &str = husk_protocol::GUEST_SHARE_DIR;

#[derive(Debug, thiserror::Error)]
pub enum InitError {
    #[error("mkdir {path}")]
    Mkdir {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("mount {fstype} on {target}")]
    Mount {
        fstype: &'static str,
        target: &'static str,
        #[source]
        source: nix::Error,
    },
}

struct Mount {
    source: &'static str,
    target: &'static str,
    fstype: &'static str,
    flags: MsFlags,
    data: Option<&'static str>,
}

const NOSUID_NODEV_NOEXEC: MsFlags = MsFlags::MS_NOSUID
    .union(MsFlags::MS_NODEV)
    .union(MsFlags::MS_NOEXEC);

/// Mounted in order; a failure is fatal, since a guest without them cannot
/// run containers.
const MOUNTS: &[Mount] = &[
    Mount {
        source: "proc",
        target: "/proc",
        fstype: "proc",
        flags: NOSUID_NODEV_NOEXEC,
        data: None,
    },
    Mount {
        source: "sysfs",
        target: "/sys",
        fstype: "sysfs",
        flags: NOSUID_NODEV_NOEXEC,
        data: None,
    },
    Mount {
        source: "devtmpfs",
        target: "/dev",
        fstype: "devtmpfs",
        flags: MsFlags::MS_NOSUID,
        data: Some("mode=0755"),
    },
    Mount {
        source: "devpts",
        target: "/dev/pts",
        fstype: "devpts",
        flags: MsFlags::MS_NOSUID.union(MsFlags::MS_NOEXEC),
        data: Some("newinstance,ptmxmode=0666,mode=0620"),
    },
    Mount {
        source: "shm",
        target: "/dev/shm",
        fstype: "tmpfs",
        flags: NOSUID_NODEV_NOEXEC,
        data: Some("mode=1777"),
    },
    Mount {
        source: "tmpfs",
        target: "/run",
        fstype: "tmpfs",
        flags: MsFlags::MS_NOSUID.union(MsFlags::MS_NODEV),
        data: Some("mode=0755"),
    },
    Mount {
        source: "tmpfs",
        target: "/tmp",
        fstype: "tmpfs",
        flags: MsFlags::MS_NOSUID.union(MsFlags::MS_NODEV),
        data: Some("mode=1777"),
    },
    Mount {
        source: "cgroup2",
        target: "/sys/fs/cgroup",
        fstype: "cgroup2",
        flags: NOSUID_NODEV_NOEXEC,
        data: Some("nsdelegate"),
    },
    // Neither nosuid nor nodev: containers' rootfs and volumes live here
    // and get the flags runc's would have (a setuid program in the image
    // runs setuid unless the process has no_new_privs; a device node is
    // governed by the container's device cgroup, and names a guest
    // device). The host's own mounts of the share stay nosuid and nodev:
    // only the guest executes from it or opens its nodes.
    Mount {
        source: SHARE_TAG,
        target: SHARE_DIR,
        fstype: "virtiofs",
        flags: MsFlags::empty(),
        data: None,
    },
    // The guest copies of synced volumes (volumes.rs), with the flags a
    // kubelet volume directory has under runc (on the node's disk: neither
    // nosuid nor nodev; kubelet's modes never set setuid bits).
    Mount {
        source: "tmpfs",
        target: crate::volumes::VOLUMES_DIR,
        fstype: "tmpfs",
        flags: MsFlags::empty(),
        data: Some("mode=0700"),
    },
];

/// argv[1] of the agent after it moved itself off the initramfs.
pub const SWITCHED_ARG: &str = "--switched-root";

/// Moves PID 1 off the initramfs onto a tmpfs root and re-executes it there.
///
/// pivot_root(2), which containers need, refuses to move the initramfs
/// ("rootfs"); a tmpfs root has no such limit. Like switch_root(8), but the
/// agent is not copied: the initramfs's /init is bound onto the new root's
/// /init, so the guest holds one copy of it (a copy in the tmpfs cost as
/// much memory again, touched for good without free page reporting).
/// Returns only on failure.
pub fn switch_root(started_ns: u64) -> InitError {
    let step = |what: &'static str, r: nix::Result<()>| {
        r.map_err(|source| InitError::Mount {
            fstype: "tmpfs",
            target: what,
            source,
        })
    };
    let run = || -> Result<std::convert::Infallible, InitError> {
        mkdir_p("/newroot")?;
        step(
            "/newroot",
            mount(
                Some("rootfs"),
                "/newroot",
                Some("tmpfs"),
                MsFlags::empty(),
                Some("mode=0755"),
            ),
        )?;
        fs::File::create("/newroot/init").map_err(|source| InitError::Mkdir {
            path: "/newroot/init".into(),
            source,
        })?;
        step(
            "/newroot/init",
            mount(
                Some("/init"),
                "/newroot/init",
                None::<&str>,
                MsFlags::MS_BIND,
                None::<&str>,
            ),
        )?;
        for d in [
            "/newroot/dev",
            "/newroot/proc",
            "/newroot/sys",
            "/newroot/run",
            "/newroot/tmp",
        ] {
            mkdir_p(d)?;
        }
        // The boot clock reads /dev/kmsg before /dev is mounted.
        let kmsg = nix::sys::stat::makedev(1, 11);
        step(
            "/newroot/dev/kmsg",
            nix::sys::stat::mknod(
                "/newroot/dev/kmsg",
                nix::sys::stat::SFlag::S_IFCHR,
                Mode::from_bits_truncate(0o644),
                kmsg,
            ),
        )?;
        step("chdir", nix::unistd::chdir("/newroot"))?;
        step(
            "/",
            mount(Some("."), "/", None::<&str>, MsFlags::MS_MOVE, None::<&str>),
        )?;
        step("chroot", nix::unistd::chroot("."))?;
        step("chdir", nix::unistd::chdir("/"))?;
        let init = std::ffi::CString::new("/init").expect("no nul");
        let args = [
            init.clone(),
            std::ffi::CString::new(SWITCHED_ARG).expect("no nul"),
            std::ffi::CString::new(started_ns.to_string()).expect("no nul"),
        ];
        let err = nix::unistd::execv(&init, &args).unwrap_err();
        Err(InitError::Mount {
            fstype: "tmpfs",
            target: "exec /init",
            source: err,
        })
    };
    match run() {
        Ok(never) => match never {},
        Err(e) => e,
    }
}

/// Sets up the guest as PID 1: pseudo filesystems, cgroup v2, the share.
pub fn setup() -> Result<(), InitError> {
    for m in MOUNTS {
        mkdir_p(m.target)?;
        mount(Some(m.source), m.target, Some(m.fstype), m.flags, m.data).map_err(|source| {
            InitError::Mount {
                fstype: m.fstype,
                target: m.target,
                source,
            }
        })?;
    }
    // Hand the common controllers to child cgroups (containers). A kernel
    // without one of them still boots; containers then lack that limit.
    let controllers = "+cpu +cpuset +memory +pids +io";
    if let Err(e) = fs::write("/sys/fs/cgroup/cgroup.subtree_control", controllers) {
        tracing::error!("enabling cgroup controllers {controllers:?}: {e}");
    }
    // Containers get the host's open-file limit where their spec sets none
    // (runtime/src/pod/inherit.rs), which on a systemd host is systemd's
    // fs.nr_open (1073741816), above this kernel's default ceiling
    // (1048576): setrlimit would refuse it and every container fail. The
    // guest's ceiling is the kernel's largest, which costs nothing.
    if let Err(e) = fs::write("/proc/sys/fs/nr_open", NR_OPEN_MAX) {
        tracing::error!("raising fs.nr_open to {NR_OPEN_MAX}: {e}");
    }
    Ok(())
}

/// The largest fs.nr_open Linux takes: INT_MAX rounded down to a multiple
/// of BITS_PER_LONG (fs/file.c, sysctl_nr_open_max).
const NR_OPEN_MAX: &str = "2147483584";

fn mkdir_p(path: &str) -> Result<(), InitError> {
    if Path::new(path).is_dir() {
        return Ok(());
    }
    fs::create_dir_all(path).map_err(|source| InitError::Mkdir {
        path: path.to_owned(),
        source,
    })?;
    let _ = nix::sys::stat::fchmodat(
        None,
        path,
        Mode::from_bits_truncate(0o755),
        nix::sys::stat::FchmodatFlags::FollowSymlink,
    );
    Ok(())
}

/// Time since the guest kernel started, on the printk clock.
///
/// CLOCK_BOOTTIME starts only when timekeeping is initialised, and under TCG
/// the boot before that can take a second; the printk clock (sched_clock)
/// runs from the first instructions. The kernel logs `Run /init as init
/// process` with that clock just before exec'ing us; it is in the kernel log
/// buffer even with `quiet`.
#[derive(Clone, Copy)]
pub struct BootClock {
    init_ns: u64,
    boottime_at_init: u64,
}

impl BootClock {
    /// Call first thing in main; `boottime_at_init` is CLOCK_BOOTTIME when
    /// the kernel started /init (before any re-exec).
    pub fn start(boottime_at_init: u64) -> Self {
        let init_ns = kmsg_timestamp_ns("Run /init as init process").unwrap_or(boottime_at_init);
        Self {
            init_ns,
            boottime_at_init,
        }
    }

    /// Kernel start to /init.
    pub fn init_ns(&self) -> u64 {
        self.init_ns
    }

    /// Kernel start to now.
    pub fn now_ns(&self) -> u64 {
        self.init_ns + boottime_ns().saturating_sub(self.boottime_at_init)
    }
}

/// Timestamp of the first kernel log record whose text starts with `prefix`.
fn kmsg_timestamp_ns(prefix: &str) -> Option<u64> {
    use std::io::Read;
    use std::os::unix::fs::OpenOptionsExt;
    // Runs before /dev is mounted: the initramfs carries a /dev/kmsg node.
    let mut f = fs::File::options()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open("/dev/kmsg")
        .ok()?;
    let mut buf = vec![0u8; 8192];
    loop {
        // One record per read: "prio,seq,usec,flags;text\n".
        let n = match f.read(&mut buf) {
            Ok(0) => return None,
            Ok(n) => n,
            Err(e) if e.raw_os_error() == Some(libc::EPIPE) => continue, // overwritten records
            Err(_) => return None,                                       // EAGAIN: no more records
        };
        if let Some(ts) = parse_kmsg_record(&buf[..n], prefix) {
            return Some(ts);
        }
    }
}

fn parse_kmsg_record(record: &[u8], prefix: &str) -> Option<u64> {
    let rec = std::str::from_utf8(record).ok()?;
    let (head, text) = rec.split_once(';')?;
    if !text.starts_with(prefix) {
        return None;
    }
    let usec: u64 = head.split(',').nth(2)?.parse().ok()?;
    Some(usec * 1000)
}

/// The kernel parameter setting the smallest free block free page
/// reporting gives back (2^order pages).
const PAGE_REPORTING_ORDER_PARAM: &str = "page_reporting.page_reporting_order=";
const PAGE_REPORTING_ORDER_SYSFS: &str =
    "/sys/module/page_reporting/parameters/page_reporting_order";

/// The order `page_reporting.page_reporting_order=N` on the command line
/// asks for, if any (the last one wins, as in the kernel).
fn page_reporting_order(cmdline: &str) -> Option<&str> {
    cmdline
        .split_whitespace()
        .filter_map(|w| w.strip_prefix(PAGE_REPORTING_ORDER_PARAM))
        .next_back()
}

/// Applies the command line's page reporting order. Linux 6.1 parses the
/// parameter at boot but overwrites it with pageblock_order (4 MiB) when
/// virtio-balloon registers (mm/page_reporting.c, page_reporting_register),
/// so the guest frees smaller blocks than that without ever reporting them;
/// by the time /init runs the driver has registered and the parameter's
/// sysfs file sets it for good. Nothing to do without the parameter or
/// without reporting (no balloon device).
pub fn apply_page_reporting_order(cmdline: &str) -> Result<(), String> {
    let Some(order) = page_reporting_order(cmdline) else {
        return Ok(());
    };
    if !Path::new(PAGE_REPORTING_ORDER_SYSFS).exists() {
        return Ok(());
    }
    fs::write(PAGE_REPORTING_ORDER_SYSFS, order).map_err(|e| {
        format!("setting page reporting order {order:?} ({PAGE_REPORTING_ORDER_SYSFS}): {e}")
    })?;
    nudge_page_reporting();
    Ok(())
}

/// Starts a reporting pass under the new order. The kernel schedules one
/// only when a block of at least the order is freed; what boot freed in
/// blocks smaller than 4 MiB, before the order changed, would otherwise wait
/// for the next such free, which an idle pod may never make. Touching and
/// freeing one 4 MiB region frees such a block, and the pass it starts walks
/// every free list at or above the order.
fn nudge_page_reporting() {
    const LEN: usize = 4 << 20;
    // SAFETY: a fresh private anonymous mapping, unmapped before return and
    // never referenced by Rust code; a failure leaves nothing behind.
    unsafe {
        let p = libc::mmap(
            std::ptr::null_mut(),
            LEN,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_POPULATE,
            -1,
            0,
        );
        if p != libc::MAP_FAILED {
            libc::munmap(p, LEN);
        }
    }
}

/// Guest CLOCK_BOOTTIME in nanoseconds.
pub fn boottime_ns() -> u64 {
    clock_gettime(ClockId::CLOCK_BOOTTIME)
        .map(|t| t.tv_sec() as u64 * 1_000_000_000 + t.tv_nsec() as u64)
        .unwrap_or(0)
}

/// Ends the VM: stops every other process, flushes, and reboots, which the
/// VMM treats as power-off (QEMU `-no-reboot`, husk-vmm's i8042 reset).
/// A power-off proper would only halt a microvm without ACPI.
pub fn power_off() -> ! {
    // kill(-1) from PID 1 reaches every process but itself.
    let _ = kill(Pid::from_raw(-1), Signal::SIGKILL);
    sync();
    // A deliberate power-off pulls the i8042 reset line itself: husk-vmm
    // reports that as the guest's power-off, while the kernel's own
    // reboots (panic=-1 with reboot=t) triple-fault and read as a crash.
    // Where there is no i8042 (QEMU microvm) the write goes nowhere and the
    // reboot below ends the VM instead. The console is drained first: the
    // reset would cut off the last messages still in the UART's queue.
    drain_console();
    i8042_reset();
    let _ = reboot(RebootMode::RB_AUTOBOOT);
    // Only reached if reboot(2) failed, e.g. when not running as init.
    loop {
        std::thread::sleep(Duration::from_secs(3600));
    }
}

/// Waits until what was written to the console has left the UART.
fn drain_console() {
    for fd in [libc::STDOUT_FILENO, libc::STDERR_FILENO] {
        // SAFETY: tcdrain on a descriptor number; it fails harmlessly if the
        // descriptor is not a terminal.
        unsafe { libc::tcdrain(fd) };
    }
}

/// Writes the CPU-reset command to the i8042 command port.
fn i8042_reset() {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: ioperm grants this process port 0x64 only; the `out` then
    // writes one byte to it and touches no memory.
    unsafe {
        if libc::ioperm(0x64, 1, 1) == 0 {
            std::arch::asm!("out dx, al", in("dx") 0x64u16, in("al") 0xfeu8, options(nomem, nostack));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn page_reporting_order_comes_from_the_command_line() {
        assert_eq!(page_reporting_order("console=ttyS0 quiet"), None);
        assert_eq!(
            page_reporting_order(
                "quiet page_reporting.page_reporting_order=9 x page_reporting.page_reporting_order=5"
            ),
            Some("5")
        );
        // Nothing asked: nothing written, whatever the guest has.
        assert_eq!(apply_page_reporting_order("quiet"), Ok(()));
    }

    #[test]
    fn kmsg_record_timestamp() {
        let rec = b"6,321,1736248,-;Run /init as init process\n";
        assert_eq!(
            parse_kmsg_record(rec, "Run /init as init process"),
            Some(1_736_248_000)
        );
        assert_eq!(parse_kmsg_record(rec, "Freeing"), None);
        assert_eq!(parse_kmsg_record(b"garbage", "Run"), None);
    }
}
