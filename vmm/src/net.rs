//! virtio-net (type 1) served in the VMM over a tap the caller opened
//! (`IFF_TAP | IFF_NO_PI | IFF_VNET_HDR`). Offered: VERSION_1, MAC, MTU,
//! STATUS; no offloads, so every frame is whole and checksummed. The tap's
//! header size is set to the 12 bytes of `virtio_net_hdr_v1`: the tap's
//! header reaches the guest as it is (no flags, as no offload is on), and
//! the guest's is zeroed on its way to the tap, so no guest can ask the
//! host kernel for checksum or segmentation work it never negotiated.
//!
//! One worker thread per device waits on the tap, the two queue kicks
//! (ioeventfds) and a stop eventfd. The guest is not trusted: a chain that
//! points outside guest memory, loops, is empty, or holds more than a frame
//! fails the device (its worker stops, with the reason on stderr), never
//! the VMM.

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::sync::Arc;

use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

use crate::device_thread::{poll_fd, queue_from, wait, DeviceThread, Service, ThreadError};
use crate::seccomp::ThreadKind;
use crate::virtio_mmio::{QueueConfig, VirtioDevice, F_VERSION_1};

/// VIRTIO_NET_F_MTU, _MAC, _STATUS.
const F_MTU: u64 = 1 << 3;
const F_MAC: u64 = 1 << 5;
const F_STATUS: u64 = 1 << 16;
/// VIRTIO_NET_S_LINK_UP.
const LINK_UP: u16 = 1;
/// The virtio 1.x net header (`virtio_net_hdr_v1`).
pub const HDR_LEN: usize = 12;
/// Queue size offered to the guest.
const QUEUE_SIZE: u16 = 256;
const RX: usize = 0;
const TX: usize = 1;
const QUEUES: usize = 2;
/// The largest frame: no GSO is offered, so a frame is at most the MTU
/// plus an Ethernet header with two VLAN tags, plus the virtio header.
fn max_frame(mtu: u16) -> usize {
    HDR_LEN + usize::from(mtu) + 22
}

