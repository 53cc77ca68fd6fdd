//! Automerge sync messages from a hostile peer into
//! [`Engine::receive_sync_message`], and the answers
//! [`Engine::generate_sync_message`] gives after each.
//!
//! The messages are structurally valid (they are built as Automerge's own
//! message type, then encoded and decoded like a wire message): heads and
//! needs naming real changes of either side or made-up hashes, lists
//! repeated up to and past the bounds, `have` entries whose Bloom filters are
//! real ones built from chosen hashes or hand-encoded parameters (zero bits,
//! huge probe counts, truncated bits), and changes that are the peer's real
//! ones (in any order, so some wait for dependencies), this engine's own,
//! corrupted, or raw bytes. Local writes and a restart of the session (its
//! durable part saved and loaded) happen in between.
//!
//! Must hold:
//! * no call panics; every refusal is a typed error for a bad message or
//!   bad changes, and a message refused by the bounds leaves the sync state
//!   as it was;
//! * every message the engine generates is one its peers accept: within
//!   the bounds, decodable, its changes within the byte budget (or a single
//!   change);
//! * the document, in memory and as reloaded from the store, holds only
//!   changes written here or by the peer;
//! * afterwards an honest peer, holding the peer's side of the document,
//!   syncs with the engine from the sync state the engine persisted (as it
//!   would after a reconnect) and both end with the same heads and JSON:
//!   nothing the hostile messages did poisons the document or the session.

use std::collections::HashSet;

use arbitrary::{Arbitrary, Unstructured};
use automerge::sync::{BloomFilter, ChunkList, Have, SyncDoc};
use automerge::{ActorId, Automerge, Change, ChangeHash};

use crate::config::EngineConfig;
use crate::doc_id::DocId;
use crate::doc_sync::{check_bounds, SyncMessage, SyncState, MAX_SYNC_HASHES};
use crate::engine::Engine;
use crate::error::Error;

use super::edit::Edit;

/// Most edits per side, steps, and entries per list read from one input.
const MAX_EDITS: usize = 24;
const MAX_STEPS: usize = 16;
const MAX_ENTRIES: usize = 8;
/// Most bytes of a raw change or of a hand-made Bloom filter's bits.
const MAX_RAW_BYTES: usize = 256;
/// Rounds the honest sync at the end may take. Two documents of at most
/// `2 * MAX_EDITS` changes converge in a handful; more means the session is
/// stuck.
const HONEST_ROUNDS: usize = 32;
/// The peer's id, as the engine keys its persisted sync state.
const PEER: &str = "fuzz-peer";

/// A hash in a message: one of the changes either side wrote, or made up.
#[derive(Arbitrary, Debug, Clone)]
enum HashPick {
    Known(u8),
    Made([u8; 32]),
}

/// The Bloom filter of a `have` entry.
#[derive(Arbitrary, Debug)]
enum BloomPick {
    Empty,
    /// Automerge's own filter over the chosen hashes.
    Of(Vec<HashPick>),
    /// Hand-encoded parameters (LEB128) and bits.
    Raw {
        entries: u32,
        bits_per_entry: u32,
        probes: u32,
        bits: Vec<u8>,
    },
}

#[derive(Arbitrary, Debug)]
struct HaveSpec {
    last_sync: Vec<HashPick>,
    bloom: BloomPick,
}

/// A change in a message.
#[derive(Arbitrary, Debug)]
enum ChangePick {
    Theirs(u8),
    Ours(u8),
    Flip { change: u8, at: u16, xor: u8 },
    Raw(Vec<u8>),
}

/// A list of hashes, optionally padded with made-up hashes to `pad` (modulo
/// 16) entries beyond [`MAX_SYNC_HASHES`] minus 8, so that both sides of
/// the bound are reached.
#[derive(Arbitrary, Debug)]
struct Hashes {
    picks: Vec<HashPick>,
    pad: Option<u8>,
}

#[derive(Arbitrary, Debug)]
struct MessageSpec {
    heads: Hashes,
    need: Hashes,
    have: Vec<HaveSpec>,
    /// Extra empty `have` entries.
    more_haves: u8,
    changes: Vec<ChangePick>,
}

