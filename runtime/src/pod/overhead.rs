//! What a pod costs the node beyond its own limits, measured on running
//! pods, and the RuntimeClass whose `overhead.podFixed` covers it
//! (`husk runtimeclass`).
//!
//! A pod's host cost is its cgroup: the shim, the VMM and the device
//! daemons are all in it, the guest RAM they touched included. Kubelet
//! limits the pod's cgroup at the sum of its containers' limits plus the
//! RuntimeClass overhead, so the overhead must hold what the pod's cgroup
//! charges when its containers use nothing: the guest's kernel and agent,
//! the VMM's own memory, the daemons and the shim. That is the working set
//! (usage less inactive file pages, as kubelet reads it) of an idle pod,
//! at its peak over the window; CPU is the cgroup's CPU time over the
//! window. The overhead is the largest pod's figures plus a stated margin.

use std::time::{Duration, Instant};

use serde::Serialize;

use crate::host::accounting::Accounting;
use crate::pod::inventory::{comm, pss_kib, PodEntry};

/// Memory margin over the largest measured working set, percent: the
/// guest's slab and page tables grow with use, the VMM's buffers with I/O.
pub const MEMORY_MARGIN_PERCENT: u64 = 25;
/// Memory overhead granularity: 8 MiB.
const MEMORY_STEP_MIB: u64 = 8;
/// CPU margin over the largest measured idle use: twice it (an idle
/// guest's timer and the health checks; any I/O costs more).
const CPU_FACTOR: u64 = 2;
/// CPU overhead granularity and floor, millicores.
const CPU_STEP_M: u64 = 10;
/// How often the working set is sampled.
const SAMPLE: Duration = Duration::from_millis(250);

/// One process of a pod's cgroup.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ProcessCost {
    pub pid: u32,
    pub name: String,
    /// Proportional set size, KiB.
    pub pss_kib: u64,
}

/// One pod's measured host cost.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Measured {
    pub namespace: String,
    pub id: String,
    /// `namespace/name` of its Kubernetes pod, when it serves one.
    pub pod: Option<String>,
    /// The pod's host cgroup (the memory hierarchy's path).
    pub cgroup: String,
    /// The working set's peak over the window, KiB.
    pub working_set_kib: u64,
    /// CPU used over the window, millicores.
    pub cpu_millicores: f64,
    /// The memory limit on the pod's cgroup or its parent, KiB.
    pub limit_kib: Option<u64>,
    pub processes: Vec<ProcessCost>,
}

/// The overhead a RuntimeClass should carry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Overhead {
    pub memory_mib: u64,
    pub cpu_millicores: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum MeasureError {
    #[error("no running husk pod to measure; start an idle pod (a RuntimeClass `husk` pod running `sleep`, see docs/kubernetes.md) and run again, or name one with --pod")]
    NoPods,
    #[error("pod {namespace}/{id}: {why}")]
    Pod {
        namespace: String,
        id: String,
        why: String,
    },
}

/// One pod being sampled.
struct Sampling<'a> {
    pod: &'a PodEntry,
    acc: Accounting,
    cpu_start: u64,
    peak: u64,
}

