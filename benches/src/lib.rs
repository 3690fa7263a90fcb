//! Load benches of tally's stages.
//!
//! Every figure is a ratio against a baseline measured in the same run: on a shared 2-core
//! machine absolute rates drift by tens of percent between runs, ratios much less.

pub mod agg;
pub mod bare;
pub mod broker;
pub mod collector;
pub mod events;
pub mod load;
pub mod procfs;
pub mod produce;
pub mod quota;
pub mod quota_fresh;
pub mod rate;
pub mod report;
