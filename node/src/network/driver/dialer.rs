//! Dial targets and their backoff: bootstrap peers and discovered ones,
//! redialled until they connect; connections established and closed;
//! identify (another cluster's peer is disconnected and not rediscovered)
//! and Kademlia discovery; the bounded table of known peers.

use super::*;

/// Where the task dials, and whom it will not rediscover.
pub(super) struct Dialer {
    /// Bootstrap and discovered peers to dial, each with its backoff.
    pub(super) targets: Vec<Target>,
    /// Peers identified as members of another cluster: not rediscovered.
    pub(super) foreign: BTreeSet<PeerId>,
}

impl Dialer {
    /// The targets naming `peer`.
    pub(super) fn targets_of(&mut self, peer: PeerId) -> impl Iterator<Item = &mut Target> {
        self.targets
            .iter_mut()
            .filter(move |t| t.peer == Some(peer))
    }
}

/// A dial target: a bootstrap address, or a peer learnt from discovery.
#[derive(Debug)]
pub(super) struct Target {
    pub(super) addr: Option<Multiaddr>,
    pub(super) peer: Option<PeerId>,
    pub(super) backoff: Backoff,
    pub(super) next_dial: Instant,
    pub(super) pending: Option<ConnectionId>,
    pub(super) last_error: Option<String>,
}

impl Target {
    /// A target due now.
    pub(super) fn new(
        addr: Option<Multiaddr>,
        peer: Option<PeerId>,
        config: &NodeConfig,
    ) -> Target {
        Target {
            addr,
            peer,
            backoff: Backoff::new(config.reconnect_min, config.reconnect_max),
            next_dial: Instant::now(),
            pending: None,
            last_error: None,
        }
    }
}

/// The peer id at the end of `addr`, if it names one.
pub(super) fn peer_of(addr: &Multiaddr) -> Option<PeerId> {
    addr.iter().find_map(|p| match p {
        libp2p::multiaddr::Protocol::P2p(peer) => Some(peer),
        _ => None,
    })
}

pub(super) fn is_dialable(addr: &Multiaddr) -> bool {
    !addr
        .iter()
        .any(|p| matches!(p, libp2p::multiaddr::Protocol::Ip4(ip) if ip.is_unspecified()))
}

pub(super) fn remember(p: &mut Peer, addr: Multiaddr) {
    if p.addrs.len() < MAX_ADDRS_PER_PEER {
        p.addrs.insert(addr);
    }
}

impl Driver {
    pub(super) fn on_connected(
        &mut self,
        peer: PeerId,
        id: ConnectionId,
        endpoint: &ConnectedPoint,
    ) {
        // The backoff resets only once the peer replicates: a connection to
        // a peer of another cluster is a failure too.
        for t in &mut self.dialer.targets {
            if t.pending == Some(id) || t.peer == Some(peer) {
                t.pending = t.pending.filter(|p| *p != id);
                t.peer = Some(peer);
            }
        }
        if let Some(p) = self.peer_entry(peer) {
            p.connections += 1;
            if let ConnectedPoint::Dialer { address, .. } = endpoint {
                remember(p, address.clone());
            }
        }
        debug!(%peer, "connected");
    }

    pub(super) fn on_disconnected(&mut self, peer: PeerId, cause: String) {
        // What waited for its rate cannot be answered any more.
        drop(self.traffic.rates.forget(&peer));
        let dropped = self.traffic.outbox.disconnected(&peer);
        self.metrics.direct_dropped.inc_by(dropped as u64);
        let mut was_replicating = false;
        if let Some(p) = self.peers.get_mut(&peer) {
            p.connections = 0;
            was_replicating = std::mem::take(&mut p.replicating);
        }
        if was_replicating {
            self.core.handle_disconnect(&node_id(&peer));
            info!(%peer, %cause, "stopped replicating with peer");
        } else {
            // Closed before replication started (refused by the peer's
            // limits or allowlist, for example): a failed attempt.
            self.fail_targets(
                peer,
                &format!("connection closed before replication started: {cause}"),
            );
        }
        if self.dialer.foreign.contains(&peer) {
            self.peers.remove(&peer);
            return;
        }
        if !self.guard.blocked.contains(&peer) {
            self.ensure_target(peer);
        }
    }

    /// Counts a failed attempt on every target naming `peer`: the next dial
    /// waits for the backoff.
    pub(super) fn fail_targets(&mut self, peer: PeerId, error: &str) {
        let now = Instant::now();
        for t in self.dialer.targets_of(peer) {
            t.next_dial = now + t.backoff.fail();
            t.last_error = Some(error.to_string());
        }
    }

    /// Adds a dial target for a known `peer` that has none.
    pub(super) fn ensure_target(&mut self, peer: PeerId) {
        if self.peers.contains_key(&peer)
            && !self.dialer.targets.iter().any(|t| t.peer == Some(peer))
        {
            self.dialer
                .targets
                .push(Target::new(None, Some(peer), &self.config));
        }
    }

    pub(super) fn on_dial_failure(
        &mut self,
        id: ConnectionId,
        peer: Option<PeerId>,
        error: String,
    ) {
        let now = Instant::now();
        for t in &mut self.dialer.targets {
            if t.pending == Some(id) {
                t.pending = None;
                let wait = t.backoff.fail();
                t.next_dial = now + wait;
                let name = t
                    .addr
                    .as_ref()
                    .map_or_else(|| format!("{peer:?}"), ToString::to_string);
                warn!(target = %name, failures = t.backoff.failures(), retry_in = ?wait, %error,
                    "peer unreachable; the node keeps running and retries");
                t.last_error = Some(error.clone());
            }
        }
    }

