//! CRI Exec and Attach through containerd's streaming server, as kubectl
//! uses them (WebSocket, `v4.channel.k8s.io`), and ExecSync of a command
//! that leaves a child holding its output. Each behaviour is measured on a
//! runc pod of the same containerd first, and husk must match it.

use std::path::Path;
use std::time::{Duration, Instant};

use husk_tests::containerd::{assert_clean, Containerd, IMAGE};
use husk_tests::cri::{container, interactive_container, Cri, ExecResult, PodOpts};
use husk_tests::stream::{self, Outcome, Session, StreamError};
use husk_tests::{e2e, vm_lock};
use k8s_cri::v1::{ContainerConfig, ContainerState};

/// How long one streamed command may take.
const STREAM_TIMEOUT: Duration = Duration::from_secs(30);
/// The handlers compared, baseline first.
const HANDLERS: [&str; 2] = ["runc", "husk"];

/// A private containerd with CRI, and a directory for the pods' logs.
fn cri_env() -> (Containerd, Cri, tempfile::TempDir) {
    let ctd = Containerd::start();
    let cri = ctd.cri();
    (ctd, cri, tempfile::tempdir().expect("log dir"))
}

/// A running pod of `handler` with one container, logging under
/// `logs/<handler>`; the pod's and the container's ids.
fn pod_with(
    ctd: &Containerd,
    cri: &Cri,
    logs: &Path,
    handler: &str,
    config: ContainerConfig,
) -> (String, String) {
    let logs = logs.join(handler);
    std::fs::create_dir_all(&logs).expect("pod log dir");
    let mut opts = PodOpts::new(&format!("stream-{handler}"), &logs);
    opts.handler = handler.into();
    let pod = cri
        .run_pod(&opts)
        .unwrap_or_else(|e| panic!("RunPodSandbox ({handler}): {e}\n{}", ctd.log()));
    let c = cri
        .run_container(&pod, &opts, config)
        .unwrap_or_else(|e| panic!("container ({handler}): {e}\n{}", ctd.log()));
    (pod, c)
}

fn sleeper() -> ContainerConfig {
    container("app", IMAGE, &["sleep", "3600"], false)
}

fn remove_pod(cri: &Cri, pod: &str) {
    cri.stop_pod(pod).expect("StopPodSandbox");
    cri.remove_pod(pod).expect("RemovePodSandbox");
}

/// Connects to a streaming URL; containerd's log on failure.
fn connect(ctd: &Containerd, url: &str) -> Session {
    Session::connect(url).unwrap_or_else(|e| panic!("connect to {url}: {e}\n{}", ctd.log()))
}

/// Runs `cmd` through Exec, sends `stdin` if given, reads to the end.
fn exec(
    ctd: &Containerd,
    cri: &Cri,
    id: &str,
    cmd: &[&str],
    tty: bool,
    stdin: Option<&[u8]>,
) -> Outcome {
    let url = cri
        .exec(id, cmd, tty, stdin.is_some())
        .unwrap_or_else(|e| panic!("Exec {cmd:?}: {e}"));
    let mut s = connect(ctd, &url);
    if let Some(data) = stdin {
        for chunk in data.chunks(4096) {
            s.send_stdin(chunk).expect("send stdin");
        }
    }
    s.run_to_end(STREAM_TIMEOUT)
        .unwrap_or_else(|e| panic!("exec {cmd:?}: {e}\n{}", ctd.log()))
}

/// Output with each `/dev/pts/<n>` made `/dev/pts/N`.
fn any_pts(s: &str) -> String {
    let mut out = String::new();
    let mut rest = s;
    while let Some(i) = rest.find("/dev/pts/") {
        out.push_str(&rest[..i]);
        out.push_str("/dev/pts/N");
        rest = rest[i + "/dev/pts/".len()..].trim_start_matches(|c: char| c.is_ascii_digit());
    }
    out.push_str(rest);
    out
}

