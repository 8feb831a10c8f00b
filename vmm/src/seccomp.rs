//! husk-vmm's seccomp filters, one per thread kind (built with
//! `husk_sys::seccomp`).
//!
//! Every husk-vmm thread installs the filter of its kind on itself before
//! it does the work of its kind: a vCPU before its first KVM_RUN (so before
//! the guest runs an instruction), the device and socket threads before
//! they serve anything, the main thread once the vCPUs run. Filters are
//! per thread (no TSYNC), so a vCPU cannot make the calls the control
//! thread may, and the reverse. A call outside a thread's list kills the
//! whole process (SECCOMP_RET_KILL_PROCESS); the kernel logs it (audit
//! type 1326, in `dmesg`, with the thread's name as `comm`).
//!
//! The lists come from strace of husk-vmm on the host's KVM (tiny guests,
//! the control socket, signals) and from the kernel's seccomp log in the
//! nested lab (the real guest with virtio-fs, virtio-vsock and virtio-net
//! working), plus the calls a Rust thread makes to allocate, panic and end.
//! The virtio-balloon worker's list comes from strace of its thread in the
//! device's unit test (activation, reports, reset, its end).
//! `--seccomp-log` turns the kill into a log entry, to find a missing call
//! without losing the VM.

use std::sync::OnceLock;

pub use husk_sys::seccomp::{Action, Allow, Arg, Filter, FilterError, Is};

/// husk-vmm's thread kinds, each with a filter of its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ThreadKind {
    /// The main thread once the guest runs: it waits for the vCPUs' end,
    /// removes the control socket and exits.
    Vmm,
    /// A vCPU: KVM_RUN, the legacy devices, virtio-mmio register access,
    /// vhost-user messages on device activation and reset.
    Vcpu,
    /// The control socket's server (pause, resume, status, shutdown).
    Control,
    /// The thread that takes SIGTERM and SIGINT.
    Signals,
    /// The console log's writer.
    Console,
    /// virtio-net's worker: the tap and the queues.
    Net,
    /// virtio-balloon's worker: the queues, and holes punched in the guest
    /// RAM memfd for the pages the guest gives back.
    Balloon,
}

impl ThreadKind {
    pub const ALL: [ThreadKind; 7] = [
        ThreadKind::Vmm,
        ThreadKind::Vcpu,
        ThreadKind::Control,
        ThreadKind::Signals,
        ThreadKind::Console,
        ThreadKind::Net,
        ThreadKind::Balloon,
    ];

    pub fn name(self) -> &'static str {
        match self {
            ThreadKind::Vmm => "vmm",
            ThreadKind::Vcpu => "vcpu",
            ThreadKind::Control => "control",
            ThreadKind::Signals => "signals",
            ThreadKind::Console => "console",
            ThreadKind::Net => "net",
            ThreadKind::Balloon => "balloon",
        }
    }

    /// What this kind may call, beyond [`THREAD`].
    pub fn allow(self) -> &'static Allow {
        match self {
            ThreadKind::Vmm => VMM,
            ThreadKind::Vcpu => VCPU,
            ThreadKind::Control => CONTROL,
            ThreadKind::Signals => SIGNALS,
            ThreadKind::Console => CONSOLE,
            ThreadKind::Net => NET,
            ThreadKind::Balloon => BALLOON,
        }
    }

    /// The filter of this kind, for a thread of the calling process.
    pub fn filter(self, otherwise: Action) -> Result<Filter, FilterError> {
        Filter::of(&[THREAD, self.allow()], otherwise)
    }
}

impl std::str::FromStr for ThreadKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        ThreadKind::ALL
            .into_iter()
            .find(|k| k.name() == s)
            .ok_or_else(|| {
                let names: Vec<_> = ThreadKind::ALL.iter().map(|k| k.name()).collect();
                format!("unknown thread kind {s:?}; one of {}", names.join(", "))
            })
    }
}

