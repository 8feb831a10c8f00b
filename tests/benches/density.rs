//! Density benchmark through containerd's CRI: N idle pods (a pod and one
//! `sleep` container each) of husk (handler `husk`) and of runc (handler
//! `runc`) in the same run, one runtime at a time. Once the host's memory
//! has settled, host memory per pod two ways: the sum of the PSS of every
//! process of the pod (the shim and everything below it: for husk the VMM
//! with the guest RAM it touched and the device daemons, for runc the pause
//! and container processes), and the drop in MemAvailable from before the
//! first pod; then pods per GiB. For husk, the breakdown by process.
//!
//! `make bench` (or `cargo bench -p husk-tests --bench density`);
//! HUSK_DENSITY_PODS sets N (default 10).

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use husk_tests::bench::{mem_available_kib, pss_kib, with_descendants};
use husk_tests::containerd::{Containerd, IMAGE};
use husk_tests::cri::{container, Cri, PodOpts};
use husk_tests::processes_mentioning;

/// The memory of one runtime's N pods.
struct Density {
    pods: usize,
    /// Sum over every pod's processes: (own PSS, guest RAM PSS) in KiB.
    pss: (u64, u64),
    /// MemAvailable before the first pod minus after the last, in KiB.
    available_drop: i64,
    /// By process name: (own PSS, guest RAM PSS) summed over the pods.
    by_process: BTreeMap<String, (u64, u64)>,
}

/// Waits until MemAvailable moves less than 2 MiB over 5 s (at most 90 s),
/// and returns it.
fn settled_available() -> u64 {
    let deadline = Instant::now() + Duration::from_secs(90);
    let mut last = mem_available_kib();
    loop {
        std::thread::sleep(Duration::from_secs(5));
        let now = mem_available_kib();
        if now.abs_diff(last) < 2048 || Instant::now() > deadline {
            return now;
        }
        last = now;
    }
}

fn idle_pods(cri: &Cri, logs: &Path, handler: &str, n: usize) -> Density {
    let shim = match handler {
        "runc" => "containerd-shim-runc-v2",
        _ => "containerd-shim-husk-v2",
    };
    let before = settled_available();
    let mut pods = Vec::new();
    for i in 0..n {
        let mut opts = PodOpts::new(&format!("density-{handler}-{i}"), logs);
        opts.handler = handler.to_owned();
        let pod = cri.run_pod(&opts).expect("RunPodSandbox");
        cri.run_container(
            &pod,
            &opts,
            container("idle", IMAGE, &["sleep", "3600"], false),
        )
        .expect("idle container");
        pods.push(pod);
    }
    let after = settled_available();
    let mut d = Density {
        pods: n,
        pss: (0, 0),
        available_drop: before as i64 - after as i64,
        by_process: BTreeMap::new(),
    };
    for pod in &pods {
        // Its waiters are counted below, as its descendants.
        let shims = husk_tests::not_waiters(processes_mentioning(Path::new(&format!(
            "{shim} -namespace k8s.io -id {pod} "
        ))));
        assert_eq!(shims.len(), 1, "one shim for pod {pod}: {shims:?}");
        for pid in with_descendants(shims[0]) {
            let name = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
            let (own, guest) = pss_kib(pid);
            d.pss.0 += own;
            d.pss.1 += guest;
            let e = d.by_process.entry(name.trim().to_owned()).or_default();
            e.0 += own;
            e.1 += guest;
        }
    }
    for pod in &pods {
        cri.stop_pod(pod).expect("StopPodSandbox");
        cri.remove_pod(pod).expect("RemovePodSandbox");
    }
    d
}

fn mib(kib: f64) -> f64 {
    kib / 1024.0
}

fn main() {
    let n: usize = std::env::var("HUSK_DENSITY_PODS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10)
        .max(1);
    let ctd = Containerd::start();
    let cri = ctd.cri();
    let logs = tempfile::tempdir().expect("log dir");
    println!("husk density benchmark: {n} idle pods of each runtime through CRI, memory settled");
    // Warm-up: the image unpacked, the first shim's pages cached.
    for handler in ["husk", "runc"] {
        idle_pods(&cri, logs.path(), handler, 1);
    }
    let runs = [
        ("husk", idle_pods(&cri, logs.path(), "husk", n)),
        ("runc", idle_pods(&cri, logs.path(), "runc", n)),
    ];
    println!();
    println!(
        "| {:<8} | {:>4} | {:>18} | {:>21} | {:>24} | {:>18} | {:>18} |",
        "runtime",
        "pods",
        "PSS/pod MiB (all)",
        "of which guest RAM",
        "MemAvailable drop/pod",
        "pods/GiB (PSS)",
        "pods/GiB (drop)"
    );
    println!(
        "|{:-<10}|{:-<6}|{:-<20}|{:-<23}|{:-<26}|{:-<20}|{:-<20}|",
        "", "", "", "", "", "", ""
    );
    for (name, d) in &runs {
        let per_pod = mib((d.pss.0 + d.pss.1) as f64 / d.pods as f64);
        let guest = mib(d.pss.1 as f64 / d.pods as f64);
        let drop = mib(d.available_drop as f64 / d.pods as f64);
        let per_gib = |m: f64| if m > 0.0 { 1024.0 / m } else { f64::INFINITY };
        println!(
            "| {name:<8} | {:>4} | {per_pod:>18.1} | {guest:>21.1} | {drop:>24.1} | {:>18.1} | {:>18.1} |",
            d.pods,
            per_gib(per_pod),
            per_gib(drop)
        );
    }
    let husk = &runs[0].1;
    println!();
    println!("husk, per pod by process (PSS, MiB):");
    println!(
        "| {:<24} | {:>10} | {:>14} |",
        "process", "own", "guest RAM"
    );
    println!("|{:-<26}|{:-<12}|{:-<16}|", "", "", "");
    for (name, (own, guest)) in &husk.by_process {
        println!(
            "| {name:<24} | {:>10.1} | {:>14.1} |",
            mib(*own as f64 / husk.pods as f64),
            mib(*guest as f64 / husk.pods as f64)
        );
    }
}
