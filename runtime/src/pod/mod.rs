//! Pods: which containers share one sandbox VM, what their OCI specs must
//! say inside it, and where each container's host state lives.
//!
//! containerd's CRI plugin marks a pod's sandbox (pause) container with
//! `io.kubernetes.cri.container-type=sandbox` and every app container with
//! `container` plus the pod's `io.kubernetes.cri.sandbox-id`. The sandbox
//! container boots the VM; app containers join it. A container without
//! these annotations (`ctr run`) is a pod of one.
//!
//! In the guest the pause container holds the pod's network, IPC and UTS
//! namespaces (and PID, with shareProcessNamespace), all new in the guest:
//! the host's CNI namespace path means nothing there. CRI writes the app
//! containers' namespace paths as `/proc/<sandbox pid>/ns/<kind>`; the task
//! pid husk reports is the guest pid, so those paths name the pause
//! container's namespaces in the guest, and nothing else is accepted.

pub mod backend;
pub mod cleanup;
pub mod guest;
pub mod inherit;
pub mod inventory;
pub mod metrics;
pub mod overhead;
pub mod portforward;
pub mod service;
#[cfg(test)]
mod service_tests;
pub mod spec;
pub mod stdio;
pub mod volumes;
pub mod workers;

use std::path::Path;

use husk_protocol::{ContainerId, SandboxId};
use oci_spec::runtime::{LinuxNamespace, LinuxNamespaceType, Mount, Spec};

pub use backend::{Backend, PodSandbox, PodVm, VmBackend};
pub use guest::{GuestAgent, VmAgent};
pub use service::{CreateRequest, ErrorKind, Event, Exit, PodApiError, PodService, Status};
pub use stdio::{Io, Stream};

use crate::host::storage::{is_bind, mount_options, StorageError};

/// CRI's annotation for the kind of container.
pub const CONTAINER_TYPE: &str = "io.kubernetes.cri.container-type";
/// CRI's annotation naming the pod's sandbox container.
pub const SANDBOX_ID: &str = "io.kubernetes.cri.sandbox-id";
/// Size of the pod's /dev/shm when the host's cannot be read (containerd's
/// own default for a pod's shm).
pub const DEFAULT_SHM_BYTES: u64 = 64 << 20;

#[derive(Debug, thiserror::Error)]
pub enum PodError {
    #[error("container {id}: annotation {SANDBOX_ID}={value:?} is not a valid sandbox id")]
    BadSandboxId { id: String, value: String },
    #[error("pod {pod}: {field} is not supported by husk: a VM pod cannot share the host's {what} namespace; turn {field} off or use a runc RuntimeClass for this pod")]
    HostNamespace {
        pod: String,
        field: &'static str,
        what: &'static str,
    },
    #[error("container {id}: {kind} namespace path {path:?} is not pod {pod}'s (husk accepts only /proc/<sandbox pid>/ns/..., here /proc/{pid}/ns/...)")]
    ForeignNamespace {
        id: String,
        pod: String,
        kind: String,
        path: String,
        pid: u32,
    },
    #[error("container {id}: pod {pod} has no running sandbox container in this shim")]
    NoSandbox { id: String, pod: String },
    #[error("container {id}: annotation {key}={value:?} is not a whole number")]
    Annotation {
        id: String,
        key: &'static str,
        value: String,
    },
    #[error("container {id}: the spec is not an OCI runtime spec: {why}")]
    Spec { id: String, why: String },
    #[error("container {id}: {why}")]
    Lsm { id: String, why: String },
    #[error(transparent)]
    Storage(#[from] StorageError),
    #[error("watching synced volume {dir} for kubelet's updates (raise fs.inotify.max_user_watches if it is the limit)")]
    WatchVolume {
        dir: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// What a container is to its pod.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Role {
    /// A CRI pod's sandbox (pause) container: boots the pod's VM.
    Sandbox,
    /// A CRI app container of pod `pod`: joins the pod's VM.
    Member { pod: SandboxId },
    /// A plain container (`ctr run`): a pod of one.
    Single,
}

impl Role {
    /// Reads the role from the spec's annotations.
    pub fn of(spec: &Spec, id: &str) -> Result<Role, PodError> {
        let ann = |k: &str| annotation(spec, k);
        match ann(CONTAINER_TYPE) {
            Some("sandbox") => Ok(Role::Sandbox),
            Some("container") => {
                let value = ann(SANDBOX_ID).unwrap_or_default();
                let pod = SandboxId::parse(value).map_err(|_| PodError::BadSandboxId {
                    id: id.to_owned(),
                    value: value.to_owned(),
                })?;
                Ok(Role::Member { pod })
            }
            _ => Ok(Role::Single),
        }
    }

    /// The pod this container belongs to: its sandbox's id (its own id for
    /// a sandbox or a pod of one). Names the shim and the sandbox directory.
    pub fn pod_id<'a>(&'a self, id: &'a str) -> &'a str {
        match self {
            Role::Member { pod } => pod,
            Role::Sandbox | Role::Single => id,
        }
    }

    /// [`Self::pod_id`], typed.
    pub fn pod(&self, id: &ContainerId) -> SandboxId {
        match self {
            Role::Member { pod } => pod.clone(),
            Role::Sandbox | Role::Single => SandboxId::from(id),
        }
    }

    pub fn is_cri(&self) -> bool {
        !matches!(self, Role::Single)
    }
}

/// One annotation of a spec.
fn annotation<'a>(spec: &'a Spec, key: &str) -> Option<&'a str> {
    spec.annotations().as_ref()?.get(key).map(String::as_str)
}

