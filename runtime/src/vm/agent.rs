//! Client for husk-agent over the hybrid vsock socket of vhost-device-vsock.
//!
//! A host-initiated connection is a unix connection to the daemon's socket on
//! which the host writes `CONNECT <port>\n` and reads `OK <n>\n`; the rest of
//! the stream is the guest connection. Until the agent listens, the daemon
//! closes such connections, so readiness is retried under a deadline.
//! Everything the guest says is validated: the guest is untrusted.

use std::io::{Read, Write};
use std::os::fd::IntoRawFd;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use husk_protocol::agent::ShutdownRequest;
use husk_protocol::agent_ttrpc::AgentClient as AgentRpc;
use husk_protocol::containers::{
    ContainerRequest, CreateContainerRequest, ExecProcessRequest, Network, ProcessRequest,
    ResizePtyRequest, SignalRequest, StatsResponse, Stdio, SyncVolumeRequest,
    UpdateContainerRequest,
};
use husk_protocol::containers_ttrpc::ContainersClient;
use husk_protocol::health::check_response::ServingStatus;
use husk_protocol::health::{CheckRequest, VersionResponse};
use husk_protocol::health_ttrpc::HealthClient;
use husk_protocol::{StreamHeader, PROTOCOL_VERSION, STDIO_VSOCK_PORT};

/// Longest acceptable handshake reply line (`OK 4294967295\n` is 14).
const MAX_REPLY: usize = 32;
/// Longest acceptable string field from the agent.
const MAX_FIELD: usize = 128;

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("connect to {path}")]
    Connect {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is served by pid {got}, not by the sandbox's vsock daemon (pid {want}): something replaced the socket; the sandbox's state directory is not to be trusted")]
    Peer { path: PathBuf, want: u32, got: i32 },
    #[error("vsock handshake on {path}: guest closed the connection (agent not listening on port {port})")]
    NotListening { path: PathBuf, port: u32 },
    #[error("vsock handshake on {path}: unexpected reply {reply:?}")]
    Handshake { path: PathBuf, reply: String },
    #[error("agent did not answer on vsock port {port} within {timeout:?}{last}")]
    Timeout {
        port: u32,
        timeout: Duration,
        last: String,
    },
    /// The agent's message is part of the text; `error` is not a `source`
    /// so that chains do not repeat it.
    #[error("{rpc} rpc failed: {}", rpc_message(.error))]
    Rpc {
        rpc: &'static str,
        error: ttrpc::Error,
    },
    #[error("agent sent an invalid {rpc} reply: {why}")]
    Invalid { rpc: &'static str, why: String },
}

/// Most bytes of an agent's error text that reach the host's logs.
pub const MAX_GUEST_TEXT: usize = 2048;

/// The agent's own words for a failed call (capped and escaped: they go
/// to containerd's log and the guest may be hostile), or the transport's
/// error.
fn rpc_message(e: &ttrpc::Error) -> String {
    match e {
        ttrpc::Error::RpcStatus(s) => {
            format!(
                "{} ({:?})",
                guest_text(&s.message, MAX_GUEST_TEXT),
                s.code()
            )
        }
        // The transport's own errors may quote what the guest sent (a
        // frame of the wrong type): capped the same way.
        other => guest_text(&other.to_string(), MAX_GUEST_TEXT),
    }
}

/// Text from the guest made safe to log: at most `max` bytes of it, with
/// control characters escaped and what was cut counted.
pub fn guest_text(text: &str, max: usize) -> String {
    let mut out = String::with_capacity(text.len().min(max) + 32);
    let mut used = 0;
    for (i, c) in text.char_indices() {
        if used + c.len_utf8() > max {
            out.push_str(&format!("... ({} more bytes)", text.len() - i));
            break;
        }
        used += c.len_utf8();
        if c.is_control() {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    out
}

/// The vsock daemon's hybrid socket (`agent.sock`), and the daemon that
/// must serve it. The socket lives in a directory the jailed daemons can
/// write: a compromised one could put a symlink to any host socket in its
/// place, so every connection checks its peer (SO_PEERCRED) before it
/// says anything.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HybridSocket {
    pub path: PathBuf,
    /// The pid of the process that listens on it (vhost-device-vsock).
    pub server_pid: u32,
}

/// Opens a guest vsock connection to `port` through the hybrid socket.
pub fn hybrid_connect(
    socket: &HybridSocket,
    port: u32,
    timeout: Duration,
) -> Result<UnixStream, AgentError> {
    let path = &socket.path;
    let io = |source| AgentError::Connect {
        path: path.to_path_buf(),
        source,
    };
    // One deadline for the whole handshake, up to the OK line: a peer that
    // drips a byte at a time cannot stretch it.
    let deadline = Instant::now() + timeout;
    let left = || {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            Err(io(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("no OK line within {timeout:?}"),
            )))
        } else {
            Ok(left)
        }
    };
    let mut stream = UnixStream::connect(path).map_err(io)?;
    let peer = nix::sys::socket::getsockopt(&stream, nix::sys::socket::sockopt::PeerCredentials)
        .map_err(|e| io(e.into()))?;
    if u32::try_from(peer.pid()).ok() != Some(socket.server_pid) {
        return Err(AgentError::Peer {
            path: path.to_path_buf(),
            want: socket.server_pid,
            got: peer.pid(),
        });
    }
    stream.set_write_timeout(Some(left()?)).map_err(io)?;
    stream
        .write_all(format!("CONNECT {port}\n").as_bytes())
        .map_err(io)?;
    // Byte by byte: whatever follows the newline belongs to the guest stream.
    let mut line = Vec::with_capacity(MAX_REPLY);
    loop {
        stream.set_read_timeout(Some(left()?)).map_err(io)?;
        let mut b = [0u8; 1];
        match stream.read(&mut b) {
            Ok(0) => {
                return Err(AgentError::NotListening {
                    path: path.to_path_buf(),
                    port,
                })
            }
            Ok(_) if b[0] == b'\n' => break,
            Ok(_) if line.len() < MAX_REPLY => line.push(b[0]),
            Ok(_) => {
                return Err(AgentError::Handshake {
                    path: path.to_path_buf(),
                    reply: String::from_utf8_lossy(&line).into_owned(),
                })
            }
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {
                return Err(AgentError::NotListening {
                    path: path.to_path_buf(),
                    port,
                })
            }
            Err(e) => return Err(io(e)),
        }
    }
    parse_ok(&line).ok_or_else(|| AgentError::Handshake {
        path: path.to_path_buf(),
        reply: String::from_utf8_lossy(&line).into_owned(),
    })?;
    stream.set_read_timeout(None).map_err(io)?;
    stream.set_write_timeout(None).map_err(io)?;
    Ok(stream)
}

