//! Container rootfs on the host: containerd's mounts are mounted in a
//! host-private directory of the sandbox, then bind-mounted into the share.
//! The bind goes through an `O_PATH | O_NOFOLLOW` descriptor of a directory
//! the host has just created, so it never follows a path the guest (which
//! can write the share) could have swapped for a symlink.

use std::ffi::{CString, OsStr};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use nix::dir::Dir;
use nix::errno::Errno;
use nix::fcntl::{openat2, OFlag, OpenHow, ResolveFlag};
use nix::mount::{mount, umount2, MntFlags, MsFlags};
use nix::sys::stat::{mkdirat, Mode};
use nix::unistd::{unlinkat, UnlinkatFlags};
use oci_spec::runtime::{Mount, Spec};

use crate::host::paths::{ContainerPaths, SandboxPaths};

#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    #[error("unsupported rootfs mount type {0:?} (expected overlay or bind)")]
    Unsupported(String),
    #[error("rootfs has {0} mounts; husk supports exactly one")]
    Count(usize),
    #[error("bind mount source {0:?} is not an absolute host path")]
    BindSource(PathBuf),
    #[error("bind mount to {0:?} has no source; give the host path to bind")]
    NoBindSource(PathBuf),
    #[error("{what} {path}")]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("making {target} and the mounts below it nosuid, nodev (read-only if asked); mount_setattr needs Linux 5.12")]
    Attr {
        target: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("mount {fstype} on {target}")]
    Mount {
        fstype: String,
        target: PathBuf,
        #[source]
        source: nix::Error,
    },
}

