//! Publishing to Kafka:
//! - entitlement changes (`entitlement-changes`): a migration's chunks of customers, and
//!   single subscription changes (create, change, cancel). Both carry `tenant` and
//!   `customers`, which is all a cache needs to drop what it holds;
//! - final invoice lines (`invoice-lines`), one message per line, for a billing system
//!   ([`InvoiceLineMessage`]).
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

use rust_decimal::Decimal;
use serde::Serialize;
use time::OffsetDateTime;

use crate::currency::Currency;
use crate::error::{Error, Result};
use crate::invoice::{Invoice, Line};
use crate::migration::Notification;
use crate::subscription::Change;

/// One line of a final invoice, as published: keyed by `invoice_id`, so an invoice's lines
/// share a partition and arrive in order. Every message repeats the invoice's header, and
/// `lines` says how many lines the invoice has, so a consumer knows when it holds them all.
/// A line may be published more than once (a run killed after publishing and before
/// recording it publishes again), always with the same bytes: deduplicate by `line_id`.
#[derive(Debug, Serialize)]
pub struct InvoiceLineMessage<'a> {
    /// `<invoice_id>#<line_no>`.
    pub line_id: String,
    pub invoice_id: &'a str,
    pub tenant: &'a str,
    pub customer: &'a str,
    #[serde(with = "time::serde::rfc3339")]
    pub period_start: OffsetDateTime,
    #[serde(with = "time::serde::rfc3339")]
    pub period_end: OffsetDateTime,
    pub currency: Currency,
    /// From 0, in the invoice's order.
    pub line_no: usize,
    pub lines: usize,
    pub line: &'a Line,
    pub subtotal: Decimal,
    pub total: Decimal,
}

impl<'a> InvoiceLineMessage<'a> {
    /// The messages of one invoice, in line order.
    pub fn of(tenant: &'a str, invoice_id: &'a str, invoice: &'a Invoice) -> Vec<Self> {
        invoice
            .lines
            .iter()
            .enumerate()
            .map(|(line_no, line)| InvoiceLineMessage {
                line_id: format!("{invoice_id}#{line_no}"),
                invoice_id,
                tenant,
                customer: &invoice.customer,
                period_start: invoice.period_start,
                period_end: invoice.period_end,
                currency: invoice.currency,
                line_no,
                lines: invoice.lines.len(),
                line,
                subtotal: invoice.subtotal,
                total: invoice.total,
            })
            .collect()
    }
}

/// One recorded subscription change, as published.
#[derive(Debug, Serialize)]
pub struct ChangeNotice<'a> {
    pub kind: &'static str,
    pub change_id: &'a str,
    pub tenant: &'a str,
    /// The one customer whose entitlements may change.
    pub customers: [&'a str; 1],
    /// The plan version in force from `effective_at` (empty, 0 for a cancel).
    pub plan: &'a str,
    pub version: u32,
    #[serde(with = "time::serde::rfc3339")]
    pub effective_at: OffsetDateTime,
}

impl<'a> ChangeNotice<'a> {
    pub fn of(change: &'a Change) -> ChangeNotice<'a> {
        ChangeNotice {
            kind: change.kind.name(),
            change_id: &change.change_id,
            tenant: &change.tenant,
            customers: [&change.customer],
            plan: &change.plan,
            version: change.version,
            effective_at: change.effective_at,
        }
    }
}

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
            // A batch of final invoices is sent at once: 10,000 invoices of ~8 lines.
            .set("queue.buffering.max.messages", "1000000")
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
        let messages = notifications
            .iter()
            .map(|n| Ok((n.key(), serde_json::to_vec(n)?)))
            .collect::<std::result::Result<Vec<_>, serde_json::Error>>()
            .map_err(|e| Error::Kafka(format!("encoding a notification: {e}")))?;
        self.send_all(&messages).await
    }

    /// Publishes one notice per recorded change, keyed by tenant and customer.
    pub async fn publish_changes(&self, changes: &[&Change]) -> Result<usize> {
        let messages = changes
            .iter()
            .map(|c| {
                let key = format!("{}/{}", c.tenant, c.customer);
                Ok((key, serde_json::to_vec(&ChangeNotice::of(c))?))
            })
            .collect::<std::result::Result<Vec<_>, serde_json::Error>>()
            .map_err(|e| Error::Kafka(format!("encoding a notification: {e}")))?;
        self.send_all(&messages).await
    }

    /// Publishes every line of `invoices` (invoice id, invoice), keyed by invoice id.
    /// Returns how many lines were published.
    pub async fn publish_invoices(
        &self,
        tenant: &str,
        invoices: &[(&str, &Invoice)],
    ) -> Result<usize> {
        let mut messages = Vec::new();
        for &(id, invoice) in invoices {
            for m in InvoiceLineMessage::of(tenant, id, invoice) {
                let payload = serde_json::to_vec(&m)
                    .map_err(|e| Error::Kafka(format!("encoding line {}: {e}", m.line_id)))?;
                messages.push((id.to_owned(), payload));
            }
        }
        self.send_all(&messages).await
    }

    async fn send_all(&self, messages: &[(String, Vec<u8>)]) -> Result<usize> {
        if messages.is_empty() {
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
        let mut pending = Vec::with_capacity(messages.len());
        for (key, payload) in messages {
            let record = FutureRecord::to(&self.topic).key(key).payload(payload);
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
        Ok(messages.len())
    }
}
