//! The aggregator stage. So far: the versioned ClickHouse schema it writes into.

pub mod http;
pub mod metrics;
pub mod migrate;
pub mod query;
pub mod rebuild;
pub mod rollup;
pub mod service;
pub mod store;
