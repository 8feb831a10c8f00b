//! Fast KVM tests on the host's /dev/kvm (PVM here, hardware KVM elsewhere):
//! VM, memory slots, irqchip and vCPU setup, and tiny guests written here
//! that print through the serial port and ask for reset, checked end to end.

use std::io::Write;
use std::sync::{Arc, Mutex};

use husk_vmm::boot::BootEntry;
use husk_vmm::control::{ControlSocket, RunState};
use husk_vmm::vm::{kvm_present, VmConfig};
use husk_vmm::{Exit, Vm, VmError};

/// Called first by each test that needs KVM. They are `#[ignore]`d, so a plain
/// `cargo test` counts them as skipped; `make test` runs them with
/// `--include-ignored`, where a missing /dev/kvm fails the test.
fn kvm_available() {
    assert!(kvm_present(), "/dev/kvm is missing");
}

#[derive(Clone, Default)]
struct Console(Arc<Mutex<Vec<u8>>>);

impl Write for Console {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn new_vm(vcpus: u8) -> (Vm, Console) {
    let console = Console::default();
    let vm = Vm::new(VmConfig {
        memory_mib: 64,
        vcpus,
        console: Box::new(console.clone()),
        kvm: None,
    })
    .expect("create VM");
    (vm, console)
}

/// 64-bit code: print `text` on COM1, then `tail`.
fn printer(text: &[u8], tail: &[u8]) -> Vec<u8> {
    let mut code = vec![0x66, 0xba, 0xf8, 0x03]; // mov dx, 0x3f8
    for &c in text {
        code.extend_from_slice(&[0xb0, c, 0xee]); // mov al, c; out dx, al
    }
    code.extend_from_slice(tail);
    code
}

/// Runs vCPU 0 on another thread; a guest that never comes back fails the
/// test instead of hanging it.
fn run(vm: Vm) -> (Vm, Result<Exit, VmError>) {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut vm = vm;
        let r = vm.run_vcpu(0);
        let _ = tx.send((vm, r));
    });
    rx.recv_timeout(std::time::Duration::from_secs(20))
        .expect("the guest did not exit within 20 s")
}

/// mov al, 0xfe; out 0x64, al; hlt
const RESET: &[u8] = &[0xb0, 0xfe, 0xe6, 0x64, 0xf4];

#[test]
#[ignore = "needs /dev/kvm (make test)"]
fn a_tiny_guest_prints_on_the_serial_port_and_resets() {
    kvm_available();
    let (mut vm, console) = new_vm(2);
    assert!(vm.vcpu(1).is_some(), "two vCPUs");
    vm.load_long_mode(0, 0x1000, &printer(b"hello from husk-vmm\n", RESET))
        .expect("load");
    let (_vm, exit) = run(vm);
    assert_eq!(exit.expect("run"), Exit::Reset);
    assert_eq!(
        String::from_utf8_lossy(&console.0.lock().unwrap()),
        "hello from husk-vmm\n"
    );
}

/// `--kvm-fd`: a VM on a /dev/kvm its caller opened runs as one on the
/// node; any other descriptor is refused before an ioctl reaches it.
#[test]
#[ignore = "needs /dev/kvm (make test)"]
fn a_vm_runs_on_a_kvm_descriptor_from_its_caller_and_no_other_is_taken() {
    kvm_available();
    let console = Console::default();
    let config = |kvm: std::fs::File| VmConfig {
        memory_mib: 64,
        vcpus: 1,
        console: Box::new(console.clone()),
        kvm: Some(kvm),
    };
    let open = |p: &str| {
        std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(p)
            .unwrap_or_else(|e| panic!("{p}: {e}"))
    };
    let mut vm = Vm::new(config(open("/dev/kvm"))).expect("a VM on the given descriptor");
    vm.load_long_mode(0, 0x1000, &printer(b"on a given fd\n", RESET))
        .expect("load");
    assert_eq!(run(vm).1.expect("run"), Exit::Reset);
    assert_eq!(
        String::from_utf8_lossy(&console.0.lock().unwrap()),
        "on a given fd\n"
    );
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("not-kvm");
    std::fs::write(&file, b"").expect("write");
    for (what, f) in [
        ("/dev/null", open("/dev/null")),
        ("a plain file", open(file.to_str().expect("utf-8"))),
    ] {
        match Vm::new(config(f)) {
            Err(e @ VmError::NotKvm(_)) => {
                assert!(e.to_string().contains("not /dev/kvm"), "{what}: {e}")
            }
            Err(e) => panic!("{what}: refused for another reason: {e}"),
            Ok(_) => panic!("{what} taken as KVM"),
        }
    }
}

