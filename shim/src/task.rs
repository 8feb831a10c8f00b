//! The shim's Task service: containerd's task API mapped one call to one
//! method of the runtime's pod API ([`PodService`]), which owns the pod's VM,
//! its containers and their processes. What is left here is the wire:
//! requests in, responses and events out, and one mapping of errors to
//! ttrpc codes ([`status`]).

use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{channel, Receiver};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use containerd_shim::asynchronous::{spawn, ExitSignal, Shim};
use containerd_shim::protos::api;
use containerd_shim::protos::events::task::{
    TaskCreate, TaskDelete, TaskExecAdded, TaskExecStarted, TaskExit, TaskIO, TaskOOM, TaskPaused,
    TaskResumed, TaskStart,
};
use containerd_shim::protos::protobuf::well_known_types::any::Any;
use containerd_shim::protos::protobuf::well_known_types::timestamp::Timestamp;
use containerd_shim::protos::protobuf::{Message, MessageDyn};
use containerd_shim::protos::shim_async::Task;
use containerd_shim::protos::topics;
use containerd_shim::protos::ttrpc::r#async::TtrpcContext;
use containerd_shim::protos::ttrpc::{Code, Error as ShimTtrpcError};
use containerd_shim::publisher::RemotePublisher;
use containerd_shim::{Config as ShimConfig, Error, Flags, StartOpts, TtrpcResult};
use husk_protocol::{ContainerId, ExecId, InvalidId, SandboxId};
use husk_runtime::host::cgroup;
use husk_runtime::host::paths::SandboxPaths;
use husk_runtime::host::storage::MountSpec;
use husk_runtime::pod::backend::pod_netns;
use husk_runtime::pod::service::read_spec;
use husk_runtime::pod::{
    CreateRequest, ErrorKind, Event, Exit, Io, PodApiError, PodService, Role, Status, Stream,
    VmBackend,
};
use husk_runtime::{error_chain, Config};

use containerd_shim_husk_v2::options;

/// File in the bundle holding the shim's ttrpc address.
const ADDRESS_FILE: &str = "address";

type Pod = PodService<VmBackend>;

#[derive(Clone)]
pub struct HuskShim {
    exit_signal: Arc<ExitSignal>,
    namespace: String,
    /// The shim's own id: the pod's first container.
    id: String,
    bundle: String,
    pod: Pod,
    /// The pod's events until the task service takes them.
    events: Arc<Mutex<Option<Receiver<Event>>>>,
}

/// The one mapping of the pod API's failures to ttrpc statuses.
fn code(kind: ErrorKind) -> Code {
    match kind {
        ErrorKind::NotFound => Code::NOT_FOUND,
        ErrorKind::AlreadyExists => Code::ALREADY_EXISTS,
        ErrorKind::InvalidArgument => Code::INVALID_ARGUMENT,
        ErrorKind::FailedPrecondition => Code::FAILED_PRECONDITION,
        ErrorKind::ResourceExhausted => Code::RESOURCE_EXHAUSTED,
        ErrorKind::Internal => Code::INTERNAL,
    }
}

/// An id from a request, checked here, where it enters (a bad one is
/// INVALID_ARGUMENT, naming it and the rule).
fn parsed<T: std::str::FromStr<Err = InvalidId>>(id: &str) -> TtrpcResult<T> {
    id.parse()
        .map_err(|e: InvalidId| status_of(Code::INVALID_ARGUMENT, format!("husk: {e}")))
}

/// A request's container id.
fn container_id(id: &str) -> TtrpcResult<ContainerId> {
    parsed(id)
}

/// A request's exec id; empty names the container's init.
fn exec_id(exec_id: &str) -> TtrpcResult<Option<ExecId>> {
    (!exec_id.is_empty()).then(|| parsed(exec_id)).transpose()
}

fn status_of(code: Code, msg: String) -> ShimTtrpcError {
    tracing::error!("{msg}");
    ShimTtrpcError::RpcStatus(containerd_shim::protos::ttrpc::get_status(code, msg))
}

/// An error as containerd gets it: its code and every cause.
fn status(e: PodApiError) -> ShimTtrpcError {
    status_of(code(e.kind()), error_chain(&e))
}