/// The host namespaces a pod may ask to share, by CRI field.
const HOST_NAMESPACES: [(LinuxNamespaceType, &str, &str); 3] = [
    (LinuxNamespaceType::Network, "hostNetwork", "network"),
    (LinuxNamespaceType::Pid, "hostPID", "PID"),
    (LinuxNamespaceType::Ipc, "hostIPC", "IPC"),
];

/// Mounts that exist only in the guest, taken out of the spec while the
/// host shares the rest, and put back at their places afterwards.
#[derive(Debug, Default)]
pub struct GuestOnlyMounts(Vec<(usize, Mount)>);

impl GuestOnlyMounts {
    /// Puts the guest-only mounts back where they were.
    pub fn restore(self, spec: &mut Spec) {
        if self.0.is_empty() {
            return;
        }
        if let Some(mounts) = spec.mounts_mut() {
            for (i, m) in self.0 {
                mounts.insert(i.min(mounts.len()), m);
            }
        }
    }
}

/// Rewrites a CRI container's spec for the pod's guest: refuses host
/// namespaces by their CRI field, checks and keeps namespace paths that name
/// the pod's sandbox (guest pid `sandbox_pid`), gives the sandbox a new
/// network namespace in the guest for CNI's host one, and turns containerd's /dev/shm bind into one
/// guest tmpfs per pod (`shm_bytes` big, like the host's), which app
/// containers bind from the pause container. Returns those guest-only
/// mounts, taken out of the spec until the host has shared the rest.
pub fn prepare_spec(
    spec: &mut Spec,
    id: &str,
    role: &Role,
    sandbox_pid: Option<u32>,
    shm_bytes: impl Fn(&Path) -> Option<u64>,
) -> Result<GuestOnlyMounts, PodError> {
    normalise_rootfs_propagation(spec);
    inherit::container(spec);
    if let Some(process) = spec.process_mut() {
        let dropped = inherit::lsm_labels(process, &inherit::AppArmor::host()).map_err(|why| {
            PodError::Lsm {
                id: id.to_owned(),
                why,
            }
        })?;
        if !dropped.is_empty() {
            tracing::info!(container = id, "not applied in the guest, whose kernel has no LSM (the VM confines the container): {}", dropped.join(", "));
        }
    }
    if !role.is_cri() {
        return Ok(GuestOnlyMounts::default());
    }
    let sandbox_pid = guest_namespaces(spec, id, role, sandbox_pid)?;
    Ok(GuestOnlyMounts(guest_shm(
        spec,
        role,
        sandbox_pid,
        shm_bytes,
    )))
}

