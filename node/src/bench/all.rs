//! `causeway bench all`: every scenario, one after another, each as its own
//! `causeway bench <scenario>` process (so one scenario's memory and threads
//! never colour the next); their JSON results pass through to stdout, and
//! a markdown summary (scenario, Causeway figure, reference or peer figure,
//! ratio, command; machine and date above) is written to a file and, with
//! `--update`, between the markers of `docs/benchmarks.md`.

use std::fmt::Write as _;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context, Result};
use serde_json::Value;

/// Arguments of `causeway bench all`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Tiny sizes: checks that every scenario runs; the figures mean nothing.
    #[arg(long)]
    pub quick: bool,
    /// Where to write the markdown summary.
    #[arg(long, default_value = "bench-all.md")]
    pub markdown: PathBuf,
    /// Also replace the text between `<!-- bench all: begin -->` and
    /// `<!-- bench all: end -->` in this file with the summary.
    #[arg(long)]
    pub update: Option<PathBuf>,
    /// Run only these scenarios (comma-separated names).
    #[arg(long, value_delimiter = ',')]
    pub only: Vec<String>,
}

/// Every scenario: its name, full-size arguments, smoke arguments.
const SCENARIOS: &[(&str, &[&str], &[&str])] = &[
    ("ingest", &[], &["--txns", "500"]),
    (
        "durable-writes",
        &[],
        &[
            "--writers",
            "1,4",
            "--seconds",
            "0.3",
            "--docs-per-writer",
            "4",
        ],
    ),
    (
        "reconcile",
        &[],
        &["--docs", "2000", "--differences", "0,10"],
    ),
    (
        "delta-path",
        &[],
        &["--writes", "100", "--loss-permille", "0,50"],
    ),
    ("lag", &[], &["--writes", "30"]),
    ("join", &[], &["--docs", "100"]),
    ("replicate-trace", &[], &["--txns", "300"]),
    ("many-docs-sync", &[], &["--docs", "50"]),
    (
        "steady-state",
        &[],
        &["--docs", "50", "--rate", "10", "--seconds", "3"],
    ),
    (
        "memory",
        &[],
        &["--docs", "2000", "--written", "20", "--seconds", "2"],
    ),
    (
        "concurrent-editors",
        &["--max-held-per-doc", "1000", "--kill-at", "20000"],
        &[
            "--txns",
            "300",
            "--block",
            "20",
            "--max-held-per-doc",
            "30",
            "--kill-at",
            "100",
        ],
    ),
];

const BEGIN: &str = "<!-- bench all: begin -->";
const END: &str = "<!-- bench all: end -->";

/// Runs every scenario and writes the summary.
pub fn run(args: &Args) -> Result<()> {
    for name in &args.only {
        if !SCENARIOS.iter().any(|(n, _, _)| n == name) {
            bail!("no scenario {name}");
        }
    }
    let started = Instant::now();
    let mut rows = Vec::new();
    let mut failed = Vec::new();
    for (name, full, quick) in SCENARIOS {
        if !args.only.is_empty() && !args.only.iter().any(|o| o == name) {
            continue;
        }
        let scenario_args: &[&str] = if args.quick { quick } else { full };
        let command = std::iter::once(format!("causeway bench {name}"))
            .chain(scenario_args.iter().map(|a| a.to_string()))
            .collect::<Vec<_>>()
            .join(" ");
        eprintln!("== {command}");
        let out = Command::new(std::env::current_exe()?)
            .arg("bench")
            .arg(name)
            .args(scenario_args)
            .stderr(Stdio::inherit())
            .output()
            .with_context(|| format!("cannot run {command}"))?;
        let text = String::from_utf8_lossy(&out.stdout);
        print!("{text}");
        let results: Vec<Value> = text
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect();
        if !out.status.success() || results.is_empty() {
            failed.push(name.to_string());
            rows.push(Row::new(
                name,
                "**failed** (see its output)",
                "",
                "",
                &command,
            ));
            continue;
        }
        for r in results.iter().filter(|r| r["failed"] == true) {
            eprintln!(
                "bench all: in {name}, {} failed: {}",
                r["engine"].as_str().unwrap_or("?"),
                r["reason"].as_str().unwrap_or("no reason given")
            );
        }
        rows.extend(summarize(name, &results, &command));
    }
    let markdown = render(&rows, args.quick, started.elapsed().as_secs_f64())?;
    std::fs::write(&args.markdown, &markdown)
        .with_context(|| format!("cannot write {}", args.markdown.display()))?;
    eprintln!("bench all: summary written to {}", args.markdown.display());
    if let Some(doc) = &args.update {
        update_between_markers(doc, &markdown)?;
        eprintln!("bench all: {} updated", doc.display());
    }
    if !failed.is_empty() {
        bail!("scenarios failed: {}", failed.join(", "));
    }
    Ok(())
}

