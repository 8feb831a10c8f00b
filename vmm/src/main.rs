//! husk-vmm: husk's own minimal KVM VMM.
//!
//! Boots a guest kernel (ELF vmlinux through its PVH entry, or a bzImage
//! through its 64-bit entry) with an initramfs, the serial console to a
//! file and the i8042 reset as the power-off path. virtio-fs and
//! virtio-vsock are virtio-mmio devices served by their vhost-user daemons
//! (virtiofsd, vhost-device-vsock); virtio-net (`--net`) and
//! virtio-balloon (`--free-page-reporting`) are served in husk-vmm.
//! `--api-socket` opens the control socket (pause, resume, shutdown,
//! status); `husk-vmm ctl SOCKET REQUEST` is its client. Every thread runs
//! under the seccomp filter of its kind ([`husk_vmm::seccomp`]); a call
//! outside it kills the process.
//!
//! Exit status: 0 the guest powered off (reset) or the VM was shut down
//! through the control socket or by SIGTERM/SIGINT, 3 the guest crashed (triple fault, KVM
//! shutdown or internal error), 1 the VMM failed (bad input, KVM error),
//! 2 bad command line.

use std::io::Write;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;

use clap::{Parser, Subcommand};
use husk_sys::console::{self, ConsoleEnd, ConsoleLog};
use husk_vmm::control::{self, ControlSocket};
use husk_vmm::net::TapSource;
use husk_vmm::vhost_user::Kind;
use husk_vmm::vm::VmConfig;
use husk_vmm::{boot, seccomp, Exit, Vm, VmError};

#[derive(Parser)]
#[command(
    name = "husk-vmm",
    version,
    about = "husk's minimal KVM virtual machine monitor: boots a Linux guest (ELF vmlinux with a PVH entry, or bzImage) with an initramfs",
    subcommand_negates_reqs = true,
    args_conflicts_with_subcommands = true
)]
struct Cli {
    #[command(subcommand)]
    ctl: Option<Ctl>,
    /// Guest kernel: an ELF vmlinux with a PVH entry note, or a bzImage.
    #[arg(long, required = true)]
    kernel: Option<PathBuf>,
    /// Initramfs (cpio) handed to the kernel as its first module.
    #[arg(long)]
    initramfs: Option<PathBuf>,
    /// Kernel command line.
    #[arg(long, default_value = "console=ttyS0 reboot=t panic=-1")]
    cmdline: String,
    /// Guest RAM in MiB.
    #[arg(long, default_value_t = 512)]
    memory_mib: u64,
    /// Number of vCPUs.
    #[arg(long, default_value_t = 1)]
    vcpus: u8,
    /// File that receives the serial console; standard output if omitted.
    #[arg(long)]
    console: Option<PathBuf>,
    /// Descriptor (inherited) that receives the serial console instead of
    /// a file, e.g. a pipe whose reader bounds what it keeps. Not with
    /// --console.
    #[arg(long, conflicts_with = "console")]
    console_fd: Option<std::os::fd::RawFd>,
    /// Most console bytes kept on disk: the file rotates to `<console>.1`
    /// at half of this.
    #[arg(long, default_value_t = console::DEFAULT_LIMIT)]
    console_limit: u64,
    /// virtiofsd's vhost-user socket: a virtio-fs device.
    #[arg(long)]
    vhost_user_fs: Option<PathBuf>,
    /// Tag of the virtio-fs device (the runtime passes the one the agent
    /// mounts, `husk_protocol::SHARE_TAG`).
    #[arg(long, default_value = "husk")]
    fs_tag: String,
    /// vhost-device-vsock's vhost-user socket: a virtio-vsock device.
    #[arg(long)]
    vhost_user_vsock: Option<PathBuf>,
    /// The guest's vsock CID.
    #[arg(long, default_value_t = 3)]
    guest_cid: u64,
    /// A virtio-net device on a tap: `fd=N` (a queue this process
    /// inherited, opened with IFF_TAP | IFF_NO_PI | IFF_VNET_HDR) or
    /// `tap=NAME` (opened, or made, by husk-vmm), then
    /// `,mac=aa:bb:cc:dd:ee:ff[,mtu=M]`. Repeatable.
    #[arg(long = "net", value_name = "SPEC")]
    nets: Vec<husk_vmm::net::NetSpec>,
    /// A virtio-balloon device for free page reporting: memory the guest
    /// frees goes back to the host. The control socket's `status` reports
    /// the bytes given back (balloon_discarded_bytes=N).
    #[arg(long)]
    free_page_reporting: bool,
    /// Control socket to create (pause, resume, shutdown, status; one
    /// request per line). Removed when husk-vmm ends.
    #[arg(long)]
    api_socket: Option<PathBuf>,
    /// A listening unix socket (inherited descriptor) with a connection
    /// waiting: husk-vmm takes it at start and writes "ready" on it once
    /// the devices are made and the kernel loaded, just before the vCPUs
    /// run, so the caller can tell husk-vmm's start-up from the guest's.
    #[arg(long)]
    ready_fd: Option<std::os::fd::RawFd>,
    /// /dev/kvm as an inherited descriptor, opened by the caller: husk-vmm
    /// then needs no access to the device node (husk runs it under a uid
    /// of the sandbox's own, without /dev/kvm's group or the node in its
    /// jail). Without it, husk-vmm opens /dev/kvm.
    #[arg(long)]
    kvm_fd: Option<std::os::fd::RawFd>,
    /// A call outside a thread's seccomp filter is logged by the kernel
    /// (dmesg, audit type 1326) instead of killing husk-vmm: for finding a
    /// call a filter lacks, never for production.
    #[arg(long)]
    seccomp_log: bool,
    /// Tests the filters: the thread of this kind (vmm, vcpu, control,
    /// signals, console, net, balloon) makes a call none allows once its
    /// filter is in; husk-vmm must die by SIGSYS.
    #[arg(long, hide = true)]
    test_seccomp: Option<husk_vmm::seccomp::ThreadKind>,
}