/// [`prepare_spec`]'s namespaces: refuses the host's by their CRI field;
/// gives the sandbox a new network namespace for CNI's; keeps a member's
/// paths only where they name its sandbox (guest pid `sandbox_pid`, which
/// a member must have, and is returned).
fn guest_namespaces(
    spec: &mut Spec,
    id: &str,
    role: &Role,
    sandbox_pid: Option<u32>,
) -> Result<Option<u32>, PodError> {
    let pod = role.pod_id(id).to_owned();
    let namespaces = spec
        .linux_mut()
        .as_mut()
        .and_then(|l| l.namespaces_mut().as_mut())
        .ok_or_else(|| PodError::Spec {
            id: id.to_owned(),
            why: "linux.namespaces is missing".to_owned(),
        })?;
    for (kind, field, what) in HOST_NAMESPACES {
        if !namespaces.iter().any(|n| n.typ() == kind) {
            return Err(PodError::HostNamespace {
                pod: pod.clone(),
                field,
                what,
            });
        }
    }
    let sandbox_pid = match role {
        Role::Member { .. } => Some(sandbox_pid.ok_or_else(|| PodError::NoSandbox {
            id: id.to_owned(),
            pod: pod.clone(),
        })?),
        _ => None,
    };
    for ns in namespaces.iter_mut() {
        let Some(path) = ns.path().clone() else {
            continue;
        };
        let kind = ns.typ();
        let foreign = |pid: u32| PodError::ForeignNamespace {
            id: id.to_owned(),
            pod: pod.clone(),
            kind: format!("{kind:?}").to_lowercase(),
            path: path.display().to_string(),
            pid,
        };
        match role {
            // CNI's namespace is the host's; the pod gets a new one in
            // the guest, held by the pause container.
            Role::Sandbox if kind == LinuxNamespaceType::Network => *ns = new_namespace(kind),
            Role::Member { .. } => {
                let pid = sandbox_pid.unwrap_or(0);
                // The namespace type names its /proc/<pid>/ns file.
                if path != Path::new(&format!("/proc/{pid}/ns/{kind}")) {
                    return Err(foreign(pid));
                }
            }
            _ => return Err(foreign(0)),
        }
    }
    Ok(sandbox_pid)
}

/// [`prepare_spec`]'s /dev/shm: takes containerd's bind out of the spec
/// and returns, at its place, the sandbox's tmpfs (`shm_bytes` big) or a
/// member's bind of its sandbox's.
fn guest_shm(
    spec: &mut Spec,
    role: &Role,
    sandbox_pid: Option<u32>,
    shm_bytes: impl Fn(&Path) -> Option<u64>,
) -> Vec<(usize, Mount)> {
    let mut guest_only = Vec::new();
    let Some(mounts) = spec.mounts_mut() else {
        return guest_only;
    };
    let mut i = 0;
    while i < mounts.len() {
        let m = &mounts[i];
        if m.destination() != Path::new("/dev/shm") || !is_bind(m) {
            i += 1;
            continue;
        }
        let ro = mount_options(m).iter().any(|o| o == "ro");
        let rw = if ro { "ro" } else { "rw" };
        let mut shm = Mount::default();
        shm.set_destination("/dev/shm".into());
        match (role, sandbox_pid) {
            (Role::Member { .. }, Some(pid)) => {
                shm.set_typ(Some("bind".into()));
                shm.set_source(Some(format!("/proc/{pid}/root/dev/shm").into()));
                shm.set_options(Some(strings(&["rbind", "nosuid", "nodev", "noexec", rw])));
            }
            _ => {
                let source = m.source().clone().unwrap_or_default();
                let bytes = shm_bytes(&source).unwrap_or(DEFAULT_SHM_BYTES);
                let size = format!("size={bytes}");
                shm.set_typ(Some("tmpfs".into()));
                shm.set_source(Some("shm".into()));
                shm.set_options(Some(strings(&[
                    "nosuid",
                    "nodev",
                    "noexec",
                    "mode=1777",
                    &size,
                    rw,
                ])));
            }
        };
        mounts.remove(i);
        guest_only.push((i, shm));
    }
    guest_only
}

