//! husk-sys: the host-side system helpers that the runtime and husk-vmm
//! both use, so that neither depends on the other: opening a tap, the
//! guest's bounded console log, and seccomp allowlist filters.

#![deny(unsafe_op_in_unsafe_fn)]

pub mod console;
pub mod seccomp;
pub mod tap;
