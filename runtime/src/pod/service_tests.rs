//! The pod API against a fake agent and VM: the orderings containerd relies
//! on (exec before start, kill after exit, wait after delete, event order),
//! failed starts, the sandbox's exit, and the VM's end with the last
//! container.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{channel, Receiver};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use husk_protocol::containers::{Network, StatsResponse, Stdio};
use husk_protocol::{ContainerId, ExecId, SandboxId, StreamHeader, StreamKind};
use oci_spec::runtime::Spec;
use serde_json::{json, Value};

use super::backend::{Backend, BootError, PodVm};
use super::guest::GuestAgent;
use super::service::{
    CreateRequest, ErrorKind, Event, PodApiError, PodService, Status, FAILED_START_STATUS,
    KILLED_STATUS, OOM_EVENT_GAP,
};
use super::stdio::Io;
use super::{PodError, Role};
use crate::config::Config;
use crate::host::storage::MountSpec;
use crate::vm::agent::AgentError;
use crate::vm::monitor::Verdict;

/// A process in the fake guest.
#[derive(Default)]
struct FakeProc {
    pid: u32,
    exit: Option<u32>,
}

#[derive(Default)]
struct Guest {
    next_pid: u32,
    /// By (container, exec id or "").
    procs: HashMap<(String, String), FakeProc>,
    containers: Vec<String>,
    /// The guest ends of each process's streams.
    streams: HashMap<(String, String, &'static str), UnixStream>,
    /// Every call, in order.
    calls: Vec<String>,
    shutdowns: u32,
    /// How long a signal's reply lags the exit it causes, as a slow
    /// guest's can.
    signal_lag: Duration,
    /// Whether the guest reports an OOM kill on every WaitOom.
    oom_flood: bool,
    /// Whether the guest acknowledges kills and never reports the exits.
    ignore_kills: bool,
    /// Whether the host killed the VM: every wait fails.
    dead: bool,
    /// What the VM's monitor said when it went down.
    verdict: Option<Verdict>,
}

/// A fake agent: processes exit when a test says so or on SIGKILL/SIGTERM.
#[derive(Clone, Default)]
struct FakeAgent {
    guest: Arc<(Mutex<Guest>, Condvar)>,
}

fn not_found(what: String) -> AgentError {
    AgentError::Rpc {
        rpc: "fake",
        error: ttrpc::Error::RpcStatus(ttrpc::get_status(ttrpc::Code::NOT_FOUND, what)),
    }
}

fn failed(what: String) -> AgentError {
    AgentError::Rpc {
        rpc: "fake",
        error: ttrpc::Error::RpcStatus(ttrpc::get_status(ttrpc::Code::INTERNAL, what)),
    }
}

fn key(id: &str, exec_id: Option<&str>) -> (String, String) {
    (id.to_owned(), exec_id.unwrap_or_default().to_owned())
}

impl FakeAgent {
    fn guest(&self) -> std::sync::MutexGuard<'_, Guest> {
        self.guest.0.lock().unwrap()
    }

    fn call(&self, c: String) {
        self.guest().calls.push(c);
    }

    /// Ends a process with `status`, after closing its output streams.
    fn exit(&self, id: &str, exec_id: &str, status: u32) {
        let mut g = self.guest();
        g.streams.retain(|(c, e, _), _| !(c == id && e == exec_id));
        let p = g
            .procs
            .get_mut(&key(id, Some(exec_id)))
            .expect("a started process");
        p.exit = Some(status);
        self.guest.1.notify_all();
    }

    /// Writes to a process's output stream, as the guest would.
    fn write(&self, id: &str, exec_id: &str, kind: &'static str, data: &[u8]) {
        let mut g = self.guest();
        let s = g
            .streams
            .get_mut(&(id.to_owned(), exec_id.to_owned(), kind))
            .expect("an open stream");
        s.write_all(data).unwrap();
    }

    fn calls(&self) -> Vec<String> {
        self.guest().calls.clone()
    }

    fn start(&self, id: &str, exec_id: Option<&str>) -> u32 {
        let mut g = self.guest();
        g.next_pid += 1;
        let pid = g.next_pid + 1;
        g.procs
            .insert(key(id, exec_id), FakeProc { pid, exit: None });
        pid
    }
}

impl GuestAgent for FakeAgent {
    fn open_stream(&self, h: &StreamHeader) -> Result<UnixStream, AgentError> {
        let (host, guest) = UnixStream::pair().unwrap();
        let kind = match h.kind {
            StreamKind::Stdin => "stdin",
            StreamKind::Stdout => "stdout",
            StreamKind::Stderr => "stderr",
        };
        let exec = h.exec_id.clone().unwrap_or_default();
        self.guest()
            .streams
            .insert((h.container_id.clone(), exec, kind), guest);
        Ok(host)
    }