#[test]
#[ignore = "end-to-end: root and a guest (make test)"]
fn containerd_negotiates_the_v4_channel_protocol() {
    e2e();
    let _vm = vm_lock();
    let (ctd, cri, logs) = cri_env();
    let (pod, c) = pod_with(&ctd, &cri, logs.path(), "husk", sleeper());
    let cmd = ["sh", "-c", "echo out; exit 7"];
    let url = || cri.exec(&c, &cmd, false, false).expect("Exec");

    // kubectl offers v5 first, then v4; this containerd picks what it has.
    let s = Session::connect_with(&url(), &[stream::PROTOCOL_V5, stream::PROTOCOL_V4])
        .expect("connect offering v5 and v4");
    let chosen = s.protocol().to_owned();
    let o = s.run_to_end(STREAM_TIMEOUT).expect("run");
    eprintln!("offered v5 and v4, containerd chose {chosen:?}");
    assert!(
        [stream::PROTOCOL_V5, stream::PROTOCOL_V4].contains(&chosen.as_str()),
        "{chosen}"
    );
    assert_eq!((o.stdout_str().as_str(), o.exit_code), ("out\n", Some(7)));

    // v5 alone: either refused at the handshake or spoken.
    match Session::connect_with(&url(), &[stream::PROTOCOL_V5]) {
        Err(StreamError::Refused { status, body }) => {
            eprintln!("v5.channel.k8s.io alone: refused with {status} {body:?}")
        }
        Ok(s) => {
            assert_eq!(s.protocol(), stream::PROTOCOL_V5);
            eprintln!("v5.channel.k8s.io alone: accepted");
            let o = s.run_to_end(STREAM_TIMEOUT).expect("run v5");
            assert_eq!(o.exit_code, Some(7), "{o:?}");
        }
        Err(e) => panic!("v5 offer: {e}"),
    }

    // The first protocol: the error channel carries the message alone.
    let s = Session::connect_with(&url(), &[stream::PROTOCOL_V1]).expect("connect v1");
    assert_eq!(s.protocol(), stream::PROTOCOL_V1);
    let o = s.run_to_end(STREAM_TIMEOUT).expect("run v1");
    eprintln!("channel.k8s.io: error channel {:?}", o.status_json);
    assert_eq!(o.stdout_str(), "out\n");
    assert!(o.status_json.contains("exit code 7"), "{o:?}");
    assert_eq!(o.exit_code, None, "v1 has no status to read a code from");

    remove_pod(&cri, &pod);
    assert_clean();
}

#[test]
#[ignore = "end-to-end: root and a guest (make test)"]
fn exec_streams_stdout_stderr_exit_code_and_stdin_as_runc_does() {
    e2e();
    let _vm = vm_lock();
    let (ctd, cri, logs) = cri_env();
    // 64 KiB of stdin: more than one pipe buffer on every hop.
    let big: Vec<u8> = (0..65536u32).map(|i| (i % 251) as u8).collect();
    let mut seen = Vec::new();
    for handler in HANDLERS {
        let (pod, c) = pod_with(&ctd, &cri, logs.path(), handler, sleeper());

        let o = exec(
            &ctd,
            &cri,
            &c,
            &["sh", "-c", "echo out; echo err >&2; exit 7"],
            false,
            None,
        );
        assert_eq!(
            (
                o.stdout_str().as_str(),
                o.stderr_str().as_str(),
                o.exit_code
            ),
            ("out\n", "err\n", Some(7)),
            "{handler}: {o:?}"
        );
        assert!(
            o.status_json.contains("NonZeroExitCode"),
            "{handler}: {o:?}"
        );

        // Stdin has no end under v4: the process stops after what it needs.
        let o = exec(
            &ctd,
            &cri,
            &c,
            &["head", "-c", "11"],
            false,
            Some(b"hello world"),
        );
        assert_eq!(
            (
                o.stdout_str().as_str(),
                o.stderr_str().as_str(),
                o.exit_code
            ),
            ("hello world", "", Some(0)),
            "{handler}: {o:?}"
        );
        assert_eq!(
            stream::parse_status(&o.status_json).expect("status"),
            stream::Ended::Exited(0),
            "{handler}"
        );

        let sum = exec(
            &ctd,
            &cri,
            &c,
            &["sh", "-c", "head -c 65536 | sha256sum"],
            false,
            Some(&big),
        );
        assert_eq!(sum.exit_code, Some(0), "{handler}: {sum:?}");
        eprintln!(
            "{handler}: sha256 of 64 KiB of stdin: {}",
            sum.stdout_str().trim()
        );
        seen.push(sum.stdout_str());

        remove_pod(&cri, &pod);
    }
    let host = {
        let f = logs.path().join("stdin.bin");
        std::fs::write(&f, &big).expect("write stdin.bin");
        let out = std::process::Command::new("sha256sum")
            .arg(&f)
            .output()
            .expect("sha256sum");
        String::from_utf8_lossy(&out.stdout)
            .split_whitespace()
            .next()
            .unwrap_or_default()
            .to_owned()
    };
    for (handler, sum) in HANDLERS.iter().zip(&seen) {
        assert_eq!(
            sum.split_whitespace().next(),
            Some(host.as_str()),
            "{handler}: the bytes sent are not the bytes read"
        );
    }
    assert_clean();
}

