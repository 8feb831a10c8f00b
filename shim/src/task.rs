//! The shim's Task service over one husk sandbox.

use std::collections::HashMap;
use std::fs::File;
use std::io::Write;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use containerd_shim::asynchronous::{spawn, ExitSignal, Shim};
use containerd_shim::protos::api;
use containerd_shim::protos::events::task::{
    TaskCreate, TaskDelete, TaskExecAdded, TaskExecStarted, TaskExit, TaskOOM, TaskPaused,
    TaskResumed, TaskStart,
};
use containerd_shim::protos::protobuf::well_known_types::any::Any;
use containerd_shim::protos::protobuf::well_known_types::timestamp::Timestamp;
use containerd_shim::protos::protobuf::{Message, MessageDyn};
use containerd_shim::protos::shim_async::Task;
use containerd_shim::protos::topics;
use containerd_shim::protos::ttrpc::r#async::TtrpcContext;
use containerd_shim::protos::ttrpc::Code;
use containerd_shim::publisher::RemotePublisher;
use containerd_shim::{Config as ShimConfig, Error, Flags, StartOpts, TtrpcResult};
use husk_protocol::containers::Stdio;
use husk_protocol::{StreamHeader, StreamKind};
use husk_runtime::agent::{open_stream, Agent};
use husk_runtime::cgroup::{self, PodCgroup};
use husk_runtime::pod::{self, ContainerPaths, Role};
use husk_runtime::storage::{self, MountSpec};
use husk_runtime::{error_chain, Config, Sandbox};
use tokio::sync::watch;

use crate::options;

const STREAM_TIMEOUT: Duration = Duration::from_secs(10);
/// How long CloseIO lets the stdin copier drain what the client wrote.
const CLOSE_IO_GRACE: Duration = Duration::from_millis(500);

/// How a process ended.
#[derive(Clone, Default)]
struct Exit {
    status: u32,
    at: Option<Timestamp>,
}

/// One process of the container: its init or an exec.
struct Proc {
    stdin: String,
    stdout: String,
    stderr: String,
    terminal: bool,
    pid: u32,
    exit: Option<Exit>,
    exited: Arc<watch::Sender<Option<Exit>>>,
    /// The exec's OCI Process (JSON) until it starts.
    spec: Option<Vec<u8>>,
    /// The stdin stream until start hands it to its copier.
    stdin_stream: Option<UnixStream>,
    /// A handle on the stdin stream for CloseIO.
    stdin_ctl: Option<UnixStream>,
    /// The copier from containerd's stdin FIFO, once started.
    stdin_copier: Option<std::thread::JoinHandle<()>>,
    /// Copies from the guest into containerd's FIFOs.
    pumps: Vec<std::thread::JoinHandle<()>>,
}

impl Proc {
    fn new(stdin: &str, stdout: &str, stderr: &str, terminal: bool) -> Self {
        let (tx, _) = watch::channel(None);
        Proc {
            stdin: stdin.to_owned(),
            stdout: stdout.to_owned(),
            stderr: stderr.to_owned(),
            terminal,
            pid: 0,
            exit: None,
            exited: Arc::new(tx),
            spec: None,
            stdin_stream: None,
            stdin_ctl: None,
            stdin_copier: None,
            pumps: Vec::new(),
        }
    }

    fn status(&self, paused: bool) -> api::Status {
        match (self.pid, &self.exit) {
            (_, Some(_)) => api::Status::STOPPED,
            (0, None) => api::Status::CREATED,
            _ if paused => api::Status::PAUSED,
            _ => api::Status::RUNNING,
        }
    }
}

/// One container of the pod: its init and exec processes.
struct Ctr {
    role: Role,
    bundle: PathBuf,
    init: Proc,
    execs: HashMap<String, Proc>,
    paused: bool,
}

impl Ctr {
    fn proc(&mut self, exec_id: &str) -> TtrpcResult<&mut Proc> {
        if exec_id.is_empty() {
            return Ok(&mut self.init);
        }
        self.execs
            .get_mut(exec_id)
            .ok_or_else(|| err(Code::NOT_FOUND, format!("exec {exec_id} not found")))
    }
}

/// The pod this shim serves: one sandbox VM and its containers, by id.
#[derive(Default)]
struct Pod {
    sandbox: Option<Sandbox>,
    /// The host cgroup the shim, the VMM and its daemons run in.
    cgroup: Option<PodCgroup>,
    containers: HashMap<String, Ctr>,
}

impl Pod {
    fn ctr(&mut self, id: &str) -> TtrpcResult<&mut Ctr> {
        self.containers
            .get_mut(id)
            .ok_or_else(|| err(Code::NOT_FOUND, format!("container {id} not created")))
    }

    /// The guest pid of the pod's running sandbox container, if any.
    fn sandbox_pid(&self, pod: &str) -> Option<u32> {
        self.containers
            .get(pod)
            .filter(|c| c.role == Role::Sandbox && c.init.exit.is_none() && c.init.pid != 0)
            .map(|c| c.init.pid)
    }
}

#[derive(Clone)]
pub struct HuskShim {
    exit_signal: Arc<ExitSignal>,
    namespace: String,
    /// The shim's own id: the pod's first container.
    id: String,
    bundle: String,
    publisher: Option<Arc<RemotePublisher>>,
    pod: Arc<Mutex<Pod>>,
    /// Serialises creates, so the pod's VM boots once.
    creating: Arc<tokio::sync::Mutex<()>>,
}

fn now() -> Timestamp {
    let d = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    let mut t = Timestamp::new();
    t.seconds = d.as_secs() as i64;
    t.nanos = d.subsec_nanos() as i32;
    t
}

fn err(code: Code, msg: impl std::fmt::Display) -> containerd_shim::protos::ttrpc::Error {
    log::error!("{msg}");
    containerd_shim::protos::ttrpc::Error::RpcStatus(containerd_shim::protos::ttrpc::get_status(
        code,
        msg.to_string(),
    ))
}

/// File in the bundle holding the shim's ttrpc address.
const ADDRESS_FILE: &str = "address";

