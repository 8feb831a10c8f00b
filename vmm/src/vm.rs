//! The KVM virtual machine: capability checks, memory slots, in-kernel
//! irqchip and PIT, vCPUs with CPUID from KVM's supported set, and the run
//! loop that dispatches port I/O to the legacy devices.

use std::io::Write;
use std::path::Path;
use std::sync::{Arc, Mutex};

use kvm_bindings::{kvm_pit_config, kvm_userspace_memory_region, KVM_MAX_CPUID_ENTRIES};
use kvm_ioctls::{Cap, Kvm, VcpuExit, VcpuFd, VmFd};
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

use crate::balloon::{BalloonDevice, BalloonError};
use crate::boot::BootEntry;
use crate::control::RunState;
use crate::devices::{EventFdTrigger, PioAction, PioBus, SERIAL_IRQ};
use crate::memory::{GuestRam, MemoryError};
use crate::net::{NetDevice, NetError};
use crate::vhost_user::{Kind, VhostUserDevice, VhostUserError};
use crate::virtio_mmio::{Action, MmioTransport, QueueConfig, VirtioDevice, WINDOW};

/// The KVM API version every kernel since 2.6.22 reports.
const KVM_API_VERSION: i32 = 12;
/// Where KVM may put the TSS it needs on Intel hosts (3 pages below 4 GiB,
/// inside the MMIO gap).
const TSS_ADDRESS: usize = 0xfffb_d000;
/// virtio-mmio windows start here, in the MMIO gap.
pub const VIRTIO_MMIO_BASE: u64 = 0xd000_0000;
/// Their interrupts: free ISA lines (the MP table routes 0..16 to the
/// IOAPIC's pins as they are).
const VIRTIO_IRQS: [u32; 6] = [5, 6, 7, 9, 10, 11];
const MAX_VIRTIO_DEVICES: usize = VIRTIO_IRQS.len();
// A pod's VM has virtio-fs, virtio-vsock, virtio-balloon and a NIC.
const _: () = assert!(MAX_VIRTIO_DEVICES >= 4);

type Transport = Mutex<MmioTransport<Device>>;

/// A virtio device behind the transport: one a vhost-user daemon serves,
/// or one of husk-vmm's own (virtio-net, virtio-balloon).
pub enum Device {
    VhostUser(VhostUserDevice),
    Net(NetDevice),
    Balloon(BalloonDevice),
}

impl Device {
    fn kicks(&self) -> &[vmm_sys_util::eventfd::EventFd] {
        match self {
            Device::VhostUser(d) => &d.kicks,
            Device::Net(d) => &d.thread.kicks,
            Device::Balloon(d) => &d.thread.kicks,
        }
    }

    fn call(&self) -> &vmm_sys_util::eventfd::EventFd {
        match self {
            Device::VhostUser(d) => &d.call,
            Device::Net(d) => &d.thread.call,
            Device::Balloon(d) => &d.thread.call,
        }
    }

    fn activate(&mut self, features: u64, queues: &[QueueConfig]) -> Result<(), String> {
        match self {
            Device::VhostUser(d) => d.activate(features, queues).map_err(|e| e.to_string()),
            Device::Net(d) => d.thread.activate(queues).map_err(|e| e.to_string()),
            Device::Balloon(d) => d.thread.activate(queues).map_err(|e| e.to_string()),
        }
    }

    /// The driver reset the device. (A vhost-user daemon keeps its rings
    /// until the VM ends; the guest resets devices only on its way down.)
    fn reset(&mut self) {
        match self {
            Device::VhostUser(_) => {}
            Device::Net(d) => d.thread.deactivate(),
            Device::Balloon(d) => d.thread.deactivate(),
        }
    }

    fn inner(&self) -> &dyn VirtioDevice {
        match self {
            Device::VhostUser(d) => d,
            Device::Net(d) => d,
            Device::Balloon(d) => d,
        }
    }
}

impl VirtioDevice for Device {
    fn device_type(&self) -> u32 {
        self.inner().device_type()
    }

    fn features(&self) -> u64 {
        self.inner().features()
    }

