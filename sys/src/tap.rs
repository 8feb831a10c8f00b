//! Taps: the runtime opens one for QEMU and husk-vmm for itself, the same
//! way.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;

/// Interface names are at most 15 bytes.
pub const IFNAMSIZ: usize = 16;

/// Opens tap `name` (`IFF_TAP | IFF_NO_PI | IFF_VNET_HDR`), making it if
/// it does not exist; it goes when its last descriptor closes, unless it
/// was made persistent.
pub fn open_tap(name: &str) -> io::Result<File> {
    const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
    const IFF_TAP: libc::c_short = 0x0002;
    const IFF_NO_PI: libc::c_short = 0x1000;
    const IFF_VNET_HDR: libc::c_short = 0x4000;
    #[repr(C)]
    struct IfReq {
        name: [u8; IFNAMSIZ],
        flags: libc::c_short,
        _pad: [u8; 22],
    }
    if name.is_empty() || name.len() >= IFNAMSIZ {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("interface name {name:?} is not 1 to 15 bytes"),
        ));
    }
    let tun = File::options()
        .read(true)
        .write(true)
        .open("/dev/net/tun")?;
    let mut req = IfReq {
        name: [0; IFNAMSIZ],
        flags: IFF_TAP | IFF_NO_PI | IFF_VNET_HDR,
        _pad: [0; 22],
    };
    req.name[..name.len()].copy_from_slice(name.as_bytes());
    // SAFETY: TUNSETIFF reads and writes a struct ifreq, which IfReq lays
    // out (16-byte name, flags, padding to 40 bytes); it lives across the
    // call.
    if unsafe { libc::ioctl(tun.as_raw_fd(), TUNSETIFF, &mut req) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(tun)
}
