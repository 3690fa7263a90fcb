//! Publishing a migration's entitlement changes to Kafka (`entitlement-changes`).
//!
//! "Published" means every message was acknowledged by all in-sync replicas (`acks=all`).
//! Messages are sent together and awaited together, never one at a time. The producer is not
//! idempotent and uses no transactions (tansu 0.6.0 supports neither safely,
//! `shared/BROKER.md`): a failed publish is repeated whole by a rerun of the migration, so a
//! consumer may see a chunk more than once and must treat it as "these customers' entitlements
//! changed", not as a count.

use std::time::Duration;

use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::ClientConfig;
use tally_core::config::KafkaConfig;

use crate::error::{Error, Result};
use crate::migration::Notification;

/// The topic entitlement changes go to.
pub const ENTITLEMENT_TOPIC: &str = "entitlement-changes";

/// Publishes notifications to one topic, creating it if missing.
pub struct Notifier {
    producer: FutureProducer,
    kafka: KafkaConfig,
    topic: String,
}

impl Notifier {
    /// A producer with the collector's delivery settings (`ingest/src/kafka.rs`), copied
    /// rather than shared to keep the rater free of the collector.
    pub fn new(kafka: &KafkaConfig, topic: &str) -> Result<Notifier> {
        let producer = ClientConfig::new()
            .set("bootstrap.servers", &kafka.brokers)
            .set("acks", "all")
            // Off for tansu 0.6.0, which wedges after an idempotent send times out.
            .set("enable.idempotence", kafka.idempotence.to_string())
            .set("message.timeout.ms", kafka.message_timeout_ms.to_string())
            .set("compression.type", &kafka.compression)
            .set("linger.ms", kafka.linger_ms.to_string())
            // The Java client's partitioner, so every producer keyed by tenant/plan agrees.
            .set("partitioner", "murmur2_random")
            .set("reconnect.backoff.max.ms", "1000")
            .create()
            .map_err(|e| Error::Kafka(format!("producer: {e}")))?;
        Ok(Notifier {
            producer,
            kafka: kafka.clone(),
            topic: topic.to_owned(),
        })
    }

    pub fn topic(&self) -> &str {
        &self.topic
    }

    /// Creates the topic unless it exists, then sends every notification and waits for
    /// each acknowledgement. Returns how many were published; any failure fails the whole
    /// publish (some messages may have landed: a retry sends them again).
    pub async fn publish(&self, notifications: &[Notification<'_>]) -> Result<usize> {
        if notifications.is_empty() {
            return Ok(0);
        }
        let bound = Duration::from_millis(self.kafka.message_timeout_ms) + Duration::from_secs(5);
        // The admin request alone would wait out librdkafka's 60 s socket timeout.
        tokio::time::timeout(bound, tally_service::ensure_topic(&self.kafka, &self.topic))
            .await
            .map_err(|_| {
                Error::Kafka(format!(
                    "creating topic {}: no answer within {bound:?}",
                    self.topic
                ))
            })?
            .map_err(|e| Error::Kafka(format!("creating topic {}: {e}", self.topic)))?;
        let mut pending = Vec::with_capacity(notifications.len());
        for n in notifications {
            let payload = serde_json::to_vec(n)
                .map_err(|e| Error::Kafka(format!("encoding a notification: {e}")))?;
            let key = n.key();
            let record = FutureRecord::to(&self.topic).key(&key).payload(&payload);
            // The queue holds far more than one migration's chunks; a full queue is a
            // failure to report, not to wait out.
            let delivery = self
                .producer
                .send_result(record)
                .map_err(|(e, _)| Error::Kafka(format!("queueing a notification: {e}")))?;
            pending.push(delivery);
        }
        let acked = tokio::time::timeout(bound, futures::future::join_all(pending))
            .await
            .map_err(|_| Error::Kafka(format!("no acknowledgement within {bound:?}")))?;
        for result in acked {
            match result {
                Ok(Ok(_)) => {}
                Ok(Err((e, _))) => return Err(Error::Kafka(format!("delivery failed: {e}"))),
                Err(_) => return Err(Error::Kafka("producer dropped a delivery".into())),
            }
        }
        Ok(notifications.len())
    }
}
