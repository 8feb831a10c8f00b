//! The virtio-mmio transport (virtio 1.x, register layout version 2): the
//! register file a guest driver programs, as a state machine that refuses
//! what the specification does not allow. The guest is untrusted: every
//! write is checked, none can panic, and a refused write changes nothing.
//!
//! The device behind it (a vhost-user frontend, or husk-vmm's own net or
//! balloon device) sees only the
//! outcome: [`Action::Activate`] once the driver is ready with its queues,
//! [`Action::Notify`] for queue kicks, [`Action::Reset`] on reset.

/// "virt", little-endian.
pub const MAGIC: u32 = 0x7472_6976;
/// Register layout version of virtio 1.x over MMIO.
pub const VERSION: u32 = 2;
/// Bytes of register space before the device's config space.
pub const CONFIG_OFFSET: u64 = 0x100;
/// Size of one device's MMIO window.
pub const WINDOW: u64 = 0x1000;
/// VIRTIO_F_VERSION_1: a modern device; required.
pub const F_VERSION_1: u64 = 1 << 32;

pub mod status {
    pub const ACKNOWLEDGE: u32 = 1;
    pub const DRIVER: u32 = 2;
    pub const DRIVER_OK: u32 = 4;
    pub const FEATURES_OK: u32 = 8;
    pub const DEVICE_NEEDS_RESET: u32 = 64;
    pub const FAILED: u32 = 128;
}

mod reg {
    pub const MAGIC: u64 = 0x000;
    pub const VERSION: u64 = 0x004;
    pub const DEVICE_ID: u64 = 0x008;
    pub const VENDOR_ID: u64 = 0x00c;
    pub const DEVICE_FEATURES: u64 = 0x010;
    pub const DEVICE_FEATURES_SEL: u64 = 0x014;
    pub const DRIVER_FEATURES: u64 = 0x020;
    pub const DRIVER_FEATURES_SEL: u64 = 0x024;
    pub const QUEUE_SEL: u64 = 0x030;
    pub const QUEUE_NUM_MAX: u64 = 0x034;
    pub const QUEUE_NUM: u64 = 0x038;
    pub const QUEUE_READY: u64 = 0x044;
    pub const QUEUE_NOTIFY: u64 = 0x050;
    pub const INTERRUPT_STATUS: u64 = 0x060;
    pub const INTERRUPT_ACK: u64 = 0x064;
    pub const STATUS: u64 = 0x070;
    pub const QUEUE_DESC_LOW: u64 = 0x080;
    pub const QUEUE_DESC_HIGH: u64 = 0x084;
    pub const QUEUE_DRIVER_LOW: u64 = 0x090;
    pub const QUEUE_DRIVER_HIGH: u64 = 0x094;
    pub const QUEUE_DEVICE_LOW: u64 = 0x0a0;
    pub const QUEUE_DEVICE_HIGH: u64 = 0x0a4;
    pub const CONFIG_GENERATION: u64 = 0x0fc;
}

/// Husk's virtio vendor id ("HUSK" would not fit the spirit; any value the
/// guest does not match on is fine).
pub const VENDOR_ID: u32 = 0x4b53_5548;

/// What a device offers the transport.
pub trait VirtioDevice {
    /// Virtio device type (26 = fs, 19 = vsock).
    fn device_type(&self) -> u32;
    /// Feature bits offered; must include [`F_VERSION_1`].
    fn features(&self) -> u64;
    /// Largest size of each queue; the length is the number of queues.
    fn queue_max_sizes(&self) -> &[u16];
    fn read_config(&self, offset: u64, data: &mut [u8]);
    fn write_config(&mut self, offset: u64, data: &[u8]);
}

/// Reads `data.len()` bytes of a device's config space `config` from
/// `offset`; bytes past its end read as zero (a driver may probe any width).
pub fn read_config_bytes(config: &[u8], offset: u64, data: &mut [u8]) {
    for (i, b) in data.iter_mut().enumerate() {
        *b = usize::try_from(offset)
            .ok()
            .and_then(|o| config.get(o.checked_add(i)?))
            .copied()
            .unwrap_or(0);
    }
}

/// One queue as the driver configured it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct QueueConfig {
    pub max_size: u16,
    pub size: u16,
    pub ready: bool,
    pub desc: u64,
    pub driver: u64,
    pub device: u64,
}

