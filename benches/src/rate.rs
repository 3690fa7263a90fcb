//! The rater benches' customers: `tally-ratebench` fills ClickHouse with this usage and the
//! criterion pricing bench (`benches/pricing.rs`) prices it from memory.

use std::collections::BTreeMap;

use tally_rater::run::Billable;
use tally_rater::subscription::SegmentRef;
use tally_rater::{Decimal, Period};

/// Customer `n` (`c<n>`) on `pro` v2 for the whole of `period`.
pub fn billable(n: u64, period: Period) -> Billable {
    Billable {
        customer: format!("c{n}"),
        period,
        segments: vec![SegmentRef {
            from: period.start(),
            to: period.end(),
            plan: "pro".into(),
            version: 2,
        }],
    }
}

/// Customer `n`'s usage by meter; `tally-ratebench`'s fill writes the same expressions.
pub fn usage_of(n: u64) -> BTreeMap<String, Decimal> {
    BTreeMap::from([
        (
            "requests".to_owned(),
            Decimal::from(100_000 + n * 37 % 2_000_000),
        ),
        (
            "tokens".to_owned(),
            Decimal::from(1_000_000 + n % 50_000_000),
        ),
        (
            "storage_gb".to_owned(),
            Decimal::new((n % 10_000) as i64, 2),
        ),
        ("active_users".to_owned(), Decimal::ONE),
    ])
}