/// Measures `pods` (the running ones) together over `window`.
pub fn measure(pods: &[&PodEntry], window: Duration) -> Result<Vec<Measured>, MeasureError> {
    let running: Vec<&PodEntry> = pods
        .iter()
        .copied()
        .filter(|p| !p.pids.is_empty())
        .collect();
    if running.is_empty() {
        return Err(MeasureError::NoPods);
    }
    let mut sampling = Vec::new();
    for pod in running {
        let why = |why: &str| MeasureError::Pod {
            namespace: pod.namespace.clone(),
            id: pod.id.clone(),
            why: why.to_owned(),
        };
        // Every process of the pod is in one cgroup; the first that has
        // one readable names it.
        let acc = pod
            .pids
            .iter()
            .find_map(|&p| Accounting::of(p))
            .ok_or_else(|| why("its processes' cgroups cannot be read"))?;
        let (Some(cpu_start), Some(ws)) = (acc.cpu_ns(), acc.working_set()) else {
            return Err(why(&format!(
                "its cgroup {} has no memory or CPU accounting (enable the memory and cpuacct controllers)",
                acc.path.display()
            )));
        };
        // A pod without a cgroup of its own (`husk run`'s) shares its
        // creator's: those figures are not the pod's.
        let foreign: Vec<String> = acc
            .processes()
            .into_iter()
            .filter(|p| !pod.pids.contains(p))
            .map(|p| (p, comm(p)))
            // The shim and husk's helpers (`husk-nswait`) are the pod's.
            .filter(|(_, c)| !c.starts_with("containerd-shim") && !c.starts_with("husk-"))
            .take(3)
            .map(|(p, c)| format!("{p} ({c})"))
            .collect();
        if !foreign.is_empty() {
            return Err(why(&format!(
                "its cgroup {} holds other processes too ({}): its figures are not the pod's; measure a pod that containerd started",
                acc.path.display(),
                foreign.join(", ")
            )));
        }
        sampling.push(Sampling {
            pod,
            acc,
            cpu_start,
            peak: ws,
        });
    }
    let start = Instant::now();
    while start.elapsed() < window {
        std::thread::sleep(SAMPLE.min(window.saturating_sub(start.elapsed())));
        for s in &mut sampling {
            if let Some(ws) = s.acc.working_set() {
                s.peak = s.peak.max(ws);
            }
        }
    }
    let secs = start.elapsed().as_secs_f64().max(0.001);
    Ok(sampling
        .into_iter()
        .map(|s| {
            let cpu_ns = s
                .acc
                .cpu_ns()
                .unwrap_or(s.cpu_start)
                .saturating_sub(s.cpu_start);
            let record = s.pod.record.clone().unwrap_or_default();
            Measured {
                namespace: s.pod.namespace.clone(),
                id: s.pod.id.clone(),
                pod: record
                    .pod_name
                    .map(|n| format!("{}/{n}", record.pod_namespace.unwrap_or_default())),
                cgroup: s.acc.path.display().to_string(),
                working_set_kib: s.peak / 1024,
                cpu_millicores: cpu_ns as f64 / 1e6 / secs,
                limit_kib: s.acc.memory_limit().map(|b| b / 1024),
                processes: cgroup_processes(&s.acc),
            }
        })
        .collect())
}

/// Every process in the cgroup, with its name and PSS.
pub fn cgroup_processes(acc: &Accounting) -> Vec<ProcessCost> {
    acc.processes()
        .into_iter()
        .map(|pid| ProcessCost {
            pid,
            name: comm(pid),
            pss_kib: pss_kib(pid).unwrap_or(0),
        })
        .collect()
}

/// The overhead that covers every measured pod: the largest working set
/// plus [`MEMORY_MARGIN_PERCENT`], rounded up to 8 MiB; the largest CPU
/// use times [`CPU_FACTOR`], rounded up to 10 millicores (10 at least).
pub fn overhead(measured: &[Measured]) -> Overhead {
    let ws_kib = measured
        .iter()
        .map(|m| m.working_set_kib)
        .max()
        .unwrap_or(0);
    let with_margin_mib = (ws_kib * (100 + MEMORY_MARGIN_PERCENT)).div_ceil(100 * 1024);
    let cpu = measured
        .iter()
        .map(|m| m.cpu_millicores)
        .fold(0.0_f64, f64::max);
    let cpu_m = ((cpu * CPU_FACTOR as f64).ceil() as u64).max(1);
    Overhead {
        memory_mib: with_margin_mib.div_ceil(MEMORY_STEP_MIB).max(1) * MEMORY_STEP_MIB,
        cpu_millicores: cpu_m.div_ceil(CPU_STEP_M) * CPU_STEP_M,
    }
}

