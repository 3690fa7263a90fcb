//! tally's rater core: plans as code, pricing, billing periods, invoices and entitlements.
//!
//! Pure logic, no network: the caller supplies plan files (read from a folder), the
//! subscription segments of a period and the usage measured in each; the rater returns
//! exact, reproducible invoice lines. The pipeline that queries ClickHouse and publishes
//! invoices builds on this crate.
//!
//! - [`plan`]: the versioned plan catalog (`config/plans/<plan>/v<N>.toml`), validated at
//!   load, each version with a content digest.
//! - [`pricing`]: per-unit, package, graduated and volume models as pure functions.
//! - [`period`]: billing periods from an anchor, and exact proration fractions.
//! - [`invoice`]: one customer's invoice for one period; the rounding rule lives there.
//! - [`entitlements`]: features and limits of a plan version, and what a migration changes.
//! - [`subscription`]: a customer's subscription as a fold over its change log, and the
//!   rules a new change must pass.
//! - [`store`]: the subscription change log in ClickHouse, read in one query per batch;
//!   plan-version migrations written in bulk, resumable, with an audit record.
//! - [`migration`]: plan-version migrations planned (who moves, when, what changes).
//! - [`kafka`]: a migration's entitlement changes published to `entitlement-changes`.
//! - [`quote`]: `tally-rater price`: one invoice from a plan file and given quantities.
//! - [`run`]: invoice runs over ClickHouse (previews, final runs stored once and published).
//! - [`http`]: `tally-rater serve`: invoice previews over HTTP, health and metrics.
//!
//! Money is `rust_decimal::Decimal`, never a float, and is computed exactly: a result that
//! cannot be held exactly is an error, not a rounded figure.

mod currency;
pub mod entitlements;
mod error;
mod exact;
pub mod http;
pub mod invoice;
pub mod kafka;
pub mod metrics;
pub mod migration;
pub mod period;
pub mod plan;
pub mod pricing;
pub mod quote;
pub mod run;
pub mod schedule;
pub mod store;
mod stored;
pub mod subscription;
pub mod usage;

pub use currency::Currency;
pub use entitlements::{
    diff, EntitlementDiff, Entitlements, FeatureChange, Limit, LimitChange, Window,
};
pub use error::{Error, Result};
pub use invoice::{Invoice, Line, LineKind, Segment, SegmentSummary};
pub use kafka::{Notifier, ENTITLEMENT_TOPIC};
pub use migration::{Effective, MigrationPlan, MigrationPreview, MigrationSpec};
pub use period::{period_containing, Fraction, Interval, Period};
pub use plan::{Catalog, Charge, ChargeKind, PlanVersion, UsageCharge};
pub use pricing::{price, Model, Priced, Tier, TierAmount};
pub use rust_decimal::Decimal;
pub use store::{
    MigrationRecord, MigrationReport, MigrationState, Recorded, RunOptions, RunResult,
    SubscriptionStore,
};
pub use subscription::{Change, ChangeKind, NewChange, SegmentRef, Timeline};
