//! QEMU `-M microvm` backend: TCG or KVM, memfd-shared memory for the
//! vhost-user devices, PVH kernel boot, serial console to a file.

use std::ffi::OsString;
use std::os::fd::RawFd;
use std::path::{Path, PathBuf};

use super::{mac_string, net_fd, Hypervisor, VmSpec, SHARE_TAG};
use crate::confine::jail::{Jail, JailError};
use crate::host::probe::ResolvedAccel;

/// QEMU microvm with vhost-user-fs and vhost-user-vsock devices.
pub struct Qemu {
    binary: PathBuf,
    accel: ResolvedAccel,
    /// TCG's translation cache in MiB; 0 leaves QEMU's default.
    tb_size_mib: u32,
}

impl Qemu {
    pub fn new(binary: &Path, accel: ResolvedAccel) -> Self {
        Self {
            binary: binary.to_path_buf(),
            accel,
            tb_size_mib: 0,
        }
    }

    /// Bounds TCG's translation cache to `mib` (0: QEMU's default); no
    /// effect under KVM.
    pub fn with_tb_size(mut self, mib: u32) -> Self {
        self.tb_size_mib = mib;
        self
    }

    /// The QEMU command line for `spec`.
    /// A QMP monitor on the inherited listener `fd`: QEMU accepts from its
    /// main loop, entered once the machine runs, and its greeting is its
    /// first write (see ready.rs).
    pub fn ready_args(fd: RawFd) -> [String; 4] {
        [
            "-chardev".into(),
            format!("socket,id=ready,fd={fd},server=on,wait=off"),
            "-mon".into(),
            "chardev=ready,mode=control".into(),
        ]
    }

    pub fn args(&self, spec: &VmSpec) -> Vec<OsString> {
        let (accel, cpu) = match self.accel {
            ResolvedAccel::Kvm => ("kvm".to_owned(), "host"),
            ResolvedAccel::Tcg if self.tb_size_mib > 0 => {
                (format!("tcg,tb-size={}", self.tb_size_mib), "max")
            }
            ResolvedAccel::Tcg => ("tcg".to_owned(), "max"),
        };
        let mem = format!("{}M", spec.memory_mib);
        let mut args: Vec<OsString> = Vec::new();
        let mut push = |a: &str| args.push(a.into());
        // microvm without ACPI: QEMU appends virtio_mmio.device= entries for
        // each device to the command line (auto-kernel-cmdline) and writes an
        // MP table for the IOAPIC. No PCI, no firmware option ROMs. The RTC
        // stays: without it the guest spins 1 s in its wall-clock read and
        // containers would start in 1970.
        push("-machine");
        push("microvm,acpi=off,rtc=on,x-option-roms=off,isa-serial=on,memory-backend=mem");
        push("-accel");
        push(&accel);
        push("-cpu");
        push(cpu);
        push("-smp");
        push(&spec.vcpus.to_string());
        push("-m");
        push(&mem);
        // vhost-user back-ends map guest memory: it must be a shareable memfd.
        push("-object");
        push(&format!("memory-backend-memfd,id=mem,size={mem},share=on"));
        push("-name");
        push(&format!("husk-{}", spec.id));
        for a in [
            "-nodefaults",
            "-no-user-config",
            "-display",
            "none",
            "-monitor",
            "none",
            "-no-reboot",
        ] {
            push(a);
        }
        // QEMU's own seccomp filter: no spawning, no privilege changes.
        push("-sandbox");
        push("on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny");
        match spec.console_pipe {
            // The pipe as QEMU's own fd set: no /proc or /dev/fd needed (its
            // jail has neither); append, as a pipe cannot be truncated.
            Some(_) => {
                push("-add-fd");
                push(&format!("fd={},set=1", spec.console_fd()));
                push("-chardev");
                push("file,id=console,path=/dev/fdset/1,append=on");
                push("-serial");
                push("chardev:console");
            }
            None => {
                push("-serial");
                args.push(prefixed("file:", &spec.console_log));
            }
        }
        args.push("-kernel".into());
        args.push(spec.kernel.clone().into());
        args.push("-initrd".into());
        args.push(spec.initramfs.clone().into());
        args.push("-append".into());
        args.push(spec.cmdline.clone().into());
        args.push("-chardev".into());
        args.push(prefixed("socket,id=fs0,path=", &spec.fs_socket));
        args.push("-device".into());
        args.push(format!("vhost-user-fs-device,chardev=fs0,tag={SHARE_TAG}").into());
        args.push("-chardev".into());
        args.push(prefixed("socket,id=vsock0,path=", &spec.vsock_socket));
        args.push("-device".into());
        args.push("vhost-user-vsock-device,chardev=vsock0".into());
        // Pages the guest frees are punched out of the memfd (QEMU discards
        // each reported range). No balloon target: husk never inflates.
        if spec.ready_socket.is_some() {
            args.extend(Self::ready_args(spec.ready_fd()).map(OsString::from));
        }
        if spec.free_page_reporting {
            args.push("-device".into());
            args.push("virtio-balloon-device,free-page-reporting=on".into());
        }
        // The pod's NICs: taps the caller opened, inherited as descriptors.
        // No vhost-net (this host's kernel has none; QEMU serves the queues).
        for (i, net) in spec.nets.iter().enumerate() {
            args.push("-netdev".into());
            args.push(format!("tap,id=net{i},fd={},vhost=off", net_fd(i)).into());
            args.push("-device".into());
            args.push(
                format!(
                    "virtio-net-device,netdev=net{i},mac={},host_mtu={}",
                    mac_string(&net.mac),
                    net.mtu
                )
                .into(),
            );
        }
        args
    }
}