#[derive(Arbitrary, Debug)]
enum Step {
    /// The peer sends a message.
    Receive(MessageSpec),
    /// The engine answers, with a change budget of this many bytes (plus 1).
    Generate(u16),
    /// The engine's side writes.
    Write(Edit),
    /// The session restarts from its persisted part.
    Restart,
}

#[derive(Arbitrary, Debug)]
struct Input {
    ours: Vec<Edit>,
    theirs: Vec<Edit>,
    steps: Vec<Step>,
}

/// Everything a message may name.
struct Known {
    hashes: Vec<ChangeHash>,
    ours: Vec<Change>,
    theirs: Vec<Change>,
}

/// Runs one input; panics if a property fails.
pub fn run(data: &[u8]) {
    let Ok(input) = Input::arbitrary_take_rest(Unstructured::new(data)) else {
        return;
    };
    #[allow(clippy::expect_used)]
    let doc = DocId::new("fuzz/sync").expect("id");
    let (dir, peer_dir) = (
        super::store_dir("causeway-fuzz-sync-"),
        super::store_dir("causeway-fuzz-sync-peer-"),
    );
    let engine = open(dir.path(), 1);
    let peer = open(peer_dir.path(), 2);
    write(&engine, &doc, &input.ours);
    write(&peer, &doc, &input.theirs);
    let (ours, theirs) = (history(&engine, &doc), history(&peer, &doc));
    let known = Known {
        hashes: ours.iter().chain(&theirs).map(Change::hash).collect(),
        ours,
        theirs,
    };
    let mut allowed: HashSet<ChangeHash> = known.hashes.iter().copied().collect();
    let mut sync = SyncState::new();
    for step in input.steps.iter().take(MAX_STEPS) {
        match step {
            Step::Receive(spec) => receive(&engine, &doc, &mut sync, message(spec, &known)),
            Step::Generate(budget) => {
                generate(&engine, &doc, &mut sync, usize::from(*budget) + 1);
            }
            Step::Write(edit) => {
                write(&engine, &doc, std::slice::from_ref(edit));
                allowed.extend(
                    history(&engine, &doc)
                        .iter()
                        .filter(|c| c.actor_id() == &ActorId::from([1u8; 16]))
                        .map(Change::hash),
                );
            }
            Step::Restart => sync = restart(&engine, &doc, &sync),
        }
        check_history(&engine, &doc, &allowed);
    }
    let sync = restart(&engine, &doc, &sync);
    honest_sync(&engine, &peer, &doc, sync);
}

fn open(path: &std::path::Path, actor: u8) -> Engine {
    let config = EngineConfig {
        // Each check of memory against the store reloads the document.
        cache_budget_bytes: 0,
        actor: Some(ActorId::from([actor; 16])),
        footprint: crate::config::Footprint::Small,
        ..EngineConfig::default()
    };
    #[allow(clippy::expect_used)]
    Engine::open(path, config).expect("open a fuzz store")
}

/// Local writes; each edit is one transaction (an edit that fails writes
/// nothing). The document exists afterwards.
fn write(engine: &Engine, doc: &DocId, edits: &[Edit]) {
    #[allow(clippy::expect_used)]
    engine
        .upsert(doc, |_| Ok(()))
        .expect("create the fuzz document");
    for edit in edits.iter().take(MAX_EDITS) {
        match engine.update(doc, |tx| edit.apply(tx)) {
            Ok(_) | Err(Error::Transaction { .. }) => {}
            Err(e) => panic!("a local write failed: {e}"),
        }
    }
}

fn history(engine: &Engine, doc: &DocId) -> Vec<Change> {
    engine
        .changes_since(doc, &[])
        .unwrap_or_else(|e| panic!("history: {e}"))
        .into_iter()
        .map(|b| Change::from_bytes(b).unwrap_or_else(|e| panic!("stored change: {e}")))
        .collect()
}

fn hash(pick: &HashPick, known: &Known) -> ChangeHash {
    match pick {
        HashPick::Known(i) if !known.hashes.is_empty() => {
            known.hashes[usize::from(*i) % known.hashes.len()]
        }
        HashPick::Known(i) => ChangeHash([*i; 32]),
        HashPick::Made(h) => ChangeHash(*h),
    }
}

