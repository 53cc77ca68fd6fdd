#!/usr/bin/env python3
"""CPU by crate, per thread, from `perf script` output.

Each sample of the threads named THREAD is given to the innermost frame of
its stack that belongs to a known crate (libp2p and its protocols, tokio and
mio, Automerge, RocksDB and the kernel's fsync, Causeway); the table gives
each thread's samples and the share of each crate.

    perf record -F 2999 -g --call-graph dwarf,16384 -o lag.data \\
        ./target/release/causeway bench lag
    perf script -i lag.data -F comm,tid,time,ip,sym --no-inline > lag.script
    python3 scripts/perf_by_crate.py lag.script causeway-net [FROM TO]

FROM and TO (seconds, as `perf script` prints them) keep only the samples
taken between them, e.g. the writes' phase of `bench lag`; divide a
thread's samples by the sampling rate and the writes to get CPU per write.
"""

import collections
import sys

CRATES = [
    ("Automerge", ["automerge::", "hexane::"]),
    ("RocksDB and fsync", ["rocksdb", "ext4", "fdatasync", "fsync", "jbd2"]),
    ("libp2p", ["libp2p", "yamux", "noise", "snow::", "curve25519", "ed25519",
                "sha2::", "asynchronous_codec", "quick_protobuf", "futures_timer",
                "chacha", "poly1305", "salsa", "unsigned_varint", "multistream"]),
    ("Causeway", ["causeway_"]),
    ("tokio and socket I/O", ["tokio::", "mio::"]),
]


def samples(path):
    head, stack = None, []
    for line in open(path, errors="replace"):
        if not line.strip():
            if head:
                yield head, stack
            head, stack = None, []
        elif line[0] in " \t":
            parts = line.strip().split(" ", 1)
            stack.append(parts[1] if len(parts) > 1 else "?")
        else:
            head = line.split()
    if head:
        yield head, stack


def crate(stack):
    for frame in stack:
        for name, patterns in CRATES:
            if any(p in frame for p in patterns):
                return name
    return "other"


def main():
    path, thread = sys.argv[1], sys.argv[2]
    window = tuple(map(float, sys.argv[3:5])) if len(sys.argv) >= 5 else None
    by_tid = collections.defaultdict(collections.Counter)
    for head, stack in samples(path):
        if head[0] != thread:
            continue
        if window:
            at = float(head[2].rstrip(":"))
            if not window[0] <= at <= window[1]:
                continue
        by_tid[head[1]][crate(stack)] += 1
    for tid, counts in sorted(by_tid.items()):
        total = sum(counts.values())
        shares = ", ".join(f"{k} {100 * v / total:.0f}%" for k, v in counts.most_common())
        print(f"{thread} {tid}: {total} samples; {shares}")


if __name__ == "__main__":
    main()
