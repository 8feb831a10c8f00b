//! Liveness of a booted sandbox: one thread per sandbox watches the VMM
//! through a pidfd and asks the agent for a health check every interval.
//! When the VMM dies or the agent misses a check's deadline, the VM and its
//! daemons are killed and the agent connection is cut, so every RPC waiting
//! on the guest (the waits of the pod's processes above all) fails at once
//! and each process gets its exit instead of hanging with the guest.

use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::confine::process::{pidfd_kill, pidfd_open};
use crate::host::accounting::{oom_killed_since, Accounting, OomCounts};
use crate::vm::agent::{Agent, AgentError};

/// What a monitor needs to see: the VMM and the device daemons.
#[derive(Debug, Clone)]
pub struct Watched {
    pub vmm: u32,
    pub daemons: Vec<u32>,
}

/// Why a monitor stopped the VM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    VmmExited,
    AgentSilent {
        after: Duration,
        error: String,
    },
    AgentLying {
        invalid: u32,
    },
    /// `then`, after the host's OOM killer killed a process in the pod's
    /// cgroup (`cgroup`, limited at `limit_mib` there or above).
    OomKilled {
        cgroup: String,
        limit_mib: Option<u64>,
        then: Box<Verdict>,
    },
    /// `then`, with the pod's cgroup at its memory limit: its processes
    /// stalled in reclaim before the kernel chose a victim.
    AtMemoryLimit {
        cgroup: String,
        limit_mib: Option<u64>,
        then: Box<Verdict>,
    },
}

impl Verdict {
    /// Whether the pod's memory limit brought it down: the host's OOM
    /// killer took a process of it, or the VM stalled at the limit.
    pub fn out_of_memory(&self) -> bool {
        matches!(
            self,
            Verdict::OomKilled { .. } | Verdict::AtMemoryLimit { .. }
        )
    }

    /// `self` with what the pod's cgroup says of memory since `before`
    /// (its OOM-kill counts when the monitor started).
    fn with_memory(self, acc: &Accounting, before: OomCounts) -> Self {
        let (cgroup, limit_mib) = (
            acc.path.display().to_string(),
            acc.memory_limit().map(|b| b >> 20),
        );
        let then = Box::new(self);
        if oom_killed_since(before, acc.oom_kills()) {
            Verdict::OomKilled {
                cgroup,
                limit_mib,
                then,
            }
        } else if acc.at_memory_limit() {
            Verdict::AtMemoryLimit {
                cgroup,
                limit_mib,
                then,
            }
        } else {
            *then
        }
    }
}

/// The advice both memory verdicts end with.
const RAISE_THE_OVERHEAD: &str = "(the pod's containers' limits plus the RuntimeClass overhead); raise the overhead (`husk runtimeclass` measures it)";

fn limit_words(limit_mib: &Option<u64>) -> String {
    limit_mib.map_or_else(
        || "its memory limit".to_owned(),
        |m| format!("its memory limit of {m} MiB"),
    )
}

/// Invalid replies after which a guest is taken for dead: one may be a
/// bug, a stream of them is a guest that lies or has lost its mind.
pub const MAX_INVALID_REPLIES: u32 = 16;

impl std::fmt::Display for Verdict {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Verdict::VmmExited => write!(f, "the VMM exited"),
            Verdict::AgentSilent { after, error } => write!(
                f,
                "the agent failed a health check after {} ms ({error})",
                after.as_millis()
            ),
            Verdict::AgentLying { invalid } => {
                write!(f, "the agent sent {invalid} invalid replies")
            }
            Verdict::OomKilled {
                cgroup,
                limit_mib,
                then,
            } => write!(
                f,
                "{then} after the host's OOM killer killed a process of the pod: its cgroup {cgroup} reached {} {RAISE_THE_OVERHEAD}",
                limit_words(limit_mib)
            ),
            Verdict::AtMemoryLimit {
                cgroup,
                limit_mib,
                then,
            } => write!(
                f,
                "{then} while the pod's cgroup {cgroup} was at {}, the VM stalled in the host's memory reclaim {RAISE_THE_OVERHEAD}",
                limit_words(limit_mib)
            ),
        }
    }
}