#[test]
#[ignore = "end-to-end: root and a guest (make test)"]
fn exec_with_a_tty_merges_output_into_the_terminal_and_follows_resizes() {
    e2e();
    let _vm = vm_lock();
    let (ctd, cri, logs) = cri_env();
    let mut seen = Vec::new();
    for handler in HANDLERS {
        let (pod, c) = pod_with(&ctd, &cri, logs.path(), handler, sleeper());

        // With stdin open, as `kubectl exec -it` asks: runc's shim drops a
        // terminal's output now and then when stdin is not open.
        let o = exec(
            &ctd,
            &cri,
            &c,
            &["sh", "-c", "tty; echo hi; echo err >&2"],
            true,
            Some(b""),
        );
        assert_eq!(
            (
                any_pts(&o.stdout_str()).as_str(),
                o.stderr.len(),
                o.exit_code
            ),
            ("/dev/pts/N\r\nhi\r\nerr\r\n", 0, Some(0)),
            "{handler}: {o:?}"
        );

        // A resize reaches the terminal and its foreground process as
        // SIGWINCH: the trap prints the new size and ends the command.
        let url = cri
            .exec(
                &c,
                &[
                    "sh",
                    "-c",
                    "trap 'stty size; exit 0' WINCH; stty size; while :; do sleep 0.2; done",
                ],
                true,
                true,
            )
            .expect("Exec");
        let mut s = connect(&ctd, &url);
        let first = s
            .read_until(STREAM_TIMEOUT, |o| o.stdout.ends_with(b"\r\n"))
            .unwrap_or_else(|e| panic!("{handler}: first stty size: {e}"))
            .stdout_str();
        s.resize(100, 40).expect("resize");
        let o = s
            .run_to_end(Duration::from_secs(30))
            .unwrap_or_else(|e| panic!("{handler}: no SIGWINCH after a resize: {e}"));
        assert_eq!(
            (o.stdout_str(), o.exit_code),
            (format!("{first}40 100\r\n"), Some(0)),
            "{handler}: {o:?}"
        );

        // Stdin through the terminal: echoed, read by cat, ended by ^D.
        let url = cri.exec(&c, &["cat"], true, true).expect("Exec");
        let mut s = connect(&ctd, &url);
        s.send_stdin(b"abc\n").expect("stdin");
        s.read_until(STREAM_TIMEOUT, |o| o.stdout.ends_with(b"abc\r\nabc\r\n"))
            .unwrap_or_else(|e| panic!("{handler}: cat on a tty: {e}"));
        s.send_stdin(b"\x04").expect("^D");
        let o = s
            .run_to_end(STREAM_TIMEOUT)
            .unwrap_or_else(|e| panic!("{handler}: cat after ^D: {e}"));
        assert_eq!(
            (o.stdout_str().as_str(), o.exit_code),
            ("abc\r\nabc\r\n", Some(0)),
            "{handler}: {o:?}"
        );
        seen.push(first);

        remove_pod(&cri, &pod);
    }
    eprintln!(
        "size before the first resize: runc {:?}, husk {:?}",
        seen[0], seen[1]
    );
    assert_clean();
}

