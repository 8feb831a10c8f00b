//! The vhost-user device daemons of one sandbox: `virtiofsd` for the pod
//! share and `vhost-device-vsock` for the agent channel (hybrid vsock).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::config::Config;
use crate::confine::jail::{Jail, JailError};
use crate::confine::process::{Confine, Process, ProcessError};

/// Guest CID. Each sandbox has its own vsock device, so all can use 3.
pub const GUEST_CID: u32 = 3;

#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error(transparent)]
    Process(#[from] ProcessError),
    #[error("vhost-device-vsock's jail")]
    Jail(#[source] JailError),
    #[error("{name} exited ({status}) before listening on {socket}; its log says:\n{log}")]
    Died {
        name: &'static str,
        status: std::process::ExitStatus,
        socket: PathBuf,
        log: String,
    },
    #[error("{name} did not listen on {socket} within {timeout:?}; its log says:\n{log}")]
    Timeout {
        name: &'static str,
        socket: PathBuf,
        timeout: Duration,
        log: String,
    },
}

/// Paths of one sandbox's daemon sockets.
#[derive(Debug, Clone)]
pub struct DaemonPaths {
    /// Directory shared into the guest (virtio-fs tag `husk`).
    pub shared_dir: PathBuf,
    /// vhost-user socket of virtiofsd.
    pub fs_socket: PathBuf,
    /// vhost-user socket of vhost-device-vsock.
    pub vsock_socket: PathBuf,
    /// Host side of the hybrid vsock: `CONNECT <port>` here reaches the guest.
    pub agent_socket: PathBuf,
    /// Directory for the daemons' logs.
    pub log_dir: PathBuf,
    /// The directory the sockets are in (the jailed daemon's writable one).
    pub sockets: PathBuf,
    /// An empty directory for vhost-device-vsock's jail root.
    pub vsock_jail: PathBuf,
}

/// Starts virtiofsd and vhost-device-vsock and waits until both listen.
/// On error, whatever was started has been stopped again.
/// Where vhost-device-vsock is in [`start`]'s list (virtiofsd is first).
pub const VSOCK_DAEMON: usize = 1;

/// vhost-device-vsock runs as `id` (the sandbox's uid and gid);
/// virtiofsd as root, which the files it serves need.
pub fn start(
    config: &Config,
    paths: &DaemonPaths,
    timeout: Duration,
    id: u32,
) -> Result<Vec<Process>, DaemonError> {
    let fs = Process::spawn_confined(
        "virtiofsd",
        &config.virtiofsd.path,
        [
            "--socket-path".as_ref(),
            paths.fs_socket.as_os_str(),
            "--shared-dir".as_ref(),
            paths.shared_dir.as_os_str(),
            format!("--sandbox={}", config.virtiofsd.sandbox).as_ref(),
            format!("--cache={}", config.virtiofsd.cache).as_ref(),
            "--log-level=warn".as_ref(),
        ],
        &paths.log_dir.join("virtiofsd.log"),
        &[],
        Confine::FS_DAEMON,
        None,
    )?;
    // virtiofsd confines itself (its sandbox mode and seccomp filter, under
    // husk's) and needs root's file capabilities to serve the guest's files;
    // vhost-device-vsock needs none, and sees only its sockets' directory
    // (and the system's programs).
    let jail = Jail::create(&paths.vsock_jail)
        .and_then(|j| j.writable(&paths.sockets))
        .map_err(DaemonError::Jail)?;
    let vsock = Process::spawn_confined(
        "vhost-device-vsock",
        &config.vsock.path,
        [
            "--guest-cid".as_ref(),
            GUEST_CID.to_string().as_ref(),
            "--socket".as_ref(),
            paths.vsock_socket.as_os_str(),
            "--uds-path".as_ref(),
            paths.agent_socket.as_os_str(),
        ],
        &paths.log_dir.join("vhost-device-vsock.log"),
        &[],
        Confine {
            user: Some(id),
            ..Confine::VSOCK_DAEMON
        },
        Some(jail),
    )?;
    let mut procs = vec![fs, vsock];
    let waits: [(usize, &Path); 3] = [
        (0, &paths.fs_socket),
        (1, &paths.vsock_socket),
        (1, &paths.agent_socket),
    ];
    let deadline = Instant::now() + timeout;
    for (i, socket) in waits {
        wait_listening(&mut procs[i], socket, deadline, timeout)?;
    }
    Ok(procs)
}

/// Polls until a unix socket at `socket` is in the listening state. Does not
/// connect: virtiofsd serves exactly one connection, the VMM's.
fn wait_listening(
    p: &mut Process,
    socket: &Path,
    deadline: Instant,
    timeout: Duration,
) -> Result<(), DaemonError> {
    let mut pause = Duration::from_micros(500);
    loop {
        if is_listening(p.pid(), socket) {
            return Ok(());
        }
        if let Some(status) = p.try_wait()? {
            return Err(DaemonError::Died {
                name: p.name(),
                status,
                socket: socket.to_path_buf(),
                log: p.log_tail(2000),
            });
        }
        if Instant::now() >= deadline {
            return Err(DaemonError::Timeout {
                name: p.name(),
                socket: socket.to_path_buf(),
                timeout,
                log: p.log_tail(2000),
            });
        }
        std::thread::sleep(pause);
        pause = (pause * 2).min(Duration::from_millis(10));
    }
}

/// `__SO_ACCEPTCON` in /proc/net/unix's Flags column: a listening socket.
const SO_ACCEPTCON: u32 = 0x0001_0000;

/// Whether a unix socket bound at `path` is listening in the network
/// namespace of process `pid` (vhost-device-vsock has an empty one of its
/// own) or in this process's (virtiofsd binds its socket here, then makes
/// its own namespace).
pub fn is_listening(pid: u32, path: &Path) -> bool {
    [
        format!("/proc/{pid}/net/unix"),
        "/proc/self/net/unix".into(),
    ]
    .iter()
    .any(|t| std::fs::read_to_string(t).is_ok_and(|table| listening_in(&table, path)))
}

fn listening_in(table: &str, path: &Path) -> bool {
    let want = path.as_os_str().to_string_lossy();
    table.lines().skip(1).any(|line| {
        let cols: Vec<&str> = line.split_whitespace().collect();
        cols.len() >= 8
            && cols[7] == want
            && u32::from_str_radix(cols[3], 16).is_ok_and(|flags| flags & SO_ACCEPTCON != 0)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const TABLE: &str = "Num       RefCount Protocol Flags    Type St Inode Path\n\
        0000000000000000: 00000002 00000000 00010000 0001 01 2001 /run/husk/a/fs.sock\n\
        0000000000000000: 00000003 00000000 00000000 0001 03 2002 /run/husk/a/agent.sock\n";

    #[test]
    fn listening_socket_is_found_by_path_and_flag() {
        assert!(listening_in(TABLE, Path::new("/run/husk/a/fs.sock")));
        assert!(
            !listening_in(TABLE, Path::new("/run/husk/a/agent.sock")),
            "connected, not listening"
        );
        assert!(!listening_in(TABLE, Path::new("/run/husk/a/none")));
    }

    #[test]
    fn real_listener_is_seen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("l.sock");
        let me = std::process::id();
        assert!(!is_listening(me, &path));
        let _l = std::os::unix::net::UnixListener::bind(&path).unwrap();
        assert!(is_listening(me, &path));
    }
}
