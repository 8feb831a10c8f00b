//! Hypervisor backends: the trait the sandbox drives, and its implementations.

mod husk_vmm;
mod qemu;
mod ready;

use std::ffi::OsString;
use std::os::fd::RawFd;
use std::path::{Path, PathBuf};

use crate::confine::jail::{Jail, JailError};

pub use husk_vmm::HuskVmm;
pub use qemu::Qemu;
pub use ready::{ReadySocket, ReadyWatch};

/// Everything a backend needs to start one sandbox VM. The device daemons are
/// already listening on their sockets when a backend sees this.
#[derive(Debug, Clone)]
pub struct VmSpec {
    pub id: String,
    pub kernel: PathBuf,
    pub initramfs: PathBuf,
    /// Kernel command line, without the device entries a backend adds.
    pub cmdline: String,
    pub vcpus: u32,
    pub memory_mib: u32,
    /// The guest serial console is written here.
    pub console_log: PathBuf,
    /// The VMM's own stdout and stderr.
    pub vmm_log: PathBuf,
    /// vhost-user socket of virtiofsd (tag [`SHARE_TAG`]).
    pub fs_socket: PathBuf,
    /// vhost-user socket of vhost-device-vsock.
    pub vsock_socket: PathBuf,
    /// The VMM's control socket, for backends that have one (husk-vmm:
    /// pause, resume, shutdown, status through `husk-vmm ctl`).
    pub control_socket: PathBuf,
    /// The pod's NICs, in order; the VMM gets NIC `i`'s tap as descriptor
    /// [`net_fd`]`(i)`.
    pub nets: Vec<NetDevice>,
    /// The console pipe's write end, in the caller (the VMM gets it after
    /// the taps, as [`VmSpec::console_fd`]). Every backend writes its
    /// console there, never to a file of its own: QEMU's file chardev grows
    /// without bound, and husk-vmm in its jail has no sandbox directory.
    /// The caller caps what reaches `console_log`, and watches the stream
    /// for the agent's ready line.
    pub console_pipe: Option<RawFd>,
    /// A virtio-balloon device whose only job is free page reporting.
    pub free_page_reporting: bool,
    /// A listening socket, in the caller, that the VMM inherits and
    /// accepts on once it runs the guest, where it can
    /// ([`Hypervisor::tells_ready`], [`ReadySocket`]; its number in the VMM
    /// is [`VmSpec::ready_fd`]).
    pub ready_socket: Option<RawFd>,
    /// /dev/kvm opened by the caller, for a VMM that takes it as a
    /// descriptor ([`Hypervisor::takes_kvm_fd`]; its number in the VMM is
    /// [`VmSpec::kvm_fd`]).
    pub kvm: Option<RawFd>,
}

impl VmSpec {
    /// The descriptor number the console pipe has in the VMM process.
    pub fn console_fd(&self) -> RawFd {
        net_fd(self.nets.len())
    }

    /// The descriptor number the ready socket has in the VMM process.
    pub fn ready_fd(&self) -> RawFd {
        net_fd(self.nets.len() + usize::from(self.console_pipe.is_some()))
    }

    /// The descriptor number /dev/kvm has in the VMM process.
    pub fn kvm_fd(&self) -> RawFd {
        net_fd(
            self.nets.len()
                + usize::from(self.console_pipe.is_some())
                + usize::from(self.ready_socket.is_some()),
        )
    }

    /// Every descriptor the VMM inherits, in order (see [`net_fd`]).
    pub fn inherited_fds(&self) -> Vec<RawFd> {
        self.nets
            .iter()
            .map(|n| n.fd)
            .chain(self.console_pipe)
            .chain(self.ready_socket)
            .chain(self.kvm)
            .collect()
    }
}

/// A guest NIC backed by a tap the caller holds open.
#[derive(Debug, Clone)]
pub struct NetDevice {
    /// The tap's queue, in the caller (inherited by the VMM, see
    /// [`net_fd`]).
    pub fd: RawFd,
    pub mac: Vec<u8>,
    pub mtu: u32,
}

/// The descriptor number NIC `index`'s tap has in the VMM process.
pub fn net_fd(index: usize) -> RawFd {
    3 + index as RawFd
}

/// `aa:bb:cc:dd:ee:ff`.
pub fn mac_string(mac: &[u8]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// The jail of a VMM process at `root`: the kernel and initramfs
/// read-only, the directories of the device daemons' sockets and of its
/// control socket writable (it connects and binds there), and /dev/kvm
/// when it accelerates. Taps and the console come as descriptors; the
/// spawn adds the program itself.
fn vmm_jail(spec: &VmSpec, root: &Path, kvm: bool) -> Result<Jail, JailError> {
    let mut jail = Jail::create(root)?
        .read_only(&spec.kernel)?
        .read_only(&spec.initramfs)?;
    for socket in [&spec.fs_socket, &spec.vsock_socket, &spec.control_socket] {
        if let Some(dir) = socket.parent() {
            jail = jail.writable(dir)?;
        }
    }
    if kvm {
        jail = jail.device(Path::new("/dev/kvm"))?;
    }
    Ok(jail)
}

pub use husk_protocol::SHARE_TAG;

/// A VMM backend: how to run one sandbox VM as one process. Starting,
/// waiting for and killing that process is the same for every backend and
/// is the sandbox's (it holds the [`crate::confine::process::Process`]).
pub trait Hypervisor: Send {
    /// Short name for logs and `husk check`.
    fn name(&self) -> String;

    /// Kernel parameters this VMM needs, e.g. how a guest reboot reaches it.
    fn kernel_params(&self) -> &'static str;

    /// Process name (for errors), binary and arguments that run `spec`.
    fn command(&self, spec: &VmSpec) -> (&'static str, PathBuf, Vec<OsString>);

    /// Whether the VMM accepts on [`VmSpec::ready_socket`] and writes to
    /// the connection once its own start-up is done and the guest runs.
    fn tells_ready(&self) -> bool {
        false
    }

    /// Whether the VMM opens /dev/kvm (its jail shows it, and its
    /// sandbox's uid needs the device's group).
    fn uses_kvm(&self) -> bool {
        false
    }

    /// Whether the VMM takes /dev/kvm as a descriptor the caller opened
    /// ([`VmSpec::kvm`]): then it needs neither the node nor its group.
    fn takes_kvm_fd(&self) -> bool {
        false
    }

    /// The jail (see [`crate::confine::jail`]) the VMM runs in, rooted at `root`, an
    /// empty directory it makes; None runs it in the host's mounts.
    fn jail(&self, _spec: &VmSpec, _root: &Path) -> Result<Option<Jail>, JailError> {
        Ok(None)
    }
}
