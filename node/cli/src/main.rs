//! `causeway`: the Causeway command-line tool: the node daemon, a client of
//! a node's HTTP API, the multi-region demo, benchmarks and the simulator.

use std::path::PathBuf;

use anyhow::Result;
use clap::{Parser, Subcommand, ValueEnum};

use causeway_lab::bench::{
    all, backup as backup_bench, concurrent_editors, delta_path, durable_writes, gc, ingest, join,
    lag, many_docs_sync, memory, open, reconcile, replicate_trace, repo_clients, scale,
    steady_state,
};
use causeway_lab::chaos;
use causeway_node::access::{self, command::TokenCommand};
use causeway_node::client::{self, DocCommand, Target};
use causeway_node::cluster_key::ClusterKey;
use causeway_node::{backup, daemon, demo, sim};

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

/// `causeway cluster ...`.
#[derive(Subcommand)]
enum ClusterCommand {
    /// Create a cluster key: a new random secret in FILE (mode 0600; an
    /// existing file is never replaced). Every node of the cluster reads
    /// the same key through cluster_key_file; nodes without it cannot
    /// connect.
    Init {
        /// Where to write the key.
        #[arg(long)]
        out: PathBuf,
    },
}

/// `causeway node ...` on a running node.
#[derive(Subcommand)]
enum NodeAction {
    /// Drain a running node before decommissioning it: it stops taking
    /// writes (503 `draining`), hands everything it holds to a peer
    /// (confirmed by a reconciliation with that peer and the syncs it
    /// found), and exits. Waits for that (up to 10 minutes; the drain goes
    /// on) and prints the drain's status.
    Drain {
        #[command(flatten)]
        target: Target,
    },
}

