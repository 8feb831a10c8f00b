//! The pod API: one VM and its containers, each with an init and exec
//! processes, driven through the guest agent. The shim maps containerd's
//! task API onto it one call to one method; the `husk run` CLI uses it too.
//!
//! Every method blocks (agent calls, the VM's boot); async callers run them
//! on a blocking thread. Events come out of one channel in the order they
//! happened: a process's start always before its exit, its exit only after
//! its output reached the host paths.

use super::workers::{Worker, Workers};
use std::collections::HashMap;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::mpsc::Sender;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime};

use husk_protocol::containers::StatsResponse;
use husk_protocol::{ContainerId, ExecId, SandboxId};
use oci_spec::runtime::{LinuxResources, Process, Spec};

use super::backend::{Backend, BootError, PodVm};
use super::guest::GuestAgent;
use super::stdio::{self, Io};
use super::{PodError, Role};
use crate::config::Config;
use crate::host::storage::MountSpec;
use crate::vm::agent::AgentError;

/// Exit status reported for a process that never ran or was lost.
pub const KILLED_STATUS: u32 = 128 + 9;
/// Exit status of a process whose start failed.
pub const FAILED_START_STATUS: u32 = 255;
/// How long closing stdin lets the copier drain what the client wrote.
const CLOSE_STDIN_GRACE: Duration = Duration::from_millis(500);
/// How long a failed wait waits for the VM's monitor to say why.
const VERDICT_WAIT: Duration = Duration::from_secs(1);
/// Least time between two OOM events of one container.
pub const OOM_EVENT_GAP: Duration = Duration::from_secs(1);
/// The longest an exit waits for the kills in flight on its process (each
/// ends within its RPC deadline; this only bounds a wedged one).
const KILLS_IN_FLIGHT_GRACE: Duration = Duration::from_secs(30);
/// How long a stopped pod's threads get to end (their agent calls fail
/// once the VM is gone).
const WORKERS_GRACE: Duration = Duration::from_secs(5);

/// What kind of failure an error is, for the caller's status codes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    NotFound,
    AlreadyExists,
    InvalidArgument,
    FailedPrecondition,
    ResourceExhausted,
    Internal,
}

#[derive(Debug, thiserror::Error)]
pub enum PodApiError {
    #[error("container {0} not created")]
    NoContainer(String),
    #[error("exec {exec_id} of container {id} not found")]
    NoExec { id: String, exec_id: String },
    #[error("{0} exists already")]
    Exists(String),
    #[error("exec {exec_id} has already exited")]
    ExecExited { exec_id: String },
    #[error("{0}")]
    Precondition(String),
    #[error("{pending} Waits are pending in this pod, the most it holds; wait for some to return")]
    TooManyWaits { pending: usize },
    #[error("{0}")]
    InvalidArgument(String),
    #[error(transparent)]
    Spec(#[from] PodError),
    #[error(transparent)]
    Boot(#[from] BootError),
    #[error(transparent)]
    Agent(#[from] AgentError),
}

impl PodApiError {
    /// The one mapping of failures to kinds: the agent's NOT_FOUND (a
    /// process that is gone) stays NOT_FOUND, a host that cannot do what
    /// the spec asks is a failed precondition, a spec husk refuses an
    /// invalid argument.
    pub fn kind(&self) -> ErrorKind {
        match self {
            Self::NoContainer(_) | Self::NoExec { .. } | Self::ExecExited { .. } => {
                ErrorKind::NotFound
            }
            Self::Exists(_) => ErrorKind::AlreadyExists,
            Self::TooManyWaits { .. } => ErrorKind::ResourceExhausted,
            Self::InvalidArgument(_) => ErrorKind::InvalidArgument,
            Self::Spec(PodError::Storage(_) | PodError::WatchVolume { .. }) => {
                ErrorKind::FailedPrecondition
            }
            Self::Spec(_) => ErrorKind::InvalidArgument,
            Self::Boot(BootError::Spec(PodError::Annotation { .. })) => ErrorKind::InvalidArgument,
            Self::Precondition(_) | Self::Boot(_) => ErrorKind::FailedPrecondition,
            Self::Agent(AgentError::Rpc {
                error: ttrpc::Error::RpcStatus(s),
                ..
            }) if s.code.value() == ttrpc::Code::NOT_FOUND as i32 => ErrorKind::NotFound,
            Self::Agent(_) => ErrorKind::Internal,
        }
    }
}

type Result<T, E = PodApiError> = std::result::Result<T, E>;

/// How a process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Exit {
    pub status: u32,
    pub at: SystemTime,
}

impl Exit {
    fn now(status: u32) -> Self {
        Exit {
            status,
            at: SystemTime::now(),
        }
    }
}

/// What happened in the pod, in order.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    Created {
        id: String,
        bundle: PathBuf,
        rootfs: Vec<MountSpec>,
        io: Io,
    },
    Started {
        id: String,
        pid: u32,
    },
    ExecAdded {
        id: String,
        exec_id: String,
    },
    ExecStarted {
        id: String,
        exec_id: String,
        pid: u32,
    },
    /// `exec_id` is empty for the init.
    Exited {
        id: String,
        exec_id: String,
        pid: u32,
        exit: Exit,
    },
    Oom {
        id: String,
    },
    Paused {
        id: String,
    },
    Resumed {
        id: String,
    },
    Deleted {
        id: String,
        pid: u32,
        exit: Exit,
    },
}

