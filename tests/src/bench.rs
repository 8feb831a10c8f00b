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