#[test]
#[ignore = "end-to-end: root and a guest (make test)"]
fn attach_without_tty_carries_stdin_and_closes_it_on_detach_with_stdin_once() {
    e2e();
    let _vm = vm_lock();
    let (ctd, cri, logs) = cri_env();
    for handler in HANDLERS {
        let (pod, c) = pod_with(
            &ctd,
            &cri,
            logs.path(),
            handler,
            interactive_container(
                "reader",
                IMAGE,
                &[
                    "sh",
                    "-c",
                    "while read l; do echo got:$l; echo err:$l >&2; done; echo bye",
                ],
                false,
                true,
            ),
        );
        let url = cri.attach(&c, false, true).expect("Attach");
        let mut s = connect(&ctd, &url);
        s.send_stdin(b"hello\n").expect("stdin");
        s.read_until(STREAM_TIMEOUT, |o| {
            o.stdout.ends_with(b"got:hello\n") && o.stderr.ends_with(b"err:hello\n")
        })
        .unwrap_or_else(|e| panic!("{handler}: attach echo: {e}\n{}", ctd.log()));
        let o = s.close().expect("detach");
        assert_eq!(
            (o.stdout_str().as_str(), o.stderr_str().as_str()),
            ("got:hello\n", "err:hello\n"),
            "{handler}"
        );
        // stdinOnce: detaching closed the container's stdin, so the loop
        // ended and the container exited by itself.
        assert_eq!(
            cri.wait_exited(&c, Duration::from_secs(30)),
            Some(0),
            "{handler}: the container did not see stdin close on detach"
        );
        let log = std::fs::read_to_string(logs.path().join(handler).join("reader.log"))
            .expect("reader.log");
        assert!(
            log.contains("got:hello") && log.contains("bye"),
            "{handler}: {log}"
        );
        remove_pod(&cri, &pod);
    }
    assert_clean();
}

/// Sends `line` to an attached shell until `want` appears, for up to
/// `timeout`: the resize channel and stdin are not ordered with each other.
fn until_output(s: &mut Session, line: &[u8], want: &[u8], timeout: Duration) -> Outcome {
    let deadline = Instant::now() + timeout;
    loop {
        s.send_stdin(line).expect("stdin");
        let found = s.read_until(Duration::from_millis(500), |o| {
            o.stdout.windows(want.len()).any(|w| w == want)
        });
        match found {
            Ok(o) => return o.clone(),
            Err(StreamError::Timeout { .. }) if Instant::now() < deadline => {}
            Err(e) => panic!("{:?} never appeared: {e}", String::from_utf8_lossy(want)),
        }
    }
}

#[test]
#[ignore = "end-to-end: root and a guest (make test)"]
fn attach_with_tty_reaches_the_shell_and_resizes_its_terminal() {
    e2e();
    let _vm = vm_lock();
    let (ctd, cri, logs) = cri_env();
    for handler in HANDLERS {
        let (pod, c) = pod_with(
            &ctd,
            &cri,
            logs.path(),
            handler,
            interactive_container("shell", IMAGE, &["sh"], true, false),
        );
        let url = cri.attach(&c, true, true).expect("Attach");
        let mut s = connect(&ctd, &url);
        // The terminal echoes the line; only the shell prints the sum.
        s.send_stdin(b"echo attached-$((6*7))\n").expect("stdin");
        let o = s
            .read_until(STREAM_TIMEOUT, |o| {
                o.stdout_str().contains("attached-42\r\n")
            })
            .unwrap_or_else(|e| panic!("{handler}: attached shell: {e}\n{}", ctd.log()));
        assert!(
            o.stdout_str().contains("echo attached-$((6*7))\r\n"),
            "{handler}: the terminal echoes input: {o:?}"
        );
        assert!(o.stderr.is_empty(), "{handler}: {o:?}");
        s.resize(100, 40).expect("resize");
        until_output(
            &mut s,
            b"stty size\n",
            b"\r\n40 100\r\n",
            Duration::from_secs(30),
        );
        s.close().expect("detach");
        // Without stdinOnce the shell outlives the session.
        assert_eq!(
            cri.container_status(&c).expect("ContainerStatus").state,
            ContainerState::ContainerRunning as i32,
            "{handler}: the shell ended on detach"
        );
        remove_pod(&cri, &pod);
    }
    assert_clean();
}

/// ExecSync of `cmd` with a 30 s timeout; the result and how long it took.
fn timed_exec_sync(cri: &Cri, id: &str, cmd: &str) -> (ExecResult, Duration) {
    let t = Instant::now();
    let r = cri
        .exec_sync(id, &["sh", "-c", cmd], 30)
        .unwrap_or_else(|e| panic!("ExecSync {cmd:?}: {e}"));
    (r, t.elapsed())
}