#[test]
#[ignore = "needs /dev/kvm (make test)"]
fn a_guest_that_triple_faults_is_told_apart_from_reset() {
    kvm_available();
    // lidt of an empty table, then int3: no handler, double, triple fault.
    let (mut vm, _) = new_vm(1);
    let code = [
        0x0f, 0x01, 0x1c, 0x25, 0x00, 0x20, 0x00, 0x00, // lidt [0x2000] (zeroed: limit 0)
        0xcc, // int3
        0xf4,
    ];
    vm.load_long_mode(0, 0x1000, &code).expect("load");
    // Hardware KVM reports KVM_EXIT_SHUTDOWN; PVM an internal error. Either
    // way it is a crash, never the reset that means power-off.
    match run(vm).1 {
        Ok(Exit::Shutdown) | Err(VmError::Internal { vcpu: 0 }) => {}
        other => panic!("a triple fault ended as {other:?}"),
    }
}

#[test]
#[ignore = "needs /dev/kvm (make test)"]
fn bad_memory_sizes_and_vcpu_counts_are_refused_by_name() {
    kvm_available();
    let config = |memory_mib, vcpus| VmConfig {
        memory_mib,
        vcpus,
        console: Box::new(std::io::sink()),
        kvm: None,
    };
    let e = Vm::new(config(8, 1)).err().expect("8 MiB accepted");
    assert!(e.to_string().contains("at least 64 MiB"), "{e}");
    let e = Vm::new(config(64, 0)).err().expect("0 vCPUs accepted");
    assert!(matches!(e, VmError::Vcpus(0)), "{e}");
    // Code that does not fit in guest memory.
    let (mut vm, _) = new_vm(1);
    let e = vm.load_long_mode(0, 64 << 20, &[0xf4]).unwrap_err();
    assert!(e.to_string().contains("does not fit"), "{e}");
}

/// A 2-vCPU VM with our guest `kernel` (from target/guest) loaded and the
/// boot vCPU set up.
fn boot_guest(kernel: &str) -> (Vm, BootEntry) {
    kvm_available();
    let guest = guest_dir();
    let (mut vm, _) = new_vm(2);
    let boot = husk_vmm::boot::load(
        &vm.memory().memory,
        vm.memory().size,
        &guest.join(kernel),
        Some(&guest.join("initramfs.cpio")),
        "console=ttyS0 reboot=t panic=-1",
    )
    .unwrap_or_else(|e| panic!("load {kernel}: {e}"));
    vm.setup_boot(boot)
        .unwrap_or_else(|e| panic!("boot state for {kernel}: {e}"));
    (vm, boot)
}

#[test]
#[ignore = "needs /dev/kvm and a guest image (make test)"]
fn the_guest_kernel_loads_and_the_boot_vcpu_takes_the_pvh_state() {
    let (vm, boot) = boot_guest("vmlinux");
    let BootEntry::Pvh { entry, start_info } = boot else {
        panic!("vmlinux boots through PVH: {boot:?}");
    };
    let vcpu = vm.vcpu(0).expect("vcpu 0");
    let regs = vcpu.get_regs().expect("regs");
    assert_eq!((regs.rip, regs.rbx), (entry, start_info));
    let sregs = vcpu.get_sregs().expect("sregs");
    assert_eq!(sregs.cr0 & 0x8000_0001, 1, "protected mode, paging off");
    assert_eq!(
        (sregs.cs.db, sregs.cs.l, sregs.cs.limit),
        (1, 0, 0xffff_ffff)
    );
    let lapic = vm.vcpu(1).expect("vcpu 1").get_lapic().expect("lapic");
    assert_eq!((lapic.regs[0x351] as u8) & 0x7, 0x7, "LINT0 ExtINT");
    assert_eq!((lapic.regs[0x361] as u8) & 0x7, 0x4, "LINT1 NMI");
}

