//! Counting ingested events into the quota counters, once per event id.
//!
//! A consumer group of its own reads the usage topic (the aggregator's records) and, for
//! every event of a meter counted from events, runs the feed script: it sets the event's
//! seen key (`SET NX`, kept for the dedupe window) and adds the event's units to the
//! customer's windows in the same atomic step, so a record read twice (a rebalance, a
//! restart before the commit) or an event sent twice (a client retry, a producer retry)
//! counts once. Offsets are committed only after Redis applied the batch: nothing accepted
//! is skipped, and what is read again is recognised.
//!
//! Windows are those of the plan in force at the event's time, found as the check finds
//! them; an event whose customer has no limit on the meter is not counted (no window needs
//! it; reconciliation fills a window that begins to matter later).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use rdkafka::consumer::{CommitMode, Consumer, StreamConsumer};
use rdkafka::{ClientConfig, Message, Offset, TopicPartitionList};
use rust_decimal::Decimal;
use tally_core::validate::{measure, MeterValue};
use tally_core::{Catalog, Config, UsageRecord};
use tokio::sync::watch;

use crate::algo::Rule;
use crate::metrics::FED_EVENTS;
use crate::quota::{CountedFrom, Quota};
use crate::window;

/// Most records applied in one Redis pipeline.
const BATCH: usize = 2_000;
/// Longest a record waits for its batch to fill.
const LINGER: Duration = Duration::from_millis(20);

/// One event's feed-script invocation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Increment {
    pub keys: Vec<String>,
    pub args: Vec<String>,
}

/// What one record adds to the counters: one invocation per meter counted from events that
/// the customer has limits on. Records that cannot be read count nothing (the aggregator
/// dead-letters them). Fails when the customer's subscription cannot be read and nothing is
/// cached: the caller retries the batch.
pub async fn increments(
    quota: &Quota,
    catalog: &Catalog,
    config: &Config,
    payload: &[u8],
) -> Result<Vec<Increment>, crate::resolve::ResolveError> {
    let Ok(rec) = serde_json::from_slice::<UsageRecord>(payload) else {
        metrics::counter!(FED_EVENTS, "outcome" => "unreadable").increment(1);
        return Ok(Vec::new());
    };
    let mut out = Vec::new();
    for meter in catalog.meters_for_type(&rec.event_type) {
        let Some(policy) = quota.policy(&meter.key) else {
            continue;
        };
        if policy.counted_from != CountedFrom::Events {
            continue;
        }
        let Ok(m) = measure(meter, &rec.data, config.validation.max_dimension_chars) else {
            continue;
        };
        let units = match m.value {
            MeterValue::Event => Some(10u64.pow(policy.scale)),
            MeterValue::Number(q) => {
                window::event_units(Decimal::from_i128_with_scale(q.nanos(), 9), policy.scale)
            }
            // Distinct counts are not counters.
            MeterValue::Identifier(_) => None,
        };
        let Some(units) = units else { continue };
        let timeline = quota
            .resolver()
            .timeline(&rec.tenant, &rec.customer)
            .await?;
        let Ok(source) = quota.resolver().source(&timeline, rec.time) else {
            continue;
        };
        let limits = source.limits(&meter.key);
        if limits.is_empty() {
            metrics::counter!(FED_EVENTS, "outcome" => "skipped").increment(1);
            continue;
        }
        let tag = window::customer_tag(&rec.tenant, &rec.customer);
        let windows = window::applied(
            &tag,
            &meter.key,
            &limits,
            policy.scale,
            rec.time,
            source.billing(),
        );
        let mut keys = vec![window::seen_key(&tag, &format!("{}:{}", meter.key, rec.id))];
        let mut args = vec![(config.quota.dedupe_window_secs * 1_000).to_string()];
        for w in windows {
            keys.push(w.key);
            match w.rule {
                Rule::Rate(g) => {
                    args.extend(["r".into(), units.to_string(), g.interval.to_string()])
                }
                Rule::Fixed(_) => {
                    args.extend(["f".into(), units.to_string(), w.expire_at_ms.to_string()])
                }
            }
        }
        out.push(Increment { keys, args });
    }
    Ok(out)
}

