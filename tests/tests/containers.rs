//! Containers in a real guest through the agent: rootfs on virtio-fs, stdio
//! as vsock streams, exit statuses as runc reports them.

use std::io::{Read, Write};
use std::time::Duration;

use husk_protocol::containers::Stdio;
use husk_protocol::{StreamHeader, StreamKind};
use husk_runtime::agent::open_stream;
use husk_runtime::Sandbox;
use husk_tests::{assert_nothing_left, busybox_rootfs, e2e, oci_spec, vm_lock, TestEnv};

const T: Duration = Duration::from_secs(10);

fn header(cid: &str, kind: StreamKind) -> StreamHeader {
    StreamHeader {
        container_id: cid.into(),
        exec_id: None,
        kind,
    }
}

/// Streams of one container process, as the host holds them.
struct Running {
    cid: String,
    stdin: Option<std::os::unix::net::UnixStream>,
    out: std::thread::JoinHandle<Vec<u8>>,
    err: std::thread::JoinHandle<Vec<u8>>,
}

fn reader(mut s: std::os::unix::net::UnixStream) -> std::thread::JoinHandle<Vec<u8>> {
    std::thread::spawn(move || {
        let mut v = Vec::new();
        s.read_to_end(&mut v).expect("read stream");
        v
    })
}

/// Creates and starts `args` in container `cid` of `sb`, with a busybox
/// rootfs in the share and stdio streams attached.
fn start(sb: &Sandbox, cid: &str, args: &[&str], stdin: bool) -> Running {
    busybox_rootfs(&sb.dir().join("shared").join(cid).join("rootfs"));
    let sock = sb.dir().join("agent.sock");
    let input = stdin
        .then(|| open_stream(&sock, &header(cid, StreamKind::Stdin), T).expect("stdin stream"));
    let stdout = open_stream(&sock, &header(cid, StreamKind::Stdout), T).expect("stdout stream");
    let stderr = open_stream(&sock, &header(cid, StreamKind::Stderr), T).expect("stderr stream");
    let agent = sb.agent().expect("agent");
    let mut stdio = Stdio::new();
    stdio.stdin = stdin;
    stdio.stdout = true;
    stdio.stderr = true;
    if let Err(e) = agent.create_container(cid, oci_spec(cid, args), stdio) {
        let console = std::fs::read_to_string(sb.dir().join("console.log")).unwrap_or_default();
        panic!("create {cid}: {e}\n--- console ---\n{console}");
    }
    let (out, err) = (reader(stdout), reader(stderr));
    let pid = agent.start_container(cid).expect("start");
    assert!(pid > 1, "guest pid {pid}");
    Running {
        cid: cid.to_owned(),
        stdin: input,
        out,
        err,
    }
}

/// Waits for the process and removes the container: (status, stdout, stderr).
fn finish(sb: &Sandbox, r: Running) -> (u32, Vec<u8>, Vec<u8>) {
    let agent = sb.agent().expect("agent");
    let status = agent.wait_process(&r.cid, None).expect("wait");
    let (out, err) = (r.out.join().expect("stdout"), r.err.join().expect("stderr"));
    agent.remove_container(&r.cid).expect("remove");
    (status, out, err)
}

fn run(sb: &Sandbox, cid: &str, args: &[&str], input: Option<&[u8]>) -> (u32, Vec<u8>, Vec<u8>) {
    let mut r = start(sb, cid, args, input.is_some());
    if let (Some(s), Some(data)) = (r.stdin.as_mut(), input) {
        s.write_all(data).expect("write stdin");
        s.shutdown(std::net::Shutdown::Write).expect("close stdin");
    }
    finish(sb, r)
}

#[test]
fn container_runs_on_the_guest_kernel_with_stdio_and_exit_codes() {
    if !e2e("container_runs_on_the_guest_kernel_with_stdio_and_exit_codes") {
        return;
    }
    let _vm = vm_lock();
    let env = TestEnv::new();
    let sb = Sandbox::boot(&env.config, "ctr").expect("boot");
    let release = sb.agent_info().expect("info").kernel_release.clone();

    let (status, out, _) = run(&sb, "uname", &["uname", "-r"], None);
    assert_eq!(status, 0);
    assert_eq!(
        String::from_utf8_lossy(&out).trim(),
        release,
        "container must see the guest kernel"
    );

    let (status, out, err) = run(
        &sb,
        "codes",
        &["sh", "-c", "echo out; echo err >&2; exit 3"],
        None,
    );
    assert_eq!(
        (status, out.as_slice(), err.as_slice()),
        (3, &b"out\n"[..], &b"err\n"[..])
    );

    let (status, out, _) = run(
        &sb,
        "stdin",
        &["sh", "-c", "wc -c; hostname"],
        Some(b"hello from the host\n"),
    );
    assert_eq!(status, 0);
    assert_eq!(
        String::from_utf8_lossy(&out),
        "20\nstdin\n",
        "stdin bytes, then the spec's hostname"
    );

    // A signal from the host ends the container's init; reported as 128+n.
    let r = start(&sb, "killed", &["sleep", "1000"], false);
    sb.agent()
        .expect("agent")
        .signal_process("killed", None, 9, false)
        .expect("signal");
    let (status, _, _) = finish(&sb, r);
    assert_eq!(status, 128 + 9, "signals are reported as 128+n");

    let pids = sb.pids();
    sb.shutdown().expect("shutdown");
    assert_nothing_left(&env.config.state_dir, "ctr", &pids);
}

#[test]
fn malformed_specs_are_refused_with_clear_errors_and_the_guest_stays_usable() {
    if !e2e("malformed_specs_are_refused_with_clear_errors_and_the_guest_stays_usable") {
        return;
    }
    let _vm = vm_lock();
    let env = TestEnv::new();
    let sb = Sandbox::boot(&env.config, "bad").expect("boot");
    let agent = sb.agent().expect("agent").clone();
    busybox_rootfs(&sb.dir().join("shared").join("c1").join("rootfs"));

    let refused = |cid: &str, spec: &[u8]| -> String {
        match agent.create_container(cid, spec.to_vec(), Stdio::new()) {
            Ok(()) => panic!("spec {:?} was accepted", String::from_utf8_lossy(spec)),
            Err(e) => format!("{e:#} {:?}", std::error::Error::source(&e)),
        }
    };
    let e = refused("c1", b"{\"ociVersion\": \"1.0.2\", \"process\": ");
    assert!(e.contains("spec of container c1 is not valid"), "{e}");
    let e = refused(
        "c1",
        br#"{"ociVersion": "1.0.2", "root": {"path": "rootfs"}}"#,
    );
    assert!(e.contains("has no process"), "{e}");
    let e = refused("c1", br#"{"ociVersion": 7}"#);
    assert!(e.contains("not valid"), "{e}");
    let e = refused("../escape", &oci_spec("c1", &["true"]));
    assert!(e.contains("invalid container or exec id"), "{e}");
    let e = refused("nosuchroot", &oci_spec("nosuchroot", &["true"]));
    assert!(e.contains("rootfs") && e.contains("nosuchroot"), "{e}");

    // Nothing of the refused creates stayed: the same id works now.
    let (status, out, _) = run(&sb, "c1", &["echo", "still fine"], None);
    assert_eq!((status, out.as_slice()), (0, &b"still fine\n"[..]));

    let pids = sb.pids();
    sb.shutdown().expect("shutdown");
    assert_nothing_left(&env.config.state_dir, "bad", &pids);
}