/// Parses `OK <host port>` strictly.
fn parse_ok(line: &[u8]) -> Option<u32> {
    let text = std::str::from_utf8(line).ok()?;
    let n = text.strip_prefix("OK ")?;
    if n.is_empty() || !n.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    n.parse().ok()
}

/// Retries [`hybrid_connect`] until it succeeds or `timeout` passes.
/// `sign(wait)` blocks up to `wait` for the agent's sign of life (at once
/// if it was seen before): `Ok(true)` once seen, `Ok(false)` when `wait`
/// passed without it, an error to end the wait (e.g. the VM has exited).
/// No CONNECT goes out before the sign: vhost-device-vsock was seen to stop
/// forwarding for good, about one boot in seven, when hammered with
/// CONNECTs while the guest was still booting.
pub fn wait_ready<E>(
    socket: &HybridSocket,
    port: u32,
    timeout: Duration,
    mut sign: impl FnMut(Duration) -> Result<bool, E>,
) -> Result<Result<(UnixStream, u32), AgentError>, E> {
    let start = Instant::now();
    let mut attempts = 0u32;
    loop {
        let left = timeout.saturating_sub(start.elapsed());
        if !sign(left)? {
            let last = " (the guest never reported listening)".to_owned();
            return Ok(Err(AgentError::Timeout {
                port,
                timeout,
                last,
            }));
        }
        attempts += 1;
        let left = timeout.saturating_sub(start.elapsed());
        match hybrid_connect(socket, port, left.min(Duration::from_secs(2))) {
            Ok(s) => return Ok(Ok((s, attempts))),
            Err(e @ (AgentError::Handshake { .. } | AgentError::Peer { .. })) => return Ok(Err(e)),
            Err(e) if start.elapsed() >= timeout => {
                return Ok(Err(AgentError::Timeout {
                    port,
                    timeout,
                    last: format!(" (last attempt: {e})"),
                }))
            }
            Err(_) => {}
        }
        // The agent listens (it said so) but the vsock daemon did not put
        // the connection through yet: nothing on the host tells when it
        // will, so the next attempt follows after a short pause.
        std::thread::sleep(Duration::from_millis(5).min(timeout.saturating_sub(start.elapsed())));
    }
}

/// What the agent says about itself, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentInfo {
    pub agent_version: String,
    pub kernel_release: String,
    /// Guest kernel start to the agent running as /init.
    pub kernel_to_init: Duration,
    /// Guest kernel start to the agent listening on vsock.
    pub kernel_to_listening: Duration,
    /// Guest kernel start to the agent set up and taking requests.
    pub kernel_to_serving: Duration,
    /// Guest kernel start to the agent's reply to this Version call.
    pub kernel_to_reply: Duration,
}

/// Highest exit status a process can report (runc: code, or 128 + signal).
const MAX_EXIT_STATUS: u32 = 255;

