//! `causeway chaos`: Jepsen-style fault injection against real `causeway
//! node` processes on a real, namespaced network, with a checker that
//! counts acknowledged writes lost.
//!
//! One network namespace per region ([`topology`]), each running a node
//! with its own RocksDB directory ([`process`]); clients in every region
//! write unique keys through the HTTP API ([`workload`]); a seeded
//! [`schedule`] partitions regions, drops packets one way or at random
//! (nftables), pauses nodes with SIGSTOP and kills them with SIGKILL. After
//! the last fault everything is healed and the [`checker`] waits until every
//! node holds the same documents, then checks every write. The
//! [`report`] is JSON on stdout (and `--report FILE`) and a table on stderr;
//! the exit status is non-zero unless the run passed. Needs root.

pub mod byzantine;
pub mod checker;
pub mod process;
pub mod report;
pub mod schedule;
pub mod topology;
pub mod workload;

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use self::process::{ports, NodeProcess};
use self::report::{ByzantineReport, Injected, Latency, Report};
use self::schedule::{Fault, FaultKind, ScheduleConfig};
use self::topology::{node_addr, NetState, Topology};
use self::workload::WorkloadConfig;
use causeway_engine::replication::ids::ClusterId;
use causeway_node::cluster_key::ClusterKey;

/// How long traffic between regions is counted before the first write.
const IDLE_MEASURE: Duration = Duration::from_secs(2);

/// Region names, in order.
const REGION_NAMES: [&str; 5] = ["eu", "us", "ap", "sa", "af"];

/// Arguments of `causeway chaos`.
#[derive(clap::Args, Debug, Clone)]
pub struct Args {
    /// Seed of the fault schedule.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Length of the fault phase, seconds.
    #[arg(long, default_value_t = 600)]
    pub duration: u64,
    /// Regions (3 to 5), each its own network namespace.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u64).range(3..=5))]
    pub regions: u64,
    /// Nodes in each region (1 to 3); a region's nodes share its
    /// namespace and address, on consecutive ports. Writers take turns
    /// over them; a pause or kill hits one of them.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..=3))]
    pub nodes_per_region: u64,
    /// How the nodes' writes reach their peers (`network.dissemination`):
    /// `gossip` or `regions`.
    #[arg(long, default_value = "gossip", value_parser = ["gossip", "regions"])]
    pub dissemination: String,
    /// Peers each anti-entropy round reconciles with
    /// (`network.reconcile_fanout`): `LOCAL,REMOTE` or `all`.
    #[arg(long, default_value = "all")]
    pub reconcile_fanout: String,
    /// The nodes' shortest wait before resending an unacknowledged push
    /// (`network.min_push_retry_ms`; default: the node's).
    #[arg(long)]
    pub min_push_retry_ms: Option<u64>,
    /// Longest fault, seconds; each lasts between half of this and this.
    #[arg(long, default_value_t = 15)]
    pub max_fault_secs: u64,
    /// No faults: the workload alone, a baseline for the traffic figures
    /// (the run still checks that nothing was lost).
    #[arg(long)]
    pub no_faults: bool,
    /// Writers per region.
    #[arg(long, default_value_t = 2)]
    pub writers: usize,
    /// Writes per second per writer.
    #[arg(long, default_value_t = 10.0)]
    pub rate: f64,
    /// Documents the writes are spread over.
    #[arg(long, default_value_t = 16)]
    pub docs: usize,
    /// A write unanswered after this many milliseconds counts as unknown.
    #[arg(long, default_value_t = 5000)]
    pub write_timeout_ms: u64,
    /// How long the nodes may take to converge after the final heal,
    /// seconds.
    #[arg(long, default_value_t = 120)]
    pub converge_timeout: u64,
    /// Directory for the nodes' data and logs (default: a new temporary
    /// directory, removed if the run passes).
    #[arg(long)]
    pub dir: Option<PathBuf>,
    /// Also write the JSON report to this file.
    #[arg(long)]
    pub report: Option<PathBuf>,
    /// Hostile members (0 or 1): one identity holding the cluster key that
    /// connects to every node halfway through the fault phase and sends
    /// malformed, oversized, forged-origin and replayed messages and floods
    /// of acknowledgements and sync requests (see [`byzantine`]). The run
    /// then also requires every node to have blocked it.
    #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u64).range(0..=1))]
    pub byzantine: u64,
    /// Hostile messages per second to each node.
    #[arg(long, default_value_t = 200)]
    pub attack_rate: u32,
}

