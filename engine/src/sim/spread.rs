//! How client writes spread: for every change a client wrote during the
//! fault phase, which replicas received it in a message that carries its
//! bytes as its origin wrote it (a delta by gossip, or a push), how often,
//! across which region boundaries, and how soon against the direct path's
//! floor; and what all traffic cost per change.
//!
//! A change is recognised by the digest of its bytes, which deltas and
//! pushes carry unchanged from its origin. A replica that never receives
//! one of a write's changes in either got it by repair (sync after
//! reconciliation, an announcement or a held-change pull): it counts as not
//! delivered by broadcast.

use std::collections::HashMap;
use std::time::Duration;

use serde_json::{json, Value};
use sha2::{Digest, Sha256};

use crate::replication::wire::{Envelope, Message, MAX_FRAME_BYTES};
use crate::replication::Channel;

use super::report::quantile;

/// One tracked write.
struct Tracked {
    origin: usize,
    at: Duration,
    /// Which nodes received it (bit per node).
    reached: Vec<u64>,
    /// Which nodes were up when it was written (bit per node); only their
    /// receptions count as reached.
    up: Vec<u64>,
    /// Nodes up when it was written, the origin aside.
    replicas: usize,
    reached_count: usize,
    /// First reception at the last replica reached so far.
    last: Duration,
    /// The largest direct one-way latency from the origin to a replica.
    floor: Duration,
    /// Receptions of its payload from another region, per region.
    copies_into: Vec<u32>,
}

/// The measurements of one run.
pub(crate) struct Spread {
    region_of: Vec<usize>,
    regions: usize,
    by_change: HashMap<[u8; 16], usize>,
    writes: Vec<Tracked>,
    change_bytes: u64,
    changes: u64,
    /// Receptions of tracked payloads at replicas that were up at the
    /// write (the origin aside).
    receptions: u64,
    /// Messages and bytes delivered since tracking began, of every kind.
    messages: u64,
    bytes: u64,
    /// Of those, the ones that carried a tracked change.
    payload_messages: u64,
    payload_bytes: u64,
    /// Delay of every first reception at a replica that was up at the
    /// write.
    delays: Vec<Duration>,
    recording: bool,
}

impl Spread {
    /// Nothing tracked yet, for nodes in regions `region_of`.
    pub(crate) fn new(region_of: &[usize], regions: usize) -> Spread {
        Spread {
            region_of: region_of.to_vec(),
            regions,
            by_change: HashMap::new(),
            writes: Vec::new(),
            change_bytes: 0,
            changes: 0,
            receptions: 0,
            messages: 0,
            bytes: 0,
            payload_messages: 0,
            payload_bytes: 0,
            delays: Vec::new(),
            recording: false,
        }
    }

    /// Starts counting traffic (writes are tracked from now on).
    pub(crate) fn start(&mut self) {
        self.recording = true;
    }

    /// A client write of `changes` committed on `origin` at `at`, while
    /// nodes `up` were up; `floor` is the largest direct latency from
    /// `origin` to one of them.
    pub(crate) fn track(
        &mut self,
        origin: usize,
        at: Duration,
        changes: &[Vec<u8>],
        up: &[usize],
        floor: Duration,
    ) {
        if !self.recording || changes.is_empty() {
            return;
        }
        let index = self.writes.len();
        for change in changes {
            self.by_change.insert(digest(change), index);
            self.change_bytes += change.len() as u64;
            self.changes += 1;
        }
        let n = self.region_of.len();
        let mut up_bits = vec![0u64; n.div_ceil(64)];
        for &node in up.iter().filter(|&&node| node != origin) {
            up_bits[node / 64] |= 1 << (node % 64);
        }
        self.writes.push(Tracked {
            origin,
            at,
            reached: vec![0; n.div_ceil(64)],
            replicas: up.iter().filter(|&&node| node != origin).count(),
            up: up_bits,
            reached_count: 0,
            last: Duration::ZERO,
            floor,
            copies_into: vec![0; self.regions],
        });
    }

    /// `bytes` were delivered from `from` to `to` at `now` on `channel`.
    /// Only deltas (on gossip) and pushes (direct) are decoded: no other
    /// message carries a change as its origin wrote it.
    pub(crate) fn delivered(
        &mut self,
        now: Duration,
        (from, to): (usize, usize),
        channel: Channel,
        bytes: &[u8],
    ) {
        if !self.recording {
            return;
        }
        self.messages += 1;
        self.bytes += bytes.len() as u64;
        if self.writes.is_empty() {
            return;
        }
        if channel == Channel::Direct && !names_push(bytes) {
            return;
        }
        let Ok(envelope) = Envelope::decode(bytes, MAX_FRAME_BYTES) else {
            return;
        };
        let changes = match (channel, envelope.message) {
            (Channel::Gossip, Message::Delta(d)) => d.changes,
            (Channel::Direct, Message::Push(p)) => p.changes,
            _ => return,
        };
        let mut writes: Vec<usize> = changes
            .iter()
            .filter_map(|c| self.by_change.get(&digest(&c.0)).copied())
            .collect();
        if writes.is_empty() {
            return;
        }
        writes.sort_unstable();
        writes.dedup();
        self.payload_messages += 1;
        self.payload_bytes += bytes.len() as u64;
        let across = self.region_of[from] != self.region_of[to];
        let (word, bit) = (to / 64, 1u64 << (to % 64));
        for w in writes {
            let t = &mut self.writes[w];
            // The origin and replicas that were down at the write are not
            // among the pairs counted.
            if t.up[word] & bit == 0 {
                continue;
            }
            self.receptions += 1;
            if across {
                t.copies_into[self.region_of[to]] += 1;
            }
            if t.reached[word] & bit == 0 {
                t.reached[word] |= bit;
                t.reached_count += 1;
                let delay = now.saturating_sub(t.at);
                t.last = t.last.max(delay);
                self.delays.push(delay);
            }
        }
    }

