//! Document shape limits: how deep objects may nest, how many operations and
//! new objects one change may carry, and how large a document may grow.
//!
//! Automerge accepts any shape, but reading a document walks it recursively
//! (`hydrate`, JSON rendering, serialisation, even dropping the result), so a
//! few kilobytes of changes nesting a map 2,000 levels deep overflow a
//! thread's stack on every node that reads the document. The engine therefore
//! checks every change before it is applied or held: its own operation and
//! object counts, and the depth of each object it creates, measured against
//! the objects the document (and the changes applied with it) already holds.
//! A change that breaks a limit is refused with
//! [`Error::ShapeLimit`](crate::Error::ShapeLimit), so it is never stored
//! and never forwarded. Reads are bounded separately (see
//! [`json::render`](crate::json::render)): a document that is already beyond
//! the depth limit (written by an older version, or with a larger limit) is
//! served as an error, not a crash.
//!
//! Depth counts objects from the root: the root map is depth 0, an object
//! in it depth 1. Every object counts, text included.

use std::collections::HashMap;

use automerge::legacy::{ObjectId, OpId, OpType};
use automerge::{ActorId, Automerge, Change, ChangeHash, ReadDoc};

/// Largest [`ShapeLimits::max_depth`] a configuration may set. Reads recurse
/// once per level with a small frame, so this keeps a read well inside the
/// smallest thread stacks an embedding application is likely to use.
pub const MAX_DEPTH_CEILING: usize = 256;

/// The shape a document and its changes must keep. Every change from a
/// client, a peer or a local transaction is checked before it is applied.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ShapeLimits {
    /// Deepest nesting of objects, counted from the root map (depth 0).
    /// At most [`MAX_DEPTH_CEILING`]. Default 64.
    pub max_depth: usize,
    /// Most operations in one change. Default 1,000,000 (writing a string
    /// of a million characters is one change of that many operations).
    pub max_ops_per_change: usize,
    /// Most objects (maps, lists, texts) one change may create. Default
    /// 10,000.
    pub max_objects_per_change: usize,
    /// Largest stored size of one document (its snapshot and change log),
    /// in bytes, after the change applies. Default 128 MiB.
    pub max_document_bytes: u64,
}

impl Default for ShapeLimits {
    fn default() -> Self {
        ShapeLimits {
            max_depth: 64,
            max_ops_per_change: 1_000_000,
            max_objects_per_change: 10_000,
            max_document_bytes: 128 << 20,
        }
    }
}

/// Which shape limit a change or a document breaks, and by how much.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ShapeViolation {
    /// An object would nest deeper than [`ShapeLimits::max_depth`].
    #[error("objects nest {depth} deep; the limit is {limit}")]
    Depth {
        /// The depth reached (for a read: the first depth found too deep).
        depth: usize,
        /// The configured limit.
        limit: usize,
    },
    /// A change carries more operations than
    /// [`ShapeLimits::max_ops_per_change`].
    #[error("a change carries {ops} operations; the limit is {limit}")]
    Ops {
        /// Operations in the change.
        ops: usize,
        /// The configured limit.
        limit: usize,
    },
    /// A change creates more objects than
    /// [`ShapeLimits::max_objects_per_change`].
    #[error("a change creates {objects} objects; the limit is {limit}")]
    Objects {
        /// Objects the change creates.
        objects: usize,
        /// The configured limit.
        limit: usize,
    },
    /// The document would be stored in more bytes than
    /// [`ShapeLimits::max_document_bytes`].
    #[error("the document would be stored in {bytes} bytes; the limit is {limit}")]
    DocumentBytes {
        /// Stored bytes after the change.
        bytes: u64,
        /// The configured limit.
        limit: u64,
    },
}

impl ShapeViolation {
    /// A stable name for the limit, for error codes and metrics.
    pub fn name(&self) -> &'static str {
        match self {
            ShapeViolation::Depth { .. } => "max_depth",
            ShapeViolation::Ops { .. } => "max_ops_per_change",
            ShapeViolation::Objects { .. } => "max_objects_per_change",
            ShapeViolation::DocumentBytes { .. } => "max_document_bytes",
        }
    }
}