/// A namespace of `kind` that the container gets new.
fn new_namespace(kind: LinuxNamespaceType) -> LinuxNamespace {
    let mut ns = LinuxNamespace::default();
    ns.set_typ(kind);
    ns
}

fn strings(list: &[&str]) -> Vec<String> {
    list.iter().map(|s| (*s).to_owned()).collect()
}

/// Size of the filesystem at `path` (the host's pod shm), in bytes.
pub fn fs_size(path: &Path) -> Option<u64> {
    let st = nix::sys::statvfs::statvfs(path).ok()?;
    let bytes = (st.blocks() as u64).checked_mul(st.fragment_size() as u64)?;
    (bytes > 0).then_some(bytes)
}

/// containerd writes `linux.rootfsPropagation` as runc reads it (`rslave`
/// for a HostToContainer volume, `rshared` for Bidirectional); the guest's
/// libcontainer knows only the spec's plain names and applies them
/// recursively anyway.
fn normalise_rootfs_propagation(spec: &mut Spec) {
    let Some(p) = spec
        .linux_mut()
        .as_mut()
        .and_then(|l| l.rootfs_propagation_mut().as_mut())
    else {
        return;
    };
    let plain = match p.as_str() {
        "rslave" => "slave",
        "rshared" => "shared",
        "rprivate" => "private",
        "runbindable" => "unbindable",
        _ => return,
    };
    *p = plain.to_owned();
}

/// CRI's annotations with the pod's resources (the sum of its containers'
/// limits), set by containerd when kubelet passes them (PodSandboxConfig's
/// `linux.resources`, Kubernetes 1.23+).
pub const SANDBOX_MEMORY: &str = "io.kubernetes.cri.sandbox-memory";
pub const SANDBOX_CPU_QUOTA: &str = "io.kubernetes.cri.sandbox-cpu-quota";
pub const SANDBOX_CPU_PERIOD: &str = "io.kubernetes.cri.sandbox-cpu-period";

/// The guest's size for a pod: the configured size, which covers the
/// guest's own kernel and agent, plus the pod's resources where the spec
/// that boots the VM carries them (as Kata sizes its VMs): memory by the
/// pod's memory limit, vCPUs by its CPU limit rounded up. A pod without
/// limits gets the configured size. Capped at the config's maxima.
pub fn size_guest(
    guest: &mut crate::config::GuestConfig,
    spec: &Spec,
    id: &str,
) -> Result<(), PodError> {
    let ann = |k: &str| annotation(spec, k);
    let number = |k: &'static str| -> Result<Option<i64>, PodError> {
        ann(k)
            .map(|v| {
                v.trim().parse::<i64>().map_err(|_| PodError::Annotation {
                    id: id.to_owned(),
                    key: k,
                    value: v.to_owned(),
                })
            })
            .transpose()
    };
    if let Some(bytes) = number(SANDBOX_MEMORY)?.filter(|b| *b > 0) {
        let extra = u32::try_from((bytes as u64).div_ceil(1 << 20)).unwrap_or(u32::MAX);
        guest.memory_mib = guest.memory_mib.saturating_add(extra).min(MAX_GUEST_MIB);
    }
    let quota = number(SANDBOX_CPU_QUOTA)?.filter(|q| *q > 0);
    let period = number(SANDBOX_CPU_PERIOD)?.filter(|p| *p > 0);
    if let (Some(quota), Some(period)) = (quota, period) {
        let extra = u32::try_from((quota as u64).div_ceil(period as u64)).unwrap_or(u32::MAX);
        guest.vcpus = guest.vcpus.saturating_add(extra).min(MAX_GUEST_VCPUS);
    }
    Ok(())
}

