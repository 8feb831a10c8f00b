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
    let shims = husk_tests::not_waiters(husk_tests::processes_mentioning(std::path::Path::new(
        "containerd-shim-husk-v2 -namespace husk-e2e -id doomed ",
    )));
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

/// `ctr task exec <id> echo <word>` in `namespace` prints the word.
fn exec_echo(ctd: &Containerd, namespace: &str, id: &str, exec_id: &str, word: &str) -> String {
    let out = ctd.ctr_in(
        namespace,
        &["task", "exec", "--exec-id", exec_id, id, "echo", word],
    );
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// The test image in containerd namespace `namespace` too.
fn import_in(ctd: &Containerd, namespace: &str) {
    let tar = ctd.dir.path().join("busybox.tar");
    let out = ctd.ctr_in(
        namespace,
        &["images", "import", tar.to_str().expect("utf-8")],
    );
    assert!(out.status.success(), "image import in {namespace}");
}

/// Pod `same` of `namespace` still has its state in `dir` and answers an exec.
fn serving(ctd: &Containerd, namespace: &str, dir: &std::path::Path, exec_id: &str, when: &str) {
    assert!(dir.join("shared").is_dir(), "{dir:?} was removed {when}");
    assert_eq!(
        exec_echo(ctd, namespace, "same", exec_id, "alive").trim(),
        "alive",
        "the pod of {namespace} must still serve exec {when}"
    );
}

#[test]
#[ignore = "end-to-end: root and a guest (make test)"]
fn the_same_id_in_two_containerd_namespaces_is_two_pods_that_never_touch() {
    use husk_tests::containerd::{run_args, NAMESPACE, RUNTIME};
    e2e();
    let _vm = vm_lock();
    let ctd = Containerd::start();
    let other = "husk-e2e-other";
    import_in(&ctd, other);
    let run = |ns: &str| {
        let out = ctd.ctr_in(ns, &run_args(&["-d"], RUNTIME, "same", &["sleep", "600"]));
        assert!(
            out.status.success(),
            "ctr -n {ns} run -d same: {}\n{}",
            String::from_utf8_lossy(&out.stderr),
            ctd.log()
        );
    };
    run(NAMESPACE);
    run(other);
    let (mine, theirs) = (
        husk_tests::sandbox_dir(NAMESPACE, "same"),
        husk_tests::sandbox_dir(other, "same"),
    );
    assert!(mine.is_dir() && theirs.is_dir(), "{mine:?} {theirs:?}");
    for (ns, word) in [(NAMESPACE, "first"), (other, "second")] {
        assert_eq!(exec_echo(&ctd, ns, "same", "e1", word).trim(), word);
    }

    // A delete of a task whose bundle does not hold the sandbox's owner
    // token (a create that found the directory taken, a stale bundle)
    // removes nothing: the shim's own `delete`, as containerd runs it.
    let foreign = ctd.dir.path().join("foreign-bundle");
    std::fs::create_dir_all(&foreign).expect("bundle");
    std::fs::copy(
        ctd.bundle(NAMESPACE, "same").join("config.json"),
        foreign.join("config.json"),
    )
    .expect("spec");
    let shim = husk_tests::containerd::profile_dir().join("containerd-shim-husk-v2");
    let out = std::process::Command::new(&shim)
        .args([
            "-namespace",
            NAMESPACE,
            "-id",
            "same",
            "-address",
            "/nonexistent",
        ])
        .arg("-bundle")
        .arg(&foreign)
        .arg("delete")
        .env("TTRPC_ADDRESS", "/nonexistent.ttrpc")
        .current_dir(&foreign)
        .output()
        .expect("run the shim's delete");
    assert!(out.status.success(), "shim delete: {out:?}");
    serving(&ctd, NAMESPACE, &mine, "e2", "after a foreign delete");

    // A create in a third namespace that fails (a member of a pod that is
    // not there), and containerd's cleanup after it, touch neither.
    let third = "husk-e2e-third";
    import_in(&ctd, third);
    let failed = ctd.ctr_in(
        third,
        &run_args(
            &[
                "-d",
                "--annotation",
                "io.kubernetes.cri.container-type=container",
                "--annotation",
                "io.kubernetes.cri.sandbox-id=same",
            ],
            RUNTIME,
            "same",
            &["true"],
        ),
    );
    assert!(!failed.status.success(), "a member of no pod must fail");
    let _ = ctd.ctr_in(third, &["container", "rm", "same"]);

    // Each removed in turn; the other keeps serving.
    let remove = |ns: &str| {
        let _ = ctd.ctr_in(ns, &["task", "kill", "-s", "SIGKILL", "same"]);
        let deadline = Instant::now() + Duration::from_secs(20);
        while !ctd.ctr_in(ns, &["task", "rm", "same"]).status.success() {
            assert!(Instant::now() < deadline, "task rm same in {ns}");
            std::thread::sleep(Duration::from_millis(100));
        }
        assert!(ctd
            .ctr_in(ns, &["container", "rm", "same"])
            .status
            .success());
    };
    assert_eq!(
        exec_echo(&ctd, other, "same", "e3", "alive").trim(),
        "alive"
    );
    remove(NAMESPACE);
    assert!(!mine.exists(), "{mine:?} outlived its pod");
    serving(
        &ctd,
        other,
        &theirs,
        "e4",
        "after the other namespace's pod was removed",
    );
    remove(other);
    assert!(!theirs.exists(), "{theirs:?} outlived its pod");
    drop(ctd);
    assert_clean();
}
