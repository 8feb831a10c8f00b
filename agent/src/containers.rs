//! Containers in the guest, built by youki's libcontainer from the OCI spec
//! the host forwards. The rootfs is always `<share>/<id>/rootfs`; the spec's
//! own root path is ignored (the host's path means nothing here).

use std::collections::HashMap;
use std::fs::File;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use husk_protocol::containers::Stdio;
use husk_protocol::{valid_id, StreamHeader, StreamKind};
use libcontainer::container::builder::ContainerBuilder;
use libcontainer::container::Container;
use libcontainer::oci_spec::runtime::Spec;
use libcontainer::syscall::syscall::SyscallType;
use nix::sys::wait::WaitStatus;

use crate::init::SHARE_DIR;
use crate::reaper::Reaper;
use crate::stdio::{pump, StreamHub};

/// libcontainer's state directory.
const STATE_DIR: &str = "/run/husk/containers";
/// Bundles (config.json) written for libcontainer.
const BUNDLE_DIR: &str = "/run/husk/bundles";
/// How long CreateContainer waits for the host's stdio streams.
const STREAM_TIMEOUT: Duration = Duration::from_secs(10);
/// After the process exits, how long output may still drain (a daemonised
/// child holding stdout open must not hang Wait forever).
const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum ContainerError {
    #[error("invalid container id {0:?}")]
    InvalidId(String),
    #[error("container {0} already exists")]
    Exists(String),
    #[error("container {0} not found")]
    NotFound(String),
    #[error("spec of container {id} is not valid OCI JSON: {why}")]
    Spec { id: String, why: String },
    #[error("rootfs {0} is missing or not a directory")]
    Rootfs(PathBuf),
    #[error("stdio {stream} of container {id} did not arrive within {timeout:?}")]
    StreamMissing {
        id: String,
        stream: &'static str,
        timeout: Duration,
    },
    #[error("container {id}: {what}: {why}")]
    Io {
        id: String,
        what: &'static str,
        why: String,
    },
    #[error("container {id}: {why}")]
    Runtime { id: String, why: String },
    #[error("container {0} has not been started")]
    NotStarted(String),
}

/// Exit status of a process, once known.
#[derive(Default)]
struct Exit {
    status: Mutex<Option<u32>>,
    done: Condvar,
}

impl Exit {
    fn set(&self, status: u32) {
        *self.status.lock().unwrap_or_else(|e| e.into_inner()) = Some(status);
        self.done.notify_all();
    }

    fn wait(&self) -> u32 {
        let mut s = self.status.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            if let Some(v) = *s {
                return v;
            }
            s = self.done.wait(s).unwrap_or_else(|e| e.into_inner());
        }
    }
}

struct Entry {
    container: Container,
    pid: Option<i32>,
    exit: Arc<Exit>,
    /// stdout and stderr copies; Wait drains them. (The stdin copy ends when
    /// the host closes its side, which it may never do.)
    pumps: Vec<JoinHandle<()>>,
    /// The stdin connection, shut down on removal to end its copy.
    stdin_conn: Option<File>,
}

/// All containers of this guest.
pub struct Manager {
    containers: Mutex<HashMap<String, Entry>>,
    reaper: Reaper,
    hub: Arc<StreamHub>,
}

/// Exit status as runc reports it.
pub fn exit_status(ws: WaitStatus) -> Option<u32> {
    match ws {
        WaitStatus::Exited(_, code) => Some(code as u32),
        WaitStatus::Signaled(_, sig, _) => Some(128 + sig as u32),
        _ => None,
    }
}

