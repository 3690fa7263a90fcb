//! Errors of the rater.

use std::path::PathBuf;

use rust_decimal::Decimal;
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

use crate::currency::Currency;
use crate::period::Interval;

/// Why a plan could not be loaded, or an amount, period or invoice could not be computed.
///
/// Everything the rater does is a pure function of its inputs, so no variant is cured by
/// retrying: each names the input to fix.
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
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// RFC 3339 for messages; the debug form for the rare instant RFC 3339 cannot show.
fn rfc3339(t: &OffsetDateTime) -> String {
    t.format(&Rfc3339).unwrap_or_else(|_| format!("{t:?}"))
}