/// A connected agent. Clones share the connection.
#[derive(Clone)]
pub struct Agent {
    health: HealthClient,
    agent: AgentRpc,
    containers: ContainersClient,
    rpc_timeout: Duration,
    /// Deadline of the calls that make processes in the guest (create,
    /// start, exec, remove): they mount, fork and exec there, and a guest
    /// starved of CPU (many pods starting at once) takes far longer for them
    /// than for a health check.
    create_timeout: Duration,
    /// The connection's socket, for [`Agent::sever`].
    conn: Arc<UnixStream>,
    /// Replies refused as invalid so far (see [`Agent::invalid_replies`]).
    invalid: Arc<AtomicU32>,
}

/// Opens one stdio stream of a guest process (see containers.proto).
pub fn open_stream(
    agent_socket: &HybridSocket,
    header: &StreamHeader,
    timeout: Duration,
) -> Result<UnixStream, AgentError> {
    let mut s = hybrid_connect(agent_socket, STDIO_VSOCK_PORT, timeout)?;
    s.write_all(header.encode().as_bytes())
        .map_err(|source| AgentError::Connect {
            path: agent_socket.path.clone(),
            source,
        })?;
    Ok(s)
}

impl Agent {
    /// Wraps a connected guest stream in ttrpc clients.
    pub fn new(stream: UnixStream, rpc_timeout: Duration) -> Result<Self, AgentError> {
        let conn = Arc::new(stream.try_clone().map_err(|error| AgentError::Rpc {
            rpc: "connect",
            error: ttrpc::Error::Others(format!("duplicating the agent socket: {error}")),
        })?);
        let client = ttrpc::Client::new(stream.into_raw_fd()).map_err(|error| AgentError::Rpc {
            rpc: "connect",
            error,
        })?;
        Ok(Self {
            health: HealthClient::new(client.clone()),
            agent: AgentRpc::new(client.clone()),
            containers: ContainersClient::new(client),
            rpc_timeout,
            create_timeout: rpc_timeout,
            conn,
            invalid: Arc::default(),
        })
    }

    /// Gives the calls that make processes in the guest `deadline` (the
    /// others keep the RPC deadline).
    pub fn with_create_timeout(mut self, deadline: Duration) -> Self {
        self.create_timeout = deadline.max(self.rpc_timeout);
        self
    }

    /// How many replies were refused as invalid: a guest that keeps lying
    /// is taken for dead (see [`crate::vm::monitor`]).
    pub fn invalid_replies(&self) -> u32 {
        self.invalid.load(Ordering::Relaxed)
    }

    /// Counts a reply refused as invalid.
    fn checked<T>(&self, r: Result<T, AgentError>) -> Result<T, AgentError> {
        if let Err(AgentError::Invalid { .. }) = &r {
            self.invalid.fetch_add(1, Ordering::Relaxed);
        }
        r
    }

    /// Shuts the connection down: every RPC waiting on it fails now and
    /// later ones fail at once.
    pub fn sever(&self) {
        let _ = self.conn.shutdown(std::net::Shutdown::Both);
    }

    fn ctx(&self) -> ttrpc::context::Context {
        ttrpc::context::with_duration(self.rpc_timeout)
    }

    fn create_ctx(&self) -> ttrpc::context::Context {
        ttrpc::context::with_duration(self.create_timeout)
    }

    /// Health check; only SERVING is healthy.
    pub fn check(&self) -> Result<(), AgentError> {
        self.check_within(self.rpc_timeout)
    }

    /// Health check that fails when the answer takes longer than `deadline`.
    pub fn check_within(&self, deadline: Duration) -> Result<(), AgentError> {
        let resp = self
            .health
            .check(
                ttrpc::context::with_duration(deadline),
                &CheckRequest::new(),
            )
            .map_err(|error| AgentError::Rpc {
                rpc: "Check",
                error,
            })?;
        self.checked(match resp.status.enum_value() {
            Ok(ServingStatus::SERVING) => Ok(()),
            other => Err(AgentError::Invalid {
                rpc: "Check",
                why: format!("status {other:?}, not SERVING"),
            }),
        })
    }

    /// Agent identity and boot timings. `guest_uptime_bound` is the host's
    /// time since it started the VMM: the guest cannot have been up longer.
    pub fn version(&self, guest_uptime_bound: Duration) -> Result<AgentInfo, AgentError> {
        let resp = self
            .health
            .version(self.ctx(), &CheckRequest::new())
            .map_err(|error| AgentError::Rpc {
                rpc: "Version",
                error,
            })?;
        self.checked(validate_version(&resp, guest_uptime_bound))
    }

    /// Asks the agent to end the VM. The VMM's exit is the real completion.
    pub fn shutdown(&self) -> Result<(), AgentError> {
        self.agent
            .shutdown(self.ctx(), &ShutdownRequest::new())
            .map(drop)
            .map_err(|error| AgentError::Rpc {
                rpc: "Shutdown",
                error,
            })
    }
}

/// Most processes a container may report; more is a lying guest.
const MAX_PIDS: usize = 1 << 16;

