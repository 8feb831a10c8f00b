//! When the VMM's own start-up ended: a listening socket the VMM inherits
//! and accepts on from its main loop, which it enters once its devices are
//! made, the kernel loaded and the vCPUs running (QEMU: a QMP monitor,
//! whose greeting is its first write). The host connects before the spawn
//! (the connection waits in the backlog) and unlinks the path, so the VMM
//! holds the only listener and the host the only connection.
//!
//! This splits the time from spawn to the guest kernel's clock into the
//! VMM's start-up (host) and the guest's steps before its clock runs.

use std::io::{self, Read};
use std::net::Shutdown;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::thread::JoinHandle;
use std::time::Instant;

/// The listener for the VMM, and the host's connection to it.
pub struct ReadySocket {
    listener: UnixListener,
    stream: UnixStream,
}

impl ReadySocket {
    /// Binds at `path` (replacing a stale socket), connects and unlinks.
    pub fn new(path: &Path) -> io::Result<Self> {
        match std::fs::remove_file(path) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
        let listener = UnixListener::bind(path)?;
        let stream = UnixStream::connect(path);
        std::fs::remove_file(path)?;
        Ok(Self {
            listener,
            stream: stream?,
        })
    }

    /// The listener, for the VMM to inherit (close-on-exec: the spawn
    /// passes it on explicitly).
    pub fn listener_fd(&self) -> RawFd {
        self.listener.as_raw_fd()
    }

    /// Once the VMM holds the listener: closes ours and waits, on a thread,
    /// for the VMM's first byte.
    pub fn watch(self) -> io::Result<ReadyWatch> {
        let Self { listener, stream } = self;
        drop(listener);
        let mut reader = stream.try_clone()?;
        let thread = std::thread::Builder::new()
            .name("vmm-ready".into())
            .spawn(move || {
                let mut byte = [0u8; 1];
                match reader.read(&mut byte) {
                    Ok(1) => Some(Instant::now()),
                    _ => None,
                }
            })?;
        Ok(ReadyWatch {
            stream,
            thread: Some(thread),
        })
    }
}

/// Waiting for the VMM's first byte; dropping it stops the wait.
pub struct ReadyWatch {
    stream: UnixStream,
    thread: Option<JoinHandle<Option<Instant>>>,
}

impl ReadyWatch {
    /// When the VMM's first byte came, or `None` if it has not come (the
    /// wait ends now) or the VMM closed the connection first.
    pub fn at(mut self) -> Option<Instant> {
        let _ = self.stream.shutdown(Shutdown::Both);
        self.thread.take()?.join().ok().flatten()
    }
}

impl Drop for ReadyWatch {
    fn drop(&mut self) {
        let _ = self.stream.shutdown(Shutdown::Both);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;
    use std::time::Duration;

    use super::*;

    /// The listener, as a VMM that inherited it holds it.
    fn vmm_side(ready: &ReadySocket) -> UnixListener {
        ready.listener.try_clone().unwrap()
    }

    #[test]
    fn the_first_byte_after_accept_is_the_vmm_ready() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ready.sock");
        let ready = ReadySocket::new(&path).unwrap();
        assert!(!path.exists(), "unlinked: nobody else can connect");
        let vmm = vmm_side(&ready);
        let watch = ready.watch().unwrap();
        let before = Instant::now();
        let (mut conn, _) = vmm.accept().unwrap();
        conn.write_all(b"{\"QMP\": {}}\r\n").unwrap();
        std::thread::sleep(Duration::from_millis(20));
        let at = watch.at().expect("the greeting was seen");
        assert!(at >= before && at <= Instant::now());
    }

    #[test]
    fn a_vmm_that_never_speaks_or_closes_gives_no_time() {
        let dir = tempfile::tempdir().unwrap();
        let ready = ReadySocket::new(&dir.path().join("r.sock")).unwrap();
        let vmm = vmm_side(&ready);
        // Still starting when the host stops waiting.
        let watch = ready.watch().unwrap();
        assert_eq!(watch.at(), None);

        // Closed without a byte (the VMM exited).
        let ready = ReadySocket::new(&dir.path().join("r.sock")).unwrap();
        let vmm2 = vmm_side(&ready);
        let watch = ready.watch().unwrap();
        drop(vmm2.accept().unwrap());
        drop(vmm2);
        assert_eq!(watch.at(), None);
        drop(vmm);

        // Dropped unread: the thread ends, nothing hangs.
        let ready = ReadySocket::new(&dir.path().join("r.sock")).unwrap();
        drop(ready.watch().unwrap());
    }
}
