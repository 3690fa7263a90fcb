//! The usage read for invoices, statement by statement, on current ClickHouse: the
//! statements `UsageReader::read` sends (by the day, by the hour, from raw events, and the
//! joined form a batch of many distinct periods takes) run through chdb, today's ClickHouse
//! engine in process, by `schemas/check_current_clickhouse.py` after every migration, and
//! their rows are checked. `usage.rs` runs the same reads on the local 18.16 server.

mod common;

use std::ffi::OsStr;

use common::*;
use tally_aggregator::chdb;
use tally_core::Quantity;
use tally_rater::usage::{UsageReader, UsageRequest};
use time::macros::datetime;
use time::OffsetDateTime;

/// Rollup rows the way a flush writes them (through the ledger's views), and raw events.
fn data(tokens: &str) -> Vec<String> {
    let hour = |customer: &str, at: &str, v: u32| {
        format!(
            "(2, 'demo', '{customer}', '{tokens}', toDateTime('{at}', 'UTC'), ['m1'], 1, {v}, {v}, {v}, {v}, 1, '')"
        )
    };
    let mut rows = vec![
        hour("c1", "2026-03-02 10:00:00", 5),
        hour("c1", "2026-03-20 10:00:00", 7),
        // Before c2's first bound, then inside its period.
        hour("c2", "2026-03-29 00:00:00", 3),
        hour("c2", "2026-03-29 05:00:00", 4),
    ];
    rows.extend((0..17).map(|i| hour(&format!("j{i:02}"), "2026-03-25 10:00:00", 1)));
    let raw = |id: &str, at: &str, tokens: u32| {
        format!(
            "('demo', 'c3', '{id}', 'completion', toDateTime('{at}', 'UTC'), 0, now(), '', \
             '{{\"tokens\":{tokens},\"model\":\"m1\"}}', 0, 0)"
        )
    };
    vec![
        format!(
            "INSERT INTO ingest_ledger (kind, tenant, customer, meter, hour, dim_values, d_count, \
             d_sum, d_min, d_max, d_latest, d_latest_at, d_unique) VALUES {}",
            rows.join(", ")
        ),
        format!(
            "INSERT INTO events_raw VALUES {}, {}",
            raw("e1", "2026-03-29 00:10:00", 2),
            raw("e2", "2026-03-29 00:45:00", 9)
        ),
    ]
}

fn request(customer: &str, bounds: &[OffsetDateTime]) -> UsageRequest {
    UsageRequest {
        customer: customer.into(),
        bounds: bounds.to_vec(),
    }
}

#[test]
fn usage_reads_for_invoices_run_on_current_clickhouse() {
    let python = std::env::var("TALLY_PYTHON")
        .expect("TALLY_PYTHON names the test virtualenv's python; run the tests with `make test`");
    let config = config();
    let catalog = config.catalog();
    let tokens = catalog.meter("tokens").expect("tokens").storage_key();
    // Never connected to: only its statements are used.
    let reader = UsageReader::new(
        &database("unused"),
        catalog,
        config.validation.max_dimension_chars,
    );
    let meters = ["requests", "tokens", "storage_gb", "active_users"];
    let april = datetime!(2026-04-01 0:00 UTC);
    let few = [
        // Whole days: usage_daily, two segments.
        request(
            "c1",
            &[
                datetime!(2026-03-01 0:00 UTC),
                datetime!(2026-03-15 0:00 UTC),
                april,
            ],
        ),
        // Whole hours: rollups_hourly.
        request(
            "c2",
            &[
                datetime!(2026-03-29 1:00 UTC),
                datetime!(2026-03-29 23:00 UTC),
            ],
        ),
        // Inside an hour: raw events.
        request(
            "c3",
            &[
                datetime!(2026-03-29 0:30 UTC),
                datetime!(2026-03-30 0:00 UTC),
            ],
        ),
    ];
    // Seventeen distinct periods: past 16, one branch joins the bounds from the batch table.
    let many: Vec<UsageRequest> = (0..17)
        .map(|i| {
            let from = datetime!(2026-03-01 0:00 UTC) + time::Duration::days(i);
            request(&format!("j{i:02}"), &[from, april])
        })
        .collect();

    let mut queries: Vec<(String, String)> = data(&tokens)
        .into_iter()
        .enumerate()
        .map(|(i, sql)| (format!("data{i}"), sql))
        .collect();
    for (name, requests) in [("few", &few[..]), ("many", &many[..])] {
        let statements = reader
            .statements("demo", &meters, requests)
            .expect("statements");
        for (i, sql) in statements.into_iter().enumerate() {
            queries.push((format!("{name}{i}"), sql));
        }
    }
    let results = chdb::run(OsStr::new(&python), &queries)
        .unwrap_or_else(|e| panic!("{e}"))
        .results;
    let q = |s: &str| s.parse::<Quantity>().unwrap_or_else(|_| panic!("{s:?}"));
    // A rollups read: (customer, segment, meter index, value); tokens is meter 1.
    let rollups = |name: &str| -> Vec<(String, String, String, Quantity)> {
        let mut rows: Vec<_> = results[name]
            .iter()
            .map(|f| (f[0].clone(), f[1].clone(), f[2].clone(), q(&f[3])))
            .collect();
        rows.sort_by(|a, b| (&a.0, &a.1).cmp(&(&b.0, &b.1)));
        rows
    };
    let row = |c: &str, seg: &str, v: &str| (c.to_owned(), seg.to_owned(), "1".to_owned(), q(v));
    // few: the day statements (create, insert, select, drop), the hour ones, then raw.
    assert_eq!(rollups("few2"), [row("c1", "1", "5"), row("c1", "2", "7")]);
    assert_eq!(rollups("few6"), [row("c2", "1", "4")]);
    let raw: Vec<(&str, &str)> = results["few8"]
        .iter()
        .map(|f| (f[0].as_str(), f[4].as_str()))
        .collect();
    assert_eq!(raw, [("c3", r#"{"tokens":9,"model":"m1"}"#)]);
    // many: one joined branch, every customer's single segment.
    let joined = rollups("many2");
    assert_eq!(joined.len(), 17, "{joined:?}");
    assert!(
        joined.iter().all(|r| r.1 == "1" && r.3 == q("1")),
        "{joined:?}"
    );
}
