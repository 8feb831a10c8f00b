//! Volumes kubelet keeps up to date with its atomic writer (configMap,
//! secret, downwardAPI, projected): the container sees a guest copy of the
//! shared directory, and the agent brings the copy up to date when the host
//! says the volume changed, with the writer's own steps. So inotify in the
//! container fires as under runc, and a file read through `..data` is
//! always one version, never a mix.
//!
//! Why a copy: the guest's dentry and page caches of a virtio-fs directory
//! learn of a host change only when their timeout runs out, and the guest's
//! inotify sees only what the guest itself does.
//!
//! The layout kubelet writes, and the copy keeps:
//!   ..2026_12_06_20_30_00.123456789/   the data of one version
//!   ..data -> ..2026_12_06_20_30_00.123456789
//!   key -> ..data/key                  one per top-level entry of the data
//! An update writes a new data directory, points `..data_tmp` at it and
//! renames that over `..data`, then adds and removes the top-level links
//! and removes the old data directory.

use std::collections::{BTreeSet, HashMap};
use std::ffi::{OsStr, OsString};
use std::fs::{self, File, OpenOptions};
use std::io::Read;
use std::os::unix::fs::{
    lchown, symlink, DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt,
};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};

use husk_protocol::GUEST_SHARE_DIR as SHARE_DIR;

/// Where the guest copies live (on /run's tmpfs).
pub const VOLUMES_DIR: &str = "/run/husk/volumes";
const DATA_LINK: &str = "..data";
const DATA_TMP: &str = "..data_tmp";
/// The most one volume's copy may hold: kubelet caps a configMap or secret
/// at 1 MiB; a projected volume joins a few of them.
pub const MAX_BYTES: u64 = 32 << 20;
pub const MAX_ENTRIES: usize = 10_000;

#[derive(Debug, thiserror::Error)]
pub enum VolumeError {
    #[error("volume {volume}: data directory {name:?} is not a name kubelet's atomic writer makes (\"..\" and a name without \"/\")")]
    BadName { volume: String, name: String },
    #[error("volume {volume}: over {MAX_BYTES} bytes or {MAX_ENTRIES} entries, the most husk copies into the guest for a synced volume")]
    TooLarge { volume: String },
    #[error("volume {volume}: {what} {path}: {source}")]
    Io {
        volume: String,
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("volume {0} not found")]
    NotFound(String),
}

/// Whether `name` is a data directory kubelet's writer could have made.
pub fn is_data_dir_name(name: &str) -> bool {
    name.len() > 2
        && name.len() <= 255
        && name.starts_with("..")
        && name != DATA_LINK
        && name != DATA_TMP
        && !name.contains(['/', '\0'])
        && name != "..."
}

/// One synced volume: the share's view of the host directory and the copy.
struct Volume {
    share: PathBuf,
    copy: PathBuf,
}

/// The synced volumes of every container.
#[derive(Default)]
pub struct Volumes {
    by_container: Mutex<HashMap<String, HashMap<u32, Volume>>>,
}

impl Volumes {
    fn lock(&self) -> MutexGuard<'_, HashMap<String, HashMap<u32, Volume>>> {
        self.by_container.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Makes the copy of container `id`'s shared bind `n`
    /// (`<share>/<id>/binds/<n>`) as the share shows it now; returns the
    /// copy's path, for the container's mount. The lock is held
    /// throughout, so an update the host sends meanwhile waits and then
    /// applies; one sent before finds no volume, and what it announced is
    /// what this first look at the share sees.
    pub fn add(&self, id: &str, n: u32) -> Result<PathBuf, VolumeError> {
        let mut map = self.lock();
        let share = Path::new(SHARE_DIR)
            .join(id)
            .join("binds")
            .join(n.to_string());
        let copy = Path::new(VOLUMES_DIR).join(id).join(n.to_string());
        let volume = label(id, n);
        let err = |what, path: &Path| io_error(&volume, what, path);
        let parent = copy.parent().unwrap_or(&copy);
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(parent)
            .map_err(err("create", parent))?;
        let root = fs::symlink_metadata(&share).map_err(err("read", &share))?;
        make_dir(&copy, &root).map_err(err("create", &copy))?;
        let made = fs::read_link(share.join(DATA_LINK))
            .map_err(err("read", &share.join(DATA_LINK)))
            .and_then(|target| {
                let name = target.to_string_lossy().into_owned();
                match apply(&share, &copy, &name, &volume) {
                    // Gone between the link and its data: kubelet swapped
                    // meanwhile, and the host's update for that follows.
                    Err(VolumeError::Io { source, .. })
                        if source.kind() == std::io::ErrorKind::NotFound =>
                    {
                        tracing::info!("{volume}: {name} went away while copied; waiting for the host's update");
                        Ok(())
                    }
                    r => r,
                }
            });
        if let Err(e) = made {
            let _ = fs::remove_dir_all(&copy);
            return Err(e);
        }
        map.entry(id.to_owned()).or_default().insert(
            n,
            Volume {
                share,
                copy: copy.clone(),
            },
        );
        Ok(copy)
    }

