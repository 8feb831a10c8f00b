//! What confines each host process of the running sandboxes, as the kernel
//! reports it (`husk check`): seccomp mode, capabilities, no_new_privs,
//! uid and gid, and which of its mount, PID, IPC and network namespaces
//! are its own. It shows what is, not what was meant.

use std::path::{Path, PathBuf};

/// One process of a sandbox and what confines it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Confinement {
    pub sandbox: String,
    pub pid: u32,
    pub name: String,
    /// 0 none, 1 strict, 2 filter.
    pub seccomp: u8,
    /// Effective capabilities (bit set).
    pub cap_eff: u64,
    pub no_new_privs: bool,
    pub uid: u32,
    pub gid: u32,
    /// Whether it has a mount namespace of its own (not the caller's).
    pub own_mount_ns: bool,
    /// The same for its PID, IPC and network namespaces.
    pub own_pid_ns: bool,
    pub own_ipc_ns: bool,
    pub own_net_ns: bool,
}

impl std::fmt::Display for Confinement {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let seccomp = match self.seccomp {
            0 => "none",
            1 => "strict",
            _ => "filter",
        };
        let caps = match self.cap_eff.count_ones() {
            0 => "none".to_owned(),
            n if self.cap_eff == full_caps() => format!("all ({n})"),
            n => format!("{n} ({:#x})", self.cap_eff),
        };
        let whose = |own: bool| if own { "own" } else { "host's" };
        write!(
            f,
            "{} pid {} {}: seccomp {seccomp}, capabilities {caps}, no_new_privs {}, uid {}, gid {}, mount ns {}, pid ns {}, ipc ns {}, net ns {}",
            self.sandbox,
            self.pid,
            self.name,
            if self.no_new_privs { "on" } else { "off" },
            self.uid,
            self.gid,
            whose(self.own_mount_ns),
            whose(self.own_pid_ns),
            whose(self.own_ipc_ns),
            whose(self.own_net_ns),
        )
    }
}

/// Every capability this kernel knows.
fn full_caps() -> u64 {
    let last = std::fs::read_to_string("/proc/sys/kernel/cap_last_cap")
        .ok()
        .and_then(|s| s.trim().parse::<u32>().ok())
        .unwrap_or(40);
    (1u64 << (last + 1)) - 1
}

/// The directories below `dir`, by name.
fn subdirs(dir: &Path) -> Vec<(String, PathBuf)> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter(|e| e.path().is_dir())
        .filter_map(|e| Some((e.file_name().into_string().ok()?, e.path())))
        .collect()
}

/// Every sandbox directory under `state_dir`, in its namespace directory:
/// (namespace, id, directory).
pub fn sandboxes(state_dir: &Path) -> Vec<(String, String, PathBuf)> {
    let mut all: Vec<_> = subdirs(state_dir)
        .into_iter()
        .flat_map(|(ns, dir)| {
            subdirs(&dir)
                .into_iter()
                .map(move |(id, path)| (ns.clone(), id, path))
        })
        .collect();
    all.sort();
    all
}

/// The processes whose command line names a path below `dir` (a sandbox's
/// VMM and device daemons name its sockets and logs), with that line.
pub fn processes_naming(dirs: &[&Path]) -> Vec<(u32, usize)> {
    let needles: Vec<String> = dirs.iter().map(|d| format!("{}/", d.display())).collect();
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for pid in procs
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
    {
        let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
            continue;
        };
        let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        if let Some(i) = needles.iter().position(|n| cmdline.contains(n.as_str())) {
            out.push((pid, i));
        }
    }
    out.sort();
    out
}

