//! husk-vmm: husk's minimal KVM virtual machine monitor, on the rust-vmm
//! crates.
//!
//! Contents: KVM capability checks and VM setup (in-kernel irqchip and
//! PIT, memfd-backed guest memory with the 32-bit MMIO gap), vCPU creation
//! with CPUID from KVM's supported set, the port-I/O bus with the 8250
//! serial console, the i8042 reset line and the CMOS RTC, a run loop with
//! distinct exits, the virtio-mmio transport with vhost-user frontends and
//! husk-vmm's own devices (virtio-net on a tap, virtio-balloon for free
//! page reporting, each on a worker thread), kernel loading (ELF through
//! PVH, bzImage through the 64-bit boot protocol), and the control socket
//! (pause, resume, shutdown, status).

#![deny(unsafe_op_in_unsafe_fn)]

pub mod balloon;
pub mod boot;
pub mod control;
pub mod device_thread;
pub mod devices;
pub mod memory;
pub mod mptable;
pub mod net;
pub mod seccomp;
pub mod vhost_user;
pub mod virtio_mmio;
pub mod vm;

pub use vm::{Exit, Vm, VmError};