/// The socket path a bundle's `address` file names.
fn recorded_socket(address_file: &Path) -> Option<PathBuf> {
    let address = std::fs::read_to_string(address_file).ok()?;
    Some(PathBuf::from(address.trim().trim_start_matches("unix://")))
}

/// Whether a shim still serves on the socket a bundle records: the pod's
/// shim, which outlives each of its containers.
fn shim_alive(address_file: &Path) -> bool {
    recorded_socket(address_file).is_some_and(|p| UnixStream::connect(p).is_ok())
}

/// Removes the socket of a shim that died, if it is still there.
fn remove_stale_socket(address_file: &Path) {
    use std::os::unix::fs::FileTypeExt;
    let Some(path) = recorded_socket(address_file) else {
        return;
    };
    if std::fs::symlink_metadata(&path).is_ok_and(|m| m.file_type().is_socket()) {
        let _ = std::fs::remove_file(path);
    }
}

/// An error as the client should read it, causes included.
/// Every agent failure becomes a ttrpc status here, in one place.
trait Describe {
    fn describe(&self) -> String;
    /// The code containerd gets: the agent's NOT_FOUND stays NOT_FOUND (a
    /// process that is gone), anything else is INTERNAL.
    fn code(&self) -> Code {
        Code::INTERNAL
    }
}

impl Describe for husk_runtime::agent::AgentError {
    fn describe(&self) -> String {
        error_chain(self)
    }

    fn code(&self) -> Code {
        match self {
            husk_runtime::agent::AgentError::Rpc {
                error: ttrpc::Error::RpcStatus(s),
                ..
            } if s.code.value() == ttrpc::Code::NOT_FOUND as i32 => Code::NOT_FOUND,
            _ => Code::INTERNAL,
        }
    }
}

impl Describe for String {
    fn describe(&self) -> String {
        self.clone()
    }
}

/// The exec id as the agent wants it: None for the init.
fn exec_opt(exec_id: &str) -> Option<String> {
    (!exec_id.is_empty()).then(|| exec_id.to_owned())
}

/// Reads a bundle's OCI spec as JSON.
fn read_spec(bundle: &Path) -> Result<serde_json::Value, String> {
    let path = bundle.join("config.json");
    let bytes = std::fs::read(&path).map_err(|e| format!("reading {}: {e}", path.display()))?;
    serde_json::from_slice(&bytes).map_err(|e| format!("{} is not valid JSON: {e}", path.display()))
}

#[async_trait]
impl Shim for HuskShim {
    type T = HuskShim;

    async fn new(_runtime_id: &str, args: &Flags, _config: &mut ShimConfig) -> Self {
        HuskShim {
            exit_signal: Arc::new(ExitSignal::default()),
            namespace: args.namespace.clone(),
            id: args.id.clone(),
            bundle: args.bundle.clone(),
            publisher: None,
            pod: Arc::new(Mutex::new(Pod::default())),
            creating: Arc::new(tokio::sync::Mutex::new(())),
        }
    }

    /// One shim per pod: an app container of a CRI pod is served by its
    /// sandbox's shim (the spawned process finds that shim's socket in use,
    /// records its address in this bundle and exits).
    async fn start_shim(&mut self, opts: StartOpts) -> Result<String, Error> {
        let spec = read_spec(Path::new(".")).map_err(Error::InvalidArgument)?;
        let role = Role::of(&spec, &opts.id).map_err(|e| Error::InvalidArgument(e.to_string()))?;
        let grouping = role.pod_id(&opts.id).to_owned();
        let address = spawn(opts, &grouping, Vec::new()).await?;
        // The shim server removes its socket on exit only if it finds the
        // address here (containerd-shim 0.10 writes it in one path only);
        // `delete` after a crash uses it too.
        if let Err(e) = std::fs::write(ADDRESS_FILE, &address) {
            log::warn!("recording the shim address: {e}");
        }
        Ok(address)
    }

    /// Cleans up a container after its shim died: its mounts and state in
    /// the pod's sandbox directory, and the directory with the pod's last
    /// container. (The VMM and daemons die with the shim.)
    async fn delete_shim(&mut self) -> Result<api::DeleteResponse, Error> {
        let bundle = Path::new(&self.bundle);
        let mut resp = api::DeleteResponse::new();
        resp.exit_status = 128 + 9;
        resp.exited_at = Some(now()).into();
        // containerd runs `delete` whenever its connection for a task
        // closes, also after a normal Shutdown of one container of a pod
        // whose shim serves on: that shim owns the pod's state and socket.
        if shim_alive(&bundle.join(ADDRESS_FILE)) {
            return Ok(resp);
        }
        let explicit = options::saved_config_path(bundle);
        let config = Config::load(explicit.as_deref())
            .map(|(c, _)| c)
            .unwrap_or_default();
        let role = read_spec(bundle)
            .ok()
            .and_then(|s| Role::of(&s, &self.id).ok())
            .unwrap_or(Role::Single);
        let pod = role.pod_id(&self.id);
        if husk_runtime::sandbox::validate_id(pod).is_ok()
            && husk_runtime::sandbox::validate_id(&self.id).is_ok()
        {
            let dir = husk_runtime::sandbox::sandbox_dir(&config, pod);
            ContainerPaths::new(&dir, &self.id).release();
            if dir.exists() && !pod::has_containers(&dir) {
                storage::unmount_all_under(&dir);
                let _ = std::fs::remove_dir_all(&dir);
            }
        }
        // The VMM and daemons die with the shim; whatever did not is in
        // the pod's cgroup, which goes with its booting container.
        cgroup::remove_recorded(&bundle.join(cgroup::RECORD_FILE));
        remove_stale_socket(&bundle.join(ADDRESS_FILE));
        Ok(resp)
    }

    async fn wait(&mut self) {
        self.exit_signal.wait().await;
    }

    async fn create_task_service(&self, publisher: RemotePublisher) -> Self::T {
        let mut s = self.clone();
        s.publisher = Some(Arc::new(publisher));
        s
    }
}

