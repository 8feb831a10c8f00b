//! What the pod API needs of the guest agent, as a trait: the real client
//! over the sandbox's vsock, or a fake in unit tests.

use std::os::unix::net::UnixStream;
use std::time::Duration;

use husk_protocol::containers::{Network, StatsResponse, Stdio};
use husk_protocol::StreamHeader;

use crate::vm::agent::{self, Agent, AgentError, HybridSocket};

/// How long opening one stdio stream to the agent may take.
const STREAM_TIMEOUT: Duration = Duration::from_secs(10);

/// The agent's container calls (see agent/protocol's containers.proto).
/// Blocking; `wait_process` and `wait_oom` without deadline.
pub trait GuestAgent: Clone + Send + Sync + 'static {
    /// Opens one stdio stream of a process, before its create or exec.
    fn open_stream(&self, header: &StreamHeader) -> Result<UnixStream, AgentError>;
    /// Creates container `id`; `network` for a pod's sandbox, whose new
    /// network namespace gets the pod's NICs; `synced_volumes` the binds
    /// the guest keeps a synced copy of.
    fn create_container(
        &self,
        id: &str,
        spec: Vec<u8>,
        stdio: Stdio,
        network: Option<Network>,
        synced_volumes: Vec<u32>,
    ) -> Result<(), AgentError>;
    fn start_container(&self, id: &str) -> Result<u32, AgentError>;
    fn exec_process(
        &self,
        id: &str,
        exec_id: &str,
        process: Vec<u8>,
        stdio: Stdio,
    ) -> Result<u32, AgentError>;
    fn wait_process(&self, id: &str, exec_id: Option<&str>) -> Result<u32, AgentError>;
    fn signal_process(
        &self,
        id: &str,
        exec_id: Option<&str>,
        signal: u32,
        all: bool,
    ) -> Result<(), AgentError>;
    fn resize_pty(
        &self,
        id: &str,
        exec_id: Option<&str>,
        width: u32,
        height: u32,
    ) -> Result<(), AgentError>;
    fn remove_process(&self, id: &str, exec_id: &str) -> Result<(), AgentError>;
    fn pause_container(&self, id: &str) -> Result<(), AgentError>;
    fn resume_container(&self, id: &str) -> Result<(), AgentError>;
    fn list_processes(&self, id: &str) -> Result<Vec<u32>, AgentError>;
    fn container_stats(&self, id: &str) -> Result<StatsResponse, AgentError>;
    fn update_container(&self, id: &str, resources: Vec<u8>) -> Result<(), AgentError>;
    /// Blocks until the container's cgroup records an OOM kill; false when
    /// the container is gone.
    fn wait_oom(&self, id: &str) -> Result<bool, AgentError>;
    fn remove_container(&self, id: &str) -> Result<(), AgentError>;
}

/// The agent of a booted sandbox: its ttrpc client and the socket its
/// stdio streams are opened on.
#[derive(Clone)]
pub struct VmAgent {
    pub agent: Agent,
    pub socket: HybridSocket,
}

impl GuestAgent for VmAgent {
    fn open_stream(&self, header: &StreamHeader) -> Result<UnixStream, AgentError> {
        agent::open_stream(&self.socket, header, STREAM_TIMEOUT)
    }

    fn create_container(
        &self,
        id: &str,
        spec: Vec<u8>,
        stdio: Stdio,
        network: Option<Network>,
        synced_volumes: Vec<u32>,
    ) -> Result<(), AgentError> {
        self.agent
            .create_container(id, spec, stdio, network, synced_volumes)
    }

    fn start_container(&self, id: &str) -> Result<u32, AgentError> {
        self.agent.start_container(id)
    }

    fn exec_process(
        &self,
        id: &str,
        exec_id: &str,
        process: Vec<u8>,
        stdio: Stdio,
    ) -> Result<u32, AgentError> {
        self.agent.exec_process(id, exec_id, process, stdio)
    }

    fn wait_process(&self, id: &str, exec_id: Option<&str>) -> Result<u32, AgentError> {
        self.agent.wait_process(id, exec_id)
    }

    fn signal_process(
        &self,
        id: &str,
        exec_id: Option<&str>,
        signal: u32,
        all: bool,
    ) -> Result<(), AgentError> {
        self.agent.signal_process(id, exec_id, signal, all)
    }

    fn resize_pty(
        &self,
        id: &str,
        exec_id: Option<&str>,
        width: u32,
        height: u32,
    ) -> Result<(), AgentError> {
        self.agent.resize_pty(id, exec_id, width, height)
    }

    fn remove_process(&self, id: &str, exec_id: &str) -> Result<(), AgentError> {
        self.agent.remove_process(id, exec_id)
    }

    fn pause_container(&self, id: &str) -> Result<(), AgentError> {
        self.agent.pause_container(id)
    }

    fn resume_container(&self, id: &str) -> Result<(), AgentError> {
        self.agent.resume_container(id)
    }

    fn list_processes(&self, id: &str) -> Result<Vec<u32>, AgentError> {
        self.agent.list_processes(id)
    }

    fn container_stats(&self, id: &str) -> Result<StatsResponse, AgentError> {
        self.agent.container_stats(id)
    }

    fn update_container(&self, id: &str, resources: Vec<u8>) -> Result<(), AgentError> {
        self.agent.update_container(id, resources)
    }

    fn wait_oom(&self, id: &str) -> Result<bool, AgentError> {
        self.agent.wait_oom(id)
    }

    fn remove_container(&self, id: &str) -> Result<(), AgentError> {
        self.agent.remove_container(id)
    }
}
