//! Hypervisor backends: the trait the sandbox drives, and its implementations.

mod husk_vmm;
mod qemu;

use std::ffi::OsString;
use std::path::PathBuf;
use std::process::ExitStatus;
use std::time::Duration;

pub use husk_vmm::HuskVmm;
pub use qemu::Qemu;

use crate::process::{Process, ProcessError};

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
    /// The VMM's control socket, for backends that have one (husk-vmm:
    /// pause, resume, shutdown, status through `husk-vmm ctl`).
    pub control_socket: PathBuf,
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

/// A VMM driving one sandbox VM: one process per VM, started from the
/// command line the backend builds; the rest is the same for every backend.
pub trait Hypervisor: Send {
    /// Short name for logs and `husk check`.
    fn name(&self) -> String;

    /// Kernel parameters this VMM needs, e.g. how a guest reboot reaches it.
    fn kernel_params(&self) -> &'static str;

    /// Process name (for errors), binary and arguments that run `spec`.
    fn command(&self, spec: &VmSpec) -> (&'static str, PathBuf, Vec<OsString>);

    /// The VMM process, once started.
    fn process(&self) -> Option<&Process>;
    fn process_slot(&mut self) -> &mut Option<Process>;

    /// Starts the VMM. Returns once the process runs; readiness of the guest
    /// is the agent's business.
    fn start(&mut self, spec: &VmSpec) -> Result<(), HypervisorError> {
        let (name, binary, args) = self.command(spec);
        *self.process_slot() = Some(Process::spawn(name, &binary, args, &spec.vmm_log)?);
        Ok(())
    }

    /// The VMM's exit status if it has ended, without blocking.
    fn try_wait(&mut self) -> Result<Option<ExitStatus>, HypervisorError> {
        let p = self.process_slot().as_mut();
        Ok(p.ok_or(HypervisorError::NotStarted)?.try_wait()?)
    }

    /// Waits for the VMM to end, at most `timeout`.
    fn wait_timeout(&mut self, timeout: Duration) -> Result<Option<ExitStatus>, HypervisorError> {
        let p = self.process_slot().as_mut();
        Ok(p.ok_or(HypervisorError::NotStarted)?
            .wait_timeout(timeout)?)
    }

    /// Stops the VMM at once and reaps it.
    fn kill(&mut self) -> Result<(), HypervisorError> {
        if let Some(p) = self.process_slot().as_mut() {
            p.kill()?;
        }
        Ok(())
    }

    /// PIDs of the VMM's processes, for accounting and leak checks.
    fn pids(&self) -> Vec<u32> {
        self.process().iter().map(|p| p.pid()).collect()
    }

    /// The last `max` bytes of what the VMM process printed.
    fn log_tail(&self, max: usize) -> String {
        self.process().map(|p| p.log_tail(max)).unwrap_or_default()
    }
}
