//! Reconciliation finds injected drift between Redis counters and ClickHouse, and repairs it.

mod common;

use std::time::Duration;

use common::*;
use redis::AsyncCommands;
use serde_json::json;
use tally_quota::feed;
use tally_quota::reconcile::reconcile;
use tally_rater::Window;
use time::OffsetDateTime;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconciliation_finds_and_repairs_drift() {
    let db = fresh_database("reconcile").await;
    let customer = unique("drifter");
    let start = OffsetDateTime::now_utc() - time::Duration::days(3);
    subscribe(&db, &customer, 1, start, start).await;
    let config = config(&db);
    let q = quota(&config).await;

    // The same events into ClickHouse (the aggregator's path) and into the counters (the
    // feed's path): they agree.
    let now = OffsetDateTime::now_utc();
    let records: Vec<Vec<u8>> = (0..20u64)
        .map(|i| {
            let t = now - time::Duration::seconds(i as i64);
            record(
                &customer,
                &format!("r{i}"),
                "completion",
                t,
                json!({"tokens": 10 + i, "model": "m"}),
            )
        })
        .collect();
    let total: u64 = (0..20u64).map(|i| 10 + i).sum();
    write_to_clickhouse(&config, &records).await;
    let catalog = config.catalog();
    let mut incs = Vec::new();
    for r in &records {
        incs.extend(
            feed::increments(&q, &catalog, &config, r)
                .await
                .expect("resolved"),
        );
    }
    assert_eq!(feed::apply(&q, &incs).await.expect("fed"), (20, 0));
    let clean = reconcile(&q, &config, TENANT, now, Duration::from_millis(100), true)
        .await
        .expect("reconcile");
    assert!(clean.drift.is_empty(), "{clean:?}");
    assert!(clean.counters >= 2, "day and billing period: {clean:?}");

    // Drift: one counter inflated, one lost (as after a Redis restart).
    let windows = ask(&q, &customer, "tokens", 0, false).await.windows;
    assert_eq!(
        windows.iter().map(|w| w.used).collect::<Vec<_>>(),
        vec![total.into(), total.into()]
    );
    let tag = tally_quota::window::customer_tag(TENANT, &customer);
    let day_start = tally_quota::window::fixed_bounds(Window::Day, now, None)
        .expect("day")
        .0;
    let day_key = tally_quota::window::window_key(&tag, "tokens", Window::Day, Some(day_start));
    let mut conn = redis::Client::open(redis_url())
        .expect("url")
        .get_multiplexed_async_connection()
        .await
        .expect("redis");
    let _: i64 = conn.incr(&day_key, 5).await.expect("inflate");
    let period_key = {
        let keys: Vec<String> = conn
            .keys(format!(
                "{}:tokens:billing_period:*",
                tag.replace('{', "\\{").replace('}', "\\}")
            ))
            .await
            .expect("keys");
        assert_eq!(keys.len(), 1, "{keys:?}");
        keys[0].clone()
    };
    let _: i64 = conn.del(&period_key).await.expect("lose");

    let found = reconcile(&q, &config, TENANT, now, Duration::from_millis(200), false)
        .await
        .expect("reconcile");
    let mut drift: Vec<_> = found
        .drift
        .iter()
        .filter(|d| d.customer == customer)
        .map(|d| (d.window, d.redis, d.clickhouse, d.repaired))
        .collect();
    drift.sort_by_key(|d| d.0);
    assert_eq!(
        drift,
        vec![
            (Window::Day, (total + 5).into(), total.into(), false),
            (Window::BillingPeriod, 0.into(), total.into(), false),
        ]
    );
    let untouched: i64 = conn.get(&day_key).await.expect("get");
    assert_eq!(
        untouched,
        (total + 5) as i64,
        "a report alone changes nothing"
    );

    let repaired = reconcile(&q, &config, TENANT, now, Duration::from_millis(200), true)
        .await
        .expect("repair");
    assert_eq!(
        repaired
            .drift
            .iter()
            .filter(|d| d.customer == customer && d.repaired)
            .count(),
        2
    );
    let windows = ask(&q, &customer, "tokens", 0, false).await.windows;
    assert_eq!(
        windows.iter().map(|w| w.used).collect::<Vec<_>>(),
        vec![total.into(), total.into()]
    );
    let ttl: i64 = conn.pttl(&period_key).await.expect("pttl");
    assert!(ttl > 0, "a repaired counter expires like the others");
    let after = reconcile(&q, &config, TENANT, now, Duration::from_millis(100), true)
        .await
        .expect("reconcile");
    assert!(
        after.drift.iter().all(|d| d.customer != customer),
        "{after:?}"
    );
    drop_database(&db).await;
}
