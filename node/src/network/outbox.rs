//! Per-peer flow control for direct messages.
//!
//! Every direct message is one request-response stream, and a peer drops
//! inbound streams beyond its `max_concurrent_streams` (libp2p logs "at
//! capacity" and the work is lost until a timer retries it). Without a
//! window, a node that was paused or cut off for a few seconds receives
//! every message queued for it at once when it comes back, and drops most
//! of them. The outbox keeps at most `window` messages in flight to each
//! peer and queues the rest in order; when the queue is full the oldest
//! message is dropped (the protocol tolerates loss: acknowledgements are
//! superseded by later ones, syncs and reconciliation are retried by the
//! core's timers).

use std::collections::{HashMap, VecDeque};
use std::hash::Hash;

/// Messages queued per peer before the oldest is dropped.
pub const QUEUE_LIMIT: usize = 1024;

#[derive(Debug, Default)]
struct PeerOutbox {
    in_flight: usize,
    queued: VecDeque<Vec<u8>>,
}

/// What [`Outbox::offer`] decided.
#[derive(Debug, PartialEq, Eq)]
pub enum Offer {
    /// Send it now (it counts as in flight).
    Send(Vec<u8>),
    /// Queued behind the window.
    Queued,
    /// Queued; the oldest queued message was dropped to make room.
    QueuedDroppingOldest,
}

/// The direct messages in flight and queued, per peer.
#[derive(Debug)]
pub struct Outbox<P> {
    window: usize,
    peers: HashMap<P, PeerOutbox>,
}

impl<P: Hash + Eq + Clone> Outbox<P> {
    /// At most `window` messages in flight per peer (at least one).
    pub fn new(window: usize) -> Self {
        Outbox {
            window: window.max(1),
            peers: HashMap::new(),
        }
    }

    /// A message for `peer`: send it now if the window allows, else queue.
    pub fn offer(&mut self, peer: &P, bytes: Vec<u8>) -> Offer {
        let p = self.peers.entry(peer.clone()).or_default();
        if p.in_flight < self.window && p.queued.is_empty() {
            p.in_flight += 1;
            return Offer::Send(bytes);
        }
        p.queued.push_back(bytes);
        if p.queued.len() > QUEUE_LIMIT {
            p.queued.pop_front();
            Offer::QueuedDroppingOldest
        } else {
            Offer::Queued
        }
    }

    /// A message to `peer` was answered or failed: returns the next queued
    /// message to send now, if any (it counts as in flight).
    pub fn completed(&mut self, peer: &P) -> Option<Vec<u8>> {
        let p = self.peers.get_mut(peer)?;
        p.in_flight = p.in_flight.saturating_sub(1);
        let next = p.queued.pop_front();
        if next.is_some() {
            p.in_flight += 1;
        } else if p.in_flight == 0 {
            self.peers.remove(peer);
        }
        next
    }

    /// The last connection to `peer` closed: drops what is queued for it
    /// (the core starts afresh on the next connection) and returns how many.
    /// Messages in flight still complete, as failures.
    pub fn disconnected(&mut self, peer: &P) -> usize {
        let Some(p) = self.peers.get_mut(peer) else {
            return 0;
        };
        let dropped = p.queued.len();
        p.queued.clear();
        if p.in_flight == 0 {
            self.peers.remove(peer);
        }
        dropped
    }

    /// Messages queued for `peer`.
    pub fn queued(&self, peer: &P) -> usize {
        self.peers.get(peer).map_or(0, |p| p.queued.len())
    }

    /// The longest queue over all peers.
    pub fn longest_queue(&self) -> usize {
        self.peers
            .values()
            .map(|p| p.queued.len())
            .max()
            .unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(i: u8) -> Vec<u8> {
        vec![i]
    }

    #[test]
    fn at_most_window_in_flight_and_the_rest_in_order() {
        let mut o = Outbox::new(2);
        assert_eq!(o.offer(&1, msg(0)), Offer::Send(msg(0)));
        assert_eq!(o.offer(&1, msg(1)), Offer::Send(msg(1)));
        assert_eq!(o.offer(&1, msg(2)), Offer::Queued);
        assert_eq!(o.offer(&1, msg(3)), Offer::Queued);
        // Another peer has its own window.
        assert_eq!(o.offer(&2, msg(9)), Offer::Send(msg(9)));
        assert_eq!(o.queued(&1), 2);
        assert_eq!(o.completed(&1), Some(msg(2)));
        assert_eq!(o.completed(&1), Some(msg(3)));
        // Two in flight, none queued: a new message waits for a slot.
        assert_eq!(o.offer(&1, msg(4)), Offer::Queued);
        assert_eq!(o.completed(&1), Some(msg(4)));
        assert_eq!(o.completed(&1), None);
        assert_eq!(o.completed(&1), None);
        assert_eq!(o.offer(&1, msg(5)), Offer::Send(msg(5)));
    }

    #[test]
    fn a_full_queue_drops_its_oldest_message() {
        let mut o = Outbox::new(1);
        assert_eq!(o.offer(&1, msg(0)), Offer::Send(msg(0)));
        for i in 0..QUEUE_LIMIT {
            assert_eq!(o.offer(&1, vec![1, i as u8]), Offer::Queued);
        }
        assert_eq!(o.offer(&1, msg(7)), Offer::QueuedDroppingOldest);
        assert_eq!(o.queued(&1), QUEUE_LIMIT);
        assert_eq!(o.longest_queue(), QUEUE_LIMIT);
        // The first queued message (vec![1, 0]) was the one dropped.
        assert_eq!(o.completed(&1), Some(vec![1, 1]));
    }

    #[test]
    fn a_disconnect_drops_the_queue_and_in_flight_messages_still_complete() {
        let mut o = Outbox::new(1);
        assert_eq!(o.offer(&1, msg(0)), Offer::Send(msg(0)));
        assert_eq!(o.offer(&1, msg(1)), Offer::Queued);
        assert_eq!(o.disconnected(&1), 1);
        assert_eq!(o.completed(&1), None);
        assert_eq!(o.offer(&1, msg(2)), Offer::Send(msg(2)));
        assert_eq!(o.disconnected(&3), 0);
    }
}
