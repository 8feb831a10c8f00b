//! Seccomp filters of husk's own for the host processes it starts that have
//! none of their own (vhost-device-vsock): an allowlist of system calls,
//! anything else kills the process. The filter is a classic BPF program
//! built in the parent and installed in the child between fork and exec,
//! after no_new_privs, so it covers exec and everything the program does.

use libc::{c_long, sock_filter};

/// AUDIT_ARCH_X86_64: EM_X86_64 | __AUDIT_ARCH_64BIT | __AUDIT_ARCH_LE.
const AUDIT_ARCH_X86_64: u32 = 0xc000_003e;
/// Bit 30 marks the x32 ABI's system call numbers; none are allowed.
const X32_SYSCALL_BIT: u32 = 0x4000_0000;
const SECCOMP_RET_KILL_PROCESS: u32 = 0x8000_0000;
const SECCOMP_RET_ALLOW: u32 = 0x7fff_0000;
/// Offsets in struct seccomp_data: the call number, the architecture, and
/// the low half of the second argument (an ioctl's request).
const NR: u32 = 0;
const ARCH: u32 = 4;
const ARG1_LOW: u32 = 24;

const BPF_LD_W_ABS: u16 = (libc::BPF_LD | libc::BPF_W | libc::BPF_ABS) as u16;
const BPF_JEQ_K: u16 = (libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K) as u16;
const BPF_JGE_K: u16 = (libc::BPF_JMP | libc::BPF_JGE | libc::BPF_K) as u16;
const BPF_RET_K: u16 = (libc::BPF_RET | libc::BPF_K) as u16;

fn op(code: u16, jt: u8, jf: u8, k: u32) -> sock_filter {
    sock_filter { code, jt, jf, k }
}

/// What a filtered process may call.
#[derive(Debug, PartialEq, Eq)]
pub struct Allow {
    /// System calls (x86_64 numbers).
    pub calls: &'static [c_long],
    /// ioctl requests, when ioctl is not in `calls` (the request is checked,
    /// so a descriptor the process holds cannot be driven at will).
    pub ioctls: &'static [u32],
}

/// A filter that allows what `allow` names and kills the process on any
/// other call, on any other architecture's entry, and on x32 calls.
#[derive(Debug, Clone)]
pub struct Filter {
    program: Vec<sock_filter>,
}

impl Filter {
    pub fn allow(allow: &Allow) -> Self {
        let mut p = vec![
            op(BPF_LD_W_ABS, 0, 0, ARCH),
            op(BPF_JEQ_K, 1, 0, AUDIT_ARCH_X86_64),
            op(BPF_RET_K, 0, 0, SECCOMP_RET_KILL_PROCESS),
            op(BPF_LD_W_ABS, 0, 0, NR),
            op(BPF_JGE_K, 0, 1, X32_SYSCALL_BIT),
            op(BPF_RET_K, 0, 0, SECCOMP_RET_KILL_PROCESS),
        ];
        for nr in allow.calls {
            p.push(op(BPF_JEQ_K, 0, 1, *nr as u32));
            p.push(op(BPF_RET_K, 0, 0, SECCOMP_RET_ALLOW));
        }
        if !allow.ioctls.is_empty() {
            // Not ioctl: on to the kill at the end; ioctl: its request.
            let block = 1 + 2 * allow.ioctls.len();
            p.push(op(BPF_JEQ_K, 0, block as u8, libc::SYS_ioctl as u32));
            p.push(op(BPF_LD_W_ABS, 0, 0, ARG1_LOW));
            for req in allow.ioctls {
                p.push(op(BPF_JEQ_K, 0, 1, *req));
                p.push(op(BPF_RET_K, 0, 0, SECCOMP_RET_ALLOW));
            }
        }
        p.push(op(BPF_RET_K, 0, 0, SECCOMP_RET_KILL_PROCESS));
        Self { program: p }
    }

    /// Installs the filter on the calling thread (and what it execs).
    ///
    /// # Safety
    /// Async-signal-safe (one prctl on memory the filter owns); needs
    /// no_new_privs or CAP_SYS_ADMIN. Meant for a child between fork and
    /// exec.
    pub(crate) unsafe fn install(&self) -> std::io::Result<()> {
        let prog = libc::sock_fprog {
            len: self.program.len() as u16,
            filter: self.program.as_ptr() as *mut sock_filter,
        };
        // SAFETY: a sock_fprog pointing at this filter's instructions, which
        // outlive the call (the kernel copies them).
        let rc = unsafe {
            libc::prctl(
                libc::PR_SET_SECCOMP,
                libc::SECCOMP_MODE_FILTER,
                &prog as *const libc::sock_fprog,
            )
        };
        if rc == 0 {
            Ok(())
        } else {
            Err(std::io::Error::last_os_error())
        }
    }
}

