//! Every migration, then the usage API's own statements, run through chdb (today's
//! ClickHouse engine in process) by `schemas/check_current_clickhouse.py`: the SQL must hold
//! on current ClickHouse as well as on the local 18.16 server. `make test` provides the
//! Python environment (`TALLY_PYTHON`).

use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::path::Path;

use tally_aggregator::{chdb, query};
use tally_core::{Config, Quantity};

/// Two hours of `tokens` for customer c1, model m1, written the way a flush writes them:
/// 5 at 2026-03-29 00:00 UTC (01:00 in Berlin, CET) and 7 at 23:00 UTC (01:00 on March 30,
/// CEST). Berlin's March 29 has 23 hours.
fn ledger_rows(tokens: &str) -> String {
    let row = |hour: &str, v: u32| {
        format!(
            "(2, 'demo', 'c1', '{tokens}', toDateTime('{hour}', 'UTC'), ['m1'], 1, {v}, {v}, {v}, {v}, 1, '')"
        )
    };
    format!(
        "INSERT INTO ingest_ledger (kind, tenant, customer, meter, hour, dim_values, d_count, \
         d_sum, d_min, d_max, d_latest, d_latest_at, d_unique) VALUES {}, {}",
        row("2026-03-29 00:00:00", 5),
        row("2026-03-29 23:00:00", 7)
    )
}

/// The rows a query printed: window start, customer, window end, start and end offsets,
/// and the value (parsed: current ClickHouse drops a decimal's trailing zeros, 18.16 keeps
/// them).
type Rows = Vec<(i64, String, i64, i64, i64, Quantity)>;

fn typed(rows: &[Vec<String>]) -> Rows {
    rows.iter()
        .map(|f| {
            // window_start, c, d, value, window_end, start_offset, end_offset
            assert_eq!(f.len(), 7, "{f:?}");
            let int = |s: &str| s.parse::<i64>().unwrap_or_else(|_| panic!("{s} in {f:?}"));
            let value = f[3].parse().unwrap_or_else(|_| panic!("{} in {f:?}", f[3]));
            (
                int(&f[0]),
                f[1].clone(),
                int(&f[4]),
                int(&f[5]),
                int(&f[6]),
                value,
            )
        })
        .collect()
}

#[test]
fn migrations_and_usage_statements_run_on_current_clickhouse() {
    let python = std::env::var("TALLY_PYTHON")
        .expect("TALLY_PYTHON names the test virtualenv's python; run the tests with `make test`");
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let config_path = root.join("config/tally.dev.toml");
    let text = std::fs::read_to_string(&config_path).expect("dev config");
    let catalog = Config::parse(&text, &config_path)
        .expect("parses")
        .catalog();
    let tokens = catalog.meter("tokens").expect("tokens").storage_key();

    let usage = |params: &[(&str, &str)]| {
        let pairs: Vec<(String, String)> = params
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let q = query::parse(&pairs, &catalog).expect("a valid query");
        query::sql(&q, "demo").inlined()
    };
    let mut queries = vec![("ledger".to_owned(), ledger_rows(&tokens))];
    let named: [(&str, Vec<(&str, &str)>); 8] = [
        (
            "berlin_days",
            vec![
                ("meter", "tokens"),
                ("window", "DAY"),
                ("tz", "Europe/Berlin"),
                ("group_by", "customer,model"),
                ("from", "2026-03-28T00:00:00Z"),
                ("to", "2026-04-01T00:00:00Z"),
            ],
        ),
        (
            "berlin_month",
            vec![
                ("meter", "tokens"),
                ("window", "MONTH"),
                ("tz", "Europe/Berlin"),
            ],
        ),
        (
            "berlin_total",
            vec![
                ("meter", "tokens"),
                ("tz", "Europe/Berlin"),
                ("from", "2026-03-28T23:00:00Z"),
                ("to", "2026-03-30T22:00:00Z"),
            ],
        ),
        (
            "plus2_days",
            vec![
                ("meter", "tokens"),
                ("window", "DAY"),
                ("tz", "+02:00"),
                ("group_by", "model"),
            ],
        ),
        (
            "utc_days_daily_rollups",
            vec![("meter", "tokens"), ("window", "DAY"), ("customer", "c1")],
        ),
        (
            "hours_filtered",
            vec![
                ("meter", "tokens"),
                ("window", "HOUR"),
                ("filter", "model:m1"),
            ],
        ),
        (
            "requests_total",
            vec![("meter", "requests"), ("group_by", "endpoint")],
        ),
        (
            "latest_and_unique",
            vec![
                ("meter", "storage_gb"),
                ("window", "MONTH"),
                ("tz", "-05:00"),
            ],
        ),
    ];
    for (name, params) in &named {
        queries.push((name.to_string(), usage(params)));
    }
    queries.push(("unique".to_owned(), usage(&[("meter", "active_users")])));
    let checked = chdb::run(OsStr::new(&python), &queries).unwrap_or_else(|e| panic!("{e}"));
    let stdout = &checked.stdout;
    assert!(
        stdout.contains("migration file(s) on ClickHouse 2"),
        "{stdout}"
    );
    assert!(stdout.contains("ok 10 query(ies)"), "{stdout}");

    let results: BTreeMap<String, Rows> = checked
        .results
        .iter()
        .map(|(name, rows)| (name.clone(), typed(rows)))
        .collect();
    let q = |s: &str| s.parse::<Quantity>().expect("quantity");
    let c1 = || "c1".to_owned();
    let empty = String::new;
    // Berlin's days: March 29 from 00:00+01:00 to March 30 00:00+02:00 (23 hours).
    assert_eq!(
        results["berlin_days"],
        [
            (1_774_738_800, c1(), 1_774_821_600, 3600, 7200, q("5")),
            (1_774_821_600, c1(), 1_774_908_000, 7200, 7200, q("7")),
        ]
    );
    // March in Berlin: from 1 March 00:00+01:00 to 1 April 00:00+02:00.
    assert_eq!(
        results["berlin_month"],
        [(1_772_319_600, empty(), 1_774_994_400, 3600, 7200, q("12"))]
    );
    // A total: the offsets in force at `from` and at `to`.
    assert_eq!(
        results["berlin_total"],
        [(0, empty(), 0, 3600, 7200, q("12"))]
    );
    // +02:00 all year: 00:00 UTC is March 29, 23:00 UTC is March 30.
    assert_eq!(
        results["plus2_days"]
            .iter()
            .map(|r| (r.0, r.5))
            .collect::<Vec<_>>(),
        [(1_774_735_200, q("5")), (1_774_821_600, q("7"))]
    );
    // UTC days without dimensions read usage_daily: both hours are March 29.
    assert_eq!(
        results["utc_days_daily_rollups"]
            .iter()
            .map(|r| (r.0, r.5))
            .collect::<Vec<_>>(),
        [(1_774_742_400, q("12"))]
    );
    assert_eq!(results["hours_filtered"].len(), 2);
    for other in ["requests_total", "latest_and_unique", "unique"] {
        assert!(results[other].is_empty(), "{other}: {:?}", results[other]);
    }
}
