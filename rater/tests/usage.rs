//! Usage read for invoices against the real local ClickHouse: events written by the
//! aggregator's own batch and store code, read back per segment through the daily rollups
//! (bounds on UTC midnights), the hourly ones (whole hours) and raw events (bounds inside an
//! hour), and compared with totals computed here from the events themselves.

mod common;

use std::collections::BTreeMap;

use common::*;
use rust_decimal::Decimal;
use tally_rater::usage::{UsageReader, UsageRequest};
use time::macros::datetime;

#[tokio::test]
async fn usage_per_segment_equals_the_events() {
    let db = fresh_database("usage").await;
    let events = events();
    write(&db, &events).await;

    let config = config();
    let reader = UsageReader::new(&db, config.catalog(), config.validation.max_dimension_chars);
    let start = datetime!(2026-10-01 0:00 UTC);
    let end = datetime!(2026-11-01 0:00 UTC);
    let requests = vec![
        // Whole days: read from the daily rollups.
        UsageRequest {
            customer: "alpha".into(),
            bounds: vec![start, datetime!(2026-10-06 0:00 UTC), end],
        },
        // Whole hours: read from the hourly rollups.
        UsageRequest {
            customer: "it's".into(),
            bounds: vec![start, datetime!(2026-10-06 13:00 UTC), end],
        },
        // A `?` in a name is a literal, not a placeholder.
        UsageRequest {
            customer: "what?".into(),
            bounds: vec![start, end],
        },
        // A change inside an hour, to the nanosecond: read from the raw events.
        UsageRequest {
            customer: "beta".into(),
            bounds: vec![
                datetime!(2026-10-02 3:00 UTC),
                datetime!(2026-10-05 10:30:00.000000001 UTC),
                datetime!(2026-10-09 17:45:20 UTC),
            ],
        },
    ];
    let meters = ["requests", "tokens", "storage_gb", "active_users"];
    let got = reader
        .read("demo", &meters, &requests)
        .await
        .expect("usage");
    let got: BTreeMap<_, _> = got.into_iter().collect();
    let want = expected(&events, &requests);
    assert_eq!(got, want);
    assert_eq!(got.len(), 7, "seven segments with usage");
    // The tie at 10:30 falls in beta's first segment; the later record (200) wins.
    assert_eq!(
        got[&("beta".to_owned(), 0)]["storage_gb"],
        Decimal::from(200)
    );
    // Many distinct bounds in one batch (customers without usage, each with a bounds set of
    // its own) switch the read from one branch per bounds set to a join: same answers, by
    // the hour and by the day.
    for step in [time::Duration::HOUR, time::Duration::DAY] {
        let mut many = requests.clone();
        for i in 0..20 {
            many.push(UsageRequest {
                customer: format!("idle-{i}"),
                bounds: vec![start + step * i, end],
            });
        }
        let joined: BTreeMap<_, _> = reader
            .read("demo", &meters, &many)
            .await
            .expect("usage")
            .into_iter()
            .collect();
        assert_eq!(joined, want, "the joined read, idle bounds {step} apart");
    }
    // Each customer read by the hour instead (bounds an hour wider on both sides, where
    // there are no events) gives the same figures as by the day.
    let wider: Vec<UsageRequest> = requests
        .iter()
        .filter(|r| r.customer != "beta")
        .map(|r| {
            let mut b = r.bounds.clone();
            b[0] -= time::Duration::HOUR;
            *b.last_mut().expect("bounds") += time::Duration::HOUR;
            UsageRequest {
                customer: r.customer.clone(),
                bounds: b,
            }
        })
        .collect();
    let by_hour: BTreeMap<_, _> = reader
        .read("demo", &meters, &wider)
        .await
        .expect("usage")
        .into_iter()
        .collect();
    assert_eq!(by_hour, expected(&events, &wider), "read by the hour");
    let daily_part: BTreeMap<_, _> = want
        .iter()
        .filter(|((c, _), _)| c != "beta")
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    assert_eq!(by_hour, daily_part, "by the hour as by the day");
    // Another tenant sees nothing.
    assert!(reader
        .read("acme", &meters, &requests)
        .await
        .expect("usage")
        .is_empty());
    // An unknown meter is refused by name.
    let e = reader
        .read("demo", &["nope"], &requests)
        .await
        .expect_err("unknown");
    assert!(e.to_string().contains("\"nope\""), "{e}");

    drop_database(&db).await;
}