/// Every husk-vmm thread: memory (the allocator, a new thread's arena),
/// locks, its end (the stack and signal stack go, signals blocked), a
/// message on stderr, a panic's abort, sleeps and the clock.
pub const THREAD: &Allow = &Allow {
    calls: &[
        libc::SYS_write, // stderr
        libc::SYS_close,
        libc::SYS_mmap,
        libc::SYS_munmap,
        libc::SYS_mprotect,
        libc::SYS_mremap,
        libc::SYS_madvise,
        libc::SYS_brk,
        libc::SYS_futex,
        libc::SYS_rt_sigprocmask,
        libc::SYS_rt_sigreturn,
        libc::SYS_sigaltstack,
        libc::SYS_sched_yield,
        libc::SYS_sched_getaffinity,
        libc::SYS_getpid,
        libc::SYS_gettid,
        libc::SYS_clock_gettime,
        libc::SYS_clock_nanosleep,
        libc::SYS_nanosleep,
        libc::SYS_restart_syscall,
        libc::SYS_exit,
        libc::SYS_exit_group,
    ],
    ioctls: &[],
    // A panic's abort signals its own thread: this process only.
    when: &[Arg {
        call: libc::SYS_tgkill,
        index: 0,
        is: Is::OwnPid,
    }],
    ..Allow::NONE
};

/// KVM_RUN: _IO(KVMIO, 0x80).
pub const KVM_RUN: u32 = 0xae80;

/// The main thread: it waits, then removes the control socket and exits.
const VMM: &Allow = &Allow {
    calls: &[libc::SYS_unlink, libc::SYS_unlinkat],
    ioctls: &[],
    ..Allow::NONE
};

/// A vCPU: KVM_RUN only among ioctls; a kick's eventfd write; the
/// vhost-user messages of device activation and reset (descriptors sent
/// and replies read on the daemon's socket).
const VCPU: &Allow = &Allow {
    calls: &[
        libc::SYS_read,
        libc::SYS_sendmsg,
        libc::SYS_recvmsg,
        libc::SYS_sendto,
        libc::SYS_recvfrom,
        libc::SYS_fcntl, // a kick's descriptor duplicated for the daemon
    ],
    ioctls: &[KVM_RUN],
    ..Allow::NONE
};

/// The control socket: accept, read a request, answer, kick the vCPUs
/// with a signal.
const CONTROL: &Allow = &Allow {
    calls: &[
        libc::SYS_accept4,
        libc::SYS_read,
        libc::SYS_recvfrom,
        libc::SYS_sendto,
        libc::SYS_fcntl,      // try_clone of the connection
        libc::SYS_setsockopt, // the read timeout
        libc::SYS_shutdown,
        libc::SYS_poll,
    ],
    ioctls: &[],
    ..Allow::NONE
};

/// SIGTERM and SIGINT: waits for one and kicks the vCPUs.
const SIGNALS: &Allow = &Allow {
    calls: &[libc::SYS_rt_sigtimedwait],
    ioctls: &[],
    ..Allow::NONE
};

/// The console writer: writes, and rotates a log file it was given by
/// path.
const CONSOLE: &Allow = &Allow {
    calls: &[libc::SYS_rename, libc::SYS_renameat, libc::SYS_openat],
    ioctls: &[],
    ..Allow::NONE
};

/// virtio-net's worker: waits on the tap and the kicks, moves frames.
const NET: &Allow = &Allow {
    calls: &[
        libc::SYS_poll,
        libc::SYS_ppoll,
        libc::SYS_read,
        libc::SYS_readv,
        libc::SYS_writev,
    ],
    ioctls: &[],
    ..Allow::NONE
};

/// virtio-balloon's worker: waits on the kicks and reads them, punches
/// holes in the guest RAM memfd (fallocate); its irqfd write is in
/// [`THREAD`]'s list.
const BALLOON: &Allow = &Allow {
    calls: &[
        libc::SYS_poll,
        libc::SYS_ppoll,
        libc::SYS_read,
        libc::SYS_fallocate,
    ],
    ioctls: &[],
    ..Allow::NONE
};

