//! Golden invoices: fixed inputs against the sample plans in `config/plans`, compared byte for
//! byte with `tests/golden/`. After an intended change, rewrite them with
//! `TALLY_BLESS=1 cargo test -p tally-rater --test golden` and review the diff.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use tally_rater::run;
use tally_rater::subscription::Admission;
use tally_rater::{
    period_containing, Catalog, Change, ChangeKind, Decimal, Interval, Invoice, NewChange,
    PlanVersion, Segment, Timeline,
};
use time::macros::datetime;
use time::OffsetDateTime;

/// A yearly plan: $1,200 a year and 1,000,000 requests included per full year.
const ANNUAL: &str = r#"
plan = "annual"
version = 1
currency = "USD"
interval = "yearly"

[[charges]]
id = "platform"
type = "flat"
price = "1200.00"

[[charges]]
id = "requests"
type = "usage"
meter = "requests"
included = "1000000"
model = "per_unit"
price = "0.001"
"#;

/// `config/plans` and the yearly plan above, as one catalog.
fn catalog_with_annual() -> Catalog {
    let dir = std::env::temp_dir().join(format!("tally-golden-plans-{}", std::process::id()));
    let plans = Path::new(env!("CARGO_MANIFEST_DIR")).join("../config/plans");
    for entry in std::fs::read_dir(&plans).expect("config/plans") {
        let folder = entry.expect("entry").path();
        let name = folder.file_name().expect("name").to_owned();
        std::fs::create_dir_all(dir.join(&name)).expect("plan folder");
        for file in std::fs::read_dir(&folder).expect("plan folder") {
            let file = file.expect("file").path();
            std::fs::copy(&file, dir.join(&name).join(file.file_name().expect("name")))
                .expect("copy");
        }
    }
    std::fs::create_dir_all(dir.join("annual")).expect("plan folder");
    std::fs::write(dir.join("annual/v1.toml"), ANNUAL).expect("annual plan");
    let catalog = Catalog::load_dir(&dir).unwrap_or_else(|e| panic!("{e}"));
    std::fs::remove_dir_all(&dir).ok();
    catalog
}

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

/// A subscription's log as the store would hold it, for the run's own placement
/// (`run::billable`): `(kind, effective_at, plan, version)`, anchored at `anchor`.
fn timeline(
    anchor: OffsetDateTime,
    changes: &[(ChangeKind, OffsetDateTime, &str, u32)],
) -> Timeline {
    let log = changes
        .iter()
        .enumerate()
        .map(|(i, (kind, at, plan, version))| Change {
            tenant: "t".into(),
            customer: "cus".into(),
            change_id: format!("c{i}"),
            kind: *kind,
            effective_at: *at,
            recorded_at: *at,
            plan: (*plan).into(),
            version: *version,
            billing_anchor: anchor,
            actor: "golden".into(),
            reason: String::new(),
            migration_id: String::new(),
        });
    Timeline::new("cus", log)
}

/// The invoice of the period holding `at`, each segment's usage given in order.
fn invoice_at(
    c: &Catalog,
    t: &Timeline,
    at: OffsetDateTime,
    usage_per_segment: &[&[(&str, &str)]],
) -> Invoice {
    let placed = run::billable(t, c, at)
        .expect("in force")
        .unwrap_or_else(|(who, why)| panic!("{who}: {why}"));
    assert_eq!(placed.segments.len(), usage_per_segment.len(), "segments");
    let segments: Vec<Segment<'_>> = placed
        .segments
        .iter()
        .zip(usage_per_segment)
        .map(|(s, u)| one_segment(plan(c, &s.plan, s.version), s.from, s.to, u))
        .collect();
    Invoice::compute("cus", &placed.period, &segments).expect("invoice")
}

