//! Kubernetes pods through containerd's CRI plugin with RuntimeClass handler
//! `husk`: one shim and one VM per pod, pod namespaces in the guest, the
//! files CRI hands over, host namespaces refused, and an exec soak as
//! kubelet's exec probes would run it.

use std::collections::HashMap;
use std::path::Path;
use std::time::{Duration, Instant};

use husk_tests::bench::{pss_kib, with_descendants};
use husk_tests::containerd::{assert_clean, Containerd, CRI_NAMESPACE, IMAGE};
use husk_tests::cri::{container, start_pod, Cri, ExecResult, PodOpts};
use husk_tests::{e2e, eventually, husk_cli, processes_mentioning, vm_lock};

/// ExecSync that must succeed with exit code 0; returns stdout.
fn sh(cri: &Cri, id: &str, cmd: &str) -> String {
    cri.sh(id, cmd, 60)
}

/// Runs container `name` (`sleep 3600`) in `pod`.
fn sleeper(cri: &Cri, pod: &str, opts: &PodOpts, name: &str) -> String {
    cri.run_container(pod, opts, container(name, IMAGE, &["sleep", "3600"], false))
        .unwrap_or_else(|e| panic!("container {name}: {e}"))
}

/// Shims and VMMs now running on this host.
fn shims_and_vmms() -> (Vec<u32>, Vec<u32>) {
    let shims = husk_tests::shims();
    let mut vmms = processes_mentioning(Path::new("qemu-system-x86_64"));
    vmms.extend(processes_mentioning(Path::new("husk-vmm ")));
    (shims, vmms)
}

/// A private containerd with CRI, and a directory for the pod's logs.
fn cri_env() -> (Containerd, Cri, tempfile::TempDir) {
    let ctd = Containerd::start();
    let cri = ctd.cri();
    (ctd, cri, tempfile::tempdir().expect("log dir"))
}

fn teardown(cri: &Cri, pod: &str) {
    cri.stop_pod(pod).expect("StopPodSandbox");
    cri.remove_pod(pod).expect("RemovePodSandbox");
    assert_clean();
}

/// Two containers of a pod share one VM and the pod's network, IPC and UTS
/// namespaces; then (same pod) `husk ps` and `husk logs` show it as CRI
/// does.
#[test]
#[ignore = "end-to-end: root and a guest (make test)"]
fn a_pod_of_two_containers_shares_one_vm_and_its_namespaces() {
    e2e();
    let _vm = vm_lock();
    let (ctd, cri, logs) = cri_env();
    let mut opts = PodOpts::new("pod-a", logs.path());
    let started = Instant::now();
    opts.sysctls = HashMap::from([
        ("net.ipv4.ip_unprivileged_port_start".into(), "81".into()),
        ("kernel.shm_rmid_forced".into(), "1".into()),
    ]);
    let pod = start_pod(&ctd, &cri, &opts);
    let a = cri
        .run_container(
            &pod,
            &opts,
            container(
                "a",
                IMAGE,
                &[
                    "sh",
                    "-c",
                    "mkdir -p /www && echo pod-local > /www/x && echo from-a > /dev/shm/a \
                     && exec httpd -f -p 127.0.0.1:8080 -h /www",
                ],
                false,
            ),
        )
        .unwrap_or_else(|e| panic!("container a: {e}\n{}", ctd.log()));
    let b = cri
        .run_container(
            &pod,
            &opts,
            container("b", IMAGE, &["sleep", "3600"], false),
        )
        .unwrap_or_else(|e| panic!("container b: {e}\n{}", ctd.log()));

    let (shims, vmms) = shims_and_vmms();
    assert_eq!(shims.len(), 1, "one shim for the pod: {shims:?}");
    assert_eq!(vmms.len(), 1, "one VMM for the pod: {vmms:?}");

    for c in [&a, &b] {
        let kernel = sh(&cri, c, "uname -r");
        assert!(
            kernel.contains("husk"),
            "{c} runs on the guest kernel: {kernel}"
        );
    }
    let boot_a = sh(&cri, &a, "cat /proc/sys/kernel/random/boot_id");
    assert_eq!(
        boot_a,
        sh(&cri, &b, "cat /proc/sys/kernel/random/boot_id"),
        "one VM"
    );

    // Network namespace: B reaches A's server on 127.0.0.1.
    let page = eventually(Duration::from_secs(30), || {
        cri.exec_sync(&b, &["wget", "-qO-", "http://127.0.0.1:8080/x"], 10)
            .ok()
            .filter(|r| r.exit_code == 0)
    })
    .expect("B never reached A's server on 127.0.0.1:8080");
    assert_eq!(page.stdout.trim(), "pod-local");

    // IPC: one /dev/shm tmpfs for the pod.
    assert_eq!(sh(&cri, &b, "cat /dev/shm/a").trim(), "from-a");
    let shm = sh(&cri, &b, "grep ' /dev/shm ' /proc/mounts");
    assert!(
        shm.starts_with("shm /dev/shm tmpfs") || shm.contains(" tmpfs "),
        "{shm}"
    );
    assert_eq!(
        sh(&cri, &a, "readlink /proc/self/ns/ipc"),
        sh(&cri, &b, "readlink /proc/self/ns/ipc")
    );
    assert_eq!(
        sh(&cri, &a, "readlink /proc/self/ns/net"),
        sh(&cri, &b, "readlink /proc/self/ns/net")
    );

    // UTS and the files CRI hands over.
    assert_eq!(sh(&cri, &b, "hostname").trim(), "pod-a");
    let resolv = sh(&cri, &b, "cat /etc/resolv.conf");
    assert!(resolv.contains("nameserver 10.96.0.10"), "{resolv}");
    assert!(
        resolv.contains("search husk-e2e.svc.cluster.local"),
        "{resolv}"
    );
    let hosts = sh(&cri, &b, "cat /etc/hosts");
    assert!(hosts.contains("localhost"), "{hosts}");
    assert_eq!(sh(&cri, &b, "cat /etc/hostname").trim(), "pod-a");

    // Pod sysctls, net.* included, in the pod's namespaces.
    assert_eq!(
        sh(
            &cri,
            &b,
            "cat /proc/sys/net/ipv4/ip_unprivileged_port_start"
        )
        .trim(),
        "81"
    );
    assert_eq!(
        sh(&cri, &b, "cat /proc/sys/kernel/shm_rmid_forced").trim(),
        "1"
    );

    // PID: separate without shareProcessNamespace.
    assert_eq!(sh(&cri, &b, "cat /proc/1/comm").trim(), "sleep");
    assert_eq!(sh(&cri, &a, "cat /proc/1/comm").trim(), "httpd");

    // Exit codes and both output streams.
    let r = cri
        .exec_sync(&b, &["sh", "-c", "echo out; echo err >&2; exit 3"], 30)
        .expect("exec");
    assert_eq!(
        (r.stdout.as_str(), r.stderr.as_str(), r.exit_code),
        ("out\n", "err\n", 3),
        "{r:?}"
    );

    operator_commands_show_the_pod_as_cri_does(&cri, &pod, &[&a, &b], vmms[0], started);
    teardown(&cri, &pod);
}

