//! The agent's ttrpc services on vsock.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, Sender};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use husk_protocol::agent::{Empty, ShutdownRequest};
use husk_protocol::containers::{
    ContainerRequest, CreateContainerRequest, ExecProcessRequest, ListProcessesResponse,
    OomResponse, ProcessRequest, ResizePtyRequest, SignalRequest, StartResponse, StatsResponse,
    UpdateContainerRequest, WaitResponse,
};
use husk_protocol::health::check_response::ServingStatus;
use husk_protocol::health::{CheckRequest, CheckResponse, VersionResponse};
use husk_protocol::{
    agent_ttrpc, containers, containers_ttrpc, health_ttrpc, AGENT_VSOCK_PORT, PROTOCOL_VERSION,
};
use ttrpc::TtrpcContext;

use crate::containers::{stream_wait, ContainerError, Manager};
use crate::reaper::Reaper;
use crate::stdio::StreamHub;

/// Time left for the Shutdown reply to reach the host before the VM ends.
const REPLY_GRACE: Duration = Duration::from_millis(20);

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("listen on vsock port {port}")]
    Listen {
        port: u32,
        #[source]
        source: ttrpc::Error,
    },
    #[error("start ttrpc server")]
    Start(#[source] ttrpc::Error),
    #[error("listen for port-forward streams")]
    Forward(#[source] nix::Error),
    #[error("listen for stdio streams")]
    Stdio(#[source] nix::Error),
}

/// Identity and boot timings the Health service reports.
pub struct HealthService {
    init_started_ns: u64,
    listening_ns: u64,
    /// Set once, just before the server starts taking requests.
    serving_ns: Arc<AtomicU64>,
    kernel_release: String,
    /// Guest boot clock now, in nanoseconds since the kernel started.
    now_ns: Box<dyn Fn() -> u64 + Send + Sync>,
}

impl HealthService {
    fn check(&self) -> CheckResponse {
        let mut resp = CheckResponse::new();
        resp.status = ServingStatus::SERVING.into();
        resp
    }

    fn version(&self) -> VersionResponse {
        let mut resp = VersionResponse::new();
        resp.agent_version = env!("CARGO_PKG_VERSION").to_owned();
        resp.protocol_version = PROTOCOL_VERSION;
        resp.init_started_ns = self.init_started_ns;
        resp.listening_ns = self.listening_ns;
        resp.serving_ns = self.serving_ns.load(Ordering::Relaxed);
        resp.kernel_release = self.kernel_release.clone();
        resp.replied_ns = (self.now_ns)();
        resp
    }
}

impl health_ttrpc::Health for HealthService {
    fn check(&self, _ctx: &TtrpcContext, _req: CheckRequest) -> ttrpc::Result<CheckResponse> {
        Ok(HealthService::check(self))
    }

    fn version(&self, _ctx: &TtrpcContext, _req: CheckRequest) -> ttrpc::Result<VersionResponse> {
        Ok(HealthService::version(self))
    }
}

/// Sandbox-wide requests.
pub struct AgentService {
    shutdown: Mutex<Sender<()>>,
}

/// Container lifecycle requests.
pub struct ContainersService {
    manager: Arc<Manager>,
}

/// Maps container errors to ttrpc codes, in one place.
fn rpc_error(e: ContainerError) -> ttrpc::Error {
    use ttrpc::Code;
    let code = match &e {
        ContainerError::NotFound(_) => Code::NOT_FOUND,
        ContainerError::Exists(_) => Code::ALREADY_EXISTS,
        ContainerError::InvalidId(_) | ContainerError::Spec { .. } | ContainerError::Rootfs(_) => {
            Code::INVALID_ARGUMENT
        }
        ContainerError::StreamMissing { .. } => Code::DEADLINE_EXCEEDED,
        ContainerError::TooManyExecs { .. } => Code::RESOURCE_EXHAUSTED,
        ContainerError::Io { .. }
        | ContainerError::Runtime { .. }
        | ContainerError::Failed { .. }
        | ContainerError::Volume { .. } => Code::INTERNAL,
    };
    // Every cause, as the host logs it.
    let chain = husk_protocol::error_chain(&e);
    tracing::error!("{chain}");
    ttrpc::Error::RpcStatus(ttrpc::get_status(code, chain))
}

/// The exec id of a request: empty means the container's init.
fn exec_id(s: &str) -> Option<&str> {
    (!s.is_empty()).then_some(s)
}

fn empty(r: Result<(), ContainerError>) -> ttrpc::Result<containers::Empty> {
    r.map(|()| containers::Empty::new()).map_err(rpc_error)
}

fn started(r: Result<u32, ContainerError>) -> ttrpc::Result<StartResponse> {
    let mut resp = StartResponse::new();
    resp.pid = r.map_err(rpc_error)?;
    Ok(resp)
}

impl containers_ttrpc::Containers for ContainersService {
    fn create_container(
        &self,
        ctx: &TtrpcContext,
        req: CreateContainerRequest,
    ) -> ttrpc::Result<containers::Empty> {
        let stdio = req.stdio.into_option().unwrap_or_default();
        empty(self.manager.create(
            &req.container_id,
            &req.spec_json,
            &stdio,
            req.network.as_ref(),
            &req.synced_volumes,
            stream_wait(ctx.timeout_nano),
        ))
    }

    fn start_container(
        &self,
        _ctx: &TtrpcContext,
        req: ContainerRequest,
    ) -> ttrpc::Result<StartResponse> {
        started(self.manager.start(&req.container_id))
    }

    fn exec_process(
        &self,
        ctx: &TtrpcContext,
        req: ExecProcessRequest,
    ) -> ttrpc::Result<StartResponse> {
        let stdio = req.stdio.into_option().unwrap_or_default();
        started(self.manager.exec(
            &req.container_id,
            &req.exec_id,
            &req.process_json,
            &stdio,
            stream_wait(ctx.timeout_nano),
        ))
    }

    fn wait_process(
        &self,
        _ctx: &TtrpcContext,
        req: ProcessRequest,
    ) -> ttrpc::Result<WaitResponse> {
        let status = self
            .manager
            .wait(&req.container_id, exec_id(&req.exec_id))
            .map_err(rpc_error)?;
        let mut resp = WaitResponse::new();
        resp.exit_status = status;
        Ok(resp)
    }

    fn signal_process(
        &self,
        _ctx: &TtrpcContext,
        req: SignalRequest,
    ) -> ttrpc::Result<containers::Empty> {
        #[cfg(feature = "test-hooks")]
        if crate::test_hooks::drops_signal(req.signal) {
            tracing::warn!(container = %req.container_id, "test hook: signal {} acknowledged, not sent", req.signal);
            return Ok(containers::Empty::new());
        }
        empty(self.manager.signal(
            &req.container_id,
            exec_id(&req.exec_id),
            req.signal,
            req.all,
        ))
    }

    fn resize_pty(
        &self,
        _ctx: &TtrpcContext,
        req: ResizePtyRequest,
    ) -> ttrpc::Result<containers::Empty> {
        empty(self.manager.resize(
            &req.container_id,
            exec_id(&req.exec_id),
            req.width,
            req.height,
        ))
    }

    fn remove_process(
        &self,
        _ctx: &TtrpcContext,
        req: ProcessRequest,
    ) -> ttrpc::Result<containers::Empty> {
        empty(self.manager.remove_exec(&req.container_id, &req.exec_id))
    }

    fn pause_container(
        &self,
        _ctx: &TtrpcContext,
        req: ContainerRequest,
    ) -> ttrpc::Result<containers::Empty> {
        empty(self.manager.pause(&req.container_id))
    }

    fn resume_container(
        &self,
        _ctx: &TtrpcContext,
        req: ContainerRequest,
    ) -> ttrpc::Result<containers::Empty> {
        empty(self.manager.resume(&req.container_id))
    }

    fn list_processes(
        &self,
        _ctx: &TtrpcContext,
        req: ContainerRequest,
    ) -> ttrpc::Result<ListProcessesResponse> {
        let mut resp = ListProcessesResponse::new();
        resp.pids = self
            .manager
            .processes(&req.container_id)
            .map_err(rpc_error)?;
        Ok(resp)
    }

    fn container_stats(
        &self,
        _ctx: &TtrpcContext,
        req: ContainerRequest,
    ) -> ttrpc::Result<StatsResponse> {
        self.manager.stats(&req.container_id).map_err(rpc_error)
    }

    fn update_container(
        &self,
        _ctx: &TtrpcContext,
        req: UpdateContainerRequest,
    ) -> ttrpc::Result<containers::Empty> {
        empty(self.manager.update(&req.container_id, &req.resources_json))
    }

    fn wait_oom(&self, _ctx: &TtrpcContext, req: ContainerRequest) -> ttrpc::Result<OomResponse> {
        let mut resp = OomResponse::new();
        resp.oom = self
            .manager
            .wait_oom(&req.container_id)
            .map_err(rpc_error)?;
        Ok(resp)
    }

    fn remove_container(
        &self,
        _ctx: &TtrpcContext,
        req: ContainerRequest,
    ) -> ttrpc::Result<containers::Empty> {
        empty(self.manager.remove(&req.container_id))
    }

    fn sync_volume(
        &self,
        _ctx: &TtrpcContext,
        req: containers::SyncVolumeRequest,
    ) -> ttrpc::Result<containers::Empty> {
        empty(
            self.manager
                .sync_volume(&req.container_id, req.volume, &req.data_dir),
        )
    }
}

impl agent_ttrpc::Agent for AgentService {
    fn shutdown(&self, _ctx: &TtrpcContext, _req: ShutdownRequest) -> ttrpc::Result<Empty> {
        let _ = self
            .shutdown
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .send(());
        Ok(Empty::new())
    }
}

/// Serves until a Shutdown request arrives.
pub fn serve(
    clock: crate::init::BootClock,
    reaper: Reaper,
    zygote: crate::zygote::Zygote,
) -> Result<(), ServeError> {
    let addr = format!("vsock://-1:{AGENT_VSOCK_PORT}");
    let (tx, rx) = mpsc::channel();
    let kernel_release = nix::sys::utsname::uname()
        .map(|u| u.release().to_string_lossy().into_owned())
        .unwrap_or_default();

    let server = ttrpc::Server::new()
        .bind(&addr)
        .map_err(|source| ServeError::Listen {
            port: AGENT_VSOCK_PORT,
            source,
        })?;
    // Bound is listening: the guest kernel completes the host's connection
    // and queues its first request until the server below takes them, so
    // the host is told now and connects while the rest is set up.
    eprintln!("{}", husk_protocol::ready_line());
    let serving_ns = Arc::new(AtomicU64::new(0));
    let health = HealthService {
        init_started_ns: clock.init_ns(),
        listening_ns: clock.now_ns(),
        serving_ns: serving_ns.clone(),
        kernel_release,
        now_ns: Box::new(move || clock.now_ns()),
    };
    let hub = Arc::new(StreamHub::default());
    hub.listen().map_err(ServeError::Stdio)?;
    let agent = AgentService {
        shutdown: Mutex::new(tx),
    };
    let manager = Arc::new(Manager::new(reaper, hub, zygote));
    crate::forward::listen(manager.clone()).map_err(ServeError::Forward)?;
    let containers = ContainersService { manager };
    // Wait requests block for a process's lifetime, each on its own thread.
    let mut server = server
        .set_thread_count_max(256)
        .register_service(health_ttrpc::create_health(Arc::new(health)))
        .register_service(agent_ttrpc::create_agent(Arc::new(agent)))
        .register_service(containers_ttrpc::create_containers(Arc::new(containers)));
    // Stored before the server's threads exist, so every reply carries it.
    serving_ns.store(clock.now_ns(), Ordering::Relaxed);
    server.start().map_err(ServeError::Start)?;

    // A closed channel cannot happen while `server` holds the sender; treat
    // it as a shutdown request all the same.
    let _ = rx.recv();
    std::thread::sleep(REPLY_GRACE);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn version_reports_protocol_and_timings() {
        let svc = HealthService {
            init_started_ns: 5,
            listening_ns: 9,
            serving_ns: Arc::new(AtomicU64::new(10)),
            kernel_release: "6.1.0-husk".into(),
            now_ns: Box::new(|| 12),
        };
        let v = svc.version();
        assert_eq!(v.protocol_version, PROTOCOL_VERSION);
        assert_eq!(v.agent_version, env!("CARGO_PKG_VERSION"));
        assert_eq!(
            (
                v.init_started_ns,
                v.listening_ns,
                v.serving_ns,
                v.replied_ns
            ),
            (5, 9, 10, 12)
        );
        assert_eq!(v.kernel_release, "6.1.0-husk");
        assert_eq!(svc.check().status.enum_value(), Ok(ServingStatus::SERVING));
    }
}
