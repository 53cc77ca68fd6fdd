//! `causeway`: the Causeway command-line tool.
//!
//! For now it runs the embedded demo and the engine benchmarks; the node daemon
//! and the client commands arrive with the networking layer.

use std::path::PathBuf;

use anyhow::Result;
use clap::{Parser, Subcommand, ValueEnum};

use causeway_node::bench::{delta_path, durable_writes, ingest, reconcile};
use causeway_node::{demo, sim};

#[derive(Parser)]
#[command(
    name = "causeway",
    version,
    about = "Causeway: multi-datacenter CRDT replication on Automerge and RocksDB"
)]
struct Cli {
    /// Log output format (logs go to stderr).
    #[arg(long, value_enum, default_value_t = LogFormat::Text, global = true)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line, for log collectors.
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Run the embedded demo: an edge app writing offline, reopening its
    /// store, and merging with a second replica.
    Demo {
        /// Store directory to use (default: a fresh temporary directory).
        #[arg(long)]
        dir: Option<PathBuf>,
    },
    /// Run a benchmark (build with --release). Prints one JSON object per
    /// result on stdout and a table on stderr.
    #[command(subcommand)]
    Bench(BenchCommand),
    /// Run the deterministic cluster simulator: replication cores over real
    /// stores, a faulty simulated network, crashes, and convergence checks.
    Sim(sim::Args),
}

#[derive(Subcommand)]
enum BenchCommand {
    /// Replay an editing trace into one document through the engine (Sync and
    /// Buffered durability) and into bare in-memory Automerge.
    Ingest(ingest::Args),
    /// Small durable writes from N concurrent writers, against a raw RocksDB
    /// synced-write loop of the same sizes.
    DurableWrites(durable_writes::Args),
    /// Document-set reconciliation between two nodes of N documents with d
    /// differences: bytes and round trips against the floor.
    Reconcile(reconcile::Args),
    /// Messages and bytes per change delivered to a replica, on a simulated
    /// multi-region cluster, with and without message loss.
    DeltaPath(delta_path::Args),
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    init_logging(cli.log_format);
    match cli.command {
        Command::Demo { dir } => demo::run(dir),
        Command::Sim(args) => sim::run(&args),
        Command::Bench(BenchCommand::Ingest(args)) => ingest::run(&args),
        Command::Bench(BenchCommand::DurableWrites(args)) => durable_writes::run(&args),
        Command::Bench(BenchCommand::Reconcile(args)) => reconcile::run(&args),
        Command::Bench(BenchCommand::DeltaPath(args)) => delta_path::run(&args),
    }
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}
