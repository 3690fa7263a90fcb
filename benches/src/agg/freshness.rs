//! Figure 3: accepted → visible. Single events go through a `tally-ingest` child and a
//! `tally-aggregator run` child on the stack's broker, each for a customer of its own, and
//! the usage API is polled until each customer shows up.
//!
//! One poll asks for every customer at once (`meter=requests&group_by=customer` on a
//! database holding only this phase's events): the same rollups and the same visibility as
//! a per-customer query, at one request per poll instead of one per event in flight, so the
//! probing itself does not load ClickHouse with thousands of queries a second.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use bytes::Bytes;
use http::{Method, StatusCode};
use serde_json::{json, Value};
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;
use tokio::sync::mpsc;

use crate::agg::aggregator::{AggregatorProcess, Target};
use crate::agg::ch::{ClickHouse, Http};
use crate::agg::report::Freshness;
use crate::broker;
use crate::collector::CollectorProcess;
use crate::events::API_KEY;

/// How often the usage API is asked.
const POLL_EVERY: Duration = Duration::from_millis(10);
/// An event not visible this long after it was accepted counts as missing.
const VISIBLE_WITHIN: Duration = Duration::from_secs(10);

/// What the phase needs.
pub struct Setup<'a> {
    pub ingest_bin: &'a Path,
    pub aggregator_bin: &'a Path,
    pub config_path: &'a Path,
    pub partitions: i32,
    pub flush_interval_ms: u64,
    pub ch: &'a ClickHouse,
    pub brokers: &'a str,
    pub dir: &'a Path,
    pub run: &'a str,
}

fn event(id: &str, customer: &str) -> Bytes {
    let time = OffsetDateTime::now_utc()
        .format(&Rfc3339)
        .expect("now formats as RFC 3339");
    let body = json!({
        "id": id,
        "customer": customer,
        "type": "request",
        "time": time,
        "data": {"endpoint": "/v1/chat", "status": 200},
    });
    Bytes::from(body.to_string())
}

/// POSTs one event; the instant its 202 arrived.
async fn send(http: &Http, url: &str, id: &str, customer: &str) -> anyhow::Result<Instant> {
    let (status, body) = http
        .request(Method::POST, url, Some(API_KEY), event(id, customer))
        .await?;
    let at = Instant::now();
    if status != StatusCode::ACCEPTED {
        bail!(
            "collector answered {status}: {}",
            String::from_utf8_lossy(&body)
        );
    }
    Ok(at)
}

