//! husk-vmm: husk's own minimal KVM VMM.
//!
//! Boots an ELF guest kernel through its PVH entry with an initramfs, the
//! serial console to a file and the i8042 reset as the power-off path.
//! virtio-fs and virtio-vsock are virtio-mmio devices served by their
//! vhost-user daemons (virtiofsd, vhost-device-vsock).
//!
//! Exit status: 0 the guest powered off (reset), 3 the guest crashed
//! (triple fault, KVM shutdown or internal error), 1 the VMM failed
//! (bad input, KVM error), 2 bad command line.

use std::fs::File;
use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use husk_vmm::vhost_user::Kind;
use husk_vmm::vm::VmConfig;
use husk_vmm::{boot, Exit, Vm, VmError};

#[derive(Parser)]
#[command(
    name = "husk-vmm",
    version,
    about = "husk's minimal KVM virtual machine monitor: boots an ELF kernel (PVH entry) with an initramfs"
)]
struct Cli {
    /// Guest kernel: an uncompressed ELF vmlinux with a PVH entry note.
    #[arg(long)]
    kernel: PathBuf,
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
    /// virtiofsd's vhost-user socket: a virtio-fs device.
    #[arg(long)]
    vhost_user_fs: Option<PathBuf>,
    /// Tag of the virtio-fs device.
    #[arg(long, default_value = "husk")]
    fs_tag: String,
    /// vhost-device-vsock's vhost-user socket: a virtio-vsock device.
    #[arg(long)]
    vhost_user_vsock: Option<PathBuf>,
    /// The guest's vsock CID.
    #[arg(long, default_value_t = 3)]
    guest_cid: u64,
}

const EXIT_VMM_FAILED: u8 = 1;
const EXIT_GUEST_CRASHED: u8 = 3;

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(&cli) {
        Ok(Exit::Reset) => ExitCode::SUCCESS,
        Ok(Exit::Shutdown) => {
            eprintln!("husk-vmm: the guest crashed (shutdown or triple fault)");
            ExitCode::from(EXIT_GUEST_CRASHED)
        }
        Err(Failure::Guest(e)) => {
            eprintln!("husk-vmm: the guest crashed: {e}");
            ExitCode::from(EXIT_GUEST_CRASHED)
        }
        Err(Failure::Vmm(e)) => {
            eprintln!("husk-vmm: {e}");
            ExitCode::from(EXIT_VMM_FAILED)
        }
    }
}

enum Failure {
    Guest(VmError),
    Vmm(String),
}

fn run(cli: &Cli) -> Result<Exit, Failure> {
    let vmm = |e: &dyn std::fmt::Display| Failure::Vmm(e.to_string());
    // Inputs first: a bad path is reported before any KVM work.
    if !cli.kernel.is_file() {
        return Err(Failure::Vmm(format!(
            "kernel {} does not exist or is not a file; pass the guest's vmlinux (`make guest-image`)",
            cli.kernel.display()
        )));
    }
    if let Some(i) = cli.initramfs.as_ref().filter(|i| !i.is_file()) {
        return Err(Failure::Vmm(format!(
            "initramfs {} does not exist or is not a file",
            i.display()
        )));
    }
    let console: Box<dyn Write + Send> = match &cli.console {
        Some(p) => Box::new(
            File::create(p)
                .map_err(|e| Failure::Vmm(format!("console file {}: {e}", p.display())))?,
        ),
        None => Box::new(std::io::stdout()),
    };
    let mut vm = Vm::new(VmConfig {
        memory_mib: cli.memory_mib,
        vcpus: cli.vcpus,
        console,
    })
    .map_err(|e| vmm(&e))?;
    let mut cmdline = cli.cmdline.clone();
    let devices = [
        cli.vhost_user_fs.as_ref().map(|p| {
            (
                Kind::Fs {
                    tag: cli.fs_tag.clone(),
                },
                p,
            )
        }),
        cli.vhost_user_vsock.as_ref().map(|p| {
            (
                Kind::Vsock {
                    guest_cid: cli.guest_cid,
                },
                p,
            )
        }),
    ];
    for (kind, socket) in devices.into_iter().flatten() {
        let param = vm.add_vhost_user(kind, socket).map_err(|e| vmm(&e))?;
        cmdline.push(' ');
        cmdline.push_str(&param);
    }
    let entry = boot::load(
        &vm.memory().memory,
        vm.memory().size,
        &cli.kernel,
        cli.initramfs.as_deref(),
        &cmdline,
    )
    .map_err(|e| vmm(&e))?;
    vm.setup_pvh(entry).map_err(|e| vmm(&e))?;
    match vm.run() {
        Ok(exit) => Ok(exit),
        Err(e @ VmError::Internal { .. }) => Err(Failure::Guest(e)),
        Err(e) => Err(vmm(&e)),
    }
}
