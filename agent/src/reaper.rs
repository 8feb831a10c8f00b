//! Reaps every child of PID 1, orphans included, from one thread.
//!
//! SIGCHLD is blocked in all threads and read through a signalfd, so no exit
//! is missed and no signal handler runs. A process whose exit status someone
//! is waiting for is registered with [`Reaper::watch`]; the rest are reaped
//! and forgotten, as init must.

use std::collections::HashMap;
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
    pub fn watch(&self, pid: i32) -> Receiver<WaitStatus> {
        let (tx, rx) = mpsc::channel();
        self.watchers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(pid, tx);
        rx
    }
}

fn run(fd: SignalFd, watchers: Watchers, fork_lock: Arc<Mutex<()>>) {
    loop {
        match fd.read_signal() {
            Ok(_) => {}
            Err(nix::Error::EINTR) => continue,
            Err(e) => {
                crate::log_error!("reaper: reading signalfd: {e}");
                return;
            }
        }
        let _held = fork_lock.lock().unwrap_or_else(|e| e.into_inner());
        // One SIGCHLD may stand for several exits.
        loop {
            match waitpid(Pid::from_raw(-1), Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::StillAlive) | Err(nix::Error::ECHILD) => break,
                Ok(status) => {
                    let Some(pid) = status.pid() else { continue };
                    let tx = watchers
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .remove(&pid.as_raw());
                    if let Some(tx) = tx {
                        let _ = tx.send(status);
                    }
                }
                Err(nix::Error::EINTR) => continue,
                Err(e) => {
                    crate::log_error!("reaper: waitpid: {e}");
                    break;
                }
            }
        }
    }
}
