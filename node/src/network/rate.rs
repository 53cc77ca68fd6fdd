//! Per-peer message and byte rates on what a node receives.
//!
//! Every message a peer sends costs the networking task time, whatever the
//! core then decides, so one peer sending as fast as it can would slow the
//! node down for every other peer. Each peer gets a token bucket for
//! messages and one for bytes
//! ([`NodeConfig::max_peer_messages_per_sec`](crate::NodeConfig) and
//! [`NodeConfig::max_peer_bytes_per_sec`](crate::NodeConfig)), holding
//! [`BURST_SECS`] seconds of its rate, shared by gossip and direct messages:
//!
//! * a gossip message over the rate is dropped unforwarded, without penalty
//!   (anti-entropy repairs what it carried);
//! * a direct message over the rate waits, unanswered, in the peer's queue
//!   of at most [`MAX_WAITING_PER_PEER`] messages until the buckets refill.
//!   The sender's window of unanswered messages is full meanwhile, so it
//!   slows down by itself; a message beyond the queue is dropped unanswered
//!   (the sender's core sends it again later).
//!
//! Over-rate messages are counted, never a sanction: an honest peer
//! catching a node up sends fast too.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::time::Instant;

use libp2p::PeerId;

/// Seconds of its rate a peer may send at once.
pub const BURST_SECS: f64 = 2.0;

/// Direct messages of one peer waiting for its rate, at most.
pub const MAX_WAITING_PER_PEER: usize = 256;

/// One peer's buckets.
#[derive(Debug, Clone, Copy)]
struct Bucket {
    messages: f64,
    bytes: f64,
    at: Instant,
}

/// What became of an offered direct message.
#[derive(Debug, PartialEq, Eq)]
pub enum Offer<T> {
    /// Within the rate: handle it now.
    Now(T),
    /// Over the rate: it waits (see [`Rates::release`]).
    Later,
    /// Over the rate with the peer's queue full: dropped.
    Dropped(T),
}

/// The buckets of every peer, and the direct messages waiting for them.
#[derive(Debug)]
pub struct Rates<T> {
    per_sec: (f64, f64),
    buckets: HashMap<PeerId, Bucket>,
    waiting: BTreeMap<PeerId, VecDeque<(usize, T)>>,
}

impl<T> Rates<T> {
    /// Rates of `messages` and `bytes` per second per peer.
    pub fn new(messages: u32, bytes: u64) -> Rates<T> {
        Rates {
            per_sec: (f64::from(messages), bytes as f64),
            buckets: HashMap::new(),
            waiting: BTreeMap::new(),
        }
    }

    /// Takes one message of `len` bytes from `peer`'s buckets if they hold
    /// enough (a message larger than the byte bucket passes once it is
    /// full, so that no message waits for ever).
    pub fn admit(&mut self, peer: &PeerId, len: usize, now: Instant) -> bool {
        let (per_msg, per_byte) = self.per_sec;
        let capacity = (per_msg * BURST_SECS, per_byte * BURST_SECS);
        let b = self.buckets.entry(*peer).or_insert(Bucket {
            messages: capacity.0,
            bytes: capacity.1,
            at: now,
        });
        let elapsed = now.saturating_duration_since(b.at).as_secs_f64();
        b.messages = (b.messages + elapsed * per_msg).min(capacity.0);
        b.bytes = (b.bytes + elapsed * per_byte).min(capacity.1);
        b.at = now;
        let len = len as f64;
        let bytes_ok = b.bytes >= len || b.bytes >= capacity.1;
        if b.messages < 1.0 || !bytes_ok {
            return false;
        }
        b.messages -= 1.0;
        b.bytes -= len;
        true
    }