    fn create_container(
        &self,
        id: &str,
        spec: Vec<u8>,
        _: Stdio,
        network: Option<Network>,
        _: Vec<u32>,
    ) -> Result<(), AgentError> {
        match network {
            Some(n) => self.call(format!("create {id} with {} NIC", n.interfaces.len())),
            None => self.call(format!("create {id}")),
        }
        let spec: Value = serde_json::from_slice(&spec).unwrap();
        if spec["process"]["args"][0] == "fail" {
            return Err(failed(format!("create {id}: no such binary")));
        }
        self.guest().containers.push(id.to_owned());
        Ok(())
    }

    fn start_container(&self, id: &str) -> Result<u32, AgentError> {
        self.call(format!("start {id}"));
        Ok(FakeAgent::start(self, id, None))
    }

    fn exec_process(
        &self,
        id: &str,
        exec_id: &str,
        process: Vec<u8>,
        _: Stdio,
    ) -> Result<u32, AgentError> {
        self.call(format!("exec {id} {exec_id}"));
        let p: Value = serde_json::from_slice(&process).unwrap();
        if p["args"][0] == "fail" {
            return Err(failed(format!("exec {exec_id}: no such binary")));
        }
        Ok(FakeAgent::start(self, id, Some(exec_id)))
    }

    fn wait_process(&self, id: &str, exec_id: Option<&str>) -> Result<u32, AgentError> {
        let mut g = self.guest();
        loop {
            if g.dead {
                return Err(failed("the VM was killed".into()));
            }
            match g.procs.get(&key(id, exec_id)) {
                None => return Err(not_found(format!("{id} {exec_id:?}"))),
                Some(FakeProc {
                    exit: Some(status), ..
                }) => return Ok(*status),
                Some(_) => g = self.guest.1.wait(g).unwrap(),
            }
        }
    }

    fn signal_process(
        &self,
        id: &str,
        exec_id: Option<&str>,
        signal: u32,
        _all: bool,
    ) -> Result<(), AgentError> {
        self.call(format!("signal {id} {} {signal}", exec_id.unwrap_or("-")));
        let running = self
            .guest()
            .procs
            .get(&key(id, exec_id))
            .is_some_and(|p| p.exit.is_none());
        if !running {
            return Err(not_found(format!("process {id} {exec_id:?} not found")));
        }
        if (signal == 9 || signal == 15) && !self.guest().ignore_kills {
            self.exit(id, exec_id.unwrap_or_default(), 128 + signal);
        }
        let lag = self.guest().signal_lag;
        if !lag.is_zero() {
            std::thread::sleep(lag);
            self.call(format!("replied to signal {id}"));
        }
        Ok(())
    }

    fn resize_pty(&self, _: &str, _: Option<&str>, _: u32, _: u32) -> Result<(), AgentError> {
        Ok(())
    }

    fn remove_process(&self, id: &str, exec_id: &str) -> Result<(), AgentError> {
        self.call(format!("remove {id} {exec_id}"));
        self.guest().procs.remove(&key(id, Some(exec_id)));
        Ok(())
    }

    fn pause_container(&self, id: &str) -> Result<(), AgentError> {
        self.call(format!("pause {id}"));
        Ok(())
    }

    fn resume_container(&self, id: &str) -> Result<(), AgentError> {
        self.call(format!("resume {id}"));
        Ok(())
    }

    fn list_processes(&self, id: &str) -> Result<Vec<u32>, AgentError> {
        Ok(self
            .guest()
            .procs
            .iter()
            .filter(|((c, _), p)| c == id && p.exit.is_none())
            .map(|(_, p)| p.pid)
            .collect())
    }

    fn container_stats(&self, _: &str) -> Result<StatsResponse, AgentError> {
        Ok(StatsResponse::new())
    }

    fn update_container(&self, id: &str, _: Vec<u8>) -> Result<(), AgentError> {
        self.call(format!("update {id}"));
        Ok(())
    }

    fn wait_oom(&self, id: &str) -> Result<bool, AgentError> {
        let mut g = self.guest();
        while g.containers.iter().any(|c| c == id) && !g.dead {
            if g.oom_flood {
                g.calls.push(format!("oom {id}"));
                return Ok(true);
            }
            g = self.guest.1.wait(g).unwrap();
        }
        Ok(false)
    }

    fn remove_container(&self, id: &str) -> Result<(), AgentError> {
        self.call(format!("remove {id}"));
        let mut g = self.guest();
        g.containers.retain(|c| c != id);
        g.procs.retain(|(c, _), _| c != id);
        self.guest.1.notify_all();
        Ok(())
    }
}

struct FakeBackend {
    agent: FakeAgent,
}

struct FakeVm {
    agent: FakeAgent,
}

impl Backend for FakeBackend {
    type Vm = FakeVm;

