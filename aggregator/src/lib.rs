//! The aggregator stage: Kafka records into exact hourly rollups and raw events in
//! ClickHouse, the usage API over them, and the schema they live in.

pub mod chdb;
pub mod http;
pub mod ledger;
pub mod metrics;
pub mod migrate;
pub mod query;
pub mod rebuild;
pub mod rollup;
pub mod service;
pub mod store;
