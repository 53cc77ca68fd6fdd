//! Changes into [`Engine::apply_changes`]: real changes from two concurrent
//! writers, handed over in any order and grouping, some corrupted at the
//! byte level, some rewritten field by field (sequence number, start op,
//! actor, dependencies, time, message, operations) and re-encoded with a
//! valid checksum, and raw bytes.
//!
//! Must hold after every call:
//! * an error is one of the errors for bad changes, and the document, in
//!   memory and as reloaded from the store, is what it was before the call;
//! * on success, every change whose dependencies were present (before the
//!   call or earlier in the batch) is in the document, and nothing is that
//!   was never handed over;
//! * the document in memory, the document reloaded from the store, and the
//!   document rebuilt by Automerge from the engine's own history have the same
//!   heads and the same JSON.

use std::collections::HashSet;

use arbitrary::{Arbitrary, Unstructured};
use automerge::{ActorId, Automerge, Change, ChangeHash};
use serde_json::Value;

use crate::config::{CompactionPolicy, EngineConfig};
use crate::doc_id::DocId;
use crate::engine::Engine;
use crate::error::Error;
use crate::json::to_json;
use crate::lineage::{genesis_change, TOMBSTONE_MESSAGE};

use super::edit::Edit;

/// Most edits, batches and pieces per batch read from one input.
const MAX_EDITS: usize = 32;
const MAX_BATCHES: usize = 8;
const MAX_PIECES: usize = 8;

/// A field-level rewrite of a real change, re-encoded with a valid checksum.
#[derive(Arbitrary, Debug)]
enum Rewrite {
    Seq(u64),
    StartOp(u64),
    Actor(u8),
    DropDep,
    AddDep(u8),
    RandomDep([u8; 32]),
    Time(i64),
    Tombstone,
    DropOp(u8),
    DuplicateOp(u8),
    FlipInsert(u8),
    RenameKey(u8),
    ClearPred(u8),
    ExtraBytes(Vec<u8>),
}

/// One element of a batch.
#[derive(Arbitrary, Debug)]
enum Piece {
    Real(u8),
    Flip { change: u8, at: u16, xor: u8 },
    Truncate { change: u8, len: u16 },
    Rewrite { change: u8, rewrite: Rewrite },
    Raw(Vec<u8>),
    Genesis,
    ForeignGenesis,
}

#[derive(Arbitrary, Debug)]
struct Input {
    edits: Vec<(bool, bool, Edit)>,
    batches: Vec<Vec<Piece>>,
}

/// Runs one input; panics if a property fails.
pub fn run(data: &[u8]) {
    let Ok(input) = Input::arbitrary_take_rest(Unstructured::new(data)) else {
        return;
    };
    // Constant, valid ids.
    #[allow(clippy::expect_used)]
    let (doc, other) = (
        DocId::new("fuzz/doc").expect("id"),
        DocId::new("fuzz/other").expect("id"),
    );
    let changes = write_changes(&doc, &input.edits);
    let dir = super::store_dir("causeway-fuzz-apply-");
    let config = EngineConfig {
        // Every document is evicted as soon as another is touched, so the
        // checks below can compare memory with the store; logs fold into
        // snapshots every few changes.
        cache_budget_bytes: 0,
        compaction: CompactionPolicy {
            max_log_changes: 3,
            max_log_bytes: 4 << 20,
        },
        actor: Some(ActorId::from([9u8; 16])),
        footprint: crate::config::Footprint::Small,
        ..EngineConfig::default()
    };
    #[allow(clippy::expect_used)]
    let engine = Engine::open(dir.path(), config).expect("open a fuzz store");
    // Every replica makes the genesis itself, so a change that depends on
    // it brings it along: it counts as handed over from the start.
    let genesis = genesis_change(&doc).hash();
    let mut handed_over: HashSet<ChangeHash> = HashSet::from([genesis]);
    for batch in input.batches.iter().take(MAX_BATCHES) {
        let bytes: Vec<Vec<u8>> = batch
            .iter()
            .take(MAX_PIECES)
            .map(|p| piece(p, &doc, &changes))
            .collect();
        let before = state(&engine, &doc, &other);
        match engine.apply_changes(&doc, &bytes) {
            Ok(_) => {
                let decoded: Vec<Change> = bytes
                    .iter()
                    .filter_map(|b| Change::from_bytes(b.clone()).ok())
                    .collect();
                handed_over.extend(decoded.iter().map(Change::hash));
                let after = state(&engine, &doc, &other);
                check_applied(&before, &after, &decoded, &handed_over, genesis);
            }
            Err(
                Error::InvalidChange { .. }
                | Error::ChangeTooLarge { .. }
                | Error::WrongDocument { .. }
                | Error::ChangeRejected { .. }
                | Error::HeldLimit { .. },
            ) => {
                let after = state(&engine, &doc, &other);
                assert_eq!(before, after, "a refused batch changed the document");
            }
            Err(e) => panic!("unexpected error from apply_changes: {e}"),
        }
    }
}

