//! virtio-balloon (type 5) for free page reporting only: pages the guest
//! frees go back to the host. Offered: VERSION_1 and PAGE_REPORTING; no
//! stats, free page hints, deflate-on-oom or page poison. husk never asks
//! the guest to inflate (num_pages stays 0); the inflate and deflate queues
//! are served all the same.
//!
//! Guest RAM is one memfd ([`crate::memory`]): a range the guest gives back
//! becomes a hole in it (`fallocate(PUNCH_HOLE | KEEP_SIZE)`), which frees
//! the pages for every process that maps the memfd (vhost-user daemons
//! too; MADV_DONTNEED would not free shared pages) and reads back as zeros.
//!
//! Queues, as Linux 6.1 lays them out when PAGE_REPORTING is the only
//! balloon feature negotiated: 0 inflateq, 1 deflateq, 2 reporting_vq.
//! Virtio 1.2 (5.5.2) lists the reporting queue as 4, after statsq and
//! free_page_vq, but the queues of features not negotiated do not exist
//! and Linux packs the others: virtio_balloon.c's init_vqs() gives statsq
//! and free_page_vq a NULL name, and virtio_mmio.c's vm_find_vqs() skips a
//! NULL name without taking a queue index (`queue_idx++` only for the
//! queues it sets up).
//!
//! The guest is not trusted: a report with any range that is not whole
//! pages inside one guest RAM range, or not device-writable, gives back
//! nothing (told once per device on stderr) and is returned all the same;
//! inflated PFNs outside guest RAM are skipped. A pass over a queue takes at
//! most the queue's size of chains, and a chain at most the queue's size of
//! descriptors (virtio-queue's iterator).