/// One mount as containerd describes it.
fn io(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> StorageError {
    let path = path.to_path_buf();
    move |source| StorageError::Io { what, path, source }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountSpec {
    pub fstype: String,
    pub source: String,
    pub options: Vec<String>,
}

/// Splits containerd mount options into mount flags and filesystem data.
fn flags_and_data(options: &[String]) -> (MsFlags, String) {
    let mut flags = MsFlags::empty();
    let mut data = Vec::new();
    for o in options {
        match o.as_str() {
            "ro" => flags |= MsFlags::MS_RDONLY,
            "rw" | "defaults" => {}
            "bind" => flags |= MsFlags::MS_BIND,
            "rbind" => flags |= MsFlags::MS_BIND | MsFlags::MS_REC,
            "nosuid" => flags |= MsFlags::MS_NOSUID,
            "nodev" => flags |= MsFlags::MS_NODEV,
            "noexec" => flags |= MsFlags::MS_NOEXEC,
            other => data.push(other),
        }
    }
    (flags, data.join(","))
}

/// Mounts the rootfs into `host_dir` (created) and binds it to
/// `share_target` (created below `share_root`, must not exist yet).
pub fn mount_rootfs(
    mounts: &[MountSpec],
    host_dir: &Path,
    share_root: &Path,
    share_target: &Path,
) -> Result<(), StorageError> {
    let [m] = mounts else {
        return Err(StorageError::Count(mounts.len()));
    };
    std::fs::create_dir_all(host_dir).map_err(io("create", host_dir))?;
    let (flags, data) = flags_and_data(&m.options);
    // What the guest writes here must not become a device or a setuid
    // program for the host.
    let flags = flags | MsFlags::MS_NOSUID | MsFlags::MS_NODEV;
    let data = (!data.is_empty()).then_some(data.as_str());
    match m.fstype.as_str() {
        "overlay" => mount(Some("overlay"), host_dir, Some("overlay"), flags, data),
        "bind" => mount(
            Some(m.source.as_str()),
            host_dir,
            None::<&str>,
            flags | MsFlags::MS_BIND,
            data,
        ),
        other => return Err(StorageError::Unsupported(other.to_owned())),
    }
    .map_err(|source| StorageError::Mount {
        fstype: m.fstype.clone(),
        target: host_dir.to_path_buf(),
        source,
    })?;
    if let Err(e) = bind_into_share(host_dir, share_root, share_target) {
        let _ = umount2(host_dir, MntFlags::MNT_DETACH);
        return Err(e);
    }
    Ok(())
}

fn bind_into_share(
    host_dir: &Path,
    share_root: &Path,
    share_target: &Path,
) -> Result<(), StorageError> {
    bind_via_fd(
        host_dir,
        share_root,
        share_target,
        true,
        MsFlags::MS_REC,
        false,
    )
}

/// Creates `target` below `root` (a directory husk made; `target` must
/// not exist: a directory or an empty file) and binds `source` onto it
/// through an `O_PATH` descriptor. Every path below `root` is resolved
/// with [`Beneath`]: a symlink the guest planted anywhere on the way fails
/// the bind instead of leading it out. The bind and every mount below it
/// are nosuid and nodev, and read-only with `read_only`.
fn bind_via_fd(
    source: &Path,
    root: &Path,
    target: &Path,
    dir: bool,
    extra: MsFlags,
    read_only: bool,
) -> Result<(), StorageError> {
    let made = Beneath::open(root)?.create(target, dir)?;
    let via_fd = PathBuf::from(format!("/proc/self/fd/{}", made.fd.as_raw_fd()));
    let failed = |what: &str| {
        let what = what.to_owned();
        move |source| StorageError::Mount {
            fstype: what,
            target: target.to_path_buf(),
            source,
        }
    };
    mount(
        Some(source),
        &via_fd,
        None::<&str>,
        MsFlags::MS_BIND | extra,
        None::<&str>,
    )
    .map_err(failed("bind"))?;
    // A bind of a shared mount joins its peer group, and unmounting it
    // (husk's cleanup) would then unmount the host's own mounts below the
    // source. As a slave it still receives the host's new mounts
    // (HostToContainer) but sends nothing back. Through a descriptor opened
    // after the bind, by name in the parent held since: if anything
    // replaced the target meanwhile, the open (a symlink) or the mount (not
    // a mount's root) fails.
    let mounted = std::fs::File::from(made.reopen().map_err(io("open", target))?);
    mount(
        None::<&str>,
        &PathBuf::from(format!("/proc/self/fd/{}", mounted.as_raw_fd())),
        None::<&str>,
        MsFlags::MS_SLAVE | MsFlags::MS_REC,
        None::<&str>,
    )
    .map_err(failed("bind (slave)"))?;
    restrict(&mounted, read_only).map_err(|source| StorageError::Attr {
        target: target.to_path_buf(),
        source,
    })
}

/// A directory husk made, held open, below which paths are resolved with
/// openat2(2) `RESOLVE_NO_SYMLINKS | RESOLVE_BENEATH`: never through a
/// symlink, never out of it (Linux 5.6).
struct Beneath {
    root: PathBuf,
    fd: OwnedFd,
}

/// A path [`Beneath::create`] made: its parent and name, and itself.
struct Made {
    parent: OwnedFd,
    name: std::ffi::OsString,
    dir: bool,
    fd: OwnedFd,
}

impl Beneath {
    fn open(root: &Path) -> Result<Self, StorageError> {
        let fd = std::fs::File::options()
            .read(true)
            .custom_flags(libc::O_PATH | libc::O_DIRECTORY | libc::O_NOFOLLOW)
            .open(root)
            .map_err(io("open", root))?;
        Ok(Self {
            root: root.to_owned(),
            fd: fd.into(),
        })
    }

    /// `name` (one component) in directory `at`, opened with `flags`.
    fn open_at(at: &OwnedFd, name: &OsStr, flags: OFlag, mode: Mode) -> nix::Result<OwnedFd> {
        let how = OpenHow::new()
            .flags(flags | OFlag::O_CLOEXEC)
            .mode(mode)
            .resolve(ResolveFlag::RESOLVE_NO_SYMLINKS | ResolveFlag::RESOLVE_BENEATH);
        let fd = openat2(at.as_raw_fd(), name, how)?;
        // SAFETY: openat2 just returned this descriptor, owned by no one
        // else.
        Ok(unsafe { OwnedFd::from_raw_fd(fd) })
    }

    /// Creates `target` (below the root; a directory with `dir`, else an
    /// empty file) with every missing directory on the way, one component
    /// at a time. `target` itself must not exist.
    fn create(&self, target: &Path, dir: bool) -> Result<Made, StorageError> {
        let err = |e: nix::Error| StorageError::Io {
            what: "create",
            path: target.to_owned(),
            source: e.into(),
        };
        let rel = target
            .strip_prefix(&self.root)
            .map_err(|_| err(Errno::EXDEV))?;
        let (Some(parent), Some(name)) = (rel.parent(), rel.file_name()) else {
            return Err(err(Errno::EINVAL));
        };
        let path_only = OFlag::O_PATH | OFlag::O_DIRECTORY;
        let mut at = self.fd.try_clone().map_err(io("open", &self.root))?;
        for c in parent.components() {
            let c = c.as_os_str();
            match mkdirat(Some(at.as_raw_fd()), c, Mode::from_bits_truncate(0o755)) {
                Ok(()) | Err(Errno::EEXIST) => {}
                Err(e) => return Err(err(e)),
            }
            at = Self::open_at(&at, c, path_only, Mode::empty()).map_err(err)?;
        }
        // Both fail if anything (a guest-made symlink included) is there.
        if dir {
            mkdirat(Some(at.as_raw_fd()), name, Mode::from_bits_truncate(0o755)).map_err(err)?;
        } else {
            let flags = OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_WRONLY;
            Self::open_at(&at, name, flags, Mode::from_bits_truncate(0o644)).map_err(err)?;
        }
        let fd = reopen(&at, name, dir).map_err(io("open", target))?;
        Ok(Made {
            parent: at,
            name: name.to_owned(),
            dir,
            fd,
        })
    }
}

/// Opens `name` in `parent` again (`O_PATH`), a directory with `dir`.
fn reopen(parent: &OwnedFd, name: &OsStr, dir: bool) -> std::io::Result<OwnedFd> {
    let kind = if dir {
        OFlag::O_DIRECTORY
    } else {
        OFlag::empty()
    };
    Beneath::open_at(parent, name, OFlag::O_PATH | kind, Mode::empty()).map_err(Into::into)
}

impl Made {
    /// Opens the path again, by name in the parent held open.
    fn reopen(&self) -> std::io::Result<OwnedFd> {
        reopen(&self.parent, &self.name, self.dir)
    }
}

/// Sets nosuid and nodev (and read-only with `read_only`) on the mount
/// `fd` is the root of and on every mount below it: a read-only `rbind`
/// leaves no writable submount, which a plain remount would.
fn restrict(fd: &std::fs::File, read_only: bool) -> std::io::Result<()> {
    let mut set = libc::MOUNT_ATTR_NOSUID | libc::MOUNT_ATTR_NODEV;
    if read_only {
        set |= libc::MOUNT_ATTR_RDONLY;
    }
    let attr = libc::mount_attr {
        attr_set: set,
        attr_clr: 0,
        propagation: 0,
        userns_fd: 0,
    };
    // SAFETY: a valid descriptor, a NUL-terminated empty path, and a
    // mount_attr that lives across the call, with its true size.
    let r = unsafe {
        libc::syscall(
            libc::SYS_mount_setattr,
            fd.as_raw_fd(),
            c"".as_ptr(),
            libc::AT_EMPTY_PATH | libc::AT_RECURSIVE,
            &attr as *const libc::mount_attr,
            std::mem::size_of::<libc::mount_attr>(),
        )
    };
    if r < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// tmpfs options of a sandbox's share root, which holds only directories
/// and empty bind targets: a guest writing there cannot fill the host.
const SHARE_ROOT_OPTIONS: &str = "size=1m,nr_inodes=4096,mode=0755";

fn share_root_flags(read_only: bool) -> MsFlags {
    let ro = if read_only {
        MsFlags::MS_RDONLY
    } else {
        MsFlags::empty()
    };
    MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC | ro
}

/// Mounts a sandbox's share root on `dir`: a small tmpfs, read-only except
/// while husk itself changes it ([`ShareWrite`]). The guest writes only
/// to the rootfs and volumes bound below it.
pub fn mount_share_root(dir: &Path) -> Result<(), StorageError> {
    mount(
        Some("husk-share"),
        dir,
        Some("tmpfs"),
        share_root_flags(true),
        Some(SHARE_ROOT_OPTIONS),
    )
    .map_err(|source| StorageError::Mount {
        fstype: "tmpfs".into(),
        target: dir.to_path_buf(),
        source,
    })?;
    // Shared: virtiofsd's namespace sandbox takes a slave copy of it when
    // it starts, and the binds husk makes below it later (rootfs, volumes)
    // must reach that copy.
    mount(
        None::<&str>,
        dir,
        None::<&str>,
        MsFlags::MS_SHARED,
        None::<&str>,
    )
    .map_err(|source| StorageError::Mount {
        fstype: "shared propagation".into(),
        target: dir.to_path_buf(),
        source,
    })
}

/// Serialises husk's writes to share roots within this process.
static SHARE_WRITE: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// The lock file, next to a share root, that serialises its write windows
/// across processes.
pub const SHARE_LOCK: &str = "share.lock";

/// Holds a share root writable; it is read-only again when dropped.
pub struct ShareWrite<'a> {
    dir: Option<&'a Path>,
    /// Held for the whole window, released after the remount read-only
    /// (fields drop after `drop`).
    _flock: Option<nix::fcntl::Flock<std::fs::File>>,
    _lock: std::sync::MutexGuard<'static, ()>,
}

impl<'a> ShareWrite<'a> {
    /// Makes the share root at `dir` writable. A `dir` that is not a mount
    /// point (a sandbox from before share roots were tmpfs) is left alone:
    /// remounting would reach the file system it lives on.
    ///
    /// One window at a time per share root, across processes too (an
    /// flock on [`SHARE_LOCK`] beside it): containerd runs the `delete` of
    /// a dead pod's containers at once, and one's remount read-only in the
    /// middle of the other's removal left that container's state, and so
    /// the pod's directory, behind.
    pub fn begin(dir: &'a Path) -> Self {
        let lock = SHARE_WRITE.lock().unwrap_or_else(|e| e.into_inner());
        let flock = dir.parent().and_then(|parent| {
            let path = parent.join(SHARE_LOCK);
            let file = std::fs::File::options()
                .create(true)
                .truncate(false)
                .write(true)
                .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
                .open(&path)
                .map_err(|e| tracing::warn!(path = %path.display(), error = %e, "opening the share lock"))
                .ok()?;
            nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusive)
                .map_err(|(_, e)| tracing::warn!(path = %path.display(), error = %e, "locking the share"))
                .ok()
        });
        let dir = is_mount_point(dir).then_some(dir);
        if let Some(d) = dir {
            if let Err(e) = remount_share_root(d, false) {
                tracing::warn!(dir = %d.display(), error = %e, "making the share root writable");
            }
        }
        Self {
            dir,
            _flock: flock,
            _lock: lock,
        }
    }
}

impl Drop for ShareWrite<'_> {
    fn drop(&mut self) {
        if let Some(d) = self.dir {
            // EBUSY: a guest holds a file of it open for writing; the tmpfs
            // still caps what it can write.
            if let Err(e) = remount_share_root(d, true) {
                tracing::warn!(dir = %d.display(), error = %e, "making the share root read-only");
            }
        }
    }
}