/// A process's lifecycle as containerd names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    Created,
    Running,
    Paused,
    Stopped,
}

/// A process's state.
#[derive(Debug, Clone, PartialEq)]
pub struct ProcessState {
    pub bundle: PathBuf,
    pub pid: u32,
    pub status: Status,
    pub io: Io,
    pub exit: Option<Exit>,
}

/// What a create needs.
#[derive(Debug, Clone)]
pub struct CreateRequest {
    pub id: ContainerId,
    pub bundle: PathBuf,
    /// The bundle's OCI spec.
    pub spec: Spec,
    /// containerd's rootfs mounts (empty: the spec's root path as is).
    pub rootfs: Vec<MountSpec>,
    pub io: Io,
    /// The husk config a VM this create boots uses.
    pub config: Config,
}

/// Where a process's exit is published to waiters.
#[derive(Default)]
struct ExitCell {
    exit: Mutex<Option<Exit>>,
    cv: Condvar,
    /// Waits blocked on the cell (tests hold a deletion until theirs is).
    waiting: std::sync::atomic::AtomicUsize,
}

impl ExitCell {
    /// Sets the exit unless one is there (a deleted process's stays).
    fn set_once(&self, exit: Exit) {
        let mut g = self.exit.lock().unwrap_or_else(|e| e.into_inner());
        if g.is_none() {
            *g = Some(exit);
            self.cv.notify_all();
        }
    }

    /// The exit, once there or when `timeout` has passed (None).
    fn wait_for(&self, timeout: Duration) -> Option<Exit> {
        let g = self.exit.lock().unwrap_or_else(|e| e.into_inner());
        let (g, _) = self
            .cv
            .wait_timeout_while(g, timeout, |e| e.is_none())
            .unwrap_or_else(|e| e.into_inner());
        *g
    }

    fn wait(&self) -> Exit {
        use std::sync::atomic::Ordering;
        let mut g = self.exit.lock().unwrap_or_else(|e| e.into_inner());
        self.waiting.fetch_add(1, Ordering::SeqCst);
        let exit = loop {
            if let Some(e) = *g {
                break e;
            }
            g = self.cv.wait(g).unwrap_or_else(|e| e.into_inner());
        };
        self.waiting.fetch_sub(1, Ordering::SeqCst);
        exit
    }
}

/// One process of a container: its init or an exec.
struct Proc {
    io: Io,
    pid: u32,
    exit: Option<Exit>,
    exited: Arc<ExitCell>,
    /// The exec's OCI Process (JSON) until it starts.
    spec: Option<Vec<u8>>,
    /// The stdin stream until start hands it to its copier.
    stdin_stream: Option<UnixStream>,
    /// A handle on the stdin stream for closing it.
    stdin_ctl: Option<UnixStream>,
    stdin_copier: Option<Worker>,
    /// Copies from the guest to the output paths.
    pumps: Vec<JoinHandle<()>>,
    /// Kills sent to the guest and not yet answered. The exit waits for
    /// them: containerd answers an exit by deleting the task and closing
    /// its connection, and a Kill still waiting on a slow guest's reply
    /// would then fail with "ttrpc: closed".
    kills_in_flight: u32,
}

impl Proc {
    fn new(io: Io) -> Self {
        Proc {
            io,
            pid: 0,
            exit: None,
            exited: Arc::default(),
            spec: None,
            stdin_stream: None,
            stdin_ctl: None,
            stdin_copier: None,
            pumps: Vec::new(),
            kills_in_flight: 0,
        }
    }

    fn status(&self, paused: bool) -> Status {
        match (self.pid, &self.exit) {
            (_, Some(_)) => Status::Stopped,
            (0, None) => Status::Created,
            _ if paused => Status::Paused,
            _ => Status::Running,
        }
    }

    fn running(&self) -> bool {
        self.pid != 0 && self.exit.is_none()
    }

    /// The process's exit as its delete reports it: SIGKILL's if it never
    /// exited; a Wait still pending on it returns that.
    fn end(&self) -> Exit {
        let exit = self.exit.unwrap_or_else(|| Exit::now(KILLED_STATUS));
        self.exited.set_once(exit);
        exit
    }
}

/// One container of the pod.
struct Ctr {
    role: Role,
    bundle: PathBuf,
    init: Proc,
    execs: HashMap<String, Proc>,
    paused: bool,
}

