//! The husk-vmm binary's command line: help, bad inputs named with exit
//! status 1, and `husk-vmm ctl` talking to a control socket.

use std::path::Path;
use std::process::{Command, Output};

use husk_vmm::control::{ControlSocket, RunState};

fn husk_vmm(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_husk-vmm"))
        .args(args)
        .output()
        .expect("run husk-vmm")
}

/// Fails unless husk-vmm's output mentions `what`.
fn assert_mentions(out: &Output, what: &str) {
    let all = text(out);
    assert!(all.contains(what), "{what:?} missing from:\n{all}");
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

#[test]
fn help_names_the_kernel_formats_and_the_ctl_command() {
    let out = husk_vmm(&["--help"]);
    assert!(out.status.success(), "{}", text(&out));
    for want in ["--kernel", "bzImage", "--api-socket", "ctl"] {
        assert_mentions(&out, want);
    }
}

#[test]
fn a_missing_kernel_and_a_taken_control_socket_are_named() {
    let out = husk_vmm(&["--kernel", "/nonexistent/vmlinux"]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert_mentions(&out, "/nonexistent/vmlinux");

    let dir = tempfile::tempdir().unwrap();
    let kernel = dir.path().join("vmlinux");
    std::fs::write(&kernel, b"not used").unwrap();
    let taken = dir.path().join("api.sock");
    std::fs::write(&taken, b"").unwrap();
    let out = husk_vmm(&[
        "--kernel",
        kernel.to_str().unwrap(),
        "--api-socket",
        taken.to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert_mentions(&out, "already exists");
    assert!(taken.exists(), "a file that was there must not be removed");
}

#[test]
fn ctl_sends_one_request_and_exits_by_the_reply() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("api.sock");
    let mut socket = ControlSocket::bind(&path).unwrap();
    socket.serve(RunState::new()).unwrap();
    let sock = path.to_str().unwrap();

    let out = husk_vmm(&["ctl", sock, "status"]);
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(String::from_utf8_lossy(&out.stdout), "ok running\n");

    let out = husk_vmm(&["ctl", sock, "reboot"]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert_mentions(&out, "error unknown request");

    let gone = Path::new("/nonexistent/vmm.sock");
    let out = husk_vmm(&["ctl", gone.to_str().unwrap(), "status"]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert_mentions(&out, "/nonexistent/vmm.sock");
}
