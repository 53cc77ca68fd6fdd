//! Helpers shared by the integration tests.

pub mod cluster;
pub mod repo_client;
