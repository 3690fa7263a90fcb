//! The batched baseline: a bare rdkafka producer sending the collector's records with the
//! collector's producer settings, many in flight at once.
//!
//! It tracks deliveries the way the collector does, with no per-record future: a
//! `ThreadedProducer` whose delivery callback counts reports into atomics, so the figure
//! compares the collector with librdkafka's own rate, not with a heavier client.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use rdkafka::client::ClientContext;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::{
    BaseRecord, DeliveryResult, Producer as _, ProducerContext, ThreadedProducer,
};
use tally_core::config::KafkaConfig;
use tokio::sync::Notify;

use crate::events::Payload;

/// Delivery reports, counted by the producer's polling thread.
#[derive(Debug, Default)]
pub struct Reports {
    delivered: AtomicUsize,
    errors: AtomicUsize,
    first_error: Mutex<Option<String>>,
    /// Set while the sending loop waits for room; each report then wakes it.
    waiting: AtomicBool,
    room: Notify,
}

impl Reports {
    fn settled(&self) -> usize {
        self.delivered.load(Ordering::SeqCst) + self.errors.load(Ordering::SeqCst)
    }

    /// Waits until at most `limit` of `sent` records are still unreported.
    async fn wait_until(&self, sent: usize, limit: usize) {
        while sent - self.settled() > limit {
            self.waiting.store(true, Ordering::SeqCst);
            if sent - self.settled() > limit {
                self.room.notified().await;
            }
            self.waiting.store(false, Ordering::SeqCst);
        }
    }
}

/// The baseline producer's context: counts reports, logs nothing.
#[derive(Debug, Clone, Default)]
pub struct Counting(pub Arc<Reports>);

impl ClientContext for Counting {}

impl ProducerContext for Counting {
    type DeliveryOpaque = ();

    fn delivery(&self, result: &DeliveryResult<'_>, _: ()) {
        let r = &self.0;
        match result {
            Ok(_) => {
                r.delivered.fetch_add(1, Ordering::SeqCst);
            }
            Err((e, _)) => {
                r.first_error
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .get_or_insert_with(|| e.to_string());
                r.errors.fetch_add(1, Ordering::SeqCst);
            }
        }
        // Every order here is SeqCst: with the sender's store of `waiting` and its load of
        // the counts, one of the two sides always sees the other.
        if r.waiting.load(Ordering::SeqCst) {
            r.room.notify_one();
        }
    }
}

/// The baseline producer.
pub type Producer = ThreadedProducer<Counting>;

/// A producer with the collector's own settings (`tally_ingest::kafka::producer_config`),
/// except that idempotence is always off: tansu 0.6.0 wedges after an idempotent send
/// times out (shared/BROKER.md).
pub fn producer(config: &KafkaConfig, brokers: &str) -> anyhow::Result<Producer> {
    tally_ingest::kafka::producer_config(config)
        .set("bootstrap.servers", brokers)
        .set("enable.idempotence", "false")
        .create_with_context(Counting::default())
        .context("creating the baseline producer")
}

/// The same settings as a `FutureProducer`, for callers that need each record's offset.
pub fn future_producer(
    config: &KafkaConfig,
    brokers: &str,
) -> anyhow::Result<rdkafka::producer::FutureProducer> {
    tally_ingest::kafka::producer_config(config)
        .set("bootstrap.servers", brokers)
        .set("enable.idempotence", "false")
        .create()
        .context("creating a producer")
}

/// What a produce run achieved.
#[derive(Debug, Clone, Default)]
pub struct ProduceResult {
    pub delivered: usize,
    pub errors: usize,
    pub first_error: Option<String>,
    pub elapsed: Duration,
}

impl ProduceResult {
    pub fn events_per_sec(&self) -> f64 {
        self.delivered as f64 / self.elapsed.as_secs_f64()
    }
}

/// Sends `total` records, cycling through `payloads`, keeping up to `window` in flight
/// (enqueued, not yet reported); stops enqueueing after `max_time`. The rate counts
/// acknowledged records only.
pub async fn produce(
    producer: &Producer,
    topic: &str,
    payloads: &[Payload],
    total: usize,
    window: usize,
    max_time: Duration,
) -> ProduceResult {
    let reports = producer.client().context().0.clone();
    let (delivered0, errors0) = (
        reports.delivered.load(Ordering::SeqCst),
        reports.errors.load(Ordering::SeqCst),
    );
    let base = delivered0 + errors0;
    let window = window.max(1);
    let mut sent = base;
    let mut refused = 0;
    let mut first_refusal = None;
    let started = Instant::now();
    let stop_at = started + max_time;
    for p in payloads.iter().cycle().take(total) {
        if Instant::now() >= stop_at {
            break;
        }
        reports.wait_until(sent, window - 1).await;
        loop {
            let record = BaseRecord::to(topic).key(&p.key).payload(&p.value);
            match producer.send(record) {
                Ok(()) => {
                    sent += 1;
                    break;
                }
                // Only reachable with a window above the queue bound: wait for room.
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), _))
                    if sent > reports.settled() =>
                {
                    // Room for one more; reports may have come in since the guard.
                    let unsettled = sent - reports.settled();
                    reports.wait_until(sent, unsettled.saturating_sub(1)).await;
                }
                Err((e, _)) => {
                    refused += 1;
                    first_refusal.get_or_insert(e.to_string());
                    break;
                }
            }
        }
    }
    reports.wait_until(sent, 0).await;
    let elapsed = started.elapsed();
    let first_error = reports
        .first_error
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .take();
    ProduceResult {
        delivered: reports.delivered.load(Ordering::SeqCst) - delivered0,
        errors: reports.errors.load(Ordering::SeqCst) - errors0 + refused,
        first_error: first_refusal.or(first_error),
        elapsed,
    }
}
