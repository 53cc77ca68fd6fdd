//! Rateless invertible Bloom lookup tables over item keys (Lei Yang, Yossi
//! Gilad, Mohammad Alizadeh, "Practical Rateless Set Reconciliation",
//! SIGCOMM 2024).
//!
//! A side's items in a range map to an endless sequence of cells; each cell
//! holds the XOR of the keys mapped to it, the XOR of their checksums and
//! their count (modulo 256). Key `k` maps to cell 0 and then to cells drawn
//! so that cell `i` receives about a fraction `2 / (i + 2)` of all keys:
//! early cells mix many keys, later ones few. Subtracting one side's cells
//! from the other's leaves the cells of the symmetric difference, which
//! peel (a cell holding exactly one key gives it away, and removing that key
//! from its other cells frees more) once about 1.35 to 2 cells per differing
//! key have been exchanged. Because the sequence has no fixed length, the
//! side that decodes asks for more cells until peeling empties them all,
//! never starting over.
//!
//! The peer computes its cells afresh from its set for each request; only
//! the decoding side keeps state ([`Decoder`]).

use std::collections::HashSet;

use super::super::wire::SKETCH_CELL_LEN;

/// An item's 64-bit key in a sketch: the first eight bytes of its hash (see
/// `item_hash`), so two sides agree on it without exchanging it.
pub type Key = u64;

/// One cell of a sketch. On the wire: key XOR (8 bytes, big-endian),
/// checksum XOR (4 bytes), count modulo 256 (1 byte).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Cell {
    key: u64,
    check: u32,
    count: u8,
}

/// Which side a decoded key belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Owner {
    /// The side that sent the cells (the peer).
    Theirs,
    /// The decoding side.
    Ours,
}

impl Cell {
    fn add(&mut self, key: Key) {
        self.key ^= key;
        self.check ^= checksum(key);
        self.count = self.count.wrapping_add(1);
    }

    fn remove(&mut self, key: Key) {
        self.key ^= key;
        self.check ^= checksum(key);
        self.count = self.count.wrapping_sub(1);
    }

    fn is_empty(&self) -> bool {
        *self == Cell::default()
    }

    /// The one key this cell holds, if it holds exactly one (up to a 2^-32
    /// chance of a false one, which the decoder catches for its own keys).
    fn pure(&self) -> Option<(Key, Owner)> {
        if checksum(self.key) != self.check {
            return None;
        }
        match self.count {
            1 => Some((self.key, Owner::Theirs)),
            u8::MAX => Some((self.key, Owner::Ours)),
            _ => None,
        }
    }

    /// Appends the wire form.
    pub fn write(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.key.to_be_bytes());
        out.extend_from_slice(&self.check.to_be_bytes());
        out.push(self.count);
    }

    /// Reads cells from their wire form (`None` unless a whole number of
    /// cells).
    pub fn read_all(bytes: &[u8]) -> Option<Vec<Cell>> {
        if !bytes.len().is_multiple_of(SKETCH_CELL_LEN) {
            return None;
        }
        Some(
            bytes
                .chunks_exact(SKETCH_CELL_LEN)
                .map(|c| {
                    let mut key = [0u8; 8];
                    key.copy_from_slice(&c[..8]);
                    let mut check = [0u8; 4];
                    check.copy_from_slice(&c[8..12]);
                    Cell {
                        key: u64::from_be_bytes(key),
                        check: u32::from_be_bytes(check),
                        count: c[12],
                    }
                })
                .collect(),
        )
    }
}

/// Cells `[start, start + len)` of the sketch of `keys`.
pub fn encode(keys: impl Iterator<Item = Key>, start: usize, len: usize) -> Vec<Cell> {
    let mut cells = vec![Cell::default(); len];
    let end = start + len;
    for key in keys {
        for i in Indices::new(key).skip_while(|i| *i < start) {
            if i >= end {
                break;
            }
            cells[i - start].add(key);
        }
    }
    cells
}

/// The wire form of cells.
pub fn to_bytes(cells: &[Cell]) -> Vec<u8> {
    let mut out = Vec::with_capacity(cells.len() * SKETCH_CELL_LEN);
    cells.iter().for_each(|c| c.write(&mut out));
    out
}