#[derive(Subcommand)]
enum Ctl {
    /// Sends one request to a running husk-vmm's control socket and prints
    /// the reply: pause, resume, shutdown or status.
    Ctl {
        /// The socket given to husk-vmm's --api-socket (the runtime uses
        /// <state_dir>/<sandbox id>/sock/vmm.sock).
        socket: PathBuf,
        /// pause, resume, shutdown or status.
        request: String,
    },
}

const EXIT_VMM_FAILED: u8 = 1;
const EXIT_GUEST_CRASHED: u8 = 3;

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Some(Ctl::Ctl { socket, request }) = &cli.ctl {
        return ctl(socket, request);
    }
    // Every event goes to stderr (the runtime keeps it in the sandbox's
    // VMM log and quotes its tail in errors), naming its module. Before any
    // thread starts, so every thread's filter meets a subscriber that only
    // writes.
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .without_time()
        .with_max_level(tracing::Level::INFO)
        .init();
    if let Err(e) = control::block_stop_signals() {
        tracing::error!("blocking SIGTERM and SIGINT: {e}");
        return ExitCode::from(EXIT_VMM_FAILED);
    }
    match run(&cli) {
        Ok(Exit::Reset) => ExitCode::SUCCESS,
        Ok(Exit::Stopped) => {
            tracing::info!("the VM was stopped on request");
            ExitCode::SUCCESS
        }
        Ok(Exit::Shutdown) => {
            tracing::error!("the guest crashed (shutdown or triple fault)");
            ExitCode::from(EXIT_GUEST_CRASHED)
        }
        Err(Failure::Guest(e)) => {
            tracing::error!("the guest crashed: {e}");
            ExitCode::from(EXIT_GUEST_CRASHED)
        }
        Err(Failure::Vmm(e)) => {
            tracing::error!("{e}");
            ExitCode::from(EXIT_VMM_FAILED)
        }
    }
}

enum Failure {
    Guest(VmError),
    Vmm(String),
}

fn ctl(socket: &Path, request: &str) -> ExitCode {
    match husk_vmm::control::request(socket, request) {
        Ok(reply) => {
            println!("{reply}");
            if reply.starts_with("ok") {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(EXIT_VMM_FAILED)
            }
        }
        Err(e) => {
            eprintln!("husk-vmm ctl: {e}; is husk-vmm running with --api-socket there?");
            ExitCode::from(EXIT_VMM_FAILED)
        }
    }
}

/// A failure of husk-vmm's own (not the guest's), as its message.
fn vmm(e: impl std::fmt::Display) -> Failure {
    Failure::Vmm(e.to_string())
}

