//! Hypervisor backends: the trait the sandbox drives, and its implementations.

mod qemu;

use std::path::PathBuf;
use std::process::ExitStatus;
use std::time::Duration;

pub use qemu::Qemu;

use crate::process::ProcessError;

/// Everything a backend needs to start one sandbox VM. The device daemons are
/// already listening on their sockets when a backend sees this.
#[derive(Debug, Clone)]
pub struct VmSpec {
    pub id: String,
    pub kernel: PathBuf,
    pub initramfs: PathBuf,
    /// Kernel command line, without the device entries a backend adds.
    pub cmdline: String,
    pub vcpus: u32,
    pub memory_mib: u32,
    /// The guest serial console is written here.
    pub console_log: PathBuf,
    /// The VMM's own stdout and stderr.
    pub vmm_log: PathBuf,
    /// vhost-user socket of virtiofsd (tag [`SHARE_TAG`]).
    pub fs_socket: PathBuf,
    /// vhost-user socket of vhost-device-vsock.
    pub vsock_socket: PathBuf,
}

/// virtio-fs tag of the pod share; the agent mounts it by this name.
pub const SHARE_TAG: &str = "husk";

#[derive(Debug, thiserror::Error)]
pub enum HypervisorError {
    #[error(transparent)]
    Process(#[from] ProcessError),
    #[error("VM is not running")]
    NotStarted,
}

/// A VMM driving one sandbox VM.
pub trait Hypervisor: Send {
    /// Short name for logs and `husk check`.
    fn name(&self) -> String;

    /// Kernel parameters this VMM needs, e.g. how a guest reboot reaches it.
    fn kernel_params(&self) -> &'static str;

    /// Starts the VMM. Returns once the process runs; readiness of the guest
    /// is the agent's business.
    fn start(&mut self, spec: &VmSpec) -> Result<(), HypervisorError>;

    /// The VMM's exit status if it has ended, without blocking.
    fn try_wait(&mut self) -> Result<Option<ExitStatus>, HypervisorError>;

    /// Waits for the VMM to end, at most `timeout`.
    fn wait_timeout(&mut self, timeout: Duration) -> Result<Option<ExitStatus>, HypervisorError>;

    /// Stops the VMM at once and reaps it.
    fn kill(&mut self) -> Result<(), HypervisorError>;

    /// PIDs of the VMM's processes, for accounting and leak checks.
    fn pids(&self) -> Vec<u32>;

    /// The last `max` bytes of what the VMM process printed.
    fn log_tail(&self, max: usize) -> String;
}