/// One line of the summary table.
struct Row {
    scenario: String,
    causeway: String,
    reference: String,
    ratio: String,
    command: String,
}

impl Row {
    fn new(scenario: &str, causeway: &str, reference: &str, ratio: &str, command: &str) -> Self {
        Row {
            scenario: scenario.into(),
            causeway: causeway.into(),
            reference: reference.into(),
            ratio: ratio.into(),
            command: command.into(),
        }
    }
}

fn f(v: &Value, key: &str) -> f64 {
    v[key].as_f64().unwrap_or(f64::NAN)
}

fn thousands(n: f64) -> String {
    let digits = format!("{:.0}", n);
    let (sign, digits) = digits
        .strip_prefix('-')
        .map_or(("", digits.as_str()), |d| ("-", d));
    let mut out = String::new();
    for (k, c) in digits.chars().enumerate() {
        if k > 0 && (digits.len() - k) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    format!("{sign}{out}")
}

/// Turns one scenario's JSON results into summary rows.
fn summarize(name: &str, results: &[Value], command: &str) -> Vec<Row> {
    let mut rows = Vec::new();
    let row = |s: String, c: String, r: String, x: String| Row {
        scenario: s,
        causeway: c,
        reference: r,
        ratio: x,
        command: command.to_string(),
    };
    match name {
        "ingest" => {
            let bare = results
                .iter()
                .find(|r| r["variant"] == "bare-automerge")
                .map_or(f64::NAN, |r| f(r, "wall_s"));
            for r in results.iter().filter(|r| r.get("durability").is_some()) {
                rows.push(row(
                    format!(
                        "ingest, `{}` ({} transactions, one change each)",
                        r["durability"].as_str().unwrap_or("?"),
                        thousands(f(r, "txns"))
                    ),
                    format!("{:.2} s", f(r, "wall_s")),
                    format!("bare Automerge in memory {bare:.2} s"),
                    format!("{:.2}x", f(r, "ratio_vs_bare")),
                ));
            }
        }
        "durable-writes" => {
            for r in results {
                rows.push(row(
                    format!("durable writes, {} writers", r["writers"]),
                    format!("{} writes/s", thousands(f(r, "engine_writes_per_s"))),
                    format!(
                        "raw RocksDB synced writes {}/s",
                        thousands(f(r, "raw_rocksdb_writes_per_s"))
                    ),
                    format!("{:.2}x", f(r, "ratio")),
                ));
            }
        }
        "reconcile" => {
            for r in results {
                rows.push(row(
                    format!(
                        "reconcile, {} documents, {} differences",
                        thousands(f(r, "docs")),
                        r["differences"]
                    ),
                    format!(
                        "{} bytes, {} round trips",
                        thousands(f(r, "bytes")),
                        r["round_trips"]
                    ),
                    format!("floor {} bytes", thousands(f(r, "floor_bytes"))),
                    if f(r, "floor_bytes") > 0.0 {
                        format!("{:.1}x floor", f(r, "bytes_over_floor"))
                    } else {
                        "—".into()
                    },
                ));
            }
        }
        "delta-path" => {
            for r in results {
                rows.push(row(
                    format!(
                        "delta path (simulated), {} nodes in {} regions, {:.1}% loss",
                        r["nodes"],
                        r["regions"],
                        f(r, "loss_permille") / 10.0
                    ),
                    format!(
                        "{:.2} messages, {} bytes per delivered change",
                        f(r, "messages_per_change"),
                        thousands(f(r, "bytes_per_change"))
                    ),
                    format!(
                        "floor 1 message, {} bytes",
                        thousands(f(r, "floor_bytes_per_change"))
                    ),
                    format!("{:.1}x bytes", f(r, "ratio_to_floor")),
                ));
            }
        }
        "lag" => {
            for r in results {
                rows.push(row(
                    format!(
                        "lag: write on A to durable on B and C ({} writes)",
                        thousands(f(r, "writes"))
                    ),
                    format!(
                        "p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
                        f(r, "p50_ms"),
                        f(r, "p99_ms"),
                        f(r, "max_ms")
                    ),
                    format!("loopback RTT + one fsync {:.2} ms", f(r, "floor_p50_ms")),
                    format!("{:.1}x (p50)", f(r, "ratio_p50")),
                ));
            }
        }
        "concurrent-editors" => {
            for r in results {
                rows.push(row(
                    format!(
                        "concurrent-editors: {} writers post {} trace changes to their own region's node (held limit {}, one node SIGKILLed)",
                        r["writers"],
                        thousands(f(r, "acknowledged")),
                        r["max_held_per_doc"]
                    ),
                    format!(
                        "{:.0} posts/s; held at peak {}, refused and retried {}, lost {}; converged {:.1} s after the last post",
                        f(r, "posts_per_second"),
                        thousands(f(r, "held_peak")),
                        thousands(f(r, "refused_and_retried")),
                        r["lost"],
                        f(r, "seconds_to_converge_after_posting")
                    ),
                    "—".into(),
                    "—".into(),
                ));
            }
        }
        "join" => {
            for r in results {
                rows.push(row(
                    format!(
                        "join: a new node receives {} documents",
                        thousands(f(r, "docs"))
                    ),
                    format!(
                        "{:.1} s ({} documents/s)",
                        f(r, "join_seconds"),
                        thousands(f(r, "docs_per_s"))
                    ),
                    "—".into(),
                    "—".into(),
                ));
                rows.push(row(
                    "idle memory of `causeway node`".into(),
                    format!(
                        "{:.1} MiB holding {} documents",
                        f(r, "idle_rss_mib_with_docs"),
                        thousands(f(r, "docs"))
                    ),
                    format!("empty node {:.1} MiB", f(r, "idle_rss_mib_empty")),
                    format!(
                        "{:.2}x",
                        f(r, "idle_rss_mib_with_docs") / f(r, "idle_rss_mib_empty")
                    ),
                ));
            }
        }
        "replicate-trace" => {
            for r in results {
                let slowest = f(r, "replicated_b_s").max(f(r, "replicated_c_s"));
                rows.push(row(
                    format!(
                        "replicate-trace: {} changes written on A; B and C hold A's heads",
                        thousands(f(r, "txns"))
                    ),
                    format!("{slowest:.1} s (slower of B, C)"),
                    format!("A's own ingest {:.1} s", f(r, "ingest_a_s")),
                    format!("{:.2}x (target 1.2x)", slowest / f(r, "ingest_a_s")),
                ));
            }
        }
        "many-docs-sync" => {
            let ours = results.iter().find(|r| r["engine"] == "causeway");
            for r in results.iter().filter(|r| r["engine"] != "causeway") {
                let Some(c) = ours else { break };
                let versions = r["versions"]
                    .as_object()
                    .map(|m| {
                        m.iter()
                            .map(|(k, v)| format!("{k} {}", v.as_str().unwrap_or("?")))
                            .collect::<Vec<_>>()
                            .join(", ")
                    })
                    .unwrap_or_default();
                let docs = thousands(f(c, "docs"));
                let engine = r["engine"].as_str().unwrap_or("?");
                let setup = format!(
                    "{versions}; the client looks up {} documents at a time",
                    r["lookup_window"]
                );
                if r["failed"] == true {
                    rows.push(row(
                        format!("many-docs-sync: {docs} documents to a new peer ({setup})"),
                        format!("{:.2} s", f(c, "seconds")),
                        format!(
                            "{engine} **failed**: {}",
                            r["reason"]
                                .as_str()
                                .unwrap_or("no reason given")
                                .replace('|', "\\|")
                                .replace('\n', " ")
                        ),
                        "—".into(),
                    ));
                    continue;
                }
                rows.push(row(
                    format!("many-docs-sync: {docs} documents to a new peer, time ({setup})"),
                    format!("{:.2} s", f(c, "seconds")),
                    format!("{engine} {:.2} s", f(r, "seconds")),
                    format!("{:.2}x", f(c, "seconds") / f(r, "seconds")),
                ));
                rows.push(row(
                    format!("many-docs-sync: {docs} documents to a new peer, bytes"),
                    format!("{} bytes/document", thousands(f(c, "bytes_per_doc"))),
                    format!(
                        "{engine} {} bytes/document",
                        thousands(f(r, "bytes_per_doc"))
                    ),
                    format!("{:.2}x", f(c, "bytes") / f(r, "bytes")),
                ));
            }
            if results.len() == 1 {
                if let Some(c) = ours {
                    rows.push(row(
                        "many-docs-sync (no peers)".into(),
                        format!("{:.2} s", f(c, "seconds")),
                        "—".into(),
                        "—".into(),
                    ));
                }
            }
        }
        "steady-state" => {
            for r in results {
                let list = |key: &str, digits: usize| {
                    r[key]
                        .as_array()
                        .map(|a| {
                            a.iter()
                                .map(|v| format!("{:.*}", digits, v.as_f64().unwrap_or(f64::NAN)))
                                .collect::<Vec<_>>()
                                .join(" / ")
                        })
                        .unwrap_or_default()
                };
                let scenario = format!(
                    "steady-state: {} nodes x {} writes/s on {} documents for {:.0} s",
                    r["nodes"],
                    r["rate_per_node"],
                    thousands(f(r, "docs")),
                    f(r, "seconds")
                );
                rows.push(row(
                    format!("{scenario}: propagation lag"),
                    format!(
                        "p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
                        f(r, "lag_ms_p50"),
                        f(r, "lag_ms_p99"),
                        f(r, "lag_ms_max")
                    ),
                    "—".into(),
                    "—".into(),
                ));
                rows.push(row(
                    format!("{scenario}: CPU s and peak RSS MiB per node"),
                    format!(
                        "{} s; {} MiB",
                        list("cpu_seconds", 1),
                        list("peak_rss_mib", 0)
                    ),
                    "—".into(),
                    "—".into(),
                ));
                rows.push(row(
                    format!("{scenario}: bytes per change per peer (above Noise and yamux)"),
                    thousands(f(r, "wire_bytes_per_change_per_peer")),
                    "—".into(),
                    "—".into(),
                ));
            }
        }
        "memory" => {
            for r in results {
                rows.push(row(
                    format!(
                        "memory: {} documents stored, {} being written",
                        thousands(f(r, "docs")),
                        thousands(f(r, "written"))
                    ),
                    format!(
                        "RSS {:.0} MiB idle, {:.0} MiB writing, peak {:.0} MiB (cache budget {:.0} MiB); open {:.2} s",
                        f(r, "idle_rss_mib"),
                        f(r, "writing_rss_mib"),
                        f(r, "peak_rss_mib"),
                        f(r, "cache_budget_mib"),
                        f(r, "open_seconds")
                    ),
                    format!("empty node {:.0} MiB", f(r, "empty_node_idle_rss_mib")),
                    format!(
                        "{:.2}x (peak)",
                        f(r, "peak_rss_mib") / f(r, "empty_node_idle_rss_mib")
                    ),
                ));
            }
        }
        _ => {}
    }
    rows
}

/// The machine: cores, memory, CPU model.
fn machine() -> String {
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let mem_gib = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find_map(|l| l.strip_prefix("MemTotal:"))
                .and_then(|v| v.split_whitespace().next()?.parse::<f64>().ok())
        })
        .map_or(0.0, |kb| kb / (1 << 20) as f64);
    let model = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find_map(|l| l.strip_prefix("model name"))
                .map(|v| v.trim_start_matches([' ', '\t', ':']).to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    format!("{cores} cores ({model}), {mem_gib:.0} GiB memory")
}

