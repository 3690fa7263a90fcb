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

fn row() -> UsageRow {
    UsageRow {
        window_start: 0,
        c: String::new(),
        d: vec![],
        value: 0,
        window_end: 0,
        start_offset: 0,
        end_offset: 0,
    }
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
        "tz: unknown time zone \"Mars/Olympus\""
    );
    assert_eq!(
        err(&[("meter", "tokens"), ("tz", "+2x")]),
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
fn unique_counts_read_the_tables_that_keep_their_states() {
    let from = |pairs: &[(&str, &str)]| {
        let s = sql(&q(pairs).expect("valid"), "t").text;
        let tables = [
            "rollups_hourly",
            "usage_daily",
            "rollups_unique_hourly",
            "usage_unique_daily",
        ];
        let found: Vec<&str> = tables
            .into_iter()
            .filter(|t| s.contains(&format!("FROM {t} ")))
            .collect();
        assert_eq!(found.len(), 1, "{s}");
        found[0]
    };
    let with = |meter: &'static str, window: &'static str, tz: &'static str| {
        from(&[
            ("meter", meter),
            ("from", "2026-11-01T00:00:00Z"),
            ("to", "2026-12-01T00:00:00Z"),
            ("window", window),
            ("tz", tz),
        ])
    };
    assert_eq!(with("active_users", "DAY", "UTC"), "usage_unique_daily");
    assert_eq!(with("active_users", "HOUR", "UTC"), "rollups_unique_hourly");
    assert_eq!(
        with("active_users", "DAY", "+02:00"),
        "rollups_unique_hourly"
    );
    assert_eq!(with("tokens", "DAY", "UTC"), "usage_daily");
    assert_eq!(with("tokens", "HOUR", "UTC"), "rollups_hourly");
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
        ..row()
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
            ..row()
        }],
    );
    assert_eq!(
        a["data"][0],
        json!({"start": "2026-11-01T00:00:00Z", "end": "2026-11-02T00:00:00Z", "value": "3"})
    );
    assert_eq!(a["aggregation"], "COUNT");
}

#[test]
fn zone_names_are_checked_for_shape_before_use() {
    for ok in [
        "Europe/Berlin",
        "America/Argentina/Buenos_Aires",
        "Etc/GMT+5",
        "UTC",
        "EST5EDT",
    ] {
        assert_eq!(zone_name(ok), Ok(()), "{ok}");
    }
    for bad in [
        "",
        "Europe/",
        "/etc/passwd",
        "Europe/../../etc/passwd",
        "Europe/Berlin'",
        "Europe/Ber lin",
        "5Europe/Berlin",
        &"A".repeat(65),
    ] {
        assert!(zone_name(bad).is_err(), "{bad:?}");
    }
}

#[test]
fn named_zones_are_looked_up_and_refused_by_name() {
    // The system's zone database is there wherever ClickHouse is (`make test` installs
    // tzdata with it).
    let berlin = q(&[
        ("meter", "tokens"),
        ("window", "DAY"),
        ("tz", "Europe/Berlin"),
    ])
    .expect("a zone of the database");
    assert_eq!(berlin.tz, Tz::Zone("Europe/Berlin".into()));
    assert_eq!(
        err(&[("meter", "tokens"), ("tz", "Mars/Olympus_Mons")]),
        "tz: unknown time zone \"Mars/Olympus_Mons\""
    );
    assert!(
        err(&[("meter", "tokens"), ("tz", "Europe/../../etc/passwd")])
            .starts_with("tz: must be UTC, an offset such as +02:00, or a zone name"),
    );
    assert_eq!(
        q(&[("meter", "tokens"), ("tz", "utc")]).expect("utc").tz,
        Tz::Offset(UtcOffset::UTC)
    );
}