    fn boot(
        &self,
        pod_id: &SandboxId,
        _: &Spec,
        _: &Path,
        _: &Config,
    ) -> Result<FakeVm, BootError> {
        self.agent.call(format!("boot {pod_id}"));
        Ok(FakeVm {
            agent: self.agent.clone(),
        })
    }
}

impl PodVm for FakeVm {
    type Agent = FakeAgent;

    fn agent(&self) -> FakeAgent {
        self.agent.clone()
    }

    fn attach(
        &self,
        id: &str,
        role: &Role,
        sandbox_pid: Option<u32>,
        _: &[MountSpec],
        _: &mut Spec,
    ) -> Result<Vec<u32>, PodError> {
        if matches!(role, Role::Member { .. }) && sandbox_pid.is_none() {
            return Err(PodError::NoSandbox {
                id: id.to_owned(),
                pod: role.pod_id(id).to_owned(),
            });
        }
        self.agent.call(format!("attach {id}"));
        Ok(Vec::new())
    }

    fn network(&self, role: &Role) -> Option<Network> {
        let mut n = Network::new();
        n.interfaces.push(Default::default());
        (*role == Role::Sandbox).then_some(n)
    }

    fn record_owner(&self, bundle: &Path) {
        self.agent.call(format!("owner {}", bundle.display()));
    }

    fn release(&self, id: &str) {
        self.agent.call(format!("release {id}"));
    }

    fn kill(&self) {
        self.agent.call("kill vm".into());
        self.agent.guest().dead = true;
        self.agent.guest.1.notify_all();
    }

    fn verdict(&self) -> Option<Verdict> {
        self.agent.guest().verdict.clone()
    }

    fn shutdown(self) {
        self.agent.call("shutdown".into());
        self.agent.guest().shutdowns += 1;
    }
}

struct Pod {
    pod: PodService<FakeBackend>,
    events: Receiver<Event>,
    agent: FakeAgent,
    dir: tempfile::TempDir,
}

fn pod() -> Pod {
    let agent = FakeAgent::default();
    let (tx, events) = channel();
    let pod = PodService::new(
        FakeBackend {
            agent: agent.clone(),
        },
        tx,
    );
    Pod {
        pod,
        events,
        agent,
        dir: tempfile::tempdir().unwrap(),
    }
}

fn spec(args: &[&str], annotations: Value) -> Spec {
    serde_json::from_value(json!({
        "process": { "args": args, "user": { "uid": 0, "gid": 0 }, "cwd": "/" },
        "annotations": annotations,
    }))
    .unwrap()
}

impl Pod {
    /// An Io whose stdout goes to a file (containerd's would be a FIFO).
    fn io(&self, name: &str) -> Io {
        let stdout = self.dir.path().join(format!("{name}.out"));
        std::fs::File::create(&stdout).unwrap();
        Io {
            stdout: super::stdio::Stream::Path(stdout),
            ..Io::default()
        }
    }

    fn create(&self, id: &str, spec: Spec) -> Result<(), PodApiError> {
        self.pod.create(CreateRequest {
            id: cid(id),
            bundle: PathBuf::from("/bundles").join(id),
            spec,
            rootfs: Vec::new(),
            io: self.io(id),
            config: Config::default(),
        })
    }

    fn exec_spec(args: &[&str]) -> Vec<u8> {
        serde_json::to_vec(&json!({ "args": args, "user": { "uid": 0, "gid": 0 }, "cwd": "/" }))
            .unwrap()
    }

    /// The next event, which must come within a second.
    fn next(&self) -> Event {
        self.events
            .recv_timeout(Duration::from_secs(1))
            .expect("an event")
    }

    fn kinds(&self) -> Vec<String> {
        std::iter::from_fn(|| self.events.recv_timeout(Duration::from_millis(200)).ok())
            .map(|e| {
                format!("{e:?}")
                    .split([' ', '{'])
                    .next()
                    .unwrap()
                    .to_owned()
            })
            .collect()
    }

    fn output(&self, name: &str) -> String {
        let mut s = String::new();
        std::fs::File::open(self.dir.path().join(format!("{name}.out")))
            .map(|mut f| f.read_to_string(&mut s))
            .ok();
        s
    }
}

/// A container id as the shim parses it.
fn cid(id: &str) -> ContainerId {
    ContainerId::parse(id).unwrap()
}

/// An exec id as the shim parses it ("": the init).
fn eid(id: &str) -> Option<ExecId> {
    (!id.is_empty()).then(|| xid(id))
}

fn xid(id: &str) -> ExecId {
    ExecId::parse(id).unwrap()
}

fn run(p: &Pod, id: &str) -> u32 {
    p.create(id, spec(&["sleep"], json!({}))).unwrap();
    p.pod.start(&cid(id), eid("").as_ref()).unwrap()
}

