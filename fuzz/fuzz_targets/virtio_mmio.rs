//! Register accesses a guest driver makes to a virtio-mmio window, in any
//! order, width and value. Besides "no panic": the identity registers never
//! change and a refused write changes nothing the device can see.

#![no_main]

use husk_vmm::virtio_mmio::{
    read_config_bytes, Action, MmioTransport, VirtioDevice, F_VERSION_1, MAGIC, WINDOW,
};
use libfuzzer_sys::fuzz_target;

struct Device {
    config: [u8; 16],
}

impl VirtioDevice for Device {
    fn device_type(&self) -> u32 {
        1
    }
    fn features(&self) -> u64 {
        F_VERSION_1 | 1 << 5 | 1 << 16
    }
    fn queue_max_sizes(&self) -> &[u16] {
        &[256, 256]
    }
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config, offset, data);
    }
    fn write_config(&mut self, offset: u64, data: &[u8]) {
        for (i, b) in data.iter().enumerate() {
            if let Some(c) = usize::try_from(offset)
                .ok()
                .and_then(|o| self.config.get_mut(o + i))
            {
                *c = *b;
            }
        }
    }
}

fn read_u32(t: &MmioTransport<Device>, offset: u64) -> u32 {
    let mut b = [0u8; 4];
    t.read(offset, &mut b);
    u32::from_le_bytes(b)
}

fuzz_target!(|data: &[u8]| {
    let mut t = MmioTransport::new(Device { config: [0; 16] });
    // Each access: kind and width, a 16-bit offset, up to 8 value bytes.
    for op in data.chunks(11) {
        let [kind, lo, hi, value @ ..] = op else {
            break;
        };
        let offset = u64::from(u16::from_le_bytes([*lo, *hi])) % (WINDOW + 0x100);
        let width = [1usize, 2, 4, 8][usize::from(kind >> 1 & 3)].min(value.len().max(1));
        if kind & 1 == 0 {
            let mut buf = vec![0u8; width];
            t.read(offset, &mut buf);
            continue;
        }
        let data = &value[..width.min(value.len())];
        let before = (t.status(), t.driver_features(), t.queues().to_vec());
        match t.write(offset, data) {
            Err(_) => assert_eq!(
                before,
                (t.status(), t.driver_features(), t.queues().to_vec()),
                "a refused write at {offset:#x} changed the transport"
            ),
            Ok(Action::Notify(q)) => assert!(usize::from(q) < 2, "notify of queue {q}"),
            Ok(_) => {}
        }
        if kind & 0x80 != 0 {
            t.raise(u32::from(kind & 3));
        }
    }
    assert_eq!(read_u32(&t, 0), MAGIC);
    assert_eq!(read_u32(&t, 4), 2);
});