/// `husk ps --json` shows pod `pod` as CRI knows it (PodSandboxStatus's
/// name, namespace and uid; its containers) and as the host runs it (the
/// VMM found for it, an uptime no longer than the pod has existed, its
/// memory); `husk logs` by the Kubernetes name prints its guest console;
/// an unknown name is refused by name.
fn operator_commands_show_the_pod_as_cri_does(
    cri: &Cri,
    pod: &str,
    containers: &[&str],
    vmm: u32,
    started: Instant,
) {
    let out = husk_cli(&["ps", "--json"], false);
    let all: serde_json::Value = serde_json::from_slice(&out.stdout).expect("ps --json is JSON");
    let mine: Vec<&serde_json::Value> = all
        .as_array()
        .expect("an array")
        .iter()
        .filter(|p| p["id"] == pod)
        .collect();
    assert_eq!(mine.len(), 1, "pod {pod} once in {all:#}");
    let p = mine[0];
    let meta = cri
        .pod_status(pod)
        .expect("PodSandboxStatus")
        .metadata
        .expect("metadata");
    assert_eq!(p["namespace"], CRI_NAMESPACE, "{p:#}");
    assert_eq!(p["pod_name"], meta.name.as_str(), "{p:#}");
    assert_eq!(p["pod_namespace"], meta.namespace.as_str(), "{p:#}");
    assert_eq!(p["pod_uid"], meta.uid.as_str(), "{p:#}");
    assert_eq!(p["state"], "running", "{p:#}");
    let listed: Vec<&str> = p["containers"]
        .as_array()
        .expect("containers")
        .iter()
        .filter_map(|c| c.as_str())
        .collect();
    for c in containers.iter().chain([&pod]) {
        assert!(listed.contains(c), "{c} not among {listed:?}");
    }
    assert_eq!(p["vmm_pid"], vmm, "{p:#}");
    let comm = std::fs::read_to_string(format!("/proc/{vmm}/comm")).expect("VMM comm");
    let backend = p["backend"].as_str().expect("backend");
    assert_eq!(
        backend.starts_with("qemu"),
        comm.starts_with("qemu"),
        "backend {backend} for a VMM named {comm}"
    );
    let uptime = p["uptime_s"].as_u64().expect("uptime_s");
    assert!(
        uptime <= started.elapsed().as_secs() + 1,
        "uptime {uptime} s, but the pod is {:?} old",
        started.elapsed()
    );
    // All of the pod's host processes: at least the VMM's own share.
    let memory = p["memory_kib"].as_u64().expect("memory_kib");
    let (own, guest) = pss_kib(vmm);
    assert!(
        memory >= (own + guest) / 2 && memory > 0,
        "memory {memory} KiB, the VMM alone {} KiB",
        own + guest
    );
    let text = String::from_utf8_lossy(&husk_cli(&["ps"], false).stdout).into_owned();
    let kube = format!("{}/{}", meta.namespace, meta.name);
    assert!(
        text.lines()
            .any(|l| l.contains(&kube) && l.contains("running")),
        "{kube} not in husk ps:\n{text}"
    );
    let console = husk_cli(&["logs", &kube], false).stdout;
    assert!(
        String::from_utf8_lossy(&console).contains(husk_protocol::READY_MARK),
        "husk logs {kube} is not the pod's console: {}",
        String::from_utf8_lossy(&console)
    );
    let err = husk_cli(&["logs", "husk-e2e/no-such-pod"], true).stderr;
    let err = String::from_utf8_lossy(&err);
    assert!(
        err.contains("no-such-pod") && err.contains("husk ps"),
        "{err}"
    );
}

#[test]
#[ignore = "end-to-end: root and a guest (make test)"]
fn share_process_namespace_puts_every_container_under_the_pause_process() {
    e2e();
    let _vm = vm_lock();
    let (ctd, cri, logs) = cri_env();
    let mut opts = PodOpts::new("pod-shared-pid", logs.path());
    opts.share_pid = true;
    let pod = start_pod(&ctd, &cri, &opts);
    let a = cri
        .run_container(&pod, &opts, container("a", IMAGE, &["sleep", "3601"], true))
        .expect("container a");
    let b = cri
        .run_container(&pod, &opts, container("b", IMAGE, &["sleep", "3602"], true))
        .expect("container b");
    assert_eq!(sh(&cri, &a, "cat /proc/1/comm").trim(), "pause");
    let ps = sh(&cri, &b, "ps -o args");
    assert!(
        ps.contains("sleep 3601") && ps.contains("sleep 3602"),
        "{ps}"
    );
    teardown(&cri, &pod);
}

#[test]
#[ignore = "end-to-end: root and a guest (make test)"]
fn host_namespace_pods_are_refused_by_field_name() {
    e2e();
    let _vm = vm_lock();
    let (_ctd, cri, logs) = cri_env();
    let mut opts = PodOpts::new("pod-hostnet", logs.path());
    opts.host_network = true;
    let e = cri
        .run_pod(&opts)
        .expect_err("a hostNetwork pod must be refused");
    assert!(e.message().contains("hostNetwork"), "{e}");
    cri.remove_all_pods();
    assert_clean();
}

/// Kata's CVE-2020-27151 pattern: pod annotations that name a kernel,
/// VMM, daemon or kernel arguments. husk takes its VM from its own config
/// only: with every annotation passed through, the pod still boots the
/// configured kernel with husk's own command line.
#[test]
#[ignore = "end-to-end: root and a guest (make test)"]
fn pod_annotations_cannot_choose_the_kernel_vmm_daemons_or_kernel_arguments() {
    e2e();
    let _vm = vm_lock();
    let (ctd, cri, logs) = cri_env();
    let mut opts = PodOpts::new("pod-annotated", logs.path());
    for (k, v) in [
        ("io.katacontainers.config.hypervisor.path", "/bin/false"),
        (
            "io.katacontainers.config.hypervisor.kernel",
            "/nonexistent/vmlinux",
        ),
        (
            "io.katacontainers.config.hypervisor.kernel_params",
            "init=/bin/sh husk.evil=1",
        ),
        (
            "io.katacontainers.config.hypervisor.virtio_fs_daemon",
            "/bin/false",
        ),
        ("io.husk.kernel", "/nonexistent/vmlinux"),
        ("io.husk.kernel_params", "husk.evil=2"),
        ("io.husk.vmm", "/bin/false"),
        ("husk.config", "/nonexistent/config.toml"),
    ] {
        opts.annotations.insert(k.into(), v.into());
    }
    let pod = start_pod(&ctd, &cri, &opts);
    let app = cri
        .run_container(
            &pod,
            &opts,
            container("app", IMAGE, &["sleep", "3600"], false),
        )
        .unwrap_or_else(|e| panic!("container: {e}\n{}", ctd.log()));
    let cmdline = sh(&cri, &app, "cat /proc/cmdline");
    assert!(
        !cmdline.contains("husk.evil"),
        "annotation reached the kernel: {cmdline}"
    );
    assert!(!cmdline.contains("init=/bin/sh"), "{cmdline}");
    let release = sh(&cri, &app, "uname -r");
    assert!(
        release.contains("husk"),
        "not the configured kernel: {release}"
    );
    // The annotations did reach the runtime: they are in the spec
    // containerd gave the shim.
    let spec = std::fs::read_to_string(ctd.bundle("k8s.io", &pod).join("config.json"))
        .expect("the pod's bundle");
    assert!(spec.contains("io.husk.kernel_params"), "{spec}");
    teardown(&cri, &pod);
}