    pub(super) fn on_identified(&mut self, peer: PeerId, info: identify::Info) {
        if info.protocol_version != self.protocols.identify
            || !info.protocols.contains(&self.protocols.sync)
        {
            let error = format!(
                "peer speaks {}, not this cluster's protocol",
                info.protocol_version
            );
            warn!(%peer, %error, "disconnecting a peer of another cluster");
            self.fail_targets(peer, &error);
            if self.dialer.foreign.len() < MAX_KNOWN_PEERS {
                self.dialer.foreign.insert(peer);
            }
            let _ = self.swarm.disconnect_peer_id(peer);
            return;
        }
        for addr in info.listen_addrs.iter().filter(|a| is_dialable(a)) {
            self.swarm
                .behaviour_mut()
                .kad
                .add_address(&peer, addr.clone());
        }
        if let Some(p) = self.peer_entry(peer) {
            for addr in info.listen_addrs.into_iter().filter(is_dialable) {
                remember(p, addr);
            }
        }
        self.start_replicating(peer);
    }

    pub(super) fn start_replicating(&mut self, peer: PeerId) {
        let now = self.now();
        let Some(p) = self.peer_entry(peer) else {
            return;
        };
        if p.replicating || p.connections == 0 {
            return;
        }
        p.replicating = true;
        self.core
            .handle_connect(now, &node_id(&peer), &mut self.random);
        self.dialer.foreign.remove(&peer);
        for t in self.dialer.targets_of(peer) {
            t.backoff.reset();
            t.last_error = None;
        }
        info!(%peer, "replicating with peer");
    }

    /// A discovered member: remember its addresses and dial it if needed.
    pub(super) fn learn(&mut self, peer: PeerId, addrs: Vec<Multiaddr>) {
        if peer == *self.swarm.local_peer_id()
            || self.guard.blocked.contains(&peer)
            || self.dialer.foreign.contains(&peer)
        {
            return;
        }
        if let Some(p) = self.peer_entry(peer) {
            for addr in addrs.into_iter().filter(is_dialable) {
                remember(p, addr);
            }
            if p.connections == 0 {
                self.ensure_target(peer);
            }
        }
    }

    /// Dials every target whose backoff expired and that is not connected.
    pub(super) fn redial(&mut self) {
        let now = Instant::now();
        let connected: BTreeSet<PeerId> = self.swarm.connected_peers().copied().collect();
        // Targets learnt by discovery are dropped once connected; bootstrap
        // addresses stay for good.
        self.dialer
            .targets
            .retain(|t| t.addr.is_some() || t.peer.is_none_or(|p| !connected.contains(&p)));
        for i in 0..self.dialer.targets.len() {
            let t = &self.dialer.targets[i];
            let skip = t.pending.is_some()
                || t.next_dial > now
                || t.peer
                    .is_some_and(|p| connected.contains(&p) || self.guard.blocked.contains(&p));
            if skip {
                continue;
            }
            let opts = match (&t.addr, t.peer) {
                (Some(addr), _) => DialOpts::unknown_peer_id().address(addr.clone()).build(),
                (None, Some(peer)) => {
                    let addrs = self
                        .peers
                        .get(&peer)
                        .map(|p| p.addrs.iter().cloned().collect())
                        .unwrap_or_default();
                    DialOpts::peer_id(peer)
                        .addresses(addrs)
                        .condition(PeerCondition::DisconnectedAndNotDialing)
                        .build()
                }
                (None, None) => continue,
            };
            let id = opts.connection_id();
            let t = &mut self.dialer.targets[i];
            match self.swarm.dial(opts) {
                Ok(()) => t.pending = Some(id),
                Err(e) => {
                    let wait = t.backoff.fail();
                    t.next_dial = now + wait;
                    t.last_error = Some(e.to_string());
                    debug!(error = %e, retry_in = ?wait, "dial refused locally");
                }
            }
        }
    }

    /// Walks the Kademlia table for members beyond the bootstrap list.
    pub(super) fn discover(&mut self) {
        // Fails only while no peer is known yet; the next round retries.
        let _ = self.swarm.behaviour_mut().kad.bootstrap();
    }

    /// The entry of `peer`, made if new. When [`MAX_KNOWN_PEERS`] are known
    /// already, the disconnected peer seen least recently (not blocked,
    /// not a bootstrap peer) is forgotten to make room, so identities that
    /// connect once cannot keep real peers out; `None` if there is none.
    pub(super) fn peer_entry(&mut self, peer: PeerId) -> Option<&mut Peer> {
        if !self.peers.contains_key(&peer) && self.peers.len() >= MAX_KNOWN_PEERS {
            let bootstrap: BTreeSet<PeerId> = self
                .dialer
                .targets
                .iter()
                .filter(|t| t.addr.is_some())
                .filter_map(|t| t.peer)
                .collect();
            let stalest = self
                .peers
                .iter()
                .filter(|(id, p)| {
                    p.connections == 0
                        && !self.guard.blocked.contains(id)
                        && !bootstrap.contains(id)
                })
                .min_by_key(|(_, p)| p.seen)
                .map(|(id, _)| *id)?;
            self.forget(stalest);
        }
        let p = self.peers.entry(peer).or_default();
        p.seen = Some(Instant::now());
        Some(p)
    }

    /// Drops everything known of a disconnected peer: its entry, its dial
    /// targets learnt by discovery, its routing entry.
    pub(super) fn forget(&mut self, peer: PeerId) {
        self.peers.remove(&peer);
        self.dialer
            .targets
            .retain(|t| t.addr.is_some() || t.peer != Some(peer));
        self.swarm.behaviour_mut().kad.remove_peer(&peer);
        self.metrics.peers_forgotten.inc();
        debug!(%peer, "forgot a disconnected peer to make room");
    }
}
