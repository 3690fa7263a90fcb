//! The aggregator stage. So far: the versioned ClickHouse schema it writes into.

pub mod migrate;
pub mod rollup;