impl QueueConfig {
    /// Ring alignment from the virtio 1.x split-queue layout.
    fn valid(&self) -> bool {
        self.size != 0
            && self.size.is_power_of_two()
            && self.size <= self.max_size
            && self.desc.is_multiple_of(16)
            && self.driver.is_multiple_of(2)
            && self.device.is_multiple_of(4)
            && self.desc != 0
            && self.driver != 0
            && self.device != 0
    }
}

/// What the owner of the transport must do after a write.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    None,
    /// DRIVER_OK with valid, ready queues: start the device.
    Activate,
    /// The driver kicked this queue.
    Notify(u16),
    /// The driver reset the device: stop it.
    Reset,
}

/// Why a write was refused (for logs and tests; the guest sees nothing).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refused {
    Width { offset: u64, len: usize },
    ReadOnly(u64),
    Unknown(u64),
    StatusOrder { from: u32, to: u32 },
    FeaturesNotOffered(u64),
    FeaturesLocked,
    QueueSelect(u32),
    QueueLocked,
    QueueInvalid(u16),
    NotReady,
}

pub struct MmioTransport<D: VirtioDevice> {
    device: D,
    status: u32,
    device_features_sel: u32,
    driver_features_sel: u32,
    driver_features: u64,
    queue_sel: u32,
    queues: Vec<QueueConfig>,
    interrupt_status: u32,
    config_generation: u32,
    active: bool,
    /// The device signals its queues itself (vhost-user call eventfd wired
    /// to an irqfd), so the VMM never sees the event: while active, the
    /// status register always reports "used buffer" and the driver checks
    /// its rings on every interrupt.
    external_interrupts: bool,
}

impl<D: VirtioDevice> MmioTransport<D> {
    pub fn new(device: D) -> Self {
        let queues = device
            .queue_max_sizes()
            .iter()
            .map(|&max_size| QueueConfig {
                max_size,
                ..Default::default()
            })
            .collect();
        Self {
            device,
            status: 0,
            device_features_sel: 0,
            driver_features_sel: 0,
            driver_features: 0,
            queue_sel: 0,
            queues,
            interrupt_status: 0,
            config_generation: 0,
            active: false,
            external_interrupts: false,
        }
    }

    /// A transport whose device raises its interrupts without the VMM
    /// (vhost-user).
    pub fn with_external_interrupts(device: D) -> Self {
        Self {
            external_interrupts: true,
            ..Self::new(device)
        }
    }

    pub fn device_mut(&mut self) -> &mut D {
        &mut self.device
    }

    pub fn device(&self) -> &D {
        &self.device
    }

    pub fn status(&self) -> u32 {
        self.status
    }

    pub fn driver_features(&self) -> u64 {
        self.driver_features
    }

    pub fn queues(&self) -> &[QueueConfig] {
        &self.queues
    }

    /// Raises a used-buffer interrupt (bit 0) or a config change (bit 1).
    pub fn raise(&mut self, bits: u32) {
        self.interrupt_status |= bits & 0b11;
    }

    fn reset(&mut self) {
        self.status = 0;
        self.device_features_sel = 0;
        self.driver_features_sel = 0;
        self.driver_features = 0;
        self.queue_sel = 0;
        self.interrupt_status = 0;
        self.active = false;
        for q in &mut self.queues {
            *q = QueueConfig {
                max_size: q.max_size,
                ..Default::default()
            };
        }
    }

    fn selected(&mut self) -> Option<&mut QueueConfig> {
        self.queues.get_mut(self.queue_sel as usize)
    }

    /// A guest read of `data.len()` bytes at `offset` in the window.
    pub fn read(&self, offset: u64, data: &mut [u8]) {
        if offset >= CONFIG_OFFSET {
            data.fill(0);
            if offset - CONFIG_OFFSET < WINDOW - CONFIG_OFFSET {
                self.device.read_config(offset - CONFIG_OFFSET, data);
            }
            return;
        }
        if data.len() != 4 {
            data.fill(0);
            return;
        }
        let q = self.queues.get(self.queue_sel as usize);
        let v = match offset {
            reg::MAGIC => MAGIC,
            reg::VERSION => VERSION,
            reg::DEVICE_ID => self.device.device_type(),
            reg::VENDOR_ID => VENDOR_ID,
            reg::DEVICE_FEATURES => match self.device_features_sel {
                0 => self.device.features() as u32,
                1 => (self.device.features() >> 32) as u32,
                _ => 0,
            },
            reg::QUEUE_NUM_MAX => q.map_or(0, |q| q.max_size as u32),
            reg::QUEUE_READY => q.map_or(0, |q| q.ready as u32),
            reg::INTERRUPT_STATUS if self.active && self.external_interrupts => {
                self.interrupt_status | 1
            }
            reg::INTERRUPT_STATUS => self.interrupt_status,
            reg::STATUS => self.status,
            reg::CONFIG_GENERATION => self.config_generation,
            _ => 0,
        };
        data.copy_from_slice(&v.to_le_bytes());
    }

