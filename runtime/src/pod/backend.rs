//! Where a pod's VM comes from: the real one (a [`Sandbox`] in the pod's
//! host cgroup, sized by the pod's limits), or a fake in unit tests.

use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::time::Instant;

use husk_protocol::containers::Network;
use husk_protocol::SandboxId;
use oci_spec::runtime::{LinuxNamespaceType, Spec};

use super::guest::{GuestAgent, VmAgent};
use super::{prepare_spec, size_guest, PodError, Role};
use crate::config::Config;
use crate::host::cgroup::{self, PodCgroup};
use crate::host::network::{self, PodNetwork};
use crate::host::paths::{self, SandboxPaths};
use crate::host::storage::{self, MountSpec};
use crate::pod::portforward::{self, PortForward};
use crate::pod::volumes::VolumeWatch;
use crate::vm::hypervisor::NetDevice;
use crate::vm::monitor::Verdict;
use crate::vm::sandbox::Owner;
use crate::Sandbox;

/// Boots a pod's VM.
pub trait Backend: Send + Sync + 'static {
    type Vm: PodVm;
    /// Boots pod `pod_id`'s VM with `config` for the spec of its booting
    /// container (`bundle` holds that spec; records for `delete` go there;
    /// empty when there is no bundle).
    fn boot(
        &self,
        pod_id: &SandboxId,
        spec: &Spec,
        bundle: &Path,
        config: &Config,
    ) -> Result<Self::Vm, BootError>;
}

