//! The CMOS real-time clock (MC146818) at ports 0x70 (index) and 0x71
//! (data), enough for Linux to read the wall-clock time at boot: the time
//! and date registers in BCD, 24-hour mode, the century byte, "update not
//! in progress" and "time valid". The clock is the host's UTC clock; guest
//! writes to the time registers are ignored (the guest keeps its own time
//! after boot), the rest of the 128 bytes of CMOS RAM is plain storage.

use std::time::{SystemTime, UNIX_EPOCH};

pub const RTC_BASE: u16 = 0x70;
pub const RTC_LEN: u16 = 2;

const SECONDS: u8 = 0x00;
const MINUTES: u8 = 0x02;
const HOURS: u8 = 0x04;
const WEEKDAY: u8 = 0x06;
const DAY: u8 = 0x07;
const MONTH: u8 = 0x08;
const YEAR: u8 = 0x09;
const REG_A: u8 = 0x0a;
const REG_B: u8 = 0x0b;
const REG_C: u8 = 0x0c;
const REG_D: u8 = 0x0d;
const CENTURY: u8 = 0x32;
/// Register A: 32.768 kHz time base, 1024 Hz rate; UIP (bit 7) clear.
const REG_A_VALUE: u8 = 0x26;
/// Register B: 24-hour mode, BCD, no interrupts enabled.
const REG_B_VALUE: u8 = 0x02;
/// Register D: VRT, the clock's battery is good.
const REG_D_VALUE: u8 = 0x80;

pub struct Rtc {
    index: u8,
    ram: [u8; 128],
    clock: fn() -> u64,
}

fn host_clock() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

impl Default for Rtc {
    fn default() -> Self {
        Self::with_clock(host_clock)
    }
}

/// A calendar date and time of day, UTC.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DateTime {
    pub year: u32,
    pub month: u8,
    pub day: u8,
    /// 1 = Sunday .. 7 = Saturday, as the RTC counts.
    pub weekday: u8,
    pub hour: u8,
    pub minute: u8,
    pub second: u8,
}

impl DateTime {
    /// The civil date of `secs` seconds after 1970-01-01T00:00:00Z, by the
    /// days-from-civil inverse on 400-year eras of 146097 days.
    pub fn from_unix(secs: u64) -> Self {
        let days = secs / 86_400;
        let rem = secs % 86_400;
        // Shift the epoch to 0000-03-01 so leap days end each year.
        let z = days + 719_468;
        let era = z / 146_097;
        let doe = z % 146_097;
        let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
        let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
        let mp = (5 * doy + 2) / 153;
        let day = (doy - (153 * mp + 2) / 5 + 1) as u8;
        let month = if mp < 10 { mp + 3 } else { mp - 9 } as u8;
        let year = (yoe + era * 400 + u64::from(month <= 2)) as u32;
        Self {
            year,
            month,
            day,
            // 1970-01-01 was a Thursday (5 counting Sunday as 1).
            weekday: ((days + 4) % 7 + 1) as u8,
            hour: (rem / 3600) as u8,
            minute: (rem / 60 % 60) as u8,
            second: (rem % 60) as u8,
        }
    }
}

fn bcd(v: u32) -> u8 {
    let v = v % 100;
    (((v / 10) << 4) | (v % 10)) as u8
}

impl Rtc {
    pub fn with_clock(clock: fn() -> u64) -> Self {
        Self {
            index: 0,
            ram: [0; 128],
            clock,
        }
    }

    /// `offset` 0 is the index port, 1 the data port.
    pub fn read(&mut self, offset: u16) -> u8 {
        if offset == 0 {
            return self.index;
        }
        let now = || DateTime::from_unix((self.clock)());
        match self.index {
            SECONDS => bcd(now().second.into()),
            MINUTES => bcd(now().minute.into()),
            HOURS => bcd(now().hour.into()),
            WEEKDAY => bcd(now().weekday.into()),
            DAY => bcd(now().day.into()),
            MONTH => bcd(now().month.into()),
            YEAR => bcd(now().year),
            CENTURY => bcd(now().year / 100),
            REG_A => REG_A_VALUE,
            REG_B => REG_B_VALUE,
            REG_C => 0,
            REG_D => REG_D_VALUE,
            i => self.ram[usize::from(i)],
        }
    }

    pub fn write(&mut self, offset: u16, value: u8) {
        if offset == 0 {
            // Bit 7 masks NMIs on real hardware; there is nothing to mask.
            self.index = value & 0x7f;
            return;
        }
        match self.index {
            SECONDS..=REG_D | CENTURY => {}
            i => self.ram[usize::from(i)] = value,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unix_times_become_calendar_dates() {
        let d = DateTime::from_unix(0);
        assert_eq!((d.year, d.month, d.day, d.weekday), (1970, 1, 1, 5));
        // 2000-02-29T12:34:56Z, a Tuesday in a leap year divisible by 400.
        let d = DateTime::from_unix(951_827_696);
        assert_eq!(
            (d.year, d.month, d.day, d.weekday, d.hour, d.minute, d.second),
            (2000, 2, 29, 3, 12, 34, 56)
        );
        // 2026-11-23T23:59:59Z, a Monday.
        let d = DateTime::from_unix(1_795_478_399);
        assert_eq!(
            (d.year, d.month, d.day, d.weekday, d.hour, d.minute, d.second),
            (2026, 11, 23, 2, 23, 59, 59)
        );
        // 2100 is not a leap year: 2100-02-28 is followed by 03-01.
        let d = DateTime::from_unix(4_107_542_400);
        assert_eq!((d.year, d.month, d.day), (2100, 3, 1));
    }

    fn reg(rtc: &mut Rtc, index: u8) -> u8 {
        rtc.write(0, index);
        rtc.read(1)
    }

    #[test]
    fn the_guest_reads_the_time_in_bcd_and_valid_status() {
        let mut rtc = Rtc::with_clock(|| 951_827_696);
        assert_eq!(reg(&mut rtc, SECONDS), 0x56);
        assert_eq!(reg(&mut rtc, MINUTES), 0x34);
        assert_eq!(reg(&mut rtc, HOURS), 0x12);
        assert_eq!(reg(&mut rtc, DAY), 0x29);
        assert_eq!(reg(&mut rtc, MONTH), 0x02);
        assert_eq!(reg(&mut rtc, YEAR), 0x00);
        assert_eq!(reg(&mut rtc, CENTURY), 0x20);
        assert_eq!(reg(&mut rtc, WEEKDAY), 0x03);
        assert_eq!(reg(&mut rtc, REG_A) & 0x80, 0, "no update in progress");
        assert_eq!(reg(&mut rtc, REG_B) & 0x06, 0x02, "BCD, 24-hour");
        assert_eq!(reg(&mut rtc, REG_D), 0x80, "time valid");
        // The NMI mask bit does not change the register chosen.
        rtc.write(0, 0x80 | SECONDS);
        assert_eq!(rtc.read(1), 0x56);
    }

    #[test]
    fn the_clock_ignores_guest_writes_and_cmos_ram_keeps_them() {
        let mut rtc = Rtc::with_clock(|| 951_827_696);
        rtc.write(0, HOURS);
        rtc.write(1, 0x01);
        assert_eq!(reg(&mut rtc, HOURS), 0x12);
        rtc.write(0, 0x40);
        rtc.write(1, 0xab);
        assert_eq!(reg(&mut rtc, 0x40), 0xab);
        assert_eq!(reg(&mut rtc, 0x41), 0);
    }
}
