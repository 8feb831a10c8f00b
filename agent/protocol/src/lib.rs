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
pub const PROTOCOL_VERSION: u32 = 7;

/// Where the guest mounts the virtio-fs share. A container's rootfs is at
/// `<share>/<container_id>/rootfs`, its host bind mounts at
/// `<share>/<container_id>/binds/<n>`.
pub const GUEST_SHARE_DIR: &str = "/run/husk/shared";

/// virtio-fs tag the host gives the pod's share; the agent mounts it by
/// this name at [`GUEST_SHARE_DIR`].
pub const SHARE_TAG: &str = "husk";

/// What the agent prints on the guest console, at the start of a line,
/// once it listens on [`AGENT_VSOCK_PORT`]: the host starts connecting when
/// it reads this (before, a connection would only be refused and retried).
pub const READY_MARK: &str = "husk-agent: listening on vsock port";

/// The agent's readiness line (without its newline); the only way the
/// agent writes it, so the host's [`READY_MARK`] cannot drift from it.
pub fn ready_line() -> String {
    format!("{READY_MARK} {AGENT_VSOCK_PORT}")
}

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

/// Longest container, exec or sandbox id either side accepts:
/// containerd's own limit for its identifiers (pkg/identifiers, 76), so
/// every id containerd or CRI hands a runtime fits.
pub const MAX_ID_LEN: usize = 76;

/// An id that may not become a path component or a name.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{kind} id {id:?} is invalid: use 1 to {MAX_ID_LEN} of [A-Za-z0-9_.-], starting with a letter or digit (no '/', no control bytes)")]
pub struct InvalidId {
    /// What the id names: "container", "exec", "sandbox".
    pub kind: &'static str,
    pub id: String,
}

/// Checks a container, exec or sandbox id: 1 to [`MAX_ID_LEN`] bytes of
/// `[A-Za-z0-9_.-]`, the first a letter or digit, so neither `..` nor `/`
/// nor a control byte can reach a path. Host and guest check with this one
/// function: ids become path components on both sides.
pub fn validate_id(kind: &'static str, id: &str) -> Result<(), InvalidId> {
    let ok = !id.is_empty()
        && id.len() <= MAX_ID_LEN
        && id.bytes().next().is_some_and(|b| b.is_ascii_alphanumeric())
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(InvalidId {
            kind,
            id: id.chars().take(2 * MAX_ID_LEN).collect(),
        })
    }
}

/// Whether `id` passes [`validate_id`].
pub fn valid_id(id: &str) -> bool {
    validate_id("", id).is_ok()
}

