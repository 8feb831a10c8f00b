//! A guest process's stdio on the host: one vsock stream per requested
//! stream, copied to and from the paths the caller names (containerd's
//! FIFOs, or the CLI's own stdio).

use std::fs::File;
use std::io::Write;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::thread::JoinHandle;

use husk_protocol::containers::Stdio;
use husk_protocol::{StreamHeader, StreamKind};

use super::guest::GuestAgent;
use crate::agent::AgentError;

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
                if let Ok(mut f) = File::options().write(true).open(&path) {
                    let _ = husk_protocol::copy_plain(&mut s, &mut f);
                    let _ = f.flush();
                }
            })
        })
        .collect()
}

/// Copies the stdin path into the stream, then half-closes it so the
/// process sees EOF.
pub fn pump_stdin(mut s: UnixStream, path: PathBuf) -> JoinHandle<()> {
    std::thread::spawn(move || {
        if let Ok(mut f) = File::open(&path) {
            let _ = husk_protocol::copy_plain(&mut f, &mut s);
        }
        let _ = s.shutdown(std::net::Shutdown::Write);
    })
}
