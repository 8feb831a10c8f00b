//! Synced volumes on the host: watches the directories kubelet's atomic
//! writer updates (configMap, secret, downwardAPI, projected; see
//! [`crate::host::storage::is_synced_volume`]) and tells the guest agent each
//! time the writer has made another data directory current, so that the
//! agent's copy, which the container sees, follows (agent/src/volumes.rs).
//!
//! One inotify instance and one thread per pod, started with the first
//! synced volume. The writer's last step on the host is the rename of
//! `..data_tmp` over `..data` (IN_MOVED_TO `..data`); the watch then reads
//! where `..data` points and sends that name. Events are handled in order
//! on the one thread, so the guest sees the versions in the host's order.

use std::collections::HashMap;
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;

use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify, WatchDescriptor};

use crate::vm::agent::{Agent, AgentError};

/// The link kubelet's writer swaps.
const DATA_LINK: &str = "..data";

/// One container's mount of a synced volume.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Watched {
    container: String,
    volume: u32,
    /// The host directory (the container's host-private bind of it).
    dir: PathBuf,
}

type Table = HashMap<WatchDescriptor, Vec<Watched>>;

/// The watch of one pod's synced volumes.
pub struct VolumeWatch {
    agent: Agent,
    running: Mutex<Option<Running>>,
}

