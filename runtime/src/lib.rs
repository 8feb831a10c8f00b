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

/// An error and its sources, one cause after another (shared with the
/// agent, whose errors reach the host as this text).
pub use husk_protocol::error_chain;

#[cfg(test)]
mod tests {
    use std::error::Error;

    fn chain(e: &(dyn Error + 'static)) -> String {
        super::error_chain(e)
    }

    #[test]
    fn error_chain_reads_the_runtimes_errors_and_anyhows() {
        let outer = anyhow::Error::new(std::io::Error::other("no such file")).context("reading /y");
        assert_eq!(chain(outer.as_ref()), "reading /y: no such file");
        let e = crate::host::storage::StorageError::BindSource("rel".into());
        assert_eq!(
            chain(&e),
            "bind mount source \"rel\" is not an absolute host path"
        );
    }
}