/// A hash list as Automerge encodes it: sorted, without repeats.
fn hashes(list: &Hashes, known: &Known) -> Vec<ChangeHash> {
    let mut out: Vec<ChangeHash> = list
        .picks
        .iter()
        .take(MAX_ENTRIES)
        .map(|p| hash(p, known))
        .collect();
    out.sort_unstable();
    out.dedup();
    if let Some(pad) = list.pad {
        let target = MAX_SYNC_HASHES - 8 + usize::from(pad % 16);
        let mut n = 0u32;
        while out.len() < target {
            let mut h = [0xee; 32];
            h[..4].copy_from_slice(&n.to_be_bytes());
            out.push(ChangeHash(h));
            n += 1;
        }
        out.sort_unstable();
    }
    out
}

fn bloom(pick: &BloomPick, known: &Known) -> BloomFilter {
    match pick {
        BloomPick::Empty => BloomFilter::default(),
        BloomPick::Of(picks) => {
            let hs: Vec<ChangeHash> = picks
                .iter()
                .take(MAX_ENTRIES)
                .map(|p| hash(p, known))
                .collect();
            BloomFilter::from_hashes(hs.iter())
        }
        BloomPick::Raw {
            entries,
            bits_per_entry,
            probes,
            bits,
        } => {
            let mut bytes = Vec::new();
            for v in [*entries, *bits_per_entry, *probes] {
                leb128(&mut bytes, v);
            }
            bytes.extend(bits.iter().take(MAX_RAW_BYTES));
            // Automerge refuses some encodings itself (bits shorter than
            // the parameters say); the peer then sends no filter.
            BloomFilter::try_from(bytes.as_slice()).unwrap_or_default()
        }
    }
}

fn leb128(out: &mut Vec<u8>, mut v: u32) {
    loop {
        let byte = (v & 0x7f) as u8;
        v >>= 7;
        if v == 0 {
            out.push(byte);
            return;
        }
        out.push(byte | 0x80);
    }
}

fn change_bytes(pick: &ChangePick, known: &Known) -> Vec<u8> {
    let nth = |list: &[Change], i: u8| -> Option<Vec<u8>> {
        (!list.is_empty()).then(|| list[usize::from(i) % list.len()].raw_bytes().to_vec())
    };
    match pick {
        ChangePick::Theirs(i) => nth(&known.theirs, *i).unwrap_or_default(),
        ChangePick::Ours(i) => nth(&known.ours, *i).unwrap_or_default(),
        ChangePick::Flip { change, at, xor } => {
            let mut bytes = nth(&known.theirs, *change).unwrap_or_default();
            if !bytes.is_empty() {
                let at = usize::from(*at) % bytes.len();
                bytes[at] ^= (*xor).max(1);
            }
            bytes
        }
        ChangePick::Raw(bytes) => bytes.iter().copied().take(MAX_RAW_BYTES).collect(),
    }
}

/// The message the spec describes, after a round trip through the wire
/// encoding (what a node decodes); `None` if it does not decode.
fn message(spec: &MessageSpec, known: &Known) -> Option<SyncMessage> {
    let mut have: Vec<Have> = spec
        .have
        .iter()
        .take(MAX_ENTRIES)
        .map(|h| Have {
            last_sync: hashes(
                &Hashes {
                    picks: h.last_sync.clone(),
                    pad: None,
                },
                known,
            ),
            bloom: bloom(&h.bloom, known),
        })
        .collect();
    have.extend((0..spec.more_haves % 8).map(|_| Have::default()));
    let changes: Vec<Vec<u8>> = spec
        .changes
        .iter()
        .take(MAX_ENTRIES)
        .map(|c| change_bytes(c, known))
        .filter(|c| !c.is_empty())
        .collect();
    // A message of the peer's Automerge, rewritten field by field.
    let mut message = Automerge::new().generate_sync_message(&mut SyncState::new())?;
    message.heads = hashes(&spec.heads, known);
    message.need = hashes(&spec.need, known);
    message.have = have;
    message.changes = ChunkList::from(changes);
    crate::guarded::sync_message(&message.encode()).ok()
}

fn receive(engine: &Engine, doc: &DocId, sync: &mut SyncState, message: Option<SyncMessage>) {
    let Some(message) = message else {
        return;
    };
    let before = sync.clone();
    let bounded = check_bounds(&message).is_ok();
    match engine.receive_sync_message(doc, sync, message) {
        Ok(_) => assert!(bounded, "a message beyond the bounds was taken"),
        Err(Error::InvalidSyncMessage { .. }) => {
            assert_eq!(*sync, before, "a refused message changed the sync state");
        }
        Err(
            Error::InvalidChange { .. }
            | Error::ChangeTooLarge { .. }
            | Error::WrongDocument { .. }
            | Error::ChangeRejected { .. }
            | Error::HeldLimit { .. }
            | Error::ShapeLimit { .. },
        ) => {}
        Err(e) => panic!("unexpected error from receive_sync_message: {e}"),
    }
}