#[test]
fn a_named_zone_groups_by_its_own_days_and_reads_the_hours() {
    let query = q(&[
        ("meter", "tokens"),
        ("window", "DAY"),
        ("tz", "Europe/Berlin"),
        ("from", "2026-03-28T23:00:00Z"),
        ("to", "2026-03-30T22:00:00Z"),
    ])
    .expect("valid");
    let s = sql(&query, "demo");
    assert!(
        s.text.starts_with(
            "SELECT toInt64(toStartOfDay(hour, 'Europe/Berlin')) AS window_start, '' AS c"
        ),
        "{}",
        s.text
    );
    assert!(s.text.contains("FROM rollups_hourly"), "{}", s.text);
    assert!(
        s.text.contains(
            "toInt64(toStartOfDay(toDateTime(window_start + 93600, 'Europe/Berlin'))) AS window_end"
        ),
        "{}",
        s.text
    );
    // Even on UTC midnights a zone's days are not the daily rollups' UTC days.
    let month = q(&[("meter", "tokens"), ("window", "MONTH"), ("tz", "Etc/UTC")]).expect("valid");
    assert!(sql(&month, "demo").text.contains("FROM rollups_hourly"));
}

#[test]
fn a_named_zone_shows_each_bound_at_its_own_offset() {
    let query = q(&[
        ("meter", "requests"),
        ("window", "DAY"),
        ("tz", "Europe/Berlin"),
    ])
    .expect("valid");
    // March 29, 2026 in Berlin: 23 hours, from CET into CEST.
    let rows = [UsageRow {
        window_start: 1_774_738_800,
        value: 5_000_000_000,
        window_end: 1_774_821_600,
        start_offset: 3600,
        end_offset: 7200,
        ..row()
    }];
    assert_eq!(check(&query, &rows), Ok(()));
    let a = answer(&query, &rows);
    assert_eq!(a["tz"], "Europe/Berlin");
    assert_eq!(
        a["data"][0],
        json!({"start": "2026-03-29T00:00:00+01:00", "end": "2026-03-30T00:00:00+02:00", "value": "5"})
    );
    // A total shows the requested bounds at the offsets ClickHouse found for them.
    let total = q(&[
        ("meter", "requests"),
        ("tz", "Europe/Berlin"),
        ("from", "2026-03-28T23:00:00Z"),
        ("to", "2026-03-29T22:00:00Z"),
    ])
    .expect("valid");
    let t = answer(
        &total,
        &[UsageRow {
            value: 1_000_000_000,
            start_offset: 3600,
            end_offset: 7200,
            ..row()
        }],
    );
    assert_eq!(
        (&t["data"][0]["start"], &t["data"][0]["end"]),
        (
            &json!("2026-03-29T00:00:00+01:00"),
            &json!("2026-03-30T00:00:00+02:00")
        )
    );
}

#[test]
fn days_in_a_zone_off_the_whole_hour_are_refused_hours_are_not() {
    let rows = [UsageRow {
        start_offset: 19_800,
        end_offset: 19_800,
        ..row()
    }];
    let day = q(&[
        ("meter", "requests"),
        ("window", "DAY"),
        ("tz", "Asia/Kolkata"),
    ])
    .expect("valid");
    let e = check(&day, &rows).expect_err("+05:30 splits UTC hours");
    assert_eq!(e.param, "tz");
    assert!(
        e.reason.starts_with("Asia/Kolkata is +05:30 from UTC"),
        "{e}"
    );
    let hour = q(&[
        ("meter", "requests"),
        ("window", "HOUR"),
        ("tz", "Asia/Kolkata"),
    ])
    .expect("valid");
    assert_eq!(check(&hour, &rows), Ok(()));
    assert_eq!(hm(-12_600), "-03:30");
}

#[test]
fn inlined_statements_fill_binds_in_order_and_escape_strings() {
    let s = Sql {
        text: "a = ? AND b >= toDateTime(?, 'UTC') AND c = ?".into(),
        binds: vec![
            Bind::Str("x'y\\z".into()),
            Bind::Int(7),
            Bind::Str("?".into()),
        ],
    };
    assert_eq!(
        s.inlined(),
        r"a = 'x\'y\\z' AND b >= toDateTime(7, 'UTC') AND c = '?'"
    );
}
