//! A guest process's stdio on the host: one vsock stream per requested
//! stream, copied to and from the host streams the caller names
//! (containerd's FIFOs, or the CLI's own stdio descriptors).

use super::workers::Worker;
use std::fs::File;
use std::io::Write;
use std::os::fd::{BorrowedFd, OwnedFd};
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::Arc;
use std::thread::JoinHandle;

use husk_protocol::containers::Stdio;
use husk_protocol::{StreamHeader, StreamKind};

use super::guest::GuestAgent;
use crate::vm::agent::AgentError;

/// Where a process's stdio goes on the host.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Io {
    pub stdin: Stream,
    pub stdout: Stream,
    pub stderr: Stream,
    pub terminal: bool,
}

/// One stdio stream of a process on the host.
#[derive(Debug, Clone, Default)]
pub enum Stream {
    /// No stream.
    #[default]
    None,
    /// A path, opened as a path: containerd's FIFO or a file. Whatever a
    /// containerd client names (even `/proc/self/fd/N`) is only this.
    Path(PathBuf),
    /// A descriptor of this process, handed over in process (`husk run`
    /// gives its own stdout and stderr): duplicated, so the output shares
    /// the caller's file offset, where opening its path again would write
    /// over the caller's next output on a regular file.
    Fd(Arc<OwnedFd>),
}

/// Streams are equal when they name the same path, or are the same
/// handed-over descriptor.
impl PartialEq for Stream {
    fn eq(&self, other: &Stream) -> bool {
        match (self, other) {
            (Stream::None, Stream::None) => true,
            (Stream::Path(a), Stream::Path(b)) => a == b,
            (Stream::Fd(a), Stream::Fd(b)) => Arc::ptr_eq(a, b),
            _ => false,
        }
    }
}

impl Eq for Stream {}

impl Stream {
    /// A path as containerd sends it: empty is no stream.
    pub fn path(p: impl Into<PathBuf>) -> Stream {
        let p = p.into();
        if p.as_os_str().is_empty() {
            Stream::None
        } else {
            Stream::Path(p)
        }
    }

    /// A duplicate of descriptor `fd` of this process.
    pub fn fd(fd: BorrowedFd<'_>) -> std::io::Result<Stream> {
        Ok(Stream::Fd(Arc::new(fd.try_clone_to_owned()?)))
    }

    pub fn is_some(&self) -> bool {
        !matches!(self, Stream::None)
    }

    /// As containerd shows it: the path, or "" (a descriptor has none).
    pub fn display(&self) -> String {
        match self {
            Stream::Path(p) => p.display().to_string(),
            Stream::None | Stream::Fd(_) => String::new(),
        }
    }

    /// Opens the stream for writing.
    fn open_output(&self) -> std::io::Result<File> {
        match self {
            Stream::Path(p) => File::options().write(true).open(p),
            Stream::Fd(fd) => Ok(File::from(fd.try_clone()?)),
            Stream::None => Err(std::io::Error::other("no stream")),
        }
    }

    /// Opens the stream for reading.
    fn open_input(&self) -> std::io::Result<File> {
        match self {
            Stream::Path(p) => File::open(p),
            Stream::Fd(fd) => Ok(File::from(fd.try_clone()?)),
            Stream::None => Err(std::io::Error::other("no stream")),
        }
    }
}

/// A process's opened streams, before its create or exec.
pub struct Streams {
    /// What to ask the agent for.
    pub stdio: Stdio,
    pub stdin: Option<UnixStream>,
    /// Each output stream with the host stream it feeds.
    pub outputs: Vec<(UnixStream, Stream)>,
}

