//! Kernel loading for a direct boot, in either of two formats, told apart
//! by the file's first bytes:
//!
//! - an ELF `vmlinux` with a PVH entry note (linux-loader finds it): the
//!   `hvm_start_info` block with its module list and e820-style memory map;
//!   the boot vCPU starts at the PVH entry in 32-bit protected mode, paging
//!   off, %rbx pointing at the start info (the PVH boot ABI);
//! - a `bzImage`: its protected-mode part at 1 MiB, the zero page
//!   (`boot_params`: the image's setup header, command line, initramfs,
//!   e820 table); the boot vCPU starts at the 64-bit entry (load address +
//!   0x200) in long mode with an identity map, %rsi pointing at the zero
//!   page (Documentation/x86/boot.rst, "64-bit Boot Protocol").
//!
//! Both get the command line and the initramfs near the top of low memory.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use linux_loader::loader::bootparam::{boot_e820_entry, boot_params};
use linux_loader::loader::{BzImage, Elf, KernelLoader, PvhBootCapability};
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
/// The zero page (`boot_params`) of a bzImage boot.
pub const ZERO_PAGE: u64 = 0x7000;
/// The command line, at most [`CMDLINE_MAX`] bytes with its NUL.
pub const CMDLINE: u64 = 0x2_0000;
pub const CMDLINE_MAX: usize = 4096;
/// "xEn3" with the 0x80 bit clear, as the PVH ABI defines it.
pub const START_INFO_MAGIC: u32 = 0x336e_c578;
const E820_RAM: u32 = 1;
/// The bzImage's 64-bit entry, relative to where it is loaded.
const BZIMAGE_ENTRY_64: u64 = 0x200;
/// Boot protocol 2.12 brought `xloadflags` and its XLF_KERNEL_64 bit.
const BOOT_PROTOCOL_2_12: u16 = 0x020c;
const XLF_KERNEL_64: u16 = 1;
/// "Undefined" boot loader id, as boot.rst asks of loaders without one.
const LOADER_UNDEFINED: u8 = 0xff;
/// loadflags bit: the protected-mode code is loaded at 0x100000.
const LOADED_HIGH: u8 = 1;

#[derive(Debug, thiserror::Error)]
pub enum BootError {
    #[error(
        "kernel {path}: {source}; pass the guest's vmlinux or bzImage (`make guest-image` builds both)"
    )]
    KernelOpen {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("kernel {path} is neither a loadable ELF vmlinux nor a bzImage: {why}")]
    KernelLoad { path: PathBuf, why: String },
    #[error("bzImage {0} has no 64-bit entry (boot protocol 2.12 with XLF_KERNEL_64); use a 64-bit kernel from Linux 3.8 or later")]
    No64BitEntry(PathBuf),
    #[error("kernel command line is {len} bytes; kernel {path} takes at most {max}")]
    CmdlineTooLongForKernel { len: usize, max: u32, path: PathBuf },
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

/// Where and how the boot vCPU starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BootEntry {
    /// 32-bit protected mode, paging off, at `entry`; %rbx = `start_info`.
    Pvh { entry: u64, start_info: u64 },
    /// 64-bit long mode, identity-mapped, at `entry`; %rsi = `boot_params`.
    Linux64 { entry: u64, boot_params: u64 },
}

impl BootEntry {
    pub fn entry(&self) -> u64 {
        match *self {
            Self::Pvh { entry, .. } | Self::Linux64 { entry, .. } => entry,
        }
    }
}

/// A kernel in guest memory: where it starts, the end of what it may
/// overwrite while starting (a bzImage decompresses itself), and the
/// bzImage's setup header.
struct Loaded {
    entry: u64,
    reserved_end: u64,
    bzimage: Option<linux_loader::loader::bootparam::setup_header>,
}