/// How this process's threads are filtered: set once, by the husk-vmm
/// program, before its first thread starts. Without it (the library in
/// tests) threads run unfiltered.
#[derive(Debug, Clone, Copy)]
pub struct Policy {
    pub otherwise: Action,
    /// A test of the filters: the thread of this kind makes a call no
    /// list allows right after its filter is in.
    pub test_kind: Option<ThreadKind>,
}

static POLICY: OnceLock<Policy> = OnceLock::new();

/// Sets the process's policy and no_new_privs (which the threads started
/// afterwards inherit); once only.
pub fn configure(policy: Policy) -> std::io::Result<()> {
    set_no_new_privs()?;
    POLICY.set(policy).map_err(|_| {
        std::io::Error::new(
            std::io::ErrorKind::AlreadyExists,
            "the seccomp policy is set already",
        )
    })
}

fn set_no_new_privs() -> std::io::Result<()> {
    // SAFETY: prctl with integer arguments.
    if unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Whether threads are filtered in this process.
pub fn active() -> bool {
    POLICY.get().is_some()
}

/// Installs `kind`'s filter on the calling thread when the process has a
/// policy. A thread that cannot be filtered must not go on: the process
/// exits (status 1) with the reason on stderr.
pub fn enter(kind: ThreadKind) {
    let Some(policy) = POLICY.get() else {
        return;
    };
    // SAFETY: prctl on the filter's own memory; no_new_privs is set
    // (here and by `configure`, which ran before this thread started).
    let installed = kind
        .filter(policy.otherwise)
        .map_err(std::io::Error::other)
        .and_then(|filter| set_no_new_privs().and_then(|()| unsafe { filter.install() }));
    if let Err(e) = installed {
        tracing::error!(
            "installing the {} thread's seccomp filter: {e}",
            kind.name()
        );
        std::process::exit(1);
    }
    if policy.test_kind == Some(kind) {
        tracing::warn!(
            "--test-seccomp: the {} thread opens a TCP socket, which no filter allows",
            kind.name()
        );
        // SAFETY: socket(2) with integer arguments; a descriptor it returns
        // (with the filter missing) is closed at once.
        let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0) };
        if fd >= 0 {
            // SAFETY: the descriptor just made.
            unsafe { libc::close(fd) };
        }
        tracing::error!("--test-seccomp: the {} thread was not stopped", kind.name());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kind_parses_by_its_name_and_an_unknown_one_is_named() {
        for k in ThreadKind::ALL {
            assert_eq!(k.name().parse::<ThreadKind>(), Ok(k));
        }
        let e = "gpu".parse::<ThreadKind>().unwrap_err();
        assert!(e.contains("\"gpu\"") && e.contains("vcpu"), "{e}");
    }

    #[test]
    fn no_thread_kind_may_open_a_socket_exec_or_mount() {
        for k in ThreadKind::ALL {
            for nr in [
                libc::SYS_socket,
                libc::SYS_execve,
                libc::SYS_mount,
                libc::SYS_ptrace,
            ] {
                assert!(
                    !THREAD.calls.contains(&nr) && !k.allow().calls.contains(&nr),
                    "{} may call {nr}",
                    k.name()
                );
            }
            // Only a vCPU drives KVM, and only KVM_RUN.
            let ioctl = k.allow().calls.contains(&libc::SYS_ioctl);
            assert!(!ioctl, "{} may make any ioctl", k.name());
        }
        assert_eq!(VCPU.ioctls, &[KVM_RUN]);
    }

    #[test]
    fn only_the_balloon_worker_may_punch_holes_in_guest_memory() {
        for k in ThreadKind::ALL {
            let may = THREAD.calls.contains(&libc::SYS_fallocate)
                || k.allow().calls.contains(&libc::SYS_fallocate);
            assert_eq!(may, k == ThreadKind::Balloon, "{}", k.name());
        }
    }
}
