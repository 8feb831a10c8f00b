//! `make demo`'s pod: a private containerd with CRI, one pod of two
//! containers with RuntimeClass handler `husk`, and what shows that they
//! share one VM. Leaves nothing running.

use std::path::Path;

use husk_tests::containerd::{Containerd, IMAGE};
use husk_tests::cri::{container, PodOpts};
use husk_tests::processes_mentioning;

fn main() {
    let ctd = Containerd::start();
    let cri = ctd.cri();
    let logs = tempfile::tempdir().expect("log dir");
    let opts = PodOpts::new("demo-pod", logs.path());
    let t = std::time::Instant::now();
    let pod = cri.run_pod(&opts).expect("RunPodSandbox");
    let ids: Vec<String> = ["web", "sidecar"]
        .into_iter()
        .map(|name| {
            cri.run_container(
                &pod,
                &opts,
                container(name, IMAGE, &["sleep", "3600"], false),
            )
            .expect("container")
        })
        .collect();
    println!(
        "CRI pod {} with containers web and sidecar running in {:.2} s (RunPodSandbox + 2 containers)",
        &pod[..12],
        t.elapsed().as_secs_f64()
    );
    for (name, id) in ["web", "sidecar"].iter().zip(&ids) {
        let r = cri
            .exec_sync(
                id,
                &["sh", "-c", "echo \"kernel $(uname -r), boot $(cat /proc/sys/kernel/random/boot_id), net $(readlink /proc/self/ns/net), hostname $(hostname)\""],
                30,
            )
            .expect("ExecSync");
        print!("{name:8} {}", r.stdout);
    }
    let shims = husk_tests::shims().len();
    let vmms = processes_mentioning(Path::new("qemu-system-x86_64")).len()
        + processes_mentioning(Path::new("husk-vmm ")).len();
    println!(
        "host: {shims} husk shim, {vmms} VMM process for the pod's 2 containers (one VM per pod)"
    );
    cri.stop_pod(&pod).expect("StopPodSandbox");
    cri.remove_pod(&pod).expect("RemovePodSandbox");
    husk_tests::containerd::assert_clean();
    println!("pod stopped and removed; no shim, VM, mount or sandbox directory left");
}