/// Runs `n` ExecSync calls of `true`; returns the failures.
fn exec_loop(cri: &Cri, id: &str, n: usize) -> Vec<String> {
    (0..n)
        .filter_map(|i| match cri.exec_sync(id, &["true"], 30) {
            Ok(ExecResult { exit_code: 0, .. }) => None,
            Ok(r) => Some(format!("exec {i}: {r:?}")),
            Err(e) => Some(format!("exec {i}: {e}")),
        })
        .collect()
}

#[test]
#[ignore = "end-to-end: root and a guest (make test)"]
fn exec_soak_sequential_and_concurrent_then_the_pod_still_answers_kill() {
    e2e();
    let _vm = vm_lock();
    let (ctd, cri, logs) = cri_env();
    let opts = PodOpts::new("pod-soak", logs.path());
    let pod = start_pod(&ctd, &cri, &opts);
    let c = sleeper(&cri, &pod, &opts, "c");
    let sequential: usize = std::env::var("HUSK_SOAK_EXECS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1000);
    let t = Instant::now();
    let failed = exec_loop(&cri, &c, sequential);
    let seq_time = t.elapsed();
    assert!(
        failed.is_empty(),
        "{} of {sequential} sequential execs failed: {:?}",
        failed.len(),
        &failed[..failed.len().min(5)]
    );
    let loops = 4;
    let per_loop = sequential / 4;
    let t = Instant::now();
    let failed: Vec<String> = std::thread::scope(|s| {
        let workers: Vec<_> = (0..loops)
            .map(|_| {
                let c = c.clone();
                let socket = ctd.dir.path().join("containerd.sock");
                s.spawn(move || exec_loop(&Cri::connect(&socket), &c, per_loop))
            })
            .collect();
        workers
            .into_iter()
            .flat_map(|w| w.join().expect("exec loop"))
            .collect()
    });
    eprintln!(
        "exec soak: {sequential} sequential in {:.1} s, {loops}x{per_loop} concurrent in {:.1} s, 0 failures",
        seq_time.as_secs_f64(),
        t.elapsed().as_secs_f64()
    );
    assert!(
        failed.is_empty(),
        "{} of {} concurrent execs failed: {:?}",
        failed.len(),
        loops * per_loop,
        &failed[..failed.len().min(5)]
    );
    // The pod still answers kill: StopContainer ends it at once.
    let t = Instant::now();
    cri.stop_container(&c, 0).expect("StopContainer");
    let status = cri.container_status(&c).expect("ContainerStatus");
    assert_eq!(status.exit_code, 137, "{status:?}");
    assert!(
        t.elapsed() < Duration::from_secs(10),
        "kill took {:?}",
        t.elapsed()
    );
    teardown(&cri, &pod);
}

/// A shell command printing a file of the calling container's own cgroup
/// (with or without a cgroup namespace).
fn cgroup_file(name: &str) -> String {
    format!("cat /sys/fs/cgroup$(cut -d: -f3 /proc/self/cgroup)/{name}")
}

/// Waits until container `id` has exited; returns its exit code.
fn wait_exited(cri: &Cri, id: &str) -> i32 {
    eventually(Duration::from_secs(60), || {
        cri.container_status(id)
            .ok()
            .filter(|s| s.state == k8s_cri::v1::ContainerState::ContainerExited as i32)
            .map(|s| s.exit_code)
    })
    .unwrap_or_else(|| panic!("container {id} never exited"))
}

/// The payload of a CRI log file: each line is `<time> <stream> <P|F> <text>`;
/// partial (P) lines continue without a newline.
fn cri_log_payload(log: &str) -> String {
    let mut out = String::new();
    for line in log.lines() {
        let mut parts = line.splitn(4, ' ');
        let (_, _, tag, text) = (parts.next(), parts.next(), parts.next(), parts.next());
        out.push_str(text.unwrap_or(""));
        if tag == Some("F") {
            out.push('\n');
        }
    }
    out
}

#[test]
#[ignore = "end-to-end: root and a guest (make test)"]
fn pod_lifecycle_logs_stats_updates_and_exec_timeout() {
    e2e();
    let _vm = vm_lock();
    let (ctd, cri, logs) = cri_env();
    let opts = PodOpts::new("pod-life", logs.path());
    let pod = start_pod(&ctd, &cri, &opts);

    // An init container that prints 1 MiB and exits at once: every byte
    // reaches CRI's log file before its exit is reported.
    let line = "0123456789abcdef".repeat(4);
    let script = format!(
        "i=0; while [ $i -lt 16384 ]; do echo {}; i=$((i+1)); done",
        &line[..63]
    );
    let init = cri
        .run_container(
            &pod,
            &opts,
            container("init", IMAGE, &["sh", "-c", &script], false),
        )
        .expect("init container");
    assert_eq!(wait_exited(&cri, &init), 0);
    let log = std::fs::read_to_string(logs.path().join("init.log")).expect("init.log");
    let payload = cri_log_payload(&log);
    assert_eq!(payload.len(), 1 << 20, "1 MiB of output in the CRI log");
    assert!(
        payload.lines().all(|l| l == &line[..63]),
        "log content intact"
    );

    // A container that fails, restarted in the running pod as attempt 1.
    let first = cri
        .run_container(
            &pod,
            &opts,
            container("app", IMAGE, &["sh", "-c", "exit 7"], false),
        )
        .unwrap_or_else(|e| panic!("app attempt 0: {e}\n{}", ctd.log()));
    assert_eq!(wait_exited(&cri, &first), 7);
    let mut again = container("app", IMAGE, &["sleep", "3600"], false);
    if let Some(m) = again.metadata.as_mut() {
        m.attempt = 1;
    }
    again.log_path = "app-1.log".into();
    let app = cri
        .run_container(&pod, &opts, again)
        .expect("app attempt 1");
    assert_eq!(sh(&cri, &app, "cat /proc/1/comm").trim(), "sleep");
    cri.remove_container(&first).expect("remove attempt 0");
    cri.remove_container(&init).expect("remove init");

    // Stats carry the guest's values; CPU usage grows for a busy container.
    let busy = cri
        .run_container(
            &pod,
            &opts,
            container("busy", IMAGE, &["sh", "-c", "while :; do :; done"], false),
        )
        .expect("busy container");
    let cpu = |id: &str| {
        cri.container_stats(id)
            .expect("ContainerStats")
            .cpu
            .and_then(|c| c.usage_core_nano_seconds)
            .map_or(0, |v| v.value)
    };
    let c1 = cpu(&busy);
    std::thread::sleep(Duration::from_secs(2));
    let c2 = cpu(&busy);
    assert!(c2 > c1, "CPU usage of a busy container grows: {c1} -> {c2}");
    let mem = cri
        .container_stats(&app)
        .expect("ContainerStats")
        .memory
        .expect("memory stats");
    let guest_usage: u64 = sh(&cri, &app, &cgroup_file("memory.current"))
        .trim()
        .parse()
        .expect("memory.current");
    let ws = mem.working_set_bytes.map_or(0, |v| v.value);
    assert!(
        ws > 0 && ws <= guest_usage * 4,
        "working set {ws}, guest usage {guest_usage}"
    );

    let listed = cri.list_container_stats().expect("ListContainerStats");
    for id in [&app, &busy] {
        let s = listed
            .iter()
            .find(|s| s.attributes.as_ref().is_some_and(|a| &a.id == id))
            .unwrap_or_else(|| panic!("{id} missing from ListContainerStats: {listed:?}"));
        let ws = s
            .memory
            .as_ref()
            .and_then(|m| m.working_set_bytes)
            .map_or(0, |v| v.value);
        assert!(ws > 0, "{id}: working set {ws}");
    }

    // UpdateContainerResources reaches the guest's cgroup.
    cri.update_resources(
        &app,
        k8s_cri::v1::LinuxContainerResources {
            memory_limit_in_bytes: 64 << 20,
            ..Default::default()
        },
    )
    .expect("UpdateContainerResources");
    assert_eq!(
        sh(&cri, &app, &cgroup_file("memory.max")).trim(),
        (64u64 << 20).to_string()
    );

    // ExecSync with a timeout: the call ends, the process is killed.
    let t = Instant::now();
    let r = cri.exec_sync(&app, &["sleep", "1234"], 2);
    assert!(
        t.elapsed() < Duration::from_secs(20),
        "timeout not honoured: {:?}",
        t.elapsed()
    );
    // containerd's CRI names its timeout ("timeout 2s exceeded: context
    // deadline exceeded") once the killed process is reaped; any other
    // error (a broken exec, a lost connection) is not this case.
    assert!(
        t.elapsed() >= Duration::from_secs(2),
        "ended before its timeout: {r:?}"
    );
    assert!(
        r.as_ref()
            .is_err_and(|s| s.message().contains("timeout 2s exceeded")),
        "{r:?}"
    );
    let left = eventually(Duration::from_secs(10), || {
        let ps = sh(&cri, &app, "ps -o args");
        (!ps.contains("sleep 1234")).then_some(())
    });
    assert!(left.is_some(), "the timed-out exec was not killed");

    // StopPodSandbox with running containers, then RemovePodSandbox.
    teardown(&cri, &pod);
}

#[test]
#[ignore = "end-to-end: root and a guest (make test)"]
fn a_killed_pod_shim_is_cleaned_up_container_by_container() {
    e2e();
    let _vm = vm_lock();
    let (ctd, cri, logs) = cri_env();
    let mut opts = PodOpts::new("pod-crash", logs.path());
    let parent = format!("/husk-e2e-{}", std::process::id());
    opts.cgroup_parent = format!("{parent}/pod-crash");
    let pod = start_pod(&ctd, &cri, &opts);
    let app = sleeper(&cri, &pod, &opts, "app");
    let (shims, _) = shims_and_vmms();
    assert_eq!(shims.len(), 1, "{shims:?}");
    let pod_cgroup = format!("{parent}/pod-crash/{pod}");
    let cgroups: Vec<_> = cgroups_of(shims[0])
        .into_iter()
        .filter(|(_, p)| *p == pod_cgroup)
        .map(|(m, _)| m.join(pod_cgroup.trim_start_matches('/')))
        .collect();
    assert!(!cgroups.is_empty(), "the shim is not in {pod_cgroup}");
    // SAFETY: kill(2) on the pod's shim, a process this test started.
    assert_eq!(unsafe { libc::kill(shims[0] as i32, libc::SIGKILL) }, 0);
    let exited = eventually(Duration::from_secs(30), || {
        cri.container_status(&app)
            .ok()
            .filter(|s| s.state == k8s_cri::v1::ContainerState::ContainerExited as i32)
    });
    assert!(exited.is_some(), "the app container never showed as exited");
    teardown(&cri, &pod);
    for d in &cgroups {
        assert!(!d.exists(), "cgroup {} left behind", d.display());
        let _ = std::fs::remove_dir(d.parent().expect("pod parent"));
        let _ = std::fs::remove_dir(d.parent().and_then(Path::parent).expect("test parent"));
    }
}

/// The cgroups a process is in, as `(hierarchy directory, path)` for each
/// line of its /proc/<pid>/cgroup, with the conventional mount layout
/// (`/sys/fs/cgroup/<controllers>` for v1, `/sys/fs/cgroup` for v2).
fn cgroups_of(pid: u32) -> Vec<(std::path::PathBuf, String)> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap_or_default();
    let unified = Path::new("/sys/fs/cgroup/unified");
    text.lines()
        .filter_map(|l| {
            let mut it = l.splitn(3, ':');
            let (_, list, path) = (it.next()?, it.next()?, it.next()?);
            let mount = match list {
                "" if unified.exists() => unified.to_path_buf(),
                "" => Path::new("/sys/fs/cgroup").to_path_buf(),
                l => Path::new("/sys/fs/cgroup").join(l.trim_start_matches("name=")),
            };
            Some((mount, path.to_owned()))
        })
        .collect()
}

