//! Containers in a real guest through the agent: rootfs on virtio-fs, stdio
//! as vsock streams, exit statuses as runc reports them.

use std::io::{Read, Write};
use std::time::Duration;

use husk_protocol::containers::Stdio;
use husk_protocol::{StreamHeader, StreamKind};
use husk_runtime::vm::agent::open_stream;
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

/// A busybox rootfs for container `cid`, shared into `sb`'s guest as husk
/// shares containerd's (a bind into the read-only, capped share root).
/// Returns the host directory behind it.
fn shared_rootfs(sb: &Sandbox, cid: &str) -> std::path::PathBuf {
    let src = sb.dir().join("test-rootfs").join(cid);
    let paths = sb.paths().container(cid);
    if paths.rootfs_shared().exists() {
        return src;
    }
    busybox_rootfs(&src);
    let _writable = husk_runtime::host::storage::ShareWrite::begin(&paths.share_root);
    husk_runtime::host::storage::mount_rootfs(
        &[husk_runtime::host::storage::MountSpec {
            fstype: "bind".into(),
            source: src.display().to_string(),
            options: vec!["rbind".into()],
        }],
        &paths.rootfs_private,
        &paths.share_root,
        &paths.rootfs_shared(),
    )
    .expect("share the rootfs");
    src
}