#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error("tap descriptor {fd}: {what}")]
    Tap {
        fd: RawFd,
        what: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("MTU {0} is not 68..=65535")]
    Mtu(u32),
    #[error(transparent)]
    Thread(#[from] ThreadError),
    #[error("queue {0}: the driver's ring addresses are outside guest memory")]
    QueueAddress(usize),
    // What the guest can get wrong; each fails the device.
    #[error("{queue} chain {head}: a descriptor outside guest memory ({addr:#x}, {len} bytes)")]
    OutOfRange {
        queue: &'static str,
        head: u16,
        addr: u64,
        len: u32,
    },
    #[error("{queue} chain {head}: {bytes} bytes, more than a frame ({max})")]
    TooLong {
        queue: &'static str,
        head: u16,
        bytes: usize,
        max: usize,
    },
    #[error("{queue} chain {head}: no usable buffer (empty, looping or of the wrong direction)")]
    Empty { queue: &'static str, head: u16 },
    #[error("{queue}: the ring: {0}", queue = .0)]
    Ring(&'static str, String),
}

/// A `--net` argument: `fd=N` (a tap queue the caller passed as
/// descriptor N) or `tap=NAME` (husk-vmm opens that tap, making it if it
/// does not exist), then `,mac=aa:bb:cc:dd:ee:ff[,mtu=M]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetSpec {
    pub source: TapSource,
    pub mac: [u8; 6],
    pub mtu: u32,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TapSource {
    Fd(RawFd),
    Name(String),
}

impl std::str::FromStr for NetSpec {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let mut source = None;
        let mut mac = None;
        let mut mtu = 1500;
        for part in s.split(',') {
            let (k, v) = part
                .split_once('=')
                .ok_or_else(|| format!("{part:?} is not key=value"))?;
            match k {
                "fd" => {
                    source = Some(TapSource::Fd(
                        v.parse::<RawFd>()
                            .ok()
                            .filter(|f| *f > 2)
                            .ok_or_else(|| format!("fd {v:?} is not a descriptor above 2"))?,
                    ))
                }
                "tap" => {
                    if v.is_empty() || v.len() >= husk_sys::tap::IFNAMSIZ || v.contains('/') {
                        return Err(format!("tap {v:?} is not an interface name"));
                    }
                    source = Some(TapSource::Name(v.to_owned()))
                }
                "mac" => {
                    mac = Some(
                        parse_mac(v)
                            .ok_or_else(|| format!("mac {v:?} is not aa:bb:cc:dd:ee:ff"))?,
                    )
                }
                "mtu" => {
                    mtu = v
                        .parse::<u32>()
                        .ok()
                        .filter(|m| (68..=65535).contains(m))
                        .ok_or_else(|| format!("mtu {v:?} is not 68..=65535"))?
                }
                other => return Err(format!("unknown key {other:?} (fd or tap, mac, mtu)")),
            }
        }
        Ok(NetSpec {
            source: source.ok_or("fd= or tap= is missing")?,
            mac: mac.ok_or("mac= is missing")?,
            mtu,
        })
    }
}

fn parse_mac(s: &str) -> Option<[u8; 6]> {
    let mut mac = [0u8; 6];
    let mut parts = s.split(':');
    for b in &mut mac {
        let p = parts.next()?;
        if p.len() != 2 {
            return None;
        }
        *b = u8::from_str_radix(p, 16).ok()?;
    }
    parts.next().is_none().then_some(mac)
}

/// The device: config space, the tap, and its worker thread (see
/// [`crate::device_thread`]).
pub struct NetDevice {
    mac: [u8; 6],
    mtu: u16,
    pub thread: DeviceThread<Serve>,
}

/// TUNSETVNETHDRSZ and TUNSETOFFLOAD.
const TUNSETVNETHDRSZ: libc::c_ulong = 0x4004_54d8;
const TUNSETOFFLOAD: libc::c_ulong = 0x4004_54d0;

impl NetDevice {
    /// A device on tap queue `tap` with `mac` and `mtu`.
    pub fn new(
        tap: File,
        mac: [u8; 6],
        mtu: u32,
        memory: GuestMemoryMmap,
    ) -> Result<Self, NetError> {
        let mtu = u16::try_from(mtu)
            .ok()
            .filter(|m| *m >= 68)
            .ok_or(NetError::Mtu(mtu))?;
        let fd = tap.as_raw_fd();
        let tap_err = |what| move |source| NetError::Tap { fd, what, source };
        let hdr = HDR_LEN as libc::c_int;
        // SAFETY: TUNSETVNETHDRSZ reads an int that lives across the call.
        if unsafe { libc::ioctl(fd, TUNSETVNETHDRSZ, &hdr) } != 0 {
            return Err(tap_err(
                "set its header size (is it a tap with IFF_VNET_HDR?)",
            )(io::Error::last_os_error()));
        }
        // SAFETY: TUNSETOFFLOAD takes its flags by value; 0 is none.
        if unsafe { libc::ioctl(fd, TUNSETOFFLOAD, 0 as libc::c_ulong) } != 0 {
            return Err(tap_err("turn offloads off")(io::Error::last_os_error()));
        }
        set_nonblocking(fd).map_err(tap_err("make it non-blocking"))?;
        Self::start(tap, mac, mtu, memory)
    }

    /// The device on a tap that is set up, with its worker thread started.
    fn start(tap: File, mac: [u8; 6], mtu: u16, memory: GuestMemoryMmap) -> Result<Self, NetError> {
        let serve = Serve {
            memory,
            tap: Arc::new(tap),
            mtu,
        };
        Ok(Self {
            mac,
            mtu,
            thread: DeviceThread::start("virtio-net", ThreadKind::Net, QUEUES, serve)?,
        })
    }

    fn config(&self) -> [u8; 12] {
        let mut c = [0u8; 12];
        c[..6].copy_from_slice(&self.mac);
        c[6..8].copy_from_slice(&LINK_UP.to_le_bytes());
        // max_virtqueue_pairs: one.
        c[8..10].copy_from_slice(&1u16.to_le_bytes());
        c[10..12].copy_from_slice(&self.mtu.to_le_bytes());
        c
    }
}

/// The worker thread's side: what it serves queues with.
pub struct Serve {
    memory: GuestMemoryMmap,
    tap: Arc<File>,
    mtu: u16,
}

impl Service for Serve {
    type Worker = Worker;
    type Error = NetError;

    fn worker(&self, queues: &[QueueConfig], call: EventFd) -> Result<Worker, NetError> {
        Worker::new(
            self.memory.clone(),
            queues,
            self.tap.clone(),
            call,
            self.mtu,
        )
    }

    fn serve(
        &self,
        worker: &mut Worker,
        kicks: &[EventFd],
        stop: &EventFd,
    ) -> Result<(), NetError> {
        worker.run(kicks, stop)
    }
}

impl VirtioDevice for NetDevice {
    fn device_type(&self) -> u32 {
        1
    }

    fn features(&self) -> u64 {
        F_VERSION_1 | F_MAC | F_MTU | F_STATUS
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE, QUEUE_SIZE]
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        crate::virtio_mmio::read_config_bytes(&self.config(), offset, data);
    }

    /// The MAC is the host's to give (the CNI link's); the driver's writes
    /// are ignored.
    fn write_config(&mut self, _offset: u64, _data: &[u8]) {}
}

