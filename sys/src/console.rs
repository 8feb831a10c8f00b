//! The guest's console log, bounded: writes land in a memory buffer (the
//! vCPU never waits for the disk; a full buffer drops bytes and counts
//! them) and a writer thread moves them to the file in batches. The file
//! rotates to `<path>.1` at half the limit, so the two never hold more than
//! the limit, whatever the guest prints.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

/// Console bytes kept on disk by default (log and rotated log together).
pub const DEFAULT_LIMIT: u64 = 2 << 20;
/// Bytes waiting for the writer at most; more are dropped.
const PENDING_MAX: usize = 256 << 10;
/// The writer thread's stack.
const WRITER_STACK: usize = 128 << 10;
/// How long the writer lets output gather before a write.
const BATCH: Duration = Duration::from_millis(10);

#[derive(Default)]
struct Pending {
    data: Vec<u8>,
    dropped: u64,
    closed: bool,
}

#[derive(Default)]
struct Shared {
    pending: Mutex<Pending>,
    ready: Condvar,
    /// The writer thread, joined by whoever ends the log first.
    writer: Mutex<Option<JoinHandle<()>>>,
}

impl Shared {
    fn lock(&self) -> std::sync::MutexGuard<'_, Pending> {
        self.pending.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Writes what is pending, then stops the writer; later output stays
    /// in memory.
    fn finish(&self) {
        self.lock().closed = true;
        self.ready.notify_one();
        let writer = self.writer.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(w) = writer {
            let _ = w.join();
        }
    }
}

/// A bounded console log; see the module docs. Dropping it writes what is
/// pending; so does [`ConsoleEnd::finish`] while it lives on (the VM keeps
/// its devices until the process exits).
pub struct ConsoleLog {
    shared: Arc<Shared>,
}

/// Ends a [`ConsoleLog`] from outside the VM that owns it: when the guest
/// has ended, the last lines it printed (a panic's) must reach the file
/// before the process exits.
pub struct ConsoleEnd(Arc<Shared>);

impl ConsoleEnd {
    /// Writes everything the guest printed so far and stops the writer.
    pub fn finish(self) {
        self.0.finish();
    }
}

impl ConsoleLog {
    /// Creates (truncates) `path`; at most `limit` bytes stay on disk. The
    /// writer thread runs `setup` first (a seccomp filter of its own, say).
    pub fn create(path: &Path, limit: u64, setup: fn()) -> std::io::Result<Self> {
        let file = File::create(path)?;
        let sink = Sink {
            path: Some(path.to_path_buf()),
            file,
            written: 0,
            half: (limit / 2).max(1),
        };
        Self::start(sink, setup)
    }

    /// Writes into `stream` (a pipe whose reader bounds what it keeps),
    /// without rotation; the writer thread runs `setup` first.
    pub fn stream(stream: File, setup: fn()) -> std::io::Result<Self> {
        let sink = Sink {
            path: None,
            file: stream,
            written: 0,
            half: u64::MAX,
        };
        Self::start(sink, setup)
    }

    fn start(mut sink: Sink, setup: fn()) -> std::io::Result<Self> {
        let shared = Arc::new(Shared::default());
        // A small stack: it copies bytes and nothing else, and a default
        // 2 MiB stack may be backed by a huge page (2 MiB of PSS).
        let writer = std::thread::Builder::new()
            .name("console".into())
            .stack_size(WRITER_STACK)
            .spawn({
                let shared = shared.clone();
                move || {
                    setup();
                    sink.run(&shared)
                }
            })?;
        *shared.writer.lock().unwrap_or_else(|e| e.into_inner()) = Some(writer);
        Ok(Self { shared })
    }

    /// A handle that ends this log (see [`ConsoleEnd`]).
    pub fn end(&self) -> ConsoleEnd {
        ConsoleEnd(self.shared.clone())
    }
}

impl Write for ConsoleLog {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let mut p = self.shared.lock();
        let was_empty = p.data.is_empty();
        let room = PENDING_MAX.saturating_sub(p.data.len());
        let take = buf.len().min(room);
        p.data.extend_from_slice(&buf[..take]);
        p.dropped += (buf.len() - take) as u64;
        if was_empty {
            self.shared.ready.notify_one();
        }
        Ok(buf.len())
    }

    /// The writer flushes on its own (the UART calls this per byte).
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Drop for ConsoleLog {
    fn drop(&mut self) {
        self.shared.finish();
    }
}

