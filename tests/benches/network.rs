//! Pod network benchmark through containerd's CRI and Debian's CNI bridge:
//! husk pods against runc pods on the same bridge, in one run.
//! - TCP throughput pod to pod and host to pod (busybox nc into a sink; the
//!   time from the first byte sent to the sink's close);
//! - round-trip time pod to pod and host to pod (ping, busybox);
//! - pod start on the bridge, husk against runc, and what husk's own
//!   network setup takes of it: the host side (taps, redirects,
//!   port-forward; the shim's log line) and the guest side (the agent's
//!   NIC move and configuration; its console line). (A pod without CNI
//!   cannot be made: containerd's CRI needs a network with an address.)
//!
//! Traffic goes only to pod addresses on the benchmark's own bridge.

use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use husk_tests::bench::{self, median, ms};
use husk_tests::containerd::{bridge_plugin, cni_conflist, Containerd, CRI_NAMESPACE, IMAGE};
use husk_tests::cri::{container, Cri, PodOpts};

/// Bytes per throughput run.
const BYTES: u64 = 128 << 20;
/// The sink's port in a pod.
const SINK_PORT: u16 = 9000;

struct Pod {
    id: String,
    ctr: String,
    ip: IpAddr,
}

fn pod(cri: &Cri, logs: &Path, handler: &str, name: &str) -> Pod {
    let mut opts = PodOpts::new(name, logs);
    opts.handler = handler.to_owned();
    let id = cri.run_pod(&opts).expect("RunPodSandbox");
    let ctr = cri
        .run_container(&id, &opts, container("c", IMAGE, &["sleep", "3600"], false))
        .expect("container");
    let ip = cri
        .pod_status(&id)
        .expect("status")
        .network
        .expect("network")
        .ip
        .parse()
        .expect("pod IP");
    Pod { id, ctr, ip }
}

fn remove(cri: &Cri, p: &Pod) {
    cri.stop_pod(&p.id).expect("StopPodSandbox");
    cri.remove_pod(&p.id).expect("RemovePodSandbox");
}

/// Starts a one-connection sink on [`SINK_PORT`] in `p` that counts what
/// it gets into /tmp/sink.count, and waits until it listens. (Its stdin
/// stays open: busybox nc half-closes on stdin's end, and a client nc
/// stops on that.)
fn sink(cri: &Cri, p: &Pod) {
    cri.sh(
        &p.ctr,
        &format!(
            "rm -f /tmp/sink.count; (sleep 100000 | nc -l -p {SINK_PORT} | wc -c > /tmp/sink.count) > /dev/null 2>&1 </dev/null & \
             for i in $(seq 100); do netstat -ltn | grep -q ':{SINK_PORT} ' && exit 0; sleep 0.05; done; exit 1"
        ),
        60,
    );
}

/// Waits for the sink in `p` to report, and checks that it got [`BYTES`].
fn sink_got_all(cri: &Cri, p: &Pod) {
    let got = cri.sh(
        &p.ctr,
        "for i in $(seq 200); do [ -s /tmp/sink.count ] && break; sleep 0.05; done; cat /tmp/sink.count",
        60,
    );
    assert_eq!(
        got.trim(),
        BYTES.to_string(),
        "bytes the sink in {} got",
        p.id
    );
}

/// Pod `from` sends [`BYTES`] to a sink in `to`; the guest's own clock
/// (/proc/uptime, 10 ms) times it.
fn pod_to_pod(cri: &Cri, from: &Pod, to: &Pod) -> Duration {
    sink(cri, to);
    let blocks = BYTES / 65536;
    let out = cri.sh(
        &from.ctr,
        &format!(
            "a=$(cut -d' ' -f1 /proc/uptime); dd if=/dev/zero bs=65536 count={blocks} 2>/dev/null | nc {} {SINK_PORT}; \
             b=$(cut -d' ' -f1 /proc/uptime); echo $a $b",
            to.ip
        ),
        600,
    );
    let t: Vec<f64> = out
        .split_whitespace()
        .map(|v| v.parse().expect("uptime"))
        .collect();
    sink_got_all(cri, to);
    Duration::from_secs_f64(t[1] - t[0])
}