impl HuskShim {
    async fn publish(&self, topic: &str, event: Box<dyn MessageDyn>) {
        if let Some(p) = &self.publisher {
            if let Err(e) = p
                .publish(Default::default(), topic, &self.namespace, event)
                .await
            {
                log::warn!("publish {topic}: {e}");
            }
        }
    }

    fn pod(&self) -> std::sync::MutexGuard<'_, Pod> {
        self.pod.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Runs `f` on container `id`, which must exist.
    fn with_ctr<T>(&self, id: &str, f: impl FnOnce(&mut Ctr) -> TtrpcResult<T>) -> TtrpcResult<T> {
        f(self.pod().ctr(id)?)
    }

    /// Runs `f` on a process of container `id`.
    fn with_proc<T>(
        &self,
        id: &str,
        exec_id: &str,
        f: impl FnOnce(&mut Proc) -> TtrpcResult<T>,
    ) -> TtrpcResult<T> {
        self.with_ctr(id, |c| f(c.proc(exec_id)?))
    }

    /// Runs a blocking agent call for container `id` off the async runtime;
    /// errors map to codes as [`Describe::code`] says.
    async fn agent_call<T, E>(
        &self,
        id: &str,
        call: impl FnOnce(Agent, String) -> Result<T, E> + Send + 'static,
    ) -> TtrpcResult<T>
    where
        T: Send + 'static,
        E: Describe + Send + 'static,
    {
        let agent = self.agent()?;
        let id = id.to_owned();
        tokio::task::spawn_blocking(move || call(agent, id))
            .await
            .map_err(|e| err(Code::INTERNAL, e))?
            .map_err(|e| err(e.code(), e.describe()))
    }

    fn agent(&self) -> Result<Agent, containerd_shim::protos::ttrpc::Error> {
        self.pod()
            .sandbox
            .as_ref()
            .and_then(|sb| sb.agent().cloned())
            .ok_or_else(|| err(Code::NOT_FOUND, "sandbox has no agent"))
    }

    fn agent_socket(&self) -> TtrpcResult<PathBuf> {
        self.pod()
            .sandbox
            .as_ref()
            .map(|sb| sb.dir().join("agent.sock"))
            .ok_or_else(|| err(Code::NOT_FOUND, "no sandbox"))
    }

    /// Watches a started process: publishes its exit once the agent reports
    /// it and the output has reached containerd's FIFOs. The pod's sandbox
    /// container ending ends the pod: every other container is killed.
    fn watch_exit(&self, id: String, exec_id: String, pid: u32, agent: Agent) {
        let me = self.clone();
        tokio::spawn(async move {
            let (cid, exec) = (id.clone(), exec_opt(&exec_id));
            let a = agent.clone();
            let status =
                tokio::task::spawn_blocking(move || a.wait_process(&cid, exec.as_deref())).await;
            let status = match status
                .map_err(|e| e.to_string())
                .and_then(|r| r.map_err(|e| e.to_string()))
            {
                Ok(s) => s,
                Err(e) => {
                    log::error!("wait for {id} {exec_id}: {e}");
                    255
                }
            };
            let pumps = me
                .with_proc(&id, &exec_id, |p| Ok(std::mem::take(&mut p.pumps)))
                .unwrap_or_default();
            let _ =
                tokio::task::spawn_blocking(move || pumps.into_iter().for_each(|p| drop(p.join())))
                    .await;
            let exit = Exit {
                status,
                at: Some(now()),
            };
            let (sender, ends_pod) = me
                .with_ctr(&id, |c| {
                    let ends_pod = c.role == Role::Sandbox && exec_id.is_empty();
                    let p = c.proc(&exec_id)?;
                    p.exit = Some(exit.clone());
                    Ok((Some(p.exited.clone()), ends_pod))
                })
                .unwrap_or((None, false));
            let mut ev = TaskExit::new();
            ev.container_id = id.clone();
            ev.id = if exec_id.is_empty() {
                id.clone()
            } else {
                exec_id.clone()
            };
            ev.pid = pid;
            ev.exit_status = status;
            ev.exited_at = exit.at.clone().into();
            me.publish(topics::TASK_EXIT_EVENT_TOPIC, Box::new(ev))
                .await;
            if let Some(tx) = sender {
                // send_replace: the value must stay for a Wait that subscribes later
                // (send drops it when nobody listens yet).
                tx.send_replace(Some(exit));
            }
            if ends_pod {
                me.kill_members(&id, agent).await;
            }
        });
    }

    /// SIGKILLs every running container of the pod but its sandbox.
    async fn kill_members(&self, sandbox: &str, agent: Agent) {
        let members: Vec<String> = self
            .pod()
            .containers
            .iter()
            .filter(|(cid, c)| *cid != sandbox && c.init.pid != 0 && c.init.exit.is_none())
            .map(|(cid, _)| cid.clone())
            .collect();
        if members.is_empty() {
            return;
        }
        log::info!("sandbox {sandbox} exited; killing {members:?}");
        let _ = tokio::task::spawn_blocking(move || {
            for cid in members {
                if let Err(e) = agent.signal_process(&cid, None, libc::SIGKILL as u32, true) {
                    log::warn!("kill {cid}: {}", error_chain(&e));
                }
            }
        })
        .await;
    }

    fn watch_oom(&self, id: String, agent: Agent) {
        let me = self.clone();
        tokio::spawn(async move {
            loop {
                let (a, cid) = (agent.clone(), id.clone());
                match tokio::task::spawn_blocking(move || a.wait_oom(&cid)).await {
                    Ok(Ok(true)) => {
                        let mut ev = TaskOOM::new();
                        ev.container_id = id.clone();
                        me.publish(topics::TASK_OOM_EVENT_TOPIC, Box::new(ev)).await;
                    }
                    _ => return,
                }
            }
        });
    }
}

/// What to ask the agent for, the stdin stream, and each output stream with
/// the FIFO it feeds.
type Streams = (Stdio, Option<UnixStream>, Vec<(UnixStream, String)>);