/// Changes from two writers editing concurrently from the document's genesis,
/// now and then merging each other's work.
fn write_changes(doc: &DocId, edits: &[(bool, bool, Edit)]) -> Vec<Change> {
    let genesis = genesis_change(doc);
    let mut writers: Vec<Automerge> = (1..=2u8)
        .map(|a| Automerge::new().with_actor(ActorId::from([a; 16])))
        .collect();
    for w in &mut writers {
        // The genesis change has no dependencies; applying it cannot fail.
        #[allow(clippy::expect_used)]
        w.apply_changes([genesis.clone()]).expect("genesis");
    }
    let mut out = vec![genesis];
    for (second, merge, edit) in edits.iter().take(MAX_EDITS) {
        let (w, o) = if *second { (1, 0) } else { (0, 1) };
        if *merge {
            let mut theirs = writers[o].clone();
            // Both histories are valid and share the genesis.
            #[allow(clippy::expect_used)]
            writers[w].merge(&mut theirs).expect("merge writers");
        }
        if writers[w].transact(|tx| edit.apply(tx)).is_ok() {
            if let Some(c) = writers[w].get_last_local_change() {
                out.push(c);
            }
        }
    }
    out
}

fn piece(p: &Piece, doc: &DocId, changes: &[Change]) -> Vec<u8> {
    let pick = |i: &u8| &changes[usize::from(*i) % changes.len()];
    match p {
        Piece::Real(i) => pick(i).raw_bytes().to_vec(),
        Piece::Flip { change, at, xor } => {
            let mut bytes = pick(change).raw_bytes().to_vec();
            let at = usize::from(*at) % bytes.len();
            bytes[at] ^= (*xor).max(1);
            bytes
        }
        Piece::Truncate { change, len } => {
            let bytes = pick(change).raw_bytes();
            bytes[..usize::from(*len) % bytes.len()].to_vec()
        }
        Piece::Rewrite { change, rewrite } => rewritten(pick(change), rewrite, changes),
        Piece::Raw(bytes) => bytes.iter().copied().take(512).collect(),
        Piece::Genesis => genesis_change(doc).raw_bytes().to_vec(),
        #[allow(clippy::expect_used)]
        Piece::ForeignGenesis => genesis_change(&DocId::new("fuzz/foreign").expect("id"))
            .raw_bytes()
            .to_vec(),
    }
}

fn rewritten(change: &Change, rewrite: &Rewrite, all: &[Change]) -> Vec<u8> {
    let mut e = change.decode();
    let nth = |i: &u8, len: usize| usize::from(*i) % len.max(1);
    match rewrite {
        Rewrite::Seq(s) => e.seq = *s,
        Rewrite::StartOp(s) => e.start_op = (*s).max(1).try_into().unwrap_or(e.start_op),
        Rewrite::Actor(a) => e.actor_id = ActorId::from([a % 4; 16]),
        Rewrite::DropDep => drop(e.deps.pop()),
        Rewrite::AddDep(i) => e.deps.push(all[nth(i, all.len())].hash()),
        Rewrite::RandomDep(h) => e.deps.push(ChangeHash(*h)),
        Rewrite::Time(t) => e.time = *t,
        Rewrite::Tombstone => e.message = Some(TOMBSTONE_MESSAGE.into()),
        Rewrite::DropOp(i) if !e.operations.is_empty() => {
            e.operations.remove(nth(i, e.operations.len()));
        }
        Rewrite::DuplicateOp(i) if !e.operations.is_empty() => {
            let op = e.operations[nth(i, e.operations.len())].clone();
            e.operations.push(op);
        }
        Rewrite::FlipInsert(i) if !e.operations.is_empty() => {
            let n = nth(i, e.operations.len());
            e.operations[n].insert = !e.operations[n].insert;
        }
        Rewrite::RenameKey(i) if !e.operations.is_empty() => {
            let n = nth(i, e.operations.len());
            e.operations[n].key = automerge::legacy::Key::Map(format!("r{i}").into());
        }
        Rewrite::ClearPred(i) if !e.operations.is_empty() => {
            let n = nth(i, e.operations.len());
            e.operations[n].pred = automerge::legacy::SortedVec::new();
        }
        Rewrite::ExtraBytes(b) => e.extra_bytes = b.iter().copied().take(64).collect(),
        _ => {}
    }
    e.deps.sort_unstable();
    e.deps.dedup();
    Change::from(e).raw_bytes().to_vec()
}

