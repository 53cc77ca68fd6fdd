//! Mapping between JSON values and Automerge documents.
//!
//! **Writing.** A JSON object becomes the document root. Objects become maps,
//! arrays become lists, strings become collaborative `Text` objects, numbers
//! become `Int` (or `Uint` above `i64::MAX`, `F64` when fractional), booleans and
//! `null` become scalars. Writes are minimal: a scalar equal to the stored one is
//! not rewritten, a string written over `Text` is applied as a character diff
//! (so concurrent edits to other parts of the text survive), and nested
//! objects and arrays are updated in place. Writing the same JSON twice
//! therefore produces no change at all. Writes keep the objects still to
//! fill on a heap-allocated stack rather than recursing, so a value as deep
//! as the largest depth limit takes no more thread stack than a flat one.
//!
//! * `replace` makes the document equal to the JSON value (keys absent from
//!   the value are deleted).
//! * `merge_patch` applies RFC 7386 JSON Merge Patch: `null` deletes a key,
//!   objects merge recursively, anything else replaces.
//!
//! **Reading.** Maps become objects, lists arrays, `Text` and string scalars
//! strings, counters and timestamps integers, byte strings arrays of numbers,
//! non-finite floats and values from future Automerge versions `null`.
//! Where concurrent writes conflict, Automerge's deterministic winner is shown.
//! [`render`] reads a document this way without unbounded recursion: it
//! refuses documents that nest deeper than a limit (see
//! [`shape`](crate::shape)).

use automerge::hydrate::Value as Hydrated;
use automerge::transaction::{Transactable, Transaction};
use automerge::{
    Automerge, AutomergeError, ChangeHash, ObjId, ObjType, Prop, ReadDoc, ScalarValue,
    Value as AmValue, ValueRef,
};
use serde_json::{Map as JsonMap, Number, Value as Json};

use crate::shape::ShapeViolation;

/// The document (as it is, or at `heads`) as JSON, descending at most
/// `max_depth` objects below the root: deeper documents are refused with
/// [`ShapeViolation::Depth`] instead of being walked. The walk keeps its
/// own stack of open objects instead of recursing, so reading any document
/// takes the same thread stack. Gives what [`to_json`] gives for
/// Automerge's `hydrate`.
pub fn render(
    doc: &Automerge,
    heads: Option<&[ChangeHash]>,
    max_depth: usize,
) -> Result<Json, ShapeViolation> {
    let reader = Reader { doc, heads };
    let mut open = vec![reader.open(&automerge::ROOT, ObjType::Map, None)];
    loop {
        // Objects the open one holds are at this depth (the root's at 1).
        let depth = open.len();
        let Some(top) = open.last_mut() else {
            unreachable!("the root frame is only taken off at the end");
        };
        match top.entries.next() {
            Some((key, Entry::Value(value))) => top.add(key, value),
            Some((key, Entry::Object(obj, kind))) => {
                if depth > max_depth {
                    return Err(ShapeViolation::Depth {
                        depth,
                        limit: max_depth,
                    });
                }
                let child = reader.open(&obj, kind, key);
                open.push(child);
            }
            None => {
                let Some(done) = open.pop() else {
                    unreachable!("a frame was just looked at");
                };
                match open.last_mut() {
                    Some(parent) => parent.add(done.key, done.out),
                    None => return Ok(done.out),
                }
            }
        }
    }
}

/// What one object of a document holds, read for [`render`].
struct Reader<'a> {
    doc: &'a Automerge,
    heads: Option<&'a [ChangeHash]>,
}

/// A value of an object: already JSON (scalars and text), or an object to
/// walk into.
enum Entry {
    Value(Json),
    Object(ObjId, ObjType),
}

/// An object being rendered: its entries still to add, and its JSON so far.
struct Frame {
    /// Its key in its parent map (`None` in a list, or for the root).
    key: Option<String>,
    entries: std::vec::IntoIter<(Option<String>, Entry)>,
    out: Json,
}

impl Frame {
    fn add(&mut self, key: Option<String>, value: Json) {
        match (&mut self.out, key) {
            (Json::Object(map), Some(key)) => {
                map.insert(key, value);
            }
            (Json::Array(list), _) => list.push(value),
            _ => {}
        }
    }
}

