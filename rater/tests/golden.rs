//! Golden invoices: fixed inputs against the sample plans in `config/plans`, compared byte for
//! byte with `tests/golden/`. After an intended change, rewrite them with
//! `TALLY_BLESS=1 cargo test -p tally-rater --test golden` and review the diff.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use tally_rater::{period_containing, Catalog, Decimal, Interval, Invoice, PlanVersion, Segment};
use time::macros::datetime;
use time::OffsetDateTime;

fn catalog() -> Catalog {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../config/plans");
    Catalog::load_dir(dir).unwrap_or_else(|e| panic!("{e}"))
}

fn plan<'a>(c: &'a Catalog, name: &str, version: u32) -> &'a PlanVersion {
    c.version(name, version)
        .unwrap_or_else(|| panic!("{name} v{version} in config/plans"))
}

fn usage(pairs: &[(&str, &str)]) -> BTreeMap<String, Decimal> {
    pairs
        .iter()
        .map(|(m, q)| {
            (
                (*m).to_owned(),
                Decimal::from_str_exact(q).expect("decimal"),
            )
        })
        .collect()
}

fn golden_path(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/golden")
        .join(name)
}

/// Compares with the golden file, or rewrites it under `TALLY_BLESS=1`.
fn check(name: &str, actual: &str) {
    let path = golden_path(name);
    if std::env::var_os("TALLY_BLESS").is_some_and(|v| v == "1") {
        std::fs::write(&path, actual).expect("write golden file");
        return;
    }
    let expected = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("{}: {e} (TALLY_BLESS=1 writes it)", path.display()));
    assert!(
        expected == actual,
        "{} differs from this run (TALLY_BLESS=1 rewrites it):\n{actual}",
        path.display()
    );
}

fn json(invoice: &Invoice) -> String {
    serde_json::to_string_pretty(invoice).expect("serializable") + "\n"
}

fn amounts(invoice: &Invoice) -> Vec<String> {
    invoice.lines.iter().map(|l| l.amount.to_string()).collect()
}

fn one_segment<'a>(
    p: &'a PlanVersion,
    from: OffsetDateTime,
    to: OffsetDateTime,
    u: &[(&str, &str)],
) -> Segment<'a> {
    Segment {
        from,
        to,
        plan: p,
        usage: Cow::Owned(usage(u)),
    }
}

#[test]
fn starter_full_month() {
    let c = catalog();
    let period = period_containing(
        datetime!(2025-01-01 0:00 UTC),
        Interval::Monthly,
        datetime!(2025-01-20 8:00 UTC),
    )
    .expect("period");
    let seg = one_segment(
        plan(&c, "starter", 1),
        period.start(),
        period.end(),
        &[("requests", "250000"), ("tokens", "1234567")],
    );
    let inv = Invoice::compute("cus_starter", &period, &[seg]).expect("invoice");
    // 9.00; (250000 − 10000) × 0.0005 = 120.00; ⌈1234567 / 1000⌉ = 1235 × 0.02 = 24.70
    assert_eq!(amounts(&inv), ["9.00", "120.00", "24.70"]);
    assert_eq!(inv.total.to_string(), "153.70");
    check("starter_full_month.json", &json(&inv));
}