#[test]
fn events_come_in_order_and_an_exit_only_after_its_output() {
    let p = pod();
    let pid = run(&p, "c1");
    assert!(matches!(p.next(), Event::Created { id, .. } if id == "c1"));
    assert_eq!(
        p.next(),
        Event::Started {
            id: "c1".into(),
            pid
        }
    );
    p.pod
        .add_exec(
            &cid("c1"),
            &xid("e1"),
            Pod::exec_spec(&["echo"]),
            p.io("e1"),
        )
        .unwrap();
    let epid = p.pod.start(&cid("c1"), eid("e1").as_ref()).unwrap();
    // Output the guest wrote before the exit is on the host when the exit
    // event comes.
    let big = "x".repeat(200_000);
    let writer = {
        let a = p.agent.clone();
        let big = big.clone();
        std::thread::spawn(move || {
            a.write("c1", "e1", "stdout", big.as_bytes());
            a.exit("c1", "e1", 3);
        })
    };
    assert_eq!(
        p.next(),
        Event::ExecAdded {
            id: "c1".into(),
            exec_id: "e1".into()
        }
    );
    assert_eq!(
        p.next(),
        Event::ExecStarted {
            id: "c1".into(),
            exec_id: "e1".into(),
            pid: epid
        }
    );
    match p.next() {
        Event::Exited {
            exec_id, pid, exit, ..
        } => {
            assert_eq!((exec_id.as_str(), pid, exit.status), ("e1", epid, 3));
            assert_eq!(p.output("e1").len(), big.len(), "output not drained");
        }
        e => panic!("expected the exec's exit, got {e:?}"),
    }
    writer.join().unwrap();
    p.agent.exit("c1", "", 0);
    assert!(matches!(p.next(), Event::Exited { exec_id, .. } if exec_id.is_empty()));
    p.pod.delete(&cid("c1"), eid("").as_ref()).unwrap();
    assert!(matches!(p.next(), Event::Deleted { id, pid: d, .. } if id == "c1" && d == pid));
}

#[test]
fn an_exec_before_start_is_refused_and_after_start_it_runs() {
    let p = pod();
    p.create("c1", spec(&["sleep"], json!({}))).unwrap();
    let e = p
        .pod
        .add_exec(
            &cid("c1"),
            &xid("e1"),
            Pod::exec_spec(&["true"]),
            Io::default(),
        )
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::FailedPrecondition, "{e}");
    assert!(e.to_string().contains("not running"), "{e}");
    p.pod.start(&cid("c1"), eid("").as_ref()).unwrap();
    p.pod
        .add_exec(
            &cid("c1"),
            &xid("e1"),
            Pod::exec_spec(&["true"]),
            Io::default(),
        )
        .unwrap();
    assert_eq!(
        p.pod
            .process_state(&cid("c1"), eid("e1").as_ref())
            .unwrap()
            .status,
        Status::Created
    );
    let dup = p
        .pod
        .add_exec(
            &cid("c1"),
            &xid("e1"),
            Pod::exec_spec(&["true"]),
            Io::default(),
        )
        .unwrap_err();
    assert_eq!(dup.kind(), ErrorKind::AlreadyExists);
    p.pod.start(&cid("c1"), eid("e1").as_ref()).unwrap();
    let again = p.pod.start(&cid("c1"), eid("e1").as_ref()).unwrap_err();
    assert_eq!(again.kind(), ErrorKind::FailedPrecondition);
    p.agent.exit("c1", "e1", 0);
    assert_eq!(
        p.pod.wait(&cid("c1"), eid("e1").as_ref()).unwrap().status,
        0
    );
}

#[test]
fn kill_after_exit_is_done_for_an_init_and_not_found_for_an_exec() {
    let p = pod();
    run(&p, "c1");
    start_exec(&p, "c1", "e1", &["true"]);
    p.agent.exit("c1", "e1", 0);
    p.pod.wait(&cid("c1"), eid("e1").as_ref()).unwrap();
    let e = p
        .pod
        .kill(&cid("c1"), eid("e1").as_ref(), 9, false)
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::NotFound, "{e}");
    p.pod.kill(&cid("c1"), eid("").as_ref(), 15, false).unwrap();
    assert_eq!(
        p.pod.wait(&cid("c1"), eid("").as_ref()).unwrap().status,
        128 + 15
    );
    p.pod.kill(&cid("c1"), eid("").as_ref(), 9, false).unwrap();
    let signals = p
        .agent
        .calls()
        .into_iter()
        .filter(|c| c.starts_with("signal"))
        .count();
    assert_eq!(signals, 1, "signals after exit reached the guest");
}

