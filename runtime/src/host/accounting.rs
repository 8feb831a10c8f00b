//! What a pod's host cgroup has charged: its memory (usage, working set,
//! limit), its CPU time and the OOM kills in it. Read for a process (the
//! pod's VMM), from its own cgroup in the memory and CPU hierarchies, on
//! cgroup v1 and v2 alike; `husk runtimeclass` measures a pod's overhead
//! with it and the liveness monitor tells an OOM-killed VMM from one that
//! died otherwise.

use std::fs;
use std::path::{Path, PathBuf};

use crate::host::cgroup::{mounted_hierarchies, own_cgroup};

/// The cgroup directories that account one process.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Accounting {
    /// The cgroup's path below its hierarchy's root (the memory one's).
    pub path: PathBuf,
    memory: Option<PathBuf>,
    cpu: Option<PathBuf>,
    /// Where the memory hierarchy is mounted: the bound of an ancestor walk.
    memory_root: Option<PathBuf>,
    v2: bool,
}

/// How close to its limit a cgroup's usage counts as at it: v1's usage
/// lags by per-CPU charge batches.
pub const AT_LIMIT: u64 = 8 << 20;

/// A process's OOM-kill counts: its cgroup's and its parent's (kubelet
/// limits a pod at the parent; cgroup v1 counts a kill where the limit
/// was hit).
pub type OomCounts = [Option<u64>; 2];

impl Accounting {
    /// The cgroups that account process `pid`; `None` when its cgroups
    /// cannot be read (it exited) or no hierarchy is mounted.
    pub fn of(pid: u32) -> Option<Self> {
        let own = fs::read_to_string(format!("/proc/{pid}/cgroup")).ok()?;
        let mut acc = Accounting {
            path: PathBuf::new(),
            memory: None,
            cpu: None,
            memory_root: None,
            v2: false,
        };
        for h in mounted_hierarchies().ok()? {
            let Some(rel) = own_cgroup(&own, &h) else {
                continue;
            };
            let dir = h.mount.join(&rel);
            let has = |c: &str| h.v2 || h.controllers.iter().any(|x| x == c);
            if has("memory") && acc.memory.is_none() {
                acc.path = PathBuf::from("/").join(&rel);
                acc.memory = Some(dir.clone());
                acc.memory_root = Some(h.mount.clone());
            }
            if has("cpuacct") || (h.v2 && acc.cpu.is_none()) {
                acc.cpu = Some(dir);
            }
            acc.v2 |= h.v2;
        }
        (acc.memory.is_some() || acc.cpu.is_some()).then_some(acc)
    }

    /// Accounting read from a cgroup v1 directory `dir` below mount
    /// `root`, for tests that write the files themselves.
    #[cfg(test)]
    pub(crate) fn v1_at(dir: &Path, root: &Path) -> Self {
        Accounting {
            path: PathBuf::from("/").join(dir.strip_prefix(root).unwrap_or(dir)),
            memory: Some(dir.to_path_buf()),
            cpu: Some(dir.to_path_buf()),
            memory_root: Some(root.to_path_buf()),
            v2: false,
        }
    }

    fn memory_file(&self, name: &str) -> Option<String> {
        fs::read_to_string(self.memory.as_ref()?.join(name)).ok()
    }

    /// Bytes charged: v1 `memory.usage_in_bytes`, v2 `memory.current`.
    pub fn memory_usage(&self) -> Option<u64> {
        let f = if self.v2 {
            "memory.current"
        } else {
            "memory.usage_in_bytes"
        };
        self.memory_file(f)?.trim().parse().ok()
    }

    /// The working set as kubelet computes it (what it evicts on): usage
    /// less inactive file pages, which the kernel reclaims before it
    /// kills.
    pub fn working_set(&self) -> Option<u64> {
        let usage = self.memory_usage()?;
        let stat = self.memory_file("memory.stat").unwrap_or_default();
        let key = if self.v2 {
            "inactive_file"
        } else {
            "total_inactive_file"
        };
        let inactive = keyed(&stat, key).unwrap_or(0);
        Some(usage.saturating_sub(inactive))
    }

    /// The memory limit of the cgroup or the nearest ancestor that has one
    /// (kubelet's pod cgroup is the parent of the sandbox's): `None` for
    /// none.
    pub fn memory_limit(&self) -> Option<u64> {
        self.limited().map(|(limit, _)| limit)
    }

    /// Whether the cgroup that limits this one is within [`AT_LIMIT`] of
    /// its limit now: its processes are reclaiming, or about to be
    /// OOM-killed.
    pub fn at_memory_limit(&self) -> bool {
        let Some((limit, dir)) = self.limited() else {
            return false;
        };
        let f = if self.v2 {
            "memory.current"
        } else {
            "memory.usage_in_bytes"
        };
        let usage = fs::read_to_string(dir.join(f)).ok();
        usage
            .and_then(|u| u.trim().parse::<u64>().ok())
            .is_some_and(|u| u.saturating_add(AT_LIMIT) >= limit)
    }