/// Checks a process list from the guest: real pids, each once.
fn validate_pids(mut pids: Vec<u32>) -> Result<Vec<u32>, AgentError> {
    let invalid = |why: String| AgentError::Invalid {
        rpc: "ListProcesses",
        why,
    };
    if pids.len() > MAX_PIDS {
        return Err(invalid(format!("{} pids (at most {MAX_PIDS})", pids.len())));
    }
    if let Some(p) = pids.iter().find(|&&p| p == 0 || p > i32::MAX as u32) {
        return Err(invalid(format!("pid {p}")));
    }
    pids.sort_unstable();
    if pids.windows(2).any(|w| w[0] == w[1]) {
        return Err(invalid("a pid listed twice".into()));
    }
    Ok(pids)
}

fn validate_pid(rpc: &'static str, pid: u32) -> Result<u32, AgentError> {
    if pid == 0 || pid > i32::MAX as u32 {
        return Err(AgentError::Invalid {
            rpc,
            why: format!("pid {pid}"),
        });
    }
    Ok(pid)
}

fn container_request(container_id: &str) -> ContainerRequest {
    let mut req = ContainerRequest::new();
    req.container_id = container_id.to_owned();
    req
}

fn process_request(container_id: &str, exec_id: Option<&str>) -> ProcessRequest {
    let mut req = ProcessRequest::new();
    req.container_id = container_id.to_owned();
    req.exec_id = exec_id.unwrap_or_default().to_owned();
    req
}

/// Names the rpc in the error of a failed call.
fn rpc<T>(rpc: &'static str, r: ttrpc::Result<T>) -> Result<T, AgentError> {
    r.map_err(|error| AgentError::Rpc { rpc, error })
}

impl Agent {
    /// Creates a container from an OCI spec; its rootfs must already be in
    /// the share at `<container_id>/rootfs`, and each requested stdio stream
    /// already opened with [`open_stream`].
    pub fn create_container(
        &self,
        container_id: &str,
        spec_json: Vec<u8>,
        stdio: Stdio,
        network: Option<Network>,
        synced_volumes: Vec<u32>,
    ) -> Result<(), AgentError> {
        let mut req = CreateContainerRequest::new();
        req.container_id = container_id.to_owned();
        req.spec_json = spec_json;
        req.stdio = Some(stdio).into();
        req.network = network.into();
        req.synced_volumes = synced_volumes;
        rpc(
            "CreateContainer",
            self.containers.create_container(self.create_ctx(), &req),
        )
        .map(drop)
    }

    /// Starts a created container; returns its init's guest PID.
    pub fn start_container(&self, container_id: &str) -> Result<u32, AgentError> {
        let req = container_request(container_id);
        let resp = rpc(
            "StartContainer",
            self.containers.start_container(self.create_ctx(), &req),
        )?;
        self.checked(validate_pid("StartContainer", resp.pid))
    }

    /// Creates and starts an exec process (`process_json`: an OCI Process);
    /// its streams must already be open. Returns its guest PID.
    pub fn exec_process(
        &self,
        container_id: &str,
        exec_id: &str,
        process_json: Vec<u8>,
        stdio: Stdio,
    ) -> Result<u32, AgentError> {
        let mut req = ExecProcessRequest::new();
        req.container_id = container_id.to_owned();
        req.exec_id = exec_id.to_owned();
        req.process_json = process_json;
        req.stdio = Some(stdio).into();
        let resp = rpc(
            "ExecProcess",
            self.containers.exec_process(self.create_ctx(), &req),
        )?;
        self.checked(validate_pid("ExecProcess", resp.pid))
    }

    /// Waits, without deadline, until a process (the init when `exec_id` is
    /// None) has exited and its output has drained; returns its exit status.
    pub fn wait_process(
        &self,
        container_id: &str,
        exec_id: Option<&str>,
    ) -> Result<u32, AgentError> {
        let req = process_request(container_id, exec_id);
        let resp = rpc(
            "WaitProcess",
            self.containers
                .wait_process(ttrpc::context::with_timeout(0), &req),
        )?;
        if resp.exit_status > MAX_EXIT_STATUS {
            return self.checked(Err(AgentError::Invalid {
                rpc: "WaitProcess",
                why: format!("exit status {}", resp.exit_status),
            }));
        }
        Ok(resp.exit_status)
    }

    /// Sends `signal` to a process, or with `all` to every process of the
    /// container.
    pub fn signal_process(
        &self,
        container_id: &str,
        exec_id: Option<&str>,
        signal: u32,
        all: bool,
    ) -> Result<(), AgentError> {
        let mut req = SignalRequest::new();
        req.container_id = container_id.to_owned();
        req.exec_id = exec_id.unwrap_or_default().to_owned();
        req.signal = signal;
        req.all = all;
        rpc(
            "SignalProcess",
            self.containers.signal_process(self.ctx(), &req),
        )
        .map(drop)
    }

