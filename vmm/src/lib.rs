//! husk-vmm: husk's minimal KVM virtual machine monitor, on the rust-vmm
//! crates.
//!
//! Built so far: KVM capability checks and VM setup (in-kernel irqchip and
//! PIT, memfd-backed guest memory with the 32-bit MMIO gap), vCPU creation
//! with CPUID from KVM's supported set, the port-I/O bus with the 8250
//! serial console and the i8042 reset line, a run loop with distinct exits,
//! and the virtio-mmio transport's register state machine. Not built yet:
//! kernel loading, the vhost-user frontends and the control socket.

#![deny(unsafe_op_in_unsafe_fn)]

pub mod boot;
pub mod devices;
pub mod memory;
pub mod mptable;
pub mod vhost_user;
pub mod virtio_mmio;
pub mod vm;

pub use vm::{Exit, Vm, VmError};