use std::fmt;
use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use virtio_queue::{DescriptorChain, Queue, QueueT};
use vm_memory::{Address, Bytes, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

use crate::device_thread::{poll_fd, queue_from, wait, DeviceThread, Service, ThreadError};
use crate::memory::GuestRam;
use crate::seccomp::ThreadKind;
use crate::virtio_mmio::{QueueConfig, VirtioDevice, F_VERSION_1};

/// VIRTIO_BALLOON_F_REPORTING: free page reporting.
const F_PAGE_REPORTING: u64 = 1 << 5;
/// Queue size offered; Linux refuses a reporting queue smaller than
/// PAGE_REPORTING_CAPACITY (32), and takes the largest size offered.
const QUEUE_SIZE: u16 = 128;
const INFLATE: usize = 0;
const DEFLATE: usize = 1;
const REPORTING: usize = 2;
const QUEUES: usize = 3;
/// The balloon's page: 4 KiB, whatever the guest's page size.
const PAGE: u64 = 4096;
/// PFNs read from an inflate buffer at a time.
const PFN_BATCH: usize = 256;
/// Config space: num_pages, actual, free_page_hint_cmd_id, poison_val (all
/// u32, little-endian); the driver writes `actual`.
const CONFIG_LEN: usize = 16;
const ACTUAL: std::ops::Range<usize> = 4..8;

#[derive(Debug, thiserror::Error)]
pub enum BalloonError {
    #[error(transparent)]
    Thread(#[from] ThreadError),
    #[error("the guest RAM memfd: {0}")]
    Memfd(io::Error),
    #[error("queue {0}: the driver's ring addresses are outside guest memory")]
    QueueAddress(usize),
    #[error("poll: {0}")]
    Poll(io::Error),
}

/// Why a free page report gives back nothing.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
enum BadReport {
    #[error("has a device-readable buffer ({addr:#x}, {len} bytes)")]
    Readable { addr: u64, len: u32 },
    #[error("has a range that is not whole pages of one guest RAM range ({addr:#x}, {len} bytes)")]
    NotRam { addr: u64, len: u32 },
    #[error("is cut short (a loop, a descriptor index past the table, or over 4 GiB)")]
    Cut,
    #[error("has no buffer")]
    Empty,
}

/// The device: config space and its worker thread (see
/// [`crate::device_thread`]).
pub struct BalloonDevice {
    pub thread: DeviceThread<Serve>,
    /// What the driver last wrote to `actual` (pages in its balloon).
    actual: u32,
    discarded: Arc<AtomicU64>,
}

impl BalloonDevice {
    /// A device that gives `ram`'s pages back to the host, its worker
    /// thread started.
    pub fn new(ram: &GuestRam) -> Result<Self, BalloonError> {
        let backing = Backing::new(ram).map_err(BalloonError::Memfd)?;
        let discarded = backing.discarded.clone();
        let serve = Serve {
            memory: ram.memory.clone(),
            backing,
        };
        Ok(Self {
            thread: DeviceThread::start("virtio-balloon", ThreadKind::Balloon, QUEUES, serve)?,
            actual: 0,
            discarded,
        })
    }

    /// Bytes of guest RAM given back to the host so far.
    pub fn discarded(&self) -> Arc<AtomicU64> {
        self.discarded.clone()
    }

    fn config(&self) -> [u8; CONFIG_LEN] {
        // num_pages 0: the guest is never asked to inflate; no hint
        // command, no poison value.
        let mut c = [0u8; CONFIG_LEN];
        c[ACTUAL].copy_from_slice(&self.actual.to_le_bytes());
        c
    }
}

impl VirtioDevice for BalloonDevice {
    fn device_type(&self) -> u32 {
        5
    }

    fn features(&self) -> u64 {
        F_VERSION_1 | F_PAGE_REPORTING
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE; QUEUES]
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        crate::virtio_mmio::read_config_bytes(&self.config(), offset, data);
    }

    /// The driver's `actual` is kept, byte by byte; other writes are
    /// ignored.
    fn write_config(&mut self, offset: u64, data: &[u8]) {
        let mut c = self.config();
        for (i, b) in data.iter().enumerate() {
            let at = usize::try_from(offset)
                .ok()
                .and_then(|o| o.checked_add(i))
                .filter(|at| ACTUAL.contains(at));
            if let Some(at) = at {
                c[at] = *b;
            }
        }
        self.actual = u32::from_le_bytes([c[4], c[5], c[6], c[7]]);
    }
}

/// Guest RAM as its memfd: where a guest range lies in it, the holes
/// punched there, and the bytes given back.
#[derive(Clone)]
pub struct Backing {
    memfd: Arc<File>,
    /// (guest address, length, memfd offset) of each RAM range.
    ranges: Vec<(u64, u64, u64)>,
    discarded: Arc<AtomicU64>,
    /// Whether a bad request of the guest was told on stderr (once per
    /// device).
    warned: Arc<AtomicBool>,
}

impl Backing {
    pub fn new(ram: &GuestRam) -> io::Result<Self> {
        Ok(Self {
            memfd: Arc::new(ram.memfd.try_clone()?),
            ranges: crate::memory::ranges(ram.size),
            discarded: Arc::default(),
            warned: Arc::default(),
        })
    }

    /// Bytes given back so far.
    pub fn discarded(&self) -> u64 {
        self.discarded.load(Ordering::Relaxed)
    }

    /// Where guest range (`addr`, `len`) lies in the memfd, if it is whole
    /// pages inside one RAM range.
    fn offset(&self, addr: u64, len: u64) -> Option<u64> {
        if len == 0 || !addr.is_multiple_of(PAGE) || !len.is_multiple_of(PAGE) {
            return None;
        }
        let end = addr.checked_add(len)?;
        self.ranges
            .iter()
            .find(|&&(start, size, _)| start <= addr && end - start <= size)
            .map(|&(start, _, off)| off + (addr - start))
    }

    /// Punches a hole of `len` bytes at `offset` in the memfd and counts
    /// them.
    fn discard(&self, offset: u64, len: u64) {
        let (Ok(off), Ok(n)) = (libc::off_t::try_from(offset), libc::off_t::try_from(len)) else {
            return;
        };
        loop {
            // SAFETY: fallocate with integer arguments on the memfd this
            // Backing holds; the range is guest RAM (checked by `offset`),
            // which the guest gave up.
            let rc = unsafe {
                libc::fallocate(
                    self.memfd.as_raw_fd(),
                    libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                    off,
                    n,
                )
            };
            if rc == 0 {
                self.discarded.fetch_add(len, Ordering::Relaxed);
                return;
            }
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                self.warn(format_args!(
                    "punching {len} bytes at {offset:#x} out of guest memory: {e}"
                ));
                return;
            }
        }
    }

    /// Tells a bad request of the guest on stderr, the first time only: the
    /// guest must not flood the log.
    fn warn(&self, what: fmt::Arguments) {
        if !self.warned.swap(true, Ordering::Relaxed) {
            tracing::warn!("{what} (further ones are not told)");
        }
    }

    /// Gives back every range of free page report `chain`, or nothing if
    /// any of them is bad.
    fn report(&self, chain: DescriptorChain<&GuestMemoryMmap>) {
        match self.report_ranges(chain) {
            Ok(ranges) => {
                for (offset, len) in ranges {
                    self.discard(offset, len);
                }
            }
            Err(bad) => self.warn(format_args!(
                "a free page report {bad}; none of it was given back"
            )),
        }
    }

    /// The memfd ranges (offset, length) of a report, all checked.
    fn report_ranges(
        &self,
        chain: DescriptorChain<&GuestMemoryMmap>,
    ) -> Result<Vec<(u64, u64)>, BadReport> {
        let mut ranges = Vec::new();
        let mut cut = false;
        for d in chain {
            let (addr, len) = (d.addr().0, d.len());
            if !d.is_write_only() {
                return Err(BadReport::Readable { addr, len });
            }
            let offset = self
                .offset(addr, u64::from(len))
                .ok_or(BadReport::NotRam { addr, len })?;
            ranges.push((offset, u64::from(len)));
            // The iterator ends early, silently, on a loop or a bad index.
            cut = d.has_next();
        }
        if cut {
            return Err(BadReport::Cut);
        }
        if ranges.is_empty() {
            return Err(BadReport::Empty);
        }
        Ok(ranges)
    }

    /// Gives back each page of inflate buffer `chain` (u32 PFNs of 4 KiB
    /// frames) that is guest RAM, runs of pages at once; other PFNs are
    /// skipped.
    fn inflate(&self, mem: &GuestMemoryMmap, chain: DescriptorChain<&GuestMemoryMmap>) {
        // The run being gathered: memfd offset and length.
        let (mut run, mut run_len) = (0u64, 0u64);
        let mut skipped = 0u64;
        let mut bytes = [0u8; PFN_BATCH * 4];
        for d in chain.readable() {
            let mut at = d.addr();
            let mut left = d.len() as usize / 4;
            while left > 0 {
                let n = left.min(PFN_BATCH);
                let buf = &mut bytes[..n * 4];
                if mem.read_slice(buf, at).is_err() {
                    skipped += left as u64;
                    break;
                }
                for b in buf.chunks_exact(4) {
                    let pfn = u32::from_le_bytes([b[0], b[1], b[2], b[3]]);
                    let Some(offset) = self.offset(u64::from(pfn) * PAGE, PAGE) else {
                        skipped += 1;
                        continue;
                    };
                    if run_len > 0 && run + run_len == offset {
                        run_len += PAGE;
                        continue;
                    }
                    if run_len > 0 {
                        self.discard(run, run_len);
                    }
                    (run, run_len) = (offset, PAGE);
                }
                left -= n;
                match at.checked_add(n as u64 * 4) {
                    Some(next) => at = next,
                    None => break,
                }
            }
        }
        if run_len > 0 {
            self.discard(run, run_len);
        }
        if skipped > 0 {
            self.warn(format_args!(
                "{skipped} inflated PFNs outside guest RAM were skipped"
            ));
        }
    }
}

