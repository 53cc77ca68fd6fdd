//! Documents of any shape, through [`Engine::apply_changes`] and every read
//! path: deep nesting of maps, lists and texts in any mix, wide maps, long
//! lists, long texts with multi-byte characters, and the ordinary edits, as
//! a client's own Automerge document would produce them; JSON writes
//! (replace and merge patch) of any depth; the engine reopened with a
//! smaller depth limit, as if the document came from an older version. The
//! shape limits themselves are drawn from the input, small enough to be
//! crossed.
//!
//! Every read runs on a thread with 256 KiB of stack (an eighth of a tokio
//! worker's), so a read that recurses with the document's depth is caught
//! as a crash.
//!
//! Must hold:
//! * no call panics or overflows its stack;
//! * a call that applies changes either succeeds or is refused with
//!   [`Error::ShapeLimit`] or [`Error::HeldLimit`], and a refused call
//!   leaves the document as it was;
//! * a read gives what a rendering of the engine's own stored history
//!   gives: the same JSON (also at every earlier heads), or the same
//!   depth violation, and for shallow documents what Automerge's own
//!   `hydrate` gives;
//! * an accepted JSON write reads back as written (replace) or as RFC 7386
//!   says (merge patch); a refused one changes nothing;
//! * the document reads the same from memory and from the store.

use arbitrary::{Arbitrary, Unstructured};
use automerge::transaction::Transactable;
use automerge::{ActorId, Automerge, AutomergeError, Change, ChangeHash, ObjId, ObjType, ROOT};
use serde_json::{Map as JsonMap, Value as Json};

use crate::config::EngineConfig;
use crate::doc_id::DocId;
use crate::engine::Engine;
use crate::error::Error;
use crate::json::{render, to_json};
use crate::lineage::genesis_change;
use crate::shape::{ShapeLimits, ShapeViolation, MAX_DEPTH_CEILING};

use super::edit::Edit;

/// Most shapes, batches, JSON writes and read-back heads from one input.
const MAX_SHAPES: usize = 16;
const MAX_BATCHES: usize = 6;
const MAX_WRITES: usize = 4;
/// Deepest nesting a shape builds (past the largest depth limit).
const MAX_LEVELS: u16 = MAX_DEPTH_CEILING as u16 + 64;
/// Most keys, list elements and text characters one shape adds.
const MAX_WIDTH: u16 = 4096;
/// Stack of the thread the reads run on.
const READ_STACK: usize = 256 << 10;
/// Depth up to which Automerge's own recursive `hydrate` is also compared
/// (on the harness's own, larger stack).
const HYDRATE_DEPTH: usize = 32;

/// A piece of document shape, written in one transaction of the client.
#[derive(Arbitrary, Debug)]
enum Shape {
    /// Objects nested `levels` deep under a root key; bit `i` of `kinds`
    /// (cycled) picks a list over a map at level `i`, and a text ends it.
    Nest {
        key: u8,
        levels: u16,
        kinds: u64,
        text: bool,
    },
    /// `count` keys in a map at a root key.
    Wide { key: u8, count: u16 },
    /// `count` scalars in a list at a root key.
    Long { key: u8, count: u16 },
    /// A text of `count` characters at a root key.
    Text { key: u8, count: u16, ch: u8 },
    /// An ordinary edit.
    Edit(Edit),
}

/// A JSON value to write, nesting as deep as `depth` says.
#[derive(Arbitrary, Debug)]
enum JsonPick {
    Null,
    Int(i32),
    Str(u8),
    Deep { depth: u16, array: bool },
    Object(Vec<(u8, JsonPick)>),
}

#[derive(Arbitrary, Debug)]
enum Write {
    Replace(Vec<(u8, JsonPick)>),
    Patch(Vec<(u8, JsonPick)>),
}

#[derive(Arbitrary, Debug)]
struct Limits {
    depth: u8,
    ops: u16,
    objects: u16,
    kib: u16,
}

#[derive(Arbitrary, Debug)]
struct Input {
    limits: Limits,
    /// Shapes, each a change; `true` starts a new batch of apply_changes.
    shapes: Vec<(bool, Shape)>,
    /// The order each batch hands its changes over in (reversed or not).
    reversed: u8,
    writes: Vec<Write>,
    /// Reopen with this depth limit (1 + it modulo the ceiling), if given.
    reopen_depth: Option<u8>,
}

