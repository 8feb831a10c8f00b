//! Boot benchmark: husk sandbox boot to agent-ready, phase by phase, against
//! a baseline measured in the same run: bare QEMU microvm booting the same
//! kernel with an /init that reboots at once (no daemons, no vhost-user
//! devices, no agent), timed from spawn to QEMU's exit, to QEMU running the
//! guest (its QMP greeting on the ready socket, as husk's "vmm ready" row)
//! and to the guest's clock starting (as husk's "vmm start" row).
//!
//! `make bench` (or `cargo bench -p husk-tests --bench boot`);
//! HUSK_BENCH_RUNS sets the number of boots of each kind (default 10).

use std::io::{BufRead, BufReader};
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use husk_runtime::host::probe::{self, Backend, ResolvedAccel};
use husk_runtime::vm::hypervisor::{Qemu, ReadySocket};
use husk_runtime::Sandbox;
use husk_tests::bench::{self, median, ms};
use husk_tests::{guest_dir, initramfs_with_init, TestEnv};

fn main() {
    let runs = bench::runs();
    let env = TestEnv::new();
    let (backend, why) = probe::choose_backend(&env.config, &probe::detect_kvm()).expect("backend");
    println!("husk boot benchmark: {runs} boots each; backend {backend} ({why})");

    let mut rows: Vec<(&str, Vec<Duration>)> = [
        "daemons up",
        "vmm spawned",
        "guest kernel to /init",
        "/init to agent listening",
        "agent listening to serving",
        "vmm start (spawned to guest kernel start)",
        "  of which vmm ready (spawned to VMM running the guest)",
        "  of which guest before its clock (vmm ready to kernel start)",
        "connect (agent listening to host connected)",
        "  of which handshake (console line seen to connected)",
        "first rpc",
        "  of which serving to reply (guest clock)",
        "guest boot (vmm ready to agent serving)",
        "host overhead (total - guest boot)",
        "total: boot() to agent ready",
        "shutdown",
    ]
    .into_iter()
    .map(|n| (n, Vec::new()))
    .collect();
    for i in 0..runs {
        let sb = Sandbox::boot(&env.config, &format!("bench{i}")).expect("boot");
        let t = sb.timings().clone();
        let report = sb.shutdown().expect("shutdown");
        let ready = t.vmm_ready.expect("the VMM told when it ran the guest");
        let values = [
            t.daemons,
            t.vmm_spawn,
            t.kernel_to_init,
            t.init_to_listening,
            t.listening_to_serving,
            t.vmm_start,
            ready,
            t.vmm_start.saturating_sub(ready),
            t.connect,
            t.handshake,
            t.first_rpc,
            t.serving_to_reply,
            t.guest_boot(),
            t.host_overhead(),
            t.total,
            report.duration,
        ];
        for (row, v) in rows.iter_mut().zip(values) {
            row.1.push(v);
        }
    }

    // Baseline: the same kernel under bare QEMU; /init prints the guest's
    // clock (CLOCK_BOOTTIME, as the agent's timings) and reboots at once.
    let reboot_init = initramfs_with_init(
        &env,
        "reboot",
        "#include <stdio.h>\n#include <sys/reboot.h>\n#include <time.h>\n#include <unistd.h>\n\
         int main(void) {\n\
           struct timespec t;\n\
           clock_gettime(CLOCK_BOOTTIME, &t);\n\
           printf(\"husk-bench-uptime-ns %lld\\n\", (long long)t.tv_sec * 1000000000LL + t.tv_nsec);\n\
           fflush(stdout);\n\
           reboot(RB_AUTOBOOT);\n\
           for (;;) pause();\n\
         }\n",
    );
    // The baseline runs on what husk ran on: husk-vmm is KVM, so QEMU on
    // KVM is its baseline, never QEMU emulating the CPU.
    let accel = match backend {
        Backend::Qemu {
            accel: ResolvedAccel::Tcg,
        } => "tcg",
        Backend::Qemu {
            accel: ResolvedAccel::Kvm,
        }
        | Backend::HuskVmm => "kvm",
    };
    let mut bare = Vec::new();
    let mut bare_start = Vec::new();
    let mut bare_ready = Vec::new();
    let dir = tempfile::tempdir().expect("temp dir");
    for _ in 0..runs {
        // The same ready socket as husk's QEMU: its QMP greeting marks
        // QEMU running the guest.
        let socket = ReadySocket::new(&dir.path().join("ready.sock")).expect("ready socket");
        let fd = socket.listener_fd();
        let mut qemu = Command::new("qemu-system-x86_64");
        // SAFETY: only fcntl between fork and exec.
        unsafe {
            qemu.pre_exec(move || {
                if libc::fcntl(fd, libc::F_SETFD, 0) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let t = Instant::now();
        let mut qemu = qemu
            .args([
                "-machine",
                &format!("microvm,accel={accel},acpi=off,rtc=on,x-option-roms=off,isa-serial=on"),
                "-cpu",
                if accel == "kvm" { "host" } else { "max" },
                "-m",
                &format!("{}M", env.config.guest.memory_mib),
                "-nodefaults",
                "-no-user-config",
                "-display",
                "none",
                "-no-reboot",
                "-serial",
                "stdio",
                "-kernel",
            ])
            .arg(guest_dir().join("vmlinux"))
            .arg("-initrd")
            .arg(&reboot_init)
            .args([
                "-append",
                "console=ttyS0 panic=-1 quiet reboot=t no_timer_check",
            ])
            .args(Qemu::ready_args(fd))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("run qemu");
        let watch = socket.watch().expect("watch qemu's ready socket");
        // The guest's clock started (the line's arrival less the uptime it
        // reports) after QEMU's own start and the kernel's steps before its
        // clock: what husk's "vmm start" row measures too.
        let mut uptime = None;
        for line in BufReader::new(qemu.stdout.take().expect("piped")).lines() {
            let Ok(line) = line else { break };
            if let Some(ns) = line.trim().strip_prefix("husk-bench-uptime-ns ") {
                let up =
                    Duration::from_nanos(ns.parse().expect("uptime from the baseline's /init"));
                uptime = Some(t.elapsed().saturating_sub(up));
            }
        }
        bare_ready.push(
            watch
                .at()
                .expect("bare QEMU greeted on its ready socket")
                .saturating_duration_since(t),
        );
        let status = qemu.wait().expect("wait for qemu");
        assert!(status.success(), "bare qemu baseline failed: {status}");
        bare.push(t.elapsed());
        bare_start.push(uptime.expect("the baseline's /init printed no uptime"));
    }
    rows.push((
        "baseline: bare QEMU, spawn to running the guest (vmm ready)",
        bare_ready,
    ));
    rows.push((
        "baseline: bare QEMU, spawn to guest kernel start",
        bare_start,
    ));
    rows.push(("baseline: bare QEMU, same kernel, spawn to exit", bare));

    let rows: Vec<(String, Vec<Duration>)> =
        rows.into_iter().map(|(n, v)| (n.to_owned(), v)).collect();
    bench::print_table("phase", &rows);
    let row = |name: &str| {
        rows.iter()
            .find(|r| r.0 == name)
            .map(|r| median(&r.1))
            .unwrap_or_default()
    };
    let husk = row("total: boot() to agent ready");
    let base = row("baseline: bare QEMU, same kernel, spawn to exit");
    println!();
    println!(
        "husk boot to agent ready / bare QEMU boot to exit (medians): {:.2}x ({:.1} ms / {:.1} ms)",
        husk.as_secs_f64() / base.as_secs_f64(),
        ms(husk),
        ms(base)
    );
}