/// Today's date (UTC), from the civil-from-days algorithm.
fn today() -> String {
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let z = (secs / 86_400) as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!("{year:04}-{month:02}-{day:02}")
}

fn render(rows: &[Row], quick: bool, seconds: f64) -> Result<String> {
    let mut md = String::new();
    writeln!(
        md,
        "Output of `causeway bench all{}` ({} build), {}; machine: {}; whole run {:.0} min.",
        if quick { " --quick" } else { "" },
        super::build_profile(),
        today(),
        machine(),
        seconds / 60.0
    )?;
    if quick {
        writeln!(md, "\n**Smoke sizes: these figures mean nothing.**")?;
    }
    writeln!(
        md,
        "\n| scenario | Causeway | reference or peer | ratio | command |\n|---|---|---|---|---|"
    )?;
    for r in rows {
        writeln!(
            md,
            "| {} | {} | {} | {} | `{}` |",
            r.scenario, r.causeway, r.reference, r.ratio, r.command
        )?;
    }
    Ok(md)
}

fn update_between_markers(doc: &std::path::Path, markdown: &str) -> Result<()> {
    let text =
        std::fs::read_to_string(doc).with_context(|| format!("cannot read {}", doc.display()))?;
    let (Some(begin), Some(end)) = (text.find(BEGIN), text.find(END)) else {
        bail!("{} has no {BEGIN} ... {END} markers", doc.display());
    };
    if end < begin {
        bail!(
            "{}: the end marker comes before the begin marker",
            doc.display()
        );
    }
    let updated = format!("{}{BEGIN}\n{markdown}{}", &text[..begin], &text[end..]);
    std::fs::write(doc, updated)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_get_thousands_separators() {
        assert_eq!(thousands(0.0), "0");
        assert_eq!(thousands(999.0), "999");
        assert_eq!(thousands(1000.0), "1,000");
        assert_eq!(thousands(1_234_567.4), "1,234,567");
        assert_eq!(thousands(-12_345.0), "-12,345");
    }

    #[test]
    fn the_summary_replaces_only_the_text_between_the_markers() -> Result<()> {
        let dir = tempfile::tempdir()?;
        let doc = dir.path().join("b.md");
        std::fs::write(&doc, format!("head\n{BEGIN}\nold\n{END}\ntail\n"))?;
        update_between_markers(&doc, "new\n")?;
        assert_eq!(
            std::fs::read_to_string(&doc)?,
            format!("head\n{BEGIN}\nnew\n{END}\ntail\n")
        );
        Ok(())
    }

    #[test]
    fn a_failed_peer_gets_a_row_with_its_reason_and_the_others_their_figures() {
        let ours = serde_json::json!({"engine": "causeway", "docs": 10, "seconds": 2.0,
                                      "bytes": 1000, "bytes_per_doc": 100.0});
        let failed = serde_json::json!({"engine": "automerge-repo", "docs": 10, "failed": true,
                                        "reason": "timed out | gave up", "lookup_window": 100,
                                        "versions": {"automerge-repo": "2.5.6"}});
        let samod = serde_json::json!({"engine": "samod", "docs": 10, "seconds": 4.0,
                                       "bytes": 2000, "bytes_per_doc": 200.0, "lookup_window": 100,
                                       "versions": {"samod": "0.6.0"}});
        let rows = summarize("many-docs-sync", &[ours, failed, samod], "cmd");
        assert_eq!(rows.len(), 3, "one row for the failure, two for samod");
        assert_eq!(rows[0].causeway, "2.00 s");
        assert_eq!(
            rows[0].reference,
            "automerge-repo **failed**: timed out \\| gave up"
        );
        assert_eq!(rows[0].ratio, "—");
        assert_eq!(rows[1].reference, "samod 4.00 s");
        assert_eq!(rows[1].ratio, "0.50x");
        assert_eq!(rows[2].ratio, "0.50x");
    }

    #[test]
    fn every_scenario_has_a_summary() {
        for (name, _, _) in SCENARIOS {
            let fake =
                serde_json::json!({"engine": "causeway", "variant": "x", "durability": "Sync"});
            let peer = serde_json::json!({"engine": "samod"});
            assert!(
                !summarize(name, &[fake, peer], "cmd").is_empty(),
                "{name} has no rows"
            );
        }
    }
}