/// The cells a key maps to, ascending: 0 first, then gaps drawn so that cell
/// `i` is hit with probability about `2 / (i + 2)`. Given the last index `i`
/// and a uniform `u` in (0, 1], the next is `i + ceil((i + 1.5) (1/sqrt(u) -
/// 1))` (at least `i + 1`): the chance that none of `i + 1 ..= j` is hit is
/// then about `((i + 1.5) / (j + 1.5))^2`, the product of `1 - 2 / (k + 2)`.
/// Only IEEE-754 operations that are exactly rounded on every platform are
/// used, so both sides compute the same indices.
#[derive(Debug, Clone)]
struct Indices {
    state: u64,
    next: Option<usize>,
}

impl Indices {
    fn new(key: Key) -> Self {
        Indices {
            state: key,
            next: Some(0),
        }
    }
}

impl Iterator for Indices {
    type Item = usize;

    fn next(&mut self) -> Option<usize> {
        let current = self.next?;
        self.state = self.state.wrapping_add(GOLDEN_GAMMA);
        // 53 random bits, as a uniform draw in (0, 1].
        let u = ((mix(self.state) >> 11) + 1) as f64 / (1u64 << 53) as f64;
        let gap = (current as f64 + 1.5) * (1.0 / u.sqrt() - 1.0);
        // Far beyond any window: the key maps to no further cell.
        self.next = if gap < (1u64 << 40) as f64 {
            Some(current + ceil(gap).max(1))
        } else {
            None
        };
        Some(current)
    }
}

/// `x.ceil()` for `0 <= x < 2^40`, without the call into libm that
/// `f64::ceil` costs where SSE4.1 is not assumed.
fn ceil(x: f64) -> usize {
    let whole = x as usize;
    if (whole as f64) < x {
        whole + 1
    } else {
        whole
    }
}

const GOLDEN_GAMMA: u64 = 0x9E37_79B9_7F4A_7C15;

/// SplitMix64's finaliser.
fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// A key's checksum: independent of the indices it maps to.
fn checksum(key: Key) -> u32 {
    (mix(key ^ 0x5EED_C0DE_F00D_CAFE) >> 32) as u32
}

/// How a decoding step ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Every cell peeled to empty: the difference is known.
    Decoded,
    /// More cells are needed; the estimate of how many in all.
    Needs(usize),
    /// The cells are not the difference of two sets: a key peeled twice
    /// (the sets changed between windows, or a cell passed for pure by
    /// chance). The range must be reconciled another way.
    Inconsistent,
}

/// The decoding side's state for one range: the peer's cells minus its own,
/// peeled as far as they go.
#[derive(Debug, Clone, Default)]
pub struct Decoder {
    cells: Vec<Cell>,
    /// Empty cells of the plain difference (before peeling), for estimating
    /// the size of the difference.
    empty_before_peeling: usize,
    theirs: Vec<Key>,
    ours: Vec<Key>,
    /// Every key peeled so far, either side's.
    peeled: HashSet<Key>,
}

impl Decoder {
    /// Cells received so far.
    pub fn len(&self) -> usize {
        self.cells.len()
    }

    /// Whether no cell was received.
    pub fn is_empty(&self) -> bool {
        self.cells.is_empty()
    }

    /// Keys decoded as the peer's (it holds them, this side does not).
    pub fn theirs(&self) -> &[Key] {
        &self.theirs
    }

    /// Keys decoded as this side's.
    pub fn ours(&self) -> &[Key] {
        &self.ours
    }

    /// Drops the cells (once decoded), keeping the keys.
    pub fn release_cells(&mut self) {
        self.cells = Vec::new();
        self.peeled = HashSet::new();
    }