/// February of a leap year has 29 days, so 10 of them are 10/29 of the fees and allowances;
/// the same 10 days of a common year's February are 10/28.
#[test]
fn a_partial_february_in_a_leap_year_and_a_common_one() {
    let c = catalog();
    let anchor = datetime!(2024-01-01 0:00 UTC);
    let t = timeline(
        anchor,
        &[(
            ChangeKind::Create,
            datetime!(2024-02-20 0:00 UTC),
            "starter",
            1,
        )],
    );
    let inv = invoice_at(
        &c,
        &t,
        datetime!(2024-02-25 0:00 UTC),
        &[&[("requests", "20000")]],
    );
    assert_eq!(
        (inv.period_start, inv.period_end),
        (
            datetime!(2024-02-01 0:00 UTC),
            datetime!(2024-03-01 0:00 UTC)
        )
    );
    // 9.00 × 10/29 = 3.1034… → 3.10; allowance 10000 × 10/29 = 3448.275862069 (9 places),
    // (20000 − 3448.275862069) × 0.0005 = 8.2758… → 8.28; no tokens.
    assert_eq!(amounts(&inv), ["3.10", "8.28", "0.00"]);
    assert_eq!(
        inv.lines[1].included.map(|d| d.to_string()).as_deref(),
        Some("3448.275862069")
    );
    assert_eq!(inv.total.to_string(), "11.38");
    assert_eq!(
        (
            inv.segments[0].seconds.to_string(),
            inv.segments[0].period_seconds.to_string()
        ),
        ((10 * 86_400).to_string(), (29 * 86_400).to_string())
    );

    let t = timeline(
        anchor,
        &[(
            ChangeKind::Create,
            datetime!(2025-02-19 0:00 UTC),
            "starter",
            1,
        )],
    );
    let inv = invoice_at(
        &c,
        &t,
        datetime!(2025-02-25 0:00 UTC),
        &[&[("requests", "20000")]],
    );
    // 9.00 × 10/28 = 3.2142… → 3.21; 10000 × 10/28 = 3571.428571429;
    // 16428.571428571 × 0.0005 = 8.2142… → 8.21.
    assert_eq!(amounts(&inv), ["3.21", "8.21", "0.00"]);
    assert_eq!(inv.total.to_string(), "11.42");
    check(
        "leap_february_partial.json",
        &json(&invoice_at(
            &c,
            &timeline(
                anchor,
                &[(
                    ChangeKind::Create,
                    datetime!(2024-02-20 0:00 UTC),
                    "starter",
                    1,
                )],
            ),
            datetime!(2024-02-20 0:00 UTC),
            &[&[("requests", "20000")]],
        )),
    );
}

/// A yearly plan: $1,200 a year and 1,000,000 requests included per full year, started on
/// March 1 of a leap year with the anchor on January 1: 306 of the year's 366 days.
#[test]
fn a_yearly_plan_started_mid_year_in_a_leap_year() {
    let annual = PlanVersion::parse(Path::new("annual/v1.toml"), ANNUAL.as_bytes())
        .unwrap_or_else(|e| panic!("{e}"));
    let period = period_containing(
        datetime!(2024-01-01 0:00 UTC),
        Interval::Yearly,
        datetime!(2024-03-01 0:00 UTC),
    )
    .expect("period");
    assert_eq!(period.end(), datetime!(2025-01-01 0:00 UTC));
    let seg = one_segment(
        &annual,
        datetime!(2024-03-01 0:00 UTC),
        period.end(),
        &[("requests", "2000000")],
    );
    let inv = Invoice::compute("cus_annual", &period, &[seg]).expect("invoice");
    // 1200.00 × 306/366 = 1003.2786… → 1003.28; allowance 1000000 × 306/366 =
    // 836065.573770492; (2000000 − that) × 0.001 = 1163.9344… → 1163.93.
    assert_eq!(amounts(&inv), ["1003.28", "1163.93"]);
    assert_eq!(
        inv.lines[1].included.map(|d| d.to_string()).as_deref(),
        Some("836065.573770492")
    );
    assert_eq!(inv.total.to_string(), "2167.21");
    assert_eq!(
        inv.segments[0].period_seconds.to_string(),
        (366 * 86_400).to_string()
    );
    // The next year is a common one: a full period bills the whole fee.
    let next = period.next().expect("next period");
    assert_eq!(next.end(), datetime!(2026-01-01 0:00 UTC));
    let full = Invoice::compute(
        "cus_annual",
        &next,
        &[one_segment(
            &annual,
            next.start(),
            next.end(),
            &[("requests", "999999")],
        )],
    )
    .expect("invoice");
    assert_eq!(amounts(&full), ["1200.00", "0.00"]);
    check("yearly_leap_year_start.json", &json(&inv));
}

