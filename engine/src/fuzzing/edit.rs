//! Document edits the harnesses draw from their input: map puts and deletes,
//! nested objects, list inserts and deletes, text splices (also with
//! multi-byte characters) and counter increments, on a handful of root keys
//! so that edits on different replicas collide.

use arbitrary::Arbitrary;
use automerge::transaction::Transactable;
use automerge::{AutomergeError, ObjId, ObjType, ScalarValue, Value, ROOT};

/// Root keys edits use: few, so that concurrent edits hit the same keys.
const KEYS: [&str; 5] = ["a", "b", "c", "list", "text"];

/// Characters text splices draw from (ASCII, two-, three- and four-byte).
const CHARS: [char; 8] = ['x', 'y', ' ', '\n', 'é', 'ß', '€', '🦀'];

/// A scalar value to store.
#[derive(Arbitrary, Debug, Clone)]
pub enum Scalar {
    /// A signed integer.
    Int(i64),
    /// A short string.
    Str(u8),
    /// A boolean.
    Bool(bool),
    /// JSON null.
    Null,
}

/// One edit, applied inside a transaction.
#[derive(Arbitrary, Debug, Clone)]
pub enum Edit {
    /// Sets a root key to a scalar.
    Put {
        /// Which root key.
        key: u8,
        /// The value.
        value: Scalar,
    },
    /// Deletes a root key, if present.
    Delete {
        /// Which root key.
        key: u8,
    },
    /// Replaces a root key with a new empty list, text or map.
    Make {
        /// Which root key.
        key: u8,
        /// 0: list, 1: text, otherwise a map.
        kind: u8,
    },
    /// Inserts into the list at a root key (made first if it is not a list).
    Insert {
        /// Which root key.
        key: u8,
        /// Position, modulo the length plus one.
        at: u16,
        /// The value.
        value: Scalar,
    },
    /// Removes an element of the list or text at a root key, if any.
    Remove {
        /// Which root key.
        key: u8,
        /// Position, modulo the length.
        at: u16,
    },
    /// Splices into the text at a root key (made first if it is not text).
    Splice {
        /// Which root key.
        key: u8,
        /// Position, modulo the length plus one.
        at: u16,
        /// Characters to delete from there (capped at what is there).
        delete: u8,
        /// Characters to insert, each picked from a small set.
        insert: Vec<u8>,
    },
    /// Increments the counter at a root key (made first if it is not one).
    Increment {
        /// Which root key.
        key: u8,
        /// By how much.
        by: i16,
    },
    /// Sets a key inside the map at a root key (made first if needed).
    Nested {
        /// Which root key.
        key: u8,
        /// Which key inside.
        inner: u8,
        /// The value.
        value: Scalar,
    },
}

impl Edit {
    /// Applies the edit to `tx`.
    pub fn apply(&self, tx: &mut impl Transactable) -> Result<(), AutomergeError> {
        match self {
            Edit::Put { key, value } => tx.put(ROOT, key_name(*key), value.to_scalar()),
            Edit::Delete { key } => {
                if tx.get(ROOT, key_name(*key))?.is_some() {
                    tx.delete(ROOT, key_name(*key))?;
                }
                Ok(())
            }
            Edit::Make { key, kind } => {
                let kind = match kind % 3 {
                    0 => ObjType::List,
                    1 => ObjType::Text,
                    _ => ObjType::Map,
                };
                tx.put_object(ROOT, key_name(*key), kind).map(drop)
            }
            Edit::Insert { key, at, value } => {
                let list = object(tx, *key, ObjType::List)?;
                let at = usize::from(*at) % (tx.length(&list) + 1);
                tx.insert(&list, at, value.to_scalar())
            }
            Edit::Remove { key, at } => {
                let Some((Value::Object(ObjType::List | ObjType::Text), obj)) =
                    tx.get(ROOT, key_name(*key))?
                else {
                    return Ok(());
                };
                let len = tx.length(&obj);
                if len > 0 {
                    tx.delete(&obj, usize::from(*at) % len)?;
                }
                Ok(())
            }
            Edit::Splice {
                key,
                at,
                delete,
                insert,
            } => {
                let text = object(tx, *key, ObjType::Text)?;
                let len = tx.length(&text);
                let at = usize::from(*at) % (len + 1);
                let delete = isize::from(*delete).min((len - at) as isize);
                let insert: String = insert
                    .iter()
                    .take(16)
                    .map(|c| CHARS[usize::from(*c) % CHARS.len()])
                    .collect();
                tx.splice_text(&text, at, delete, &insert)
            }
            Edit::Increment { key, by } => {
                let name = key_name(*key);
                match tx.get(ROOT, name)? {
                    Some((Value::Scalar(s), _)) if matches!(*s, ScalarValue::Counter(_)) => {
                        tx.increment(ROOT, name, i64::from(*by))
                    }
                    _ => tx.put(ROOT, name, ScalarValue::counter(i64::from(*by))),
                }
            }
            Edit::Nested { key, inner, value } => {
                let map = object(tx, *key, ObjType::Map)?;
                tx.put(&map, key_name(*inner), value.to_scalar())
            }
        }
    }
}

impl Scalar {
    fn to_scalar(&self) -> ScalarValue {
        match self {
            Scalar::Int(i) => ScalarValue::Int(*i),
            Scalar::Str(s) => ScalarValue::Str(format!("s{s}").into()),
            Scalar::Bool(b) => ScalarValue::Boolean(*b),
            Scalar::Null => ScalarValue::Null,
        }
    }
}

fn key_name(key: u8) -> &'static str {
    KEYS[usize::from(key) % KEYS.len()]
}

/// The object of type `kind` at a root key, replacing whatever is there.
fn object(tx: &mut impl Transactable, key: u8, kind: ObjType) -> Result<ObjId, AutomergeError> {
    match tx.get(ROOT, key_name(key))? {
        Some((Value::Object(t), id)) if t == kind => Ok(id),
        _ => tx.put_object(ROOT, key_name(key), kind),
    }
}
