//! Benchmarks: each measures Causeway against a reference run in the same
//! process, and prints one JSON object per result on stdout and a table on
//! stderr. Build with `--release`; figures from debug builds are meaningless.

pub mod all;
pub mod backup;
pub mod concurrent_editors;
pub mod delta_path;
pub mod durable_writes;
pub mod gc;
pub mod gossip_path;
pub mod ingest;
pub mod join;
pub mod lag;
pub mod many_docs_sync;
pub mod memory;
pub mod node_process;
pub mod open;
pub mod peers;
pub mod proxy;
pub mod reconcile;
pub mod replicate_trace;
pub mod repo_clients;
pub mod scale;
pub mod steady_state;
pub mod summary;
pub mod trace;

use serde_json::Value;

/// The simulated runs of a simulator benchmark: one per loss rate, all from
/// one seed.
#[derive(Debug, clap::Args)]
pub struct SimRuns {
    /// Loss rates to measure, in parts per thousand, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "0,10,50")]
    pub loss_permille: Vec<u32>,
    /// Seed of the runs.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
}

/// Collects results, printing each as a JSON line on stdout as it arrives.
#[derive(Default)]
pub struct Report {
    rows: Vec<Vec<String>>,
}

impl Report {
    /// Prints `result` as one JSON line on stdout and keeps `row` for the table.
    pub fn record(&mut self, result: Value, row: Vec<String>) {
        println!("{result}");
        self.rows.push(row);
    }

    /// Prints the table of recorded rows on stderr under `header`.
    pub fn print_table(&self, header: &[&str]) {
        let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
        for row in &self.rows {
            for (w, cell) in widths.iter_mut().zip(row) {
                *w = (*w).max(cell.len());
            }
        }
        let line = |cells: Vec<String>| {
            let padded: Vec<String> = cells
                .iter()
                .zip(&widths)
                .map(|(c, w)| format!("{c:<w$}"))
                .collect();
            eprintln!("| {} |", padded.join(" | "));
        };
        line(header.iter().map(|h| h.to_string()).collect());
        line(widths.iter().map(|w| "-".repeat(*w)).collect());
        for row in &self.rows {
            line(row.clone());
        }
    }
}

/// Release or debug, for the results.
pub fn build_profile() -> &'static str {
    if cfg!(debug_assertions) {
        "debug"
    } else {
        "release"
    }
}
