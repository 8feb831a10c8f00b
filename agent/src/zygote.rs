//! Builds containers and exec processes from a single-threaded helper.
//!
//! libcontainer creates processes with raw clone3 and then runs Rust code in
//! the child (allocations, logging). In the multithreaded agent a clone taken
//! while another thread holds a lock (glibc's malloc arena lock is the
//! likeliest, having no atfork reset on raw clone3) leaves the child stuck
//! on it for good: its parent waits for the child's report
//! with the reaper lock held, so every later create, exec and exit report
//! stalls, while the agent's vsock port still answers. Seen as ExecProcess
//! timeouts after 4 to ~150 sequential execs. The zygote is forked before
//! the agent starts any thread and stays single-threaded; the agent sends it
//! each build over a socket pair (stdio descriptors as SCM_RIGHTS) and gets
//! the new process's pid back. With `as_sibling`, every process libcontainer
//! makes is the agent's child, so the reaper still sees every exit.

use std::io::IoSlice;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use libcontainer::container::builder::ContainerBuilder;
use libcontainer::oci_spec::runtime::{Process, Spec};
use libcontainer::syscall::syscall::SyscallType;
use nix::sys::socket::{
    recvmsg, sendmsg, socketpair, AddressFamily, ControlMessage, ControlMessageOwned, MsgFlags,
    SockFlag, SockType,
};
use serde::{Deserialize, Serialize};

/// Largest request or reply.
const MAX_MSG: usize = 64 * 1024;

/// What to build.
#[derive(Debug, Serialize, Deserialize)]
pub enum Kind {
    /// A container's init from the bundle's config.json.
    Init { bundle: PathBuf },
    /// An exec process from an OCI Process file, in the container whose
    /// bundle (config.json) is `bundle`.
    Exec { process: PathBuf, bundle: PathBuf },
}

#[derive(Debug, Serialize, Deserialize)]
pub struct Request {
    pub id: String,
    pub state_dir: PathBuf,
    pub kind: Kind,
    /// Console socket for a terminal process; else three stdio fds travel
    /// with the request.
    pub console: Option<PathBuf>,
}

#[derive(Debug, Serialize, Deserialize)]
enum Reply {
    Pid(i32),
    Error(String),
}

/// The agent's end of the zygote.
pub struct Zygote {
    sock: Mutex<OwnedFd>,
}

/// Forks the zygote. Call before any thread exists.
pub fn start() -> nix::Result<Zygote> {
    let (agent_end, zygote_end) = socketpair(
        AddressFamily::Unix,
        SockType::SeqPacket,
        None,
        SockFlag::SOCK_CLOEXEC,
    )?;
    // SAFETY: the process is single-threaded here (the caller's contract),
    // so the child may run any code.
    match unsafe { nix::unistd::fork() }? {
        nix::unistd::ForkResult::Child => {
            drop(agent_end);
            let _ = nix::sys::prctl::set_name(c"husk-zygote");
            serve(&zygote_end);
            std::process::exit(0);
        }
        nix::unistd::ForkResult::Parent { .. } => Ok(Zygote {
            sock: Mutex::new(agent_end),
        }),
    }
}

impl Zygote {
    /// Has the zygote build `req` with these stdio fds (none for a console)
    /// and returns the pid of the process made.
    pub fn build(&self, req: &Request, stdio: &[RawFd]) -> Result<i32, String> {
        let sock = self.sock.lock().unwrap_or_else(|e| e.into_inner());
        let msg = serde_json::to_vec(req).map_err(|e| e.to_string())?;
        let cmsg = [ControlMessage::ScmRights(stdio)];
        let cmsgs: &[ControlMessage] = if stdio.is_empty() { &[] } else { &cmsg };
        sendmsg::<()>(
            sock.as_raw_fd(),
            &[IoSlice::new(&msg)],
            cmsgs,
            MsgFlags::empty(),
            None,
        )
        .map_err(|e| format!("send to the zygote: {e}"))?;
        let mut buf = vec![0u8; MAX_MSG];
        let mut iov = [std::io::IoSliceMut::new(&mut buf)];
        let n = recvmsg::<()>(sock.as_raw_fd(), &mut iov, None, MsgFlags::empty())
            .map_err(|e| format!("reply from the zygote: {e}"))?
            .bytes;
        if n == 0 {
            return Err("the zygote is gone".into());
        }
        match serde_json::from_slice(&buf[..n]) {
            Ok(Reply::Pid(pid)) => Ok(pid),
            Ok(Reply::Error(e)) => Err(e),
            Err(e) => Err(format!("bad reply from the zygote: {e}")),
        }
    }
}