    /// Adds the peer's next cells (they start at [`len`](Self::len)),
    /// subtracts this side's (`own`: its keys in the range) and peels.
    /// Keys decoded as this side's may still be false (a cell that passed
    /// for pure by a 2^-32 chance, or sets that changed between windows):
    /// the caller checks them against its set.
    pub fn extend(&mut self, theirs: &[Cell], own: impl Iterator<Item = Key>) -> Outcome {
        let start = self.cells.len();
        let mine = encode(own, start, theirs.len());
        let mut window: Vec<Cell> = theirs
            .iter()
            .zip(&mine)
            .map(|(t, m)| Cell {
                key: t.key ^ m.key,
                check: t.check ^ m.check,
                count: t.count.wrapping_sub(m.count),
            })
            .collect();
        self.empty_before_peeling += window.iter().filter(|c| c.is_empty()).count();
        // Keys peeled already leave the new cells too.
        let end = start + window.len();
        for (keys, owner) in [(&self.theirs, Owner::Theirs), (&self.ours, Owner::Ours)] {
            for &key in keys {
                for i in Indices::new(key).skip_while(|i| *i < start) {
                    if i >= end {
                        break;
                    }
                    take(&mut window[i - start], key, owner);
                }
            }
        }
        self.cells.extend(window);
        self.peel()
    }

    fn peel(&mut self) -> Outcome {
        let len = self.cells.len();
        let mut pending: Vec<usize> = (0..len)
            .filter(|i| self.cells[*i].pure().is_some())
            .collect();
        while let Some(i) = pending.pop() {
            let Some((key, owner)) = self.cells[i].pure() else {
                continue;
            };
            // In the difference of two sets a key is on one side, once.
            // Peeling it again would undo the first peeling and could go
            // back and forth without end.
            if !self.peeled.insert(key) {
                return Outcome::Inconsistent;
            }
            match owner {
                Owner::Theirs => self.theirs.push(key),
                Owner::Ours => self.ours.push(key),
            }
            for j in Indices::new(key) {
                if j >= len {
                    break;
                }
                take(&mut self.cells[j], key, owner);
                if self.cells[j].pure().is_some() {
                    pending.push(j);
                }
            }
        }
        if self.cells.iter().all(Cell::is_empty) {
            Outcome::Decoded
        } else {
            Outcome::Needs(self.estimate())
        }
    }

    /// Cells likely to decode the whole difference: about 1.6 per differing
    /// key, the number of keys estimated from the share of cells the plain
    /// difference left empty (cell `i` is empty with probability about
    /// `(i / (i + 2))^d` for `d` differing keys), at least 1.5 times the
    /// cells so far (1.35 to 2 cells per key decode, so a window that did
    /// not is short by at least that much).
    fn estimate(&self) -> usize {
        let m = self.cells.len();
        let expected_empty = |d: f64| -> f64 {
            (1..m)
                .map(|i| (i as f64 / (i as f64 + 2.0)).powf(d))
                .sum::<f64>()
        };
        let observed = self.empty_before_peeling as f64;
        // Bisection over d: expected empty cells fall as d grows.
        let (mut lo, mut hi) = (1.0f64, 1.0f64);
        while expected_empty(hi) > observed.max(0.5) && hi < 1e7 {
            lo = hi;
            hi *= 2.0;
        }
        for _ in 0..30 {
            let mid = (lo + hi) / 2.0;
            if expected_empty(mid) > observed.max(0.5) {
                lo = mid;
            } else {
                hi = mid;
            }
        }
        // With no empty cell, `hi` is only a lower bound: reach further.
        let d = if self.empty_before_peeling == 0 {
            hi * 2.0
        } else {
            hi
        };
        let known = (self.theirs.len() + self.ours.len()) as f64;
        let want = (1.6 * d.max(known)).ceil() as usize;
        want.max(m + m.div_ceil(2))
    }
}

