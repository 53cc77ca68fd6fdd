//! `causeway demo`: the embedded engine as an edge app uses it, with no network.
//!
//! A point-of-sale terminal records sales while offline, is restarted, finds
//! its data intact, and later merges with the regional replica, which took its
//! own writes to the same document meanwhile. Both end up identical.

use std::path::PathBuf;

use anyhow::{Context, Result};
use causeway_engine::{DocId, Engine, EngineConfig};
use serde_json::json;

/// Runs the demo in `dir`, or in a fresh temporary directory.
pub fn run(dir: Option<PathBuf>) -> Result<()> {
    let temp = tempfile::tempdir().context("cannot create a temporary directory")?;
    let till_dir = dir.unwrap_or_else(|| temp.path().join("till"));
    let region_dir = temp.path().join("region");
    let day = DocId::new("store-12/sales/2026-11-24")?;

    say(format!(
        "opening the till's store in {}",
        till_dir.display()
    ));
    let till = Engine::open(&till_dir, EngineConfig::default())?;
    let first = till.merge_json(
        &day,
        &json!({"sales": [{"sku": "coffee", "cents": 350}], "till": "t1"}),
    )?;
    say(format!(
        "till: recorded a sale offline; durable (fsynced) at heads {}",
        short(&first.heads)
    ));
    till.merge_json(
        &day,
        &json!({"sales": [{"sku": "coffee", "cents": 350}, {"sku": "bagel", "cents": 275}]}),
    )?;
    say("till: recorded a second sale; the terminal now restarts".to_string());
    drop(till);

    let till = Engine::open(&till_dir, EngineConfig::default())?;
    say(format!(
        "till after restart reads: {}",
        till.get_json(&day)?
    ));

    let region = Engine::open(&region_dir, EngineConfig::default())?;
    region.merge_json(&day, &json!({"price_list": "winter", "till": "t1"}))?;
    say("region: meanwhile set the price list on the same document".to_string());

    let to_region = region.apply_changes(&day, &till.changes_since(&day, &[])?)?;
    let to_till = till.apply_changes(&day, &region.changes_since(&day, &[])?)?;
    say(format!(
        "sync: region applied {} changes from the till, the till applied {} from the region",
        to_region.applied, to_till.applied
    ));
    let (a, b) = (till.get_json(&day)?, region.get_json(&day)?);
    say(format!("till reads:   {a}"));
    say(format!("region reads: {b}"));
    anyhow::ensure!(
        a == b && till.heads(&day)? == region.heads(&day)?,
        "replicas did not converge"
    );
    say(format!(
        "converged: both replicas hold heads {}",
        short(&till.heads(&day)?)
    ));
    Ok(())
}

fn say(line: String) {
    println!("demo: {line}");
}

fn short(heads: &[causeway_engine::automerge::ChangeHash]) -> String {
    let parts: Vec<String> = heads
        .iter()
        .map(|h| h.to_string()[..12].to_string())
        .collect();
    format!("[{}]", parts.join(", "))
}
