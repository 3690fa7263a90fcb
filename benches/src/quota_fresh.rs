//! The quota bench's freshness figure: accepted by the collector → counted in Redis.
//!
//! Single `completion` events go through a `tally-ingest` collector served in-process, onto a
//! topic of the run's own on the stack's broker, and through `tally_quota::feed` (its own
//! consumer group on that topic) into the quota counters; each event is for a customer of its
//! own. The counters are polled with one non-consuming `check_many` for every customer still
//! pending, until each shows its event's tokens as used. The target (p99 < 2 s) is
//! PRODUCT.md's freshness target: it has no baseline to be a ratio of.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use bytes::Bytes;
use http::{Method, StatusCode};
use serde_json::json;
use tally_core::Config;
use tally_quota::{Answered, Check, Quota};
use tally_rater::Decimal;
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;
use tokio::sync::mpsc;

use crate::agg::ch::Http;
use crate::agg::report::{quantile, Freshness};
use crate::events::API_KEY;

/// The meter the events move: counted from events in the dev configuration.
pub const METER: &str = "tokens";
/// How often the counters are read.
const POLL_EVERY: Duration = Duration::from_millis(10);
/// An event not counted this long after it was accepted counts as missing.
const COUNTED_WITHIN: Duration = Duration::from_secs(10);
/// The freshness target (PRODUCT.md).
pub const TARGET_P99_MS: f64 = 2000.0;

fn event(id: &str, customer: &str, tokens: u64) -> Bytes {
    let time = OffsetDateTime::now_utc()
        .format(&Rfc3339)
        .expect("now formats as RFC 3339");
    let body = json!({
        "id": id,
        "customer": customer,
        "type": "completion",
        "time": time,
        "data": {"tokens": tokens, "model": "bench"},
    });
    Bytes::from(body.to_string())
}