/// Opens a process's stdio streams to the agent. Returns what to ask the
/// agent for, the stdin stream, and the output streams with their FIFOs.
fn open_streams(
    sock: &Path,
    id: &str,
    exec_id: Option<&str>,
    proc: &Proc,
) -> Result<Streams, String> {
    let header = |kind| StreamHeader {
        container_id: id.to_owned(),
        exec_id: exec_id.map(str::to_owned),
        kind,
    };
    let mut stdio = Stdio::new();
    stdio.stdin = !proc.stdin.is_empty();
    stdio.stdout = !proc.stdout.is_empty();
    // A terminal merges stderr into its one output.
    stdio.stderr = !proc.stderr.is_empty() && !proc.terminal;
    let open = |want: bool, kind| -> Result<Option<UnixStream>, String> {
        if !want {
            return Ok(None);
        }
        open_stream(sock, &header(kind), STREAM_TIMEOUT)
            .map(Some)
            .map_err(|e| e.to_string())
    };
    let stdin = open(stdio.stdin, StreamKind::Stdin)?;
    let mut outputs = Vec::new();
    if let Some(s) = open(stdio.stdout, StreamKind::Stdout)? {
        outputs.push((s, proc.stdout.clone()));
    }
    if let Some(s) = open(stdio.stderr, StreamKind::Stderr)? {
        outputs.push((s, proc.stderr.clone()));
    }
    Ok((stdio, stdin, outputs))
}

/// Copies each output stream into its FIFO, from a thread each. The copy
/// holds a reader of its own on the FIFO (as containerd's runc shim does):
/// when containerd restarts, its end closes, and without another reader the
/// next write would fail and the container's output would be lost; with it
/// the FIFO fills and the guest waits until containerd reads again.
fn pump_outputs(outputs: Vec<(UnixStream, String)>) -> Vec<std::thread::JoinHandle<()>> {
    use std::os::unix::fs::OpenOptionsExt;
    outputs
        .into_iter()
        .map(|(mut s, fifo)| {
            std::thread::spawn(move || {
                let _reader = File::options()
                    .read(true)
                    .custom_flags(libc::O_NONBLOCK)
                    .open(&fifo);
                if let Ok(mut f) = File::options().write(true).open(&fifo) {
                    let _ = husk_protocol::copy_plain(&mut s, &mut f);
                    let _ = f.flush();
                }
            })
        })
        .collect()
}

/// Copies containerd's stdin FIFO into the stream, then half-closes it so
/// the process sees EOF.
fn pump_stdin(mut s: UnixStream, fifo: String) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        if let Ok(mut f) = File::open(&fifo) {
            let _ = husk_protocol::copy_plain(&mut f, &mut s);
        }
        let _ = s.shutdown(std::net::Shutdown::Write);
    })
}

/// Boots the pod's sandbox VM. Blocking: run on a blocking thread.
fn boot_blocking(pod_id: &str, config: &Config) -> Result<Sandbox, String> {
    Sandbox::boot(config, pod_id).map_err(|e| error_chain(&e))
}

/// The husk config for a create, recording an explicit path in the bundle
/// for `delete` after a crash.
fn load_config(req: &api::CreateTaskRequest) -> Result<Config, String> {
    let explicit = options::config_path(req.options.as_ref())?;
    if let Some(p) = &explicit {
        options::save_config_path(Path::new(&req.bundle), p)?;
    }
    Config::load(explicit.as_deref())
        .map(|(c, _)| c)
        .map_err(|e| e.to_string())
}

/// Mounts a container's rootfs and binds into the pod's share, opens its
/// streams and creates it in the guest. Blocking. On error nothing of the
/// container stays on the host.
fn add_container(
    id: &str,
    req: &api::CreateTaskRequest,
    mut spec: serde_json::Value,
    role: &Role,
    sandbox_pid: Option<u32>,
    agent: &Agent,
    sandbox_dir: &Path,
) -> Result<Proc, String> {
    let guest_only = pod::prepare_spec(&mut spec, id, role, sandbox_pid, pod::fs_size)
        .map_err(|e| error_chain(&e))?;
    let mounts: Vec<MountSpec> = req
        .rootfs
        .iter()
        .map(|m| MountSpec {
            fstype: m.type_.clone(),
            source: m.source.clone(),
            options: m.options.clone(),
        })
        .collect();
    let paths = ContainerPaths::new(sandbox_dir, id);
    let created = paths
        .attach(&mounts, &mut spec, guest_only)
        .map_err(|e| error_chain(&e))
        .and_then(|()| {
            let spec = serde_json::to_vec(&spec).map_err(|e| e.to_string())?;
            let mut init = Proc::new(&req.stdin, &req.stdout, &req.stderr, req.terminal);
            let (stdio, stdin, outputs) =
                open_streams(&sandbox_dir.join("agent.sock"), id, None, &init)?;
            agent
                .create_container(id, spec, stdio)
                .map_err(|e| error_chain(&e))?;
            init.stdin_ctl = stdin.as_ref().and_then(|s| s.try_clone().ok());
            init.stdin_stream = stdin;
            init.pumps = pump_outputs(outputs);
            Ok(init)
        });
    if created.is_err() {
        paths.release();
    }
    created
}

/// containerd's cgroup v1 metrics type, the one containerd-shim-protos
/// carries; `ctr task metrics` and CRI read it whatever the host's cgroups.
fn metrics(s: &husk_protocol::containers::StatsResponse) -> Any {
    use containerd_shim::protos::cgroups::metrics::{
        CPUStat, CPUUsage, MemoryEntry, MemoryStat, Metrics, PidsStat, Throttle,
    };
    let mut m = Metrics::new();
    let mut cpu = CPUStat::new();
    let mut usage = CPUUsage::new();
    usage.total = s.cpu_usage_ns;
    usage.user = s.cpu_user_ns;
    usage.kernel = s.cpu_kernel_ns;
    cpu.usage = Some(usage).into();
    let mut thr = Throttle::new();
    thr.throttled_periods = s.cpu_throttled_periods;
    thr.throttled_time = s.cpu_throttled_ns;
    cpu.throttling = Some(thr).into();
    m.cpu = Some(cpu).into();
    let mut mem = MemoryStat::new();
    mem.cache = s.memory_cache;
    mem.rss = s.memory_rss;
    // CRI's working set reads the hierarchical (total_*) figures.
    mem.total_cache = s.memory_cache;
    mem.total_rss = s.memory_rss;
    let mut entry = MemoryEntry::new();
    entry.usage = s.memory_usage;
    // The guest says 0 for no limit; CRI computes available bytes from it.
    entry.limit = if s.memory_limit == 0 {
        u64::MAX
    } else {
        s.memory_limit
    };
    entry.failcnt = s.oom_kills;
    mem.usage = Some(entry).into();
    m.memory = Some(mem).into();
    let mut pids = PidsStat::new();
    pids.current = s.pids_current;
    pids.limit = s.pids_limit;
    m.pids = Some(pids).into();
    let mut any = Any::new();
    any.type_url = "io.containerd.cgroups.v1.Metrics".into();
    any.value = m.write_to_bytes().unwrap_or_default();
    any
}

