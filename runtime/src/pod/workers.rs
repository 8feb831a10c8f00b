//! The pod's background threads (process exit watchers, OOM watchers,
//! stdin copiers) in one place: each tells its end on a channel, so
//! stopping the pod waits for them without polling, and joins them.

use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::sync::Mutex;
use std::thread::JoinHandle;
use std::time::Instant;

/// A thread that says when it ends (however it ends: its sender drops).
pub struct Worker {
    name: String,
    thread: JoinHandle<()>,
    ended: Receiver<()>,
}

impl Worker {
    pub fn spawn(name: String, f: impl FnOnce() + Send + 'static) -> std::io::Result<Self> {
        let (done, ended) = std::sync::mpsc::channel::<()>();
        let thread = std::thread::Builder::new()
            .name(name.clone())
            .spawn(move || {
                let _done = done;
                f();
            })?;
        Ok(Self {
            name,
            thread,
            ended,
        })
    }

    /// Waits until the thread ends or `deadline` passes; joins it if it
    /// ended. Whether it did.
    pub fn finish_by(self, deadline: Instant) -> bool {
        let left = deadline.saturating_duration_since(Instant::now());
        match self.ended.recv_timeout(left) {
            Err(RecvTimeoutError::Disconnected) => {
                let _ = self.thread.join();
                true
            }
            Ok(()) | Err(RecvTimeoutError::Timeout) => {
                tracing::warn!(thread = %self.name, "still running at the pod's stop; left detached");
                false
            }
        }
    }
}

/// The threads of one pod.
#[derive(Default)]
pub struct Workers(Mutex<Vec<Worker>>);

impl Workers {
    /// Starts `f` as a thread of the pod; ended threads are joined on the
    /// way, so the list holds only live ones.
    pub fn spawn(&self, name: String, f: impl FnOnce() + Send + 'static) {
        let worker = match Worker::spawn(name, f) {
            Ok(w) => w,
            Err(e) => {
                tracing::error!(error = %e, "starting a pod thread");
                return;
            }
        };
        let mut all = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let (ended, live): (Vec<_>, Vec<_>) = std::mem::take(&mut *all)
            .into_iter()
            .partition(|w| w.thread.is_finished());
        for w in ended {
            let _ = w.thread.join();
        }
        *all = live;
        all.push(worker);
    }

    /// Waits for every thread until `deadline` and joins those that ended;
    /// how many did not.
    pub fn finish_by(&self, deadline: Instant) -> usize {
        let all = std::mem::take(&mut *self.0.lock().unwrap_or_else(|e| e.into_inner()));
        all.into_iter()
            .map(|w| w.finish_by(deadline))
            .filter(|ended| !ended)
            .count()
    }

    #[cfg(test)]
    fn live(&self) -> usize {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).len()
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn stopping_waits_for_threads_that_end_and_leaves_one_that_does_not() {
        let workers = Workers::default();
        let (release, gate) = std::sync::mpsc::channel::<()>();
        workers.spawn("quick".into(), || {});
        workers.spawn("gated".into(), move || {
            let _ = gate.recv();
        });
        let (_hold, stuck) = std::sync::mpsc::channel::<()>();
        workers.spawn("stuck".into(), move || {
            let _ = stuck.recv_timeout(Duration::from_secs(30));
        });
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(50));
            let _ = release.send(());
        });
        let t = Instant::now();
        let left = workers.finish_by(Instant::now() + Duration::from_millis(500));
        assert_eq!(left, 1, "only the stuck thread is left");
        assert!(t.elapsed() >= Duration::from_millis(50));
        assert_eq!(workers.live(), 0);
    }

    #[test]
    fn ended_threads_are_joined_as_new_ones_start() {
        let workers = Workers::default();
        workers.spawn("a".into(), || {});
        while !workers.0.lock().unwrap()[0].thread.is_finished() {
            std::thread::yield_now();
        }
        let (release, gate) = std::sync::mpsc::channel::<()>();
        workers.spawn("b".into(), move || {
            let _ = gate.recv();
        });
        assert_eq!(workers.live(), 1, "the ended one was joined");
        drop(release);
        assert_eq!(
            workers.finish_by(Instant::now() + Duration::from_secs(5)),
            0
        );
    }
}