    /// Brings container `id`'s volume `n` to the share's data directory
    /// `name`, as kubelet's writer did on the host.
    pub fn update(&self, id: &str, n: u32, name: &str) -> Result<(), VolumeError> {
        let map = self.lock();
        let v = map
            .get(id)
            .and_then(|m| m.get(&n))
            .ok_or_else(|| VolumeError::NotFound(label(id, n)))?;
        apply(&v.share, &v.copy, name, &label(id, n))
    }

    /// Forgets container `id`'s volumes and removes their copies.
    pub fn remove(&self, id: &str) {
        self.lock().remove(id);
        let dir = Path::new(VOLUMES_DIR).join(id);
        if let Err(e) = fs::remove_dir_all(&dir) {
            if e.kind() != std::io::ErrorKind::NotFound {
                tracing::error!("removing {}: {e}", dir.display());
            }
        }
    }
}

/// Maps an I/O error of `what` on `path` to the volume's error.
fn io_error(
    volume: &str,
    what: &'static str,
    path: &Path,
) -> impl FnOnce(std::io::Error) -> VolumeError {
    let (volume, path) = (volume.to_owned(), path.to_path_buf());
    move |source| VolumeError::Io {
        volume,
        what,
        path,
        source,
    }
}

fn label(id: &str, n: u32) -> String {
    format!("{id}/{n}")
}

/// A directory like `like` (mode and owner).
fn make_dir(path: &Path, like: &fs::Metadata) -> std::io::Result<()> {
    fs::DirBuilder::new().mode(0o700).create(path)?;
    lchown(path, Some(like.uid()), Some(like.gid()))?;
    fs::set_permissions(path, fs::Permissions::from_mode(like.mode() & 0o7777))
}

/// Brings `copy` to the share's data directory `name`: copies it unless
/// the copy has it already, swaps `..data` to it, adds the top-level links
/// of its entries, removes links to entries it no longer has, then every
/// other data directory.
pub fn apply(share: &Path, copy: &Path, name: &str, volume: &str) -> Result<(), VolumeError> {
    if !is_data_dir_name(name) {
        return Err(VolumeError::BadName {
            volume: volume.to_owned(),
            name: name.to_owned(),
        });
    }
    let err = |what, path: &Path| io_error(volume, what, path);
    let data = copy.join(name);
    if fs::symlink_metadata(&data).is_err() {
        let mut budget = Budget::default();
        if let Err(e) = copy_tree(&share.join(name), &data, &mut budget, volume) {
            let _ = fs::remove_dir_all(&data);
            return Err(e);
        }
    }
    let tmp = copy.join(DATA_TMP);
    let _ = fs::remove_file(&tmp);
    symlink(name, &tmp).map_err(err("create", &tmp))?;
    let link = copy.join(DATA_LINK);
    fs::rename(&tmp, &link).map_err(err("rename onto", &link))?;

    let wanted: BTreeSet<OsString> = fs::read_dir(&data)
        .map_err(err("read", &data))?
        .filter_map(|e| e.ok().map(|e| e.file_name()))
        .filter(|n| !is_hidden(n))
        .collect();
    for w in &wanted {
        let l = copy.join(w);
        if fs::symlink_metadata(&l).is_err() {
            symlink(Path::new(DATA_LINK).join(w), &l).map_err(err("create", &l))?;
        }
    }
    // As kubelet: first the links to entries the data no longer has, then
    // the other data directories (so inotify shows the same order).
    let mut stale_dirs = Vec::new();
    for entry in fs::read_dir(copy).map_err(err("read", copy))? {
        let entry = entry.map_err(err("read", copy))?;
        let n = entry.file_name();
        let path = entry.path();
        if n == DATA_LINK || n == OsStr::new(name) || wanted.contains(&n) {
            continue;
        }
        if entry.file_type().is_ok_and(|t| t.is_dir()) {
            stale_dirs.push(path);
        } else {
            fs::remove_file(&path).map_err(err("remove", &path))?;
        }
    }
    for dir in stale_dirs {
        fs::remove_dir_all(&dir).map_err(err("remove", &dir))?;
    }
    Ok(())
}