/// Entries of containerd's shim socket directory.
fn shim_sockets() -> Vec<std::path::PathBuf> {
    std::fs::read_dir("/run/containerd/s")
        .map(|d| d.flatten().map(|e| e.path()).collect())
        .unwrap_or_default()
}

/// Guest RAM the pod's processes hold on the host (PSS of the memfd
/// mappings of the shim and everything below it), in KiB.
fn pod_guest_ram_kib() -> u64 {
    let (shims, _) = shims_and_vmms();
    assert_eq!(shims.len(), 1, "one pod shim: {shims:?}");
    with_descendants(shims[0])
        .into_iter()
        .map(|pid| pss_kib(pid).1)
        .sum()
}

#[test]
#[ignore = "end-to-end: root and a guest (make test)"]
fn memory_a_guest_frees_goes_back_to_the_host() {
    e2e();
    let _vm = vm_lock();
    let (ctd, cri, logs) = cri_env();
    let opts = PodOpts::new("pod-fpr", logs.path());
    let pod = start_pod(&ctd, &cri, &opts);
    let c = sleeper(&cri, &pod, &opts, "c");
    // The agent set the configured reporting order (Linux 6.1 would keep
    // 10, 4 MiB blocks, whatever the command line says).
    assert_eq!(
        sh(
            &cri,
            &c,
            "cat /sys/module/page_reporting/parameters/page_reporting_order"
        )
        .trim(),
        husk_runtime::Config::default()
            .guest
            .page_reporting_order
            .to_string()
    );
    let at_rest = pod_guest_ram_kib();
    // dd's 96 MiB buffer is touched (filled from /dev/zero) and freed when
    // dd exits: the guest reports the free blocks, the VMM discards them.
    sh(
        &cri,
        &c,
        "dd if=/dev/zero of=/dev/null bs=96M count=1 2>/dev/null",
    );
    let after_dd = pod_guest_ram_kib();
    let back = eventually(Duration::from_secs(60), || {
        let now = pod_guest_ram_kib();
        (now < at_rest + (16 << 10)).then_some(now)
    });
    eprintln!(
        "guest RAM on the host: {at_rest} KiB at rest, {after_dd} KiB after dd, {back:?} KiB later"
    );
    assert!(
        back.is_some(),
        "the 96 MiB the guest freed stayed with the host: {at_rest} KiB at rest, {} KiB a minute after dd",
        pod_guest_ram_kib()
    );
    // The guest takes the memory it gave back again.
    assert_eq!(
        sh(
            &cri,
            &c,
            "dd if=/dev/zero of=/dev/null bs=96M count=1 2>/dev/null && echo again"
        )
        .trim(),
        "again"
    );
    teardown(&cri, &pod);
}

