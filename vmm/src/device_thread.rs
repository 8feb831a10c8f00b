//! The worker thread of a virtio device served inside husk-vmm
//! (virtio-net, virtio-balloon), and how it gets its queues.
//!
//! The thread starts with the device (before the guest runs), enters the
//! seccomp filter of its kind at once and waits for the driver: a vCPU that
//! activates the device hands it the queues, so no vCPU ever starts a
//! thread (each thread kind has its own seccomp filter, and a thread would
//! inherit its maker's). Each activation is served until the driver resets
//! the device (the stop eventfd) or the guest breaks one of the device's
//! rules (the reason goes to stderr, the first time and then at each
//! power of two with the count, see [`Repeats`]: a guest that breaks a rule
//! at every reset gets a few log lines, not one per cycle; the device then
//! stays quiet until the next reset).

use std::fmt::Display;
use std::io;
use std::os::fd::RawFd;
use std::sync::mpsc::{Receiver, Sender};
use std::thread::JoinHandle;

use virtio_queue::{Queue, QueueT};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::seccomp::ThreadKind;
use crate::virtio_mmio::QueueConfig;

/// Counts a failure that a guest can repeat at will (a device it resets
/// with bad rings in a loop) and says which ones to log: the first, then
/// the 2nd, 4th, 8th..., so a log holds a few lines for any number.
#[derive(Debug, Default)]
pub struct Repeats(std::sync::atomic::AtomicU64);

impl Repeats {
    /// Counts one; `Some(n)` (the count so far) when this one is told.
    pub fn count(&self) -> Option<u64> {
        let n = self.0.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
        n.is_power_of_two().then_some(n)
    }
}

/// What a device's thread does with each activation.
pub trait Service: Send + 'static {
    /// What serves one activation's queues.
    type Worker;
    type Error: Display + From<ThreadError> + Send + 'static;

    /// A worker for the `queues` the driver set up, signalling `call` when
    /// it used buffers; refuses queues the driver placed outside guest
    /// memory.
    fn worker(&self, queues: &[QueueConfig], call: EventFd) -> Result<Self::Worker, Self::Error>;

    /// Serves until `stop` is signalled (`Ok`) or the guest breaks a rule
    /// (`Err`); `kicks` has one eventfd per queue.
    fn serve(
        &self,
        worker: &mut Self::Worker,
        kicks: &[EventFd],
        stop: &EventFd,
    ) -> Result<(), Self::Error>;
}

