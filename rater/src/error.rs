//! Errors of the rater.

use std::path::PathBuf;

use rust_decimal::Decimal;
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

use crate::currency::Currency;
use crate::period::Interval;

/// Why a plan could not be loaded, an amount, period or invoice could not be computed, or a
/// subscription change was refused.
///
/// Everything the rater computes is a pure function of its inputs, so those variants are
/// not cured by retrying: each names the input to fix. Only the subscription store's
/// ClickHouse variants may be; [`Error::is_retryable`] says which.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A plan folder or file could not be read.
    #[error("{}: {source}", path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    /// The plan folder does not follow the `<plan>/v<N>.toml` layout.
    #[error("{}: {reason}", path.display())]
    Layout { path: PathBuf, reason: String },
    /// One plan version file is invalid; `field` is its path inside the file
    /// (`charges[1].tiers[2].up_to`).
    #[error("{}: plan {plan:?} v{version}: {field}: {reason}", file.display())]
    Plan {
        file: PathBuf,
        plan: String,
        version: u32,
        field: String,
        reason: String,
    },
    /// A pricing model built in code breaks a rule the loader enforces on plan files.
    #[error("{field}: {reason}")]
    InvalidModel { field: String, reason: String },
    /// The input of `tally-rater price` is invalid; `field` is its path (`usage.tokens`).
    #[error("{field}: {reason}")]
    PriceInput { field: String, reason: String },
    #[error("quantity {quantity}: must not be negative")]
    NegativeQuantity { quantity: Decimal },
    /// A result that a `Decimal` (96-bit mantissa, at most 28 decimal places) cannot hold
    /// exactly. Never rounded silently.
    #[error("{what}: result does not fit an exact decimal")]
    Overflow { what: &'static str },
    #[error("{what}: outside the supported calendar (years 1 to 9999)")]
    DateOutOfRange { what: &'static str },
    #[error(
        "[{}, {}) is not inside the period [{}, {})",
        rfc3339(from),
        rfc3339(to),
        rfc3339(start),
        rfc3339(end)
    )]
    OutsidePeriod {
        from: OffsetDateTime,
        to: OffsetDateTime,
        start: OffsetDateTime,
        end: OffsetDateTime,
    },
    #[error("no subscription segment in the period")]
    NoSegments,
    #[error(
        "segment {index}: [{}, {}) is empty or reversed",
        rfc3339(from),
        rfc3339(to)
    )]
    EmptySegment {
        index: usize,
        from: OffsetDateTime,
        to: OffsetDateTime,
    },
    #[error(
        "segment {index}: [{}, {}) is not inside the period [{}, {})",
        rfc3339(from),
        rfc3339(to),
        rfc3339(start),
        rfc3339(end)
    )]
    SegmentOutsidePeriod {
        index: usize,
        from: OffsetDateTime,
        to: OffsetDateTime,
        start: OffsetDateTime,
        end: OffsetDateTime,
    },
    /// Segments must follow each other without gap or overlap.
    #[error("segment {index}: starts at {}, expected {} where segment {} ends", rfc3339(found), rfc3339(expected), index - 1)]
    SegmentNotContiguous {
        index: usize,
        expected: OffsetDateTime,
        found: OffsetDateTime,
    },
    #[error("segment {index}: plan {plan:?} v{version} is in {found}, the invoice in {expected}")]
    CurrencyMismatch {
        index: usize,
        plan: String,
        version: u32,
        expected: Currency,
        found: Currency,
    },
    #[error(
        "segment {index}: plan {plan:?} v{version} is billed {found}, the period is {expected}"
    )]
    IntervalMismatch {
        index: usize,
        plan: String,
        version: u32,
        expected: Interval,
        found: Interval,
    },
    /// A create while the customer's subscription is in force.
    #[error(
        "customer {customer:?} already has a subscription: plan {plan:?} v{version} since {}",
        rfc3339(since)
    )]
    AlreadySubscribed {
        customer: String,
        plan: String,
        version: u32,
        since: OffsetDateTime,
    },
    /// A change, migration or cancel for a customer who has never subscribed.
    #[error("no subscription for customer {customer:?}")]
    NoSubscription { customer: String },
    /// A change, migration or cancel effective before the subscription starts.
    #[error(
        "customer {customer:?}: a change effective at {} is before the subscription starts at {}",
        rfc3339(effective_at),
        rfc3339(start)
    )]
    BeforeStart {
        customer: String,
        effective_at: OffsetDateTime,
        start: OffsetDateTime,
    },
    /// A change, migration or cancel effective after the subscription was cancelled.
    #[error(
        "customer {customer:?}: the subscription was cancelled at {}; nothing can change at {}",
        rfc3339(cancelled_at),
        rfc3339(effective_at)
    )]
    AfterCancel {
        customer: String,
        cancelled_at: OffsetDateTime,
        effective_at: OffsetDateTime,
    },
    /// No plan of that name in the catalog; `version` is the one asked for, if any.
    #[error(
        "plan {plan:?}{}: no such plan in the catalog",
        version.map(|v| format!(" v{v}")).unwrap_or_default()
    )]
    UnknownPlan { plan: String, version: Option<u32> },
    #[error("plan {plan:?} v{version}: no such version in the catalog (latest is v{latest})")]
    UnknownPlanVersion {
        plan: String,
        version: u32,
        latest: u32,
    },
    /// One field of a subscription change is invalid on its own.
    #[error("change {change_id:?}: {field}: {reason}")]
    InvalidChange {
        change_id: String,
        field: &'static str,
        reason: String,
    },
    /// A change id already recorded for the customer, with other content: ids are
    /// idempotency keys, so a different change needs a different id.
    #[error(
        "change id {change_id:?} is already recorded for customer {customer:?} with other content \
         (kind, time, plan, version, anchor or migration)"
    )]
    ChangeIdReused { customer: String, change_id: String },
    /// The change is valid where it stands, but a change recorded for a later instant would
    /// then break a rule (a cancel before a scheduled plan change, say).
    #[error(
        "that would invalidate change {change_id:?} effective at {}: {conflict}",
        rfc3339(effective_at)
    )]
    Invalidates {
        change_id: String,
        effective_at: OffsetDateTime,
        conflict: Box<Error>,
    },
    /// A plan migration's spec is invalid; `field` names the part to fix.
    #[error("migration {id:?}: {field}: {reason}")]
    InvalidMigration {
        id: String,
        field: &'static str,
        reason: String,
    },
    /// A migration id already recorded with another spec: ids are idempotency keys, so a
    /// different migration needs a different id.
    #[error("migration {id:?} is already recorded with another {field} ({recorded})")]
    MigrationIdReused {
        id: String,
        field: &'static str,
        recorded: String,
    },
    /// Publishing a migration's entitlement changes failed; the changes are written and a
    /// rerun of the migration publishes them again.
    #[error("kafka: {0}")]
    Kafka(String),
    /// A published plan version's file changed (`plan_versions`, V12): versions are
    /// immutable.
    #[error(
        "{}: plan {plan:?} v{version} was published with digest {published} (first loaded {}); \
         this file's digest is {found}: publish the change as a new version",
        file.display(),
        rfc3339(first_seen)
    )]
    PlanVersionChanged {
        file: PathBuf,
        plan: String,
        version: u32,
        published: String,
        first_seen: OffsetDateTime,
        found: String,
    },
    #[error("clickhouse: {0}")]
    ClickHouse(#[from] clickhouse::error::Error),
    #[error("clickhouse did not answer within {0:?}")]
    Timeout(std::time::Duration),
}

impl Error {
    /// ClickHouse or Kafka being unreachable or slow clears up by itself; nothing else does.
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            Error::Timeout(_)
                | Error::Kafka(_)
                | Error::ClickHouse(
                    clickhouse::error::Error::Network(_) | clickhouse::error::Error::TimedOut
                )
        )
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// RFC 3339 for messages; the debug form for the rare instant RFC 3339 cannot show.
pub(crate) fn rfc3339(t: &OffsetDateTime) -> String {
    t.format(&Rfc3339).unwrap_or_else(|_| format!("{t:?}"))
}
