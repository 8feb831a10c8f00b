//! A container's cgroup v2 directory: its processes, statistics, resource
//! updates and OOM kills.
//!
//! Statistics are read here rather than through libcgroups: its v2 reader
//! fails as a whole when one file is missing (the guest kernel has no swap,
//! so no `memory.swap.*`).

use std::collections::HashMap;
use std::os::fd::{AsFd, BorrowedFd};
use std::path::{Path, PathBuf};

use husk_protocol::containers::StatsResponse;
use libcgroups::common::{CgroupManager, ControllerOpt};
use libcontainer::container::Container;
use libcontainer::oci_spec::runtime::LinuxResources;

/// Where the cgroup v2 hierarchy is mounted in the guest.
pub const ROOT: &str = "/sys/fs/cgroup";

/// The container's cgroup directory, absolute.
pub fn container_path(c: &Container) -> PathBuf {
    let rel = c
        .spec()
        .ok()
        .and_then(|s| s.cgroup_path.to_str().map(str::to_owned))
        .unwrap_or_default();
    Path::new(ROOT).join(rel.trim_start_matches('/'))
}

/// Every process in the cgroup and its descendants, in ascending order.
pub fn pids(cgroup: &Path) -> Vec<u32> {
    let mut out = Vec::new();
    let mut dirs = vec![cgroup.to_path_buf()];
    while let Some(d) = dirs.pop() {
        if let Ok(procs) = std::fs::read_to_string(d.join("cgroup.procs")) {
            out.extend(procs.lines().filter_map(|l| l.trim().parse::<u32>().ok()));
        }
        if let Ok(rd) = std::fs::read_dir(&d) {
            dirs.extend(
                rd.flatten()
                    .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
                    .map(|e| e.path()),
            );
        }
    }
    out.sort_unstable();
    out.dedup();
    out
}

/// `key value` lines (cpu.stat, memory.stat, memory.events).
fn flat_keyed(path: &Path) -> std::io::Result<HashMap<String, u64>> {
    Ok(parse_flat_keyed(&std::fs::read_to_string(path)?))
}

fn parse_flat_keyed(text: &str) -> HashMap<String, u64> {
    text.lines()
        .filter_map(|l| {
            let (k, v) = l.split_once(' ')?;
            Some((k.to_owned(), v.trim().parse().ok()?))
        })
        .collect()
}

/// A single number, or 0 for "max" (no limit).
fn single(path: &Path) -> std::io::Result<u64> {
    let s = std::fs::read_to_string(path)?;
    let s = s.trim();
    if s == "max" {
        return Ok(0);
    }
    s.parse().map_err(|_| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("{}: {s:?} is not a number", path.display()),
        )
    })
}

/// The cgroup's figures. CPU and memory are required; pids may be missing
/// (controller not enabled) and then read as 0.
pub fn stats(cgroup: &Path) -> std::io::Result<StatsResponse> {
    let cpu = flat_keyed(&cgroup.join("cpu.stat"))?;
    let mem = flat_keyed(&cgroup.join("memory.stat"))?;
    let events = flat_keyed(&cgroup.join("memory.events")).unwrap_or_default();
    let usec = |k: &str| cpu.get(k).copied().unwrap_or(0).saturating_mul(1000);
    let mut s = StatsResponse::new();
    s.cpu_usage_ns = usec("usage_usec");
    s.cpu_user_ns = usec("user_usec");
    s.cpu_kernel_ns = usec("system_usec");
    s.cpu_throttled_periods = cpu.get("nr_throttled").copied().unwrap_or(0);
    s.cpu_throttled_ns = usec("throttled_usec");
    s.memory_usage = single(&cgroup.join("memory.current"))?;
    s.memory_limit = single(&cgroup.join("memory.max"))?;
    s.memory_cache = mem.get("file").copied().unwrap_or(0);
    s.memory_rss = mem.get("anon").copied().unwrap_or(0);
    s.pids_current = single(&cgroup.join("pids.current")).unwrap_or(0);
    s.pids_limit = single(&cgroup.join("pids.max")).unwrap_or(0);
    s.oom_kills = events.get("oom_kill").copied().unwrap_or(0);
    Ok(s)
}

/// Applies new resource limits to the cgroup (libcgroups converts the OCI
/// values to cgroup v2 files, as at create).
pub fn apply(
    cgroup: &Path,
    resources: &LinuxResources,
) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let rel = cgroup.strip_prefix(ROOT)?;
    let manager = libcgroups::v2::manager::Manager::new(ROOT.into(), rel.to_path_buf())?;
    manager.apply(&ControllerOpt {
        resources,
        disable_oom_killer: false,
        oom_score_adj: None,
        freezer_state: None,
    })?;
    Ok(())
}

