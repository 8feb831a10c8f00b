//! A uid/gid of its own for each sandbox's VMM and vsock daemon, leased
//! from a configured range as Firecracker's jailer is given one per VM:
//! a process under another sandbox's id cannot signal, trace or open the
//! files of this one's, and no root process of the host is in its reach.
//!
//! A lease is an exclusive `flock` on `<state_dir>/.ids/<id>` (a name no
//! containerd namespace can have), held for as long as the sandbox lives:
//! it is never given to a second sandbox while the first holds it, and the
//! kernel releases it when its holder dies, so a killed shim leaks no id
//! (its VMM and daemons die with it). The holder removes the file before
//! it lets go; a taker that locked a file already removed tries again.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum IdError {
    #[error("cannot make the id lease directory {dir}")]
    Dir {
        dir: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot lease id {id} ({path})")]
    Lease {
        id: u32,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("all {count} ids from {base} are held by running sandboxes; raise jail.id_count in the husk config")]
    Exhausted { base: u32, count: u32 },
}

/// One id held for a sandbox until dropped.
#[derive(Debug)]
pub struct IdLease {
    id: u32,
    path: PathBuf,
    _lock: File,
}

impl Drop for IdLease {
    fn drop(&mut self) {
        // Removed while still locked: whoever opened it meanwhile sees,
        // once it has the lock, that it holds a removed file.
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Whether the locked `file` is still the one at `path`.
fn still_linked(file: &File, path: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (file.metadata(), std::fs::metadata(path)) {
        (Ok(held), Ok(now)) => {
            held.nlink() > 0 && held.ino() == now.ino() && held.dev() == now.dev()
        }
        _ => false,
    }
}

impl IdLease {
    /// Leases the first free id of `base..base + count`, starting the
    /// search at `start` (a sandbox's hash spreads them, so a lease rarely
    /// has to step over many held ones).
    pub fn take(dir: &Path, base: u32, count: u32, start: u32) -> Result<Self, IdError> {
        std::fs::DirBuilder::new()
            .recursive(true)
            .create(dir)
            .map_err(|source| IdError::Dir {
                dir: dir.to_path_buf(),
                source,
            })?;
        sweep(dir);
        let mut step = 0;
        while step < count {
            let id = base + (start.wrapping_add(step)) % count;
            let path = dir.join(id.to_string());
            let file = File::options()
                .create(true)
                .truncate(false)
                .write(true)
                .open(&path)
                .map_err(|source| IdError::Lease {
                    id,
                    path: path.clone(),
                    source,
                })?;
            // SAFETY: flock on a descriptor we own.
            if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
                if still_linked(&file, &path) {
                    return Ok(Self {
                        id,
                        path,
                        _lock: file,
                    });
                }
                // Its last holder removed it as we opened it: this id again.
                continue;
            }
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() != Some(libc::EWOULDBLOCK) {
                return Err(IdError::Lease {
                    id,
                    path,
                    source: e,
                });
            }
            step += 1;
        }
        Err(IdError::Exhausted { base, count })
    }

    /// The uid, which is also the gid.
    pub fn id(&self) -> u32 {
        self.id
    }
}

/// Removes the lease files nobody holds (their holder died without its
/// drop); each is locked first and removed while locked, as a holder's
/// drop does, so a sandbox that takes it meanwhile is not robbed.
pub fn sweep(dir: &Path) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let Ok(file) = File::options().write(true).open(e.path()) else {
            continue;
        };
        // SAFETY: flock on a descriptor we own.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0
            && still_linked(&file, &e.path())
        {
            let _ = std::fs::remove_file(e.path());
        }
    }
}

/// Where a configuration's leases are kept.
pub fn lease_dir(state_dir: &Path) -> PathBuf {
    state_dir.join(".ids")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_held_id_is_not_leased_again_until_it_is_dropped() {
        let d = tempfile::tempdir().unwrap();
        let a = IdLease::take(d.path(), 5000, 3, 1).unwrap();
        assert_eq!(a.id(), 5001);
        let b = IdLease::take(d.path(), 5000, 3, 1).unwrap();
        assert_eq!(b.id(), 5002);
        let c = IdLease::take(d.path(), 5000, 3, 1).unwrap();
        assert_eq!(c.id(), 5000, "the search wraps");
        let err = IdLease::take(d.path(), 5000, 3, 0).unwrap_err();
        assert!(
            err.to_string().contains("all 3 ids from 5000")
                && err.to_string().contains("jail.id_count"),
            "{err}"
        );
        drop(b);
        assert!(
            !d.path().join("5002").exists(),
            "a released lease leaves no file"
        );
        assert_eq!(IdLease::take(d.path(), 5000, 3, 0).unwrap().id(), 5002);
    }

    #[test]
    fn a_lease_held_by_another_process_is_skipped_and_freed_when_it_dies() {
        let d = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(d.path()).unwrap();
        let path = d.path().join("7000");
        std::fs::write(&path, "").unwrap();
        // flock(1) holds the lock in a process of its own.
        let mut holder = std::process::Command::new("flock")
            .args(["-x", "-o"])
            .arg(&path)
            .args(["sleep", "30"])
            .spawn()
            .unwrap();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        let skipped = loop {
            let l = IdLease::take(d.path(), 7000, 2, 0).unwrap();
            if l.id() == 7001 {
                break l;
            }
            drop(l);
            assert!(
                std::time::Instant::now() < deadline,
                "flock never took the lock"
            );
            std::thread::sleep(std::time::Duration::from_millis(20));
        };
        holder.kill().unwrap();
        holder.wait().unwrap();
        // Its file stays until a sweep (a take sweeps first).
        assert!(path.exists());
        sweep(d.path());
        assert!(!path.exists(), "a file nobody holds is swept");
        assert!(d.path().join("7001").exists(), "a held one is not");
        assert_eq!(IdLease::take(d.path(), 7000, 2, 0).unwrap().id(), 7000);
        drop(skipped);
    }
}