    /// The figures, as JSON (see `docs/testing.md`, "Dissemination figures").
    pub(crate) fn to_json(&self) -> Value {
        let writes = self.writes.len() as f64;
        let pairs: usize = self.writes.iter().map(|t| t.replicas).sum();
        let reached: usize = self.writes.iter().map(|t| t.reached_count).sum();
        let mut copies = Vec::new();
        for t in &self.writes {
            let home = self.region_of[t.origin];
            for r in (0..self.regions).filter(|&r| r != home) {
                if self.region_of.contains(&r) {
                    copies.push(t.copies_into[r]);
                }
            }
        }
        let complete: Vec<&Tracked> = self
            .writes
            .iter()
            .filter(|t| t.replicas > 0 && t.reached_count >= t.replicas)
            .collect();
        let mut last: Vec<Duration> = complete.iter().map(|t| t.last).collect();
        let mut floor: Vec<Duration> = complete.iter().map(|t| t.floor).collect();
        last.sort_unstable();
        floor.sort_unstable();
        let mut ratios: Vec<f64> = complete
            .iter()
            .map(|t| t.last.as_secs_f64() / t.floor.as_secs_f64().max(1e-9))
            .collect();
        ratios.sort_by(f64::total_cmp);
        let mut delays = self.delays.clone();
        delays.sort_unstable();
        let per_pair = |x: u64| ratio(x as f64, pairs as f64);
        let mean_change = ratio(self.change_bytes as f64, self.changes as f64);
        json!({
            "writes": self.writes.len(),
            "changes": self.changes,
            "mean_change_bytes": round(mean_change),
            "copies_into_remote_region": {
                "mean": round(ratio(copies.iter().map(|&c| f64::from(c)).sum(), copies.len() as f64)),
                "max": copies.iter().max().copied().unwrap_or(0),
            },
            "payload_receptions_per_replica": round(per_pair(self.receptions)),
            "payload_messages_per_replica": round(per_pair(self.payload_messages)),
            "messages_per_replica": round(per_pair(self.messages)),
            "payload_bytes_per_replica_x_change": round(ratio(per_pair(self.payload_bytes) * writes, self.change_bytes as f64)),
            "bytes_per_replica_x_change": round(ratio(per_pair(self.bytes) * writes, self.change_bytes as f64)),
            "delivered_by_broadcast": round(ratio(reached as f64, pairs as f64)),
            "reached_by_broadcast": reached,
            "replica_pairs": pairs,
            "delivery_ms": {"p50": ms(quantile(&delays, 0.5)), "p99": ms(quantile(&delays, 0.99))},
            "last_replica_ms": {"p50": ms(quantile(&last, 0.5)), "p99": ms(quantile(&last, 0.99))},
            "floor_ms": {"p50": ms(quantile(&floor, 0.5)), "p99": ms(quantile(&floor, 0.99))},
            "last_over_floor": {"p50": round(fquantile(&ratios, 0.5)), "p99": round(fquantile(&ratios, 0.99))},
        })
    }
}

/// Whether an envelope may hold a push: its message key, the CBOR text
/// `"push"`, appears right after the version and cluster id (so sync and
/// reconciliation frames are not decoded for nothing).
fn names_push(bytes: &[u8]) -> bool {
    const KEY: &[u8] = b"\x64push";
    bytes.len() > KEY.len()
        && bytes[..bytes.len().min(80)]
            .windows(KEY.len())
            .any(|w| w == KEY)
}

fn digest(change: &[u8]) -> [u8; 16] {
    let d = Sha256::digest(change);
    let mut out = [0u8; 16];
    out.copy_from_slice(&d[..16]);
    out
}

fn ratio(a: f64, b: f64) -> f64 {
    if b == 0.0 {
        0.0
    } else {
        a / b
    }
}

fn round(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

fn ms(d: Option<Duration>) -> f64 {
    d.map_or(0.0, |d| round(d.as_secs_f64() * 1000.0))
}

/// The `q` quantile of sorted `xs` (nearest rank), 0 if empty.
fn fquantile(xs: &[f64], q: f64) -> f64 {
    if xs.is_empty() {
        return 0.0;
    }
    let i = ((xs.len() as f64 * q).ceil() as usize).clamp(1, xs.len()) - 1;
    xs[i]
}