/// Opens the streams `io` asks for; a terminal merges stderr into its one
/// output.
pub fn open<A: GuestAgent>(
    agent: &A,
    id: &str,
    exec_id: Option<&str>,
    io: &Io,
) -> Result<Streams, AgentError> {
    let header = |kind| StreamHeader {
        container_id: id.to_owned(),
        exec_id: exec_id.map(str::to_owned),
        kind,
    };
    let mut stdio = Stdio::new();
    stdio.stdin = io.stdin.is_some();
    stdio.stdout = io.stdout.is_some();
    stdio.stderr = io.stderr.is_some() && !io.terminal;
    let open = |want: bool, kind| -> Result<Option<UnixStream>, AgentError> {
        want.then(|| agent.open_stream(&header(kind))).transpose()
    };
    let stdin = open(stdio.stdin, StreamKind::Stdin)?;
    let mut outputs = Vec::new();
    if let Some(s) = open(stdio.stdout, StreamKind::Stdout)? {
        outputs.push((s, io.stdout.clone()));
    }
    if let Some(s) = open(stdio.stderr, StreamKind::Stderr)? {
        outputs.push((s, io.stderr.clone()));
    }
    Ok(Streams {
        stdio,
        stdin,
        outputs,
    })
}

/// Copies each output stream into its host stream, from a thread each. On
/// a FIFO the copy holds a reader of its own (as containerd's runc shim
/// does): when containerd restarts, its end closes, and without another
/// reader the next write would fail and the container's output would be
/// lost; with it the FIFO fills and the guest waits until containerd reads
/// again.
pub fn pump_outputs(outputs: Vec<(UnixStream, Stream)>) -> Vec<JoinHandle<()>> {
    outputs
        .into_iter()
        .map(|(mut s, to)| {
            std::thread::spawn(move || {
                let _reader = match &to {
                    Stream::Path(path)
                        if std::fs::metadata(path).is_ok_and(|m| m.file_type().is_fifo()) =>
                    {
                        File::options()
                            .read(true)
                            .custom_flags(libc::O_NONBLOCK)
                            .open(path)
                            .ok()
                    }
                    _ => None,
                };
                if let Ok(mut f) = to.open_output() {
                    let _ = husk_protocol::copy_plain(&mut s, &mut f);
                    let _ = f.flush();
                }
            })
        })
        .collect()
}

/// Copies the host's stdin stream into the guest's, then half-closes it so
/// the process sees EOF.
pub fn pump_stdin(mut s: UnixStream, from: Stream) -> std::io::Result<Worker> {
    Worker::spawn("stdin".into(), move || {
        if let Ok(mut f) = from.open_input() {
            let _ = husk_protocol::copy_plain(&mut f, &mut s);
        }
        let _ = s.shutdown(std::net::Shutdown::Write);
    })
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Seek, SeekFrom};
    use std::os::fd::AsFd;

    use super::*;

    #[test]
    fn own_descriptors_share_the_callers_offset() {
        let mut f = tempfile::tempfile().expect("temp file");
        f.write_all(b"a").expect("write");
        let mut out = Stream::fd(f.as_fd())
            .expect("dup")
            .open_output()
            .expect("open own fd");
        out.write_all(b"bc").expect("write");
        drop(out);
        // The caller writes on where the output ended, as a shell's next
        // command would.
        f.write_all(b"d").expect("write");
        f.seek(SeekFrom::Start(0)).expect("seek");
        let mut all = String::new();
        f.read_to_string(&mut all).expect("read");
        assert_eq!(all, "abcd");
    }

    #[test]
    fn a_path_is_only_ever_opened_as_a_path() {
        // What a containerd client sends is a path, even one naming this
        // process's descriptors: it is opened (here: refused, no such
        // file), never taken as descriptor 999999 of the shim.
        let s = Stream::path("/proc/self/fd/999999");
        assert!(matches!(s, Stream::Path(_)));
        let e = s.open_output().expect_err("no such descriptor");
        assert_eq!(e.kind(), std::io::ErrorKind::NotFound, "{e}");
        assert!(!Stream::path("").is_some());
        assert_eq!(Stream::path("/run/x/fifo").display(), "/run/x/fifo");
    }
}