/// Asks the engine for its next message and checks that a peer would take
/// it.
fn generate(
    engine: &Engine,
    doc: &DocId,
    sync: &mut SyncState,
    budget: usize,
) -> Option<SyncMessage> {
    let message = match engine.generate_sync_message(doc, sync, budget) {
        Ok(m) => m?,
        Err(Error::InvalidSyncMessage { .. }) => return None,
        Err(e) => panic!("unexpected error from generate_sync_message: {e}"),
    };
    if let Err(reason) = check_bounds(&message) {
        panic!("the engine generated a message its peers refuse: {reason}");
    }
    let decoded = crate::guarded::sync_message(&message.encode())
        .unwrap_or_else(|e| panic!("a generated message does not decode: {e}"));
    let sizes: Vec<usize> = decoded.changes.iter().map(<[u8]>::len).collect();
    assert!(
        sizes.len() <= 1 || sizes.iter().sum::<usize>() <= budget,
        "changes of {sizes:?} bytes over a budget of {budget}"
    );
    Some(decoded)
}

/// The session as it restarts: a fresh state with its durable part, saved
/// and loaded through the store.
fn restart(engine: &Engine, doc: &DocId, sync: &SyncState) -> SyncState {
    engine
        .save_sync_states(PEER, &[(doc, sync)])
        .unwrap_or_else(|e| panic!("save a sync state: {e}"));
    engine
        .load_sync_state(PEER, doc)
        .unwrap_or_else(|e| panic!("load a sync state: {e}"))
}

/// The document holds only changes written by either side, and reads the
/// same from memory and from the store (the cache budget is zero, so every
/// call reloads it).
fn check_history(engine: &Engine, doc: &DocId, allowed: &HashSet<ChangeHash>) {
    let heads = engine.heads(doc).unwrap_or_else(|e| panic!("heads: {e}"));
    // Touching another document evicts this one.
    #[allow(clippy::expect_used)]
    let _ = engine.heads(&DocId::new("fuzz/other").expect("id"));
    for change in history(engine, doc) {
        let hash = change.hash();
        assert!(
            allowed.contains(&hash),
            "change {hash} was never written by either side"
        );
    }
    let again = engine.heads(doc).unwrap_or_else(|e| panic!("heads: {e}"));
    assert_eq!(heads, again, "memory and store disagree");
}

/// An honest peer with a fresh session and the engine, from `sync`, trade
/// messages until both are quiet; they must then agree.
fn honest_sync(engine: &Engine, peer: &Engine, doc: &DocId, mut ours: SyncState) {
    let mut theirs = SyncState::new();
    for _ in 0..HONEST_ROUNDS {
        let a = generate(engine, doc, &mut ours, 1 << 20);
        if let Some(m) = a.clone() {
            peer.receive_sync_message(doc, &mut theirs, m)
                .unwrap_or_else(|e| panic!("the honest peer refused the engine's message: {e}"));
        }
        let b = peer
            .generate_sync_message(doc, &mut theirs, 1 << 20)
            .unwrap_or_else(|e| panic!("the honest peer failed to answer: {e}"));
        if let Some(m) = b.clone() {
            engine
                .receive_sync_message(doc, &mut ours, m)
                .unwrap_or_else(|e| panic!("the engine refused the honest peer's message: {e}"));
        }
        if a.is_none() && b.is_none() {
            break;
        }
    }
    let (mine, yours) = (heads(engine, doc), heads(peer, doc));
    assert_eq!(mine, yours, "an honest sync did not converge");
    assert_eq!(
        engine.get_json(doc).ok(),
        peer.get_json(doc).ok(),
        "same heads, different JSON"
    );
}

fn heads(engine: &Engine, doc: &DocId) -> Vec<ChangeHash> {
    let mut h = engine.heads(doc).unwrap_or_else(|e| panic!("heads: {e}"));
    h.sort_unstable();
    h
}
