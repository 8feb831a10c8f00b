//! The husk runtime library: sandbox lifecycle, hypervisor backends, the
//! vhost-user device daemons, and the client for the guest agent.
//!
//! The shim (`containerd-shim-husk-v2`) and the operator CLI (`husk`) are thin
//! layers over this crate.

#![deny(unsafe_op_in_unsafe_fn)]

pub mod agent;
pub mod config;
pub mod daemons;
pub mod host;
pub mod hypervisor;
pub mod process;
pub mod sandbox;
pub mod storage;

pub use config::Config;
pub use sandbox::{BootTimings, Sandbox};