/// The writer thread's end: the file (rotated when it has a path) and how
/// full it is.
struct Sink {
    path: Option<PathBuf>,
    file: File,
    written: u64,
    half: u64,
}

impl Sink {
    fn run(&mut self, shared: &Shared) {
        loop {
            let closed = {
                let mut p = shared.lock();
                while p.data.is_empty() && p.dropped == 0 && !p.closed {
                    p = shared.ready.wait(p).unwrap_or_else(|e| e.into_inner());
                }
                p.closed
            };
            if !closed {
                std::thread::sleep(BATCH);
            }
            let (data, dropped, closed) = {
                let mut p = shared.lock();
                let data = std::mem::take(&mut p.data);
                (data, std::mem::take(&mut p.dropped), p.closed)
            };
            self.put(&data);
            if dropped > 0 {
                self.put(
                    format!("\n[husk: {dropped} bytes of console output dropped]\n").as_bytes(),
                );
            }
            if closed {
                return;
            }
        }
    }

    /// Appends, rotating at half the limit. A failing disk loses console
    /// output, never the VM.
    fn put(&mut self, mut data: &[u8]) {
        while !data.is_empty() {
            if self.written >= self.half {
                self.rotate();
            }
            let n = data.len().min((self.half - self.written) as usize);
            if self.file.write_all(&data[..n]).is_err() {
                return;
            }
            self.written += n as u64;
            data = &data[n..];
        }
    }

    fn rotate(&mut self) {
        let Some(path) = &self.path else {
            self.written = 0;
            return;
        };
        let mut old = path.clone().into_os_string();
        old.push(".1");
        let _ = std::fs::rename(path, &old);
        match File::create(path) {
            Ok(f) => {
                self.file = f;
                self.written = 0;
            }
            // Keep writing where we were; the size check retries.
            Err(_) => self.written = 0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn size(p: &Path) -> u64 {
        std::fs::metadata(p).map(|m| m.len()).unwrap_or(0)
    }

    #[test]
    fn a_flood_stays_within_the_limit_and_the_end_is_kept() {
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join("console.log");
        let mut log = ConsoleLog::create(&path, 64 << 10, || {}).unwrap();
        // 10 MB, one byte per write as the UART does.
        let line = b"flood flood flood flood flood flood flood flood flood flood\n";
        let mut sent = 0u64;
        while sent < 10_000_000 {
            for b in line {
                log.write_all(&[*b]).unwrap();
                log.flush().unwrap();
            }
            sent += line.len() as u64;
        }
        log.write_all(b"the end\n").unwrap();
        drop(log);
        let rotated = d.path().join("console.log.1");
        let total = size(&path) + size(&rotated);
        assert!(total <= 64 << 10, "{total} bytes on disk");
        let tail = std::fs::read_to_string(&path).unwrap();
        assert!(
            tail.ends_with("the end\n") || tail.contains("dropped]"),
            "{tail:?}"
        );
        assert!(size(&rotated) > 0, "never rotated");
    }

    #[test]
    fn output_reaches_the_file_without_a_flush_or_a_drop() {
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join("console.log");
        let mut log = ConsoleLog::create(&path, DEFAULT_LIMIT, || {}).unwrap();
        log.write_all(b"husk-agent: listening\n").unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while std::fs::read(&path).unwrap() != b"husk-agent: listening\n" {
            assert!(std::time::Instant::now() < deadline, "not written");
            std::thread::sleep(Duration::from_millis(5));
        }
        drop(log);
    }

    /// husk-vmm never drops the VM (its vCPUs may still run): the guest's
    /// last lines, printed just before it ended, reach the file through
    /// the end handle, not the drop. (They were lost to the writer's batch
    /// sleep: a guest panic's message, most of the time.)
    #[test]
    fn the_end_handle_writes_the_last_lines_while_the_log_lives_on() {
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join("console.log");
        let mut log = ConsoleLog::create(&path, DEFAULT_LIMIT, || {}).unwrap();
        let end = log.end();
        for b in b"Kernel panic - not syncing: VFS: Unable to mount root fs\n" {
            log.write_all(&[*b]).unwrap();
            log.flush().unwrap();
        }
        end.finish();
        assert_eq!(
            std::fs::read_to_string(&path).unwrap(),
            "Kernel panic - not syncing: VFS: Unable to mount root fs\n"
        );
        // What comes after the end stays in memory.
        log.write_all(b"late\n").unwrap();
        std::mem::forget(log);
        assert!(!std::fs::read_to_string(&path).unwrap().contains("late"));
    }
}
