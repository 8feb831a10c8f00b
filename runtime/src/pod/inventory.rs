//! The pods on this host as an operator sees them (`husk ps`, `husk
//! logs`): each state directory, the Kubernetes pod it serves (the record
//! its creator wrote at boot), what still runs of it, its backend, uptime
//! and memory. Read from the state directories and /proc alone, so it
//! works with no shim to ask, and on pods whose shim died.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};

use oci_spec::runtime::Spec;
use serde::{Deserialize, Serialize};

use crate::config::Config;
use crate::confine::report;

/// CRI's annotations on a pod's sandbox container: the Kubernetes pod's
/// name, namespace and uid.
pub const SANDBOX_NAME: &str = "io.kubernetes.cri.sandbox-name";
pub const SANDBOX_NAMESPACE: &str = "io.kubernetes.cri.sandbox-namespace";
pub const SANDBOX_UID: &str = "io.kubernetes.cri.sandbox-uid";

/// Longest identity field kept: Kubernetes names are DNS subdomains of at
/// most 253 characters.
const MAX_FIELD: usize = 253;

/// Largest pod record read (a few hundred bytes in practice).
const MAX_RECORD: u64 = 16 << 10;

/// Who a sandbox serves and how it runs: written into its directory when
/// it boots (`pod.json`), by the shim or `husk run` (root), never by a
/// process of the pod.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct PodRecord {
    /// The Kubernetes pod, from CRI's annotations; none for `ctr run` and
    /// `husk run`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod_name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod_namespace: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod_uid: Option<String>,
    /// The hypervisor backend the sandbox runs on, as `husk check` names
    /// it ("qemu (TCG)", "husk-vmm").
    #[serde(default)]
    pub backend: String,
    /// How long each phase of its boot took, seconds (written once the
    /// agent answered; `husk monitor`'s histograms).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub boot_phases: BTreeMap<String, f64>,
}

impl PodRecord {
    /// The Kubernetes pod that a sandbox container's spec names (CRI's
    /// annotations), without a backend yet; all `None` for a spec without
    /// them.
    pub fn kubernetes(spec: &Spec) -> Self {
        let ann = |k: &str| {
            spec.annotations()
                .as_ref()
                .and_then(|a| a.get(k))
                .map(|v| printable(v))
                .filter(|v| !v.is_empty())
        };
        Self {
            pod_name: ann(SANDBOX_NAME),
            pod_namespace: ann(SANDBOX_NAMESPACE),
            pod_uid: ann(SANDBOX_UID),
            ..Self::default()
        }
    }

    pub fn write(&self, path: &Path) -> std::io::Result<()> {
        let json = serde_json::to_vec(self).map_err(std::io::Error::other)?;
        std::fs::write(path, json)
    }

    /// The record at `path`; `None` when there is none (a pod from before
    /// records, or one whose boot had not got that far) or it is not one.
    pub fn read(path: &Path) -> Option<Self> {
        let mut text = Vec::new();
        std::fs::File::open(path)
            .ok()?
            .take(MAX_RECORD)
            .read_to_end(&mut text)
            .ok()?;
        serde_json::from_slice(&text).ok()
    }
}

/// `s` without control characters, at most [`MAX_FIELD`] bytes (cut at a
/// character boundary): safe to print on a terminal.
fn printable(s: &str) -> String {
    let mut out = String::new();
    for c in s.chars().filter(|c| !c.is_control()) {
        if out.len() + c.len_utf8() > MAX_FIELD {
            break;
        }
        out.push(c);
    }
    out
}

/// One pod's state directory on this host, and what still runs of it.
#[derive(Debug, Clone, PartialEq)]
pub struct PodEntry {
    /// containerd's namespace, or `_husk` for `husk run`'s pods.
    pub namespace: String,
    pub id: String,
    pub dir: PathBuf,
    /// Containers with state in the pod's share.
    pub containers: Vec<String>,
    /// Processes naming the pod's directory: its VMM and device daemons.
    pub pids: Vec<u32>,
    /// What its creator recorded at boot.
    pub record: Option<PodRecord>,
}

