//! Every host path of one sandbox, in one place: the state directory
//! `<state_dir>/<namespace>/<sandbox id>` and what lives in it (sockets,
//! logs, the share, each container's rootfs and bind mounts). Nothing else
//! in husk joins names onto a sandbox directory. Pure data, but for the
//! small owner record: what is mounted there is [`crate::host::storage`]'s.
//!
//! The namespace is containerd's (`default`, `k8s.io`, `moby`, ...): the
//! same id in two namespaces is two pods, as runc's shim keeps them
//! (`/run/containerd/runc/<namespace>/<id>`). Pods husk runs without
//! containerd (`husk run`, `husk vm-ping`) live in [`DIRECT_NAMESPACE`],
//! a name containerd cannot give a namespace.

use std::path::{Path, PathBuf};

use husk_protocol::SandboxId;

use crate::config::Config;

/// The namespace of pods husk runs itself, without containerd. containerd
/// namespaces start with a letter or digit, so none is this one.
pub const DIRECT_NAMESPACE: &str = "_husk";

/// Longest unix socket path (`sun_path` less its terminating NUL).
const MAX_SOCKET_PATH: usize = 107;

/// The file in a sandbox directory naming who made it (see
/// [`SandboxPaths::owner`]).
const OWNER_FILE: &str = "owner";

/// The file in a sandbox directory naming the pod it serves and its
/// backend (`crate::pod::inventory::PodRecord`).
pub const POD_RECORD: &str = "pod.json";

#[derive(Debug, thiserror::Error)]
pub enum PathsError {
    #[error(transparent)]
    Id(#[from] husk_protocol::InvalidId),
    #[error("socket path {path} is {len} bytes, over the {MAX_SOCKET_PATH} a unix socket takes; use a shorter state_dir in the husk config, or a shorter containerd namespace or id")]
    TooLong { path: PathBuf, len: usize },
}

/// The file in a task's bundle holding the owner token of the sandbox that
/// serves it.
const BUNDLE_OWNER_FILE: &str = "husk-owner";

/// Records in `bundle` that its task is served by the sandbox whose owner
/// record holds `token`.
pub fn record_bundle_owner(bundle: &Path, token: &str) -> std::io::Result<()> {
    std::fs::write(bundle.join(BUNDLE_OWNER_FILE), token)
}

/// Whether the task of `bundle` belongs to `sandbox`: both hold the same
/// owner token. A task that never got one (its create failed before its
/// sandbox was made, or found another pod's) owns nothing.
pub fn bundle_owns(bundle: &Path, sandbox: &SandboxPaths) -> bool {
    let theirs = std::fs::read_to_string(bundle.join(BUNDLE_OWNER_FILE)).ok();
    match (theirs.as_deref().map(str::trim), sandbox.owner()) {
        (Some(t), Some(o)) => !t.is_empty() && t == o,
        _ => false,
    }
}

/// A fresh owner token: 128 random bits, in hex.
pub fn new_owner_token() -> String {
    let mut bytes = [0u8; 16];
    // SAFETY: getrandom(2) writes at most `bytes.len()` bytes into the
    // buffer, which lives across the call.
    let n = unsafe { libc::getrandom(bytes.as_mut_ptr().cast(), bytes.len(), 0) };
    if n != bytes.len() as isize {
        // Never seen (the pool is seeded long before a shim runs); the time
        // and pid still tell two owners apart.
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        let v = t.as_nanos() ^ ((std::process::id() as u128) << 64);
        bytes = v.to_le_bytes();
    }
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Checks a containerd namespace before it becomes a directory name.
pub fn validate_namespace(namespace: &str) -> Result<(), husk_protocol::InvalidId> {
    if namespace == DIRECT_NAMESPACE {
        return Ok(());
    }
    husk_protocol::validate_id("namespace", namespace)
}

/// The paths of one sandbox.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SandboxPaths {
    root: PathBuf,
}

impl SandboxPaths {
    /// The paths of sandbox `id` of containerd namespace `namespace` under
    /// the configured state directory; both are checked before they become
    /// path components, and the longest socket path must fit.
    pub fn new(config: &Config, namespace: &str, id: &SandboxId) -> Result<Self, PathsError> {
        validate_namespace(namespace)?;
        let paths = Self::at(config.state_dir.join(namespace).join(id));
        let longest = paths.vsock_socket();
        let len = longest.as_os_str().len();
        if len > MAX_SOCKET_PATH {
            return Err(PathsError::TooLong { path: longest, len });
        }
        Ok(paths)
    }

    /// The paths of a sandbox whose state directory is `root`.
    pub fn at(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }

