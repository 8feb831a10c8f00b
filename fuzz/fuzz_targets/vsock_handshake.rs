//! The hybrid vsock handshake's reply (`OK <port>\n`) as vhost-device-vsock
//! would send it, from a daemon that may be confused or a guest that races
//! it. A connection is taken only on a strict `OK <digits>` line, and every
//! byte after the newline is left for the stream.

#![no_main]

use std::io::{Read, Write};
use std::os::unix::net::UnixListener;
use std::sync::mpsc::{channel, Sender};
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use husk_runtime::vm::agent::{hybrid_connect, HybridSocket};
use libfuzzer_sys::fuzz_target;

/// A listener that answers each connection with the next reply it is given
/// and then closes it; this process serves it, as the peer check wants.
fn daemon() -> &'static (HybridSocket, Mutex<Sender<Vec<u8>>>) {
    static DAEMON: OnceLock<(HybridSocket, Mutex<Sender<Vec<u8>>>)> = OnceLock::new();
    DAEMON.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("husk-fuzz-vsock-{}", std::process::id()));
        let _ = std::fs::create_dir_all(&dir);
        let path = dir.join("vsock.sock");
        let _ = std::fs::remove_file(&path);
        let listener = UnixListener::bind(&path).expect("bind");
        let (tx, rx) = channel::<Vec<u8>>();
        std::thread::spawn(move || {
            for reply in rx {
                let Ok((mut s, _)) = listener.accept() else {
                    return;
                };
                let mut connect = [0u8; 64];
                let _ = s.read(&mut connect);
                let _ = s.write_all(&reply);
            }
        });
        let socket = HybridSocket {
            path,
            server_pid: std::process::id(),
        };
        (socket, Mutex::new(tx))
    })
}

fuzz_target!(|data: &[u8]| {
    let (socket, tx) = daemon();
    tx.lock().unwrap().send(data.to_vec()).expect("daemon");
    let result = hybrid_connect(socket, 1024, Duration::from_secs(5));
    let line_end = data.iter().position(|&b| b == b'\n');
    match result {
        Ok(mut stream) => {
            let end = line_end.expect("taken without a newline");
            let line = std::str::from_utf8(&data[..end]).expect("taken a non-UTF-8 line");
            let port = line.strip_prefix("OK ").expect("taken without OK");
            assert!(
                !port.is_empty() && port.bytes().all(|b| b.is_ascii_digit()),
                "taken {line:?}"
            );
            let mut rest = Vec::new();
            stream.read_to_end(&mut rest).expect("read the stream");
            assert_eq!(rest, &data[end + 1..], "bytes after the reply were lost");
        }
        Err(_) => {
            if let Some(end) = line_end {
                let strict = std::str::from_utf8(&data[..end])
                    .ok()
                    .and_then(|l| l.strip_prefix("OK "))
                    .is_some_and(|p| {
                        !p.is_empty()
                            && p.bytes().all(|b| b.is_ascii_digit())
                            && p.parse::<u32>().is_ok()
                            && end <= 32
                    });
                // 32 bytes: the longest reply line husk reads.
                assert!(!strict, "refused a good reply {:?}", &data[..end]);
            }
        }
    }
});