    fn queue_max_sizes(&self) -> &[u16] {
        self.inner().queue_max_sizes()
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        self.inner().read_config(offset, data)
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        match self {
            Device::VhostUser(d) => d.write_config(offset, data),
            Device::Net(d) => d.write_config(offset, data),
            Device::Balloon(d) => d.write_config(offset, data),
        }
    }
}

/// One virtio-mmio device on the bus.
struct MmioDevice {
    base: u64,
    transport: Transport,
    /// Failed activations (a guest can fail them in a loop).
    failures: crate::device_thread::Repeats,
}

/// Most vCPUs husk-vmm creates.
pub const MAX_VCPUS: u8 = 32;
/// Capabilities the VMM cannot work without.
const REQUIRED_CAPS: &[(Cap, &str)] = &[
    (Cap::Irqchip, "in-kernel irqchip (KVM_CAP_IRQCHIP)"),
    (Cap::UserMemory, "user memory slots (KVM_CAP_USER_MEMORY)"),
    (Cap::Ioeventfd, "ioeventfd (KVM_CAP_IOEVENTFD)"),
    (Cap::Irqfd, "irqfd (KVM_CAP_IRQFD)"),
    (Cap::Pit2, "in-kernel PIT (KVM_CAP_PIT2)"),
    (Cap::ExtCpuid, "KVM_GET_SUPPORTED_CPUID (KVM_CAP_EXT_CPUID)"),
];

