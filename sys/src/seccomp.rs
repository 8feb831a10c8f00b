//! Seccomp allowlists (x86_64), compiled to BPF by rust-vmm's seccompiler
//! (as Firecracker and Cloud Hypervisor compile theirs): system calls,
//! some only with given argument values (an ioctl's request, a socket's
//! family, clone's flags, tgkill's target), and calls answered ENOSYS.
//! husk-vmm filters its own threads with them; the runtime filters the
//! daemons it starts.

use std::collections::BTreeMap;

use libc::c_long;
use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};

/// What a filtered thread or process may call.
#[derive(Debug, PartialEq, Eq)]
pub struct Allow {
    /// System calls allowed with any arguments (x86_64 numbers).
    pub calls: &'static [c_long],
    /// ioctl requests, when ioctl is not in `calls` (the request is checked,
    /// so a descriptor the process holds cannot be driven at will).
    pub ioctls: &'static [u32],
    /// Calls allowed only with an argument as given; two entries for one
    /// call are two ways in.
    pub when: &'static [Arg],
    /// Calls that fail with ENOSYS instead: clone3, whose flags lie in
    /// memory a filter cannot read. libc then falls back to clone, whose
    /// flags `when` can check.
    pub enosys: &'static [c_long],
}

impl Allow {
    /// Nothing: the rest of a list that names only some fields.
    pub const NONE: Allow = Allow {
        calls: &[],
        ioctls: &[],
        when: &[],
        enosys: &[],
    };
}

/// A call allowed when its argument `index` (0 to 5) is as `is` says.
#[derive(Debug, PartialEq, Eq)]
pub struct Arg {
    pub call: c_long,
    pub index: u8,
    pub is: Is,
}

/// What an argument must be (its low 32 bits: the int arguments these are).
#[derive(Debug, PartialEq, Eq)]
pub enum Is {
    /// This value.
    Eq(u32),
    /// All these bits set.
    Has(u32),
    /// The pid of the process the filter is on: the builder's for
    /// [`Filter::of`]; for [`Filter::allow_in_child`], the child's own,
    /// written in by [`Filter::install_in_child`].
    OwnPid,
}

/// What happens on a call the filter does not allow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// The process dies by SIGSYS.
    Kill,
    /// The call goes through and the kernel logs it (finding a missing
    /// call; never the default).
    Log,
}

/// A filter that allows what its lists name; any other call meets its
/// [`Action`], another architecture's entry is killed.
#[derive(Debug, Clone)]
pub struct Filter {
    /// The allowlist, after (when a list has ENOSYS calls) a program that
    /// answers those: the kernel runs both, and an error outranks an allow.
    programs: Vec<BpfProgram>,
}

/// Stands for the pid in a filter built for a child: no pid is this large
/// (PID_MAX_LIMIT is 2^22), and no other value the lists compare with is
/// it (an ioctl request, a socket family, clone flags).
const CHILD_PID: u32 = 0x7e57_0d1d;

