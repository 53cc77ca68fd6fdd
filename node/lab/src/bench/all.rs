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

use super::summary;
use super::{
    backup, concurrent_editors, delta_path, durable_writes, gc, ingest, join, lag, many_docs_sync,
    memory, open, reconcile, replicate_trace, repo_clients, scale, steady_state,
};

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

/// Turns a scenario's JSON results into its summary rows.
type Summary = fn(&[Value]) -> Vec<summary::Row>;

/// Every scenario: its name, full-size arguments, smoke arguments, and its
/// summary.
const SCENARIOS: &[(&str, &[&str], &[&str], Summary)] = &[
    ("ingest", &[], &["--txns", "500"], ingest::summary),
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
        durable_writes::summary,
    ),
    (
        "reconcile",
        &[],
        &["--docs", "2000", "--differences", "0,10"],
        reconcile::summary,
    ),
    (
        "delta-path",
        &[],
        &["--writes", "100", "--loss-permille", "0,50"],
        delta_path::summary,
    ),
    ("lag", &[], &["--writes", "30"], lag::summary),
    (
        "scale",
        &[],
        &[
            "--nodes",
            "30",
            "--regions",
            "6",
            "--writes",
            "20",
            "--loss-permille",
            "0",
        ],
        scale::summary,
    ),
    ("join", &[], &["--docs", "100"], join::summary),
    (
        "backup",
        &[],
        &["--docs", "200", "--later-docs", "20"],
        backup::summary,
    ),
    ("gc", &[], &["--docs", "500"], gc::summary),
    (
        "open",
        &[],
        &["--docs", "2000", "--repeat", "1"],
        open::summary,
    ),
    (
        "replicate-trace",
        &[],
        &["--txns", "300"],
        replicate_trace::summary,
    ),
    (
        "many-docs-sync",
        &[],
        &["--docs", "50"],
        many_docs_sync::summary,
    ),
    (
        "automerge-repo",
        &[],
        &["--finds", "5", "--docs", "20", "--window", "10"],
        repo_clients::summary,
    ),
    (
        "steady-state",
        &[],
        &["--docs", "50", "--rate", "10", "--seconds", "3"],
        steady_state::summary,
    ),
    (
        "memory",
        &[],
        &["--docs", "2000", "--written", "20", "--seconds", "2"],
        memory::summary,
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
        concurrent_editors::summary,
    ),
];

const BEGIN: &str = "<!-- bench all: begin -->";
const END: &str = "<!-- bench all: end -->";

/// Runs every scenario and writes the summary.
pub fn run(args: &Args) -> Result<()> {
    for name in &args.only {
        if !SCENARIOS.iter().any(|(n, ..)| n == name) {
            bail!("no scenario {name}");
        }
    }
    let started = Instant::now();
    let mut rows = Vec::new();
    let mut failed = Vec::new();
    for (name, full, quick, _) in SCENARIOS {
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
            rows.push(Row {
                line: summary::Row::new(
                    name.to_string(),
                    "**failed** (see its output)".into(),
                    String::new(),
                    String::new(),
                ),
                command: command.clone(),
            });
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

/// One line of the summary table: a scenario's row and its command.
struct Row {
    line: summary::Row,
    command: String,
}

/// One scenario's summary rows, each with the command that produced them.
fn summarize(name: &str, results: &[Value], command: &str) -> Vec<Row> {
    let Some((_, _, _, summary)) = SCENARIOS.iter().find(|(n, ..)| *n == name) else {
        return Vec::new();
    };
    summary(results)
        .into_iter()
        .map(|line| Row {
            line,
            command: command.to_string(),
        })
        .collect()
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
    for Row { line: r, command } in rows {
        writeln!(
            md,
            "| {} | {} | {} | {} | `{command}` |",
            r.scenario, r.causeway, r.reference, r.ratio
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
        let rows: Vec<summary::Row> = summarize("many-docs-sync", &[ours, failed, samod], "cmd")
            .into_iter()
            .map(|r| r.line)
            .collect();
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
        for (name, ..) in SCENARIOS {
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