/// The RuntimeClass manifest, the measurement it comes from in comments
/// above it.
pub fn manifest(
    name: &str,
    handler: &str,
    measured: &[Measured],
    window: Duration,
    node_label: Option<(&str, &str)>,
) -> String {
    let o = overhead(measured);
    let mut out = format!(
        "# Measured by `husk runtimeclass` over {} s on {} running pod(s):\n",
        window.as_secs(),
        measured.len()
    );
    for m in measured {
        let procs: Vec<String> = m
            .processes
            .iter()
            .map(|p| format!("{} {:.1} MiB", p.name, p.pss_kib as f64 / 1024.0))
            .collect();
        out += &format!(
            "#   {}/{}{}: working set {:.1} MiB at its peak, CPU {:.1}m (cgroup {}; PSS: {})\n",
            m.namespace,
            &m.id[..m.id.len().min(24)],
            m.pod
                .as_ref()
                .map(|p| format!(" ({p})"))
                .unwrap_or_default(),
            m.working_set_kib as f64 / 1024.0,
            m.cpu_millicores,
            m.cgroup,
            procs.join(", ")
        );
    }
    out += &format!(
        "# Overhead: the largest working set plus {MEMORY_MARGIN_PERCENT}% (rounded up to {MEMORY_STEP_MIB} MiB);\n\
         # CPU twice the largest idle use (rounded up to {CPU_STEP_M}m). Measure idle pods of\n\
         # the size you run: their containers' own use is counted in.\n"
    );
    out += &format!(
        "apiVersion: node.k8s.io/v1\nkind: RuntimeClass\nmetadata:\n  name: {name}\nhandler: {handler}\noverhead:\n  podFixed:\n    memory: \"{}Mi\"\n    cpu: \"{}m\"\n",
        o.memory_mib, o.cpu_millicores
    );
    if let Some((k, v)) = node_label {
        out += &format!("scheduling:\n  nodeSelector:\n    {k}: \"{v}\"\n");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(ws_kib: u64, cpu: f64) -> Measured {
        Measured {
            namespace: "k8s.io".into(),
            id: "0123456789abcdef0123456789abcdef".into(),
            pod: Some("default/web".into()),
            cgroup: "/kubepods/pod1/0123".into(),
            working_set_kib: ws_kib,
            cpu_millicores: cpu,
            limit_kib: None,
            processes: vec![ProcessCost {
                pid: 7,
                name: "qemu-system-x86".into(),
                pss_kib: 100 << 10,
            }],
        }
    }

    #[test]
    fn the_overhead_is_the_largest_pod_with_its_margin_rounded_up() {
        // 140 MiB * 1.25 = 175 MiB -> 176; 12.3m * 2 = 24.6 -> 25 -> 30m.
        let o = overhead(&[pod(100 << 10, 3.0), pod(140 << 10, 12.3)]);
        assert_eq!(
            o,
            Overhead {
                memory_mib: 176,
                cpu_millicores: 30
            }
        );
        // An exact multiple stays; an idle CPU still gets the floor.
        assert_eq!(overhead(&[pod(128 << 10, 0.0)]).memory_mib, 160);
        assert_eq!(overhead(&[pod(128 << 10, 0.0)]).cpu_millicores, 10);
    }

    #[test]
    fn the_manifest_shows_its_measurement_and_carries_the_overhead() {
        let m = [pod(140 << 10, 12.3)];
        let text = manifest(
            "husk",
            "husk",
            &m,
            Duration::from_secs(10),
            Some(("node.husk.io/runtime", "true")),
        );
        assert!(text.contains("handler: husk\n"), "{text}");
        assert!(
            text.contains("    memory: \"176Mi\"\n    cpu: \"30m\"\n"),
            "{text}"
        );
        assert!(text.contains("working set 140.0 MiB"), "{text}");
        assert!(text.contains("(default/web)"), "{text}");
        assert!(text.contains("qemu-system-x86 100.0 MiB"), "{text}");
        assert!(text.contains("node.husk.io/runtime: \"true\""), "{text}");
        // Every line above the manifest is a YAML comment.
        let head: Vec<&str> = text
            .lines()
            .take_while(|l| !l.starts_with("apiVersion"))
            .collect();
        assert!(head.iter().all(|l| l.starts_with('#')), "{head:?}");
    }
}