    /// Sets the window size of a process's terminal.
    pub fn resize_pty(
        &self,
        container_id: &str,
        exec_id: Option<&str>,
        width: u32,
        height: u32,
    ) -> Result<(), AgentError> {
        let mut req = ResizePtyRequest::new();
        req.container_id = container_id.to_owned();
        req.exec_id = exec_id.unwrap_or_default().to_owned();
        req.width = width;
        req.height = height;
        rpc("ResizePty", self.containers.resize_pty(self.ctx(), &req)).map(drop)
    }

    /// Forgets an exec process, killing it if it still runs.
    pub fn remove_process(&self, container_id: &str, exec_id: &str) -> Result<(), AgentError> {
        let req = process_request(container_id, Some(exec_id));
        rpc(
            "RemoveProcess",
            self.containers.remove_process(self.ctx(), &req),
        )
        .map(drop)
    }

    pub fn pause_container(&self, container_id: &str) -> Result<(), AgentError> {
        let req = container_request(container_id);
        rpc(
            "PauseContainer",
            self.containers.pause_container(self.ctx(), &req),
        )
        .map(drop)
    }

    pub fn resume_container(&self, container_id: &str) -> Result<(), AgentError> {
        let req = container_request(container_id);
        rpc(
            "ResumeContainer",
            self.containers.resume_container(self.ctx(), &req),
        )
        .map(drop)
    }

    /// Guest PIDs of every process in the container, ascending, validated.
    pub fn list_processes(&self, container_id: &str) -> Result<Vec<u32>, AgentError> {
        let req = container_request(container_id);
        let resp = rpc(
            "ListProcesses",
            self.containers.list_processes(self.ctx(), &req),
        )?;
        self.checked(validate_pids(resp.pids))
    }

    /// The container's cgroup figures as the guest reads them. They are
    /// plain counters: any value is possible, none is trusted for a decision.
    pub fn container_stats(&self, container_id: &str) -> Result<StatsResponse, AgentError> {
        let req = container_request(container_id);
        rpc(
            "ContainerStats",
            self.containers.container_stats(self.ctx(), &req),
        )
    }

    /// Brings the guest copy of container `container_id`'s synced volume
    /// `volume` to the host's data directory `data_dir`.
    pub fn sync_volume(
        &self,
        container_id: &str,
        volume: u32,
        data_dir: &str,
    ) -> Result<(), AgentError> {
        let mut req = SyncVolumeRequest::new();
        req.container_id = container_id.to_owned();
        req.volume = volume;
        req.data_dir = data_dir.to_owned();
        rpc("SyncVolume", self.containers.sync_volume(self.ctx(), &req)).map(drop)
    }

    /// Applies new resource limits (`resources_json`: an OCI LinuxResources).
    pub fn update_container(
        &self,
        container_id: &str,
        resources_json: Vec<u8>,
    ) -> Result<(), AgentError> {
        let mut req = UpdateContainerRequest::new();
        req.container_id = container_id.to_owned();
        req.resources_json = resources_json;
        rpc(
            "UpdateContainer",
            self.containers.update_container(self.ctx(), &req),
        )
        .map(drop)
    }

    /// Blocks, without deadline, until the container has another OOM kill
    /// (true) or is gone (false).
    pub fn wait_oom(&self, container_id: &str) -> Result<bool, AgentError> {
        let req = container_request(container_id);
        rpc(
            "WaitOom",
            self.containers
                .wait_oom(ttrpc::context::with_timeout(0), &req),
        )
        .map(|r| r.oom)
    }

    /// Kills what is left of a container and removes it from the guest.
    pub fn remove_container(&self, container_id: &str) -> Result<(), AgentError> {
        let req = container_request(container_id);
        rpc(
            "RemoveContainer",
            self.containers.remove_container(self.create_ctx(), &req),
        )
        .map(drop)
    }
}

/// Checks a Version reply from the (untrusted) guest.
pub fn validate_version(
    resp: &VersionResponse,
    guest_uptime_bound: Duration,
) -> Result<AgentInfo, AgentError> {
    let invalid = |why: String| AgentError::Invalid {
        rpc: "Version",
        why,
    };
    if resp.protocol_version != PROTOCOL_VERSION {
        return Err(invalid(format!(
            "protocol version {} (this host speaks {PROTOCOL_VERSION}); rebuild the guest image with `make guest-image`",
            resp.protocol_version
        )));
    }
    for (name, value) in [
        ("agent_version", &resp.agent_version),
        ("kernel_release", &resp.kernel_release),
    ] {
        if value.is_empty()
            || value.len() > MAX_FIELD
            || !value.chars().all(|c| c.is_ascii_graphic())
        {
            return Err(invalid(format!(
                "{name} is empty, longer than {MAX_FIELD} or not printable"
            )));
        }
    }
    let init = Duration::from_nanos(resp.init_started_ns);
    let listening = Duration::from_nanos(resp.listening_ns);
    let serving = Duration::from_nanos(resp.serving_ns);
    let replied = Duration::from_nanos(resp.replied_ns);
    // Guest and host clocks differ a little in rate; allow 10% and 250 ms.
    let bound = guest_uptime_bound + guest_uptime_bound / 10 + Duration::from_millis(250);
    if init.is_zero()
        || init > listening
        || listening > serving
        || serving > replied
        || replied > bound
    {
        return Err(invalid(format!(
            "boot timings init={init:?} listening={listening:?} serving={serving:?} replied={replied:?} are impossible for a guest up at most {guest_uptime_bound:?}"
        )));
    }
    Ok(AgentInfo {
        agent_version: resp.agent_version.clone(),
        kernel_release: resp.kernel_release.clone(),
        kernel_to_init: init,
        kernel_to_listening: listening,
        kernel_to_serving: serving,
        kernel_to_reply: replied,
    })
}