fn load_kernel(mem: &GuestMemoryMmap, path: &Path) -> Result<Loaded, BootError> {
    let mut file = File::open(path).map_err(|source| BootError::KernelOpen {
        path: path.to_path_buf(),
        source,
    })?;
    let bad = |why: String| BootError::KernelLoad {
        path: path.to_path_buf(),
        why,
    };
    let mut magic = [0u8; 4];
    file.read_exact(&mut magic)
        .and_then(|_| file.seek(SeekFrom::Start(0)))
        .map_err(|e| bad(e.to_string()))?;
    if magic == *b"\x7fELF" {
        let loaded = Elf::load(mem, None, &mut file, Some(GuestAddress(HIGH_RAM_START)))
            .map_err(|e| bad(e.to_string()))?;
        let PvhBootCapability::PvhEntryPresent(entry) = loaded.pvh_boot_cap else {
            return Err(BootError::NoPvh(path.to_path_buf()));
        };
        return Ok(Loaded {
            entry: entry.0,
            reserved_end: loaded.kernel_end,
            bzimage: None,
        });
    }
    let loaded = BzImage::load(mem, None, &mut file, Some(GuestAddress(HIGH_RAM_START)))
        .map_err(|e| bad(format!("not ELF, and as a bzImage: {e}")))?;
    let hdr = loaded
        .setup_header
        .ok_or_else(|| bad("no setup header".into()))?;
    let (version, xloadflags) = (hdr.version, hdr.xloadflags);
    if version < BOOT_PROTOCOL_2_12 || xloadflags & XLF_KERNEL_64 == 0 {
        return Err(BootError::No64BitEntry(path.to_path_buf()));
    }
    // The decompressor writes the kernel at pref_address (or above, when
    // relocated) and needs init_size bytes there.
    let (pref, init) = (hdr.pref_address, u64::from(hdr.init_size));
    Ok(Loaded {
        entry: loaded.kernel_load.0 + BZIMAGE_ENTRY_64,
        reserved_end: loaded.kernel_end.max(pref + init),
        bzimage: Some(hdr),
    })
}

