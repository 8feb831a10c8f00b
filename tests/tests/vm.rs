//! The sandbox VM end to end: real QEMU, virtiofsd, vhost-device-vsock and
//! guest; and each way a boot can fail, with its error and cleanup.

use std::time::{Duration, Instant};

use husk_runtime::host::probe::{self, Backend};
use husk_runtime::vm::sandbox::SandboxError;
use husk_runtime::Sandbox;
use husk_tests::{assert_nothing_left, e2e, initramfs_with_init, vm_lock, TestEnv};

#[test]
#[ignore = "end-to-end: root and a guest (make test)"]
fn boots_answers_health_and_leaves_nothing() {
    e2e();
    let _vm = vm_lock();
    let env = TestEnv::new();
    let sb = Sandbox::boot(&env.config, "ping").expect("boot");
    let pids = sb.pids();
    assert_eq!(pids.len(), 3, "VMM and two daemons: {pids:?}");
    let agent = sb.agent().expect("connected agent");
    agent.check().expect("health check");
    let info = sb.agent_info().expect("agent info");
    assert!(
        info.kernel_release.ends_with("-husk"),
        "guest kernel {}",
        info.kernel_release
    );
    let host_release = nix_release();
    assert_ne!(
        info.kernel_release, host_release,
        "the agent must run on the guest kernel"
    );
    let t = sb.timings();
    assert!(
        t.kernel_to_init > Duration::ZERO && t.total >= t.kernel_to_init,
        "{t:?}"
    );
    // The VMM said when it ran the guest, within its start before the
    // guest's clock; the guest's boot and the host's time add up.
    let ready = t.vmm_ready.expect("the VMM said when it ran the guest");
    assert!(ready > Duration::ZERO && ready <= t.vmm_start, "{t:?}");
    assert!(t.guest_boot() >= t.kernel_to_init, "{t:?}");
    assert_eq!(t.guest_boot() + t.host_overhead(), t.total, "{t:?}");
    // The share is mounted from this host directory.
    assert!(sb.dir().join("shared").is_dir());
    let report = sb.shutdown().expect("shutdown");
    assert!(!report.forced, "the VM should end by itself after Shutdown");
    assert!(
        report.vm_exit.is_some_and(|s| s.success()),
        "QEMU exit: {:?}",
        report.vm_exit
    );
    assert_nothing_left(&env.config.state_dir, "ping", &pids);
}

#[test]
#[ignore = "end-to-end: root and a guest (make test)"]
fn dropping_a_sandbox_kills_everything() {
    e2e();
    let _vm = vm_lock();
    let env = TestEnv::new();
    let sb = Sandbox::boot(&env.config, "dropped").expect("boot");
    let pids = sb.pids();
    drop(sb);
    assert_nothing_left(&env.config.state_dir, "dropped", &pids);
}