/// target/guest, built by `make guest-image`.
fn guest_dir() -> std::path::PathBuf {
    let guest = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/guest");
    assert!(
        guest.join("vmlinux").is_file() && guest.join("bzImage").is_file(),
        "{} has no guest kernel: run `make guest-image`",
        guest.display()
    );
    guest
}

#[test]
#[ignore = "needs /dev/kvm and a guest image (make test)"]
fn the_bzimage_loads_and_the_boot_vcpu_takes_the_64_bit_boot_state() {
    let (vm, boot) = boot_guest("bzImage");
    let BootEntry::Linux64 { entry, boot_params } = boot else {
        panic!("a bzImage boots through its 64-bit entry: {boot:?}");
    };
    let vcpu = vm.vcpu(0).expect("vcpu 0");
    let regs = vcpu.get_regs().expect("regs");
    assert_eq!((regs.rip, regs.rsi), (entry, boot_params));
    let sregs = vcpu.get_sregs().expect("sregs");
    assert_eq!(sregs.cr0 & 0x8000_0001, 0x8000_0001, "paging on");
    assert_ne!(sregs.efer & (1 << 10), 0, "long mode active");
    assert_eq!((sregs.cs.selector, sregs.cs.l), (0x10, 1), "__BOOT_CS");
    assert_eq!(sregs.ds.selector, 0x18, "__BOOT_DS");
    // The identity map covers the zero page, the kernel and the initramfs.
    for addr in [boot_params, entry, (64 << 20) - 0x1000] {
        let t = vcpu.translate_gva(addr).expect("translate");
        assert_eq!((t.valid, t.physical_address), (1, addr), "{addr:#x}");
    }
}

/// 64-bit code: print `c` on COM1 forever.
fn chatter(c: u8) -> Vec<u8> {
    // mov dx, 0x3f8; mov al, c; 1: out dx, al; jmp 1b
    vec![0x66, 0xba, 0xf8, 0x03, 0xb0, c, 0xee, 0xeb, 0xfd]
}

#[test]
#[ignore = "needs /dev/kvm (make test)"]
fn the_control_socket_pauses_resumes_and_stops_a_running_guest() {
    kvm_available();
    let (mut vm, console) = new_vm(2);
    vm.load_long_mode(0, 0x1000, &chatter(b'.')).expect("load");
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("api.sock");
    let mut socket = ControlSocket::bind(&path).expect("bind");
    socket.serve(vm.run_state()).expect("serve");
    let ask = |r: &str| husk_vmm::control::request(&path, r).expect("request");
    let printed = || console.0.lock().unwrap().len();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut vm = vm;
        let _ = tx.send(vm.run_vcpu(0));
    });
    let grows = |what: &str| {
        let before = printed();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while printed() == before {
            assert!(std::time::Instant::now() < deadline, "{what}: no output");
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
    };
    grows("running guest");
    assert_eq!(ask("status"), "ok running");
    assert_eq!(ask("pause"), "ok paused");
    let at_pause = printed();
    std::thread::sleep(std::time::Duration::from_millis(300));
    assert_eq!(printed(), at_pause, "the guest printed while paused");
    assert_eq!(ask("status"), "ok paused");
    assert_eq!(ask("resume"), "ok running");
    grows("resumed guest");
    assert!(ask("hibernate").starts_with("error unknown request"));
    assert_eq!(ask("shutdown"), "ok stopping");
    let exit = rx
        .recv_timeout(std::time::Duration::from_secs(10))
        .expect("the vCPU did not leave after shutdown");
    assert_eq!(exit.expect("run"), Exit::Stopped);
    drop(socket);
    assert!(!path.exists(), "the control socket was left behind");
    // A fresh state for another VM is independent of this one.
    assert_eq!(RunState::new().status(), "running");
}

