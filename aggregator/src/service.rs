//! The consumer loop: Kafka records in, one atomic ClickHouse insert per flush out.
//!
//! Exactly once, without Kafka transactions (tansu has none): each flush's single insert
//! carries the events, their rollup deltas and the offsets it covers (`store`), so a
//! partition always resumes from the checkpoint ClickHouse holds, never from Kafka's
//! committed offset; the partition's dedupe state is the raw events it already counted,
//! loaded when the partition is assigned, so it moves with the partition on a rebalance.
//! A failed flush is never retried blindly: pending batches are dropped, and once
//! ClickHouse answers again every partition is rewound to its checkpoint.
//!
//! The loop runs on its own thread with a `BaseConsumer`, so rebalance callbacks run
//! between flushes, never during one.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::future::join_all;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, RebalanceProtocol};
use rdkafka::error::{KafkaError, KafkaResult};
use rdkafka::message::{Header, Message, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::statistics::Statistics;
use rdkafka::types::RDKafkaRespErr;
use rdkafka::{ClientConfig, ClientContext, Offset, TopicPartitionList};
use tally_core::{Catalog, Config};
use tokio::runtime::Handle;

use crate::ledger::Body;
use crate::metrics::*;
use crate::rollup::{Dedupe, Incoming, Meters, Outcome, PartitionBatch};
use crate::store::Store;

/// Shared with the HTTP side: what `/readyz` reports.
#[derive(Debug, Default)]
pub struct Status {
    /// The last flush (or ClickHouse probe) succeeded.
    pub clickhouse_ok: AtomicBool,
    /// The consumer loop is running.
    pub consuming: AtomicBool,
}

enum Change {
    Assigned { partition: i32, dedupe: Dedupe },
    Revoked(i32),
}

/// Consumer callbacks: rebalances and statistics.
struct Ctx {
    store: Store,
    rt: Handle,
    topic: String,
    dedupe_window: Duration,
    stop: Arc<AtomicBool>,
    changes: Mutex<Vec<Change>>,
}

impl Ctx {
    /// Runs a ClickHouse call until it succeeds, or returns `None` once stopping.
    fn retry<T>(&self, what: &str, mut f: impl FnMut() -> crate::store::Result<T>) -> Option<T> {
        let mut backoff = Duration::from_millis(200);
        loop {
            match f() {
                Ok(v) => return Some(v),
                Err(e) => {
                    metrics::counter!(CLICKHOUSE_ERRORS, "operation" => "rebalance").increment(1);
                    tracing::warn!(error = %e, what, "clickhouse unavailable during a rebalance; retrying");
                }
            }
            if self.stop.load(Ordering::Acquire) {
                return None;
            }
            std::thread::sleep(backoff);
            backoff = (backoff * 2).min(Duration::from_secs(5));
        }
    }

    fn dedupe_since(&self) -> u32 {
        let now = time::OffsetDateTime::now_utc().unix_timestamp();
        (now - self.dedupe_window.as_secs() as i64).max(0) as u32
    }

    fn changes(&self) -> std::sync::MutexGuard<'_, Vec<Change>> {
        self.changes.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl ClientContext for Ctx {
    fn stats(&self, statistics: Statistics) {
        for topic in statistics.topics.values() {
            for p in topic.partitions.values() {
                if p.partition >= 0 && p.consumer_lag >= 0 {
                    metrics::gauge!(CONSUMER_LAG, "partition" => p.partition.to_string())
                        .set(p.consumer_lag as f64);
                }
            }
        }
    }

    fn error(&self, error: KafkaError, reason: &str) {
        tracing::warn!(%error, reason, "kafka client error");
    }
}

impl ConsumerContext for Ctx {
    /// Assigned partitions start at their ClickHouse checkpoint, with their dedupe state
    /// loaded first; revoked ones drop whatever they had not flushed.
    fn rebalance(
        &self,
        consumer: &BaseConsumer<Self>,
        err: RDKafkaRespErr,
        tpl: &mut TopicPartitionList,
    ) {
        let cooperative = matches!(
            consumer.rebalance_protocol(),
            RebalanceProtocol::Cooperative
        );
        match err {
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS => {
                let partitions: Vec<i32> = tpl.elements().iter().map(|e| e.partition()).collect();
                let checkpoints = self.retry("checkpoints", || {
                    self.rt.block_on(self.store.checkpoints(&self.topic))
                });
                if let Some(checkpoints) = checkpoints {
                    for &p in &partitions {
                        let since = self.dedupe_since();
                        let Some(dedupe) = self.retry("dedupe", || {
                            self.rt.block_on(self.store.load_dedupe(p, since))
                        }) else {
                            break;
                        };
                        let offset = checkpoints
                            .get(&p)
                            .map_or(Offset::Beginning, |o| Offset::Offset(o + 1));
                        if let Err(e) = tpl.set_partition_offset(&self.topic, p, offset) {
                            tracing::error!(error = %e, partition = p, "cannot set the resume offset");
                        }
                        tracing::info!(
                            partition = p,
                            ?offset,
                            dedupe_ids = dedupe.len(),
                            "partition assigned"
                        );
                        self.changes().push(Change::Assigned {
                            partition: p,
                            dedupe,
                        });
                    }
                }
                metrics::counter!(REBALANCES, "kind" => "assign")
                    .increment(partitions.len() as u64);
                let result = if cooperative {
                    consumer.incremental_assign(tpl)
                } else {
                    consumer.assign(tpl)
                };
                if let Err(e) = result {
                    tracing::error!(error = %e, "assign failed");
                }
            }
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__REVOKE_PARTITIONS => {
                for e in tpl.elements() {
                    tracing::info!(partition = e.partition(), "partition revoked");
                    self.changes().push(Change::Revoked(e.partition()));
                }
                metrics::counter!(REBALANCES, "kind" => "revoke").increment(tpl.count() as u64);
                let result = if cooperative {
                    consumer.incremental_unassign(tpl)
                } else {
                    consumer.unassign()
                };
                if let Err(e) = result {
                    tracing::error!(error = %e, "unassign failed");
                }
            }
            other => tracing::error!(?other, "rebalance error"),
        }
    }
}

struct Part {
    dedupe: Dedupe,
    batch: PartitionBatch,
}

/// One aggregator instance: a member of the consumer group.
pub struct Aggregator {
    config: Config,
    catalog: Catalog,
    store: Store,
    rt: Handle,
    stop: Arc<AtomicBool>,
    status: Arc<Status>,
}

/// Dead-letter deliveries of the pending flush: each resolves to whether the broker took it.
type Dlq = Vec<futures::future::BoxFuture<'static, bool>>;

impl Aggregator {
    pub fn new(
        config: Config,
        rt: Handle,
        stop: Arc<AtomicBool>,
        status: Arc<Status>,
    ) -> Aggregator {
        let store = Store::new(&config.clickhouse, Duration::from_secs(30));
        Aggregator {
            catalog: config.catalog(),
            config,
            store,
            rt,
            stop,
            status,
        }
    }

    /// Consumes until `stop` is set, then flushes what it holds and leaves the group.
    pub fn run(self) -> KafkaResult<()> {
        let topic = self.config.kafka.topic.clone();
        let agg = &self.config.aggregator;
        let ctx = Ctx {
            store: self.store.clone(),
            rt: self.rt.clone(),
            topic: topic.clone(),
            dedupe_window: Duration::from_secs(agg.dedupe_window_secs),
            stop: self.stop.clone(),
            changes: Mutex::new(Vec::new()),
        };
        let consumer: BaseConsumer<Ctx> = ClientConfig::new()
            .set("bootstrap.servers", &self.config.kafka.brokers)
            .set("group.id", &agg.group_id)
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .set("auto.offset.reset", "earliest")
            // tansu 0.6.0 never hands a SIGKILLed member's partitions to the survivors under
            // the default eager assignor; cooperative-sticky does (shared/BROKER.md).
            .set("partition.assignment.strategy", "cooperative-sticky")
            .set("session.timeout.ms", agg.session_timeout_ms.to_string())
            .set("fetch.wait.max.ms", agg.fetch_wait_max_ms.to_string())
            .set("statistics.interval.ms", "5000")
            .create_with_context(ctx)?;
        let producer: FutureProducer = ClientConfig::new()
            .set("bootstrap.servers", &self.config.kafka.brokers)
            .set("acks", "all")
            .set(
                "enable.idempotence",
                self.config.kafka.idempotence.to_string(),
            )
            .set(
                "message.timeout.ms",
                self.config.kafka.message_timeout_ms.to_string(),
            )
            .create()?;
        consumer.subscribe(&[&topic])?;
        self.status.consuming.store(true, Ordering::Release);
        tracing::info!(%topic, group = %agg.group_id, "aggregator consuming");

        let meters = Meters::new(&self.catalog, self.config.validation.max_dimension_chars);
        let interval = Duration::from_millis(agg.flush_interval_ms);
        let max_records = flush_records_bound(
            agg.flush_max_records,
            meters.rows_per_record(),
            meters.rows_per_partition() * self.config.kafka.partitions.max(1) as usize,
        );
        let mut parts: HashMap<i32, Part> = HashMap::new();
        let mut dlq: Dlq = Vec::new();
        let mut pending = 0usize;
        let mut oldest_pending: Option<Instant> = None;
        let mut last_eviction = Instant::now();
        // Resolved once: a labelled counter looked up per record showed in profiles. Counts
        // are kept here and added to them after each flush and whenever a poll comes back
        // empty, not per record.
        let counted = metrics::counter!(RECORDS, "outcome" => "counted");
        let duplicates = metrics::counter!(RECORDS, "outcome" => "duplicate");
        let dead_lettered = metrics::counter!(RECORDS, "outcome" => "dead_letter");
        let mut counts = [0u64; 3];
        let report = |counts: &mut [u64; 3]| {
            for (counter, n) in [&counted, &duplicates, &dead_lettered]
                .into_iter()
                .zip(counts.iter_mut())
            {
                if *n > 0 {
                    counter.increment(std::mem::take(n));
                }
            }
        };
        loop {
            let stopping = self.stop.load(Ordering::Acquire);
            let polled = if stopping {
                None
            } else {
                consumer.poll(Duration::from_millis(20))
            };
            self.apply_changes(&consumer, &mut parts);
            let now = Instant::now();
            match polled {
                Some(Ok(m)) => {
                    if let Some(part) = parts.get_mut(&m.partition()) {
                        let incoming = Incoming {
                            partition: m.partition(),
                            offset: m.offset(),
                            key: m.key(),
                            payload: m.payload(),
                        };
                        match part.batch.add(&meters, &part.dedupe, incoming) {
                            Outcome::Counted => counts[0] += 1,
                            Outcome::Duplicate => counts[1] += 1,
                            Outcome::Poison(p) => {
                                dlq.push(self.dead_letter(&producer, &m, p.reason, &p.detail));
                                counts[2] += 1;
                            }
                        }
                        pending += 1;
                        oldest_pending.get_or_insert(now);
                    }
                }
                Some(Err(e)) => tracing::warn!(error = %e, "consume error"),
                None => report(&mut counts),
            }
            let due = oldest_pending.is_some_and(|t| now.duration_since(t) >= interval);
            if pending >= max_records || due || (stopping && pending > 0) {
                self.flush(&consumer, &meters, &mut parts, std::mem::take(&mut dlq));
                report(&mut counts);
                pending = 0;
                oldest_pending = None;
            }
            if stopping {
                break;
            }
            if now.duration_since(last_eviction) >= Duration::from_secs(60) {
                let now = time::OffsetDateTime::now_utc().unix_timestamp();
                let oldest = (now - agg.dedupe_window_secs as i64).max(0) as u32;
                for part in parts.values_mut() {
                    part.dedupe.evict_before(oldest);
                }
                let held: usize = parts.values().map(|p| p.dedupe.len()).sum();
                metrics::gauge!(DEDUPE_IDS).set(held as f64);
                last_eviction = Instant::now();
            }
        }
        self.status.consuming.store(false, Ordering::Release);
        consumer.unsubscribe();
        tracing::info!("aggregator left the group");
        Ok(())
    }

    fn apply_changes(&self, consumer: &BaseConsumer<Ctx>, parts: &mut HashMap<i32, Part>) {
        let changes = std::mem::take(&mut *consumer.context().changes());
        if changes.is_empty() {
            return;
        }
        for change in changes {
            match change {
                Change::Assigned { partition, dedupe } => {
                    parts.insert(
                        partition,
                        Part {
                            dedupe,
                            batch: PartitionBatch::default(),
                        },
                    );
                }
                Change::Revoked(p) => {
                    parts.remove(&p);
                }
            }
        }
        metrics::gauge!(PARTITIONS).set(parts.len() as f64);
        metrics::gauge!(DEDUPE_IDS)
            .set(parts.values().map(|p| p.dedupe.len()).sum::<usize>() as f64);
    }

    fn dead_letter(
        &self,
        producer: &FutureProducer,
        m: &rdkafka::message::BorrowedMessage<'_>,
        reason: &'static str,
        detail: &str,
    ) -> futures::future::BoxFuture<'static, bool> {
        metrics::counter!(DEAD_LETTERED, "reason" => reason).increment(1);
        let partition = m.partition().to_string();
        let offset = m.offset().to_string();
        let headers = OwnedHeaders::new()
            .insert(Header {
                key: "reason",
                value: Some(reason),
            })
            .insert(Header {
                key: "detail",
                value: Some(detail),
            })
            .insert(Header {
                key: "source_topic",
                value: Some(m.topic()),
            })
            .insert(Header {
                key: "source_partition",
                value: Some(&partition),
            })
            .insert(Header {
                key: "source_offset",
                value: Some(&offset),
            });
        let mut record: FutureRecord<'_, [u8], [u8]> =
            FutureRecord::to(&self.config.aggregator.dead_letter_topic).headers(headers);
        if let Some(k) = m.key() {
            record = record.key(k);
        }
        if let Some(p) = m.payload() {
            record = record.payload(p);
        }
        // A full local queue is the only immediate failure; treat it like a failed delivery.
        match producer.send_result(record) {
            Ok(delivery) => Box::pin(async move { matches!(delivery.await, Ok(Ok(_))) }),
            Err((e, _)) => {
                tracing::error!(error = %e, "dead-letter enqueue failed");
                Box::pin(async { false })
            }
        }
    }

    /// Dead letters acknowledged first, then the one insert; on any failure, rewind.
    fn flush(
        &self,
        consumer: &BaseConsumer<Ctx>,
        meters: &Meters<'_>,
        parts: &mut HashMap<i32, Part>,
        dlq: Dlq,
    ) {
        let started = Instant::now();
        let dlq_ok = self
            .rt
            .block_on(join_all(dlq))
            .into_iter()
            .all(|delivered| delivered);
        let now = time::OffsetDateTime::now_utc().unix_timestamp() as u32;
        let mut body = Body::default();
        let mut records = 0;
        for (&p, part) in parts.iter_mut() {
            part.batch
                .take_into(meters, &self.config.kafka.topic, p, now, &mut body);
            records += part.batch.records;
        }
        if body.is_empty() {
            return;
        }
        let rows = body.rows();
        let query_id = crate::store::query_id("flush");
        let result = if dlq_ok {
            self.rt
                .block_on(self.store.insert_body(body, &query_id))
                .map_err(|e| e.to_string())
        } else {
            Err("dead-letter topic did not acknowledge".to_owned())
        };
        match result {
            Ok(()) => {
                self.status.clickhouse_ok.store(true, Ordering::Release);
                metrics::histogram!(FLUSH_DURATION).record(started.elapsed().as_secs_f64());
                metrics::histogram!(FLUSH_ROWS).record(rows as f64);
                metrics::histogram!(FLUSH_RECORDS).record(records as f64);
                let mut offsets = TopicPartitionList::new();
                for (&p, part) in parts.iter_mut() {
                    // The next batch starts with room for as much as this one held.
                    let next = part.batch.successor();
                    let batch = std::mem::replace(&mut part.batch, next);
                    if let Some(o) = batch.last_offset {
                        let _ = offsets.add_partition_offset(
                            &self.config.kafka.topic,
                            p,
                            Offset::Offset(o + 1),
                        );
                    }
                    batch.commit_into(&mut part.dedupe);
                }
                // Informational (lag tools read it); resuming always uses ClickHouse.
                if offsets.count() > 0 {
                    let _ = consumer.commit(&offsets, CommitMode::Async);
                }
            }
            Err(e) => {
                metrics::counter!(CLICKHOUSE_ERRORS, "operation" => "flush").increment(1);
                tracing::error!(error = %e, rows, "flush failed; rewinding to the checkpoints");
                self.status.clickhouse_ok.store(false, Ordering::Release);
                self.recover(consumer, parts, Some(&query_id));
            }
        }
    }

    /// Drops every pending batch (their records are still in Kafka), waits for ClickHouse
    /// and for the failed flush's INSERT (`failed`) to have ended there, then restarts each
    /// partition from the checkpoint ClickHouse holds. Reading the checkpoints while that
    /// INSERT may still land would count its records twice.
    fn recover(
        &self,
        consumer: &BaseConsumer<Ctx>,
        parts: &mut HashMap<i32, Part>,
        failed: Option<&str>,
    ) {
        for part in parts.values_mut() {
            part.batch = PartitionBatch::default();
        }
        if let Ok(assigned) = consumer.assignment() {
            let _ = consumer.pause(&assigned);
        }
        let mut backoff = Duration::from_millis(200);
        loop {
            if self.stop.load(Ordering::Acquire) {
                return;
            }
            // Keeps group membership and rebalances serviced; records are re-read below.
            let _ = consumer.poll(backoff);
            self.apply_changes(consumer, parts);
            for part in parts.values_mut() {
                part.batch = PartitionBatch::default();
            }
            let reloaded: crate::store::Result<Option<Reloaded>> = self.rt.block_on(async {
                if let Some(id) = failed {
                    if !self.store.settled(id).await? {
                        return Ok(None);
                    }
                }
                let checkpoints = self.store.checkpoints(&self.config.kafka.topic).await?;
                let since = {
                    let now = time::OffsetDateTime::now_utc().unix_timestamp();
                    (now - self.config.aggregator.dedupe_window_secs as i64).max(0) as u32
                };
                let mut dedupes = HashMap::new();
                for &p in parts.keys() {
                    dedupes.insert(p, self.store.load_dedupe(p, since).await?);
                }
                Ok(Some((checkpoints, dedupes)))
            });
            match reloaded {
                Ok(None) => {
                    tracing::warn!(
                        query_id = failed.unwrap_or_default(),
                        "the failed flush is still running in clickhouse; waiting for it to end"
                    );
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
                Ok(Some((checkpoints, dedupes))) => {
                    for (p, dedupe) in dedupes {
                        let offset = checkpoints
                            .get(&p)
                            .map_or(Offset::Beginning, |o| Offset::Offset(o + 1));
                        if let Some(part) = parts.get_mut(&p) {
                            part.dedupe = dedupe;
                        }
                        tracing::info!(partition = p, ?offset, "rewinding");
                        self.rewind(consumer, p, offset);
                    }
                    if let Ok(assigned) = consumer.assignment() {
                        let _ = consumer.resume(&assigned);
                    }
                    self.status.clickhouse_ok.store(true, Ordering::Release);
                    tracing::info!("clickhouse back; partitions rewound to their checkpoints");
                    return;
                }
                Err(e) => {
                    metrics::counter!(CLICKHOUSE_ERRORS, "operation" => "recover").increment(1);
                    tracing::warn!(error = %e, "clickhouse still unavailable");
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
            }
        }
    }

    fn rewind(&self, consumer: &BaseConsumer<Ctx>, partition: i32, offset: Offset) {
        let topic = &self.config.kafka.topic;
        if let Err(e) = consumer.seek(topic, partition, offset, Duration::from_secs(5)) {
            // A partition that has not started fetching cannot seek: reassign it instead.
            tracing::warn!(error = %e, partition, "seek failed; reassigning");
            let mut tpl = TopicPartitionList::new();
            let _ = tpl.add_partition_offset(topic, partition, offset);
            let _ = consumer.incremental_unassign(&tpl);
            if let Err(e) = consumer.incremental_assign(&tpl) {
                tracing::error!(error = %e, partition, "cannot rewind partition");
            }
        }
    }
}

/// Checkpoints and dedupe state, per partition, as ClickHouse holds them.
type Reloaded = (HashMap<i32, i64>, HashMap<i32, Dedupe>);

/// The record count that triggers a flush: the configured bound, lowered if needed so that
/// the flush's rows (each record's event and rollup rows, plus every partition's
/// checkpoint and coverage rows) stay within [`MAX_ROWS_PER_INSERT`](crate::store::MAX_ROWS_PER_INSERT).
fn flush_records_bound(configured: usize, rows_per_record: usize, fixed_rows: usize) -> usize {
    let room = crate::store::MAX_ROWS_PER_INSERT.saturating_sub(fixed_rows);
    configured.min(room / rows_per_record.max(1)).max(1)
}

#[cfg(test)]
mod tests {
    use super::flush_records_bound;
    use crate::store::MAX_ROWS_PER_INSERT;

    #[test]
    fn a_flush_stays_within_one_insert_block() {
        // The dev catalog: one meter per event type, 4 meters, 8 partitions.
        assert_eq!(flush_records_bound(125_000, 2, 8 * 5), 125_000);
        // Many meters on one type lower the bound below the configured one.
        let bound = flush_records_bound(250_000, 9, 8 * 12);
        assert_eq!(bound, (MAX_ROWS_PER_INSERT - 96) / 9);
        assert!(bound * 9 + 96 <= MAX_ROWS_PER_INSERT);
        // Never zero, so a flush always makes progress.
        assert_eq!(flush_records_bound(250_000, 1, MAX_ROWS_PER_INSERT * 2), 1);
    }
}
