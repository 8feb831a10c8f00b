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

struct State {
    sandbox: Option<Sandbox>,
    bundle: PathBuf,
    init: Proc,
    execs: HashMap<String, Proc>,
    paused: bool,
}

impl State {
    fn proc(&mut self, exec_id: &str) -> TtrpcResult<&mut Proc> {
        if exec_id.is_empty() {
            return Ok(&mut self.init);
        }
        self.execs
            .get_mut(exec_id)
            .ok_or_else(|| err(Code::NOT_FOUND, format!("exec {exec_id} not found")))
    }
}

#[derive(Clone)]
pub struct HuskShim {
    exit_signal: Arc<ExitSignal>,
    namespace: String,
    id: String,
    bundle: String,
    publisher: Option<Arc<RemotePublisher>>,
    state: Arc<Mutex<Option<State>>>,
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

/// Removes the socket of a shim that died, if it is still there.
fn remove_stale_socket(address_file: &Path) {
    use std::os::unix::fs::FileTypeExt;
    let Ok(address) = std::fs::read_to_string(address_file) else {
        return;
    };
    let path = Path::new(address.trim().trim_start_matches("unix://"));
    if std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_socket()) {
        let _ = std::fs::remove_file(path);
    }
}

/// An error as the client should read it, causes included.
trait Describe {
    fn describe(&self) -> String;
}

