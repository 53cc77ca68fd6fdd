//! Who may take part: the membership list read again when its file
//! changes, peers sanctioned for refused messages, and operators' blocks.

use super::*;

/// Who may take part.
pub(super) struct Guard {
    /// Peers blocked now, by an operator or a sanction.
    pub(super) blocked: BTreeSet<PeerId>,
    /// Peers an operator blocked (a sanction ending does not unblock them).
    pub(super) operator_blocked: BTreeSet<PeerId>,
    /// Blocks of misbehaving peers, kept across restarts.
    pub(super) sanctions: Sanctions,
    /// The membership file, watched for changes (if the list came from one).
    pub(super) membership_file: Option<MembershipFile>,
}

impl Driver {
    /// Reads the membership file again if it changed, and applies the new
    /// list: newcomers may connect, removed members are disconnected, and
    /// regions follow the list. A list that cannot be read, or that does
    /// not list this node in its region, is not used (the node keeps its
    /// list and says why).
    pub(super) fn reload_membership(&mut self) {
        let Some(file) = &mut self.guard.membership_file else {
            return;
        };
        let Some(result) = file.reload() else {
            return;
        };
        let path = file.path().display().to_string();
        let local = *self.swarm.local_peer_id();
        let list = match result.map_err(|e| e.to_string()).and_then(|list| {
            list.admits_self(&local, &self.config.region)?;
            Ok(list)
        }) {
            Ok(list) => list,
            Err(reason) => {
                warn!(file = %path, %reason, "the membership file changed but cannot be used; the node keeps its list");
                self.metrics.membership_reload_failures.inc();
                return;
            }
        };
        let old = self.config.membership.take().unwrap_or_default();
        if list == old {
            self.config.membership = Some(old);
            return;
        }
        let added: Vec<PeerId> = list.peers().filter(|p| !old.contains(p)).copied().collect();
        let removed: Vec<PeerId> = old.peers().filter(|p| !list.contains(p)).copied().collect();
        if let Some(allowlist) = self.swarm.behaviour_mut().allowlist.as_mut() {
            for peer in &added {
                allowlist.allow_peer(*peer);
            }
            for peer in &removed {
                allowlist.disallow_peer(*peer);
            }
        }
        for peer in &removed {
            let _ = self.swarm.disconnect_peer_id(*peer);
            self.dialer.targets.retain(|t| t.peer != Some(*peer));
        }
        if let Err(e) = self.core.set_members(self.now(), Some(list.to_core())) {
            // A storage error: the engine has stopped, and the node with it.
            warn!(error = %e, "cannot drop the sync states of departed members");
        }
        self.metrics.members.set(list.len() as i64);
        info!(file = %path, members = list.len(), added = ?added, removed = ?removed,
            "membership list changed");
        self.config.membership = Some(list);
    }

    /// Counts a refused message of `peer`; blocks it past the threshold
    /// (see [`super::sanctions`]). Logs the first refusal of a window and
    /// each block, nothing else.
    pub(super) fn sanction(&mut self, peer: PeerId, reason: &Rejection) {
        let name = reason_name(reason);
        if matches!(reason, Rejection::NoCommonVersion { .. }) {
            // Nothing can pass between the two builds: the connection
            // closes (without a block; the peer may be upgraded later).
            let _ = self.swarm.disconnect_peer_id(peer);
        }
        let sanction = self
            .guard
            .sanctions
            .refused(Instant::now(), SystemTime::now(), peer, name);
        match sanction {
            Sanction::First => {
                warn!(%peer, reason = name, detail = %reason,
                    "refused a message from a peer (further refusals are summarised each minute)");
            }
            Sanction::Counted => {}
            Sanction::Block {
                duration,
                reasons,
                unsaved,
            } => {
                warn!(%peer, blocked_for = ?duration, refusals = ?reasons,
                    "blocked a peer that kept sending refused messages");
                if let Some(e) = unsaved {
                    warn!(%peer, error = %e, "cannot record the block; it holds until restart");
                }
                self.metrics.peers_sanctioned.inc();
                self.block_peer(peer);
            }
        }
    }

    /// Ends the blocks that are over and logs one summary line per peer
    /// whose refusals were counted without a line each.
    pub(super) fn review_sanctions(&mut self) {
        for s in self.guard.sanctions.summaries(Instant::now()) {
            warn!(peer = %s.peer, refusals = s.refusals, reasons = ?s.reasons,
                "refused messages from a peer in the last minute");
        }
        match self.guard.sanctions.expire(SystemTime::now()) {
            Ok(ended) => {
                for peer in ended {
                    info!(%peer, "the block of a misbehaving peer ended");
                    if !self.guard.operator_blocked.contains(&peer) {
                        self.unblock_peer(peer);
                    }
                }
            }
            Err(e) => warn!(error = %e, "cannot record the end of a block"),
        }
        self.metrics
            .peers_blocked
            .set(self.guard.blocked.len() as i64);
    }

    /// An operator's block or unblock (an unblock also ends a sanction).
    pub(super) fn block(&mut self, peer: PeerId, blocked: bool) {
        if blocked {
            self.guard.operator_blocked.insert(peer);
            self.block_peer(peer);
            info!(%peer, "blocked peer");
        } else {
            self.guard.operator_blocked.remove(&peer);
            if let Err(e) = self.guard.sanctions.pardon(&peer) {
                warn!(%peer, error = %e, "cannot record the end of a block");
            }
            self.unblock_peer(peer);
            info!(%peer, "unblocked peer");
        }
    }

    pub(super) fn block_peer(&mut self, peer: PeerId) {
        self.swarm.behaviour_mut().blocklist.block_peer(peer);
        self.guard.blocked.insert(peer);
    }

    pub(super) fn unblock_peer(&mut self, peer: PeerId) {
        self.swarm.behaviour_mut().blocklist.unblock_peer(peer);
        self.guard.blocked.remove(&peer);
        let now = Instant::now();
        for t in self.dialer.targets_of(peer) {
            t.backoff.reset();
            t.next_dial = now;
        }
        self.ensure_target(peer);
    }
}