/// The customers the usage API shows for `meter=requests` (any non-zero count).
async fn visible(http: &Http, url: &str) -> anyhow::Result<Vec<String>> {
    let (status, body) = http.get(url, Some(API_KEY)).await?;
    if status != StatusCode::OK {
        bail!(
            "usage API answered {status}: {}",
            String::from_utf8_lossy(&body)
        );
    }
    let v: Value = serde_json::from_slice(&body).context("usage answer is not JSON")?;
    Ok(v["data"]
        .as_array()
        .map(|rows| {
            rows.iter()
                .filter(|r| r["value"].as_str().is_some_and(|v| v != "0"))
                .filter_map(|r| r["customer"].as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default())
}

/// Sends `n` events at `per_second` and measures each one's accepted → visible time.
pub async fn measure(s: &Setup<'_>, n: usize, per_second: f64) -> anyhow::Result<Freshness> {
    let topic = format!("aggbench-fresh-{}", s.run);
    let database = format!("aggbench_{}_fresh", s.run);
    broker::create_topic(s.brokers, &topic, s.partitions).await?;
    let collector =
        CollectorProcess::start(s.ingest_bin, s.config_path, s.brokers, &topic, s.dir).await?;
    let target = Target {
        brokers: s.brokers.to_owned(),
        topic: topic.clone(),
        clickhouse_url: s.ch.url.clone(),
        database: database.clone(),
        group: format!("aggbench-{}-fresh", s.run),
    };
    let mut agg = AggregatorProcess::spawn(s.aggregator_bin, s.config_path, &target, s.dir)?;
    let result = async {
        agg.wait_assigned(s.partitions as usize, Duration::from_secs(90))
            .await?;
        run(s, &collector, &agg, n, per_second).await
    }
    .await;
    agg.stop().await;
    collector.stop().await;
    s.ch.drop_database(&database).await;
    result
}

async fn run(
    s: &Setup<'_>,
    collector: &CollectorProcess,
    agg: &AggregatorProcess,
    n: usize,
    per_second: f64,
) -> anyhow::Result<Freshness> {
    let http = Http::new();
    let post_url = Arc::new(format!("http://{}/v1/events", collector.addr));
    let usage_url = format!(
        "http://{}/v1/usage?meter=requests&group_by=customer",
        agg.addr
    );
    let customer = |i: usize| format!("fresh-{}-{i:04}", s.run);

    // One event through the whole path first: connections, metadata, the first flush.
    let warm = format!("fresh-{}-warm", s.run);
    send(&http, &post_url, &warm, &warm).await?;
    let deadline = Instant::now() + Duration::from_secs(30);
    while !visible(&http, &usage_url).await?.contains(&warm) {
        if Instant::now() > deadline {
            bail!("the warm-up event was not visible within 30 s");
        }
        tokio::time::sleep(POLL_EVERY).await;
    }

    let (tx, mut rx) = mpsc::channel::<(String, anyhow::Result<Instant>)>(n.max(1));
    let gap = Duration::from_secs_f64(1.0 / per_second.max(0.1));
    let started = Instant::now();
    let mut next = 0usize;
    let mut accepted: HashMap<String, Instant> = HashMap::new();
    let mut seen: HashMap<String, Instant> = HashMap::new();
    let mut result = Freshness {
        sent: n,
        per_second,
        flush_interval_ms: s.flush_interval_ms,
        ..Freshness::default()
    };
    let mut answered = 0usize;
    let mut stop_at = started + gap * n as u32 + VISIBLE_WITHIN;
    loop {
        while next < n && started.elapsed() >= gap * next as u32 {
            let (http, url, tx, c) = (http.clone(), post_url.clone(), tx.clone(), customer(next));
            tokio::spawn(async move {
                let at = send(&http, &url, &c, &c).await;
                let _ = tx.send((c, at)).await;
            });
            next += 1;
        }
        while let Ok((c, at)) = rx.try_recv() {
            answered += 1;
            match at {
                Ok(at) => {
                    accepted.insert(c, at);
                }
                Err(e) => {
                    result.refused += 1;
                    eprintln!("  freshness: {c} refused: {e:#}");
                }
            }
        }
        let polled = visible(&http, &usage_url).await;
        let now = Instant::now();
        result.polls += 1;
        match polled {
            Ok(customers) => {
                for c in customers {
                    seen.entry(c).or_insert(now);
                }
            }
            Err(e) => eprintln!("  freshness: poll failed: {e:#}"),
        }
        let pending = accepted.keys().filter(|c| !seen.contains_key(*c)).count();
        if next == n && answered == n && pending == 0 {
            break;
        }
        if next == n && answered == n {
            // Every 202 is in: the last one accepted gets its full wait.
            let last = accepted.values().max().copied().unwrap_or(started);
            stop_at = stop_at.min(last + VISIBLE_WITHIN);
        }
        if now > stop_at {
            break;
        }
        tokio::time::sleep(POLL_EVERY).await;
    }
    for (c, at) in &accepted {
        match seen.get(c) {
            Some(v) => result
                .latencies_ms
                .push(v.saturating_duration_since(*at).as_secs_f64() * 1000.0),
            None => result.missing += 1,
        }
    }
    result.refused += n - answered;
    result.latencies_ms.sort_by(f64::total_cmp);
    Ok(result)
}
