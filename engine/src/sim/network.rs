//! The simulated network: connections between nodes with per-region-pair
//! latency, loss, duplication, delay, and full or one-way partitions; and the
//! queue of timed events that drives the run.
//!
//! A connection is symmetric and numbered by an epoch: closing it (a full
//! partition, a crash) drops every message still in flight on it, as a real
//! connection would. A one-way partition leaves the connection open and drops
//! what flows in the blocked direction, like a half-broken link.

use std::collections::BTreeMap;
use std::rc::Rc;
use std::time::Duration;

use crate::replication::random::{Random, SplitMix64};
use sha2::{Digest, Sha256};

use crate::replication::Channel;

use super::report::Faults;
use super::wan;

/// Where link latencies come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Latency {
    /// Drawn per region pair from the seed: 1 to 5 ms inside a region, 20
    /// to 150 ms between regions; each message up to 25% slower.
    Drawn,
    /// The WAN matrix of 19 real regions (see `docs/testing.md`): region `r`
    /// of the run is the matrix's `r`-th; each message 1.0 to 1.15 times
    /// its link's one-way latency.
    Wan,
}

impl Latency {
    /// The largest per-message slowdown, in thousandths of the link's
    /// latency.
    fn jitter_permille(self) -> u64 {
        match self {
            Latency::Drawn => 250,
            Latency::Wan => wan::JITTER_PERMILLE,
        }
    }
}

/// A message on its way.
pub(crate) struct Packet {
    pub(crate) from: usize,
    pub(crate) to: usize,
    /// The node that made the message (for gossip, the signed author; for
    /// a direct message, `from`).
    pub(crate) author: usize,
    pub(crate) epoch: u64,
    pub(crate) channel: Channel,
    pub(crate) bytes: Rc<[u8]>,
}

/// Something due at a simulated time.
pub(crate) enum Event {
    /// A message arrives.
    Deliver(Packet),
    /// A node's core asked to be woken (its incarnation, and the time it
    /// asked for, so that superseded timers are ignored).
    Timer { node: usize, incarnation: u32 },
}

/// Links, their faults, and the event queue.
pub(crate) struct Network {
    n: usize,
    /// One-way latency per ordered region pair (`a * regions + b`).
    latency: Vec<Duration>,
    regions: usize,
    region_of: Vec<usize>,
    jitter_permille: u64,
    /// Messages from `a` to `b` are dropped (`a * n + b`).
    blocked: Vec<bool>,
    /// A connection is open between `a` and `b` (both entries kept equal).
    connected: Vec<bool>,
    /// Per node, the nodes it has an open connection to, in order.
    peers: Vec<Vec<usize>>,
    /// Connection number per node pair (both entries kept equal).
    epoch: Vec<u64>,
    pub(crate) loss_permille: u32,
    pub(crate) duplicate_permille: u32,
    pub(crate) delay_permille: u32,
    queue: BTreeMap<(Duration, u64), Event>,
    next_seq: u64,
    in_flight: usize,
}

impl Network {
    /// `n` nodes; node `i` in region `region_of[i]`, with latencies from
    /// `model` (for [`Latency::Wan`], at most as many regions as the
    /// matrix has).
    pub(crate) fn new(
        region_of: &[usize],
        regions: usize,
        model: Latency,
        rng: &mut SplitMix64,
    ) -> Network {
        let mut latency = vec![Duration::ZERO; regions * regions];
        for a in 0..regions {
            for b in a..regions {
                let one_way = match model {
                    Latency::Drawn if a == b => Duration::from_millis(1 + rng.below(5)),
                    Latency::Drawn => Duration::from_millis(20 + rng.below(131)),
                    Latency::Wan => wan::one_way(a, b),
                };
                latency[a * regions + b] = one_way;
                latency[b * regions + a] = one_way;
            }
        }
        let n = region_of.len();
        Network {
            n,
            latency,
            regions,
            region_of: region_of.to_vec(),
            jitter_permille: model.jitter_permille(),
            blocked: vec![false; n * n],
            connected: vec![false; n * n],
            peers: vec![Vec::new(); n],
            epoch: vec![0; n * n],
            loss_permille: 0,
            duplicate_permille: 0,
            delay_permille: 0,
            queue: BTreeMap::new(),
            next_seq: 0,
            in_flight: 0,
        }
    }

    /// The one-way latency from `a` to `b` before jitter: the floor of a
    /// direct message.
    pub(crate) fn base_latency(&self, a: usize, b: usize) -> Duration {
        self.latency[self.region_of[a] * self.regions + self.region_of[b]]
    }