impl Ctr {
    fn proc(&mut self, id: &str, exec_id: &str) -> Result<&mut Proc> {
        if exec_id.is_empty() {
            return Ok(&mut self.init);
        }
        self.execs
            .get_mut(exec_id)
            .ok_or_else(|| PodApiError::NoExec {
                id: id.to_owned(),
                exec_id: exec_id.to_owned(),
            })
    }
}

struct State<V> {
    /// The pod's id, once its VM booted.
    pod_id: Option<SandboxId>,
    vm: Option<V>,
    containers: HashMap<ContainerId, Ctr>,
    /// How long the guest has to report the exit a SIGKILL causes before
    /// the host ends the VM itself (the config's `agent.kill_timeout_ms`).
    kill_grace: Duration,
}

struct Inner<B: Backend> {
    backend: B,
    state: Mutex<State<B::Vm>>,
    /// Serialises creates, so the pod's VM boots once.
    creating: Mutex<()>,
    events: Mutex<Sender<Event>>,
    /// Signalled (with `state`) when a kill's reply comes.
    kill_answered: Condvar,
    /// The pod's exit and OOM watchers; stopping the VM joins them.
    workers: Workers,
    /// Waits blocked in the pod (each holds a thread of the caller's).
    pending_waits: std::sync::atomic::AtomicUsize,
}

/// The most Waits one pod holds at once: each blocks a thread of the
/// shim's blocking pool (tokio's, 512 threads), which every other call
/// needs too.
pub const MAX_PENDING_WAITS: usize = 256;

/// One pod: its VM and containers. Cheap to clone; clones share the pod.
pub struct PodService<B: Backend> {
    inner: Arc<Inner<B>>,
}

impl<B: Backend> Clone for PodService<B> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
        }
    }
}

type AgentOf<B> = <<B as Backend>::Vm as PodVm>::Agent;

impl<B: Backend> PodService<B> {
    /// A pod without VM yet; events go to `events`.
    pub fn new(backend: B, events: Sender<Event>) -> Self {
        Self {
            inner: Arc::new(Inner {
                backend,
                state: Mutex::new(State {
                    pod_id: None,
                    vm: None,
                    containers: HashMap::new(),
                    kill_grace: Config::default().agent.kill_timeout(),
                }),
                creating: Mutex::new(()),
                events: Mutex::new(events),
                kill_answered: Condvar::new(),
                workers: Workers::default(),
                pending_waits: Default::default(),
            }),
        }
    }

    fn state(&self) -> MutexGuard<'_, State<B::Vm>> {
        self.inner.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn emit(&self, event: Event) {
        let tx = self.inner.events.lock().unwrap_or_else(|e| e.into_inner());
        let _ = tx.send(event);
    }

    fn with_ctr<T>(&self, id: &str, f: impl FnOnce(&mut Ctr) -> Result<T>) -> Result<T> {
        let mut st = self.state();
        let c = st
            .containers
            .get_mut(id)
            .ok_or_else(|| PodApiError::NoContainer(id.to_owned()))?;
        f(c)
    }

    fn with_proc<T>(
        &self,
        id: &str,
        exec_id: &str,
        f: impl FnOnce(&mut Proc) -> Result<T>,
    ) -> Result<T> {
        self.with_ctr(id, |c| f(c.proc(id, exec_id)?))
    }

    fn agent(&self) -> Result<AgentOf<B>> {
        self.state()
            .vm
            .as_ref()
            .map(PodVm::agent)
            .ok_or_else(|| PodApiError::Precondition("the pod's VM is not running".into()))
    }

    /// Whether the pod has no container.
    pub fn is_empty(&self) -> bool {
        self.state().containers.is_empty()
    }

    /// The pod's id, once its VM booted.
    pub fn pod_id(&self) -> Option<SandboxId> {
        self.state().pod_id.clone()
    }

    /// Runs `f` on the pod's VM, if it runs.
    pub fn with_vm<T>(&self, f: impl FnOnce(&B::Vm) -> T) -> Option<T> {
        self.state().vm.as_ref().map(f)
    }

