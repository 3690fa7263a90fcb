use super::*;
use tally_core::Config;

fn catalog() -> Catalog {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../config/tally.dev.toml");
    let text = std::fs::read_to_string(&path).expect("dev config");
    Config::parse(&text, &path).expect("parses").catalog()
}

fn q(pairs: &[(&str, &str)]) -> Result<UsageQuery, BadParam> {
    let pairs: Vec<(String, String)> = pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    parse(&pairs, &catalog())
}

fn err(pairs: &[(&str, &str)]) -> String {
    q(pairs).expect_err("refused").to_string()
}

#[test]
fn bad_parameters_are_named() {
    assert_eq!(err(&[]), "meter: required");
    assert_eq!(err(&[("meter", "nope")]), "meter: no meter \"nope\"");
    assert_eq!(
        err(&[("meter", "tokens"), ("window", "WEEK")]),
        "window: must be HOUR, DAY, MONTH or absent"
    );
    assert_eq!(
        err(&[("meter", "tokens"), ("from", "yesterday")]),
        "from: \"yesterday\" is not an RFC 3339 timestamp"
    );
    assert_eq!(
        err(&[("meter", "tokens"), ("from", "2026-11-24T10:30:00Z")]),
        "from: must fall on a whole hour (usage is kept per hour)"
    );
    assert_eq!(
        err(&[
            ("meter", "tokens"),
            ("from", "2026-11-24T10:00:00Z"),
            ("to", "2026-11-24T10:00:00Z")
        ]),
        "to: must be after from"
    );
    assert_eq!(
        err(&[("meter", "tokens"), ("tz", "+05:30")]),
        "tz: only whole-hour offsets are supported"
    );
    assert_eq!(
        err(&[("meter", "tokens"), ("tz", "Mars/Olympus")]),
        "tz: must be UTC or an offset such as +02:00"
    );
    assert_eq!(
        err(&[("meter", "tokens"), ("group_by", "endpoint")]),
        "group_by: meter tokens has no dimension \"endpoint\""
    );
    assert_eq!(
        err(&[("meter", "tokens"), ("filter", "model")]),
        "filter: must be <dimension>:<value>"
    );
    assert_eq!(
        err(&[("meter", "tokens"), ("limit", "5")]),
        "limit: unknown parameter"
    );
    assert_eq!(
        err(&[("meter", "tokens"), ("customer", "")]),
        "customer: must not be empty"
    );
}

#[test]
fn sql_groups_windows_dimensions_and_filters() {
    let query = q(&[
        ("meter", "tokens"),
        ("customer", "c1"),
        ("from", "2026-11-01T00:00:00+02:00"),
        ("to", "2026-12-01T00:00:00+02:00"),
        ("window", "day"),
        ("tz", "+02:00"),
        ("group_by", "model,customer"),
        ("filter[model]", "a"),
        ("filter", "model:b"),
    ])
    .expect("valid");
    let s = sql(&query, "demo");
    assert!(s.text.starts_with("SELECT toInt64(toStartOfDay(hour + (7200))) - (7200) AS window_start, customer AS c, [dim_values[1]] AS d, sumMerge(value_sum) AS value"), "{}", s.text);
    assert!(s.text.contains("WHERE tenant = ? AND meter = ? AND customer = ? AND hour >= toDateTime(?, 'UTC') AND hour < toDateTime(?, 'UTC') AND dim_values[1] IN (?, ?)"), "{}", s.text);
    assert_eq!(
        s.binds,
        [
            Bind::Str("demo".into()),
            Bind::Str(catalog().meter("tokens").expect("tokens").storage_key()),
            Bind::Str("c1".into()),
            Bind::Int(1_793_484_000),
            Bind::Int(1_796_076_000),
            Bind::Str("a".into()),
            Bind::Str("b".into()),
        ]
    );
    let total = sql(&q(&[("meter", "active_users")]).expect("valid"), "t");
    assert!(total.text.contains("toInt64(0) AS window_start, '' AS c, emptyArrayString() AS d, toDecimal128(uniqExactMerge(value_unique), 9)"), "{}", total.text);
}

#[test]
fn days_months_and_totals_in_utc_without_dimensions_read_the_daily_rollups() {
    let table = |pairs: &[(&str, &str)]| {
        let s = sql(&q(pairs).expect("valid"), "t").text;
        match (
            s.contains("FROM usage_daily"),
            s.contains("FROM rollups_hourly"),
        ) {
            (true, false) => "daily",
            (false, true) => "hourly",
            _ => panic!("{s}"),
        }
    };
    let utc = [
        ("meter", "tokens"),
        ("from", "2026-11-01T00:00:00Z"),
        ("to", "2026-12-01T00:00:00Z"),
    ];
    let with = |extra: &[(&'static str, &'static str)]| {
        let mut p = utc.to_vec();
        p.extend_from_slice(extra);
        table(&p)
    };
    assert_eq!(with(&[]), "daily");
    assert_eq!(
        with(&[("window", "DAY"), ("group_by", "customer")]),
        "daily"
    );
    assert_eq!(with(&[("window", "MONTH"), ("customer", "c1")]), "daily");
    assert_eq!(table(&[("meter", "tokens"), ("window", "MONTH")]), "daily");
    // Hours, dimensions, other offsets and bounds inside a day need the hours.
    assert_eq!(with(&[("window", "HOUR")]), "hourly");
    assert_eq!(with(&[("group_by", "model")]), "hourly");
    assert_eq!(with(&[("filter", "model:a")]), "hourly");
    assert_eq!(with(&[("window", "DAY"), ("tz", "+02:00")]), "hourly");
    assert_eq!(
        table(&[("meter", "tokens"), ("from", "2026-11-01T05:00:00Z")]),
        "hourly"
    );
    assert_eq!(
        table(&[("meter", "tokens"), ("to", "2026-11-02T01:00:00Z")]),
        "hourly"
    );
    let daily = sql(
        &q(&[("meter", "tokens"), ("window", "DAY")]).expect("valid"),
        "t",
    )
    .text;
    assert!(
        daily.starts_with("SELECT toInt64(toStartOfDay(day + (0))) - (0) AS window_start"),
        "{daily}"
    );
}

#[test]
fn answers_use_the_requested_offset_and_exact_values() {
    let query = q(&[
        ("meter", "tokens"),
        ("window", "MONTH"),
        ("tz", "-05:00"),
        ("group_by", "model"),
    ])
    .expect("valid");
    // 2026-11-01T00:00:00-05:00
    let rows = [UsageRow {
        window_start: 1_793_509_200,
        c: String::new(),
        d: vec!["m".into()],
        value: 1_500_000_001,
    }];
    let a = answer(&query, &rows);
    assert_eq!(a["tz"], "-05:00");
    assert_eq!(a["window"], "MONTH");
    assert_eq!(
        a["data"][0],
        json!({"start": "2026-11-01T00:00:00-05:00", "end": "2026-12-01T00:00:00-05:00", "value": "1.500000001", "dimensions": {"model": "m"}})
    );
    let total = q(&[
        ("meter", "requests"),
        ("from", "2026-11-01T00:00:00Z"),
        ("to", "2026-11-02T00:00:00Z"),
    ])
    .expect("valid");
    let a = answer(
        &total,
        &[UsageRow {
            window_start: 0,
            c: String::new(),
            d: vec![],
            value: 3_000_000_000,
        }],
    );
    assert_eq!(
        a["data"][0],
        json!({"start": "2026-11-01T00:00:00Z", "end": "2026-11-02T00:00:00Z", "value": "3"})
    );
    assert_eq!(a["aggregation"], "COUNT");
}
