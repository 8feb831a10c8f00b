//! What a hostile agent answers to the host's ttrpc calls: raw bytes, a
//! frame header around any body, or a well-formed response carrying any
//! payload, to calls whose replies the host reads differently (health,
//! version, pids, stats, exit status). Every call must return (an error or
//! a checked value) without a panic.

#![no_main]

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::time::Duration;

use husk_runtime::vm::agent::Agent;
use libfuzzer_sys::fuzz_target;
use protobuf::Message;

/// A ttrpc response frame: length, stream id, type 2 (response), flags.
fn framed(stream: u32, flags: u8, body: &[u8]) -> Vec<u8> {
    let mut f = (body.len() as u32).to_be_bytes().to_vec();
    f.extend(stream.to_be_bytes());
    f.extend([2, flags]);
    f.extend(body);
    f
}

/// Answers the first request on `guest` with what `reply` makes of its
/// stream id, then hangs up.
fn answer(mut guest: UnixStream, reply: impl FnOnce(u32) -> Vec<u8>) {
    let mut header = [0u8; 10];
    if guest.read_exact(&mut header).is_err() {
        return;
    }
    let len = u32::from_be_bytes([header[0], header[1], header[2], header[3]]) as usize;
    let stream = u32::from_be_bytes([header[4], header[5], header[6], header[7]]);
    let mut body = vec![0u8; len.min(1 << 20)];
    if guest.read_exact(&mut body).is_err() {
        return;
    }
    let _ = guest.write_all(&reply(stream));
}

/// Threads of this process now.
fn threads() -> usize {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Threads:"))
                .and_then(|n| n.trim().parse().ok())
        })
        .unwrap_or(0)
}

/// Waits (up to a second) until the threads the ttrpc client started for
/// one input are gone. Without this, LeakSanitizer's check after an input
/// can catch a client thread half way through its exit and report the
/// memory only that thread still held: a leak reported once in a 120 s run,
/// on an input (the empty one) that starts no thread, and not reproducible.
fn settle(baseline: usize) {
    let deadline = std::time::Instant::now() + Duration::from_secs(1);
    while threads() > baseline && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_micros(200));
    }
}

fuzz_target!(|data: &[u8]| {
    static BASELINE: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    let baseline = *BASELINE.get_or_init(threads);
    let [call, shape, flags, body @ ..] = data else {
        return;
    };
    let body = body.to_vec();
    let (shape, flags) = (*shape, *flags);
    let (host, guest) = UnixStream::pair().expect("socketpair");
    let replier = std::thread::spawn(move || {
        answer(guest, |stream| match shape % 3 {
            0 => body,
            1 => framed(stream, flags, &body),
            _ => {
                let mut r = ttrpc::proto::Response::new();
                r.payload = body;
                framed(stream, 0, &r.write_to_bytes().expect("encode"))
            }
        })
    });
    // A short deadline: a reply that never completes costs the fuzzer only
    // this long (the call must still end, with an error).
    let agent = Agent::new(host, Duration::from_millis(25)).expect("client");
    match call % 7 {
        0 => drop(agent.check()),
        1 => drop(agent.version(Duration::from_secs(3600))),
        2 => drop(agent.list_processes("c")),
        3 => drop(agent.container_stats("c")),
        4 => drop(agent.wait_process("c", None)),
        5 => drop(agent.start_container("c")),
        _ => drop(agent.wait_oom("c")),
    }
    drop(agent);
    replier.join().expect("replier");
    settle(baseline);
});
