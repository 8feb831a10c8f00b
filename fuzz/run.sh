#!/usr/bin/env bash
# Runs every fuzz target for $1 seconds (default 300) and prints a table of
# executions, coverage and crashes. Each target starts from its corpus kept
# in /var/cache/husk/fuzz (grown run after run on this machine) and from the
# regression inputs in fuzz/regressions/<target> (crashes found and fixed,
# kept so they stay fixed). A crash fails the run; cargo fuzz leaves its
# input in fuzz/artifacts/<target>.
set -euo pipefail
cd "$(dirname "$0")"
seconds=${1:-300}
export PATH="/usr/local/bin:$HOME/.cargo/bin:$PATH"
if ! rustup toolchain list | grep -q '^nightly'; then
	echo "fuzz: the nightly toolchain is missing (rustup toolchain install nightly)" >&2
	exit 1
fi
command -v cargo-fuzz >/dev/null || cargo install --locked --root /usr/local cargo-fuzz
cargo +nightly fuzz build -O
targets=$(cargo +nightly fuzz list)
cache=/var/cache/husk/fuzz
failed=0
rows=()
for t in $targets; do
	mkdir -p "$cache/$t" "regressions/$t"
	log=$(mktemp)
	rc=0
	cargo +nightly fuzz run -O "$t" "$cache/$t" "regressions/$t" -- \
		-max_total_time="$seconds" -print_final_stats=1 >"$log" 2>&1 || rc=$?
	runs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)
	rate=$(sed -n 's/^stat::average_exec_per_sec: *//p' "$log" | tail -1)
	cov=$(grep -o 'cov: [0-9]*' "$log" | tail -1 | cut -d' ' -f2 || true)
	crashes=0
	if [ "$rc" -ne 0 ]; then
		crashes=1
		failed=1
		echo "fuzz: $t failed (exit $rc):" >&2
		grep -E 'panicked|ERROR|SUMMARY|Test unit written|Running:|^ *#[0-9]+ ' "$log" | head -60 >&2 || tail -30 "$log" >&2
	fi
	rows+=("$(printf '%-16s %6ss %12s %9s %6s %8s' "$t" "$seconds" "${runs:-?}" "${rate:-?}" "${cov:-?}" "$crashes")")
	rm -f "$log"
done
printf '%-16s %7s %12s %9s %6s %8s\n' target time executions exec/s cov crashes
printf '%s\n' "${rows[@]}"
exit "$failed"