/// Runs one input; panics if a property fails.
pub fn run(data: &[u8]) {
    let Ok(input) = Input::arbitrary_take_rest(Unstructured::new(data)) else {
        return;
    };
    #[allow(clippy::expect_used)]
    let (doc, other) = (
        DocId::new("fuzz/shape").expect("id"),
        DocId::new("fuzz/other").expect("id"),
    );
    let dir = super::store_dir("causeway-fuzz-docs-");
    let shape = limits(&input.limits);
    let mut engine = open(dir.path(), shape);
    let subscription = engine
        .subscribe("fuzz/")
        .unwrap_or_else(|e| panic!("subscribe: {e}"));
    let mut seen_heads: Vec<Vec<ChangeHash>> = Vec::new();
    let mut accepted = 0usize;
    for batch in batches(&doc, &input) {
        let before = heads(&engine, &doc, &other);
        match engine.apply_changes(&doc, &batch) {
            Ok(outcome) => {
                accepted += 1;
                seen_heads.push(outcome.heads);
            }
            Err(Error::ShapeLimit { .. } | Error::HeldLimit { .. }) => {
                let after = heads(&engine, &doc, &other);
                assert_eq!(before, after, "a refused batch changed the document");
            }
            Err(e) => panic!("unexpected error from apply_changes: {e}"),
        }
        check_reads(&engine, &doc, &seen_heads, shape.max_depth);
    }
    for write in input.writes.iter().take(MAX_WRITES) {
        accepted += usize::from(json_write(&engine, &doc, write, shape.max_depth));
        if let Ok(h) = engine.heads(&doc) {
            seen_heads.push(h);
        }
        check_reads(&engine, &doc, &seen_heads, shape.max_depth);
    }
    // One event per accepted call that changed the document, the last
    // with the heads it has now.
    let mut events = Vec::new();
    while let Some(event) = subscription.try_recv() {
        assert_eq!(event.doc, doc, "an event for another document");
        events.push(event);
    }
    assert!(
        events.len() <= accepted,
        "{} events, {accepted} calls",
        events.len()
    );
    if let Some(last) = events.last() {
        let mut now = heads(&engine, &doc, &other).unwrap_or_default();
        let mut said = last.heads.clone();
        now.sort_unstable();
        said.sort_unstable();
        assert_eq!(said, now, "the last event does not carry the heads");
    }
    if let Some(depth) = input.reopen_depth {
        let smaller = ShapeLimits {
            max_depth: 1 + usize::from(depth) % MAX_DEPTH_CEILING,
            ..shape
        };
        drop(engine);
        engine = open(dir.path(), smaller);
        check_reads(&engine, &doc, &seen_heads, smaller.max_depth);
    }
}

/// Shape limits small enough for an input to cross, and valid.
fn limits(l: &Limits) -> ShapeLimits {
    let defaults = EngineConfig::default();
    ShapeLimits {
        max_depth: 1 + usize::from(l.depth) % MAX_DEPTH_CEILING,
        max_ops_per_change: 1 + usize::from(l.ops),
        max_objects_per_change: 1 + usize::from(l.objects),
        // At least the largest change, as the configuration requires.
        max_document_bytes: (u64::from(l.kib) << 10).max(defaults.max_change_bytes as u64),
    }
}

fn open(path: &std::path::Path, shape: ShapeLimits) -> Engine {
    let config = EngineConfig {
        // Every read of one document after touching another reloads it.
        cache_budget_bytes: 0,
        actor: Some(ActorId::from([7u8; 16])),
        shape,
        footprint: crate::config::Footprint::Small,
        ..EngineConfig::default()
    };
    #[allow(clippy::expect_used)]
    Engine::open(path, config).expect("open a fuzz store")
}

/// The client's changes, one per shape, grouped into batches.
fn batches(doc: &DocId, input: &Input) -> Vec<Vec<Vec<u8>>> {
    let mut client = Automerge::new().with_actor(ActorId::from([3u8; 16]));
    let genesis = genesis_change(doc);
    #[allow(clippy::expect_used)]
    client
        .apply_changes([genesis.clone()])
        .expect("the genesis applies");
    let mut out: Vec<Vec<Vec<u8>>> = vec![vec![genesis.raw_bytes().to_vec()]];
    for (new_batch, shape) in input.shapes.iter().take(MAX_SHAPES) {
        if client.transact(|tx| build(tx, shape)).is_err() {
            continue;
        }
        let Some(change) = client.get_last_local_change() else {
            continue;
        };
        if *new_batch && out.len() < MAX_BATCHES {
            out.push(Vec::new());
        }
        if let Some(batch) = out.last_mut() {
            batch.push(change.raw_bytes().to_vec());
        }
    }
    for (i, batch) in out.iter_mut().enumerate() {
        if input.reversed >> (i % 8) & 1 == 1 {
            batch.reverse();
        }
    }
    out
}