#[async_trait]
impl Task for HuskShim {
    async fn create(
        &self,
        _ctx: &TtrpcContext,
        req: api::CreateTaskRequest,
    ) -> TtrpcResult<api::CreateTaskResponse> {
        log::info!("create {}", req.id);
        let fail = |code, e: String| err(code, format!("husk: create {}: {e}", req.id));
        let _one_at_a_time = self.creating.lock().await;
        if self.pod().containers.contains_key(&req.id) {
            return Err(fail(Code::ALREADY_EXISTS, "it exists already".into()));
        }
        let spec =
            read_spec(Path::new(&req.bundle)).map_err(|e| fail(Code::INVALID_ARGUMENT, e))?;
        let role =
            Role::of(&spec, &req.id).map_err(|e| fail(Code::INVALID_ARGUMENT, e.to_string()))?;
        let pod_id = role.pod_id(&req.id).to_owned();
        let config = load_config(&req).map_err(|e| fail(Code::INVALID_ARGUMENT, e))?;
        let booted = self.pod().sandbox.as_ref().map(|sb| {
            (
                sb.id().to_owned(),
                sb.dir().to_path_buf(),
                sb.agent().cloned(),
            )
        });
        let (dir, agent) = match booted {
            Some((sb_id, _, _)) if sb_id != pod_id => {
                return Err(fail(
                    Code::FAILED_PRECONDITION,
                    format!("this shim serves pod {sb_id}, not pod {pod_id}"),
                ))
            }
            Some((_, dir, Some(agent))) => (dir, agent),
            Some((_, _, None)) => {
                return Err(fail(
                    Code::FAILED_PRECONDITION,
                    "the pod's VM is gone".into(),
                ))
            }
            None if matches!(role, Role::Member { .. }) => {
                return Err(fail(
                    Code::FAILED_PRECONDITION,
                    format!("pod {pod_id} has no sandbox VM in this shim"),
                ))
            }
            None => {
                let mut config = config;
                pod::size_guest(&mut config.guest, &spec, &req.id)
                    .map_err(|e| fail(Code::INVALID_ARGUMENT, e.to_string()))?;
                self.enter_cgroup(&spec, Path::new(&req.bundle))
                    .map_err(|e| fail(Code::FAILED_PRECONDITION, e))?;
                let id = pod_id.clone();
                let booted = tokio::task::spawn_blocking(move || boot_blocking(&id, &config))
                    .await
                    .map_err(|e| err(Code::INTERNAL, e))?;
                let sb = match booted {
                    Ok(sb) => sb,
                    Err(e) => {
                        self.stop_pod_if_empty().await;
                        return Err(fail(Code::FAILED_PRECONDITION, e));
                    }
                };
                let dir = sb.dir().to_path_buf();
                let agent = sb
                    .agent()
                    .cloned()
                    .ok_or_else(|| fail(Code::INTERNAL, "agent not connected".into()))?;
                self.pod().sandbox = Some(sb);
                (dir, agent)
            }
        };
        let sandbox_pid = self.pod().sandbox_pid(&pod_id);
        let (id, r, rl) = (req.id.clone(), req.clone(), role.clone());
        let created = tokio::task::spawn_blocking(move || {
            add_container(&id, &r, spec, &rl, sandbox_pid, &agent, &dir)
        })
        .await
        .map_err(|e| err(Code::INTERNAL, e))?;
        let init = match created {
            Ok(init) => init,
            Err(e) => {
                self.stop_pod_if_empty().await;
                return Err(fail(Code::FAILED_PRECONDITION, e));
            }
        };
        self.pod().containers.insert(
            req.id.clone(),
            Ctr {
                role,
                bundle: PathBuf::from(&req.bundle),
                init,
                execs: HashMap::new(),
                paused: false,
            },
        );
        let mut ev = TaskCreate::new();
        ev.container_id = req.id.clone();
        ev.bundle = req.bundle.clone();
        ev.rootfs = req.rootfs.clone();
        let mut io = containerd_shim::protos::events::task::TaskIO::new();
        io.terminal = req.terminal;
        io.stdin = req.stdin.clone();
        io.stdout = req.stdout.clone();
        io.stderr = req.stderr.clone();
        ev.io = Some(io).into();
        self.publish(topics::TASK_CREATE_EVENT_TOPIC, Box::new(ev))
            .await;
        Ok(api::CreateTaskResponse::new())
    }