#[test]
#[ignore = "needs /dev/kvm (make test)"]
fn pause_and_shutdown_kick_a_vcpu_that_never_leaves_the_guest() {
    kvm_available();
    // jmp $: no exit to the VMM unless a signal forces one.
    let (mut vm, _) = new_vm(1);
    vm.load_long_mode(0, 0x1000, &[0xeb, 0xfe]).expect("load");
    let state = vm.run_state();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut vm = vm;
        let _ = tx.send(vm.run_vcpu(0));
    });
    // A pause with no vCPU registered yet would pass without kicking one.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while state.vcpu_counts().0 < 1 {
        assert!(
            std::time::Instant::now() < deadline,
            "the vCPU never registered"
        );
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    assert_eq!(state.pause(), Ok(()));
    assert_eq!(state.status(), "paused");
    assert_eq!(
        state.vcpu_counts(),
        (1, 1),
        "the spinning vCPU was not parked"
    );
    assert_eq!(state.resume(), Ok(()));
    std::thread::sleep(std::time::Duration::from_millis(100));
    assert!(rx.try_recv().is_err(), "the vCPU left the guest on its own");
    state.shutdown();
    let exit = rx
        .recv_timeout(std::time::Duration::from_secs(10))
        .expect("the spinning vCPU did not stop");
    assert_eq!(exit.expect("run"), Exit::Stopped);
}

