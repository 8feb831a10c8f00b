//! Port I/O a guest makes to the legacy devices: the 16550 UART, the i8042
//! (reset line) and the CMOS RTC, plus ports nobody serves. No access may
//! panic; an unknown port reads as all ones.

#![no_main]

use husk_vmm::devices::{EventFdTrigger, PioBus};
use libfuzzer_sys::fuzz_target;

/// Ports worth reaching often: serial 0x3f8-0x3ff, i8042 0x60 and 0x64,
/// RTC 0x70 and 0x71; the selector's high values give any port.
fn port(sel: u8, raw: u16) -> u16 {
    match sel % 8 {
        0..=2 => 0x3f8 + (raw % 8),
        3 => 0x60,
        4 => 0x64,
        5 => 0x70,
        6 => 0x71,
        _ => raw,
    }
}

fuzz_target!(|data: &[u8]| {
    let irq = EventFdTrigger::new().expect("eventfd");
    let mut bus = PioBus::new(irq, Box::new(std::io::sink())).expect("bus");
    for op in data.chunks(6) {
        let [kind, sel, lo, hi, value @ ..] = op else {
            break;
        };
        let p = port(*sel, u16::from_le_bytes([*lo, *hi]));
        let width = [1usize, 2, 4][usize::from(kind >> 1) % 3].min(value.len().max(1));
        if kind & 1 == 0 {
            let mut buf = vec![0u8; width];
            bus.read(p, &mut buf);
        } else {
            let _ = bus.write(p, &value[..width.min(value.len())]);
        }
    }
    bus.flush_console();
    let mut b = [0u8; 1];
    bus.read(0x1234, &mut b);
    assert_eq!(b, [0xff], "an unknown port reads as all ones");
});