impl PodEntry {
    /// "running" while a process of the pod is alive; "dead" when only its
    /// state is left (an owner that died without cleaning up).
    pub fn state(&self) -> &'static str {
        if self.pids.is_empty() {
            "dead"
        } else {
            "running"
        }
    }
}

/// Every pod with a state directory under the config's `state_dir`.
pub fn list(config: &Config) -> Vec<PodEntry> {
    let pods = report::sandboxes(&config.state_dir);
    let dirs: Vec<&Path> = pods.iter().map(|(_, _, d)| d.as_path()).collect();
    let procs = report::processes_naming(&dirs);
    pods.iter()
        .enumerate()
        .map(|(i, (namespace, id, dir))| {
            let mut containers: Vec<String> = std::fs::read_dir(dir.join("shared"))
                .map(|d| {
                    d.flatten()
                        .filter_map(|e| e.file_name().into_string().ok())
                        .collect()
                })
                .unwrap_or_default();
            containers.sort();
            PodEntry {
                namespace: namespace.clone(),
                id: id.clone(),
                dir: dir.clone(),
                containers,
                pids: procs
                    .iter()
                    .filter(|(_, p)| *p == i)
                    .map(|(pid, _)| *pid)
                    .collect(),
                record: PodRecord::read(&dir.join(crate::host::paths::POD_RECORD)),
            }
        })
        .collect()
}

/// A pod as `husk ps` shows it: its entry and what /proc says of its
/// processes now.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PodStatus {
    pub namespace: String,
    pub id: String,
    pub state: &'static str,
    pub pod_name: Option<String>,
    pub pod_namespace: Option<String>,
    pub pod_uid: Option<String>,
    pub containers: Vec<String>,
    /// The recorded backend, else what the VMM's name says.
    pub backend: Option<String>,
    /// The VMM as the host sees it (pid 1 of its own PID namespace).
    pub vmm_pid: Option<u32>,
    pub pids: Vec<u32>,
    /// Seconds since the VMM started.
    pub uptime_s: Option<u64>,
    /// Proportional set size of the pod's VMM and device daemons together
    /// (the guest RAM they touched included; the shim, which serves
    /// containerd, not), KiB.
    pub memory_kib: Option<u64>,
    pub dir: PathBuf,
}

/// The VMM's backend by its process name.
fn vmm_kind(pid: u32) -> Option<&'static str> {
    match comm(pid).as_str() {
        c if c.starts_with("qemu") => Some("qemu"),
        "husk-vmm" => Some("husk-vmm"),
        _ => None,
    }
}

/// Process `pid`'s name, "" once it is gone.
pub(crate) fn comm(pid: u32) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/comm"))
        .map(|c| c.trim_end().to_owned())
        .unwrap_or_default()
}

/// The pod's VMM (pid and kind), among its processes.
fn vmm_of(pod: &PodEntry) -> Option<(u32, &'static str)> {
    pod.pids
        .iter()
        .find_map(|&p| vmm_kind(p).map(|kind| (p, kind)))
}

/// The pod's recorded backend, else what its VMM's name says.
fn backend_of(pod: &PodEntry, vmm: Option<(u32, &'static str)>) -> Option<String> {
    pod.record
        .as_ref()
        .map(|r| r.backend.clone())
        .filter(|b| !b.is_empty())
        .or_else(|| vmm.map(|(_, kind)| kind.to_owned()))
}

/// The pod's backend and its VMM's uptime in seconds, without the cost of
/// its memory figures (`husk monitor`'s, which reads memory itself).
pub(crate) fn backend_and_uptime(pod: &PodEntry) -> (Option<String>, Option<u64>) {
    let vmm = vmm_of(pod);
    (backend_of(pod, vmm), vmm.and_then(|(p, _)| uptime_of(p)))
}

/// Seconds process `pid` has run.
fn uptime_of(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command's closing parenthesis: state is the 3rd
    // field of the line, starttime the 22nd.
    let (_, rest) = stat.rsplit_once(") ")?;
    let start_ticks: u64 = rest.split_whitespace().nth(19)?.parse().ok()?;
    let up: f64 = std::fs::read_to_string("/proc/uptime")
        .ok()?
        .split_whitespace()
        .next()?
        .parse()
        .ok()?;
    // SAFETY: sysconf(3) reads a constant.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if hz <= 0 {
        return None;
    }
    let started = start_ticks as f64 / hz as f64;
    Some((up - started).max(0.0) as u64)
}

