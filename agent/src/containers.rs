//! Containers in the guest, built by youki's libcontainer from the OCI spec
//! the host forwards. The rootfs is always `<share>/<id>/rootfs`; the spec's
//! own root path is ignored (the host's path means nothing here).
//!
//! Each container has its init process and any number of exec processes;
//! each process has its own stdio streams (see `stdio.rs`) and, in terminal
//! mode, a pty whose master stays in the agent.

use std::collections::HashMap;
use std::fs::File;
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::sync::mpsc::Receiver;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use husk_protocol::containers::{Network, StatsResponse, Stdio};
use husk_protocol::{StreamHeader, StreamKind};
use libcontainer::container::Container;
use libcontainer::oci_spec::runtime::{LinuxResources, Process, Spec};
use nix::sys::wait::WaitStatus;

use crate::cgroup;
use crate::init::SHARE_DIR;
use crate::reaper::Reaper;
use crate::stdio::{pump, StreamHub};
use crate::volumes::{VolumeError, Volumes};
use crate::zygote::{Kind, Request, Zygote};

/// libcontainer's state directory.
const STATE_DIR: &str = "/run/husk/containers";
/// Bundles (config.json, exec process.json) written for libcontainer.
const BUNDLE_DIR: &str = "/run/husk/bundles";
/// Console sockets on which libcontainer hands over pty masters.
const CONSOLE_DIR: &str = "/run/husk/console";
/// How long a create or exec waits for the host's stdio streams, at most.
const STREAM_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the agent waits for libcontainer to hand over a pty master.
const CONSOLE_TIMEOUT: Duration = Duration::from_secs(10);
/// After the process exits, how long output may still drain (a daemonised
/// child holding stdout open must not hang Wait forever).
const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);
/// Most exec processes one container may have at once.
const MAX_EXECS: usize = 64;

