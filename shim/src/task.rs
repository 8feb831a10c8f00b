//! The shim's Task service over one husk sandbox.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use containerd_shim::asynchronous::{spawn, ExitSignal, Shim};
use containerd_shim::protos::api;
use containerd_shim::protos::events::task::{TaskCreate, TaskDelete, TaskExit, TaskStart};
use containerd_shim::protos::protobuf::well_known_types::timestamp::Timestamp;
use containerd_shim::protos::protobuf::MessageDyn;
use containerd_shim::protos::shim_async::Task;
use containerd_shim::protos::topics;
use containerd_shim::protos::ttrpc::r#async::TtrpcContext;
use containerd_shim::publisher::RemotePublisher;
use containerd_shim::{Config as ShimConfig, Error, Flags, StartOpts, TtrpcResult};
use husk_protocol::containers::Stdio;
use husk_protocol::{StreamHeader, StreamKind};
use husk_runtime::agent::{open_stream, Agent};
use husk_runtime::storage::{self, MountSpec};
use husk_runtime::{Config, Sandbox};
use tokio::sync::watch;

const STREAM_TIMEOUT: Duration = Duration::from_secs(10);

/// What the shim knows about its one container.
#[derive(Clone, Default)]
struct Exit {
    status: u32,
    at: Option<Timestamp>,
}

struct State {
    sandbox: Option<Sandbox>,
    bundle: PathBuf,
    stdin: String,
    stdout: String,
    stderr: String,
    pid: u32,
    status: api::Status,
    exit: Option<Exit>,
    stdin_stream: Option<std::os::unix::net::UnixStream>,
    pumps: Vec<std::thread::JoinHandle<()>>,
}

#[derive(Clone)]
pub struct HuskShim {
    exit_signal: Arc<ExitSignal>,
    namespace: String,
    id: String,
    publisher: Option<Arc<RemotePublisher>>,
    state: Arc<Mutex<Option<State>>>,
    exited: Arc<watch::Sender<Option<Exit>>>,
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

fn err(
    code: containerd_shim::protos::ttrpc::Code,
    msg: impl std::fmt::Display,
) -> containerd_shim::protos::ttrpc::Error {
    log::error!("{msg}");
    containerd_shim::protos::ttrpc::Error::RpcStatus(containerd_shim::protos::ttrpc::get_status(
        code,
        msg.to_string(),
    ))
}

use containerd_shim::protos::ttrpc::Code;

#[async_trait]
impl Shim for HuskShim {
    type T = HuskShim;

    async fn new(_runtime_id: &str, args: &Flags, _config: &mut ShimConfig) -> Self {
        let (tx, _) = watch::channel(None);
        HuskShim {
            exit_signal: Arc::new(ExitSignal::default()),
            namespace: args.namespace.clone(),
            id: args.id.clone(),
            publisher: None,
            state: Arc::new(Mutex::new(None)),
            exited: Arc::new(tx),
        }
    }

    async fn start_shim(&mut self, opts: StartOpts) -> Result<String, Error> {
        let grouping = opts.id.clone();
        spawn(opts, &grouping, Vec::new()).await
    }