    async fn start(
        &self,
        _ctx: &TtrpcContext,
        req: api::StartRequest,
    ) -> TtrpcResult<api::StartResponse> {
        log::info!("start {} {}", req.id, req.exec_id);
        let agent = self.agent()?;
        let (id, exec_id) = (req.id.clone(), req.exec_id.clone());
        let started = self.start_process(&id, &exec_id).await;
        let pid = match started {
            Ok(pid) => pid,
            Err(e) => {
                // As runc's shim does: a process that failed to start has
                // ended, so a Wait on it returns (containerd waits after
                // killing it in its cleanup, and the agent knows no such
                // process).
                let _ = self.with_proc(&id, &exec_id, |p| {
                    if p.exit.is_none() && p.pid == 0 {
                        let exit = Exit {
                            status: 255,
                            at: Some(now()),
                        };
                        p.exit = Some(exit.clone());
                        p.exited.send_replace(Some(exit));
                    }
                    Ok(())
                });
                return Err(e);
            }
        };
        let (stdin_stream, stdin_path) = self.with_proc(&id, &exec_id, |p| {
            p.pid = pid;
            Ok((p.stdin_stream.take(), p.stdin.clone()))
        })?;
        if let Some(s) = stdin_stream {
            let copier = pump_stdin(s, stdin_path);
            self.with_proc(&id, &exec_id, |p| {
                p.stdin_copier = Some(copier);
                Ok(())
            })?;
        }
        self.watch_exit(id.clone(), exec_id.clone(), pid, agent.clone());
        if exec_id.is_empty() {
            self.watch_oom(id.clone(), agent);
            let mut ev = TaskStart::new();
            ev.container_id = id;
            ev.pid = pid;
            self.publish(topics::TASK_START_EVENT_TOPIC, Box::new(ev))
                .await;
        } else {
            let mut ev = TaskExecStarted::new();
            ev.container_id = id;
            ev.exec_id = exec_id;
            ev.pid = pid;
            self.publish(topics::TASK_EXEC_STARTED_EVENT_TOPIC, Box::new(ev))
                .await;
        }
        let mut resp = api::StartResponse::new();
        resp.pid = pid;
        Ok(resp)
    }

    async fn state(
        &self,
        _ctx: &TtrpcContext,
        req: api::StateRequest,
    ) -> TtrpcResult<api::StateResponse> {
        self.with_ctr(&req.id, |c| {
            let paused = c.paused;
            let bundle = c.bundle.display().to_string();
            let p = c.proc(&req.exec_id)?;
            let mut resp = api::StateResponse::new();
            resp.id = req.id.clone();
            resp.exec_id = req.exec_id.clone();
            resp.bundle = bundle;
            resp.pid = p.pid;
            resp.status = p.status(paused).into();
            resp.stdin = p.stdin.clone();
            resp.stdout = p.stdout.clone();
            resp.stderr = p.stderr.clone();
            resp.terminal = p.terminal;
            if let Some(e) = &p.exit {
                resp.exit_status = e.status;
                resp.exited_at = e.at.clone().into();
            }
            Ok(resp)
        })
    }

    async fn wait(
        &self,
        _ctx: &TtrpcContext,
        req: api::WaitRequest,
    ) -> TtrpcResult<api::WaitResponse> {
        let mut rx = self.with_proc(&req.id, &req.exec_id, |p| Ok(p.exited.subscribe()))?;
        let exit = loop {
            if let Some(e) = rx.borrow().clone() {
                break e;
            }
            rx.changed().await.map_err(|e| err(Code::INTERNAL, e))?;
        };
        let mut resp = api::WaitResponse::new();
        resp.exit_status = exit.status;
        resp.exited_at = exit.at.into();
        Ok(resp)
    }

    async fn kill(&self, _ctx: &TtrpcContext, req: api::KillRequest) -> TtrpcResult<api::Empty> {
        log::info!("kill {} {} signal {}", req.id, req.exec_id, req.signal);
        let exited = self.with_proc(&req.id, &req.exec_id, |p| Ok(p.exit.is_some()))?;
        if exited {
            if req.exec_id.is_empty() {
                return Ok(api::Empty::new());
            }
            return Err(err(
                Code::NOT_FOUND,
                format!("exec {} has already exited", req.exec_id),
            ));
        }
        let exec = exec_opt(&req.exec_id);
        self.agent_call(&req.id, move |a, id| {
            a.signal_process(&id, exec.as_deref(), req.signal, req.all)
        })
        .await?;
        Ok(api::Empty::new())
    }

    async fn pids(
        &self,
        _ctx: &TtrpcContext,
        req: api::PidsRequest,
    ) -> TtrpcResult<api::PidsResponse> {
        let pids = self
            .agent_call(&req.id, |a, id| a.list_processes(&id))
            .await?;
        let mut resp = api::PidsResponse::new();
        resp.processes = pids
            .into_iter()
            .map(|pid| {
                let mut p = containerd_shim::protos::types::task::ProcessInfo::new();
                p.pid = pid;
                p
            })
            .collect();
        Ok(resp)
    }

    async fn pause(&self, _ctx: &TtrpcContext, req: api::PauseRequest) -> TtrpcResult<api::Empty> {
        self.agent_call(&req.id, |a, id| a.pause_container(&id))
            .await?;
        self.with_ctr(&req.id, |c| {
            c.paused = true;
            Ok(())
        })?;
        let mut ev = TaskPaused::new();
        ev.container_id = req.id.clone();
        self.publish(topics::TASK_PAUSED_EVENT_TOPIC, Box::new(ev))
            .await;
        Ok(api::Empty::new())
    }

    async fn resume(
        &self,
        _ctx: &TtrpcContext,
        req: api::ResumeRequest,
    ) -> TtrpcResult<api::Empty> {
        self.agent_call(&req.id, |a, id| a.resume_container(&id))
            .await?;
        self.with_ctr(&req.id, |c| {
            c.paused = false;
            Ok(())
        })?;
        let mut ev = TaskResumed::new();
        ev.container_id = req.id.clone();
        self.publish(topics::TASK_RESUMED_EVENT_TOPIC, Box::new(ev))
            .await;
        Ok(api::Empty::new())
    }

    async fn checkpoint(
        &self,
        _ctx: &TtrpcContext,
        _req: api::CheckpointTaskRequest,
    ) -> TtrpcResult<api::Empty> {
        Err(err(
            Code::UNIMPLEMENTED,
            "husk: checkpoint is not supported: the container's state lives in a guest \
             kernel; CRIU in the guest and a place to put its image are not built",
        ))
    }