    /// The state directory itself (mode 0700); daemons log here too.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The configured state directory this sandbox's is in
    /// (`<state_dir>/<namespace>/<id>`).
    pub fn state_dir(&self) -> Option<&Path> {
        self.root.parent()?.parent()
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

    /// The console log's older half, which it rotates to.
    pub fn console_log_rotated(&self) -> PathBuf {
        self.root.join("console.log.1")
    }

    /// The pod record (see [`POD_RECORD`]).
    pub fn pod_record(&self) -> PathBuf {
        self.root.join(POD_RECORD)
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

    /// The sandbox's owner record: a token its creator wrote when it made
    /// the directory, and also in the bundle of every task it serves. Only
    /// a task whose bundle holds the same token may remove what is here.
    pub fn owner(&self) -> Option<String> {
        std::fs::read_to_string(self.root.join(OWNER_FILE))
            .ok()
            .map(|s| s.trim().to_owned())
            .filter(|s| !s.is_empty())
    }

    /// Writes the owner record (see [`SandboxPaths::owner`]).
    pub fn record_owner(&self, token: &str) -> std::io::Result<()> {
        std::fs::write(self.root.join(OWNER_FILE), token)
    }

    /// Whether any container still has state in this sandbox.
    pub fn has_containers(&self) -> bool {
        std::fs::read_dir(self.shared()).is_ok_and(|mut d| d.next().is_some())
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
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sid(id: &str) -> SandboxId {
        SandboxId::parse(id).unwrap()
    }

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
            SandboxPaths::new(&cfg, "k8s.io", &sid("p"))
                .expect("valid")
                .root(),
            Path::new("/var/run/h/k8s.io/p")
        );
    }

    #[test]
    fn the_same_id_in_two_namespaces_is_two_sandboxes() {
        let cfg = Config::default();
        let a = SandboxPaths::new(&cfg, "default", &sid("same")).expect("valid");
        let b = SandboxPaths::new(&cfg, "other", &sid("same")).expect("valid");
        let direct = SandboxPaths::new(&cfg, DIRECT_NAMESPACE, &sid("same")).expect("valid");
        assert_ne!(a.root(), b.root());
        assert_ne!(a.root(), direct.root());
        assert_eq!(a.root(), cfg.state_dir.join("default/same"));
    }

    #[test]
    fn namespaces_and_ids_are_checked_and_sockets_must_fit() {
        let cfg = Config::default();
        for ns in ["..", "a/b", "_other", ""] {
            let e = SandboxPaths::new(&cfg, ns, &sid("p")).expect_err("refused");
            assert!(matches!(e, PathsError::Id(_)), "{ns}: {e}");
        }
        // An id is checked as it becomes a SandboxId, before any path.
        assert!(SandboxId::parse("../p").is_err());
        // A CRI id (64 hex characters) in k8s.io fits.
        let cri = "0123456789abcdef".repeat(4);
        assert!(SandboxPaths::new(&cfg, "k8s.io", &sid(&cri)).is_ok());
        // Two of containerd's longest names do not; the error says what to do.
        let long = "a".repeat(husk_protocol::MAX_ID_LEN);
        let e = SandboxPaths::new(&cfg, &long, &sid(&long)).expect_err("too long");
        assert!(matches!(e, PathsError::TooLong { .. }), "{e}");
        assert!(e.to_string().contains("shorter state_dir"), "{e}");
    }

    #[test]
    fn only_a_bundle_with_the_sandboxs_token_owns_it() {
        let dir = tempfile::tempdir().expect("tempdir");
        let sb = SandboxPaths::at(dir.path().join("sb"));
        std::fs::create_dir(sb.root()).expect("mkdir");
        let (mine, theirs, none) = (
            dir.path().join("mine"),
            dir.path().join("theirs"),
            dir.path().join("none"),
        );
        for b in [&mine, &theirs, &none] {
            std::fs::create_dir(b).expect("mkdir");
        }
        let token = new_owner_token();
        assert_eq!(token.len(), 32);
        assert_ne!(token, new_owner_token());
        record_bundle_owner(&mine, &token).expect("write");
        record_bundle_owner(&theirs, &new_owner_token()).expect("write");
        assert!(!bundle_owns(&mine, &sb), "no owner record yet");
        sb.record_owner(&token).expect("write");
        assert_eq!(sb.owner().as_deref(), Some(token.as_str()));
        assert!(bundle_owns(&mine, &sb));
        assert!(!bundle_owns(&theirs, &sb));
        assert!(!bundle_owns(&none, &sb));
    }
}
