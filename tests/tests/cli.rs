//! The `husk` CLI as an operator runs it: the real binary, real guests.

use std::io::{BufRead, BufReader, Read};
use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use nix::unistd::Pid;

use husk_tests::{assert_nothing_left, e2e, guest_dir, processes_mentioning, vm_lock, TestEnv};

/// The `husk` binary of the same build profile as this test.
fn husk() -> Command {
    husk_tests::husk_command()
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn config_file(env: &TestEnv) -> PathBuf {
    let toml = format!(
        "state_dir = \"{}\"\n[guest]\nkernel = \"{}\"\ninitramfs = \"{}\"\n",
        env.config.state_dir.display(),
        guest_dir().join("vmlinux").display(),
        guest_dir().join("initramfs.cpio").display()
    );
    env.file("config.toml", toml.as_bytes())
}

#[test]
#[ignore = "end-to-end: root and a guest (make test)"]
fn check_names_the_kvm_kind_and_the_chosen_backend() {
    e2e();
    let env = TestEnv::new();
    let out = husk()
        .arg("check")
        .env("HUSK_CONFIG", config_file(&env))
        .output()
        .expect("run husk check");
    let s = text(&out);
    assert!(out.status.success(), "husk check failed:\n{s}");
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let flags = cpuinfo
        .lines()
        .find(|l| l.starts_with("flags"))
        .unwrap_or_default();
    if std::path::Path::new("/sys/module/kvm_pvm").exists() {
        assert!(s.contains("PVM"), "PVM host not named:\n{s}");
        assert!(
            s.contains("hypervisor: qemu (TCG)"),
            "PVM must fall back to TCG:\n{s}"
        );
        assert!(s.contains("qemu.allow_tcg = false"), "no TCG warning:\n{s}");
        // A node that forbids emulation: check fails and says which key.
        let strict = env.file(
            "strict.toml",
            format!(
                "{}[qemu]\nallow_tcg = false\n",
                std::fs::read_to_string(config_file(&env)).expect("config")
            )
            .as_bytes(),
        );
        let out = husk()
            .arg("check")
            .env("HUSK_CONFIG", &strict)
            .output()
            .expect("run husk check");
        let t = text(&out);
        assert!(
            !out.status.success(),
            "check passed with TCG forbidden:\n{t}"
        );
        assert!(t.contains("qemu.allow_tcg = false forbids"), "{t}");
    } else if flags.split_whitespace().any(|f| f == "vmx" || f == "svm") {
        // auto prefers husk's own VMM where KVM runs the standard guest.
        assert!(s.contains("hypervisor: husk-vmm"), "{s}");
    }
    assert!(
        s.contains("because: "),
        "the choice must be explained:\n{s}"
    );
    for item in [
        "qemu",
        "virtiofsd",
        "vhost-device-vsock",
        "guest kernel",
        "guest initramfs",
        "containerd",
    ] {
        assert!(
            s.lines().any(|l| l.starts_with(item)),
            "{item} not reported:\n{s}"
        );
    }
}

#[test]
#[ignore = "end-to-end: root and a guest (make test)"]
fn vm_ping_prints_agent_ready_and_leaves_nothing() {
    e2e();
    let _vm = vm_lock();
    let env = TestEnv::new();
    let out = husk()
        .args(["vm-ping", "--id", "cliping"])
        .env("HUSK_CONFIG", config_file(&env))
        .output()
        .expect("run husk vm-ping");
    let s = text(&out);
    assert!(out.status.success(), "vm-ping failed:\n{s}");
    assert!(s.contains("agent ready in"), "{s}");
    for phase in [
        "daemons up",
        "vmm spawned",
        "guest kernel to /init",
        "agent listening",
        "first rpc",
    ] {
        assert!(s.contains(phase), "timing breakdown lacks {phase:?}:\n{s}");
    }
    assert!(s.contains("-husk"), "guest kernel release missing:\n{s}");
    assert_nothing_left(&env.config.state_dir, "cliping", &[]);
    assert!(processes_mentioning(&env.config.state_dir).is_empty());
}

#[test]
fn env_prints_every_key_and_bad_config_is_named() {
    let env = TestEnv::new();
    let out = husk()
        .arg("env")
        .env("HUSK_CONFIG", config_file(&env))
        .output()
        .expect("run husk env");
    let s = text(&out);
    assert!(out.status.success(), "{s}");
    for key in [
        "hypervisor",
        "state_dir",
        "[guest]",
        "memory_mib",
        "[qemu]",
        "[virtiofsd]",
        "[agent]",
        "boot_timeout_ms",
    ] {
        assert!(s.contains(key), "husk env lacks {key}:\n{s}");
    }
    let bad = env.file("bad.toml", b"[guest]\nvcpus = \"two\"\n");
    let out = husk()
        .arg("env")
        .env("HUSK_CONFIG", &bad)
        .output()
        .expect("run husk env");
    let s = text(&out);
    assert!(!out.status.success());
    assert!(
        s.contains("bad.toml") && s.contains("vcpus"),
        "error must name file and key:\n{s}"
    );
}

#[test]
fn vm_ping_with_a_missing_kernel_says_what_to_do() {
    let env = TestEnv::new();
    let cfg = env.file(
        "nokernel.toml",
        b"state_dir = \"/tmp/husk-cli-nokernel\"\n[guest]\nkernel = \"/nonexistent/vmlinux\"\n",
    );
    let out = husk()
        .args(["vm-ping", "--id", "nok"])
        .env("HUSK_CONFIG", &cfg)
        .output()
        .expect("run husk");
    let s = text(&out);
    assert!(!out.status.success());
    assert!(
        s.contains("/nonexistent/vmlinux") && s.contains("make guest-image"),
        "{s}"
    );
    assert_nothing_left(std::path::Path::new("/tmp/husk-cli-nokernel"), "nok", &[]);
}

/// `husk run --id ID` of `sh -c SCRIPT` in a busybox rootfs made in `env`.
fn husk_run_sh_command(env: &TestEnv, id: &str, script: &str) -> Command {
    let rootfs = env.dir.path().join("rootfs");
    husk_tests::busybox_rootfs(&rootfs);
    let mut c = husk();
    c.args(["run", "--id", id, "--rootfs"])
        .arg(&rootfs)
        .args(["--", "sh", "-c", script])
        .env("HUSK_CONFIG", config_file(env));
    c
}

fn husk_run_sh(env: &TestEnv, id: &str, script: &str) -> Output {
    husk_run_sh_command(env, id, script)
        .output()
        .expect("run husk run")
}

#[test]
#[ignore = "end-to-end: root and a guest (make test)"]
fn husk_run_runs_a_command_in_a_microvm_and_returns_its_status() {
    e2e();
    let _vm = vm_lock();
    let env = TestEnv::new();
    let out = husk_run_sh(&env, "run1", "uname -r; echo to-stderr >&2; exit 5");
    assert_eq!(out.status.code(), Some(5), "{}", text(&out));
    let release = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    assert!(release.ends_with("-husk"), "guest kernel: {release:?}");
    assert_eq!(String::from_utf8_lossy(&out.stderr), "to-stderr\n");
    assert_nothing_left(&env.config.state_dir, "run1", &[]);
    assert!(processes_mentioning(&env.config.state_dir).is_empty());

    // Not a rootfs: refused by name before anything boots.
    let out = husk()
        .args(["run", "--rootfs", "/nonexistent/rootfs", "--", "true"])
        .env("HUSK_CONFIG", config_file(&env))
        .output()
        .expect("run husk run");
    assert!(!out.status.success());
    assert!(text(&out).contains("/nonexistent/rootfs"), "{}", text(&out));
}

/// The guest's CPU line of /proc/stat: (idle + iowait, all) in ticks.
fn cpu_ticks(line: &str) -> (u64, u64) {
    let v: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .map(|x| x.parse().expect("a /proc/stat number"))
        .collect();
    assert!(v.len() >= 8, "not a /proc/stat cpu line: {line:?}");
    (v[3] + v[4], v[..8].iter().sum())
}

/// A pod whose container only sleeps must leave its vCPU idle: every idle
/// pod's busy guest is a host core spent (the agent's OOM watch once spun
/// on a poll that never blocked, 0% idle for the container's whole life).
#[test]
#[ignore = "end-to-end: root and a guest (make test)"]
fn an_idle_container_leaves_the_guest_cpu_idle() {
    e2e();
    let _vm = vm_lock();
    let env = TestEnv::new();
    let out = husk_run_sh(
        &env,
        "idle1",
        "sleep 2; head -1 /proc/stat; sleep 4; head -1 /proc/stat",
    );
    assert!(out.status.success(), "{}", text(&out));
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let lines: Vec<&str> = stdout.lines().filter(|l| l.starts_with("cpu ")).collect();
    assert_eq!(lines.len(), 2, "{}", text(&out));
    let ((idle0, all0), (idle1, all1)) = (cpu_ticks(lines[0]), cpu_ticks(lines[1]));
    let (idle, all) = (idle1 - idle0, all1 - all0);
    assert!(all > 0, "no ticks counted: {stdout}");
    assert!(
        idle * 10 >= all * 8,
        "guest CPU idle {idle} of {all} ticks over 4 s of sleeping (want 80% at least):\n{stdout}"
    );
    assert_nothing_left(&env.config.state_dir, "idle1", &[]);
}

/// `husk run`, spawned with its output piped.
fn spawn_piped(mut husk_run: Command) -> Child {
    husk_run
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn husk run")
}

/// `husk run` of `script`, its output piped; returns once the container
/// printed `ready`.
fn husk_run_until_ready(env: &TestEnv, id: &str, script: &str) -> (Child, impl BufRead) {
    let mut child = spawn_piped(husk_run_sh_command(env, id, script));
    let mut out = BufReader::new(child.stdout.take().expect("stdout"));
    let mut line = String::new();
    out.read_line(&mut line).expect("read husk run's stdout");
    assert_eq!(line, "ready\n", "the container did not start");
    (child, out)
}

fn signal(child: &Child, sig: Signal) {
    let pid = Pid::from_raw(child.id() as i32);
    nix::sys::signal::kill(pid, sig).expect("signal husk run");
}

/// `husk run` ended, with its status and the rest of its output.
fn ended(mut child: Child, mut out: impl BufRead) -> (std::process::ExitStatus, String) {
    let mut rest = String::new();
    out.read_to_string(&mut rest)
        .expect("read husk run's stdout");
    let mut err = String::new();
    child
        .stderr
        .take()
        .expect("stderr")
        .read_to_string(&mut err)
        .expect("read husk run's stderr");
    let status = child.wait().expect("wait for husk run");
    (status, format!("{rest}{err}"))
}

/// Ctrl-C or a service manager's SIGTERM to `husk run` must reach the
/// container, and `husk run` must still delete the pod on its way out
/// (it once died of the signal and left the pod's mounts and directory).
#[test]
#[ignore = "end-to-end: root and a guest (make test)"]
fn husk_run_passes_signals_on_and_deletes_the_pod_however_it_ends() {
    e2e();
    let _vm = vm_lock();
    let env = TestEnv::new();

    // A handler in the container: it gets SIGTERM, its status is husk run's.
    let (child, out) = husk_run_until_ready(
        &env,
        "sig1",
        "trap 'echo got-term; exit 7' TERM; echo ready; while :; do sleep 0.2; done",
    );
    signal(&child, Signal::SIGTERM);
    let (status, text) = ended(child, out);
    assert_eq!(status.code(), Some(7), "{text}");
    assert!(text.contains("got-term"), "{text}");
    assert_nothing_left(&env.config.state_dir, "sig1", &[]);

    // A container that ignores SIGINT (as a PID 1 without a handler for
    // it does): the second signal kills it.
    let (mut child, out) =
        husk_run_until_ready(&env, "sig2", "trap '' INT; echo ready; exec sleep 3600");
    signal(&child, Signal::SIGINT);
    std::thread::sleep(Duration::from_secs(1));
    assert!(
        child.try_wait().expect("try_wait").is_none(),
        "the first SIGINT ended the container"
    );
    signal(&child, Signal::SIGINT);
    let (status, text) = ended(child, out);
    assert_eq!(status.code(), Some(128 + 9), "{text}");
    assert!(text.contains("second signal"), "{text}");
    assert_nothing_left(&env.config.state_dir, "sig2", &[]);

    // Before the start (the sandbox's directory is made while it boots):
    // the container never runs.
    let ran = env.dir.path().join("rootfs/ran");
    let mut child = spawn_piped(husk_run_sh_command(&env, "sig3", "touch /ran"));
    let deadline = Instant::now() + Duration::from_secs(30);
    while !env
        .config
        .state_dir
        .join(husk_runtime::host::paths::DIRECT_NAMESPACE)
        .join("sig3")
        .exists()
    {
        assert!(
            child.try_wait().expect("try_wait").is_none(),
            "husk run ended before its sandbox had a directory"
        );
        assert!(Instant::now() < deadline, "no sandbox directory in 30 s");
        std::thread::sleep(Duration::from_millis(5));
    }
    signal(&child, Signal::SIGTERM);
    let out = BufReader::new(child.stdout.take().expect("stdout"));
    let (status, text) = ended(child, out);
    assert_eq!(status.code(), Some(128 + 15), "{text}");
    assert!(
        !ran.exists(),
        "the container ran after husk run got SIGTERM"
    );
    assert_nothing_left(&env.config.state_dir, "sig3", &[]);
}

#[test]
fn husk_run_refuses_a_bad_container_id_naming_it_before_anything_is_made() {
    let env = TestEnv::new();
    let long = "a".repeat(husk_protocol::MAX_ID_LEN + 1);
    for bad in [
        "../escape",
        "a/b",
        "_x",
        ".hidden",
        "tab\tid",
        long.as_str(),
    ] {
        let out = husk_run_sh(&env, bad, "true");
        let s = text(&out);
        assert!(!out.status.success(), "{bad:?} was accepted: {s}");
        assert!(
            s.contains(&format!("container id {bad:?} is invalid")),
            "the error must name the id {bad:?}:\n{s}"
        );
    }
    // Nothing of any of them: no sandbox directory at all.
    let sandboxes: Vec<_> = std::fs::read_dir(&env.config.state_dir)
        .map(|d| d.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    assert!(sandboxes.is_empty(), "left behind: {sandboxes:?}");
}

/// `husk` with `env`'s configuration.
fn husk_in(env: &TestEnv, args: &[&str]) -> Output {
    husk()
        .args(args)
        .env("HUSK_CONFIG", config_file(env))
        .output()
        .expect("run husk")
}

/// `husk ps`'s line for pod `id` of `husk run` (namespace `_husk`).
fn ps_line(env: &TestEnv, id: &str) -> Option<String> {
    let out = husk_in(env, &["ps"]);
    assert!(out.status.success(), "{}", text(&out));
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .find(|l| l.split_whitespace().take(2).eq(["_husk", id]))
        .map(str::to_owned)
}

/// `husk run` killed with SIGKILL cannot clean up after itself: `husk ps`
/// lists what it left and `husk delete` removes it (processes, mounts,
/// directory), as `runc delete` does for a container whose runtime died;
/// a pod whose owner is alive is refused without --force.
#[test]
#[ignore = "end-to-end: root and a guest (make test)"]
fn a_husk_run_killed_with_sigkill_is_listed_by_ps_and_removed_by_delete() {
    e2e();
    let _vm = vm_lock();
    let env = TestEnv::new();
    let (child, out) = husk_run_until_ready(&env, "crash1", "echo ready; exec sleep 3600");
    let line = ps_line(&env, "crash1").expect("husk ps lists the running pod");
    assert!(line.contains(" running "), "{line}");
    let refused = husk_in(&env, &["delete", "crash1"]);
    assert!(!refused.status.success(), "{}", text(&refused));
    assert!(
        text(&refused).contains("is running") && text(&refused).contains("--force"),
        "{}",
        text(&refused)
    );

    signal(&child, Signal::SIGKILL);
    let (status, _) = ended(child, out);
    assert_eq!(
        std::os::unix::process::ExitStatusExt::signal(&status),
        Some(9)
    );
    let dir = env
        .config
        .state_dir
        .join(husk_runtime::host::paths::DIRECT_NAMESPACE)
        .join("crash1");
    assert!(dir.exists(), "husk run cleaned up after SIGKILL?");
    // Its VMM and daemons die with it (their parent-death signal): the
    // pod is listed dead once they are gone.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let line = ps_line(&env, "crash1").expect("husk ps lists the dead pod");
        if line.contains(" dead ") {
            break;
        }
        assert!(Instant::now() < deadline, "still running: {line}");
        std::thread::sleep(Duration::from_millis(100));
    }
    let deleted = husk_in(&env, &["delete", "crash1"]);
    assert!(deleted.status.success(), "{}", text(&deleted));
    assert!(
        text(&deleted).contains("deleted pod crash1"),
        "{}",
        text(&deleted)
    );
    assert_nothing_left(&env.config.state_dir, "crash1", &[]);
    assert_eq!(ps_line(&env, "crash1"), None);
    let again = husk_in(&env, &["delete", "crash1"]);
    assert!(
        !again.status.success() && text(&again).contains("husk ps"),
        "{}",
        text(&again)
    );
}

/// `containerd --config FILE config dump`: the config as containerd itself
/// reads it.
fn containerd_dump(file: &std::path::Path) -> String {
    let out = Command::new("containerd")
        .arg("--config")
        .arg(file)
        .args(["config", "dump"])
        .output()
        .expect("run containerd config dump");
    assert!(
        out.status.success(),
        "containerd config dump: {}",
        text(&out)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `husk install --containerd-config` on the config Debian's containerd
/// writes by default (`containerd config default`), read back by
/// containerd itself: the handler is a runtime of type
/// io.containerd.husk.v2 with the given husk config, runc's entry is as it
/// was, a second run changes no byte, and `--remove` gives back the
/// original file byte for byte.
#[test]
#[ignore = "end-to-end: containerd (make test)"]
fn husk_install_adds_a_runtime_containerd_reads_and_removes_it_leaving_the_file_as_it_was() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("config.toml");
    let default = Command::new("containerd")
        .args(["config", "default"])
        .output()
        .expect("containerd config default");
    assert!(default.status.success(), "{}", text(&default));
    std::fs::write(&file, &default.stdout).expect("write the default config");
    let husk_config = dir.path().join("husk-small.toml");
    std::fs::write(&husk_config, "[guest]\nmemory_mib = 256\n").expect("husk config");
    let before = containerd_dump(&file);
    assert!(!before.contains("io.containerd.husk.v2"), "{before}");

    let install = |args: &[&str]| {
        let out = husk()
            .args(["install", "--containerd-config"])
            .arg(&file)
            .args(args)
            .output()
            .expect("husk install");
        assert!(
            out.status.success(),
            "husk install {args:?}: {}",
            text(&out)
        );
        text(&out)
    };
    let said = install(&[
        "--handler",
        "husk-small",
        "--husk-config",
        husk_config.to_str().expect("utf-8"),
    ]);
    assert!(
        said.contains("added") && said.contains("restart containerd"),
        "{said}"
    );
    let dump = containerd_dump(&file);
    let section = |handler: &str| {
        let head = format!("[plugins.\"io.containerd.grpc.v1.cri\".containerd.runtimes.{handler}]");
        let start = dump
            .find(&head)
            .unwrap_or_else(|| panic!("no {head} in:\n{dump}"));
        let rest = &dump[start + head.len()..];
        let end = rest
            .find("\n        [plugins.\"io.containerd.grpc.v1.cri\".containerd.runtimes.")
            .unwrap_or(rest.len());
        rest[..end].to_owned()
    };
    let husk_small = section("husk-small");
    assert!(
        husk_small.contains("runtime_type = \"io.containerd.husk.v2\""),
        "{husk_small}"
    );
    assert!(
        husk_small.contains(&format!("ConfigPath = \"{}\"", husk_config.display())),
        "{husk_small}"
    );
    assert!(
        section("runc").contains("runtime_type = \"io.containerd.runc.v2\""),
        "runc's entry changed"
    );
    let installed = std::fs::read(&file).expect("read");
    let said = install(&[
        "--handler",
        "husk-small",
        "--husk-config",
        husk_config.to_str().expect("utf-8"),
    ]);
    assert!(said.contains("already"), "{said}");
    assert_eq!(
        std::fs::read(&file).expect("read"),
        installed,
        "a second run changed the file"
    );

    let said = install(&["--handler", "husk-small", "--remove"]);
    assert!(said.contains("removed"), "{said}");
    assert_eq!(
        std::fs::read(&file).expect("read"),
        default.stdout,
        "--remove did not give back the original file"
    );
    assert_eq!(containerd_dump(&file), before);

    // Bad input is refused by name, the file untouched.
    let out = husk()
        .args(["install", "--containerd-config"])
        .arg(&file)
        .args(["--handler", "Husk_VM"])
        .output()
        .expect("husk install");
    assert!(
        !out.status.success() && text(&out).contains("\"Husk_VM\" is not a DNS label"),
        "{}",
        text(&out)
    );
    assert_eq!(std::fs::read(&file).expect("read"), default.stdout);
}
