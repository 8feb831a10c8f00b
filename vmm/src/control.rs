//! The control socket: pause, resume and shut down a running VM.
//!
//! The protocol is one request per line on a Unix stream socket, answered
//! by one line: `pause`, `resume`, `shutdown` or `status`, and
//! `ok running`, `ok paused`, `ok stopping` or `error <why>`. A connection
//! may send any number of requests. `status` follows the state with the
//! VM's counters as `name=value`, space-separated, when it has any
//! (`ok running balloon_discarded_bytes=1048576` with a virtio-balloon
//! device: guest RAM handed back to the host so far).
//!
//! Pausing parks every vCPU thread outside KVM_RUN: the control thread
//! raises the request, then kicks each vCPU thread with a real-time signal
//! (a vCPU in KVM_RUN returns EINTR) until all of them have parked. A vCPU
//! checks the request before each KVM_RUN, so a kick that lands just before
//! the ioctl is followed by another one. `pause` answers only once the
//! guest is stopped.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, Once};
use std::time::{Duration, Instant};

/// How long `pause` waits for every vCPU to park.
const PAUSE_TIMEOUT: Duration = Duration::from_secs(2);
/// How often a vCPU that has not parked yet is kicked again.
const KICK_INTERVAL: Duration = Duration::from_millis(5);
/// Longest request line; anything longer ends the connection.
const MAX_REQUEST: u64 = 64;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Request {
    Pause,
    Resume,
    Shutdown,
    Status,
}

impl std::str::FromStr for Request {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s.trim() {
            "pause" => Ok(Self::Pause),
            "resume" => Ok(Self::Resume),
            "shutdown" => Ok(Self::Shutdown),
            "status" => Ok(Self::Status),
            other => Err(format!(
                "unknown request {other:?}; expected pause, resume, shutdown or status"
            )),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Want {
    Run,
    Pause,
    Stop,
}

struct Inner {
    want: Want,
    /// vCPU threads inside a run loop, by pthread handle.
    threads: Vec<libc::pthread_t>,
    /// How many of them are parked.
    parked: usize,
}

/// The VM's run state, shared by its vCPU threads and its controllers.
pub struct RunState {
    /// Fast path for the vCPU loop: false while nothing is asked of it.
    asked: AtomicBool,
    inner: Mutex<Inner>,
    changed: Condvar,
    /// What `status` reports after the state, as `name=value`.
    counters: Mutex<Vec<(&'static str, Arc<AtomicU64>)>>,
}

/// The signal that kicks a vCPU thread out of KVM_RUN.
fn kick_signal() -> libc::c_int {
    vmm_sys_util::signal::SIGRTMIN()
}

extern "C" fn on_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}

impl RunState {
    pub fn new() -> Arc<Self> {
        static HANDLER: Once = Once::new();
        HANDLER.call_once(|| {
            // Without a handler the real-time signal would end the process;
            // a failure here leaves pause and shutdown timing out, not the
            // VM unsafe.
            if let Err(e) = vmm_sys_util::signal::register_signal_handler(kick_signal(), on_kick) {
                tracing::error!("cannot install the vCPU kick handler: {e}");
            }
        });
        Arc::new(Self {
            asked: AtomicBool::new(false),
            inner: Mutex::new(Inner {
                want: Want::Run,
                threads: Vec::new(),
                parked: 0,
            }),
            changed: Condvar::new(),
            counters: Mutex::new(Vec::new()),
        })
    }

    /// Has `status` report `counter` as `name=value` after the state.
    pub fn report(&self, name: &'static str, counter: Arc<AtomicU64>) {
        self.counters
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push((name, counter));
    }

