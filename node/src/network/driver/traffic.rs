//! Messages in and out: gossip and direct messages received within each
//! peer's rate and gathered into the inbox, applied by the core in one
//! batch, their verdicts sent back; the core's outputs handed to gossipsub
//! or, through the outbox's per-peer window, to request-response; local
//! commits published.

use super::*;

/// Messages in flight both ways.
pub(super) struct Traffic {
    /// Direct messages sent and not answered yet, by request.
    pub(super) in_flight: HashMap<request_response::OutboundRequestId, PeerId>,
    /// Per-peer windows of direct messages to send.
    pub(super) outbox: Outbox<PeerId>,
    /// Received messages waiting to be applied in one batch.
    pub(super) inbox: Inbox,
    /// The latest local commits, oldest first, at most
    /// [`RECENT_COMMITS_KEPT`].
    pub(super) recent: VecDeque<(DocId, Vec<ChangeHash>)>,
    /// Each peer's message and byte rate, and its direct messages waiting
    /// for it.
    pub(super) rates: Rates<Received>,
}

impl Driver {
    /// Publishes local commits and remembers them for shutdown.
    pub(super) fn publish_local(&mut self, events: Vec<DocEvent>) {
        for e in &events {
            if self.traffic.recent.len() == RECENT_COMMITS_KEPT {
                self.traffic.recent.pop_front();
            }
            self.traffic
                .recent
                .push_back((e.doc.clone(), e.heads.clone()));
        }
        let now = self.now();
        self.core.handle_local_commits(
            now,
            events
                .into_iter()
                .map(|e| (e.doc, e.changes.to_vec(), e.heads)),
        );
    }

    /// How many remembered local commits some connected peer has not
    /// reported holding yet (a peer that reported holding a document's
    /// newest remembered heads holds the older ones too).
    pub(super) fn recent_not_held(&self) -> usize {
        let connected: BTreeSet<&NodeId> = self.core.connected().collect();
        if connected.is_empty() {
            return 0;
        }
        let mut seen = BTreeSet::new();
        self.traffic
            .recent
            .iter()
            .rev()
            .filter(|(doc, _)| seen.insert(doc.clone()))
            .filter(|(doc, heads)| match self.core.holders(doc, heads) {
                Ok(holders) => {
                    let holding = holders
                        .iter()
                        .filter(|h| h.holds && connected.contains(&h.peer))
                        .count();
                    holding < connected.len()
                }
                Err(_) => false,
            })
            .count()
    }

    /// Sends one direct message (the outbox counted it in flight).
    pub(super) fn send_direct(&mut self, peer: PeerId, bytes: Vec<u8>) {
        let id = self.swarm.behaviour_mut().direct.send_request(&peer, bytes);
        self.traffic.in_flight.insert(id, peer);
    }

    /// A direct message was answered or failed: its slot in the peer's
    /// window goes to the next queued message.
    pub(super) fn direct_completed(&mut self, request_id: request_response::OutboundRequestId) {
        if let Some(peer) = self.traffic.in_flight.remove(&request_id) {
            if let Some(next) = self.traffic.outbox.completed(&peer) {
                self.send_direct(peer, next);
            }
        }
    }

    /// Takes the swarm events that are ready without waiting, while the
    /// inbox has room, then applies the messages they brought.
    pub(super) fn gather(&mut self) -> Result<(), DriverError> {
        // Non-message events count too, so that a stream of them cannot
        // keep this turn going.
        let mut budget = inbox::MAX_BATCH_MESSAGES;
        while !self.traffic.inbox.is_empty() && self.traffic.inbox.has_room() && budget > 0 {
            let Some(Some(event)) = self.swarm.next().now_or_never() else {
                break;
            };
            self.on_swarm_event(event)?;
            budget -= 1;
        }
        self.apply_received()
    }

    /// Hands the inbox to the core in one batch (durable on return), then
    /// sends each message's verdict where it goes.
    pub(super) fn apply_received(&mut self) -> Result<(), DriverError> {
        if self.traffic.inbox.is_empty() {
            return Ok(());
        }
        let batch = self.traffic.inbox.take();
        let verdicts = self
            .core
            .handle_messages(self.now(), batch.iter().map(Received::inbound))?;
        self.metrics.received_batches.inc();
        self.metrics.received_batched.inc_by(batch.len() as u64);
        for (message, verdict) in batch.into_iter().zip(verdicts) {
            match message.reply {
                Reply::Gossip { id, source } => {
                    self.report_gossip(&id, &source, verdict);
                }
                Reply::Direct(channel) => {
                    // The peer may be gone already; nothing to do then.
                    let _ = self
                        .swarm
                        .behaviour_mut()
                        .direct
                        .send_response(channel, inbox::receipt(verdict));
                }
            }
        }
        Ok(())
    }

