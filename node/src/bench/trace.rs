//! Editing traces: real character-by-character editing histories
//! (`../shared/data/editing-traces/`), gzipped JSON of the form
//! `{startContent, endContent, txns: [{patches: [[pos, deleted, inserted]]}]}`,
//! positions in Unicode code points.

use std::io::Read;
use std::path::Path;

use anyhow::{bail, Context, Result};
use serde::Deserialize;

/// Default trace, relative to the repository root.
pub const DEFAULT_TRACE: &str = "../shared/data/editing-traces/automerge-paper.json.gz";

/// One edit: at `pos`, delete `deleted` code points, then insert `inserted`.
#[derive(Debug, Clone, Deserialize)]
pub struct Patch(pub usize, pub usize, pub String);

/// One transaction of the trace.
#[derive(Debug, Clone, Deserialize)]
pub struct Txn {
    /// The edits of this transaction, applied in order.
    pub patches: Vec<Patch>,
}

/// A whole trace.
#[derive(Debug, Clone, Deserialize)]
pub struct Trace {
    /// Text before the first transaction.
    #[serde(rename = "startContent")]
    pub start_content: String,
    /// Text after the last transaction.
    #[serde(rename = "endContent")]
    pub end_content: String,
    /// The transactions.
    pub txns: Vec<Txn>,
}

impl Trace {
    /// Loads a gzipped JSON trace.
    pub fn load(path: &Path) -> Result<Trace> {
        let file = std::fs::File::open(path)
            .with_context(|| format!("cannot open trace {}", path.display()))?;
        let mut json = String::new();
        flate2::read::GzDecoder::new(file)
            .read_to_string(&mut json)
            .with_context(|| format!("{} is not a gzipped text file", path.display()))?;
        let trace: Trace = serde_json::from_str(&json)
            .with_context(|| format!("{} is not an editing trace", path.display()))?;
        if trace.txns.is_empty() {
            bail!("trace {} has no transactions", path.display());
        }
        Ok(trace)
    }

    /// Number of single patches in the trace.
    pub fn patch_count(&self) -> usize {
        self.txns.iter().map(|t| t.patches.len()).sum()
    }
}