#[derive(Subcommand)]
enum Command {
    /// Run a node: the store, the libp2p networking layer and the HTTP API.
    /// Settings come from --config (TOML), CAUSEWAY_* variables and flags
    /// (flags win). Stops gracefully on SIGTERM or SIGINT. `causeway node
    /// drain` drains a running node instead.
    #[command(args_conflicts_with_subcommands = true)]
    Node {
        #[command(subcommand)]
        action: Option<NodeAction>,
        #[command(flatten)]
        args: daemon::Args,
    },
    /// Print this node's peer id, creating its identity (DATA_DIR/node.key,
    /// mode 0600) if there is none yet. Use it to build allowlists before
    /// the first start.
    Identity {
        /// Data directory of the node.
        #[arg(long, env = "CAUSEWAY_DATA_DIR")]
        data_dir: PathBuf,
    },
    /// Manage the cluster's shared secret.
    #[command(subcommand)]
    Cluster(ClusterCommand),
    /// Issue, list and revoke the bearer tokens of a node's HTTP API (its
    /// tokens file; a running node reads it again within a second).
    #[command(subcommand)]
    Token(TokenCommand),
    /// Read, write, list and watch documents through a node's HTTP API.
    Doc {
        #[command(flatten)]
        target: Target,
        #[command(subcommand)]
        command: DocCommand,
    },
    /// Print a node's cluster status: peers, regions, connection state and
    /// how far behind each peer is.
    Status {
        #[command(flatten)]
        target: Target,
    },
    /// Take a backup of a node into a new directory: through its HTTP API
    /// while it runs (--url; needs an admin:* token if the node has tokens),
    /// or from its data directory while it is stopped (--data-dir; the
    /// node's identity, node.key, is included). The copy is verified
    /// before its manifest is written. Prints a JSON summary.
    Backup {
        /// The new backup directory (missing or empty).
        #[arg(long)]
        to: PathBuf,
        /// The running node's HTTP API.
        #[arg(
            long,
            required_unless_present = "data_dir",
            conflicts_with = "data_dir"
        )]
        url: Option<String>,
        /// A stopped node's data directory.
        #[arg(long)]
        data_dir: Option<PathBuf>,
        /// Bearer token, if the node requires one (admin:*).
        #[arg(long, env = "CAUSEWAY_TOKEN", hide_env_values = true)]
        token: Option<String>,
        /// PEM certificates to trust for an https:// URL.
        #[arg(long, env = "CAUSEWAY_CA_CERT")]
        ca_cert: Option<PathBuf>,
    },
    /// Restore a backup into a node's data directory, which must hold no
    /// store: checks every file against the manifest and every document,
    /// copies the store and gives it a new store id (a new incarnation:
    /// peers stop trusting what the node reported before, and
    /// reconciliation brings back what the cluster holds). Then start the
    /// node. Prints a JSON summary.
    Restore {
        /// The backup directory.
        #[arg(long)]
        from: PathBuf,
        /// The node's data directory.
        #[arg(long)]
        data_dir: PathBuf,
    },
    /// Run three nodes in three regions on loopback, cut one region off,
    /// keep writing on both sides, heal, and show convergence.
    Demo {
        /// Directory for the stores (default: a fresh temporary directory).
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
    /// Fault injection against real nodes in network namespaces (one per
    /// region; needs root): partitions, one-way and random packet loss
    /// (nftables), SIGSTOP and SIGKILL, while clients write; then heal,
    /// wait for convergence and count acknowledged writes lost. Prints a
    /// JSON report on stdout and a table on stderr.
    Chaos(chaos::Args),
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
    /// Time from a write on node A to its visibility on nodes B and C of a
    /// three-region loopback cluster, next to loopback RTT plus fsync.
    Lag(lag::Args),
    /// How changes spread through 300 simulated nodes in 19 WAN regions:
    /// copies into each region, receptions and bytes per replica, delay to
    /// the last replica against the direct path, simulator speed.
    Scale(scale::Args),
    /// Idle memory of a `causeway node` process, and the time for a new
    /// node to receive N existing documents.
    Join(join::Args),
    /// An editing trace written on node A of a three-region loopback
    /// cluster: time until B and C hold the final heads, next to A's ingest.
    ReplicateTrace(replicate_trace::Args),
    /// A new peer joins one holding N small documents: time and bytes until
    /// it holds them all, for Causeway, automerge-repo and samod.
    ManyDocsSync(many_docs_sync::Args),
    /// automerge-repo clients against a three-region cluster and against
    /// automerge-repo's own sync server: find() latency, and a new client
    /// fetching N documents.
    #[command(name = "automerge-repo")]
    AutomergeRepo(repo_clients::Args),
    /// Clients writing at a fixed rate on every node of a three-region
    /// cluster: propagation lag, CPU, peak memory, bytes per change.
    SteadyState(steady_state::Args),
    /// Writers editing one text in their own Automerge documents, posting
    /// every change to the node of their region: changes held for their
    /// dependencies, refused at the limit and retried, none lost.
    ConcurrentEditors(concurrent_editors::Args),
    /// A node with a million small documents stored and a thousand being
    /// written: resident memory, open time, cache budget.
    Memory(memory::Args),
    /// Taking and restoring a backup of N documents against `cp -r` of the
    /// stopped store, and a restored node catching up.
    Backup(backup_bench::Args),
    /// A store of N deleted documents before and after garbage collection,
    /// against the store before the deletes.
    Gc(gc::Args),
    /// Opening a store of N documents as a node does (engine, item set),
    /// against a raw RocksDB scan of the same records.
    Open(open::Args),
    /// Every scenario in turn; writes a markdown summary.
    All(all::Args),
}

