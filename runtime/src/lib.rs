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
/// the process (ttrpc statuses, CLI output).
pub fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(inner) = cur {
        let text = inner.to_string();
        if !s.ends_with(&text) {
            s.push_str(": ");
            s.push_str(&text);
        }
        cur = inner.source();
    }
    s
}

#[cfg(test)]
mod tests {
    #[test]
    fn error_chain_names_every_cause_once() {
        let io = std::io::Error::new(std::io::ErrorKind::NotFound, "no such file");
        let e = crate::host::storage::StorageError::BindSource("rel".into());
        assert_eq!(
            super::error_chain(&e),
            "bind mount source \"rel\" is not an absolute host path"
        );
        let outer = anyhow::Error::new(io).context("reading /x");
        assert_eq!(
            super::error_chain(outer.as_ref()),
            "reading /x: no such file"
        );
    }
}
