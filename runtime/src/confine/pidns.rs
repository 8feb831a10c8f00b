//! A PID namespace of its own for a helper: inside it, `kill(-1)` reaches
//! nothing (pid 1 is exempt and there is no other process), and no host
//! process can be named by pid.
//!
//! `unshare(CLONE_NEWPID)` moves only the caller's later children, and a
//! process whose children go to another namespace may not make threads.
//! So the child forks once more, between fork and exec: the new process is
//! pid 1 of the namespace and goes on to exec the program; the first stays
//! outside as a waiter that holds no descriptor, runs under a filter of
//! wait, kill and exit, and ends as the program ends. Both are in the
//! spawned process group, so signals to the group reach the program.

use std::io::Read;
use std::os::fd::{OwnedFd, RawFd};
use std::sync::atomic::{AtomicI32, Ordering};

use crate::confine::seccomp::{Allow, Filter};

/// The waiter's `comm`, by which `husk check` finds it.
pub const WAITER_NAME: &std::ffi::CStr = c"husk-nswait";

/// What the waiter calls once its filter is on: wait for the program,
/// forward a signal to it, end as it ended.
pub const WAITER: &Allow = &Allow {
    calls: &[
        libc::SYS_wait4,
        libc::SYS_kill,
        libc::SYS_rt_sigaction,
        libc::SYS_rt_sigreturn,
        libc::SYS_restart_syscall,
        libc::SYS_getpid,
        libc::SYS_exit,
        libc::SYS_exit_group,
    ],
    ioctls: &[],
    when: &[],
    enosys: &[],
};

/// The program's pid, for the waiter's signal handler (set in the waiter
/// only, after the fork).
static PROGRAM: AtomicI32 = AtomicI32::new(0);

extern "C" fn forward(signal: libc::c_int) {
    let pid = PROGRAM.load(Ordering::Relaxed);
    if pid > 0 {
        // SAFETY: kill(2) is async-signal-safe and touches no memory.
        unsafe { libc::kill(pid, signal) };
    }
}

/// Forks the program's process, pid 1 of the namespace the caller
/// unshared; returns in it. The caller's process becomes the waiter: it
/// writes the program's pid (as the host sees it) to `report`, closes every
/// descriptor but stdio, installs `filter`, waits and exits with the
/// program's status. Never returns there.
///
/// # Safety
/// Runs between fork and exec, after `unshare(CLONE_NEWPID)`: only
/// async-signal-safe calls, no allocation.
pub unsafe fn split(report: RawFd, filter: &mut Filter) -> std::io::Result<()> {
    // SAFETY: fork in a single-threaded child; both sides go on with
    // async-signal-safe calls only.
    let program = unsafe { libc::fork() };
    if program < 0 {
        return Err(std::io::Error::last_os_error());
    }
    if program == 0 {
        // The waiter's death (it dies with the owner) ends the program.
        // SAFETY: prctl with integer arguments.
        if unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        return Ok(());
    }
    // SAFETY: each call takes integers or pointers to locals that live
    // across it, and all are async-signal-safe.
    unsafe {
        PROGRAM.store(program, Ordering::Relaxed);
        let pid = (program as u32).to_ne_bytes();
        let _ = libc::write(report, pid.as_ptr().cast(), pid.len());
        // The report pipe, the spawner's exec-error pipe (its parent then
        // sees the program's exec, not this process's) and every passed
        // descriptor: the program holds what it needs.
        libc::syscall(libc::SYS_close_range, 3u32, u32::MAX, 0u32);
        libc::prctl(libc::PR_SET_NAME, WAITER_NAME.as_ptr());
        let mut action: libc::sigaction = std::mem::zeroed();
        action.sa_sigaction = forward as extern "C" fn(libc::c_int) as usize;
        action.sa_flags = libc::SA_RESTART;
        for signal in [libc::SIGTERM, libc::SIGINT, libc::SIGHUP] {
            libc::sigaction(signal, &action, std::ptr::null_mut());
        }
        // Its capabilities too (the program's go at its exec).
        if crate::confine::process::clear_capabilities().is_err()
            || filter.install_in_child().is_err()
        {
            libc::kill(program, libc::SIGKILL);
            libc::_exit(127);
        }
        let mut status = 0;
        loop {
            let got = libc::waitpid(program, &mut status, 0);
            if got == program {
                break;
            }
            if got < 0 && *libc::__errno_location() != libc::EINTR {
                libc::_exit(127);
            }
        }
        if libc::WIFSIGNALED(status) {
            let signal = libc::WTERMSIG(status);
            let mut default: libc::sigaction = std::mem::zeroed();
            default.sa_sigaction = libc::SIG_DFL;
            libc::sigaction(signal, &default, std::ptr::null_mut());
            libc::kill(libc::getpid(), signal);
            libc::_exit(128 + signal);
        }
        libc::_exit(libc::WEXITSTATUS(status))
    }
}

/// Reads the program's pid the waiter reported; `None` if it did not (the
/// spawn failed before the split).
pub fn program_pid(report: OwnedFd) -> Option<u32> {
    let mut file = std::fs::File::from(report);
    let mut pid = [0u8; 4];
    file.read_exact(&mut pid).ok()?;
    Some(u32::from_ne_bytes(pid))
}

/// Whether `pid` has a handler for `signal` (`SigCgt` in its status). A
/// namespace's pid 1 ignores signals it does not handle, even from the
/// host, except SIGKILL.
pub fn catches(pid: u32, signal: libc::c_int) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            let hex = s.lines().find_map(|l| l.strip_prefix("SigCgt:"))?.trim();
            u64::from_str_radix(hex, 16).ok()
        })
        .is_some_and(|mask| mask & (1 << (signal - 1)) != 0)
}

/// A pipe for the waiter's report: (read end, write end), both
/// close-on-exec.
pub fn report_pipe() -> std::io::Result<(OwnedFd, OwnedFd)> {
    Ok(nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)?)
}