/// containerd answers an exit by killing, deleting and closing its
/// connection to the shim: a Kill still waiting on the guest then fails with
/// "ttrpc: closed" (seen in CI as StopPodSandbox's "failed to kill
/// container"). So a process's exit is published only after the kills in
/// flight on it have returned.
#[test]
fn an_exit_is_published_only_after_the_kill_that_caused_it_returns() {
    let p = pod();
    run(&p, "c1");
    assert_eq!(p.kinds(), ["Created", "Started"]);
    p.agent.guest().signal_lag = Duration::from_millis(300);
    let killer = {
        let pod = p.pod.clone();
        std::thread::spawn(move || pod.kill(&cid("c1"), eid("").as_ref(), 9, false).unwrap())
    };
    match p.next() {
        Event::Exited { exec_id, exit, .. } => {
            assert_eq!((exec_id.as_str(), exit.status), ("", 137));
            assert!(
                p.agent.calls().iter().any(|c| c == "replied to signal c1"),
                "the exit was published while the kill that caused it was in flight"
            );
        }
        e => panic!("expected the exit, got {e:?}"),
    }
    killer.join().unwrap();
}

/// Adds and starts exec `exec_id` of container `id`.
fn start_exec(p: &Pod, id: &str, exec_id: &str, args: &[&str]) -> u32 {
    p.pod
        .add_exec(&cid(id), &xid(exec_id), Pod::exec_spec(args), Io::default())
        .unwrap();
    p.pod.start(&cid(id), eid(exec_id).as_ref()).unwrap()
}

/// Runs c1 with exec e1 in a pod whose kill grace is `grace_ms`.
fn run_with_exec(p: &Pod, grace_ms: u64) {
    let mut config = Config::default();
    config.agent.kill_timeout_ms = grace_ms;
    p.pod
        .create(CreateRequest {
            id: cid("c1"),
            bundle: PathBuf::from("/bundles/c1"),
            spec: spec(&["sleep"], json!({})),
            rootfs: Vec::new(),
            io: p.io("c1"),
            config,
        })
        .unwrap();
    p.pod.start(&cid("c1"), None).unwrap();
    start_exec(p, "c1", "e1", &["sleep"]);
    assert_eq!(
        p.kinds(),
        ["Created", "Started", "ExecAdded", "ExecStarted"]
    );
}

#[test]
fn a_guest_that_never_reports_a_sigkilled_init_has_its_vm_killed_and_every_process_137() {
    let p = pod();
    p.agent.guest().ignore_kills = true;
    run_with_exec(&p, 200);
    let start = std::time::Instant::now();
    p.pod.kill(&cid("c1"), None, 9, false).unwrap();
    assert_eq!(p.pod.wait(&cid("c1"), None).unwrap().status, 137);
    let took = start.elapsed();
    assert!(
        took >= Duration::from_millis(200) && took < Duration::from_secs(3),
        "{took:?}"
    );
    assert_eq!(
        p.pod.wait(&cid("c1"), eid("e1").as_ref()).unwrap().status,
        137
    );
    assert!(p.agent.calls().contains(&"kill vm".to_owned()));
    // One exit each, though the killed VM then fails every wait.
    let mut exits: Vec<(String, u32)> =
        std::iter::from_fn(|| p.events.recv_timeout(Duration::from_millis(300)).ok())
            .filter_map(|e| match e {
                Event::Exited { exec_id, exit, .. } => Some((exec_id, exit.status)),
                _ => None,
            })
            .collect();
    exits.sort();
    assert_eq!(exits, [("".to_owned(), 137), ("e1".to_owned(), 137)]);
    assert_eq!(p.pod.delete(&cid("c1"), None).unwrap().1.status, 137);
}

/// StopPodSandbox SIGKILLs the members first and waits for each: a guest
/// that swallows a member's kill would pin it, so the member's kill is
/// enforced too, with the whole VM.
#[test]
fn a_guest_that_never_reports_a_sigkilled_member_has_its_vm_killed_and_every_process_137() {
    let p = pod();
    let mut config = Config::default();
    config.agent.kill_timeout_ms = 200;
    p.pod
        .create(CreateRequest {
            id: cid("p1"),
            bundle: PathBuf::from("/bundles/p1"),
            spec: spec(
                &["pause"],
                json!({ "io.kubernetes.cri.container-type": "sandbox" }),
            ),
            rootfs: Vec::new(),
            io: p.io("p1"),
            config,
        })
        .unwrap();
    p.pod.start(&cid("p1"), None).unwrap();
    run_member(
        &p,
        "a",
        spec(
            &["sleep"],
            json!({ "io.kubernetes.cri.container-type": "container",
                    "io.kubernetes.cri.sandbox-id": "p1" }),
        ),
    );
    p.agent.guest().ignore_kills = true;
    let start = std::time::Instant::now();
    p.pod.kill(&cid("a"), None, 9, false).unwrap();
    // Polled, so a missing enforcement fails here instead of hanging.
    let exit = loop {
        let state = p.pod.process_state(&cid("a"), None).unwrap();
        if let Some(exit) = state.exit {
            break exit;
        }
        assert!(
            start.elapsed() < Duration::from_secs(3),
            "no exit 3 s after a SIGKILL the guest swallowed"
        );
        std::thread::sleep(Duration::from_millis(10));
    };
    assert_eq!(exit.status, 137);
    let took = start.elapsed();
    assert!(
        took >= Duration::from_millis(200) && took < Duration::from_secs(3),
        "{took:?}"
    );
    assert_eq!(p.pod.wait(&cid("p1"), None).unwrap().status, 137);
    assert!(p.agent.calls().contains(&"kill vm".to_owned()));
}