fn remount_share_root(dir: &Path, read_only: bool) -> nix::Result<()> {
    mount(
        None::<&str>,
        dir,
        None::<&str>,
        MsFlags::MS_REMOUNT | share_root_flags(read_only),
        None::<&str>,
    )
}

/// Whether `dir` is the root of a mount (its device differs from its
/// parent's), without following a symlink at `dir`.
pub fn is_mount_point(dir: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    let (Ok(m), Some(Ok(p))) = (
        std::fs::symlink_metadata(dir),
        dir.parent().map(std::fs::metadata),
    ) else {
        return false;
    };
    m.is_dir() && m.dev() != p.dev()
}

/// An OCI mount's options.
pub(crate) fn mount_options(m: &Mount) -> &[String] {
    m.options().as_deref().unwrap_or_default()
}

/// Whether an OCI mount is a bind mount of a host path.
pub(crate) fn is_bind(m: &Mount) -> bool {
    m.typ().as_deref() == Some("bind")
        || mount_options(m).iter().any(|o| o == "bind" || o == "rbind")
}

/// A shared bind that kubelet's atomic writer keeps up to date (see
/// [`is_synced_volume`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SyncedVolume {
    /// Its name in the share (`binds/<n>`).
    pub n: u32,
    /// The host directory (its host-private bind).
    pub dir: PathBuf,
}