/// The worker thread's side: what it serves queues with.
pub struct Serve {
    memory: GuestMemoryMmap,
    backing: Backing,
}

impl Service for Serve {
    type Worker = Worker;
    type Error = BalloonError;

    fn worker(&self, queues: &[QueueConfig], call: EventFd) -> Result<Worker, BalloonError> {
        Worker::new(self.memory.clone(), queues, self.backing.clone(), call)
    }

    fn serve(
        &self,
        worker: &mut Worker,
        kicks: &[EventFd],
        stop: &EventFd,
    ) -> Result<(), BalloonError> {
        worker.run(kicks, stop)
    }
}

/// The device's data path, separate from the thread so tests can drive it.
pub struct Worker {
    mem: GuestMemoryMmap,
    /// The driver's queues by index; one it left unready is absent (Linux
    /// sets up the reporting queue only with PAGE_REPORTING negotiated).
    queues: [Option<Queue>; QUEUES],
    backing: Backing,
    call: EventFd,
}

impl Worker {
    /// A data path over the driver's inflate, deflate and reporting
    /// `queues` (in that order) in `mem`, giving pages back through
    /// `backing`, `call` signalled when chains were used. Refuses a ready
    /// queue the driver placed outside guest memory.
    pub fn new(
        mem: GuestMemoryMmap,
        queues: &[QueueConfig],
        backing: Backing,
        call: EventFd,
    ) -> Result<Self, BalloonError> {
        let ring = |i: usize| match queues.get(i) {
            Some(q) if q.ready => queue_from(q, &mem)
                .map(Some)
                .ok_or(BalloonError::QueueAddress(i)),
            _ => Ok(None),
        };
        let queues = [ring(INFLATE)?, ring(DEFLATE)?, ring(REPORTING)?];
        Ok(Self {
            mem,
            queues,
            backing,
            call,
        })
    }

