//! The rater benches' customers: `tally-ratebench` fills ClickHouse with this usage and the
//! criterion pricing bench (`benches/pricing.rs`) prices it from memory.

use std::collections::BTreeMap;

use tally_rater::Decimal;

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