/// Upgrade from starter v1 to pro v2 on a month-end anchor: the period is
/// [2025-02-28, 2025-03-31), 31 days; starter for 10 of them, pro v2 for 21.
#[test]
fn upgrade_mid_period() {
    let c = catalog();
    let anchor = datetime!(2024-01-31 0:00 UTC);
    let period = period_containing(anchor, Interval::Monthly, datetime!(2025-03-20 0:00 UTC))
        .expect("period");
    assert_eq!(
        (period.start(), period.end()),
        (
            datetime!(2025-02-28 0:00 UTC),
            datetime!(2025-03-31 0:00 UTC)
        )
    );
    let cut = datetime!(2025-03-10 0:00 UTC);
    let segments = [
        one_segment(
            plan(&c, "starter", 1),
            period.start(),
            cut,
            &[("requests", "40000"), ("tokens", "500000")],
        ),
        one_segment(
            plan(&c, "pro", 2),
            cut,
            period.end(),
            &[
                ("requests", "2500000"),
                ("tokens", "15000000"),
                ("storage_gb", "42.5"),
                ("active_users", "57"),
            ],
        ),
    ];
    let inv = Invoice::compute("cus_upgrade", &period, &segments).expect("invoice");

    // The golden file, checked by hand:
    // starter × 10/31
    //   platform  9.00 × 10/31 = 2.9032… → 2.90
    //   requests  included 10000 × 10/31 = 3225.806451613 (9 places);
    //             (40000 − 3225.806451613) × 0.0005 = 18.387… → 18.39
    //   tokens    ⌈500000 / 1000⌉ = 500 × 0.02 = 10.00 (usage is not prorated)
    // pro v2 × 21/31
    //   platform  59.00 × 21/31 = 39.967… → 39.97
    //   requests  included 100000 × 21/31 = 67741.935483871; billable 2432258.064516129:
    //             1000000 × 0.0004 + 1432258.064516129 × 0.0002 = 686.451… → 686.45
    //   tokens    15000000 in the (10M, 100M] tier: × 0.00001 + 5.00 = 155.00;
    //             minimum 10.00 × 21/31 = 6.77 is met
    //   storage   included 10 × 21/31 = 6.774193548; (42.5 − that) × 0.10 = 3.572… → 3.57
    //   seats     5 × 3.00 + 45 × 2.00 + (7 × 1.50 + 10.00) = 125.50
    // subtotal 1041.78; invoice minimum 100.00 × 21/31 = 67.74 is met.
    assert_eq!(
        amounts(&inv),
        ["2.90", "18.39", "10.00", "39.97", "686.45", "155.00", "3.57", "125.50"]
    );
    assert_eq!(inv.subtotal.to_string(), "1041.78");
    assert_eq!(inv.total.to_string(), "1041.78");
    let requests = &inv.lines[4];
    assert_eq!(
        requests.included.map(|d| d.to_string()).as_deref(),
        Some("67741.935483871")
    );
    let tiers: Vec<_> = requests
        .tiers
        .iter()
        .map(|t| t.amount.to_string())
        .collect();
    assert_eq!(tiers, ["400", "286.4516129032258"]);
    let digests: Vec<_> = inv.segments.iter().map(|s| s.digest.as_str()).collect();
    assert_eq!(
        digests,
        [plan(&c, "starter", 1).digest(), plan(&c, "pro", 2).digest()]
    );

    check("upgrade_mid_period.json", &json(&inv));
    check("upgrade_mid_period.csv", &inv.to_csv());
}

/// Light usage on pro v1: the invoice minimum tops the bill up to 100.00.
#[test]
fn pro_v1_invoice_minimum() {
    let c = catalog();
    let period = period_containing(
        datetime!(2025-03-15 12:00 UTC),
        Interval::Monthly,
        datetime!(2025-04-01 0:00 UTC),
    )
    .expect("period");
    let seg = one_segment(
        plan(&c, "pro", 1),
        period.start(),
        period.end(),
        &[
            ("requests", "50000"),
            ("tokens", "1000000"),
            ("storage_gb", "8"),
            ("active_users", "3"),
        ],
    );
    let inv = Invoice::compute("cus_light", &period, &[seg]).expect("invoice");
    // 49.00; requests within the allowance; 1000000 × 0.000015 = 15.00; storage within the
    // allowance; 3 × 2.00; subtotal 70.00 → top-up 30.00.
    assert_eq!(
        amounts(&inv),
        ["49.00", "0.00", "15.00", "0.00", "6.00", "30.00"]
    );
    assert_eq!(inv.subtotal.to_string(), "70.00");
    assert_eq!(inv.total.to_string(), "100.00");
    check("pro_v1_invoice_minimum.json", &json(&inv));
}

/// A subscription starting a third of the way before the period ends, with a charge minimum
/// top-up.
#[test]
fn pro_v2_partial_period() {
    let c = catalog();
    let period = period_containing(
        datetime!(2025-01-01 0:00 UTC),
        Interval::Monthly,
        datetime!(2025-04-25 0:00 UTC),
    )
    .expect("period");
    let seg = one_segment(
        plan(&c, "pro", 2),
        datetime!(2025-04-21 0:00 UTC),
        period.end(),
        &[
            ("tokens", "100000"),
            ("storage_gb", "2"),
            ("active_users", "4"),
        ],
    );
    let inv = Invoice::compute("cus_new", &period, &[seg]).expect("invoice");
    // 10 of 30 days. 59.00 / 3 = 19.67; no requests; 100000 × 0.000015 = 1.50 with a
    // top-up to 10.00 / 3 = 3.33 of 1.83; storage within 3.333333333; 4 × 3.00 = 12.00.
    // subtotal 35.00 ≥ 100.00 / 3 = 33.33.
    assert_eq!(
        amounts(&inv),
        ["19.67", "0.00", "1.50", "1.83", "0.00", "12.00"]
    );
    assert_eq!(inv.total.to_string(), "35.00");
    check("pro_v2_partial_period.json", &json(&inv));
}

#[test]
fn every_golden_file_is_checked() {
    if std::env::var_os("TALLY_BLESS").is_some() {
        return; // the other tests are writing them right now
    }
    let mut names: Vec<String> = std::fs::read_dir(golden_path(""))
        .expect("tests/golden")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(
        names,
        [
            "pro_v1_invoice_minimum.json",
            "pro_v2_partial_period.json",
            "starter_full_month.json",
            "upgrade_mid_period.csv",
            "upgrade_mid_period.json",
        ]
    );
}