fn timestamp(t: SystemTime) -> Timestamp {
    let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    let mut ts = Timestamp::new();
    ts.seconds = d.as_secs() as i64;
    ts.nanos = d.subsec_nanos() as i32;
    ts
}

/// The socket path a bundle's `address` file names.
fn recorded_socket(address_file: &Path) -> Option<PathBuf> {
    let address = std::fs::read_to_string(address_file).ok()?;
    Some(PathBuf::from(address.trim().trim_start_matches("unix://")))
}

/// How long a live shim takes at most to answer `delete`'s Connect call.
const ALIVE_TIMEOUT: Duration = Duration::from_secs(1);

/// Whether a shim still serves on the socket a bundle records: the pod's
/// shim, which outlives each of its containers. It must answer a Connect
/// call: a killed shim's listening socket can still take a connection,
/// because containerd sees the task's connection close (and runs `delete`)
/// while the kernel is still closing the dying shim's other descriptors.
/// Taking that for a live shim skipped the cleanup (about 1 in 8 runs of
/// the killed-shim test after the restart test).
fn shim_alive(address_file: &Path) -> bool {
    use containerd_shim::protos::shim::shim_ttrpc::TaskClient;
    use containerd_shim::protos::ttrpc;
    let Some(path) = recorded_socket(address_file) else {
        return false;
    };
    if UnixStream::connect(&path).is_err() {
        return false;
    }
    let Ok(client) = ttrpc::Client::connect(&format!("unix://{}", path.display())) else {
        return false;
    };
    let ctx = ttrpc::context::with_timeout(ALIVE_TIMEOUT.as_nanos() as i64);
    TaskClient::new(client)
        .connect(ctx, &api::ConnectRequest::new())
        .is_ok()
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

#[async_trait]
impl Shim for HuskShim {
    type T = HuskShim;

    async fn new(_runtime_id: &str, args: &Flags, _config: &mut ShimConfig) -> Self {
        let (tx, rx) = channel();
        HuskShim {
            exit_signal: Arc::new(ExitSignal::default()),
            namespace: args.namespace.clone(),
            id: args.id.clone(),
            bundle: args.bundle.clone(),
            pod: PodService::new(VmBackend::new(args.namespace.clone()), tx),
            events: Arc::new(Mutex::new(Some(rx))),
        }
    }

    /// One shim per pod: an app container of a CRI pod is served by its
    /// sandbox's shim (the spawned process finds that shim's socket in use,
    /// records its address in this bundle and exits).
    async fn start_shim(&mut self, opts: StartOpts) -> Result<String, Error> {
        let spec = read_spec(Path::new(".")).map_err(|e| Error::InvalidArgument(e.to_string()))?;
        let role = Role::of(&spec, &opts.id).map_err(|e| Error::InvalidArgument(e.to_string()))?;
        let grouping = role.pod_id(&opts.id).to_owned();
        let address = spawn(opts, &grouping, Vec::new()).await?;
        // The shim server removes its socket on exit only if it finds the
        // address here (containerd-shim 0.10 writes it in one path only);
        // `delete` after a crash uses it too.
        if let Err(e) = std::fs::write(ADDRESS_FILE, &address) {
            tracing::warn!("recording the shim address: {e}");
        }
        Ok(address)
    }

    /// Cleans up a container after its shim died: its mounts and state in
    /// the pod's sandbox directory, the directory with the pod's last
    /// container, and the pod's host cgroup with its booting container.
    /// (The VMM and daemons die with the shim.)
    async fn delete_shim(&mut self) -> Result<api::DeleteResponse, Error> {
        let bundle = Path::new(&self.bundle);
        let mut resp = api::DeleteResponse::new();
        resp.exit_status = husk_runtime::pod::service::KILLED_STATUS;
        resp.exited_at = Some(timestamp(SystemTime::now())).into();
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
        let spec = read_spec(bundle).ok();
        let role = spec
            .as_ref()
            .and_then(|s| Role::of(s, &self.id).ok())
            .unwrap_or(Role::Single);
        // The tap went with the VMM; the redirect on the CNI link and the
        // port-forward rules did not.
        if role == Role::Sandbox {
            if let Some(netns) = spec.as_ref().and_then(pod_netns) {
                if let Err(e) = husk_runtime::host::network::cleanup(&netns) {
                    tracing::warn!(
                        "removing the pod's taps in {}: {}",
                        netns.display(),
                        error_chain(&e)
                    );
                }
                if let Err(e) = husk_runtime::pod::portforward::cleanup(&netns) {
                    tracing::warn!("{}", error_chain(&e));
                }
            }
        }
        // Whatever of the pod's VM did not die with the shim is in the
        // pod's cgroup, which goes with its booting container: first, so no
        // VMM or daemon is alive while the mounts below go.
        let record = bundle.join(cgroup::RECORD_FILE);
        cgroup::remove_recorded(&record);
        // Only what this task's sandbox owns: a create that collided with
        // another pod's directory (or never made one) removes nothing.
        let paths = SandboxId::parse(role.pod_id(&self.id))
            .map_err(|e| e.to_string())
            .and_then(|pod| {
                SandboxPaths::new(&config, &self.namespace, &pod).map_err(|e| e.to_string())
            });
        match paths {
            Ok(paths) if husk_runtime::host::paths::bundle_owns(bundle, &paths) => {
                let done = husk_runtime::pod::cleanup::cleanup(&paths, Some(&self.id));
                if !done.killed.is_empty() {
                    tracing::info!(
                        "delete of {}: killed what was left of its pod: {:?}",
                        self.id,
                        done.killed
                    );
                }
            }
            Ok(paths) if paths.root().exists() => tracing::info!(
                "delete of {} in namespace {}: sandbox {} is not this task's (owner record differs); left as it is",
                self.id,
                self.namespace,
                paths.root().display()
            ),
            Ok(_) => {}
            Err(e) => tracing::warn!("delete of {}: {e}", self.id),
        }
        remove_stale_socket(&bundle.join(ADDRESS_FILE));
        Ok(resp)
    }

    async fn wait(&mut self) {
        self.exit_signal.wait().await;
    }

    /// The task service, and one publisher of the pod's events, in order.
    async fn create_task_service(&self, publisher: RemotePublisher) -> Self::T {
        let rx = self.events.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(rx) = rx {
            let namespace = self.namespace.clone();
            let rt = tokio::runtime::Handle::current();
            tokio::task::spawn_blocking(move || {
                while let Ok(ev) = rx.recv() {
                    let (topic, msg) = message(ev);
                    if let Err(e) =
                        rt.block_on(publisher.publish(Default::default(), topic, &namespace, msg))
                    {
                        tracing::warn!("publish {topic}: {e}");
                    }
                }
            });
        }
        self.clone()
    }
}

/// A pod event as containerd's task event.
fn message(ev: Event) -> (&'static str, Box<dyn MessageDyn>) {
    match ev {
        Event::Created {
            id,
            bundle,
            rootfs,
            io,
        } => {
            let mut ev = TaskCreate::new();
            ev.container_id = id;
            ev.bundle = bundle.display().to_string();
            ev.rootfs = rootfs
                .into_iter()
                .map(|m| {
                    let mut mount = containerd_shim::protos::types::mount::Mount::new();
                    mount.type_ = m.fstype;
                    mount.source = m.source;
                    mount.options = m.options;
                    mount
                })
                .collect();
            let mut tio = TaskIO::new();
            tio.terminal = io.terminal;
            tio.stdin = io.stdin.display();
            tio.stdout = io.stdout.display();
            tio.stderr = io.stderr.display();
            ev.io = Some(tio).into();
            (topics::TASK_CREATE_EVENT_TOPIC, Box::new(ev))
        }
        Event::Started { id, pid } => {
            let mut ev = TaskStart::new();
            ev.container_id = id;
            ev.pid = pid;
            (topics::TASK_START_EVENT_TOPIC, Box::new(ev))
        }
        Event::ExecAdded { id, exec_id } => {
            let mut ev = TaskExecAdded::new();
            ev.container_id = id;
            ev.exec_id = exec_id;
            (topics::TASK_EXEC_ADDED_EVENT_TOPIC, Box::new(ev))
        }
        Event::ExecStarted { id, exec_id, pid } => {
            let mut ev = TaskExecStarted::new();
            ev.container_id = id;
            ev.exec_id = exec_id;
            ev.pid = pid;
            (topics::TASK_EXEC_STARTED_EVENT_TOPIC, Box::new(ev))
        }
        Event::Exited {
            id,
            exec_id,
            pid,
            exit,
        } => {
            let mut ev = TaskExit::new();
            ev.id = if exec_id.is_empty() {
                id.clone()
            } else {
                exec_id
            };
            ev.container_id = id;
            ev.pid = pid;
            ev.exit_status = exit.status;
            ev.exited_at = Some(timestamp(exit.at)).into();
            (topics::TASK_EXIT_EVENT_TOPIC, Box::new(ev))
        }
        Event::Oom { id } => {
            let mut ev = TaskOOM::new();
            ev.container_id = id;
            (topics::TASK_OOM_EVENT_TOPIC, Box::new(ev))
        }
        Event::Paused { id } => {
            let mut ev = TaskPaused::new();
            ev.container_id = id;
            (topics::TASK_PAUSED_EVENT_TOPIC, Box::new(ev))
        }
        Event::Resumed { id } => {
            let mut ev = TaskResumed::new();
            ev.container_id = id;
            (topics::TASK_RESUMED_EVENT_TOPIC, Box::new(ev))
        }
        Event::Deleted { id, pid, exit } => {
            let mut ev = TaskDelete::new();
            ev.id = id.clone();
            ev.container_id = id;
            ev.pid = pid;
            ev.exit_status = exit.status;
            ev.exited_at = Some(timestamp(exit.at)).into();
            (topics::TASK_DELETE_EVENT_TOPIC, Box::new(ev))
        }
    }
}

impl HuskShim {
    /// Runs a pod API call on a blocking thread (they call the agent and
    /// may boot the VM).
    async fn call<T: Send + 'static>(
        &self,
        f: impl FnOnce(Pod) -> Result<T, PodApiError> + Send + 'static,
    ) -> TtrpcResult<T> {
        let pod = self.pod.clone();
        tokio::task::spawn_blocking(move || f(pod))
            .await
            .map_err(|e| status_of(Code::INTERNAL, e.to_string()))?
            .map_err(status)
    }
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

fn io_of(stdin: &str, stdout: &str, stderr: &str, terminal: bool) -> Io {
    Io {
        stdin: Stream::path(stdin),
        stdout: Stream::path(stdout),
        stderr: Stream::path(stderr),
        terminal,
    }
}

fn exit_fields(exit: Option<Exit>) -> (u32, Option<Timestamp>) {
    exit.map(|e| (e.status, Some(timestamp(e.at))))
        .unwrap_or_default()
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
        tracing::info!("create {}", req.id);
        let id = req.id.clone();
        let fail = |code, e: String| status_of(code, format!("husk: create {id}: {e}"));
        let bundle = PathBuf::from(&req.bundle);
        let spec = read_spec(&bundle).map_err(|e| fail(Code::INVALID_ARGUMENT, e.to_string()))?;
        let config = load_config(&req).map_err(|e| fail(Code::INVALID_ARGUMENT, e))?;
        let create = CreateRequest {
            id: container_id(&req.id)?,
            bundle,
            spec,
            rootfs: req
                .rootfs
                .iter()
                .map(|m| MountSpec {
                    fstype: m.type_.clone(),
                    source: m.source.clone(),
                    options: m.options.clone(),
                })
                .collect(),
            io: io_of(&req.stdin, &req.stdout, &req.stderr, req.terminal),
            config,
        };
        let pod = self.pod.clone();
        tokio::task::spawn_blocking(move || pod.create(create))
            .await
            .map_err(|e| status_of(Code::INTERNAL, e.to_string()))?
            .map_err(|e| fail(code(e.kind()), error_chain(&e)))?;
        Ok(api::CreateTaskResponse::new())
    }

    async fn start(
        &self,
        _ctx: &TtrpcContext,
        req: api::StartRequest,
    ) -> TtrpcResult<api::StartResponse> {
        tracing::info!("start {} {}", req.id, req.exec_id);
        let (id, exec) = (container_id(&req.id)?, exec_id(&req.exec_id)?);
        let mut resp = api::StartResponse::new();
        resp.pid = self.call(move |pod| pod.start(&id, exec.as_ref())).await?;
        Ok(resp)
    }

    async fn state(
        &self,
        _ctx: &TtrpcContext,
        req: api::StateRequest,
    ) -> TtrpcResult<api::StateResponse> {
        let (id, exec) = (container_id(&req.id)?, exec_id(&req.exec_id)?);
        let st = self.pod.process_state(&id, exec.as_ref()).map_err(status)?;
        let mut resp = api::StateResponse::new();
        resp.id = req.id;
        resp.exec_id = req.exec_id;
        resp.bundle = st.bundle.display().to_string();
        resp.pid = st.pid;
        resp.status = match st.status {
            Status::Created => api::Status::CREATED,
            Status::Running => api::Status::RUNNING,
            Status::Paused => api::Status::PAUSED,
            Status::Stopped => api::Status::STOPPED,
        }
        .into();
        resp.stdin = st.io.stdin.display();
        resp.stdout = st.io.stdout.display();
        resp.stderr = st.io.stderr.display();
        resp.terminal = st.io.terminal;
        let (exit_status, exited_at) = exit_fields(st.exit);
        resp.exit_status = exit_status;
        resp.exited_at = exited_at.into();
        Ok(resp)
    }

    async fn wait(
        &self,
        _ctx: &TtrpcContext,
        req: api::WaitRequest,
    ) -> TtrpcResult<api::WaitResponse> {
        let (id, exec) = (container_id(&req.id)?, exec_id(&req.exec_id)?);
        let exit = self.call(move |pod| pod.wait(&id, exec.as_ref())).await?;
        let mut resp = api::WaitResponse::new();
        let (exit_status, exited_at) = exit_fields(Some(exit));
        resp.exit_status = exit_status;
        resp.exited_at = exited_at.into();
        Ok(resp)
    }

    async fn kill(&self, _ctx: &TtrpcContext, req: api::KillRequest) -> TtrpcResult<api::Empty> {
        tracing::info!("kill {} {} signal {}", req.id, req.exec_id, req.signal);
        let (id, exec) = (container_id(&req.id)?, exec_id(&req.exec_id)?);
        self.call(move |pod| pod.kill(&id, exec.as_ref(), req.signal, req.all))
            .await?;
        Ok(api::Empty::new())
    }

    async fn pids(
        &self,
        _ctx: &TtrpcContext,
        req: api::PidsRequest,
    ) -> TtrpcResult<api::PidsResponse> {
        let id = container_id(&req.id)?;
        let pids = self.call(move |pod| pod.pids(&id)).await?;
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
        let id = container_id(&req.id)?;
        self.call(move |pod| pod.pause(&id)).await?;
        Ok(api::Empty::new())
    }

    async fn resume(
        &self,
        _ctx: &TtrpcContext,
        req: api::ResumeRequest,
    ) -> TtrpcResult<api::Empty> {
        let id = container_id(&req.id)?;
        self.call(move |pod| pod.resume(&id)).await?;
        Ok(api::Empty::new())
    }

    async fn checkpoint(
        &self,
        _ctx: &TtrpcContext,
        _req: api::CheckpointTaskRequest,
    ) -> TtrpcResult<api::Empty> {
        Err(status_of(
            Code::UNIMPLEMENTED,
            "husk: checkpoint is not supported: the container's state lives in a guest \
             kernel; CRIU in the guest and a place to put its image are not built"
                .into(),
        ))
    }

    async fn exec(
        &self,
        _ctx: &TtrpcContext,
        req: api::ExecProcessRequest,
    ) -> TtrpcResult<api::Empty> {
        tracing::info!("exec {} {}", req.id, req.exec_id);
        let process = req.spec.as_ref().map(|a| a.value.clone()).ok_or_else(|| {
            status_of(Code::INVALID_ARGUMENT, "exec without a process spec".into())
        })?;
        let io = io_of(&req.stdin, &req.stdout, &req.stderr, req.terminal);
        let id = container_id(&req.id)?;
        let exec: ExecId = parsed(&req.exec_id)?;
        self.call(move |pod| pod.add_exec(&id, &exec, process, io))
            .await?;
        Ok(api::Empty::new())
    }

    async fn resize_pty(
        &self,
        _ctx: &TtrpcContext,
        req: api::ResizePtyRequest,
    ) -> TtrpcResult<api::Empty> {
        let (id, exec) = (container_id(&req.id)?, exec_id(&req.exec_id)?);
        self.call(move |pod| pod.resize_pty(&id, exec.as_ref(), req.width, req.height))
            .await?;
        Ok(api::Empty::new())
    }

    async fn close_io(
        &self,
        _ctx: &TtrpcContext,
        req: api::CloseIORequest,
    ) -> TtrpcResult<api::Empty> {
        if req.stdin {
            let (id, exec) = (container_id(&req.id)?, exec_id(&req.exec_id)?);
            self.call(move |pod| pod.close_stdin(&id, exec.as_ref()))
                .await?;
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
            .ok_or_else(|| status_of(Code::INVALID_ARGUMENT, "update without resources".into()))?;
        let id = container_id(&req.id)?;
        self.call(move |pod| pod.update(&id, resources)).await?;
        Ok(api::Empty::new())
    }

    async fn stats(
        &self,
        _ctx: &TtrpcContext,
        req: api::StatsRequest,
    ) -> TtrpcResult<api::StatsResponse> {
        let id = container_id(&req.id)?;
        let s = self.call(move |pod| pod.stats(&id)).await?;
        let mut resp = api::StatsResponse::new();
        resp.stats = Some(metrics(&s)).into();
        Ok(resp)
    }

    async fn delete(
        &self,
        _ctx: &TtrpcContext,
        req: api::DeleteRequest,
    ) -> TtrpcResult<api::DeleteResponse> {
        tracing::info!("delete {} {}", req.id, req.exec_id);
        let (id, exec) = (container_id(&req.id)?, exec_id(&req.exec_id)?);
        let (pid, exit) = self.call(move |pod| pod.delete(&id, exec.as_ref())).await?;
        let mut resp = api::DeleteResponse::new();
        resp.pid = pid;
        let (exit_status, exited_at) = exit_fields(Some(exit));
        resp.exit_status = exit_status;
        resp.exited_at = exited_at.into();
        Ok(resp)
    }

    async fn connect(
        &self,
        _ctx: &TtrpcContext,
        req: api::ConnectRequest,
    ) -> TtrpcResult<api::ConnectResponse> {
        let mut resp = api::ConnectResponse::new();
        resp.shim_pid = std::process::id();
        resp.task_pid = ContainerId::parse(&req.id).map_or(0, |id| self.pod.pid(&id));
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
        if !self.pod.is_empty() {
            tracing::info!("shutdown: containers left; staying");
            return Ok(api::Empty::new());
        }
        tracing::info!("shutdown");
        let pod = self.pod.clone();
        let _ = tokio::task::spawn_blocking(move || pod.stop_if_empty()).await;
        self.exit_signal.signal();
        Ok(api::Empty::new())
    }
}

#[cfg(test)]
mod tests {
    use husk_runtime::vm::agent::AgentError;

    use super::*;

    fn rpc_error(code: ttrpc::Code) -> PodApiError {
        PodApiError::Agent(AgentError::Rpc {
            rpc: "SignalProcess",
            error: ttrpc::Error::RpcStatus(ttrpc::get_status(code, "exec e1 not found")),
        })
    }

    fn code_of(e: ShimTtrpcError) -> Code {
        match e {
            ShimTtrpcError::RpcStatus(s) => s.code(),
            e => panic!("not a status: {e}"),
        }
    }

    #[test]
    fn bad_ids_are_refused_where_they_enter_naming_them() {
        let e = container_id("../c").unwrap_err();
        assert_eq!(code_of(e), Code::INVALID_ARGUMENT);
        match exec_id("e/2") {
            Err(ShimTtrpcError::RpcStatus(s)) => {
                assert_eq!(s.code(), Code::INVALID_ARGUMENT);
                assert!(s.message.contains("exec id \"e/2\""), "{}", s.message);
            }
            other => panic!("not refused: {other:?}"),
        }
        assert_eq!(exec_id("").unwrap(), None, "the init");
        assert_eq!(exec_id("e1").unwrap().unwrap().as_str(), "e1");
        assert_eq!(container_id("c1").unwrap().as_str(), "c1");
    }

    #[test]
    fn the_agents_not_found_stays_not_found_and_the_rest_is_internal() {
        assert_eq!(
            code_of(status(rpc_error(ttrpc::Code::NOT_FOUND))),
            Code::NOT_FOUND
        );
        assert_eq!(
            code_of(status(rpc_error(ttrpc::Code::INVALID_ARGUMENT))),
            Code::INTERNAL
        );
        match status(rpc_error(ttrpc::Code::NOT_FOUND)) {
            ShimTtrpcError::RpcStatus(s) => {
                assert!(s.message.contains("exec e1 not found"), "{s:?}")
            }
            e => panic!("{e}"),
        }
        assert_eq!(
            code_of(status(PodApiError::NoContainer("c".into()))),
            Code::NOT_FOUND
        );
        assert_eq!(
            code_of(status(PodApiError::Exists("c".into()))),
            Code::ALREADY_EXISTS
        );
    }

    /// Answers every ttrpc request on `listener` with an empty response
    /// (a ConnectResponse of defaults), as a live shim would.
    fn answer(listener: std::os::unix::net::UnixListener) {
        use std::io::{Read, Write};
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(mut c) = conn else { return };
                std::thread::spawn(move || {
                    let mut header = [0u8; 10];
                    while c.read_exact(&mut header).is_ok() {
                        let len = u32::from_be_bytes(header[..4].try_into().unwrap()) as usize;
                        let mut body = vec![0u8; len];
                        if c.read_exact(&mut body).is_err() {
                            return;
                        }
                        // length 0, the same stream id, type 2 (response).
                        let mut reply = [0u8; 10];
                        reply[4..8].copy_from_slice(&header[4..8]);
                        reply[8] = 2;
                        let _ = c.write_all(&reply);
                    }
                });
            }
        });
    }

    #[test]
    fn delete_leaves_a_live_shim_alone_and_clears_a_dead_ones_socket() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("shim.sock");
        let file = dir.path().join(ADDRESS_FILE);
        std::fs::write(&file, format!("unix://{}", sock.display())).unwrap();
        // A dying shim: its socket still takes connections, nobody answers.
        let listener = std::os::unix::net::UnixListener::bind(&sock).unwrap();
        assert!(
            !shim_alive(&file),
            "a socket that does not answer is no live shim"
        );
        drop(listener);
        std::fs::remove_file(&sock).unwrap();
        let listener = std::os::unix::net::UnixListener::bind(&sock).unwrap();
        answer(listener);
        assert!(shim_alive(&file), "a shim that answers is alive");
        let sock2 = dir.path().join("gone.sock");
        std::fs::write(&file, format!("unix://{}", sock2.display())).unwrap();
        drop(std::os::unix::net::UnixListener::bind(&sock2).unwrap());
        assert!(!shim_alive(&file), "nobody listens any more");
        let sock = sock2;
        remove_stale_socket(&file);
        assert!(!sock.exists(), "the dead shim's socket is removed");
        assert!(!shim_alive(&dir.path().join("missing")));
    }

    #[test]
    fn exits_become_task_exits_with_the_container_and_exec_ids() {
        let exit = Exit {
            status: 7,
            at: UNIX_EPOCH + std::time::Duration::from_secs(5),
        };
        let (topic, msg) = message(Event::Exited {
            id: "c".into(),
            exec_id: "e".into(),
            pid: 9,
            exit,
        });
        assert_eq!(topic, topics::TASK_EXIT_EVENT_TOPIC);
        let ev = TaskExit::parse_from_bytes(&msg.write_to_bytes_dyn().unwrap()).unwrap();
        assert_eq!(
            (
                ev.container_id.as_str(),
                ev.id.as_str(),
                ev.pid,
                ev.exit_status
            ),
            ("c", "e", 9, 7)
        );
        assert_eq!(ev.exited_at.seconds, 5);
        let (_, msg) = message(Event::Exited {
            id: "c".into(),
            exec_id: String::new(),
            pid: 9,
            exit,
        });
        let ev = TaskExit::parse_from_bytes(&msg.write_to_bytes_dyn().unwrap()).unwrap();
        assert_eq!(ev.id, "c", "an init's exit carries the container id");
    }
}