/// Applies increments in one pipeline; returns how many were new (the rest were seen
/// before).
pub async fn apply(quota: &Quota, increments: &[Increment]) -> anyhow::Result<(u64, u64)> {
    if increments.is_empty() {
        return Ok((0, 0));
    }
    let mut pipe = redis::pipe();
    for inc in increments {
        let cmd = pipe
            .cmd("EVALSHA")
            .arg(quota.feed_script().get_hash())
            .arg(inc.keys.len());
        for k in &inc.keys {
            cmd.arg(k);
        }
        for a in &inc.args {
            cmd.arg(a);
        }
    }
    let replies = quota.query(&mut pipe).await?;
    let (mut counted, mut seen) = (0, 0);
    for r in replies {
        match r? {
            redis::Value::Int(1) => counted += 1,
            _ => seen += 1,
        }
    }
    metrics::counter!(FED_EVENTS, "outcome" => "counted").increment(counted);
    metrics::counter!(FED_EVENTS, "outcome" => "duplicate").increment(seen);
    Ok((counted, seen))
}

/// Consumes the usage topic until `stop` flips: batches records, applies them, commits.
pub async fn run(
    quota: Arc<Quota>,
    config: Config,
    mut stop: watch::Receiver<bool>,
) -> anyhow::Result<()> {
    let consumer: StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", &config.kafka.brokers)
        .set("group.id", &config.quota.feed_group)
        .set("enable.auto.commit", "false")
        .set("auto.offset.reset", "earliest")
        // tansu 0.6.0 hands a killed member's partitions over only with this assignor.
        .set("partition.assignment.strategy", "cooperative-sticky")
        .set(
            "session.timeout.ms",
            config.aggregator.session_timeout_ms.to_string(),
        )
        .set("fetch.wait.max.ms", "100")
        .create()?;
    consumer.subscribe(&[&config.kafka.topic])?;
    let catalog = config.catalog();
    tracing::info!(group = %config.quota.feed_group, topic = %config.kafka.topic, "counting events into quota counters");
    loop {
        let mut batch: Vec<(i32, i64, Vec<u8>)> = Vec::new();
        let deadline = tokio::time::sleep(LINGER);
        tokio::pin!(deadline);
        let first = tokio::select! {
            m = consumer.recv() => Some(m),
            _ = stop.changed() => return Ok(()),
        };
        if let Some(Ok(m)) = first {
            batch.push((
                m.partition(),
                m.offset(),
                m.payload().unwrap_or_default().to_vec(),
            ));
        }
        while batch.len() < BATCH {
            tokio::select! {
                m = consumer.recv() => if let Ok(m) = m {
                    batch.push((m.partition(), m.offset(), m.payload().unwrap_or_default().to_vec()));
                },
                _ = &mut deadline => break,
            }
        }
        if batch.is_empty() {
            continue;
        }
        let mut backoff = Duration::from_millis(100);
        loop {
            let applied = async {
                let mut incs = Vec::new();
                for (_, _, payload) in &batch {
                    incs.extend(increments(&quota, &catalog, &config, payload).await?);
                }
                apply(&quota, &incs).await
            }
            .await;
            match applied {
                Ok(_) => {
                    quota.mark_redis(true);
                    break;
                }
                Err(e) => {
                    tracing::warn!(error = %e, records = batch.len(), "cannot count events into quota counters; retrying");
                    tokio::select! {
                        _ = tokio::time::sleep(backoff) => {}
                        _ = stop.changed() => return Ok(()),
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
            }
        }
        let mut next: HashMap<i32, i64> = HashMap::new();
        for (p, o, _) in &batch {
            let e = next.entry(*p).or_insert(0);
            *e = (*e).max(o + 1);
        }
        let mut tpl = TopicPartitionList::new();
        for (p, o) in next {
            tpl.add_partition_offset(&config.kafka.topic, p, Offset::Offset(o))?;
        }
        if let Err(e) = consumer.commit(&tpl, CommitMode::Async) {
            tracing::warn!(error = %e, "commit failed; the records are read again and recognised");
        }
    }
}
