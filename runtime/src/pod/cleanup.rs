//! What is left of a pod whose owner died (a shim killed with its VM, a
//! `husk run` killed with SIGKILL), found from its state directory alone,
//! and removed: the one clean-up the shim's `delete` and `husk delete`
//! share.

use std::path::Path;
use std::time::{Duration, Instant};

use crate::confine::process::{pidfd_kill, pidfd_open, wait_any};
use crate::confine::report;
use crate::host::paths::SandboxPaths;
use crate::host::storage;

/// How long killed processes of a pod get to be gone.
const KILL_WAIT: Duration = Duration::from_secs(5);

/// What [`cleanup`] did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Cleaned {
    /// Processes of the pod it killed.
    pub killed: Vec<u32>,
    /// Processes still alive after [`KILL_WAIT`] (then nothing was
    /// unmounted).
    pub survivors: Vec<u32>,
    /// Whether the pod's directory went (with its last container).
    pub removed: bool,
}

/// Removes what a dead owner left of container `container` of the pod at
/// `paths` (its rootfs, bind mounts and share directory), and, once no
/// container has state left (or with `container` `None`: the whole pod),
/// kills whatever still runs of the pod (SIGKILL through pidfds), unmounts
/// everything below its directory and removes it. The pod's owner must be
/// gone: this is for a pod nobody serves.
pub fn cleanup(paths: &SandboxPaths, container: Option<&str>) -> Cleaned {
    let mut done = Cleaned::default();
    if let Some(id) = container {
        if husk_protocol::validate_id("container", id).is_ok() {
            storage::release_container(&paths.container(id));
        }
    }
    if container.is_some() && paths.has_containers() {
        return done;
    }
    let pids: Vec<u32> = report::processes_naming(&[paths.root()])
        .into_iter()
        .map(|(pid, _)| pid)
        .collect();
    let fds: Vec<_> = pids
        .iter()
        .filter_map(|&pid| Some((pid, pidfd_open(pid).ok()?)))
        .collect();
    for (pid, fd) in &fds {
        pidfd_kill(fd);
        done.killed.push(*pid);
    }
    let deadline = Instant::now() + KILL_WAIT;
    for (pid, fd) in &fds {
        // Readable once it has exited; a zombie whose parent is gone is
        // reaped by init.
        let left = deadline.saturating_duration_since(Instant::now());
        let _ = wait_any(&[std::os::fd::AsFd::as_fd(fd)], left);
        if Path::new(&format!("/proc/{pid}/cmdline")).exists() && alive(*pid) {
            done.survivors.push(*pid);
        }
    }
    if !done.survivors.is_empty() {
        tracing::warn!(
            dir = %paths.root().display(),
            survivors = ?done.survivors,
            "processes of the pod outlived SIGKILL; its mounts stay"
        );
        return done;
    }
    storage::remove_sandbox(paths);
    done.removed = !paths.root().exists();
    // Its uid lease, which the dead owner's drop did not remove.
    if let Some(state) = paths.state_dir() {
        crate::confine::ids::sweep(&crate::confine::ids::lease_dir(state));
    }
    done
}

/// Whether `pid` is alive and not a zombie.
fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
        s.rsplit_once(") ")
            .and_then(|(_, rest)| rest.chars().next())
            .is_some_and(|state| state != 'Z' && state != 'X')
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use crate::pod::inventory::list;
    use husk_protocol::SandboxId;

    #[test]
    fn a_pod_with_state_but_no_process_is_listed_dead_and_cleaned_whole() {
        let root = tempfile::tempdir().unwrap();
        let config = Config {
            state_dir: root.path().to_path_buf(),
            ..Config::default()
        };
        let paths = SandboxPaths::new(&config, "k8s.io", &SandboxId::parse("p1").unwrap()).unwrap();
        for c in ["c1", "c2"] {
            std::fs::create_dir_all(paths.container(c).share.join("rootfs")).unwrap();
        }
        // The uid lease its dead owner left (no holder, file still there).
        let leases = crate::confine::ids::lease_dir(&config.state_dir);
        std::fs::create_dir_all(&leases).unwrap();
        std::fs::write(leases.join("1879048200"), "").unwrap();
        let pods = list(&config);
        assert_eq!(pods.len(), 1, "{pods:?}");
        assert_eq!(
            (pods[0].namespace.as_str(), pods[0].id.as_str()),
            ("k8s.io", "p1")
        );
        assert_eq!(pods[0].containers, ["c1", "c2"]);
        assert_eq!(pods[0].state(), "dead");

        // One container: the pod stays while the other has state.
        let done = cleanup(&paths, Some("c1"));
        assert!(!done.removed);
        assert_eq!(list(&config)[0].containers, ["c2"]);
        // The last one: the pod goes.
        let done = cleanup(&paths, Some("c2"));
        assert!(done.removed, "{done:?}");
        assert!(list(&config).is_empty());
        assert!(
            !leases.join("1879048200").exists(),
            "the dead owner's lease stays"
        );
    }

    #[test]
    fn a_running_process_of_the_pod_is_killed_before_its_state_goes() {
        let root = tempfile::tempdir().unwrap();
        let config = Config {
            state_dir: root.path().to_path_buf(),
            ..Config::default()
        };
        let paths = SandboxPaths::new(&config, "_husk", &SandboxId::parse("p2").unwrap()).unwrap();
        std::fs::create_dir_all(paths.sockets()).unwrap();
        // One process (no fork to race with) naming a file below the pod's
        // directory, as a VMM does.
        std::fs::write(paths.vmm_log(), "").unwrap();
        let mut child = std::process::Command::new("tail")
            .arg("-f")
            .arg(paths.vmm_log())
            .spawn()
            .unwrap();
        let pid = child.id();
        // spawn returns once exec closed the child's CLOEXEC pipe, which the
        // kernel does before it sets up the new program's arguments: for a
        // moment /proc/<pid>/cmdline is empty (1 run in 4 here in parallel
        // with the other unit tests).
        let deadline = Instant::now() + Duration::from_secs(5);
        let listed = loop {
            let listed = list(&config);
            if listed[0].pids == [pid] || Instant::now() > deadline {
                break listed;
            }
            std::thread::yield_now();
        };
        assert_eq!(listed[0].pids, [pid], "tail: {:?}", child.try_wait());
        assert_eq!(listed[0].state(), "running");
        let done = cleanup(&paths, None);
        assert_eq!(done.killed, [pid]);
        assert!(done.survivors.is_empty(), "{done:?}");
        assert!(done.removed);
        assert!(child.wait().unwrap().code().is_none(), "killed by a signal");
    }
}
