//! Reaps every child of PID 1, orphans included, from one thread.
//!
//! SIGCHLD is blocked in all threads and read through a signalfd, so no exit
//! is missed and no signal handler runs. A process whose exit status someone
//! is waiting for is registered with [`Reaper::watch`]; the rest are reaped
//! and forgotten, as init must.

use std::collections::HashMap;
use std::os::fd::{AsFd, FromRawFd};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Mutex, MutexGuard};

use nix::sys::signal::{SigSet, Signal};
use nix::sys::signalfd::{SfdFlags, SignalFd};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;

type Watchers = Arc<Mutex<HashMap<i32, Sender<WaitStatus>>>>;

/// Handle on the reaper thread.
#[derive(Clone)]
pub struct Reaper {
    watchers: Watchers,
    /// Held by the reaper while it reaps, and by code that forks and waits
    /// for its own children (libcontainer), so the reaper cannot take an exit
    /// status someone else is about to wait for.
    fork_lock: Arc<Mutex<()>>,
}

impl Reaper {
    /// Blocks SIGCHLD for the calling thread (and every thread it starts
    /// afterwards) and starts the reaper thread.
    pub fn start() -> nix::Result<Self> {
        let mut mask = SigSet::empty();
        mask.add(Signal::SIGCHLD);
        mask.thread_block()?;
        let fd = SignalFd::with_flags(&mask, SfdFlags::SFD_CLOEXEC)?;
        let watchers = Watchers::default();
        let fork_lock = Arc::new(Mutex::new(()));
        let (w, l) = (watchers.clone(), fork_lock.clone());
        std::thread::Builder::new()
            .name("reaper".into())
            .spawn(move || run(fd, w, l))
            .map_err(|_| nix::Error::EAGAIN)?;
        Ok(Self {
            watchers,
            fork_lock,
        })
    }

    /// Keeps the reaper from reaping while the guard lives.
    pub fn hold(&self) -> MutexGuard<'_, ()> {
        self.fork_lock.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Delivers the exit status of `pid` on the returned channel. Register
    /// before the process can exit (e.g. while it is stopped or before exec).
    ///
    /// libcontainer starts container inits with `CLONE_PARENT` and no exit
    /// signal, so their exit raises no SIGCHLD (and code that forks may
    /// change a thread's signal mask). A pidfd tells us of the exit instead;
    /// its thread reaps the process itself, unless the reaper got there first.
    pub fn watch(&self, pid: i32) -> Receiver<WaitStatus> {
        let (tx, rx) = mpsc::channel();
        self.watchers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(pid, tx);
        // SAFETY: pidfd_open takes a pid and flags and returns a new fd or -1.
        let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) } as i32;
        if fd < 0 {
            return rx;
        }
        // SAFETY: fd was just returned by pidfd_open and nothing else owns it.
        let pidfd = unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) };
        let (watchers, fork_lock) = (self.watchers.clone(), self.fork_lock.clone());
        let _ = std::thread::Builder::new()
            .name("pidfd".into())
            .spawn(move || {
                let mut fds = [nix::poll::PollFd::new(
                    pidfd.as_fd(),
                    nix::poll::PollFlags::POLLIN,
                )];
                while let Err(nix::Error::EINTR) =
                    nix::poll::poll(&mut fds, nix::poll::PollTimeout::NONE)
                {}
                let _held = fork_lock.lock().unwrap_or_else(|e| e.into_inner());
                if let Ok(status) = waitpid(Pid::from_raw(pid), Some(WaitPidFlag::__WALL)) {
                    deliver(&watchers, status);
                }
            });
        rx
    }
}

fn run(fd: SignalFd, watchers: Watchers, fork_lock: Arc<Mutex<()>>) {
    loop {
        match fd.read_signal() {
            Ok(_) => {}
            Err(nix::Error::EINTR) => continue,
            Err(e) => {
                tracing::error!("reading signalfd: {e}");
                return;
            }
        }
        let _held = fork_lock.lock().unwrap_or_else(|e| e.into_inner());
        // One SIGCHLD may stand for several exits.
        loop {
            // __WALL: also children that exit without SIGCHLD (see watch).
            match waitpid(
                Pid::from_raw(-1),
                Some(WaitPidFlag::WNOHANG | WaitPidFlag::__WALL),
            ) {
                Ok(WaitStatus::StillAlive) | Err(nix::Error::ECHILD) => break,
                Ok(status) => {
                    let Some(pid) = status.pid() else { continue };
                    tracing::debug!(pid = pid.as_raw(), ?status, "reaped");
                    deliver(&watchers, status);
                }
                Err(nix::Error::EINTR) => continue,
                Err(e) => {
                    tracing::error!("waitpid: {e}");
                    break;
                }
            }
        }
    }
}

/// Hands `status` to whoever watches its pid.
fn deliver(watchers: &Watchers, status: WaitStatus) {
    let Some(pid) = status.pid() else { return };
    let tx = watchers
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .remove(&pid.as_raw());
    if let Some(tx) = tx {
        let _ = tx.send(status);
    }
}