/// Whether a bind source is a volume kubelet's atomic writer updates
/// (configMap, secret, downwardAPI, projected): a directory mounted
/// read-only whose `..data` is a symbolic link. The layout, not kubelet's
/// path, decides: kubelet's root directory is configurable.
pub fn is_synced_volume(source: &Path, read_only: bool) -> bool {
    read_only
        && std::fs::symlink_metadata(source.join("..data")).is_ok_and(|m| m.is_symlink())
        && std::fs::symlink_metadata(source).is_ok_and(|m| m.is_dir())
}

/// Shares the host bind mounts of an OCI spec with the guest: each source
/// is bound into `private_dir/<n>` (host-only; made read-only there when the
/// mount says `ro`, so the guest cannot write through virtio-fs whatever its
/// spec says), then into `share_dir/<n>` (made below `share_root` without
/// following a symlink, see [`Beneath`]), and the spec's source becomes
/// `guest_dir/<n>`. Returns the shared binds that are synced volumes. On
/// error, what was mounted stays under the two dirs for the caller's
/// cleanup.
pub fn share_bind_mounts(
    spec: &mut Spec,
    private_dir: &Path,
    share_root: &Path,
    share_dir: &Path,
    guest_dir: &Path,
) -> Result<Vec<SyncedVolume>, StorageError> {
    let Some(mounts) = spec.mounts_mut() else {
        return Ok(Vec::new());
    };
    let mut synced = Vec::new();
    for (n, m) in mounts.iter_mut().enumerate() {
        if !is_bind(m) {
            continue;
        }
        let source = match m.source() {
            Some(s) if s.is_absolute() => s.clone(),
            Some(s) => return Err(StorageError::BindSource(s.clone())),
            None => return Err(StorageError::NoBindSource(m.destination().clone())),
        };
        let meta = std::fs::metadata(&source).map_err(io("bind mount source", &source))?;
        let opts = mount_options(m);
        let recursive = opts.iter().any(|o| o == "rbind");
        let read_only = opts.iter().any(|o| o == "ro");
        let staging = private_dir.join(n.to_string());
        let rec = if recursive {
            MsFlags::MS_REC
        } else {
            MsFlags::empty()
        };
        std::fs::create_dir_all(private_dir).map_err(io("create", private_dir))?;
        bind_via_fd(
            &source,
            private_dir,
            &staging,
            meta.is_dir(),
            rec,
            read_only,
        )?;
        bind_via_fd(
            &staging,
            share_root,
            &share_dir.join(n.to_string()),
            meta.is_dir(),
            rec,
            read_only,
        )?;
        m.set_source(Some(guest_dir.join(n.to_string())));
        if is_synced_volume(&source, read_only) {
            synced.push(SyncedVolume {
                n: n as u32,
                dir: staging,
            });
        }
    }
    Ok(synced)
}