    /// Creates a container: boots the pod's VM for the first one (a CRI
    /// sandbox or a plain container), shares its rootfs and binds, opens
    /// its streams and creates it in the guest. On error nothing of the
    /// container stays, and an empty pod's VM stops.
    pub fn create(&self, req: CreateRequest) -> Result<()> {
        let _one_at_a_time = self
            .inner
            .creating
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let CreateRequest {
            id,
            bundle,
            mut spec,
            rootfs,
            io,
            config,
        } = req;
        if self.state().containers.contains_key(id.as_str()) {
            return Err(PodApiError::Exists(format!("container {id}")));
        }
        let role = Role::of(&spec, &id)?;
        let pod_id = role.pod(&id);
        let booted = self.state().pod_id.clone();
        match booted {
            Some(p) if p != pod_id => {
                return Err(PodApiError::Precondition(format!(
                    "this shim serves pod {p}, not pod {pod_id}"
                )))
            }
            Some(_) if self.state().vm.is_none() => {
                return Err(PodApiError::Precondition("the pod's VM is gone".into()))
            }
            Some(_) => {}
            None if matches!(role, Role::Member { .. }) => {
                return Err(PodApiError::Precondition(format!(
                    "pod {pod_id} has no sandbox VM here"
                )))
            }
            None => {
                let vm = self.inner.backend.boot(&pod_id, &spec, &bundle, &config)?;
                let mut st = self.state();
                st.vm = Some(vm);
                st.kill_grace = config.agent.kill_timeout();
                st.pod_id = Some(pod_id.clone());
            }
        }
        let created = self.add_container(&id, &role, &pod_id, &rootfs, &mut spec, &io);
        let init = match created {
            Ok(init) => init,
            Err(e) => {
                self.stop_if_empty();
                return Err(e);
            }
        };
        self.with_vm(|vm| vm.record_owner(&bundle));
        self.state().containers.insert(
            id.clone(),
            Ctr {
                role,
                bundle: bundle.clone(),
                init,
                execs: HashMap::new(),
                paused: false,
            },
        );
        self.emit(Event::Created {
            id: id.to_string(),
            bundle,
            rootfs,
            io,
        });
        Ok(())
    }

    fn add_container(
        &self,
        id: &str,
        role: &Role,
        pod_id: &str,
        rootfs: &[MountSpec],
        spec: &mut Spec,
        io: &Io,
    ) -> Result<Proc> {
        let sandbox_pid = {
            let st = self.state();
            st.containers
                .get(pod_id)
                .filter(|c| c.role == Role::Sandbox && c.init.running())
                .map(|c| c.init.pid)
        };
        let agent = self.agent()?;
        let attached = {
            let st = self.state();
            let vm = st
                .vm
                .as_ref()
                .ok_or_else(|| PodApiError::Precondition("the pod's VM is gone".into()))?;
            vm.attach(id, role, sandbox_pid, rootfs, spec)
                .map(|synced| (vm.network(role), synced))
        };
        let created = attached
            .map_err(PodApiError::from)
            .and_then(|(network, synced)| {
                let json = serde_json::to_vec(&*spec)
                    .map_err(|e| PodApiError::InvalidArgument(format!("spec of {id}: {e}")))?;
                let streams = stdio::open(&agent, id, None, io)?;
                agent.create_container(id, json, streams.stdio, network, synced)?;
                let mut init = Proc::new(io.clone());
                init.stdin_ctl = streams.stdin.as_ref().and_then(|s| s.try_clone().ok());
                init.stdin_stream = streams.stdin;
                init.pumps = stdio::pump_outputs(streams.outputs);
                Ok(init)
            });
        if created.is_err() {
            self.with_vm(|vm| vm.release(id));
        }
        created
    }

    /// Starts a created container's init (`exec_id` empty) or an added
    /// exec; returns its guest pid. A process that fails to start has
    /// ended (as runc's shim has it), so a Wait on it returns.
    pub fn start(&self, id: &ContainerId, exec: Option<&ExecId>) -> Result<u32> {
        let (id, exec_id) = (id.as_str(), exec_str(exec));
        let agent = self.agent()?;
        let started = self.start_process(&agent, id, exec_id);
        let pid = match started {
            Ok(pid) => pid,
            Err(e) => {
                let _ = self.with_proc(id, exec_id, |p| {
                    if p.exit.is_none() && p.pid == 0 {
                        let exit = Exit::now(FAILED_START_STATUS);
                        p.exit = Some(exit);
                        p.exited.set_once(exit);
                    }
                    Ok(())
                });
                return Err(e);
            }
        };
        let stdin = self.with_proc(id, exec_id, |p| {
            p.pid = pid;
            Ok(p.stdin_stream.take().map(|s| (s, p.io.stdin.clone())))
        })?;
        if let Some((s, path)) = stdin {
            let copier = stdio::pump_stdin(s, path).map_err(|e| {
                PodApiError::Precondition(format!("starting the stdin copier: {e}"))
            })?;
            self.with_proc(id, exec_id, |p| {
                p.stdin_copier = Some(copier);
                Ok(())
            })?;
        }
        // The start event goes out before the exit can.
        if exec_id.is_empty() {
            self.emit(Event::Started {
                id: id.to_owned(),
                pid,
            });
            self.watch_oom(id, agent.clone());
        } else {
            self.emit(Event::ExecStarted {
                id: id.to_owned(),
                exec_id: exec_id.to_owned(),
                pid,
            });
        }
        self.watch_exit(id, exec_id, pid, agent);
        Ok(pid)
    }