/// How a monitor checks the guest; the real agent, or a fake in tests.
pub trait Health: Send + 'static {
    /// One health check that fails when it takes longer than `deadline`.
    fn check(&self, deadline: Duration) -> Result<(), AgentError>;
    /// Cuts the connection: every RPC in flight on it fails.
    fn sever(&self);
    /// Replies refused as invalid so far.
    fn invalid_replies(&self) -> u32;
}

impl Health for Agent {
    fn check(&self, deadline: Duration) -> Result<(), AgentError> {
        self.check_within(deadline)
    }

    fn invalid_replies(&self) -> u32 {
        Agent::invalid_replies(self)
    }

    fn sever(&self) {
        Agent::sever(self);
    }
}

/// A running monitor; dropping it stops the watching (not the VM).
pub struct Monitor {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<Option<Verdict>>>,
    /// Its verdict, set before it kills the VM and cuts the agent off.
    verdict: Arc<Mutex<Option<Verdict>>>,
}

impl Monitor {
    /// Watches sandbox `id`: a check every `interval`, each within
    /// `deadline`.
    pub fn start(
        id: &str,
        watched: Watched,
        health: impl Health,
        interval: Duration,
        deadline: Duration,
    ) -> std::io::Result<Self> {
        let vmm = pidfd_open(watched.vmm)?;
        let daemons = watched
            .daemons
            .iter()
            .map(|&pid| pidfd_open(pid))
            .collect::<std::io::Result<Vec<_>>>()?;
        let stop = Arc::new(AtomicBool::new(false));
        let verdict_cell = Arc::new(Mutex::new(None));
        // The OOM kills in the pod's cgroup so far: more at the end means
        // the host's OOM killer brought the pod down.
        let oom = Accounting::of(watched.vmm).map(|a| {
            let before = a.oom_kills();
            (a, before)
        });
        let id = id.to_owned();
        let thread = std::thread::Builder::new()
            .name(format!("monitor-{}", short(&id)))
            .spawn({
                let (stop, cell) = (stop.clone(), verdict_cell.clone());
                move || {
                    let mut verdict = watch(&vmm, &health, interval, deadline, &stop)?;
                    if stop.load(Ordering::SeqCst) {
                        return None;
                    }
                    if let Some((acc, before)) = &oom {
                        verdict = verdict.with_memory(acc, *before);
                    }
                    *cell.lock().unwrap_or_else(|e| e.into_inner()) = Some(verdict.clone());
                    if verdict.out_of_memory() {
                        tracing::error!(sandbox = %id, "{verdict}; stopping the VM and its daemons");
                    } else {
                        tracing::warn!(sandbox = %id, "{verdict}; stopping the VM and its daemons");
                    }
                    for fd in std::iter::once(&vmm).chain(&daemons) {
                        pidfd_kill(fd);
                    }
                    health.sever();
                    Some(verdict)
                }
            })?;
        Ok(Self {
            stop,
            thread: Some(thread),
            verdict: verdict_cell,
        })
    }

    /// Why the monitor stopped the VM, once it has.
    pub fn verdict(&self) -> Option<Verdict> {
        self.verdict
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Stops watching (an orderly shutdown is coming) without waiting.
    pub fn stop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        self.thread = None;
    }

    /// Waits for the monitor to act, for tests: its verdict, or `None` if
    /// it was stopped.
    pub fn join(mut self) -> Option<Verdict> {
        self.thread.take().and_then(|t| t.join().ok().flatten())
    }
}

