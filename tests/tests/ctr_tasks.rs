//! What `ctr` does to a running task, against a real containerd with husk:
//! exec (plain, stdin, tty), pause/resume, ps, metrics, update, kill with
//! SIGTERM, OOM kills, terminals, large output, concurrent starts, and the
//! errors users see for bad input. Events are checked in containerd's order.

use std::io::{BufRead, Write};
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use containerd_shim_protos::shim::shim as task_api;
use husk_tests::containerd::{assert_clean, run_args, Containerd, Events, RUNTIME};
use husk_tests::{e2e, vm_lock};

/// A 10 s deadline for calls to the shim's task API.
fn ctx() -> containerd_shim_protos::ttrpc::context::Context {
    containerd_shim_protos::ttrpc::context::with_timeout(10_000_000_000)
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn ok(ctd: &Containerd, what: &str, out: &Output) {
    assert!(
        out.status.success(),
        "{what} failed ({:?}): {}\n{}\n--- containerd ---\n{}",
        out.status.code(),
        text(&out.stdout),
        text(&out.stderr),
        ctd.log()
    );
}

/// `ctr` under a pseudo-terminal of `rows` x `cols` (util-linux `script`).
fn ctr_in_pty(ctd: &Containerd, rows: u16, cols: u16, args: &[&str]) -> Output {
    let ctr = ctd.ctr_cmd(args);
    let mut line = vec![ctr.get_program().to_string_lossy().into_owned()];
    line.extend(ctr.get_args().map(|a| format!("'{}'", a.to_string_lossy())));
    let cmd = format!("stty rows {rows} cols {cols}; {}", line.join(" "));
    Command::new("script")
        .args(["-qec", &cmd, "/dev/null"])
        .stdin(Stdio::null())
        .output()
        .expect("script(1) from util-linux")
}

fn wait_status(ctd: &Containerd, id: &str, status: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let ls = text(&ctd.ctr(&["task", "ls"]).stdout);
        if ls
            .lines()
            .any(|l| l.starts_with(&format!("{id} ")) && l.contains(status))
        {
            return;
        }
        assert!(Instant::now() < deadline, "{id} never {status}: {ls}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Positions of the first occurrence of each topic, which must ascend.
fn assert_order(topics: &[String], order: &[&str]) {
    let pos: Vec<Option<usize>> = order
        .iter()
        .map(|t| topics.iter().position(|x| x == t))
        .collect();
    assert!(
        pos.iter().all(Option::is_some) && pos.windows(2).all(|w| w[0] < w[1]),
        "events out of order or missing: want {order:?}, saw {topics:?}"
    );
}

#[test]
#[ignore = "end-to-end: root and a guest (make test)"]
fn exec_pause_resume_ps_metrics_update_and_sigterm_on_a_detached_container() {
    e2e();
    let _vm = vm_lock();
    let ctd = Containerd::start();
    let events = Events::start(&ctd);
    let id = "svc";
    let out = ctd.run(
        &["-d"],
        id,
        &["sh", "-c", "trap 'exit 3' TERM; while :; do sleep 1; done"],
    );
    ok(&ctd, "ctr run -d", &out);
    wait_status(&ctd, id, "RUNNING");

    // Exec: output and exit code.
    let out = ctd.ctr(&[
        "task",
        "exec",
        "--exec-id",
        "e1",
        id,
        "sh",
        "-c",
        "echo from exec; echo to stderr >&2; exit 5",
    ]);
    assert_eq!(
        out.status.code(),
        Some(5),
        "exec exit code: {}",
        text(&out.stderr)
    );
    assert_eq!(text(&out.stdout), "from exec\n");
    assert!(
        text(&out.stderr).contains("to stderr"),
        "{}",
        text(&out.stderr)
    );

    // Exec with stdin: every byte arrives, and EOF ends it.
    let mut child = ctd
        .ctr_cmd(&["task", "exec", "--exec-id", "e2", id, "wc", "-c"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("ctr task exec");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(&[b'x'; 100_000])
        .expect("write stdin");
    let out = child.wait_with_output().expect("exec wc");
    ok(&ctd, "exec wc -c", &out);
    assert_eq!(text(&out.stdout).trim(), "100000");

    // Exec in a terminal of a given size.
    let out = ctr_in_pty(
        &ctd,
        33,
        101,
        &[
            "task",
            "exec",
            "-t",
            "--exec-id",
            "t1",
            id,
            "sh",
            "-c",
            "stty size; tty",
        ],
    );
    let o = text(&out.stdout);
    assert!(
        out.status.success() && o.contains("33 101") && o.contains("/dev/pts/"),
        "exec -t: {o:?} {}",
        text(&out.stderr)
    );

    // A missing command in exec: a clear error; the container lives on.
    let out = ctd.ctr(&["task", "exec", "--exec-id", "e3", id, "/no/such/cmd"]);
    assert!(!out.status.success(), "exec of a missing command succeeded");
    let e = text(&out.stderr);
    assert!(
        e.contains("/no/such/cmd"),
        "error should name the command: {e}"
    );

    // ps lists the init and its sleep. Each sleep lasts a second and the
    // next starts a moment after, so one listing in the gap may miss it;
    // the init shows in every one.
    let mut listings = Vec::new();
    for _ in 0..3 {
        let out = ctd.ctr(&["task", "ps", id]);
        ok(&ctd, "ctr task ps", &out);
        let pids = text(&out.stdout)
            .lines()
            .skip(1)
            .filter(|l| {
                l.split_whitespace()
                    .next()
                    .is_some_and(|p| p.parse::<u32>().is_ok())
            })
            .count();
        assert!(pids >= 1, "ps lists no init: {}", text(&out.stdout));
        listings.push(text(&out.stdout));
        if pids >= 2 {
            break;
        }
        std::thread::sleep(Duration::from_millis(300));
    }
    assert!(
        listings
            .last()
            .is_some_and(|l| l.lines().skip(1).count() >= 2),
        "ps never listed the init and its sleep: {listings:?}"
    );

    // Pause freezes, resume thaws.
    ok(&ctd, "pause", &ctd.ctr(&["task", "pause", id]));
    wait_status(&ctd, id, "PAUSED");
    ok(&ctd, "resume", &ctd.ctr(&["task", "resume", id]));
    wait_status(&ctd, id, "RUNNING");

    // Metrics come from the guest's cgroup.
    let out = ctd.ctr(&["task", "metrics", id]);
    ok(&ctd, "ctr task metrics", &out);
    let m = text(&out.stdout);
    let usage = m
        .lines()
        .find(|l| l.starts_with("memory.usage_in_bytes"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap_or_else(|| panic!("no memory usage in metrics: {m}"));
    assert!(usage > 0, "{m}");
    assert!(m.contains("pids.current"), "{m}");

    // Update (containerd's Update call; ctr 1.6 has no command for it): a
    // new memory limit reaches the container's cgroup in the guest.
    let mut req = task_api::UpdateTaskRequest::new();
    req.id = id.into();
    let mut any = containerd_shim_protos::protobuf::well_known_types::any::Any::new();
    any.type_url = "types.containerd.io/opencontainers/runtime-spec/1/LinuxResources".into();
    any.value = br#"{"memory": {"limit": 67108864}, "pids": {"limit": 100}}"#.to_vec();
    req.resources = Some(any).into();
    ctd.shim_client(id)
        .update(ctx(), &req)
        .expect("Update through the shim's task API");
    // Bad resources are refused by name, and change nothing.
    let mut req2 = req.clone();
    if let Some(a) = req2.resources.as_mut() {
        a.value = br#"{"memory": {"limit": "lots"}}"#.to_vec();
    }
    let e = ctd
        .shim_client(id)
        .update(ctx(), &req2)
        .expect_err("garbage resources accepted");
    assert!(format!("{e:?}").contains("resources"), "{e:?}");
    // The guest's cgroup now reports the new limits.
    let m = text(&ctd.ctr(&["task", "metrics", id]).stdout);
    let value = |key: &str| {
        m.lines()
            .find(|l| l.split_whitespace().next() == Some(key))
            .and_then(|l| l.split_whitespace().nth(1))
            .map(str::to_owned)
            .unwrap_or_else(|| panic!("no {key} in metrics: {m}"))
    };
    assert_eq!(value("memory.limit_in_bytes"), "67108864", "{m}");
    assert_eq!(value("pids.limit"), "100", "{m}");

    // Checkpoint cannot work (no CRIU in the guest): a clear refusal.
    let out = ctd.ctr(&["task", "checkpoint", id]);
    assert!(!out.status.success(), "checkpoint claimed success");
    assert!(
        text(&out.stderr).contains("checkpoint is not supported"),
        "{}",
        text(&out.stderr)
    );

    // SIGTERM (ctr's default) runs the container's trap: exit code 3.
    ok(&ctd, "kill", &ctd.ctr(&["task", "kill", id]));
    wait_status(&ctd, id, "STOPPED");
    let mut req = task_api::StateRequest::new();
    req.id = id.into();
    let st = ctd
        .shim_client(id)
        .state(ctx(), &req)
        .expect("State through the shim's task API");
    assert_eq!(st.exit_status, 3, "exit status after the SIGTERM trap");
    // Wait after the exit still answers (ctr task rm -f waits).
    let mut wreq = task_api::WaitRequest::new();
    wreq.id = id.into();
    let w = ctd
        .shim_client(id)
        .wait(ctx(), &wreq)
        .expect("Wait after exit");
    assert_eq!(w.exit_status, 3);
    ok(&ctd, "task rm", &ctd.ctr(&["task", "rm", id]));
    ok(&ctd, "container rm", &ctd.ctr(&["container", "rm", id]));

    let topics = events.wait_for(id, "/tasks/delete", Duration::from_secs(10));
    assert_order(
        &topics,
        &[
            "/tasks/create",
            "/tasks/start",
            "/tasks/exec-added",
            "/tasks/exec-started",
            "/tasks/exit",
            "/tasks/paused",
            "/tasks/resumed",
            "/tasks/delete",
        ],
    );
    assert_clean();
}

#[test]
#[ignore = "end-to-end: root and a guest (make test)"]
fn output_tty_oom_and_failures_through_ctr_run() {
    e2e();
    let _vm = vm_lock();
    let ctd = Containerd::start();
    let events = Events::start(&ctd);
    let run = |id: &str, args: &[&str]| ctd.run(&["--rm"], id, args);

    // 10 MiB of random bytes, intact: the guest's checksum on stderr.
    let out = run(
        "big",
        &[
            "sh",
            "-c",
            "head -c 10485760 /dev/urandom > /tmp/d && sha256sum /tmp/d >&2 && cat /tmp/d",
        ],
    );
    ok(&ctd, "10 MiB", &out);
    assert_eq!(out.stdout.len(), 10 << 20, "stdout length");
    let mut sum = Command::new("sha256sum")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("sha256sum");
    let mut input = sum.stdin.take().expect("stdin");
    let data = out.stdout.clone();
    let writer = std::thread::spawn(move || input.write_all(&data));
    let host = sum.wait_with_output().expect("sha256sum");
    writer.join().expect("writer").expect("write");
    let host = text(&host.stdout);
    let guest = text(&out.stderr);
    let (h, g) = (
        host.split_whitespace().next().unwrap_or("host"),
        guest.split_whitespace().next().unwrap_or("guest"),
    );
    assert_eq!(h, g, "checksum of what arrived vs what the guest wrote");
    assert_clean();

    // A container that exits at once.
    ok(&ctd, "true", &run("quick", &["true"]));
    assert_clean();

    // A missing command: ctr fails with an error naming it; nothing leaks.
    let out = run("missing", &["/no/such/cmd"]);
    assert!(!out.status.success(), "running a missing command succeeded");
    assert!(
        text(&out.stderr).contains("/no/such/cmd"),
        "error should name the command: {}",
        text(&out.stderr)
    );
    let _ = ctd.ctr(&["container", "rm", "missing"]);
    assert_clean();

    // A terminal: size from the client's terminal, a pty in the guest.
    let out = ctr_in_pty(
        &ctd,
        40,
        120,
        &run_args(
            &["--rm", "-t"],
            RUNTIME,
            "tty1",
            &["sh", "-c", "stty size; tty; exit 4"],
        ),
    );
    let o = text(&out.stdout);
    assert!(
        o.contains("40 120") && o.contains("/dev/pts/"),
        "run -t: {o:?} {}",
        text(&out.stderr)
    );
    assert_clean();

    // SIGTERM to a foreground container: its trap's code comes back.
    let mut child = ctd
        .run_cmd(
            &["--rm"],
            "term",
            &[
                "sh",
                "-c",
                "trap 'exit 9' TERM; echo ready; while :; do sleep 1; done",
            ],
        )
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
        .expect("ctr run");
    let mut line = String::new();
    std::io::BufReader::new(child.stdout.take().expect("stdout"))
        .read_line(&mut line)
        .expect("ready line");
    assert_eq!(line, "ready\n");
    ok(&ctd, "kill", &ctd.ctr(&["task", "kill", "term"]));
    let status = child.wait().expect("ctr run");
    assert_eq!(status.code(), Some(9), "exit code after SIGTERM");
    assert_clean();

    // An OOM kill: 137 for the killed process, and a /tasks/oom event.
    let out = ctd.run(
        &["--rm", "--memory-limit", "33554432"],
        "oom",
        &[
            "sh",
            "-c",
            "dd if=/dev/zero of=/dev/null bs=96M count=1; echo dd=$?",
        ],
    );
    assert!(
        text(&out.stdout).contains("dd=137"),
        "dd should be OOM-killed: {} {}",
        text(&out.stdout),
        text(&out.stderr)
    );
    let topics = events.wait_for("oom", "/tasks/oom", Duration::from_secs(10));
    assert!(topics.iter().any(|t| t == "/tasks/oom"), "{topics:?}");
    assert_clean();
}

#[test]
#[ignore = "end-to-end: root and a guest (make test)"]
fn five_containers_start_concurrently() {
    e2e();
    let _vm = vm_lock();
    let ctd = Containerd::start();
    let children: Vec<_> = (0..5)
        .map(|i| {
            let id = format!("par{i}");
            let script = format!("echo {id} $(uname -r)");
            let child = ctd
                .run_cmd(&["--rm"], &id, &["sh", "-c", &script])
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .expect("ctr run");
            (id, child)
        })
        .collect();
    for (id, child) in children {
        let out = child.wait_with_output().expect("ctr run");
        ok(&ctd, &id, &out);
        let o = text(&out.stdout);
        assert!(
            o.starts_with(&format!("{id} ")) && o.trim_end().ends_with("-husk"),
            "{id}: {o:?}"
        );
    }
    assert_clean();
}

#[test]
#[ignore = "end-to-end: root and a guest (make test)"]
fn host_bind_mounts_and_the_config_path_option() {
    e2e();
    let _vm = vm_lock();
    let ctd = Containerd::start();
    let host = tempfile::Builder::new()
        .prefix("husk-bind")
        .tempdir_in("/tmp")
        .expect("tempdir");
    let (ro, rw) = (host.path().join("ro"), host.path().join("rw"));
    std::fs::create_dir(&ro).expect("mkdir");
    std::fs::create_dir(&rw).expect("mkdir");
    std::fs::write(ro.join("hello"), "from the host\n").expect("write");
    let file = host.path().join("single-file");
    std::fs::write(&file, "one file\n").expect("write");

    let ro_mount = format!("type=bind,src={},dst=/ro,options=rbind:ro", ro.display());
    let rw_mount = format!("type=bind,src={},dst=/rw,options=rbind:rw", rw.display());
    let file_mount = format!(
        "type=bind,src={},dst=/etc/one,options=bind:ro",
        file.display()
    );
    let out = ctd.run(
        &[
            "--rm",
            "--mount",
            &ro_mount,
            "--mount",
            &rw_mount,
            "--mount",
            &file_mount,
        ],
        "binds",
        &[
            "sh",
            "-c",
            "cat /ro/hello /etc/one; echo written > /rw/out; \
         if echo x > /ro/new 2>/dev/null; then echo ro-writable; fi; \
         if mount -o remount,rw /ro 2>/dev/null && echo x > /ro/new; then echo ro-remounted; fi",
        ],
    );
    ok(&ctd, "run with bind mounts", &out);
    assert_eq!(text(&out.stdout), "from the host\none file\n");
    assert_eq!(
        std::fs::read_to_string(rw.join("out")).expect("written through rw bind"),
        "written\n"
    );
    assert!(
        !ro.join("new").exists(),
        "a read-only bind must stay read-only on the host"
    );
    assert_clean();

    // A missing bind source: an error naming it; nothing leaks.
    let missing = format!(
        "type=bind,src={}/nope,dst=/x,options=rbind",
        host.path().display()
    );
    let out = ctd.run(&["--rm", "--mount", &missing], "nobind", &["true"]);
    assert!(!out.status.success());
    assert!(text(&out.stderr).contains("/nope"), "{}", text(&out.stderr));
    let _ = ctd.ctr(&["container", "rm", "nobind"]);
    assert_clean();

    // ConfigPath (ctr --runtime-config-path): a per-container husk config.
    let config = host.path().join("husk.toml");
    let guest = husk_tests::guest_dir();
    // A husk config at `path` with the guest image's kernel, `initramfs`
    // and `more` lines; a `ctr run --rm` of `cmd` as `id` with it.
    let run_with = |path: &Path, initramfs: &Path, more: &str, id: &str, cmd: &[&str]| {
        let kernel = guest.join("vmlinux");
        let text = format!(
            "[guest]\nkernel = \"{}\"\ninitramfs = \"{}\"\n{more}",
            kernel.display(),
            initramfs.display()
        );
        std::fs::write(path, text).expect("write config");
        let p = path.to_str().expect("utf-8");
        ctd.run(&["--rm", "--runtime-config-path", p], id, cmd)
    };
    let out = run_with(
        &config,
        &guest.join("initramfs.cpio"),
        "memory_mib = 200\n",
        "small",
        &["grep", "MemTotal", "/proc/meminfo"],
    );
    ok(&ctd, "run with ConfigPath", &out);
    let kib: u64 = text(&out.stdout)
        .split_whitespace()
        .nth(1)
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("meminfo: {}", text(&out.stdout)));
    assert!(
        kib <= 200 * 1024,
        "guest has {kib} KiB, config says 200 MiB"
    );
    assert_clean();

    // A VM that dies while it boots (an initramfs of junk: the guest
    // panics, panic=-1 ends QEMU). Through the shim the error carries the
    // VM's exit and the guest's console, not a lost exit status (the shim
    // once let containerd-shim's reaper take it: "No child processes").
    let junk = host.path().join("junk.cpio");
    std::fs::write(&junk, vec![0x5a; 64 * 1024]).expect("write junk");
    let out = run_with(
        &host.path().join("dying.toml"),
        &junk,
        "",
        "dying",
        &["true"],
    );
    assert!(!out.status.success());
    let err = text(&out.stderr);
    assert!(
        err.contains("Kernel panic") && !err.contains("No child processes"),
        "{err}"
    );
    let _ = ctd.ctr(&["container", "rm", "dying"]);
    assert_clean();

    let out = ctd.run(
        &["--rm", "--runtime-config-path", "/nonexistent/husk.toml"],
        "badcfg",
        &["true"],
    );
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("/nonexistent/husk.toml"),
        "{}",
        text(&out.stderr)
    );
    let _ = ctd.ctr(&["container", "rm", "badcfg"]);
    assert_clean();
}