    /// Serves the queues until `stop` is signalled.
    fn run(&mut self, kicks: &[EventFd], stop: &EventFd) -> Result<(), BalloonError> {
        // Each kick, the stop.
        let mut fds: Vec<libc::pollfd> = kicks
            .iter()
            .chain([stop])
            .map(|e| poll_fd(e.as_raw_fd()))
            .collect();
        let stopped = fds.len() - 1;
        let mut more = false;
        loop {
            // Chains left after a full pass are served without a new kick.
            wait(&mut fds, if more { 0 } else { -1 }).map_err(BalloonError::Poll)?;
            if fds[stopped].revents != 0 {
                return Ok(());
            }
            for (k, f) in kicks.iter().zip(&fds) {
                if f.revents != 0 {
                    let _ = k.read();
                }
            }
            more = self.process();
        }
    }

    /// Serves what the driver queued, at most a queue's size of chains per
    /// queue, and signals the interrupt if it used any; true if more may
    /// wait.
    pub fn process(&mut self) -> bool {
        let mut used = false;
        let mut more = false;
        for q in [INFLATE, DEFLATE, REPORTING] {
            let (u, m) = self.serve(q);
            used |= u;
            more |= m;
        }
        if used {
            let _ = self.call.write(1);
        }
        more
    }

    /// One pass over queue `q`: whether it used a chain, and whether it
    /// stopped at its bound.
    fn serve(&mut self, q: usize) -> (bool, bool) {
        let Some(queue) = self.queues[q].as_mut() else {
            return (false, false);
        };
        for n in 0..queue.size() {
            let Some(chain) = queue.pop_descriptor_chain(&self.mem) else {
                return (n > 0, false);
            };
            let head = chain.head_index();
            match q {
                INFLATE => self.backing.inflate(&self.mem, chain),
                REPORTING => self.backing.report(chain),
                // Deflate: a page given back reads as zeros; nothing to do.
                _ => {}
            }
            // Fails only for a head past the table, which is no chain.
            if queue.add_used(&self.mem, head, 0).is_err() {
                self.backing
                    .warn(format_args!("queue {q}: head {head} is past the table"));
            }
        }
        (true, true)
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::{FileExt, MetadataExt};

    use virtio_queue::desc::split::Descriptor as SplitDescriptor;
    use virtio_queue::desc::RawDescriptor;
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::GuestAddress;

    use super::*;
    use crate::memory::{MMIO_GAP_END, MMIO_GAP_START};

    const F_NEXT: u16 = 1;
    const F_WRITE: u16 = 2;
    /// The queues' size in these tests, and where their rings are.
    const SIZE: u16 = 16;
    const RINGS: u64 = 0x1_0000;
    /// A byte that is not zero, written where pages should keep or lose it.
    const MARK: u8 = 0xa5;

    /// A guest: its RAM, the Backing over it, the interrupt eventfd.
    struct Guest {
        ram: GuestRam,
        backing: Backing,
        call: EventFd,
    }

    fn guest(mib: u64) -> Guest {
        let ram = GuestRam::new(mib).unwrap();
        let backing = Backing::new(&ram).unwrap();
        let call = EventFd::new(vmm_sys_util::eventfd::EFD_NONBLOCK).unwrap();
        Guest { ram, backing, call }
    }

    /// The driver's side of queue `q` (descriptors and available ring,
    /// through virtio-queue's mock), its rings at RINGS + q pages.
    fn driver(mem: &GuestMemoryMmap, q: usize) -> MockSplitQueue<'_, GuestMemoryMmap> {
        MockSplitQueue::create(mem, GuestAddress(RINGS + q as u64 * 0x1000), SIZE)
    }

