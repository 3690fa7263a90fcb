//! tally's quota service: near-real-time counters in Redis and the gateway check.
//!
//! - [`algo`]: the counting rules (GCRA for per-second/minute rates, fixed counters for hour,
//!   day and billing-period quotas) as pure functions.
//! - [`window`]: keys (hash-tagged per customer), window bounds and units.
//! - [`script`]: the Lua scripts: check-and-consume, and counting an ingested event once.
//! - [`resolve`]: the limits in force, from the rater's subscription log and plan catalog.
//! - [`quota`]: the library a gateway embeds: pipelined batches on one multiplexed
//!   connection, fail-open/closed per meter with an in-process fallback limiter.

pub mod algo;
pub mod fallback;
pub mod feed;
pub mod http;
pub mod invalidate;
pub mod metrics;
pub mod quota;
pub mod reconcile;
pub mod resolve;
pub mod script;
pub mod window;

pub use quota::{
    Answered, Check, CheckError, CountedFrom, Decision, MeterPolicy, Quota, WindowState,
};
pub use resolve::{NoSubscription, Resolver, Source};