    /// The nearest limit at or above the cgroup, and the directory it is
    /// set on.
    fn limited(&self) -> Option<(u64, PathBuf)> {
        let (mut dir, root) = (self.memory.clone()?, self.memory_root.clone()?);
        let file = if self.v2 {
            "memory.max"
        } else {
            "memory.limit_in_bytes"
        };
        while dir.starts_with(&root) && dir != root {
            let limit = fs::read_to_string(dir.join(file)).ok();
            // v1's "no limit" is the largest page-aligned i64.
            if let Some(v) = limit.and_then(|l| l.trim().parse::<u64>().ok()) {
                if v < (1 << 62) {
                    return Some((v, dir));
                }
            }
            dir.pop();
        }
        None
    }

    /// OOM kills counted in the cgroup and in its parent: v1's
    /// `memory.oom_control` (`oom_kill`, kernels 4.13 on), v2's
    /// `memory.events`.
    pub fn oom_kills(&self) -> OomCounts {
        let Some(dir) = self.memory.clone() else {
            return [None, None];
        };
        let (file, key) = if self.v2 {
            ("memory.events.local", "oom_kill")
        } else {
            ("memory.oom_control", "oom_kill")
        };
        let read = |d: &Path| keyed(&fs::read_to_string(d.join(file)).ok()?, key);
        let parent = dir.parent().filter(|p| {
            self.memory_root
                .as_ref()
                .is_some_and(|r| p.starts_with(r) && p != r)
        });
        [read(&dir), parent.and_then(read)]
    }

    /// CPU time used, nanoseconds: v1 `cpuacct.usage`, v2 `cpu.stat`'s
    /// `usage_usec`.
    pub fn cpu_ns(&self) -> Option<u64> {
        let dir = self.cpu.as_ref()?;
        if self.v2 {
            let stat = fs::read_to_string(dir.join("cpu.stat")).ok()?;
            return keyed(&stat, "usage_usec").map(|us| us * 1000);
        }
        fs::read_to_string(dir.join("cpuacct.usage"))
            .ok()?
            .trim()
            .parse()
            .ok()
    }

    /// The processes in the memory cgroup.
    pub fn processes(&self) -> Vec<u32> {
        self.memory_file("cgroup.procs")
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.trim().parse().ok())
            .collect()
    }
}

/// Whether `after` counts more OOM kills than `before` anywhere.
pub fn oom_killed_since(before: OomCounts, after: OomCounts) -> bool {
    before
        .iter()
        .zip(after)
        .any(|(b, a)| matches!((b, a), (Some(b), Some(a)) if a > *b))
}

/// The value of `key` in a flat-keyed cgroup file (`key value` lines).
fn keyed(text: &str, key: &str) -> Option<u64> {
    text.lines().find_map(|l| {
        let (k, v) = l.split_once(' ')?;
        (k == key).then(|| v.trim().parse().ok()).flatten()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flat_keyed_files_and_oom_counts_read_as_the_kernel_writes_them() {
        let v1 = "oom_kill_disable 0\nunder_oom 0\noom_kill 3\n";
        assert_eq!(keyed(v1, "oom_kill"), Some(3));
        assert_eq!(keyed(v1, "oom"), None);
        let stat = "cache 10\ntotal_inactive_file 4096\ninactive_file 1\n";
        assert_eq!(keyed(stat, "total_inactive_file"), Some(4096));
        assert!(oom_killed_since([Some(0), Some(2)], [Some(0), Some(3)]));
        assert!(!oom_killed_since([Some(1), None], [Some(1), Some(5)]));
        assert!(!oom_killed_since([None, None], [Some(1), Some(1)]));
    }

    #[test]
    fn the_nearest_limit_is_the_parents_and_at_limit_is_within_8_mib_of_it() {
        let root = tempfile::tempdir().unwrap();
        let pod = root.path().join("kubepods/pod1");
        let sandbox = pod.join("abc");
        std::fs::create_dir_all(&sandbox).unwrap();
        let w = |d: &Path, f: &str, v: &str| std::fs::write(d.join(f), v).unwrap();
        // v1's "unlimited" on the sandbox; kubelet's limit on the pod.
        w(&sandbox, "memory.limit_in_bytes", "9223372036854771712\n");
        w(
            &pod,
            "memory.limit_in_bytes",
            &format!("{}\n", 200u64 << 20),
        );
        w(
            &pod,
            "memory.usage_in_bytes",
            &format!("{}\n", 150u64 << 20),
        );
        let acc = Accounting::v1_at(&sandbox, root.path());
        assert_eq!(acc.path, PathBuf::from("/kubepods/pod1/abc"));
        assert_eq!(acc.memory_limit(), Some(200 << 20));
        assert!(!acc.at_memory_limit());
        w(
            &pod,
            "memory.usage_in_bytes",
            &format!("{}\n", (193u64 << 20) + 1),
        );
        assert!(acc.at_memory_limit());
        // No limit anywhere below the mount: never at it.
        std::fs::remove_file(pod.join("memory.limit_in_bytes")).unwrap();
        assert_eq!(acc.memory_limit(), None);
        assert!(!acc.at_memory_limit());
    }

    #[test]
    fn this_process_is_accounted_somewhere_readable() {
        // Every Linux process is in some cgroup; the reads must not fail
        // on the host's layout (v1 here, v2 elsewhere), whatever the
        // figures.
        let Some(acc) = Accounting::of(std::process::id()) else {
            return;
        };
        assert!(acc.path.is_absolute(), "{acc:?}");
        if let (Some(usage), Some(ws)) = (acc.memory_usage(), acc.working_set()) {
            assert!(ws <= usage, "{ws} > {usage}");
        }
    }
}