/// A seccompiler error: only a malformed list (a bad argument index), a
/// bug here, never a runtime condition.
#[derive(Debug, thiserror::Error)]
#[error("seccomp filter: {0}")]
pub struct FilterError(#[from] seccompiler::BackendError);

impl Filter {
    /// Allows what `allow` names; kills on anything else.
    pub fn allow(allow: &Allow) -> Result<Self, FilterError> {
        Self::of(&[allow], Action::Kill)
    }

    /// Allows what any of `lists` names; `otherwise` on anything else.
    pub fn of(lists: &[&Allow], otherwise: Action) -> Result<Self, FilterError> {
        Self::build(lists, otherwise, std::process::id())
    }

    /// [`Filter::allow`] for a child this process is about to start, whose
    /// pid is not known yet: [`Is::OwnPid`] is the child's, once
    /// [`Filter::install_in_child`] writes it in.
    pub fn allow_in_child(allow: &Allow) -> Result<Self, FilterError> {
        Self::build(&[allow], Action::Kill, CHILD_PID)
    }

    fn build(lists: &[&Allow], otherwise: Action, own_pid: u32) -> Result<Self, FilterError> {
        let mut rules: BTreeMap<i64, Vec<SeccompRule>> = BTreeMap::new();
        let mut free: Vec<i64> = Vec::new();
        for l in lists {
            // The allowlist lets the ENOSYS calls through to the second
            // program: a kill here would outrank its error.
            free.extend(l.calls.iter().chain(l.enosys).copied());
            for req in l.ioctls {
                let cond = dword(1, SeccompCmpOp::Eq, u64::from(*req))?;
                rules
                    .entry(libc::SYS_ioctl)
                    .or_default()
                    .push(SeccompRule::new(vec![cond])?);
            }
            for a in l.when {
                let cond = match a.is {
                    Is::Eq(v) => dword(a.index, SeccompCmpOp::Eq, u64::from(v))?,
                    Is::Has(bits) => dword(
                        a.index,
                        SeccompCmpOp::MaskedEq(u64::from(bits)),
                        u64::from(bits),
                    )?,
                    Is::OwnPid => dword(a.index, SeccompCmpOp::Eq, u64::from(own_pid))?,
                };
                rules
                    .entry(a.call)
                    .or_default()
                    .push(SeccompRule::new(vec![cond])?);
            }
        }
        // A call allowed whatever its arguments needs no rule: an empty
        // chain matches unconditionally.
        for nr in free {
            rules.insert(nr, Vec::new());
        }
        let refuse = match otherwise {
            Action::Kill => SeccompAction::KillProcess,
            Action::Log => SeccompAction::Log,
        };
        let mut programs = Vec::new();
        let enosys: BTreeMap<i64, Vec<SeccompRule>> = lists
            .iter()
            .flat_map(|l| l.enosys)
            .map(|nr| (*nr, Vec::new()))
            .collect();
        if !enosys.is_empty() {
            programs.push(compile(
                enosys,
                SeccompAction::Allow,
                SeccompAction::Errno(libc::ENOSYS as u32),
            )?);
        }
        // Last: once it is in, no further prctl would pass.
        programs.push(compile(rules, refuse, SeccompAction::Allow)?);
        Ok(Self { programs })
    }

    /// Installs the filter on the calling thread (and the threads and
    /// programs it starts afterwards); filters already there stay.
    ///
    /// # Safety
    /// Async-signal-safe (a prctl per program, on memory the filter owns),
    /// so it may run in a child between fork and exec. Needs no_new_privs
    /// (or CAP_SYS_ADMIN).
    pub unsafe fn install(&self) -> std::io::Result<()> {
        for program in &self.programs {
            let prog = libc::sock_fprog {
                len: program.len() as u16,
                // seccompiler's sock_filter is the kernel's struct, as
                // libc's is.
                filter: program.as_ptr() as *mut libc::sock_filter,
            };
            // SAFETY: a sock_fprog pointing at this filter's instructions,
            // which outlive the call (the kernel copies them).
            let rc = unsafe {
                libc::prctl(
                    libc::PR_SET_SECCOMP,
                    libc::SECCOMP_MODE_FILTER,
                    &prog as *const libc::sock_fprog,
                )
            };
            if rc != 0 {
                return Err(std::io::Error::last_os_error());
            }
        }
        Ok(())
    }
}

impl Filter {
    /// Writes the calling process's pid where a filter from
    /// [`Filter::allow_in_child`] compares with it, then installs it.
    ///
    /// # Safety
    /// As [`Filter::install`]: only getpid and stores into memory the
    /// filter owns besides, so it may run between fork and exec.
    pub unsafe fn install_in_child(&mut self) -> std::io::Result<()> {
        // SAFETY: getpid has no preconditions.
        let pid = unsafe { libc::getpid() } as u32;
        let compare = (libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K) as u16;
        for ins in self.programs.iter_mut().flat_map(|p| p.iter_mut()) {
            if ins.code == compare && ins.k == CHILD_PID {
                ins.k = pid;
            }
        }
        // SAFETY: as this function's.
        unsafe { self.install() }
    }
}

fn dword(index: u8, op: SeccompCmpOp, value: u64) -> Result<SeccompCondition, FilterError> {
    Ok(SeccompCondition::new(
        index,
        SeccompCmpArgLen::Dword,
        op,
        value,
    )?)
}

fn compile(
    rules: BTreeMap<i64, Vec<SeccompRule>>,
    mismatch: SeccompAction,
    matched: SeccompAction,
) -> Result<BpfProgram, FilterError> {
    let filter = SeccompFilter::new(rules, mismatch, matched, TargetArch::x86_64)?;
    Ok(filter.try_into()?)
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicI32, Ordering};

    use super::*;

    /// What a child needs to end.
    const END: &Allow = &Allow {
        calls: &[libc::SYS_exit_group, libc::SYS_exit],
        ..Allow::NONE
    };

    /// Forks a child that installs `filter`, runs `then` and exits with
    /// what it returns; the child's wait status.
    fn in_child(filter: &Filter, then: fn() -> i32) -> i32 {
        fork_filtered(filter, false, then)
    }

    /// As [`in_child`], with the filter installed as a child's.
    fn in_child_own(filter: &Filter, then: fn() -> i32) -> i32 {
        fork_filtered(filter, true, then)
    }

    fn fork_filtered(filter: &Filter, own: bool, then: fn() -> i32) -> i32 {
        let mut filter = filter.clone();
        // SAFETY: the child only makes system calls (prctl, the test's own
        // calls through libc::syscall, _exit) and writes into the filter's
        // own memory: no allocation, no lock.
        unsafe {
            let pid = libc::fork();
            assert!(pid >= 0, "fork");
            if pid == 0 {
                libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0);
                let installed = if own {
                    filter.install_in_child()
                } else {
                    filter.install()
                };
                if installed.is_err() {
                    libc::_exit(100);
                }
                libc::_exit(then());
            }
            let mut status = 0;
            assert_eq!(libc::waitpid(pid, &mut status, 0), pid);
            status
        }
    }

    #[test]
    fn a_filter_built_for_a_child_lets_it_tgkill_itself_and_no_one_else() {
        const OWN: &Allow = &Allow {
            calls: &[libc::SYS_getpid, libc::SYS_exit_group, libc::SYS_exit],
            when: &[Arg {
                call: libc::SYS_tgkill,
                index: 0,
                is: Is::OwnPid,
            }],
            ..Allow::NONE
        };
        let f = Filter::allow_in_child(OWN).unwrap();
        let s = in_child_own(&f, || {
            // SAFETY: getpid and tgkill with signal 0: a check, no signal.
            let me = unsafe { libc::syscall(libc::SYS_getpid) };
            // SAFETY: as above.
            let r = unsafe { libc::syscall(libc::SYS_tgkill, me, me, 0) };
            i32::from(r != 0)
        });
        assert_eq!(exited(s), Some(0), "tgkill to itself: status {s:#x}");
        PARENT.store(std::process::id() as i32, Ordering::SeqCst);
        let s = in_child_own(&f, || {
            let parent = PARENT.load(Ordering::SeqCst);
            // SAFETY: tgkill with signal 0 to the parent: a check.
            unsafe { libc::syscall(libc::SYS_tgkill, parent, parent, 0) };
            0
        });
        assert!(killed_by_sigsys(s), "tgkill to the parent passed: {s:#x}");
        // The placeholder itself is no pid that passes either.
        let s = in_child_own(&f, || {
            // SAFETY: tgkill with signal 0 to a pid no process has.
            unsafe { libc::syscall(libc::SYS_tgkill, super::CHILD_PID, super::CHILD_PID, 0) };
            0
        });
        assert!(
            killed_by_sigsys(s),
            "tgkill to the placeholder passed: {s:#x}"
        );
    }

    fn exited(status: i32) -> Option<i32> {
        libc::WIFEXITED(status).then(|| libc::WEXITSTATUS(status))
    }

    fn killed_by_sigsys(status: i32) -> bool {
        libc::WIFSIGNALED(status) && libc::WTERMSIG(status) == libc::SIGSYS
    }

    fn socket(family: i32) -> i32 {
        // SAFETY: socket(2) with integers; the descriptor is closed by the
        // child's exit.
        let fd = unsafe { libc::syscall(libc::SYS_socket, family, libc::SOCK_STREAM, 0) };
        i32::from(fd < 0)
    }

    const UNIX_ONLY: &Allow = &Allow {
        when: &[Arg {
            call: libc::SYS_socket,
            index: 0,
            is: Is::Eq(libc::AF_UNIX as u32),
        }],
        ..Allow::NONE
    };

    #[test]
    fn an_argument_rule_lets_its_value_through_and_kills_any_other() {
        let f = Filter::of(&[END, UNIX_ONLY], Action::Kill).unwrap();
        let s = in_child(&f, || socket(libc::AF_UNIX));
        assert_eq!(exited(s), Some(0), "AF_UNIX refused: status {s:#x}");
        let s = in_child(&f, || socket(libc::AF_INET));
        assert!(killed_by_sigsys(s), "AF_INET not killed: status {s:#x}");
    }

    #[test]
    fn clone3_is_answered_enosys_and_clone_needs_its_flags() {
        const THREADS: &Allow = &Allow {
            when: &[Arg {
                call: libc::SYS_clone,
                index: 0,
                is: Is::Has(libc::CLONE_THREAD as u32),
            }],
            enosys: &[libc::SYS_clone3],
            ..Allow::NONE
        };
        let f = Filter::of(&[END, THREADS], Action::Kill).unwrap();
        let s = in_child(&f, || {
            // SAFETY: clone3 with no arguments: answered by the filter
            // before the kernel reads anything.
            let r = unsafe { libc::syscall(libc::SYS_clone3, 0usize, 0usize) };
            // SAFETY: reads this thread's errno.
            let errno = unsafe { *libc::__errno_location() };
            if r == -1 && errno == libc::ENOSYS {
                0
            } else {
                1
            }
        });
        assert_eq!(exited(s), Some(0), "clone3 not ENOSYS: status {s:#x}");
        // A fork (clone without CLONE_THREAD) is killed.
        let s = in_child(&f, || {
            // SAFETY: clone as fork, flags only; killed before it runs.
            let r = unsafe { libc::syscall(libc::SYS_clone, libc::SIGCHLD, 0, 0, 0, 0) };
            i32::from(r != 0)
        });
        assert!(killed_by_sigsys(s), "a fork was not killed: status {s:#x}");
    }

    /// The pid of the process that built the filter, for its child.
    static PARENT: AtomicI32 = AtomicI32::new(0);

    #[test]
    fn ioctl_requests_and_tgkill_targets_are_checked() {
        const LISTS: &Allow = &Allow {
            calls: &[libc::SYS_getpid, libc::SYS_gettid],
            ioctls: &[libc::FIONBIO as u32],
            when: &[Arg {
                call: libc::SYS_tgkill,
                index: 0,
                is: Is::OwnPid,
            }],
            ..Allow::NONE
        };
        // Built in the child's parent: OwnPid is the parent's pid, so a
        // tgkill to the parent passes and the child's to itself is killed.
        let f = Filter::of(&[END, LISTS], Action::Kill).unwrap();
        PARENT.store(std::process::id() as i32, Ordering::SeqCst);
        let s = in_child(&f, || {
            let mut on: libc::c_int = 1;
            // SAFETY: FIONBIO on stdin with a pointer to a live int.
            unsafe { libc::syscall(libc::SYS_ioctl, 0, libc::FIONBIO, &mut on) };
            let parent = PARENT.load(Ordering::SeqCst);
            // SAFETY: tgkill with signal 0 (a check, no signal) to the
            // builder's main thread.
            let r = unsafe { libc::syscall(libc::SYS_tgkill, parent, parent, 0) };
            i32::from(r != 0)
        });
        assert_eq!(exited(s), Some(0), "status {s:#x}");
        let s = in_child(&f, || {
            // SAFETY: an ioctl request the list does not name.
            unsafe { libc::syscall(libc::SYS_ioctl, 0, libc::TCGETS, 0) };
            0
        });
        assert!(killed_by_sigsys(s), "TCGETS not killed: status {s:#x}");
        let s = in_child(&f, || {
            // SAFETY: getpid and tgkill with signal 0: a check, no signal.
            let me = unsafe { libc::syscall(libc::SYS_getpid) };
            // SAFETY: as above.
            unsafe { libc::syscall(libc::SYS_tgkill, me, me, 0) };
            0
        });
        assert!(
            killed_by_sigsys(s),
            "tgkill to another pid than the builder's passed: {s:#x}"
        );
    }

    #[test]
    fn log_mode_lets_a_refused_call_through() {
        let f = Filter::of(&[END, UNIX_ONLY], Action::Log).unwrap();
        let s = in_child(&f, || socket(libc::AF_INET));
        assert_eq!(exited(s), Some(0), "status {s:#x}");
    }
}