    /// Cleans up after a shim that died: its sandbox directory, mounts and
    /// any process still running from it.
    async fn delete_shim(&mut self) -> Result<api::DeleteResponse, Error> {
        let config = Config::load(None).map(|(c, _)| c).unwrap_or_default();
        let dir = husk_runtime::sandbox::sandbox_dir(&config, &self.id);
        if husk_runtime::sandbox::validate_id(&self.id).is_ok() && dir.exists() {
            storage::unmount_all_under(&dir);
            let _ = std::fs::remove_dir_all(&dir);
        }
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

    /// Runs a blocking agent call off the async runtime; errors become INTERNAL.
    async fn agent_call<T, E>(
        &self,
        call: impl FnOnce(Agent, String) -> Result<T, E> + Send + 'static,
    ) -> TtrpcResult<T>
    where
        T: Send + 'static,
        E: std::fmt::Display + Send + 'static,
    {
        let agent = self.agent()?;
        let id = self.id.clone();
        tokio::task::spawn_blocking(move || call(agent, id))
            .await
            .map_err(|e| err(Code::INTERNAL, e))?
            .map_err(|e| err(Code::INTERNAL, e))
    }

    fn agent(&self) -> Result<Agent, containerd_shim::protos::ttrpc::Error> {
        let st = self.state();
        st.as_ref()
            .and_then(|s| s.sandbox.as_ref())
            .and_then(|sb| sb.agent().cloned())
            .ok_or_else(|| {
                err(
                    Code::NOT_FOUND,
                    format!("container {} not created", self.id),
                )
            })
    }
}

/// Boots the sandbox, mounts the rootfs, opens the streams and creates the
/// container in the guest. Blocking: run on a blocking thread.
fn create_blocking(id: &str, req: &api::CreateTaskRequest) -> Result<State, String> {
    let config_path = Path::new(&req.bundle).join("config.json");
    let spec = std::fs::read(&config_path)
        .map_err(|e| format!("reading {}: {e}", config_path.display()))?;
    serde_json::from_slice::<serde_json::Value>(&spec)
        .map_err(|e| format!("{} is not valid JSON: {e}", config_path.display()))?;
    let (config, _) = Config::load(None).map_err(|e| e.to_string())?;
    let sb = Sandbox::boot(&config, id).map_err(|e| format!("{e:#}"))?;
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
    .map_err(|e| format!("rootfs: {e}"))?;
    let sock = sb.dir().join("agent.sock");
    let header = |kind| StreamHeader {
        container_id: id.to_owned(),
        exec_id: None,
        kind,
    };
    let mut stdio = Stdio::new();
    stdio.stdin = !req.stdin.is_empty();
    stdio.stdout = !req.stdout.is_empty();
    stdio.stderr = !req.stderr.is_empty();
    let open = |want: bool, kind| -> Result<Option<std::os::unix::net::UnixStream>, String> {
        if !want {
            return Ok(None);
        }
        open_stream(&sock, &header(kind), STREAM_TIMEOUT)
            .map(Some)
            .map_err(|e| e.to_string())
    };
    let stdin_stream = open(stdio.stdin, StreamKind::Stdin)?;
    let out = open(stdio.stdout, StreamKind::Stdout)?;
    let errs = open(stdio.stderr, StreamKind::Stderr)?;
    let agent = sb.agent().ok_or("agent not connected")?;
    agent
        .create_container(id, spec, stdio)
        .map_err(|e| e.to_string())?;
    let mut pumps = Vec::new();
    for (stream, fifo) in [(out, &req.stdout), (errs, &req.stderr)] {
        if let Some(mut s) = stream {
            let fifo = fifo.clone();
            pumps.push(std::thread::spawn(move || {
                if let Ok(mut f) = File::options().write(true).open(&fifo) {
                    let _ = husk_protocol::copy_plain(&mut s, &mut f);
                    let _ = f.flush();
                }
            }));
        }
    }
    Ok(State {
        sandbox: Some(sb),
        bundle: PathBuf::from(&req.bundle),
        stdin: req.stdin.clone(),
        stdout: req.stdout.clone(),
        stderr: req.stderr.clone(),
        pid: 0,
        status: api::Status::CREATED,
        exit: None,
        stdin_stream,
        pumps,
    })
}

#[async_trait]
impl Task for HuskShim {
    async fn create(
        &self,
        _ctx: &TtrpcContext,
        req: api::CreateTaskRequest,
    ) -> TtrpcResult<api::CreateTaskResponse> {
        log::info!("create {}", req.id);
        if req.terminal {
            return Err(err(
                Code::UNIMPLEMENTED,
                "husk: tty mode is not supported yet",
            ));
        }
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
        log::info!("start {}", req.id);
        let pid = self.agent_call(|a, id| a.start_container(&id)).await?;
        let (stdin_stream, stdin_path) = {
            let mut st = self.state();
            let s = st
                .as_mut()
                .ok_or_else(|| err(Code::NOT_FOUND, "no container"))?;
            s.pid = pid;
            s.status = api::Status::RUNNING;
            (s.stdin_stream.take(), s.stdin.clone())
        };
        if let Some(mut s) = stdin_stream {
            std::thread::spawn(move || {
                if let Ok(mut f) = File::open(&stdin_path) {
                    let _ = husk_protocol::copy_plain(&mut f, &mut s);
                }
                let _ = s.shutdown(std::net::Shutdown::Write);
            });
        }
        // Exit watcher: the agent answers Wait once the process has ended
        // and its output drained; then the shim's own copies finish.
        let agent = self.agent()?;
        let me = self.clone();
        let id = self.id.clone();
        tokio::spawn(async move {
            let status = tokio::task::spawn_blocking(move || agent.wait_process(&id)).await;
            let status = match status
                .map_err(|e| e.to_string())
                .and_then(|r| r.map_err(|e| e.to_string()))
            {
                Ok(s) => s,
                Err(e) => {
                    log::error!("wait for {}: {e}", me.id);
                    255
                }
            };
            let pumps = {
                let mut st = me.state();
                st.as_mut()
                    .map(|s| std::mem::take(&mut s.pumps))
                    .unwrap_or_default()
            };
            let _ =
                tokio::task::spawn_blocking(move || pumps.into_iter().for_each(|p| drop(p.join())))
                    .await;
            let exit = Exit {
                status,
                at: Some(now()),
            };
            {
                let mut st = me.state();
                if let Some(s) = st.as_mut() {
                    s.status = api::Status::STOPPED;
                    s.exit = Some(exit.clone());
                }
            }
            let mut ev = TaskExit::new();
            ev.container_id = me.id.clone();
            ev.id = me.id.clone();
            ev.pid = pid;
            ev.exit_status = status;
            ev.exited_at = exit.at.clone().into();
            me.publish(topics::TASK_EXIT_EVENT_TOPIC, Box::new(ev))
                .await;
            let _ = me.exited.send(Some(exit));
        });
        let mut ev = TaskStart::new();
        ev.container_id = self.id.clone();
        ev.pid = pid;
        self.publish(topics::TASK_START_EVENT_TOPIC, Box::new(ev))
            .await;
        let mut resp = api::StartResponse::new();
        resp.pid = pid;
        Ok(resp)
    }

