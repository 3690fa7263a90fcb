//! Figure 4: the usage query a dashboard makes — one customer's month, hour by hour — timed
//! through the aggregator's API, against the very same SQL sent straight to ClickHouse
//! (the floor any API over these rollups has).

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use bytes::Bytes;
use http::StatusCode;
use serde_json::Value;
use tally_aggregator::query;
use tally_core::Config;
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

use crate::agg::aggregator::{AggregatorProcess, Target};
use crate::agg::ch::{url_encode, ClickHouse, Http};
use crate::agg::drain::{produce_all, Topic, PROBE_EVERY};
use crate::agg::records;
use crate::agg::report::QueryLatency;
use crate::events::API_KEY;
use crate::produce;

/// What the phase needs: the drained topic and a database the aggregator already filled.
pub struct Setup<'a> {
    pub config: &'a Config,
    pub config_path: &'a Path,
    pub aggregator_bin: &'a Path,
    pub ch: &'a ClickHouse,
    pub dir: &'a Path,
    pub topic: &'a Topic,
    pub database: &'a str,
    pub run: &'a str,
    pub max_phase: Duration,
}

async fn timed<F, Fut>(f: F) -> anyhow::Result<f64>
where
    F: FnOnce() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<(StatusCode, Bytes)>>,
{
    let started = Instant::now();
    let (status, body) = f().await?;
    let ms = started.elapsed().as_secs_f64() * 1000.0;
    if status != StatusCode::OK {
        bail!("{status}: {}", String::from_utf8_lossy(&body));
    }
    Ok(ms)
}

/// Adds `hours` × `per_hour` events of one new customer to the topic, lets a restarted
/// aggregator count them, then times `calls` usage queries each way, interleaved.
pub async fn measure(
    s: &Setup<'_>,
    hours: i64,
    per_hour: usize,
    calls: usize,
) -> anyhow::Result<QueryLatency> {
    let now = OffsetDateTime::now_utc();
    let customer = format!("month-{}", s.run);
    let target = Target {
        brokers: s.topic.brokers.clone(),
        topic: s.topic.name.clone(),
        clickhouse_url: s.ch.url.clone(),
        database: s.database.to_owned(),
        // A group of its own: the aggregator resumes from ClickHouse's checkpoints, never
        // from the group's committed offsets, so this changes nothing but the join.
        group: format!("aggbench-{}-query", s.run),
    };
    let mut agg = AggregatorProcess::spawn(s.aggregator_bin, s.config_path, &target, s.dir)?;
    let result = async {
        agg.wait_assigned(s.topic.ends.len(), Duration::from_secs(90))
            .await?;
        let month = records::month(&customer, hours, per_hour, now);
        let producer = produce::future_producer(&s.config.kafka, &s.topic.brokers)?;
        let mut ends = s.topic.ends.clone();
        produce_all(&producer, &s.topic.name, &month, month.len(), &mut ends).await?;
        agg.wait_caught_up(s.ch, &target, &ends, PROBE_EVERY, s.max_phase)
            .await?;
        time_queries(s, &agg, &customer, hours, now, calls).await
    }
    .await;
    agg.stop().await;
    result
}

async fn time_queries(
    s: &Setup<'_>,
    agg: &AggregatorProcess,
    customer: &str,
    hours: i64,
    now: OffsetDateTime,
    calls: usize,
) -> anyhow::Result<QueryLatency> {
    let top = now.unix_timestamp() - now.unix_timestamp() % 3600;
    let instant = |t: i64| -> anyhow::Result<String> {
        Ok(OffsetDateTime::from_unix_timestamp(t)?.format(&Rfc3339)?)
    };
    let params = [
        ("meter", "tokens".to_owned()),
        ("customer", customer.to_owned()),
        ("window", "HOUR".to_owned()),
        ("from", instant(top - hours * 3600)?),
        ("to", instant(top)?),
    ];
    let query_string: Vec<String> = params
        .iter()
        .map(|(k, v)| format!("{k}={}", url_encode(v)))
        .collect();
    let api_url = format!("http://{}/v1/usage?{}", agg.addr, query_string.join("&"));

    let pairs: Vec<(String, String)> = params
        .iter()
        .map(|(k, v)| ((*k).to_owned(), v.clone()))
        .collect();
    let q = query::parse(&pairs, &s.config.catalog())
        .map_err(|e| anyhow::anyhow!("the bench's usage query is invalid: {e}"))?;
    let sql = query::sql(&q, "demo");
    let direct_sql = format!("{} FORMAT RowBinary", sql.inlined());
    let direct_url = format!("{}/?database={}", s.ch.url, url_encode(s.database));

    let http = Http::new();
    let (status, body) = http.get(&api_url, Some(API_KEY)).await?;
    if status != StatusCode::OK {
        bail!(
            "usage API answered {status}: {}",
            String::from_utf8_lossy(&body)
        );
    }
    let answer: Value = serde_json::from_slice(&body).context("usage answer is not JSON")?;
    let rows = answer["data"].as_array().map_or(0, Vec::len);
    if rows as i64 != hours {
        bail!("the usage API shows {rows} hourly windows for {customer}, {hours} were sent");
    }

    let api = || http.get(&api_url, Some(API_KEY));
    let direct = || http.post(&direct_url, Bytes::from(direct_sql.clone()));
    for _ in 0..10 {
        timed(api).await.context("usage API (warm-up)")?;
        timed(direct).await.context("direct query (warm-up)")?;
    }
    let mut result = QueryLatency {
        hours,
        rows,
        ..QueryLatency::default()
    };
    for _ in 0..calls {
        result.api_ms.push(timed(api).await.context("usage API")?);
        result
            .direct_ms
            .push(timed(direct).await.context("direct query")?);
    }
    result.api_ms.sort_by(f64::total_cmp);
    result.direct_ms.sort_by(f64::total_cmp);
    Ok(result)
}