/// Checks `changes`, in causal order, about to be added to `doc`, whose
/// stored size is `stored_bytes`. Returns the changes that break a limit
/// themselves (not those that only depend on one), with the first limit each
/// breaks. Objects created by earlier changes of the list count as parents
/// of later ones.
pub(crate) fn violations<'a>(
    doc: &Automerge,
    stored_bytes: u64,
    changes: impl IntoIterator<Item = &'a Change>,
    limits: &ShapeLimits,
) -> Vec<(ChangeHash, ShapeViolation)> {
    let mut depths = Depths::new(doc);
    let mut bytes = stored_bytes;
    let mut found = Vec::new();
    for change in changes {
        bytes += change.raw_bytes().len() as u64;
        let verdict = if bytes > limits.max_document_bytes {
            Err(ShapeViolation::DocumentBytes {
                bytes,
                limit: limits.max_document_bytes,
            })
        } else {
            depths.check(change, limits)
        };
        if let Err(v) = verdict {
            found.push((change.hash(), v));
        }
    }
    found
}

/// Depths of objects: those created by the changes checked so far, and
/// (looked up on demand) those of the document.
struct Depths<'a> {
    doc: &'a Automerge,
    created: HashMap<(u64, ActorId), usize>,
}

impl<'a> Depths<'a> {
    fn new(doc: &'a Automerge) -> Self {
        Depths {
            doc,
            created: HashMap::new(),
        }
    }

    /// Checks one change's counts and the depth of every object it creates,
    /// and remembers those depths for the changes that follow.
    fn check(&mut self, change: &Change, limits: &ShapeLimits) -> Result<(), ShapeViolation> {
        if change.len() > limits.max_ops_per_change {
            return Err(ShapeViolation::Ops {
                ops: change.len(),
                limit: limits.max_ops_per_change,
            });
        }
        let expanded = change.decode();
        let start = expanded.start_op.get();
        let mut objects = 0usize;
        let mut deepest = 0usize;
        for (index, op) in expanded.operations.iter().enumerate() {
            if !matches!(op.action, OpType::Make(_)) {
                continue;
            }
            objects += 1;
            let depth = self.depth_of(&op.obj) + 1;
            deepest = deepest.max(depth);
            let id = (start + index as u64, expanded.actor_id.clone());
            self.created.insert(id, depth);
        }
        if objects > limits.max_objects_per_change {
            return Err(ShapeViolation::Objects {
                objects,
                limit: limits.max_objects_per_change,
            });
        }
        if deepest > limits.max_depth {
            return Err(ShapeViolation::Depth {
                depth: deepest,
                limit: limits.max_depth,
            });
        }
        Ok(())
    }

    /// The depth of an existing object. An object neither created by a
    /// checked change nor found in the document counts as a child of the
    /// root: Automerge refuses a change whose operations name an object it
    /// does not hold, so nothing nests under it.
    fn depth_of(&self, obj: &ObjectId) -> usize {
        let ObjectId::Id(OpId(counter, actor)) = obj else {
            return 0;
        };
        if let Some(depth) = self.created.get(&(*counter, actor.clone())) {
            return *depth;
        }
        // Automerge's parent walk unwraps internally; it only reads.
        let walk = || {
            self.doc
                .import_obj(&format!("{counter}@{actor}"))
                .ok()
                .and_then(|exid| self.doc.parents(&exid).ok())
                .map(|parents| parents.count())
        };
        crate::guarded::catch(walk).ok().flatten().unwrap_or(1)
    }
}

/// How deep `value` nests once written as a document (see
/// [`json`](crate::json)): the top-level object is the root (depth 0), and
/// each object, array or string (a text object) one level deeper than the
/// value holding it. Walks without recursion, so any value can be measured.
pub(crate) fn json_depth(value: &serde_json::Value) -> usize {
    use serde_json::Value as Json;
    let mut deepest = 0;
    let mut stack = vec![(value, 0usize)];
    while let Some((value, depth)) = stack.pop() {
        match value {
            Json::Object(map) => stack.extend(map.values().map(|v| (v, depth + 1))),
            Json::Array(items) => stack.extend(items.iter().map(|v| (v, depth + 1))),
            Json::String(_) => {}
            _ => continue,
        }
        deepest = deepest.max(depth);
    }
    deepest
}
