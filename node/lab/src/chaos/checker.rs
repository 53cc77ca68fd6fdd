//! The checker of a chaos run: after the final heal, waits until every node
//! holds the same documents with the same heads and content, then checks
//! every write the clients recorded against what every node holds.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use reqwest::Client;
use serde::Serialize;
use serde_json::Value;

use super::workload::{Outcome, Write, DOC_PREFIX};

/// A document as one node holds it: heads and JSON.
#[derive(Debug, Clone, PartialEq)]
pub struct DocState {
    /// The `causeway-heads` header.
    pub heads: String,
    /// The content.
    pub json: Value,
}

/// Every workload document on one node, by id.
pub type Replica = BTreeMap<String, DocState>;

/// Reads every workload document from the node at `url`.
pub async fn read_replica(client: &Client, url: &str) -> Result<Replica> {
    let mut ids = Vec::new();
    let mut after: Option<String> = None;
    loop {
        let mut req = client
            .get(format!("{url}/v1/docs"))
            .query(&[("prefix", DOC_PREFIX), ("limit", "1000")]);
        if let Some(a) = &after {
            req = req.query(&[("after", a.as_str())]);
        }
        let page: Value = req.send().await?.error_for_status()?.json().await?;
        for id in page["ids"].as_array().context("list: no ids")? {
            ids.push(id.as_str().context("list: id")?.to_string());
        }
        match page["next"].as_str() {
            Some(n) => after = Some(n.to_string()),
            None => break,
        }
    }
    let mut replica = Replica::new();
    for id in ids {
        let r = client
            .get(format!("{url}/v1/docs/{id}"))
            .send()
            .await?
            .error_for_status()?;
        let heads = r
            .headers()
            .get("causeway-heads")
            .and_then(|h| h.to_str().ok())
            .unwrap_or_default()
            .to_string();
        replica.insert(
            id,
            DocState {
                heads,
                json: r.json().await?,
            },
        );
    }
    Ok(replica)
}

/// Polls every node until all hold identical replicas, or `timeout`
/// passes, printing once a second on how many documents each node (named
/// by `names`) differs from the first. Returns the replicas last read and the time convergence took
/// (None if it did not happen).
pub async fn await_convergence(
    urls: &[String],
    names: &[String],
    timeout: Duration,
) -> Result<(Vec<Replica>, Option<Duration>)> {
    let client = Client::builder().timeout(Duration::from_secs(10)).build()?;
    let start = Instant::now();
    let mut last_progress = start;
    loop {
        let mut replicas = Vec::new();
        let mut unreadable = false;
        for url in urls {
            match read_replica(&client, url).await {
                Ok(r) => replicas.push(r),
                Err(_) => unreadable = true,
            }
        }
        if !unreadable && replicas.windows(2).all(|w| w[0] == w[1]) {
            return Ok((replicas, Some(start.elapsed())));
        }
        if !unreadable && last_progress.elapsed() >= Duration::from_secs(1) {
            last_progress = Instant::now();
            let behind: Vec<String> = replicas
                .iter()
                .enumerate()
                .skip(1)
                .map(|(i, r)| {
                    let differ = r
                        .iter()
                        .filter(|(id, d)| replicas[0].get(*id) != Some(*d))
                        .count()
                        + replicas[0].keys().filter(|id| !r.contains_key(*id)).count();
                    format!("{} differs from {} on {differ}", names[i], names[0])
                })
                .collect();
            eprintln!(
                "  {:>6} ms: {}",
                start.elapsed().as_millis(),
                behind.join(", ")
            );
        }
        if start.elapsed() > timeout {
            if unreadable {
                bail!("a node could not be read for {timeout:?} after the heal");
            }
            return Ok((replicas, None));
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// What the checker found.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Verdict {
    /// Acknowledged writes missing (or with another value) on some node.
    pub acked_lost: usize,
    /// Unknown writes found on every node.
    pub unknown_present: usize,
    /// Unknown writes found on no node.
    pub unknown_absent: usize,
    /// Failed writes found on some node (a refusal that was not one).
    pub failed_present: usize,
    /// Nodes whose replica differs from the first node's.
    pub divergent_replicas: usize,
    /// Documents not identical on every node.
    pub divergent_documents: usize,
    /// Up to ten lost writes, as `doc key`, for the investigation.
    pub lost_examples: Vec<String>,
}

/// Checks `writes` against the `replicas` read after the heal.
pub fn check(writes: &[Write], replicas: &[Replica]) -> Verdict {
    let mut v = Verdict::default();
    let first = &replicas[0];
    v.divergent_replicas = replicas[1..].iter().filter(|r| *r != first).count();
    let mut ids: Vec<&String> = replicas.iter().flat_map(|r| r.keys()).collect();
    ids.sort();
    ids.dedup();
    v.divergent_documents = ids
        .iter()
        .filter(|id| replicas.iter().any(|r| r.get(**id) != first.get(**id)))
        .count();
    for w in writes {
        let held = replicas
            .iter()
            .filter(|r| {
                r.get(&w.doc)
                    .and_then(|d| d.json.get(&w.key))
                    .and_then(Value::as_u64)
                    == Some(w.value)
            })
            .count();
        match w.outcome {
            Outcome::Ok if held < replicas.len() => {
                v.acked_lost += 1;
                if v.lost_examples.len() < 10 {
                    v.lost_examples.push(format!("{} {}", w.doc, w.key));
                }
            }
            Outcome::Ok => {}
            Outcome::Unknown if held == replicas.len() => v.unknown_present += 1,
            Outcome::Unknown if held == 0 => v.unknown_absent += 1,
            // Partly held: already counted as divergence.
            Outcome::Unknown => {}
            Outcome::Failed if held > 0 => v.failed_present += 1,
            Outcome::Failed => {}
        }
    }
    v
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn write(key: &str, value: u64, outcome: Outcome) -> Write {
        Write {
            region: 0,
            node: 0,
            doc: "chaos/0".into(),
            key: key.into(),
            value,
            sent: Duration::ZERO,
            latency: Duration::ZERO,
            outcome,
        }
    }

    fn replica(json: Value) -> Replica {
        let mut r = Replica::new();
        r.insert(
            "chaos/0".into(),
            DocState {
                heads: "h".into(),
                json,
            },
        );
        r
    }

    #[test]
    fn counts_lost_unknown_failed_and_divergent() {
        let writes = [
            write("a", 1, Outcome::Ok),
            write("b", 2, Outcome::Ok),
            write("c", 3, Outcome::Unknown),
            write("d", 4, Outcome::Unknown),
            write("e", 5, Outcome::Failed),
            write("f", 6, Outcome::Ok),
        ];
        // "b" is missing on the second node; "f" has another value there.
        let one = replica(json!({"a": 1, "b": 2, "c": 3, "e": 5, "f": 6}));
        let two = replica(json!({"a": 1, "c": 3, "e": 5, "f": 7}));
        let v = check(&writes, &[one.clone(), two]);
        assert_eq!(v.acked_lost, 2);
        assert_eq!(v.lost_examples, vec!["chaos/0 b", "chaos/0 f"]);
        assert_eq!((v.unknown_present, v.unknown_absent), (1, 1));
        assert_eq!(v.failed_present, 1);
        assert_eq!((v.divergent_replicas, v.divergent_documents), (1, 1));
        let same = check(&writes[..1], &[one.clone(), one]);
        assert_eq!((same.acked_lost, same.divergent_replicas), (0, 0));
    }
}
