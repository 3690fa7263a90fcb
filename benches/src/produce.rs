//! The batched baseline: a bare rdkafka producer sending the collector's records with the
//! collector's producer settings, many in flight at once.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use anyhow::Context;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord};
use tally_core::config::KafkaConfig;

use crate::events::Payload;

/// A producer with the collector's own settings (`tally_ingest::kafka::producer_config`),
/// except that idempotence is always off: tansu 0.6.0 wedges after an idempotent send
/// times out (shared/BROKER.md).
pub fn producer(config: &KafkaConfig, brokers: &str) -> anyhow::Result<FutureProducer> {
    tally_ingest::kafka::producer_config(config)
        .set("bootstrap.servers", brokers)
        .set("enable.idempotence", "false")
        .create()
        .context("creating the baseline producer")
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
/// (enqueued, report not yet awaited); stops enqueueing after `max_time`. The rate counts
/// acknowledged records only.
pub async fn produce(
    producer: &FutureProducer,
    topic: &str,
    payloads: &[Payload],
    total: usize,
    window: usize,
    max_time: Duration,
) -> ProduceResult {
    let mut result = ProduceResult::default();
    let mut in_flight: VecDeque<DeliveryFuture> = VecDeque::with_capacity(window);
    let started = Instant::now();
    let stop_at = started + max_time;
    for p in payloads.iter().cycle().take(total) {
        if Instant::now() >= stop_at {
            break;
        }
        if in_flight.len() >= window.max(1) {
            settle(in_flight.pop_front(), &mut result).await;
        }
        loop {
            let record = FutureRecord::to(topic).key(&p.key).payload(&p.value);
            match producer.send_result(record) {
                Ok(delivery) => {
                    in_flight.push_back(delivery);
                    break;
                }
                // Only reachable with a window above the queue bound: wait for room.
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), _))
                    if !in_flight.is_empty() =>
                {
                    settle(in_flight.pop_front(), &mut result).await;
                }
                Err((e, _)) => {
                    result.errors += 1;
                    result.first_error.get_or_insert(e.to_string());
                    break;
                }
            }
        }
    }
    while let Some(d) = in_flight.pop_front() {
        settle(Some(d), &mut result).await;
    }
    result.elapsed = started.elapsed();
    result
}

async fn settle(delivery: Option<DeliveryFuture>, result: &mut ProduceResult) {
    let Some(delivery) = delivery else { return };
    match delivery.await {
        Ok(Ok(_)) => result.delivered += 1,
        Ok(Err((e, _))) => {
            result.errors += 1;
            result.first_error.get_or_insert(e.to_string());
        }
        Err(_) => {
            result.errors += 1;
            result.first_error.get_or_insert("delivery canceled".into());
        }
    }
}
