//! The host side of a sandbox: every path of its state directory (pure
//! data), the storage it mounts and shares (rootfs, binds, the share
//! root), its cgroup and what it charged, the pod network carried into the VM (taps, the
//! redirect, the copy of the namespace's state), and what this host can
//! run (`probe`); and husk's entry in containerd's config
//! (`containerd_config`). Talks to the kernel, never to the guest.

pub mod accounting;
pub mod cgroup;
pub mod containerd_config;
pub mod network;
pub mod paths;
pub mod probe;
pub mod storage;