/// Proportional set size of `pid`, KiB.
pub(crate) fn pss_kib(pid: u32) -> Option<u64> {
    std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup"))
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix("Pss:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()
}

/// What /proc says now of `pod`'s processes.
pub fn status(pod: &PodEntry) -> PodStatus {
    let vmm = vmm_of(pod);
    let backend = backend_of(pod, vmm);
    let record = pod.record.clone().unwrap_or_default();
    let memory: Vec<u64> = pod.pids.iter().filter_map(|&p| pss_kib(p)).collect();
    PodStatus {
        namespace: pod.namespace.clone(),
        id: pod.id.clone(),
        state: pod.state(),
        pod_name: record.pod_name,
        pod_namespace: record.pod_namespace,
        pod_uid: record.pod_uid,
        containers: pod.containers.clone(),
        backend,
        vmm_pid: vmm.map(|(p, _)| p),
        pids: pod.pids.clone(),
        uptime_s: vmm.and_then(|(p, _)| uptime_of(p)),
        memory_kib: (!memory.is_empty()).then(|| memory.iter().sum()),
        dir: pod.dir.clone(),
    }
}

/// A pod's Kubernetes namespace ("" if unrecorded) and name.
fn kubernetes_name(p: &PodEntry) -> Option<(&str, &str)> {
    let r = p.record.as_ref()?;
    let name = r.pod_name.as_deref()?;
    Some((r.pod_namespace.as_deref().unwrap_or(""), name))
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FindError {
    #[error("no pod {0:?} on this host (looked for a sandbox id, a Kubernetes pod name or `namespace/name`, and an id prefix); `husk ps` lists the pods")]
    NotFound(String),
    #[error("{name:?} names {} pods: {}; give the whole sandbox id, `namespace/name`, or --namespace", candidates.len(), candidates.join(", "))]
    Ambiguous {
        name: String,
        candidates: Vec<String>,
    },
}

/// The pod that `name` names among `pods` (of containerd namespace
/// `namespace` when given): its sandbox id; else its Kubernetes name, or
/// `<pod namespace>/<name>`; else a prefix of its sandbox id (at least 4
/// characters, as containerd's own ids are 64 hex digits). A name that
/// fits more than one pod at the first step that finds any is refused.
pub fn find<'a>(
    pods: &'a [PodEntry],
    name: &str,
    namespace: Option<&str>,
) -> Result<&'a PodEntry, FindError> {
    let pods: Vec<&PodEntry> = pods
        .iter()
        .filter(|p| namespace.is_none_or(|ns| p.namespace == ns))
        .collect();
    let steps: [&dyn Fn(&PodEntry) -> bool; 3] = [
        &|p| p.id == name,
        &|p| {
            kubernetes_name(p).is_some_and(|(ns, n)| {
                n == name || name.split_once('/').is_some_and(|(a, b)| a == ns && b == n)
            })
        },
        &|p| name.len() >= 4 && p.id.starts_with(name),
    ];
    for step in steps {
        let found: Vec<&PodEntry> = pods.iter().copied().filter(|p| step(p)).collect();
        match found.as_slice() {
            [] => continue,
            [one] => return Ok(one),
            many => {
                return Err(FindError::Ambiguous {
                    name: name.to_owned(),
                    candidates: many
                        .iter()
                        .map(|p| format!("{}/{}", p.namespace, p.id))
                        .collect(),
                })
            }
        }
    }
    Err(FindError::NotFound(name.to_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(namespace: &str, id: &str, kube: Option<(&str, &str)>) -> PodEntry {
        PodEntry {
            namespace: namespace.to_owned(),
            id: id.to_owned(),
            dir: PathBuf::from(format!("/run/husk/{namespace}/{id}")),
            containers: Vec::new(),
            pids: Vec::new(),
            record: kube.map(|(ns, name)| PodRecord {
                pod_name: Some(name.to_owned()),
                pod_namespace: Some(ns.to_owned()),
                pod_uid: None,
                backend: "qemu (TCG)".to_owned(),
                ..PodRecord::default()
            }),
        }
    }

    #[test]
    fn a_pod_is_found_by_id_then_kubernetes_name_then_id_prefix() {
        let pods = [
            entry("k8s.io", "0a1b2c3d4e", Some(("default", "web"))),
            entry("k8s.io", "9f8e7d6c5b", Some(("prod", "web"))),
            entry("k8s.io", "web", None),
            entry("default", "c1", None),
            entry("moby", "c1", None),
        ];
        // An id wins over a pod name that is the same word.
        assert_eq!(find(&pods, "web", None).unwrap().id, "web");
        assert_eq!(find(&pods, "prod/web", None).unwrap().id, "9f8e7d6c5b");
        assert_eq!(find(&pods, "default/web", None).unwrap().id, "0a1b2c3d4e");
        assert_eq!(find(&pods, "0a1b", None).unwrap().id, "0a1b2c3d4e");
        // Too short for a prefix: not a guess.
        assert_eq!(
            find(&pods, "0a1", None),
            Err(FindError::NotFound("0a1".into()))
        );
        // The same id in two containerd namespaces.
        let e = find(&pods, "c1", None).unwrap_err();
        assert_eq!(
            e,
            FindError::Ambiguous {
                name: "c1".into(),
                candidates: vec!["default/c1".into(), "moby/c1".into()]
            }
        );
        assert!(e.to_string().contains("--namespace"), "{e}");
        assert_eq!(find(&pods, "c1", Some("moby")).unwrap().namespace, "moby");
        let e = find(&pods, "nothing", None).unwrap_err();
        assert!(e.to_string().contains("husk ps"), "{e}");
    }

    #[test]
    fn the_record_keeps_printable_identity_from_cri_annotations_only() {
        let spec: Spec = serde_json::from_value(serde_json::json!({
            "ociVersion": "1.0.2",
            "annotations": {
                SANDBOX_NAME: "web-0\u{1b}[2J",
                SANDBOX_NAMESPACE: "x".repeat(400),
                SANDBOX_UID: "",
            }
        }))
        .unwrap();
        let r = PodRecord::kubernetes(&spec);
        assert_eq!(r.pod_name.as_deref(), Some("web-0[2J"));
        assert_eq!(r.pod_namespace.as_deref().map(str::len), Some(MAX_FIELD));
        assert_eq!(r.pod_uid, None);
        let none: Spec =
            serde_json::from_value(serde_json::json!({"ociVersion": "1.0.2"})).unwrap();
        assert_eq!(PodRecord::kubernetes(&none), PodRecord::default());

        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("pod.json");
        let written = PodRecord {
            backend: "husk-vmm".into(),
            ..r
        };
        written.write(&path).unwrap();
        assert_eq!(PodRecord::read(&path), Some(written));
        std::fs::write(&path, "not json").unwrap();
        assert_eq!(PodRecord::read(&path), None);
        assert_eq!(PodRecord::read(&dir.path().join("missing")), None);
    }

    #[test]
    fn the_status_of_a_live_process_has_its_uptime_and_memory() {
        let me = std::process::id();
        let pod = PodEntry {
            pids: vec![me],
            ..entry("k8s.io", "p1", Some(("default", "web")))
        };
        let s = status(&pod);
        assert_eq!(s.state, "running");
        // The test process is no VMM: the recorded backend stands, no pid.
        assert_eq!(s.vmm_pid, None);
        assert_eq!(s.backend.as_deref(), Some("qemu (TCG)"));
        assert!(s.memory_kib.is_some_and(|m| m > 0), "{s:?}");
        assert!(
            uptime_of(me).is_some_and(|u| u < 3600),
            "{:?}",
            uptime_of(me)
        );
        let json = serde_json::to_value(&s).unwrap();
        assert_eq!(json["pod_name"], "web");
        assert_eq!(json["state"], "running");
    }
}
