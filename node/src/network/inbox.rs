//! Received messages waiting to be applied together.
//!
//! Applying a message durably costs a WAL fsync; a receiver that paid one
//! per message would fall behind a writer whose commits share fsyncs, and
//! its peers' gossip queues would overflow. So the driver takes every swarm
//! event that is already ready (up to [`MAX_BATCH_MESSAGES`] messages), keeps
//! the messages here, and hands them to the core in one call, which makes
//! their changes durable with one fsync. Only then does anything derived from
//! them leave: gossip validation results (which forward the message) and
//! receipts for direct requests.

use causeway_engine::replication::ids::NodeId;
use causeway_engine::replication::{Channel, Inbound, Verdict};
use libp2p::{gossipsub, request_response, PeerId};

use super::frame::Receipt;

/// Messages applied in one batch at most (one WAL fsync for all of them).
pub const MAX_BATCH_MESSAGES: usize = 256;

/// Where the verdict on a received message goes once it is durable.
pub enum Reply {
    /// A gossip message: its validation result goes to gossipsub, which
    /// forwards it only if accepted.
    Gossip {
        /// The message's id.
        id: gossipsub::MessageId,
        /// The peer it came from.
        source: PeerId,
    },
    /// A direct request: its receipt goes back on this channel.
    Direct(request_response::ResponseChannel<Receipt>),
}

/// One received message, not yet applied.
pub struct Received {
    /// Its sender (the propagation source for gossip).
    pub from: NodeId,
    /// Who made it: for gossip the author whose signature gossipsub
    /// checked, for a direct request the sender.
    pub author: NodeId,
    /// How it came.
    pub channel: Channel,
    /// The envelope.
    pub bytes: Vec<u8>,
    /// Where its verdict goes.
    pub reply: Reply,
}

impl Received {
    /// The message as the replication core takes it.
    pub fn inbound(&self) -> Inbound<'_> {
        Inbound {
            from: &self.from,
            author: &self.author,
            channel: self.channel,
            bytes: &self.bytes,
        }
    }
}

/// The messages of the batch being gathered, in arrival order.
#[derive(Default)]
pub struct Inbox {
    received: Vec<Received>,
}

impl Inbox {
    /// Adds a message to the batch.
    pub fn push(&mut self, message: Received) {
        self.received.push(message);
    }

    /// Whether the batch has room for more messages.
    pub fn has_room(&self) -> bool {
        self.received.len() < MAX_BATCH_MESSAGES
    }

    /// Whether no message waits.
    pub fn is_empty(&self) -> bool {
        self.received.is_empty()
    }

    /// Takes the batch, leaving the inbox empty.
    pub fn take(&mut self) -> Vec<Received> {
        std::mem::take(&mut self.received)
    }
}

/// The gossipsub validation result for a verdict.
pub fn acceptance(verdict: Verdict) -> gossipsub::MessageAcceptance {
    match verdict {
        Verdict::Accept => gossipsub::MessageAcceptance::Accept,
        Verdict::Ignore => gossipsub::MessageAcceptance::Ignore,
        Verdict::Reject => gossipsub::MessageAcceptance::Reject,
    }
}

/// The receipt for a direct request's verdict.
pub fn receipt(verdict: Verdict) -> Receipt {
    match verdict {
        Verdict::Reject => Receipt::Refused,
        Verdict::Accept | Verdict::Ignore => Receipt::Accepted,
    }
}