/// The largest guest the config accepts.
const MAX_GUEST_MIB: u32 = 65536;
const MAX_GUEST_VCPUS: u32 = 32;

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{json, Value};

    fn typed(v: Value) -> Spec {
        serde_json::from_value(v).unwrap()
    }

    fn json_of(spec: &Spec) -> Value {
        serde_json::to_value(spec).unwrap()
    }

    fn cri_spec(kind: &str, pod: &str, namespaces: Value) -> Spec {
        typed(json!({
            "annotations": { CONTAINER_TYPE: kind, SANDBOX_ID: pod },
            "linux": { "namespaces": namespaces },
            "mounts": [
                { "destination": "/proc", "type": "proc", "source": "proc" },
                { "destination": "/dev/shm", "type": "bind", "source": "/run/ctd/sandboxes/p1/shm", "options": ["rbind", "ro"] },
                { "destination": "/etc/hosts", "type": "bind", "source": "/run/ctd/sandboxes/p1/hosts", "options": ["rbind", "rw"] },
            ],
        }))
    }

    fn sandbox_ns() -> Value {
        json!([
            { "type": "pid" }, { "type": "ipc" }, { "type": "uts" }, { "type": "mount" },
            { "type": "network", "path": "/var/run/netns/cni-1234" },
        ])
    }

    #[test]
    fn roles_come_from_cri_annotations() {
        let id = "c1";
        assert_eq!(Role::of(&typed(json!({})), id).unwrap(), Role::Single);
        let sb = cri_spec("sandbox", "p1", json!([]));
        assert_eq!(Role::of(&sb, "p1").unwrap(), Role::Sandbox);
        let app = cri_spec("container", "p1", json!([]));
        let role = Role::of(&app, id).unwrap();
        assert_eq!(role.pod_id(id), "p1");
        assert_eq!(Role::Single.pod_id(id), id);
        let bad = cri_spec("container", "../x", json!([]));
        let e = Role::of(&bad, id).unwrap_err();
        assert!(e.to_string().contains(SANDBOX_ID), "{e}");
    }

    #[test]
    fn sandbox_keeps_guest_namespaces_and_gets_a_sized_shm_tmpfs() {
        let mut spec = cri_spec("sandbox", "p1", sandbox_ns());
        let guest = prepare_spec(&mut spec, "p1", &Role::Sandbox, None, |p| {
            assert_eq!(p, Path::new("/run/ctd/sandboxes/p1/shm"));
            Some(1 << 20)
        })
        .unwrap();
        let v = json_of(&spec);
        let kinds: Vec<&str> = v["linux"]["namespaces"]
            .as_array()
            .unwrap()
            .iter()
            .map(|n| n["type"].as_str().unwrap())
            .collect();
        assert_eq!(kinds, ["pid", "ipc", "uts", "mount", "network"]);
        assert!(
            v["linux"]["namespaces"][4].get("path").is_none(),
            "host path dropped"
        );
        assert_eq!(
            v["mounts"].as_array().unwrap().len(),
            2,
            "shm taken out while sharing"
        );
        guest.restore(&mut spec);
        let shm = &spec.mounts().as_ref().unwrap()[1];
        assert_eq!(shm.typ().as_deref(), Some("tmpfs"));
        let opts = mount_options(shm);
        assert!(opts.contains(&"size=1048576".to_owned()), "{opts:?}");
        assert!(opts.contains(&"ro".to_owned()), "ro kept: {opts:?}");
        assert_eq!(
            json_of(&spec)["mounts"][2]["destination"],
            "/etc/hosts",
            "order kept"
        );
    }

    #[test]
    fn members_join_only_their_sandbox_namespaces_and_its_shm() {
        let ns = json!([
            { "type": "pid" }, { "type": "mount" },
            { "type": "ipc", "path": "/proc/42/ns/ipc" },
            { "type": "uts", "path": "/proc/42/ns/uts" },
            { "type": "network", "path": "/proc/42/ns/net" },
        ]);
        let role = Role::Member {
            pod: SandboxId::parse("p1").unwrap(),
        };
        let mut spec = cri_spec("container", "p1", ns.clone());
        let guest = prepare_spec(&mut spec, "c1", &role, Some(42), |_| None).unwrap();
        assert_eq!(json_of(&spec)["linux"]["namespaces"], ns);
        guest.restore(&mut spec);
        assert_eq!(
            json_of(&spec)["mounts"][1]["source"],
            "/proc/42/root/dev/shm"
        );

        let mut other = cri_spec("container", "p1", ns);
        let e = prepare_spec(&mut other, "c1", &role, Some(7), |_| None).unwrap_err();
        assert!(matches!(e, PodError::ForeignNamespace { .. }), "{e}");
        assert!(e.to_string().contains("/proc/42/ns/ipc"), "{e}");

        let mut no_sandbox = cri_spec(
            "container",
            "p1",
            json!([{"type":"pid"},{"type":"ipc"},{"type":"network"}]),
        );
        let e = prepare_spec(&mut no_sandbox, "c1", &role, None, |_| None).unwrap_err();
        assert!(matches!(e, PodError::NoSandbox { .. }), "{e}");
    }

    #[test]
    fn host_namespaces_are_refused_by_their_cri_field() {
        for (missing, field) in [
            ("network", "hostNetwork"),
            ("pid", "hostPID"),
            ("ipc", "hostIPC"),
        ] {
            let ns: Vec<Value> = ["pid", "ipc", "uts", "mount", "network"]
                .into_iter()
                .filter(|k| *k != missing)
                .map(|k| json!({ "type": k }))
                .collect();
            let mut spec = cri_spec("sandbox", "p1", Value::Array(ns));
            let e = prepare_spec(&mut spec, "p1", &Role::Sandbox, None, |_| None).unwrap_err();
            assert!(e.to_string().contains(field), "{field}: {e}");
        }
    }

    #[test]
    fn the_guest_grows_by_the_pods_limits_and_only_by_them() {
        let base = crate::config::GuestConfig::default();
        let sized = |ann: Value| {
            let mut g = base.clone();
            size_guest(&mut g, &typed(json!({ "annotations": ann })), "p1")
                .map(|()| (g.vcpus, g.memory_mib))
        };
        assert_eq!(
            sized(json!({
                SANDBOX_MEMORY: "268435456",
                SANDBOX_CPU_QUOTA: "150000",
                SANDBOX_CPU_PERIOD: "100000"
            }))
            .unwrap(),
            (base.vcpus + 2, base.memory_mib + 256)
        );
        // No limits (containerd writes 0 for them): the configured size.
        assert_eq!(
            sized(
                json!({ SANDBOX_MEMORY: "0", SANDBOX_CPU_QUOTA: "0", SANDBOX_CPU_PERIOD: "100000" })
            )
            .unwrap(),
            (base.vcpus, base.memory_mib)
        );
        assert_eq!(sized(json!({})).unwrap(), (base.vcpus, base.memory_mib));
        // A part of a MiB counts as one; the maxima hold.
        assert_eq!(
            sized(json!({ SANDBOX_MEMORY: "1" })).unwrap().1,
            base.memory_mib + 1
        );
        assert_eq!(
            sized(json!({
                SANDBOX_MEMORY: "9223372036854775807",
                SANDBOX_CPU_QUOTA: "9000000",
                SANDBOX_CPU_PERIOD: "1000"
            }))
            .unwrap(),
            (MAX_GUEST_VCPUS, MAX_GUEST_MIB)
        );
        let e = sized(json!({ SANDBOX_MEMORY: "1Gi" }))
            .unwrap_err()
            .to_string();
        assert!(e.contains(SANDBOX_MEMORY) && e.contains("\"1Gi\""), "{e}");
    }

    #[test]
    fn recursive_rootfs_propagation_is_named_as_the_guest_reads_it() {
        for (given, plain) in [
            ("rslave", "slave"),
            ("rshared", "shared"),
            ("slave", "slave"),
        ] {
            let mut spec = typed(json!({ "linux": { "rootfsPropagation": given } }));
            prepare_spec(&mut spec, "c1", &Role::Single, None, |_| None).unwrap();
            assert_eq!(json_of(&spec)["linux"]["rootfsPropagation"], plain);
        }
    }

    #[test]
    fn plain_containers_are_left_alone() {
        let mut spec = typed(json!({ "linux": { "namespaces": [] }, "mounts": [] }));
        let before = spec.clone();
        prepare_spec(&mut spec, "c", &Role::Single, None, |_| None).unwrap();
        assert_eq!(spec, before);
    }
}