#[test]
#[ignore = "end-to-end: root and a guest (make test)"]
fn a_pods_host_cost_is_in_its_cgroup_and_its_vm_has_the_pods_size() {
    e2e();
    let _vm = vm_lock();
    let (ctd, cri, logs) = cri_env();
    let sockets_before = shim_sockets();
    let parent = format!("/husk-e2e-{}", std::process::id());
    let mut opts = PodOpts::new("pod-cg", logs.path());
    opts.cgroup_parent = format!("{parent}/pod-cg");
    let mut plain = opts.clone();
    plain.name = "pod-plain".into();
    plain.cgroup_parent = String::new();
    // Kubelet's sum of the containers' limits: 256 MiB, 1.5 CPUs.
    opts.resources = Some(k8s_cri::v1::LinuxContainerResources {
        memory_limit_in_bytes: 256 << 20,
        cpu_quota: 150_000,
        cpu_period: 100_000,
        ..Default::default()
    });

    // The configured size, from a pod without limits.
    let base = start_pod(&ctd, &cri, &plain);
    let b = sleeper(&cri, &base, &plain, "b");
    let mem_kib = |id: &str| -> u64 {
        sh(&cri, id, "awk '/MemTotal/ {print $2}' /proc/meminfo")
            .trim()
            .parse()
            .expect("MemTotal")
    };
    let cpus = |id: &str| -> u32 { sh(&cri, id, "nproc").trim().parse().expect("nproc") };
    let (base_mem, base_cpus) = (mem_kib(&b), cpus(&b));
    teardown(&cri, &base);

    let pod = start_pod(&ctd, &cri, &opts);
    let app = sleeper(&cri, &pod, &opts, "app");
    // The VM grew by the pod's limits: 256 MiB and ceil(1.5) = 2 vCPUs.
    let (mem, n) = (mem_kib(&app), cpus(&app));
    assert_eq!(
        n,
        base_cpus + 2,
        "vCPUs: {n} with limits, {base_cpus} without"
    );
    let grown = mem.saturating_sub(base_mem);
    assert!(
        (250 << 10..=260 << 10).contains(&grown),
        "guest MemTotal grew by {grown} KiB (from {base_mem} KiB), not by 256 MiB"
    );

    // The shim, the VMM and its daemons are in the pod's cgroup.
    let (shims, vmms) = shims_and_vmms();
    assert_eq!((shims.len(), vmms.len()), (1, 1), "{shims:?} {vmms:?}");
    let pod_cgroup = format!("{parent}/pod-cg/{pod}");
    let vmm_cgroups = cgroups_of(vmms[0]);
    let memory = vmm_cgroups
        .iter()
        .find(|(m, _)| m.ends_with("memory") || m == Path::new("/sys/fs/cgroup"))
        .unwrap_or_else(|| panic!("no memory cgroup for the VMM: {vmm_cgroups:?}"));
    assert_eq!(memory.1, pod_cgroup, "the VMM's memory cgroup");
    let dir = memory.0.join(pod_cgroup.trim_start_matches('/'));
    let procs = std::fs::read_to_string(dir.join("cgroup.procs")).expect("cgroup.procs");
    let procs: Vec<u32> = procs.lines().filter_map(|l| l.parse().ok()).collect();
    for (what, pid) in [("shim", shims[0]), ("VMM", vmms[0])] {
        assert!(
            procs.contains(&pid),
            "{what} {pid} not in {}: {procs:?}",
            dir.display()
        );
    }
    let daemons = processes_mentioning(&husk_tests::sandbox_dir(CRI_NAMESPACE, &pod));
    assert!(
        daemons.len() >= 2,
        "VMM and daemons of the pod: {daemons:?}"
    );
    for pid in &daemons {
        assert!(
            procs.contains(pid),
            "pod process {pid} not in the pod's cgroup: {procs:?}"
        );
    }

    // CRI's pod stats read that cgroup: the VM's memory and growing CPU.
    let rss_anon_kib = std::fs::read_to_string(format!("/proc/{}/status", vmms[0]))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("RssAnon:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .expect("the VMM's RssAnon");
    let stats = cri
        .pod_stats(&pod)
        .unwrap_or_else(|e| panic!("PodSandboxStats: {e}\n{}", ctd.log()));
    let linux = stats.linux.expect("linux pod stats");
    let usage = linux
        .memory
        .as_ref()
        .and_then(|m| m.usage_bytes.as_ref())
        .map(|v| v.value);
    let usage = usage.expect("pod memory usage");
    assert!(
        usage >= rss_anon_kib * 1024 * 8 / 10,
        "pod memory {usage} B, the VMM alone holds {rss_anon_kib} KiB anonymous"
    );
    let cpu = |s: &k8s_cri::v1::PodSandboxStats| {
        s.linux
            .as_ref()
            .and_then(|l| l.cpu.as_ref())
            .and_then(|c| c.usage_core_nano_seconds.as_ref())
            .map(|v| v.value)
            .unwrap_or(0)
    };
    // The pod's container figures are the guest's.
    let guest_bytes: u64 = sh(&cri, &app, &cgroup_file("memory.current"))
        .trim()
        .parse()
        .expect("the container's memory.current");
    let entry = linux
        .containers
        .iter()
        .find(|c| c.attributes.as_ref().is_some_and(|a| a.id == app))
        .unwrap_or_else(|| panic!("no stats for {app} in the pod's: {:?}", linux.containers));
    let ws = entry
        .memory
        .as_ref()
        .and_then(|m| m.working_set_bytes.as_ref())
        .map(|v| v.value)
        .expect("the container's working set");
    assert!(
        ws > 0 && ws <= guest_bytes * 2 && guest_bytes <= ws * 2,
        "the pod's stats say {ws} B for {app}, the guest's cgroup {guest_bytes} B"
    );
    let cpu1 = cpu(&cri.pod_stats(&pod).expect("PodSandboxStats"));
    sh(
        &cri,
        &app,
        "i=0; while [ $i -lt 20000 ]; do i=$((i+1)); done",
    );
    let cpu2 = cpu(&cri.pod_stats(&pod).expect("PodSandboxStats"));
    assert!(cpu1 > 0 && cpu2 > cpu1, "pod CPU {cpu1} then {cpu2} ns");

    // Stopped with its container running, then removed: nothing is left,
    // the cgroup and the shim's socket included.
    cri.stop_pod(&pod).expect("StopPodSandbox");
    cri.remove_pod(&pod).expect("RemovePodSandbox");
    assert_clean();
    for (mount, _) in &vmm_cgroups {
        let d = mount.join(pod_cgroup.trim_start_matches('/'));
        assert!(!d.exists(), "cgroup {} left behind", d.display());
    }
    let sockets_after = shim_sockets();
    let new: Vec<_> = sockets_after
        .iter()
        .filter(|s| !sockets_before.contains(s))
        .collect();
    assert!(new.is_empty(), "shim sockets left behind: {new:?}");
    for (mount, _) in &vmm_cgroups {
        let _ = std::fs::remove_dir(mount.join(parent.trim_start_matches('/')).join("pod-cg"));
        let _ = std::fs::remove_dir(mount.join(parent.trim_start_matches('/')));
    }
}

/// Runs a host command that must succeed.
fn host(cmd: &str, args: &[&str]) {
    let out = std::process::Command::new(cmd)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{cmd}: {e}"));
    assert!(out.status.success(), "{cmd} {args:?}: {out:?}");
}

#[test]
#[ignore = "end-to-end: root and a guest (make test)"]
fn volumes_read_only_file_and_sub_path_and_host_mounts_made_after_start() {
    e2e();
    let _vm = vm_lock();
    let (ctd, cri, logs) = cri_env();
    // HostToContainer needs a shared (or slave) source, as for runc: CRI
    // checks it. A tmpfs of the test's own, made shared.
    let vol = tempfile::tempdir().expect("volume dir");
    let v = vol.path().to_str().expect("utf-8 path").to_owned();
    host(
        "mount",
        &["-t", "tmpfs", "-o", "size=4m", "husk-e2e-vol", &v],
    );
    host("mount", &["--make-shared", &v]);
    std::fs::write(vol.path().join("early"), "early\n").expect("write early file");
    let opts = PodOpts::new("pod-prop", logs.path());
    let pod = start_pod(&ctd, &cri, &opts);
    // Beside it, as kubelet hands them over: a read-only hostPath volume,
    // a single file, and a subPath (a bind of a directory inside a volume).
    let other = tempfile::tempdir().expect("volume dir");
    std::fs::create_dir(other.path().join("sub")).expect("subPath dir");
    std::fs::write(other.path().join("sub/in-sub"), "sub\n").expect("subPath file");
    std::fs::write(other.path().join("config"), "key=value\n").expect("file volume");
    let bind = |host: &Path, at: &str, readonly: bool| k8s_cri::v1::Mount {
        container_path: at.into(),
        host_path: host.display().to_string(),
        readonly,
        ..Default::default()
    };
    let mut c = container("app", IMAGE, &["sleep", "3600"], false);
    c.mounts = vec![
        k8s_cri::v1::Mount {
            container_path: "/vol".into(),
            host_path: v.clone(),
            propagation: k8s_cri::v1::MountPropagation::PropagationHostToContainer as i32,
            ..Default::default()
        },
        bind(other.path(), "/ro", true),
        bind(&other.path().join("config"), "/etc/app.conf", true),
        bind(&other.path().join("sub"), "/data/sub", false),
    ];
    let app = cri
        .run_container(&pod, &opts, c)
        .unwrap_or_else(|e| panic!("container: {e}\n{}", ctd.log()));
    assert_eq!(sh(&cri, &app, "cat /vol/early"), "early\n");
    assert_eq!(
        sh(&cri, &app, "cat /etc/app.conf /ro/config"),
        "key=value\nkey=value\n"
    );
    let w = cri
        .exec_sync(
            &app,
            &["sh", "-c", "echo x > /ro/new || echo x >> /etc/app.conf"],
            30,
        )
        .expect("exec");
    assert_ne!(w.exit_code, 0, "a read-only volume took a write: {w:?}");
    assert!(
        !other.path().join("new").exists(),
        "the write reached the host"
    );
    assert_eq!(
        sh(
            &cri,
            &app,
            "cat /data/sub/in-sub; echo new > /data/sub/made"
        ),
        "sub\n"
    );
    assert_eq!(
        std::fs::read_to_string(other.path().join("sub/made")).expect("file made in the subPath"),
        "new\n"
    );
    assert_eq!(
        std::fs::read_to_string(other.path().join("config")).expect("file volume"),
        "key=value\n"
    );
    // The guest looks at the mount point before anything is mounted there.
    std::fs::create_dir(vol.path().join("sub")).expect("mkdir sub");
    assert_eq!(sh(&cri, &app, "ls -A /vol/sub"), "");
    let sub = format!("{v}/sub");
    host(
        "mount",
        &["-t", "tmpfs", "-o", "size=1m", "husk-e2e-sub", &sub],
    );
    std::fs::write(vol.path().join("sub/late"), "late\n").expect("write late file");
    let seen = eventually(Duration::from_secs(10), || {
        cri.exec_sync(&app, &["cat", "/vol/sub/late"], 10)
            .ok()
            .filter(|r| r.exit_code == 0)
            .map(|r| r.stdout)
    });
    teardown(&cri, &pod);
    host("umount", &[&sub]);
    host("umount", &[&v]);
    assert_eq!(
        seen.as_deref(),
        Some("late\n"),
        "a tmpfs mounted on the host after start never showed in the container"
    );
}

/// The numbers of the `line N` lines a CRI log holds, in order.
fn numbered_lines(log: &Path) -> Vec<u64> {
    cri_log_payload(&std::fs::read_to_string(log).unwrap_or_default())
        .lines()
        .filter_map(|l| l.strip_prefix("line ")?.trim().parse().ok())
        .collect()
}

#[test]
#[ignore = "end-to-end: root and a guest (make test)"]
fn a_containers_output_survives_a_containerd_restart_as_with_runc() {
    e2e();
    let _vm = vm_lock();
    let (mut ctd, cri, logs) = cri_env();
    drop(cri);
    let counter = "i=0; while :; do i=$((i+1)); echo line $i; sleep 0.1; done";
    let mut pods = Vec::new();
    // In the husk pod also a created container never started and one that
    // has exited: their states must survive the restarts too.
    let mut others = Vec::new();
    for handler in ["runc", "husk"] {
        let cri = ctd.cri_client();
        let dir = logs.path().join(handler);
        std::fs::create_dir_all(&dir).expect("log dir");
        let mut opts = PodOpts::new(&format!("restart-{handler}"), &dir);
        opts.handler = handler.into();
        let pod = start_pod(&ctd, &cri, &opts);
        let c = cri
            .run_container(
                &pod,
                &opts,
                container("counter", IMAGE, &["sh", "-c", counter], false),
            )
            .unwrap_or_else(|e| panic!("container ({handler}): {e}\n{}", ctd.log()));
        if handler == "husk" {
            let created = cri
                .create_container(
                    &pod,
                    &opts,
                    container("later", IMAGE, &["sleep", "3600"], false),
                )
                .unwrap_or_else(|e| panic!("created container: {e}\n{}", ctd.log()));
            let exited = cri
                .run_container(
                    &pod,
                    &opts,
                    container("done", IMAGE, &["sh", "-c", "exit 3"], false),
                )
                .unwrap_or_else(|e| panic!("exiting container: {e}\n{}", ctd.log()));
            assert_eq!(wait_exited(&cri, &exited), 3);
            others.push((created, k8s_cri::v1::ContainerState::ContainerCreated));
            others.push((exited, k8s_cri::v1::ContainerState::ContainerExited));
        }
        pods.push((handler, pod, c, dir.join("counter.log")));
    }
    for (handler, _, _, log) in &pods {
        let seen = eventually(Duration::from_secs(20), || {
            (numbered_lines(log).len() >= 10).then_some(())
        });
        assert!(seen.is_some(), "{handler}: no output before the restart");
    }
    // containerd gone for 2 s, three times: the containers keep writing
    // (about 20 lines each, less than a FIFO holds), then a new containerd
    // takes over.
    for restart in 1..=3 {
        ctd.restart(Duration::from_secs(2));
        let cri = ctd.cri_client();
        for (handler, _, c, log) in &pods {
            let before = numbered_lines(log).len();
            let grown = eventually(Duration::from_secs(30), || {
                (numbered_lines(log).len() >= before + 30).then_some(())
            });
            assert!(
                grown.is_some(),
                "{handler}: output stopped after containerd's restart {restart} (had {before} lines)\n{}",
                ctd.log()
            );
            let lines = numbered_lines(log);
            let gaps: Vec<_> = lines
                .windows(2)
                .filter(|w| w[1] != w[0] + 1)
                .map(|w| (w[0], w[1]))
                .collect();
            assert!(
                lines.first() == Some(&1) && gaps.is_empty(),
                "{handler}: lines lost across restart {restart}: gaps {gaps:?} in {} lines",
                lines.len()
            );
            let state = cri.container_status(c).expect("status").state;
            assert_eq!(
                state,
                k8s_cri::v1::ContainerState::ContainerRunning as i32,
                "{handler}: after restart {restart}"
            );
        }
        for (id, want) in &others {
            let st = cri.container_status(id).expect("status");
            assert_eq!(st.state, *want as i32, "{id} after restart {restart}");
            if *want == k8s_cri::v1::ContainerState::ContainerExited {
                assert_eq!(st.exit_code, 3, "{id} after restart {restart}");
            }
        }
    }
    let cri = ctd.cri_client();
    // The container created before the restarts still starts.
    let (created, _) = &others[0];
    cri.start_container(created).unwrap_or_else(|e| {
        panic!(
            "starting a container created before the restarts: {e}\n{}",
            ctd.log()
        )
    });
    assert_eq!(
        cri.container_status(created).expect("status").state,
        k8s_cri::v1::ContainerState::ContainerRunning as i32
    );
    for (handler, pod, c, _) in &pods {
        let r = cri
            .exec_sync(c, &["echo", "after"], 30)
            .unwrap_or_else(|e| panic!("{handler}: exec after the restarts: {e}"));
        assert_eq!(r.stdout, "after\n", "{handler}");
        cri.stop_pod(pod).expect("StopPodSandbox");
        cri.remove_pod(pod).expect("RemovePodSandbox");
    }
    assert_clean();
}

/// Pods started at once, as kubelet starts them after a node restart or a
/// scale-up (`HUSK_CROWD` pods, 20 by default): every pod boots, runs its
/// container and answers an exec; all are then stopped and removed at once.
/// No call fails, and no shim, VM process, sandbox directory, mount or pod
/// cgroup is left.
#[test]
#[ignore = "end-to-end: root and a guest (make test)"]
fn twenty_pods_started_at_once_all_run_then_all_go_away() {
    e2e();
    let _vm = vm_lock();
    let (ctd, _cri, logs) = cri_env();
    let n: usize = std::env::var("HUSK_CROWD")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20);
    let socket = ctd.dir.path().join("containerd.sock");
    let parent = format!("/husk-e2e-crowd-{}", std::process::id());
    let start = |i: usize| -> Result<(String, String), String> {
        let cri = Cri::connect(&socket);
        let mut opts = PodOpts::new(&format!("crowd-{i}"), logs.path());
        opts.cgroup_parent = format!("{parent}/pod{i}");
        let pod = cri
            .run_pod(&opts)
            .map_err(|e| format!("pod {i}: RunPodSandbox: {e}"))?;
        let c = cri
            .run_container(
                &pod,
                &opts,
                container("c", IMAGE, &["sleep", "3600"], false),
            )
            .map_err(|e| format!("pod {i}: container: {e}"))?;
        let r = cri
            .exec_sync(&c, &["echo", &format!("crowd-{i}")], 120)
            .map_err(|e| format!("pod {i}: ExecSync: {e}"))?;
        if r.exit_code != 0 || r.stdout.trim() != format!("crowd-{i}") {
            return Err(format!("pod {i}: exec answered {r:?}"));
        }
        Ok((pod, c))
    };
    let t = Instant::now();
    let started: Vec<_> = std::thread::scope(|s| {
        let workers: Vec<_> = (0..n).map(|i| s.spawn(move || start(i))).collect();
        workers
            .into_iter()
            .map(|w| w.join().expect("start thread"))
            .collect()
    });
    let start_time = t.elapsed();
    let failures: Vec<&String> = started.iter().filter_map(|r| r.as_ref().err()).collect();
    // Each pod's own cgroup (kubelet's parent, then the pod id), in every
    // hierarchy this host mounts.
    let mounts: Vec<std::path::PathBuf> = cgroups_of(std::process::id())
        .into_iter()
        .map(|(mount, _)| mount)
        .collect();
    let cgroups: Vec<std::path::PathBuf> = started
        .iter()
        .enumerate()
        .filter_map(|(i, r)| Some((i, &r.as_ref().ok()?.0)))
        .flat_map(|(i, pod)| {
            let rel = format!("{}/pod{i}/{pod}", &parent[1..]);
            mounts.iter().map(move |m| m.join(&rel))
        })
        .filter(|p| p.exists())
        .collect();
    let (_, vmms) = shims_and_vmms();
    let running = vmms.len();
    // A starved guest must not have had its timer rerouted (the kernel's
    // timer check; see BASE_CMDLINE): it hangs some boots.
    let state_dir = husk_runtime::config::Config::load(None)
        .expect("husk config")
        .0
        .state_dir;
    let rerouted: Vec<String> = started
        .iter()
        .filter_map(|r| r.as_ref().ok())
        .filter(|(pod, _)| {
            std::fs::read_to_string(state_dir.join(CRI_NAMESPACE).join(pod).join("console.log"))
                .is_ok_and(|c| c.contains("timer not connected"))
        })
        .map(|(pod, _)| pod.clone())
        .collect();

    let t = Instant::now();
    let stopped: Vec<String> = std::thread::scope(|s| {
        let workers: Vec<_> = started
            .iter()
            .filter_map(|r| r.as_ref().ok())
            .map(|(pod, _)| {
                let socket = &socket;
                s.spawn(move || {
                    let cri = Cri::connect(socket);
                    cri.stop_pod(pod)
                        .and_then(|_| cri.remove_pod(pod))
                        .err()
                        .map(|e| format!("pod {pod}: stop/remove: {e}"))
                })
            })
            .collect();
        workers
            .into_iter()
            .filter_map(|w| w.join().expect("stop thread"))
            .collect()
    });
    let stop_time = t.elapsed();
    ctd.cri().remove_all_pods();
    eprintln!(
        "crowd: {n} pods started at once in {:.1} s ({running} VMs running), stopped and removed in {:.1} s; {} start and {} stop failures",
        start_time.as_secs_f64(),
        stop_time.as_secs_f64(),
        failures.len(),
        stopped.len()
    );
    assert!(
        failures.is_empty() && stopped.is_empty(),
        "failures: {failures:?} {stopped:?}\n--- containerd ---\n{}",
        ctd.log()
    );
    assert_eq!(running, n, "VMs running with {n} pods");
    assert!(
        rerouted.is_empty(),
        "the guest kernel of pods {rerouted:?} found its timer not connected and rerouted it"
    );
    assert!(
        cgroups.len() >= n,
        "{} pod cgroups found under {parent} for {n} pods",
        cgroups.len()
    );
    assert_clean();
    let left: Vec<_> = cgroups.iter().filter(|p| p.exists()).collect();
    assert!(left.is_empty(), "pod cgroups left: {left:?}");
    for m in &mounts {
        for i in 0..n {
            let _ = std::fs::remove_dir(m.join(format!("{}/pod{i}", &parent[1..])));
        }
        let _ = std::fs::remove_dir(m.join(&parent[1..]));
    }
}