    /// A guest write at `offset` in the window.
    pub fn write(&mut self, offset: u64, data: &[u8]) -> Result<Action, Refused> {
        if offset >= CONFIG_OFFSET {
            if self.status & status::DRIVER == 0 {
                return Err(Refused::NotReady);
            }
            if offset - CONFIG_OFFSET < WINDOW - CONFIG_OFFSET {
                self.device.write_config(offset - CONFIG_OFFSET, data);
            }
            return Ok(Action::None);
        }
        let Ok(bytes) = <[u8; 4]>::try_from(data) else {
            return Err(Refused::Width {
                offset,
                len: data.len(),
            });
        };
        let v = u32::from_le_bytes(bytes);
        let features_open = self.status & status::DRIVER != 0
            && self.status & (status::FEATURES_OK | status::FAILED) == 0;
        match offset {
            reg::MAGIC
            | reg::VERSION
            | reg::DEVICE_ID
            | reg::VENDOR_ID
            | reg::DEVICE_FEATURES
            | reg::QUEUE_NUM_MAX
            | reg::INTERRUPT_STATUS
            | reg::CONFIG_GENERATION => Err(Refused::ReadOnly(offset)),
            reg::DEVICE_FEATURES_SEL => {
                self.device_features_sel = v;
                Ok(Action::None)
            }
            reg::DRIVER_FEATURES_SEL => {
                self.driver_features_sel = v;
                Ok(Action::None)
            }
            reg::DRIVER_FEATURES => {
                if !features_open {
                    return Err(Refused::FeaturesLocked);
                }
                let (shift, mask) = match self.driver_features_sel {
                    0 => (0, 0xffff_ffffu64),
                    1 => (32, 0xffff_ffff_0000_0000u64),
                    _ if v == 0 => return Ok(Action::None),
                    _ => return Err(Refused::FeaturesNotOffered(v as u64)),
                };
                let wanted = (v as u64) << shift;
                let extra = wanted & !self.device.features();
                if extra != 0 {
                    return Err(Refused::FeaturesNotOffered(extra));
                }
                self.driver_features = (self.driver_features & !mask) | wanted;
                Ok(Action::None)
            }
            reg::QUEUE_SEL => {
                if v as usize >= self.queues.len() {
                    return Err(Refused::QueueSelect(v));
                }
                self.queue_sel = v;
                Ok(Action::None)
            }
            reg::QUEUE_NUM
            | reg::QUEUE_DESC_LOW
            | reg::QUEUE_DESC_HIGH
            | reg::QUEUE_DRIVER_LOW
            | reg::QUEUE_DRIVER_HIGH
            | reg::QUEUE_DEVICE_LOW
            | reg::QUEUE_DEVICE_HIGH
            | reg::QUEUE_READY => self.write_queue(offset, v),
            reg::QUEUE_NOTIFY => {
                if !self.active {
                    return Err(Refused::NotReady);
                }
                match self.queues.get(v as usize) {
                    Some(q) if q.ready => Ok(Action::Notify(v as u16)),
                    _ => Err(Refused::QueueSelect(v)),
                }
            }
            reg::INTERRUPT_ACK => {
                self.interrupt_status &= !v;
                Ok(Action::None)
            }
            reg::STATUS => self.write_status(v),
            _ => Err(Refused::Unknown(offset)),
        }
    }