/// Detaches every mount at or below `dir`, deepest first, and again while
/// a pass takes one away (two mounts stacked on one point need two
/// unmounts). Run before [`remove_tree`], once the VM and its daemons are
/// dead, so no guest changes the tree meanwhile. Returns the mount points
/// it found, every pass's.
pub fn unmount_all_under(dir: &Path) -> Vec<PathBuf> {
    let mut found = Vec::new();
    for _ in 0..UNMOUNT_PASSES {
        let points = mounts_under(dir);
        let mut progress = false;
        for p in &points {
            // Never through a symlink at the mount point's place.
            match umount2(
                p.as_path(),
                MntFlags::MNT_DETACH | MntFlags::UMOUNT_NOFOLLOW,
            ) {
                Ok(()) => progress = true,
                Err(e) => tracing::warn!(path = %p.display(), error = %e, "unmounting"),
            }
        }
        found.extend(points);
        if !progress {
            break;
        }
    }
    found
}

/// How often [`unmount_all_under`] goes over the mount table at most.
const UNMOUNT_PASSES: usize = 8;

/// The mount points at or below `dir` in this mount namespace, deepest
/// first.
fn mounts_under(dir: &Path) -> Vec<PathBuf> {
    let Ok(info) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return Vec::new();
    };
    let mut points: Vec<PathBuf> = info
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(unescape)
        .filter(|p| p.starts_with(dir))
        .collect();
    points.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    points
}

/// Removes `dir` and everything below it, on `dir`'s parent's mount only:
/// never through a symlink (the guest writes much of what is there) and
/// never into a directory where a mount still is. Meant for after
/// [`unmount_all_under`]: a mount that outlived it (an unmount that
/// failed) stays with all it holds, and the error names it, so a host
/// volume's files never go with a sandbox's state. A missing `dir` is not
/// an error; on others it goes on and returns the first.
pub fn remove_tree(dir: &Path) -> std::io::Result<()> {
    let (Some(parent), Some(name)) = (dir.parent(), dir.file_name()) else {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("{}: no parent directory to remove it from", dir.display()),
        ));
    };
    // The parent is the host's own path (a state directory may be reached
    // through a symlink); below it nothing is followed.
    let flags = OFlag::O_DIRECTORY | OFlag::O_RDONLY | OFlag::O_CLOEXEC;
    let parent = match Dir::open(parent, flags, Mode::empty()) {
        Err(Errno::ENOENT) => return Ok(()),
        r => r?,
    };
    let mount = mount_id(&parent, dir)?;
    match remove_entry(&parent, name, mount, dir) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        r => r,
    }
}

