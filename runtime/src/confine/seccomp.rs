//! Seccomp filters of husk's own for the host processes it starts:
//! vhost-device-vsock, which has none of its own, and virtiofsd as a whole
//! (its own filter covers only its server): an allowlist of system calls,
//! anything else kills the process. The filter is a classic BPF program
//! built in the parent and installed in the child between fork and exec,
//! after no_new_privs, so it covers exec and everything the program does.

#[cfg(test)]
use libc::c_long;

pub use husk_sys::seccomp::{Allow, Arg, Filter, Is};

/// socket(2) for AF_UNIX only.
const UNIX_SOCKETS: Arg = Arg {
    call: libc::SYS_socket,
    index: 0,
    is: Is::Eq(libc::AF_UNIX as u32),
};

/// clone(2) that makes a thread (CLONE_THREAD set): no new process.
const THREADS: Arg = Arg {
    call: libc::SYS_clone,
    index: 0,
    is: Is::Has(libc::CLONE_THREAD as u32),
};

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
        libc::SYS_sched_getaffinity,
        libc::SYS_sched_yield,
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
    when: &[
        // Unix sockets only: the VMM's, the agent's, the host ports'.
        UNIX_SOCKETS,
        // Threads only (no fork): clone with CLONE_THREAD, after clone3
        // answered ENOSYS.
        THREADS,
        // A panic's abort signals its own process, and no other (it runs
        // as root in the host's PID namespace: root's processes would be
        // in reach).
        Arg {
            call: libc::SYS_tgkill,
            index: 0,
            is: Is::OwnPid,
        },
    ],
    enosys: &[libc::SYS_clone3],
};

/// virtiofsd (1.x from crates.io) as a whole, on top of the filter it
/// installs on its server: what that filter allows (virtiofsd's own list in
/// its src/seccomp.rs: the FUSE operations on the share, its threads), plus
/// what it calls before it filters itself and what the parent its namespace
/// sandbox leaves behind calls while it waits (from strace -f of every
/// virtiofsd through the ctr, ctr_tasks, containers, cri_streaming and cri
/// suites): exec and the loader, its namespaces, mounts and pivot_root,
/// capabilities and ids, the vhost-user socket, installing its own filter,
/// waiting for its child. So the waiting parent is filtered too, and no
/// stage may load modules, trace, use bpf, keys, io_uring, perf or kexec.
pub const VIRTIOFSD: &Allow = &Allow {
    calls: &[
        // Its own serving filter's list.
        libc::SYS_accept4,
        libc::SYS_brk,
        libc::SYS_capget,
        libc::SYS_capset,
        libc::SYS_clock_gettime,
        libc::SYS_clone,
        libc::SYS_clone3,
        libc::SYS_close,
        libc::SYS_copy_file_range,
        libc::SYS_dup,
        libc::SYS_epoll_create,
        libc::SYS_epoll_create1,
        libc::SYS_epoll_ctl,
        libc::SYS_epoll_pwait,
        libc::SYS_epoll_wait,
        libc::SYS_eventfd2,
        libc::SYS_exit,
        libc::SYS_exit_group,
        libc::SYS_fallocate,
        libc::SYS_fchdir,
        libc::SYS_fchmod,
        libc::SYS_fchmodat,
        libc::SYS_fchownat,
        libc::SYS_fcntl,
        libc::SYS_fdatasync,
        libc::SYS_fgetxattr,
        libc::SYS_flistxattr,
        libc::SYS_flock,
        libc::SYS_fremovexattr,
        libc::SYS_fsetxattr,
        libc::SYS_fstat,
        libc::SYS_fstatfs,
        libc::SYS_fsync,
        libc::SYS_ftruncate,
        libc::SYS_futex,
        libc::SYS_getdents,
        libc::SYS_getdents64,
        libc::SYS_getegid,
        libc::SYS_geteuid,
        libc::SYS_getpid,
        libc::SYS_getrandom,
        libc::SYS_gettid,
        libc::SYS_gettimeofday,
        libc::SYS_getxattr,
        libc::SYS_linkat,
        libc::SYS_listxattr,
        libc::SYS_lseek,
        libc::SYS_madvise,
        libc::SYS_membarrier,
        libc::SYS_mkdirat,
        libc::SYS_mknodat,
        libc::SYS_mmap,
        libc::SYS_mprotect,
        libc::SYS_mremap,
        libc::SYS_munmap,
        libc::SYS_name_to_handle_at,
        libc::SYS_newfstatat,
        libc::SYS_open,
        libc::SYS_openat,
        libc::SYS_openat2,
        libc::SYS_open_by_handle_at,
        libc::SYS_prctl,
        libc::SYS_preadv,
        libc::SYS_pread64,
        libc::SYS_preadv2,
        libc::SYS_pwritev,
        libc::SYS_pwritev2,
        libc::SYS_pwrite64,
        libc::SYS_read,
        libc::SYS_readv,
        libc::SYS_readlinkat,
        libc::SYS_recvmsg,
        libc::SYS_renameat,
        libc::SYS_renameat2,
        libc::SYS_removexattr,
        libc::SYS_rseq,
        libc::SYS_rt_sigaction,
        libc::SYS_rt_sigprocmask,
        libc::SYS_rt_sigreturn,
        libc::SYS_sched_getaffinity,
        libc::SYS_sched_yield,
        libc::SYS_sendmsg,
        libc::SYS_setgroups,
        libc::SYS_setresgid,
        libc::SYS_setresuid,
        libc::SYS_set_robust_list,
        libc::SYS_setxattr,
        libc::SYS_sigaltstack,
        libc::SYS_statx,
        libc::SYS_symlinkat,
        libc::SYS_syncfs,
        libc::SYS_time,
        libc::SYS_tkill,
        libc::SYS_tgkill,
        libc::SYS_umask,
        libc::SYS_unlink,
        libc::SYS_unlinkat,
        libc::SYS_unshare,
        libc::SYS_utimensat,
        libc::SYS_write,
        libc::SYS_writev,
        // Before its own filter, and the waiting parent (traced).
        libc::SYS_execve,
        libc::SYS_arch_prctl,
        libc::SYS_set_tid_address,
        libc::SYS_access,
        libc::SYS_prlimit64,
        libc::SYS_seccomp,
        libc::SYS_mount,
        libc::SYS_umount2,
        libc::SYS_pivot_root,
        libc::SYS_open_tree,
        libc::SYS_move_mount,
        libc::SYS_getgroups,
        libc::SYS_bind,
        libc::SYS_listen,
        libc::SYS_poll,
        libc::SYS_pipe2,
        libc::SYS_pidfd_open,
        libc::SYS_wait4,
        // Sleeps and a restarted wait.
        libc::SYS_nanosleep,
        libc::SYS_clock_nanosleep,
        libc::SYS_restart_syscall,
    ],
    // The logger's terminal check.
    ioctls: &[libc::TCGETS as u32],
    // Its namespace sandbox clones with namespace flags, so clone stays
    // open; its sockets are unix ones.
    when: &[UNIX_SOCKETS],
    ..Allow::NONE
};