#[derive(Debug, thiserror::Error)]
pub enum ThreadError {
    #[error("eventfd: {0}")]
    EventFd(io::Error),
    #[error("starting the {0} thread: {1}")]
    Spawn(&'static str, io::Error),
    #[error("the {0} thread is gone")]
    Gone(&'static str),
}

/// Queues to serve and the interrupt to signal, to the thread.
type Job = (Vec<QueueConfig>, EventFd);

enum Reply<E> {
    Started(Result<(), E>),
    Ended,
}

/// A device's worker thread and the eventfds KVM wires to it.
pub struct DeviceThread<S: Service> {
    name: &'static str,
    /// One kick eventfd per queue (ioeventfds on QueueNotify).
    pub kicks: Vec<EventFd>,
    /// The interrupt eventfd (an irqfd on the device's line).
    pub call: EventFd,
    stop: EventFd,
    /// Jobs to the thread; dropped, it ends.
    jobs: Option<Sender<Job>>,
    /// The thread's word: one `Started` per job, then one `Ended` for each
    /// that started.
    replies: Receiver<Reply<S::Error>>,
    active: bool,
    thread: Option<JoinHandle<()>>,
}

impl<S: Service> DeviceThread<S> {
    /// Starts thread `name` under the filter of `kind`, for a device of
    /// `queues` queues served by `service`.
    pub fn start(
        name: &'static str,
        kind: ThreadKind,
        queues: usize,
        service: S,
    ) -> Result<Self, S::Error> {
        let efd = || EventFd::new(EFD_NONBLOCK).map_err(ThreadError::EventFd);
        let kicks = (0..queues).map(|_| efd()).collect::<Result<Vec<_>, _>>()?;
        let (call, stop) = (efd()?, efd()?);
        let clone = |e: &EventFd| e.try_clone().map_err(ThreadError::EventFd);
        let their_kicks = kicks.iter().map(clone).collect::<Result<Vec<_>, _>>()?;
        let their_stop = clone(&stop)?;
        let (jobs, job) = std::sync::mpsc::channel();
        let (reply, replies) = std::sync::mpsc::channel();
        let thread = std::thread::Builder::new()
            .name(name.into())
            .spawn(move || {
                crate::seccomp::enter(kind);
                run(&service, name, &their_kicks, &their_stop, &job, &reply)
            })
            .map_err(|e| ThreadError::Spawn(name, e))?;
        Ok(Self {
            name,
            kicks,
            call,
            stop,
            jobs: Some(jobs),
            replies,
            active: false,
            thread: Some(thread),
        })
    }

    /// Has the thread serve the queues the driver set up; returns once it
    /// took them or refused them.
    pub fn activate(&mut self, queues: &[QueueConfig]) -> Result<(), S::Error> {
        if self.active {
            return Ok(());
        }
        let gone = || ThreadError::Gone(self.name);
        let jobs = self.jobs.as_ref().ok_or_else(gone)?;
        // Duplicated here: no worker's filter has fcntl.
        let call = self.call.try_clone().map_err(ThreadError::EventFd)?;
        jobs.send((queues.to_vec(), call)).map_err(|_| gone())?;
        match self.replies.recv() {
            Ok(Reply::Started(r)) => r?,
            _ => return Err(gone().into()),
        }
        self.active = true;
        Ok(())
    }

    /// Stops serving (device reset); the queues are dropped.
    pub fn deactivate(&mut self) {
        if std::mem::take(&mut self.active) {
            let _ = self.stop.write(1);
            // Its end: for this stop, or earlier when the guest broke a
            // rule (the stop is then cleared at the next start).
            while let Ok(r) = self.replies.recv() {
                if matches!(r, Reply::Ended) {
                    break;
                }
            }
        }
    }
}

impl<S: Service> Drop for DeviceThread<S> {
    fn drop(&mut self) {
        self.deactivate();
        self.jobs = None;
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The thread's loop: takes jobs until the device goes; each is served
/// until the stop or the guest's first broken rule.
fn run<S: Service>(
    service: &S,
    name: &str,
    kicks: &[EventFd],
    stop: &EventFd,
    jobs: &Receiver<Job>,
    replies: &Sender<Reply<S::Error>>,
) {
    let failures = Repeats::default();
    while let Ok((queues, call)) = jobs.recv() {
        let mut worker = match service.worker(&queues, call) {
            Ok(w) => w,
            Err(e) => {
                let _ = replies.send(Reply::Started(Err(e)));
                continue;
            }
        };
        // A stop left from a run that had ended on its own.
        let _ = stop.read();
        let _ = replies.send(Reply::Started(Ok(())));
        if let Err(e) = service.serve(&mut worker, kicks, stop) {
            if let Some(n) = failures.count() {
                tracing::error!(
                    "{name} failed: {e} (failure {n}; the next told is the {})",
                    n * 2
                );
            }
        }
        let _ = replies.send(Reply::Ended);
    }
}

/// A virtio-queue [`Queue`] for a queue the driver configured, if its rings
/// lie in guest memory.
pub fn queue_from(q: &QueueConfig, mem: &GuestMemoryMmap) -> Option<Queue> {
    let mut queue = Queue::new(q.max_size).ok()?;
    queue.set_size(q.size);
    let split = |a: u64| (Some(a as u32), Some((a >> 32) as u32));
    let (lo, hi) = split(q.desc);
    queue.set_desc_table_address(lo, hi);
    let (lo, hi) = split(q.driver);
    queue.set_avail_ring_address(lo, hi);
    let (lo, hi) = split(q.device);
    queue.set_used_ring_address(lo, hi);
    queue.set_ready(q.ready);
    queue.is_valid(mem).then_some(queue)
}

/// A pollfd waiting for `fd` to be readable.
pub fn poll_fd(fd: RawFd) -> libc::pollfd {
    libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    }
}

/// Waits until one of `fds` is ready, or `timeout_ms` (-1: no limit);
/// a signal's interruption is not an error.
pub fn wait(fds: &mut [libc::pollfd], timeout_ms: i32) -> io::Result<()> {
    for f in fds.iter_mut() {
        f.revents = 0;
    }
    // SAFETY: `fds` is a live slice of pollfd of the given length.
    let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, timeout_ms) };
    if n < 0 {
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn repeats_are_told_at_powers_of_two() {
        let r = super::Repeats::default();
        let told: Vec<u64> = (0..1000).filter_map(|_| r.count()).collect();
        assert_eq!(told, [1, 2, 4, 8, 16, 32, 64, 128, 256, 512]);
    }
}