/// Boots the VM and runs it to its end, as named steps: the inputs, the
/// caller's ready connection, the seccomp policy, the console, the control
/// socket, KVM and memory, the devices, the kernel, the control and signal
/// threads, then the vCPUs.
fn run(cli: &Cli) -> Result<Exit, Failure> {
    let t0 = Instant::now();
    let kernel = check_inputs(cli)?;
    let ready = cli
        .ready_fd
        .map(take_ready_connection)
        .transpose()
        .map_err(|e| {
            vmm(format!(
                "--ready-fd: {e}; pass a listening unix socket with a connection waiting"
            ))
        })?;
    // Before the first thread: each installs its filter as it starts.
    seccomp::configure(seccomp::Policy {
        otherwise: if cli.seccomp_log {
            seccomp::Action::Log
        } else {
            seccomp::Action::Kill
        },
        test_kind: cli.test_seccomp,
    })
    .map_err(|e| vmm(format!("seccomp: {e}")))?;
    let (console, console_end) = open_console(cli)?;
    let mut api = cli
        .api_socket
        .as_deref()
        .map(ControlSocket::bind)
        .transpose()
        .map_err(vmm)?;
    let kvm = cli
        .kvm_fd
        .map(|fd| {
            inherited(fd).map_err(|e| {
                vmm(format!(
                    "--kvm-fd {fd}: {e}; pass an open /dev/kvm as that descriptor"
                ))
            })
        })
        .transpose()?;
    let mut vm = Vm::new(VmConfig {
        memory_mib: cli.memory_mib,
        vcpus: cli.vcpus,
        console,
        kvm,
    })
    .map_err(vmm)?;
    let t_vm = Instant::now();
    let cmdline = add_devices(&mut vm, cli)?;
    let t_devices = Instant::now();
    let entry = boot::load(
        &vm.memory().memory,
        vm.memory().size,
        kernel,
        cli.initramfs.as_deref(),
        &cmdline,
    )
    .map_err(vmm)?;
    vm.setup_boot(entry).map_err(vmm)?;
    if let Some(api) = api.as_mut() {
        api.serve(vm.run_state()).map_err(vmm)?;
    }
    control::stop_on_signals(vm.run_state()).map_err(vmm)?;
    let ms = |a: Instant, b: Instant| (b - a).as_secs_f64() * 1e3;
    let t_run = Instant::now();
    tracing::info!(
        "guest starts {:.1} ms after launch (KVM and memory {:.1} ms, vhost-user devices {:.1} ms, kernel and initramfs {:.1} ms)",
        ms(t0, t_run),
        ms(t0, t_vm),
        ms(t_vm, t_devices),
        ms(t_devices, t_run)
    );
    if let Some(mut r) = ready {
        // The caller may have stopped waiting: nothing to do if it left.
        let _ = r.write_all(b"ready\n");
    }
    // `api` lives until run() returns and removes the socket when dropped.
    let ended = vm.run();
    if let Some(end) = console_end {
        end.finish();
    }
    match ended {
        Ok(exit) => Ok(exit),
        Err(e @ VmError::Internal { .. }) => Err(Failure::Guest(e)),
        Err(e) => Err(vmm(e)),
    }
}

/// Step: the kernel and initramfs files, before any KVM work.
fn check_inputs(cli: &Cli) -> Result<&Path, Failure> {
    // clap requires --kernel unless the ctl subcommand is given.
    let Some(kernel) = cli.kernel.as_deref() else {
        return Err(vmm("--kernel is required"));
    };
    if !kernel.is_file() {
        return Err(vmm(format!(
            "kernel {} does not exist or is not a file; pass the guest's vmlinux or bzImage (`make guest-image`)",
            kernel.display()
        )));
    }
    if let Some(i) = cli.initramfs.as_ref().filter(|i| !i.is_file()) {
        return Err(vmm(format!(
            "initramfs {} does not exist or is not a file",
            i.display()
        )));
    }
    Ok(kernel)
}

