//! Stdio streams: one vsock connection per stream, accepted on port 1025.
//!
//! The host opens each stream before asking for the process, introducing it
//! with a [`StreamHeader`] line; the listener parks it until the container
//! manager claims it. Data then moves with plain blocking copies between the
//! connection and the process's pipe, so a slow reader slows the writer
//! (backpressure) and nothing is buffered without bound.

use std::collections::HashMap;
use std::fs::File;
use std::io::Read;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use husk_protocol::{StreamHeader, MAX_HEADER_LEN, STDIO_VSOCK_PORT};
use nix::sys::socket::{
    accept, bind, listen, socket, AddressFamily, Backlog, SockFlag, SockType, VsockAddr,
};
use nix::sys::time::TimeVal;

/// Most connections parked at once; more are closed.
const MAX_PARKED: usize = 256;
/// Time a connection gets to send its header.
const HEADER_TIMEOUT: Duration = Duration::from_secs(5);

type Key = (String, Option<String>, &'static str);

/// Parked stream connections, by header.
#[derive(Default)]
pub struct StreamHub {
    parked: Mutex<HashMap<Key, File>>,
    arrived: Condvar,
}

fn key(h: &StreamHeader) -> Key {
    (h.container_id.clone(), h.exec_id.clone(), h.kind.as_str())
}

/// Listens on vsock `port` from a thread of its own and hands each
/// connection to `handle` on a new thread (`<what>-accept`, `<what>-conn`).
pub fn serve_vsock(
    port: u32,
    what: &'static str,
    handle: impl Fn(OwnedFd) + Clone + Send + 'static,
) -> nix::Result<()> {
    let fd = socket(
        AddressFamily::Vsock,
        SockType::Stream,
        SockFlag::SOCK_CLOEXEC,
        None,
    )?;
    bind(fd.as_raw_fd(), &VsockAddr::new(libc::VMADDR_CID_ANY, port))?;
    listen(&fd, Backlog::new(64)?)?;
    std::thread::Builder::new()
        .name(format!("{what}-accept"))
        .spawn(move || loop {
            match accept(fd.as_raw_fd()) {
                Ok(conn) => {
                    // SAFETY: accept returned a new descriptor that nothing
                    // else owns.
                    let conn = unsafe { OwnedFd::from_raw_fd(conn) };
                    let handle = handle.clone();
                    let _ = std::thread::Builder::new()
                        .name(format!("{what}-conn"))
                        .spawn(move || handle(conn));
                }
                Err(nix::Error::EINTR) | Err(nix::Error::ECONNABORTED) => {}
                Err(e) => {
                    tracing::error!("{what} listener: accept: {e}");
                    std::thread::sleep(Duration::from_millis(100));
                }
            }
        })
        .map_err(|_| nix::Error::EAGAIN)?;
    Ok(())
}

impl StreamHub {
    /// Listens on the stdio port and parks incoming streams, from a thread.
    pub fn listen(self: &Arc<Self>) -> nix::Result<()> {
        let hub = self.clone();
        serve_vsock(STDIO_VSOCK_PORT, "stdio", move |conn| hub.admit(conn))
    }

    /// Reads and checks a connection's header, then parks it.
    fn admit(&self, conn: OwnedFd) {
        let timeout = TimeVal::new(HEADER_TIMEOUT.as_secs() as i64, 0);
        let _ = nix::sys::socket::setsockopt(
            &conn,
            nix::sys::socket::sockopt::ReceiveTimeout,
            &timeout,
        );
        let mut file = File::from(conn);
        let Some(line) = read_line(&mut file) else {
            return;
        };
        let Some(header) = StreamHeader::parse(&line) else {
            tracing::error!(
                "stdio: refused a stream with a bad header ({} bytes)",
                line.len()
            );
            return;
        };
        let off = TimeVal::new(0, 0);
        let _ =
            nix::sys::socket::setsockopt(&file, nix::sys::socket::sockopt::ReceiveTimeout, &off);
        let mut parked = self.parked.lock().unwrap_or_else(|e| e.into_inner());
        if parked.len() >= MAX_PARKED {
            tracing::error!("too many unclaimed streams; refusing one");
            return;
        }
        parked.insert(key(&header), file);
        self.arrived.notify_all();
    }

    /// Takes the parked stream for `header`, waiting until `deadline`.
    pub fn claim(&self, header: &StreamHeader, deadline: Instant) -> Option<File> {
        let k = key(header);
        let mut parked = self.parked.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            if let Some(f) = parked.remove(&k) {
                return Some(f);
            }
            let left = deadline.checked_duration_since(Instant::now())?;
            parked = self
                .arrived
                .wait_timeout(parked, left)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    /// Drops every parked stream of a container (it is gone).
    pub fn discard(&self, container_id: &str) {
        self.parked
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|k, _| k.0 != container_id);
    }
}

/// Reads one header line byte by byte, at most [`MAX_HEADER_LEN`] bytes.
fn read_line(f: &mut File) -> Option<String> {
    let mut line = Vec::with_capacity(64);
    let mut b = [0u8; 1];
    while line.len() < MAX_HEADER_LEN {
        match f.read(&mut b) {
            Ok(1) if b[0] == b'\n' => return String::from_utf8(line).ok(),
            Ok(1) => line.push(b[0]),
            _ => return None,
        }
    }
    None
}

/// Copies `from` into `to` until EOF or an error (see
/// [`husk_protocol::copy_plain`]), then drops both, which signals EOF to the
/// other side.
pub fn pump(name: &'static str, mut from: File, mut to: File) -> Pump {
    let (done, ended) = std::sync::mpsc::channel::<()>();
    let thread = std::thread::Builder::new()
        .name(name.into())
        .spawn(move || {
            // Dropped as the thread ends, which wakes `Pump::finish_by`.
            let _done = done;
            let _ = husk_protocol::copy_plain(&mut from, &mut to);
        })
        .expect("spawn stdio thread");
    Pump { thread, ended }
}

/// A copying thread of [`pump`]; dropping it leaves the thread running.
pub struct Pump {
    thread: std::thread::JoinHandle<()>,
    ended: std::sync::mpsc::Receiver<()>,
}

impl Pump {
    /// Waits until the copy ends or `deadline` passes; joins the thread if
    /// it ended.
    pub fn finish_by(self, deadline: std::time::Instant) {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        if let Err(std::sync::mpsc::RecvTimeoutError::Disconnected) = self.ended.recv_timeout(left)
        {
            let _ = self.thread.join();
        }
    }
}