    async fn exec(
        &self,
        _ctx: &TtrpcContext,
        req: api::ExecProcessRequest,
    ) -> TtrpcResult<api::Empty> {
        log::info!("exec {} {}", req.id, req.exec_id);
        if !husk_protocol::valid_id(&req.exec_id) {
            return Err(err(
                Code::INVALID_ARGUMENT,
                format!(
                    "exec id {:?} is not valid: use 1 to {} characters of [A-Za-z0-9_.-]",
                    req.exec_id,
                    husk_protocol::MAX_ID_LEN
                ),
            ));
        }
        let spec = req
            .spec
            .as_ref()
            .map(|a| a.value.clone())
            .ok_or_else(|| err(Code::INVALID_ARGUMENT, "exec without a process spec"))?;
        serde_json::from_slice::<serde_json::Value>(&spec).map_err(|e| {
            err(
                Code::INVALID_ARGUMENT,
                format!("exec {}: process spec is not JSON: {e}", req.exec_id),
            )
        })?;
        self.with_ctr(&req.id, |c| {
            if c.init.exit.is_some() || c.init.pid == 0 {
                return Err(err(
                    Code::FAILED_PRECONDITION,
                    format!("container {} is not running", req.id),
                ));
            }
            if c.execs.contains_key(&req.exec_id) {
                return Err(err(
                    Code::ALREADY_EXISTS,
                    format!("exec {} already exists", req.exec_id),
                ));
            }
            let mut p = Proc::new(&req.stdin, &req.stdout, &req.stderr, req.terminal);
            p.spec = Some(spec);
            c.execs.insert(req.exec_id.clone(), p);
            Ok(())
        })?;
        let mut ev = TaskExecAdded::new();
        ev.container_id = req.id.clone();
        ev.exec_id = req.exec_id.clone();
        self.publish(topics::TASK_EXEC_ADDED_EVENT_TOPIC, Box::new(ev))
            .await;
        Ok(api::Empty::new())
    }

    async fn resize_pty(
        &self,
        _ctx: &TtrpcContext,
        req: api::ResizePtyRequest,
    ) -> TtrpcResult<api::Empty> {
        let exec = exec_opt(&req.exec_id);
        self.agent_call(&req.id, move |a, id| {
            a.resize_pty(&id, exec.as_deref(), req.width, req.height)
        })
        .await?;
        Ok(api::Empty::new())
    }

    async fn close_io(
        &self,
        _ctx: &TtrpcContext,
        req: api::CloseIORequest,
    ) -> TtrpcResult<api::Empty> {
        if req.stdin {
            let (ctl, copier) = self.with_proc(&req.id, &req.exec_id, |p| {
                Ok((p.stdin_ctl.take(), p.stdin_copier.take()))
            })?;
            if let Some(c) = ctl {
                // The client usually closed the FIFO already and the copier
                // is draining it: give it a moment, then cut the stream so
                // the guest process reads EOF either way.
                if let Some(copier) = copier {
                    let deadline = std::time::Instant::now() + CLOSE_IO_GRACE;
                    while !copier.is_finished() && std::time::Instant::now() < deadline {
                        tokio::time::sleep(Duration::from_millis(5)).await;
                    }
                }
                let _ = c.shutdown(std::net::Shutdown::Write);
            }
        }
        Ok(api::Empty::new())
    }

    async fn update(
        &self,
        _ctx: &TtrpcContext,
        req: api::UpdateTaskRequest,
    ) -> TtrpcResult<api::Empty> {
        let resources = req
            .resources
            .as_ref()
            .map(|a| a.value.clone())
            .ok_or_else(|| err(Code::INVALID_ARGUMENT, "update without resources"))?;
        serde_json::from_slice::<serde_json::Value>(&resources).map_err(|e| {
            err(
                Code::INVALID_ARGUMENT,
                format!("update: resources are not JSON: {e}"),
            )
        })?;
        self.agent_call(&req.id, move |a, id| a.update_container(&id, resources))
            .await?;
        Ok(api::Empty::new())
    }

    async fn stats(
        &self,
        _ctx: &TtrpcContext,
        req: api::StatsRequest,
    ) -> TtrpcResult<api::StatsResponse> {
        let s = self
            .agent_call(&req.id, |a, id| a.container_stats(&id))
            .await?;
        let mut resp = api::StatsResponse::new();
        resp.stats = Some(metrics(&s)).into();
        Ok(resp)
    }

    async fn delete(
        &self,
        _ctx: &TtrpcContext,
        req: api::DeleteRequest,
    ) -> TtrpcResult<api::DeleteResponse> {
        log::info!("delete {} {}", req.id, req.exec_id);
        let mut resp = api::DeleteResponse::new();
        if !req.exec_id.is_empty() {
            let p = self.with_ctr(&req.id, |c| {
                c.execs
                    .remove(&req.exec_id)
                    .ok_or_else(|| err(Code::NOT_FOUND, format!("exec {} not found", req.exec_id)))
            })?;
            let exec = req.exec_id.clone();
            if let Err(e) = self
                .agent_call(&req.id, move |a, id| a.remove_process(&id, &exec))
                .await
            {
                log::warn!("remove exec {}: {e}", req.exec_id);
            }
            resp.pid = p.pid;
            let exit = p.exit.unwrap_or(Exit {
                status: 128 + 9,
                at: Some(now()),
            });
            resp.exit_status = exit.status;
            resp.exited_at = exit.at.into();
            return Ok(resp);
        }
        let removed = self.pod().containers.remove(&req.id);
        let Some(c) = removed else {
            return Err(err(
                Code::NOT_FOUND,
                format!("container {} not created", req.id),
            ));
        };
        resp.pid = c.init.pid;
        let exit = c.init.exit.clone().unwrap_or(Exit {
            status: 128 + 9,
            at: Some(now()),
        });
        resp.exit_status = exit.status;
        resp.exited_at = exit.at.clone().into();
        let target = self
            .pod()
            .sandbox
            .as_ref()
            .map(|sb| (sb.agent().cloned(), sb.dir().to_path_buf()));
        if let Some((agent, dir)) = target {
            let id = req.id.clone();
            let _ = tokio::task::spawn_blocking(move || {
                if let Some(agent) = agent {
                    if let Err(e) = agent.remove_container(&id) {
                        log::warn!("remove {id} in the guest: {}", error_chain(&e));
                    }
                }
                ContainerPaths::new(&dir, &id).release();
            })
            .await;
        }
        self.stop_pod_if_empty().await;
        let mut ev = TaskDelete::new();
        ev.container_id = req.id.clone();
        ev.id = req.id.clone();
        ev.pid = resp.pid;
        ev.exit_status = resp.exit_status;
        ev.exited_at = resp.exited_at.clone();
        self.publish(topics::TASK_DELETE_EVENT_TOPIC, Box::new(ev))
            .await;
        Ok(resp)
    }

