//! How long to wait for a peer's acknowledgement of a push before sending
//! it again: a smoothed round trip and its variation per peer, as TCP keeps
//! them (RFC 6298), from pushes acknowledged after their first send only
//! (Karn's rule: the answer to a resent push could be to either send). The
//! core keeps one per connected peer and one per region, pooled over its
//! peers, for peers not timed yet.

use std::time::Duration;

/// The default shortest wait before a resend, however quick the peer
/// ([`ReplicatorConfig::min_push_retry`](super::ReplicatorConfig::min_push_retry)):
/// below it, a resend would race an acknowledgement that is merely late
/// (scheduling, an fsync).
pub const MIN_PUSH_RETRY: Duration = Duration::from_millis(10);

/// Samples after which a peer is timed by its own round trips only.
const SETTLED_SAMPLES: u32 = 8;

/// Round-trip samples of one peer (or one region).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(super) struct RoundTrip {
    smoothed: Option<Duration>,
    variation: Duration,
    samples: u32,
}

impl RoundTrip {
    /// A push sent at `sent` was acknowledged at `now`.
    pub(super) fn sample(&mut self, sent: Duration, now: Duration) {
        let r = now.saturating_sub(sent);
        self.samples = self.samples.saturating_add(1);
        match self.smoothed {
            None => {
                self.smoothed = Some(r);
                self.variation = r / 2;
            }
            Some(s) => {
                let diff = s.abs_diff(r);
                self.variation = (self.variation * 3 + diff) / 4;
                self.smoothed = Some((s * 7 + r) / 8);
            }
        }
    }

    /// Of `self` (a peer's) and `pooled` (its region's), the one to time a
    /// push by: the peer's once it has [`SETTLED_SAMPLES`], else whichever
    /// has more samples. A first sample sets the variation to half the
    /// round trip, so a peer timed once waits three round trips; its
    /// region's peers, timed alike, usually know better.
    pub(super) fn or_pooled(self, pooled: Option<RoundTrip>) -> RoundTrip {
        match pooled {
            Some(p) if self.samples < SETTLED_SAMPLES && p.samples > self.samples => p,
            _ => self,
        }
    }

    /// The wait before resending a push sent `sends` times already: the
    /// smoothed round trip plus four times its variation, within `floor`
    /// and `ceiling` (also the wait before any sample), doubled for every
    /// earlier send.
    pub(super) fn retry_after(
        &self,
        (floor, ceiling): (Duration, Duration),
        sends: u32,
    ) -> Duration {
        let base = match self.smoothed {
            None => ceiling.max(floor),
            Some(s) => (s + self.variation * 4).clamp(floor, ceiling.max(floor)),
        };
        base * 2u32.saturating_pow(sends.min(8))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_wait_follows_the_measured_round_trip_within_its_bounds() {
        let ms = Duration::from_millis;
        let b = |ceiling| (MIN_PUSH_RETRY, ms(ceiling));
        let mut rt = RoundTrip::default();
        assert_eq!(rt.retry_after(b(500), 0), ms(500));
        rt.sample(ms(0), ms(4));
        // 4 ms + 4 x 2 ms.
        assert_eq!(rt.retry_after(b(500), 0), ms(12));
        assert_eq!(rt.retry_after(b(500), 2), ms(48));
        for t in 0..50 {
            rt.sample(ms(t * 10), ms(t * 10 + 4));
        }
        assert_eq!(rt.retry_after(b(500), 0), MIN_PUSH_RETRY);
        // A peer timed once defers to its region, timed more often.
        let mut once = RoundTrip::default();
        once.sample(ms(0), ms(100));
        let mut region = RoundTrip::default();
        for t in 0..10 {
            region.sample(ms(t * 1000), ms(t * 1000 + 100));
        }
        assert_eq!(once.retry_after(b(500), 0), ms(300));
        assert!(once.or_pooled(Some(region)).retry_after(b(500), 0) < ms(150));
        assert_eq!(once.or_pooled(None), once);
        assert_eq!(rt.or_pooled(Some(region)), rt);
        let mut far = RoundTrip::default();
        far.sample(ms(0), ms(900));
        assert_eq!(far.retry_after(b(500), 0), ms(500));
        // A floor above the measured wait (a node's setting) holds.
        assert_eq!(rt.retry_after((ms(200), ms(500)), 0), ms(200));
        assert_eq!(
            RoundTrip::default().retry_after((ms(800), ms(500)), 0),
            ms(800)
        );
    }
}
