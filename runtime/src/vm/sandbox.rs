//! One sandbox: its state directory, device daemons, VM and agent.
//!
//! [`Sandbox::boot`] brings all of it up and returns only when the agent has
//! answered; [`Sandbox::shutdown`] takes it down in order. Whatever happens in
//! between, dropping a [`Sandbox`] kills what it started and removes its
//! directory, so no failure path leaves a VM, daemon, socket or directory.

use std::io::{Read, Write};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::fs::DirBuilderExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::ExitStatus;
use std::sync::{Arc, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use husk_protocol::{SandboxId, AGENT_VSOCK_PORT};
use husk_sys::console::{self, ConsoleLog};
use nix::sys::eventfd::{EfdFlags, EventFd};

use crate::config::Config;
use crate::confine::ids::{self, IdError, IdLease};
use crate::confine::process::{tail_of_file, wait_any, Confine, Process, ProcessError};
use crate::host::paths::{self, PathsError, SandboxPaths, DIRECT_NAMESPACE};
use crate::host::probe::{self, Backend, ChoiceError};
use crate::host::storage;
use crate::pod::inventory::PodRecord;
use crate::vm::agent::{self, Agent, AgentError, AgentInfo, HybridSocket};
use crate::vm::daemons::{self, DaemonError, DaemonPaths};
use crate::vm::hypervisor::{
    HuskVmm, Hypervisor, NetDevice, Qemu, ReadySocket, ReadyWatch, VmSpec,
};
use crate::vm::monitor::{Monitor, Watched};

/// Kernel command line husk always passes; then the backend's own parameters
/// (how a guest reboot reaches the VMM), then `guest.kernel_params`.
/// `panic=-1` turns a guest panic into a reboot, which ends the VM.
/// `no_timer_check`: Linux's IO-APIC set-up times the 8254 timer for a few
/// ticks and, when a starved vCPU misses them (QEMU/TCG with many VMs on
/// few cores: 31 of 60 boots at 20 at once here), decides the timer is not
/// wired ("MP-BIOS bug: 8254 timer not connected to IO-APIC") and reroutes
/// it, which now and then leaves the guest without ticks, hung before
/// /init. Under KVM, kvm-clock sets the same flag itself
/// (arch/x86/kernel/kvmclock.c); Kata's guests pass it too.
pub const BASE_CMDLINE: &str = "console=ttyS0 panic=-1 quiet no_timer_check";

/// How long the daemons get to listen on their sockets.
const DAEMON_TIMEOUT: Duration = Duration::from_secs(5);
/// How long the VM gets to end after the agent's Shutdown reply.
const VM_EXIT_TIMEOUT: Duration = Duration::from_secs(10);
/// SIGTERM to SIGKILL for the daemons.
const DAEMON_GRACE: Duration = Duration::from_secs(2);
/// What the agent prints on the console once it listens.
const READY_MARK: &[u8] = husk_protocol::READY_MARK.as_bytes();
/// Bytes of console and VMM output quoted in errors.
const LOG_TAIL: usize = 3000;

#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    #[error(transparent)]
    InvalidId(#[from] husk_protocol::InvalidId),
    #[error(transparent)]
    Paths(#[from] PathsError),
    #[error("sandbox {id} already exists at {dir}; stop it first or remove the stale directory")]
    Exists { id: String, dir: PathBuf },
    #[error("the VMM's jail")]
    Jail(#[source] crate::confine::jail::JailError),
    #[error("the sandbox's uid")]
    Ids(#[source] IdError),
    #[error("{path} (mode {mode:04o}, owner {uid}:{gid}) gives its group no read and write; a VMM under its sandbox's uid reaches KVM through that group: give the device mode 0660 and a group (udev's rule: GROUP=\"kvm\", MODE=\"0660\")")]
    KvmAccess {
        path: PathBuf,
        mode: u32,
        uid: u32,
        gid: u32,
    },
    #[error("cannot open {path} for the VMM (husk-vmm takes it as a descriptor)")]
    KvmOpen {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot read {path}")]
    KvmStat {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot give {path} to the sandbox's uid {id}")]
    Chown {
        path: PathBuf,
        id: u32,
        #[source]
        source: std::io::Error,
    },
    #[error("creating sandbox directory {dir}")]
    StateDir {
        dir: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Backend(#[from] ChoiceError),
    #[error("no {what} configured and none installed in {searched}; run `make guest-image` or set guest.{key} in the husk config")]
    NoImage {
        what: &'static str,
        key: &'static str,
        searched: String,
    },
    #[error("{what} {path} is missing, empty or unreadable; run `make guest-image` or fix guest.{key} in the husk config")]
    BadImage {
        what: &'static str,
        key: &'static str,
        path: PathBuf,
    },
    #[error("starting the device daemons")]
    Daemon(#[source] DaemonError),
    #[error("the sandbox's share root")]
    Share(#[source] crate::host::storage::StorageError),
    #[error("the guest console's pipe and log")]
    Console(#[source] std::io::Error),
    #[error("the socket the VMM says it runs on, {path}")]
    ReadySocket {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("watching the sandbox's VMM (pidfd_open needs Linux 5.3)")]
    Monitor(#[source] std::io::Error),
    #[error(transparent)]
    Vmm(#[from] ProcessError),
    #[error("VM exited ({status}) before the agent answered\n--- guest console (tail) ---\n{console}\n--- VMM output (tail) ---\n{vmm}")]
    VmExited {
        status: ExitStatus,
        console: String,
        vmm: String,
    },
    #[error("agent: {source}\n--- guest console (tail) ---\n{console}")]
    Agent {
        #[source]
        source: AgentError,
        console: String,
    },
}

/// Where the time of one boot went, measured on the host except the guest
/// figures, which come from the guest's own clock (CLOCK_BOOTTIME).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct BootTimings {
    /// Spawning virtiofsd and vhost-device-vsock until both listen.
    pub daemons: Duration,
    /// Spawning the VMM process.
    pub vmm_spawn: Duration,
    /// Guest: kernel start to the agent running as /init.
    pub kernel_to_init: Duration,
    /// Guest: /init to the agent listening on vsock.
    pub init_to_listening: Duration,
    /// Guest: the agent listening to its set-up done and serving.
    pub listening_to_serving: Duration,
    /// Guest: serving to its reply to the first RPC (the reply waits for
    /// the host's request: host time on the boot's path).
    pub serving_to_reply: Duration,
    /// VMM spawned to the guest kernel's clock starting: the VMM's own
    /// start-up, then the guest's steps before its clock runs. The guest's
    /// start is placed on the host's clock by the Version reply (the
    /// guest's uptime then, as the reply arrived: its trip back, a part of
    /// the handshake's round trip, counts as guest time).
    pub vmm_start: Duration,
    /// Of `vmm_start`: the VMM's own start-up, spawned to running the
    /// guest, where the VMM tells ([`Hypervisor::tells_ready`]).
    pub vmm_ready: Option<Duration>,
    /// The agent listening (guest clock, placed as above) to the host
    /// connected: the boot wait's polling and the vsock handshake.
    pub connect: Duration,
    /// Of `connect`: the host seeing the agent's console line to the host
    /// connected (the handshake, and any failed attempts).
    pub handshake: Duration,
    /// The first RPC (Version) round trip.
    pub first_rpc: Duration,
    /// Boot call to agent ready, end to end.
    pub total: Duration,
    /// Handshake attempts until the agent answered.
    pub connect_attempts: u32,
}

impl BootTimings {
    /// The guest's own boot: from the VMM running it (where the VMM tells;
    /// else from the kernel's clock starting) to the agent serving.
    pub fn guest_boot(&self) -> Duration {
        let before_clock = self
            .vmm_ready
            .map_or(Duration::ZERO, |r| self.vmm_start.saturating_sub(r));
        before_clock + self.kernel_to_init + self.init_to_listening + self.listening_to_serving
    }

    /// Host-side time outside the guest's own boot: up to the VMM running
    /// the guest, and from the agent serving to its first reply.
    pub fn host_overhead(&self) -> Duration {
        self.total.saturating_sub(self.guest_boot())
    }
}

impl std::fmt::Display for BootTimings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "daemons up {}, vmm spawned {}, guest kernel to /init {}, /init to agent listening {}, \
             listening to serving {}, vmm start {} (vmm ready {}), connect {} ({} attempts, handshake {}), first rpc {}",
            ms(self.daemons),
            ms(self.vmm_spawn),
            ms(self.kernel_to_init),
            ms(self.init_to_listening),
            ms(self.listening_to_serving),
            ms(self.vmm_start),
            self.vmm_ready.map_or_else(|| "unknown".to_owned(), ms),
            ms(self.connect),
            self.connect_attempts,
            ms(self.handshake),
            ms(self.first_rpc),
        )
    }
}

/// The guest kernel's start on the host's clock, through the Version reply
/// that reached the host at `answered`: its uptime then, less the reply's
/// trip back (not known; under the handshake's round trip), which so
/// counts as guest time. Not at the call's middle: the request may have
/// waited in the guest for the agent to serve. Never before the VMM was
/// spawned.
fn kernel_start(spawned: Instant, answered: Instant, info: &AgentInfo) -> Instant {
    answered
        .checked_sub(info.kernel_to_reply)
        .map_or(spawned, |k| k.max(spawned))
}

/// Finds a mark in a stream that arrives in pieces (a mark may straddle
/// two reads).
struct MarkScan {
    needle: &'static [u8],
    /// The last `needle.len() - 1` bytes seen.
    carry: Vec<u8>,
    found: bool,
}

impl MarkScan {
    fn new(needle: &'static [u8]) -> Self {
        Self {
            needle,
            carry: Vec::new(),
            found: false,
        }
    }

    /// Looks at the next piece; whether the mark has been seen by now.
    fn feed(&mut self, piece: &[u8]) -> bool {
        if self.found {
            return true;
        }
        let mut window = std::mem::take(&mut self.carry);
        window.extend_from_slice(piece);
        self.found = window.windows(self.needle.len()).any(|w| w == self.needle);
        let keep = window.len().min(self.needle.len().saturating_sub(1));
        self.carry = window.split_off(window.len() - keep);
        self.found
    }
}

/// The agent's ready line, as the console pump sees it go by: when, and an
/// eventfd that turns readable then, for the boot's wait to poll.
struct ReadyMark {
    seen: OnceLock<Instant>,
    wake: EventFd,
}

impl ReadyMark {
    fn new() -> std::io::Result<Self> {
        Ok(Self {
            seen: OnceLock::new(),
            wake: EventFd::from_flags(EfdFlags::EFD_CLOEXEC)?,
        })
    }

    fn set(&self) {
        if self.seen.set(Instant::now()).is_ok() {
            let _ = self.wake.write(1);
        }
    }
}

/// Milliseconds with one decimal, for humans.
pub fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1e3)
}

/// How a sandbox ended.
#[derive(Debug, Clone)]
pub struct ShutdownReport {
    pub vm_exit: Option<ExitStatus>,
    /// The VM had to be killed: it did not end by itself in time.
    pub forced: bool,
    pub duration: Duration,
}

/// A running sandbox VM with a connected agent.
pub struct Sandbox {
    id: String,
    paths: SandboxPaths,
    backend: String,
    /// The VMM process, once started.
    vmm: Option<Process>,
    daemons: Vec<Process>,
    agent: Option<Agent>,
    info: Option<AgentInfo>,
    timings: BootTimings,
    /// Watches the VMM and the agent once booted.
    monitor: Option<Monitor>,
    /// Copies a piped console into the bounded log, until the VMM exits.
    console: Option<JoinHandle<()>>,
    done: bool,
    /// The uid and gid the VMM and the vsock daemon run as; released
    /// last, when they are gone.
    ids: Option<IdLease>,
}

/// Who boots a sandbox: the containerd namespace its directory goes in,
/// the token of its owner record (see [`SandboxPaths::owner`]), and the
/// Kubernetes pod it serves, if any (its pod record gets the backend).
#[derive(Debug, Clone)]
pub struct Owner<'a> {
    pub namespace: &'a str,
    pub token: String,
    pub pod: PodRecord,
}

impl Sandbox {
    /// Boots sandbox `id` of husk's own namespace (no containerd) and
    /// waits for its agent.
    pub fn boot(config: &Config, id: &str) -> Result<Self, SandboxError> {
        let id = SandboxId::parse(id)?;
        let owner = Owner {
            namespace: DIRECT_NAMESPACE,
            token: paths::new_owner_token(),
            pod: PodRecord::default(),
        };
        Self::boot_with_nets(config, &owner, &id, Vec::new())
    }

    /// Boots sandbox `id` of `owner`'s namespace with guest NICs on the
    /// taps in `nets` (which the caller keeps open until the VMM has
    /// started) and waits for its agent. The state directory must be new;
    /// it gets `owner`'s token as its owner record.
    pub fn boot_with_nets(
        config: &Config,
        owner: &Owner<'_>,
        id: &SandboxId,
        nets: Vec<NetDevice>,
    ) -> Result<Self, SandboxError> {
        let t0 = Instant::now();
        let (backend, kernel, initramfs) = check_inputs(config, id)?;
        let paths = SandboxPaths::new(config, owner.namespace, id)?;
        make_state_dir(config, &paths, id)?;
        // From here on, Drop cleans up.
        let hv = hypervisor(config, &backend);
        let mut sb = Self::new(id, paths, backend);
        sb.start_daemons(config, owner)?;
        let spec = vm_spec(config, hv.as_ref(), &sb.paths, id, kernel, initramfs, nets);
        let started = sb.spawn_vmm(hv.as_ref(), spec)?;
        let (stream, attempts) = sb.wait_for_agent(config, &started)?;
        let agent = sb.handshake(config, stream, started)?;
        sb.timings.connect_attempts = attempts;
        sb.timings.total = t0.elapsed();
        tracing::info!(sandbox = %id, backend = %sb.backend, total_ms = sb.timings.total.as_millis() as u64, "sandbox ready");
        sb.record_boot();
        sb.start_monitor(config, agent)?;
        Ok(sb)
    }

    /// Adds the boot's phases to the pod record (for `husk monitor`); a
    /// failure costs only the figures.
    fn record_boot(&self) {
        let path = self.paths.pod_record();
        let Some(mut record) = PodRecord::read(&path) else {
            return;
        };
        let t = &self.timings;
        record.boot_phases = [
            ("daemons", t.daemons),
            ("vmm_spawn", t.vmm_spawn),
            ("vmm_start", t.vmm_start),
            ("guest", t.guest_boot()),
            ("connect", t.connect),
            ("first_rpc", t.first_rpc),
            ("total", t.total),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.as_secs_f64()))
        .collect();
        if let Err(e) = record.write(&path) {
            tracing::warn!(sandbox = %self.id, "recording the boot's phases: {e}");
        }
    }

    /// A sandbox that owns its (just made) directory and nothing else yet.
    fn new(id: &str, paths: SandboxPaths, backend: Backend) -> Self {
        Self {
            id: id.to_owned(),
            paths,
            backend: backend.to_string(),
            vmm: None,
            daemons: Vec::new(),
            agent: None,
            info: None,
            timings: BootTimings::default(),
            monitor: None,
            console: None,
            done: false,
            ids: None,
        }
    }

    /// The sandbox's own uid (and gid), leased by `start_daemons`, which
    /// runs before any VMM is spawned (never a fallback to root's).
    fn uid(&self) -> u32 {
        self.ids.as_ref().map(IdLease::id).expect("leased at start")
    }

    /// Step: the owner record, the socket and share directories, the share
    /// root mounted, virtiofsd and vhost-device-vsock listening.
    fn start_daemons(&mut self, config: &Config, owner: &Owner<'_>) -> Result<(), SandboxError> {
        let paths = &self.paths;
        let dir = paths.root().to_path_buf();
        let record = PodRecord {
            backend: self.backend.clone(),
            ..owner.pod.clone()
        };
        paths
            .record_owner(&owner.token)
            .and_then(|()| record.write(&paths.pod_record()))
            .map_err(|source| SandboxError::StateDir {
                dir: dir.clone(),
                source,
            })?;
        let daemon_paths = DaemonPaths {
            shared_dir: paths.shared(),
            fs_socket: paths.fs_socket(),
            vsock_socket: paths.vsock_socket(),
            agent_socket: paths.agent_socket(),
            log_dir: dir,
            sockets: paths.sockets(),
            vsock_jail: paths.jail("vhost-device-vsock"),
        };
        for d in [&daemon_paths.sockets, &daemon_paths.shared_dir] {
            std::fs::DirBuilder::new()
                .mode(0o700)
                .create(d)
                .map_err(|source| SandboxError::StateDir {
                    dir: d.clone(),
                    source,
                })?;
        }
        let lease = IdLease::take(
            &ids::lease_dir(&config.state_dir),
            config.jail.id_base,
            config.jail.id_count,
            spread(paths.root()),
        )
        .map_err(SandboxError::Ids)?;
        let id = lease.id();
        self.ids = Some(lease);
        // The jailed processes' one writable directory is theirs alone.
        give(&daemon_paths.sockets, id)?;
        storage::mount_share_root(&daemon_paths.shared_dir).map_err(SandboxError::Share)?;
        let t = Instant::now();
        self.daemons = daemons::start(config, &daemon_paths, DAEMON_TIMEOUT, id)
            .map_err(SandboxError::Daemon)?;
        // virtiofsd (root) made its socket for root alone; the VMM connects
        // under the sandbox's uid. Not followed if the vsock daemon, which
        // may write in that directory, put a link there.
        give(&daemon_paths.fs_socket, id)?;
        self.timings.daemons = t.elapsed();
        Ok(())
    }

    /// Step: the console pipe and its pump, the ready socket, the VMM
    /// spawned in its jail.
    fn spawn_vmm(
        &mut self,
        hv: &dyn Hypervisor,
        mut spec: VmSpec,
    ) -> Result<Started, SandboxError> {
        let ready = if hv.tells_ready() {
            let path = self.paths.ready_socket();
            let socket = ReadySocket::new(&path)
                .map_err(|source| SandboxError::ReadySocket { path, source })?;
            spec.ready_socket = Some(socket.listener_fd());
            Some(socket)
        } else {
            None
        };
        // Our end of the console pipe, and the VMM's until it has started.
        let (read, write) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)
            .map_err(|e| SandboxError::Console(e.into()))?;
        let log = ConsoleLog::create(&spec.console_log, console::DEFAULT_LIMIT, || {})
            .map_err(SandboxError::Console)?;
        let mark = Arc::new(ReadyMark::new().map_err(SandboxError::Console)?);
        self.console = Some(pump_console(read, log, mark.clone()).map_err(SandboxError::Console)?);
        spec.console_pipe = Some(write.as_raw_fd());
        let t = Instant::now();
        // Held until the VMM has its copy.
        let kvm = hv.takes_kvm_fd().then(open_kvm).transpose()?;
        spec.kvm = kvm.as_ref().map(|f| f.as_raw_fd());
        let (name, binary, args) = hv.command(&spec);
        let jail = hv
            .jail(&spec, &self.paths.jail(name))
            .map_err(SandboxError::Jail)?;
        let confine = Confine {
            user: Some(self.uid()),
            group: hv.uses_kvm().then(kvm_group).transpose()?,
            ..Confine::VMM
        };
        self.vmm = Some(Process::spawn_confined(
            name,
            &binary,
            args,
            &spec.vmm_log,
            &spec.inherited_fds(),
            confine,
            jail,
        )?);
        // The console's end of file is the VMM's exit.
        drop(write);
        drop(kvm);
        let spawned = Instant::now();
        self.timings.vmm_spawn = spawned - t;
        let ready =
            ready
                .map(|r| r.watch())
                .transpose()
                .map_err(|source| SandboxError::ReadySocket {
                    path: self.paths.ready_socket(),
                    source,
                })?;
        Ok(Started {
            spawned,
            mark,
            ready,
        })
    }

    /// Step: waits for the agent's ready line on the console (or the VMM's
    /// end), then connects to it through the vsock daemon.
    fn wait_for_agent(
        &mut self,
        config: &Config,
        started: &Started,
    ) -> Result<(UnixStream, u32), SandboxError> {
        let console = self.paths.console_log();
        let socket = self.agent_socket();
        let vmm = self.vmm.as_mut().expect("spawned");
        let exited = vmm.exit_fd().map_err(SandboxError::Monitor)?;
        let pump = &mut self.console;
        let mark = &started.mark;
        let ready_agent = agent::wait_ready(
            &socket,
            AGENT_VSOCK_PORT,
            config.agent.boot_timeout(),
            // The agent's console line is only a sign of when to start
            // trying; the handshake and the RPCs decide.
            |wait| {
                let deadline = Instant::now() + wait;
                loop {
                    if let Some(status) = vmm.try_wait()? {
                        // A piped console's log is whole once the pipe is
                        // drained.
                        if let Some(p) = pump.take() {
                            let _ = p.join();
                        }
                        return Err(SandboxError::VmExited {
                            status,
                            console: tail_of_file(&console, LOG_TAIL),
                            vmm: vmm.log_tail(LOG_TAIL),
                        });
                    }
                    if mark.seen.get().is_some() {
                        return Ok(true);
                    }
                    let left = deadline.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        return Ok(false);
                    }
                    wait_any(&[mark.wake.as_fd(), exited.as_fd()], left)
                        .map_err(SandboxError::Console)?;
                }
            },
        )?;
        ready_agent.map_err(|source| self.agent_error(source))
    }

    /// Step: the protocol handshake (version, checks) and the boot's
    /// timings from the guest's own clock.
    fn handshake(
        &mut self,
        config: &Config,
        stream: UnixStream,
        started: Started,
    ) -> Result<Agent, SandboxError> {
        let connected = Instant::now();
        let hint_at = started.mark.seen.get().copied();
        self.timings.handshake = connected - hint_at.unwrap_or(connected);
        let agent = Agent::new(stream, config.agent.rpc_timeout())
            .map_err(|e| self.agent_error(e))?
            .with_create_timeout(config.agent.create_timeout());
        let info = agent
            .version(started.spawned.elapsed())
            .map_err(|e| self.agent_error(e))?;
        let answered = Instant::now();
        self.timings.first_rpc = answered - connected;
        agent.check().map_err(|e| self.agent_error(e))?;

        let t = &mut self.timings;
        t.kernel_to_init = info.kernel_to_init;
        t.init_to_listening = info.kernel_to_listening - info.kernel_to_init;
        t.listening_to_serving = info.kernel_to_serving - info.kernel_to_listening;
        t.serving_to_reply = info.kernel_to_reply - info.kernel_to_serving;
        let kernel_start = kernel_start(started.spawned, answered, &info);
        t.vmm_start = kernel_start - started.spawned;
        t.connect = connected.saturating_duration_since(kernel_start + info.kernel_to_listening);
        t.vmm_ready = started.ready.and_then(ReadyWatch::at).map(|at| {
            at.saturating_duration_since(started.spawned)
                .min(t.vmm_start)
        });
        tracing::debug!(sandbox = %self.id, kernel = %info.kernel_release, "agent answered");
        self.info = Some(info);
        Ok(agent)
    }

    /// Step: the liveness monitor on the VMM, the daemons and the agent.
    fn start_monitor(&mut self, config: &Config, agent: Agent) -> Result<(), SandboxError> {
        let watched = Watched {
            vmm: self.vmm.as_ref().expect("spawned").pid(),
            daemons: self.daemons.iter().map(Process::pid).collect(),
        };
        self.monitor = Some(
            Monitor::start(
                &self.id,
                watched,
                agent.clone(),
                config.agent.health_interval(),
                config.agent.health_timeout(),
            )
            .map_err(SandboxError::Monitor)?,
        );
        self.agent = Some(agent);
        Ok(())
    }

    /// An agent error, with the console's tail.
    fn agent_error(&self, source: AgentError) -> SandboxError {
        SandboxError::Agent {
            source,
            console: tail_of_file(&self.paths.console_log(), LOG_TAIL),
        }
    }

    pub fn id(&self) -> &str {
        &self.id
    }

    pub fn dir(&self) -> &Path {
        self.paths.root()
    }

    /// Every path of this sandbox.
    pub fn paths(&self) -> &SandboxPaths {
        &self.paths
    }

    /// The backend that runs the VM, e.g. `qemu (TCG)`.
    pub fn backend(&self) -> &str {
        &self.backend
    }

    pub fn timings(&self) -> &BootTimings {
        &self.timings
    }

    /// What the agent reported at boot.
    pub fn agent_info(&self) -> Option<&AgentInfo> {
        self.info.as_ref()
    }

    pub fn agent(&self) -> Option<&Agent> {
        self.agent.as_ref()
    }

    /// The agent's hybrid socket, which this sandbox's vsock daemon must
    /// serve (pid 0, which no peer has, before the daemons run).
    pub fn agent_socket(&self) -> HybridSocket {
        HybridSocket {
            path: self.paths.agent_socket(),
            server_pid: self
                .daemons
                .get(daemons::VSOCK_DAEMON)
                .map_or(0, Process::pid),
        }
    }

    /// Kills the VMM and the daemons now (SIGKILL to each process group:
    /// they are this process's unreaped children, so no group id is
    /// reused meanwhile) and cuts the agent connection. The rest of the
    /// teardown is [`Sandbox::shutdown`]'s.
    pub fn kill(&self) {
        for p in self.vmm.iter().chain(&self.daemons) {
            p.kill_now();
        }
        if let Some(a) = &self.agent {
            a.sever();
        }
    }

    /// Why the liveness monitor stopped the VM, once it has.
    pub fn verdict(&self) -> Option<crate::vm::monitor::Verdict> {
        self.monitor.as_ref()?.verdict()
    }

    /// PIDs of every host process of this sandbox (VMM and daemons).
    pub fn pids(&self) -> Vec<u32> {
        let mut pids: Vec<u32> = self.vmm.iter().map(Process::pid).collect();
        pids.extend(self.daemons.iter().map(Process::pid));
        pids
    }

    /// Asks the agent to end the VM, waits for the VMM to exit (killing it
    /// if it does not), stops the daemons and removes the state directory.
    pub fn shutdown(mut self) -> Result<ShutdownReport, SandboxError> {
        let t = Instant::now();
        if let Some(mut m) = self.monitor.take() {
            m.stop();
        }
        if let Some(agent) = self.agent.take() {
            if let Err(e) = agent.shutdown() {
                // The VM may have gone down before the reply; its exit decides.
                tracing::debug!(sandbox = %self.id, error = %e, "shutdown rpc");
            }
        }
        let mut report = ShutdownReport {
            vm_exit: None,
            forced: false,
            duration: Duration::ZERO,
        };
        if let Some(vmm) = self.vmm.as_mut() {
            report.vm_exit = vmm.wait_timeout(VM_EXIT_TIMEOUT)?;
            if report.vm_exit.is_none() {
                tracing::warn!(sandbox = %self.id, "VM did not end after shutdown; killing it");
                vmm.kill()?;
                report.forced = true;
            }
        }
        self.teardown();
        report.duration = t.elapsed();
        tracing::info!(sandbox = %self.id, forced = report.forced, "sandbox stopped");
        Ok(report)
    }

    /// Kills everything that is still running and removes the directory.
    fn teardown(&mut self) {
        if self.done {
            return;
        }
        self.done = true;
        self.monitor = None;
        self.agent = None;
        if let Some(vmm) = self.vmm.as_mut() {
            if let Err(e) = vmm.kill() {
                tracing::warn!(sandbox = %self.id, error = %e, "killing the VMM");
            }
        }
        for d in &mut self.daemons {
            if let Err(e) = d.terminate(DAEMON_GRACE) {
                tracing::warn!(sandbox = %self.id, daemon = d.name(), error = %e, "stopping daemon");
            }
        }
        self.daemons.clear();
        // The VMM is dead: the pipe is at its end and the log complete.
        if let Some(c) = self.console.take() {
            let _ = c.join();
        }
        // Never let removal reach into a container rootfs still mounted here.
        storage::remove_sandbox(&self.paths);
    }
}

/// Copies the VMM's console pipe into `log` until the pipe's end.
/// What [`Sandbox::spawn_vmm`] leaves for the steps after it.
struct Started {
    spawned: Instant,
    mark: Arc<ReadyMark>,
    /// The VMM's word that the guest runs, for backends that give it.
    ready: Option<ReadyWatch>,
}

/// Step: the id, the backend this host can run, the guest image files;
/// before anything is made.
fn check_inputs(config: &Config, id: &str) -> Result<(Backend, PathBuf, PathBuf), SandboxError> {
    let (backend, why) = probe::choose_backend(config, &probe::detect_kvm())?;
    tracing::debug!(sandbox = id, %backend, why, "hypervisor chosen");
    let kernel = image(
        config.guest.kernel.as_deref(),
        probe::KERNEL_NAME,
        "guest kernel",
        "kernel",
    )?;
    let initramfs = image(
        config.guest.initramfs.as_deref(),
        probe::INITRAMFS_NAME,
        "guest initramfs",
        "initramfs",
    )?;
    Ok((backend, kernel, initramfs))
}

/// Step: the sandbox's directory, made here or not at all: one that exists
/// is another pod's, and nothing of it is touched.
fn make_state_dir(config: &Config, paths: &SandboxPaths, id: &str) -> Result<(), SandboxError> {
    let dir = paths.root().to_path_buf();
    let parent = dir.parent().unwrap_or(&config.state_dir).to_path_buf();
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&parent)
        .map_err(|source| SandboxError::StateDir {
            dir: parent,
            source,
        })?;
    match std::fs::DirBuilder::new().mode(0o700).create(&dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Err(SandboxError::Exists {
            id: id.to_owned(),
            dir,
        }),
        Err(source) => Err(SandboxError::StateDir { dir, source }),
    }
}

/// The backend's VMM.
fn hypervisor(config: &Config, backend: &Backend) -> Box<dyn Hypervisor> {
    match *backend {
        Backend::Qemu { accel } => {
            Box::new(Qemu::new(&config.qemu.path, accel).with_tb_size(config.qemu.tcg_tb_size_mib))
        }
        Backend::HuskVmm => Box::new(HuskVmm::new(&config.husk_vmm.binary())),
    }
}

/// What the VMM is to run: the guest image, its command line (husk's,
/// the backend's, free page reporting's, the config's), sizes, sockets.
fn vm_spec(
    config: &Config,
    hv: &dyn Hypervisor,
    paths: &SandboxPaths,
    id: &str,
    kernel: PathBuf,
    initramfs: PathBuf,
    nets: Vec<NetDevice>,
) -> VmSpec {
    let reporting = if config.guest.free_page_reporting {
        format!(
            "page_reporting.page_reporting_order={}",
            config.guest.page_reporting_order
        )
    } else {
        String::new()
    };
    let cmdline = [
        BASE_CMDLINE,
        hv.kernel_params(),
        &reporting,
        config.guest.kernel_params.trim(),
    ]
    .iter()
    .filter(|p| !p.is_empty())
    .copied()
    .collect::<Vec<_>>()
    .join(" ");
    VmSpec {
        id: id.to_owned(),
        kernel,
        initramfs,
        cmdline,
        vcpus: config.guest.vcpus,
        memory_mib: config.guest.memory_mib,
        console_log: paths.console_log(),
        vmm_log: paths.vmm_log(),
        fs_socket: paths.fs_socket(),
        vsock_socket: paths.vsock_socket(),
        control_socket: paths.control_socket(),
        nets,
        console_pipe: None,
        free_page_reporting: config.guest.free_page_reporting,
        ready_socket: None,
        kvm: None,
    }
}

fn pump_console(
    read: OwnedFd,
    mut log: ConsoleLog,
    mark: Arc<ReadyMark>,
) -> std::io::Result<JoinHandle<()>> {
    std::thread::Builder::new()
        .name("console-pipe".into())
        .spawn(move || {
            let mut pipe = std::fs::File::from(read);
            let mut scan = MarkScan::new(READY_MARK);
            let mut buf = [0u8; 16 << 10];
            loop {
                match pipe.read(&mut buf) {
                    Ok(0) => break,
                    Ok(n) => {
                        let _ = log.write_all(&buf[..n]);
                        if !scan.found && scan.feed(&buf[..n]) {
                            mark.set();
                        }
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                    Err(_) => break,
                }
            }
        })
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        self.teardown();
    }
}

/// Resolves a guest image file and checks it is a readable, non-empty file
/// before anything is started. (Whether its content boots, the VM tells.)
fn image(
    configured: Option<&Path>,
    name: &str,
    what: &'static str,
    key: &'static str,
) -> Result<PathBuf, SandboxError> {
    let path = probe::resolve_image(configured, name).ok_or_else(|| SandboxError::NoImage {
        what,
        key,
        searched: probe::guest_image_dirs()
            .iter()
            .map(|d| d.display().to_string())
            .collect::<Vec<_>>()
            .join(", "),
    })?;
    match std::fs::File::open(&path) {
        Ok(f) if f.metadata().is_ok_and(|m| m.is_file() && m.len() > 0) => Ok(path),
        _ => Err(SandboxError::BadImage { what, key, path }),
    }
}

/// Where a sandbox starts its search for a free id: a hash of its
/// directory, so that sandboxes rarely try the same ids.
fn spread(dir: &Path) -> u32 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    dir.hash(&mut h);
    h.finish() as u32
}

/// Makes `path` (not followed if a link) the sandbox id's.
fn give(path: &Path, id: u32) -> Result<(), SandboxError> {
    std::os::unix::fs::lchown(path, Some(id), Some(id)).map_err(|source| SandboxError::Chown {
        path: path.to_path_buf(),
        id,
        source,
    })
}

/// /dev/kvm opened here (as root) for a VMM that takes it as a
/// descriptor, so the sandbox's uid needs no access to the node.
fn open_kvm() -> Result<std::fs::File, SandboxError> {
    let path = Path::new("/dev/kvm");
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .map_err(|source| SandboxError::KvmOpen {
            path: path.to_path_buf(),
            source,
        })
}

/// /dev/kvm's group, if it may read and write the device: the one
/// supplementary group of a VMM under its sandbox's uid.
pub fn kvm_group() -> Result<u32, SandboxError> {
    use std::os::unix::fs::MetadataExt;
    let path = Path::new("/dev/kvm");
    let m = std::fs::metadata(path).map_err(|source| SandboxError::KvmStat {
        path: path.to_path_buf(),
        source,
    })?;
    if m.mode() & 0o060 != 0o060 {
        return Err(SandboxError::KvmAccess {
            path: path.to_path_buf(),
            mode: m.mode() & 0o7777,
            uid: m.uid(),
            gid: m.gid(),
        });
    }
    Ok(m.gid())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn invalid_id_fails_before_touching_the_state_dir() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = Config {
            state_dir: dir.path().join("state"),
            ..Config::default()
        };
        let err = Sandbox::boot(&cfg, "../escape").err().expect("refused");
        assert!(matches!(err, SandboxError::InvalidId(_)), "{err}");
        assert!(
            err.to_string().starts_with("sandbox id \"../escape\""),
            "{err}"
        );
        assert!(!cfg.state_dir.exists());
    }

    #[test]
    fn missing_kernel_leaves_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let mut cfg = Config {
            state_dir: dir.path().join("state"),
            ..Config::default()
        };
        cfg.hypervisor = crate::config::HypervisorChoice::Qemu;
        cfg.qemu.accel = crate::config::Accel::Tcg;
        cfg.guest.kernel = Some(dir.path().join("no-vmlinux"));
        cfg.guest.initramfs = Some(dir.path().join("no-initramfs"));
        let err = Sandbox::boot(&cfg, "t").err().expect("fails");
        assert!(matches!(err, SandboxError::BadImage { .. }), "{err}");
        assert!(err.to_string().contains("no-vmlinux"), "{err}");
        assert!(!cfg.state_dir.join("t").exists(), "sandbox dir left behind");
    }

    #[test]
    fn boot_waits_for_the_line_the_agent_prints() {
        let mut scan = MarkScan::new(READY_MARK);
        assert!(!scan.feed(b"[0.61] Run /init as init process\n"));
        let line = format!("[0.62] ok\n{}\n", husk_protocol::ready_line());
        assert!(
            scan.feed(line.as_bytes()),
            "the agent's ready line is not what boot waits for"
        );
    }

    #[test]
    fn the_mark_is_found_across_reads_and_stays_found() {
        let mut scan = MarkScan::new(b"agent: listening");
        assert!(!scan.feed(b"[0.1] booting\nagent: list"));
        assert!(!scan.feed(b"en"));
        assert!(!scan.feed(b""));
        assert!(scan.feed(b"ing on port 1024\n"), "straddled three reads");
        assert!(scan.feed(b"more"), "found stays found");
        let mut scan = MarkScan::new(b"agent: listening");
        assert!(!scan.feed(b"agent: LISTENING agent: listenin"));
        assert!(!MarkScan::new(b"absent").feed(b"agent: listening"));
    }

    #[test]
    fn the_guest_kernel_start_is_placed_by_the_replys_arrival() {
        let ms = Duration::from_millis;
        let info = |reply| AgentInfo {
            agent_version: "0.1.0".into(),
            kernel_release: "6.1.0-husk".into(),
            kernel_to_init: ms(100),
            kernel_to_listening: ms(200),
            kernel_to_serving: ms(250),
            kernel_to_reply: ms(reply),
        };
        let spawned = Instant::now();
        // The reply came at 390 ms and the guest was up 330 ms then: its
        // kernel started 60 ms after spawn.
        let start = kernel_start(spawned, spawned + ms(390), &info(330));
        assert_eq!(start - spawned, ms(60));
        // A guest claiming to be up longer than the VMM: start at spawn.
        let start = kernel_start(spawned, spawned + ms(390), &info(900));
        assert_eq!(start, spawned);
    }

    #[test]
    fn host_overhead_excludes_the_guest_boot() {
        let ms = Duration::from_millis;
        let mut t = BootTimings {
            total: ms(3000),
            vmm_start: ms(400),
            kernel_to_init: ms(2000),
            init_to_listening: ms(300),
            listening_to_serving: ms(100),
            serving_to_reply: ms(20),
            ..BootTimings::default()
        };
        // The VMM did not tell when it ran the guest: its whole start is
        // the host's.
        assert_eq!(t.guest_boot(), ms(2400));
        assert_eq!(t.host_overhead(), ms(600));
        // It ran the guest 150 ms after spawn: the 250 ms until the
        // kernel's clock are the guest's.
        t.vmm_ready = Some(ms(150));
        assert_eq!(t.guest_boot(), ms(2650));
        assert_eq!(t.host_overhead(), ms(350));
        // Never more before the clock than the VMM's start.
        t.vmm_ready = Some(ms(500));
        assert_eq!(t.guest_boot(), ms(2400));
    }
}
