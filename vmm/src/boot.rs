//! Kernel loading for a direct PVH boot: the ELF `vmlinux` through
//! linux-loader (which finds the PVH entry note), the initramfs near the top
//! of low memory, the command line, and the `hvm_start_info` block with its
//! module list and e820-style memory map. The boot vCPU then starts at the
//! PVH entry in 32-bit protected mode, paging off, with %rbx pointing at the
//! start info (the PVH boot ABI).

use std::fs::File;
use std::path::{Path, PathBuf};

use linux_loader::loader::{Elf, KernelLoader, PvhBootCapability};
use vm_memory::{ByteValued, Bytes, GuestAddress, GuestMemoryMmap};

use crate::memory::MMIO_GAP_START;

/// Where the kernel's loadable segments may start (1 MiB).
pub const HIGH_RAM_START: u64 = 0x10_0000;
/// End of conventional memory below the EBDA.
const LOW_RAM_END: u64 = 0x9_fc00;
/// hvm_start_info, its module list and memory map.
pub const START_INFO: u64 = 0x6000;
const MODLIST: u64 = 0x6100;
const MEMMAP: u64 = 0x6200;
/// The command line, at most [`CMDLINE_MAX`] bytes with its NUL.
pub const CMDLINE: u64 = 0x2_0000;
pub const CMDLINE_MAX: usize = 4096;
/// "xEn3" with the 0x80 bit clear, as the PVH ABI defines it.
pub const START_INFO_MAGIC: u32 = 0x336e_c578;
const E820_RAM: u32 = 1;

#[derive(Debug, thiserror::Error)]
pub enum BootError {
    #[error(
        "kernel {path}: {source}; pass the guest's ELF vmlinux (`make guest-image` builds it)"
    )]
    KernelOpen {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("kernel {path} is not a loadable ELF kernel: {why}")]
    KernelLoad { path: PathBuf, why: String },
    #[error("kernel {0} has no PVH entry note; build it with CONFIG_PVH=y")]
    NoPvh(PathBuf),
    #[error("initramfs {path}: {source}")]
    Initramfs {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("initramfs of {size} bytes does not fit between the kernel (ends at {kernel_end:#x}) and {limit:#x}; give the VM more memory")]
    InitramfsTooLarge {
        size: u64,
        kernel_end: u64,
        limit: u64,
    },
    #[error("kernel command line is {0} bytes; at most {max} fit", max = CMDLINE_MAX - 1)]
    CmdlineTooLong(usize),
    #[error("kernel command line contains a NUL byte")]
    CmdlineNul,
    #[error("writing boot data at {0:#x} into guest memory")]
    Write(u64),
}

// The PVH start-of-day structures (Xen's arch-x86/hvm/start_info.h, version 1).
#[repr(C)]
#[derive(Clone, Copy, Default, Debug)]
pub struct StartInfo {
    pub magic: u32,
    pub version: u32,
    pub flags: u32,
    pub nr_modules: u32,
    pub modlist_paddr: u64,
    pub cmdline_paddr: u64,
    pub rsdp_paddr: u64,
    pub memmap_paddr: u64,
    pub memmap_entries: u32,
    pub reserved: u32,
}

#[repr(C)]
#[derive(Clone, Copy, Default, Debug)]
pub struct ModlistEntry {
    pub paddr: u64,
    pub size: u64,
    pub cmdline_paddr: u64,
    pub reserved: u64,
}

#[repr(C)]
#[derive(Clone, Copy, Default, Debug, PartialEq, Eq)]
pub struct MemmapEntry {
    pub addr: u64,
    pub size: u64,
    pub type_: u32,
    pub reserved: u32,
}

// SAFETY: plain #[repr(C)] integers without padding holes that matter: any
// byte pattern is a valid value.
unsafe impl ByteValued for StartInfo {}
// SAFETY: as above.
unsafe impl ByteValued for ModlistEntry {}
// SAFETY: as above.
unsafe impl ByteValued for MemmapEntry {}