    async fn state(
        &self,
        _ctx: &TtrpcContext,
        req: api::StateRequest,
    ) -> TtrpcResult<api::StateResponse> {
        let st = self.state();
        let s = st
            .as_ref()
            .ok_or_else(|| err(Code::NOT_FOUND, format!("container {} not created", req.id)))?;
        let mut resp = api::StateResponse::new();
        resp.id = req.id.clone();
        resp.bundle = s.bundle.display().to_string();
        resp.pid = s.pid;
        resp.status = s.status.into();
        resp.stdin = s.stdin.clone();
        resp.stdout = s.stdout.clone();
        resp.stderr = s.stderr.clone();
        if let Some(e) = &s.exit {
            resp.exit_status = e.status;
            resp.exited_at = e.at.clone().into();
        }
        Ok(resp)
    }

    async fn wait(
        &self,
        _ctx: &TtrpcContext,
        _req: api::WaitRequest,
    ) -> TtrpcResult<api::WaitResponse> {
        let mut rx = self.exited.subscribe();
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
        log::info!("kill {} signal {}", req.id, req.signal);
        if self.state().as_ref().is_some_and(|s| s.exit.is_some()) {
            return Ok(api::Empty::new());
        }
        self.agent_call(move |a, id| a.signal_process(&id, req.signal, req.all))
            .await?;
        Ok(api::Empty::new())
    }

    async fn pids(
        &self,
        _ctx: &TtrpcContext,
        _req: api::PidsRequest,
    ) -> TtrpcResult<api::PidsResponse> {
        let st = self.state();
        let mut resp = api::PidsResponse::new();
        if let Some(s) = st.as_ref().filter(|s| s.pid != 0 && s.exit.is_none()) {
            let mut p = containerd_shim::protos::types::task::ProcessInfo::new();
            p.pid = s.pid;
            resp.processes.push(p);
        }
        Ok(resp)
    }

    async fn delete(
        &self,
        _ctx: &TtrpcContext,
        req: api::DeleteRequest,
    ) -> TtrpcResult<api::DeleteResponse> {
        log::info!("delete {}", req.id);
        let state = self.state().take();
        let mut resp = api::DeleteResponse::new();
        if let Some(mut s) = state {
            resp.pid = s.pid;
            let exit = s.exit.clone().unwrap_or(Exit {
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
        resp.task_pid = self.state().as_ref().map(|s| s.pid).unwrap_or(0);
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