/// POSTs one event; the instant its 202 arrived.
async fn send(
    http: &Http,
    url: &str,
    id: &str,
    customer: &str,
    tokens: u64,
) -> anyhow::Result<Instant> {
    let (status, body) = http
        .request(
            Method::POST,
            url,
            Some(API_KEY),
            event(id, customer, tokens),
        )
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

/// The positions in `pending` (customer, tokens) of those the counters show as counted, by
/// one pipelined non-consuming check.
async fn counted(quota: &Quota, tenant: &str, pending: &[(String, u64)]) -> Vec<usize> {
    let checks: Vec<Check<'_>> = pending
        .iter()
        .map(|(c, _)| Check {
            tenant,
            customer: c,
            meter: METER,
            amount: Decimal::ZERO,
            consume: false,
        })
        .collect();
    quota
        .check_many(&checks)
        .await
        .into_iter()
        .zip(pending)
        .enumerate()
        .filter_map(|(i, (d, (_, tokens)))| match d {
            Ok(d) if d.answered == Answered::Redis && d.used >= Decimal::from(*tokens) => Some(i),
            _ => None,
        })
        .collect()
}

/// The collector and the feed, on a topic and group of their own.
struct Pipeline {
    collector: tally_ingest::Collector,
    stop_feed: tokio::sync::watch::Sender<bool>,
    feed: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl Pipeline {
    async fn start(quota: &Arc<Quota>, config: &Config, run: &str) -> anyhow::Result<Pipeline> {
        let mut config = config.clone();
        config.kafka.topic = format!("quotabench-fresh-{run}");
        config.quota.feed_group = format!("quotabench-fresh-{run}");
        config.collector.listen = "127.0.0.1:0".into();
        config.collector.shutdown_grace_secs = 5;
        tally_service::ensure_topic(&config.kafka, &config.kafka.topic)
            .await
            .with_context(|| format!("creating topic {}", config.kafka.topic))?;
        let collector = tally_ingest::serve(config.clone())
            .await
            .context("starting the collector")?;
        let (stop_feed, stop) = tokio::sync::watch::channel(false);
        let feed = tokio::spawn(tally_quota::feed::run(quota.clone(), config, stop));
        Ok(Pipeline {
            collector,
            stop_feed,
            feed,
        })
    }

    async fn stop(self) {
        self.collector.shutdown().await;
        let _ = self.stop_feed.send(true);
        match self.feed.await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => eprintln!("  freshness: the feed stopped with an error: {e:#}"),
            Err(e) => eprintln!("  freshness: the feed task failed: {e}"),
        }
    }
}

/// Sends `n` events at `per_second` and measures each one's accepted → counted time.
pub async fn measure(
    quota: &Arc<Quota>,
    config: &Config,
    tenant: &str,
    run: &str,
    n: usize,
    per_second: f64,
) -> anyhow::Result<Freshness> {
    let pipeline = Pipeline::start(quota, config, run).await?;
    let result = measure_on(quota, &pipeline, tenant, run, n, per_second).await;
    pipeline.stop().await;
    result
}

async fn measure_on(
    quota: &Arc<Quota>,
    pipeline: &Pipeline,
    tenant: &str,
    run: &str,
    n: usize,
    per_second: f64,
) -> anyhow::Result<Freshness> {
    let http = Http::new();
    let url = Arc::new(format!("http://{}/v1/events", pipeline.collector.addr()));
    let customer = |i: usize| format!("fresh-{run}-{i:05}");
    let tokens = |i: usize| 1_000 + i as u64;

    // The collector answers 503 until it has seen the broker.
    let deadline = Instant::now() + Duration::from_secs(60);
    let ready = format!("http://{}/readyz", pipeline.collector.addr());
    while !matches!(http.get(&ready, None).await, Ok((StatusCode::OK, _))) {
        if Instant::now() > deadline {
            bail!("the collector was not ready within 60 s");
        }
        tokio::time::sleep(POLL_EVERY).await;
    }

    // One event through the whole path first: connections, metadata, the feed's assignment.
    let warm = (format!("fresh-{run}-warm"), 1u64);
    send(&http, &url, &warm.0, &warm.0, warm.1).await?;
    while counted(quota, tenant, std::slice::from_ref(&warm))
        .await
        .is_empty()
    {
        if Instant::now() > deadline {
            bail!("the warm-up event was not counted within 60 s");
        }
        tokio::time::sleep(POLL_EVERY).await;
    }

    let (tx, mut rx) = mpsc::channel::<(usize, anyhow::Result<Instant>)>(n.max(1));
    let gap = Duration::from_secs_f64(1.0 / per_second.max(0.1));
    let started = Instant::now();
    let mut next = 0usize;
    let mut accepted: HashMap<usize, Instant> = HashMap::new();
    let mut seen: HashMap<usize, Instant> = HashMap::new();
    let mut result = Freshness {
        sent: n,
        per_second,
        ..Freshness::default()
    };
    let mut answered = 0usize;
    let mut stop_at = started + gap * n as u32 + COUNTED_WITHIN;
    loop {
        while next < n && started.elapsed() >= gap * next as u32 {
            let (http, url, tx) = (http.clone(), url.clone(), tx.clone());
            let (c, t) = (customer(next), tokens(next));
            let i = next;
            tokio::spawn(async move {
                let at = send(&http, &url, &c, &c, t).await;
                let _ = tx.send((i, at)).await;
            });
            next += 1;
        }
        while let Ok((i, at)) = rx.try_recv() {
            answered += 1;
            match at {
                Ok(at) => {
                    accepted.insert(i, at);
                }
                Err(e) => {
                    result.refused += 1;
                    eprintln!("  freshness: event {i} refused: {e:#}");
                }
            }
        }
        // Sent but not yet answered may already be counted: ask for every sent event.
        let ids: Vec<usize> = (0..next).filter(|i| !seen.contains_key(i)).collect();
        let pending: Vec<(String, u64)> = ids.iter().map(|&i| (customer(i), tokens(i))).collect();
        let now_counted = counted(quota, tenant, &pending).await;
        let now = Instant::now();
        result.polls += 1;
        for at in now_counted {
            seen.entry(ids[at]).or_insert(now);
        }
        let waiting = accepted.keys().filter(|i| !seen.contains_key(*i)).count();
        if next == n && answered == n && waiting == 0 {
            break;
        }
        if next == n && answered == n {
            // Every 202 is in: the last one accepted gets its full wait.
            let last = accepted.values().max().copied().unwrap_or(started);
            stop_at = stop_at.min(last + COUNTED_WITHIN);
        }
        if now > stop_at {
            break;
        }
        tokio::time::sleep(POLL_EVERY).await;
    }
    for (i, at) in &accepted {
        match seen.get(i) {
            // Counted before its 202 arrived: zero.
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

/// Whether the figure meets its target: every event counted, p99 under 2 s.
pub fn pass(f: &Freshness) -> bool {
    f.missing == 0
        && f.refused == 0
        && !f.latencies_ms.is_empty()
        && quantile(&f.latencies_ms, 0.99) < TARGET_P99_MS
}

/// One line: what was sent and how fast it was counted.
pub fn summary(f: &Freshness) -> String {
    let q = |x: f64| quantile(&f.latencies_ms, x);
    format!(
        "{} events at {:.0}/s, {} counted, {} not counted within {} s, {} refused; accepted → counted p50 {:.0} ms, p99 {:.0} ms, max {:.0} ms ({} polls)",
        f.sent,
        f.per_second,
        f.latencies_ms.len(),
        f.missing,
        COUNTED_WITHIN.as_secs(),
        f.refused,
        q(0.5),
        q(0.99),
        f.latencies_ms.last().copied().unwrap_or(f64::NAN),
        f.polls
    )
}