    fn start_process(&self, agent: &AgentOf<B>, id: &str, exec_id: &str) -> Result<u32> {
        if exec_id.is_empty() {
            let pid = self.with_ctr(id, |c| Ok(c.init.pid))?;
            if pid != 0 {
                return Err(PodApiError::Precondition(format!(
                    "container {id} already started"
                )));
            }
            return Ok(agent.start_container(id)?);
        }
        let (spec, io) = self.with_proc(id, exec_id, |p| {
            if p.pid != 0 || p.exit.is_some() {
                return Err(PodApiError::Precondition(format!(
                    "exec {exec_id} already started"
                )));
            }
            Ok((p.spec.take().unwrap_or_default(), p.io.clone()))
        })?;
        let streams = stdio::open(agent, id, Some(exec_id), &io)?;
        let pid = agent.exec_process(id, exec_id, spec, streams.stdio)?;
        self.with_proc(id, exec_id, |p| {
            p.stdin_ctl = streams.stdin.as_ref().and_then(|s| s.try_clone().ok());
            p.stdin_stream = streams.stdin;
            p.pumps = stdio::pump_outputs(streams.outputs);
            Ok(())
        })?;
        Ok(pid)
    }

    /// Publishes a started process's exit once the agent reports it and its
    /// output has reached the host. The sandbox container's exit ends the
    /// pod: every other container is killed.
    fn watch_exit(&self, id: &str, exec_id: &str, pid: u32, agent: AgentOf<B>) {
        let me = self.clone();
        let (id, exec_id) = (id.to_owned(), exec_id.to_owned());
        // Waiters hold this cell, also when the process is deleted first.
        let Ok(cell) = self.with_proc(&id, &exec_id, |p| Ok(p.exited.clone())) else {
            return;
        };
        let name = format!("exit-{id}-{exec_id}");
        self.inner.workers.spawn(name, move || {
            let exec = (!exec_id.is_empty()).then_some(exec_id.as_str());
            let status = agent
                .wait_process(&id, exec)
                .unwrap_or_else(|e| me.lost_with_the_vm(&id, &exec_id, &e));
            let pumps = me
                .with_proc(&id, &exec_id, |p| Ok(std::mem::take(&mut p.pumps)))
                .unwrap_or_default();
            pumps.into_iter().for_each(|p| drop(p.join()));
            let exit = Exit::now(status);
            // The host ended it already (see `enforce_kill`).
            let Some(ends_pod) = me.record_exit(&id, &exec_id, exit) else {
                return;
            };
            me.emit(Event::Exited {
                id: id.clone(),
                exec_id: exec_id.clone(),
                pid,
                exit,
            });
            cell.set_once(exit);
            if ends_pod {
                me.kill_members(&id, &agent);
            }
        });
    }