/// What vhost-device-vsock (0.x from crates.io) calls from exec to exit: the
/// dynamic loader, its vhost-user and unix socket serving (epoll, eventfd,
/// sendmsg/recvmsg with descriptors, non-blocking sockets), the guest
/// memory it maps from the VMM's descriptors, its threads and their
/// signals. Taken from strace -ff of every vhost-device-vsock through the
/// vm, containers, ctr_tasks, cri_streaming, cri_network and hardening
/// suites (302 processes), plus the calls a thread or process makes to end
/// and a few that a different libc build or a slow path makes (marked).
pub const VSOCK_DAEMON: &Allow = &Allow {
    calls: &[
        libc::SYS_read,
        libc::SYS_write,
        libc::SYS_readv,  // slow path
        libc::SYS_writev, // slow path
        libc::SYS_openat,
        libc::SYS_close,
        libc::SYS_newfstatat,
        libc::SYS_fstat, // other libc
        libc::SYS_statx, // other libc
        libc::SYS_lseek,
        libc::SYS_pread64,
        libc::SYS_access,
        libc::SYS_unlink,
        libc::SYS_mmap,
        libc::SYS_mprotect,
        libc::SYS_munmap,
        libc::SYS_mremap, // realloc of large buffers
        libc::SYS_madvise,
        libc::SYS_brk,
        libc::SYS_rt_sigaction,
        libc::SYS_rt_sigprocmask,
        libc::SYS_rt_sigreturn,
        libc::SYS_sigaltstack,
        libc::SYS_poll,
        libc::SYS_epoll_create1,
        libc::SYS_epoll_ctl,
        libc::SYS_epoll_wait,
        libc::SYS_epoll_pwait, // other libc
        libc::SYS_eventfd2,
        libc::SYS_socket,
        libc::SYS_bind,
        libc::SYS_listen,
        libc::SYS_accept4,
        libc::SYS_connect, // a guest's connection to a host port
        libc::SYS_sendmsg,
        libc::SYS_recvmsg,
        libc::SYS_sendto,
        libc::SYS_recvfrom,
        libc::SYS_shutdown,
        libc::SYS_getsockopt,
        libc::SYS_setsockopt,
        libc::SYS_dup,
        libc::SYS_fcntl,
        libc::SYS_futex,
        libc::SYS_set_robust_list,
        libc::SYS_rseq,
        libc::SYS_gettid,
        libc::SYS_getpid,
        libc::SYS_tgkill, // a panic's abort
        libc::SYS_sched_getaffinity,
        libc::SYS_sched_yield,
        libc::SYS_clone3,
        libc::SYS_clone, // other libc
        libc::SYS_exit,
        libc::SYS_exit_group,
        libc::SYS_execve,
        libc::SYS_arch_prctl,
        libc::SYS_set_tid_address,
        libc::SYS_prlimit64,
        libc::SYS_prctl, // thread names
        libc::SYS_getrandom,
        libc::SYS_nanosleep,
        libc::SYS_clock_nanosleep,
        libc::SYS_clock_gettime,
        libc::SYS_restart_syscall,
    ],
    // set_nonblocking, and the logger's terminal check.
    ioctls: &[libc::FIONBIO as u32, libc::TCGETS as u32],
};

#[cfg(test)]
mod tests {
    use std::os::unix::process::ExitStatusExt;
    use std::path::Path;
    use std::time::Duration;

    use super::*;
    use crate::process::{Confine, Process};

    fn run(allowed: &'static Allow, program: &str, args: &[&str]) -> std::process::ExitStatus {
        let dir = tempfile::tempdir().unwrap();
        let confine = Confine {
            seccomp: Some(allowed),
            ..Confine::UNPRIVILEGED
        };
        let mut p = Process::spawn_confined(
            "filtered",
            Path::new(program),
            args,
            &dir.path().join("log"),
            &[],
            confine,
            None,
        )
        .unwrap();
        p.wait_timeout(Duration::from_secs(10))
            .unwrap()
            .expect("it ends")
    }

    #[test]
    fn a_call_off_the_list_kills_the_process_and_the_others_pass() {
        let all_but_mkdir = all_but(&[libc::SYS_mkdir, libc::SYS_mkdirat], &[]);
        let st = run(all_but_mkdir, "sh", &["-c", "exit 3"]);
        assert_eq!(st.code(), Some(3), "{st:?}");
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("made");
        let st = run(all_but_mkdir, "mkdir", &[target.to_str().unwrap()]);
        assert_eq!(st.signal(), Some(libc::SIGSYS), "{st:?}");
        assert!(!target.exists());
    }

    /// Every call but `except`, and ioctl only for `ioctls`.
    fn all_but(except: &[c_long], ioctls: &'static [u32]) -> &'static Allow {
        let calls: &'static [c_long] = Box::leak(
            (0..512)
                .filter(|n| !except.contains(n))
                .collect::<Vec<_>>()
                .into_boxed_slice(),
        );
        Box::leak(Box::new(Allow { calls, ioctls }))
    }

    #[test]
    fn ioctls_pass_only_by_request() {
        // `stty -g` asks TCGETS of /dev/null (and fails with ENOTTY): it is
        // killed only when TCGETS is not among the allowed requests.
        let allowed = run(
            all_but(&[libc::SYS_ioctl], &[libc::TCGETS as u32]),
            "stty",
            &["-g"],
        );
        assert_eq!(allowed.signal(), None, "{allowed:?}");
        let refused = run(
            all_but(&[libc::SYS_ioctl], &[libc::FIONBIO as u32]),
            "stty",
            &["-g"],
        );
        assert_eq!(refused.signal(), Some(libc::SIGSYS), "{refused:?}");
    }
}