/// A booted pod VM and the host side of its containers.
pub trait PodVm: Send + 'static {
    type Agent: GuestAgent;
    fn agent(&self) -> Self::Agent;
    /// Rewrites a container's spec for the guest and shares its rootfs and
    /// bind mounts; returns the binds that are synced volumes, watched from
    /// now on. On error what was done stays for [`PodVm::release`].
    fn attach(
        &self,
        id: &str,
        role: &Role,
        sandbox_pid: Option<u32>,
        rootfs: &[MountSpec],
        spec: &mut Spec,
    ) -> Result<Vec<u32>, PodError>;
    /// The network the guest gives a container of `role` in its new network
    /// namespace: the pod's, for its sandbox; none for the others.
    fn network(&self, role: &Role) -> Option<Network>;
    /// Records in a task's bundle that this VM's sandbox serves it, so
    /// that `delete` after a crash removes only what is its own.
    fn record_owner(&self, bundle: &Path);
    /// Undoes [`PodVm::attach`]; the guest no longer uses the container.
    fn release(&self, id: &str);
    /// Kills the VM and its daemons now and cuts the agent connection, so
    /// every call waiting on the guest fails: for a guest not trusted to
    /// end (its state stays for [`PodVm::shutdown`]).
    fn kill(&self);
    /// Why the VM went down under the pod (its liveness monitor's
    /// verdict), once it has.
    fn verdict(&self) -> Option<Verdict>;
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
    Sandbox(#[from] crate::vm::sandbox::SandboxError),
    #[error("the pod's VM has no connected agent")]
    NoAgent,
    #[error("the pod's network")]
    Network(#[from] network::NetworkError),
    #[error("the pod's port-forward")]
    Forward(#[from] portforward::ForwardError),
}

/// Real VMs, their state in the directories of one containerd namespace.
pub struct VmBackend {
    namespace: String,
}

impl VmBackend {
    /// VMs of pods of containerd namespace `namespace`
    /// ([`crate::host::paths::DIRECT_NAMESPACE`] for husk's own).
    pub fn new(namespace: impl Into<String>) -> Self {
        Self {
            namespace: namespace.into(),
        }
    }
}

/// A real pod VM: its sandbox, the host cgroup it runs in and the taps
/// that carry the pod's CNI network to it.
pub struct PodSandbox {
    sandbox: Sandbox,
    cgroup: Option<PodCgroup>,
    network: Option<PodNetwork>,
    forward: Option<PortForward>,
    agent: VmAgent,
    /// The token of the sandbox's owner record.
    owner_token: String,
    /// Keeps the guest's copies of synced volumes up to date.
    volumes: VolumeWatch,
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
        pod_id: &SandboxId,
        spec: &Spec,
        bundle: &Path,
        config: &Config,
    ) -> Result<PodSandbox, BootError> {
        let mut config = config.clone();
        size_guest(&mut config.guest, spec, pod_id)?;
        let cgroup = join_pod_cgroup(spec, bundle)?;
        let t_network = Instant::now();
        let network = match Role::of(spec, pod_id) {
            Ok(Role::Sandbox) => pod_netns(spec)
                .map(|ns| PodNetwork::attach(&ns))
                .transpose(),
            _ => Ok(None),
        };
        let network_time = t_network.elapsed();
        let network = match network {
            Ok(n) => n,
            Err(e) => {
                if let Some(cg) = cgroup {
                    cg.remove();
                }
                return Err(e.into());
            }
        };
        let netns = network.as_ref().map(|n| n.netns().to_path_buf());
        let nets = network
            .iter()
            .flat_map(|n| n.taps())
            .map(|t| NetDevice {
                fd: t.fd.as_raw_fd(),
                mac: t.link.mac.clone(),
                mtu: t.link.mtu,
            })
            .collect();
        let owner = Owner {
            namespace: &self.namespace,
            token: paths::new_owner_token(),
            pod: crate::pod::inventory::PodRecord::kubernetes(spec),
        };
        // Into the bundle first: a shim that dies while booting leaves a
        // sandbox its task's `delete` may still remove.
        record_owner_in(bundle, &owner.token);
        let booted = Sandbox::boot_with_nets(&config, &owner, pod_id, nets)
            .map_err(BootError::from)
            .and_then(|sb| {
                let agent = sb.agent().cloned().ok_or(BootError::NoAgent)?;
                let socket = sb.agent_socket();
                let t_forward = Instant::now();
                let forward = netns
                    .as_deref()
                    .map(|ns| PortForward::start(ns, &socket, pod_id))
                    .transpose()?;
                if netns.is_some() {
                    let ms = |d: std::time::Duration| d.as_secs_f64() * 1e3;
                    tracing::info!(
                        "pod {pod_id}: host network set up in {:.1} ms (taps and redirects {:.1} ms, port-forward {:.1} ms)",
                        ms(network_time + t_forward.elapsed()),
                        ms(network_time),
                        ms(t_forward.elapsed())
                    );
                }
                Ok((sb, VmAgent { agent, socket }, forward))
            });
        match booted {
            Ok((sandbox, agent, forward)) => Ok(PodSandbox {
                volumes: VolumeWatch::new(agent.agent.clone()),
                sandbox,
                cgroup,
                network,
                forward,
                agent,
                owner_token: owner.token,
            }),
            Err(e) => {
                detach(network);
                if let Some(cg) = cgroup {
                    cg.remove();
                }
                Err(e)
            }
        }
    }
}

/// The host network namespace CNI set up for the pod: the path a
/// sandbox spec gives its network namespace.
pub fn pod_netns(spec: &Spec) -> Option<PathBuf> {
    spec.linux()
        .as_ref()?
        .namespaces()
        .as_ref()?
        .iter()
        .find(|ns| ns.typ() == LinuxNamespaceType::Network)?
        .path()
        .clone()
        .filter(|p| !p.as_os_str().is_empty())
}

/// Writes the sandbox's owner token into a task's bundle (no bundle, no
/// record); a failure is logged (`delete` then leaves the state alone).
fn record_owner_in(bundle: &Path, token: &str) {
    if bundle.as_os_str().is_empty() {
        return;
    }
    if let Err(e) = paths::record_bundle_owner(bundle, token) {
        tracing::warn!(bundle = %bundle.display(), "recording the sandbox's owner: {e}");
    }
}

/// Removes the pod's taps and redirects; a failure is logged (the netns
/// goes with the pod anyway, and `delete` tries again).
fn detach(network: Option<PodNetwork>) {
    if let Some(n) = network {
        let netns = n.netns().to_path_buf();
        if let Err(e) = n.detach() {
            tracing::warn!(netns = %netns.display(), "removing the pod's taps: {}", crate::error_chain(&e));
        }
    }
}

/// Moves this process into the cgroup the booting spec names, so the VMM
/// and daemons it starts are charged to the pod, and records it in the
/// bundle for `delete` after a crash (no bundle, no record).
fn join_pod_cgroup(spec: &Spec, bundle: &Path) -> Result<Option<PodCgroup>, BootError> {
    let Some(path) = spec
        .linux()
        .as_ref()
        .and_then(|l| l.cgroups_path().as_ref())
        .filter(|p| !p.as_os_str().is_empty())
    else {
        return Ok(None);
    };
    let path = path.to_str().ok_or_else(|| cgroup::CgroupError::Path {
        path: path.display().to_string(),
        why: "it is not UTF-8",
    })?;
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
        spec: &mut Spec,
    ) -> Result<Vec<u32>, PodError> {
        let guest_only = prepare_spec(spec, id, role, sandbox_pid, super::fs_size)?;
        let synced = storage::attach_container(&self.paths().container(id), rootfs, spec)?;
        guest_only.restore(spec);
        let mut watched = Vec::with_capacity(synced.len());
        for v in synced {
            self.volumes
                .watch(id, v.n, &v.dir)
                .map_err(|source| PodError::WatchVolume {
                    dir: v.dir.clone(),
                    source,
                })?;
            watched.push(v.n);
        }
        Ok(watched)
    }

    fn network(&self, role: &Role) -> Option<Network> {
        match role {
            Role::Sandbox => self.network.as_ref().map(PodNetwork::guest_config),
            _ => None,
        }
    }

    fn record_owner(&self, bundle: &Path) {
        record_owner_in(bundle, &self.owner_token);
    }

    fn kill(&self) {
        self.sandbox.kill();
    }

    fn verdict(&self) -> Option<Verdict> {
        self.sandbox.verdict()
    }

    fn release(&self, id: &str) {
        self.volumes.forget(id);
        storage::release_container(&self.paths().container(id));
    }

    fn shutdown(self) {
        self.volumes.stop();
        if let Err(e) = self.sandbox.shutdown() {
            tracing::warn!("stopping the pod's VM: {}", crate::error_chain(&e));
        }
        if let Some(f) = self.forward {
            f.stop();
        }
        detach(self.network);
        if let Some(cg) = self.cgroup {
            cg.remove();
        }
    }
}