/// The guest's RAM as an e820-style map (the MMIO gap left out).
pub fn memory_map(ram_size: u64) -> Vec<MemmapEntry> {
    let ram = |addr, size| MemmapEntry {
        addr,
        size,
        type_: E820_RAM,
        reserved: 0,
    };
    let mut map = vec![ram(0, LOW_RAM_END)];
    let low_end = ram_size.min(MMIO_GAP_START);
    map.push(ram(HIGH_RAM_START, low_end - HIGH_RAM_START));
    if ram_size > MMIO_GAP_START {
        map.push(ram(crate::memory::MMIO_GAP_END, ram_size - MMIO_GAP_START));
    }
    map
}

/// Where the boot vCPU starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BootEntry {
    pub entry: u64,
    pub start_info: u64,
}

/// Loads kernel, initramfs and command line into `mem` (`ram_size` bytes
/// of RAM) and writes the PVH start info.
pub fn load(
    mem: &GuestMemoryMmap,
    ram_size: u64,
    kernel: &Path,
    initramfs: Option<&Path>,
    cmdline: &str,
) -> Result<BootEntry, BootError> {
    if cmdline.len() >= CMDLINE_MAX {
        return Err(BootError::CmdlineTooLong(cmdline.len()));
    }
    if cmdline.contains('\0') {
        return Err(BootError::CmdlineNul);
    }
    let mut file = File::open(kernel).map_err(|source| BootError::KernelOpen {
        path: kernel.to_path_buf(),
        source,
    })?;
    let loaded =
        Elf::load(mem, None, &mut file, Some(GuestAddress(HIGH_RAM_START))).map_err(|e| {
            BootError::KernelLoad {
                path: kernel.to_path_buf(),
                why: e.to_string(),
            }
        })?;
    let PvhBootCapability::PvhEntryPresent(entry) = loaded.pvh_boot_cap else {
        return Err(BootError::NoPvh(kernel.to_path_buf()));
    };
    let write = |at: u64, bytes: &[u8]| {
        mem.write_slice(bytes, GuestAddress(at))
            .map_err(|_| BootError::Write(at))
    };

    let mut cmd = cmdline.as_bytes().to_vec();
    cmd.push(0);
    write(CMDLINE, &cmd)?;

    let mut info = StartInfo {
        magic: START_INFO_MAGIC,
        version: 1,
        cmdline_paddr: CMDLINE,
        memmap_paddr: MEMMAP,
        ..Default::default()
    };
    if let Some(path) = initramfs {
        let data = std::fs::read(path).map_err(|source| BootError::Initramfs {
            path: path.to_path_buf(),
            source,
        })?;
        let size = data.len() as u64;
        let limit = ram_size.min(MMIO_GAP_START);
        let kernel_end = loaded.kernel_end;
        let addr = limit
            .checked_sub(size)
            .map(|a| a & !0xfff)
            .filter(|&a| a >= kernel_end.next_multiple_of(0x1000))
            .ok_or(BootError::InitramfsTooLarge {
                size,
                kernel_end,
                limit,
            })?;
        write(addr, &data)?;
        let module = ModlistEntry {
            paddr: addr,
            size,
            ..Default::default()
        };
        write(MODLIST, module.as_slice())?;
        info.nr_modules = 1;
        info.modlist_paddr = MODLIST;
    }
    let map = memory_map(ram_size);
    for (i, e) in map.iter().enumerate() {
        write(
            MEMMAP + (i * std::mem::size_of::<MemmapEntry>()) as u64,
            e.as_slice(),
        )?;
    }
    info.memmap_entries = map.len() as u32;
    write(START_INFO, info.as_slice())?;
    Ok(BootEntry {
        entry: entry.0,
        start_info: START_INFO,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::GuestRam;

    fn guest_kernel() -> Option<PathBuf> {
        let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/guest/vmlinux");
        if p.is_file() {
            return Some(p);
        }
        assert_ne!(
            std::env::var("HUSK_E2E").as_deref(),
            Ok("1"),
            "{} missing: make guest-image",
            p.display()
        );
        eprintln!("skipping: no guest kernel at {}", p.display());
        None
    }

    #[test]
    fn the_memory_map_leaves_out_legacy_holes_and_the_mmio_gap() {
        let m = memory_map(512 << 20);
        assert_eq!(m.len(), 2);
        assert_eq!((m[0].addr, m[0].size), (0, LOW_RAM_END));
        assert_eq!(
            (m[1].addr, m[1].addr + m[1].size),
            (HIGH_RAM_START, 512 << 20)
        );
        let m = memory_map(4 << 30);
        assert_eq!(m.len(), 3);
        assert_eq!(m[1].addr + m[1].size, MMIO_GAP_START);
        assert_eq!(m[2].addr, 1 << 32);
        assert_eq!(
            m.iter().map(|e| e.size).sum::<u64>(),
            (4 << 30) - HIGH_RAM_START + LOW_RAM_END
        );
    }

    #[test]
    fn our_guest_kernel_loads_with_its_pvh_entry_initramfs_and_cmdline() {
        let Some(kernel) = guest_kernel() else {
            return;
        };
        let ram = GuestRam::new(256).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let initrd = dir.path().join("initrd");
        std::fs::write(&initrd, vec![0x5a; 3 << 20]).unwrap();
        let boot = load(
            &ram.memory,
            ram.size,
            &kernel,
            Some(&initrd),
            "console=ttyS0 quiet",
        )
        .unwrap();
        assert!(
            boot.entry >= HIGH_RAM_START && boot.entry < 64 << 20,
            "{boot:?}"
        );
        let info: StartInfo = ram.memory.read_obj(GuestAddress(START_INFO)).unwrap();
        assert_eq!(
            (info.magic, info.version, info.nr_modules),
            (START_INFO_MAGIC, 1, 1)
        );
        let module: ModlistEntry = ram
            .memory
            .read_obj(GuestAddress(info.modlist_paddr))
            .unwrap();
        assert_eq!(module.size, 3 << 20);
        assert_eq!(module.paddr % 0x1000, 0);
        assert_eq!(module.paddr + module.size, 256 << 20);
        let first: u8 = ram.memory.read_obj(GuestAddress(module.paddr)).unwrap();
        assert_eq!(first, 0x5a);
        let mut cmd = [0u8; 20];
        ram.memory
            .read_slice(&mut cmd, GuestAddress(info.cmdline_paddr))
            .unwrap();
        assert_eq!(&cmd, b"console=ttyS0 quiet\0");
        let e: MemmapEntry = ram
            .memory
            .read_obj(GuestAddress(info.memmap_paddr + 16 + 8))
            .unwrap();
        assert_eq!((e.addr, info.memmap_entries), (HIGH_RAM_START, 2));
    }

    #[test]
    fn bad_inputs_are_refused_by_name() {
        let ram = GuestRam::new(64).unwrap();
        let e = load(
            &ram.memory,
            ram.size,
            Path::new("/nonexistent/vmlinux"),
            None,
            "",
        )
        .unwrap_err();
        assert!(e.to_string().contains("/nonexistent/vmlinux"), "{e}");
        let dir = tempfile::tempdir().unwrap();
        let junk = dir.path().join("junk");
        std::fs::write(&junk, b"this is not an ELF file at all, not even close").unwrap();
        let e = load(&ram.memory, ram.size, &junk, None, "").unwrap_err();
        assert!(matches!(e, BootError::KernelLoad { .. }), "{e}");
        assert!(e.to_string().contains("junk"), "{e}");
        let long = "x".repeat(CMDLINE_MAX);
        assert!(matches!(
            load(&ram.memory, ram.size, &junk, None, &long),
            Err(BootError::CmdlineTooLong(_))
        ));
        let Some(kernel) = guest_kernel() else {
            return;
        };
        let big = dir.path().join("big");
        std::fs::write(&big, vec![0u8; 63 << 20]).unwrap();
        let e = load(&ram.memory, ram.size, &kernel, Some(&big), "").unwrap_err();
        assert!(matches!(e, BootError::InitramfsTooLarge { .. }), "{e}");
    }
}
