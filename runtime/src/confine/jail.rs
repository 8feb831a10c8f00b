//! A mount namespace of its own for a host process of a sandbox (a device
//! daemon, a VMM), rooted in an empty per-sandbox directory that holds only
//! what the process opens: the system's program directories read-only, and
//! the paths the caller names (read-only, writable, or device nodes).
//! Everything else of the host (other pods' state, /etc, /home, /run) is not
//! there to be reached.
//!
//! The plan is made in the parent ([`Jail`]); the child, between fork and
//! exec, only makes syscalls on what the plan holds ([`Jail::enter`]):
//! unshare the mount namespace, make it private, mount a small tmpfs on the
//! jail directory, create mount points and bind what is needed, make the
//! tmpfs read-only, and make it the root: pivot_root, or where the root is
//! an initramfs (which pivot_root refuses) a move over / and chroot, as
//! switch_root does. The process then drops its capabilities (see
//! [`crate::confine::process::Confine`]) and cannot leave.

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

/// Directories the system keeps programs and libraries in; each is bound
/// read-only, or recreated as a symlink where it is one (merged /usr).
const SYSTEM_DIRS: &[&str] = &["/usr", "/bin", "/sbin", "/lib", "/lib64"];
/// Files the dynamic loader reads, when present.
const SYSTEM_FILES: &[&str] = &["/etc/ld.so.cache"];

#[derive(Debug)]
enum Op {
    Dir(CString),
    File(CString),
    Symlink {
        target: CString,
        at: CString,
    },
    Bind {
        source: CString,
        at: CString,
        flags: libc::c_ulong,
    },
}

/// What a jailed process sees. Build it with [`Jail::new`] and the adders,
/// then pass it to [`crate::confine::process::Process::spawn_confined`].
#[derive(Debug)]
pub struct Jail {
    root: CString,
    dot: CString,
    slash: CString,
    tmpfs: CString,
    options: CString,
    ops: Vec<Op>,
    /// What is bound so far (resolved host path, flags), so that a path
    /// already visible through a bind is not bound again.
    bound: Vec<(PathBuf, libc::c_ulong)>,
}

/// Why a jail could not be planned.
#[derive(Debug, thiserror::Error)]
pub enum JailError {
    #[error("jail path {0} is not absolute")]
    Relative(PathBuf),
    #[error("jail path {path} cannot be shown to the jailed process")]
    Missing {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("jail path {0} holds a NUL byte")]
    Nul(PathBuf),
    #[error("cannot make the jail directory {path}")]
    Dir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

fn c(path: &Path) -> Result<CString, JailError> {
    CString::new(path.as_os_str().as_bytes()).map_err(|_| JailError::Nul(path.to_path_buf()))
}

impl Jail {
    /// A jail rooted at `root`, an empty directory the caller made and
    /// removes; the system's program directories are in it.
    pub fn new(root: &Path) -> Result<Self, JailError> {
        if !root.is_absolute() {
            return Err(JailError::Relative(root.to_path_buf()));
        }
        let mut jail = Self {
            root: c(root)?,
            dot: CString::from(c"."),
            slash: CString::from(c"/"),
            tmpfs: CString::from(c"tmpfs"),
            options: CString::from(c"size=64k,nr_inodes=256,mode=0755"),
            ops: Vec::new(),
            bound: Vec::new(),
        };
        for dir in SYSTEM_DIRS {
            let p = Path::new(dir);
            match std::fs::symlink_metadata(p) {
                Ok(m) if m.file_type().is_symlink() => {
                    let target = std::fs::read_link(p).map_err(|source| JailError::Missing {
                        path: p.to_path_buf(),
                        source,
                    })?;
                    let at = jail.inside(p)?;
                    jail.ops.push(Op::Symlink {
                        target: c(&target)?,
                        at,
                    });
                }
                Ok(_) => jail.bind(p, libc::MS_RDONLY | libc::MS_NODEV)?,
                Err(_) => {}
            }
        }
        for file in SYSTEM_FILES {
            if Path::new(file).is_file() {
                jail.bind(Path::new(file), libc::MS_RDONLY | libc::MS_NODEV)?;
            }
        }
        Ok(jail)
    }