    /// The status of a process whose wait failed: the VM went down under
    /// it, or the agent broke. A VM its memory limit brought down (the
    /// host's OOM killer took it, or it stalled at the limit) gives its
    /// processes 137 and their containers an OOM event, as a kill by the
    /// guest's own would, with the reason in the shim's log; anything else
    /// is a failure (255).
    fn lost_with_the_vm(&self, id: &str, exec_id: &str, e: &AgentError) -> u32 {
        // The wait can fail as the VMM dies, a moment before its monitor
        // sees it and gives its verdict.
        let deadline = std::time::Instant::now() + VERDICT_WAIT;
        let verdict = loop {
            match self.with_vm(PodVm::verdict).flatten() {
                Some(v) => break Some(v),
                None if std::time::Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(20));
                }
                None => break None,
            }
        };
        match verdict {
            Some(v) if v.out_of_memory() => {
                tracing::error!(container = %id, exec = %exec_id, "the process ended with its VM: {v}");
                if exec_id.is_empty() {
                    self.emit(Event::Oom { id: id.to_owned() });
                }
                KILLED_STATUS
            }
            v => {
                let why = v.map_or_else(|| crate::error_chain(e), |v| v.to_string());
                tracing::error!(container = %id, exec = %exec_id, "wait: {why}");
                FAILED_START_STATUS
            }
        }
    }

    /// Records a process's exit once no kill on it is in flight, and says
    /// whether it ends the pod; None if it has its exit already.
    fn record_exit(&self, id: &str, exec_id: &str, exit: Exit) -> Option<bool> {
        let deadline = std::time::Instant::now() + KILLS_IN_FLIGHT_GRACE;
        let mut st = self.state();
        loop {
            let Some(c) = st.containers.get_mut(id) else {
                return Some(false);
            };
            let ends_pod = c.role == Role::Sandbox && exec_id.is_empty();
            let Ok(p) = c.proc(id, exec_id) else {
                return Some(false);
            };
            if p.exit.is_some() {
                return None;
            }
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            if p.kills_in_flight == 0 || left.is_zero() {
                if p.kills_in_flight > 0 {
                    tracing::warn!(
                        container = id,
                        exec = exec_id,
                        "exit published with a kill unanswered"
                    );
                }
                p.exit = Some(exit);
                return Some(ends_pod);
            }
            st = self
                .inner
                .kill_answered
                .wait_timeout(st, left)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    /// After a SIGKILL to a container's init (a CRI sandbox's, a member's,
    /// a pod of one's): if the guest has not reported that exit within the
    /// pod's kill grace, the host kills the VM and reports every process
    /// still running as killed (137) itself, as the kernel guarantees a
    /// SIGKILL under runc. A guest that acknowledges kills and never
    /// reports the exits cannot pin the pod for ever: not StopContainer,
    /// and not StopPodSandbox, which SIGKILLs the members first and waits
    /// for each. The host cannot end one container inside the guest, so a
    /// member's swallowed kill costs the whole VM: a guest that lies about
    /// a kill is not trusted with the rest of the pod either. An exec's
    /// SIGKILL arms nothing: no container or pod stop waits for it.
    fn enforce_kill(&self, id: &str, cell: Arc<ExitCell>) {
        let me = self.clone();
        let grace = self.state().kill_grace;
        let id = id.to_owned();
        self.inner.workers.spawn(format!("kill-{id}"), move || {
            if cell.wait_for(grace).is_some() {
                return;
            }
            tracing::warn!(
                container = %id,
                "the guest did not report the exit within {} ms of SIGKILL; killing the VM and reporting the pod's processes killed",
                grace.as_millis()
            );
            let ended = me.end_running(Exit::now(KILLED_STATUS));
            me.with_vm(PodVm::kill);
            for (id, exec_id, pid, exit, cell) in ended {
                me.emit(Event::Exited {
                    id,
                    exec_id,
                    pid,
                    exit,
                });
                cell.set_once(exit);
            }
        });
    }

    /// Gives every started process without an exit `exit`; returns them
    /// (container, exec id, pid, exit, cell) for their events.
    fn end_running(&self, exit: Exit) -> Vec<(String, String, u32, Exit, Arc<ExitCell>)> {
        let mut st = self.state();
        let mut ended = Vec::new();
        for (cid, c) in st.containers.iter_mut() {
            let execs = c.execs.iter_mut().map(|(e, p)| (e.clone(), p));
            for (exec_id, p) in execs.chain(std::iter::once((String::new(), &mut c.init))) {
                if p.pid != 0 && p.exit.is_none() {
                    p.exit = Some(exit);
                    ended.push((cid.to_string(), exec_id, p.pid, exit, p.exited.clone()));
                }
            }
        }
        ended
    }

    /// SIGKILLs every running container of the pod but its sandbox.
    fn kill_members(&self, sandbox: &str, agent: &AgentOf<B>) {
        let members: Vec<ContainerId> = self
            .state()
            .containers
            .iter()
            .filter(|(cid, c)| cid.as_str() != sandbox && c.init.running())
            .map(|(cid, _)| cid.clone())
            .collect();
        for cid in members {
            tracing::info!(sandbox, container = %cid, "sandbox exited; killing");
            if let Err(e) = agent.signal_process(&cid, None, libc::SIGKILL as u32, true) {
                tracing::warn!(container = %cid, "kill: {}", crate::error_chain(&e));
            }
        }
    }

    /// Publishes a container's OOM kills, at most one event per
    /// [`OOM_EVENT_GAP`]: those in between coalesce into the next (a guest
    /// reporting OOMs in a loop must not flood containerd).
    fn watch_oom(&self, id: &str, agent: AgentOf<B>) {
        let me = self.clone();
        let id = id.to_owned();
        self.inner.workers.spawn(format!("oom-{id}"), move || {
            let mut last: Option<std::time::Instant> = None;
            while let Ok(true) = agent.wait_oom(&id) {
                if let Some(gap) = last.map(|t| OOM_EVENT_GAP.saturating_sub(t.elapsed())) {
                    std::thread::sleep(gap);
                }
                last = Some(std::time::Instant::now());
                me.emit(Event::Oom { id: id.clone() });
            }
        });
    }

    /// Adds an exec to a running container; it starts with [`Self::start`].
    pub fn add_exec(
        &self,
        id: &ContainerId,
        exec_id: &ExecId,
        process: Vec<u8>,
        io: Io,
    ) -> Result<()> {
        let (id, exec_id) = (id.as_str(), exec_id.as_str());
        let mut process = serde_json::from_slice::<Process>(&process).map_err(|e| {
            PodApiError::InvalidArgument(format!(
                "exec {exec_id}: the process is not an OCI process object: {e}"
            ))
        })?;
        super::inherit::rlimits(&mut process, &super::inherit::own_rlimits());
        super::inherit::lsm_labels(&mut process, &super::inherit::AppArmor::host())
            .map_err(|why| PodApiError::InvalidArgument(format!("exec {exec_id}: {why}")))?;
        let process = serde_json::to_vec(&process).map_err(|e| {
            PodApiError::InvalidArgument(format!("exec {exec_id}: process spec: {e}"))
        })?;
        self.with_ctr(id, |c| {
            if !c.init.running() {
                return Err(PodApiError::Precondition(format!(
                    "container {id} is not running"
                )));
            }
            if c.execs.contains_key(exec_id) {
                return Err(PodApiError::Exists(format!("exec {exec_id}")));
            }
            let mut p = Proc::new(io);
            p.spec = Some(process);
            c.execs.insert(exec_id.to_owned(), p);
            Ok(())
        })?;
        self.emit(Event::ExecAdded {
            id: id.to_owned(),
            exec_id: exec_id.to_owned(),
        });
        Ok(())
    }

    /// Signals a process (with `all`, every process of the container). An
    /// init that has exited takes it as done; an exec that has exited is
    /// gone.
    pub fn kill(
        &self,
        id: &ContainerId,
        exec: Option<&ExecId>,
        signal: u32,
        all: bool,
    ) -> Result<()> {
        let (id, exec_id) = (id.as_str(), exec_str(exec));
        let (exited, cell) = self.with_ctr(id, |c| {
            let p = c.proc(id, exec_id)?;
            if p.exit.is_none() {
                p.kills_in_flight += 1;
            }
            Ok((p.exit.is_some(), p.exited.clone()))
        })?;
        if exited {
            if exec_id.is_empty() {
                return Ok(());
            }
            return Err(PodApiError::ExecExited {
                exec_id: exec_id.to_owned(),
            });
        }
        let exec = exec.map(ExecId::as_str);
        let sent = self
            .agent()
            .and_then(|a| Ok(a.signal_process(id, exec, signal, all)?));
        // The process may have been deleted meanwhile.
        let _ = self.with_proc(id, exec_id, |p| {
            p.kills_in_flight = p.kills_in_flight.saturating_sub(1);
            Ok(())
        });
        self.inner.kill_answered.notify_all();
        if sent.is_ok() && exec_id.is_empty() && signal == libc::SIGKILL as u32 {
            self.enforce_kill(id, cell);
        }
        sent
    }

    /// Blocks until the process has exited. A Wait for a process already
    /// deleted finds nothing; one that was waiting when it was deleted
    /// returns its exit.
    pub fn wait(&self, id: &ContainerId, exec: Option<&ExecId>) -> Result<Exit> {
        let (id, exec_id) = (id.as_str(), exec_str(exec));
        use std::sync::atomic::Ordering;
        let cell = self.with_proc(id, exec_id, |p| Ok(p.exited.clone()))?;
        let pending = self.inner.pending_waits.fetch_add(1, Ordering::SeqCst);
        let exit = if pending >= MAX_PENDING_WAITS {
            Err(PodApiError::TooManyWaits { pending })
        } else {
            Ok(cell.wait())
        };
        self.inner.pending_waits.fetch_sub(1, Ordering::SeqCst);
        exit
    }

    /// How many Waits are blocked on the process.
    #[cfg(test)]
    pub(crate) fn waiting(&self, id: &ContainerId, exec: Option<&ExecId>) -> usize {
        let (id, exec_id) = (id.as_str(), exec_str(exec));
        self.with_proc(id, exec_id, |p| {
            Ok(p.exited.waiting.load(std::sync::atomic::Ordering::SeqCst))
        })
        .unwrap_or(0)
    }

    pub fn process_state(&self, id: &ContainerId, exec: Option<&ExecId>) -> Result<ProcessState> {
        let (id, exec_id) = (id.as_str(), exec_str(exec));
        self.with_ctr(id, |c| {
            let (paused, bundle) = (c.paused, c.bundle.clone());
            let p = c.proc(id, exec_id)?;
            Ok(ProcessState {
                bundle,
                pid: p.pid,
                status: p.status(paused),
                io: p.io.clone(),
                exit: p.exit,
            })
        })
    }

    /// Deletes an exec, or a container (the pod's VM stops with its last
    /// one). Returns the process's pid and exit (SIGKILL's for one that
    /// never exited).
    pub fn delete(&self, id: &ContainerId, exec: Option<&ExecId>) -> Result<(u32, Exit)> {
        let (id, exec_id) = (id.as_str(), exec_str(exec));
        if !exec_id.is_empty() {
            let p = self.with_ctr(id, |c| {
                c.execs.remove(exec_id).ok_or_else(|| PodApiError::NoExec {
                    id: id.to_owned(),
                    exec_id: exec_id.to_owned(),
                })
            })?;
            if let Ok(agent) = self.agent() {
                if let Err(e) = agent.remove_process(id, exec_id) {
                    tracing::debug!(
                        container = id,
                        exec = exec_id,
                        "remove: {}",
                        crate::error_chain(&e)
                    );
                }
            }
            return Ok((p.pid, p.end()));
        }
        let removed = self
            .state()
            .containers
            .remove(id)
            .ok_or_else(|| PodApiError::NoContainer(id.to_owned()))?;
        for p in removed.execs.values() {
            p.end();
        }
        let exit = removed.init.end();
        if let Ok(agent) = self.agent() {
            if let Err(e) = agent.remove_container(id) {
                tracing::warn!(
                    container = id,
                    "remove in the guest: {}",
                    crate::error_chain(&e)
                );
            }
        }
        self.with_vm(|vm| vm.release(id));
        self.stop_if_empty();
        let pid = removed.init.pid;
        self.emit(Event::Deleted {
            id: id.to_owned(),
            pid,
            exit,
        });
        Ok((pid, exit))
    }

    /// Stops the pod's VM once no container is left in it.
    pub fn stop_if_empty(&self) {
        let vm = {
            let mut st = self.state();
            if !st.containers.is_empty() {
                return;
            }
            st.pod_id = None;
            st.vm.take()
        };
        if let Some(vm) = vm {
            vm.shutdown();
            // With the VM gone the agent's waits return: the watchers end.
            let left = self
                .inner
                .workers
                .finish_by(std::time::Instant::now() + WORKERS_GRACE);
            if left > 0 {
                tracing::warn!(threads = left, "pod threads outlived its VM");
            }
        }
    }

    pub fn pids(&self, id: &ContainerId) -> Result<Vec<u32>> {
        self.with_ctr(id, |_| Ok(()))?;
        Ok(self.agent()?.list_processes(id)?)
    }

    pub fn pause(&self, id: &ContainerId) -> Result<()> {
        let id = id.as_str();
        self.with_ctr(id, |_| Ok(()))?;
        self.agent()?.pause_container(id)?;
        self.with_ctr(id, |c| {
            c.paused = true;
            Ok(())
        })?;
        self.emit(Event::Paused { id: id.to_owned() });
        Ok(())
    }

    pub fn resume(&self, id: &ContainerId) -> Result<()> {
        let id = id.as_str();
        self.with_ctr(id, |_| Ok(()))?;
        self.agent()?.resume_container(id)?;
        self.with_ctr(id, |c| {
            c.paused = false;
            Ok(())
        })?;
        self.emit(Event::Resumed { id: id.to_owned() });
        Ok(())
    }

    pub fn resize_pty(
        &self,
        id: &ContainerId,
        exec: Option<&ExecId>,
        width: u32,
        height: u32,
    ) -> Result<()> {
        let (id, exec_id) = (id.as_str(), exec_str(exec));
        self.with_proc(id, exec_id, |_| Ok(()))?;
        let exec = exec.map(ExecId::as_str);
        Ok(self.agent()?.resize_pty(id, exec, width, height)?)
    }

    /// Ends a process's stdin: what the client wrote is copied first (for
    /// a short grace), then the guest process reads EOF.
    pub fn close_stdin(&self, id: &ContainerId, exec: Option<&ExecId>) -> Result<()> {
        let (id, exec_id) = (id.as_str(), exec_str(exec));
        let (ctl, copier) = self.with_proc(id, exec_id, |p| {
            Ok((p.stdin_ctl.take(), p.stdin_copier.take()))
        })?;
        if let Some(c) = ctl {
            if let Some(copier) = copier {
                copier.finish_by(std::time::Instant::now() + CLOSE_STDIN_GRACE);
            }
            let _ = c.shutdown(std::net::Shutdown::Write);
        }
        Ok(())
    }

    /// Applies new resources (an OCI LinuxResources, JSON) in the guest.
    pub fn update(&self, id: &ContainerId, resources: Vec<u8>) -> Result<()> {
        serde_json::from_slice::<LinuxResources>(&resources).map_err(|e| {
            PodApiError::InvalidArgument(format!(
                "update: the resources are not an OCI LinuxResources object: {e}"
            ))
        })?;
        self.with_ctr(id, |_| Ok(()))?;
        Ok(self.agent()?.update_container(id, resources)?)
    }

    pub fn stats(&self, id: &ContainerId) -> Result<StatsResponse> {
        self.with_ctr(id, |_| Ok(()))?;
        Ok(self.agent()?.container_stats(id)?)
    }

    /// The init's pid of container `id` (0 before start or if unknown).
    pub fn pid(&self, id: &ContainerId) -> u32 {
        self.with_ctr(id, |c| Ok(c.init.pid)).unwrap_or(0)
    }
}

/// The string the service keeps an exec under: "" for a container's init.
fn exec_str(exec: Option<&ExecId>) -> &str {
    exec.map_or("", ExecId::as_str)
}

/// Reads a bundle's OCI spec.
pub fn read_spec(bundle: &Path) -> Result<Spec, PodApiError> {
    super::spec::read(bundle).map_err(|e| PodApiError::InvalidArgument(crate::error_chain(&e)))
}
