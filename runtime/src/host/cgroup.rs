//! The pod's host cgroup: where the VMM and its device daemons are charged.
//!
//! The spec that boots a sandbox VM (CRI's sandbox container, or a `ctr run`
//! container) names a cgroup in `linux.cgroupsPath`. husk does not run that
//! container on the host, so nothing would otherwise create that cgroup; the
//! shim moves itself into it before the VM boots and every process it starts
//! (VMM, virtiofsd, vhost-device-vsock) inherits it, as Kata's
//! `sandbox_cgroup_only` does. The pod's cgroup parent (kubelet's
//! `/kubepods/.../pod<uid>`) then carries the pod's real host cost, which is
//! what containerd's ListPodSandboxStats reads.
//!
//! No limits are written: the sandbox spec's resources are those of the
//! pause container (CPU shares of 2), not the pod's; kubelet limits the pod
//! at its parent cgroup.
//!
//! Both cgroupfs paths (`/kubepods/pod1/<id>`) and systemd's
//! `slice:prefix:name` form are accepted; the systemd form is expanded to
//! the directories systemd would use (`a.slice/a-b.slice/prefix-name.scope`),
//! without a transient unit (systemd is not told about the scope).

use std::fs;
use std::io::ErrorKind;
use std::os::fd::AsFd;
use std::path::{Component, Path, PathBuf};
use std::time::{Duration, Instant};

use crate::confine::process::{pidfd_kill, pidfd_open, wait_any};

