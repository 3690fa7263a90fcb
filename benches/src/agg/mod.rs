//! The aggregator's load bench (`tally-aggbench`, issue 10): its parts.
//!
//! Every figure is measured against a baseline from the same run: the aggregator's drain
//! rate against a bare consumer's on the same pre-filled topic, its CPU per event against a
//! do-it-yourself Kafka → ClickHouse pipeline's, the usage query against the same SQL sent
//! straight to ClickHouse; freshness against its target alone.

pub mod aggregator;
pub mod ch;
pub mod consumers;
pub mod drain;
pub mod freshness;
pub mod query;
pub mod records;
pub mod report;