    /// Queue `q` as the transport hands it over: the mock's descriptor
    /// table and available ring, then the used ring where the split
    /// layout puts it (the mock's own overlaps its available ring).
    fn config(q: usize) -> QueueConfig {
        let base = RINGS + q as u64 * 0x1000;
        let avail = base + 16 * u64::from(SIZE);
        QueueConfig {
            max_size: QUEUE_SIZE,
            size: SIZE,
            ready: true,
            desc: base,
            driver: avail,
            device: (avail + 6 + 2 * u64::from(SIZE) + 3) & !3,
        }
    }

    fn worker(g: &Guest) -> Worker {
        let queues = [config(INFLATE), config(DEFLATE), config(REPORTING)];
        let call = g.call.try_clone().unwrap();
        Worker::new(g.ram.memory.clone(), &queues, g.backing.clone(), call).unwrap()
    }

    /// A buffer of a chain: address, length, flags.
    type Buf = (u64, u32, u16);

    /// Publishes one chain of `bufs` from descriptor `first` on; the NEXT
    /// links are added.
    fn publish(d: &MockSplitQueue<'_, GuestMemoryMmap>, first: u16, bufs: &[Buf]) {
        let descs: Vec<RawDescriptor> = bufs
            .iter()
            .enumerate()
            .map(|(k, &(addr, len, flags))| {
                let i = first + k as u16;
                let next = if k + 1 < bufs.len() { F_NEXT } else { 0 };
                RawDescriptor::from(SplitDescriptor::new(addr, len, flags | next, i + 1))
            })
            .collect();
        d.add_desc_chains(&descs, first).unwrap();
    }

    /// The used ring of queue `q`: (head, len) of each entry.
    fn used(g: &Guest, q: usize) -> Vec<(u32, u32)> {
        let mem = &g.ram.memory;
        let ring = config(q).device;
        let n: u16 = mem.read_obj(GuestAddress(ring + 2)).unwrap();
        (0..u64::from(n))
            .map(|i| {
                let e = ring + 4 + 8 * (i % u64::from(SIZE));
                (
                    mem.read_obj(GuestAddress(e)).unwrap(),
                    mem.read_obj(GuestAddress(e + 4)).unwrap(),
                )
            })
            .collect()
    }

    fn mark(g: &Guest, addr: u64, len: u64) {
        g.ram
            .memory
            .write_slice(&vec![MARK; len as usize], GuestAddress(addr))
            .unwrap();
    }

    /// Whether every byte of guest range (`addr`, `len`) is `byte`.
    fn all(g: &Guest, addr: u64, len: u64, byte: u8) -> bool {
        let mut buf = vec![0u8; len as usize];
        g.ram
            .memory
            .read_slice(&mut buf, GuestAddress(addr))
            .unwrap();
        buf.iter().all(|b| *b == byte)
    }

    /// The memfd at `offset`: where the next hole and the next data are.
    fn hole_and_data(g: &Guest, offset: u64) -> (u64, u64) {
        let seek = |whence| {
            // SAFETY: lseek with integer arguments on the test's memfd.
            unsafe { libc::lseek(g.ram.memfd.as_raw_fd(), offset as libc::off_t, whence) as u64 }
        };
        (seek(libc::SEEK_HOLE), seek(libc::SEEK_DATA))
    }

    fn blocks(g: &Guest) -> u64 {
        g.ram.memfd.metadata().unwrap().blocks()
    }

