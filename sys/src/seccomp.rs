//! Seccomp filters as classic BPF allowlists (x86_64): a list of system
//! calls, and ioctl requests checked by value. husk-vmm filters its own
//! threads with them; the runtime filters the daemons it starts.

use libc::{c_long, sock_filter};

/// AUDIT_ARCH_X86_64: EM_X86_64 | __AUDIT_ARCH_64BIT | __AUDIT_ARCH_LE.
const AUDIT_ARCH_X86_64: u32 = 0xc000_003e;
/// Bit 30 marks the x32 ABI's system call numbers; none are allowed.
const X32_SYSCALL_BIT: u32 = 0x4000_0000;
const SECCOMP_RET_KILL_PROCESS: u32 = 0x8000_0000;
const SECCOMP_RET_LOG: u32 = 0x7ffc_0000;
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

/// What a filtered thread or process may call.
#[derive(Debug, PartialEq, Eq)]
pub struct Allow {
    /// System calls (x86_64 numbers).
    pub calls: &'static [c_long],
    /// ioctl requests, when ioctl is not in `calls` (the request is checked,
    /// so a descriptor the process holds cannot be driven at will).
    pub ioctls: &'static [u32],
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

/// A filter that allows what its lists name; any other call, any other
/// architecture's entry and any x32 call meet its [`Action`] (other
/// architectures and x32 are always killed).
#[derive(Debug, Clone)]
pub struct Filter {
    program: Vec<sock_filter>,
}

impl Filter {
    /// Allows what `allow` names; kills on anything else.
    pub fn allow(allow: &Allow) -> Self {
        Self::of(&[allow], Action::Kill)
    }

    /// Allows what any of `lists` names; `otherwise` on anything else.
    pub fn of(lists: &[&Allow], otherwise: Action) -> Self {
        let mut p = vec![
            op(BPF_LD_W_ABS, 0, 0, ARCH),
            op(BPF_JEQ_K, 1, 0, AUDIT_ARCH_X86_64),
            op(BPF_RET_K, 0, 0, SECCOMP_RET_KILL_PROCESS),
            op(BPF_LD_W_ABS, 0, 0, NR),
            op(BPF_JGE_K, 0, 1, X32_SYSCALL_BIT),
            op(BPF_RET_K, 0, 0, SECCOMP_RET_KILL_PROCESS),
        ];
        let mut calls: Vec<c_long> = lists.iter().flat_map(|l| l.calls).copied().collect();
        calls.sort_unstable();
        calls.dedup();
        for nr in calls {
            p.push(op(BPF_JEQ_K, 0, 1, nr as u32));
            p.push(op(BPF_RET_K, 0, 0, SECCOMP_RET_ALLOW));
        }
        let mut ioctls: Vec<u32> = lists.iter().flat_map(|l| l.ioctls).copied().collect();
        ioctls.sort_unstable();
        ioctls.dedup();
        // A jump offset is a byte: a list that long is a mistake.
        assert!(ioctls.len() < 100, "too many ioctl requests for one filter");
        let refuse = match otherwise {
            Action::Kill => SECCOMP_RET_KILL_PROCESS,
            Action::Log => SECCOMP_RET_LOG,
        };
        if !ioctls.is_empty() {
            // Not ioctl: on to the refusal at the end; ioctl: its request.
            let block = 1 + 2 * ioctls.len();
            p.push(op(BPF_JEQ_K, 0, block as u8, libc::SYS_ioctl as u32));
            p.push(op(BPF_LD_W_ABS, 0, 0, ARG1_LOW));
            for req in ioctls {
                p.push(op(BPF_JEQ_K, 0, 1, req));
                p.push(op(BPF_RET_K, 0, 0, SECCOMP_RET_ALLOW));
            }
        }
        p.push(op(BPF_RET_K, 0, 0, refuse));
        Self { program: p }
    }

    /// Installs the filter on the calling thread (and the threads and
    /// programs it starts afterwards); filters already there stay.
    ///
    /// # Safety
    /// Async-signal-safe (one prctl on memory the filter owns), so it may
    /// run in a child between fork and exec. Needs no_new_privs (or
    /// CAP_SYS_ADMIN).
    pub unsafe fn install(&self) -> std::io::Result<()> {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lists_merge_without_duplicates_and_the_program_ends_in_the_action() {
        let a = &Allow {
            calls: &[libc::SYS_read, libc::SYS_write],
            ioctls: &[1],
        };
        let b = &Allow {
            calls: &[libc::SYS_write],
            ioctls: &[1, 2],
        };
        let f = Filter::of(&[a, b], Action::Log);
        // Header 6, two calls 4, ioctl block 2 + 4, final 1.
        assert_eq!(f.program.len(), 17);
        assert_eq!(f.program.last().unwrap().k, SECCOMP_RET_LOG);
        let k = Filter::of(&[a], Action::Kill);
        assert_eq!(k.program.last().unwrap().k, SECCOMP_RET_KILL_PROCESS);
    }
}