    async fn connect(
        &self,
        _ctx: &TtrpcContext,
        req: api::ConnectRequest,
    ) -> TtrpcResult<api::ConnectResponse> {
        let mut resp = api::ConnectResponse::new();
        resp.shim_pid = std::process::id();
        resp.task_pid = self
            .pod()
            .containers
            .get(&req.id)
            .map(|c| c.init.pid)
            .unwrap_or(0);
        resp.version = env!("CARGO_PKG_VERSION").to_owned();
        Ok(resp)
    }

    /// containerd asks after every task's delete; the shim ends only with
    /// the pod's last container.
    async fn shutdown(
        &self,
        _ctx: &TtrpcContext,
        _req: api::ShutdownRequest,
    ) -> TtrpcResult<api::Empty> {
        let left = self.pod().containers.len();
        if left > 0 {
            log::info!("shutdown: {left} containers left; staying");
            return Ok(api::Empty::new());
        }
        log::info!("shutdown");
        self.stop_pod_if_empty().await;
        self.exit_signal.signal();
        Ok(api::Empty::new())
    }
}

impl HuskShim {
    /// Starts a created container's init, or an added exec, in the guest:
    /// its streams, then the agent's start. Returns the guest pid.
    async fn start_process(&self, id: &str, exec_id: &str) -> TtrpcResult<u32> {
        let (id, exec_id) = (id.to_owned(), exec_id.to_owned());
        if exec_id.is_empty() {
            self.agent_call(&id, |a, id| a.start_container(&id)).await
        } else {
            let sock = self.agent_socket()?;
            let (spec, proc_copy) = self.with_proc(&id, &exec_id, |p| {
                if p.pid != 0 {
                    return Err(err(
                        Code::FAILED_PRECONDITION,
                        format!("exec {exec_id} already started"),
                    ));
                }
                let spec = p.spec.clone().unwrap_or_default();
                Ok((spec, Proc::new(&p.stdin, &p.stdout, &p.stderr, p.terminal)))
            })?;
            let e = exec_id.clone();
            let (pid, stdin, pumps) = self
                .agent_call(&id, move |a, id| {
                    let (stdio, stdin, outputs) = open_streams(&sock, &id, Some(&e), &proc_copy)?;
                    let pid = a
                        .exec_process(&id, &e, spec, stdio)
                        .map_err(|err| error_chain(&err))?;
                    Ok::<_, String>((pid, stdin, pump_outputs(outputs)))
                })
                .await?;
            self.with_proc(&id, &exec_id, |p| {
                p.stdin_ctl = stdin.as_ref().and_then(|s| s.try_clone().ok());
                p.stdin_stream = stdin;
                p.pumps = pumps;
                Ok(())
            })?;
            Ok(pid)
        }
    }

    /// Stops the pod's VM once no container is left in it, and removes the
    /// pod's host cgroup after it.
    async fn stop_pod_if_empty(&self) {
        let (sb, cg) = {
            let mut pod = self.pod();
            if !pod.containers.is_empty() {
                return;
            }
            (pod.sandbox.take(), pod.cgroup.take())
        };
        let _ = tokio::task::spawn_blocking(move || {
            if let Some(sb) = sb {
                let _ = sb.shutdown();
            }
            if let Some(cg) = cg {
                cg.remove();
            }
        })
        .await;
    }

    /// Moves the shim into the cgroup the booting spec names (its
    /// `linux.cgroupsPath`), so the VMM and daemons it starts are charged to
    /// the pod, and records it in the bundle for `delete` after a crash.
    fn enter_cgroup(&self, spec: &serde_json::Value, bundle: &Path) -> Result<(), String> {
        let Some(path) = spec
            .pointer("/linux/cgroupsPath")
            .and_then(serde_json::Value::as_str)
            .filter(|p| !p.is_empty())
        else {
            return Ok(());
        };
        let cg = PodCgroup::enter(path).map_err(|e| error_chain(&e))?;
        if let Err(e) = cgroup::record(&bundle.join(cgroup::RECORD_FILE), &cg) {
            log::warn!("recording the pod's cgroup in {}: {e}", bundle.display());
        }
        self.pod().cgroup = Some(cg);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use husk_runtime::agent::AgentError;

    use super::*;

    fn rpc_error(code: ttrpc::Code) -> AgentError {
        AgentError::Rpc {
            rpc: "SignalProcess",
            error: ttrpc::Error::RpcStatus(ttrpc::get_status(code, "exec e1 not found")),
        }
    }

    #[test]
    fn the_agents_not_found_stays_not_found_and_the_rest_is_internal() {
        assert_eq!(rpc_error(ttrpc::Code::NOT_FOUND).code(), Code::NOT_FOUND);
        assert_eq!(
            rpc_error(ttrpc::Code::INVALID_ARGUMENT).code(),
            Code::INTERNAL
        );
        let e = rpc_error(ttrpc::Code::NOT_FOUND);
        assert!(
            e.describe().contains("exec e1 not found"),
            "{}",
            e.describe()
        );
        assert_eq!("bad".to_owned().code(), Code::INTERNAL);
    }

    #[test]
    fn delete_leaves_a_live_shim_alone_and_clears_a_dead_ones_socket() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("shim.sock");
        let file = dir.path().join(ADDRESS_FILE);
        std::fs::write(&file, format!("unix://{}", sock.display())).unwrap();
        let listener = std::os::unix::net::UnixListener::bind(&sock).unwrap();
        assert!(shim_alive(&file), "a listening shim is alive");
        drop(listener);
        assert!(!shim_alive(&file), "nobody listens any more");
        remove_stale_socket(&file);
        assert!(!sock.exists(), "the dead shim's socket is removed");
        assert!(!shim_alive(&dir.path().join("missing")));
    }
}