fn dir_flags() -> OFlag {
    OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_RDONLY | OFlag::O_CLOEXEC
}

/// Removes `name` in `parent` (`path`, for messages) and, if it is a
/// directory on mount `mount`, all in it first.
fn remove_entry(parent: &Dir, name: &OsStr, mount: u64, path: &Path) -> std::io::Result<()> {
    let at = parent.as_raw_fd();
    let mut sub = match Dir::openat(Some(at), name, dir_flags(), Mode::empty()) {
        // A file, or a symlink: unlinked, never followed.
        Err(Errno::ENOTDIR | Errno::ELOOP) => {
            return Ok(unlinkat(Some(at), name, UnlinkatFlags::NoRemoveDir)?)
        }
        r => r?,
    };
    if mount_id(&sub, path)? != mount {
        return Err(std::io::Error::other(format!(
            "{} is still a mount point: left in place with what it holds",
            path.display()
        )));
    }
    // Read whole first: removing while reading a directory may skip names.
    let names: Vec<std::ffi::OsString> = sub
        .iter()
        .filter_map(Result::ok)
        .map(|e| OsStr::from_bytes(e.file_name().to_bytes()).to_owned())
        .filter(|n| n != "." && n != "..")
        .collect();
    let mut first = None;
    for n in &names {
        match remove_entry(&sub, n, mount, &path.join(n)) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                first.get_or_insert(e);
            }
            Ok(()) => {}
        }
    }
    if let Some(e) = first {
        return Err(e);
    }
    Ok(unlinkat(Some(at), name, UnlinkatFlags::RemoveDir)?)
}

