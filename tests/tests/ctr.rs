//! `ctr` against a real containerd with husk registered: the real shim
//! binary, a real guest, a locally built busybox image.

use std::io::Write;
use std::process::Stdio;
use std::time::{Duration, Instant};

use husk_tests::containerd::{assert_clean, Containerd};
use husk_tests::{e2e, vm_lock};

#[test]
#[ignore = "end-to-end: root and a guest (make test)"]
fn ctr_run_prints_the_guest_kernel_returns_exit_codes_and_passes_stdin() {
    e2e();
    let _vm = vm_lock();
    let ctd = Containerd::start();

    let out = ctd.run(&["--rm"], "uname1", &["uname", "-r"]);
    let release = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    assert!(
        out.status.success(),
        "ctr run failed: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        ctd.log()
    );
    let host = std::fs::read_to_string("/proc/sys/kernel/osrelease").expect("host release");
    assert!(
        release.ends_with("-husk"),
        "not the guest kernel: {release:?}"
    );
    assert_ne!(
        release,
        host.trim(),
        "the container must not see the host kernel"
    );
    assert_clean();

    let out = ctd.run(
        &["--rm"],
        "exit7",
        &["sh", "-c", "echo out; echo err >&2; exit 7"],
    );
    assert_eq!(
        out.status.code(),
        Some(7),
        "exit code: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout), "out\n");
    assert_eq!(String::from_utf8_lossy(&out.stderr), "err\n");
    assert_clean();

    let mut child = ctd
        .run_cmd(&["--rm"], "stdin1", &["sh", "-c", "read x; echo got: $x"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("ctr run");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(b"hello husk\n")
        .expect("write stdin");
    let out = child.wait_with_output().expect("ctr run");
    assert!(out.status.success());
    assert_eq!(String::from_utf8_lossy(&out.stdout), "got: hello husk\n");
    assert_clean();
}

#[test]
#[ignore = "end-to-end: root and a guest (make test)"]
fn ctr_task_kill_stops_a_detached_container() {
    e2e();
    let _vm = vm_lock();
    let ctd = Containerd::start();
    let out = ctd.run(&["-d"], "sleeper", &["sleep", "1000"]);
    assert!(
        out.status.success(),
        "ctr run -d: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        ctd.log()
    );
    let out = ctd.ctr(&["task", "ls"]);
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("RUNNING"),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    let out = ctd.ctr(&["task", "kill", "-s", "SIGKILL", "sleeper"]);
    assert!(
        out.status.success(),
        "kill: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let ls = String::from_utf8_lossy(&ctd.ctr(&["task", "ls"]).stdout).into_owned();
        if ls.contains("STOPPED") {
            break;
        }
        assert!(Instant::now() < deadline, "task did not stop: {ls}");
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(ctd.ctr(&["task", "rm", "sleeper"]).status.success());
    assert!(ctd.ctr(&["container", "rm", "sleeper"]).status.success());
    assert_clean();
}

#[test]
#[ignore = "end-to-end: root and a guest (make test)"]
fn a_shim_killed_with_sigkill_is_cleaned_up_by_containerd() {
    e2e();
    let _vm = vm_lock();
    let ctd = Containerd::start();
    let out = ctd.run(&["-d"], "doomed", &["sleep", "1000"]);
    assert!(
        out.status.success(),
        "ctr run -d: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let shims = husk_tests::processes_mentioning(std::path::Path::new(
        "containerd-shim-husk-v2 -namespace husk-e2e -id doomed ",
    ));
    assert_eq!(shims.len(), 1, "one shim for the container: {shims:?}");
    assert!(
        husk_tests::sandbox_dir(husk_tests::containerd::NAMESPACE, "doomed").exists(),
        "sandbox dir exists while running"
    );
    // SAFETY: kill(2) on the shim's pid with a valid signal.
    assert_eq!(unsafe { libc::kill(shims[0] as i32, libc::SIGKILL) }, 0);
    // containerd sees the shim go, runs `containerd-shim-husk-v2 delete`,
    // which removes the sandbox; the VM and daemons died with the shim.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let ls = String::from_utf8_lossy(&ctd.ctr(&["task", "ls"]).stdout).into_owned();
        if !ls.contains("RUNNING") {
            break;
        }
        assert!(Instant::now() < deadline, "task still running: {ls}");
        std::thread::sleep(Duration::from_millis(100));
    }
    let _ = ctd.ctr(&["task", "rm", "-f", "doomed"]);
    assert!(ctd.ctr(&["container", "rm", "doomed"]).status.success());
    assert_clean();
}
