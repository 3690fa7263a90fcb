//! Reconciliation: the quota windows in force now, for meters counted from events, compared
//! with the same windows' totals in ClickHouse (the aggregator's rollups, exact), and drift
//! repaired.
//!
//! Both sides move while they are read (the feed and the aggregator each take up to a
//! couple of seconds), so a difference is only reported when it persists: the counters and
//! the totals are read, then read again after `settle`, and only a difference seen both times,
//! with the same value, is drift. A repair adds the difference (`INCRBY`), never overwrites,
//! so increments that land meanwhile are kept.
//!
//! Meters counted from checks are not reconciled: their usage is the consumption recorded
//! by checks, which ClickHouse does not see.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use redis::AsyncCommands;
use rust_decimal::Decimal;
use serde::Serialize;
use tally_core::{Aggregation, Config};
use tally_rater::usage::{UsageReader, UsageRequest};
use tally_rater::{SubscriptionStore, Window};
use time::OffsetDateTime;

use crate::metrics::{RECONCILE_DRIFT, RECONCILE_REPAIRS};
use crate::quota::{CountedFrom, Quota};
use crate::window::{self, Applied};

/// One counter that disagreed with ClickHouse.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Drift {
    pub customer: String,
    pub meter: String,
    pub window: Window,
    #[serde(with = "time::serde::rfc3339")]
    pub start: OffsetDateTime,
    #[serde(with = "time::serde::rfc3339")]
    pub end: OffsetDateTime,
    pub key: String,
    pub redis: Decimal,
    pub clickhouse: Decimal,
    pub repaired: bool,
}

/// What one reconciliation found.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Report {
    pub tenant: String,
    pub meters: Vec<String>,
    pub customers: usize,
    pub counters: usize,
    pub drift: Vec<Drift>,
}

/// A counter to compare: its window and the ClickHouse total it should hold.
#[derive(Debug, Clone)]
struct Target {
    customer: String,
    meter: String,
    scale: u32,
    applied: Applied,
    start: OffsetDateTime,
    end: OffsetDateTime,
}

/// Compares (and with `repair`, fixes) every event-counted quota window of `tenant` in
/// force at `now`.
pub async fn reconcile(
    quota: &Quota,
    config: &Config,
    tenant: &str,
    now: OffsetDateTime,
    settle: Duration,
    repair: bool,
) -> anyhow::Result<Report> {
    let catalog = config.catalog();
    let meters: Vec<&str> = catalog
        .meters()
        .iter()
        .filter(|m| matches!(m.aggregation, Aggregation::Count | Aggregation::Sum))
        .filter(|m| quota.policy(&m.key).map(|p| p.counted_from) == Some(CountedFrom::Events))
        .map(|m| m.key.as_str())
        .collect();
    let mut report = Report {
        tenant: tenant.to_owned(),
        meters: meters.iter().map(|m| (*m).to_owned()).collect(),
        ..Report::default()
    };
    if meters.is_empty() {
        return Ok(report);
    }
    let customers = customers(quota, config, tenant, &meters, now).await?;
    report.customers = customers.len();
    let mut targets = Vec::new();
    for customer in &customers {
        let timeline = quota.resolver().timeline(tenant, customer).await?;
        let source = quota.resolver().source(&timeline, now)?;
        let tag = window::customer_tag(tenant, customer);
        for meter in &meters {
            let scale = quota.policy(meter).map_or(0, |p| p.scale);
            let limits = source.limits(meter);
            for applied in window::applied(&tag, meter, &limits, scale, now, source.billing()) {
                let Some((start, end)) =
                    window::fixed_bounds(applied.window, now, source.billing())
                else {
                    continue; // rate windows hold a rate, not a total
                };
                targets.push(Target {
                    customer: customer.clone(),
                    meter: (*meter).to_owned(),
                    scale,
                    applied,
                    start,
                    end,
                });
            }
        }
    }
    report.counters = targets.len();
    let first = compare(quota, config, tenant, &targets).await?;
    if first.iter().all(|(r, c)| r == c) {
        metrics_drift(&targets, &[]);
        return Ok(report);
    }
    tokio::time::sleep(settle).await;
    let second = compare(quota, config, tenant, &targets).await?;
    let mut conn = quota.connection();
    for ((t, a), b) in targets.iter().zip(&first).zip(&second) {
        let persistent = a.0 != a.1 && a == b;
        if !persistent {
            continue;
        }
        let (redis, clickhouse) = *b;
        let mut repaired = false;
        if repair {
            let delta = i64::try_from(i128::from(clickhouse) - i128::from(redis))?;
            let _: i64 = conn.incr(&t.applied.key, delta).await?;
            let _: bool = conn
                .pexpire_at(&t.applied.key, i64::try_from(t.applied.expire_at_ms)?)
                .await?;
            metrics::counter!(RECONCILE_REPAIRS, "meter" => t.meter.clone()).increment(1);
            repaired = true;
        }
        tracing::warn!(tenant, customer = %t.customer, meter = %t.meter, window = %t.applied.window,
            redis, clickhouse, repaired, "quota counter drift");
        report.drift.push(Drift {
            customer: t.customer.clone(),
            meter: t.meter.clone(),
            window: t.applied.window,
            start: t.start,
            end: t.end,
            key: t.applied.key.clone(),
            redis: window::from_units(redis, t.scale),
            clickhouse: window::from_units(clickhouse, t.scale),
            repaired,
        });
    }
    metrics_drift(&targets, &report.drift);
    Ok(report)
}