    /// A direct message of `len` bytes from `peer`: handled now if the
    /// peer's rate allows and nothing of it waits already, else queued.
    pub fn offer(&mut self, peer: PeerId, len: usize, message: T, now: Instant) -> Offer<T> {
        if !self.waiting.contains_key(&peer) && self.admit(&peer, len, now) {
            return Offer::Now(message);
        }
        let queue = self.waiting.entry(peer).or_default();
        if queue.len() >= MAX_WAITING_PER_PEER {
            return Offer::Dropped(message);
        }
        queue.push_back((len, message));
        Offer::Later
    }

    /// The waiting messages the peers' rates allow now, oldest first per
    /// peer.
    pub fn release(&mut self, now: Instant) -> Vec<T> {
        let mut out = Vec::new();
        let peers: Vec<PeerId> = self.waiting.keys().copied().collect();
        for peer in peers {
            while let Some(len) = self.waiting.get(&peer).and_then(|q| q.front()).map(|m| m.0) {
                if !self.admit(&peer, len, now) {
                    break;
                }
                if let Some((_, m)) = self.waiting.get_mut(&peer).and_then(VecDeque::pop_front) {
                    out.push(m);
                }
            }
            if self.waiting.get(&peer).is_some_and(VecDeque::is_empty) {
                self.waiting.remove(&peer);
            }
        }
        out
    }

    /// Whether any message waits.
    pub fn is_waiting(&self) -> bool {
        !self.waiting.is_empty()
    }

    /// `peer` disconnected: forgets its buckets and returns what waited.
    pub fn forget(&mut self, peer: &PeerId) -> Vec<T> {
        self.buckets.remove(peer);
        self.waiting
            .remove(peer)
            .map(|q| q.into_iter().map(|(_, m)| m).collect())
            .unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn a_peer_gets_its_burst_then_its_rate_and_others_are_unaffected() {
        let t0 = Instant::now();
        let mut rates: Rates<u32> = Rates::new(10, 1_000_000);
        let (p, q) = (PeerId::random(), PeerId::random());
        let burst = (0..100).filter(|_| rates.admit(&p, 10, t0)).count();
        assert_eq!(burst, 20, "two seconds of 10 per second");
        assert!(rates.admit(&q, 10, t0));
        // Half a second refills five.
        let t1 = t0 + Duration::from_millis(500);
        assert_eq!((0..100).filter(|_| rates.admit(&p, 10, t1)).count(), 5);
    }

    #[test]
    fn bytes_are_limited_too_and_a_huge_message_still_passes_when_full() {
        let t0 = Instant::now();
        let mut rates: Rates<u32> = Rates::new(1000, 100);
        let p = PeerId::random();
        assert!(rates.admit(&p, 150, t0));
        assert!(!rates.admit(&p, 100, t0), "50 bytes left");
        assert!(
            rates.admit(&p, 10_000, t0 + Duration::from_secs(2)),
            "full again"
        );
        assert!(!rates.admit(&p, 1, t0 + Duration::from_secs(2)));
    }

    #[test]
    fn direct_messages_over_the_rate_wait_in_order_and_are_released() {
        let t0 = Instant::now();
        let mut rates: Rates<usize> = Rates::new(1, 1_000_000);
        let p = PeerId::random();
        let mut now = Vec::new();
        let mut later = 0;
        for i in 0..(2 + MAX_WAITING_PER_PEER + 3) {
            match rates.offer(p, 1, i, t0) {
                Offer::Now(m) => now.push(m),
                Offer::Later => later += 1,
                Offer::Dropped(_) => {}
            }
        }
        assert_eq!(now, vec![0, 1]);
        assert_eq!(later, MAX_WAITING_PER_PEER);
        assert!(rates.release(t0).is_empty());
        // Three seconds refill the two of a full bucket.
        assert_eq!(rates.release(t0 + Duration::from_secs(3)), vec![2, 3]);
        // A later offer queues behind what waits, however full the bucket.
        assert_eq!(
            rates.offer(p, 1, 999, t0 + Duration::from_secs(60)),
            Offer::Later
        );
        assert_eq!(rates.forget(&p).len(), MAX_WAITING_PER_PEER - 2 + 1);
        assert!(!rates.is_waiting());
    }
}
