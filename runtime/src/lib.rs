//! The husk runtime library: sandbox lifecycle, hypervisor backends, the
//! vhost-user device daemons, and the client for the guest agent.
//!
//! The shim (`containerd-shim-husk-v2`) and the operator CLI (`husk`) are thin
//! layers over this crate.

#![deny(unsafe_op_in_unsafe_fn)]

pub mod agent;
pub mod cgroup;
pub mod config;
pub mod confinement;
pub mod daemons;
pub mod host;
pub mod hypervisor;
pub mod jail;
pub mod monitor;
pub mod network;
pub mod paths;
pub mod pod;
pub mod portforward;
pub mod process;
pub mod sandbox;
pub mod seccomp;
pub mod spec;
pub mod storage;
pub mod volumes;

pub use config::Config;
pub use sandbox::{BootTimings, Sandbox};

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
        let e = crate::storage::StorageError::BindSource("rel".into());
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
