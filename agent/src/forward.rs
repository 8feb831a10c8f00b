//! CRI port-forward, guest side: the host opens a vsock stream per
//! forwarded TCP connection and names a container and a port; the agent
//! connects to that port on the loopback of the container's network
//! namespace (127.0.0.1, then ::1) and copies bytes both ways. A server
//! bound to localhost only is reached, as `kubectl port-forward` reaches
//! it on a runc node.

use std::fs::File;
use std::io::{self, Read, Write};
use std::net::{Ipv4Addr, Ipv6Addr, Shutdown, SocketAddr, TcpStream};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::time::Duration;

use husk_protocol::{valid_id, FORWARD_VSOCK_PORT, MAX_FORWARD_LINE};

use crate::containers::Manager;

/// How long connecting to the guest server may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long the host may take to send its header.
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);

/// Listens on [`FORWARD_VSOCK_PORT`] and serves each stream on a thread.
pub fn listen(manager: Arc<Manager>) -> nix::Result<()> {
    crate::stdio::serve_vsock(FORWARD_VSOCK_PORT, "forward", move |conn| {
        serve(&manager, UnixStream::from(conn))
    })
}

/// One forwarded connection. (A vsock stream is handled through the
/// UnixStream type only for its Read/Write/shutdown, which are plain
/// socket calls.)
fn serve(manager: &Manager, mut host: UnixStream) {
    let target = read_header(&mut host).and_then(|(id, port)| {
        let pid = manager
            .running_init(&id)
            .map_err(|e| io::Error::new(io::ErrorKind::NotFound, e.to_string()))?;
        connect_in_netns(pid, port)
    });
    let server = match target {
        Ok(s) => s,
        Err(e) => {
            let reason: String = e
                .to_string()
                .chars()
                .filter(|c| !c.is_control())
                .take(MAX_FORWARD_LINE - 5)
                .collect();
            let _ = host.write_all(format!("ERR {reason}\n").as_bytes());
            return;
        }
    };
    if host.write_all(b"OK\n").is_err() {
        return;
    }
    let _ = host.set_read_timeout(None);
    copy_both_ways(host, server);
}

/// `<container id> <port>\n`, read byte by byte (what follows belongs to
/// the connection).
fn read_header(host: &mut UnixStream) -> io::Result<(String, u16)> {
    host.set_read_timeout(Some(HEADER_TIMEOUT))?;
    let mut line = Vec::with_capacity(MAX_FORWARD_LINE);
    let mut b = [0u8; 1];
    loop {
        if host.read(&mut b)? == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "header cut short",
            ));
        }
        if b[0] == b'\n' {
            break;
        }
        if line.len() == MAX_FORWARD_LINE {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "header too long",
            ));
        }
        line.push(b[0]);
    }
    parse_header(&line)
}

fn parse_header(line: &[u8]) -> io::Result<(String, u16)> {
    let bad = || io::Error::new(io::ErrorKind::InvalidData, "header is not `<id> <port>`");
    let line = std::str::from_utf8(line).map_err(|_| bad())?;
    let (id, port) = line.split_once(' ').ok_or_else(bad)?;
    let port: u16 = port.parse().ok().filter(|p| *p != 0).ok_or_else(bad)?;
    if !valid_id(id) {
        return Err(bad());
    }
    Ok((id.to_owned(), port))
}

/// Connects to `port` on the loopback of process `pid`'s network
/// namespace, IPv4 first, from a thread that enters it (the socket keeps
/// the namespace it was made in).
fn connect_in_netns(pid: i32, port: u16) -> io::Result<TcpStream> {
    let ns = File::open(format!("/proc/{pid}/ns/net"))?;
    std::thread::scope(|s| {
        s.spawn(|| {
            // SAFETY: setns takes a valid namespace fd and a flag; it changes
            // only this thread, which ends when this closure returns.
            if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                return Err(io::Error::last_os_error());
            }
            let v4 = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
            let v6 = SocketAddr::from((Ipv6Addr::LOCALHOST, port));
            TcpStream::connect_timeout(&v4, CONNECT_TIMEOUT).or_else(|e4| {
                TcpStream::connect_timeout(&v6, CONNECT_TIMEOUT).map_err(|e6| {
                    io::Error::new(
                        e4.kind(),
                        format!("nothing answers on localhost:{port}: IPv4 {e4}, IPv6 {e6}"),
                    )
                })
            })
        })
        .join()
        .unwrap_or_else(|_| Err(io::Error::other("the forward thread panicked")))
    })
}

/// Copies until the server's side ends. The host's EOF is passed on to
/// the server as a half-close; the server's end closes the whole vsock
/// stream (the host's vhost-device-vsock passes no half-close on).
fn copy_both_ways(host: UnixStream, server: TcpStream) {
    let (Ok(host_rx), Ok(server_rx)) = (host.try_clone(), server.try_clone()) else {
        return;
    };
    let up = std::thread::spawn(move || {
        let mut src = host_rx;
        let mut dst = server;
        let _ = io::copy(&mut src, &mut dst);
        let _ = dst.shutdown(Shutdown::Write);
    });
    let mut src = server_rx;
    let mut dst = host;
    let _ = io::copy(&mut src, &mut dst);
    let _ = dst.shutdown(Shutdown::Both);
    let _ = src.shutdown(Shutdown::Both);
    let _ = up.join();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_name_a_valid_id_and_a_nonzero_port() {
        assert_eq!(parse_header(b"pod-1 8080").unwrap(), ("pod-1".into(), 8080));
        for bad in [
            &b"pod-1"[..],
            b"pod-1 0",
            b"pod-1 65536",
            b"pod-1 80 81",
            b"../x 80",
            b" 80",
            b"pod-1 -1",
            b"\xff 80",
        ] {
            assert!(parse_header(bad).is_err(), "{bad:?}");
        }
    }
}
