//! Helpers shared by the integration tests.

pub mod cluster;
pub mod js_client;
