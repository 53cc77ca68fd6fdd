#!/usr/bin/env bash
# Runs every fuzz target (or FUZZ_TARGETS) for FUZZ_SECONDS each (default 60)
# and prints, per target: executions, corpus size, and crashes found.
# cargo-fuzz needs nightly compiler features; RUSTC_BOOTSTRAP=1 unlocks them
# on the stable toolchain. New corpus entries land in fuzz/corpus/<target>/,
# crashing inputs in fuzz/artifacts/<target>/ (see fuzz/README.md).
set -euo pipefail
cd "$(dirname "$0")/../fuzz"
seconds=${FUZZ_SECONDS:-60}
targets=${FUZZ_TARGETS:-convergence wire_decode apply_changes reconcile sync_messages documents}
export RUSTC_BOOTSTRAP=1

if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "fuzz: installing cargo-fuzz with cargo" >&2
    cargo install cargo-fuzz --locked
fi
cargo fuzz build --sanitizer none >&2

mkdir -p logs
status=0
printf '%-14s %12s %10s %8s %8s\n' target executions "execs/s" corpus crashes
for t in $targets; do
    mkdir -p "corpus/$t" "artifacts/$t"
    before=$(find "artifacts/$t" -type f | wc -l)
    # -timeout: one input taking this long is reported as a hang.
    if ! cargo fuzz run --sanitizer none "$t" -- \
        -max_total_time="$seconds" -timeout=60 -rss_limit_mb=8192 \
        -print_final_stats=1 >"logs/$t.log" 2>&1; then
        status=1
    fi
    execs=$(awk '/stat::number_of_executed_units/ {print $2}' "logs/$t.log")
    rate=$(awk '/stat::average_exec_per_sec/ {print $2}' "logs/$t.log")
    corpus=$(find "corpus/$t" -type f | wc -l)
    crashes=$(($(find "artifacts/$t" -type f | wc -l) - before))
    printf '%-14s %12s %10s %8s %8s\n' "$t" "${execs:-?}" "${rate:-?}" "$corpus" "$crashes"
    if ((crashes > 0)); then
        ls -t "artifacts/$t" | head -n "$crashes" | sed "s|^|  crash: fuzz/artifacts/$t/|" >&2
        echo "  log: fuzz/logs/$t.log" >&2
    fi
done
exit $status