impl Args {
    fn replay_command(&self) -> String {
        let mut command = format!(
            "causeway chaos --seed {} --duration {} --regions {} --max-fault-secs {} --writers {} --rate {} --docs {}",
            self.seed, self.duration, self.regions, self.max_fault_secs, self.writers, self.rate, self.docs
        );
        if self.nodes_per_region > 1 {
            command += &format!(" --nodes-per-region {}", self.nodes_per_region);
        }
        if self.dissemination != "gossip" {
            command += &format!(" --dissemination {}", self.dissemination);
        }
        if self.reconcile_fanout != "all" {
            command += &format!(" --reconcile-fanout {}", self.reconcile_fanout);
        }
        if self.no_faults {
            command += " --no-faults";
        }
        if let Some(ms) = self.min_push_retry_ms {
            command += &format!(" --min-push-retry-ms {ms}");
        }
        if self.byzantine > 0 {
            command += &format!(
                " --byzantine {} --attack-rate {}",
                self.byzantine, self.attack_rate
            );
        }
        command
    }
}

/// Whether this process runs as root (it owns its /proc entry).
pub fn is_root() -> bool {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0)
}

/// Runs the harness; fails unless the run passed.
pub async fn run(args: &Args) -> Result<()> {
    if !is_root() {
        bail!(
            "causeway chaos needs root: it creates network namespaces, a bridge and nftables rules. \
             Run it as root (for example `sudo make chaos`)."
        );
    }
    if args.rate <= 0.0 || args.writers == 0 || args.docs == 0 {
        bail!("--rate, --writers and --docs must be positive");
    }
    causeway_engine::replication::Fanout::parse_setting(&args.reconcile_fanout)
        .map_err(|e| anyhow::anyhow!("--reconcile-fanout: {e}"))?;
    let _turn = machine_lock().await?;
    let regions = args.regions as usize;
    let per_region = args.nodes_per_region as usize;
    let names: Vec<String> = REGION_NAMES[..regions]
        .iter()
        .map(ToString::to_string)
        .collect();
    let name_refs: Vec<&str> = names.iter().map(String::as_str).collect();
    let schedule = if args.no_faults {
        Vec::new()
    } else {
        schedule::generate(ScheduleConfig {
            seed: args.seed,
            duration: Duration::from_secs(args.duration),
            regions,
            max_fault: Duration::from_secs(args.max_fault_secs),
            nodes_per_region: per_region,
        })
    };
    print_schedule(args, &schedule, &name_refs);
    let (root, temp) = run_dir(args)?;
    let topology = Topology::create(regions).context("cannot build the chaos network")?;
    let mut network = format!(
        "dissemination = {:?}\nreconcile_fanout = {:?}\n",
        args.dissemination, args.reconcile_fanout
    );
    if let Some(ms) = args.min_push_retry_ms {
        network += &format!("min_push_retry_ms = {ms}\n");
    }
    let (mut nodes, peer_addrs) = start_nodes(&root, &names, per_region, &network).await?;
    let urls: Vec<String> = nodes.iter().map(NodeProcess::url).collect();
    let node_names: Vec<String> = nodes.iter().map(|n| n.name.clone()).collect();
    let mesh = await_mesh(&urls, Duration::from_secs(60)).await?;
    eprintln!(
        "full mesh of {} nodes after {} ms",
        nodes.len(),
        mesh.as_millis()
    );

    // Traffic between regions with no write yet.
    let idle_from = topology.wan_in()?;
    tokio::time::sleep(IDLE_MEASURE).await;
    let idle = report::traffic_between(&idle_from, &topology.wan_in()?);

    // The fault phase: writers in every region, faults on schedule.
    let start = Instant::now();
    let stop = Arc::new(AtomicBool::new(false));
    let wan_before = topology.wan_in()?;
    let tasks = spawn_writers(args, &urls, &names, start, &stop);
    let attack_start = Duration::from_secs(args.duration) / 2;
    let attack_stop = Arc::new(AtomicBool::new(false));
    let attacker_identity = libp2p::identity::Keypair::generate_ed25519();
    let attacker_id = attacker_identity.public().to_peer_id().to_base58();
    let attacker = spawn_attacker(
        args,
        &root,
        &peer_addrs,
        (start, attack_start),
        (&attack_stop, attacker_identity),
    )?;
    let mut injected = Vec::new();
    let phase = run_schedule(
        &schedule,
        &topology,
        (&mut nodes, per_region),
        &name_refs,
        start,
        &mut injected,
    )
    .await;
    if phase.is_ok() {
        tokio::time::sleep_until((start + Duration::from_secs(args.duration)).into()).await;
    }
    stop.store(true, Ordering::Relaxed);
    let mut writes = Vec::new();
    for t in tasks {
        writes.extend(t.await?);
    }
    if phase.is_err() {
        attack_stop.store(true, Ordering::Relaxed);
    }
    phase?;

    // The final heal, then the checker.
    heal(&topology, &mut nodes).await?;
    eprintln!(
        "[{:>7.1} s] healed everything; {} writes sent; waiting for convergence",
        start.elapsed().as_secs_f64(),
        writes.len()
    );
    // A node paused or killed for much of the attack heard too little of
    // it to block it yet: the attack goes on, now without faults, until
    // every node has blocked the attacker or `ATTACK_AFTER_HEAL` passed.
    let healed_at = Instant::now();
    if attacker.is_some() {
        while !nodes.iter().all(|n| blocks(n, &attacker_id))
            && healed_at.elapsed() < ATTACK_AFTER_HEAL
        {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        eprintln!(
            "[{:>7.1} s] attack over: blocked by {}/{} nodes, the last {:.1} s after the heal",
            start.elapsed().as_secs_f64(),
            nodes.iter().filter(|n| blocks(n, &attacker_id)).count(),
            nodes.len(),
            healed_at.elapsed().as_secs_f64()
        );
    }
    attack_stop.store(true, Ordering::Relaxed);
    let attack = match attacker {
        Some(task) => Some(task.await?),
        None => None,
    };
    let (replicas, took) = checker::await_convergence(
        &urls,
        &node_names,
        Duration::from_secs(args.converge_timeout),
    )
    .await?;
    let wan = report::Wan::of(
        report::traffic_between(&wan_before, &topology.wan_in()?),
        start.elapsed(),
        (&idle, IDLE_MEASURE),
        &writes,
    );
    let sent = report::NodeCounters::of(&urls).await;
    let verdict = checker::check(&writes, &replicas);
    let documents = replicas.iter().map(|r| r.len()).max().unwrap_or(0);
    let byzantine = attack.map(|attack| {
        let phase = (attack_start, Duration::from_secs(args.duration));
        byzantine_report(attack, phase, &writes, &nodes)
    });
    let mut inbound_streams_dropped = 0;
    for n in nodes.iter_mut() {
        n.kill().await?;
        inbound_streams_dropped += n.log_lines_containing("because we are at capacity");
    }
    drop(topology);

    let mut totals = report::Counts::default();
    let per_region = report::region_writes(&names, &writes, &injected);
    for r in &per_region {
        totals.attempted += r.all.attempted;
        totals.ok += r.all.ok;
        totals.failed += r.all.failed;
        totals.unknown += r.all.unknown;
    }
    let passed = took.is_some()
        && verdict.acked_lost == 0
        && verdict.divergent_replicas == 0
        && verdict.failed_present == 0
        && byzantine
            .as_ref()
            .is_none_or(|b| b.blocked_by.len() == nodes.len());
    let data_dir = match temp {
        Some(t) if !passed => Some(t.keep().display().to_string()),
        Some(_) => None,
        None => Some(root.display().to_string()),
    };
    let report = Report {
        command: args.replay_command(),
        seed: args.seed,
        duration_s: args.duration,
        regions: names.clone(),
        nodes: node_names,
        network: network.trim().replace('\n', ", "),
        wan,
        sent,
        workload: format!(
            "{} writers per region, {} writes/s each, {} documents, unknown after {} ms",
            args.writers, args.rate, args.docs, args.write_timeout_ms
        ),
        node_timers: causeway_node::settings::LAN_TIMERS
            .trim()
            .replace('\n', ", "),
        faults_by_kind: report::by_kind(&injected),
        faults: injected,
        writes: totals,
        per_region,
        verdict,
        converged: took.is_some(),
        convergence_ms: took.map(|d| d.as_millis() as u64),
        documents,
        inbound_streams_dropped,
        passed,
        data_dir,
        byzantine,
    };
    publish(args, &report)
}

/// Prints the replay command and the schedule.
fn print_schedule(args: &Args, schedule: &[Fault], names: &[&str]) {
    eprintln!("replay: {}", args.replay_command());
    eprintln!("schedule ({} faults):", schedule.len());
    for f in schedule {
        eprintln!(
            "  {:>8.1} s  for {:>5.1} s  {}",
            f.at.as_secs_f64(),
            f.length.as_secs_f64(),
            f.describe(names, args.nodes_per_region as usize)
        );
    }
}

/// The run's directory: `--dir` (which must be empty), or a temporary one
/// (kept if the run fails).
fn run_dir(args: &Args) -> Result<(PathBuf, Option<tempfile::TempDir>)> {
    match &args.dir {
        Some(d) => {
            if d.exists() && std::fs::read_dir(d)?.next().is_some() {
                bail!("{} is not empty", d.display());
            }
            std::fs::create_dir_all(d)?;
            Ok((d.clone(), None))
        }
        None => {
            let t = tempfile::Builder::new()
                .prefix("causeway-chaos-")
                .tempdir()?;
            Ok((t.path().to_path_buf(), Some(t)))
        }
    }
}

/// Starts `--writers` writers per region, writing until `stop`.
fn spawn_writers(
    args: &Args,
    urls: &[String],
    names: &[String],
    start: Instant,
    stop: &Arc<AtomicBool>,
) -> Vec<tokio::task::JoinHandle<Vec<workload::Write>>> {
    let config = WorkloadConfig {
        writers: args.writers,
        rate: args.rate,
        docs: args.docs,
        timeout: Duration::from_millis(args.write_timeout_ms),
    };
    let per_region = args.nodes_per_region as usize;
    let mut tasks = Vec::new();
    for (i, name) in names.iter().enumerate() {
        for w in 0..config.writers {
            // The region's nodes in turn.
            let node = w % per_region;
            tasks.push(tokio::spawn(workload::writer(
                urls[i * per_region + node].clone(),
                (i, node),
                name.clone(),
                w,
                config.clone(),
                start,
                stop.clone(),
            )));
        }
    }
    tasks
}

/// With `--byzantine`, a member holding the cluster key that attacks every
/// node from `at` (the fault phase's start, and the offset into it) until
/// `stop`, as `identity`.
fn spawn_attacker(
    args: &Args,
    root: &std::path::Path,
    peer_addrs: &[String],
    at: (Instant, Duration),
    (stop, identity): (&Arc<AtomicBool>, libp2p::identity::Keypair),
) -> Result<Option<tokio::task::JoinHandle<byzantine::AttackReport>>> {
    if args.byzantine == 0 {
        return Ok(None);
    }
    let config = byzantine::AttackConfig {
        key: ClusterKey::load(&root.join("cluster.key"))?,
        cluster: ClusterId::new(CLUSTER)?,
        targets: peer_addrs
            .iter()
            .map(|a| a.parse())
            .collect::<Result<_, _>>()?,
        rate: args.attack_rate,
        identity,
    };
    let stop = stop.clone();
    Ok(Some(tokio::spawn(async move {
        let (start, offset) = at;
        tokio::time::sleep_until((start + offset).into()).await;
        eprintln!(
            "[{:>7.1} s] a byzantine member attacks every node",
            start.elapsed().as_secs_f64()
        );
        byzantine::attack(config, stop).await
    })))
}

/// Lifts every fault: the network whole, stopped nodes continued, killed
/// ones restarted.
async fn heal(topology: &Topology, nodes: &mut [NodeProcess]) -> Result<()> {
    topology.apply(&NetState::default())?;
    for n in nodes.iter_mut() {
        if n.is_running() {
            n.signal("CONT")?;
        } else {
            n.start().await?;
        }
    }
    Ok(())
}

/// What the attack did and what it cost the honest nodes: write latency
/// before and during it (`phase`: attack start, fault phase end), who
/// blocked the attacker, memory at the end.
fn byzantine_report(
    attack: byzantine::AttackReport,
    phase: (Duration, Duration),
    writes: &[workload::Write],
    nodes: &[NodeProcess],
) -> ByzantineReport {
    ByzantineReport {
        attack_started_ms: phase.0.as_millis() as u64,
        writes_before: Latency::of(writes, Duration::ZERO, phase.0),
        writes_during: Latency::of(writes, phase.0, phase.1),
        blocked_by: nodes
            .iter()
            .filter(|n| blocks(n, &attack.peer_id))
            .map(|n| n.name.clone())
            .collect(),
        rss_mib_at_end: nodes
            .iter()
            .map(|n| (n.name.clone(), n.rss_kib().unwrap_or(0) / 1024))
            .collect(),
        attack,
    }
}

/// Prints the report (JSON on stdout, a table on stderr), writes it to
/// `--report`, and fails if the run did.
fn publish(args: &Args, report: &Report) -> Result<()> {
    let json = serde_json::to_string_pretty(report)?;
    println!("{json}");
    if let Some(path) = &args.report {
        std::fs::write(path, &json).with_context(|| format!("cannot write {}", path.display()))?;
    }
    eprint!("{}", report.table());
    if !report.passed {
        bail!(
            "the chaos run failed; replay the schedule with: {}",
            args.replay_command()
        );
    }
    Ok(())
}

/// The file whose lock a chaos run holds, in the temporary directory.
const LOCK_FILE: &str = "causeway-chaos.lock";

/// Takes the machine-wide turn of chaos runs, waiting for a run that holds
/// it: the namespaces, the bridge and the subnet have fixed names, and a run
/// removes what it finds of them, so two at once would break each other
/// (test runners start tests in parallel). Held until the file is dropped
/// or the process ends.
async fn machine_lock() -> Result<std::fs::File> {
    let path = std::env::temp_dir().join(LOCK_FILE);
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .with_context(|| format!("cannot open {}", path.display()))?;
    match file.try_lock() {
        Ok(()) => Ok(file),
        Err(std::fs::TryLockError::WouldBlock) => {
            eprintln!(
                "waiting for another causeway chaos run on this machine to finish ({})",
                path.display()
            );
            let file = tokio::task::spawn_blocking(move || file.lock().map(|()| file)).await??;
            Ok(file)
        }
        Err(std::fs::TryLockError::Error(e)) => {
            Err(e).with_context(|| format!("cannot lock {}", path.display()))
        }
    }
}

/// Whether `node` holds `peer` in its list of blocked peers.
fn blocks(node: &NodeProcess, peer: &str) -> bool {
    std::fs::read_to_string(node.dir.join(causeway_node::daemon::SANCTIONS_FILE))
        .is_ok_and(|list| list.contains(peer))
}

/// The cluster id of the chaos nodes.
const CLUSTER: &str = "chaos";

/// How long the attack may go on after the final heal for every node to
/// block the attacker (a node paused or killed for much of the fault phase
/// heard too little of it).
const ATTACK_AFTER_HEAL: Duration = Duration::from_secs(30);

/// Creates every node's identity (so each can be given all the others as
/// bootstrap peers), then starts them; returns them with their addresses.
async fn start_nodes(
    root: &std::path::Path,
    names: &[String],
    per_region: usize,
    network: &str,
) -> Result<(Vec<NodeProcess>, Vec<String>)> {
    // Region by region, its nodes in turn.
    let slots: Vec<(usize, usize, String)> = (0..names.len())
        .flat_map(|i| {
            (0..per_region).map(move |k| (i, k, schedule::node_name(&names[i], k, per_region)))
        })
        .collect();
    let mut peers = Vec::new();
    for (i, k, name) in &slots {
        let dir = root.join(name);
        std::fs::create_dir_all(&dir)?;
        let (key, _) = causeway_node::identity::load_or_create(&dir)?;
        peers.push(format!(
            "/ip4/{}/tcp/{}/p2p/{}",
            node_addr(*i),
            ports(*k).0,
            key.public().to_peer_id()
        ));
    }
    let mut nodes = Vec::new();
    for (n, (i, k, name)) in slots.iter().enumerate() {
        let others: Vec<String> = (0..slots.len())
            .filter(|&j| j != n)
            .map(|j| peers[j].clone())
            .collect();
        let mut node = NodeProcess::prepare(
            root,
            (*i, *k),
            (&names[*i], name),
            CLUSTER,
            &others,
            network,
        )?;
        node.start().await?;
        nodes.push(node);
    }
    Ok((nodes, peers))
}

/// Waits until every node replicates with every other.
async fn await_mesh(urls: &[String], timeout: Duration) -> Result<Duration> {
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .build()?;
    let start = Instant::now();
    loop {
        let mut full = true;
        for url in urls {
            let status: serde_json::Value =
                match client.get(format!("{url}/v1/status")).send().await {
                    Ok(r) => r.json().await.unwrap_or_default(),
                    Err(_) => serde_json::Value::Null,
                };
            let replicating = status["node"]["peers"].as_array().map_or(0, |p| {
                p.iter().filter(|p| p["state"] == "replicating").count()
            });
            full &= replicating + 1 == urls.len();
        }
        if full {
            return Ok(start.elapsed());
        }
        if start.elapsed() > timeout {
            bail!("the nodes did not form a full mesh within {timeout:?}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Injects every fault at its time and heals it after its length,
/// recording when each really started and ended.
async fn run_schedule(
    schedule: &[Fault],
    topology: &Topology,
    (nodes, per_region): (&mut [NodeProcess], usize),
    names: &[&str],
    start: Instant,
    injected: &mut Vec<Injected>,
) -> Result<()> {
    let regions = names.len();
    for fault in schedule {
        tokio::time::sleep_until((start + fault.at).into()).await;
        let started = start.elapsed();
        let node = &mut nodes[fault.region * per_region + fault.node];
        match fault.kind {
            FaultKind::Pause => node.signal("STOP")?,
            FaultKind::Kill => node.kill().await?,
            _ => topology.apply(&fault.net_state(regions))?,
        }
        eprintln!(
            "[{:>7.1} s] {}",
            started.as_secs_f64(),
            fault.describe(names, per_region)
        );
        tokio::time::sleep_until((start + fault.at + fault.length).into()).await;
        match fault.kind {
            FaultKind::Pause => node.signal("CONT")?,
            FaultKind::Kill => node.start().await?,
            _ => topology.apply(&NetState::default())?,
        }
        let healed = start.elapsed();
        eprintln!("[{:>7.1} s] healed", healed.as_secs_f64());
        injected.push(Injected {
            fault: fault.clone(),
            started_ms: started.as_millis() as u64,
            healed_ms: healed.as_millis() as u64,
        });
    }
    Ok(())
}