fn metrics_drift(targets: &[Target], drift: &[Drift]) {
    let mut by_meter: BTreeMap<&str, Decimal> = targets
        .iter()
        .map(|t| (t.meter.as_str(), Decimal::ZERO))
        .collect();
    for d in drift {
        *by_meter.entry(d.meter.as_str()).or_default() += (d.redis - d.clickhouse).abs();
    }
    for (meter, units) in by_meter {
        metrics::gauge!(RECONCILE_DRIFT, "meter" => meter.to_owned())
            .set(f64::try_from(units).unwrap_or(f64::MAX));
    }
}

/// (Redis units, ClickHouse units) per target, ClickHouse read in one query per window kind.
async fn compare(
    quota: &Quota,
    config: &Config,
    tenant: &str,
    targets: &[Target],
) -> anyhow::Result<Vec<(u64, u64)>> {
    let mut conn = quota.connection();
    let mut redis_values = Vec::with_capacity(targets.len());
    for chunk in targets.chunks(1_000) {
        let keys: Vec<&str> = chunk.iter().map(|t| t.applied.key.as_str()).collect();
        let values: Vec<Option<u64>> = conn.mget(&keys).await?;
        redis_values.extend(values.into_iter().map(Option::unwrap_or_default));
    }
    let reader = UsageReader::new(
        &config.clickhouse,
        config.catalog(),
        config.validation.max_dimension_chars,
    );
    let mut clickhouse = vec![0u64; targets.len()];
    // One read per window kind: a customer has one window of each kind.
    let kinds: BTreeSet<Window> = targets.iter().map(|t| t.applied.window).collect();
    for kind in kinds {
        let picked: Vec<usize> = (0..targets.len())
            .filter(|&i| targets[i].applied.window == kind)
            .collect();
        let meters: BTreeSet<&str> = picked.iter().map(|&i| targets[i].meter.as_str()).collect();
        let meters: Vec<&str> = meters.into_iter().collect();
        let mut requests: BTreeMap<&str, UsageRequest> = BTreeMap::new();
        for &i in &picked {
            let t = &targets[i];
            requests.entry(&t.customer).or_insert_with(|| UsageRequest {
                customer: t.customer.clone(),
                bounds: vec![t.start, t.end],
            });
        }
        let requests: Vec<UsageRequest> = requests.into_values().collect();
        let table = reader.read(tenant, &meters, &requests).await?;
        for &i in &picked {
            let t = &targets[i];
            let value = table
                .get(&(t.customer.clone(), 0))
                .and_then(|m| m.get(&t.meter))
                .copied()
                .unwrap_or_default();
            clickhouse[i] = window::event_units(value, t.scale).unwrap_or(window::MAX_UNITS);
        }
    }
    Ok(redis_values.into_iter().zip(clickhouse).collect())
}

/// Customers to look at: those subscribed now, those with counters in Redis, and those
/// with usage of the meters in ClickHouse over the last 400 days (the longest period).
async fn customers(
    quota: &Quota,
    config: &Config,
    tenant: &str,
    meters: &[&str],
    now: OffsetDateTime,
) -> anyhow::Result<BTreeSet<String>> {
    let mut out = BTreeSet::new();
    let store = SubscriptionStore::new(&config.clickhouse);
    out.extend(
        store
            .list(tenant, now)
            .await?
            .into_iter()
            .map(|s| s.customer),
    );
    let mut conn = quota.connection();
    let pattern = format!("tq:{{{tenant}/*");
    let mut cursor = 0u64;
    loop {
        let (next, keys): (u64, Vec<String>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(&pattern)
            .arg("COUNT")
            .arg(1_000)
            .query_async(&mut conn)
            .await?;
        out.extend(keys.iter().filter_map(|k| window::customer_of(k, tenant)));
        if next == 0 {
            break;
        }
        cursor = next;
    }
    let catalog = config.catalog();
    let storage: Vec<String> = meters
        .iter()
        .filter_map(|m| catalog.meter(m))
        .map(|m| m.storage_key())
        .collect();
    let client = tally_aggregator::migrate::client(&config.clickhouse);
    let since = now - time::Duration::days(400);
    let rows: Vec<String> = client
        .query("SELECT DISTINCT customer FROM rollups_hourly WHERE tenant = ? AND has(?, meter) AND hour >= toDateTime(?)")
        .bind(tenant)
        .bind(&storage)
        .bind(u32::try_from(since.unix_timestamp()).unwrap_or(0))
        .fetch_all()
        .await?;
    out.extend(rows);
    Ok(out)
}
