//! Guest memory: one memfd (so vhost-user daemons can map it too), mapped
//! at guest physical 0 up to the 32-bit MMIO gap and continued above 4 GiB.

use std::fs::File;
use std::os::fd::FromRawFd;

use vm_memory::{FileOffset, GuestAddress, GuestMemoryMmap};

/// Start of the hole below 4 GiB kept free for MMIO (virtio-mmio, LAPIC,
/// IOAPIC).
pub const MMIO_GAP_START: u64 = 0xC000_0000;
/// End of the hole: RAM resumes at 4 GiB.
pub const MMIO_GAP_END: u64 = 0x1_0000_0000;
/// Less than this cannot boot our guest; refuse it up front.
pub const MIN_MEMORY_MIB: u64 = 64;
/// More than this is a typo, not a microVM.
pub const MAX_MEMORY_MIB: u64 = 1 << 20;

#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    #[error("guest memory of {0} MiB is too small: husk-vmm needs at least {MIN_MEMORY_MIB} MiB")]
    TooSmall(u64),
    #[error("guest memory of {0} MiB is too large (at most {MAX_MEMORY_MIB} MiB)")]
    TooLarge(u64),
    #[error("create the guest memory memfd")]
    Memfd(#[source] std::io::Error),
    #[error("map guest memory")]
    Map(#[source] vm_memory::mmap::FromRangesError),
}

/// Guest RAM ranges for `size` bytes: (guest address, length, memfd offset).
pub fn ranges(size: u64) -> Vec<(u64, u64, u64)> {
    if size <= MMIO_GAP_START {
        return vec![(0, size, 0)];
    }
    vec![
        (0, MMIO_GAP_START, 0),
        (MMIO_GAP_END, size - MMIO_GAP_START, MMIO_GAP_START),
    ]
}

/// The guest's RAM and the memfd behind it.
pub struct GuestRam {
    pub memory: GuestMemoryMmap,
    pub memfd: File,
    pub size: u64,
}

impl GuestRam {
    pub fn new(mib: u64) -> Result<Self, MemoryError> {
        if mib < MIN_MEMORY_MIB {
            return Err(MemoryError::TooSmall(mib));
        }
        if mib > MAX_MEMORY_MIB {
            return Err(MemoryError::TooLarge(mib));
        }
        let size = mib << 20;
        // SAFETY: memfd_create with a NUL-terminated name and flags; the
        // returned descriptor is checked and then owned by the File.
        let fd = unsafe { libc::memfd_create(c"husk-guest-ram".as_ptr(), libc::MFD_CLOEXEC) };
        if fd < 0 {
            return Err(MemoryError::Memfd(std::io::Error::last_os_error()));
        }
        // SAFETY: fd is a fresh descriptor nothing else owns.
        let memfd = unsafe { File::from_raw_fd(fd) };
        memfd.set_len(size).map_err(MemoryError::Memfd)?;
        let regions: Vec<_> = ranges(size)
            .into_iter()
            .map(|(addr, len, off)| {
                let file = memfd.try_clone().map_err(MemoryError::Memfd)?;
                Ok((
                    GuestAddress(addr),
                    len as usize,
                    Some(FileOffset::new(file, off)),
                ))
            })
            .collect::<Result<_, MemoryError>>()?;
        let memory =
            GuestMemoryMmap::from_ranges_with_files(regions.iter()).map_err(MemoryError::Map)?;
        Ok(Self {
            memory,
            memfd,
            size,
        })
    }
}

#[cfg(test)]
mod tests {
    use vm_memory::{Bytes, GuestMemoryBackend};

    use super::*;

    #[test]
    fn small_guests_fit_below_the_gap() {
        assert_eq!(ranges(512 << 20), vec![(0, 512 << 20, 0)]);
        assert_eq!(ranges(MMIO_GAP_START), vec![(0, MMIO_GAP_START, 0)]);
    }

    #[test]
    fn large_guests_skip_the_mmio_gap() {
        let r = ranges(4 << 30);
        assert_eq!(r[0], (0, MMIO_GAP_START, 0));
        assert_eq!(
            r[1],
            (MMIO_GAP_END, (4 << 30) - MMIO_GAP_START, MMIO_GAP_START)
        );
        let total: u64 = r.iter().map(|x| x.1).sum();
        assert_eq!(total, 4 << 30);
    }

    #[test]
    fn memory_limits_are_named() {
        let e = GuestRam::new(16).err().expect("16 MiB accepted");
        assert!(e.to_string().contains("at least 64 MiB"), "{e}");
        assert!(GuestRam::new(MAX_MEMORY_MIB + 1).is_err());
    }

    #[test]
    fn guest_memory_is_backed_by_the_memfd() {
        let ram = GuestRam::new(64).expect("64 MiB");
        ram.memory
            .write_obj(0xdead_beef_u32, GuestAddress(0x1000))
            .expect("write");
        let mut buf = [0u8; 4];
        std::os::unix::fs::FileExt::read_exact_at(&ram.memfd, &mut buf, 0x1000).expect("read");
        assert_eq!(u32::from_le_bytes(buf), 0xdead_beef);
        assert_eq!(ram.memory.num_regions(), 1);
    }
}
