//! When unanswered sync messages are due for a resend: a table ordered by
//! the time each message was sent, so that the core finds what is due, and
//! when the next one will be, without looking at every sync session.
//!
//! An entry is added when a sync message is sent and removed when its
//! answer arrives, when it is resent, or when its session or peer goes
//! away. Each entry is checked against its session before it is used, so
//! an entry left behind by a path that forgot to remove it costs one look
//! and changes nothing.

use std::collections::BTreeSet;
use std::time::Duration;

use crate::doc_id::DocId;

use super::super::ids::NodeId;

/// Sent sync messages awaiting an answer, by the time they were sent.
#[derive(Debug, Default)]
pub(super) struct Deadlines {
    sent: BTreeSet<(Duration, NodeId, DocId)>,
}

impl Deadlines {
    /// A message for `doc` went to `peer` at `at`.
    pub(super) fn sent(&mut self, at: Duration, peer: &NodeId, doc: &DocId) {
        self.sent.insert((at, peer.clone(), doc.clone()));
    }

    /// The message sent at `at` is answered, resent or given up.
    pub(super) fn settled(&mut self, at: Duration, peer: &NodeId, doc: &DocId) {
        self.sent.remove(&(at, peer.clone(), doc.clone()));
    }

    /// `peer` is gone: none of its messages is awaited any more.
    pub(super) fn forget_peer(&mut self, peer: &NodeId) {
        self.sent.retain(|(_, p, _)| p != peer);
    }

    /// The entries sent at or before `cutoff`, oldest first, taken out of
    /// the table.
    pub(super) fn take_sent_by(&mut self, cutoff: Duration) -> Vec<(Duration, NodeId, DocId)> {
        let mut due = Vec::new();
        while let Some(first) = self.sent.first() {
            if first.0 > cutoff {
                break;
            }
            if let Some(e) = self.sent.pop_first() {
                due.push(e);
            }
        }
        due
    }

    /// The entries, oldest first.
    pub(super) fn iter(&self) -> impl Iterator<Item = &(Duration, NodeId, DocId)> {
        self.sent.iter()
    }
}