    fn write_queue(&mut self, offset: u64, v: u32) -> Result<Action, Refused> {
        let open = self.status & status::FEATURES_OK != 0
            && self.status & (status::DRIVER_OK | status::FAILED) == 0;
        if !open {
            return Err(Refused::QueueLocked);
        }
        let index = self.queue_sel as u16;
        let q = self.selected().ok_or(Refused::QueueSelect(index as u32))?;
        if q.ready && offset != reg::QUEUE_READY {
            return Err(Refused::QueueLocked);
        }
        let low = |x: u64| (x & !0xffff_ffff) | v as u64;
        let high = |x: u64| (x & 0xffff_ffff) | ((v as u64) << 32);
        match offset {
            reg::QUEUE_NUM => {
                if v == 0 || v > q.max_size as u32 || !v.is_power_of_two() {
                    return Err(Refused::QueueInvalid(index));
                }
                q.size = v as u16;
            }
            reg::QUEUE_DESC_LOW => q.desc = low(q.desc),
            reg::QUEUE_DESC_HIGH => q.desc = high(q.desc),
            reg::QUEUE_DRIVER_LOW => q.driver = low(q.driver),
            reg::QUEUE_DRIVER_HIGH => q.driver = high(q.driver),
            reg::QUEUE_DEVICE_LOW => q.device = low(q.device),
            reg::QUEUE_DEVICE_HIGH => q.device = high(q.device),
            reg::QUEUE_READY => match v {
                0 => q.ready = false,
                1 if q.valid() => q.ready = true,
                _ => return Err(Refused::QueueInvalid(index)),
            },
            _ => return Err(Refused::Unknown(offset)),
        }
        Ok(Action::None)
    }