/// The processes of every sandbox under `state_dir` (in its namespace
/// directories): those whose command line names the sandbox's directory
/// (its VMM and device daemons). Sandboxes are named `<namespace>/<id>`.
pub fn report(state_dir: &Path) -> Vec<Confinement> {
    let sandboxes = sandboxes(state_dir);
    let dirs: Vec<&Path> = sandboxes.iter().map(|(_, _, d)| d.as_path()).collect();
    // The caller's: `husk check` runs where the shims and containerd do.
    let ns_of = |pid: &str, kind: &str| std::fs::read_link(format!("/proc/{pid}/ns/{kind}")).ok();
    let own = |pid: u32, kind: &str| {
        let theirs = ns_of(&pid.to_string(), kind);
        theirs.is_some() && theirs != ns_of("self", kind)
    };
    let mut out = Vec::new();
    for (pid, i) in with_waiters(processes_naming(&dirs)) {
        let (ns, id, _) = &sandboxes[i];
        let Ok(status) = std::fs::read_to_string(format!("/proc/{pid}/status")) else {
            continue;
        };
        if let Some(c) = parse_status(&format!("{ns}/{id}"), pid, &status) {
            out.push(Confinement {
                own_mount_ns: own(pid, "mnt"),
                own_pid_ns: own(pid, "pid"),
                own_ipc_ns: own(pid, "ipc"),
                own_net_ns: own(pid, "net"),
                ..c
            });
        }
    }
    out.sort_by(|a, b| (&a.sandbox, a.pid).cmp(&(&b.sandbox, b.pid)));
    out
}

/// The processes found, and the waiter outside each one's PID namespace
/// (see [`crate::confine::pidns`]): its command line is its owner's, but
/// it belongs to the same sandbox.
fn with_waiters(found: Vec<(u32, usize)>) -> Vec<(u32, usize)> {
    let parent = |pid: u32| {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
        let ppid = status.lines().find_map(|l| l.strip_prefix("PPid:"))?;
        ppid.trim().parse::<u32>().ok()
    };
    let is_waiter = |pid: u32| {
        std::fs::read_to_string(format!("/proc/{pid}/comm"))
            .is_ok_and(|c| c.trim_end().as_bytes() == crate::confine::pidns::WAITER_NAME.to_bytes())
    };
    let mut all = found.clone();
    for (pid, i) in found {
        if let Some(p) = parent(pid).filter(|&p| is_waiter(p)) {
            all.push((p, i));
        }
    }
    all.sort();
    all.dedup();
    all
}

/// Reads /proc/<pid>/status fields; `None` for a kernel thread or one
/// that is gone.
fn parse_status(sandbox: &str, pid: u32, status: &str) -> Option<Confinement> {
    let field = |k: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(k)?.strip_prefix(':'))
            .map(str::trim)
    };
    Some(Confinement {
        sandbox: sandbox.to_owned(),
        pid,
        name: field("Name")?.to_owned(),
        seccomp: field("Seccomp")?.parse().ok()?,
        cap_eff: u64::from_str_radix(field("CapEff")?, 16).ok()?,
        no_new_privs: field("NoNewPrivs")? == "1",
        uid: field("Uid")?.split_whitespace().nth(1)?.parse().ok()?,
        gid: field("Gid")?.split_whitespace().nth(1)?.parse().ok()?,
        own_mount_ns: false,
        own_pid_ns: false,
        own_ipc_ns: false,
        own_net_ns: false,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_fields_are_read_and_a_partial_status_is_skipped() {
        let status = "Name:\tvirtiofsd\nUid:\t0\t1000\t0\t0\nGid:\t0\t1001\t0\t0\nNoNewPrivs:\t1\nSeccomp:\t2\nCapEff:\t0000000000000003\n";
        let c = parse_status("p1", 7, status).unwrap();
        assert_eq!(
            (
                c.name.as_str(),
                c.seccomp,
                c.cap_eff,
                c.no_new_privs,
                c.uid,
                c.gid
            ),
            ("virtiofsd", 2, 3, true, 1000, 1001)
        );
        assert!(
            c.to_string()
                .contains("seccomp filter, capabilities 2 (0x3)"),
            "{c}"
        );
        assert!(parse_status("p1", 7, "Name:\tx\n").is_none());
    }

    #[test]
    fn namespaces_show_whose_they_are() {
        let c = Confinement {
            own_mount_ns: true,
            own_net_ns: true,
            ..parse_status("p1", 7, "Name:\tx\nUid:\t0\t0\t0\t0\nGid:\t0\t0\t0\t0\nNoNewPrivs:\t0\nSeccomp:\t0\nCapEff:\t0\n").unwrap()
        };
        assert!(
            c.to_string()
                .ends_with("uid 0, gid 0, mount ns own, pid ns host's, ipc ns host's, net ns own"),
            "{c}"
        );
    }

    #[test]
    fn this_process_is_not_reported_without_a_sandbox_directory() {
        let d = tempfile::tempdir().unwrap();
        std::fs::create_dir(d.path().join("s1")).unwrap();
        assert!(report(d.path()).is_empty());
    }
}