fn build(tx: &mut impl Transactable, shape: &Shape) -> Result<(), AutomergeError> {
    let key = |k: &u8| format!("k{}", k % 4);
    match shape {
        Shape::Nest {
            key: k,
            levels,
            kinds,
            text,
        } => {
            let levels = usize::from(*levels % MAX_LEVELS);
            let mut obj = tx.put_object(ROOT, key(k), kind(*kinds, 0))?;
            for level in 1..levels {
                obj = child(tx, &obj, kind(*kinds, level))?;
            }
            if *text {
                let t = child(tx, &obj, ObjType::Text)?;
                tx.splice_text(&t, 0, 0, "deep")?;
            }
            Ok(())
        }
        Shape::Wide { key: k, count } => {
            let map = tx.put_object(ROOT, key(k), ObjType::Map)?;
            (0..count % MAX_WIDTH).try_for_each(|i| tx.put(&map, format!("w{i}"), i64::from(i)))
        }
        Shape::Long { key: k, count } => {
            let list = tx.put_object(ROOT, key(k), ObjType::List)?;
            (0..count % MAX_WIDTH).try_for_each(|i| tx.insert(&list, usize::from(i), i64::from(i)))
        }
        Shape::Text { key: k, count, ch } => {
            let text = tx.put_object(ROOT, key(k), ObjType::Text)?;
            let c = ['a', 'é', '€', '🦀'][usize::from(*ch) % 4];
            let s: String = std::iter::repeat_n(c, usize::from(count % MAX_WIDTH)).collect();
            tx.splice_text(&text, 0, 0, &s)
        }
        Shape::Edit(edit) => edit.apply(tx),
    }
}

fn kind(kinds: u64, level: usize) -> ObjType {
    if kinds >> (level % 64) & 1 == 1 {
        ObjType::List
    } else {
        ObjType::Map
    }
}

/// A new object of `kind` inside `parent` (a map or a list).
fn child(
    tx: &mut impl Transactable,
    parent: &ObjId,
    kind: ObjType,
) -> Result<ObjId, AutomergeError> {
    match tx.object_type(parent)? {
        ObjType::List | ObjType::Text => tx.insert_object(parent, 0, kind),
        _ => tx.put_object(parent, "n", kind),
    }
}

/// The document's heads, after evicting it by touching `other` (the cache
/// budget is zero), checked against the heads in memory.
fn heads(engine: &Engine, doc: &DocId, other: &DocId) -> Option<Vec<ChangeHash>> {
    let in_memory = match engine.heads(doc) {
        Ok(h) => Some(h),
        Err(Error::NotFound(_)) => None,
        Err(e) => panic!("heads: {e}"),
    };
    let _ = engine.heads(other);
    let reloaded = engine.heads(doc).ok();
    assert_eq!(in_memory, reloaded, "memory and store disagree");
    reloaded
}

/// Every read path, on a small stack, against a rendering of the engine's
/// own history.
fn check_reads(engine: &Engine, doc: &DocId, seen: &[Vec<ChangeHash>], limit: usize) {
    let history = match engine.changes_since(doc, &[]) {
        Ok(h) => h,
        Err(Error::NotFound(_)) => return,
        Err(e) => panic!("history: {e}"),
    };
    let mut rebuilt = Automerge::new();
    let changes: Vec<Change> = history
        .into_iter()
        .map(|b| Change::from_bytes(b).unwrap_or_else(|e| panic!("stored change: {e}")))
        .collect();
    rebuilt
        .apply_changes(changes)
        .unwrap_or_else(|e| panic!("the engine's history does not rebuild: {e}"));
    let expected: Vec<Result<Json, ShapeViolation>> = std::iter::once(None)
        .chain(seen.iter().map(Some))
        .map(|h| render(&rebuilt, h.map(Vec::as_slice), limit))
        .collect();
    if let Ok(value) = render(&rebuilt, None, HYDRATE_DEPTH) {
        assert_eq!(value, to_json(&rebuilt.hydrate(None)), "render and hydrate");
    }
    let read = std::thread::scope(|s| {
        std::thread::Builder::new()
            .stack_size(READ_STACK)
            .spawn_scoped(s, || reads(engine, doc, seen))
            .unwrap_or_else(|e| panic!("spawn a reader: {e}"))
            .join()
            .unwrap_or_else(|_| panic!("a read panicked"))
    });
    assert_eq!(read, expected, "reads disagree with the stored history");
}

