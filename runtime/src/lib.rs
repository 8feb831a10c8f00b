//! The husk runtime library, in layers that depend one way:
//! `pod` (the pod API the shim and `husk run` share, spec preparation,
//! volumes, port-forward) on `vm` (the sandbox VM: boot, monitor,
//! daemons, agent client, hypervisor backends) on `host` (paths, storage,
//! cgroups, network, host probing) and `confine` (jail, seccomp, process
//! spawning), all on `config`. docs/architecture.md has the picture.
//!
//! The shim (`containerd-shim-husk-v2`) and the operator CLI (`husk`) are thin
//! layers over this crate.

#![deny(unsafe_op_in_unsafe_fn)]

pub mod config;
pub mod confine;
pub mod host;
pub mod pod;
pub mod vm;

pub use config::Config;
pub use vm::sandbox::{BootTimings, Sandbox};

/// An error and its sources, `outer: inner: ...`, for messages that leave
/// the process (ttrpc statuses, CLI output). A source whose text the
/// message already holds (a `{source}` in a thiserror message, at its end
/// or before more text) is not repeated.
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

#[cfg(test)]
mod tests {
    use std::error::Error;

    #[derive(Debug, thiserror::Error)]
    #[error("no such file")]
    struct Leaf;

    /// Names its source at the end of its message, and has it as source.
    #[derive(Debug, thiserror::Error)]
    #[error("reading /x: {0}")]
    struct Ends(#[source] Leaf);

    /// Names its source before more text, as `SandboxError::Agent` does.
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

    fn chain(e: &(dyn Error + 'static)) -> String {
        super::error_chain(e)
    }

    #[test]
    fn error_chain_names_every_cause_once() {
        assert_eq!(chain(&Leaf), "no such file");
        // The source's text is the message's end: not repeated.
        assert_eq!(chain(&Ends(Leaf)), "reading /x: no such file");
        // In the middle of the message: not repeated after it either.
        let middle = Middle { source: Ends(Leaf) };
        assert_eq!(
            chain(&middle),
            "agent: reading /x: no such file\n--- console ---\nboot noise"
        );
        // A silent outer error: its cause follows it, once.
        assert_eq!(
            chain(&Silent(Middle { source: Ends(Leaf) })),
            "starting the sandbox: agent: reading /x: no such file\n--- console ---\nboot noise"
        );
        let outer = anyhow::Error::new(std::io::Error::other("no such file")).context("reading /y");
        assert_eq!(chain(outer.as_ref()), "reading /y: no such file");
        let e = crate::host::storage::StorageError::BindSource("rel".into());
        assert_eq!(
            chain(&e),
            "bind mount source \"rel\" is not an absolute host path"
        );
    }
}