impl Describe for husk_runtime::agent::AgentError {
    fn describe(&self) -> String {
        error_chain(self)
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
            state: Arc::new(Mutex::new(None)),
        }
    }

    async fn start_shim(&mut self, opts: StartOpts) -> Result<String, Error> {
        let grouping = opts.id.clone();
        let address = spawn(opts, &grouping, Vec::new()).await?;
        // The shim server removes its socket on exit only if it finds the
        // address here (containerd-shim 0.10 writes it in one path only);
        // `delete` after a crash uses it too.
        if let Err(e) = std::fs::write(ADDRESS_FILE, &address) {
            log::warn!("recording the shim address: {e}");
        }
        Ok(address)
    }

    /// Cleans up after a shim that died: its sandbox directory, mounts and
    /// any process still running from it.
    async fn delete_shim(&mut self) -> Result<api::DeleteResponse, Error> {
        let explicit = options::saved_config_path(Path::new(&self.bundle));
        let config = Config::load(explicit.as_deref())
            .map(|(c, _)| c)
            .unwrap_or_default();
        let dir = husk_runtime::sandbox::sandbox_dir(&config, &self.id);
        if husk_runtime::sandbox::validate_id(&self.id).is_ok() && dir.exists() {
            storage::unmount_all_under(&dir);
            let _ = std::fs::remove_dir_all(&dir);
        }
        remove_stale_socket(&Path::new(&self.bundle).join(ADDRESS_FILE));
        let mut resp = api::DeleteResponse::new();
        resp.exit_status = 128 + 9;
        resp.exited_at = Some(now()).into();
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

    fn state(&self) -> std::sync::MutexGuard<'_, Option<State>> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Runs `f` on the state, which must exist.
    fn with_state<T>(&self, f: impl FnOnce(&mut State) -> TtrpcResult<T>) -> TtrpcResult<T> {
        let mut st = self.state();
        let s = st.as_mut().ok_or_else(|| {
            err(
                Code::NOT_FOUND,
                format!("container {} not created", self.id),
            )
        })?;
        f(s)
    }

    /// Runs a blocking agent call off the async runtime; errors become INTERNAL.
    async fn agent_call<T, E>(
        &self,
        call: impl FnOnce(Agent, String) -> Result<T, E> + Send + 'static,
    ) -> TtrpcResult<T>
    where
        T: Send + 'static,
        E: Describe + Send + 'static,
    {
        let agent = self.agent()?;
        let id = self.id.clone();
        tokio::task::spawn_blocking(move || call(agent, id))
            .await
            .map_err(|e| err(Code::INTERNAL, e))?
            .map_err(|e| err(Code::INTERNAL, e.describe()))
    }

    fn agent(&self) -> Result<Agent, containerd_shim::protos::ttrpc::Error> {
        self.with_state(|s| {
            s.sandbox
                .as_ref()
                .and_then(|sb| sb.agent().cloned())
                .ok_or_else(|| err(Code::NOT_FOUND, "sandbox has no agent"))
        })
    }

    fn agent_socket(&self) -> TtrpcResult<PathBuf> {
        self.with_state(|s| {
            s.sandbox
                .as_ref()
                .map(|sb| sb.dir().join("agent.sock"))
                .ok_or_else(|| err(Code::NOT_FOUND, "no sandbox"))
        })
    }

    /// Watches a started process: publishes its exit once the agent reports
    /// it and the output has reached containerd's FIFOs. For the init it
    /// also forwards OOM kills.
    fn watch_exit(&self, exec_id: String, pid: u32, agent: Agent) {
        let me = self.clone();
        tokio::spawn(async move {
            let (id, exec) = (me.id.clone(), exec_opt(&exec_id));
            let status =
                tokio::task::spawn_blocking(move || agent.wait_process(&id, exec.as_deref())).await;
            let status = match status
                .map_err(|e| e.to_string())
                .and_then(|r| r.map_err(|e| e.to_string()))
            {
                Ok(s) => s,
                Err(e) => {
                    log::error!("wait for {} {exec_id}: {e}", me.id);
                    255
                }
            };
            let pumps = me
                .with_state(|s| Ok(std::mem::take(&mut s.proc(&exec_id)?.pumps)))
                .unwrap_or_default();
            let _ =
                tokio::task::spawn_blocking(move || pumps.into_iter().for_each(|p| drop(p.join())))
                    .await;
            let exit = Exit {
                status,
                at: Some(now()),
            };
            let sender = me
                .with_state(|s| {
                    let p = s.proc(&exec_id)?;
                    p.exit = Some(exit.clone());
                    Ok(p.exited.clone())
                })
                .ok();
            let mut ev = TaskExit::new();
            ev.container_id = me.id.clone();
            ev.id = if exec_id.is_empty() {
                me.id.clone()
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
        });
    }

    fn watch_oom(&self, agent: Agent) {
        let me = self.clone();
        tokio::spawn(async move {
            loop {
                let (a, id) = (agent.clone(), me.id.clone());
                match tokio::task::spawn_blocking(move || a.wait_oom(&id)).await {
                    Ok(Ok(true)) => {
                        let mut ev = TaskOOM::new();
                        ev.container_id = me.id.clone();
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

/// Copies each output stream into its FIFO, from a thread each.
fn pump_outputs(outputs: Vec<(UnixStream, String)>) -> Vec<std::thread::JoinHandle<()>> {
    outputs
        .into_iter()
        .map(|(mut s, fifo)| {
            std::thread::spawn(move || {
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

/// Boots the sandbox, mounts the rootfs, opens the streams and creates the
/// container in the guest. Blocking: run on a blocking thread.
fn create_blocking(id: &str, req: &api::CreateTaskRequest) -> Result<State, String> {
    let config_path = Path::new(&req.bundle).join("config.json");
    let spec = std::fs::read(&config_path)
        .map_err(|e| format!("reading {}: {e}", config_path.display()))?;
    let mut spec: serde_json::Value = serde_json::from_slice(&spec)
        .map_err(|e| format!("{} is not valid JSON: {e}", config_path.display()))?;
    let explicit = options::config_path(req.options.as_ref())?;
    if let Some(p) = &explicit {
        options::save_config_path(Path::new(&req.bundle), p)?;
    }
    let (config, _) = Config::load(explicit.as_deref()).map_err(|e| e.to_string())?;
    let sb = Sandbox::boot(&config, id).map_err(|e| error_chain(&e))?;
    let mounts: Vec<MountSpec> = req
        .rootfs
        .iter()
        .map(|m| MountSpec {
            fstype: m.type_.clone(),
            source: m.source.clone(),
            options: m.options.clone(),
        })
        .collect();
    storage::mount_rootfs(
        &mounts,
        &sb.dir().join("rootfs").join(id),
        &sb.dir().join("shared").join(id).join("rootfs"),
    )
    .map_err(|e| format!("rootfs: {}", error_chain(&e)))?;
    storage::share_bind_mounts(
        &mut spec,
        &sb.dir().join("binds").join(id),
        &sb.dir().join("shared").join(id).join("binds"),
        &Path::new(husk_protocol::GUEST_SHARE_DIR)
            .join(id)
            .join("binds"),
    )
    .map_err(|e| error_chain(&e))?;
    let spec = serde_json::to_vec(&spec).map_err(|e| e.to_string())?;
    let mut init = Proc::new(&req.stdin, &req.stdout, &req.stderr, req.terminal);
    let (stdio, stdin, outputs) = open_streams(&sb.dir().join("agent.sock"), id, None, &init)?;
    let agent = sb.agent().ok_or("agent not connected")?;
    agent
        .create_container(id, spec, stdio)
        .map_err(|e| error_chain(&e))?;
    init.stdin_ctl = stdin.as_ref().and_then(|s| s.try_clone().ok());
    init.stdin_stream = stdin;
    init.pumps = pump_outputs(outputs);
    Ok(State {
        sandbox: Some(sb),
        bundle: PathBuf::from(&req.bundle),
        init,
        execs: HashMap::new(),
        paused: false,
    })
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
    let mut entry = MemoryEntry::new();
    entry.usage = s.memory_usage;
    entry.limit = s.memory_limit;
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
        let id = req.id.clone();
        let r = req.clone();
        let state = tokio::task::spawn_blocking(move || create_blocking(&id, &r))
            .await
            .map_err(|e| err(Code::INTERNAL, e))?
            .map_err(|e| {
                err(
                    Code::FAILED_PRECONDITION,
                    format!("husk: create {}: {e}", req.id),
                )
            })?;
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
        *self.state() = Some(state);
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
        let exec_id = req.exec_id.clone();
        let pid = if exec_id.is_empty() {
            self.agent_call(|a, id| a.start_container(&id)).await?
        } else {
            let sock = self.agent_socket()?;
            let (spec, proc_copy) = self.with_state(|s| {
                let p = s.proc(&exec_id)?;
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
                .agent_call(move |a, id| {
                    let (stdio, stdin, outputs) = open_streams(&sock, &id, Some(&e), &proc_copy)?;
                    let pid = a
                        .exec_process(&id, &e, spec, stdio)
                        .map_err(|err| error_chain(&err))?;
                    Ok::<_, String>((pid, stdin, pump_outputs(outputs)))
                })
                .await?;
            self.with_state(|s| {
                let p = s.proc(&exec_id)?;
                p.stdin_ctl = stdin.as_ref().and_then(|s| s.try_clone().ok());
                p.stdin_stream = stdin;
                p.pumps = pumps;
                Ok(())
            })?;
            pid
        };
        let (stdin_stream, stdin_path) = self.with_state(|s| {
            let p = s.proc(&exec_id)?;
            p.pid = pid;
            Ok((p.stdin_stream.take(), p.stdin.clone()))
        })?;
        if let Some(s) = stdin_stream {
            let copier = pump_stdin(s, stdin_path);
            self.with_state(|s| {
                s.proc(&exec_id)?.stdin_copier = Some(copier);
                Ok(())
            })?;
        }
        self.watch_exit(exec_id.clone(), pid, agent.clone());
        if exec_id.is_empty() {
            self.watch_oom(agent);
            let mut ev = TaskStart::new();
            ev.container_id = self.id.clone();
            ev.pid = pid;
            self.publish(topics::TASK_START_EVENT_TOPIC, Box::new(ev))
                .await;
        } else {
            let mut ev = TaskExecStarted::new();
            ev.container_id = self.id.clone();
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
        self.with_state(|s| {
            let paused = s.paused;
            let bundle = s.bundle.display().to_string();
            let p = s.proc(&req.exec_id)?;
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
        let mut rx = self.with_state(|s| Ok(s.proc(&req.exec_id)?.exited.subscribe()))?;
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
        let exited = self.with_state(|s| Ok(s.proc(&req.exec_id)?.exit.is_some()))?;
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
        self.agent_call(move |a, id| a.signal_process(&id, exec.as_deref(), req.signal, req.all))
            .await?;
        Ok(api::Empty::new())
    }

    async fn pids(
        &self,
        _ctx: &TtrpcContext,
        _req: api::PidsRequest,
    ) -> TtrpcResult<api::PidsResponse> {
        let pids = self.agent_call(|a, id| a.list_processes(&id)).await?;
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

    async fn pause(&self, _ctx: &TtrpcContext, _req: api::PauseRequest) -> TtrpcResult<api::Empty> {
        self.agent_call(|a, id| a.pause_container(&id)).await?;
        self.with_state(|s| {
            s.paused = true;
            Ok(())
        })?;
        let mut ev = TaskPaused::new();
        ev.container_id = self.id.clone();
        self.publish(topics::TASK_PAUSED_EVENT_TOPIC, Box::new(ev))
            .await;
        Ok(api::Empty::new())
    }

    async fn resume(
        &self,
        _ctx: &TtrpcContext,
        _req: api::ResumeRequest,
    ) -> TtrpcResult<api::Empty> {
        self.agent_call(|a, id| a.resume_container(&id)).await?;
        self.with_state(|s| {
            s.paused = false;
            Ok(())
        })?;
        let mut ev = TaskResumed::new();
        ev.container_id = self.id.clone();
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
        self.with_state(|s| {
            if s.init.exit.is_some() || s.init.pid == 0 {
                return Err(err(
                    Code::FAILED_PRECONDITION,
                    format!("container {} is not running", req.id),
                ));
            }
            if s.execs.contains_key(&req.exec_id) {
                return Err(err(
                    Code::ALREADY_EXISTS,
                    format!("exec {} already exists", req.exec_id),
                ));
            }
            let mut p = Proc::new(&req.stdin, &req.stdout, &req.stderr, req.terminal);
            p.spec = Some(spec);
            s.execs.insert(req.exec_id.clone(), p);
            Ok(())
        })?;
        let mut ev = TaskExecAdded::new();
        ev.container_id = self.id.clone();
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
        self.agent_call(move |a, id| a.resize_pty(&id, exec.as_deref(), req.width, req.height))
            .await?;
        Ok(api::Empty::new())
    }

    async fn close_io(
        &self,
        _ctx: &TtrpcContext,
        req: api::CloseIORequest,
    ) -> TtrpcResult<api::Empty> {
        if req.stdin {
            let (ctl, copier) = self.with_state(|s| {
                let p = s.proc(&req.exec_id)?;
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
        self.agent_call(move |a, id| a.update_container(&id, resources))
            .await?;
        Ok(api::Empty::new())
    }

    async fn stats(
        &self,
        _ctx: &TtrpcContext,
        _req: api::StatsRequest,
    ) -> TtrpcResult<api::StatsResponse> {
        let s = self.agent_call(|a, id| a.container_stats(&id)).await?;
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
            let p = self.with_state(|s| {
                s.execs
                    .remove(&req.exec_id)
                    .ok_or_else(|| err(Code::NOT_FOUND, format!("exec {} not found", req.exec_id)))
            })?;
            let exec = req.exec_id.clone();
            if let Err(e) = self
                .agent_call(move |a, id| a.remove_process(&id, &exec))
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
        let state = self.state().take();
        if let Some(mut s) = state {
            resp.pid = s.init.pid;
            let exit = s.init.exit.clone().unwrap_or(Exit {
                status: 128 + 9,
                at: Some(now()),
            });
            resp.exit_status = exit.status;
            resp.exited_at = exit.at.clone().into();
            if let Some(sb) = s.sandbox.take() {
                let id = self.id.clone();
                let _ = tokio::task::spawn_blocking(move || {
                    if let Some(agent) = sb.agent() {
                        let _ = agent.remove_container(&id);
                    }
                    storage::unmount_all_under(&sb.dir().join("shared"));
                    storage::unmount_all_under(&sb.dir().join("rootfs"));
                    storage::unmount_all_under(&sb.dir().join("binds"));
                    let _ = sb.shutdown();
                })
                .await;
            }
            let mut ev = TaskDelete::new();
            ev.container_id = self.id.clone();
            ev.id = self.id.clone();
            ev.pid = resp.pid;
            ev.exit_status = resp.exit_status;
            ev.exited_at = resp.exited_at.clone();
            self.publish(topics::TASK_DELETE_EVENT_TOPIC, Box::new(ev))
                .await;
        }
        Ok(resp)
    }

    async fn connect(
        &self,
        _ctx: &TtrpcContext,
        _req: api::ConnectRequest,
    ) -> TtrpcResult<api::ConnectResponse> {
        let mut resp = api::ConnectResponse::new();
        resp.shim_pid = std::process::id();
        resp.task_pid = self.state().as_ref().map(|s| s.init.pid).unwrap_or(0);
        resp.version = env!("CARGO_PKG_VERSION").to_owned();
        Ok(resp)
    }

    async fn shutdown(
        &self,
        _ctx: &TtrpcContext,
        _req: api::ShutdownRequest,
    ) -> TtrpcResult<api::Empty> {
        log::info!("shutdown");
        let state = self.state().take();
        if let Some(mut s) = state {
            if let Some(sb) = s.sandbox.take() {
                let _ = tokio::task::spawn_blocking(move || sb.shutdown()).await;
            }
        }
        self.exit_signal.signal();
        Ok(api::Empty::new())
    }
}
