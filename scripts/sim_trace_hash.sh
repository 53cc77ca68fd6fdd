#!/usr/bin/env bash
# Prints the number of simulator runs and one SHA-256 over their traces, for
# seeds FIRST .. FIRST+COUNT-1: the same hash before and after a change means
# the replication core behaves the same on those seeds.
# Usage: scripts/sim_trace_hash.sh [FIRST] [COUNT]   (needs target/debug/causeway)
set -euo pipefail
cd "$(dirname "$0")/.."
./target/debug/causeway sim --seed "${1:-0}" --seeds "${2:-60}" 2>/dev/null | python3 -c '
import sys, json, hashlib
h, n = hashlib.sha256(), 0
for line in sys.stdin:
    run = json.loads(line) if line.startswith("{") else {}
    if "trace" in run:
        h.update(run["trace"].encode()); n += 1
print(n, h.hexdigest())'