fn set_nonblocking(fd: RawFd) -> io::Result<()> {
    // SAFETY: fcntl on a descriptor the caller owns, with integer arguments.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    // SAFETY: as above.
    if flags < 0 || unsafe { libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// The device's data path, separate from the thread so tests can drive it.
pub struct Worker {
    mem: GuestMemoryMmap,
    rx: Queue,
    tx: Queue,
    tap: Arc<File>,
    call: EventFd,
    max_frame: usize,
    /// A frame read from the tap that waits for a receive buffer.
    pending: Option<Vec<u8>>,
}

impl Worker {
    /// A data path over the driver's receive and transmit `queues` (in that
    /// order) in `mem`, frames of at most `mtu` plus headers, `call`
    /// signalled when chains were used. Refuses queues the driver placed
    /// outside guest memory.
    pub fn new(
        mem: GuestMemoryMmap,
        queues: &[QueueConfig],
        tap: Arc<File>,
        call: EventFd,
        mtu: u16,
    ) -> Result<Self, NetError> {
        let ring = |i: usize| {
            queues
                .get(i)
                .and_then(|q| queue_from(q, &mem))
                .ok_or(NetError::QueueAddress(i))
        };
        let (rx, tx) = (ring(RX)?, ring(TX)?);
        Ok(Self {
            mem,
            rx,
            tx,
            tap,
            call,
            max_frame: max_frame(mtu),
            pending: None,
        })
    }

    /// Serves the queues until `stop` is signalled or the guest breaks a
    /// rule.
    fn run(&mut self, kicks: &[EventFd], stop: &EventFd) -> Result<(), NetError> {
        // The tap, each kick, the stop.
        let mut fds: Vec<libc::pollfd> = std::iter::once(self.tap.as_raw_fd())
            .chain(kicks.iter().map(|k| k.as_raw_fd()))
            .chain([stop.as_raw_fd()])
            .map(poll_fd)
            .collect();
        let stopped = fds.len() - 1;
        loop {
            // Read the tap only while a frame can be placed.
            fds[0].events = if self.pending.is_none() {
                libc::POLLIN
            } else {
                0
            };
            wait(&mut fds, -1).map_err(|e| NetError::Ring("poll", e.to_string()))?;
            if fds[stopped].revents != 0 {
                return Ok(());
            }
            for (k, f) in kicks.iter().zip(&fds[1..]) {
                if f.revents != 0 {
                    let _ = k.read();
                }
            }
            let mut used = self.process_tx()?;
            used |= self.process_rx()?;
            if used {
                let _ = self.call.write(1);
            }
        }
    }

    /// Sends every frame the guest queued for transmission; true if any
    /// chain was used.
    pub fn process_tx(&mut self) -> Result<bool, NetError> {
        let mut used = false;
        let mut frame = Vec::with_capacity(self.max_frame);
        while let Some(chain) = self.tx.pop_descriptor_chain(&self.mem) {
            let head = chain.head_index();
            frame.clear();
            let mut any = false;
            for d in chain.readable() {
                any = true;
                let len = d.len() as usize;
                if frame.len() + len > self.max_frame {
                    return Err(NetError::TooLong {
                        queue: "tx",
                        head,
                        bytes: frame.len() + len,
                        max: self.max_frame,
                    });
                }
                let at = frame.len();
                frame.resize(at + len, 0);
                self.mem
                    .read_slice(&mut frame[at..], d.addr())
                    .map_err(|_| NetError::OutOfRange {
                        queue: "tx",
                        head,
                        addr: d.addr().0,
                        len: d.len(),
                    })?;
            }
            if !any || frame.len() < HDR_LEN {
                return Err(NetError::Empty { queue: "tx", head });
            }
            // No offload was negotiated: whatever the guest wrote in the
            // header (a GSO type, NEEDS_CSUM) the host kernel never sees.
            frame[..HDR_LEN].fill(0);
            // A frame the tap refuses (e.g. the link is down) is dropped,
            // as a NIC drops it; the chain is still returned.
            let _ = (&*self.tap).write(&frame);
            self.tx
                .add_used(&self.mem, head, 0)
                .map_err(|e| NetError::Ring("tx", e.to_string()))?;
            used = true;
        }
        Ok(used)
    }

    /// Moves frames from the tap into the guest's receive buffers while
    /// both have some; true if any chain was used.
    pub fn process_rx(&mut self) -> Result<bool, NetError> {
        let mut used = false;
        loop {
            let mut frame = match self.pending.take() {
                Some(f) => f,
                None => {
                    let mut buf = vec![0u8; self.max_frame];
                    match (&*self.tap).read(&mut buf) {
                        Ok(0) => return Ok(used),
                        Ok(n) => {
                            buf.truncate(n);
                            buf
                        }
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(used),
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                        Err(e) => return Err(NetError::Ring("tap read", e.to_string())),
                    }
                }
            };
            if frame.len() < HDR_LEN {
                // Not a frame the tap makes; nothing to deliver.
                continue;
            }
            // num_buffers: one, as without MRG_RXBUF.
            frame[10..12].copy_from_slice(&1u16.to_le_bytes());
            let Some(chain) = self.rx.pop_descriptor_chain(&self.mem) else {
                self.pending = Some(frame);
                return Ok(used);
            };
            let head = chain.head_index();
            let mut written = 0usize;
            let mut any = false;
            for d in chain.writable() {
                any = true;
                if written == frame.len() {
                    break;
                }
                let n = (d.len() as usize).min(frame.len() - written);
                self.mem
                    .write_slice(&frame[written..written + n], d.addr())
                    .map_err(|_| NetError::OutOfRange {
                        queue: "rx",
                        head,
                        addr: d.addr().0,
                        len: d.len(),
                    })?;
                written += n;
            }
            if !any {
                return Err(NetError::Empty { queue: "rx", head });
            }
            if written < frame.len() {
                // The buffer is too small for the frame: dropped, as a NIC
                // drops it (without MRG_RXBUF a frame needs one chain).
                written = 0;
            }
            self.rx
                .add_used(&self.mem, head, written as u32)
                .map_err(|e| NetError::Ring("rx", e.to_string()))?;
            used = true;
        }
    }
}

#[cfg(test)]
mod tests {
    use std::os::fd::OwnedFd;
    use std::os::unix::net::UnixDatagram;

    use vm_memory::GuestAddress;
    use vmm_sys_util::eventfd::EFD_NONBLOCK;

    use super::*;

    const MEM: u64 = 1 << 20;
    const SIZE: u16 = 16;
    /// Rings of the receive and transmit queues, and the buffers' area.
    const RX_BASE: u64 = 0x1_0000;
    const TX_BASE: u64 = 0x2_0000;
    const BUFS: u64 = 0x4_0000;
    const F_NEXT: u16 = 1;
    const F_WRITE: u16 = 2;

    /// A split queue laid out at `base`: descriptors, then the available
    /// ring, then the used ring.
    fn ring(base: u64) -> QueueConfig {
        QueueConfig {
            max_size: QUEUE_SIZE,
            size: SIZE,
            ready: true,
            desc: base,
            driver: base + 16 * u64::from(SIZE),
            device: base + 0x1000,
        }
    }

    /// A buffer of a chain: address, length, device-writable.
    type Buf = (u64, u32, bool);

    /// A guest driver: writes descriptors and publishes chains.
    struct Driver {
        mem: GuestMemoryMmap,
        next_desc: [u16; 2],
        avail_idx: [u16; 2],
    }

    impl Driver {
        fn base(q: usize) -> u64 {
            if q == RX {
                RX_BASE
            } else {
                TX_BASE
            }
        }

        /// Writes descriptor `i` of queue `q`.
        fn desc(&self, q: usize, i: u16, addr: u64, len: u32, flags: u16, next: u16) {
            let at = Self::base(q) + 16 * u64::from(i);
            self.mem.write_obj(addr, GuestAddress(at)).unwrap();
            self.mem.write_obj(len, GuestAddress(at + 8)).unwrap();
            self.mem.write_obj(flags, GuestAddress(at + 12)).unwrap();
            self.mem.write_obj(next, GuestAddress(at + 14)).unwrap();
        }

        /// Publishes a chain of `(addr, len, writable)` buffers; returns its
        /// head.
        fn chain(&mut self, q: usize, bufs: &[Buf]) -> u16 {
            let head = self.next_desc[q];
            for (k, (addr, len, w)) in bufs.iter().enumerate() {
                let i = head + k as u16;
                let last = k + 1 == bufs.len();
                let flags = if last { 0 } else { F_NEXT } | if *w { F_WRITE } else { 0 };
                self.desc(q, i, *addr, *len, flags, i + 1);
            }
            self.next_desc[q] += bufs.len() as u16;
            self.publish(q, head);
            head
        }

        /// Puts head `head` on the available ring of `q`.
        fn publish(&mut self, q: usize, head: u16) {
            let avail = ring(Self::base(q)).driver;
            let slot = avail + 4 + 2 * u64::from(self.avail_idx[q] % SIZE);
            self.mem.write_obj(head, GuestAddress(slot)).unwrap();
            self.avail_idx[q] = self.avail_idx[q].wrapping_add(1);
            self.mem
                .write_obj(self.avail_idx[q], GuestAddress(avail + 2))
                .unwrap();
        }

        /// The used ring's entries of `q`: (head, len).
        fn used(&self, q: usize) -> Vec<(u32, u32)> {
            let used = ring(Self::base(q)).device;
            let idx: u16 = self.mem.read_obj(GuestAddress(used + 2)).unwrap();
            (0..idx)
                .map(|k| {
                    let e = used + 4 + 8 * u64::from(k % SIZE);
                    (
                        self.mem.read_obj(GuestAddress(e)).unwrap(),
                        self.mem.read_obj(GuestAddress(e + 4)).unwrap(),
                    )
                })
                .collect()
        }
    }

    /// Guest memory, a "tap" (one end of a non-blocking datagram socket
    /// pair: frames keep their boundaries, as on a tap) and its other end.
    fn fake_tap() -> (GuestMemoryMmap, File, UnixDatagram) {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM as usize)]).unwrap();
        let (ours, peer) = UnixDatagram::pair().unwrap();
        ours.set_nonblocking(true).unwrap();
        peer.set_read_timeout(Some(std::time::Duration::from_secs(5)))
            .unwrap();
        (mem, File::from(OwnedFd::from(ours)), peer)
    }

    /// A worker whose "tap" is one end of a datagram socket pair (frames
    /// keep their boundaries, as on a tap); the other end is returned.
    fn setup() -> (Worker, Driver, UnixDatagram) {
        let (mem, tap, peer) = fake_tap();
        let queues = [ring(RX_BASE), ring(TX_BASE)];
        let call = EventFd::new(EFD_NONBLOCK).unwrap();
        let worker = Worker::new(mem.clone(), &queues, Arc::new(tap), call, 1500).unwrap();
        let driver = Driver {
            mem,
            next_desc: [0, 0],
            avail_idx: [0, 0],
        };
        (worker, driver, peer)
    }

    fn frame(len: usize) -> Vec<u8> {
        let mut f: Vec<u8> = (0..len).map(|i| (i * 7) as u8).collect();
        f[..HDR_LEN].fill(0);
        f
    }

    #[test]
    fn a_frame_split_over_descriptors_leaves_as_one_write_to_the_tap() {
        let (mut w, mut d, peer) = setup();
        let f = frame(HDR_LEN + 60);
        d.mem.write_slice(&f[..20], GuestAddress(BUFS)).unwrap();
        d.mem
            .write_slice(&f[20..], GuestAddress(BUFS + 0x1000))
            .unwrap();
        let head = d.chain(
            TX,
            &[
                (BUFS, 20, false),
                (BUFS + 0x1000, (f.len() - 20) as u32, false),
            ],
        );
        assert!(w.process_tx().unwrap());
        let mut got = vec![0u8; 2048];
        let n = peer.recv(&mut got).unwrap();
        assert_eq!(&got[..n], &f[..]);
        assert_eq!(d.used(TX), [(u32::from(head), 0)]);
    }

    #[test]
    fn the_guests_net_header_reaches_the_tap_zeroed() {
        let (mut w, mut d, peer) = setup();
        let mut f = frame(HDR_LEN + 60);
        // flags NEEDS_CSUM, gso_type TCPV4, hdr_len, gso_size, csum_start,
        // csum_offset, num_buffers: all set by a guest that negotiated none.
        f[..HDR_LEN].copy_from_slice(&[1, 1, 54, 0, 0xb4, 5, 14, 0, 16, 0, 1, 0]);
        d.mem.write_slice(&f, GuestAddress(BUFS)).unwrap();
        d.chain(TX, &[(BUFS, f.len() as u32, false)]);
        assert!(w.process_tx().unwrap());
        let mut got = vec![0u8; 2048];
        let n = peer.recv(&mut got).unwrap();
        assert_eq!(&got[..HDR_LEN], &[0; HDR_LEN]);
        assert_eq!(&got[HDR_LEN..n], &f[HDR_LEN..]);
    }

    #[test]
    fn a_frame_from_the_tap_fills_a_receive_buffer_once_there_is_one() {
        let (mut w, mut d, peer) = setup();
        let f = frame(HDR_LEN + 98);
        peer.send(&f).unwrap();
        // No buffer yet: the frame waits.
        assert!(!w.process_rx().unwrap());
        assert!(w.pending.is_some());
        let head = d.chain(RX, &[(BUFS, 2048, true)]);
        assert!(w.process_rx().unwrap());
        assert_eq!(d.used(RX), [(u32::from(head), f.len() as u32)]);
        let mut got = vec![0u8; f.len()];
        d.mem.read_slice(&mut got, GuestAddress(BUFS)).unwrap();
        assert_eq!(&got[HDR_LEN..], &f[HDR_LEN..]);
        assert_eq!(&got[10..12], &1u16.to_le_bytes(), "num_buffers");
    }

    #[test]
    fn a_frame_larger_than_the_receive_buffer_is_dropped_not_truncated() {
        let (mut w, mut d, peer) = setup();
        peer.send(&frame(HDR_LEN + 1000)).unwrap();
        let head = d.chain(RX, &[(BUFS, 512, true)]);
        assert!(w.process_rx().unwrap());
        assert_eq!(d.used(RX), [(u32::from(head), 0)]);
    }

    /// Each malformed transmit chain fails the device with its reason, and
    /// nothing reaches the tap.
    #[test]
    fn malformed_chains_fail_the_device_never_the_vmm() {
        type Build = fn(&mut Driver);
        let cases: Vec<(&str, Build)> = vec![
            ("outside guest memory", |d| {
                d.chain(TX, &[(MEM - 8, 64, false)]);
            }),
            ("outside guest memory", |d| {
                d.chain(TX, &[(u64::MAX - 4, 64, false)]);
            }),
            ("more than a frame", |d| {
                d.chain(TX, &[(BUFS, u32::MAX, false)]);
            }),
            ("no usable buffer", |d| {
                d.chain(TX, &[(BUFS, 0, false)]);
            }),
            ("no usable buffer", |d| {
                d.chain(TX, &[(BUFS, 2048, true)]);
            }),
            // A loop: descriptor 0 points at itself.
            ("more than a frame", |d| {
                d.desc(TX, 0, BUFS, 1000, F_NEXT, 0);
                d.publish(TX, 0);
            }),
            ("no usable buffer", |d| {
                d.desc(TX, 0, BUFS, 0, F_NEXT, 0);
                d.publish(TX, 0);
            }),
        ];
        for (want, build) in cases {
            let (mut w, mut d, peer) = setup();
            build(&mut d);
            let e = w.process_tx().expect_err(want).to_string();
            assert!(e.contains(want), "{e} lacks {want}");
            peer.set_nonblocking(true).unwrap();
            assert!(peer.recv(&mut [0u8; 64]).is_err(), "{want}: a frame left");
        }
    }

    #[test]
    fn malformed_receive_chains_fail_the_device() {
        let cases: Vec<(&str, Vec<Buf>)> = vec![
            ("outside guest memory", vec![(MEM + 0x1000, 2048, true)]),
            ("no usable buffer", vec![(BUFS, 2048, false)]),
        ];
        for (want, bufs) in cases {
            let (mut w, mut d, peer) = setup();
            peer.send(&frame(HDR_LEN + 60)).unwrap();
            d.chain(RX, &bufs);
            let e = w.process_rx().expect_err(want).to_string();
            assert!(e.contains(want), "{e} lacks {want}");
        }
    }

    #[test]
    fn a_head_beyond_the_table_is_not_a_chain() {
        let (mut w, mut d, _peer) = setup();
        d.publish(TX, SIZE + 3);
        match w.process_tx() {
            Ok(used) => assert!(!used || d.used(TX).is_empty()),
            Err(e) => assert!(e.to_string().contains("tx"), "{e}"),
        }
    }

    #[test]
    fn net_arguments_parse_and_bad_ones_are_named() {
        let n: NetSpec = "fd=3,mac=02:42:0a:f4:4d:02,mtu=1450".parse().unwrap();
        assert_eq!(
            n,
            NetSpec {
                source: TapSource::Fd(3),
                mac: [2, 0x42, 10, 0xf4, 0x4d, 2],
                mtu: 1450
            }
        );
        let t: NetSpec = "tap=hvtap0,mac=02:00:00:00:00:01".parse().unwrap();
        assert_eq!(t.source, TapSource::Name("hvtap0".into()));
        assert_eq!(t.mtu, 1500);
        for (bad, want) in [
            ("fd=1,mac=02:00:00:00:00:01", "above 2"),
            ("fd=3", "mac= is missing"),
            ("mac=02:00:00:00:00:01", "fd= or tap= is missing"),
            ("tap=,mac=02:00:00:00:00:01", "not an interface name"),
            ("tap=a/b,mac=02:00:00:00:00:01", "not an interface name"),
            (
                "tap=sixteen-bytes-xx,mac=02:00:00:00:00:01",
                "not an interface name",
            ),
            ("fd=3,mac=02:00:00:00:00", "is not aa:bb"),
            ("fd=3,mac=02:00:00:00:00:01:07", "is not aa:bb"),
            ("fd=3,mac=02:00:00:00:00:zz", "is not aa:bb"),
            ("fd=3,mac=02:00:00:00:00:01,mtu=9", "68..=65535"),
            ("fd=3,mac=02:00:00:00:00:01,speed=1", "unknown key"),
            ("fd3", "key=value"),
        ] {
            let e = bad.parse::<NetSpec>().unwrap_err();
            assert!(e.contains(want), "{bad}: {e}");
        }
    }

    /// A device whose "tap" is a datagram socket (see [`setup`]).
    fn device(mac: [u8; 6], mtu: u16) -> (NetDevice, GuestMemoryMmap, UnixDatagram) {
        let (mem, tap, peer) = fake_tap();
        let dev = NetDevice::start(tap, mac, mtu, mem.clone()).unwrap();
        (dev, mem, peer)
    }

    #[test]
    fn the_worker_serves_from_activation_to_reset_and_again_and_ends_with_the_device() {
        let (mut dev, mem, peer) = device([2, 0, 0, 0, 0, 1], 1500);
        // Rings outside guest memory: refused, the device stays inactive.
        let mut outside = ring(RX_BASE);
        outside.desc = MEM + 0x1000;
        let e = dev.thread.activate(&[outside, ring(TX_BASE)]).unwrap_err();
        assert!(matches!(e, NetError::QueueAddress(0)), "{e}");
        for round in 0..2 {
            dev.thread
                .activate(&[ring(RX_BASE), ring(TX_BASE)])
                .unwrap();
            // A frame the driver queues leaves on the tap, its kick through
            // the worker's poll.
            let mut driver = Driver {
                mem: mem.clone(),
                next_desc: [0, 0],
                avail_idx: [0, 0],
            };
            let f = frame(60 + round);
            mem.write_slice(&f, GuestAddress(BUFS)).unwrap();
            driver.chain(TX, &[(BUFS, f.len() as u32, false)]);
            dev.thread.kicks[TX].write(1).unwrap();
            let mut got = vec![0u8; 2048];
            let n = peer.recv(&mut got).expect("the frame on the tap");
            assert_eq!(&got[..n], &f[..], "round {round}");
            dev.thread.deactivate();
            // Reset: the queues start over in guest memory.
            mem.write_slice(&[0u8; 0x2000], GuestAddress(RX_BASE))
                .unwrap();
            mem.write_slice(&[0u8; 0x2000], GuestAddress(TX_BASE))
                .unwrap();
        }
        // The worker holds the tap too: once the device is dropped (it
        // joins the worker), nothing does.
        drop(dev);
        assert!(peer.send(b"x").is_err(), "the worker outlived its device");
    }

    #[test]
    fn config_space_has_mac_link_up_one_pair_and_the_mtu() {
        let (dev, _mem, _peer) = device([2, 0x42, 10, 0, 0, 7], 1450);
        let mut c = [0u8; 12];
        dev.read_config(0, &mut c);
        assert_eq!(c, [2, 0x42, 10, 0, 0, 7, 1, 0, 1, 0, 0xaa, 0x05]);
        let mut past = [9u8; 4];
        dev.read_config(10, &mut past);
        assert_eq!(past, [0xaa, 0x05, 0, 0]);
        assert_eq!(
            dev.features() & (F_MAC | F_MTU | F_STATUS | F_VERSION_1),
            dev.features()
        );
    }

    #[test]
    fn a_descriptor_that_is_not_a_vnet_tap_is_refused_naming_it() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let (a, _b) = UnixDatagram::pair().unwrap();
        // Not a tap: the header-size ioctl fails, naming the descriptor.
        let e = NetDevice::new(File::from(OwnedFd::from(a)), [2, 0, 0, 0, 0, 1], 1450, mem)
            .err()
            .expect("a socket is not a tap")
            .to_string();
        assert!(e.contains("IFF_VNET_HDR"), "{e}");
    }
}