    fn write_status(&mut self, v: u32) -> Result<Action, Refused> {
        use status::*;
        if v == 0 {
            let was_active = self.active;
            self.reset();
            return Ok(if was_active {
                Action::Reset
            } else {
                Action::None
            });
        }
        let refused = Refused::StatusOrder {
            from: self.status,
            to: v,
        };
        // Bits are only ever added, one step at a time, in the spec's order.
        if v & self.status != self.status {
            return Err(refused);
        }
        let added = v & !self.status;
        if added == FAILED {
            self.status = v;
            self.active = false;
            return Ok(Action::None);
        }
        if self.status & FAILED != 0 {
            return Err(refused);
        }
        let prerequisite = match added {
            ACKNOWLEDGE => 0,
            DRIVER => ACKNOWLEDGE,
            FEATURES_OK => ACKNOWLEDGE | DRIVER,
            DRIVER_OK => ACKNOWLEDGE | DRIVER | FEATURES_OK,
            _ => return Err(refused),
        };
        if self.status != prerequisite {
            return Err(refused);
        }
        match added {
            FEATURES_OK => {
                // Without VERSION_1 the driver is a legacy one: FEATURES_OK
                // stays clear, which tells it the device refuses.
                if self.driver_features & F_VERSION_1 == 0 {
                    return Err(Refused::FeaturesNotOffered(0));
                }
                self.status = v;
                Ok(Action::None)
            }
            DRIVER_OK => {
                if !self.queues.iter().any(|q| q.ready) {
                    self.status |= DEVICE_NEEDS_RESET;
                    return Err(Refused::NotReady);
                }
                self.status = v;
                self.active = true;
                Ok(Action::Activate)
            }
            _ => {
                self.status = v;
                Ok(Action::None)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::status::*;
    use super::*;

    /// A vsock-like device: two feature words, three queues, 8 config bytes.
    struct Fake {
        config: [u8; 8],
    }

    impl VirtioDevice for Fake {
        fn device_type(&self) -> u32 {
            19
        }
        fn features(&self) -> u64 {
            F_VERSION_1 | 0b101
        }
        fn queue_max_sizes(&self) -> &[u16] {
            &[256, 256, 64]
        }
        fn read_config(&self, offset: u64, data: &mut [u8]) {
            for (i, b) in data.iter_mut().enumerate() {
                *b = self.config.get(offset as usize + i).copied().unwrap_or(0);
            }
        }
        fn write_config(&mut self, offset: u64, data: &[u8]) {
            for (i, b) in data.iter().enumerate() {
                if let Some(c) = self.config.get_mut(offset as usize + i) {
                    *c = *b;
                }
            }
        }
    }

    /// The guest driver's side, as Linux's virtio_mmio does it.
    struct Driver(MmioTransport<Fake>);

    impl Driver {
        fn new() -> Self {
            Driver(MmioTransport::new(Fake {
                config: [3, 0, 0, 0, 0, 0, 0, 0],
            }))
        }
        fn r(&self, off: u64) -> u32 {
            let mut b = [0u8; 4];
            self.0.read(off, &mut b);
            u32::from_le_bytes(b)
        }
        fn w(&mut self, off: u64, v: u32) -> Result<Action, Refused> {
            self.0.write(off, &v.to_le_bytes())
        }
        fn negotiate(&mut self, features: u64) -> Result<Action, Refused> {
            self.w(reg::STATUS, ACKNOWLEDGE)?;
            self.w(reg::STATUS, ACKNOWLEDGE | DRIVER)?;
            self.w(reg::DRIVER_FEATURES_SEL, 0)?;
            self.w(reg::DRIVER_FEATURES, features as u32)?;
            self.w(reg::DRIVER_FEATURES_SEL, 1)?;
            self.w(reg::DRIVER_FEATURES, (features >> 32) as u32)?;
            self.w(reg::STATUS, ACKNOWLEDGE | DRIVER | FEATURES_OK)
        }
        fn setup_queue(&mut self, q: u32, size: u32, base: u64) -> Result<Action, Refused> {
            self.w(reg::QUEUE_SEL, q)?;
            self.w(reg::QUEUE_NUM, size)?;
            self.w(reg::QUEUE_DESC_LOW, base as u32)?;
            self.w(reg::QUEUE_DESC_HIGH, (base >> 32) as u32)?;
            self.w(reg::QUEUE_DRIVER_LOW, (base + 0x1000) as u32)?;
            self.w(reg::QUEUE_DRIVER_HIGH, 0)?;
            self.w(reg::QUEUE_DEVICE_LOW, (base + 0x2000) as u32)?;
            self.w(reg::QUEUE_DEVICE_HIGH, 0)?;
            self.w(reg::QUEUE_READY, 1)
        }
    }

    #[test]
    fn external_interrupts_always_report_used_buffers_while_active() {
        let mut d = Driver(MmioTransport::with_external_interrupts(Fake {
            config: [0; 8],
        }));
        assert_eq!(d.r(reg::INTERRUPT_STATUS), 0, "inactive");
        d.negotiate(F_VERSION_1).unwrap();
        d.setup_queue(0, 16, 0x4000).unwrap();
        d.w(reg::STATUS, ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK)
            .unwrap();
        assert_eq!(d.r(reg::INTERRUPT_STATUS), 1);
        d.w(reg::INTERRUPT_ACK, 1).unwrap();
        assert_eq!(d.r(reg::INTERRUPT_STATUS), 1);
        d.w(reg::STATUS, 0).unwrap();
        assert_eq!(d.r(reg::INTERRUPT_STATUS), 0, "after reset");
    }

    #[test]
    fn identity_registers() {
        let d = Driver::new();
        assert_eq!(d.r(reg::MAGIC), MAGIC);
        assert_eq!(d.r(reg::VERSION), 2);
        assert_eq!(d.r(reg::DEVICE_ID), 19);
        assert_eq!(d.r(reg::VENDOR_ID), VENDOR_ID);
    }

    #[test]
    fn a_well_behaved_driver_brings_the_device_up() {
        let mut d = Driver::new();
        assert_eq!(d.r(reg::DEVICE_FEATURES), 0b101);
        d.w(reg::DEVICE_FEATURES_SEL, 1).unwrap();
        assert_eq!(d.r(reg::DEVICE_FEATURES), 1, "VERSION_1 is bit 32");
        assert_eq!(d.negotiate(F_VERSION_1 | 0b100), Ok(Action::None));
        assert_eq!(d.0.driver_features(), F_VERSION_1 | 0b100);
        d.w(reg::QUEUE_SEL, 2).unwrap();
        assert_eq!(d.r(reg::QUEUE_NUM_MAX), 64);
        assert_eq!(d.setup_queue(0, 128, 0x10_0000), Ok(Action::None));
        assert_eq!(d.setup_queue(1, 256, 0x20_0000), Ok(Action::None));
        assert_eq!(
            d.w(reg::STATUS, ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK),
            Ok(Action::Activate)
        );
        let q = &d.0.queues()[0];
        assert_eq!(
            (q.size, q.desc, q.driver, q.device),
            (128, 0x10_0000, 0x10_1000, 0x10_2000)
        );
        assert!(q.ready && !d.0.queues()[2].ready);
        assert_eq!(d.w(reg::QUEUE_NOTIFY, 1), Ok(Action::Notify(1)));
        assert_eq!(d.r(CONFIG_OFFSET), 3, "config space");
        d.0.raise(1);
        assert_eq!(d.r(reg::INTERRUPT_STATUS), 1);
        d.w(reg::INTERRUPT_ACK, 1).unwrap();
        assert_eq!(d.r(reg::INTERRUPT_STATUS), 0);
    }

    #[test]
    fn features_not_offered_or_out_of_order_are_refused() {
        let mut d = Driver::new();
        // Features before DRIVER: refused.
        assert_eq!(d.w(reg::DRIVER_FEATURES, 1), Err(Refused::FeaturesLocked));
        d.w(reg::STATUS, ACKNOWLEDGE).unwrap();
        d.w(reg::STATUS, ACKNOWLEDGE | DRIVER).unwrap();
        assert_eq!(
            d.w(reg::DRIVER_FEATURES, 0b010),
            Err(Refused::FeaturesNotOffered(0b010))
        );
        assert_eq!(d.0.driver_features(), 0, "a refused write changes nothing");
        // A legacy driver (no VERSION_1) does not get FEATURES_OK.
        d.w(reg::DRIVER_FEATURES, 0b001).unwrap();
        assert!(d
            .w(reg::STATUS, ACKNOWLEDGE | DRIVER | FEATURES_OK)
            .is_err());
        assert_eq!(d.r(reg::STATUS) & FEATURES_OK, 0);
        d.w(reg::DRIVER_FEATURES_SEL, 1).unwrap();
        d.w(reg::DRIVER_FEATURES, 1).unwrap();
        d.w(reg::STATUS, ACKNOWLEDGE | DRIVER | FEATURES_OK)
            .unwrap();
        // Features are locked once FEATURES_OK is set.
        assert_eq!(d.w(reg::DRIVER_FEATURES, 0), Err(Refused::FeaturesLocked));
        // Selector beyond the two words: only zero is acceptable.
        d.w(reg::DRIVER_FEATURES_SEL, 7).unwrap();
        d.w(reg::DEVICE_FEATURES_SEL, 7).unwrap();
        assert_eq!(d.r(reg::DEVICE_FEATURES), 0);
    }

    #[test]
    fn status_steps_must_follow_the_spec() {
        let mut d = Driver::new();
        assert!(
            d.w(reg::STATUS, DRIVER).is_err(),
            "DRIVER before ACKNOWLEDGE"
        );
        assert!(d.w(reg::STATUS, ACKNOWLEDGE | DRIVER_OK).is_err());
        assert_eq!(d.r(reg::STATUS), 0);
        d.w(reg::STATUS, ACKNOWLEDGE).unwrap();
        assert!(
            d.w(reg::STATUS, ACKNOWLEDGE | DRIVER | FEATURES_OK)
                .is_err(),
            "two steps"
        );
        d.w(reg::STATUS, ACKNOWLEDGE | DRIVER).unwrap();
        assert!(d.w(reg::STATUS, ACKNOWLEDGE).is_err(), "clearing a bit");
        assert!(d.w(reg::STATUS, 0x7f00).is_err(), "unknown bits");
        d.w(reg::STATUS, ACKNOWLEDGE | DRIVER | FAILED).unwrap();
        assert!(d
            .w(reg::STATUS, ACKNOWLEDGE | DRIVER | FAILED | FEATURES_OK)
            .is_err());
        // Reset always works and clears everything.
        assert_eq!(d.w(reg::STATUS, 0), Ok(Action::None));
        assert_eq!(d.r(reg::STATUS), 0);
    }

    #[test]
    fn driver_ok_without_a_ready_queue_asks_for_reset() {
        let mut d = Driver::new();
        d.negotiate(F_VERSION_1).unwrap();
        assert_eq!(
            d.w(reg::STATUS, ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK),
            Err(Refused::NotReady)
        );
        assert_ne!(d.r(reg::STATUS) & DEVICE_NEEDS_RESET, 0);
    }

    #[test]
    fn bad_queue_setups_are_refused_without_harm() {
        let mut d = Driver::new();
        // Before FEATURES_OK the queues are locked.
        assert_eq!(d.w(reg::QUEUE_NUM, 64), Err(Refused::QueueLocked));
        d.negotiate(F_VERSION_1).unwrap();
        assert_eq!(d.w(reg::QUEUE_SEL, 3), Err(Refused::QueueSelect(3)));
        assert_eq!(
            d.w(reg::QUEUE_SEL, u32::MAX),
            Err(Refused::QueueSelect(u32::MAX))
        );
        d.w(reg::QUEUE_SEL, 2).unwrap();
        for bad in [0, 3, 128, 65536] {
            assert_eq!(
                d.w(reg::QUEUE_NUM, bad),
                Err(Refused::QueueInvalid(2)),
                "size {bad}"
            );
        }
        // Ready before addresses: refused.
        d.w(reg::QUEUE_NUM, 64).unwrap();
        assert_eq!(d.w(reg::QUEUE_READY, 1), Err(Refused::QueueInvalid(2)));
        // Misaligned descriptor table: refused at ready.
        d.w(reg::QUEUE_DESC_LOW, 0x1008).unwrap();
        d.w(reg::QUEUE_DRIVER_LOW, 0x2000).unwrap();
        d.w(reg::QUEUE_DEVICE_LOW, 0x3000).unwrap();
        assert_eq!(d.w(reg::QUEUE_READY, 1), Err(Refused::QueueInvalid(2)));
        d.w(reg::QUEUE_DESC_LOW, 0x1000).unwrap();
        d.w(reg::QUEUE_READY, 1).unwrap();
        // A ready queue cannot be moved under the device.
        assert_eq!(d.w(reg::QUEUE_DESC_LOW, 0x9000), Err(Refused::QueueLocked));
        assert_eq!(d.0.queues()[2].desc, 0x1000);
        d.w(reg::STATUS, ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK)
            .unwrap();
        // After DRIVER_OK nothing about queues changes.
        assert_eq!(d.w(reg::QUEUE_READY, 0), Err(Refused::QueueLocked));
        assert_eq!(
            d.w(reg::QUEUE_NOTIFY, 0),
            Err(Refused::QueueSelect(0)),
            "not ready"
        );
        assert_eq!(d.w(reg::QUEUE_NOTIFY, 2), Ok(Action::Notify(2)));
    }

    #[test]
    fn odd_widths_read_only_and_unknown_registers_change_nothing() {
        let mut d = Driver::new();
        assert_eq!(
            d.0.write(reg::STATUS, &[1]),
            Err(Refused::Width {
                offset: reg::STATUS,
                len: 1
            })
        );
        assert!(d.0.write(reg::STATUS, &[1, 0, 0, 0, 0, 0, 0, 0]).is_err());
        assert_eq!(d.w(reg::MAGIC, 0), Err(Refused::ReadOnly(reg::MAGIC)));
        assert_eq!(
            d.w(reg::INTERRUPT_STATUS, 1),
            Err(Refused::ReadOnly(reg::INTERRUPT_STATUS))
        );
        assert_eq!(d.w(0x0ff, 1), Err(Refused::Unknown(0x0ff)));
        assert_eq!(d.r(reg::STATUS), 0);
        let mut b = [0xaa; 2];
        d.0.read(reg::MAGIC, &mut b);
        assert_eq!(b, [0, 0], "narrow register reads read zero");
        // Config space writes before DRIVER are refused; reads past it are 0.
        assert_eq!(d.0.write(CONFIG_OFFSET, &[9]), Err(Refused::NotReady));
        let mut c = [0xaa; 4];
        d.0.read(WINDOW - 2, &mut c);
        assert_eq!(c, [0; 4]);
        d.0.read(WINDOW + 0x10, &mut c);
        assert_eq!(c, [0; 4]);
    }

    #[test]
    fn reset_of_an_active_device_stops_it_and_clears_queues() {
        let mut d = Driver::new();
        d.negotiate(F_VERSION_1).unwrap();
        d.setup_queue(0, 16, 0x4000).unwrap();
        d.w(reg::STATUS, ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK)
            .unwrap();
        d.0.raise(3);
        assert_eq!(d.w(reg::STATUS, 0), Ok(Action::Reset));
        assert_eq!(d.r(reg::INTERRUPT_STATUS), 0);
        assert_eq!(d.0.driver_features(), 0);
        assert_eq!(
            d.0.queues()[0],
            QueueConfig {
                max_size: 256,
                ..Default::default()
            }
        );
        assert_eq!(d.w(reg::QUEUE_NOTIFY, 0), Err(Refused::NotReady));
        // And it can come up again.
        d.negotiate(F_VERSION_1).unwrap();
        d.setup_queue(0, 16, 0x4000).unwrap();
        assert_eq!(
            d.w(reg::STATUS, ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK),
            Ok(Action::Activate)
        );
    }
}