#[test]
#[ignore = "needs /dev/kvm (make test)"]
fn each_vcpu_gets_its_apic_id_the_hypervisor_bit_and_kvm_signature_leaves() {
    kvm_available();
    let kvm = kvm_ioctls::Kvm::new().expect("open /dev/kvm");
    let supported = kvm
        .get_supported_cpuid(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
        .expect("supported CPUID");
    let find = |entries: &[kvm_bindings::kvm_cpuid_entry2], function: u32| {
        entries
            .iter()
            .find(|e| e.function == function && e.index == 0)
            .copied()
    };
    let deadline = kvm.check_extension(kvm_ioctls::Cap::TscDeadlineTimer);
    let (vm, _) = new_vm(2);
    for id in 0..2u32 {
        let cpuid = vm
            .vcpu(id as usize)
            .expect("vcpu")
            .get_cpuid2(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
            .expect("vCPU CPUID");
        let leaf1 = find(cpuid.as_slice(), 1).expect("leaf 1");
        assert_eq!(leaf1.ebx >> 24, id, "initial APIC id of vCPU {id}");
        assert_ne!(leaf1.ecx & (1 << 31), 0, "hypervisor bit");
        assert_eq!(leaf1.ecx & (1 << 24) != 0, deadline, "TSC-deadline bit");
        let sig = find(cpuid.as_slice(), 0x4000_0000);
        assert_eq!(
            sig.map(|e| (e.eax, e.ebx, e.ecx, e.edx)),
            find(supported.as_slice(), 0x4000_0000).map(|e| (e.eax, e.ebx, e.ecx, e.edx)),
            "the hypervisor's signature leaf is KVM's own"
        );
    }
}

/// A minimal bzImage written here: a setup header for the 64-bit boot
/// protocol and, at the 64-bit entry, code that prints "boot:", the first
/// byte of the command line it finds through the zero page in %rsi, a
/// newline, then a dot about every few milliseconds for ever.
fn tiny_bzimage() -> Vec<u8> {
    let mut image = vec![0u8; 1024 + 0x200];
    let put = |image: &mut Vec<u8>, at: usize, bytes: &[u8]| {
        image[at..at + bytes.len()].copy_from_slice(bytes);
    };
    put(&mut image, 0x1f1, &[1]); // setup_sects: the setup part is 2 sectors
    put(&mut image, 0x202, b"HdrS");
    put(&mut image, 0x206, &0x020f_u16.to_le_bytes()); // boot protocol 2.15
    put(&mut image, 0x211, &[1]); // loadflags: LOADED_HIGH
    put(&mut image, 0x214, &0x10_0000_u32.to_le_bytes()); // code32_start
    put(&mut image, 0x22c, &0x7fff_ffff_u32.to_le_bytes()); // initrd_addr_max
    put(&mut image, 0x236, &1_u16.to_le_bytes()); // xloadflags: XLF_KERNEL_64
    put(&mut image, 0x238, &2048_u32.to_le_bytes()); // cmdline_size
    put(&mut image, 0x258, &0x100_0000_u64.to_le_bytes()); // pref_address
    put(&mut image, 0x260, &0x10_0000_u32.to_le_bytes()); // init_size
    let mut code = printer(b"boot:", &[]);
    code.extend_from_slice(&[
        0x8b, 0x86, 0x28, 0x02, 0x00, 0x00, // mov eax, [rsi + 0x228] (cmd_line_ptr)
        0x8a, 0x00, // mov al, [rax]
        0xee, // out dx, al
        0xb0, b'\n', 0xee, // newline
        0xb0, b'.', 0xee, // 1: mov al, '.'; out dx, al
        0xb9, 0x00, 0x00, 0x40, 0x00, // mov ecx, 0x400000
        0xe2, 0xfe, // loop $
        0xeb, 0xf4, // jmp 1b
    ]);
    image.extend_from_slice(&code);
    image
}

#[test]
#[ignore = "needs /dev/kvm (make test)"]
fn the_husk_vmm_binary_boots_a_bzimage_and_obeys_ctl_and_sigterm() {
    kvm_available();
    use std::time::{Duration, Instant};
    let dir = tempfile::tempdir().unwrap();
    let console = dir.path().join("console");
    let api = dir.path().join("vmm.sock");
    let start = |extra: &[&str]| {
        let _ = std::fs::remove_file(&console);
        spawn_vmm(dir.path(), extra)
    };
    let printed = || std::fs::read(&console).map(|c| c.len()).unwrap_or(0);
    let grows = |what: &str| {
        let before = printed();
        let deadline = Instant::now() + Duration::from_secs(10);
        while printed() <= before {
            assert!(
                Instant::now() < deadline,
                "{what}: the guest printed nothing"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    };
    let ctl = |request: &str| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_husk-vmm"))
            .args(["ctl", api.to_str().unwrap(), request])
            .output()
            .expect("husk-vmm ctl");
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    };
    let finish = |child: std::process::Child| {
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let _ = tx.send(child.wait_with_output());
        });
        let out = rx
            .recv_timeout(Duration::from_secs(10))
            .expect("husk-vmm did not end")
            .expect("wait");
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };

    let child = start(&["--vcpus", "2", "--free-page-reporting"]);
    grows("boot");
    let shown = String::from_utf8_lossy(&std::fs::read(&console).unwrap()).into_owned();
    assert!(shown.starts_with("boot:Z\n"), "console: {shown:?}");
    // Every thread is under a filter of its own (one each), the guest
    // running: the calls below (pause, resume, SIGTERM) pass them.
    let threads = seccomp_by_thread(child.id());
    let names: Vec<&str> = threads.iter().map(|(n, _)| n.as_str()).collect();
    for want in [
        "husk-vmm",
        "vcpu0",
        "vcpu1",
        "control",
        "signals",
        "console",
        "virtio-balloon",
    ] {
        assert!(names.contains(&want), "no {want} thread in {names:?}");
    }
    for (name, status) in &threads {
        assert!(
            status.contains("Seccomp:\t2\n") && status.contains("Seccomp_filters:\t1\n"),
            "thread {name}: {status}"
        );
    }
    // The tiny guest has no balloon driver: nothing was given back.
    assert_eq!(ctl("status"), "ok running balloon_discarded_bytes=0");
    assert_eq!(ctl("pause"), "ok paused");
    let at_pause = printed();
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(printed(), at_pause, "the guest printed while paused");
    assert_eq!(ctl("resume"), "ok running");
    grows("resumed");
    // SIGTERM stops the VM cleanly: status 0, the control socket removed.
    // SAFETY: kill(2) on our own child.
    assert_eq!(unsafe { libc::kill(child.id() as i32, libc::SIGTERM) }, 0);
    let (code, stderr) = finish(child);
    assert_eq!(code, Some(0), "{stderr}");
    assert!(stderr.contains("SIGTERM"), "{stderr}");
    assert!(!api.exists(), "the control socket was left behind");

    let child = start(&[]);
    grows("second boot");
    assert_eq!(ctl("status"), "ok running", "no balloon, no counter");
    assert_eq!(ctl("shutdown"), "ok stopping");
    let (code, stderr) = finish(child);
    assert_eq!(code, Some(0), "{stderr}");
    assert!(!api.exists(), "the control socket was left behind");
}

/// Starts the husk-vmm binary on the tiny bzImage (written into `dir`),
/// console into `dir/console`, control socket `dir/vmm.sock`, stderr piped.
fn spawn_vmm(dir: &std::path::Path, extra: &[&str]) -> std::process::Child {
    let kernel = dir.join("bzImage");
    if !kernel.exists() {
        std::fs::write(&kernel, tiny_bzimage()).unwrap();
    }
    let path = |name: &str| dir.join(name).to_str().unwrap().to_owned();
    std::process::Command::new(env!("CARGO_BIN_EXE_husk-vmm"))
        .args(["--kernel", &path("bzImage"), "--cmdline", "Zebra"])
        .args(["--memory-mib", "64", "--console", &path("console")])
        .args(["--api-socket", &path("vmm.sock")])
        .args(extra)
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("start husk-vmm")
}

/// Each thread of `pid`: its name and the seccomp lines of its status.
fn seccomp_by_thread(pid: u32) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for t in std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .flatten()
    {
        let read = |f: &str| std::fs::read_to_string(t.path().join(f)).unwrap_or_default();
        let status: String = read("status")
            .lines()
            .filter(|l| l.starts_with("Seccomp"))
            .map(|l| format!("{l}\n"))
            .collect();
        out.push((read("comm").trim().to_owned(), status));
    }
    out
}

