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
pub const PROTOCOL_VERSION: u32 = 1;