#[cfg(test)]
mod tests {
    use std::os::unix::process::ExitStatusExt;
    use std::path::Path;
    use std::time::Duration;

    use super::*;
    use crate::confine::process::{Confine, Process};

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
        Box::leak(Box::new(Allow {
            calls,
            ioctls,
            ..Allow::NONE
        }))
    }

    #[test]
    fn neither_daemon_may_trace_load_modules_use_bpf_keys_io_uring_perf_or_kexec() {
        for (name, list) in [("vsock", VSOCK_DAEMON), ("virtiofsd", VIRTIOFSD)] {
            for nr in [
                libc::SYS_ptrace,
                libc::SYS_init_module,
                libc::SYS_finit_module,
                libc::SYS_bpf,
                libc::SYS_keyctl,
                libc::SYS_add_key,
                libc::SYS_io_uring_setup,
                libc::SYS_perf_event_open,
                libc::SYS_kexec_load,
                libc::SYS_userfaultfd,
                libc::SYS_process_vm_writev,
            ] {
                assert!(!list.calls.contains(&nr), "{name} may call {nr}");
            }
            assert!(!list.calls.contains(&libc::SYS_ioctl), "{name}: any ioctl");
        }
    }

    #[test]
    fn the_vsock_daemon_may_signal_only_its_own_process() {
        for nr in [
            libc::SYS_kill,
            libc::SYS_tkill,
            libc::SYS_tgkill,
            libc::SYS_rt_sigqueueinfo,
            libc::SYS_rt_tgsigqueueinfo,
            libc::SYS_pidfd_send_signal,
        ] {
            assert!(!VSOCK_DAEMON.calls.contains(&nr), "may call {nr} freely");
        }
        let rules: Vec<&Arg> = VSOCK_DAEMON
            .when
            .iter()
            .filter(|a| a.call == libc::SYS_tgkill)
            .collect();
        assert_eq!(
            rules,
            [&Arg {
                call: libc::SYS_tgkill,
                index: 0,
                is: Is::OwnPid
            }]
        );
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
