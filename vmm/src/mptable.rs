//! An Intel MultiProcessor Specification (1.4) table, so the guest finds
//! its CPUs, the in-kernel IOAPIC and the ISA interrupt routing without
//! ACPI. Linux scans the last KiB of base memory for the floating pointer;
//! the table goes there, outside the RAM the memory map reports.

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

/// Floating pointer, then the configuration table right after it.
pub const MPTABLE_START: u64 = 0x9_fc00;
/// Space up to the end of base memory.
const MPTABLE_MAX: usize = 0x400;
const LAPIC_ADDR: u32 = 0xfee0_0000;
const IOAPIC_ADDR: u32 = 0xfec0_0000;
const APIC_VERSION: u8 = 0x14;
const IOAPIC_VERSION: u8 = 0x11;
/// ISA interrupts routed identically to IOAPIC pins 0..16 (as KVM's
/// default GSI routing does).
const ISA_IRQS: u8 = 16;

#[derive(Debug, thiserror::Error)]
pub enum MpTableError {
    #[error("{0} vCPUs do not fit in the MP table")]
    TooManyCpus(u8),
    #[error("writing the MP table into guest memory")]
    Write,
}

fn checksum(bytes: &[u8]) -> u8 {
    bytes
        .iter()
        .fold(0u8, |a, b| a.wrapping_add(*b))
        .wrapping_neg()
}

/// The table's bytes for `cpus` processors: floating pointer (16 bytes)
/// followed by the configuration table.
pub fn build(cpus: u8) -> Result<Vec<u8>, MpTableError> {
    let ioapic_id = cpus;
    let mut entries: Vec<u8> = Vec::new();
    let mut count: u16 = 0;
    for id in 0..cpus {
        let mut e = vec![0u8; 20];
        e[0] = 0; // processor
        e[1] = id;
        e[2] = APIC_VERSION;
        e[3] = 0x1 | if id == 0 { 0x2 } else { 0 }; // enabled, boot processor
        e[4..8].copy_from_slice(&0x600u32.to_le_bytes()); // family 6 signature
        e[8..12].copy_from_slice(&0x201u32.to_le_bytes()); // FPU, APIC
        entries.extend_from_slice(&e);
        count += 1;
    }
    // Bus 0: ISA.
    entries.extend_from_slice(&[1, 0, b'I', b'S', b'A', b' ', b' ', b' ']);
    count += 1;
    // The IOAPIC.
    entries.extend_from_slice(&[2, ioapic_id, IOAPIC_VERSION, 1]);
    entries.extend_from_slice(&IOAPIC_ADDR.to_le_bytes());
    count += 1;
    for irq in 0..ISA_IRQS {
        // I/O interrupt: INT, conforming polarity/trigger, bus 0 irq -> pin.
        entries.extend_from_slice(&[3, 0, 0, 0, 0, irq, ioapic_id, irq]);
        count += 1;
    }
    // Local interrupts: LINT0 ExtINT, LINT1 NMI, to every LAPIC.
    entries.extend_from_slice(&[4, 3, 0, 0, 0, 0, 0xff, 0]);
    entries.extend_from_slice(&[4, 1, 0, 0, 0, 0, 0xff, 1]);
    count += 2;

    let table_len = 44 + entries.len();
    if 16 + table_len > MPTABLE_MAX {
        return Err(MpTableError::TooManyCpus(cpus));
    }
    let mut table = vec![0u8; 44];
    table[0..4].copy_from_slice(b"PCMP");
    table[4..6].copy_from_slice(&(table_len as u16).to_le_bytes());
    table[6] = 4; // spec revision 1.4
    table[8..16].copy_from_slice(b"HUSK    ");
    table[16..28].copy_from_slice(b"HUSK-VMM    ");
    table[34..36].copy_from_slice(&count.to_le_bytes());
    table[36..40].copy_from_slice(&LAPIC_ADDR.to_le_bytes());
    table.extend_from_slice(&entries);
    table[7] = checksum(&table);

    let mut fp = vec![0u8; 16];
    fp[0..4].copy_from_slice(b"_MP_");
    fp[4..8].copy_from_slice(&((MPTABLE_START + 16) as u32).to_le_bytes());
    fp[8] = 1; // length in 16-byte units
    fp[9] = 4;
    fp[10] = checksum(&fp);
    fp.extend_from_slice(&table);
    Ok(fp)
}

pub fn write(mem: &GuestMemoryMmap, cpus: u8) -> Result<(), MpTableError> {
    let bytes = build(cpus)?;
    mem.write_slice(&bytes, GuestAddress(MPTABLE_START))
        .map_err(|_| MpTableError::Write)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sums_to_zero(b: &[u8]) -> bool {
        b.iter().fold(0u8, |a, x| a.wrapping_add(*x)) == 0
    }

    #[test]
    fn floating_pointer_and_table_check_out() {
        let t = build(2).unwrap();
        assert_eq!(&t[0..4], b"_MP_");
        assert!(sums_to_zero(&t[0..16]), "floating pointer checksum");
        let ptr = u32::from_le_bytes(t[4..8].try_into().unwrap()) as u64;
        assert_eq!(ptr, MPTABLE_START + 16);
        let table = &t[16..];
        assert_eq!(&table[0..4], b"PCMP");
        let len = u16::from_le_bytes([table[4], table[5]]) as usize;
        assert_eq!(len, table.len());
        assert!(sums_to_zero(table), "table checksum");
        let count = u16::from_le_bytes([table[34], table[35]]);
        // 2 CPUs, 1 bus, 1 IOAPIC, 16 IRQs, 2 local interrupts.
        assert_eq!(count, 2 + 1 + 1 + 16 + 2);
        // The second processor is enabled and not the boot processor.
        assert_eq!((table[44 + 20 + 1], table[44 + 20 + 3]), (1, 1));
        assert_eq!(table[44 + 3], 3, "boot processor flag on CPU 0");
    }

    #[test]
    fn the_table_fits_below_the_end_of_base_memory() {
        assert!(build(32).is_ok());
        assert!(matches!(build(48), Err(MpTableError::TooManyCpus(48))));
        assert!(MPTABLE_START + build(32).unwrap().len() as u64 <= 0xa_0000);
    }
}
