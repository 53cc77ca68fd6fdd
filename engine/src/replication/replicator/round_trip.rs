//! How long to wait for a peer's acknowledgement of a push before sending
//! it again: a smoothed round trip and its variation per peer, as TCP keeps
//! them (RFC 6298), from pushes acknowledged after their first send only
//! (Karn's rule: the answer to a resent push could be to either send). The
//! core keeps one per connected peer and one per region, pooled over its
//! peers, for peers not timed yet.

use std::time::Duration;

/// The shortest wait before a resend, however quick the peer: below it, a
/// resend would race an acknowledgement that is merely late (scheduling,
/// an fsync).
pub const MIN_PUSH_RETRY: Duration = Duration::from_millis(10);

/// Round-trip samples of one peer.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(super) struct RoundTrip {
    smoothed: Option<Duration>,
    variation: Duration,
}

impl RoundTrip {
    /// A push sent at `sent` was acknowledged at `now`.
    pub(super) fn sample(&mut self, sent: Duration, now: Duration) {
        let r = now.saturating_sub(sent);
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

    /// Whether any sample was taken.
    pub(super) fn is_timed(&self) -> bool {
        self.smoothed.is_some()
    }

    /// The wait before resending a push sent `sends` times already: the
    /// smoothed round trip plus four times its variation, within
    /// [`MIN_PUSH_RETRY`] and `ceiling` (also the wait before any sample),
    /// doubled for every earlier send.
    pub(super) fn retry_after(&self, ceiling: Duration, sends: u32) -> Duration {
        let base = match self.smoothed {
            None => ceiling,
            Some(s) => (s + self.variation * 4).clamp(MIN_PUSH_RETRY, ceiling.max(MIN_PUSH_RETRY)),
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
        let mut rt = RoundTrip::default();
        assert_eq!(rt.retry_after(ms(500), 0), ms(500));
        rt.sample(ms(0), ms(4));
        // 4 ms + 4 x 2 ms.
        assert_eq!(rt.retry_after(ms(500), 0), ms(12));
        assert_eq!(rt.retry_after(ms(500), 2), ms(48));
        for t in 0..50 {
            rt.sample(ms(t * 10), ms(t * 10 + 4));
        }
        assert_eq!(rt.retry_after(ms(500), 0), MIN_PUSH_RETRY);
        let mut far = RoundTrip::default();
        far.sample(ms(0), ms(900));
        assert_eq!(far.retry_after(ms(500), 0), ms(500));
    }
}