impl Manager {
    pub fn new(reaper: Reaper, hub: Arc<StreamHub>) -> Self {
        Self {
            containers: Mutex::new(HashMap::new()),
            reaper,
            hub,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Entry>> {
        self.containers.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn create(&self, id: &str, spec_json: &[u8], stdio: &Stdio) -> Result<(), ContainerError> {
        if !valid_id(id) {
            return Err(ContainerError::InvalidId(id.to_owned()));
        }
        if self.lock().contains_key(id) {
            return Err(ContainerError::Exists(id.to_owned()));
        }
        let io = |what, e: std::io::Error| ContainerError::Io {
            id: id.to_owned(),
            what,
            why: e.to_string(),
        };
        let mut spec: Spec =
            serde_json::from_slice(spec_json).map_err(|e| ContainerError::Spec {
                id: id.to_owned(),
                why: e.to_string(),
            })?;
        let rootfs = Path::new(SHARE_DIR).join(id).join("rootfs");
        match std::fs::symlink_metadata(&rootfs) {
            Ok(m) if m.is_dir() => {}
            _ => return Err(ContainerError::Rootfs(rootfs)),
        }
        let mut root = spec.root().clone().unwrap_or_default();
        root.set_path(rootfs);
        spec.set_root(Some(root));
        // Hooks would run host binaries; they have no meaning in the guest.
        spec.set_hooks(None);
        let bundle = Path::new(BUNDLE_DIR).join(id);
        std::fs::create_dir_all(&bundle).map_err(|e| io("create bundle", e))?;
        let json = serde_json::to_vec(&spec).map_err(|e| ContainerError::Spec {
            id: id.to_owned(),
            why: e.to_string(),
        })?;
        std::fs::write(bundle.join("config.json"), json).map_err(|e| io("write config.json", e))?;
        std::fs::create_dir_all(STATE_DIR).map_err(|e| io("create state dir", e))?;

        // Streams first: the host has opened them before this call.
        let deadline = Instant::now() + STREAM_TIMEOUT;
        let claim = |kind: StreamKind, wanted: bool| -> Result<Option<File>, ContainerError> {
            if !wanted {
                return Ok(None);
            }
            let h = StreamHeader {
                container_id: id.to_owned(),
                exec_id: None,
                kind,
            };
            self.hub
                .claim(&h, deadline)
                .map(Some)
                .ok_or(ContainerError::StreamMissing {
                    id: id.to_owned(),
                    stream: kind.as_str(),
                    timeout: STREAM_TIMEOUT,
                })
        };
        let conns = [
            claim(StreamKind::Stdin, stdio.stdin)?,
            claim(StreamKind::Stdout, stdio.stdout)?,
            claim(StreamKind::Stderr, stdio.stderr)?,
        ];
        let null = || File::options().read(true).write(true).open("/dev/null");
        let mut pumps = Vec::new();
        let mut stdin_conn = None;
        let mut fds: Vec<OwnedFd> = Vec::new();
        for (i, conn) in conns.into_iter().enumerate() {
            let fd: OwnedFd = match conn {
                None => null().map_err(|e| io("open /dev/null", e))?.into(),
                Some(conn) => {
                    let (r, w) = nix::unistd::pipe().map_err(|e| io("pipe", e.into()))?;
                    if i == 0 {
                        stdin_conn = conn.try_clone().ok();
                        drop(pump("stdin", conn, File::from(w)));
                        r
                    } else {
                        pumps.push(pump(
                            if i == 1 { "stdout" } else { "stderr" },
                            File::from(r),
                            conn,
                        ));
                        w
                    }
                }
            };
            fds.push(fd);
        }
        let mut fds = fds.into_iter();
        let (stdin, stdout, stderr) = (
            fds.next().expect("3"),
            fds.next().expect("3"),
            fds.next().expect("3"),
        );

        let built = {
            let _no_reaping = self.reaper.hold();
            ContainerBuilder::new(id.to_owned(), SyscallType::default())
                .with_root_path(STATE_DIR)
                .and_then(|b| b.validate_id())
                .map(|b| b.with_stdin(stdin).with_stdout(stdout).with_stderr(stderr))
                .and_then(|b| {
                    b.as_init(&bundle)
                        .with_systemd(false)
                        .with_detach(true)
                        .build()
                })
        };
        let container = built.map_err(|e| ContainerError::Runtime {
            id: id.to_owned(),
            why: e.to_string(),
        })?;
        let pid = container.pid().map(|p| p.as_raw());
        tracing::debug!(container = id, ?pid, "created");
        let exit = Arc::new(Exit::default());
        if let Some(pid) = pid {
            // Registered before start: the init cannot exit unnoticed.
            let rx = self.reaper.watch(pid);
            let exit = exit.clone();
            std::thread::spawn(move || {
                if let Ok(ws) = rx.recv() {
                    exit.set(exit_status(ws).unwrap_or(255));
                }
            });
        }
        self.lock().insert(
            id.to_owned(),
            Entry {
                container,
                pid,
                exit,
                pumps,
                stdin_conn,
            },
        );
        Ok(())
    }

    pub fn start(&self, id: &str) -> Result<u32, ContainerError> {
        let mut map = self.lock();
        let entry = map
            .get_mut(id)
            .ok_or_else(|| ContainerError::NotFound(id.to_owned()))?;
        entry
            .container
            .start()
            .map_err(|e| ContainerError::Runtime {
                id: id.to_owned(),
                why: e.to_string(),
            })?;
        entry
            .pid
            .map(|p| p as u32)
            .ok_or_else(|| ContainerError::NotStarted(id.to_owned()))
    }

    /// Waits for the init process to exit and its output to drain.
    pub fn wait(&self, id: &str) -> Result<u32, ContainerError> {
        let (exit, pumps) = {
            let mut map = self.lock();
            let entry = map
                .get_mut(id)
                .ok_or_else(|| ContainerError::NotFound(id.to_owned()))?;
            (entry.exit.clone(), std::mem::take(&mut entry.pumps))
        };
        tracing::debug!(container = id, "waiting");
        let status = exit.wait();
        tracing::debug!(container = id, status, "exited");
        let deadline = Instant::now() + DRAIN_TIMEOUT;
        for p in pumps {
            while !p.is_finished() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(2));
            }
            if p.is_finished() {
                let _ = p.join();
            }
        }
        Ok(status)
    }

    pub fn signal(&self, id: &str, signal: u32, all: bool) -> Result<(), ContainerError> {
        let sig = nix::sys::signal::Signal::try_from(signal as i32).map_err(|_| {
            ContainerError::Runtime {
                id: id.to_owned(),
                why: format!("invalid signal {signal}"),
            }
        })?;
        let map = self.lock();
        let entry = map
            .get(id)
            .ok_or_else(|| ContainerError::NotFound(id.to_owned()))?;
        let pid = entry
            .pid
            .ok_or_else(|| ContainerError::NotStarted(id.to_owned()))?;
        if all {
            if let Ok(procs) = std::fs::read_to_string(cgroup_procs(&entry.container)) {
                for p in procs.lines().filter_map(|l| l.trim().parse::<i32>().ok()) {
                    let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(p), sig);
                }
            }
        }
        match nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), sig) {
            Ok(()) | Err(nix::Error::ESRCH) => Ok(()),
            Err(e) => Err(ContainerError::Runtime {
                id: id.to_owned(),
                why: format!("kill: {e}"),
            }),
        }
    }

    /// Kills what is left of the container and removes it.
    pub fn remove(&self, id: &str) -> Result<(), ContainerError> {
        let mut entry = self
            .lock()
            .remove(id)
            .ok_or_else(|| ContainerError::NotFound(id.to_owned()))?;
        self.hub.discard(id);
        if let Some(c) = entry.stdin_conn.take() {
            let _ = nix::sys::socket::shutdown(c.as_raw_fd(), nix::sys::socket::Shutdown::Both);
        }
        if let Some(pid) = entry.pid {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
            let _ = entry.exit.wait();
        }
        let result = {
            let _no_reaping = self.reaper.hold();
            entry.container.delete(true)
        };
        let _ = std::fs::remove_dir_all(Path::new(BUNDLE_DIR).join(id));
        result.map_err(|e| ContainerError::Runtime {
            id: id.to_owned(),
            why: e.to_string(),
        })
    }
}

fn cgroup_procs(c: &Container) -> PathBuf {
    let path = c
        .spec()
        .ok()
        .and_then(|s| s.cgroup_path.to_str().map(str::to_owned))
        .unwrap_or_default();
    Path::new("/sys/fs/cgroup")
        .join(path.trim_start_matches('/'))
        .join("cgroup.procs")
}