impl Reader<'_> {
    /// Reads the entries of `obj`, of type `kind`; text is read whole.
    fn open(&self, obj: &ObjId, kind: ObjType, key: Option<String>) -> Frame {
        let doc = self.doc;
        let entry = |value: &ValueRef<'_>, id: &dyn Fn() -> ObjId| match value {
            ValueRef::Object(ObjType::Text) => Entry::Value(self.text(&id())),
            ValueRef::Object(kind) => Entry::Object(id(), *kind),
            ValueRef::Scalar(_) => match value.clone().into_value() {
                AmValue::Scalar(s) => Entry::Value(scalar_to_json(&s)),
                AmValue::Object(_) => Entry::Value(Json::Null),
            },
        };
        let (entries, out) = match kind {
            ObjType::Map | ObjType::Table => {
                let range = match self.heads {
                    Some(heads) => doc.map_range_at(obj, .., heads),
                    None => doc.map_range(obj, ..),
                };
                let entries: Vec<_> = range
                    .map(|item| {
                        let value = entry(&item.value, &|| item.id());
                        (Some(item.key.into_owned()), value)
                    })
                    .collect();
                (entries, Json::Object(JsonMap::new()))
            }
            ObjType::List => {
                let range = match self.heads {
                    Some(heads) => doc.list_range_at(obj, .., heads),
                    None => doc.list_range(obj, ..),
                };
                let entries: Vec<_> = range
                    .map(|item| (None, entry(&item.value, &|| item.id())))
                    .collect();
                (entries, Json::Array(Vec::new()))
            }
            ObjType::Text => (Vec::new(), self.text(obj)),
        };
        Frame {
            key,
            entries: entries.into_iter(),
            out,
        }
    }

    fn text(&self, obj: &ObjId) -> Json {
        let text = match self.heads {
            Some(heads) => self.doc.text_at(obj, heads),
            None => self.doc.text(obj),
        };
        // An object whose type was just read is there to read.
        Json::String(text.unwrap_or_default())
    }
}

/// Converts a hydrated Automerge value to JSON.
pub fn to_json(value: &Hydrated) -> Json {
    match value {
        Hydrated::Scalar(s) => scalar_to_json(s),
        Hydrated::Map(map) => Json::Object(
            map.iter()
                .map(|(k, v)| (k.clone(), to_json(&v.value)))
                .collect(),
        ),
        Hydrated::List(list) => Json::Array(list.iter().map(|v| to_json(&v.value)).collect()),
        Hydrated::Text(text) => Json::String(String::from(text)),
    }
}

fn scalar_to_json(s: &ScalarValue) -> Json {
    match s {
        ScalarValue::Bytes(b) => Json::Array(b.iter().map(|x| Json::from(*x)).collect()),
        ScalarValue::Str(s) => Json::String(s.to_string()),
        ScalarValue::Int(i) => Json::from(*i),
        ScalarValue::Uint(u) => Json::from(*u),
        ScalarValue::F64(f) => Number::from_f64(*f).map_or(Json::Null, Json::Number),
        ScalarValue::Counter(c) => Json::from(i64::from(c)),
        ScalarValue::Timestamp(t) => Json::from(*t),
        ScalarValue::Boolean(b) => Json::Bool(*b),
        ScalarValue::Unknown { .. } | ScalarValue::Null => Json::Null,
    }
}

/// Makes the root map equal to `object`.
pub fn replace(
    tx: &mut Transaction<'_>,
    object: &JsonMap<String, Json>,
) -> Result<(), AutomergeError> {
    write_map(tx, &automerge::ROOT, object, Mode::Replace)
}

/// Applies `patch` to the root map as an RFC 7386 merge patch.
pub fn merge_patch(
    tx: &mut Transaction<'_>,
    patch: &JsonMap<String, Json>,
) -> Result<(), AutomergeError> {
    write_map(tx, &automerge::ROOT, patch, Mode::MergePatch)
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Mode {
    Replace,
    MergePatch,
}

/// An object still to be made equal to (or patched with) a JSON value. The
/// writer keeps these on a heap-allocated stack instead of recursing, so the
/// thread's stack use does not grow with the value's depth.
enum Fill<'a> {
    Map {
        obj: ObjId,
        new: &'a JsonMap<String, Json>,
        mode: Mode,
    },
    List {
        obj: ObjId,
        items: &'a [Json],
    },
}

fn write_map(
    tx: &mut Transaction<'_>,
    obj: &ObjId,
    new: &JsonMap<String, Json>,
    mode: Mode,
) -> Result<(), AutomergeError> {
    let mut pending = vec![Fill::Map {
        obj: obj.clone(),
        new,
        mode,
    }];
    while let Some(fill) = pending.pop() {
        match fill {
            Fill::Map { obj, new, mode } => fill_map(tx, obj, new, mode, &mut pending)?,
            Fill::List { obj, items } => fill_list(tx, obj, items, &mut pending)?,
        }
    }
    Ok(())
}