fn take(cell: &mut Cell, key: Key, owner: Owner) {
    match owner {
        Owner::Theirs => cell.remove(key),
        Owner::Ours => cell.add(key),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use std::collections::BTreeSet;

    use super::*;

    fn keys(range: std::ops::Range<u64>) -> Vec<Key> {
        range.map(|i| mix(i.wrapping_mul(7_919))).collect()
    }

    /// Decodes `theirs` against `ours` in windows chosen by the estimate;
    /// returns the decoder and the cells used.
    fn decode(theirs: &[Key], ours: &[Key], first: usize) -> (Decoder, usize) {
        let mut d = Decoder::default();
        let mut want = first;
        loop {
            let start = d.len();
            let cells = encode(theirs.iter().copied(), start, want - start);
            match d.extend(&cells, ours.iter().copied()) {
                Outcome::Decoded => return (d, want),
                Outcome::Needs(n) => want = n,
                Outcome::Inconsistent => panic!("inconsistent"),
            }
            assert!(want < 1 << 20, "no end");
        }
    }

    #[test]
    fn cells_survive_the_wire() {
        let cells = encode(keys(0..50).into_iter(), 3, 20);
        assert_eq!(Cell::read_all(&to_bytes(&cells)).unwrap(), cells);
        assert!(Cell::read_all(&[0u8; SKETCH_CELL_LEN + 1]).is_none());
    }

    #[test]
    fn windows_add_up_to_the_whole() {
        let k = keys(0..500);
        let whole = encode(k.iter().copied(), 0, 300);
        let mut parts = encode(k.iter().copied(), 0, 100);
        parts.extend(encode(k.iter().copied(), 100, 200));
        assert_eq!(parts, whole);
        // Cell 0 holds every key.
        assert_eq!(whole[0].count, (500 % 256) as u8);
    }

    #[test]
    fn indices_hit_cell_i_about_two_in_i_plus_two() {
        let k = keys(0..20_000);
        for i in [1usize, 10, 100] {
            let hits = k
                .iter()
                .filter(|key| Indices::new(**key).any(|j| j == i))
                .count();
            let expected = 20_000.0 * 2.0 / (i as f64 + 2.0);
            let ratio = hits as f64 / expected;
            assert!(
                (0.9..1.1).contains(&ratio),
                "cell {i}: {hits} hits, {expected}"
            );
        }
    }

    #[test]
    fn decodes_the_symmetric_difference_of_large_sets() {
        let common = keys(0..20_000);
        for (only_theirs, only_ours) in [(0u64, 1u64), (5, 5), (300, 20), (1_000, 1_000)] {
            let theirs_only = keys(100_000..100_000 + only_theirs);
            let ours_only = keys(200_000..200_000 + only_ours);
            let theirs: Vec<Key> = common.iter().chain(&theirs_only).copied().collect();
            let ours: Vec<Key> = common.iter().chain(&ours_only).copied().collect();
            let (d, cells) = decode(&theirs, &ours, 32);
            let got: BTreeSet<Key> = d.theirs().iter().copied().collect();
            assert_eq!(got, theirs_only.iter().copied().collect());
            let got: BTreeSet<Key> = d.ours().iter().copied().collect();
            assert_eq!(got, ours_only.iter().copied().collect());
            let differing = (only_theirs + only_ours) as usize;
            assert!(
                cells <= 32.max(3 * differing),
                "{cells} cells for {differing}"
            );
        }
    }

    #[test]
    fn cells_of_sets_that_changed_between_windows_end_as_inconsistent_not_in_a_loop() {
        // The peer's first window from one set, the second from another:
        // decoding must end, whatever it finds.
        let ours = keys(0..2_000);
        let before: Vec<Key> = keys(0..1_990)
            .into_iter()
            .chain(keys(5_000..5_040))
            .collect();
        let after: Vec<Key> = keys(10..2_000)
            .into_iter()
            .chain(keys(6_000..6_040))
            .collect();
        let mut outcomes = Vec::new();
        for split in [8usize, 32, 64] {
            let mut d = Decoder::default();
            let first = encode(before.iter().copied(), 0, split);
            let _ = d.extend(&first, ours.iter().copied());
            let second = encode(after.iter().copied(), split, 256 - split);
            outcomes.push(d.extend(&second, ours.iter().copied()));
        }
        assert!(
            outcomes.iter().all(|o| *o != Outcome::Decoded),
            "{outcomes:?}"
        );
    }

    #[test]
    fn a_key_peeled_twice_is_inconsistent() {
        // A cell claims key k for the peer, and another the same key for
        // this side: no difference of two sets looks like that.
        let k = keys(0..1)[0];
        let mut theirs = Cell::default();
        theirs.add(k);
        let mut d = Decoder::default();
        // Cell 0 holds +k; this side also holds k only in later cells.
        let mut cells = vec![theirs];
        cells.extend(vec![Cell::default(); 7]);
        let outcome = d.extend(&cells, std::iter::empty());
        // k peels from cell 0 as the peer's, leaving -k in its other cells,
        // which then peel as this side's.
        let hits = Indices::new(k).take_while(|i| *i < 8).count();
        if hits > 1 {
            assert_eq!(outcome, Outcome::Inconsistent);
        } else {
            assert_eq!(outcome, Outcome::Decoded);
        }
    }
}