#[test]
fn a_guest_that_reports_the_exit_in_time_keeps_its_vm_and_other_signals_arm_nothing() {
    let p = pod();
    run_with_exec(&p, 200);
    // An exec's SIGKILL, and a SIGTERM the guest ignores: no enforcement.
    p.pod
        .kill(&cid("c1"), eid("e1").as_ref(), 9, false)
        .unwrap();
    assert_eq!(
        p.pod.wait(&cid("c1"), eid("e1").as_ref()).unwrap().status,
        137
    );
    p.agent.guest().ignore_kills = true;
    p.pod.kill(&cid("c1"), None, 15, false).unwrap();
    std::thread::sleep(Duration::from_millis(400));
    assert!(p
        .pod
        .process_state(&cid("c1"), None)
        .unwrap()
        .exit
        .is_none());
    p.agent.guest().ignore_kills = false;
    p.pod.kill(&cid("c1"), None, 9, false).unwrap();
    assert_eq!(p.pod.wait(&cid("c1"), None).unwrap().status, 137);
    std::thread::sleep(Duration::from_millis(400));
    assert!(!p.agent.calls().contains(&"kill vm".to_owned()));
}

#[test]
fn waits_a_pod_holds_are_bounded() {
    use super::service::MAX_PENDING_WAITS;
    let p = pod();
    run(&p, "c1");
    let waiters: Vec<_> = (0..MAX_PENDING_WAITS)
        .map(|_| {
            let pod = p.pod.clone();
            std::thread::spawn(move || pod.wait(&cid("c1"), None).unwrap().status)
        })
        .collect();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while p.pod.waiting(&cid("c1"), None) < MAX_PENDING_WAITS {
        assert!(
            std::time::Instant::now() < deadline,
            "waiters never blocked"
        );
        std::thread::yield_now();
    }
    let e = p.pod.wait(&cid("c1"), None).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::ResourceExhausted, "{e}");
    p.agent.exit("c1", "", 0);
    for w in waiters {
        assert_eq!(w.join().unwrap(), 0);
    }
    assert_eq!(
        p.pod.wait(&cid("c1"), None).unwrap().status,
        0,
        "room again"
    );
}

#[test]
fn a_guest_reporting_ooms_in_a_loop_gets_one_event_per_gap() {
    let p = pod();
    p.agent.guest().oom_flood = true;
    run(&p, "c1");
    let window = OOM_EVENT_GAP * 2 + OOM_EVENT_GAP / 2;
    let start = std::time::Instant::now();
    let mut ooms = 0;
    while start.elapsed() < window {
        if let Ok(Event::Oom { .. }) = p.events.recv_timeout(window - start.elapsed().min(window)) {
            ooms += 1;
        }
    }
    let reported = p
        .agent
        .calls()
        .iter()
        .filter(|c| c.starts_with("oom"))
        .count();
    assert_eq!(
        ooms, 3,
        "OOM events in {window:?} ({reported} reported by the guest)"
    );
    assert!(
        reported <= 4,
        "the guest is asked at most once per event: {reported}"
    );
    p.agent.guest().oom_flood = false;
    p.pod.kill(&cid("c1"), eid("").as_ref(), 9, false).unwrap();
}

/// The VM's end under a running pod: killed by the host's OOM killer or
/// stalled at its cgroup's memory limit, its processes end 137 and their
/// containers get an OOM event first (what CRI turns into `OOMKilled`);
/// died otherwise, they end 255 without one.
#[test]
fn processes_lost_with_an_oom_killed_vm_end_137_after_an_oom_event() {
    let (cgroup, limit_mib) = ("/kubepods/pod1/abc".to_owned(), Some(300));
    let silent = Verdict::AgentSilent {
        after: Duration::from_secs(3),
        error: "timed out".into(),
    };
    let cases = [
        Verdict::OomKilled {
            cgroup: cgroup.clone(),
            limit_mib,
            then: Box::new(Verdict::VmmExited),
        },
        Verdict::AtMemoryLimit {
            cgroup,
            limit_mib,
            then: Box::new(silent.clone()),
        },
        Verdict::VmmExited,
        silent,
    ];
    for verdict in cases {
        let oom = verdict.out_of_memory();
        let status = if oom { 137 } else { FAILED_START_STATUS };
        let p = pod();
        run_with_exec(&p, 200);
        while p.events.recv_timeout(Duration::from_millis(100)).is_ok() {}
        {
            let mut g = p.agent.guest();
            g.verdict = Some(verdict);
            // The VM's end closes every stream with the agent connection.
            g.streams.clear();
            g.dead = true;
            p.agent.guest.1.notify_all();
        }
        assert_eq!(p.pod.wait(&cid("c1"), None).unwrap().status, status);
        let e1 = eid("e1");
        assert_eq!(p.pod.wait(&cid("c1"), e1.as_ref()).unwrap().status, status);
        let events: Vec<Event> =
            std::iter::from_fn(|| p.events.recv_timeout(Duration::from_millis(200)).ok()).collect();
        let oom_at = events.iter().position(|e| matches!(e, Event::Oom { .. }));
        let init_exit_at = events
            .iter()
            .position(|e| matches!(e, Event::Exited { exec_id, .. } if exec_id.is_empty()));
        let ooms = events
            .iter()
            .filter(|e| matches!(e, Event::Oom { .. }))
            .count();
        assert_eq!(ooms, usize::from(oom), "{events:?}");
        if oom {
            assert!(oom_at < init_exit_at, "the OOM comes first: {events:?}");
        }
    }
}

