//! The automerge-repo sync server in every node: a WebSocket endpoint
//! (`[automerge_repo] path`, default `/automerge-repo`, on the HTTP API's
//! listener) speaking automerge-repo's network protocol version 1, so
//! `@automerge/automerge-repo` and samod clients connect unchanged.
//!
//! * [`wire`]: the CBOR messages, decoded leniently.
//! * [`document_id`]: automerge-repo document ids (bs58check of 16 bytes),
//!   which are Causeway document ids as they are.
//! * [`connection`]: one client: handshake, per-document sync through the
//!   engine, `doc-unavailable`, ephemeral messages, pings.
//! * [`hub`]: what connections share: who asked for which document (so
//!   every change is pushed), the ephemeral relay, figures.
//! * [`config`]: the settings.
//!
//! The HTTP route that upgrades to this endpoint is in
//! `http::automerge_repo`.
//!
//! Documents synced here are ordinary Causeway documents: stored,
//! replicated to every region, visible in the HTTP API. See `docs/api.md`,
//! "automerge-repo clients".

pub mod config;
pub mod connection;
pub mod document_id;
pub mod hub;
pub mod wire;

pub use self::config::RepoConfig;
pub use self::connection::serve;
pub use self::hub::{Hub, RepoStats};