fn prefixed(prefix: &str, path: &Path) -> OsString {
    let mut s = OsString::from(prefix);
    s.push(path.as_os_str());
    s
}

impl Hypervisor for Qemu {
    fn name(&self) -> String {
        match self.accel {
            ResolvedAccel::Kvm => "qemu (KVM)".into(),
            ResolvedAccel::Tcg => "qemu (TCG)".into(),
        }
    }

    /// microvm has no i8042: `reboot=k` would poll a missing keyboard
    /// controller for over a second under TCG. A triple fault resets at once,
    /// and `-no-reboot` turns the reset into QEMU's exit.
    ///
    /// Under TCG also `init_on_alloc=1`: QEMU keeps the code it translated
    /// per guest page and drops it when a vCPU writes the page, but
    /// virtiofsd (vhost-user) writes file data straight into guest memory,
    /// which QEMU never sees. A page-cache page that held one program's
    /// code and was refilled with another's ran the first program's
    /// translation (a program's first run in a container crashed with
    /// SIGSEGV now and then; tests/images/code-reuse.c shows it at will:
    /// 100 of 200 rounds). Zeroing each page the guest allocates is a vCPU
    /// write, so no translation outlives a page's reuse. Under KVM the CPU
    /// runs guest code itself and caches nothing that memory does not hold.
    fn kernel_params(&self) -> &'static str {
        match self.accel {
            ResolvedAccel::Kvm => "reboot=t",
            ResolvedAccel::Tcg => "reboot=t init_on_alloc=1",
        }
    }

    fn command(&self, spec: &VmSpec) -> (&'static str, PathBuf, Vec<OsString>) {
        ("qemu", self.binary.clone(), self.args(spec))
    }

    fn tells_ready(&self) -> bool {
        true
    }

    /// QEMU's libraries and firmware are in the system's directories,
    /// which every jail has.
    fn uses_kvm(&self) -> bool {
        self.accel == ResolvedAccel::Kvm
    }

    fn jail(&self, spec: &VmSpec, root: &Path) -> Result<Option<Jail>, JailError> {
        super::vmm_jail(spec, root, self.uses_kvm()).map(Some)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> VmSpec {
        VmSpec {
            id: "t1".into(),
            kernel: "/k/vmlinux".into(),
            initramfs: "/k/initramfs.cpio".into(),
            cmdline: "console=ttyS0".into(),
            vcpus: 2,
            memory_mib: 256,
            console_log: "/s/console.log".into(),
            vmm_log: "/s/vmm.log".into(),
            fs_socket: "/s/fs.sock".into(),
            vsock_socket: "/s/vsock.sock".into(),
            control_socket: "/s/vmm.sock".into(),
            nets: Vec::new(),
            console_pipe: None,
            free_page_reporting: true,
            ready_socket: None,
            kvm: None,
        }
    }

    fn joined(q: &Qemu) -> String {
        line(q, &spec())
    }

    fn line(q: &Qemu, s: &VmSpec) -> String {
        q.args(s)
            .iter()
            .map(|a| a.to_string_lossy().into_owned())
            .collect::<Vec<_>>()
            .join(" ")
    }

    #[test]
    fn only_tcg_guests_zero_the_pages_they_allocate() {
        let q = |accel| Qemu::new(Path::new("q"), accel);
        assert!(q(ResolvedAccel::Tcg)
            .kernel_params()
            .split(' ')
            .any(|p| p == "init_on_alloc=1"));
        assert!(!q(ResolvedAccel::Kvm)
            .kernel_params()
            .contains("init_on_alloc"));
    }

    /// QEMU's own seccomp filter, with each option QEMU 10 has (see
    /// qemu-options.hx: obsolete, elevateprivileges, spawn,
    /// resourcecontrol) set to deny.
    #[test]
    fn qemus_own_sandbox_is_on_with_every_option_denying() {
        for accel in [ResolvedAccel::Tcg, ResolvedAccel::Kvm] {
            let args: Vec<String> = Qemu::new(Path::new("q"), accel)
                .args(&spec())
                .iter()
                .map(|a| a.to_string_lossy().into_owned())
                .collect();
            let at = args.iter().position(|a| a == "-sandbox").expect("-sandbox");
            let mut parts = args[at + 1].split(',');
            assert_eq!(parts.next(), Some("on"));
            let mut options: Vec<&str> = parts.collect();
            options.sort_unstable();
            assert_eq!(
                options,
                [
                    "elevateprivileges=deny",
                    "obsolete=deny",
                    "resourcecontrol=deny",
                    "spawn=deny"
                ]
            );
        }
    }

    #[test]
    fn tcg_command_line_shares_memfd_memory_with_the_daemons() {
        let line = joined(&Qemu::new(
            Path::new("qemu-system-x86_64"),
            ResolvedAccel::Tcg,
        ));
        assert!(line.contains("-machine microvm,"), "{line}");
        assert!(line.contains("-accel tcg -cpu max"), "{line}");
        let bounded = joined(&Qemu::new(Path::new("q"), ResolvedAccel::Tcg).with_tb_size(48));
        assert!(bounded.contains("-accel tcg,tb-size=48 "), "{bounded}");
        assert!(
            line.contains("memory-backend-memfd,id=mem,size=256M,share=on"),
            "{line}"
        );
        assert!(line.contains("memory-backend=mem"), "{line}");
        assert!(line.contains("-smp 2 -m 256M"), "{line}");
        assert!(line.contains("-no-reboot"), "{line}");
        assert!(
            line.contains("vhost-user-fs-device,chardev=fs0,tag=husk"),
            "{line}"
        );
        assert!(
            line.contains("socket,id=vsock0,path=/s/vsock.sock"),
            "{line}"
        );
        assert!(line.contains("-serial file:/s/console.log"), "{line}");
        assert!(
            line.contains("-device virtio-balloon-device,free-page-reporting=on"),
            "{line}"
        );
        let plain = Qemu::new(Path::new("q"), ResolvedAccel::Tcg).args(&VmSpec {
            free_page_reporting: false,
            ..spec()
        });
        assert!(!plain
            .iter()
            .any(|a| a.to_string_lossy().contains("balloon")));
    }

    #[test]
    fn nics_take_inherited_taps_with_the_pod_links_mac_and_mtu() {
        let mut s = spec();
        for (fd, last) in [(17, 0x0a), (9, 0x0b)] {
            s.nets.push(super::super::NetDevice {
                fd,
                mac: vec![0x02, 0x42, 0xac, 0x11, 0x00, last],
                mtu: 1450,
            });
        }
        let line = line(&Qemu::new(Path::new("q"), ResolvedAccel::Tcg), &s);
        assert!(
            line.contains("-netdev tap,id=net0,fd=3,vhost=off -device virtio-net-device,netdev=net0,mac=02:42:ac:11:00:0a,host_mtu=1450"),
            "{line}"
        );
        assert!(
            line.contains("-netdev tap,id=net1,fd=4,vhost=off -device virtio-net-device,netdev=net1,mac=02:42:ac:11:00:0b,host_mtu=1450"),
            "{line}"
        );
    }

    #[test]
    fn the_console_goes_to_the_pipe_after_the_taps_when_there_is_one() {
        let q = Qemu::new(Path::new("qemu-system-x86_64"), ResolvedAccel::Tcg);
        assert!(q.args(&spec()).iter().any(|a| a == "file:/s/console.log"));
        let mut s = spec();
        s.nets = vec![super::super::NetDevice {
            fd: 40,
            mac: vec![2, 0, 0, 0, 0, 1],
            mtu: 1500,
        }];
        s.console_pipe = Some(41);
        assert_eq!(s.inherited_fds(), [40, 41]);
        let args = q.args(&s);
        let i = args.iter().position(|a| a == "-add-fd").unwrap();
        assert_eq!(args[i + 1], "fd=4,set=1");
        let i = args.iter().position(|a| a == "-serial").unwrap();
        assert_eq!(args[i + 1], "chardev:console");
        assert!(!args.iter().any(|a| a == "file:/s/console.log"));
        assert!(!args.iter().any(|a| a == "-mon"), "no ready socket asked");

        // The ready socket comes last, and QEMU's monitor listens on it.
        s.ready_socket = Some(42);
        assert_eq!(s.inherited_fds(), [40, 41, 42]);
        let line = line(&q, &s);
        assert!(
            line.contains(
                "-chardev socket,id=ready,fd=5,server=on,wait=off -mon chardev=ready,mode=control"
            ),
            "{line}"
        );
    }

    #[test]
    fn kvm_command_line_uses_the_host_cpu() {
        let line = joined(&Qemu::new(Path::new("q"), ResolvedAccel::Kvm).with_tb_size(48));
        assert!(!line.contains("tb-size"), "{line}");
        assert!(line.contains("-accel kvm -cpu host"), "{line}");
    }
}