#[test]
#[ignore = "needs /dev/kvm and root for the tap (make test)"]
fn a_call_outside_its_threads_filter_kills_husk_vmm_whichever_thread_makes_it() {
    kvm_available();
    use std::os::unix::process::ExitStatusExt;
    use std::time::Duration;
    // The net thread needs a NIC: a tap husk-vmm makes and that goes with
    // it. The balloon thread enters its filter before the (tiny) guest
    // would activate the device.
    let net = ["--net", "tap=hkseccomp0,mac=02:00:00:00:00:01"];
    let kinds = [
        "vmm", "vcpu", "control", "signals", "console", "net", "balloon",
    ];
    for kind in kinds {
        let dir = tempfile::tempdir().unwrap();
        let mut extra = vec!["--vcpus", "2", "--test-seccomp", kind];
        match kind {
            "net" => extra.extend(net),
            "balloon" => extra.push("--free-page-reporting"),
            _ => {}
        }
        let child = spawn_vmm(dir.path(), &extra);
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let _ = tx.send(child.wait_with_output());
        });
        let out = rx
            .recv_timeout(Duration::from_secs(10))
            .unwrap_or_else(|_| panic!("{kind}: husk-vmm still runs after its forbidden call"))
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.signal(), Some(libc::SIGSYS), "{kind}: {stderr}");
        assert!(stderr.contains("opens a TCP socket"), "{kind}: {stderr}");
        assert!(!stderr.contains("was not stopped"), "{kind}: {stderr}");
    }
    // Told to log instead, the same call goes through and the VM runs on.
    let dir = tempfile::tempdir().unwrap();
    let mut child = spawn_vmm(dir.path(), &["--seccomp-log", "--test-seccomp", "vcpu"]);
    std::thread::sleep(Duration::from_millis(500));
    assert!(child.try_wait().unwrap().is_none(), "it ended");
    child.kill().unwrap();
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("was not stopped"), "{stderr}");
}
