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

/// Which editing trace a benchmark replays, and how much of it.
#[derive(Debug, Clone, clap::Args)]
pub struct TraceArgs {
    /// Editing trace to replay (gzipped JSON).
    #[arg(long, default_value = DEFAULT_TRACE)]
    pub trace: std::path::PathBuf,
    /// Replay only the first N transactions (a smoke run).
    #[arg(long)]
    pub txns: Option<usize>,
}

impl TraceArgs {
    /// The trace, cut to `--txns` with [`Trace::truncate`].
    pub fn load(&self) -> Result<Trace> {
        let mut trace = Trace::load(&self.trace)?;
        if let Some(n) = self.txns {
            trace.truncate(n);
        }
        Ok(trace)
    }
}

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

    /// Keeps the first `n` transactions (at least one); `end_content`
    /// becomes the text after them, replayed on plain characters, so the
    /// benchmarks' final-text checks still hold.
    pub fn truncate(&mut self, n: usize) {
        if n >= self.txns.len() {
            return;
        }
        self.txns.truncate(n.max(1));
        let mut text: Vec<char> = self.start_content.chars().collect();
        for patch in self.txns.iter().flat_map(|t| &t.patches) {
            let end = (patch.0 + patch.1).min(text.len());
            text.splice(patch.0.min(end)..end, patch.2.chars());
        }
        self.end_content = text.into_iter().collect();
    }

    /// Number of single patches in the trace.
    pub fn patch_count(&self) -> usize {
        self.txns.iter().map(|t| t.patches.len()).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn truncating_replays_the_kept_transactions() {
        let patch = |pos, del, ins: &str| Txn {
            patches: vec![Patch(pos, del, ins.into())],
        };
        let mut trace = Trace {
            start_content: "ab".into(),
            end_content: "whole".into(),
            txns: vec![patch(1, 0, "xy"), patch(0, 2, "é"), patch(0, 0, "z")],
        };
        trace.truncate(2);
        assert_eq!(trace.txns.len(), 2);
        assert_eq!(trace.end_content, "éyb");
        trace.truncate(10);
        assert_eq!(trace.end_content, "éyb");
    }
}