/// A change on the last day of April: starter for 29 of 30 days, pro v2 for one. A change at
/// the first instant of May leaves April whole on its plan and May whole on the next.
#[test]
fn changes_on_the_last_and_the_first_day() {
    let c = catalog();
    let anchor = datetime!(2025-01-01 0:00 UTC);
    let t = timeline(
        anchor,
        &[
            (ChangeKind::Create, anchor, "starter", 1),
            (ChangeKind::Change, datetime!(2025-04-30 0:00 UTC), "pro", 2),
        ],
    );
    let inv = invoice_at(
        &c,
        &t,
        datetime!(2025-04-10 0:00 UTC),
        &[&[("requests", "30000")], &[("requests", "5000")]],
    );
    // starter × 29/30: 8.70; allowance 9666.666666667, 20333.333333333 × 0.0005 → 10.17;
    // tokens 0.00. pro v2 × 1/30: 59.00 / 30 → 1.97; allowance 3333.333333333,
    // 1666.666666667 × 0.0004 → 0.67; tokens 0.00 with its minimum 10.00 / 30 → 0.33 topped
    // up; storage 0.00; seats 0.00. Invoice minimum 100.00 / 30 = 3.33 is met by 21.84.
    assert_eq!(
        amounts(&inv),
        ["8.70", "10.17", "0.00", "1.97", "0.67", "0.00", "0.33", "0.00", "0.00"]
    );
    assert_eq!(inv.total.to_string(), "21.84");

    let t = timeline(
        anchor,
        &[
            (ChangeKind::Create, anchor, "starter", 1),
            (ChangeKind::Change, datetime!(2025-05-01 0:00 UTC), "pro", 2),
        ],
    );
    let april = invoice_at(&c, &t, datetime!(2025-04-30 23:59:59 UTC), &[&[]]);
    assert_eq!(amounts(&april), ["9.00", "0.00", "0.00"]);
    let may = invoice_at(&c, &t, datetime!(2025-05-01 0:00 UTC), &[&[]]);
    // 59.00; nothing used; the tokens minimum 10.00 topped up; 69.00 < 100.00 → 31.00.
    assert_eq!(
        amounts(&may),
        ["59.00", "0.00", "0.00", "10.00", "0.00", "0.00", "31.00"]
    );
    assert_eq!(may.segments.len(), 1);
    assert_eq!(may.total.to_string(), "100.00");
}

/// Three plans and a cancel in one 31-day May: starter 7 days, pro v1 12, pro v2 5, then
/// cancelled. Each part is priced by its own plan; the invoice minimum is the sum of each
/// plan's share.
#[test]
fn several_changes_in_one_period() {
    let c = catalog();
    let anchor = datetime!(2025-01-01 0:00 UTC);
    let t = timeline(
        anchor,
        &[
            (ChangeKind::Create, anchor, "starter", 1),
            (ChangeKind::Change, datetime!(2025-05-08 0:00 UTC), "pro", 1),
            (ChangeKind::Change, datetime!(2025-05-20 0:00 UTC), "pro", 2),
            (ChangeKind::Cancel, datetime!(2025-05-25 0:00 UTC), "", 0),
        ],
    );
    let inv = invoice_at(
        &c,
        &t,
        datetime!(2025-05-02 0:00 UTC),
        &[&[("requests", "12000")], &[("tokens", "500000")], &[]],
    );
    // starter × 7/31: 2.03; allowance 2258.064516129, 9741.935483871 × 0.0005 → 4.87; 0.00.
    // pro v1 × 12/31: 49.00 → 18.97; requests within the allowance; 500000 × 0.000015 =
    //   7.50; storage and seats 0.00; invoice minimum share 100.00 × 12/31 → 38.71.
    // pro v2 × 5/31: 59.00 → 9.52; 0.00; tokens 0.00 topped up to 10.00 × 5/31 → 1.61;
    //   0.00; 0.00; invoice minimum share 100.00 × 5/31 → 16.13.
    // subtotal 44.50 < 38.71 + 16.13 = 54.84 → top-up 10.34.
    assert_eq!(
        amounts(&inv),
        [
            "2.03", "4.87", "0.00", "18.97", "0.00", "7.50", "0.00", "0.00", "9.52", "0.00",
            "0.00", "1.61", "0.00", "0.00", "10.34"
        ]
    );
    assert_eq!(inv.subtotal.to_string(), "44.50");
    assert_eq!(inv.total.to_string(), "54.84");
    let shares: Vec<_> = inv.segments.iter().map(|s| s.seconds.to_string()).collect();
    assert_eq!(shares, ["604800", "1036800", "432000"]);
    check("several_changes_in_may.json", &json(&inv));
}

