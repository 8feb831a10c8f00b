//! Every host path of one sandbox, in one place: the state directory
//! `<state_dir>/<sandbox id>` and what lives in it (sockets, logs, the
//! share, each container's rootfs and bind mounts). Nothing else in husk
//! joins names onto a sandbox directory.

use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::config::Config;
use crate::pod::{GuestOnlyMounts, PodError};
use crate::storage::{self, MountSpec};

/// The paths of one sandbox.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SandboxPaths {
    root: PathBuf,
}

impl SandboxPaths {
    /// Sandbox `id`'s paths under the configured state directory.
    pub fn new(config: &Config, id: &str) -> Self {
        Self::at(config.state_dir.join(id))
    }

    /// The paths of a sandbox whose state directory is `root`.
    pub fn at(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }

    /// The state directory itself (mode 0700); daemons log here too.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The directory shared into the guest over virtio-fs.
    pub fn shared(&self) -> PathBuf {
        self.root.join("shared")
    }

    /// The directory of the sandbox's sockets: the one place the jailed
    /// daemons and VMM may write to.
    pub fn sockets(&self) -> PathBuf {
        self.root.join("sock")
    }

    /// The (empty) root directory of process `name`'s jail.
    pub fn jail(&self, name: &str) -> PathBuf {
        self.root.join("jail").join(name)
    }

    /// virtiofsd's vhost-user socket.
    pub fn fs_socket(&self) -> PathBuf {
        self.sockets().join("fs.sock")
    }

    /// vhost-device-vsock's vhost-user socket.
    pub fn vsock_socket(&self) -> PathBuf {
        self.sockets().join("vsock.sock")
    }

    /// The hybrid vsock socket the host reaches the agent through.
    pub fn agent_socket(&self) -> PathBuf {
        self.sockets().join("agent.sock")
    }

    pub fn console_log(&self) -> PathBuf {
        self.root.join("console.log")
    }

    pub fn vmm_log(&self) -> PathBuf {
        self.root.join("vmm.log")
    }

    /// The VMM's control socket.
    /// Where the socket the VMM says it runs on is bound, for a moment
    /// (see `hypervisor::ReadySocket`).
    pub fn ready_socket(&self) -> PathBuf {
        self.sockets().join("ready.sock")
    }

    pub fn control_socket(&self) -> PathBuf {
        self.sockets().join("vmm.sock")
    }

    /// Container `id`'s paths in this sandbox.
    pub fn container(&self, id: &str) -> ContainerPaths {
        ContainerPaths {
            share_root: self.shared(),
            rootfs_private: self.root.join("rootfs").join(id),
            share: self.shared().join(id),
            binds_private: self.root.join("binds").join(id),
            guest_binds: Path::new(husk_protocol::GUEST_SHARE_DIR)
                .join(id)
                .join("binds"),
        }
    }

    /// Whether any container still has state in this sandbox.
    pub fn has_containers(&self) -> bool {
        std::fs::read_dir(self.shared()).is_ok_and(|mut d| d.next().is_some())
    }

    /// Unmounts whatever is left below the directory and removes it.
    pub fn remove(&self) {
        storage::unmount_all_under(&self.root);
        if let Err(e) = storage::remove_tree(&self.root) {
            tracing::warn!(dir = %self.root.display(), error = %e, "removing sandbox state");
        }
    }
}

/// Every host path husk keeps for one container of a sandbox.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContainerPaths {
    /// The sandbox's share root (read-only but while husk changes it).
    pub share_root: PathBuf,
    /// containerd's rootfs mounts, host-private.
    pub rootfs_private: PathBuf,
    /// The container's directory in the share (`<share>/<id>`).
    pub share: PathBuf,
    /// Host bind sources, bound here first (host-private).
    pub binds_private: PathBuf,
    /// The same paths as the guest sees them.
    pub guest_binds: PathBuf,
}

impl ContainerPaths {
    pub fn rootfs_shared(&self) -> PathBuf {
        self.share.join("rootfs")
    }

    pub fn binds_shared(&self) -> PathBuf {
        self.share.join("binds")
    }

    /// Mounts the rootfs and shares the spec's host bind mounts, rewriting
    /// their sources to guest paths. On error what was mounted stays for
    /// [`ContainerPaths::release`].
    pub fn attach(
        &self,
        rootfs: &[MountSpec],
        spec: &mut Value,
        guest_only: GuestOnlyMounts,
    ) -> Result<(), PodError> {
        let _writable = storage::ShareWrite::begin(&self.share_root);
        storage::mount_rootfs(rootfs, &self.rootfs_private, &self.rootfs_shared())?;
        storage::share_bind_mounts(
            spec,
            &self.binds_private,
            &self.binds_shared(),
            &self.guest_binds,
        )?;
        guest_only.restore(spec);
        Ok(())
    }

    /// Unmounts and removes everything of this container; the guest must
    /// no longer use it.
    pub fn release(&self) {
        let _writable = storage::ShareWrite::begin(&self.share_root);
        for dir in [&self.share, &self.rootfs_private, &self.binds_private] {
            storage::unmount_all_under(dir);
            if let Err(e) = storage::remove_tree(dir) {
                tracing::warn!(dir = %dir.display(), error = %e, "removing container state");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_path_stays_under_the_sandbox_directory() {
        let sb = SandboxPaths::at("/run/husk/p1");
        for p in [sb.shared(), sb.console_log(), sb.vmm_log(), sb.sockets()] {
            assert_eq!(p.parent(), Some(Path::new("/run/husk/p1")), "{p:?}");
        }
        // The sockets, and nothing else, in the directory the jails may
        // write to.
        for p in [
            sb.fs_socket(),
            sb.vsock_socket(),
            sb.agent_socket(),
            sb.control_socket(),
        ] {
            assert_eq!(p.parent(), Some(sb.sockets().as_path()), "{p:?}");
        }
        assert_eq!(sb.jail("vsock"), Path::new("/run/husk/p1/jail/vsock"));
        let c = sb.container("c1");
        assert_eq!(
            c.rootfs_shared(),
            Path::new("/run/husk/p1/shared/c1/rootfs")
        );
        assert_eq!(c.rootfs_private, Path::new("/run/husk/p1/rootfs/c1"));
        assert_eq!(c.binds_private, Path::new("/run/husk/p1/binds/c1"));
        assert!(c.guest_binds.ends_with("c1/binds"));
        let cfg = Config {
            state_dir: "/var/run/h".into(),
            ..Config::default()
        };
        assert_eq!(
            SandboxPaths::new(&cfg, "p").root(),
            Path::new("/var/run/h/p")
        );
    }
}