/// Mount points in this (the host's) mount namespace.
fn host_mount_points() -> Vec<String> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").expect("mountinfo");
    let mut points: Vec<String> = info
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(str::to_owned)
        .collect();
    points.sort();
    points
}

/// The names in directory `d`, sorted.
fn dir_names(d: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(d)
        .unwrap_or_else(|e| panic!("reading {d:?}: {e}"))
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

#[test]
#[ignore = "end-to-end: root and a guest (make test)"]
fn symlinks_a_guest_plants_during_create_and_teardown_move_no_host_mount() {
    e2e();
    let _vm = vm_lock();
    let (ctd, cri, logs) = cri_env();
    // A host mount outside every sandbox, with a file: what the symlinks
    // point at.
    let victim = tempfile::tempdir().expect("victim dir");
    let v = victim.path().to_str().expect("utf-8 path").to_owned();
    host(
        "mount",
        &["-t", "tmpfs", "-o", "size=1m", "husk-e2e-victim", &v],
    );
    std::fs::write(victim.path().join("keep"), "keep\n").expect("victim file");
    let vol = tempfile::tempdir().expect("volume dir");
    let before = host_mount_points();
    let opts = PodOpts::new("pod-planter", logs.path());
    let pod = start_pod(&ctd, &cri, &opts);
    let volume = |c: &mut k8s_cri::v1::ContainerConfig| {
        c.mounts = vec![k8s_cri::v1::Mount {
            container_path: "/vol".into(),
            host_path: vol.path().display().to_string(),
            ..Default::default()
        }];
    };
    // Plants, without a pause, symlinks to the victim, to / and to the
    // parent directories, in its rootfs and in the volume, at the names
    // of the directories it replaces. `ln -sf` unlinks before it links, so
    // those names are missing for a moment in each round (and for good if
    // the round is killed there); `kept` is planted once, before the loop,
    // and stays.
    let plant = format!(
        "ln -s {v} /vol/kept; while :; do for d in / /vol; do \
         ln -sfn {v} $d/victim; ln -sfn / $d/root; ln -sfn ../../../.. $d/up; \
         rm -rf $d/mnt; ln -sfn {v} $d/mnt; done; done"
    );
    let mut planter = container("planter", IMAGE, &["sh", "-c", &plant], false);
    volume(&mut planter);
    let planter = cri
        .run_container(&pod, &opts, planter)
        .unwrap_or_else(|e| panic!("planter: {e}\n{}", ctd.log()));
    // A second container is created, and started, while it plants: its
    // rootfs and the same volume are bound beside the planted links.
    std::thread::sleep(Duration::from_secs(1));
    let mut second = container("second", IMAGE, &["sleep", "3600"], false);
    volume(&mut second);
    let second = cri
        .run_container(&pod, &opts, second)
        .unwrap_or_else(|e| panic!("second: {e}\n{}", ctd.log()));
    let seen = sh(
        &cri,
        &second,
        "until [ -L /vol/kept ]; do sleep 0.1; done; \
         readlink /vol/kept; ls /vol/kept/ 2>&1 | head -1",
    );
    assert!(seen.starts_with(&format!("{v}\n")), "{seen:?}");
    assert!(
        !seen.contains("keep"),
        "the guest sees the host's file: {seen:?}"
    );
    // Torn down while the links keep coming.
    let still = cri
        .exec_sync(&planter, &["true"], 30)
        .expect("exec in the planter");
    assert_eq!(still.exit_code, 0, "the planter stopped: {still:?}");
    teardown(&cri, &pod);
    assert_eq!(
        host_mount_points(),
        before,
        "a mount appeared or went outside the sandbox"
    );
    assert_eq!(
        std::fs::read_to_string(victim.path().join("keep")).expect("the victim's file"),
        "keep\n"
    );
    // The links are the guest's data in its volume, nothing more.
    let names = dir_names(vol.path());
    let link = std::fs::read_link(vol.path().join("kept"))
        .unwrap_or_else(|e| panic!("the planted link: {e}; the volume holds {names:?}"));
    assert_eq!(link, victim.path());
    if let Ok(link) = std::fs::read_link(vol.path().join("victim")) {
        assert_eq!(link, victim.path());
    }
    host("umount", &[&v]);
}
