//! Mapping between JSON values and Automerge documents.
//!
//! **Writing.** A JSON object becomes the document root. Objects become maps,
//! arrays become lists, strings become collaborative `Text` objects, numbers
//! become `Int` (or `Uint` above `i64::MAX`, `F64` when fractional), booleans and
//! `null` become scalars. Writes are minimal: a scalar equal to the stored one is
//! not rewritten, a string written over `Text` is applied as a character diff
//! (so concurrent edits to other parts of the text survive), and nested
//! objects and arrays are updated in place. Writing the same JSON twice
//! therefore produces no change at all.
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

use automerge::hydrate::Value as Hydrated;
use automerge::transaction::{Transactable, Transaction};
use automerge::{AutomergeError, ObjId, ObjType, Prop, ReadDoc, ScalarValue, Value as AmValue};
use serde_json::{Map as JsonMap, Number, Value as Json};

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

fn write_map(
    tx: &mut Transaction<'_>,
    obj: &ObjId,
    new: &JsonMap<String, Json>,
    mode: Mode,
) -> Result<(), AutomergeError> {
    if mode == Mode::Replace {
        let stale: Vec<String> = tx.keys(obj).filter(|k| !new.contains_key(k)).collect();
        for key in stale {
            tx.delete(obj, key)?;
        }
    }
    for (key, value) in new {
        match (mode, value) {
            (Mode::MergePatch, Json::Null) => {
                if tx.get(obj, key.as_str())?.is_some() {
                    tx.delete(obj, key.as_str())?;
                }
            }
            (Mode::MergePatch, Json::Object(patch)) => {
                let child = match tx.get(obj, key.as_str())? {
                    Some((AmValue::Object(ObjType::Map), id)) => id,
                    _ => tx.put_object(obj, key.as_str(), ObjType::Map)?,
                };
                write_map(tx, &child, patch, Mode::MergePatch)?;
            }
            _ => put_value(tx, obj, Prop::Map(key.clone()), value)?,
        }
    }
    Ok(())
}

/// Writes `value` at `prop` of `obj`, reusing the object already there when its
/// type matches.
fn put_value(
    tx: &mut Transaction<'_>,
    obj: &ObjId,
    prop: Prop,
    value: &Json,
) -> Result<(), AutomergeError> {
    let existing = tx.get(obj, prop.clone())?;
    match value {
        Json::Object(map) => {
            let child = match existing {
                Some((AmValue::Object(ObjType::Map), id)) => id,
                _ => tx.put_object(obj, prop, ObjType::Map)?,
            };
            write_map(tx, &child, map, Mode::Replace)
        }
        Json::Array(items) => {
            let child = match existing {
                Some((AmValue::Object(ObjType::List), id)) => id,
                _ => tx.put_object(obj, prop, ObjType::List)?,
            };
            write_list(tx, &child, items)
        }
        Json::String(s) => {
            let child = match existing {
                Some((AmValue::Object(ObjType::Text), id)) => id,
                _ => tx.put_object(obj, prop, ObjType::Text)?,
            };
            tx.update_text(&child, s)
        }
        scalar => {
            let new = json_scalar(scalar);
            match existing {
                Some((AmValue::Scalar(old), _)) if *old == new => Ok(()),
                _ => tx.put(obj, prop, new),
            }
        }
    }
}

fn write_list(
    tx: &mut Transaction<'_>,
    list: &ObjId,
    items: &[Json],
) -> Result<(), AutomergeError> {
    let old_len = tx.length(list);
    for (i, item) in items.iter().enumerate() {
        if i < old_len {
            put_value(tx, list, Prop::Seq(i), item)?;
        } else {
            insert_value(tx, list, i, item)?;
        }
    }
    for i in (items.len()..old_len).rev() {
        tx.delete(list, i)?;
    }
    Ok(())
}

fn insert_value(
    tx: &mut Transaction<'_>,
    list: &ObjId,
    index: usize,
    value: &Json,
) -> Result<(), AutomergeError> {
    let kind = match value {
        Json::Object(_) => ObjType::Map,
        Json::Array(_) => ObjType::List,
        Json::String(_) => ObjType::Text,
        scalar => return tx.insert(list, index, json_scalar(scalar)),
    };
    tx.insert_object(list, index, kind)?;
    put_value(tx, list, Prop::Seq(index), value)
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