/// What the document holds, read three ways that must agree.
#[derive(Debug, PartialEq)]
struct State {
    heads: Vec<ChangeHash>,
    changes: HashSet<ChangeHash>,
    json: Option<Value>,
}

/// The document's state, checked to be the same in memory, reloaded from the
/// store, and rebuilt from the engine's history.
fn state(engine: &Engine, doc: &DocId, other: &DocId) -> State {
    let in_memory = read(engine, doc);
    // Touching another document evicts this one (the cache budget is zero).
    let _ = engine.heads(other);
    let reloaded = read(engine, doc);
    assert_eq!(in_memory, reloaded, "memory and store disagree");
    let Some((state, history)) = reloaded else {
        return State {
            heads: Vec::new(),
            changes: HashSet::new(),
            json: None,
        };
    };
    let mut rebuilt = Automerge::new();
    let decoded: Vec<Change> = history
        .into_iter()
        .map(|b| Change::from_bytes(b).unwrap_or_else(|e| panic!("stored change: {e}")))
        .collect();
    rebuilt
        .apply_changes(decoded)
        .unwrap_or_else(|e| panic!("the engine's history does not rebuild: {e}"));
    let mut rebuilt_heads = rebuilt.get_heads();
    rebuilt_heads.sort_unstable();
    assert_eq!(rebuilt_heads, state.heads, "history and heads disagree");
    assert_eq!(
        Some(to_json(&rebuilt.hydrate(None))),
        state.json,
        "history and document disagree"
    );
    state
}

/// Heads, change hashes and JSON (also of a deleted document), with the
/// whole history; `None` if the document does not exist.
fn read(engine: &Engine, doc: &DocId) -> Option<(State, Vec<Vec<u8>>)> {
    let mut heads = match engine.heads(doc) {
        Ok(h) => h,
        Err(Error::NotFound(_)) => return None,
        Err(e) => panic!("heads: {e}"),
    };
    let history = engine
        .changes_since(doc, &[])
        .unwrap_or_else(|e| panic!("history: {e}"));
    let json = engine
        .get_json_at(doc, &heads)
        .unwrap_or_else(|e| panic!("json: {e}"));
    heads.sort_unstable();
    let changes = history
        .iter()
        .map(|b| {
            Change::from_bytes(b.clone())
                .unwrap_or_else(|e| panic!("stored change: {e}"))
                .hash()
        })
        .collect();
    let state = State {
        heads,
        changes,
        json: Some(json),
    };
    Some((state, history))
}

/// After a successful apply: everything whose dependencies were present is
/// in (the genesis counts as present: a change that depends on it brings
/// it along), and nothing is that was never handed over.
fn check_applied(
    before: &State,
    after: &State,
    batch: &[Change],
    handed_over: &HashSet<ChangeHash>,
    genesis: ChangeHash,
) {
    let mut present = before.changes.clone();
    loop {
        let ready: Vec<&Change> = batch
            .iter()
            .filter(|c| {
                !present.contains(&c.hash())
                    && c.deps()
                        .iter()
                        .all(|d| present.contains(d) || *d == genesis)
            })
            .collect();
        if ready.is_empty() {
            break;
        }
        if ready.iter().any(|c| c.deps().contains(&genesis)) {
            present.insert(genesis);
        }
        present.extend(ready.iter().map(|c| c.hash()));
    }
    if let Some(missing) = present.iter().find(|h| !after.changes.contains(h)) {
        panic!("change {missing} was ready but is not in the document");
    }
    if let Some(extra) = after
        .changes
        .iter()
        .find(|h| !before.changes.contains(h) && !handed_over.contains(h))
    {
        panic!("change {extra} is in the document but was never handed over");
    }
}