/// The `oom_kill` count of an open `memory.events`, read from its start.
fn oom_kills(file: &mut std::fs::File) -> Option<u64> {
    use std::io::{Read, Seek, SeekFrom};
    let mut text = String::new();
    file.seek(SeekFrom::Start(0)).ok()?;
    file.read_to_string(&mut text).ok()?;
    Some(
        parse_flat_keyed(&text)
            .get("oom_kill")
            .copied()
            .unwrap_or(0),
    )
}

/// Blocks until `memory.events` counts one more OOM kill than when called
/// (true), or until the cgroup or the container (`gone`) goes away (false).
/// kernfs wakes poll(2) with POLLPRI when the file changed since it was
/// last read through the same open file, so every read goes through the
/// polled one: read through another, poll would answer at once for good
/// and the wait would spin a guest CPU for the container's whole life.
pub fn wait_oom_kill(cgroup: &Path, gone: BorrowedFd<'_>) -> bool {
    use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
    let Ok(mut file) = std::fs::File::open(cgroup.join("memory.events")) else {
        return false;
    };
    let Some(start) = oom_kills(&mut file) else {
        return false;
    };
    loop {
        // memory.events raises POLLPRI when it changes; `gone` hangs up
        // when the container is removed. No timeout: nothing to poll for.
        let mut fds = [
            PollFd::new(file.as_fd(), PollFlags::POLLPRI),
            PollFd::new(gone, PollFlags::POLLIN),
        ];
        match poll(&mut fds, PollTimeout::NONE) {
            Ok(_) if fds[1].any().unwrap_or(true) => return false,
            Ok(_) | Err(nix::errno::Errno::EINTR) => {}
            Err(_) => return false,
        }
        match oom_kills(&mut file) {
            Some(n) if n > start => return true,
            None => return false,
            Some(_) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn fake_cgroup() -> tempfile::TempDir {
        let d = tempfile::tempdir().unwrap();
        let w = |f: &str, s: &str| std::fs::write(d.path().join(f), s).unwrap();
        w(
            "cpu.stat",
            "usage_usec 1500\nuser_usec 1000\nsystem_usec 500\nnr_periods 0\nnr_throttled 2\nthrottled_usec 7\n",
        );
        w("memory.stat", "anon 4096\nfile 8192\nkernel 100\n");
        w("memory.current", "20480\n");
        w("memory.max", "max\n");
        w("memory.events", "low 0\nhigh 0\nmax 3\noom 1\noom_kill 1\n");
        w("pids.current", "3\n");
        w("pids.max", "100\n");
        w("cgroup.procs", "12\n7\n");
        std::fs::create_dir(d.path().join("sub")).unwrap();
        std::fs::write(d.path().join("sub/cgroup.procs"), "9\n7\n").unwrap();
        d
    }

    #[test]
    fn stats_are_read_in_nanoseconds_and_bytes() {
        let d = fake_cgroup();
        let s = stats(d.path()).unwrap();
        assert_eq!(
            (s.cpu_usage_ns, s.cpu_user_ns, s.cpu_kernel_ns),
            (1_500_000, 1_000_000, 500_000)
        );
        assert_eq!((s.cpu_throttled_periods, s.cpu_throttled_ns), (2, 7000));
        assert_eq!((s.memory_usage, s.memory_limit), (20480, 0));
        assert_eq!((s.memory_rss, s.memory_cache), (4096, 8192));
        assert_eq!((s.pids_current, s.pids_limit, s.oom_kills), (3, 100, 1));
    }

    #[test]
    fn missing_or_garbled_required_files_fail() {
        let d = fake_cgroup();
        std::fs::write(d.path().join("memory.current"), "lots\n").unwrap();
        let e = stats(d.path()).unwrap_err().to_string();
        assert!(e.contains("memory.current") && e.contains("lots"), "{e}");
        std::fs::remove_file(d.path().join("cpu.stat")).unwrap();
        assert!(stats(d.path()).is_err());
    }

    #[test]
    fn pids_cover_sub_cgroups_once_each() {
        let d = fake_cgroup();
        assert_eq!(pids(d.path()), vec![7, 9, 12]);
    }

    #[test]
    fn oom_wait_ends_as_soon_as_the_container_goes() {
        let d = fake_cgroup();
        let (gone, removed) = std::io::pipe().unwrap();
        let t = std::time::Instant::now();
        let closer = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(50));
            drop(removed);
        });
        assert!(!wait_oom_kill(d.path(), gone.as_fd()));
        closer.join().unwrap();
        let took = t.elapsed();
        assert!(
            took >= Duration::from_millis(50) && took < Duration::from_millis(500),
            "{took:?}"
        );
        assert!(!wait_oom_kill(&d.path().join("nonexistent"), gone.as_fd()));
    }
}