/// Returns once a Wait is blocked on each of `procs` (container, exec).
fn until_waiting(pod: &PodService<FakeBackend>, procs: &[(&str, &str)]) {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while procs
        .iter()
        .any(|(c, e)| pod.waiting(&cid(c), eid(e).as_ref()) == 0)
    {
        assert!(std::time::Instant::now() < deadline, "no Wait got pending");
        std::thread::yield_now();
    }
}

#[test]
fn a_wait_pending_at_delete_returns_and_one_after_it_finds_nothing() {
    let p = pod();
    run(&p, "c1");
    start_exec(&p, "c1", "e1", &["sleep"]);
    let waiter = {
        let pod = p.pod.clone();
        std::thread::spawn(move || pod.wait(&cid("c1"), eid("e1").as_ref()))
    };
    until_waiting(&p.pod, &[("c1", "e1")]);
    p.pod
        .kill(&cid("c1"), eid("e1").as_ref(), 9, false)
        .unwrap();
    let (_, exit) = {
        // The exit is recorded before delete reads it.
        p.pod.wait(&cid("c1"), eid("e1").as_ref()).unwrap();
        p.pod.delete(&cid("c1"), eid("e1").as_ref()).unwrap()
    };
    assert_eq!(exit.status, KILLED_STATUS);
    assert_eq!(waiter.join().unwrap().unwrap().status, KILLED_STATUS);
    let after = p.pod.wait(&cid("c1"), eid("e1").as_ref()).unwrap_err();
    assert_eq!(after.kind(), ErrorKind::NotFound, "{after}");
    // The container too: deleted without an exit, it reports SIGKILL's,
    // and a Wait pending on it (and on an exec of it) returns that.
    start_exec(&p, "c1", "e2", &["sleep"]);
    let waiters: Vec<_> = ["", "e2"]
        .into_iter()
        .map(|exec| {
            let pod = p.pod.clone();
            std::thread::spawn(move || pod.wait(&cid("c1"), eid(exec).as_ref()))
        })
        .collect();
    until_waiting(&p.pod, &[("c1", ""), ("c1", "e2")]);
    let (_, exit) = p.pod.delete(&cid("c1"), eid("").as_ref()).unwrap();
    assert_eq!(exit.status, KILLED_STATUS);
    for w in waiters {
        assert_eq!(w.join().unwrap().unwrap().status, KILLED_STATUS);
    }
    assert_eq!(
        p.pod.wait(&cid("c1"), eid("").as_ref()).unwrap_err().kind(),
        ErrorKind::NotFound
    );
    assert_eq!(
        p.pod
            .delete(&cid("c1"), eid("").as_ref())
            .unwrap_err()
            .kind(),
        ErrorKind::NotFound
    );
}

#[test]
fn an_exec_that_fails_to_start_has_ended_for_its_waiters() {
    let p = pod();
    run(&p, "c1");
    p.pod
        .add_exec(
            &cid("c1"),
            &xid("e1"),
            Pod::exec_spec(&["fail"]),
            Io::default(),
        )
        .unwrap();
    let e = p.pod.start(&cid("c1"), eid("e1").as_ref()).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Internal, "{e}");
    assert!(e.to_string().contains("no such binary"), "{e}");
    let exit = p.pod.wait(&cid("c1"), eid("e1").as_ref()).unwrap();
    assert_eq!(exit.status, FAILED_START_STATUS);
    assert_eq!(
        p.pod
            .process_state(&cid("c1"), eid("e1").as_ref())
            .unwrap()
            .status,
        Status::Stopped
    );
}