fn main() -> std::process::ExitCode {
    client::install_crypto_provider();
    let cli = Cli::parse();
    let default_level = match cli.command {
        Command::Node { action: None, .. } => "info,yamux=error",
        _ => "warn,yamux=error",
    };
    init_logging(cli.log_format, default_level);
    match run(cli.command) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run(command: Command) -> Result<()> {
    match command {
        Command::Node {
            action: Some(NodeAction::Drain { target }),
            ..
        } => runtime()?.block_on(client::drain(&target)),
        Command::Node { action: None, args } => {
            let settings = args.settings()?;
            runtime()?.block_on(daemon::run(settings))
        }
        Command::Identity { data_dir } => {
            let (key, _) = causeway_node::identity::load_or_create(&data_dir)?;
            println!("{}", key.public().to_peer_id());
            Ok(())
        }
        Command::Cluster(ClusterCommand::Init { out }) => {
            let key = ClusterKey::generate()?;
            key.create(&out)?;
            println!(
                "created cluster key {} (fingerprint {}); copy it to every node (mode 0600) and set cluster_key_file",
                out.display(),
                key.fingerprint()
            );
            Ok(())
        }
        Command::Token(command) => access::command::run(&command),
        Command::Doc { target, command } => runtime()?.block_on(client::doc(&target, command)),
        Command::Status { target } => runtime()?.block_on(client::status(&target)),
        Command::Backup {
            to,
            url,
            data_dir,
            token,
            ca_cert,
        } => {
            let summary = match (url, data_dir) {
                (Some(url), _) => {
                    let client = client::http_client(ca_cert.as_deref())?;
                    runtime()?.block_on(backup::take_from_node(
                        &client,
                        &url,
                        token.as_deref(),
                        &to,
                    ))?
                }
                (None, Some(dir)) => backup::take_from_data_dir(&dir, &to)?,
                (None, None) => anyhow::bail!("give --url or --data-dir"),
            };
            println!("{}", serde_json::to_string(&summary)?);
            Ok(())
        }
        Command::Restore { from, data_dir } => {
            let summary = backup::restore(&from, &data_dir)?;
            println!("{}", serde_json::to_string(&summary)?);
            Ok(())
        }
        Command::Demo { dir } => runtime()?.block_on(demo::run(dir)),
        Command::Sim(args) => sim::run(&args),
        Command::Chaos(args) => runtime()?.block_on(chaos::run(&args)),
        Command::Bench(BenchCommand::Ingest(args)) => ingest::run(&args),
        Command::Bench(BenchCommand::DurableWrites(args)) => durable_writes::run(&args),
        Command::Bench(BenchCommand::Reconcile(args)) => reconcile::run(&args),
        Command::Bench(BenchCommand::DeltaPath(args)) => delta_path::run(&args),
        Command::Bench(BenchCommand::Lag(args)) => runtime()?.block_on(lag::run(&args)),
        Command::Bench(BenchCommand::Scale(args)) => scale::run(&args),
        Command::Bench(BenchCommand::Join(args)) => runtime()?.block_on(join::run(&args)),
        Command::Bench(BenchCommand::ReplicateTrace(args)) => {
            runtime()?.block_on(replicate_trace::run(&args))
        }
        Command::Bench(BenchCommand::ManyDocsSync(args)) => {
            runtime()?.block_on(many_docs_sync::run(&args))
        }
        Command::Bench(BenchCommand::AutomergeRepo(args)) => {
            runtime()?.block_on(repo_clients::run(&args))
        }
        Command::Bench(BenchCommand::SteadyState(args)) => {
            runtime()?.block_on(steady_state::run(&args))
        }
        Command::Bench(BenchCommand::Memory(args)) => runtime()?.block_on(memory::run(&args)),
        Command::Bench(BenchCommand::ConcurrentEditors(args)) => {
            runtime()?.block_on(concurrent_editors::run(&args))
        }
        Command::Bench(BenchCommand::Backup(args)) => runtime()?.block_on(backup_bench::run(&args)),
        Command::Bench(BenchCommand::Gc(args)) => runtime()?.block_on(gc::run(&args)),
        Command::Bench(BenchCommand::Open(args)) => runtime()?.block_on(open::run(&args)),
        Command::Bench(BenchCommand::All(args)) => all::run(&args),
    }
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?)
}

fn init_logging(format: LogFormat, default: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}
