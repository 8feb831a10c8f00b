//! What more than one target needs.

use husk_vmm::virtio_mmio::QueueConfig;

/// A ready queue of at most 16 entries with its rings packed from `base`
/// (descriptors, then driver and device areas), so that short inputs
/// already reach them.
pub fn queue(base: u64, size: u16) -> QueueConfig {
    QueueConfig {
        max_size: 16,
        size,
        ready: true,
        desc: base,
        driver: base + 0x100,
        device: base + 0x200,
    }
}
