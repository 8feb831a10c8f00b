//! The husk-vmm backend: our own KVM VMM, one process per sandbox, with
//! virtio-fs and virtio-vsock served by the same vhost-user daemons QEMU
//! uses.

use std::ffi::OsString;
use std::path::{Path, PathBuf};

use super::{mac_string, net_fd, Hypervisor, VmSpec, SHARE_TAG};
use crate::confine::jail::{Jail, JailError};
use crate::vm::daemons::GUEST_CID;

pub struct HuskVmm {
    binary: PathBuf,
}

impl HuskVmm {
    pub fn new(binary: &Path) -> Self {
        Self {
            binary: binary.to_path_buf(),
        }
    }

    /// The husk-vmm command line for `spec`.
    pub fn args(&self, spec: &VmSpec) -> Vec<OsString> {
        let mut args: Vec<OsString> = Vec::new();
        let mut push = |a: &str, v: &OsString| {
            args.push(a.into());
            args.push(v.clone());
        };
        push("--kernel", &spec.kernel.clone().into_os_string());
        push("--initramfs", &spec.initramfs.clone().into_os_string());
        push("--cmdline", &spec.cmdline.clone().into());
        push("--memory-mib", &spec.memory_mib.to_string().into());
        push("--vcpus", &spec.vcpus.to_string().into());
        match spec.console_pipe {
            Some(_) => push("--console-fd", &spec.console_fd().to_string().into()),
            None => push("--console", &spec.console_log.clone().into_os_string()),
        }
        push("--vhost-user-fs", &spec.fs_socket.clone().into_os_string());
        push("--fs-tag", &SHARE_TAG.into());
        push(
            "--vhost-user-vsock",
            &spec.vsock_socket.clone().into_os_string(),
        );
        push("--guest-cid", &GUEST_CID.to_string().into());
        for (i, net) in spec.nets.iter().enumerate() {
            push(
                "--net",
                &format!(
                    "fd={},mac={},mtu={}",
                    net_fd(i),
                    mac_string(&net.mac),
                    net.mtu
                )
                .into(),
            );
        }
        push(
            "--api-socket",
            &spec.control_socket.clone().into_os_string(),
        );
        if spec.free_page_reporting {
            args.push("--free-page-reporting".into());
        }
        if spec.ready_socket.is_some() {
            args.push("--ready-fd".into());
            args.push(spec.ready_fd().to_string().into());
        }
        if spec.kvm.is_some() {
            args.push("--kvm-fd".into());
            args.push(spec.kvm_fd().to_string().into());
        }
        args
    }
}

impl Hypervisor for HuskVmm {
    fn name(&self) -> String {
        "husk-vmm".into()
    }

    /// The agent powers off through the i8042 (husk-vmm exit 0); the
    /// kernel's own reboots, panics included, triple-fault (exit 3).
    fn kernel_params(&self) -> &'static str {
        "reboot=t"
    }

    fn command(&self, spec: &VmSpec) -> (&'static str, PathBuf, Vec<OsString>) {
        ("husk-vmm", self.binary.clone(), self.args(spec))
    }

    fn tells_ready(&self) -> bool {
        true
    }

    /// KVM comes as a descriptor the shim opened: no /dev/kvm in the
    /// jail, no group for the sandbox's uid.
    fn takes_kvm_fd(&self) -> bool {
        true
    }

    fn jail(&self, spec: &VmSpec, root: &Path) -> Result<Option<Jail>, JailError> {
        super::vmm_jail(spec, root, false).map(Some)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn args_name_every_device_socket_and_the_share_tag() {
        let spec = VmSpec {
            id: "t".into(),
            kernel: "/k".into(),
            initramfs: "/i".into(),
            cmdline: "console=ttyS0 reboot=t".into(),
            vcpus: 2,
            memory_mib: 256,
            console_log: "/c".into(),
            vmm_log: "/v".into(),
            fs_socket: "/fs.sock".into(),
            vsock_socket: "/vsock.sock".into(),
            control_socket: "/s/vmm.sock".into(),
            nets: vec![super::super::NetDevice {
                fd: 21,
                mac: vec![2, 0x42, 10, 0xf4, 0x4d, 3],
                mtu: 1450,
            }],
            console_pipe: None,
            free_page_reporting: true,
            ready_socket: None,
            kvm: None,
        };
        let args: Vec<String> = HuskVmm::new(Path::new("husk-vmm"))
            .args(&spec)
            .into_iter()
            .map(|a| a.into_string().unwrap())
            .collect();
        let joined = args.join(" ");
        for want in [
            "--kernel /k",
            "--initramfs /i",
            "--memory-mib 256",
            "--vcpus 2",
            "--vhost-user-fs /fs.sock",
            "--net fd=3,mac=02:42:0a:f4:4d:03,mtu=1450",
            "--fs-tag husk",
            "--vhost-user-vsock /vsock.sock",
            "--guest-cid 3",
            "--api-socket /s/vmm.sock",
            "--free-page-reporting",
        ] {
            assert!(joined.contains(want), "{want} missing from {joined}");
        }
        let i = args.iter().position(|a| a == "--cmdline").unwrap();
        assert_eq!(args[i + 1], "console=ttyS0 reboot=t", "one argument");
        assert!(joined.contains("--console /c"), "{joined}");
        // With a console pipe it is the descriptor after the taps.
        let piped = VmSpec {
            console_pipe: Some(9),
            ..spec
        };
        let joined = HuskVmm::new(Path::new("husk-vmm"))
            .args(&piped)
            .into_iter()
            .map(|a| a.into_string().unwrap())
            .collect::<Vec<_>>()
            .join(" ");
        assert!(joined.contains("--console-fd 4"), "{joined}");
        assert!(!joined.contains("--console /c"), "{joined}");
        assert!(!joined.contains("--ready-fd"), "{joined}");
        let told = VmSpec {
            ready_socket: Some(30),
            ..piped.clone()
        };
        let args = HuskVmm::new(Path::new("husk-vmm")).args(&told);
        let i = args.iter().position(|a| a == "--ready-fd").unwrap();
        assert_eq!(args[i + 1], "5", "the descriptor after the tap and console");
        assert!(!args.iter().any(|a| a == "--kvm-fd"));
        let with_kvm = VmSpec {
            kvm: Some(31),
            ..told
        };
        assert_eq!(with_kvm.inherited_fds(), [21, 9, 30, 31]);
        let args = HuskVmm::new(Path::new("husk-vmm")).args(&with_kvm);
        let i = args.iter().position(|a| a == "--kvm-fd").unwrap();
        assert_eq!(args[i + 1], "6", "the descriptor after the ready socket");
        let plain = VmSpec {
            free_page_reporting: false,
            ..piped
        };
        let args = HuskVmm::new(Path::new("husk-vmm")).args(&plain);
        assert!(!args.iter().any(|a| a == "--free-page-reporting"));
    }
}