/// Monthly starter from January 31, yearly from March 15, monthly again from September 1.
/// Monthly periods cannot hold a yearly segment, so each interval change ends the period in
/// force there (its fees prorated, like a cancel) and anchors the new interval's periods at
/// the change; each new period's invoice adjusts the cut period's late usage.
#[test]
fn interval_changes_cut_the_period_and_anchor_the_new_interval() {
    let c = catalog_with_annual();
    let anchor = datetime!(2025-01-31 0:00 UTC);
    let (to_yearly, to_monthly) = (
        datetime!(2025-03-15 0:00 UTC),
        datetime!(2025-09-01 0:00 UTC),
    );
    let mut t = Timeline::new("cus", []);
    for (i, request) in [
        NewChange::create("t", "cus", "starter", anchor),
        NewChange::change("t", "cus", "annual", to_yearly),
        NewChange::change("t", "cus", "starter", to_monthly),
    ]
    .into_iter()
    .enumerate()
    {
        let recorded = datetime!(2025-01-01 0:00 UTC) + time::Duration::seconds(i as i64);
        let Admission::New(change) = t.admit(request, &c, recorded).expect("admitted") else {
            panic!("not a duplicate");
        };
        let mut log = t.into_changes();
        log.push(change);
        t = Timeline::new("cus", log);
    }
    let anchors: Vec<_> = t.changes().iter().map(|c| c.billing_anchor).collect();
    assert_eq!(anchors, [anchor, to_yearly, to_monthly]);

    // [Feb 28, Mar 31) on starter until March 15: 15 of 31 days.
    let cut = invoice_at(
        &c,
        &t,
        datetime!(2025-03-10 0:00 UTC),
        &[&[("requests", "12000")]],
    );
    assert_eq!(
        (cut.period_start, cut.period_end),
        (
            datetime!(2025-02-28 0:00 UTC),
            datetime!(2025-03-31 0:00 UTC)
        )
    );
    assert_eq!(cut.segments[0].to, to_yearly);
    // 9.00 × 15/31 = 4.354… → 4.35; allowance 4838.709677419; 7161.290322581 × 0.0005 →
    // 3.58; no tokens.
    assert_eq!(amounts(&cut), ["4.35", "3.58", "0.00"]);
    assert_eq!(cut.total.to_string(), "7.93");

    // The first yearly period starts at the change; it adjusts the cut period's late usage.
    let placed = run::billable(&t, &c, datetime!(2025-06-01 0:00 UTC))
        .expect("in force")
        .expect("placed");
    assert_eq!(
        (placed.period.start(), placed.period.end()),
        (to_yearly, datetime!(2026-03-15 0:00 UTC))
    );
    assert_eq!(placed.segments.last().map(|s| s.to), Some(to_monthly));
    assert_eq!(
        placed.previous.map(|p| (p.start(), p.end())),
        Some((
            datetime!(2025-02-28 0:00 UTC),
            datetime!(2025-03-31 0:00 UTC)
        ))
    );
    let yearly = invoice_at(
        &c,
        &t,
        datetime!(2025-06-01 0:00 UTC),
        &[&[("requests", "500000")]],
    );
    assert_eq!(
        (yearly.period_start, yearly.period_end),
        (to_yearly, datetime!(2026-03-15 0:00 UTC))
    );
    // [Mar 15, Sep 1) is 170 of 365 days: 1200.00 × 170/365 = 558.904… → 558.90;
    // allowance 1000000 × 170/365 = 465753.424657534, (500000 − that) × 0.001 → 34.25.
    assert_eq!(amounts(&yearly), ["558.90", "34.25"]);
    assert_eq!(
        yearly.lines[1].included.map(|d| d.to_string()).as_deref(),
        Some("465753.424657534")
    );

    // Back to monthly: September is a whole starter month.
    let september = invoice_at(&c, &t, datetime!(2025-09-10 0:00 UTC), &[&[]]);
    assert_eq!(
        (september.period_start, september.period_end),
        (to_monthly, datetime!(2025-10-01 0:00 UTC))
    );
    assert_eq!(amounts(&september), ["9.00", "0.00", "0.00"]);

    // The cut period closes at the change, not at its nominal end: a final run a day after
    // the change (24 hours' grace) finds it.
    let closed = run::last_closed(
        &t,
        &c,
        datetime!(2025-03-16 0:00 UTC),
        time::Duration::hours(24),
    )
    .expect("a closed period")
    .expect("placed");
    assert_eq!(closed.period.start(), datetime!(2025-02-28 0:00 UTC));
    assert_eq!(closed.segments.len(), 1);
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
            "leap_february_partial.json",
            "pro_v1_invoice_minimum.json",
            "pro_v2_partial_period.json",
            "several_changes_in_may.json",
            "starter_full_month.json",
            "upgrade_mid_period.csv",
            "upgrade_mid_period.json",
            "yearly_leap_year_start.json",
        ]
    );
}