#[cfg(test)]
mod tests {
    use std::os::unix::net::UnixListener;

    use super::*;

    fn version(init: u64, listening: u64) -> VersionResponse {
        let mut v = VersionResponse::new();
        v.protocol_version = PROTOCOL_VERSION;
        v.agent_version = "0.1.0".into();
        v.kernel_release = "6.1.0-husk".into();
        v.init_started_ns = init;
        v.listening_ns = listening;
        v.serving_ns = listening + 500;
        v.replied_ns = listening + 1_000;
        v
    }

    #[test]
    fn a_guest_error_text_reaches_the_log_capped_and_escaped() {
        let huge = format!("bad\n\x1b[31mred\r{}", "é".repeat(4 << 20));
        let e = AgentError::Rpc {
            rpc: "CreateContainer",
            error: ttrpc::Error::RpcStatus(ttrpc::get_status(ttrpc::Code::INTERNAL, huge.clone())),
        };
        let text = e.to_string();
        assert!(text.len() < MAX_GUEST_TEXT + 200, "{} bytes", text.len());
        assert!(
            !text.chars().any(char::is_control),
            "control characters: {text:?}"
        );
        assert!(
            text.starts_with("CreateContainer rpc failed: bad\\n\\u{1b}[31mred\\r"),
            "{text}"
        );
        assert!(text.contains("more bytes)"), "{text}");
        assert!(text.ends_with("(INTERNAL)"), "{text}");
        // Any other ttrpc error is capped and escaped too.
        let e = AgentError::Rpc {
            rpc: "Check",
            error: ttrpc::Error::Others(huge),
        };
        let text = e.to_string();
        assert!(text.len() < MAX_GUEST_TEXT + 200, "{} bytes", text.len());
        assert!(!text.chars().any(char::is_control), "{text:?}");
        assert_eq!(guest_text("short", 100), "short");
        // A cut never splits a character.
        assert_eq!(guest_text("ééé", 3), "é... (4 more bytes)");
    }

    /// A guest that answers each request with what `reply` makes of the
    /// request's stream id (raw ttrpc frames), on a fresh connection.
    fn hostile_agent(reply: impl Fn(u32) -> Vec<u8> + Send + 'static) -> Agent {
        let (host, mut guest) = UnixStream::pair().unwrap();
        std::thread::spawn(move || loop {
            let mut header = [0u8; 10];
            if guest.read_exact(&mut header).is_err() {
                return;
            }
            let len = u32::from_be_bytes(header[..4].try_into().unwrap()) as usize;
            let stream = u32::from_be_bytes(header[4..8].try_into().unwrap());
            let mut body = vec![0u8; len];
            if guest.read_exact(&mut body).is_err() {
                return;
            }
            let out = reply(stream);
            if out.is_empty() || guest.write_all(&out).is_err() {
                return;
            }
        });
        Agent::new(host, Duration::from_secs(2)).unwrap()
    }

    /// A ttrpc response frame header: length, stream id, type 2, no flags.
    fn frame(stream: u32, len: u32) -> Vec<u8> {
        let mut f = len.to_be_bytes().to_vec();
        f.extend(stream.to_be_bytes());
        f.extend([2, 0]);
        f
    }

    /// A well-formed ttrpc response carrying `msg`.
    fn response(stream: u32, msg: &impl protobuf::Message) -> Vec<u8> {
        let mut r = ttrpc::proto::Response::new();
        r.payload = msg.write_to_bytes().unwrap();
        let body = protobuf::Message::write_to_bytes(&r).unwrap();
        let mut f = frame(stream, body.len() as u32);
        f.extend(body);
        f
    }

    fn serving() -> husk_protocol::health::CheckResponse {
        let mut c = husk_protocol::health::CheckResponse::new();
        c.status = ServingStatus::SERVING.into();
        c
    }