    /// The counters as ` name=value` each.
    fn counters(&self) -> String {
        let counters = self.counters.lock().unwrap_or_else(|e| e.into_inner());
        counters
            .iter()
            .map(|(name, c)| format!(" {name}={}", c.load(Ordering::Relaxed)))
            .collect()
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Registers the calling thread as a vCPU thread until the guard drops.
    pub fn enter(self: &Arc<Self>) -> VcpuGuard {
        // SAFETY: pthread_self has no preconditions.
        let me = unsafe { libc::pthread_self() };
        self.lock().threads.push(me);
        VcpuGuard {
            state: self.clone(),
            me,
        }
    }

    /// Called by a vCPU thread before each KVM_RUN: blocks while the VM is
    /// paused; true when the VM is to stop (the vCPU leaves its loop).
    pub fn checkpoint(&self) -> bool {
        if !self.asked.load(Ordering::Acquire) {
            return false;
        }
        let mut g = self.lock();
        if g.want == Want::Pause {
            g.parked += 1;
            self.changed.notify_all();
            while g.want == Want::Pause {
                g = self.changed.wait(g).unwrap_or_else(|e| e.into_inner());
            }
            g.parked -= 1;
        }
        g.want == Want::Stop
    }

    /// Kicks every vCPU thread, then waits for a change or the next kick.
    fn kick_and_wait<'a>(&'a self, g: MutexGuard<'a, Inner>) -> MutexGuard<'a, Inner> {
        Self::kick_all(&g);
        self.changed
            .wait_timeout(g, KICK_INTERVAL)
            .unwrap_or_else(|e| e.into_inner())
            .0
    }

    fn kick_all(g: &Inner) {
        for &t in &g.threads {
            // SAFETY: every handle belongs to a thread that is inside its
            // run loop: it unregisters (under this lock) before it returns.
            unsafe { libc::pthread_kill(t, kick_signal()) };
        }
    }

    /// vCPU threads registered, and how many of them are parked.
    pub fn vcpu_counts(&self) -> (usize, usize) {
        let g = self.lock();
        (g.threads.len(), g.parked)
    }

    /// Stops every vCPU outside the guest; returns once all are parked.
    pub fn pause(&self) -> Result<(), String> {
        let mut g = self.lock();
        match g.want {
            Want::Stop => return Err("the VM is stopping".into()),
            Want::Pause if g.parked == g.threads.len() => return Ok(()),
            _ => {}
        }
        g.want = Want::Pause;
        self.asked.store(true, Ordering::Release);
        let deadline = Instant::now() + PAUSE_TIMEOUT;
        while g.parked < g.threads.len() {
            if Instant::now() >= deadline {
                let (parked, all) = (g.parked, g.threads.len());
                g.want = Want::Run;
                self.asked.store(false, Ordering::Release);
                self.changed.notify_all();
                return Err(format!(
                    "only {parked} of {all} vCPUs stopped within {PAUSE_TIMEOUT:?}; the VM keeps running"
                ));
            }
            g = self.kick_and_wait(g);
        }
        Ok(())
    }

    pub fn resume(&self) -> Result<(), String> {
        let mut g = self.lock();
        if g.want == Want::Stop {
            return Err("the VM is stopping".into());
        }
        g.want = Want::Run;
        self.asked.store(false, Ordering::Release);
        self.changed.notify_all();
        Ok(())
    }

    /// Asks every vCPU to leave the guest and its run loop (the VM ends
    /// stopped); does not wait for them.
    pub fn shutdown(&self) {
        let mut g = self.lock();
        g.want = Want::Stop;
        self.asked.store(true, Ordering::Release);
        self.changed.notify_all();
        Self::kick_all(&g);
        // A vCPU on its way into KVM_RUN may miss one kick.
        let deadline = Instant::now() + PAUSE_TIMEOUT;
        while !g.threads.is_empty() && Instant::now() < deadline {
            g = self.kick_and_wait(g);
        }
    }

    pub fn status(&self) -> &'static str {
        let g = self.lock();
        match g.want {
            Want::Run => "running",
            Want::Pause => "paused",
            Want::Stop => "stopping",
        }
    }

    /// Carries out one request; the reply line without its newline.
    pub fn handle(&self, request: Request) -> String {
        let r = match request {
            Request::Pause => self.pause(),
            Request::Resume => self.resume(),
            Request::Shutdown => {
                self.shutdown();
                Ok(())
            }
            Request::Status => Ok(()),
        };
        match r {
            Ok(()) if request == Request::Status => {
                format!("ok {}{}", self.status(), self.counters())
            }
            Ok(()) => format!("ok {}", self.status()),
            Err(e) => format!("error {e}"),
        }
    }
}

/// A vCPU thread's registration with its [`RunState`].
pub struct VcpuGuard {
    state: Arc<RunState>,
    me: libc::pthread_t,
}

impl Drop for VcpuGuard {
    fn drop(&mut self) {
        let mut g = self.state.lock();
        // SAFETY: comparing two pthread handles has no preconditions.
        g.threads
            .retain(|&t| unsafe { libc::pthread_equal(t, self.me) } == 0);
        self.state.changed.notify_all();
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("control socket {0} already exists; remove it if no husk-vmm uses it, or choose another path")]
    Exists(PathBuf),
    #[error("control socket {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// The listening control socket; removed when dropped.
pub struct ControlSocket {
    path: PathBuf,
    listener: Option<UnixListener>,
}

impl ControlSocket {
    /// Creates the socket, readable and writable by its owner only.
    pub fn bind(path: &Path) -> Result<Self, ControlError> {
        if path.symlink_metadata().is_ok() {
            return Err(ControlError::Exists(path.to_path_buf()));
        }
        let io = |source| ControlError::Io {
            path: path.to_path_buf(),
            source,
        };
        let listener = UnixListener::bind(path).map_err(io)?;
        let socket = Self {
            path: path.to_path_buf(),
            listener: Some(listener),
        };
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(io)?;
        Ok(socket)
    }