fn is_hidden(name: &OsStr) -> bool {
    name.as_encoded_bytes().starts_with(b"..")
}

/// What one copy may still take.
struct Budget {
    bytes: u64,
    entries: usize,
}

impl Default for Budget {
    fn default() -> Self {
        Budget {
            bytes: MAX_BYTES,
            entries: MAX_ENTRIES,
        }
    }
}

/// Copies directory `src` to `dst` (which must not exist): directories,
/// files and symbolic links with their modes and owners; nothing else
/// (kubelet writes nothing else).
fn copy_tree(src: &Path, dst: &Path, budget: &mut Budget, volume: &str) -> Result<(), VolumeError> {
    let err = |what, path: &Path| io_error(volume, what, path);
    let too_large = || VolumeError::TooLarge {
        volume: volume.to_owned(),
    };
    let meta = fs::symlink_metadata(src).map_err(err("read", src))?;
    if !meta.is_dir() {
        return Err(err("read", src)(std::io::Error::from(
            std::io::ErrorKind::NotADirectory,
        )));
    }
    fs::DirBuilder::new()
        .mode(0o700)
        .create(dst)
        .map_err(err("create", dst))?;
    for entry in fs::read_dir(src).map_err(err("read", src))? {
        let entry = entry.map_err(err("read", src))?;
        budget.entries = budget.entries.checked_sub(1).ok_or_else(too_large)?;
        let (from, to) = (entry.path(), dst.join(entry.file_name()));
        let m = fs::symlink_metadata(&from).map_err(err("read", &from))?;
        let kind = m.file_type();
        if kind.is_dir() {
            copy_tree(&from, &to, budget, volume)?;
        } else if kind.is_symlink() {
            let target = fs::read_link(&from).map_err(err("read", &from))?;
            symlink(target, &to).map_err(err("create", &to))?;
            lchown(&to, Some(m.uid()), Some(m.gid())).map_err(err("chown", &to))?;
        } else if kind.is_file() {
            let file = File::open(&from).map_err(err("open", &from))?;
            let mut out = OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .custom_flags(libc::O_NOFOLLOW)
                .open(&to)
                .map_err(err("create", &to))?;
            let copied = std::io::copy(&mut file.take(budget.bytes + 1), &mut out)
                .map_err(err("copy to", &to))?;
            budget.bytes = budget.bytes.checked_sub(copied).ok_or_else(too_large)?;
            std::os::unix::fs::fchown(&out, Some(m.uid()), Some(m.gid()))
                .map_err(err("chown", &to))?;
            out.set_permissions(fs::Permissions::from_mode(m.mode() & 0o7777))
                .map_err(err("chmod", &to))?;
        }
    }
    // Last, so a read-only mode does not stand in the copy's way.
    fs::set_permissions(dst, fs::Permissions::from_mode(meta.mode() & 0o7777))
        .map_err(err("chmod", dst))?;
    lchown(dst, Some(meta.uid()), Some(meta.gid())).map_err(err("chown", dst))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Writes version `files` of a volume at `dir` as kubelet's atomic
    /// writer does.
    fn kubelet_write(dir: &Path, version: &str, files: &[(&str, &str)]) {
        let data = format!("..{version}");
        fs::create_dir(dir.join(&data)).unwrap();
        for (k, v) in files {
            let p = dir.join(&data).join(k);
            fs::create_dir_all(p.parent().unwrap()).unwrap();
            fs::write(p, v).unwrap();
        }
        let old = fs::read_link(dir.join(DATA_LINK)).ok();
        symlink(&data, dir.join(DATA_TMP)).unwrap();
        fs::rename(dir.join(DATA_TMP), dir.join(DATA_LINK)).unwrap();
        let top: BTreeSet<&str> = files
            .iter()
            .map(|(k, _)| k.split('/').next().unwrap())
            .collect();
        for t in &top {
            let l = dir.join(t);
            if fs::symlink_metadata(&l).is_err() {
                symlink(Path::new(DATA_LINK).join(t), l).unwrap();
            }
        }
        for e in fs::read_dir(dir).unwrap() {
            let n = e.unwrap().file_name().into_string().unwrap();
            if !n.starts_with("..") && !top.contains(n.as_str()) {
                fs::remove_file(dir.join(n)).unwrap();
            }
        }
        if let Some(old) = old {
            fs::remove_dir_all(dir.join(old)).unwrap();
        }
    }

    /// Every entry under `dir`: relative path, and a link's target or a
    /// file's content or "dir".
    fn tree(dir: &Path) -> Vec<(String, String)> {
        let mut out = Vec::new();
        fn walk(root: &Path, dir: &Path, out: &mut Vec<(String, String)>) {
            for e in fs::read_dir(dir).unwrap() {
                let p = e.unwrap().path();
                let rel = p.strip_prefix(root).unwrap().display().to_string();
                let m = fs::symlink_metadata(&p).unwrap();
                if m.is_symlink() {
                    out.push((rel, fs::read_link(&p).unwrap().display().to_string()));
                } else if m.is_dir() {
                    out.push((rel, "dir".into()));
                    walk(root, &p, out);
                } else {
                    out.push((rel, fs::read_to_string(&p).unwrap()));
                }
            }
        }
        walk(dir, dir, &mut out);
        out.sort();
        out
    }

    #[test]
    fn the_copy_follows_the_writer_version_by_version() {
        let host = tempfile::tempdir().unwrap();
        let copy = tempfile::tempdir().unwrap();
        let versions: [&[(&str, &str)]; 3] = [
            &[("a", "1"), ("b", "1")],
            &[("a", "2"), ("c/d", "2")],
            &[("c/e", "3")],
        ];
        for (i, files) in versions.iter().enumerate() {
            kubelet_write(host.path(), &format!("v{i}"), files);
            let name = fs::read_link(host.path().join(DATA_LINK)).unwrap();
            apply(host.path(), copy.path(), name.to_str().unwrap(), "c1/0").unwrap();
            assert_eq!(tree(copy.path()), tree(host.path()), "version {i}");
            // Applying the same version again changes nothing.
            apply(host.path(), copy.path(), name.to_str().unwrap(), "c1/0").unwrap();
            assert_eq!(tree(copy.path()), tree(host.path()), "version {i} again");
        }
    }

    #[test]
    fn modes_survive_the_copy() {
        let host = tempfile::tempdir().unwrap();
        let copy = tempfile::tempdir().unwrap();
        kubelet_write(host.path(), "v0", &[("secret", "s")]);
        let f = host.path().join("..v0/secret");
        fs::set_permissions(&f, fs::Permissions::from_mode(0o400)).unwrap();
        apply(host.path(), copy.path(), "..v0", "c1/0").unwrap();
        let m = fs::metadata(copy.path().join("secret")).unwrap();
        assert_eq!(m.mode() & 0o7777, 0o400);
        assert_eq!(fs::read_to_string(copy.path().join("secret")).unwrap(), "s");
    }

    #[test]
    fn names_that_are_not_data_directories_are_refused_by_name() {
        let d = tempfile::tempdir().unwrap();
        for bad in [
            "..data",
            "..data_tmp",
            "..",
            "...",
            "x",
            "../etc",
            "..a/b",
            "",
        ] {
            let e = apply(d.path(), d.path(), bad, "c1/3").unwrap_err();
            assert!(matches!(e, VolumeError::BadName { .. }), "{bad}: {e}");
            assert!(e.to_string().contains("c1/3"), "{e}");
        }
        assert!(is_data_dir_name("..2026_12_06_20_30_00.123456789"));
    }

    #[test]
    fn a_volume_over_the_limit_is_refused_and_leaves_no_half_copy() {
        let host = tempfile::tempdir().unwrap();
        let copy = tempfile::tempdir().unwrap();
        kubelet_write(host.path(), "v0", &[("small", "x")]);
        let big = File::create(host.path().join("..v0/big")).unwrap();
        big.set_len(MAX_BYTES + 1).unwrap();
        let e = apply(host.path(), copy.path(), "..v0", "c1/0").unwrap_err();
        assert!(matches!(e, VolumeError::TooLarge { .. }), "{e}");
        assert_eq!(fs::read_dir(copy.path()).unwrap().count(), 0);
    }
}
