//! Container benchmark through a real containerd: `ctr run --rm` end to end
//! and `ctr task exec` latency, husk against runc in the same run
//! (interleaved, so both see the same machine state), and the host memory of
//! one husk pod (PSS of shim, VMM and vhost-user daemons; the guest RAM they
//! map is reported apart) against runc's shim.
//!
//! `make bench` (or `cargo bench -p husk-tests --bench containers`);
//! HUSK_BENCH_RUNS sets the runs of each kind (default 10).

use std::path::Path;
use std::time::{Duration, Instant};

use husk_tests::bench::{self, median, ms, pss_kib};
use husk_tests::containerd::{run_args, Containerd, NAMESPACE, RUNTIME};
use husk_tests::processes_mentioning;

const RUNC: &str = "io.containerd.runc.v2";

fn timed_ok(ctd: &Containerd, args: &[&str]) -> Duration {
    let t = Instant::now();
    let out = ctd.ctr(args);
    let d = t.elapsed();
    assert!(
        out.status.success(),
        "ctr {args:?}: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        ctd.log()
    );
    d
}

fn run_rm(ctd: &Containerd, runtime: &str, id: &str) -> Duration {
    timed_ok(ctd, &run_args(&["--rm"], runtime, id, &["true"]))
}

fn shim_of(kind: &str, id: &str) -> Vec<u32> {
    let needle = format!("{kind} -namespace husk-e2e -id {id} ");
    processes_mentioning(Path::new(&needle))
}

fn main() {
    let runs = bench::runs();
    let ctd = Containerd::start();
    // Unique names: runc keeps state per namespace outside containerd's dirs.
    let tag = std::process::id();
    let (hx, rx) = (format!("hx{tag}"), format!("rx{tag}"));
    let (hx, rx) = (hx.as_str(), rx.as_str());
    println!("husk container benchmark: {runs} runs each, husk and runc interleaved");
    // Warm-up: page cache, snapshotter, first shim start.
    run_rm(&ctd, RUNTIME, "warm-husk");
    run_rm(&ctd, RUNC, "warm-runc");

    let (mut husk_run, mut runc_run) = (Vec::new(), Vec::new());
    for i in 0..runs {
        husk_run.push(run_rm(&ctd, RUNTIME, &format!("h{i}")));
        runc_run.push(run_rm(&ctd, RUNC, &format!("r{i}")));
    }

    // Exec latency and memory on one detached container of each.
    let sleeper = |runtime: &str, id: &str| {
        timed_ok(&ctd, &run_args(&["-d"], runtime, id, &["sleep", "100000"]))
    };
    sleeper(RUNTIME, hx);
    sleeper(RUNC, rx);
    let (mut husk_exec, mut runc_exec) = (Vec::new(), Vec::new());
    for i in 0..runs {
        for (id, v) in [(hx, &mut husk_exec), (rx, &mut runc_exec)] {
            let e = format!("e{i}");
            v.push(timed_ok(
                &ctd,
                &["task", "exec", "--exec-id", &e, id, "true"],
            ));
        }
    }

    // Settle, then measure memory.
    std::thread::sleep(Duration::from_secs(2));
    let mut husk_procs = shim_of("containerd-shim-husk-v2", hx);
    husk_procs.extend(processes_mentioning(&husk_tests::sandbox_dir(
        NAMESPACE, hx,
    )));
    let mut table = Vec::new();
    let (mut own_total, mut guest_total) = (0, 0);
    for pid in &husk_procs {
        let name = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
        let (own, guest) = pss_kib(*pid);
        own_total += own;
        guest_total += guest;
        table.push((name.trim().to_owned(), own, guest));
    }
    let runc_shim: u64 = shim_of("containerd-shim-runc-v2", rx)
        .iter()
        .map(|p| pss_kib(*p).0)
        .sum();

    for id in [hx, rx] {
        let _ = ctd.ctr(&["task", "kill", "-s", "SIGKILL", id]);
        std::thread::sleep(Duration::from_millis(500));
        let _ = ctd.ctr(&["task", "rm", "-f", id]);
        let _ = ctd.ctr(&["container", "rm", id]);
    }

    let rows = vec![
        (
            "husk: ctr run --rm busybox true".to_owned(),
            husk_run.clone(),
        ),
        (
            "runc: ctr run --rm busybox true".to_owned(),
            runc_run.clone(),
        ),
        ("husk: ctr task exec true".to_owned(), husk_exec.clone()),
        ("runc: ctr task exec true".to_owned(), runc_exec.clone()),
    ];
    bench::print_table("operation", &rows);
    println!();
    println!(
        "ctr run --rm, husk / runc (medians): {:.2}x ({:.1} ms / {:.1} ms)",
        median(&husk_run).as_secs_f64() / median(&runc_run).as_secs_f64(),
        ms(median(&husk_run)),
        ms(median(&runc_run))
    );
    println!(
        "ctr task exec, husk / runc (medians): {:.2}x ({:.1} ms / {:.1} ms)",
        median(&husk_exec).as_secs_f64() / median(&runc_exec).as_secs_f64(),
        ms(median(&husk_exec)),
        ms(median(&runc_exec))
    );
    println!();
    println!(
        "| {:<28} | {:>16} | {:>22} |",
        "husk pod process", "own PSS KiB", "guest RAM PSS KiB"
    );
    println!("|{:-<30}|{:-<18}|{:-<24}|", "", "", "");
    for (name, own, guest) in &table {
        println!("| {name:<28} | {own:>16} | {guest:>22} |");
    }
    println!(
        "| {:<28} | {:>16} | {:>22} |",
        "total", own_total, guest_total
    );
    println!();
    println!(
        "per-pod host memory, husk (shim + VMM + daemons, excluding guest RAM): {:.1} MiB; guest RAM resident: {:.1} MiB; runc shim: {:.1} MiB",
        own_total as f64 / 1024.0,
        guest_total as f64 / 1024.0,
        runc_shim as f64 / 1024.0
    );
}