struct Running {
    inotify: Arc<Inotify>,
    table: Arc<Mutex<Table>>,
    /// Closing it (dropping) ends the thread.
    stop: OwnedFd,
    thread: JoinHandle<()>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl VolumeWatch {
    /// A watch that tells `agent`; nothing runs until the first volume.
    pub fn new(agent: Agent) -> Self {
        Self {
            agent,
            running: Mutex::new(None),
        }
    }

    /// Watches container `container`'s synced volume `volume`, whose host
    /// directory is `dir`.
    pub fn watch(&self, container: &str, volume: u32, dir: &Path) -> std::io::Result<()> {
        let mut running = lock(&self.running);
        if running.is_none() {
            *running = Some(Running::start(self.agent.clone())?);
        }
        let Some(r) = running.as_ref() else {
            unreachable!("started above")
        };
        let wd = r
            .inotify
            .add_watch(
                dir,
                AddWatchFlags::IN_MOVED_TO
                    | AddWatchFlags::IN_CREATE
                    | AddWatchFlags::IN_ONLYDIR
                    | AddWatchFlags::IN_DONT_FOLLOW,
            )
            .map_err(std::io::Error::from)?;
        lock(&r.table).entry(wd).or_default().push(Watched {
            container: container.to_owned(),
            volume,
            dir: dir.to_path_buf(),
        });
        Ok(())
    }

    /// Stops watching container `container`'s volumes.
    pub fn forget(&self, container: &str) {
        let running = lock(&self.running);
        let Some(r) = running.as_ref() else { return };
        let mut table = lock(&r.table);
        table.retain(|wd, watched| {
            watched.retain(|w| w.container != container);
            if watched.is_empty() {
                // Gone already if the directory went.
                let _ = r.inotify.rm_watch(*wd);
            }
            !watched.is_empty()
        });
    }

    /// Ends the thread; idempotent.
    pub fn stop(&self) {
        let running = lock(&self.running).take();
        if let Some(r) = running {
            drop(r.stop);
            let _ = r.thread.join();
        }
    }
}

impl Drop for VolumeWatch {
    fn drop(&mut self) {
        self.stop();
    }
}

impl Running {
    fn start(agent: Agent) -> std::io::Result<Self> {
        let inotify = Arc::new(
            Inotify::init(InitFlags::IN_CLOEXEC | InitFlags::IN_NONBLOCK)
                .map_err(std::io::Error::from)?,
        );
        let table = Arc::new(Mutex::new(Table::new()));
        let (stop_read, stop) =
            nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(std::io::Error::from)?;
        let thread = {
            let (inotify, table) = (inotify.clone(), table.clone());
            std::thread::Builder::new()
                .name("volume-watch".into())
                .spawn(move || run(&inotify, &table, &stop_read, &agent))?
        };
        Ok(Running {
            inotify,
            table,
            stop,
            thread,
        })
    }
}

/// The thread: waits for events or the stop pipe's close.
fn run(inotify: &Inotify, table: &Mutex<Table>, stop: &OwnedFd, agent: &Agent) {
    loop {
        let mut fds = [
            PollFd::new(inotify.as_fd(), PollFlags::POLLIN),
            PollFd::new(stop.as_fd(), PollFlags::POLLIN),
        ];
        match poll(&mut fds, PollTimeout::NONE) {
            Ok(_) => {}
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => {
                tracing::error!("synced volumes: waiting for inotify: {e}; updates stop");
                return;
            }
        }
        if fds[1].revents().is_some_and(|r| !r.is_empty()) {
            return;
        }
        let events = match inotify.read_events() {
            Ok(e) => e,
            Err(nix::errno::Errno::EAGAIN) => continue,
            Err(e) => {
                tracing::error!("synced volumes: reading inotify: {e}; updates stop");
                return;
            }
        };
        let due = due(&lock(table), &events);
        for w in due {
            sync(agent, &w);
        }
    }
}

/// The volumes a batch of events asks to sync, each once, in order. A
/// queue overflow lost events: every volume is synced.
fn due(table: &Table, events: &[nix::sys::inotify::InotifyEvent]) -> Vec<Watched> {
    let mut due: Vec<Watched> = Vec::new();
    for ev in events {
        let hit: Vec<&Watched> = if ev.mask.contains(AddWatchFlags::IN_Q_OVERFLOW) {
            table.values().flatten().collect()
        } else if ev.name.as_deref() == Some(std::ffi::OsStr::new(DATA_LINK)) {
            table.get(&ev.wd).into_iter().flatten().collect()
        } else {
            Vec::new()
        };
        for w in hit {
            if !due.contains(w) {
                due.push(w.clone());
            }
        }
    }
    due
}

/// Sends where `..data` points now. A container the agent does not know
/// yet is no loss: its create reads the share after this swap.
fn sync(agent: &Agent, w: &Watched) {
    let link = w.dir.join(DATA_LINK);
    let name = match std::fs::read_link(&link) {
        Ok(n) => n,
        Err(e) => {
            tracing::warn!(volume = %w.dir.display(), "synced volume: reading {}: {e}", link.display());
            return;
        }
    };
    let Some(name) = name.to_str().filter(|n| !n.contains('/')) else {
        tracing::warn!(volume = %w.dir.display(), "synced volume: {} points at {name:?}, not a data directory; not synced", link.display());
        return;
    };
    match agent.sync_volume(&w.container, w.volume, name) {
        Ok(()) => tracing::debug!(container = %w.container, volume = w.volume, "synced to {name}"),
        Err(AgentError::Rpc {
            error: ttrpc::Error::RpcStatus(s),
            ..
        }) if s.code.value() == ttrpc::Code::NOT_FOUND as i32 => {
            tracing::debug!(container = %w.container, volume = w.volume, "not in the guest (yet or any more): {}", s.message);
        }
        Err(e) => tracing::warn!(
            container = %w.container,
            volume = w.volume,
            "synced volume {}: {}",
            w.dir.display(),
            crate::error_chain(&e)
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    fn watched(c: &str, v: u32) -> Watched {
        Watched {
            container: c.into(),
            volume: v,
            dir: PathBuf::from(format!("/vol/{c}/{v}")),
        }
    }

    #[test]
    fn a_swap_of_the_data_link_is_due_once_for_every_container_that_mounts_it() {
        let d = tempfile::tempdir().unwrap();
        let inotify = Inotify::init(InitFlags::IN_NONBLOCK).unwrap();
        let wd = inotify
            .add_watch(
                d.path(),
                AddWatchFlags::IN_MOVED_TO | AddWatchFlags::IN_CREATE,
            )
            .unwrap();
        let mut table = Table::new();
        table.insert(wd, vec![watched("a", 0), watched("b", 3)]);
        // kubelet's steps: data dir, ..data_tmp, rename (twice: two updates
        // in one batch are one sync each).
        for v in ["..v1", "..v2"] {
            std::fs::create_dir(d.path().join(v)).unwrap();
            symlink(v, d.path().join("..data_tmp")).unwrap();
            std::fs::rename(d.path().join("..data_tmp"), d.path().join(DATA_LINK)).unwrap();
        }
        std::fs::write(d.path().join("unrelated"), "").unwrap();
        let events = inotify.read_events().unwrap();
        assert_eq!(due(&table, &events), vec![watched("a", 0), watched("b", 3)]);
        // Nothing but other names: nothing due.
        std::fs::write(d.path().join("other"), "").unwrap();
        let events = inotify.read_events().unwrap();
        assert_eq!(due(&table, &events), vec![]);
    }
}
