//! CRI port-forward for a VM pod. containerd serves PortForward by dialing
//! `localhost:<port>` inside the pod's host network namespace, where a VM
//! pod has no listener. husk puts one there: a NAT rule in that namespace
//! redirects TCP to 127.0.0.1 and ::1 to a listener of the shim's, which
//! reads the port the client meant (SO_ORIGINAL_DST), opens a vsock stream
//! to the agent naming the pod and that port, and copies bytes both ways;
//! the agent connects to localhost:<port> in the pod's guest namespace (see
//! agent/src/forward.rs). Servers bound only to the guest's localhost are
//! reached, as on a runc node.
//!
//! The rules go through `iptables`/`ip6tables` run inside the namespace,
//! marked with a comment so `delete` after a crash finds them.

use std::io::{self, Read, Write};
use std::net::{Ipv4Addr, Ipv6Addr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::thread::JoinHandle;
use std::time::Duration;

use husk_protocol::{FORWARD_VSOCK_PORT, MAX_FORWARD_LINE};

use crate::vm::agent::{self, HybridSocket};

/// The comment that marks husk's rules.
const RULE_COMMENT: &str = "husk-port-forward";
/// How long reaching the agent may take per connection.
const AGENT_TIMEOUT: Duration = Duration::from_secs(10);
/// SO_ORIGINAL_DST and IP6T_SO_ORIGINAL_DST.
const SO_ORIGINAL_DST: libc::c_int = 80;

#[derive(Debug, thiserror::Error)]
pub enum ForwardError {
    #[error("network namespace {}", path.display())]
    Netns {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("port-forward listener in {}", netns.display())]
    Listen {
        netns: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{tool} in {}: {detail}; port-forward needs iptables (apt-get install iptables)", netns.display())]
    Rule {
        tool: &'static str,
        netns: PathBuf,
        detail: String,
    },
}

/// The two loopback families, with their iptables tool and address.
#[derive(Clone, Copy, Debug)]
enum Family {
    V4,
    V6,
}

impl Family {
    fn tool(self) -> &'static str {
        match self {
            Family::V4 => "iptables",
            Family::V6 => "ip6tables",
        }
    }

    fn loopback(self) -> SocketAddr {
        match self {
            Family::V4 => SocketAddr::from((Ipv4Addr::LOCALHOST, 0)),
            Family::V6 => SocketAddr::from((Ipv6Addr::LOCALHOST, 0)),
        }
    }

    /// The rule (after `-A`/`-D OUTPUT`) that redirects loopback TCP to
    /// `port`.
    fn rule(self, port: u16) -> Vec<String> {
        let dst = match self {
            Family::V4 => "127.0.0.1/32",
            Family::V6 => "::1/128",
        };
        [
            "-d",
            dst,
            "-p",
            "tcp",
            "-m",
            "comment",
            "--comment",
            RULE_COMMENT,
            "-j",
            "REDIRECT",
            "--to-ports",
        ]
        .iter()
        .map(|s| s.to_string())
        .chain([port.to_string()])
        .collect()
    }
}

/// A pod's port-forward listeners and their NAT rules.
pub struct PortForward {
    netns: PathBuf,
    listeners: Vec<(Family, TcpListener, u16)>,
    threads: Vec<JoinHandle<()>>,
}

/// Runs `f` on a thread of its own inside network namespace `netns`
/// (children it starts are in that namespace too).
fn in_netns<T: Send>(
    netns: &Path,
    f: impl FnOnce() -> Result<T, ForwardError> + Send,
) -> Result<T, ForwardError> {
    let ns_err = |source| ForwardError::Netns {
        path: netns.to_path_buf(),
        source,
    };
    crate::host::network::on_thread_in(netns, ns_err, f)
}

/// The last line `sh` prints: the tool's exit status.
const STATUS_MARK: &str = "husk-status=";

/// Runs `tool` with `args` in the calling thread's namespaces. Through
/// `sh`, which prints the tool's exit status last: in the shim,
/// containerd-shim's SIGCHLD handler reaps every child (waitpid(-1)), so a
/// child's own status can be gone before this thread waits for it.
fn run(tool: &'static str, args: &[String], netns: &Path) -> Result<String, ForwardError> {
    let fail = |detail: String| ForwardError::Rule {
        tool,
        netns: netns.to_path_buf(),
        detail,
    };
    let mut child = Command::new("sh")
        .arg("-c")
        .arg(format!(r#""$@"; echo "{STATUS_MARK}$?""#))
        .arg("sh")
        .arg(tool)
        .args(["-w", "5"])
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| fail(format!("cannot run it: {e}")))?;
    let mut err_pipe = child.stderr.take();
    let stderr = std::thread::spawn(move || {
        let mut s = String::new();
        if let Some(p) = err_pipe.as_mut() {
            let _ = p.read_to_string(&mut s);
        }
        s
    });
    let mut out = String::new();
    if let Some(mut p) = child.stdout.take() {
        let _ = p.read_to_string(&mut out);
    }
    let stderr = stderr.join().unwrap_or_default();
    // The status may already be reaped elsewhere (ECHILD); the line says it.
    let _ = child.wait();
    let (body, status) = match out.trim_end().rsplit_once('\n') {
        Some((body, last)) => (body.to_owned(), last.to_owned()),
        None => (String::new(), out.trim_end().to_owned()),
    };
    match status.strip_prefix(STATUS_MARK) {
        Some("0") => Ok(body),
        Some("127") => Err(fail(format!("not found: {}", stderr.trim()))),
        Some(code) => Err(fail(format!("{args:?} failed ({code}): {}", stderr.trim()))),
        None => Err(fail(format!("no status from sh: {}", stderr.trim()))),
    }
}

fn nat_output(op: &str, rule: Vec<String>) -> Vec<String> {
    ["-t", "nat", op, "OUTPUT"]
        .iter()
        .map(|s| s.to_string())
        .chain(rule)
        .collect()
}

impl PortForward {
    /// Listens on the loopback of `netns` (IPv4, and IPv6 where the
    /// namespace has ::1), redirects loopback TCP there, and forwards each
    /// connection to pod `pod_id`'s agent through `agent_socket`. On error
    /// nothing of it stays.
    pub fn start(
        netns: &Path,
        agent_socket: &HybridSocket,
        pod_id: &str,
    ) -> Result<Self, ForwardError> {
        let listeners = in_netns(netns, || {
            let mut made: Vec<(Family, TcpListener, u16)> = Vec::new();
            for family in [Family::V4, Family::V6] {
                let listener = match TcpListener::bind(family.loopback()) {
                    Ok(l) => l,
                    // A namespace without IPv6 has no ::1 to forward.
                    Err(e) if matches!(family, Family::V6) => {
                        tracing::debug!(netns = %netns.display(), "no IPv6 loopback: {e}");
                        continue;
                    }
                    Err(source) => {
                        remove_rules(&made, netns);
                        return Err(ForwardError::Listen {
                            netns: netns.to_path_buf(),
                            source,
                        });
                    }
                };
                let port = listener
                    .local_addr()
                    .map_err(|source| ForwardError::Listen {
                        netns: netns.to_path_buf(),
                        source,
                    })?
                    .port();
                if let Err(e) = run(family.tool(), &nat_output("-A", family.rule(port)), netns) {
                    remove_rules(&made, netns);
                    return Err(e);
                }
                made.push((family, listener, port));
            }
            Ok(made)
        })?;
        let mut threads = Vec::new();
        for (_, listener, _) in &listeners {
            let listener = listener
                .try_clone()
                .map_err(|source| ForwardError::Listen {
                    netns: netns.to_path_buf(),
                    source,
                })?;
            let socket = agent_socket.clone();
            let pod = pod_id.to_owned();
            threads.push(std::thread::spawn(move || {
                accept_loop(listener, socket, pod)
            }));
        }
        tracing::debug!(netns = %netns.display(), "port-forward listening");
        Ok(Self {
            netns: netns.to_path_buf(),
            listeners,
            threads,
        })
    }

    /// Removes the rules and stops listening (connections being forwarded
    /// end with the VM).
    pub fn stop(self) {
        let PortForward {
            netns,
            listeners,
            threads,
        } = self;
        let removed = in_netns(&netns, || {
            remove_rules(&listeners, &netns);
            Ok(())
        });
        if let Err(e) = removed {
            tracing::warn!("removing port-forward rules: {}", crate::error_chain(&e));
        }
        for (_, l, _) in &listeners {
            // Wakes the blocked accept (EINVAL) so its thread ends.
            let _ = nix::sys::socket::shutdown(l.as_raw_fd(), nix::sys::socket::Shutdown::Both);
        }
        for t in threads {
            let _ = t.join();
        }
    }
}

/// Deletes each listener's rule; failures are logged.
fn remove_rules(made: &[(Family, TcpListener, u16)], netns: &Path) {
    for (family, _, port) in made {
        if let Err(e) = run(family.tool(), &nat_output("-D", family.rule(*port)), netns) {
            tracing::warn!("{}", crate::error_chain(&e));
        }
    }
}

/// Removes every husk port-forward rule of `netns` (`delete` after a shim
/// crash). A namespace that is gone has none.
pub fn cleanup(netns: &Path) -> Result<(), ForwardError> {
    if !netns.exists() {
        return Ok(());
    }
    in_netns(netns, || {
        for family in [Family::V4, Family::V6] {
            let listed = match run(family.tool(), &nat_output("-S", Vec::new()), netns) {
                Ok(l) => l,
                // No IPv6 NAT table in the namespace: nothing of ours.
                Err(_) if matches!(family, Family::V6) => continue,
                Err(e) => return Err(e),
            };
            for line in listed.lines().filter(|l| l.contains(RULE_COMMENT)) {
                let Some(rule) = line.strip_prefix("-A OUTPUT ") else {
                    continue;
                };
                let args: Vec<String> = rule
                    .split_whitespace()
                    .map(|w| w.trim_matches('"').to_owned())
                    .collect();
                run(family.tool(), &nat_output("-D", args), netns)?;
            }
        }
        Ok(())
    })
}

fn accept_loop(listener: TcpListener, agent_socket: HybridSocket, pod: String) {
    loop {
        match listener.accept() {
            Ok((conn, _)) => {
                let socket = agent_socket.clone();
                let pod = pod.clone();
                let _ = std::thread::Builder::new()
                    .name("port-forward".into())
                    .spawn(move || {
                        if let Err(e) = forward(conn, &socket, &pod) {
                            tracing::info!(pod, "port-forward: {e}");
                        }
                    });
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) if e.kind() == io::ErrorKind::ConnectionAborted => {}
            // Shut down by stop().
            Err(_) => return,
        }
    }
}

/// The destination `conn` had before the redirect.
fn original_port(conn: &TcpStream) -> io::Result<u16> {
    let v6 = conn.local_addr()?.is_ipv6();
    // SAFETY: sockaddr_in6 is plain old data; all zeroes is valid.
    let mut addr: libc::sockaddr_in6 = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::sockaddr_in6>() as libc::socklen_t;
    let level = if v6 { libc::SOL_IPV6 } else { libc::SOL_IP };
    // SAFETY: getsockopt writes at most `len` bytes into `addr`, which
    // outlives the call; the kernel writes a sockaddr_in (smaller) or a
    // sockaddr_in6 there, both with the port at the same offset.
    let rc = unsafe {
        libc::getsockopt(
            conn.as_raw_fd(),
            level,
            SO_ORIGINAL_DST,
            (&mut addr as *mut libc::sockaddr_in6).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(u16::from_be(addr.sin6_port))
}

/// Forwards one connection through the agent.
fn forward(conn: TcpStream, agent_socket: &HybridSocket, pod: &str) -> io::Result<()> {
    let port = original_port(&conn)?;
    let mut guest = agent::hybrid_connect(agent_socket, FORWARD_VSOCK_PORT, AGENT_TIMEOUT)
        .map_err(|e| io::Error::other(crate::error_chain(&e)))?;
    guest.write_all(format!("{pod} {port}\n").as_bytes())?;
    let reply = read_reply(&mut guest)?;
    if reply != "OK" {
        let _ = conn.shutdown(Shutdown::Both);
        return Err(io::Error::other(format!(
            "port {port}: the guest said {reply:?}"
        )));
    }
    guest.set_read_timeout(None)?;
    guest.set_write_timeout(None)?;
    copy_both_ways(conn, guest);
    Ok(())
}

/// The agent's reply line, bounded and stripped of control characters
/// (the guest is not trusted).
fn read_reply(guest: &mut UnixStream) -> io::Result<String> {
    let mut line = Vec::with_capacity(MAX_FORWARD_LINE);
    let mut b = [0u8; 1];
    loop {
        if guest.read(&mut b)? == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the guest closed the stream before answering",
            ));
        }
        if b[0] == b'\n' {
            break;
        }
        if line.len() == MAX_FORWARD_LINE {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "the guest's answer is too long",
            ));
        }
        line.push(b[0]);
    }
    Ok(String::from_utf8_lossy(&line)
        .chars()
        .filter(|c| !c.is_control())
        .collect())
}

