//! A guest process's stdio on the host: one vsock stream per requested
//! stream, copied to and from the paths the caller names (containerd's
//! FIFOs, or the CLI's own stdio).

use super::workers::Worker;
use std::fs::File;
use std::io::Write;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::thread::JoinHandle;

use husk_protocol::containers::Stdio;
use husk_protocol::{StreamHeader, StreamKind};

use super::guest::GuestAgent;
use crate::vm::agent::AgentError;

/// Where a process's stdio goes on the host; an empty path is no stream.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Io {
    pub stdin: PathBuf,
    pub stdout: PathBuf,
    pub stderr: PathBuf,
    pub terminal: bool,
}

/// A process's opened streams, before its create or exec.
pub struct Streams {
    /// What to ask the agent for.
    pub stdio: Stdio,
    pub stdin: Option<UnixStream>,
    /// Each output stream with the path it feeds.
    pub outputs: Vec<(UnixStream, PathBuf)>,
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
    stdio.stdin = !io.stdin.as_os_str().is_empty();
    stdio.stdout = !io.stdout.as_os_str().is_empty();
    stdio.stderr = !io.stderr.as_os_str().is_empty() && !io.terminal;
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

/// Copies each output stream into its path, from a thread each. On a FIFO
/// the copy holds a reader of its own (as containerd's runc shim does):
/// when containerd restarts, its end closes, and without another reader the
/// next write would fail and the container's output would be lost; with it
/// the FIFO fills and the guest waits until containerd reads again.
pub fn pump_outputs(outputs: Vec<(UnixStream, PathBuf)>) -> Vec<JoinHandle<()>> {
    outputs
        .into_iter()
        .map(|(mut s, path)| {
            std::thread::spawn(move || {
                let fifo = std::fs::metadata(&path).is_ok_and(|m| m.file_type().is_fifo());
                let _reader = fifo.then(|| {
                    File::options()
                        .read(true)
                        .custom_flags(libc::O_NONBLOCK)
                        .open(&path)
                });
                if let Ok(mut f) = open_output(&path) {
                    let _ = husk_protocol::copy_plain(&mut s, &mut f);
                    let _ = f.flush();
                }
            })
        })
        .collect()
}

/// Opens an output path for writing. `/proc/self/fd/N` (how `husk run`
/// hands over its own stdout and stderr) is descriptor N itself, duplicated:
/// opening the path would make a second open file with its own offset, and
/// on a regular file the caller's next write would land over the output.
fn open_output(path: &std::path::Path) -> std::io::Result<File> {
    let own_fd = path
        .strip_prefix("/proc/self/fd")
        .ok()
        .and_then(|n| n.to_str()?.parse::<i32>().ok());
    if let Some(fd) = own_fd {
        // SAFETY: fcntl(F_DUPFD_CLOEXEC) on a number only makes a new
        // descriptor (or fails with EBADF); nothing is closed or reused.
        let dup = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 0) };
        if dup < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: dup was just made and nothing else owns it.
        return Ok(unsafe { <File as std::os::fd::FromRawFd>::from_raw_fd(dup) });
    }
    File::options().write(true).open(path)
}

/// Copies the stdin path into the stream, then half-closes it so the
/// process sees EOF.
pub fn pump_stdin(mut s: UnixStream, path: PathBuf) -> std::io::Result<Worker> {
    Worker::spawn("stdin".into(), move || {
        if let Ok(mut f) = File::open(&path) {
            let _ = husk_protocol::copy_plain(&mut f, &mut s);
        }
        let _ = s.shutdown(std::net::Shutdown::Write);
    })
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Seek, SeekFrom};
    use std::os::fd::AsRawFd;

    use super::*;

    #[test]
    fn own_descriptors_share_the_callers_offset() {
        let mut f = tempfile::tempfile().expect("temp file");
        f.write_all(b"a").expect("write");
        let path = PathBuf::from(format!("/proc/self/fd/{}", f.as_raw_fd()));
        let mut out = open_output(&path).expect("open own fd");
        out.write_all(b"bc").expect("write");
        drop(out);
        // The caller writes on where the output ended, as a shell's next
        // command would.
        f.write_all(b"d").expect("write");
        f.seek(SeekFrom::Start(0)).expect("seek");
        let mut all = String::new();
        f.read_to_string(&mut all).expect("read");
        assert_eq!(all, "abcd");
        assert!(open_output(std::path::Path::new("/proc/self/fd/999999")).is_err());
    }
}
