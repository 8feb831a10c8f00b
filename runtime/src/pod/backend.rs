//! Where a pod's VM comes from: the real one (a [`Sandbox`] in the pod's
//! host cgroup, sized by the pod's limits), or a fake in unit tests.

use std::path::Path;

use serde_json::Value;

use super::guest::{GuestAgent, VmAgent};
use super::{prepare_spec, size_guest, PodError, Role};
use crate::cgroup::{self, PodCgroup};
use crate::config::Config;
use crate::paths::SandboxPaths;
use crate::storage::MountSpec;
use crate::Sandbox;

/// Boots a pod's VM.
pub trait Backend: Send + Sync + 'static {
    type Vm: PodVm;
    /// Boots pod `pod_id`'s VM with `config` for the spec of its booting
    /// container (`bundle` holds that spec; records for `delete` go there;
    /// empty when there is no bundle).
    fn boot(
        &self,
        pod_id: &str,
        spec: &Value,
        bundle: &Path,
        config: &Config,
    ) -> Result<Self::Vm, BootError>;
}

/// A booted pod VM and the host side of its containers.
pub trait PodVm: Send + 'static {
    type Agent: GuestAgent;
    fn agent(&self) -> Self::Agent;
    /// Rewrites a container's spec for the guest and shares its rootfs and
    /// bind mounts; on error what was done stays for [`PodVm::release`].
    fn attach(
        &self,
        id: &str,
        role: &Role,
        sandbox_pid: Option<u32>,
        rootfs: &[MountSpec],
        spec: &mut Value,
    ) -> Result<(), PodError>;
    /// Undoes [`PodVm::attach`]; the guest no longer uses the container.
    fn release(&self, id: &str);
    /// Stops the VM and removes its host state.
    fn shutdown(self);
}

#[derive(Debug, thiserror::Error)]
pub enum BootError {
    #[error(transparent)]
    Spec(#[from] PodError),
    #[error("the pod's host cgroup")]
    Cgroup(#[from] cgroup::CgroupError),
    #[error("booting the pod's VM")]
    Sandbox(#[from] crate::sandbox::SandboxError),
    #[error("the pod's VM has no connected agent")]
    NoAgent,
}

/// Real VMs.
pub struct VmBackend;

/// A real pod VM: its sandbox and the host cgroup it runs in.
pub struct PodSandbox {
    sandbox: Sandbox,
    cgroup: Option<PodCgroup>,
    agent: VmAgent,
}

impl PodSandbox {
    pub fn sandbox(&self) -> &Sandbox {
        &self.sandbox
    }

    pub fn paths(&self) -> &SandboxPaths {
        self.sandbox.paths()
    }
}

impl Backend for VmBackend {
    type Vm = PodSandbox;

    /// Sizes the guest from the pod's limits, moves this process into the
    /// cgroup the spec names (so the VMM and daemons it starts are charged
    /// to the pod; recorded in the bundle for `delete` after a crash), and
    /// boots. On error the cgroup is gone again.
    fn boot(
        &self,
        pod_id: &str,
        spec: &Value,
        bundle: &Path,
        config: &Config,
    ) -> Result<PodSandbox, BootError> {
        let mut config = config.clone();
        size_guest(&mut config.guest, spec, pod_id)?;
        let cgroup = join_pod_cgroup(spec, bundle)?;
        let booted = Sandbox::boot(&config, pod_id)
            .map_err(BootError::from)
            .and_then(|sb| {
                let agent = sb.agent().cloned().ok_or(BootError::NoAgent)?;
                let socket = sb.paths().agent_socket();
                Ok((sb, VmAgent { agent, socket }))
            });
        match booted {
            Ok((sandbox, agent)) => Ok(PodSandbox {
                sandbox,
                cgroup,
                agent,
            }),
            Err(e) => {
                if let Some(cg) = cgroup {
                    cg.remove();
                }
                Err(e)
            }
        }
    }
}

/// Moves this process into the cgroup the booting spec names, so the VMM
/// and daemons it starts are charged to the pod, and records it in the
/// bundle for `delete` after a crash (no bundle, no record).
fn join_pod_cgroup(spec: &Value, bundle: &Path) -> Result<Option<PodCgroup>, BootError> {
    let Some(path) = spec
        .pointer("/linux/cgroupsPath")
        .and_then(Value::as_str)
        .filter(|p| !p.is_empty())
    else {
        return Ok(None);
    };
    let cg = match PodCgroup::enter(path) {
        Ok(cg) => cg,
        // A host without any cgroup hierarchy (a bare VM image, the nested
        // lab's L1) has nothing to account in: the VM runs where the
        // caller runs.
        Err(cgroup::CgroupError::NoHierarchy) => {
            tracing::warn!(
                cgroup = path,
                "no cgroup hierarchy mounted; the VM is not in a pod cgroup"
            );
            return Ok(None);
        }
        Err(e) => return Err(e.into()),
    };
    if !bundle.as_os_str().is_empty() {
        if let Err(e) = cgroup::record(&bundle.join(cgroup::RECORD_FILE), &cg) {
            tracing::warn!(bundle = %bundle.display(), "recording the pod's cgroup: {e}");
        }
    }
    Ok(Some(cg))
}

impl PodVm for PodSandbox {
    type Agent = VmAgent;

    fn agent(&self) -> VmAgent {
        self.agent.clone()
    }

    fn attach(
        &self,
        id: &str,
        role: &Role,
        sandbox_pid: Option<u32>,
        rootfs: &[MountSpec],
        spec: &mut Value,
    ) -> Result<(), PodError> {
        let guest_only = prepare_spec(spec, id, role, sandbox_pid, super::fs_size)?;
        self.paths().container(id).attach(rootfs, spec, guest_only)
    }

    fn release(&self, id: &str) {
        self.paths().container(id).release();
    }

    fn shutdown(self) {
        if let Err(e) = self.sandbox.shutdown() {
            tracing::warn!("stopping the pod's VM: {}", crate::error_chain(&e));
        }
        if let Some(cg) = self.cgroup {
            cg.remove();
        }
    }
}
