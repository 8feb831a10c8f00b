//! Wire protocol between the husk runtime (host) and husk-agent (guest).
//!
//! Service definitions live in `protos/`; this crate compiles them with
//! ttrpc-codegen. Both sides depend on this crate and nothing else of each
//! other.

include!(concat!(env!("OUT_DIR"), "/generated.rs"));

/// vsock port the agent listens on.
pub const AGENT_VSOCK_PORT: u32 = 1024;

/// Protocol revision. Bumped on any incompatible change to `protos/`; the host
/// refuses an agent that reports another value.
pub const PROTOCOL_VERSION: u32 = 5;

/// Where the guest mounts the virtio-fs share. A container's rootfs is at
/// `<share>/<container_id>/rootfs`, its host bind mounts at
/// `<share>/<container_id>/binds/<n>`.
pub const GUEST_SHARE_DIR: &str = "/run/husk/shared";

/// vsock port on which the agent accepts stdio streams (see containers.proto).
pub const STDIO_VSOCK_PORT: u32 = 1025;

/// vsock port on which the agent accepts port-forward streams: the host
/// sends `<container_id> <port>\n`; the agent connects to 127.0.0.1:<port>
/// (then [::1]:<port>) in that container's network namespace and answers
/// `OK\n` (then the bytes of the TCP connection both ways) or
/// `ERR <reason>\n`.
pub const FORWARD_VSOCK_PORT: u32 = 1026;

/// Longest port-forward header and reply lines either side accepts.
pub const MAX_FORWARD_LINE: usize = MAX_ID_LEN + 16;

/// Longest container or exec id either side accepts.
pub const MAX_ID_LEN: usize = 128;

/// Whether `id` is an acceptable container or exec id: 1 to [`MAX_ID_LEN`]
/// bytes of `[A-Za-z0-9_.-]`, not starting with `.` or `-`. Both sides check:
/// ids become path components in the guest and the host.
pub fn valid_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= MAX_ID_LEN
        && id
            .bytes()
            .next()
            .is_some_and(|b| b.is_ascii_alphanumeric() || b == b'_')
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b))
}

/// Copies `from` into `to` until EOF, with a plain read/write loop.
///
/// Stdio must not go through `std::io::copy`: between a socket and a pipe
/// or FIFO it may use splice(2), which sleeps on the socket while holding the
/// pipe's lock, so the other end closing the pipe hangs in D state.
pub fn copy_plain(
    from: &mut impl std::io::Read,
    to: &mut impl std::io::Write,
) -> std::io::Result<u64> {
    let mut buf = vec![0u8; 64 * 1024];
    let mut total = 0u64;
    loop {
        match from.read(&mut buf) {
            Ok(0) => return Ok(total),
            Ok(n) => {
                to.write_all(&buf[..n])?;
                total += n as u64;
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
}

/// One stdio stream of a process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StreamKind {
    Stdin,
    Stdout,
    Stderr,
}

impl StreamKind {
    pub fn as_str(self) -> &'static str {
        match self {
            StreamKind::Stdin => "stdin",
            StreamKind::Stdout => "stdout",
            StreamKind::Stderr => "stderr",
        }
    }
}

/// Header that introduces a stdio stream connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamHeader {
    pub container_id: String,
    /// `None` for the container's init process.
    pub exec_id: Option<String>,
    pub kind: StreamKind,
}

/// Longest header line accepted, newline included.
pub const MAX_HEADER_LEN: usize = 2 * MAX_ID_LEN + 16;

impl StreamHeader {
    /// The header line, newline included.
    pub fn encode(&self) -> String {
        format!(
            "{} {} {}\n",
            self.container_id,
            self.exec_id.as_deref().unwrap_or("-"),
            self.kind.as_str()
        )
    }

    /// Parses a header line (without its newline), strictly.
    pub fn parse(line: &str) -> Option<Self> {
        let mut parts = line.split(' ');
        let (cid, exec, kind) = (parts.next()?, parts.next()?, parts.next()?);
        if parts.next().is_some() || !valid_id(cid) {
            return None;
        }
        let exec_id = match exec {
            "-" => None,
            e if valid_id(e) => Some(e.to_owned()),
            _ => return None,
        };
        let kind = match kind {
            "stdin" => StreamKind::Stdin,
            "stdout" => StreamKind::Stdout,
            "stderr" => StreamKind::Stderr,
            _ => return None,
        };
        Some(Self {
            container_id: cid.to_owned(),
            exec_id,
            kind,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_round_trips() {
        for h in [
            StreamHeader {
                container_id: "c1".into(),
                exec_id: None,
                kind: StreamKind::Stdout,
            },
            StreamHeader {
                container_id: "c1".into(),
                exec_id: Some("e.2".into()),
                kind: StreamKind::Stdin,
            },
        ] {
            let line = h.encode();
            assert_eq!(StreamHeader::parse(line.trim_end_matches('\n')), Some(h));
        }
    }

    #[test]
    fn bad_headers_are_refused() {
        for bad in [
            "",
            "c1",
            "c1 -",
            "c1 - stdout extra",
            "../x - stdout",
            "c1 - stdlog",
            "c1 a/b stderr",
            "c1  stdout",
        ] {
            assert_eq!(StreamHeader::parse(bad), None, "{bad:?}");
        }
        assert!(!valid_id(&"a".repeat(MAX_ID_LEN + 1)));
        assert!(!valid_id("-a") && !valid_id(".a") && valid_id("_a"));
    }
}