    #[test]
    fn a_report_of_two_ranges_punches_holes_the_rest_keeps_its_bytes() {
        let g = guest(64);
        let d = driver(&g.ram.memory, REPORTING);
        let mut w = worker(&g);
        // Two reported ranges (2 MiB and 3 pages), each with a page on
        // either side that was not reported.
        let ranges = [(0x20_0000, 0x20_0000), (0x60_0000, 3 * PAGE)];
        for &(addr, len) in &ranges {
            mark(&g, addr - PAGE, len + 2 * PAGE);
        }
        // Reading a ring fills its page, if it was a hole: before counting.
        w.process();
        let before = blocks(&g);
        publish(
            &d,
            0,
            &[
                (ranges[0].0, ranges[0].1 as u32, F_WRITE),
                (ranges[1].0, ranges[1].1 as u32, F_WRITE),
            ],
        );
        assert!(!w.process(), "one chain: nothing left for another pass");
        let reported: u64 = ranges.iter().map(|r| r.1).sum();
        assert_eq!(g.backing.discarded(), reported);
        assert_eq!(before - blocks(&g), reported / 512, "st_blocks");
        for &(addr, len) in &ranges {
            // Below 3 GiB guest addresses are memfd offsets. A hole first:
            // reading it through the mapping would fill it again.
            assert_eq!(hole_and_data(&g, addr), (addr, addr + len), "{addr:#x}");
            assert!(all(&g, addr, len, 0), "{addr:#x} reads back as zeros");
            assert!(all(&g, addr - PAGE, PAGE, MARK), "the page below {addr:#x}");
            assert!(all(&g, addr + len, PAGE, MARK), "the page above {addr:#x}");
        }
        assert_eq!(used(&g, REPORTING), [(0, 0)]);
        assert_eq!(g.call.read().unwrap(), 1, "the interrupt");
        assert!(!g.backing.warned.load(Ordering::Relaxed));
    }

    /// Each chain has a bad range (or is bad as a whole): none of it is
    /// given back, the good range next to a bad one keeps its bytes, and
    /// the chain is returned.
    #[test]
    fn a_report_with_any_bad_range_gives_back_nothing_and_is_returned() {
        // Above 3 GiB, so that RAM continues past the MMIO gap; the memfd
        // is sparse, so this costs nothing.
        let mib = (MMIO_GAP_START >> 20) + 64;
        let end = MMIO_GAP_END + (64 << 20);
        let good = (0x20_0000, 0x1_0000);
        let w = F_WRITE;
        let cases: Vec<(&str, Vec<Buf>)> = vec![
            ("unaligned address", vec![(0x20_0800, 0x1000, w)]),
            ("unaligned length", vec![(0x20_0000, 0x1800, w)]),
            ("zero length", vec![(0x20_0000, 0, w)]),
            ("past the end of RAM", vec![(end - PAGE, 0x2000, w)]),
            ("wholly past the end", vec![(end, 0x1000, w)]),
            (
                "into the MMIO gap",
                vec![(MMIO_GAP_START - PAGE, 0x2000, w)],
            ),
            ("in the MMIO gap", vec![(MMIO_GAP_START, 0x1000, w)]),
            ("across the gap", vec![(MMIO_GAP_END - PAGE, 0x2000, w)]),
            ("over u64", vec![(u64::MAX - 0xfff, 0x2000, w)]),
            ("device-readable", vec![(good.0, good.1 as u32, 0)]),
            (
                "good then bad",
                vec![(good.0, good.1 as u32, w), (0x40_0800, 0x1000, w)],
            ),
            (
                "bad then good",
                vec![(end, 0x1000, w), (good.0, good.1 as u32, w)],
            ),
        ];
        let g = guest(mib);
        for (what, bufs) in cases {
            g.backing.warned.store(false, Ordering::Relaxed);
            let d = driver(&g.ram.memory, REPORTING);
            let mut w = worker(&g);
            mark(&g, good.0, good.1);
            publish(&d, 0, &bufs);
            w.process();
            assert_eq!(g.backing.discarded(), 0, "{what}");
            assert!(all(&g, good.0, good.1, MARK), "{what}: the good range");
            assert_eq!(used(&g, REPORTING), [(0, 0)], "{what}: returned");
            assert!(g.backing.warned.load(Ordering::Relaxed), "{what}: told");
            // The rings start over for the next case.
            g.ram
                .memory
                .write_slice(&[0u8; 0x1000], GuestAddress(config(REPORTING).desc))
                .unwrap();
        }
    }