/// Loads kernel (ELF with PVH entry, or bzImage), initramfs and command
/// line into `mem` (`ram_size` bytes of RAM) and writes the start info or
/// zero page that describes them.
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
    let loaded = load_kernel(mem, kernel)?;
    if let Some(hdr) = &loaded.bzimage {
        let max = hdr.cmdline_size;
        if cmdline.len() > max as usize {
            return Err(BootError::CmdlineTooLongForKernel {
                len: cmdline.len(),
                max,
                path: kernel.to_path_buf(),
            });
        }
    }
    let write = |at: u64, bytes: &[u8]| {
        mem.write_slice(bytes, GuestAddress(at))
            .map_err(|_| BootError::Write(at))
    };

    let mut cmd = cmdline.as_bytes().to_vec();
    cmd.push(0);
    write(CMDLINE, &cmd)?;

    let mut module = None;
    if let Some(path) = initramfs {
        let initramfs_err = |source| BootError::Initramfs {
            path: path.to_path_buf(),
            source,
        };
        let mut file = File::open(path).map_err(initramfs_err)?;
        let size = file.metadata().map_err(initramfs_err)?.len();
        let mut limit = ram_size.min(MMIO_GAP_START);
        if let Some(hdr) = &loaded.bzimage {
            limit = limit.min(u64::from(hdr.initrd_addr_max) + 1);
        }
        let kernel_end = loaded.reserved_end;
        let addr = limit
            .checked_sub(size)
            .map(|a| a & !0xfff)
            .filter(|&a| a >= kernel_end.next_multiple_of(0x1000))
            .ok_or(BootError::InitramfsTooLarge {
                size,
                kernel_end,
                limit,
            })?;
        // Straight from the file into guest memory: no copy on the heap.
        mem.read_exact_volatile_from(GuestAddress(addr), &mut file, size as usize)
            .map_err(|e| initramfs_err(std::io::Error::other(e.to_string())))?;
        module = Some((addr, size));
    }
    let map = memory_map(ram_size);
    if let Some(hdr) = loaded.bzimage {
        let mut params = boot_params {
            hdr,
            ..Default::default()
        };
        params.hdr.type_of_loader = LOADER_UNDEFINED;
        params.hdr.loadflags |= LOADED_HIGH;
        params.hdr.cmd_line_ptr = CMDLINE as u32;
        if let Some((addr, size)) = module {
            params.hdr.ramdisk_image = addr as u32;
            params.hdr.ramdisk_size = size as u32;
        }
        for (slot, e) in params.e820_table.iter_mut().zip(&map) {
            *slot = boot_e820_entry {
                addr: e.addr,
                size: e.size,
                r#type: e.type_,
            };
        }
        params.e820_entries = map.len() as u8;
        write(ZERO_PAGE, params.as_slice())?;
        return Ok(BootEntry::Linux64 {
            entry: loaded.entry,
            boot_params: ZERO_PAGE,
        });
    }
    let mut info = StartInfo {
        magic: START_INFO_MAGIC,
        version: 1,
        cmdline_paddr: CMDLINE,
        memmap_paddr: MEMMAP,
        ..Default::default()
    };
    if let Some((paddr, size)) = module {
        let entry = ModlistEntry {
            paddr,
            size,
            ..Default::default()
        };
        write(MODLIST, entry.as_slice())?;
        info.nr_modules = 1;
        info.modlist_paddr = MODLIST;
    }
    for (i, e) in map.iter().enumerate() {
        write(
            MEMMAP + (i * std::mem::size_of::<MemmapEntry>()) as u64,
            e.as_slice(),
        )?;
    }
    info.memmap_entries = map.len() as u32;
    write(START_INFO, info.as_slice())?;
    Ok(BootEntry::Pvh {
        entry: loaded.entry,
        start_info: START_INFO,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::GuestRam;

    /// A file of the guest image; the tests that load one are `#[ignore]`d
    /// (`make test` runs them after `make guest-image`).
    fn guest_file(name: &str) -> PathBuf {
        let p = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../target/guest")
            .join(name);
        assert!(p.is_file(), "{} missing: make guest-image", p.display());
        p
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
    #[ignore = "needs the guest image (make test)"]
    fn our_guest_kernel_loads_with_its_pvh_entry_initramfs_and_cmdline() {
        let kernel = guest_file("vmlinux");
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
        let BootEntry::Pvh { entry, start_info } = boot else {
            panic!("an ELF kernel boots through PVH: {boot:?}");
        };
        assert!((HIGH_RAM_START..64 << 20).contains(&entry), "{boot:?}");
        assert_eq!(start_info, START_INFO);
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
    #[ignore = "needs the guest image (make test)"]
    fn our_bzimage_loads_with_a_zero_page_for_the_64_bit_entry() {
        let kernel = guest_file("bzImage");
        let ram = GuestRam::new(256).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let initrd = dir.path().join("initrd");
        std::fs::write(&initrd, vec![0xa5; 2 << 20]).unwrap();
        let cmdline = "console=ttyS0 reboot=t";
        let boot = load(&ram.memory, ram.size, &kernel, Some(&initrd), cmdline).unwrap();
        assert_eq!(
            boot,
            BootEntry::Linux64 {
                entry: HIGH_RAM_START + 0x200,
                boot_params: ZERO_PAGE
            }
        );
        let params: boot_params = ram.memory.read_obj(GuestAddress(ZERO_PAGE)).unwrap();
        let hdr = params.hdr;
        let (magic, loader, flags) = (hdr.header, hdr.type_of_loader, hdr.loadflags);
        assert_eq!((magic, loader), (0x5372_6448, LOADER_UNDEFINED));
        assert_ne!(flags & LOADED_HIGH, 0);
        let (cmd, image, size) = (hdr.cmd_line_ptr, hdr.ramdisk_image, hdr.ramdisk_size);
        assert_eq!((u64::from(cmd), size), (CMDLINE, 2 << 20));
        let mut read = vec![0u8; cmdline.len() + 1];
        ram.memory
            .read_slice(&mut read, GuestAddress(CMDLINE))
            .unwrap();
        assert_eq!(&read[..cmdline.len()], cmdline.as_bytes());
        assert_eq!(read[cmdline.len()], 0);
        // The initramfs sits clear of where the kernel decompresses itself.
        let (pref, init) = (hdr.pref_address, u64::from(hdr.init_size));
        assert!(
            u64::from(image) >= pref + init,
            "{image:#x} {pref:#x} {init:#x}"
        );
        assert_eq!(u64::from(image) + (2 << 20), 256 << 20);
        let first: u8 = ram.memory.read_obj(GuestAddress(image.into())).unwrap();
        assert_eq!(first, 0xa5);
        let entries = params.e820_entries as usize;
        assert_eq!(entries, 2);
        let e820: Vec<(u64, u64, u32)> = params.e820_table[..entries]
            .iter()
            .map(|e| (e.addr, e.size, e.r#type))
            .collect();
        let want: Vec<(u64, u64, u32)> = memory_map(256 << 20)
            .iter()
            .map(|e| (e.addr, e.size, e.type_))
            .collect();
        assert_eq!(e820, want);
        // The protected-mode code is in place: the 64-bit entry's first bytes
        // equal the file's at the same offset past the setup sectors.
        let bytes = std::fs::read(&kernel).unwrap();
        let setup = (usize::from(hdr.setup_sects) + 1) * 512;
        let mut at_entry = [0u8; 16];
        ram.memory
            .read_slice(&mut at_entry, GuestAddress(HIGH_RAM_START + 0x200))
            .unwrap();
        assert_eq!(at_entry, bytes[setup + 0x200..setup + 0x210]);
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
    }

    #[test]
    #[ignore = "needs the guest image (make test)"]
    fn an_initramfs_too_large_for_memory_is_refused() {
        let ram = GuestRam::new(64).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let kernel = guest_file("vmlinux");
        let big = dir.path().join("big");
        std::fs::write(&big, vec![0u8; 63 << 20]).unwrap();
        let e = load(&ram.memory, ram.size, &kernel, Some(&big), "").unwrap_err();
        assert!(matches!(e, BootError::InitramfsTooLarge { .. }), "{e}");
    }
}