    /// Makes `root` (an empty directory, with its parents) and a jail on it.
    pub fn create(root: &Path) -> Result<Self, JailError> {
        std::fs::create_dir_all(root).map_err(|source| JailError::Dir {
            path: root.to_path_buf(),
            source,
        })?;
        Self::new(root)
    }

    /// `path` as the jail's own, read-only.
    pub fn read_only(mut self, path: &Path) -> Result<Self, JailError> {
        self.bind(path, libc::MS_RDONLY | libc::MS_NODEV)?;
        Ok(self)
    }

    /// `path` as the jail's own, writable (sockets are made there).
    pub fn writable(mut self, path: &Path) -> Result<Self, JailError> {
        self.bind(path, libc::MS_NODEV)?;
        Ok(self)
    }

    /// Device node `path` (e.g. /dev/kvm), usable.
    pub fn device(mut self, path: &Path) -> Result<Self, JailError> {
        self.bind(path, 0)?;
        Ok(self)
    }

    /// The jail's name for host path `path`.
    fn inside(&self, path: &Path) -> Result<CString, JailError> {
        let root = Path::new(std::ffi::OsStr::from_bytes(self.root.as_bytes()));
        let rel = path
            .strip_prefix("/")
            .map_err(|_| JailError::Relative(path.to_path_buf()))?;
        c(&root.join(rel))
    }

    /// Plans the mount points of `path` (its parents as directories) and a
    /// bind of it with `flags` (always nosuid) on top.
    fn bind(&mut self, path: &Path, flags: libc::c_ulong) -> Result<(), JailError> {
        if !path.is_absolute() {
            return Err(JailError::Relative(path.to_path_buf()));
        }
        let missing = |source| JailError::Missing {
            path: path.to_path_buf(),
            source,
        };
        let meta = std::fs::metadata(path).map_err(missing)?;
        let real = std::fs::canonicalize(path).map_err(missing)?;
        if self
            .bound
            .iter()
            .any(|(b, f)| real.starts_with(b) && *f == flags | libc::MS_NOSUID)
        {
            return Ok(());
        }
        let mut parents: Vec<&Path> = path.ancestors().skip(1).collect();
        parents.reverse();
        for p in parents.into_iter().filter(|p| *p != Path::new("/")) {
            let at = self.inside(p)?;
            if !self
                .ops
                .iter()
                .any(|op| matches!(op, Op::Dir(d) if *d == at))
            {
                self.ops.push(Op::Dir(at));
            }
        }
        let at = self.inside(path)?;
        self.ops.push(if meta.is_dir() {
            Op::Dir(at.clone())
        } else {
            Op::File(at.clone())
        });
        self.ops.push(Op::Bind {
            source: c(path)?,
            at,
            flags: flags | libc::MS_NOSUID,
        });
        self.bound.push((real, flags | libc::MS_NOSUID));
        Ok(())
    }