/// An id type whose values passed [`validate_id`]: parsed once where the
/// id enters (a containerd request, the CLI), trusted as a path component
/// and a name from then on.
macro_rules! id_type {
    ($(#[$doc:meta])* $name:ident, $kind:literal) => {
        $(#[$doc])*
        #[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub struct $name(String);

        impl $name {
            /// Checks `id` with [`validate_id`].
            pub fn parse(id: &str) -> Result<Self, InvalidId> {
                validate_id($kind, id)?;
                Ok(Self(id.to_owned()))
            }

            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl std::ops::Deref for $name {
            type Target = str;
            fn deref(&self) -> &str {
                &self.0
            }
        }

        impl std::borrow::Borrow<str> for $name {
            fn borrow(&self) -> &str {
                &self.0
            }
        }

        impl AsRef<std::path::Path> for $name {
            fn as_ref(&self) -> &std::path::Path {
                self.0.as_ref()
            }
        }

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl std::str::FromStr for $name {
            type Err = InvalidId;
            fn from_str(id: &str) -> Result<Self, InvalidId> {
                Self::parse(id)
            }
        }
    };
}

id_type!(
    /// A sandbox (pod) id: its directory, its shim, its VM.
    SandboxId,
    "sandbox"
);
id_type!(
    /// A container id.
    ContainerId,
    "container"
);
id_type!(
    /// An exec id (a process added to a running container).
    ExecId,
    "exec"
);

/// A container that is its own pod (a CRI sandbox's pause container, a
/// plain `ctr run` container) names the pod: the rule is the same.
impl From<&ContainerId> for SandboxId {
    fn from(id: &ContainerId) -> SandboxId {
        SandboxId(id.0.clone())
    }
}

/// An error and its sources, `outer: inner: ...`, for messages that leave
/// the process (ttrpc statuses, CLI output): the agent's errors reach the
/// host as this text, whole. A source whose text the message already holds
/// (a `{source}` in a thiserror message, at its end or before more text)
/// is not repeated.
pub fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(inner) = cur {
        let text = inner.to_string();
        if !s.contains(&text) {
            s.push_str(": ");
            s.push_str(&text);
        }
        cur = inner.source();
    }
    s
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
    fn the_ready_line_is_one_line_that_starts_with_the_mark_and_names_the_port() {
        let line = ready_line();
        assert!(line.starts_with(READY_MARK), "{line}");
        assert!(line.ends_with(&format!(" {AGENT_VSOCK_PORT}")), "{line}");
        assert!(!line.contains('\n'), "{line:?}");
    }

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
    }

    #[derive(Debug, thiserror::Error)]
    #[error("no such file")]
    struct Leaf;

    /// Names its source at the end of its message, and has it as source.
    #[derive(Debug, thiserror::Error)]
    #[error("reading /x: {0}")]
    struct Ends(#[source] Leaf);

    /// Names its source before more text, as the runtime's
    /// `SandboxError::Agent` does.
    #[derive(Debug, thiserror::Error)]
    #[error("agent: {source}\n--- console ---\nboot noise")]
    struct Middle {
        #[source]
        source: Ends,
    }

    /// Does not name its source.
    #[derive(Debug, thiserror::Error)]
    #[error("starting the sandbox")]
    struct Silent(#[source] Middle);

    #[test]
    fn error_chain_names_every_cause_once() {
        assert_eq!(error_chain(&Leaf), "no such file");
        // The source's text is the message's end: not repeated.
        assert_eq!(error_chain(&Ends(Leaf)), "reading /x: no such file");
        // In the middle of the message: not repeated after it either.
        let middle = Middle { source: Ends(Leaf) };
        assert_eq!(
            error_chain(&middle),
            "agent: reading /x: no such file\n--- console ---\nboot noise"
        );
        // A silent outer error: its cause follows it, once.
        assert_eq!(
            error_chain(&Silent(Middle { source: Ends(Leaf) })),
            "starting the sandbox: agent: reading /x: no such file\n--- console ---\nboot noise"
        );
    }

    #[test]
    fn typed_ids_are_parsed_by_the_one_rule_and_name_their_kind() {
        assert_eq!(ContainerId::parse("c-1").unwrap().as_str(), "c-1");
        let e = ContainerId::parse("../x").unwrap_err().to_string();
        assert!(e.starts_with("container id \"../x\""), "{e}");
        let e = ExecId::parse("").unwrap_err().to_string();
        assert!(e.starts_with("exec id \"\""), "{e}");
        let e = "a/b".parse::<SandboxId>().unwrap_err().to_string();
        assert!(e.starts_with("sandbox id "), "{e}");
        let c = ContainerId::parse("pod1").unwrap();
        assert_eq!(SandboxId::from(&c).as_str(), "pod1");
        let mut m = std::collections::HashMap::new();
        m.insert(c, 1);
        assert_eq!(m.get("pod1"), Some(&1), "looked up by str");
    }

    #[test]
    fn ids_are_checked_by_one_rule_that_names_the_id() {
        for ok in [
            "a",
            "pod-1",
            "0f3a9c",
            "x.y_z",
            "a..b",
            &"a".repeat(MAX_ID_LEN),
        ] {
            assert_eq!(validate_id("container", ok), Ok(()), "{ok}");
        }
        for bad in [
            "",
            ".",
            "..",
            "../escape",
            "a/b",
            "/abs",
            "-a",
            ".a",
            "_a",
            "a b",
            "a\nb",
            "a\u{7f}",
            "\u{e9}t\u{e9}",
            &"a".repeat(MAX_ID_LEN + 1),
        ] {
            let e = validate_id("container", bad).expect_err(bad);
            let msg = e.to_string();
            assert!(msg.starts_with("container id "), "{msg}");
            assert!(msg.contains(&format!("{bad:?}")), "{msg} names {bad:?}");
        }
    }
}
