//! The sandbox VM: booting it as a list of named steps (daemons, VMM,
//! agent), watching it (the liveness monitor), the vhost-user daemons, the
//! agent client, and the hypervisor backends (husk-vmm, QEMU). Uses the
//! host layer for paths, storage and the network, and the confine layer
//! for the processes it starts; knows nothing of pods.

pub mod agent;
pub mod daemons;
pub mod hypervisor;
pub mod monitor;
pub mod sandbox;
