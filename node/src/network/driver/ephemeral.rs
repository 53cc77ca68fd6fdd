//! automerge-repo clients' ephemeral messages on their own gossip topic:
//! published for this node's clients, and handed to them when another
//! node's arrive (see [`crate::network::ephemeral`]).

use super::*;
use crate::network::ephemeral::EphemeralRelay;

impl Driver {
    /// Publishes an ephemeral message of one of this node's clients.
    pub(super) fn publish_ephemeral(&mut self, relay: &EphemeralRelay) {
        let topic = self.protocols.ephemeral_topic.clone();
        let outcome = self
            .swarm
            .behaviour_mut()
            .gossip
            .publish(topic, relay.encode());
        let what = match outcome {
            Ok(_) => "published",
            // No other node subscribed (alone, or not connected yet).
            Err(e) => {
                debug!(error = %e, "ephemeral message not published");
                "unsent"
            }
        };
        self.metrics.ephemeral.get_or_create(&kind(what)).inc();
    }

    /// An ephemeral message from gossip: checked, then handed to this
    /// node's clients and forwarded. The author must be a member; a
    /// malformed message counts against the peer that relayed it.
    pub(super) fn on_ephemeral_gossip(
        &mut self,
        id: &gossipsub::MessageId,
        source: &PeerId,
        author: Option<PeerId>,
        data: &[u8],
    ) {
        let admitted = author.is_some_and(|a| self.core.admits(&node_id(&a)));
        let verdict = match (admitted, EphemeralRelay::decode(data)) {
            (false, _) => {
                self.metrics.ephemeral.get_or_create(&kind("refused")).inc();
                Verdict::Ignore
            }
            (true, Err(reason)) => {
                debug!(peer = %source, %reason, "malformed ephemeral message");
                self.metrics.ephemeral.get_or_create(&kind("refused")).inc();
                Verdict::Reject
            }
            (true, Ok(relay)) => {
                self.metrics
                    .ephemeral
                    .get_or_create(&kind("received"))
                    .inc();
                // No receiver (no automerge-repo endpoint) is not an error.
                let _ = self.ephemeral.send(Arc::new(relay));
                Verdict::Accept
            }
        };
        self.report_gossip(id, source, verdict);
    }
}
