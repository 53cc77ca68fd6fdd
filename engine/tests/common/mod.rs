//! Helpers shared by the engine's integration tests.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used, missing_docs)]

use causeway_engine::{DocId, Durability, Engine, EngineConfig};
use tempfile::TempDir;

/// A fresh store in a temporary directory.
pub fn fresh() -> (TempDir, Engine) {
    let dir = tempfile::tempdir().expect("tempdir");
    let engine = Engine::open(dir.path(), buffered()).expect("open");
    (dir, engine)
}

/// Default configuration with `Buffered` durability, to keep tests fast where
/// durability is not what they check.
pub fn buffered() -> EngineConfig {
    EngineConfig {
        durability: Durability::Buffered,
        ..EngineConfig::default()
    }
}

/// Reopens the store in `dir` after dropping `engine`.
pub fn reopen(dir: &TempDir, engine: Engine, config: EngineConfig) -> Engine {
    drop(engine);
    Engine::open(dir.path(), config).expect("reopen")
}

pub fn id(s: &str) -> DocId {
    DocId::new(s).expect("valid id")
}