/// The host sends [`BYTES`] to a sink in `to`: from connect to the sink's
/// close after the last byte.
fn host_to_pod(cri: &Cri, to: &Pod) -> Duration {
    sink(cri, to);
    let chunk = vec![0u8; 1 << 16];
    let t = Instant::now();
    let mut s =
        TcpStream::connect_timeout(&SocketAddr::new(to.ip, SINK_PORT), Duration::from_secs(20))
            .expect("connect to the sink");
    let mut sent = 0;
    while sent < BYTES {
        s.write_all(&chunk).expect("send");
        sent += chunk.len() as u64;
    }
    s.shutdown(std::net::Shutdown::Write).expect("half-close");
    let mut rest = Vec::new();
    let _ = s.read_to_end(&mut rest);
    let took = t.elapsed();
    sink_got_all(cri, to);
    took
}

/// Average round-trip time of `count` pings, from busybox's summary line
/// `round-trip min/avg/max = a/b/c ms`.
fn ping_avg(out: &str) -> Duration {
    let avg: f64 = out
        .lines()
        .find_map(|l| l.split_once(" = ").filter(|_| l.contains("round-trip")))
        .and_then(|(_, v)| v.split('/').nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no round-trip line in {out:?}"));
    Duration::from_secs_f64(avg / 1e3)
}

fn pod_rtt(cri: &Cri, from: &Pod, to: &Pod) -> Duration {
    ping_avg(&cri.sh(&from.ctr, &format!("ping -c 10 -i 0.2 -q {}", to.ip), 120))
}

fn host_rtt(to: &Pod) -> Duration {
    let out = Command::new("busybox")
        .args(["ping", "-c", "10", "-q", &to.ip.to_string()])
        .output()
        .expect("busybox ping");
    ping_avg(&String::from_utf8_lossy(&out.stdout))
}

fn mib_per_s(d: &[Duration]) -> f64 {
    (BYTES as f64 / (1 << 20) as f64) / median(d).as_secs_f64()
}

/// The number after `marker` in the first line of `text` that holds both
/// `scope` and `marker` (`... <marker> 12.3 ms`).
fn ms_after(text: &str, scope: &str, marker: &str) -> Option<Duration> {
    text.lines()
        .filter(|l| l.contains(scope))
        .find_map(|l| l.split_once(marker))
        .and_then(|(_, rest)| rest.split_whitespace().next()?.parse::<f64>().ok())
        .map(|ms| Duration::from_secs_f64(ms / 1e3))
}

/// Pod start to running, `runs` times; for husk pods also the host's and
/// the guest's network setup, from the shim's log line in containerd's log
/// and the agent's line on the guest console.
fn starts(ctd: &Containerd, logs: &Path, handler: &str, runs: usize) -> Starts {
    let cri = ctd.cri();
    let mut s = Starts::default();
    for i in 0..=runs {
        let t = Instant::now();
        let p = pod(&cri, logs, handler, &format!("s-{handler}-{i}"));
        let d = t.elapsed();
        if handler == "husk" {
            let console = std::fs::read_to_string(
                husk_tests::sandbox_dir(CRI_NAMESPACE, &p.id).join("console.log"),
            )
            .unwrap_or_default();
            let host = ms_after(&ctd.log(), &p.id, "host network set up in ");
            let guest = ms_after(&console, "pod network configured", "configured in ");
            if i > 0 {
                s.host.extend(host);
                s.guest.extend(guest);
            }
        }
        remove(&cri, &p);
        // The first warms caches.
        if i > 0 {
            s.total.push(d);
        }
    }
    s
}

#[derive(Default)]
struct Starts {
    total: Vec<Duration>,
    host: Vec<Duration>,
    guest: Vec<Duration>,
}

fn main() {
    let runs = bench::runs().min(5);
    let logs = tempfile::tempdir().expect("log dir");
    println!(
        "husk network benchmark: {runs} runs each, husk and runc pods on one CNI bridge, {} MiB per transfer",
        BYTES >> 20
    );

    let bridge = Containerd::start_with_cni(&cni_conflist(&bridge_plugin(1500, false), ""));
    let cri = bridge.cri();
    let mut table = Vec::new();
    let mut summary = Vec::new();
    for handler in ["husk", "runc"] {
        let a = pod(&cri, logs.path(), handler, &format!("{handler}-a"));
        let b = pod(&cri, logs.path(), handler, &format!("{handler}-b"));
        let p2p: Vec<_> = (0..runs).map(|_| pod_to_pod(&cri, &a, &b)).collect();
        let h2p: Vec<_> = (0..runs).map(|_| host_to_pod(&cri, &b)).collect();
        let rtt_p: Vec<_> = (0..runs).map(|_| pod_rtt(&cri, &a, &b)).collect();
        let rtt_h: Vec<_> = (0..runs).map(|_| host_rtt(&b)).collect();
        summary.push((
            handler,
            mib_per_s(&p2p),
            mib_per_s(&h2p),
            median(&rtt_p),
            median(&rtt_h),
        ));
        table.push((format!("{handler}: {} MiB pod to pod", BYTES >> 20), p2p));
        table.push((format!("{handler}: {} MiB host to pod", BYTES >> 20), h2p));
        table.push((format!("{handler}: ping RTT pod to pod (avg of 10)"), rtt_p));
        table.push((
            format!("{handler}: ping RTT host to pod (avg of 10)"),
            rtt_h,
        ));
        remove(&cri, &a);
        remove(&cri, &b);
    }
    let husk_starts = starts(&bridge, logs.path(), "husk", runs);
    let runc_starts = starts(&bridge, logs.path(), "runc", runs);
    drop(bridge);
    table.push((
        "husk: pod start (RunPodSandbox + container)".into(),
        husk_starts.total.clone(),
    ));
    table.push((
        "runc: pod start (RunPodSandbox + container)".into(),
        runc_starts.total.clone(),
    ));
    table.push((
        "husk: host network setup (taps, redirects, port-forward)".into(),
        husk_starts.host.clone(),
    ));
    table.push((
        "husk: guest network setup (agent: move NIC, addrs, routes)".into(),
        husk_starts.guest.clone(),
    ));
    bench::print_table("pod network, through containerd 1.6 CRI", &table);
    let (h, r) = (&summary[0], &summary[1]);
    println!(
        "throughput pod to pod, husk / runc (medians): {:.2}x ({:.1} / {:.1} MiB/s)",
        h.1 / r.1,
        h.1,
        r.1
    );
    println!(
        "throughput host to pod, husk / runc (medians): {:.2}x ({:.1} / {:.1} MiB/s)",
        h.2 / r.2,
        h.2,
        r.2
    );
    println!(
        "RTT pod to pod, husk / runc (medians): {:.2}x ({:.3} / {:.3} ms)",
        h.3.as_secs_f64() / r.3.as_secs_f64(),
        ms(h.3),
        ms(r.3)
    );
    println!(
        "RTT host to pod, husk / runc (medians): {:.2}x ({:.3} / {:.3} ms)",
        h.4.as_secs_f64() / r.4.as_secs_f64(),
        ms(h.4),
        ms(r.4)
    );
    let med = |v: &[Duration]| {
        if v.is_empty() {
            f64::NAN
        } else {
            ms(median(v))
        }
    };
    println!(
        "pod start with the bridge network, husk / runc (medians): {:.2}x ({:.1} / {:.1} ms); of husk's, network setup: host {:.1} ms + guest {:.1} ms",
        med(&husk_starts.total) / med(&runc_starts.total),
        med(&husk_starts.total),
        med(&runc_starts.total),
        med(&husk_starts.host),
        med(&husk_starts.guest)
    );
}
