//! An edge app embedding the Causeway engine, with no network.
//!
//! A field-inspection device records findings while offline, in its own store.
//! It is restarted (everything acknowledged is still there), then hands its
//! changes to the regional replica and takes the region's in return, the way
//! the networking layer will do it automatically. Run with:
//!
//! ```text
//! cargo run --example edge_app
//! ```

use causeway_engine::automerge::transaction::Transactable;
use causeway_engine::automerge::{ObjType, ReadDoc, ROOT};
use causeway_engine::{DocId, Engine, EngineConfig};
use serde_json::json;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let dir = tempfile::tempdir()?;
    let device_dir = dir.path().join("device");
    let report = DocId::new("inspections/bridge-17")?;

    // Offline: the device writes through the full Automerge transaction API.
    let device = Engine::open(&device_dir, EngineConfig::default())?;
    device.create(&report, |tx| {
        let notes = tx.put_object(ROOT, "notes", ObjType::Text)?;
        tx.splice_text(&notes, 0, 0, "Rust on girder 4.")?;
        tx.put(ROOT, "severity", 2)?;
        Ok(())
    })?;
    println!("device: wrote the report offline");
    drop(device);

    // Restart: the acknowledged write is durable.
    let device = Engine::open(&device_dir, EngineConfig::default())?;
    println!("device after restart: {}", device.get_json(&report)?);

    // The regional replica got its own edit to the same report meanwhile.
    let region = Engine::open(dir.path().join("region"), EngineConfig::default())?;
    region.merge_json(&report, &json!({"assigned_to": "crew-b"}))?;

    // Reconnect: exchange changes in both directions.
    region.apply_changes(&report, &device.changes_since(&report, &[])?)?;
    device.apply_changes(&report, &region.changes_since(&report, &[])?)?;

    // A concurrent text edit on each side merges character by character.
    device.update(&report, |tx| {
        let (_, notes) = tx
            .get(ROOT, "notes")?
            .ok_or(causeway_engine::automerge::AutomergeError::Fail)?;
        tx.splice_text(&notes, 0, 0, "URGENT: ")
    })?;
    region.update(&report, |tx| tx.put(ROOT, "severity", 3))?;
    let since = device.heads(&report)?;
    region.apply_changes(&report, &device.changes_since(&report, &[])?)?;
    device.apply_changes(&report, &region.changes_since(&report, &[])?)?;

    let (a, b) = (device.get_json(&report)?, region.get_json(&report)?);
    println!("device reads: {a}");
    println!("region reads: {b}");
    assert_eq!(a, b, "replicas converge");
    assert_ne!(device.heads(&report)?, since);
    println!(
        "converged: {} changes in the shared history",
        device.info(&report)?.change_count
    );
    Ok(())
}