/// The zygote's loop: one build at a time until the agent's end closes.
fn serve(sock: &OwnedFd) {
    let mut buf = vec![0u8; MAX_MSG];
    loop {
        let mut space = nix::cmsg_space!([RawFd; 3]);
        let mut iov = [std::io::IoSliceMut::new(&mut buf)];
        let (n, fds) = match recvmsg::<()>(
            sock.as_raw_fd(),
            &mut iov,
            Some(&mut space),
            MsgFlags::MSG_CMSG_CLOEXEC,
        ) {
            Ok(m) if m.bytes == 0 => return,
            Ok(m) => {
                let mut fds = Vec::new();
                for c in m.cmsgs().into_iter().flatten() {
                    if let ControlMessageOwned::ScmRights(v) = c {
                        // SAFETY: SCM_RIGHTS delivered fresh descriptors to
                        // this process; nothing else owns them.
                        fds.extend(v.into_iter().map(|fd| unsafe { OwnedFd::from_raw_fd(fd) }));
                    }
                }
                (m.bytes, fds)
            }
            Err(nix::Error::EINTR) => continue,
            Err(_) => return,
        };
        let reply = match serde_json::from_slice::<Request>(&buf[..n]) {
            Ok(req) => match build(req, fds) {
                Ok(pid) => Reply::Pid(pid),
                Err(e) => Reply::Error(e),
            },
            Err(e) => Reply::Error(format!("bad request: {e}")),
        };
        let msg = serde_json::to_vec(&reply).unwrap_or_default();
        if sendmsg::<()>(
            sock.as_raw_fd(),
            &[IoSlice::new(&msg)],
            &[],
            MsgFlags::empty(),
            None,
        )
        .is_err()
        {
            return;
        }
    }
}

fn build(req: Request, fds: Vec<OwnedFd>) -> Result<i32, String> {
    let e = |e: libcontainer::error::LibcontainerError| e.to_string();
    let mut b = ContainerBuilder::new(req.id.clone(), SyscallType::default())
        .with_root_path(&req.state_dir)
        .and_then(|b| b.validate_id())
        .map_err(e)?;
    match (&req.console, <[OwnedFd; 3]>::try_from(fds)) {
        (Some(path), _) => b = b.with_console_socket(Some(path.clone())),
        (None, Ok([i, o, er])) => b = b.with_stdin(i).with_stdout(o).with_stderr(er),
        (None, Err(v)) => return Err(format!("{} stdio descriptors, want 3", v.len())),
    }
    match req.kind {
        Kind::Init { bundle } => {
            let c = b
                .as_init(bundle)
                .with_systemd(false)
                .with_detach(true)
                .as_sibling(true)
                .build()
                .map_err(e)?;
            c.pid()
                .map(|p| p.as_raw())
                .ok_or_else(|| "created without a pid".to_owned())
        }
        Kind::Exec { process, bundle } => {
            if let Some(executor) = exec_seccomp(&process, &bundle)? {
                b = b.with_executor(executor);
            }
            b.as_tenant()
                .with_detach(true)
                .with_process(Some(&process))
                .as_sibling(true)
                .build()
                .map(|p| p.as_raw())
                .map_err(e)
        }
    }
}

/// The executor that puts exec `process_file` under its container's seccomp
/// filter (see `tenant.rs`); rewrites the file with the capabilities the
/// filter's load needs and the `HOME` runc would give.
fn exec_seccomp(
    process_file: &Path,
    bundle: &Path,
) -> Result<Option<crate::tenant::SeccompExecutor>, String> {
    let read = |p: &Path| std::fs::read(p).map_err(|e| format!("read {}: {e}", p.display()));
    let mut process: Process =
        serde_json::from_slice(&read(process_file)?).map_err(|e| format!("exec process: {e}"))?;
    let config = bundle.join("config.json");
    let spec: Spec =
        serde_json::from_slice(&read(&config)?).map_err(|e| format!("container spec: {e}"))?;
    let seccomp = spec.linux().as_ref().and_then(|l| l.seccomp().clone());
    let before = process.clone();
    if let Some(root) = spec.root() {
        crate::tenant::default_home(&mut process, root.path());
    }
    let executor = crate::tenant::prepare(&mut process, seccomp)?;
    if process != before {
        let json = serde_json::to_vec(&process).map_err(|e| e.to_string())?;
        std::fs::write(process_file, json)
            .map_err(|e| format!("write {}: {e}", process_file.display()))?;
    }
    Ok(executor)
}