/// What the host does to a guest that will not end a SIGKILLed pod: the
/// VM and daemons die at once, every call on the agent fails instead of
/// waiting on the guest, and the shutdown after it leaves nothing.
#[test]
#[ignore = "end-to-end: root and a guest (make test)"]
fn a_killed_sandbox_fails_its_agent_calls_at_once_and_shuts_down_clean() {
    e2e();
    let _vm = vm_lock();
    let env = TestEnv::new();
    let sb = Sandbox::boot(&env.config, "killed").expect("boot");
    let pids = sb.pids();
    let agent = sb.agent().expect("connected agent").clone();
    agent.check().expect("health check before");
    let start = Instant::now();
    sb.kill();
    let e = agent.check().expect_err("a health check on a killed VM");
    assert!(
        start.elapsed() < Duration::from_secs(2),
        "{:?}: {e}",
        start.elapsed()
    );
    // Dead within moments: zombies until the shutdown reaps them.
    let dead = |pid: &u32| {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        matches!(
            stat.rsplit(") ").next().and_then(|r| r.chars().next()),
            None | Some('Z' | 'X')
        )
    };
    while !pids.iter().all(dead) {
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "still alive: {pids:?}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    let report = sb.shutdown().expect("shutdown after kill");
    assert!(
        report.vm_exit.is_none_or(|s| !s.success()),
        "a killed VMM's exit: {:?}",
        report.vm_exit
    );
    assert_nothing_left(&env.config.state_dir, "killed", &pids);
}

#[test]
#[ignore = "end-to-end: root and a guest (make test)"]
fn missing_kernel_is_named_and_nothing_starts() {
    e2e();
    let mut env = TestEnv::new();
    env.config.guest.kernel = Some(env.dir.path().join("no-such-vmlinux"));
    let t = Instant::now();
    let err = Sandbox::boot(&env.config, "nokernel")
        .err()
        .expect("must fail");
    assert!(t.elapsed() < Duration::from_secs(2));
    let msg = err.to_string();
    assert!(
        msg.contains("no-such-vmlinux") && msg.contains("make guest-image"),
        "{msg}"
    );
    assert_nothing_left(&env.config.state_dir, "nokernel", &[]);
}

#[test]
#[ignore = "end-to-end: root and a guest (make test)"]
fn corrupt_kernel_fails_fast_with_the_vmms_reason() {
    e2e();
    let _vm = vm_lock();
    let mut env = TestEnv::new();
    let junk: Vec<u8> = (0..1_000_000u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    env.config.guest.kernel = Some(env.file("junk-vmlinux", &junk));
    let (backend, _) = probe::choose_backend(&env.config, &probe::detect_kvm()).expect("a backend");
    let t = Instant::now();
    let err = Sandbox::boot(&env.config, "badkernel")
        .err()
        .expect("must fail");
    assert!(
        t.elapsed() < Duration::from_secs(10),
        "took {:?}",
        t.elapsed()
    );
    let SandboxError::VmExited { vmm, .. } = &err else {
        panic!("not the VMM's exit: {err}");
    };
    // The VMM's own words about this file, not any line with "kernel" in
    // the console or the VMM's start-up banner. QEMU reads the junk's boot
    // protocol version (bytes 0x206-0x207) and does not name the file.
    let (reason, names_file) = match backend {
        Backend::HuskVmm => ("is neither a loadable ELF vmlinux nor a bzImage", true),
        Backend::Qemu { .. } => ("qemu: linux kernel too old to load a ram disk", false),
    };
    assert!(
        vmm.contains(reason) && (!names_file || vmm.contains("junk-vmlinux")),
        "{backend}'s reason ({reason:?}) for junk-vmlinux missing from its output: {vmm}"
    );
    assert_nothing_left(&env.config.state_dir, "badkernel", &[]);
}

#[test]
#[ignore = "end-to-end: root and a guest (make test)"]
fn corrupt_initramfs_ends_the_vm_with_the_guest_console() {
    e2e();
    let _vm = vm_lock();
    let mut env = TestEnv::new();
    env.config.guest.initramfs = Some(env.file("junk.cpio", &vec![0x5a; 64 * 1024]));
    env.config.agent.boot_timeout_ms = 60_000;
    let t = Instant::now();
    let err = Sandbox::boot(&env.config, "badinitrd")
        .err()
        .expect("must fail");
    assert!(
        t.elapsed() < Duration::from_secs(30),
        "took {:?}",
        t.elapsed()
    );
    // The guest panics (no init), panic=-1 reboots, QEMU exits: the error
    // comes from the VM's exit, well before the agent deadline.
    let SandboxError::VmExited { console, .. } = &err else {
        panic!("expected VmExited: {err}")
    };
    assert!(
        console.contains("Kernel panic"),
        "console tail lacks the panic: {console}"
    );
    assert_nothing_left(&env.config.state_dir, "badinitrd", &[]);
}

#[test]
#[ignore = "end-to-end: root and a guest (make test)"]
fn missing_daemon_binary_is_named() {
    e2e();
    let mut env = TestEnv::new();
    env.config.vsock.path = "/nonexistent/vhost-device-vsock".into();
    let t = Instant::now();
    let err = Sandbox::boot(&env.config, "nodaemon")
        .err()
        .expect("must fail");
    assert!(t.elapsed() < Duration::from_secs(5));
    let msg = format!(
        "{err}: {}",
        std::error::Error::source(&err)
            .map(|s| s.to_string())
            .unwrap_or_default()
    );
    assert!(msg.contains("/nonexistent/vhost-device-vsock"), "{msg}");
    // virtiofsd had already started; it must be gone too.
    assert_nothing_left(&env.config.state_dir, "nodaemon", &[]);
}

#[test]
#[ignore = "end-to-end: root and a guest (make test)"]
fn agent_that_never_answers_times_out_and_leaves_nothing() {
    e2e();
    let _vm = vm_lock();
    let mut env = TestEnv::new();
    // A guest whose /init lives but never listens on vsock.
    let initrd = initramfs_with_init(
        &env,
        "silent",
        "#include <unistd.h>\nint main(void) { for (;;) pause(); }\n",
    );
    env.config.guest.initramfs = Some(initrd);
    env.config.agent.boot_timeout_ms = 6_000;
    let t = Instant::now();
    let err = Sandbox::boot(&env.config, "silent")
        .err()
        .expect("must fail");
    let took = t.elapsed();
    assert!(
        took >= Duration::from_secs(6) && took < Duration::from_secs(12),
        "took {took:?}"
    );
    let msg = err.to_string();
    assert!(
        msg.contains("did not answer") && msg.contains("1024"),
        "{msg}"
    );
    assert_nothing_left(&env.config.state_dir, "silent", &[]);
}

#[test]
#[ignore = "end-to-end: root and a guest (make test)"]
fn second_sandbox_with_the_same_id_is_refused() {
    e2e();
    let _vm = vm_lock();
    let env = TestEnv::new();
    let sb = Sandbox::boot(&env.config, "twin").expect("boot");
    let err = Sandbox::boot(&env.config, "twin")
        .err()
        .expect("duplicate refused");
    assert!(matches!(err, SandboxError::Exists { .. }), "{err}");
    // The refusal must not have touched the running sandbox.
    sb.agent().expect("agent").check().expect("still healthy");
    let pids = sb.pids();
    sb.shutdown().expect("shutdown");
    assert_nothing_left(&env.config.state_dir, "twin", &pids);
}

fn nix_release() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .unwrap_or_default()
        .trim()
        .to_owned()
}