    /// Enters the jail: to be called in the child between fork and exec,
    /// while it still has CAP_SYS_ADMIN.
    ///
    /// # Safety
    /// Only async-signal-safe syscalls on memory the plan owns; call it only
    /// in a freshly forked child.
    pub(crate) unsafe fn enter(&self) -> std::io::Result<()> {
        let check = |rc: libc::c_int| {
            if rc == 0 {
                Ok(())
            } else {
                Err(std::io::Error::last_os_error())
            }
        };
        let null = std::ptr::null::<libc::c_char>();
        // SAFETY: every pointer is a NUL-terminated string of the plan or
        // null where the call allows it; none is kept past the call.
        unsafe {
            check(libc::unshare(libc::CLONE_NEWNS))?;
            check(libc::mount(
                null,
                self.slash.as_ptr(),
                null,
                libc::MS_REC | libc::MS_PRIVATE,
                std::ptr::null(),
            ))?;
            check(libc::mount(
                self.tmpfs.as_ptr(),
                self.root.as_ptr(),
                self.tmpfs.as_ptr(),
                libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
                self.options.as_ptr().cast(),
            ))?;
            for op in &self.ops {
                match op {
                    Op::Dir(at) => {
                        if libc::mkdir(at.as_ptr(), 0o755) != 0
                            && *libc::__errno_location() != libc::EEXIST
                        {
                            return Err(std::io::Error::last_os_error());
                        }
                    }
                    Op::File(at) => {
                        let fd = libc::open(
                            at.as_ptr(),
                            libc::O_CREAT | libc::O_WRONLY | libc::O_CLOEXEC,
                            0o644,
                        );
                        if fd < 0 {
                            return Err(std::io::Error::last_os_error());
                        }
                        libc::close(fd);
                    }
                    Op::Symlink { target, at } => {
                        check(libc::symlink(target.as_ptr(), at.as_ptr()))?;
                    }
                    Op::Bind { source, at, flags } => {
                        check(libc::mount(
                            source.as_ptr(),
                            at.as_ptr(),
                            null,
                            libc::MS_BIND | libc::MS_REC,
                            std::ptr::null(),
                        ))?;
                        check(libc::mount(
                            null,
                            at.as_ptr(),
                            null,
                            libc::MS_REMOUNT | libc::MS_BIND | flags,
                            std::ptr::null(),
                        ))?;
                    }
                }
            }
            check(libc::mount(
                null,
                self.root.as_ptr(),
                null,
                libc::MS_REMOUNT
                    | libc::MS_RDONLY
                    | libc::MS_NOSUID
                    | libc::MS_NODEV
                    | libc::MS_NOEXEC,
                std::ptr::null(),
            ))?;
            check(libc::chdir(self.root.as_ptr()))?;
            // pivot_root(".", "."): the old root ends up under the new one
            // and is detached at once.
            let pivoted = libc::syscall(libc::SYS_pivot_root, self.dot.as_ptr(), self.dot.as_ptr());
            if pivoted == 0 {
                check(libc::umount2(self.dot.as_ptr(), libc::MNT_DETACH))?;
            } else if *libc::__errno_location() == libc::EINVAL {
                // The root is an initramfs: move the jail over it.
                check(libc::mount(
                    self.dot.as_ptr(),
                    self.slash.as_ptr(),
                    null,
                    libc::MS_MOVE,
                    std::ptr::null(),
                ))?;
                check(libc::chroot(self.dot.as_ptr()))?;
            } else {
                return Err(std::io::Error::last_os_error());
            }
            check(libc::chdir(self.slash.as_ptr()))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn targets(j: &Jail) -> Vec<String> {
        j.ops
            .iter()
            .filter_map(|op| match op {
                Op::Bind { at, .. } => Some(at.to_string_lossy().into_owned()),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn a_plan_binds_each_path_at_its_own_name_below_the_root() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("sock");
        std::fs::create_dir(&sock).unwrap();
        let root = dir.path().join("jail");
        let j = Jail::new(&root).unwrap().writable(&sock).unwrap();
        let want = format!("{}{}", root.display(), sock.display());
        assert!(targets(&j).contains(&want), "{:?}", targets(&j));
        // Mount points of every parent come before the bind.
        let first_dir = j
            .ops
            .iter()
            .position(|op| matches!(op, Op::Dir(d) if d.to_string_lossy() == want))
            .unwrap();
        let bind = j
            .ops
            .iter()
            .position(|op| matches!(op, Op::Bind { at, .. } if at.to_string_lossy() == want))
            .unwrap();
        assert!(first_dir < bind);
    }

    #[test]
    fn a_path_a_system_directory_already_shows_is_not_bound_again() {
        let dir = tempfile::tempdir().unwrap();
        let j = Jail::new(&dir.path().join("j")).unwrap();
        let before = targets(&j).len();
        let j = j.read_only(Path::new("/usr/bin/env")).unwrap();
        assert_eq!(targets(&j).len(), before, "{:?}", targets(&j));
    }

    #[test]
    fn bad_paths_are_refused_by_name() {
        let e = Jail::new(Path::new("jail")).unwrap_err();
        assert!(e.to_string().contains("jail"), "{e}");
        let dir = tempfile::tempdir().unwrap();
        let e = Jail::new(&dir.path().join("j"))
            .unwrap()
            .read_only(Path::new("/nonexistent/husk-file"))
            .unwrap_err();
        assert!(e.to_string().contains("/nonexistent/husk-file"), "{e}");
    }
}