    /// Whether a connection between `a` and `b` is open.
    pub(crate) fn is_connected(&self, a: usize, b: usize) -> bool {
        self.connected[a * self.n + b]
    }

    /// Whether `a` and `b` can open a connection (not blocked both ways).
    pub(crate) fn can_connect(&self, a: usize, b: usize) -> bool {
        !(self.blocked[a * self.n + b] && self.blocked[b * self.n + a])
    }

    /// Nodes `a` has an open connection to, in order.
    pub(crate) fn peers_of(&self, a: usize) -> Vec<usize> {
        self.peers[a].clone()
    }

    /// Opens or closes the connection between `a` and `b`; either way the
    /// epoch moves on, so messages sent before are dropped on arrival.
    pub(crate) fn set_connected(&mut self, a: usize, b: usize, open: bool) {
        let (ab, ba) = (a * self.n + b, b * self.n + a);
        if self.connected[ab] != open {
            for (x, y) in [(a, b), (b, a)] {
                let list = &mut self.peers[x];
                match (list.binary_search(&y), open) {
                    (Err(at), true) => list.insert(at, y),
                    (Ok(at), false) => {
                        list.remove(at);
                    }
                    _ => {}
                }
            }
        }
        self.connected[ab] = open;
        self.connected[ba] = open;
        self.epoch[ab] += 1;
        self.epoch[ba] += 1;
    }

    /// Blocks or unblocks messages from `a` to `b`.
    pub(crate) fn set_blocked(&mut self, a: usize, b: usize, blocked: bool) {
        self.blocked[a * self.n + b] = blocked;
    }

    /// Unblocks every direction.
    pub(crate) fn unblock_all(&mut self) {
        self.blocked.fill(false);
    }

    /// Sends `bytes` made by `author` from `from` to `to` over their
    /// connection, if one is open, applying the link's faults.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn send(
        &mut self,
        now: Duration,
        from: usize,
        to: usize,
        author: usize,
        channel: Channel,
        bytes: Rc<[u8]>,
        rng: &mut SplitMix64,
        faults: &mut Faults,
    ) {
        let i = from * self.n + to;
        if !self.connected[i] {
            return;
        }
        if self.blocked[i] {
            faults.partition_drops += 1;
            return;
        }
        if chance(rng, self.loss_permille) {
            faults.messages_lost += 1;
            return;
        }
        let copies = if chance(rng, self.duplicate_permille) {
            faults.messages_duplicated += 1;
            2
        } else {
            1
        };
        for _ in 0..copies {
            let base = self.base_latency(from, to);
            let jitter = rng.below(base.as_micros() as u64 * self.jitter_permille / 1000 + 1);
            let mut at = now + base + Duration::from_micros(jitter);
            if chance(rng, self.delay_permille) {
                faults.messages_delayed += 1;
                at += Duration::from_millis(rng.below(1000));
            }
            let packet = Packet {
                from,
                to,
                author,
                epoch: self.epoch[i],
                channel,
                bytes: bytes.clone(),
            };
            self.in_flight += 1;
            self.push(at, Event::Deliver(packet));
        }
    }

    /// Whether `p` travelled on the connection that is open now.
    pub(crate) fn is_current(&self, p: &Packet) -> bool {
        let i = p.from * self.n + p.to;
        self.connected[i] && self.epoch[i] == p.epoch
    }

    /// Schedules a timer for `node`.
    pub(crate) fn timer(&mut self, at: Duration, node: usize, incarnation: u32) {
        self.push(at, Event::Timer { node, incarnation });
    }

    /// The next event, if it is due by `until`.
    pub(crate) fn next_until(&mut self, until: Duration) -> Option<(Duration, Event)> {
        let entry = self.queue.first_entry()?;
        if entry.key().0 > until {
            return None;
        }
        let ((at, _), event) = entry.remove_entry();
        if matches!(event, Event::Deliver(_)) {
            self.in_flight -= 1;
        }
        Some((at, event))
    }

    /// Messages scheduled and not yet delivered.
    pub(crate) fn in_flight(&self) -> usize {
        self.in_flight
    }

    fn push(&mut self, at: Duration, event: Event) {
        self.queue.insert((at, self.next_seq), event);
        self.next_seq += 1;
    }
}

/// True with probability `permille` / 1000.
pub(crate) fn chance(rng: &mut SplitMix64, permille: u32) -> bool {
    permille > 0 && rng.below(1000) < u64::from(permille)
}

/// A gossip message's id: the first 16 bytes of its SHA-256.
pub(crate) fn message_id(bytes: &[u8]) -> [u8; 16] {
    let digest = Sha256::digest(bytes);
    let mut id = [0u8; 16];
    id.copy_from_slice(&digest[..16]);
    id
}