/// Step: where the guest's serial output goes (a bounded log file, the
/// caller's pipe, or stdout), and the end through which the last lines are
/// written (the VM is never dropped: vCPUs may still run when it ends).
fn open_console(cli: &Cli) -> Result<(Box<dyn Write + Send>, Option<ConsoleEnd>), Failure> {
    let log = match (&cli.console, cli.console_fd) {
        (Some(p), _) => Some(
            ConsoleLog::create(p, cli.console_limit, console_thread)
                .map_err(|e| vmm(format!("console file {}: {e}", p.display())))?,
        ),
        (None, Some(fd)) => Some(
            inherited(fd)
                .and_then(|f| ConsoleLog::stream(f, console_thread))
                .map_err(|e| {
                    vmm(format!(
                        "--console-fd {fd}: {e}; pass the console pipe as that descriptor"
                    ))
                })?,
        ),
        (None, None) => None,
    };
    let end = log.as_ref().map(ConsoleLog::end);
    let console: Box<dyn Write + Send> = match log {
        Some(log) => Box::new(log),
        None => Box::new(std::io::stdout()),
    };
    Ok((console, end))
}

/// Step: the vhost-user devices, the NICs and the balloon; returns the
/// kernel command line with each device's parameter.
fn add_devices(vm: &mut Vm, cli: &Cli) -> Result<String, Failure> {
    let mut cmdline = cli.cmdline.clone();
    let mut add = |param: String| {
        cmdline.push(' ');
        cmdline.push_str(&param);
    };
    let vhost_user = [
        cli.vhost_user_fs.as_ref().map(|p| {
            let tag = cli.fs_tag.clone();
            (Kind::Fs { tag }, p)
        }),
        cli.vhost_user_vsock.as_ref().map(|p| {
            let guest_cid = cli.guest_cid;
            (Kind::Vsock { guest_cid }, p)
        }),
    ];
    for (kind, socket) in vhost_user.into_iter().flatten() {
        add(vm.add_vhost_user(kind, socket).map_err(vmm)?);
    }
    for n in &cli.nets {
        let tap = match &n.source {
            TapSource::Fd(fd) => inherited(*fd).map_err(|e| {
                vmm(format!(
                    "--net fd={fd}: {e}; pass the tap's queue as that descriptor"
                ))
            })?,
            TapSource::Name(name) => {
                husk_sys::tap::open_tap(name).map_err(|e| vmm(format!("--net tap={name}: {e}")))?
            }
        };
        add(vm.add_net(tap, n.mac, n.mtu).map_err(vmm)?);
    }
    if cli.free_page_reporting {
        add(vm.add_balloon().map_err(vmm)?);
    }
    Ok(cmdline)
}

/// Accepts the connection waiting on the inherited listener `fd`, and
/// closes the listener.
fn take_ready_connection(fd: std::os::fd::RawFd) -> std::io::Result<UnixStream> {
    let listener = UnixListener::from(std::os::fd::OwnedFd::from(inherited(fd)?));
    listener.set_nonblocking(true)?;
    let (stream, _) = listener.accept().map_err(|e| match e.kind() {
        std::io::ErrorKind::WouldBlock => {
            std::io::Error::new(e.kind(), "no connection is waiting on the socket")
        }
        _ => e,
    })?;
    // Blocking: Linux does not pass O_NONBLOCK on to an accepted socket.
    Ok(stream)
}

/// Takes descriptor `fd`, which this process inherited, if it is open.
/// The console writer's first step: its own seccomp filter.
fn console_thread() {
    seccomp::enter(seccomp::ThreadKind::Console);
}

fn inherited(fd: std::os::fd::RawFd) -> std::io::Result<std::fs::File> {
    use std::os::fd::FromRawFd;
    // SAFETY: F_GETFD only asks whether `fd` is open.
    if unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `fd` is open and was handed to this process for this device;
    // nothing else in it owns the descriptor.
    Ok(unsafe { std::fs::File::from_raw_fd(fd) })
}

#[cfg(test)]
mod tests {
    use std::io::Read;
    use std::os::fd::IntoRawFd;

    use super::*;

    #[test]
    fn the_ready_connection_is_the_one_waiting_and_none_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ready.sock");
        let listener = UnixListener::bind(&path).unwrap();
        let mut host = UnixStream::connect(&path).unwrap();
        let mut vmm = take_ready_connection(listener.into_raw_fd()).unwrap();
        vmm.write_all(b"ready\n").unwrap();
        let mut line = [0u8; 6];
        host.read_exact(&mut line).unwrap();
        assert_eq!(&line, b"ready\n");

        std::fs::remove_file(&path).unwrap();
        let lonely = UnixListener::bind(&path).unwrap();
        let e = take_ready_connection(lonely.into_raw_fd()).unwrap_err();
        assert!(e.to_string().contains("no connection is waiting"), "{e}");
    }
}