/// Creates and starts `args` in container `cid` of `sb`, with a busybox
/// rootfs in the share and stdio streams attached.
fn start(sb: &Sandbox, cid: &str, args: &[&str], stdin: bool) -> Running {
    shared_rootfs(sb, cid);
    let sock = sb.agent_socket();
    let input = stdin
        .then(|| open_stream(&sock, &header(cid, StreamKind::Stdin), T).expect("stdin stream"));
    let stdout = open_stream(&sock, &header(cid, StreamKind::Stdout), T).expect("stdout stream");
    let stderr = open_stream(&sock, &header(cid, StreamKind::Stderr), T).expect("stderr stream");
    let agent = sb.agent().expect("agent");
    let mut stdio = Stdio::new();
    stdio.stdin = stdin;
    stdio.stdout = true;
    stdio.stderr = true;
    if let Err(e) = agent.create_container(cid, oci_spec(cid, args), stdio, None, vec![]) {
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
#[ignore = "end-to-end: root and a guest (make test)"]
fn container_runs_on_the_guest_kernel_with_stdio_and_exit_codes() {
    e2e();
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
#[ignore = "end-to-end: root and a guest (make test)"]
fn malformed_specs_are_refused_with_clear_errors_and_the_guest_stays_usable() {
    e2e();
    let _vm = vm_lock();
    let env = TestEnv::new();
    let sb = Sandbox::boot(&env.config, "bad").expect("boot");
    let agent = sb.agent().expect("agent").clone();
    shared_rootfs(&sb, "c1");

    let refused_with = |cid: &str, spec: &[u8], stdio: Stdio| -> String {
        match agent.create_container(cid, spec.to_vec(), stdio, None, vec![]) {
            Ok(()) => panic!("spec {:?} was accepted", String::from_utf8_lossy(spec)),
            Err(e) => format!("{e:#} {:?}", std::error::Error::source(&e)),
        }
    };
    let refused = |cid: &str, spec: &[u8]| refused_with(cid, spec, Stdio::new());
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
    assert!(e.contains("container id \"../escape\" is invalid"), "{e}");
    let e = refused("nosuchroot", &oci_spec("nosuchroot", &["true"]));
    assert!(e.contains("rootfs") && e.contains("nosuchroot"), "{e}");

    // A stdout the host asked for but never opened: the agent stops waiting
    // before the host's RPC timeout does, so the error names the stream.
    let mut stdio = Stdio::new();
    stdio.stdout = true;
    let e = refused_with("c1", &oci_spec("c1", &["true"]), stdio);
    assert!(
        e.contains("stdio stdout of container c1 did not arrive"),
        "{e}"
    );

    // Nothing of the refused creates stayed: the same id works now.
    let (status, out, _) = run(&sb, "c1", &["echo", "still fine"], None);
    assert_eq!((status, out.as_slice()), (0, &b"still fine\n"[..]));

    let pids = sb.pids();
    sb.shutdown().expect("shutdown");
    assert_nothing_left(&env.config.state_dir, "bad", &pids);
}

/// A spec from `oci_spec` with `edit` applied.
fn spec_with(cid: &str, args: &[&str], edit: impl FnOnce(&mut serde_json::Value)) -> Vec<u8> {
    let mut v: serde_json::Value = serde_json::from_slice(&oci_spec(cid, args)).expect("spec");
    edit(&mut v);
    serde_json::to_vec(&v).expect("json")
}

/// Runs a prepared spec to completion; returns (status, stdout, stderr).
fn run_spec(sb: &Sandbox, cid: &str, spec: Vec<u8>) -> (u32, String, String) {
    let rootfs = shared_rootfs(sb, cid);
    std::fs::create_dir_all(rootfs.join("work")).expect("mkdir");
    let sock = sb.agent_socket();
    let stdout = open_stream(&sock, &header(cid, StreamKind::Stdout), T).expect("stdout");
    let stderr = open_stream(&sock, &header(cid, StreamKind::Stderr), T).expect("stderr");
    let agent = sb.agent().expect("agent");
    let mut stdio = Stdio::new();
    stdio.stdout = true;
    stdio.stderr = true;
    agent
        .create_container(cid, spec, stdio, None, vec![])
        .unwrap_or_else(|e| panic!("create {cid}: {e}"));
    let (out, err) = (reader(stdout), reader(stderr));
    agent.start_container(cid).expect("start");
    let status = agent.wait_process(cid, None).expect("wait");
    let (out, err) = (out.join().expect("out"), err.join().expect("err"));
    agent.remove_container(cid).expect("remove");
    (
        status,
        String::from_utf8_lossy(&out).into_owned(),
        String::from_utf8_lossy(&err).into_owned(),
    )
}

#[test]
#[ignore = "end-to-end: root and a guest (make test)"]
fn the_spec_is_honoured_user_env_cwd_rlimits_caps_readonly_masked_seccomp() {
    e2e();
    let _vm = vm_lock();
    let env = TestEnv::new();
    let sb = Sandbox::boot(&env.config, "spec").expect("boot");

    // Process: user, groups, env, cwd, rlimits, no_new_privileges.
    let spec = spec_with(
        "proc",
        &[
            "sh",
            "-c",
            "echo $(id -u) $(id -g) $(id -G); echo $FOO; pwd; ulimit -n; grep NoNewPrivs /proc/self/status",
        ],
        |s| {
            let p = &mut s["process"];
            p["user"] = serde_json::json!({"uid": 1000, "gid": 1000, "additionalGids": [10, 20]});
            p["env"]
                .as_array_mut()
                .expect("env")
                .push("FOO=bar baz".into());
            p["cwd"] = "/tmp".into();
            p["rlimits"] = serde_json::json!([{"type": "RLIMIT_NOFILE", "hard": 123, "soft": 123}]);
            p["noNewPrivileges"] = true.into();
        },
    );
    let (status, out, err) = run_spec(&sb, "proc", spec);
    assert_eq!(status, 0, "{err}");
    assert_eq!(
        out,
        "1000 1000 1000 10 20\nbar baz\n/tmp\n123\nNoNewPrivs:\t1\n"
    );

    // Filesystem and kernel surface: read-only root, a tmpfs mount, masked
    // and read-only paths, a single capability, a seccomp filter.
    let spec = spec_with(
        "fs",
        &[
            "sh",
            "-c",
            "touch /rootfile 2>/dev/null && echo root-rw || echo root-ro; \
             touch /work/f && echo tmpfs-rw; \
             mkdir /work/d 2>/dev/null && echo mkdir-ok || echo mkdir-denied; \
             wc -c < /proc/cpuinfo; \
             (echo x > /proc/sys/kernel/domainname) 2>/dev/null && echo sys-rw || echo sys-ro; \
             grep CapBnd /proc/self/status",
        ],
        |s| {
            s["root"]["readonly"] = true.into();
            s["mounts"].as_array_mut().expect("mounts").push(serde_json::json!(
                {"destination": "/work", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "nodev", "size=1m"]}
            ));
            s["linux"]["maskedPaths"] = serde_json::json!(["/proc/cpuinfo"]);
            s["linux"]["readonlyPaths"] = serde_json::json!(["/proc/sys"]);
            let caps = serde_json::json!(["CAP_CHOWN"]);
            s["process"]["capabilities"] =
                serde_json::json!({"bounding": caps, "effective": caps, "permitted": caps});
            s["linux"]["seccomp"] = serde_json::json!({
                "defaultAction": "SCMP_ACT_ALLOW",
                "architectures": ["SCMP_ARCH_X86_64"],
                "syscalls": [{"names": ["mkdir", "mkdirat"], "action": "SCMP_ACT_ERRNO", "errnoRet": 1}]
            });
        },
    );
    let (status, out, err) = run_spec(&sb, "fs", spec);
    assert_eq!(status, 0, "{err}");
    assert_eq!(
        out,
        "root-ro\ntmpfs-rw\nmkdir-denied\n0\nsys-ro\nCapBnd:\t0000000000000001\n"
    );

    let pids = sb.pids();
    sb.shutdown().expect("shutdown");
    assert_nothing_left(&env.config.state_dir, "spec", &pids);
}