    /// Answers requests for `state` on a thread of its own, one connection
    /// at a time.
    pub fn serve(&mut self, state: Arc<RunState>) -> Result<(), ControlError> {
        let Some(listener) = self.listener.take() else {
            return Ok(());
        };
        std::thread::Builder::new()
            .name("control".into())
            .spawn(move || {
                crate::seccomp::enter(crate::seccomp::ThreadKind::Control);
                for conn in listener.incoming().flatten() {
                    serve_connection(conn, &state);
                }
            })
            .map(|_| ())
            .map_err(|source| ControlError::Io {
                path: self.path.clone(),
                source,
            })
    }
}

impl Drop for ControlSocket {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

fn serve_connection(conn: UnixStream, state: &RunState) {
    let Ok(mut out) = conn.try_clone() else {
        return;
    };
    let mut reader = BufReader::new(conn);
    loop {
        let mut line = String::new();
        match reader.by_ref().take(MAX_REQUEST).read_line(&mut line) {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        if !line.ends_with('\n') {
            let _ = writeln!(out, "error request longer than {MAX_REQUEST} bytes");
            // Read what the client sent before closing: a close with
            // unread data resets the connection, and the client would
            // lose the reply.
            let _ = reader
                .get_ref()
                .set_read_timeout(Some(Duration::from_secs(1)));
            let _ = reader
                .by_ref()
                .take(64 << 10)
                .read_until(b'\n', &mut Vec::new());
            return;
        }
        let reply = match line.parse::<Request>() {
            // Answered first: the process ends once the vCPUs are out.
            Ok(Request::Shutdown) => {
                let _ = writeln!(out, "ok stopping");
                state.shutdown();
                continue;
            }
            Ok(r) => state.handle(r),
            Err(e) => format!("error {e}"),
        };
        if writeln!(out, "{reply}").is_err() {
            return;
        }
    }
}

/// SIGTERM and SIGINT as a set.
fn stop_signals() -> libc::sigset_t {
    // SAFETY: sigemptyset/sigaddset initialise and fill a local set.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::sigaddset(&mut set, libc::SIGINT);
        set
    }
}

/// Blocks SIGTERM and SIGINT in the calling thread and so in every thread
/// it starts afterwards: they wait for [`stop_on_signals`] instead of
/// ending the process with the control socket left behind. Call it before
/// any other thread exists.
pub fn block_stop_signals() -> std::io::Result<()> {
    let set = stop_signals();
    // SAFETY: a valid set; the old mask is not wanted.
    let rc = unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
    if rc != 0 {
        return Err(std::io::Error::from_raw_os_error(rc));
    }
    Ok(())
}

/// Starts a thread that takes SIGTERM or SIGINT (blocked beforehand with
/// [`block_stop_signals`]) and shuts the VM down as the control socket's
/// `shutdown` does.
pub fn stop_on_signals(state: Arc<RunState>) -> std::io::Result<()> {
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            crate::seccomp::enter(crate::seccomp::ThreadKind::Signals);
            let set = stop_signals();
            let mut sig: libc::c_int = 0;
            // SAFETY: a valid set and a place for the signal number.
            if unsafe { libc::sigwait(&set, &mut sig) } == 0 {
                let name = if sig == libc::SIGINT {
                    "SIGINT"
                } else {
                    "SIGTERM"
                };
                tracing::info!("{name}: stopping the VM");
                state.shutdown();
            }
        })
        .map(|_| ())
}

/// The client side: sends `request` to the socket at `path` and returns the
/// reply line.
pub fn request(path: &Path, request: &str) -> Result<String, ControlError> {
    let io = |source| ControlError::Io {
        path: path.to_path_buf(),
        source,
    };
    let mut conn = UnixStream::connect(path).map_err(io)?;
    conn.set_read_timeout(Some(PAUSE_TIMEOUT * 2)).map_err(io)?;
    writeln!(conn, "{}", request.trim()).map_err(io)?;
    let mut reply = String::new();
    BufReader::new(conn).read_line(&mut reply).map_err(io)?;
    Ok(reply.trim_end().to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_parse_and_unknown_ones_are_named() {
        assert_eq!("pause\n".parse::<Request>(), Ok(Request::Pause));
        assert_eq!(" resume ".parse::<Request>(), Ok(Request::Resume));
        let e = "reboot".parse::<Request>().unwrap_err();
        assert!(e.contains("\"reboot\"") && e.contains("pause"), "{e}");
    }

    #[test]
    fn a_paused_vcpu_thread_parks_until_resumed_and_leaves_on_shutdown() {
        let state = RunState::new();
        let (tx, rx) = std::sync::mpsc::channel();
        let s = state.clone();
        let rounds = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let r = rounds.clone();
        let vcpu = std::thread::spawn(move || {
            let _guard = s.enter();
            tx.send(()).unwrap();
            loop {
                if s.checkpoint() {
                    return "stopped";
                }
                r.fetch_add(1, Ordering::Relaxed);
                // Stands in for KVM_RUN: a sleep the kick interrupts.
                std::thread::sleep(Duration::from_millis(1));
            }
        });
        let advances = || {
            let before = rounds.load(Ordering::Relaxed);
            let deadline = Instant::now() + Duration::from_secs(10);
            while rounds.load(Ordering::Relaxed) == before {
                assert!(Instant::now() < deadline, "the vCPU thread does not run");
                std::thread::sleep(Duration::from_millis(1));
            }
        };
        rx.recv().unwrap();
        advances();
        assert_eq!(state.handle(Request::Pause), "ok paused");
        assert_eq!(state.lock().parked, 1);
        let at_pause = rounds.load(Ordering::Relaxed);
        std::thread::sleep(Duration::from_millis(50));
        assert_eq!(rounds.load(Ordering::Relaxed), at_pause, "ran while paused");
        assert_eq!(state.handle(Request::Pause), "ok paused");
        assert_eq!(state.handle(Request::Resume), "ok running");
        advances();
        assert_eq!(state.handle(Request::Shutdown), "ok stopping");
        assert_eq!(vcpu.join().unwrap(), "stopped");
        assert!(state.lock().threads.is_empty());
        assert!(state.handle(Request::Resume).starts_with("error "));
    }

    #[test]
    fn status_reports_the_counters_after_the_state_and_only_status_does() {
        let state = RunState::new();
        assert_eq!(state.handle(Request::Status), "ok running");
        let discarded = Arc::new(AtomicU64::new(0));
        state.report("balloon_discarded_bytes", discarded.clone());
        assert_eq!(
            state.handle(Request::Status),
            "ok running balloon_discarded_bytes=0"
        );
        discarded.fetch_add(2 << 20, Ordering::Relaxed);
        state.report("other", Arc::new(AtomicU64::new(7)));
        assert_eq!(
            state.handle(Request::Status),
            "ok running balloon_discarded_bytes=2097152 other=7"
        );
        assert_eq!(state.handle(Request::Resume), "ok running");
    }

    #[test]
    fn the_socket_answers_line_by_line_refuses_junk_and_is_removed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("api.sock");
        let mut socket = ControlSocket::bind(&path).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let e = ControlSocket::bind(&path).err().unwrap();
        assert!(e.to_string().contains("already exists"), "{e}");
        // No vCPU registered: pause succeeds at once.
        socket.serve(RunState::new()).unwrap();
        assert_eq!(request(&path, "status").unwrap(), "ok running");
        assert_eq!(request(&path, "pause").unwrap(), "ok paused");
        assert!(request(&path, "reboot")
            .unwrap()
            .starts_with("error unknown"));
        let long = "x".repeat(100);
        assert!(request(&path, &long).unwrap().contains("longer than"));
        drop(socket);
        assert!(!path.exists());
    }
}