    #[test]
    fn hostile_frames_fail_the_call_without_a_panic_or_a_huge_buffer() {
        // Control: a well-formed answer is taken.
        let good = hostile_agent(|id| response(id, &serving()));
        good.check().expect("a well-formed reply");

        // A frame over ttrpc's 4 MiB limit: refused from its header, the
        // body never buffered.
        let huge = hostile_agent(|id| {
            let mut f = frame(id, 5 << 20);
            f.extend(vec![0u8; 5 << 20]);
            f
        });
        assert!(huge.check().is_err());

        // A frame cut short: the header promises more than ever comes.
        let cut = hostile_agent(|id| {
            let mut f = frame(id, 100);
            f.extend([0u8; 10]);
            f
        });
        assert!(cut.check().is_err());

        // Bytes that are no protobuf.
        let garbage = hostile_agent(|id| {
            let mut f = frame(id, 16);
            f.extend([0xff; 16]);
            f
        });
        assert!(garbage.check().is_err());

        // An answer for a stream nobody asked on, then none: the call
        // times out instead of taking the stray answer.
        let stray = hostile_agent(|id| response(id + 1000, &serving()));
        assert!(stray.check_within(Duration::from_millis(300)).is_err());

        // A reply that parses but says nonsense counts as invalid.
        let mut lying = husk_protocol::health::CheckResponse::new();
        lying.status = ServingStatus::NOT_SERVING.into();
        let liar = hostile_agent(move |id| response(id, &lying));
        for _ in 0..3 {
            assert!(matches!(liar.check(), Err(AgentError::Invalid { .. })));
        }
        assert_eq!(liar.invalid_replies(), 3);
        assert_eq!(good.invalid_replies(), 0);
    }

    #[test]
    fn sane_version_is_accepted() {
        let info =
            validate_version(&version(1_000_000, 2_000_000), Duration::from_secs(1)).unwrap();
        assert_eq!(info.kernel_to_init, Duration::from_millis(1));
        assert_eq!(info.kernel_to_reply, Duration::from_micros(2_001));
        assert_eq!(info.kernel_release, "6.1.0-husk");
    }

    #[test]
    fn lying_guest_is_refused() {
        let bound = Duration::from_secs(1);
        let mut v = version(1, 2);
        v.protocol_version = 99;
        assert!(validate_version(&v, bound)
            .unwrap_err()
            .to_string()
            .contains("protocol version 99"));
        assert!(
            validate_version(&version(5, 4), bound).is_err(),
            "init after listening"
        );
        assert!(
            validate_version(&version(1, 60_000_000_000), bound).is_err(),
            "up longer than the VM"
        );
        // version(1, 2_000) serves at 2_500 and replies at 3_000.
        for (serving, replied, why) in [
            (2_500, 2_499, "replied before serving"),
            (1_999, 2_600, "serving before listening"),
            (0, 2_600, "serving not said (an older agent)"),
            (2_500, 60_000_000_000, "replied after the call"),
        ] {
            let mut v = version(1, 2_000);
            (v.serving_ns, v.replied_ns) = (serving, replied);
            assert!(validate_version(&v, bound).is_err(), "{why}");
        }
        let mut v = version(1, 2);
        v.kernel_release = "x".repeat(4096);
        assert!(validate_version(&v, bound).is_err(), "oversized field");
        let mut v = version(1, 2);
        v.agent_version = "1.0\n\x1b[2J".into();
        assert!(validate_version(&v, bound).is_err(), "control characters");
    }

    #[test]
    fn process_lists_are_checked() {
        assert_eq!(validate_pids(vec![9, 1, 4]).unwrap(), vec![1, 4, 9]);
        for bad in [vec![0], vec![1, 1], vec![u32::MAX], vec![1; MAX_PIDS + 1]] {
            assert!(validate_pids(bad).is_err());
        }
        assert!(validate_pid("ExecProcess", 0).is_err());
        assert_eq!(validate_pid("ExecProcess", 42).unwrap(), 42);
    }

    #[test]
    fn handshake_reply_is_parsed_strictly() {
        assert_eq!(parse_ok(b"OK 1073741824"), Some(1_073_741_824));
        for bad in [
            &b"OK"[..],
            b"OK ",
            b"ok 5",
            b"OK 5 ",
            b"OK -5",
            b"OK 99999999999",
            b"FAIL",
        ] {
            assert_eq!(parse_ok(bad), None, "{:?}", String::from_utf8_lossy(bad));
        }
    }

