//! Child processes that cannot outlive their owner.
//!
//! Every helper (VMM, device daemons) runs in its own process group, dies with
//! the thread that spawned it (`PR_SET_PDEATHSIG`), and is killed with its
//! whole group when its [`Process`] is dropped, so no failure path leaks one.

use std::ffi::OsStr;
use std::fs::File;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;

use crate::confine::jail::Jail;
use crate::confine::pidns;
use crate::confine::seccomp::Filter;
use husk_sys::console::ConsoleLog;

#[derive(Debug, thiserror::Error)]
pub enum ProcessError {
    #[error("{name}: binary {path} not found; install it or set its path in the husk config")]
    NotFound { name: &'static str, path: PathBuf },
    #[error("{name}: cannot create log {path}")]
    Log {
        name: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{name}: cannot start {path}")]
    Spawn {
        name: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{name}: its jail")]
    Jail {
        name: &'static str,
        #[source]
        source: crate::confine::jail::JailError,
    },
    #[error("{name}: its seccomp filter")]
    Filter {
        name: &'static str,
        #[source]
        source: husk_sys::seccomp::FilterError,
    },
    #[error("{name}: waiting for exit")]
    Wait {
        name: &'static str,
        #[source]
        source: std::io::Error,
    },
}

/// What a spawned program may do beyond its uid: applied in the child
/// before exec.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Confine {
    /// Empties every capability set, the bounding set included, and sets
    /// no_new_privs: the program keeps root's uid (it owns the sandbox's
    /// files) without root's powers, and exec cannot give them back.
    pub no_capabilities: bool,
    /// RLIMIT_NOFILE.
    pub max_files: Option<u64>,
    /// RLIMIT_FSIZE, in bytes: no file it writes grows past this.
    pub max_file_size: Option<u64>,
    /// The only system calls it may make; any other kills it (see
    /// [`crate::confine::seccomp`]). Installed with no_new_privs when
    /// `no_capabilities`, else through the caller's CAP_SYS_ADMIN.
    pub seccomp: Option<&'static crate::confine::seccomp::Allow>,
    /// Namespaces it gets new (`CLONE_NEW*` flags for unshare(2)), made
    /// before its capabilities go: an IPC namespace of its own, an empty
    /// network namespace for a process that needs no network (a VMM's
    /// taps come as descriptors; unix sockets bound to paths are reached
    /// across network namespaces), a PID namespace whose pid 1 it is (see
    /// [`crate::confine::pidns`]).
    pub new_namespaces: libc::c_int,
    /// The uid and gid it runs as, a sandbox's own (see
    /// [`crate::confine::ids`]); with `no_capabilities` only.
    pub user: Option<u32>,
    /// Its one supplementary group with `user` (/dev/kvm's, for a VMM
    /// that accelerates); none otherwise.
    pub group: Option<u32>,
}

/// PID and IPC namespaces of its own and an empty network namespace.
const NO_PID_IPC_NET: libc::c_int = libc::CLONE_NEWPID | libc::CLONE_NEWIPC | libc::CLONE_NEWNET;

impl Confine {
    /// Nothing beyond what the caller has (a daemon that confines itself).
    pub const NONE: Confine = Confine {
        no_capabilities: false,
        max_files: None,
        max_file_size: None,
        seccomp: None,
        new_namespaces: 0,
        user: None,
        group: None,
    };

    /// A device daemon that needs no privilege: descriptors it is given,
    /// files and sockets in the root-owned sandbox directory.
    pub const UNPRIVILEGED: Confine = Confine {
        no_capabilities: true,
        max_files: Some(4096),
        max_file_size: Some(64 << 20),
        seccomp: None,
        new_namespaces: 0,
        user: None,
        group: None,
    };

    /// vhost-device-vsock: unprivileged, under husk's own filter.
    pub const VSOCK_DAEMON: Confine = Confine {
        seccomp: Some(crate::confine::seccomp::VSOCK_DAEMON),
        new_namespaces: NO_PID_IPC_NET,
        ..Confine::UNPRIVILEGED
    };

    /// virtiofsd: root's file capabilities (it serves the guest's files
    /// with their owners and modes, and sets up its namespace sandbox),
    /// its own limits, under husk's filter on top of its own; its sandbox
    /// makes its own network namespace, husk an IPC one.
    pub const FS_DAEMON: Confine = Confine {
        seccomp: Some(crate::confine::seccomp::VIRTIOFSD),
        new_namespaces: libc::CLONE_NEWIPC,
        ..Confine::NONE
    };

    /// A VMM: unprivileged as well (/dev/kvm is root's, the taps come as
    /// descriptors), but with no file size limit: the guest's memory is a
    /// memfd of the guest's size, and growing it past RLIMIT_FSIZE would
    /// kill the VMM with SIGXFSZ. Its console is bounded by itself or by
    /// the sandbox.
    pub const VMM: Confine = Confine {
        max_file_size: None,
        new_namespaces: NO_PID_IPC_NET,
        ..Confine::UNPRIVILEGED
    };

    /// # Safety
    /// Runs between fork and exec: only async-signal-safe syscalls.
    unsafe fn apply(&self) -> std::io::Result<()> {
        let fail = || Err(std::io::Error::last_os_error());
        // SAFETY: unshare(2) takes flags and touches no memory.
        if self.new_namespaces != 0 && unsafe { libc::unshare(self.new_namespaces) } != 0 {
            return fail();
        }
        for (resource, value) in [
            (libc::RLIMIT_NOFILE, self.max_files),
            (libc::RLIMIT_FSIZE, self.max_file_size),
        ] {
            let Some(v) = value else { continue };
            let lim = libc::rlimit {
                rlim_cur: v,
                rlim_max: v,
            };
            // SAFETY: a valid rlimit for the duration of the call.
            if unsafe { libc::setrlimit(resource, &lim) } != 0 {
                return fail();
            }
        }
        if !self.no_capabilities {
            return Ok(());
        }
        // SAFETY: prctl and capget/capset with a header and data arrays
        // that live across each call; no memory of the parent is touched.
        unsafe {
            if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0 {
                return fail();
            }
            if libc::prctl(
                libc::PR_CAP_AMBIENT,
                libc::PR_CAP_AMBIENT_CLEAR_ALL,
                0,
                0,
                0,
            ) != 0
            {
                return fail();
            }
            let mut header = CapHeader {
                version: LINUX_CAPABILITY_VERSION_3,
                pid: 0,
            };
            let mut data = [CapData::default(); 2];
            if libc::syscall(libc::SYS_capget, &mut header, data.as_mut_ptr()) != 0 {
                return fail();
            }
            // A caller without capabilities has none to lose (and may not
            // drop from the bounding set; no_new_privs covers setuid); nor
            // may it switch ids, which must not pass unnoticed.
            if data.iter().all(|d| d.permitted == 0) {
                if self.user.is_some() {
                    *libc::__errno_location() = libc::EPERM;
                    return fail();
                }
                return Ok(());
            }
            // Up to the highest capability any kernel defines; EINVAL ends it.
            for cap in 0..64 {
                if libc::prctl(libc::PR_CAPBSET_DROP, cap, 0, 0, 0) != 0 {
                    if *libc::__errno_location() == libc::EINVAL {
                        break;
                    }
                    return fail();
                }
            }
            if let Some(id) = self.user {
                // The switch from uid 0 empties the permitted and
                // effective sets; the capset below empties the rest.
                let groups = [self.group.unwrap_or(id)];
                let count = usize::from(self.group.is_some());
                if libc::setgroups(count, groups.as_ptr()) != 0
                    || libc::setresgid(id, id, id) != 0
                    || libc::setresuid(id, id, id) != 0
                {
                    return fail();
                }
                data = [CapData::default(); 2];
            }
            // No inheritable set: with an empty bounding set, exec leaves
            // the permitted and effective sets empty even for uid 0.
            for d in &mut data {
                d.inheritable = 0;
            }
            if libc::syscall(libc::SYS_capset, &mut header, data.as_ptr()) != 0 {
                return fail();
            }
        }
        Ok(())
    }
}

const LINUX_CAPABILITY_VERSION_3: u32 = 0x2008_0522;

/// Empties the calling thread's permitted, effective and inheritable
/// capability sets, for a process that will not exec (exec under an empty
/// bounding set does that for the others).
///
/// # Safety
/// Async-signal-safe: capset(2) on locals.
pub(crate) unsafe fn clear_capabilities() -> std::io::Result<()> {
    let mut header = CapHeader {
        version: LINUX_CAPABILITY_VERSION_3,
        pid: 0,
    };
    let data = [CapData::default(); 2];
    // SAFETY: a header and two zeroed data structs that live across the call.
    if unsafe { libc::syscall(libc::SYS_capset, &mut header, data.as_ptr()) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// `struct __user_cap_header_struct`.
#[repr(C)]
struct CapHeader {
    version: u32,
    pid: libc::c_int,
}

/// `struct __user_cap_data_struct`.
#[repr(C)]
#[derive(Clone, Copy, Default)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

/// The most descriptors [`Process::spawn_with_fds`] passes.
pub const MAX_INHERITED: usize = 16;

/// A running helper process and the log that holds its stdout and stderr.
#[derive(Debug)]
pub struct Process {
    name: &'static str,
    child: Child,
    /// The program's pid: the child's, or in a PID namespace of its own
    /// the pid (as the host sees it) of the namespace's pid 1, whose
    /// waiter the child is.
    program: u32,
    /// A pidfd of the namespace's pid 1 (its pid is reaped by the waiter,
    /// not by us).
    program_fd: Option<OwnedFd>,
    log: PathBuf,
    exited: Option<ExitStatus>,
    /// Disconnected once the log pump has written the last output.
    log_done: std::sync::mpsc::Receiver<()>,
}

/// Bytes of a helper's output kept on disk, its log and the rotated
/// `<log>.1` together (the console log's rotation).
pub const LOG_LIMIT: u64 = husk_sys::console::DEFAULT_LIMIT;

/// How long [`Process::log_tail`] of an exited process waits for the last
/// output to reach the file (a child of the process that still holds its
/// output may keep the pipe open).
const LOG_FLUSH: Duration = Duration::from_millis(500);

/// Copies a process's output pipe into its bounded log until the pipe
/// closes; the receiver disconnects when all of it is on disk.
fn pump_log(
    name: &'static str,
    read: OwnedFd,
    mut sink: ConsoleLog,
) -> std::io::Result<std::sync::mpsc::Receiver<()>> {
    use std::io::{Read, Write};
    let (done, log_done) = std::sync::mpsc::channel::<()>();
    std::thread::Builder::new()
        .name(format!("log-{name}"))
        .stack_size(64 << 10)
        .spawn(move || {
            let mut pipe = File::from(read);
            let mut buf = [0u8; 8 << 10];
            loop {
                match pipe.read(&mut buf) {
                    Ok(0) => break,
                    Ok(n) => drop(sink.write_all(&buf[..n])),
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                    Err(_) => break,
                }
            }
            // Dropping the log writes what is pending.
            drop(sink);
            drop(done);
        })?;
    Ok(log_done)
}

/// Finds `program` the way a shell would: a path with a slash is taken as is,
/// a bare name is searched in `$PATH` and then in `/usr/local/bin`, where
/// `make install` puts the device daemons.
pub fn find_binary(program: &Path) -> Option<PathBuf> {
    if program.as_os_str().is_empty() {
        return None;
    }
    if program.components().count() > 1 || program.is_absolute() {
        return is_executable(program).then(|| program.to_path_buf());
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain([PathBuf::from("/usr/local/bin")])
        .map(|dir| dir.join(program))
        .find(|p| is_executable(p))
}

fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    p.metadata()
        .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

impl Process {
    /// Starts `program` with `args`, output appended to `log`.
    pub fn spawn<I, S>(
        name: &'static str,
        program: &Path,
        args: I,
        log: &Path,
    ) -> Result<Self, ProcessError>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        Self::spawn_with_fds(name, program, args, log, &[])
    }

    /// As [`Process::spawn`], and the child gets `fds[i]` as descriptor
    /// `3 + i` (at most [`MAX_INHERITED`]); no other descriptor of the
    /// caller reaches it.
    pub fn spawn_with_fds<I, S>(
        name: &'static str,
        program: &Path,
        args: I,
        log: &Path,
        fds: &[RawFd],
    ) -> Result<Self, ProcessError>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        Self::spawn_confined(name, program, args, log, fds, Confine::NONE, None)
    }

    /// As [`Process::spawn_with_fds`], under `confine`.
    pub fn spawn_confined<I, S>(
        name: &'static str,
        program: &Path,
        args: I,
        log: &Path,
        fds: &[RawFd],
        confine: Confine,
        jail: Option<Jail>,
    ) -> Result<Self, ProcessError>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        if fds.len() > MAX_INHERITED {
            return Err(ProcessError::Spawn {
                name,
                path: program.to_path_buf(),
                source: std::io::Error::new(
                    std::io::ErrorKind::InvalidInput,
                    format!("{} descriptors to pass, at most {MAX_INHERITED}", fds.len()),
                ),
            });
        }
        let mut inherited = [-1 as RawFd; MAX_INHERITED];
        inherited[..fds.len()].copy_from_slice(fds);
        let count = fds.len();
        let path = find_binary(program).ok_or_else(|| ProcessError::NotFound {
            name,
            path: program.to_path_buf(),
        })?;
        // The program itself is in its jail (a system directory there
        // usually shows it already).
        let jail = jail
            .map(|j| j.read_only(&path))
            .transpose()
            .map_err(|source| ProcessError::Jail { name, source })?;
        let log_err = |source| ProcessError::Log {
            name,
            path: log.to_path_buf(),
            source,
        };
        // The output goes through a pipe into a bounded, rotating log: a
        // guest that makes a device print in a loop cannot fill the host.
        let (read, out) =
            nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(|e| log_err(e.into()))?;
        let err = out.try_clone().map_err(log_err)?;
        let sink = ConsoleLog::create(log, LOG_LIMIT, || {}).map_err(log_err)?;
        // Built here: the child may not allocate.
        let mut filter = confine
            .seccomp
            .map(Filter::allow_in_child)
            .transpose()
            .map_err(|source| ProcessError::Filter { name, source })?;
        let pid_ns = confine.new_namespaces & libc::CLONE_NEWPID != 0;
        let mut waiter = pid_ns
            .then(|| Filter::allow_in_child(pidns::WAITER))
            .transpose()
            .map_err(|source| ProcessError::Filter { name, source })?;
        let spawn_err = |source| ProcessError::Spawn {
            name,
            path: path.clone(),
            source,
        };
        let report = pid_ns
            .then(pidns::report_pipe)
            .transpose()
            .map_err(spawn_err)?;
        let report_fd = report.as_ref().map_or(-1, |(_, w)| w.as_raw_fd());
        // The process whose death ends the child (the keeper thread forks
        // it, but the parent is this process).
        let owner = std::process::id() as libc::pid_t;
        let mut cmd = Command::new(&path);
        cmd.args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::from(out))
            .stderr(Stdio::from(err))
            .process_group(0);
        // SAFETY: the closure runs in the child between fork and exec; it
        // allocates nothing and calls only prctl(2), fcntl(2), dup2(2),
        // setrlimit(2), capget/capset(2), setgroups/setresgid/setresuid(2),
        // getppid(2), the PID namespace split's fork, write, close_range,
        // sigaction, kill and waitpid, and the jail's unshare, mount,
        // mkdir, open, symlink, chdir, pivot_root and chroot, which are
        // async-signal-safe, on descriptors the caller keeps open across
        // the spawn and strings the jail's plan owns.
        unsafe {
            cmd.pre_exec(move || {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                // Each passed descriptor first to a high number (closed at
                // exec), so no source is overwritten before it is copied,
                // then to its place (dup2 clears close-on-exec there).
                let mut high = [-1 as RawFd; MAX_INHERITED];
                for i in 0..count {
                    high[i] = libc::fcntl(inherited[i], libc::F_DUPFD_CLOEXEC, 64);
                    if high[i] < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                for (i, fd) in high.iter().enumerate().take(count) {
                    if libc::dup2(*fd, 3 + i as RawFd) < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                if let Some(j) = &jail {
                    j.enter()?;
                }
                confine.apply()?;
                if confine.user.is_some() {
                    // A change of ids clears the parent-death signal: set
                    // it again, and if the owner died meanwhile, end here.
                    if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    if libc::getppid() != owner {
                        return Err(std::io::Error::from_raw_os_error(libc::ESRCH));
                    }
                }
                if let Some(w) = &mut waiter {
                    pidns::split(report_fd, w)?;
                }
                match &mut filter {
                    Some(f) => f.install_in_child(),
                    None => Ok(()),
                }
            });
        }
        // The command (with the pipe's write ends) is gone after the
        // spawn: the log ends when the process and its children have.
        let mut child = spawn_from_keeper(cmd).map_err(spawn_err)?;
        let program = match report {
            None => child.id(),
            Some((report, ours)) => {
                drop(ours);
                match pidns::program_pid(report) {
                    Some(pid) => pid,
                    None => {
                        let _ = child.kill();
                        let _ = child.wait();
                        return Err(spawn_err(std::io::Error::other(
                            "its PID namespace's pid 1 was not reported",
                        )));
                    }
                }
            }
        };
        // When pid 1 has already ended, the group's signals do.
        let program_fd = (program != child.id())
            .then(|| pidfd_open(program).ok())
            .flatten();
        tracing::debug!(name, pid = program, leader = child.id(), "spawned");
        let log_done = pump_log(name, read, sink).map_err(log_err)?;
        Ok(Self {
            name,
            child,
            program,
            program_fd,
            log: log.to_path_buf(),
            exited: None,
            log_done,
        })
    }

    pub fn name(&self) -> &'static str {
        self.name
    }

    /// The program's pid (in a PID namespace of its own, as the host sees
    /// it): the process its /proc, socket peers and report are about.
    pub fn pid(&self) -> u32 {
        self.program
    }

    /// A pidfd that turns readable when the process has ended (the
    /// program, or its waiter, which ends with it): it is our unreaped
    /// child, so no other process can have its pid meanwhile.
    pub fn exit_fd(&self) -> std::io::Result<OwnedFd> {
        pidfd_open(self.child.id())
    }

    /// SIGKILL to the group now, without waiting; nothing if it has been
    /// reaped (its group id could then be another's).
    pub fn kill_now(&self) {
        if self.exited.is_none() {
            self.kill_group(Signal::SIGKILL);
        }
    }

    pub fn log_path(&self) -> &Path {
        &self.log
    }

    /// The exit status if the process has ended, without blocking.
    pub fn try_wait(&mut self) -> Result<Option<ExitStatus>, ProcessError> {
        if self.exited.is_none() {
            self.exited = self.child.try_wait().map_err(|source| ProcessError::Wait {
                name: self.name,
                source,
            })?;
        }
        Ok(self.exited)
    }

    /// Waits until the process ends or `timeout` passes: on its pidfd,
    /// which turns readable when it exits (it is our unreaped child, so
    /// the pid is still its own).
    pub fn wait_timeout(&mut self, timeout: Duration) -> Result<Option<ExitStatus>, ProcessError> {
        if let Some(status) = self.try_wait()? {
            return Ok(Some(status));
        }
        let name = self.name;
        let fd =
            pidfd_open(self.child.id()).map_err(|source| ProcessError::Wait { name, source })?;
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            wait_any(&[fd.as_fd()], left).map_err(|source| ProcessError::Wait { name, source })?;
            if let Some(status) = self.try_wait()? {
                return Ok(Some(status));
            }
            if Instant::now() >= deadline {
                return Ok(None);
            }
        }
    }

    /// SIGTERM to the group, SIGKILL after `grace`; reaps the process.
    pub fn terminate(&mut self, grace: Duration) -> Result<ExitStatus, ProcessError> {
        if let Some(status) = self.try_wait()? {
            self.kill_group(Signal::SIGKILL);
            return Ok(status);
        }
        // A namespace's pid 1 ignores a SIGTERM it does not handle, where
        // outside the namespace the signal's default would have ended it
        // at once: SIGKILL does that.
        if self.program != self.child.id() && !pidns::catches(self.program, libc::SIGTERM) {
            return self.kill();
        }
        self.kill_group(Signal::SIGTERM);
        if let Some(status) = self.wait_timeout(grace)? {
            self.kill_group(Signal::SIGKILL);
            return Ok(status);
        }
        self.kill()
    }

    /// SIGKILL to the group; reaps the process.
    pub fn kill(&mut self) -> Result<ExitStatus, ProcessError> {
        self.kill_group(Signal::SIGKILL);
        let status = self.child.wait().map_err(|source| ProcessError::Wait {
            name: self.name,
            source,
        })?;
        self.exited = Some(status);
        Ok(status)
    }

    /// Signals the whole group: a daemon that forked (virtiofsd's sandbox
    /// does) is stopped with all its children. In a PID namespace of its
    /// own, the program (pid 1) alone: the namespace ends with it, and its
    /// waiter then reaps it and ends too, so once the waiter is reaped
    /// nothing of it is left.
    fn kill_group(&self, signal: Signal) {
        if let Some(fd) = &self.program_fd {
            // SAFETY: a pidfd we own, a signal number, no siginfo, no flags.
            let rc = unsafe {
                libc::syscall(
                    libc::SYS_pidfd_send_signal,
                    fd.as_raw_fd(),
                    signal as libc::c_int,
                    std::ptr::null::<libc::siginfo_t>(),
                    0,
                )
            };
            if rc != 0 {
                let e = std::io::Error::last_os_error();
                if e.raw_os_error() != Some(libc::ESRCH) {
                    tracing::warn!(name = self.name, pid = self.program, %signal, error = %e, "cannot signal the program");
                }
            }
            return;
        }
        let pgid = Pid::from_raw(self.child.id() as i32);
        match killpg(pgid, signal) {
            Ok(()) | Err(nix::Error::ESRCH) => {}
            Err(e) => {
                tracing::warn!(name = self.name, %pgid, %signal, error = %e, "cannot signal process group")
            }
        }
    }

    /// The last `max` bytes of the process log, for error messages.
    pub fn log_tail(&self, max: usize) -> String {
        if self.exited.is_some() {
            // Ends at once when the pump is done (disconnected).
            let _ = self.log_done.recv_timeout(LOG_FLUSH);
        }
        tail_of_file(&self.log, max)
    }
}

/// Forks every helper from one thread that lives as long as the process.
///
/// `PR_SET_PDEATHSIG` fires when the *thread* that forked the child exits,
/// not the process; callers such as tokio's blocking pool retire idle
/// threads after seconds, which would kill a running VM. Forking from a
/// thread that never exits makes the signal mean "the owner process died".
fn spawn_from_keeper(cmd: Command) -> std::io::Result<Child> {
    use std::sync::mpsc::{channel, Sender};
    use std::sync::{Mutex, OnceLock};
    type Request = (Command, Sender<std::io::Result<Child>>);
    static KEEPER: OnceLock<Mutex<Sender<Request>>> = OnceLock::new();
    let keeper = KEEPER.get_or_init(|| {
        let (tx, rx) = channel::<Request>();
        std::thread::Builder::new()
            .name("husk-spawner".into())
            .spawn(move || {
                for (mut cmd, reply) in rx {
                    let _ = reply.send(cmd.spawn());
                }
            })
            .expect("start the spawner thread");
        Mutex::new(tx)
    });
    let (reply, result) = channel();
    keeper
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .send((cmd, reply))
        .map_err(|_| std::io::Error::other("spawner thread is gone"))?;
    result
        .recv()
        .map_err(|_| std::io::Error::other("spawner thread is gone"))?
}

impl Drop for Process {
    fn drop(&mut self) {
        if self.exited.is_none() {
            let _ = self.kill();
        } else {
            // The leader is gone; make sure nothing of its group outlives it.
            self.kill_group(Signal::SIGKILL);
        }
    }
}

/// The last `max` bytes of a text file, trimmed to whole lines; a last line
/// longer than `max` keeps its end (a flood without newlines still shows
/// what it ended with). Empty if the file cannot be read.
pub fn tail_of_file(path: &Path, max: usize) -> String {
    let Ok(bytes) = std::fs::read(path) else {
        return String::new();
    };
    let end = bytes.trim_ascii_end().len();
    let start = end.saturating_sub(max);
    let mut text = &bytes[start..end];
    if start > 0 && bytes[start - 1] != b'\n' {
        // Cut inside a line: its start goes when a whole line follows.
        if let Some(nl) = text.iter().position(|&b| b == b'\n') {
            text = &text[nl + 1..];
        }
    }
    String::from_utf8_lossy(text).into_owned()
}

/// A pidfd for `pid` (Linux 5.3): readable once the process exits, and a
/// signal through it cannot reach a later process with the same pid.
pub fn pidfd_open(pid: u32) -> std::io::Result<OwnedFd> {
    // SAFETY: pidfd_open takes a pid and flags and returns a new descriptor
    // or -1; it touches no memory of ours.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: the kernel just returned this descriptor; nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
}

/// SIGKILLs the process behind a pidfd (no pid reuse race); one that is
/// gone already is fine.
pub fn pidfd_kill(fd: &OwnedFd) {
    // SAFETY: a valid pidfd, a signal number, no siginfo, no flags.
    let r = unsafe {
        libc::syscall(
            libc::SYS_pidfd_send_signal,
            fd.as_raw_fd(),
            libc::SIGKILL,
            std::ptr::null::<libc::siginfo_t>(),
            0,
        )
    };
    if r < 0 {
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::ESRCH) {
            tracing::warn!(error = %e, "killing a sandbox process");
        }
    }
}