/// How long a create or exec may wait for its stdio streams, given the
/// timeout the host set on the call (ttrpc's `timeout_nano`, 0 for none):
/// that timeout less a second (less half of it when it is under two
/// seconds), so that a late stream comes back to the host as "stdio X did
/// not arrive" while the host still listens, rather than as the host's own
/// anonymous RPC timeout; never more than [`STREAM_TIMEOUT`].
pub fn stream_wait(rpc_timeout_nano: i64) -> Duration {
    match u64::try_from(rpc_timeout_nano) {
        Ok(n) if n > 0 => {
            let host = Duration::from_nanos(n);
            let margin = (host / 2).min(Duration::from_secs(1));
            STREAM_TIMEOUT.min(host - margin)
        }
        _ => STREAM_TIMEOUT,
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ContainerError {
    #[error(transparent)]
    InvalidId(#[from] husk_protocol::InvalidId),
    #[error("{0} already exists")]
    Exists(String),
    #[error("{0} not found")]
    NotFound(String),
    #[error("spec of container {id} is not valid: {why}")]
    Spec { id: String, why: String },
    #[error("rootfs {0} is missing or not a directory")]
    Rootfs(PathBuf),
    #[error("stdio {stream} of {id} did not arrive within {timeout:?}")]
    StreamMissing {
        id: String,
        stream: &'static str,
        timeout: Duration,
    },
    #[error("container {id}: {what}")]
    Io {
        id: String,
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
    /// What the zygote or libcontainer's console hand-over said: text, from
    /// across a process boundary, or a refusal of our own.
    #[error("container {id}: {why}")]
    Runtime { id: String, why: String },
    /// A step that failed with an error of its own (libcontainer's, the
    /// network's), kept as the source: the host receives the whole chain.
    #[error("container {id}: {what}")]
    Failed {
        id: String,
        what: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("container {id} has {MAX_EXECS} exec processes already")]
    TooManyExecs { id: String },
    #[error("container {id}: {source}")]
    Volume {
        id: String,
        #[source]
        source: VolumeError,
    },
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

    fn get(&self) -> Option<u32> {
        *self.status.lock().unwrap_or_else(|e| e.into_inner())
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

/// One process of a container: its init or an exec.
struct Proc {
    pid: i32,
    exit: Arc<Exit>,
    /// Output copies; Wait drains them. (The stdin copy ends when the host
    /// closes its side, which it may never do.)
    pumps: Vec<crate::stdio::Pump>,
    /// The stdin connection, shut down on removal to end its copy.
    stdin_conn: Option<File>,
    /// The pty master, in terminal mode, for resizing.
    pty: Option<File>,
}

impl Proc {
    fn kill(&self) {
        if self.exit.get().is_none() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(self.pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }

    fn close_stdin(&mut self) {
        if let Some(c) = self.stdin_conn.take() {
            let _ = nix::sys::socket::shutdown(c.as_raw_fd(), nix::sys::socket::Shutdown::Both);
        }
    }
}

struct Entry {
    container: Container,
    /// Created but not yet started processes have a pid already.
    init: Proc,
    started: bool,
    execs: HashMap<String, Proc>,
    /// The container's cgroup, absolute.
    cgroup: PathBuf,
    /// A pipe whose write end lives and dies with this entry: WaitOom
    /// calls hold a copy of the read end, which hangs up on removal.
    gone: (std::io::PipeReader, std::io::PipeWriter),
}

/// What a created container's network namespace needs from the agent.
enum NetnsSetup<'a> {
    /// It joins one that exists.
    Joined,
    /// It is new: loopback up, and the pod's NICs for a pod sandbox; the
    /// sysctls the spec sets (which the pod's copy leaves to the spec).
    New(Option<&'a Network>, Vec<String>),
}

/// All containers of this guest.
pub struct Manager {
    containers: Mutex<HashMap<String, Entry>>,
    reaper: Reaper,
    hub: Arc<StreamHub>,
    zygote: Zygote,
    volumes: Volumes,
}

/// Exit status as runc reports it.
pub fn exit_status(ws: WaitStatus) -> Option<u32> {
    match ws {
        WaitStatus::Exited(_, code) => Some(code as u32),
        WaitStatus::Signaled(_, sig, _) => Some(128 + sig as u32),
        _ => None,
    }
}

/// How a process's stdio is wired before libcontainer builds it.
enum Wiring {
    /// Pipes: the ends the process gets; the copies already run.
    Pipes {
        fds: [OwnedFd; 3],
        pumps: Vec<crate::stdio::Pump>,
        stdin_conn: Option<File>,
    },
    /// A pty: libcontainer connects to the console socket and sends the
    /// master, which is wired to the streams afterwards.
    Pty {
        listener: UnixListener,
        path: PathBuf,
        stdin: Option<File>,
        stdout: Option<File>,
    },
}

/// Names the process for errors and stream headers.
fn label(id: &str, exec_id: Option<&str>) -> String {
    match exec_id {
        Some(e) => format!("exec {e} of container {id}"),
        None => format!("container {id}"),
    }
}

impl Manager {
    pub fn new(reaper: Reaper, hub: Arc<StreamHub>, zygote: Zygote) -> Self {
        Self {
            containers: Mutex::new(HashMap::new()),
            reaper,
            hub,
            zygote,
            volumes: Volumes::default(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Entry>> {
        self.containers.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Claims the process's streams and prepares pipes or a console socket.
    fn wire(
        &self,
        id: &str,
        exec_id: Option<&str>,
        stdio: &Stdio,
        terminal: bool,
        stream_wait: Duration,
    ) -> Result<Wiring, ContainerError> {
        let io = |what, e: std::io::Error| ContainerError::Io {
            id: id.to_owned(),
            what,
            source: e,
        };
        if terminal && stdio.stderr {
            return Err(ContainerError::Spec {
                id: id.to_owned(),
                why: "a terminal process has no separate stderr stream".into(),
            });
        }
        // The host has opened the streams before this call.
        let deadline = Instant::now() + stream_wait;
        let claim = |kind: StreamKind, wanted: bool| -> Result<Option<File>, ContainerError> {
            if !wanted {
                return Ok(None);
            }
            let h = StreamHeader {
                container_id: id.to_owned(),
                exec_id: exec_id.map(str::to_owned),
                kind,
            };
            self.hub
                .claim(&h, deadline)
                .map(Some)
                .ok_or(ContainerError::StreamMissing {
                    id: label(id, exec_id),
                    stream: kind.as_str(),
                    timeout: stream_wait,
                })
        };
        let stdin = claim(StreamKind::Stdin, stdio.stdin)?;
        let stdout = claim(StreamKind::Stdout, stdio.stdout)?;
        let stderr = claim(StreamKind::Stderr, stdio.stderr)?;

        if terminal {
            std::fs::create_dir_all(CONSOLE_DIR).map_err(|e| io("create console dir", e))?;
            // Numbered, not named after the ids: a CRI container id and
            // exec id are 64 characters each, and a socket path must fit
            // in 108 bytes.
            static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
            let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let path = Path::new(CONSOLE_DIR).join(format!("{n}.sock"));
            let _ = std::fs::remove_file(&path);
            let listener = UnixListener::bind(&path).map_err(|e| io("bind console socket", e))?;
            return Ok(Wiring::Pty {
                listener,
                path,
                stdin,
                stdout,
            });
        }

        let null = || File::options().read(true).write(true).open("/dev/null");
        let mut pumps = Vec::new();
        let mut stdin_conn = None;
        let mut fds: Vec<OwnedFd> = Vec::new();
        for (i, conn) in [stdin, stdout, stderr].into_iter().enumerate() {
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
        let fds: [OwnedFd; 3] = fds.try_into().map_err(|_| ContainerError::Runtime {
            id: id.to_owned(),
            why: "stdio wiring".into(),
        })?;
        Ok(Wiring::Pipes {
            fds,
            pumps,
            stdin_conn,
        })
    }

    /// Has the zygote build a process of container `id` with the wiring's
    /// stdio or console socket, and registers it with the reaper before the
    /// reaper can run again: an exec'd process may exit at once and raises
    /// no SIGCHLD, and a status reaped unseen would leave its Wait hanging.
    fn build(
        &self,
        id: &str,
        kind: Kind,
        wiring: &Wiring,
    ) -> Result<(i32, Receiver<WaitStatus>), ContainerError> {
        let (console, fds): (_, Vec<RawFd>) = match wiring {
            Wiring::Pipes { fds, .. } => (None, fds.iter().map(AsRawFd::as_raw_fd).collect()),
            Wiring::Pty { path, .. } => (Some(path.clone()), Vec::new()),
        };
        let req = Request {
            id: id.to_owned(),
            state_dir: STATE_DIR.into(),
            kind,
            console,
        };
        let _no_reaping = self.reaper.hold();
        let pid = self
            .zygote
            .build(&req, &fds)
            .map_err(|why| ContainerError::Runtime {
                id: id.to_owned(),
                why,
            })?;
        Ok((pid, self.reaper.watch(pid)))
    }

    /// Finishes the wiring once the process exists. `rx` is the reaper's
    /// word on its exit, registered before the reaper could run again.
    fn finish(
        &self,
        id: &str,
        pid: i32,
        rx: Receiver<WaitStatus>,
        wiring: Wiring,
    ) -> Result<Proc, ContainerError> {
        let exit = Arc::new(Exit::default());
        {
            let exit = exit.clone();
            std::thread::spawn(move || {
                if let Ok(ws) = rx.recv() {
                    exit.set(exit_status(ws).unwrap_or(255));
                }
            });
        }
        match wiring {
            Wiring::Pipes {
                pumps, stdin_conn, ..
            } => Ok(Proc {
                pid,
                exit,
                pumps,
                stdin_conn,
                pty: None,
            }),
            Wiring::Pty {
                listener,
                path,
                stdin,
                stdout,
            } => {
                let master = receive_pty(&listener, CONSOLE_TIMEOUT);
                drop(listener);
                let _ = std::fs::remove_file(&path);
                let master = master.map_err(|e| ContainerError::Io {
                    id: id.to_owned(),
                    what: "receiving the pty master",
                    source: e,
                })?;
                let io = |e: std::io::Error| ContainerError::Io {
                    id: id.to_owned(),
                    what: "dup pty master",
                    source: e,
                };
                let mut pumps = Vec::new();
                if let Some(out) = stdout {
                    pumps.push(pump("pty-out", master.try_clone().map_err(io)?, out));
                }
                let mut stdin_conn = None;
                if let Some(input) = stdin {
                    stdin_conn = input.try_clone().ok();
                    drop(pump("pty-in", input, master.try_clone().map_err(io)?));
                }
                Ok(Proc {
                    pid,
                    exit,
                    pumps,
                    stdin_conn,
                    pty: Some(master),
                })
            }
        }
    }

    /// Creates a container; `stream_wait` bounds the wait for its stdio
    /// streams (see [`stream_wait`]).
    pub fn create(
        &self,
        id: &str,
        spec_json: &[u8],
        stdio: &Stdio,
        network: Option<&Network>,
        synced_volumes: &[u32],
        stream_wait: Duration,
    ) -> Result<(), ContainerError> {
        husk_protocol::validate_id("container", id)?;
        if self.lock().contains_key(id) {
            return Err(ContainerError::Exists(format!("container {id}")));
        }
        let io = |what, e: std::io::Error| ContainerError::Io {
            id: id.to_owned(),
            what,
            source: e,
        };
        let spec_error = |why: String| ContainerError::Spec {
            id: id.to_owned(),
            why,
        };
        let mut spec: Spec =
            serde_json::from_slice(spec_json).map_err(|e| spec_error(e.to_string()))?;
        let mut process = spec
            .process()
            .clone()
            .ok_or_else(|| spec_error("it has no process".into()))?;
        crate::tenant::normalize_no_new_privileges(&mut process);
        let terminal = process.terminal().unwrap_or(false);
        // A network namespace the container gets new (no path to join).
        let new_netns = spec
            .linux()
            .as_ref()
            .and_then(|l| l.namespaces().as_ref())
            .is_some_and(|ns| {
                ns.iter().any(|n| {
                    n.typ() == libcontainer::oci_spec::runtime::LinuxNamespaceType::Network
                        && n.path().is_none()
                })
            });
        let rootfs = Path::new(SHARE_DIR).join(id).join("rootfs");
        match std::fs::symlink_metadata(&rootfs) {
            Ok(m) if m.is_dir() => {}
            _ => return Err(ContainerError::Rootfs(rootfs)),
        }
        if let Some(seccomp) = spec.linux().as_ref().and_then(|l| l.seccomp().as_ref()) {
            crate::tenant::check_seccomp(seccomp).map_err(spec_error)?;
        }
        crate::tenant::default_home(&mut process, &rootfs);
        spec.set_process(Some(process));
        if let Err(e) = self.copy_synced_volumes(id, &mut spec, synced_volumes) {
            self.volumes.remove(id);
            return Err(e);
        }
        let mut root = spec.root().clone().unwrap_or_default();
        root.set_path(rootfs);
        spec.set_root(Some(root));
        // Hooks would run host binaries; they have no meaning in the guest.
        spec.set_hooks(None);
        let bundle = Path::new(BUNDLE_DIR).join(id);
        std::fs::create_dir_all(&bundle).map_err(|e| io("create bundle", e))?;
        let json = serde_json::to_vec(&spec).map_err(|e| spec_error(e.to_string()))?;
        // runc applies the spec's sysctls after CNI configured the
        // namespace: they win over the pod network's copy.
        let spec_sysctls: Vec<String> = spec
            .linux()
            .as_ref()
            .and_then(|l| l.sysctl().as_ref())
            .map(|m| m.keys().cloned().collect())
            .unwrap_or_default();
        let created = std::fs::write(bundle.join("config.json"), json)
            .map_err(|e| io("write config.json", e))
            .and_then(|()| {
                let netns = match (new_netns, network) {
                    (true, network) => NetnsSetup::New(network, spec_sysctls.clone()),
                    (false, None) => NetnsSetup::Joined,
                    (false, Some(_)) => {
                        return Err(spec_error(
                            "a pod network is given, but the spec joins a network namespace instead of making one".into(),
                        ))
                    }
                };
                self.create_init(id, &bundle, stdio, terminal, netns, stream_wait)
            });
        if created.is_err() {
            // Nothing of a refused create stays: its bundle, its volume
            // copies, and streams the host opened for it that arrive late.
            let _ = std::fs::remove_dir_all(&bundle);
            self.volumes.remove(id);
            self.hub.discard(id);
        }
        created
    }

    /// Points each mount of a synced volume at a guest copy of it (see
    /// volumes.rs).
    fn copy_synced_volumes(
        &self,
        id: &str,
        spec: &mut Spec,
        synced: &[u32],
    ) -> Result<(), ContainerError> {
        let binds = Path::new(SHARE_DIR).join(id).join("binds");
        let mut mounts = spec.mounts().clone().unwrap_or_default();
        for &n in synced {
            let shared = binds.join(n.to_string());
            let mount = mounts
                .iter_mut()
                .find(|m| m.source().as_deref() == Some(shared.as_path()))
                .ok_or_else(|| ContainerError::Spec {
                    id: id.to_owned(),
                    why: format!("synced volume {n} is not the source of any mount"),
                })?;
            let copy = self
                .volumes
                .add(id, n)
                .map_err(|source| ContainerError::Volume {
                    id: id.to_owned(),
                    source,
                })?;
            mount.set_source(Some(copy));
        }
        spec.set_mounts(Some(mounts));
        Ok(())
    }

    /// Brings container `id`'s synced volume `n` to data directory `name`.
    pub fn sync_volume(&self, id: &str, n: u32, name: &str) -> Result<(), ContainerError> {
        self.volumes
            .update(id, n, name)
            .map_err(|source| match source {
                VolumeError::NotFound(v) => ContainerError::NotFound(format!("volume {v}")),
                source => ContainerError::Volume {
                    id: id.to_owned(),
                    source,
                },
            })
    }

    /// The part of [`Manager::create`] after the bundle is written: wires
    /// stdio, has libcontainer create the container and registers it. A
    /// container created but not registered is deleted again.
    fn create_init(
        &self,
        id: &str,
        bundle: &Path,
        stdio: &Stdio,
        terminal: bool,
        netns: NetnsSetup<'_>,
        stream_wait: Duration,
    ) -> Result<(), ContainerError> {
        std::fs::create_dir_all(STATE_DIR).map_err(|e| ContainerError::Io {
            id: id.to_owned(),
            what: "create state dir",
            source: e,
        })?;
        let wiring = self.wire(id, None, stdio, terminal, stream_wait)?;
        let (pid, rx) = self.build(
            id,
            Kind::Init {
                bundle: bundle.to_path_buf(),
            },
            &wiring,
        )?;
        let loaded =
            Container::load(Path::new(STATE_DIR).join(id)).map_err(|e| ContainerError::Failed {
                id: id.to_owned(),
                what: "loading the created container".into(),
                source: e.into(),
            });
        let mut container = match loaded {
            Ok(c) => c,
            Err(e) => {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
                return Err(e);
            }
        };
        tracing::debug!(container = id, pid, "created");
        let registered = self.finish(id, pid, rx, wiring).and_then(|init| {
            let gone = std::io::pipe().map_err(|e| ContainerError::Io {
                id: id.to_owned(),
                what: "removal pipe",
                source: e,
            })?;
            let NetnsSetup::New(network, spec_sysctls) = netns else {
                return Ok((init, gone));
            };
            if let Err(e) = crate::net::loopback_up(init.pid) {
                tracing::error!("container {id}: bringing up lo in its network namespace: {e}");
            }
            // The pod's NICs, before anything of the pod starts.
            if let Some(net) = network {
                let t = std::time::Instant::now();
                crate::net::configure(init.pid, net, &spec_sysctls).map_err(|e| {
                    ContainerError::Failed {
                        id: id.to_owned(),
                        what: "configuring the pod network".into(),
                        source: e.into(),
                    }
                })?;
                tracing::info!(
                    "container {id}: pod network configured in {:.1} ms ({} NICs)",
                    t.elapsed().as_secs_f64() * 1e3,
                    net.interfaces.len()
                );
            }
            Ok((init, gone))
        });
        let (init, gone) = match registered {
            Ok(r) => r,
            Err(e) => {
                let _no_reaping = self.reaper.hold();
                let _ = container.delete(true);
                return Err(e);
            }
        };
        let cgroup = cgroup::container_path(&container);
        self.lock().insert(
            id.to_owned(),
            Entry {
                container,
                init,
                started: false,
                execs: HashMap::new(),
                cgroup,
                gone,
            },
        );
        Ok(())
    }

    pub fn start(&self, id: &str) -> Result<u32, ContainerError> {
        let mut map = self.lock();
        let entry = map
            .get_mut(id)
            .ok_or_else(|| ContainerError::NotFound(format!("container {id}")))?;
        entry
            .container
            .start()
            .map_err(|e| ContainerError::Failed {
                id: id.to_owned(),
                what: "starting".into(),
                source: e.into(),
            })?;
        entry.started = true;
        Ok(entry.init.pid as u32)
    }

    /// Creates and starts an exec process in a running container.
    pub fn exec(
        &self,
        id: &str,
        exec_id: &str,
        process_json: &[u8],
        stdio: &Stdio,
        stream_wait: Duration,
    ) -> Result<u32, ContainerError> {
        husk_protocol::validate_id("exec", exec_id)?;
        let process: Process =
            serde_json::from_slice(process_json).map_err(|e| ContainerError::Spec {
                id: id.to_owned(),
                why: format!("exec {exec_id}: {e}"),
            })?;
        {
            let map = self.lock();
            let entry = map
                .get(id)
                .ok_or_else(|| ContainerError::NotFound(format!("container {id}")))?;
            if !entry.started || entry.init.exit.get().is_some() {
                return Err(ContainerError::Runtime {
                    id: id.to_owned(),
                    why: format!("cannot exec {exec_id}: the container is not running"),
                });
            }
            if entry.execs.contains_key(exec_id) {
                return Err(ContainerError::Exists(label(id, Some(exec_id))));
            }
            if entry.execs.len() >= MAX_EXECS {
                return Err(ContainerError::TooManyExecs { id: id.to_owned() });
            }
        }
        let terminal = process.terminal().unwrap_or(false);
        let wiring = self.wire(id, Some(exec_id), stdio, terminal, stream_wait)?;
        let path = Path::new(BUNDLE_DIR)
            .join(id)
            .join(format!("exec-{exec_id}.json"));
        std::fs::write(&path, process_json).map_err(|e| ContainerError::Io {
            id: id.to_owned(),
            what: "write exec process.json",
            source: e,
        })?;
        let built = self.build(
            id,
            Kind::Exec {
                process: path.clone(),
                bundle: Path::new(BUNDLE_DIR).join(id),
            },
            &wiring,
        );
        let _ = std::fs::remove_file(&path);
        let (pid, rx) = built.map_err(|e| match e {
            ContainerError::Runtime { id, why } => ContainerError::Runtime {
                id,
                why: format!("exec {exec_id}: {why}"),
            },
            ContainerError::Failed { id, what, source } => ContainerError::Failed {
                id,
                what: format!("exec {exec_id}: {what}"),
                source,
            },
            other => other,
        })?;
        tracing::debug!(container = id, exec = exec_id, pid, "exec started");
        let proc = self.finish(id, pid, rx, wiring)?;
        let mut map = self.lock();
        match map.get_mut(id) {
            Some(entry) => {
                entry.execs.insert(exec_id.to_owned(), proc);
                Ok(pid as u32)
            }
            None => {
                proc.kill();
                Err(ContainerError::NotFound(format!("container {id}")))
            }
        }
    }

    /// Runs `f` on a process of a container.
    fn with_proc<T>(
        &self,
        id: &str,
        exec_id: Option<&str>,
        f: impl FnOnce(&mut Proc) -> T,
    ) -> Result<T, ContainerError> {
        let mut map = self.lock();
        let entry = map
            .get_mut(id)
            .ok_or_else(|| ContainerError::NotFound(format!("container {id}")))?;
        let proc = match exec_id {
            None => &mut entry.init,
            Some(e) => entry
                .execs
                .get_mut(e)
                .ok_or_else(|| ContainerError::NotFound(label(id, Some(e))))?,
        };
        Ok(f(proc))
    }

    /// Waits for a process to exit and its output to drain.
    pub fn wait(&self, id: &str, exec_id: Option<&str>) -> Result<u32, ContainerError> {
        let (exit, pumps) = self.with_proc(id, exec_id, |p| {
            (p.exit.clone(), std::mem::take(&mut p.pumps))
        })?;
        let status = exit.wait();
        tracing::debug!(container = id, exec = exec_id, status, "exited");
        let deadline = Instant::now() + DRAIN_TIMEOUT;
        for p in pumps {
            p.finish_by(deadline);
        }
        Ok(status)
    }

    pub fn signal(
        &self,
        id: &str,
        exec_id: Option<&str>,
        signal: u32,
        all: bool,
    ) -> Result<(), ContainerError> {
        let sig = nix::sys::signal::Signal::try_from(signal as i32).map_err(|_| {
            ContainerError::Runtime {
                id: id.to_owned(),
                why: format!("invalid signal {signal}"),
            }
        })?;
        if all && exec_id.is_none() {
            let cg = self
                .lock()
                .get(id)
                .map(|e| e.cgroup.clone())
                .ok_or_else(|| ContainerError::NotFound(format!("container {id}")))?;
            for p in cgroup::pids(&cg) {
                let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(p as i32), sig);
            }
        }
        let (pid, exited) = self.with_proc(id, exec_id, |p| (p.pid, p.exit.get().is_some()))?;
        if exited {
            return Ok(());
        }
        match nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), sig) {
            Ok(()) | Err(nix::Error::ESRCH) => Ok(()),
            Err(e) => Err(ContainerError::Failed {
                id: id.to_owned(),
                what: format!("signal {sig}"),
                source: e.into(),
            }),
        }
    }

    pub fn resize(
        &self,
        id: &str,
        exec_id: Option<&str>,
        width: u32,
        height: u32,
    ) -> Result<(), ContainerError> {
        let cap = |v: u32| v.min(u16::MAX as u32) as u16;
        let ws = libc::winsize {
            ws_row: cap(height),
            ws_col: cap(width),
            ws_xpixel: 0,
            ws_ypixel: 0,
        };
        self.with_proc(id, exec_id, |p| match &p.pty {
            None => Err(ContainerError::Runtime {
                id: id.to_owned(),
                why: format!("{} has no terminal", label(id, exec_id)),
            }),
            // SAFETY: TIOCSWINSZ reads one winsize from the pointer, which
            // lives across the call.
            Some(m) => match unsafe { libc::ioctl(m.as_raw_fd(), libc::TIOCSWINSZ, &ws) } {
                0 => Ok(()),
                _ => Err(ContainerError::Io {
                    id: id.to_owned(),
                    what: "resize pty",
                    source: std::io::Error::last_os_error(),
                }),
            },
        })?
    }

    /// Forgets an exec process, killing it first if it still runs.
    pub fn remove_exec(&self, id: &str, exec_id: &str) -> Result<(), ContainerError> {
        let mut proc = {
            let mut map = self.lock();
            let entry = map
                .get_mut(id)
                .ok_or_else(|| ContainerError::NotFound(format!("container {id}")))?;
            entry
                .execs
                .remove(exec_id)
                .ok_or_else(|| ContainerError::NotFound(label(id, Some(exec_id))))?
        };
        proc.close_stdin();
        proc.kill();
        Ok(())
    }

    pub fn pause(&self, id: &str) -> Result<(), ContainerError> {
        self.with_container(id, "pausing", |c| c.pause())
    }

    pub fn resume(&self, id: &str) -> Result<(), ContainerError> {
        self.with_container(id, "resuming", |c| c.resume())
    }

    fn with_container(
        &self,
        id: &str,
        what: &str,
        f: impl FnOnce(&mut Container) -> Result<(), libcontainer::error::LibcontainerError>,
    ) -> Result<(), ContainerError> {
        let mut map = self.lock();
        let entry = map
            .get_mut(id)
            .ok_or_else(|| ContainerError::NotFound(format!("container {id}")))?;
        f(&mut entry.container).map_err(|e| ContainerError::Failed {
            id: id.to_owned(),
            what: what.to_owned(),
            source: e.into(),
        })
    }

    fn cgroup_of(&self, id: &str) -> Result<PathBuf, ContainerError> {
        self.lock()
            .get(id)
            .map(|e| e.cgroup.clone())
            .ok_or_else(|| ContainerError::NotFound(format!("container {id}")))
    }

    /// The guest pid of container `id`'s init process, while it runs.
    pub fn running_init(&self, id: &str) -> Result<i32, ContainerError> {
        self.lock()
            .get(id)
            .filter(|e| e.started && e.init.exit.get().is_none())
            .map(|e| e.init.pid)
            .ok_or_else(|| ContainerError::NotFound(format!("running container {id}")))
    }

    pub fn processes(&self, id: &str) -> Result<Vec<u32>, ContainerError> {
        Ok(cgroup::pids(&self.cgroup_of(id)?))
    }

    pub fn stats(&self, id: &str) -> Result<StatsResponse, ContainerError> {
        cgroup::stats(&self.cgroup_of(id)?).map_err(|e| ContainerError::Io {
            id: id.to_owned(),
            what: "read cgroup statistics",
            source: e,
        })
    }

    pub fn update(&self, id: &str, resources_json: &[u8]) -> Result<(), ContainerError> {
        let resources: LinuxResources =
            serde_json::from_slice(resources_json).map_err(|e| ContainerError::Spec {
                id: id.to_owned(),
                why: format!("resources: {e}"),
            })?;
        cgroup::apply(&self.cgroup_of(id)?, &resources).map_err(|source| ContainerError::Failed {
            id: id.to_owned(),
            what: "updating resources".into(),
            source,
        })
    }

    /// Blocks until the container's cgroup counts another OOM kill (true) or
    /// the container is gone (false).
    pub fn wait_oom(&self, id: &str) -> Result<bool, ContainerError> {
        let (cg, gone) = {
            let map = self.lock();
            let entry = map
                .get(id)
                .ok_or_else(|| ContainerError::NotFound(format!("container {id}")))?;
            let gone = entry.gone.0.try_clone().map_err(|e| ContainerError::Io {
                id: id.to_owned(),
                what: "removal pipe",
                source: e,
            })?;
            (entry.cgroup.clone(), gone)
        };
        Ok(cgroup::wait_oom_kill(&cg, gone.as_fd()))
    }

    /// Kills what is left of the container and removes it.
    pub fn remove(&self, id: &str) -> Result<(), ContainerError> {
        let mut entry = self
            .lock()
            .remove(id)
            .ok_or_else(|| ContainerError::NotFound(format!("container {id}")))?;
        self.hub.discard(id);
        for p in entry.execs.values_mut() {
            p.close_stdin();
            p.kill();
        }
        entry.init.close_stdin();
        entry.init.kill();
        let _ = entry.init.exit.wait();
        let result = {
            let _no_reaping = self.reaper.hold();
            entry.container.delete(true)
        };
        let _ = std::fs::remove_dir_all(Path::new(BUNDLE_DIR).join(id));
        self.volumes.remove(id);
        result.map_err(|e| ContainerError::Failed {
            id: id.to_owned(),
            what: "removing".into(),
            source: e.into(),
        })
    }
}

/// Accepts libcontainer's connection on the console socket and receives the
/// pty master it sends.
fn receive_pty(listener: &UnixListener, timeout: Duration) -> std::io::Result<File> {
    use nix::sys::socket::{recvmsg, ControlMessageOwned, MsgFlags};
    // Readable once libcontainer connects; then accept does not block.
    let mut fds = [nix::poll::PollFd::new(
        listener.as_fd(),
        nix::poll::PollFlags::POLLIN,
    )];
    let ms = i32::try_from(timeout.as_millis()).unwrap_or(i32::MAX);
    let ready = loop {
        match nix::poll::poll(
            &mut fds,
            nix::poll::PollTimeout::try_from(ms).unwrap_or(nix::poll::PollTimeout::MAX),
        ) {
            Err(nix::errno::Errno::EINTR) => continue,
            r => break r?,
        }
    };
    if ready == 0 {
        return Err(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            format!("no connection on the console socket in {timeout:?}"),
        ));
    }
    let (conn, _) = listener.accept()?;
    conn.set_nonblocking(false)?;
    conn.set_read_timeout(Some(timeout))?;
    let mut name = [0u8; 64];
    let mut iov = [std::io::IoSliceMut::new(&mut name)];
    let mut space = nix::cmsg_space!([std::os::fd::RawFd; 1]);
    let msg = recvmsg::<()>(
        conn.as_raw_fd(),
        &mut iov,
        Some(&mut space),
        MsgFlags::MSG_CMSG_CLOEXEC,
    )
    .map_err(|e| {
        let e = std::io::Error::from(e);
        std::io::Error::new(e.kind(), format!("recvmsg: {e}"))
    })?;
    for cmsg in msg.cmsgs()? {
        if let ControlMessageOwned::ScmRights(fds) = cmsg {
            let mut owned = fds.into_iter().map(|fd| {
                // SAFETY: SCM_RIGHTS delivered fresh descriptors to this
                // process; nothing else owns them.
                unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) }
            });
            if let Some(master) = owned.next() {
                return Ok(File::from(master));
            }
        }
    }
    Err(std::io::Error::other(
        "the console socket message carried no descriptor",
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stream_wait_ends_before_the_callers_timeout_and_never_over_the_agents_own() {
        let ms = |n: u64| Duration::from_millis(n);
        assert_eq!(stream_wait(5_000_000_000), ms(4_000));
        assert_eq!(stream_wait(1_500_000_000), ms(750));
        assert_eq!(stream_wait(1_000_000), Duration::from_micros(500));
        assert_eq!(stream_wait(60_000_000_000), STREAM_TIMEOUT);
        assert_eq!(stream_wait(0), STREAM_TIMEOUT, "no timeout set by the host");
        assert_eq!(
            stream_wait(-1),
            STREAM_TIMEOUT,
            "a negative timeout is junk"
        );
    }
}