/// cgroup v1 controllers the pod's cgroup is made in: those that account
/// what CRI's pod stats read (CPU, memory, pids, block I/O).
const V1_CONTROLLERS: [&str; 5] = ["cpu", "cpuacct", "memory", "pids", "blkio"];
/// cgroup v2 controllers enabled down to the pod's cgroup, where the host
/// allows it.
const V2_CONTROLLERS: [&str; 4] = ["cpu", "memory", "pids", "io"];
/// The file in a sandbox's bundle recording the cgroup its shim made, for
/// `delete` after the shim died.
pub const RECORD_FILE: &str = "husk-cgroup";
/// How long removal waits for the pod's last processes to leave.
const REMOVE_WAIT: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    #[error("linux.cgroupsPath {path:?} is not usable: {why}")]
    Path { path: String, why: &'static str },
    #[error("no cgroup hierarchy is mounted (read /proc/self/mountinfo); mount cgroup2 or the cgroup v1 controllers")]
    NoHierarchy,
    #[error("creating cgroup {}", dir.display())]
    Create {
        dir: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("linux.cgroupsPath names cgroup {}, which exists and holds processes ({pids}): a pod's cgroup is its own (joined, it would be killed at the pod's end); give the pod a path of its own", dir.display())]
    Populated { dir: PathBuf, pids: String },
    #[error("moving the shim into cgroup {}", dir.display())]
    Join {
        dir: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// A cgroup the shim made and joined, in every hierarchy it uses.
#[derive(Debug)]
pub struct PodCgroup {
    /// The relative path, as recorded.
    path: PathBuf,
    /// The cgroup's directory in each hierarchy.
    dirs: Vec<PathBuf>,
    /// Where the shim was before, one `cgroup.procs` per hierarchy.
    origins: Vec<PathBuf>,
}

/// A mounted hierarchy: its mount point, the controllers it carries (empty
/// for v2) and whether it is cgroup2.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Hierarchy {
    pub(crate) mount: PathBuf,
    pub(crate) controllers: Vec<String>,
    pub(crate) v2: bool,
}

/// Turns a spec's `cgroupsPath` into a path relative to each hierarchy's
/// root. Refuses `..`, empty paths, and malformed systemd triples.
pub fn resolve(cgroups_path: &str) -> Result<PathBuf, CgroupError> {
    let bad = |why| CgroupError::Path {
        path: cgroups_path.to_owned(),
        why,
    };
    let rel = if !cgroups_path.starts_with('/') && cgroups_path.contains(':') {
        let parts: Vec<&str> = cgroups_path.split(':').collect();
        let [slice, prefix, name] = parts[..] else {
            return Err(bad("a systemd cgroup path is slice:prefix:name"));
        };
        if name.is_empty() || name.contains('/') || prefix.contains('/') || slice.contains('/') {
            return Err(bad("a systemd cgroup path is slice:prefix:name"));
        }
        let mut rel = expand_slice(slice).ok_or_else(|| bad("the slice must end in .slice"))?;
        rel.push(if prefix.is_empty() {
            format!("{name}.scope")
        } else {
            format!("{prefix}-{name}.scope")
        });
        rel
    } else {
        PathBuf::from(cgroups_path.trim_start_matches('/'))
    };
    if rel.as_os_str().is_empty() {
        return Err(bad("it names the root cgroup"));
    }
    let raw = rel.to_string_lossy();
    if raw.split('/').any(|c| c == "." || c == "..")
        || rel.components().any(|c| !matches!(c, Component::Normal(_)))
    {
        return Err(bad("it may not contain . or .."));
    }
    Ok(rel)
}

/// `a-b.slice` as systemd lays it out: `a.slice/a-b.slice`. The root slice
/// (`-.slice` or empty) is the hierarchy's root.
fn expand_slice(slice: &str) -> Option<PathBuf> {
    if slice.is_empty() || slice == "-.slice" {
        return Some(PathBuf::new());
    }
    let stem = slice.strip_suffix(".slice")?;
    if stem.is_empty() || stem.starts_with('-') || stem.ends_with('-') || stem.contains("--") {
        return None;
    }
    let mut path = PathBuf::new();
    let mut prefix = String::new();
    for part in stem.split('-') {
        if !prefix.is_empty() {
            prefix.push('-');
        }
        prefix.push_str(part);
        path.push(format!("{prefix}.slice"));
    }
    Some(path)
}

/// The cgroup hierarchies in a mountinfo text that husk uses: cgroup2 alone
/// when the host is unified, else the v1 hierarchies carrying the
/// controllers husk wants (a hybrid host's cgroup2 at `.../unified` holds no
/// controllers and is left out, as containerd does).
fn hierarchies(mountinfo: &str) -> Vec<Hierarchy> {
    let mut v1 = Vec::new();
    let mut v2 = Vec::new();
    for line in mountinfo.lines() {
        // id parent major:minor root mount-point options [optional...] - fstype source super-options
        let Some((left, right)) = line.split_once(" - ") else {
            continue;
        };
        let fields: Vec<&str> = left.split(' ').collect();
        let right: Vec<&str> = right.split(' ').collect();
        let (Some(mount), Some(fstype)) = (fields.get(4), right.first()) else {
            continue;
        };
        let mount = PathBuf::from(unescape(mount));
        match *fstype {
            "cgroup2" => v2.push(Hierarchy {
                mount,
                controllers: Vec::new(),
                v2: true,
            }),
            "cgroup" => {
                let opts = right.get(2).copied().unwrap_or_default();
                let controllers: Vec<String> = opts
                    .split(',')
                    .filter(|o| V1_CONTROLLERS.contains(o))
                    .map(str::to_owned)
                    .collect();
                if !controllers.is_empty() {
                    v1.push(Hierarchy {
                        mount,
                        controllers,
                        v2: false,
                    });
                }
            }
            _ => {}
        }
    }
    if v1.is_empty() {
        v2.truncate(1);
        return v2;
    }
    v1
}

/// mountinfo escapes space, tab, newline and backslash as octal.
fn unescape(s: &str) -> String {
    let mut out = String::new();
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '\\' {
            let code: String = chars.by_ref().take(3).collect();
            match u8::from_str_radix(&code, 8) {
                Ok(b) => out.push(b as char),
                Err(_) => {
                    out.push('\\');
                    out.push_str(&code);
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// The process's cgroup in a hierarchy, from /proc/self/cgroup's text.
pub(crate) fn own_cgroup(proc_cgroup: &str, h: &Hierarchy) -> Option<PathBuf> {
    proc_cgroup.lines().find_map(|line| {
        let mut it = line.splitn(3, ':');
        let (_, list, path) = (it.next()?, it.next()?, it.next()?);
        let matches = if h.v2 {
            list.is_empty()
        } else {
            list.split(',')
                .any(|c| h.controllers.iter().any(|w| w == c))
        };
        matches.then(|| PathBuf::from(path.trim_start_matches('/')))
    })
}

pub(crate) fn mounted_hierarchies() -> Result<Vec<Hierarchy>, CgroupError> {
    let mountinfo = fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let found = hierarchies(&mountinfo);
    if found.is_empty() {
        return Err(CgroupError::NoHierarchy);
    }
    Ok(found)
}

impl PodCgroup {
    /// Creates the cgroup `cgroups_path` names in every hierarchy husk uses
    /// and moves this whole process into it, so all it starts afterwards is
    /// charged there. On error the shim stays where it was and what was
    /// created is removed.
    pub fn enter(cgroups_path: &str) -> Result<Self, CgroupError> {
        let path = resolve(cgroups_path)?;
        let own = fs::read_to_string("/proc/self/cgroup").unwrap_or_default();
        let mut cg = PodCgroup {
            path: path.clone(),
            dirs: Vec::new(),
            origins: Vec::new(),
        };
        for h in mounted_hierarchies()? {
            let dir = h.mount.join(&path);
            if let Some(pids) = processes_in(&dir) {
                cg.remove();
                return Err(CgroupError::Populated { dir, pids });
            }
            if h.v2 {
                enable_v2_controllers(&h.mount, &path);
            }
            if let Err(source) = fs::create_dir_all(&dir) {
                cg.remove();
                return Err(CgroupError::Create { dir, source });
            }
            let origin = own_cgroup(&own, &h)
                .map(|p| h.mount.join(p))
                .unwrap_or_else(|| h.mount.clone());
            cg.dirs.push(dir.clone());
            cg.origins.push(origin.join("cgroup.procs"));
            if let Err(source) = fs::write(dir.join("cgroup.procs"), std::process::id().to_string())
            {
                cg.remove();
                return Err(CgroupError::Join { dir, source });
            }
        }
        tracing::info!(cgroup = %path.display(), "shim joined the pod's host cgroup");
        Ok(cg)
    }

    /// The cgroup's path below each hierarchy's root.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The cgroup's directory in each hierarchy.
    pub fn dirs(&self) -> &[PathBuf] {
        &self.dirs
    }

    /// Moves the shim back where it came from, kills whatever is left in
    /// the cgroup (the pod's VMM and daemons, if still there) and removes
    /// it.
    pub fn remove(self) {
        for origin in &self.origins {
            let _ = fs::write(origin, std::process::id().to_string());
        }
        remove_dirs(&self.dirs);
    }
}

/// Removes the cgroup a dead shim recorded (`delete` after a crash): kills
/// what is left in it and removes its directories.
pub fn remove_recorded(record: &Path) {
    let Ok(text) = fs::read_to_string(record) else {
        return;
    };
    let Ok(path) = resolve(text.trim()) else {
        return;
    };
    let Ok(found) = mounted_hierarchies() else {
        return;
    };
    let dirs: Vec<PathBuf> = found.iter().map(|h| h.mount.join(&path)).collect();
    remove_dirs(&dirs);
    let _ = fs::remove_file(record);
}

/// The first pids in cgroup directory `dir`, when it exists and holds any.
fn processes_in(dir: &Path) -> Option<String> {
    let procs = fs::read_to_string(dir.join("cgroup.procs")).ok()?;
    let pids: Vec<&str> = procs.split_whitespace().take(5).collect();
    (!pids.is_empty()).then(|| pids.join(", "))
}

/// Writes the record `remove_recorded` reads.
pub fn record(record: &Path, cg: &PodCgroup) -> std::io::Result<()> {
    fs::write(record, format!("/{}", cg.path.display()))
}

/// SIGKILLs every process left in the directories, then removes them,
/// waiting for the processes to be gone.
fn remove_dirs(dirs: &[PathBuf]) {
    let deadline = Instant::now() + REMOVE_WAIT;
    for dir in dirs {
        kill_and_wait(dir, deadline);
        loop {
            let e = match fs::remove_dir(dir) {
                Ok(()) => break,
                Err(e) if e.kind() == ErrorKind::NotFound => break,
                Err(e) => e,
            };
            // A process forked while the others were killed: another
            // round. None left (a sub-cgroup holds it): nothing to wait for.
            if Instant::now() >= deadline || kill_and_wait(dir, deadline) == 0 {
                tracing::warn!(dir = %dir.display(), "cgroup left behind: {e}");
                break;
            }
            tracing::debug!(dir = %dir.display(), "cgroup busy: {e}");
        }
    }
}

/// SIGKILLs every process in cgroup directory `dir` and waits, until
/// `deadline`, for each to exit (a process leaves its cgroup as it exits,
/// before its pidfd turns readable). Returns how many it killed.
fn kill_and_wait(dir: &Path, deadline: Instant) -> usize {
    let me = std::process::id();
    let procs = fs::read_to_string(dir.join("cgroup.procs")).unwrap_or_default();
    let killed: Vec<_> = procs
        .lines()
        .filter_map(|l| l.trim().parse::<u32>().ok())
        .filter(|&pid| pid != me && pid > 1)
        // One gone already (ESRCH) has left the cgroup.
        .filter_map(|pid| pidfd_open(pid).ok())
        .inspect(pidfd_kill)
        .collect();
    for fd in &killed {
        let _ = wait_any(
            &[fd.as_fd()],
            deadline.saturating_duration_since(Instant::now()),
        );
    }
    killed.len()
}

/// Enables the v2 controllers in each ancestor of `path`, as far as the
/// host allows (an ancestor with processes of its own refuses; the pod's
/// cgroup then has fewer stats, but still holds the pod's processes).
fn enable_v2_controllers(mount: &Path, path: &Path) {
    let mut dir = mount.to_path_buf();
    for part in path.components() {
        for c in V2_CONTROLLERS {
            let _ = fs::write(dir.join("cgroup.subtree_control"), format!("+{c}"));
        }
        dir.push(part);
        let _ = fs::create_dir_all(&dir);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cgroupfs_paths_are_taken_relative_and_escapes_refused() {
        assert_eq!(
            resolve("/kubepods/besteffort/pod1/abc").unwrap(),
            PathBuf::from("kubepods/besteffort/pod1/abc")
        );
        assert_eq!(resolve("husk/c1").unwrap(), PathBuf::from("husk/c1"));
        for bad in ["", "/", "/a/../b", "/a/./b"] {
            let e = resolve(bad).unwrap_err().to_string();
            assert!(e.contains(&format!("{bad:?}")), "{e}");
        }
    }

    #[test]
    fn systemd_paths_expand_like_systemd() {
        assert_eq!(
            resolve("kubepods-besteffort-pod1.slice:cri-containerd:abc").unwrap(),
            PathBuf::from(
                "kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod1.slice/cri-containerd-abc.scope"
            )
        );
        assert_eq!(
            resolve("system.slice::abc").unwrap(),
            PathBuf::from("system.slice/abc.scope")
        );
        assert_eq!(
            resolve(":cri-containerd:abc").unwrap(),
            PathBuf::from("cri-containerd-abc.scope")
        );
        for bad in [
            "a:b",
            "pods:x:y",
            "a--b.slice:x:y",
            "a.slice:x:",
            "a.slice:x:../y",
        ] {
            assert!(resolve(bad).is_err(), "{bad} accepted");
        }
    }

    const HYBRID: &str = "\
24 31 0:22 / /sys rw,nosuid - sysfs sysfs rw
34 24 0:29 / /sys/fs/cgroup ro - tmpfs tmpfs ro,mode=755
35 34 0:30 / /sys/fs/cgroup/unified rw - cgroup2 cgroup2 rw
36 34 0:31 / /sys/fs/cgroup/systemd rw - cgroup cgroup rw,xattr,name=systemd
39 34 0:34 / /sys/fs/cgroup/cpu,cpuacct rw - cgroup cgroup rw,cpu,cpuacct
40 34 0:35 / /sys/fs/cgroup/memory rw - cgroup cgroup rw,memory
41 34 0:36 / /sys/fs/cgroup/cpuset rw - cgroup cgroup rw,cpuset
";

    #[test]
    fn a_hybrid_host_uses_its_v1_controllers_only() {
        let h = hierarchies(HYBRID);
        assert_eq!(
            h.iter().map(|h| h.mount.clone()).collect::<Vec<_>>(),
            [
                PathBuf::from("/sys/fs/cgroup/cpu,cpuacct"),
                PathBuf::from("/sys/fs/cgroup/memory")
            ]
        );
        assert_eq!(h[0].controllers, ["cpu", "cpuacct"]);
        let own = "12:cpu,cpuacct:/user.slice\n4:memory:/process_api/x\n0::/init.scope\n";
        assert_eq!(own_cgroup(own, &h[0]), Some(PathBuf::from("user.slice")));
        assert_eq!(own_cgroup(own, &h[1]), Some(PathBuf::from("process_api/x")));
    }

    #[test]
    fn a_unified_host_uses_cgroup2() {
        let info = "30 24 0:26 / /sys/fs/cgroup rw,nosuid - cgroup2 cgroup2 rw,nsdelegate\n\
                    31 24 0:27 / /mnt/my\\040cg rw - cgroup2 cgroup2 rw\n";
        let h = hierarchies(info);
        assert_eq!(h.len(), 1);
        assert!(h[0].v2);
        assert_eq!(h[0].mount, PathBuf::from("/sys/fs/cgroup"));
        assert_eq!(
            own_cgroup("0::/system.slice/containerd.service\n", &h[0]),
            Some(PathBuf::from("system.slice/containerd.service"))
        );
        assert_eq!(unescape("/mnt/my\\040cg"), "/mnt/my cg");
    }
}