    #[test]
    fn looping_and_headless_reports_give_back_nothing_and_do_not_hang() {
        let g = guest(64);
        let d = driver(&g.ram.memory, REPORTING);
        let mut w = worker(&g);
        mark(&g, 0x20_0000, PAGE);
        // Descriptor 0 links to itself: its range is good, the chain never
        // ends.
        d.desc_table()
            .store(
                0,
                RawDescriptor::from(SplitDescriptor::new(0x20_0000, 0x1000, F_WRITE | F_NEXT, 0)),
            )
            .unwrap();
        let avail = config(REPORTING).driver;
        g.ram
            .memory
            .write_obj(0u16, GuestAddress(avail + 4))
            .unwrap();
        // Then a head past the table.
        g.ram
            .memory
            .write_obj(SIZE + 3, GuestAddress(avail + 6))
            .unwrap();
        g.ram
            .memory
            .write_obj(2u16, GuestAddress(avail + 2))
            .unwrap();
        w.process();
        assert_eq!(g.backing.discarded(), 0);
        assert!(all(&g, 0x20_0000, PAGE, MARK));
        assert_eq!(used(&g, REPORTING), [(0, 0)], "the loop only");
        // A whole ring of chains (the loop, and the headless one once
        // more): one pass takes the queue's size of them, and says more
        // may wait.
        g.ram
            .memory
            .write_obj(2 + SIZE, GuestAddress(avail + 2))
            .unwrap();
        assert!(w.process(), "a full pass");
        assert_eq!(used(&g, REPORTING).len(), usize::from(SIZE));
        // An index claiming more than the ring holds: virtio-queue takes
        // nothing.
        g.ram
            .memory
            .write_obj(3 + 3 * SIZE, GuestAddress(avail + 2))
            .unwrap();
        assert!(!w.process());
        assert_eq!(g.backing.discarded(), 0);
    }

    #[test]
    fn inflated_pfns_in_guest_ram_are_given_back_and_the_others_skipped() {
        let g = guest(64);
        let d = driver(&g.ram.memory, INFLATE);
        let mut w = worker(&g);
        let pfns: [u32; 6] = [0x300, 0x301, 0x302, 0x500, 64 << 8, u32::MAX];
        let buf = 0x8_0000;
        let bytes: Vec<u8> = pfns.iter().flat_map(|p| p.to_le_bytes()).collect();
        g.ram.memory.write_slice(&bytes, GuestAddress(buf)).unwrap();
        mark(&g, 0x2ff000, 5 * PAGE);
        mark(&g, 0x500000, PAGE);
        publish(&d, 0, &[(buf, bytes.len() as u32, 0)]);
        w.process();
        assert_eq!(g.backing.discarded(), 4 * PAGE, "0x300..0x303 and 0x500");
        assert!(all(&g, 0x300000, 3 * PAGE, 0));
        assert!(all(&g, 0x500000, PAGE, 0));
        assert!(all(&g, 0x2ff000, PAGE, MARK), "PFN 0x2ff was not inflated");
        assert!(all(&g, 0x303000, PAGE, MARK), "PFN 0x303 was not inflated");
        assert!(g.backing.warned.load(Ordering::Relaxed), "the bad PFNs");
        assert_eq!(used(&g, INFLATE), [(0, 0)]);
        // Deflating: returned, nothing else.
        let d = driver(&g.ram.memory, DEFLATE);
        publish(&d, 0, &[(buf, bytes.len() as u32, 0)]);
        w.process();
        assert_eq!(used(&g, DEFLATE), [(0, 0)]);
        assert_eq!(g.backing.discarded(), 4 * PAGE);
    }

