//! A WAN latency matrix: 19 cloud regions placed at their airports, with
//! round-trip times from great-circle distance.
//!
//! The model is the one fly.io's Corrosion simulator uses for its 19-region
//! topology: RTT = 4 ms + distance in km / 75, each message drawn between 1.0
//! and 1.15 times its link's one-way latency (half the RTT). That simulator's
//! authors report it within about 15% of measured region-to-region RTTs (see
//! `docs/testing.md`, "The WAN matrix"). The coordinates are each region's
//! main airport, rounded to a hundredth of a degree.

use std::time::Duration;

/// A region of the matrix: its code, latitude and longitude in degrees.
pub(crate) struct Site {
    pub(crate) code: &'static str,
    lat: f64,
    lon: f64,
}

/// The regions, in the order runs take them: the first `k` of a run with
/// `k` regions spread over the continents, so that a 6-region run already
/// spans the globe.
pub(crate) const SITES: [Site; 19] = [
    site("iad", 38.95, -77.46),
    site("fra", 50.04, 8.56),
    site("sin", 1.36, 103.99),
    site("lax", 33.94, -118.41),
    site("gru", -23.43, -46.47),
    site("syd", -33.95, 151.18),
    site("lhr", 51.47, -0.45),
    site("nrt", 35.77, 140.39),
    site("ord", 41.98, -87.90),
    site("ams", 52.31, 4.76),
    site("bom", 19.09, 72.87),
    site("jnb", -26.14, 28.25),
    site("dfw", 32.90, -97.04),
    site("hkg", 22.31, 113.92),
    site("scl", -33.39, -70.79),
    site("cdg", 49.01, 2.55),
    site("sjc", 37.36, -121.93),
    site("arn", 59.65, 17.92),
    site("ewr", 40.69, -74.17),
];

/// Round trip inside one region (the model's fixed term).
pub(crate) const BASE_RTT: Duration = Duration::from_millis(4);

/// Kilometres of great-circle distance per millisecond of round trip.
const KM_PER_RTT_MS: f64 = 75.0;

/// Mean radius of the Earth, in km.
const EARTH_RADIUS_KM: f64 = 6371.0;

/// The largest jitter factor, in thousandths over 1.0 (1.15x).
pub(crate) const JITTER_PERMILLE: u64 = 150;

const fn site(code: &'static str, lat: f64, lon: f64) -> Site {
    Site { code, lat, lon }
}

/// Great-circle distance between two sites, in km (haversine).
fn distance_km(a: &Site, b: &Site) -> f64 {
    let (la, lb) = (a.lat.to_radians(), b.lat.to_radians());
    let dlat = lb - la;
    let dlon = (b.lon - a.lon).to_radians();
    let h = (dlat / 2.0).sin().powi(2) + la.cos() * lb.cos() * (dlon / 2.0).sin().powi(2);
    2.0 * EARTH_RADIUS_KM * h.sqrt().asin()
}

/// One-way latency between regions `a` and `b` of [`SITES`], before jitter:
/// half of 4 ms plus km / 75 ms, to the microsecond.
pub(crate) fn one_way(a: usize, b: usize) -> Duration {
    let km = distance_km(&SITES[a], &SITES[b]);
    let rtt_us = BASE_RTT.as_micros() as f64 + km / KM_PER_RTT_MS * 1000.0;
    Duration::from_micros((rtt_us / 2.0).round() as u64)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn the_matrix_is_symmetric_and_grows_with_distance() {
        for a in 0..SITES.len() {
            assert_eq!(one_way(a, a), BASE_RTT / 2);
            for b in 0..SITES.len() {
                assert_eq!(one_way(a, b), one_way(b, a));
            }
        }
        let code = |c: &str| SITES.iter().position(|s| s.code == c).unwrap();
        // London to Paris is about 350 km; Sydney to London about 17,000.
        let lhr_cdg = one_way(code("lhr"), code("cdg"));
        assert!(lhr_cdg > Duration::from_millis(3) && lhr_cdg < Duration::from_millis(6));
        let syd_lhr = one_way(code("syd"), code("lhr"));
        assert!(syd_lhr > Duration::from_millis(100) && syd_lhr < Duration::from_millis(120));
        let codes: std::collections::BTreeSet<&str> = SITES.iter().map(|s| s.code).collect();
        assert_eq!(codes.len(), SITES.len());
    }
}