    /// Plays vhost-device-vsock's side of the handshake with a scripted reply.
    fn fake_daemon(
        reply: &'static [u8],
    ) -> (
        tempfile::TempDir,
        HybridSocket,
        std::thread::JoinHandle<String>,
    ) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agent.sock");
        let listener = UnixListener::bind(&path).unwrap();
        let path = served_here(path);
        let t = std::thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            let mut buf = [0u8; 13];
            s.read_exact(&mut buf).unwrap();
            s.write_all(reply).unwrap();
            String::from_utf8_lossy(&buf).into_owned()
        });
        (dir, path, t)
    }

    /// A hybrid socket this test process serves.
    fn served_here(path: PathBuf) -> HybridSocket {
        HybridSocket {
            path,
            server_pid: std::process::id(),
        }
    }

    #[test]
    fn a_socket_served_by_another_process_gets_not_a_byte() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agent.sock");
        let listener = UnixListener::bind(&path).unwrap();
        // Two connections: hybrid_connect's, then wait_ready's.
        let t = std::thread::spawn(move || {
            let mut got = Vec::new();
            for _ in 0..2 {
                let (mut s, _) = listener.accept().unwrap();
                s.read_to_end(&mut got).unwrap();
            }
            got
        });
        let other = HybridSocket {
            path: path.clone(),
            server_pid: std::process::id() + 1,
        };
        let e = hybrid_connect(&other, 1024, Duration::from_secs(5)).unwrap_err();
        assert!(
            matches!(&e, AgentError::Peer { want, got, .. }
                if *want == other.server_pid && *got as u32 == std::process::id()),
            "{e}"
        );
        assert!(e.to_string().contains("agent.sock"), "{e}");
        // wait_ready gives up at once: another try would meet the same peer.
        let start = Instant::now();
        let r: Result<_, ()> = wait_ready(&other, 1024, Duration::from_secs(30), |_| Ok(true));
        assert!(matches!(r.unwrap(), Err(AgentError::Peer { .. })));
        assert!(start.elapsed() < Duration::from_secs(5));
        assert_eq!(t.join().unwrap(), b"", "nothing was sent to the wrong peer");
    }

    #[test]
    fn a_reply_dripped_a_byte_at_a_time_meets_one_deadline() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agent.sock");
        let listener = UnixListener::bind(&path).unwrap();
        let path = served_here(path);
        let t = std::thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            // Each byte well within the timeout, the line far beyond it.
            for b in b"OK 77\n" {
                std::thread::sleep(Duration::from_millis(150));
                if s.write_all(&[*b]).is_err() {
                    break;
                }
            }
        });
        let start = Instant::now();
        let e = hybrid_connect(&path, 1024, Duration::from_millis(300)).unwrap_err();
        assert!(
            start.elapsed() < Duration::from_millis(800),
            "{:?}",
            start.elapsed()
        );
        assert!(
            matches!(&e, AgentError::Connect { source, .. }
                if matches!(source.kind(), std::io::ErrorKind::TimedOut | std::io::ErrorKind::WouldBlock)),
            "{e}"
        );
        t.join().unwrap();
    }

    #[test]
    fn handshake_keeps_bytes_after_the_reply_for_the_stream() {
        let (_dir, path, t) = fake_daemon(b"OK 77\npayload");
        let mut s = hybrid_connect(&path, 1024, Duration::from_secs(5)).unwrap();
        assert_eq!(t.join().unwrap(), "CONNECT 1024\n");
        let mut rest = String::new();
        s.read_to_string(&mut rest).unwrap();
        assert_eq!(rest, "payload");
    }

    #[test]
    fn closed_connection_means_not_listening() {
        let (_dir, path, _t) = fake_daemon(b"");
        let err = hybrid_connect(&path, 1024, Duration::from_secs(5)).unwrap_err();
        assert!(matches!(err, AgentError::NotListening { .. }), "{err}");
    }

    #[test]
    fn endless_reply_is_cut_off() {
        let (_dir, path, _t) = fake_daemon(&[b'A'; 100]);
        let err = hybrid_connect(&path, 1024, Duration::from_secs(5)).unwrap_err();
        assert!(matches!(err, AgentError::Handshake { .. }), "{err}");
    }

    #[test]
    fn wait_ready_gives_up_at_its_deadline() {
        let start = Instant::now();
        let r: Result<_, ()> = wait_ready(
            &served_here("/nonexistent/agent.sock".into()),
            1024,
            Duration::from_millis(200),
            |_| Ok(true),
        );
        let err = r.unwrap().unwrap_err();
        assert!(matches!(err, AgentError::Timeout { .. }), "{err}");
        assert!(start.elapsed() < Duration::from_secs(2));
    }

    #[test]
    fn wait_ready_makes_no_attempt_before_the_sign() {
        let start = Instant::now();
        let mut asked = Vec::new();
        let r: Result<_, ()> = wait_ready(
            &served_here("/nonexistent/agent.sock".into()),
            1024,
            Duration::from_millis(100),
            |wait| {
                asked.push(wait);
                std::thread::sleep(wait);
                Ok(false)
            },
        );
        let err = r.unwrap().unwrap_err();
        assert!(
            err.to_string().contains("never reported listening"),
            "{err}"
        );
        // Asked once, for the whole timeout.
        assert_eq!(asked.len(), 1, "{asked:?}");
        assert!(asked[0] <= Duration::from_millis(100));
        assert!(start.elapsed() >= Duration::from_millis(100));
    }

    #[test]
    fn wait_ready_stops_when_the_vm_dies() {
        let r = wait_ready(
            &served_here("/nonexistent/agent.sock".into()),
            1024,
            Duration::from_secs(10),
            |_| Err("vm exited"),
        );
        assert_eq!(r.unwrap_err(), "vm exited");
    }
}
