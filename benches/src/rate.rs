//! The rater benches' customers: `tally-ratebench` fills ClickHouse with this usage and the
//! criterion pricing bench (`benches/pricing.rs`) prices it from memory.
//!
//! Every customer is on the bench's own plan (`benches/plans/bench/v1.toml`): a flat fee,
//! five usage charges priced by graduated tiers (the shape the rater's target names) and an
//! invoice minimum. Its fifth meter, `gpu_seconds`, is not in the development catalog:
//! [`config`] adds it.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::Context;
use tally_core::Config;
use tally_rater::run::Billable;
use tally_rater::subscription::SegmentRef;
use tally_rater::{Catalog, Decimal, Period};

/// The plan and version every bench customer is on.
pub const PLAN: (&str, u32) = ("bench", 1);

/// What the bench prints to say what it invoices.
pub const SHAPE: &str =
    "plan bench v1: a flat fee, 5 usage charges with graduated tiers, an invoice minimum";

/// The meter the bench adds to the development catalog.
const GPU_METER: &str = r#"
[[meters]]
key = "gpu_seconds"
event_type = "gpu"
aggregation = "SUM"
value = "seconds"
description = "GPU seconds (bench only)"
"#;

/// The workspace root.
pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The development configuration with the bench's fifth meter.
pub fn config() -> anyhow::Result<Config> {
    let path = root().join("config/tally.dev.toml");
    let text = std::fs::read_to_string(&path).with_context(|| format!("{}", path.display()))?;
    Ok(Config::parse(&format!("{text}\n{GPU_METER}"), &path)?)
}

/// The bench's plan catalog.
pub fn plans() -> anyhow::Result<Catalog> {
    Ok(Catalog::load_dir(root().join("benches/plans"))?)
}

/// Customer `n` (`c<n>`) on [`PLAN`] for the whole of `period`.
pub fn billable(n: u64, period: Period) -> Billable {
    Billable {
        customer: format!("c{n}"),
        period,
        segments: vec![SegmentRef {
            from: period.start(),
            to: period.end(),
            plan: PLAN.0.into(),
            version: PLAN.1,
        }],
        previous: None,
    }
}

/// Customer `n`'s usage by meter. `tally-ratebench` writes the same values as rollups:
/// each expression of [`FILL`] is this function's, in SQL over `number` = `n`.
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
        ("active_users".to_owned(), Decimal::from(n % 12 + 1)),
        (
            "gpu_seconds".to_owned(),
            Decimal::from(600 + n * 7 % 60_000),
        ),
    ])
}

/// How `tally-ratebench` fills a customer's hourly rollup rows (the last of its `--hours`
/// holds the usage), as SQL over `number` (the customer's `n`): (meter, events, sum, latest, the distinct values counted,
/// as an `Array(String)`). Every state column is filled, as the aggregator's view fills
/// them; each meter reads its own.
pub const FILL: [(&str, &str, &str, &str, &str); 5] = [
    (
        "requests",
        "100000 + number * 37 % 2000000",
        "0",
        "0",
        "['u']",
    ),
    ("tokens", "1", "1000000 + number % 50000000", "0", "['u']"),
    (
        "storage_gb",
        "1",
        "0",
        "toDecimal128(number % 10000, 9) / 100",
        "['u']",
    ),
    (
        "active_users",
        "number % 12 + 1",
        "0",
        "0",
        "arrayMap(x -> toString(x), range(toUInt64(number % 12 + 1)))",
    ),
    ("gpu_seconds", "1", "600 + number * 7 % 60000", "0", "['u']"),
];

#[cfg(test)]
mod tests {
    use super::*;
    use tally_rater::plan::ChargeKind;
    use tally_rater::pricing::Model;

    #[test]
    fn the_bench_plan_has_the_shape_it_claims() {
        let plans = plans().expect("bench plans load");
        let plan = plans.version(PLAN.0, PLAN.1).expect("the bench plan");
        let config = config().expect("the bench config parses");
        let catalog = config.catalog();
        let mut usage = Vec::new();
        for charge in plan.charges() {
            if let ChargeKind::Usage(u) = &charge.kind {
                assert!(
                    matches!(u.model, Model::Graduated { .. }),
                    "{} is not graduated",
                    charge.id
                );
                assert!(
                    catalog.meter(&u.meter).is_some(),
                    "{} has no meter",
                    u.meter
                );
                usage.push(u.meter.clone());
            }
        }
        assert_eq!(usage.len(), 5, "five usage charges");
        // The usage the benches hold and the rollups the ratebench writes cover those meters.
        let held: Vec<String> = usage_of(0).into_keys().collect();
        let filled: Vec<String> = FILL.iter().map(|f| f.0.to_owned()).collect();
        usage.sort();
        for (what, mut meters) in [("usage_of", held), ("FILL", filled)] {
            meters.sort();
            assert_eq!(meters, usage, "{what}");
        }
    }
}
