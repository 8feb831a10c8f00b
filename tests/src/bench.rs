//! Helpers for the benchmarks: percentiles and the tables they print.

use std::time::Duration;

pub fn sorted(v: &[Duration]) -> Vec<Duration> {
    let mut v = v.to_vec();
    v.sort();
    v
}

/// Nearest-rank percentile of a non-empty slice.
pub fn percentile(v: &[Duration], p: usize) -> Duration {
    let s = sorted(v);
    let rank = (p * s.len()).div_ceil(100).max(1);
    s[rank - 1]
}

pub fn median(v: &[Duration]) -> Duration {
    percentile(v, 50)
}

pub fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// Prints rows of timings as a markdown table: median, p95, min, max.
pub fn print_table(title: &str, rows: &[(String, Vec<Duration>)]) {
    println!();
    println!(
        "| {:<56} | {:>10} | {:>10} | {:>10} | {:>10} |",
        title, "median ms", "p95 ms", "min ms", "max ms"
    );
    println!(
        "|{:-<58}|{:-<12}|{:-<12}|{:-<12}|{:-<12}|",
        "", "", "", "", ""
    );
    for (name, v) in rows {
        if v.is_empty() {
            continue;
        }
        let s = sorted(v);
        println!(
            "| {:<56} | {:>10.1} | {:>10.1} | {:>10.1} | {:>10.1} |",
            name,
            ms(percentile(&s, 50)),
            ms(percentile(&s, 95)),
            ms(s[0]),
            ms(s[s.len() - 1])
        );
    }
}

/// Runs of each kind, from HUSK_BENCH_RUNS (default 10).
pub fn runs() -> usize {
    std::env::var("HUSK_BENCH_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10)
        .max(1)
}

/// (PSS outside guest-memory mappings, PSS of guest-memory mappings) of
/// process `pid`, in KiB; zeros for a process that is gone. Guest memory is
/// what the VMMs map from a memfd.
pub fn pss_kib(pid: u32) -> (u64, u64) {
    let Ok(smaps) = std::fs::read_to_string(format!("/proc/{pid}/smaps")) else {
        return (0, 0);
    };
    let (mut own, mut guest) = (0, 0);
    let mut in_guest_mem = false;
    for line in smaps.lines() {
        let first = line.split_whitespace().next().unwrap_or("");
        if first.contains('-') && first.chars().next().is_some_and(|c| c.is_ascii_hexdigit()) {
            // A mapping header: the 6th field is the path, if any.
            in_guest_mem = line
                .split_whitespace()
                .nth(5)
                .is_some_and(|p| p.starts_with("/memfd:"));
        } else if let Some(v) = line.strip_prefix("Pss:") {
            let kib: u64 = v.trim().trim_end_matches("kB").trim().parse().unwrap_or(0);
            if in_guest_mem {
                guest += kib;
            } else {
                own += kib;
            }
        }
    }
    (own, guest)
}

/// `pid` and every process below it.
pub fn with_descendants(pid: u32) -> Vec<u32> {
    let parents: Vec<(u32, u32)> = std::fs::read_dir("/proc")
        .map(|d| {
            d.flatten()
                .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
                .filter_map(|p| {
                    let stat = std::fs::read_to_string(format!("/proc/{p}/stat")).ok()?;
                    // The parent is the second field after the name's ')'.
                    let ppid = stat.rsplit_once(')')?.1.split_whitespace().nth(1)?;
                    Some((p, ppid.parse().ok()?))
                })
                .collect()
        })
        .unwrap_or_default();
    let mut out = vec![pid];
    let mut i = 0;
    while i < out.len() {
        let parent = out[i];
        out.extend(
            parents
                .iter()
                .filter(|(_, pp)| *pp == parent)
                .map(|(p, _)| *p),
        );
        i += 1;
    }
    out
}

/// MemAvailable from /proc/meminfo, in KiB.
pub fn mem_available_kib() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find_map(|l| l.strip_prefix("MemAvailable:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .expect("MemAvailable in /proc/meminfo")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_percentiles() {
        let v: Vec<Duration> = [5, 1, 4, 2, 3]
            .iter()
            .map(|&n| Duration::from_millis(n))
            .collect();
        assert_eq!(median(&v), Duration::from_millis(3));
        assert_eq!(percentile(&v, 95), Duration::from_millis(5));
        assert_eq!(percentile(&v[..1], 95), Duration::from_millis(5));
    }
}