#[test]
#[ignore = "end-to-end: root and a guest (make test)"]
fn exec_sync_waits_for_a_child_holding_its_output_as_runc_does() {
    e2e();
    let _vm = vm_lock();
    let (ctd, cri, logs) = cri_env();
    let holding = "echo parent; sleep 5 & echo started";
    let detached = "echo parent; sleep 5 >/dev/null 2>&1 & echo started";
    // (handler, plain exec, holding child, detached child)
    let mut runs = Vec::new();
    for handler in HANDLERS {
        let (pod, c) = pod_with(&ctd, &cri, logs.path(), handler, sleeper());
        // The handler's own cost of an exec, to measure waits against.
        let (_, plain) = timed_exec_sync(&cri, &c, "true");
        let (_, plain2) = timed_exec_sync(&cri, &c, "true");
        let plain = plain.max(plain2);
        let hold = timed_exec_sync(&cri, &c, holding);
        let free = timed_exec_sync(&cri, &c, detached);
        eprintln!(
            "{handler}: plain exec {:.2} s; child holding stdout {:.2} s {:?}; \
             child redirected {:.2} s {:?}",
            plain.as_secs_f64(),
            hold.1.as_secs_f64(),
            hold.0,
            free.1.as_secs_f64(),
            free.0,
        );
        runs.push((handler, plain, hold, free));
        remove_pod(&cri, &pod);
    }
    let wait = |plain: Duration, d: Duration| d.saturating_sub(plain).as_secs_f64();
    let (_, runc_plain, runc_hold, runc_free) = &runs[0];
    let (_, husk_plain, husk_hold, husk_free) = &runs[1];
    for (what, r, h) in [
        ("holding", &runc_hold.0, &husk_hold.0),
        ("redirected", &runc_free.0, &husk_free.0),
    ] {
        assert_eq!(
            (&h.stdout, &h.stderr, h.exit_code),
            (&r.stdout, &r.stderr, r.exit_code),
            "child {what}: husk {h:?}, runc {r:?}"
        );
    }
    let (runc_wait, husk_wait) = (
        wait(*runc_plain, runc_hold.1),
        wait(*husk_plain, husk_hold.1),
    );
    assert!(
        (husk_wait - runc_wait).abs() < 2.0,
        "with a child holding stdout runc returned after {runc_wait:.2} s beyond a plain exec, \
         husk after {husk_wait:.2} s"
    );
    for (handler, plain, free) in [
        ("runc", runc_plain, runc_free),
        ("husk", husk_plain, husk_free),
    ] {
        assert!(
            wait(*plain, free.1) < 2.0,
            "{handler}: with the child's output redirected ExecSync took {:.2} s \
             against {:.2} s for a plain exec",
            free.1.as_secs_f64(),
            plain.as_secs_f64()
        );
    }
    assert_clean();
}

#[test]
#[ignore = "end-to-end: root and a guest (make test)"]
fn an_exec_that_cannot_start_fails_promptly_as_runc_does() {
    e2e();
    let _vm = vm_lock();
    let (ctd, cri, logs) = cri_env();
    for handler in HANDLERS {
        let (pod, c) = pod_with(&ctd, &cri, logs.path(), handler, sleeper());
        // containerd kills and waits for an exec whose start failed: the
        // wait must end, or ExecSync hangs until its deadline and longer.
        let t = Instant::now();
        let r = cri.exec_sync(&c, &["/no/such/binary"], 20);
        let took = t.elapsed();
        eprintln!("{handler}: exec of a missing binary: {r:?} after {took:?}");
        let e = r.expect_err("an exec of a missing binary succeeded");
        assert!(
            e.message().contains("/no/such/binary"),
            "{handler}: the error does not name the binary: {e}"
        );
        assert!(took < Duration::from_secs(10), "{handler}: took {took:?}");
        // The same happens to a streamed exec, and the container is fine.
        let url = cri
            .exec(&c, &["/no/such/binary"], false, false)
            .expect("Exec");
        let out = connect(&ctd, &url).run_to_end(STREAM_TIMEOUT);
        eprintln!("{handler}: streamed: {out:?}");
        assert_ne!(out.map(|o| o.exit_code).ok().flatten(), Some(0));
        let ok = timed_exec_sync(&cri, &c, "echo still here");
        assert_eq!(ok.0.stdout, "still here\n", "{handler}");
        remove_pod(&cri, &pod);
    }
    assert_clean();
}
