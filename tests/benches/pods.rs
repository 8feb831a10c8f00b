//! Pod benchmark through containerd's CRI: RunPodSandbox plus one container
//! created and started (pod start to running), and a second container
//! started in the running pod; husk (handler `husk`) against runc (handler
//! `runc`) on the same containerd, interleaved, in one run. Prints medians,
//! p95 and the husk / runc ratios.

use std::time::{Duration, Instant};

use husk_tests::bench::{self, median, ms};
use husk_tests::containerd::{Containerd, IMAGE};
use husk_tests::cri::{container, Cri, PodOpts};

/// One pod: (pod start to running, second container start).
fn one_pod(cri: &Cri, handler: &str, name: &str, logs: &std::path::Path) -> (Duration, Duration) {
    let mut opts = PodOpts::new(name, logs);
    opts.handler = handler.to_owned();
    let sleeper = |name: &str| container(name, IMAGE, &["sleep", "3600"], false);
    let t = Instant::now();
    let pod = cri.run_pod(&opts).expect("RunPodSandbox");
    cri.run_container(&pod, &opts, sleeper("first"))
        .expect("first container");
    let start = t.elapsed();
    let t = Instant::now();
    cri.run_container(&pod, &opts, sleeper("second"))
        .expect("second container");
    let second = t.elapsed();
    cri.stop_pod(&pod).expect("StopPodSandbox");
    cri.remove_pod(&pod).expect("RemovePodSandbox");
    (start, second)
}

fn main() {
    let runs = bench::runs();
    let ctd = Containerd::start();
    let cri = ctd.cri();
    let logs = tempfile::tempdir().expect("log dir");
    println!("husk pod benchmark: {runs} pods each, husk and runc interleaved, through CRI");
    one_pod(&cri, "husk", "warm-husk", logs.path());
    one_pod(&cri, "runc", "warm-runc", logs.path());
    let mut husk = (Vec::new(), Vec::new());
    let mut runc = (Vec::new(), Vec::new());
    for i in 0..runs {
        let (s, c) = one_pod(&cri, "husk", &format!("h{i}"), logs.path());
        husk.0.push(s);
        husk.1.push(c);
        let (s, c) = one_pod(&cri, "runc", &format!("r{i}"), logs.path());
        runc.0.push(s);
        runc.1.push(c);
    }
    bench::print_table(
        "CRI, through containerd 1.6",
        &[
            (
                "husk: RunPodSandbox + 1 container running".into(),
                husk.0.clone(),
            ),
            (
                "runc: RunPodSandbox + 1 container running".into(),
                runc.0.clone(),
            ),
            (
                "husk: 2nd container started in a running pod".into(),
                husk.1.clone(),
            ),
            (
                "runc: 2nd container started in a running pod".into(),
                runc.1.clone(),
            ),
        ],
    );
    for (what, h, r) in [
        ("pod start to running", &husk.0, &runc.0),
        ("2nd container start", &husk.1, &runc.1),
    ] {
        println!(
            "{what}, husk / runc (medians): {:.2}x ({:.1} ms / {:.1} ms)",
            median(h).as_secs_f64() / median(r).as_secs_f64(),
            ms(median(h)),
            ms(median(r))
        );
    }
}