    /// Hands every output of the core to the swarm.
    pub(super) fn drain(&mut self) {
        while let Some(output) = self.core.poll_output() {
            match output {
                Output::Publish(bytes) => {
                    let topic = self.protocols.topic.clone();
                    if let Err(e) = self.swarm.behaviour_mut().gossip.publish(topic, bytes) {
                        debug!(error = %e, "gossip publication reached no peer");
                        self.metrics.publish_failures.inc();
                    }
                }
                Output::Send { to, bytes } => match PeerId::from_str(to.as_str()) {
                    Ok(peer) => match self.traffic.outbox.offer(&peer, bytes) {
                        Offer::Send(bytes) => self.send_direct(peer, bytes),
                        Offer::Queued => {}
                        Offer::QueuedDroppingOldest => {
                            self.metrics.direct_dropped.inc();
                        }
                    },
                    Err(e) => {
                        warn!(peer = %to, error = %e, "the core addressed a peer id that does not parse")
                    }
                },
                Output::Misbehaving { peer, reason } => match PeerId::from_str(peer.as_str()) {
                    Ok(peer) => self.sanction(peer, &reason),
                    Err(e) => {
                        warn!(%peer, error = %e, "the core reported a peer id that does not parse")
                    }
                },
            }
        }
    }

    pub(super) fn on_gossip(&mut self, event: gossipsub::Event) -> Result<(), DriverError> {
        let gossipsub::Event::Message {
            propagation_source,
            message_id,
            message,
        } = event
        else {
            return Ok(());
        };
        if !self
            .traffic
            .rates
            .admit(&propagation_source, message.data.len(), Instant::now())
        {
            // Over the relay's rate: dropped unforwarded, not penalised;
            // anti-entropy repairs what it carried.
            self.metrics
                .rate_limited
                .get_or_create(&kind("gossip"))
                .inc();
            self.report_gossip(&message_id, &propagation_source, Verdict::Ignore);
            return Ok(());
        }
        // Strict validation: gossipsub checked the author's signature, so
        // a message without one does not reach here; refuse it if it did.
        let author = message.source;
        if message.topic == self.protocols.ephemeral_topic.hash() {
            self.on_ephemeral_gossip(&message_id, &propagation_source, author, &message.data);
            return Ok(());
        }
        if let (true, Some(author)) = (message.topic == self.protocols.topic.hash(), author) {
            self.traffic.inbox.push(Received {
                from: node_id(&propagation_source),
                author: node_id(&author),
                channel: Channel::Gossip,
                bytes: message.data,
                reply: Reply::Gossip {
                    id: message_id,
                    source: propagation_source,
                },
            });
        } else {
            self.report_gossip(&message_id, &propagation_source, Verdict::Reject);
        }
        Ok(())
    }

    pub(super) fn on_direct(
        &mut self,
        event: request_response::Event<Vec<u8>, Receipt>,
    ) -> Result<(), DriverError> {
        match event {
            request_response::Event::Message { peer, message, .. } => match message {
                request_response::Message::Request {
                    request, channel, ..
                } => {
                    // A request on this cluster's protocol proves the peer is
                    // a member, even before identify says so.
                    self.start_replicating(peer);
                    let len = request.len();
                    let received = Received {
                        from: node_id(&peer),
                        author: node_id(&peer),
                        channel: Channel::Direct,
                        bytes: request,
                        reply: Reply::Direct(channel),
                    };
                    match self
                        .traffic
                        .rates
                        .offer(peer, len, received, Instant::now())
                    {
                        RateOffer::Now(received) => self.traffic.inbox.push(received),
                        RateOffer::Later => {
                            self.metrics
                                .rate_limited
                                .get_or_create(&kind("direct"))
                                .inc();
                        }
                        // Unanswered: the peer's core sends it again later.
                        RateOffer::Dropped(_) => {
                            self.metrics
                                .rate_limited
                                .get_or_create(&kind("direct_dropped"))
                                .inc();
                        }
                    }
                }
                request_response::Message::Response { request_id, .. } => {
                    self.direct_completed(request_id);
                }
            },
            request_response::Event::OutboundFailure {
                peer,
                request_id,
                error,
                ..
            } => {
                self.direct_completed(request_id);
                self.metrics.send_failures.inc();
                debug!(%peer, %error, "direct message failed; the core retries the work");
            }
            request_response::Event::InboundFailure { peer, error, .. } => {
                debug!(%peer, %error, "inbound direct message failed");
            }
            request_response::Event::ResponseSent { .. } => {}
        }
        Ok(())
    }

    /// Hands the direct messages whose peers' rates allow it now to the
    /// core.
    pub(super) fn release_waiting(&mut self) -> Result<(), DriverError> {
        if !self.traffic.rates.is_waiting() {
            return Ok(());
        }
        for received in self.traffic.rates.release(Instant::now()) {
            self.traffic.inbox.push(received);
        }
        self.apply_received()?;
        self.drain();
        Ok(())
    }

    /// Tells gossipsub what became of a received message: forward it
    /// (`Accept`), drop it (`Ignore`), or drop it and penalise `source`
    /// (`Reject`).
    pub(super) fn report_gossip(
        &mut self,
        id: &gossipsub::MessageId,
        source: &PeerId,
        verdict: Verdict,
    ) {
        self.swarm
            .behaviour_mut()
            .gossip
            .report_message_validation_result(id, source, inbox::acceptance(verdict));
    }
}