/// Writes one map's keys; nested maps and lists are left in `pending`.
fn fill_map<'a>(
    tx: &mut Transaction<'_>,
    obj: ObjId,
    new: &'a JsonMap<String, Json>,
    mode: Mode,
    pending: &mut Vec<Fill<'a>>,
) -> Result<(), AutomergeError> {
    if mode == Mode::Replace {
        let stale: Vec<String> = tx.keys(&obj).filter(|k| !new.contains_key(k)).collect();
        for key in stale {
            tx.delete(&obj, key)?;
        }
    }
    for (key, value) in new {
        match (mode, value) {
            (Mode::MergePatch, Json::Null) => {
                if tx.get(&obj, key.as_str())?.is_some() {
                    tx.delete(&obj, key.as_str())?;
                }
            }
            (Mode::MergePatch, Json::Object(patch)) => {
                let child = match tx.get(&obj, key.as_str())? {
                    Some((AmValue::Object(ObjType::Map), id)) => id,
                    _ => tx.put_object(&obj, key.as_str(), ObjType::Map)?,
                };
                pending.push(Fill::Map {
                    obj: child,
                    new: patch,
                    mode: Mode::MergePatch,
                });
            }
            _ => put_value(tx, &obj, Prop::Map(key.clone()), value, pending)?,
        }
    }
    Ok(())
}

/// Writes one list's items; nested maps and lists are left in `pending`.
fn fill_list<'a>(
    tx: &mut Transaction<'_>,
    list: ObjId,
    items: &'a [Json],
    pending: &mut Vec<Fill<'a>>,
) -> Result<(), AutomergeError> {
    let old_len = tx.length(&list);
    for (i, item) in items.iter().enumerate() {
        if i < old_len {
            put_value(tx, &list, Prop::Seq(i), item, pending)?;
        } else {
            insert_value(tx, &list, i, item, pending)?;
        }
    }
    for i in (items.len()..old_len).rev() {
        tx.delete(&list, i)?;
    }
    Ok(())
}

/// Writes `value` at `prop` of `obj`, reusing the object already there when its
/// type matches; a map's or list's contents are left in `pending`.
fn put_value<'a>(
    tx: &mut Transaction<'_>,
    obj: &ObjId,
    prop: Prop,
    value: &'a Json,
    pending: &mut Vec<Fill<'a>>,
) -> Result<(), AutomergeError> {
    let existing = tx.get(obj, prop.clone())?;
    let Some(kind) = object_kind(value) else {
        let new = json_scalar(value);
        return match existing {
            Some((AmValue::Scalar(old), _)) if *old == new => Ok(()),
            _ => tx.put(obj, prop, new),
        };
    };
    let child = match existing {
        Some((AmValue::Object(found), id)) if found == kind => id,
        _ => tx.put_object(obj, prop, kind)?,
    };
    fill_object(tx, child, value, pending)
}

fn insert_value<'a>(
    tx: &mut Transaction<'_>,
    list: &ObjId,
    index: usize,
    value: &'a Json,
    pending: &mut Vec<Fill<'a>>,
) -> Result<(), AutomergeError> {
    match object_kind(value) {
        None => tx.insert(list, index, json_scalar(value)),
        Some(kind) => {
            let child = tx.insert_object(list, index, kind)?;
            fill_object(tx, child, value, pending)
        }
    }
}

/// The object type `value` is written as, or `None` for a scalar.
fn object_kind(value: &Json) -> Option<ObjType> {
    match value {
        Json::Object(_) => Some(ObjType::Map),
        Json::Array(_) => Some(ObjType::List),
        Json::String(_) => Some(ObjType::Text),
        _ => None,
    }
}

/// Makes the object `obj` (of `value`'s kind) hold `value`: a text now, a
/// map's or list's contents later through `pending`.
fn fill_object<'a>(
    tx: &mut Transaction<'_>,
    obj: ObjId,
    value: &'a Json,
    pending: &mut Vec<Fill<'a>>,
) -> Result<(), AutomergeError> {
    match value {
        Json::Object(new) => pending.push(Fill::Map {
            obj,
            new,
            mode: Mode::Replace,
        }),
        Json::Array(items) => pending.push(Fill::List { obj, items }),
        Json::String(s) => tx.update_text(&obj, s)?,
        _ => {}
    }
    Ok(())
}

fn json_scalar(value: &Json) -> ScalarValue {
    match value {
        Json::Bool(b) => ScalarValue::Boolean(*b),
        Json::Number(n) => {
            if let Some(i) = n.as_i64() {
                ScalarValue::Int(i)
            } else if let Some(u) = n.as_u64() {
                ScalarValue::Uint(u)
            } else {
                ScalarValue::F64(n.as_f64().unwrap_or(f64::NAN))
            }
        }
        _ => ScalarValue::Null,
    }
}

/// The JSON type name of `value`, for error messages.
pub fn type_name(value: &Json) -> &'static str {
    match value {
        Json::Null => "null",
        Json::Bool(_) => "a boolean",
        Json::Number(_) => "a number",
        Json::String(_) => "a string",
        Json::Array(_) => "an array",
        Json::Object(_) => "an object",
    }
}