/// Copies until the guest's side ends. The client's EOF is not passed on:
/// vhost-device-vsock turns a half-close of its Unix socket into the end of
/// the whole stream (seen: the reply never came), so the guest's side stays
/// open until the server closes it (containerd closes its own side a second
/// after one direction ends, as socat does).
fn copy_both_ways(conn: TcpStream, guest: UnixStream) {
    let (Ok(conn_rx), Ok(guest_rx)) = (conn.try_clone(), guest.try_clone()) else {
        return;
    };
    let up = std::thread::spawn(move || {
        let (mut src, mut dst) = (conn_rx, guest);
        let _ = io::copy(&mut src, &mut dst);
        dst
    });
    let (mut src, mut dst) = (guest_rx, conn);
    let _ = io::copy(&mut src, &mut dst);
    let _ = dst.shutdown(Shutdown::Both);
    if let Ok(guest) = up.join() {
        let _ = guest.shutdown(Shutdown::Both);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tools_status_comes_through_sh_whoever_reaps_it() {
        let ns = Path::new("/proc/self/ns/net");
        let echoed = run("echo", &["a".into(), "b".into()], ns).unwrap();
        assert_eq!(echoed, "-w 5 a b");
        let e = run("false", &[], ns).unwrap_err().to_string();
        assert!(e.contains("failed (1)"), "{e}");
        let e = run("husk-no-such-tool", &[], ns).unwrap_err().to_string();
        assert!(
            e.contains("not found") && e.contains("apt-get install iptables"),
            "{e}"
        );
    }

    #[test]
    fn rules_redirect_only_loopback_tcp_and_carry_the_mark() {
        let r = nat_output("-A", Family::V4.rule(4242)).join(" ");
        assert_eq!(
            r,
            "-t nat -A OUTPUT -d 127.0.0.1/32 -p tcp -m comment --comment husk-port-forward -j REDIRECT --to-ports 4242"
        );
        let r6 = Family::V6.rule(7).join(" ");
        assert!(r6.starts_with("-d ::1/128 -p tcp"), "{r6}");
    }
}