/// JSON of the document now and at each of `seen`, as the engine gives it,
/// with the other read paths exercised.
fn reads(
    engine: &Engine,
    doc: &DocId,
    seen: &[Vec<ChangeHash>],
) -> Vec<Result<Json, ShapeViolation>> {
    let verdict = |r: Result<Json, Error>| match r {
        Ok(v) => Ok(v),
        Err(Error::ShapeLimit { violation, .. }) => Err(violation),
        Err(e) => panic!("a read failed: {e}"),
    };
    let mut out = vec![verdict(engine.get_json(doc))];
    for heads in seen {
        out.push(verdict(engine.get_json_at(doc, heads)));
        engine
            .changes_since(doc, heads)
            .unwrap_or_else(|e| panic!("changes since: {e}"));
    }
    engine.info(doc).unwrap_or_else(|e| panic!("info: {e}"));
    engine
        .read(doc, |am| am.get_heads().len())
        .unwrap_or_else(|e| panic!("read: {e}"));
    engine
        .list("fuzz/", None, 10)
        .unwrap_or_else(|e| panic!("list: {e}"));
    engine.held(doc).unwrap_or_else(|e| panic!("held: {e}"));
    out
}

fn json_value(pick: &JsonPick, budget: &mut usize) -> Json {
    *budget = budget.saturating_sub(1);
    match pick {
        JsonPick::Null => Json::Null,
        JsonPick::Int(i) => Json::from(*i),
        JsonPick::Str(s) => Json::from(format!("s{s}")),
        JsonPick::Deep { depth, array } => {
            let mut v = Json::from(1);
            for _ in 0..(depth % MAX_LEVELS) {
                v = if *array {
                    Json::Array(vec![v])
                } else {
                    Json::Object(JsonMap::from_iter([("d".to_string(), v)]))
                };
            }
            v
        }
        JsonPick::Object(fields) => Json::Object(object(fields, budget)),
    }
}

fn object(fields: &[(u8, JsonPick)], budget: &mut usize) -> JsonMap<String, Json> {
    let mut map = JsonMap::new();
    for (k, v) in fields.iter().take(8) {
        if *budget == 0 {
            break;
        }
        map.insert(format!("k{}", k % 6), json_value(v, budget));
    }
    map
}

/// RFC 7386: what `patch` makes of `target`.
fn merge_patched(target: &Json, patch: &Json) -> Json {
    let Json::Object(p) = patch else {
        return patch.clone();
    };
    let mut out = match target {
        Json::Object(t) => t.clone(),
        _ => JsonMap::new(),
    };
    for (k, v) in p {
        if v.is_null() {
            out.remove(k);
        } else {
            let merged = merge_patched(out.get(k).unwrap_or(&Json::Null), v);
            out.insert(k.clone(), merged);
        }
    }
    Json::Object(out)
}

/// Writes JSON; whether the write was accepted.
fn json_write(engine: &Engine, doc: &DocId, write: &Write, limit: usize) -> bool {
    let mut budget = 64;
    let (value, patch) = match write {
        Write::Replace(fields) => (Json::Object(object(fields, &mut budget)), false),
        Write::Patch(fields) => (Json::Object(object(fields, &mut budget)), true),
    };
    let before = engine.get_json(doc).ok();
    let result = if patch {
        engine.merge_json(doc, &value)
    } else {
        engine.put_json(doc, &value)
    };
    match result {
        Ok(_) => {
            let expected = if patch {
                merge_patched(before.as_ref().unwrap_or(&Json::Null), &value)
            } else {
                value
            };
            let after = engine
                .get_json(doc)
                .unwrap_or_else(|e| panic!("read after a JSON write: {e}"));
            assert_eq!(after, expected, "a JSON write does not read back");
            true
        }
        Err(Error::ShapeLimit { violation, .. }) => {
            assert!(
                !matches!(violation, ShapeViolation::Depth { limit: l, .. } if l != limit),
                "refused against another limit"
            );
            assert_eq!(
                engine.get_json(doc).ok(),
                before,
                "a refused write changed it"
            );
            false
        }
        Err(e) => panic!("unexpected error from a JSON write: {e}"),
    }
}
