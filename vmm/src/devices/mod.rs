//! Legacy devices on the port-I/O bus: the 8250 serial console (COM1), the
//! i8042 controller, whose only job is the CPU-reset line the guest pulls
//! to power off, and the CMOS real-time clock the guest reads its
//! wall-clock time from at boot.

pub mod rtc;

use std::io::Write;

use vm_superio::serial::NoEvents;
use vm_superio::{I8042Device, Serial, Trigger};
use vmm_sys_util::eventfd::EventFd;

/// COM1.
pub const SERIAL_BASE: u16 = 0x3f8;
pub const SERIAL_LEN: u16 = 8;
/// The serial line's interrupt (legacy IRQ 4).
pub const SERIAL_IRQ: u32 = 4;
/// i8042 registers 0x60..=0x64 (0x64: command).
pub const I8042_BASE: u16 = 0x60;
pub const I8042_LEN: u16 = 5;

/// An eventfd as vm-superio's interrupt/event trigger.
pub struct EventFdTrigger(pub EventFd);

impl Trigger for EventFdTrigger {
    type E = std::io::Error;

    fn trigger(&self) -> std::io::Result<()> {
        self.0.write(1)
    }
}

impl EventFdTrigger {
    pub fn new() -> std::io::Result<Self> {
        EventFd::new(libc::EFD_NONBLOCK).map(Self)
    }
}

/// What a port write did that the run loop must act on.
#[derive(Debug, PartialEq, Eq)]
pub enum PioAction {
    None,
    Reset,
}

pub struct PioBus {
    serial: Serial<EventFdTrigger, NoEvents, Box<dyn Write + Send>>,
    i8042: I8042Device<EventFdTrigger>,
    rtc: rtc::Rtc,
}

impl PioBus {
    /// `serial_irq` is signalled when the UART raises its interrupt;
    /// `console` receives the guest's serial output.
    pub fn new(
        serial_irq: EventFdTrigger,
        console: Box<dyn Write + Send>,
    ) -> std::io::Result<Self> {
        Ok(Self {
            serial: Serial::new(serial_irq, console),
            i8042: I8042Device::new(EventFdTrigger::new()?),
            rtc: rtc::Rtc::default(),
        })
    }

    pub fn read(&mut self, port: u16, data: &mut [u8]) {
        let value = match port {
            p if (SERIAL_BASE..SERIAL_BASE + SERIAL_LEN).contains(&p) => {
                self.serial.read((p - SERIAL_BASE) as u8)
            }
            p if (I8042_BASE..I8042_BASE + I8042_LEN).contains(&p) => {
                self.i8042.read((p - I8042_BASE) as u8)
            }
            p if (rtc::RTC_BASE..rtc::RTC_BASE + rtc::RTC_LEN).contains(&p) => {
                self.rtc.read(p - rtc::RTC_BASE)
            }
            // Nothing there: the bus floats high.
            _ => 0xff,
        };
        data.fill(0);
        if let Some(b) = data.first_mut() {
            *b = value;
        }
    }

    pub fn write(&mut self, port: u16, data: &[u8]) -> PioAction {
        let Some(&value) = data.first() else {
            return PioAction::None;
        };
        match port {
            p if (SERIAL_BASE..SERIAL_BASE + SERIAL_LEN).contains(&p) => {
                // A full console must not stop the guest; the byte is lost.
                let _ = self.serial.write((p - SERIAL_BASE) as u8, value);
                PioAction::None
            }
            p if (I8042_BASE..I8042_BASE + I8042_LEN).contains(&p) => {
                let _ = self.i8042.write((p - I8042_BASE) as u8, value);
                if self.i8042.reset_evt().0.read().is_ok() {
                    PioAction::Reset
                } else {
                    PioAction::None
                }
            }
            p if (rtc::RTC_BASE..rtc::RTC_BASE + rtc::RTC_LEN).contains(&p) => {
                self.rtc.write(p - rtc::RTC_BASE, value);
                PioAction::None
            }
            _ => PioAction::None,
        }
    }

    pub fn flush_console(&mut self) {
        let _ = self.serial.writer_mut().flush();
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use super::*;

    #[derive(Clone, Default)]
    struct Sink(Arc<Mutex<Vec<u8>>>);

    impl Write for Sink {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    fn bus() -> (PioBus, Sink) {
        let sink = Sink::default();
        let bus = PioBus::new(EventFdTrigger::new().unwrap(), Box::new(sink.clone())).unwrap();
        (bus, sink)
    }

    #[test]
    fn serial_bytes_reach_the_console() {
        let (mut bus, sink) = bus();
        for b in b"ok\n" {
            assert_eq!(bus.write(SERIAL_BASE, &[*b]), PioAction::None);
        }
        assert_eq!(sink.0.lock().unwrap().as_slice(), b"ok\n");
        // Line status: transmitter empty.
        let mut lsr = [0u8; 1];
        bus.read(SERIAL_BASE + 5, &mut lsr);
        assert_ne!(lsr[0] & 0x20, 0);
    }

    #[test]
    fn only_the_reset_command_resets() {
        let (mut bus, _) = bus();
        assert_eq!(bus.write(0x64, &[0x01]), PioAction::None);
        assert_eq!(bus.write(0x60, &[0xfe]), PioAction::None);
        assert_eq!(bus.write(0x64, &[0xfe]), PioAction::Reset);
        assert_eq!(bus.write(0x64, &[]), PioAction::None);
    }

    #[test]
    fn the_rtc_answers_on_its_ports_with_the_host_date() {
        let (mut bus, _) = bus();
        let year = rtc::DateTime::from_unix(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_secs(),
        )
        .year;
        let mut d = [0u8; 1];
        bus.write(0x70, &[0x32]);
        bus.read(0x71, &mut d);
        assert_eq!(
            u32::from(d[0] >> 4) * 10 + u32::from(d[0] & 0xf),
            year / 100
        );
        bus.write(0x70, &[0x0d]);
        bus.read(0x71, &mut d);
        assert_eq!(d[0], 0x80);
    }

    #[test]
    fn unknown_ports_float_high_and_ignore_writes() {
        let (mut bus, sink) = bus();
        let mut d = [0u8; 2];
        bus.read(0x80, &mut d);
        assert_eq!(d, [0xff, 0]);
        assert_eq!(bus.write(0x80, &[1]), PioAction::None);
        assert!(sink.0.lock().unwrap().is_empty());
    }
}