    #[test]
    fn config_space_asks_for_no_pages_and_keeps_the_actual_the_driver_writes() {
        let g = guest(64);
        let mut dev = BalloonDevice::new(&g.ram).unwrap();
        assert_eq!(dev.device_type(), 5);
        assert_eq!(
            dev.features(),
            F_VERSION_1 | (1 << 5),
            "VERSION_1, REPORTING"
        );
        assert_eq!(dev.queue_max_sizes(), [128, 128, 128]);
        let mut c = [0xffu8; 16];
        dev.read_config(0, &mut c);
        assert_eq!(c, [0; 16], "num_pages 0, actual 0, no hint, no poison");
        dev.write_config(4, &0x1234_5678u32.to_le_bytes());
        let mut actual = [0u8; 4];
        dev.read_config(4, &mut actual);
        assert_eq!(u32::from_le_bytes(actual), 0x1234_5678);
        // Writes elsewhere are ignored; a write straddling `actual` keeps
        // only its bytes.
        dev.write_config(0, &[9; 4]);
        dev.write_config(6, &[0xaa, 0xbb, 0xcc, 0xdd]);
        dev.write_config(u64::MAX, &[1, 2]);
        dev.read_config(0, &mut c);
        assert_eq!(&c[..8], &[0, 0, 0, 0, 0x78, 0x56, 0xaa, 0xbb]);
        assert_eq!(&c[8..], &[0; 8]);
    }

    #[test]
    fn the_worker_gives_back_reports_from_activation_to_reset_and_again() {
        let g = guest(64);
        let mut dev = BalloonDevice::new(&g.ram).unwrap();
        let counter = dev.discarded();
        // A ring outside guest memory: refused, the device stays inactive.
        let mut outside = config(REPORTING);
        outside.desc = 1 << 40;
        let e = dev
            .thread
            .activate(&[config(INFLATE), config(DEFLATE), outside])
            .unwrap_err();
        assert!(matches!(e, BalloonError::QueueAddress(2)), "{e}");
        for round in 0..2u64 {
            let queues = [config(INFLATE), config(DEFLATE), config(REPORTING)];
            dev.thread.activate(&queues).unwrap();
            let d = driver(&g.ram.memory, REPORTING);
            let addr = 0x40_0000 + round * 0x10_0000;
            mark(&g, addr, PAGE);
            publish(&d, 0, &[(addr, PAGE as u32, F_WRITE)]);
            dev.thread.kicks[REPORTING].write(1).unwrap();
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
            while used(&g, REPORTING).is_empty() {
                assert!(
                    std::time::Instant::now() < deadline,
                    "round {round}: no reply"
                );
                std::thread::sleep(std::time::Duration::from_millis(1));
            }
            assert_eq!(counter.load(Ordering::Relaxed), (round + 1) * PAGE);
            assert!(all(&g, addr, PAGE, 0));
            dev.thread.deactivate();
            g.ram
                .memory
                .write_slice(&[0u8; 0x3000], GuestAddress(RINGS))
                .unwrap();
        }
    }

    #[test]
    fn a_driver_without_a_reporting_queue_still_activates() {
        let g = guest(64);
        let mut dev = BalloonDevice::new(&g.ram).unwrap();
        let absent = QueueConfig {
            max_size: QUEUE_SIZE,
            ..Default::default()
        };
        dev.thread
            .activate(&[config(INFLATE), config(DEFLATE), absent])
            .unwrap();
    }

    #[test]
    fn ranges_map_to_memfd_offsets_above_the_gap() {
        let g = guest((MMIO_GAP_START >> 20) + 64);
        let b = &g.backing;
        assert_eq!(b.offset(MMIO_GAP_END, PAGE), Some(MMIO_GAP_START));
        assert_eq!(
            b.offset(MMIO_GAP_END + 0x20_0000, 0x20_0000),
            Some(MMIO_GAP_START + 0x20_0000)
        );
        assert_eq!(
            b.offset(MMIO_GAP_START - PAGE, PAGE),
            Some(MMIO_GAP_START - PAGE)
        );
        assert_eq!(b.offset(MMIO_GAP_END + (64 << 20), PAGE), None);
        // The memfd itself: a hole above the gap lands at its offset.
        let off = MMIO_GAP_START + 0x1000;
        g.ram.memfd.write_all_at(&[MARK; 4096], off).unwrap();
        b.discard(off, PAGE);
        let mut back = [MARK; 4096];
        g.ram.memfd.read_exact_at(&mut back, off).unwrap();
        assert_eq!(back, [0; 4096]);
    }
}