impl Drop for Monitor {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

fn short(id: &str) -> &str {
    &id[..id.len().min(8)]
}

/// Watches until the VMM exits, a check fails or `stop` is set (`None`).
fn watch(
    vmm: &OwnedFd,
    health: &impl Health,
    interval: Duration,
    deadline: Duration,
    stop: &AtomicBool,
) -> Option<Verdict> {
    loop {
        if stop.load(Ordering::SeqCst) {
            return None;
        }
        if exited_within(vmm, interval) {
            return Some(Verdict::VmmExited);
        }
        if stop.load(Ordering::SeqCst) {
            return None;
        }
        let t = Instant::now();
        if let Err(e) = health.check(deadline) {
            if exited_within(vmm, Duration::ZERO) {
                return Some(Verdict::VmmExited);
            }
            return Some(Verdict::AgentSilent {
                after: t.elapsed(),
                error: crate::error_chain(&e),
            });
        }
        let invalid = health.invalid_replies();
        if invalid >= MAX_INVALID_REPLIES {
            return Some(Verdict::AgentLying { invalid });
        }
    }
}

/// Whether the process has exited, waiting up to `timeout`.
fn exited_within(fd: &OwnedFd, timeout: Duration) -> bool {
    let mut p = libc::pollfd {
        fd: fd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    let ms = timeout.as_millis().min(i32::MAX as u128) as i32;
    // SAFETY: one valid pollfd for the duration of the call.
    let n = unsafe { libc::poll(&mut p, 1, ms) };
    n > 0 && p.revents & libc::POLLIN != 0
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::{Child, Command};
    use std::sync::Mutex;

    /// A guest that answers until told to hang.
    #[derive(Clone, Default)]
    struct FakeHealth {
        hung: Arc<AtomicBool>,
        severed: Arc<AtomicBool>,
        checks: Arc<Mutex<u32>>,
        invalid: Arc<Mutex<u32>>,
    }

    impl Health for FakeHealth {
        fn check(&self, deadline: Duration) -> Result<(), AgentError> {
            *self.checks.lock().unwrap() += 1;
            if self.hung.load(Ordering::SeqCst) {
                std::thread::sleep(deadline);
                return Err(AgentError::Invalid {
                    rpc: "Check",
                    why: "deadline passed".into(),
                });
            }
            Ok(())
        }

        fn sever(&self) {
            self.severed.store(true, Ordering::SeqCst);
        }

        fn invalid_replies(&self) -> u32 {
            *self.invalid.lock().unwrap()
        }
    }

    fn sleeper() -> Child {
        Command::new("sleep").arg("60").spawn().unwrap()
    }

    fn watched(vmm: &Child, daemon: &Child) -> Watched {
        Watched {
            vmm: vmm.id(),
            daemons: vec![daemon.id()],
        }
    }

    const TICK: Duration = Duration::from_millis(20);

    #[test]
    fn a_hung_agent_gets_the_vm_and_daemons_killed_and_the_connection_cut() {
        let (mut vmm, mut daemon) = (sleeper(), sleeper());
        let h = FakeHealth::default();
        let m = Monitor::start("s1", watched(&vmm, &daemon), h.clone(), TICK, TICK).unwrap();
        std::thread::sleep(TICK * 5);
        assert!(*h.checks.lock().unwrap() >= 2, "checks are periodic");
        h.hung.store(true, Ordering::SeqCst);
        let t = Instant::now();
        let verdict = m.join().expect("a verdict");
        assert!(matches!(verdict, Verdict::AgentSilent { .. }), "{verdict}");
        assert!(t.elapsed() < Duration::from_secs(2));
        assert!(h.severed.load(Ordering::SeqCst));
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(vmm.wait().unwrap().signal(), Some(libc::SIGKILL));
        assert_eq!(daemon.wait().unwrap().signal(), Some(libc::SIGKILL));
    }

    #[test]
    fn a_dead_vmm_is_seen_at_once_and_the_daemons_go_with_it() {
        let (mut vmm, mut daemon) = (sleeper(), sleeper());
        let h = FakeHealth::default();
        let m = Monitor::start(
            "s2",
            watched(&vmm, &daemon),
            h.clone(),
            Duration::from_secs(30),
            TICK,
        )
        .unwrap();
        let t = Instant::now();
        vmm.kill().unwrap();
        assert_eq!(m.join(), Some(Verdict::VmmExited));
        assert!(
            t.elapsed() < Duration::from_secs(2),
            "waited for the interval"
        );
        assert!(h.severed.load(Ordering::SeqCst));
        vmm.wait().unwrap();
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(daemon.wait().unwrap().signal(), Some(libc::SIGKILL));
    }

    #[test]
    fn a_guest_that_keeps_sending_invalid_replies_is_taken_for_dead() {
        let (mut vmm, mut daemon) = (sleeper(), sleeper());
        let h = FakeHealth::default();
        let m = Monitor::start("s4", watched(&vmm, &daemon), h.clone(), TICK, TICK).unwrap();
        *h.invalid.lock().unwrap() = MAX_INVALID_REPLIES - 1;
        std::thread::sleep(TICK * 5);
        assert!(vmm.try_wait().unwrap().is_none(), "killed below the limit");
        *h.invalid.lock().unwrap() = MAX_INVALID_REPLIES;
        assert_eq!(
            m.join(),
            Some(Verdict::AgentLying {
                invalid: MAX_INVALID_REPLIES
            })
        );
        vmm.wait().unwrap();
        daemon.wait().unwrap();
    }

    #[test]
    fn a_stopped_monitor_leaves_everything_alone() {
        let (mut vmm, mut daemon) = (sleeper(), sleeper());
        let h = FakeHealth::default();
        let mut m = Monitor::start("s3", watched(&vmm, &daemon), h.clone(), TICK, TICK).unwrap();
        m.stop();
        drop(m);
        h.hung.store(true, Ordering::SeqCst);
        std::thread::sleep(TICK * 10);
        assert!(vmm.try_wait().unwrap().is_none());
        assert!(daemon.try_wait().unwrap().is_none());
        assert!(!h.severed.load(Ordering::SeqCst));
        vmm.kill().unwrap();
        daemon.kill().unwrap();
        vmm.wait().unwrap();
        daemon.wait().unwrap();
    }

    /// What the pod's cgroup says turns a verdict into a memory one: more
    /// OOM kills than at the start, else usage at the limit; neither, the
    /// verdict stands.
    #[test]
    fn a_verdict_names_the_memory_limit_when_the_cgroup_shows_it() {
        use crate::host::accounting::Accounting;
        let root = tempfile::tempdir().unwrap();
        let pod = root.path().join("pod1");
        let sandbox = pod.join("abc");
        std::fs::create_dir_all(&sandbox).unwrap();
        let w = |d: &std::path::Path, f: &str, v: String| std::fs::write(d.join(f), v).unwrap();
        let oom = |n: u32| format!("oom_kill_disable 0\nunder_oom 0\noom_kill {n}\n");
        w(&pod, "memory.limit_in_bytes", format!("{}", 100u64 << 20));
        w(&pod, "memory.usage_in_bytes", format!("{}", 50u64 << 20));
        w(&sandbox, "memory.oom_control", oom(0));
        w(&pod, "memory.oom_control", oom(0));
        let acc = Accounting::v1_at(&sandbox, root.path());
        let before = acc.oom_kills();
        let silent = Verdict::AgentSilent {
            after: Duration::from_secs(3),
            error: "timed out".into(),
        };
        assert_eq!(silent.clone().with_memory(&acc, before), silent);

        w(&pod, "memory.usage_in_bytes", format!("{}", 99u64 << 20));
        let stalled = silent.clone().with_memory(&acc, before);
        assert!(
            matches!(&stalled, Verdict::AtMemoryLimit { limit_mib: Some(100), then, .. } if **then == silent),
            "{stalled:?}"
        );
        let words = stalled.to_string();
        assert!(
            words.contains("was at its memory limit of 100 MiB")
                && words.contains("husk runtimeclass"),
            "{words}"
        );

        w(&sandbox, "memory.oom_control", oom(1));
        let killed = Verdict::VmmExited.with_memory(&acc, before);
        assert!(matches!(killed, Verdict::OomKilled { .. }), "{killed:?}");
        assert!(killed.out_of_memory() && stalled.out_of_memory() && !silent.out_of_memory());
    }
}