#[derive(Debug, thiserror::Error)]
pub enum VmError {
    #[error("cannot open {path}: {source}; husk-vmm needs KVM (load kvm-intel or kvm-amd, or use hypervisor = \"qemu\")")]
    NoKvm {
        path: &'static str,
        source: kvm_ioctls::Error,
    },
    #[error("the KVM descriptor is not /dev/kvm ({0}); pass an open /dev/kvm, or no descriptor")]
    NotKvm(String),
    #[error("KVM API version {0}, expected {KVM_API_VERSION}")]
    ApiVersion(i32),
    #[error("this KVM lacks {0}, which husk-vmm needs")]
    MissingCap(&'static str),
    #[error("{what}: {source}")]
    Kvm {
        what: &'static str,
        source: kvm_ioctls::Error,
    },
    #[error(transparent)]
    Memory(#[from] MemoryError),
    #[error(transparent)]
    MpTable(#[from] crate::mptable::MpTableError),
    #[error(transparent)]
    VhostUser(#[from] VhostUserError),
    #[error(transparent)]
    Net(#[from] NetError),
    #[error(transparent)]
    Balloon(#[from] BalloonError),
    #[error("husk-vmm supports at most {MAX_VIRTIO_DEVICES} virtio devices")]
    TooManyDevices,
    #[error("{0} vCPUs requested; husk-vmm runs 1 to {MAX_VCPUS}")]
    Vcpus(u8),
    #[error("{what}: {source}")]
    Io {
        what: &'static str,
        source: std::io::Error,
    },
    #[error("guest code at {addr:#x} does not fit in guest memory")]
    Load { addr: u64 },
    #[error("vCPU {vcpu} failed to enter the guest (hardware reason {reason:#x})")]
    FailEntry { vcpu: usize, reason: u64 },
    #[error("vCPU {vcpu}: KVM internal error")]
    Internal { vcpu: usize },
    #[error("vCPU {vcpu}: unexpected exit {exit}")]
    Unexpected { vcpu: usize, exit: String },
}

fn kvm_err(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VmError {
    move |source| VmError::Kvm { what, source }
}

/// How a vCPU's run ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    /// The guest pulled the i8042 reset line: its power-off path.
    Reset,
    /// Triple fault or KVM shutdown: the guest crashed.
    Shutdown,
    /// Stopped through the control socket.
    Stopped,
}

pub struct VmConfig {
    pub memory_mib: u64,
    pub vcpus: u8,
    pub console: Box<dyn Write + Send>,
    /// /dev/kvm opened by the caller (so this process needs no access to
    /// the node); None: opened here.
    pub kvm: Option<std::fs::File>,
}

pub struct Vm {
    kvm: Kvm,
    fd: VmFd,
    ram: GuestRam,
    vcpus: Vec<VcpuFd>,
    bus: Arc<Mutex<PioBus>>,
    mmio: Vec<MmioDevice>,
    state: Arc<RunState>,
}

impl Vm {
    /// Checks KVM, creates the VM with its memory, irqchip, PIT, vCPUs and
    /// legacy devices.
    pub fn new(config: VmConfig) -> Result<Self, VmError> {
        if config.vcpus == 0 || config.vcpus > MAX_VCPUS {
            return Err(VmError::Vcpus(config.vcpus));
        }
        let kvm = match config.kvm {
            Some(file) => kvm_of(file)?,
            None => Kvm::new().map_err(|source| VmError::NoKvm {
                path: "/dev/kvm",
                source,
            })?,
        };
        check_kvm(&kvm)?;
        let ram = GuestRam::new(config.memory_mib)?;
        let fd = kvm.create_vm().map_err(kvm_err("create the VM"))?;
        fd.set_tss_address(TSS_ADDRESS)
            .map_err(kvm_err("set the TSS address"))?;
        fd.create_irq_chip()
            .map_err(kvm_err("create the irqchip"))?;
        // The PIT's speaker port 0x61 (channel 2 gate and output, which
        // Linux polls to calibrate the TSC) is served in the kernel too.
        fd.create_pit2(kvm_pit_config {
            flags: kvm_bindings::KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        })
        .map_err(kvm_err("create the PIT"))?;
        for (slot, region) in ram.memory.iter().enumerate() {
            let host = ram
                .memory
                .get_host_address(region.start_addr())
                .map_err(|e| VmError::Io {
                    what: "host address of guest memory",
                    source: std::io::Error::other(e.to_string()),
                })?;
            let r = kvm_userspace_memory_region {
                slot: slot as u32,
                flags: 0,
                guest_phys_addr: region.start_addr().0,
                memory_size: region.len(),
                userspace_addr: host as u64,
            };
            // SAFETY: the region is a live mapping owned by `ram`, which the
            // Vm keeps for as long as the VM fd exists.
            unsafe { fd.set_user_memory_region(r) }.map_err(kvm_err("add a memory slot"))?;
        }
        let serial_irq = EventFdTrigger::new().map_err(|source| VmError::Io {
            what: "serial interrupt eventfd",
            source,
        })?;
        fd.register_irqfd(&serial_irq.0, SERIAL_IRQ)
            .map_err(kvm_err("wire the serial interrupt"))?;
        let bus = PioBus::new(serial_irq, config.console).map_err(|source| VmError::Io {
            what: "legacy devices",
            source,
        })?;
        let mut vm = Self {
            kvm,
            fd,
            ram,
            vcpus: Vec::new(),
            bus: Arc::new(Mutex::new(bus)),
            mmio: Vec::new(),
            state: RunState::new(),
        };
        let cpuid = vm.base_cpuid()?;
        for id in 0..config.vcpus {
            vm.add_vcpu(id, &cpuid)?;
        }
        Ok(vm)
    }

    /// The CPUID every vCPU shares: KVM's supported set, with ECX[31] of
    /// leaf 1 telling the guest it runs on a hypervisor (so it looks for
    /// KVM's leaves and uses kvmclock instead of calibrating the TSC) and
    /// ECX[24] for the LAPIC's TSC-deadline mode, which KVM emulates but
    /// leaves out of the supported set (without it Linux calibrates the
    /// LAPIC timer at boot, about 0.3 s in the nested lab). The
    /// hypervisor's own 0x4000_0000 leaves stay as KVM reports them (a PVM
    /// host needs its own).
    fn base_cpuid(&self) -> Result<kvm_bindings::CpuId, VmError> {
        let mut cpuid = self
            .kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(kvm_err("read the supported CPUID"))?;
        let tsc_deadline = self.kvm.check_extension(Cap::TscDeadlineTimer);
        for e in cpuid.as_mut_slice().iter_mut().filter(|e| e.function == 1) {
            e.ecx |= 1 << 31;
            if tsc_deadline {
                e.ecx |= 1 << 24;
            }
        }
        Ok(cpuid)
    }

    /// Creates vCPU `id` with `base` CPUID and its own APIC ids.
    fn add_vcpu(&mut self, id: u8, base: &kvm_bindings::CpuId) -> Result<(), VmError> {
        let vcpu = self
            .fd
            .create_vcpu(id as u64)
            .map_err(kvm_err("create a vCPU"))?;
        let mut cpuid = base.clone();
        for e in cpuid.as_mut_slice() {
            match e.function {
                // Initial APIC id in EBX[31:24].
                1 => e.ebx = (e.ebx & 0x00ff_ffff) | ((id as u32) << 24),
                // x2APIC id of the topology leaves.
                0xb | 0x1f => e.edx = id as u32,
                _ => {}
            }
        }
        vcpu.set_cpuid2(&cpuid).map_err(kvm_err("set CPUID"))?;
        self.vcpus.push(vcpu);
        Ok(())
    }

    /// The run state that pauses, resumes and stops the vCPUs (what the
    /// control socket drives).
    pub fn run_state(&self) -> Arc<RunState> {
        self.state.clone()
    }

    pub fn memory(&self) -> &GuestRam {
        &self.ram
    }

    pub fn vcpu(&self, index: usize) -> Option<&VcpuFd> {
        self.vcpus.get(index)
    }

    /// Copies code into guest memory and points vCPU `index` at it in 64-bit
    /// long mode (see [`Vm::enter_long_mode`]). PVM hosts run only 64-bit
    /// guests; this is the mode the fast tests use there.
    pub fn load_long_mode(&mut self, index: usize, addr: u64, code: &[u8]) -> Result<(), VmError> {
        use vm_memory::Bytes;
        self.ram
            .memory
            .write_slice(code, GuestAddress(addr))
            .map_err(|_| VmError::Load { addr })?;
        self.enter_long_mode(index)?;
        let vcpu = self.vcpu_at(index)?;
        let mut regs = vcpu.get_regs().map_err(kvm_err("read regs"))?;
        regs.rip = addr;
        regs.rsp = 0x8000;
        regs.rflags = 0x2;
        vcpu.set_regs(&regs).map_err(kvm_err("set regs"))?;
        Ok(())
    }

    fn vcpu_at(&self, index: usize) -> Result<&VcpuFd, VmError> {
        self.vcpus.get(index).ok_or(VmError::Unexpected {
            vcpu: index,
            exit: "no such vCPU".into(),
        })
    }

    /// Puts vCPU `index` in 64-bit long mode: the first 4 GiB identity-mapped
    /// with 2 MiB pages (tables at 0x9000..0xf000), a GDT at 0x500 with the
    /// boot protocol's selectors (0x10 code, 0x18 data), flat segments.
    fn enter_long_mode(&mut self, index: usize) -> Result<(), VmError> {
        use vm_memory::Bytes;
        const PML4: u64 = 0x9000;
        const PDPT: u64 = 0xa000;
        const PD: u64 = 0xb000;
        const GDT: u64 = 0x500;
        let mem = &self.ram.memory;
        let write = |v: u64, at: u64| {
            mem.write_obj(v, GuestAddress(at))
                .map_err(|_| VmError::Load { addr: at })
        };
        write(PDPT | 0x3, PML4)?;
        for gib in 0..4u64 {
            let pd = PD + gib * 0x1000;
            write(pd | 0x3, PDPT + gib * 8)?;
            for i in 0..512u64 {
                // Present, writable, 2 MiB page.
                write((gib << 30) | (i << 21) | 0x83, pd + i * 8)?;
            }
        }
        for (i, d) in GDT_ENTRIES.iter().enumerate() {
            write(*d, GDT + i as u64 * 8)?;
        }
        let vcpu = self.vcpu_at(index)?;
        let mut sregs = vcpu.get_sregs().map_err(kvm_err("read sregs"))?;
        flat_segments(&mut sregs, true);
        sregs.gdt.base = GDT;
        sregs.gdt.limit = (GDT_ENTRIES.len() * 8 - 1) as u16;
        sregs.cr3 = PML4;
        sregs.cr4 |= 1 << 5; // PAE
        sregs.cr0 |= (1 << 0) | (1 << 31); // PE, PG
        sregs.efer |= (1 << 8) | (1 << 10); // LME, LMA
        vcpu.set_sregs(&sregs).map_err(kvm_err("set sregs"))?;
        Ok(())
    }

    /// Writes the MP table and points the boot vCPU at the kernel's entry:
    /// for PVH, 32-bit protected mode, flat segments, paging off, %rbx =
    /// start info; for a bzImage, long mode with %rsi = zero page. Then
    /// x87/SSE control words, the MSRs Linux expects, and LAPIC LINT0/LINT1
    /// as ExtINT/NMI on every vCPU.
    pub fn setup_boot(&mut self, boot: BootEntry) -> Result<(), VmError> {
        crate::mptable::write(&self.ram.memory, self.vcpus.len() as u8)?;
        let regs = match boot {
            BootEntry::Pvh { entry, start_info } => {
                let vcpu = self.vcpu_at(0)?;
                let mut sregs = vcpu.get_sregs().map_err(kvm_err("read sregs"))?;
                flat_segments(&mut sregs, false);
                sregs.cr0 = 0x11; // PE, ET
                sregs.cr4 = 0;
                sregs.efer = 0;
                vcpu.set_sregs(&sregs).map_err(kvm_err("set sregs"))?;
                kvm_bindings::kvm_regs {
                    rip: entry,
                    rbx: start_info,
                    rflags: 0x2,
                    ..Default::default()
                }
            }
            BootEntry::Linux64 { entry, boot_params } => {
                self.enter_long_mode(0)?;
                kvm_bindings::kvm_regs {
                    rip: entry,
                    rsi: boot_params,
                    rflags: 0x2,
                    ..Default::default()
                }
            }
        };
        let vcpu = self.vcpu_at(0)?;
        vcpu.set_regs(&regs).map_err(kvm_err("set regs"))?;
        let fpu = kvm_bindings::kvm_fpu {
            fcw: 0x37f,
            mxcsr: 0x1f80,
            ..Default::default()
        };
        vcpu.set_fpu(&fpu).map_err(kvm_err("set FPU"))?;
        for vcpu in &self.vcpus {
            setup_msrs(vcpu)?;
            setup_lapic(vcpu)?;
        }
        Ok(())
    }

    /// Adds a virtio device served by the vhost-user daemon at `socket`:
    /// its MMIO window, the ioeventfds on its QueueNotify register and the
    /// irqfd on its line. Returns the kernel command-line parameter that
    /// tells the guest where it is.
    pub fn add_vhost_user(&mut self, kind: Kind, socket: &Path) -> Result<String, VmError> {
        self.room()?;
        let dev = VhostUserDevice::connect(kind, socket, self.ram.memory.clone())?;
        self.add_device(Device::VhostUser(dev))
    }

    /// Adds husk-vmm's own virtio-net device on tap queue `tap` (opened
    /// with `IFF_TAP | IFF_NO_PI | IFF_VNET_HDR`), with `mac` and `mtu`.
    /// Returns the kernel command-line parameter for it.
    pub fn add_net(
        &mut self,
        tap: std::fs::File,
        mac: [u8; 6],
        mtu: u32,
    ) -> Result<String, VmError> {
        self.room()?;
        let dev = NetDevice::new(tap, mac, mtu, self.ram.memory.clone())?;
        self.add_device(Device::Net(dev))
    }

    /// Adds husk-vmm's own virtio-balloon device for free page reporting:
    /// pages the guest frees go back to the host. The control socket's
    /// `status` reports the bytes given back as `balloon_discarded_bytes`.
    /// Returns the kernel command-line parameter for it.
    pub fn add_balloon(&mut self) -> Result<String, VmError> {
        self.room()?;
        let dev = BalloonDevice::new(&self.ram)?;
        self.state
            .report("balloon_discarded_bytes", dev.discarded());
        self.add_device(Device::Balloon(dev))
    }

    /// Refuses a device beyond the windows and lines there are (before it
    /// is made: a daemon connected or a thread started for nothing).
    fn room(&self) -> Result<(), VmError> {
        if self.mmio.len() >= MAX_VIRTIO_DEVICES {
            return Err(VmError::TooManyDevices);
        }
        Ok(())
    }

    /// Puts `dev` on the bus: its MMIO window, the ioeventfds on its
    /// QueueNotify register and the irqfd on its line.
    fn add_device(&mut self, dev: Device) -> Result<String, VmError> {
        let n = self.mmio.len();
        let base = VIRTIO_MMIO_BASE + n as u64 * WINDOW;
        let irq = VIRTIO_IRQS[n];
        for (i, kick) in dev.kicks().iter().enumerate() {
            self.fd
                .register_ioevent(
                    kick,
                    &kvm_ioctls::IoEventAddress::Mmio(base + 0x50),
                    i as u32,
                )
                .map_err(kvm_err("register a queue ioeventfd"))?;
        }
        self.fd
            .register_irqfd(dev.call(), irq)
            .map_err(kvm_err("register a device irqfd"))?;
        self.mmio.push(MmioDevice {
            base,
            transport: Mutex::new(MmioTransport::with_external_interrupts(dev)),
            failures: Default::default(),
        });
        Ok(format!("virtio_mmio.device=4K@{base:#x}:{irq}"))
    }

    /// Runs vCPU `index` on this thread until the guest resets or shuts
    /// down. (A triple fault is KVM_EXIT_SHUTDOWN on hardware KVM; PVM
    /// reports it as an internal error.)
    pub fn run_vcpu(&mut self, index: usize) -> Result<Exit, VmError> {
        let vcpu = self.vcpus.get_mut(index).ok_or(VmError::Unexpected {
            vcpu: index,
            exit: "no such vCPU".into(),
        })?;
        run_loop(index, vcpu, &self.bus, &self.mmio, &self.state)
    }

    /// Runs every vCPU on its own thread; returns the first one's end (the
    /// guest's reset, a crash, or a VMM failure). vCPUs still in the guest
    /// keep running: the caller is expected to exit the process.
    pub fn run(mut self) -> Result<Exit, VmError> {
        let (tx, rx) = std::sync::mpsc::channel();
        let mmio = Arc::new(std::mem::take(&mut self.mmio));
        for (index, mut vcpu) in std::mem::take(&mut self.vcpus).into_iter().enumerate() {
            let bus = self.bus.clone();
            let mmio = mmio.clone();
            let state = self.state.clone();
            let tx = tx.clone();
            std::thread::Builder::new()
                .name(format!("vcpu{index}"))
                .spawn(move || {
                    // Before the guest's first instruction on this vCPU.
                    crate::seccomp::enter(crate::seccomp::ThreadKind::Vcpu);
                    let r = run_loop(index, &mut vcpu, &bus, &mmio, &state);
                    let _ = tx.send(r);
                    // Keep the fd open until the process ends.
                    std::mem::forget(vcpu);
                })
                .map_err(|source| VmError::Io {
                    what: "start a vCPU thread",
                    source,
                })?;
        }
        drop(tx);
        // From here this thread only waits and ends the process.
        crate::seccomp::enter(crate::seccomp::ThreadKind::Vmm);
        let result = rx.recv().unwrap_or(Err(VmError::Vcpus(0)));
        // Guest memory and the VM fd stay mapped for the vCPUs still running.
        std::mem::forget(self);
        result
    }
}

/// One vCPU's KVM_RUN loop, dispatching port I/O to the shared bus.
fn run_loop(
    index: usize,
    vcpu: &mut VcpuFd,
    bus: &Mutex<PioBus>,
    mmio: &[MmioDevice],
    state: &Arc<RunState>,
) -> Result<Exit, VmError> {
    let _registered = state.enter();
    let device = |addr: u64| {
        mmio.iter()
            .find(|d| (d.base..d.base + WINDOW).contains(&addr))
            .map(|d| (d, addr - d.base))
    };
    let lock = || bus.lock().unwrap_or_else(|e| e.into_inner());
    let result = loop {
        if state.checkpoint() {
            break Ok(Exit::Stopped);
        }
        match vcpu.run() {
            Ok(VcpuExit::IoOut(port, data)) => {
                if lock().write(port, data) == PioAction::Reset {
                    break Ok(Exit::Reset);
                }
            }
            Ok(VcpuExit::IoIn(port, data)) => lock().read(port, data),
            // With the in-kernel LAPIC, HLT waits in KVM; an exit here
            // means a guest that halted for good.
            Ok(VcpuExit::Hlt) => break Ok(Exit::Shutdown),
            Ok(VcpuExit::Shutdown) => break Ok(Exit::Shutdown),
            Ok(VcpuExit::FailEntry(reason, _)) => {
                break Err(VmError::FailEntry {
                    vcpu: index,
                    reason,
                })
            }
            Ok(VcpuExit::InternalError) => break Err(VmError::Internal { vcpu: index }),
            Ok(VcpuExit::MmioRead(addr, data)) => match device(addr) {
                Some((d, off)) => lock_transport(&d.transport).read(off, data),
                // Nothing there: all-ones, as on real hardware.
                None => data.fill(0xff),
            },
            Ok(VcpuExit::MmioWrite(addr, data)) => {
                if let Some((d, off)) = device(addr) {
                    mmio_write(d, off, data);
                }
            }
            Ok(other) => {
                break Err(VmError::Unexpected {
                    vcpu: index,
                    exit: format!("{other:?}"),
                })
            }
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {}
            Err(source) => {
                break Err(VmError::Kvm {
                    what: "KVM_RUN",
                    source,
                })
            }
        }
    };
    lock().flush_console();
    result
}

fn lock_transport(t: &Transport) -> std::sync::MutexGuard<'_, MmioTransport<Device>> {
    t.lock().unwrap_or_else(|e| e.into_inner())
}

/// A guest write to a device window; activation and kicks act on the
/// daemon. A refused write changes nothing and is not reported to the guest.
fn mmio_write(d: &MmioDevice, offset: u64, data: &[u8]) {
    let mut t = lock_transport(&d.transport);
    match t.write(offset, data) {
        Ok(Action::Activate) => {
            let (features, queues) = (t.driver_features(), t.queues().to_vec());
            if let Err(e) = t.device_mut().activate(features, &queues) {
                if let Some(n) = d.failures.count() {
                    tracing::error!(
                        "activating the device at {:#x}: {e} (failure {n}; the next told is the {})",
                        d.base,
                        n * 2
                    );
                }
            }
        }
        Ok(Action::Notify(q)) => {
            // Kicks normally end in the ioeventfd; a write KVM passed up
            // (another width) still reaches the daemon.
            if let Some(k) = t.device().kicks().get(q as usize) {
                let _ = k.write(1);
            }
        }
        Ok(Action::Reset) => t.device_mut().reset(),
        Ok(Action::None) | Err(_) => {}
    }
}

/// Null, null, 64-bit code (0x10, __BOOT_CS), data (0x18, __BOOT_DS).
const GDT_ENTRIES: [u64; 4] = [0, 0, 0x00af_9b00_0000_ffff, 0x00cf_9300_0000_ffff];

/// Flat 4 GiB segments: selector 0x10 code, 0x18 data, 0x20 TSS; 64-bit
/// code when `long`, else 32-bit.
fn flat_segments(sregs: &mut kvm_bindings::kvm_sregs, long: bool) {
    let code = kvm_bindings::kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector: 0x10,
        type_: 0xb,
        present: 1,
        dpl: 0,
        db: u8::from(!long),
        s: 1,
        l: u8::from(long),
        g: 1,
        ..Default::default()
    };
    let data = kvm_bindings::kvm_segment {
        selector: 0x18,
        type_: 0x3,
        db: 1,
        l: 0,
        ..code
    };
    sregs.cs = code;
    for seg in [
        &mut sregs.ds,
        &mut sregs.es,
        &mut sregs.fs,
        &mut sregs.gs,
        &mut sregs.ss,
    ] {
        *seg = data;
    }
    sregs.tr = kvm_bindings::kvm_segment {
        base: 0,
        limit: 0x67,
        selector: 0x20,
        type_: 0xb,
        present: 1,
        s: 0,
        ..Default::default()
    };
}

/// The MSRs Linux expects at boot: SYSCALL/SYSENTER cleared, TSC 0, fast
/// string operations enabled.
fn setup_msrs(vcpu: &VcpuFd) -> Result<(), VmError> {
    const MSR_IA32_SYSENTER_CS: u32 = 0x174;
    const MSR_IA32_SYSENTER_ESP: u32 = 0x175;
    const MSR_IA32_SYSENTER_EIP: u32 = 0x176;
    const MSR_IA32_TSC: u32 = 0x10;
    const MSR_IA32_MISC_ENABLE: u32 = 0x1a0;
    const MSR_STAR: u32 = 0xc000_0081;
    const MSR_LSTAR: u32 = 0xc000_0082;
    const MSR_CSTAR: u32 = 0xc000_0083;
    const MSR_SYSCALL_MASK: u32 = 0xc000_0084;
    const MSR_KERNEL_GS_BASE: u32 = 0xc000_0102;
    let entry = |index, data| kvm_bindings::kvm_msr_entry {
        index,
        data,
        ..Default::default()
    };
    let entries = [
        entry(MSR_IA32_SYSENTER_CS, 0),
        entry(MSR_IA32_SYSENTER_ESP, 0),
        entry(MSR_IA32_SYSENTER_EIP, 0),
        entry(MSR_STAR, 0),
        entry(MSR_CSTAR, 0),
        entry(MSR_KERNEL_GS_BASE, 0),
        entry(MSR_SYSCALL_MASK, 0),
        entry(MSR_LSTAR, 0),
        entry(MSR_IA32_TSC, 0),
        entry(MSR_IA32_MISC_ENABLE, 1),
    ];
    let msrs = kvm_bindings::Msrs::from_entries(&entries).map_err(|e| VmError::Io {
        what: "MSR list",
        source: std::io::Error::other(format!("{e:?}")),
    })?;
    let set = vcpu.set_msrs(&msrs).map_err(kvm_err("set MSRs"))?;
    if set != entries.len() {
        return Err(VmError::Unexpected {
            vcpu: 0,
            exit: format!("KVM set {set} of {} boot MSRs", entries.len()),
        });
    }
    Ok(())
}

/// LINT0 as ExtINT (the PIC's line) and LINT1 as NMI, as firmware leaves
/// them.
fn setup_lapic(vcpu: &VcpuFd) -> Result<(), VmError> {
    const LVT_LINT0: usize = 0x350;
    const LVT_LINT1: usize = 0x360;
    const EXTINT: u32 = 0x700;
    const NMI: u32 = 0x400;
    let mut lapic = vcpu.get_lapic().map_err(kvm_err("read the LAPIC"))?;
    for (offset, mode) in [(LVT_LINT0, EXTINT), (LVT_LINT1, NMI)] {
        let bytes: Vec<u8> = lapic.regs[offset..offset + 4]
            .iter()
            .map(|&b| b as u8)
            .collect();
        let v = u32::from_le_bytes(bytes.try_into().unwrap_or([0; 4]));
        let v = (v & !0x700) | mode;
        for (i, b) in v.to_le_bytes().iter().enumerate() {
            lapic.regs[offset + i] = *b as _;
        }
    }
    vcpu.set_lapic(&lapic).map_err(kvm_err("set the LAPIC"))?;
    Ok(())
}

/// API version and the capabilities husk-vmm relies on.
/// KVM's misc device number (major 10, minor 232: `KVM_MINOR`).
const KVM_DEVICE: (u32, u32) = (10, 232);

/// `file` as KVM, once it shows to be the KVM device: any other descriptor
/// (a file, a tap, another character device) is refused, not ioctl'd.
fn kvm_of(file: std::fs::File) -> Result<Kvm, VmError> {
    use std::os::fd::{FromRawFd, IntoRawFd};
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    let meta = file
        .metadata()
        .map_err(|e| VmError::NotKvm(format!("fstat: {e}")))?;
    let rdev = meta.rdev();
    let dev = (libc::major(rdev), libc::minor(rdev));
    if !meta.file_type().is_char_device() || dev != KVM_DEVICE {
        return Err(VmError::NotKvm(format!(
            "{}device {}:{}",
            if meta.file_type().is_char_device() {
                "character "
            } else {
                "not a character "
            },
            dev.0,
            dev.1
        )));
    }
    // SAFETY: the descriptor is open, is the KVM device, and is given up
    // by `file` to the Kvm that now owns it.
    Ok(unsafe { Kvm::from_raw_fd(file.into_raw_fd()) })
}

fn check_kvm(kvm: &Kvm) -> Result<(), VmError> {
    let v = kvm.get_api_version();
    if v != KVM_API_VERSION {
        return Err(VmError::ApiVersion(v));
    }
    for (cap, name) in REQUIRED_CAPS {
        if !kvm.check_extension(*cap) {
            return Err(VmError::MissingCap(name));
        }
    }
    Ok(())
}

/// Whether this host has a KVM device at all.
pub fn kvm_present() -> bool {
    Path::new("/dev/kvm").exists()
}