#[test]
fn the_agents_not_found_stays_not_found() {
    let p = pod();
    run(&p, "c1");
    // The guest lost the process the host still thinks runs.
    p.agent.guest().procs.clear();
    let e = p
        .pod
        .kill(&cid("c1"), eid("").as_ref(), 9, false)
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::NotFound, "{e}");
    assert_eq!(
        PodApiError::from(failed("boom".into())).kind(),
        ErrorKind::Internal
    );
}

#[test]
fn a_failed_create_leaves_nothing_and_stops_an_empty_pods_vm() {
    let p = pod();
    let e = p.create("c1", spec(&["fail"], json!({}))).unwrap_err();
    assert!(e.to_string().contains("no such binary"), "{e}");
    assert_eq!(
        p.agent.calls(),
        [
            "boot c1",
            "attach c1",
            "create c1",
            "release c1",
            "shutdown"
        ]
    );
    assert!(p.pod.is_empty());
    assert_eq!(p.pod.pod_id(), None);
    // The next create boots again.
    run(&p, "c1");
    assert_eq!(p.agent.guest().shutdowns, 1);
}

#[test]
fn a_pod_boots_once_and_its_vm_stops_with_the_last_container() {
    let p = pod();
    let sandbox = "p1";
    let member = |name: &str| {
        spec(
            &["sleep"],
            json!({ "io.kubernetes.cri.container-type": "container",
                    "io.kubernetes.cri.sandbox-id": name }),
        )
    };
    // An app container before its sandbox has nothing to join.
    let e = p.create("a", member(sandbox)).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::FailedPrecondition, "{e}");
    p.create(
        sandbox,
        spec(
            &["pause"],
            json!({ "io.kubernetes.cri.container-type": "sandbox" }),
        ),
    )
    .unwrap();
    p.pod.start(&cid(sandbox), eid("").as_ref()).unwrap();
    run_member(&p, "a", member(sandbox));
    run_member(&p, "b", member(sandbox));
    // Only the sandbox's new network namespace gets the pod's NIC.
    let creates: Vec<_> = p
        .agent
        .calls()
        .into_iter()
        .filter(|c| c.starts_with("create"))
        .collect();
    assert_eq!(creates, ["create p1 with 1 NIC", "create a", "create b"]);
    let other = p.create("x", member("p2")).unwrap_err();
    assert!(other.to_string().contains("not pod p2"), "{other}");
    assert_eq!(
        p.agent
            .calls()
            .iter()
            .filter(|c| c.starts_with("boot"))
            .count(),
        1
    );
    // The sandbox's exit ends the pod: its members are killed.
    p.agent.exit(sandbox, "", 0);
    for id in ["a", "b"] {
        assert_eq!(
            p.pod.wait(&cid(id), eid("").as_ref()).unwrap().status,
            128 + 9,
            "{id}"
        );
    }
    for id in ["a", sandbox] {
        p.pod.delete(&cid(id), eid("").as_ref()).unwrap();
        assert_eq!(
            p.agent.guest().shutdowns,
            0,
            "VM stopped before its last container"
        );
    }
    p.pod.delete(&cid("b"), eid("").as_ref()).unwrap();
    assert_eq!(p.agent.guest().shutdowns, 1);
    assert!(p.pod.is_empty());
}

fn run_member(p: &Pod, id: &str, spec: Spec) {
    p.create(id, spec).unwrap();
    p.pod.start(&cid(id), eid("").as_ref()).unwrap();
}

#[test]
fn pause_resume_and_state_follow_the_container() {
    let p = pod();
    p.create("c1", spec(&["sleep"], json!({}))).unwrap();
    let st = p.pod.process_state(&cid("c1"), eid("").as_ref()).unwrap();
    assert_eq!((st.status, st.pid), (Status::Created, 0));
    assert_eq!(st.bundle, Path::new("/bundles/c1"));
    let pid = p.pod.start(&cid("c1"), eid("").as_ref()).unwrap();
    p.pod.pause(&cid("c1")).unwrap();
    assert_eq!(
        p.pod
            .process_state(&cid("c1"), eid("").as_ref())
            .unwrap()
            .status,
        Status::Paused
    );
    p.pod.resume(&cid("c1")).unwrap();
    let st = p.pod.process_state(&cid("c1"), eid("").as_ref()).unwrap();
    assert_eq!((st.status, st.pid), (Status::Running, pid));
    assert_eq!(p.pod.pids(&cid("c1")).unwrap(), [pid]);
    assert_eq!(
        p.pod
            .update(&cid("c1"), b"not json".to_vec())
            .unwrap_err()
            .kind(),
        ErrorKind::InvalidArgument
    );
    p.pod.update(&cid("c1"), b"{}".to_vec()).unwrap();
    assert_eq!(
        p.kinds(),
        ["Created", "Started", "Paused", "Resumed"],
        "events"
    );
    assert_eq!(
        p.pod.pause(&cid("nope")).unwrap_err().kind(),
        ErrorKind::NotFound
    );
}