/// The mount ID of the open directory `dir` (`path`, for messages).
fn mount_id(dir: &Dir, path: &Path) -> std::io::Result<u64> {
    // SAFETY: statx fills a zeroed struct of its own type; the empty path
    // with AT_EMPTY_PATH names the open descriptor.
    let mut st: libc::statx = unsafe { std::mem::zeroed() };
    // SAFETY: as above; the path and the struct outlive the call.
    let rc = unsafe {
        libc::statx(
            dir.as_raw_fd(),
            c"".as_ptr(),
            libc::AT_EMPTY_PATH,
            libc::STATX_MNT_ID,
            &mut st,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    if st.stx_mask & libc::STATX_MNT_ID == 0 {
        return Err(std::io::Error::other(format!(
            "{}: the kernel gives no mount ID (statx STATX_MNT_ID needs Linux 5.8)",
            path.display()
        )));
    }
    Ok(st.stx_mnt_id)
}

/// mountinfo escapes space, tab, newline and backslash as octal.
fn unescape(s: &str) -> PathBuf {
    let mut out = Vec::with_capacity(s.len());
    let b = s.as_bytes();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            let v = (b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0');
            out.push(v);
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    PathBuf::from(
        CString::new(out)
            .map(|c| c.into_string().unwrap_or_default())
            .unwrap_or_default(),
    )
}

/// Mounts a container's rootfs and shares the spec's host bind mounts,
/// rewriting their sources to guest paths; returns the binds that are
/// synced volumes. On error what was mounted stays for
/// [`release_container`].
pub fn attach_container(
    paths: &ContainerPaths,
    rootfs: &[MountSpec],
    spec: &mut Spec,
) -> Result<Vec<SyncedVolume>, StorageError> {
    let _writable = ShareWrite::begin(&paths.share_root);
    mount_rootfs(
        rootfs,
        &paths.rootfs_private,
        &paths.share_root,
        &paths.rootfs_shared(),
    )?;
    share_bind_mounts(
        spec,
        &paths.binds_private,
        &paths.share_root,
        &paths.binds_shared(),
        &paths.guest_binds,
    )
}

/// Unmounts and removes everything of a container; the guest must no
/// longer use it.
pub fn release_container(paths: &ContainerPaths) {
    let _writable = ShareWrite::begin(&paths.share_root);
    for dir in [&paths.share, &paths.rootfs_private, &paths.binds_private] {
        unmount_all_under(dir);
        if let Err(e) = remove_tree(dir) {
            tracing::warn!(dir = %dir.display(), error = %e, "removing container state");
        }
    }
}

/// Unmounts whatever is left below a sandbox's directory and removes it.
pub fn remove_sandbox(paths: &SandboxPaths) {
    unmount_all_under(paths.root());
    if let Err(e) = remove_tree(paths.root()) {
        tracing::warn!(dir = %paths.root().display(), error = %e, "removing sandbox state");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn remove_tree_takes_files_dirs_and_links_but_nothing_a_link_points_at() {
        let d = tempfile::tempdir().expect("tempdir");
        let outside = d.path().join("outside");
        std::fs::create_dir_all(outside.join("sub")).expect("mkdir");
        std::fs::write(outside.join("keep"), "keep").expect("write");
        let tree = d.path().join("tree");
        std::fs::create_dir_all(tree.join("a/b/c")).expect("mkdir");
        std::fs::write(tree.join("a/b/c/f"), "x").expect("write");
        std::os::unix::fs::symlink(&outside, tree.join("a/dir-link")).expect("symlink");
        std::os::unix::fs::symlink(outside.join("keep"), tree.join("file-link")).expect("symlink");
        std::os::unix::fs::symlink("../../..", tree.join("a/b/up")).expect("symlink");
        nix::unistd::mkfifo(&tree.join("a/fifo"), Mode::S_IRWXU).expect("mkfifo");
        remove_tree(&tree).expect("remove");
        assert!(!tree.exists());
        // A top that is itself a link: the link goes, not its target.
        let top_link = d.path().join("top-link");
        std::os::unix::fs::symlink(&outside, &top_link).expect("symlink");
        remove_tree(&top_link).expect("remove the link");
        assert!(std::fs::symlink_metadata(&top_link).is_err());
        assert_eq!(
            std::fs::read_to_string(outside.join("keep")).expect("kept"),
            "keep"
        );
        assert!(outside.join("sub").is_dir());
        // Gone already, or under a parent that is gone: nothing to do.
        remove_tree(&tree).expect("missing tree");
        remove_tree(&tree.join("a/b")).expect("missing parent");
        let e = remove_tree(Path::new("/")).expect_err("/ has no parent");
        assert!(e.to_string().contains("no parent directory"), "{e}");
    }

    #[test]
    fn options_split_into_flags_and_data() {
        let opts: Vec<String> = ["ro", "rbind", "index=off", "lowerdir=/a:/b"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        let (flags, data) = flags_and_data(&opts);
        assert!(flags.contains(MsFlags::MS_RDONLY | MsFlags::MS_BIND | MsFlags::MS_REC));
        assert_eq!(data, "index=off,lowerdir=/a:/b");
    }

    #[test]
    fn mountinfo_escapes_are_decoded() {
        assert_eq!(unescape("/run/a\\040b"), PathBuf::from("/run/a b"));
        assert_eq!(unescape("/plain"), PathBuf::from("/plain"));
    }

    #[test]
    fn bind_mounts_are_recognised_by_type_or_option() {
        let j = |v: serde_json::Value| {
            let mut m = serde_json::json!({"destination": "/d"});
            m.as_object_mut()
                .unwrap()
                .extend(v.as_object().unwrap().clone());
            is_bind(&serde_json::from_value(m).unwrap())
        };
        assert!(j(serde_json::json!({"type": "bind", "source": "/a"})));
        assert!(j(
            serde_json::json!({"type": "none", "options": ["rbind", "ro"]})
        ));
        assert!(!j(
            serde_json::json!({"type": "tmpfs", "options": ["nosuid"]})
        ));
        assert!(!j(serde_json::json!({"type": "proc"})));
    }

    fn spec_of(v: serde_json::Value) -> Spec {
        serde_json::from_value(v).unwrap()
    }

    #[test]
    fn relative_or_missing_bind_sources_are_refused_by_name() {
        let d = tempfile::tempdir().unwrap();
        let mut spec = spec_of(serde_json::json!({"mounts": [
            {"destination": "/data", "type": "bind", "source": "relative/dir", "options": ["rbind"]}
        ]}));
        let e = share_bind_mounts(&mut spec, d.path(), d.path(), d.path(), Path::new("/g"))
            .unwrap_err();
        assert!(e.to_string().contains("relative/dir"), "{e}");
        let mut spec = spec_of(serde_json::json!({"mounts": [
            {"destination": "/data", "type": "bind", "source": "/nonexistent/husk-src"}
        ]}));
        let e = share_bind_mounts(&mut spec, d.path(), d.path(), d.path(), Path::new("/g"))
            .unwrap_err();
        assert!(e.to_string().contains("/nonexistent/husk-src"), "{e}");
        let mut spec = spec_of(serde_json::json!({"mounts": [
            {"destination": "/data", "type": "bind", "options": ["rbind"]}
        ]}));
        let e = share_bind_mounts(&mut spec, d.path(), d.path(), d.path(), Path::new("/g"))
            .unwrap_err();
        assert!(e.to_string().contains("\"/data\" has no source"), "{e}");
        let mut none = spec_of(serde_json::json!({}));
        assert_eq!(
            share_bind_mounts(&mut none, d.path(), d.path(), d.path(), Path::new("/g")).unwrap(),
            vec![]
        );
    }

    #[test]
    fn synced_volumes_are_read_only_directories_with_a_data_link() {
        let d = tempfile::tempdir().unwrap();
        assert!(!is_synced_volume(d.path(), true));
        std::fs::create_dir(d.path().join("..v1")).unwrap();
        std::os::unix::fs::symlink("..v1", d.path().join("..data")).unwrap();
        assert!(is_synced_volume(d.path(), true));
        // Writable: the container could change it; it stays a plain share.
        assert!(!is_synced_volume(d.path(), false));
        let plain = tempfile::tempdir().unwrap();
        std::fs::create_dir(plain.path().join("..data")).unwrap();
        assert!(!is_synced_volume(plain.path(), true));
    }

    #[test]
    fn a_share_write_window_excludes_other_processes_windows() {
        let d = tempfile::tempdir().unwrap();
        let share = d.path().join("shared");
        std::fs::create_dir(&share).unwrap();
        let try_lock = || {
            let f = std::fs::File::options()
                .write(true)
                .open(d.path().join(SHARE_LOCK))
                .unwrap();
            // Another open file description: as another process's would be.
            nix::fcntl::Flock::lock(f, nix::fcntl::FlockArg::LockExclusiveNonblock).is_ok()
        };
        let window = ShareWrite::begin(&share);
        assert!(!try_lock(), "a second window while the first is open");
        drop(window);
        assert!(try_lock(), "the lock outlived the window");
    }

    #[test]
    fn paths_below_a_root_are_made_without_following_any_symlink() {
        let d = tempfile::tempdir().unwrap();
        let (root, outside) = (d.path().join("share"), d.path().join("outside"));
        std::fs::create_dir_all(&root).unwrap();
        std::fs::create_dir_all(&outside).unwrap();
        let beneath = Beneath::open(&root).unwrap();
        // Missing directories on the way are made; a file or a directory.
        beneath.create(&root.join("c1/binds/0"), true).unwrap();
        assert!(root.join("c1/binds/0").is_dir());
        let f = beneath.create(&root.join("c1/binds/1"), false).unwrap();
        assert!(root.join("c1/binds/1").is_file());
        assert!(f.reopen().is_ok());
        // A symlink where a directory on the way should be (as a guest
        // could plant one in the share): refused, nothing made behind it,
        // whether it points out of the root or inside it.
        for (link, to) in [("c2", &outside), ("c3", &root.join("c1"))] {
            std::os::unix::fs::symlink(to, root.join(link)).unwrap();
            let e = beneath
                .create(&root.join(link).join("binds/0"), true)
                .err()
                .unwrap();
            assert!(e.to_string().contains(&format!("{link}/binds/0")), "{e}");
            let errno = match &e {
                StorageError::Io { source, .. } => source.raw_os_error(),
                _ => None,
            };
            assert_eq!(errno, Some(libc::ELOOP), "{link}: {e}");
        }
        assert_eq!(std::fs::read_dir(&outside).unwrap().count(), 0);
        assert!(!root.join("c1/binds/binds").exists());
        // The target itself: it must not exist, a symlink included.
        std::os::unix::fs::symlink(&outside, root.join("c1/binds/2")).unwrap();
        assert!(beneath.create(&root.join("c1/binds/2"), true).is_err());
        assert!(beneath.create(&root.join("c1/binds/2"), false).is_err());
        // Nothing outside the root.
        assert!(beneath.create(&outside.join("x"), true).is_err());
        assert!(!outside.join("x").exists());
    }

    #[test]
    fn more_than_one_mount_is_refused() {
        let m = MountSpec {
            fstype: "overlay".into(),
            source: "overlay".into(),
            options: vec![],
        };
        let err = mount_rootfs(
            &[m.clone(), m],
            Path::new("/nonexistent/a"),
            Path::new("/nonexistent"),
            Path::new("/nonexistent/b"),
        )
        .unwrap_err();
        assert!(matches!(err, StorageError::Count(2)));
    }
}
