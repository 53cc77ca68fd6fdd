//! # causeway-lab
//!
//! What measures Causeway and what attacks it, kept out of the library an
//! app embeds: the benchmarks behind `causeway bench` ([`bench`]) and the
//! fault-injection harness behind `causeway chaos` ([`chaos`]). Both drive
//! real `causeway node` processes and the engine, through `causeway-node`
//! and `causeway-engine`; neither crate depends on this one.

pub mod bench;
pub mod chaos;