/// Waits up to `timeout` for any of `fds` to turn readable (a signal's
/// interruption ends the wait early; callers look again).
pub fn wait_any(fds: &[BorrowedFd<'_>], timeout: Duration) -> std::io::Result<()> {
    let ms = timeout.as_micros().div_ceil(1000).min(i32::MAX as u128) as i32;
    let mut polled: Vec<PollFd> = fds
        .iter()
        .map(|fd| PollFd::new(*fd, PollFlags::POLLIN))
        .collect();
    match poll(
        &mut polled,
        PollTimeout::try_from(ms).unwrap_or(PollTimeout::MAX),
    ) {
        Ok(_) | Err(nix::errno::Errno::EINTR) => Ok(()),
        Err(e) => Err(e.into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::process::ExitStatusExt;

    #[test]
    fn missing_binary_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let err = Process::spawn(
            "virtiofsd",
            Path::new("/nonexistent/virtiofsd"),
            ["x"],
            &dir.path().join("log"),
        )
        .unwrap_err();
        assert!(err.to_string().contains("/nonexistent/virtiofsd"), "{err}");
    }

    #[test]
    fn drop_kills_the_whole_group() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("log");
        let pidfile = dir.path().join("grandchild");
        let script = format!("sleep 60 & echo $! > {}; wait", pidfile.display());
        let p = Process::spawn("sh", Path::new("sh"), ["-c", &script], &log).unwrap();
        let leader = p.pid();
        let deadline = Instant::now() + Duration::from_secs(5);
        let grandchild: i32 = loop {
            if let Some(pid) = std::fs::read_to_string(&pidfile)
                .ok()
                .and_then(|s| s.trim().parse().ok())
            {
                break pid;
            }
            assert!(Instant::now() < deadline, "grandchild never started");
            std::thread::sleep(Duration::from_millis(10));
        };
        drop(p);
        assert!(!Path::new(&format!("/proc/{leader}")).exists());
        // The grandchild is reparented and reaped by init; wait for it to go.
        let deadline = Instant::now() + Duration::from_secs(5);
        while nix::sys::signal::kill(Pid::from_raw(grandchild), None).is_ok() {
            let zombie =
                std::fs::read_to_string(format!("/proc/{grandchild}/stat")).is_ok_and(|s| {
                    s.rsplit_once(')')
                        .is_some_and(|(_, r)| r.trim_start().starts_with('Z'))
                });
            if zombie {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "grandchild {grandchild} survived its group"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    #[test]
    fn an_unprivileged_child_has_no_capabilities_no_new_privs_and_its_limits() {
        let d = tempfile::tempdir().unwrap();
        let log = d.path().join("log");
        let mut p = Process::spawn_confined(
            "sh",
            Path::new("sh"),
            ["-c", "grep -E '^(CapEff|CapPrm|CapBnd|NoNewPrivs)' /proc/self/status; ulimit -n; ulimit -f"],
            &log,
            &[],
            Confine::UNPRIVILEGED,
            None,
        )
        .unwrap();
        assert!(p.wait_timeout(Duration::from_secs(10)).unwrap().is_some());
        // The tail drops the last newline.
        let out = format!("{}\n", p.log_tail(usize::MAX));
        for want in [
            "CapEff:\t0000000000000000",
            "CapPrm:\t0000000000000000",
            "NoNewPrivs:\t1",
            "\n4096\n",
            // ulimit -f counts 512-byte blocks.
            &format!("\n{}\n", (64u64 << 20) / 512),
        ] {
            assert!(out.contains(want), "{want:?} not in {out}");
        }
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } == 0 {
            assert!(out.contains("CapBnd:\t0000000000000000"), "{out}");
        }
    }

    fn pid_ns() -> Confine {
        Confine {
            new_namespaces: libc::CLONE_NEWPID,
            ..Confine::UNPRIVILEGED
        }
    }

    fn is_root() -> bool {
        // SAFETY: geteuid has no preconditions.
        unsafe { libc::geteuid() == 0 }
    }

    #[test]
    fn in_its_pid_namespace_kill_minus_1_reaches_nothing_and_its_exit_is_the_waiters() {
        let d = tempfile::tempdir().unwrap();
        let log = d.path().join("log");
        // The script checks it is pid 1 before it signals everything it
        // may: outside a namespace of its own that would be all of root's
        // processes.
        let script = "[ $$ = 1 ] || exit 99; kill -9 -1; echo kill $?; exit 7";
        let spawned = Process::spawn_confined(
            "sh",
            Path::new("sh"),
            ["-c", script],
            &log,
            &[],
            pid_ns(),
            None,
        );
        if !is_root() {
            let err = spawned.unwrap_err().to_string();
            assert!(err.contains("cannot start"), "{err}");
            return;
        }
        let mut canary = Command::new("sleep").arg("30").spawn().unwrap();
        let mut p = spawned.unwrap();
        let st = p
            .wait_timeout(Duration::from_secs(10))
            .unwrap()
            .expect("it ends");
        // kill(-1) found no process to signal (ESRCH).
        let out = p.log_tail(200);
        assert!(
            out.contains("No such process") && out.ends_with("kill 1"),
            "{out}"
        );
        assert_eq!(st.code(), Some(7), "the waiter ends as its program did");
        assert!(
            canary.try_wait().unwrap().is_none(),
            "the canary was killed"
        );
        canary.kill().unwrap();
        canary.wait().unwrap();
    }

    #[test]
    fn terminate_ends_a_pid_1_that_ignores_sigterm_and_leaves_no_process() {
        if !is_root() {
            return;
        }
        let d = tempfile::tempdir().unwrap();
        let mut p = Process::spawn_confined(
            "sleep",
            Path::new("sleep"),
            ["60"],
            &d.path().join("log"),
            &[],
            pid_ns(),
            None,
        )
        .unwrap();
        let program = p.pid();
        let leader = p.child.id();
        assert_ne!(program, leader);
        let ns = |pid: &str| std::fs::read_link(format!("/proc/{pid}/ns/pid")).unwrap();
        assert_ne!(ns(&program.to_string()), ns("self"));
        let status = std::fs::read_to_string(format!("/proc/{program}/status")).unwrap();
        let nspid = status.lines().find(|l| l.starts_with("NSpid:")).unwrap();
        assert!(nspid.ends_with("\t1"), "{nspid}");
        let comm = std::fs::read_to_string(format!("/proc/{leader}/comm")).unwrap();
        assert_eq!(comm.trim_end(), "husk-nswait");
        // The waiter is as confined as its program.
        let waiter = std::fs::read_to_string(format!("/proc/{leader}/status")).unwrap();
        for want in [
            "CapEff:\t0000000000000000",
            "CapPrm:\t0000000000000000",
            "NoNewPrivs:\t1",
            "Seccomp:\t2",
        ] {
            assert!(waiter.contains(want), "{want:?} not in {waiter}");
        }
        // sleep has no SIGTERM handler: as pid 1 it would ignore SIGTERM.
        let t = Instant::now();
        let st = p.terminate(Duration::from_secs(10)).unwrap();
        assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
        assert_eq!(st.signal(), Some(libc::SIGKILL));
        for pid in [program, leader] {
            assert!(!Path::new(&format!("/proc/{pid}")).exists(), "{pid} left");
        }
    }

    #[test]
    fn a_child_under_a_sandbox_id_has_that_uid_gid_one_group_and_no_capabilities() {
        let d = tempfile::tempdir().unwrap();
        let confine = Confine {
            user: Some(0x7000_0123),
            group: Some(4242),
            new_namespaces: libc::CLONE_NEWPID,
            ..Confine::UNPRIVILEGED
        };
        let spawned = Process::spawn_confined(
            "sh",
            Path::new("sh"),
            [
                "-c",
                "echo $(id -u) $(id -g) $(id -G); grep -E '^Cap(Eff|Prm)' /proc/self/status",
            ],
            &d.path().join("log"),
            &[],
            confine,
            None,
        );
        if !is_root() {
            assert!(spawned.is_err(), "only root may switch ids");
            return;
        }
        let mut p = spawned.unwrap();
        let leader = p.child.id();
        // The waiter outside the PID namespace is under the same ids.
        let waiter = std::fs::read_to_string(format!("/proc/{leader}/status")).unwrap_or_default();
        let st = p
            .wait_timeout(Duration::from_secs(10))
            .unwrap()
            .expect("it ends");
        assert!(st.success(), "{st:?}: {}", p.log_tail(500));
        let out = p.log_tail(500);
        let id = 0x7000_0123u32;
        assert!(out.starts_with(&format!("{id} {id} {id} 4242\n")), "{out}");
        assert!(
            out.contains("CapEff:\t0000000000000000") && out.contains("CapPrm:\t0000000000000000"),
            "{out}"
        );
        if !waiter.is_empty() {
            assert!(
                waiter.contains(&format!("Uid:\t{id}\t{id}\t{id}\t{id}")),
                "{waiter}"
            );
        }
    }

    #[test]
    fn terminate_reports_exit_status() {
        let dir = tempfile::tempdir().unwrap();
        let mut p = Process::spawn(
            "sh",
            Path::new("sh"),
            ["-c", "exit 3"],
            &dir.path().join("log"),
        )
        .unwrap();
        let status = p
            .wait_timeout(Duration::from_secs(5))
            .unwrap()
            .expect("exited");
        assert_eq!(status.code(), Some(3));
        assert_eq!(
            p.terminate(Duration::from_millis(10)).unwrap().code(),
            Some(3)
        );
    }

    #[test]
    fn a_process_that_prints_without_end_keeps_its_log_under_the_cap() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("log");
        // Four times the cap, then a last line after a pause (a flood
        // drops bytes while it lasts; what follows it is kept).
        let script = format!(
            "head -c {} /dev/zero | tr '\\0' x >&2; sleep 0.3; echo last words >&2",
            LOG_LIMIT * 4
        );
        let mut p =
            Process::spawn("flood", Path::new("sh"), ["-c", script.as_str()], &log).unwrap();
        let st = p
            .wait_timeout(Duration::from_secs(60))
            .unwrap()
            .expect("it ends");
        assert!(st.success(), "{st:?}");
        assert!(
            p.log_tail(100).ends_with("last words"),
            "{}",
            p.log_tail(100)
        );
        let size = |f: &Path| std::fs::metadata(f).map_or(0, |m| m.len());
        let kept = size(&log) + size(&dir.path().join("log.1"));
        assert!(
            kept > 0 && kept <= LOG_LIMIT,
            "{kept} bytes on disk, cap {LOG_LIMIT}"
        );
    }

    #[test]
    fn tail_keeps_whole_last_lines() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("t");
        std::fs::write(&f, "first line\nsecond\nthird\n").unwrap();
        assert_eq!(tail_of_file(&f, 10), "third");
        assert_eq!(tail_of_file(&f, 12), "second\nthird");
        assert_eq!(tail_of_file(&f, 1000), "first line\nsecond\nthird");
        assert_eq!(tail_of_file(&dir.path().join("none"), 10), "");
    }

    #[test]
    fn tail_of_one_long_line_keeps_its_end() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("t");
        std::fs::write(&f, format!("{}last words\n", "x".repeat(500))).unwrap();
        assert_eq!(tail_of_file(&f, 14), "xxxxlast words");
        std::fs::write(&f, format!("first\n{}last words\n", "x".repeat(500))).unwrap();
        assert_eq!(tail_of_file(&f, 14), "xxxxlast words");
    }
}
