//! The Kafka edge: the producer behind "accepted", the usage topic, and the broker probe.

use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rdkafka::client::ClientContext;
use rdkafka::config::{ClientConfig, RDKafkaLogLevel};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::{BaseRecord, DeliveryResult, Producer, ProducerContext, ThreadedProducer};
use tally_core::config::KafkaConfig;
use tally_core::Encoded;
use tokio::sync::Notify;

use crate::error::SinkError;
use crate::metrics::{BROKER_UP, DELIVERY_DURATION, QUEUE_DEPTH};

/// Where accepted events go.
///
/// `publish` resolves only when the broker has acknowledged every record it reports as
/// delivered (with `acks=all`): an event counts as accepted only then. Records it reports
/// as failed may or may not have reached the broker (an acknowledgement can be lost); the
/// client retries them with the same ids and downstream dedupe keeps the totals exact.
pub trait EventSink: Send + Sync + 'static {
    /// Enqueues all of `records` at once, then awaits every delivery report.
    fn publish(&self, records: &[Encoded]) -> impl Future<Output = Published> + Send;

    /// Whether the sink can take events now (the broker answered its last probe).
    fn is_ready(&self) -> bool;
}

/// The outcome of one `publish`.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Published {
    pub delivered: usize,
    /// Why each record that was not delivered failed, in the order the failures were known.
    pub failures: Vec<SinkError>,
}

/// The delivery reports one `publish` still waits for.
///
/// Every record sent carries a reference to it as its delivery opaque (a pointer, no
/// allocation), and the producer's polling thread counts each report down; the last one
/// wakes the request. A `FutureProducer` costs a oneshot channel, a boxed sender and a
/// future per record; in 500-event POSTs that was about a third of the collector's CPU per
/// event (BENCHMARKS.md, "Delivery tracking").
#[derive(Debug)]
pub struct Pending {
    remaining: AtomicUsize,
    failures: Mutex<Vec<SinkError>>,
    done: Notify,
}

impl Pending {
    fn new(records: usize) -> Arc<Pending> {
        Arc::new(Pending {
            remaining: AtomicUsize::new(records),
            failures: Mutex::new(Vec::new()),
            done: Notify::new(),
        })
    }

    fn fail(&self, error: SinkError) {
        self.failures
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(error);
    }

    /// One report in (or one record that was never sent).
    fn count_down(&self, n: usize) {
        if n > 0 && self.remaining.fetch_sub(n, Ordering::AcqRel) == n {
            self.done.notify_one();
        }
    }

    async fn wait(&self) {
        while self.remaining.load(Ordering::Acquire) > 0 {
            // `notify_one` keeps a permit when nobody waits, so a report that lands
            // between the check and the await is not missed.
            self.done.notified().await;
        }
    }

    fn take_failures(&self) -> Vec<SinkError> {
        std::mem::take(&mut *self.failures.lock().unwrap_or_else(|e| e.into_inner()))
    }
}

/// Logs librdkafka's errors through `tracing` and notices when every broker is down, so
/// requests fail fast instead of each waiting out `message.timeout.ms`.
#[derive(Debug, Clone)]
pub struct SinkContext {
    up: Arc<AtomicBool>,
}

impl ClientContext for SinkContext {
    fn log(&self, level: RDKafkaLogLevel, fac: &str, log_message: &str) {
        match level {
            RDKafkaLogLevel::Emerg
            | RDKafkaLogLevel::Alert
            | RDKafkaLogLevel::Critical
            | RDKafkaLogLevel::Error => tracing::error!(fac, "librdkafka: {log_message}"),
            RDKafkaLogLevel::Warning => tracing::warn!(fac, "librdkafka: {log_message}"),
            _ => tracing::debug!(fac, "librdkafka: {log_message}"),
        }
    }

    fn error(&self, error: KafkaError, reason: &str) {
        if error.rdkafka_error_code() == Some(RDKafkaErrorCode::AllBrokersDown) {
            self.up.store(false, Ordering::Release);
            metrics::gauge!(BROKER_UP).set(0.0);
        }
        tracing::warn!(%error, reason, "kafka client error");
    }
}

impl ProducerContext for SinkContext {
    type DeliveryOpaque = Arc<Pending>;

    fn delivery(&self, result: &DeliveryResult<'_>, pending: Arc<Pending>) {
        if let Err((e, _)) = result {
            if e.rdkafka_error_code() == Some(RDKafkaErrorCode::MessageTimedOut) {
                // Nothing reached the broker within message.timeout.ms: answer 503 at once
                // until the health probe sees it again.
                self.up.store(false, Ordering::Release);
                metrics::gauge!(BROKER_UP).set(0.0);
                pending.fail(SinkError::BrokerDown);
            } else if e.rdkafka_error_code() == Some(RDKafkaErrorCode::PurgeQueue)
                || e.rdkafka_error_code() == Some(RDKafkaErrorCode::PurgeInflight)
            {
                pending.fail(SinkError::ShuttingDown);
            } else {
                pending.fail(SinkError::Delivery(e.to_string()));
            }
        }
        pending.count_down(1);
    }
}

/// The production sink: an rdkafka producer with `acks=all`.
pub struct KafkaSink {
    producer: ThreadedProducer<SinkContext>,
    topic: String,
    up: Arc<AtomicBool>,
    closing: AtomicBool,
    /// Looked up once: every request records into it.
    delivery_duration: metrics::Histogram,
}

impl KafkaSink {
    pub fn new(config: &KafkaConfig) -> Result<KafkaSink, KafkaError> {
        let up = Arc::new(AtomicBool::new(false));
        let producer =
            producer_config(config).create_with_context(SinkContext { up: up.clone() })?;
        Ok(KafkaSink {
            producer,
            topic: config.topic.clone(),
            up,
            closing: AtomicBool::new(false),
            delivery_duration: metrics::histogram!(DELIVERY_DURATION),
        })
    }

    /// Probes the broker with a metadata request and checks that the topic exists.
    /// Blocking: call it from a blocking thread.
    pub fn probe(&self, timeout: Duration) -> Result<(), String> {
        // All topics, not this one by name: a metadata request naming a missing topic may
        // make the broker auto-create it with the wrong partition count.
        let md = self
            .producer
            .client()
            .fetch_metadata(None, timeout)
            .map_err(|e| e.to_string())?;
        match md.topics().iter().find(|t| t.name() == self.topic) {
            Some(t) if !t.partitions().is_empty() => Ok(()),
            _ => Err(format!("topic {} does not exist", self.topic)),
        }
    }

    fn set_up(&self, up: bool) {
        self.up.store(up, Ordering::Release);
        metrics::gauge!(BROKER_UP).set(if up { 1.0 } else { 0.0 });
    }

    /// Keeps the ready flag current: probes the broker every `interval`, creating the topic
    /// when it is missing. Runs until the sink is dropped.
    pub fn spawn_health(self: &Arc<Self>, config: KafkaConfig) -> tokio::task::JoinHandle<()> {
        let weak = Arc::downgrade(self);
        let interval = Duration::from_millis(config.health_interval_ms);
        tokio::spawn(async move {
            let mut logged_down = false;
            loop {
                let Some(sink) = weak.upgrade() else { return };
                let probe = {
                    let sink = sink.clone();
                    tokio::task::spawn_blocking(move || sink.probe(Duration::from_secs(2)))
                };
                let result = match probe.await {
                    Ok(Err(e)) if e.contains("does not exist") => {
                        ensure_topic(&config).await.map_err(|e| e.to_string())
                    }
                    Ok(r) => r,
                    Err(e) => Err(e.to_string()),
                };
                metrics::gauge!(QUEUE_DEPTH).set(f64::from(sink.producer.in_flight_count()));
                match result {
                    Ok(()) => {
                        if logged_down {
                            tracing::info!(topic = %sink.topic, "broker reachable again");
                        }
                        logged_down = false;
                        sink.set_up(true);
                    }
                    Err(e) => {
                        if !logged_down {
                            tracing::warn!(error = %e, "broker probe failed; answering 503");
                        }
                        logged_down = true;
                        sink.set_up(false);
                    }
                }
                drop(sink);
                tokio::time::sleep(interval).await;
            }
        })
    }

    /// Refuses new events and waits for the queued ones to be acknowledged.
    pub async fn close(self: &Arc<Self>, timeout: Duration) {
        self.closing.store(true, Ordering::Release);
        let sink = self.clone();
        let flushed = tokio::task::spawn_blocking(move || sink.producer.flush(timeout)).await;
        match flushed {
            Ok(Ok(())) => tracing::info!("producer flushed"),
            Ok(Err(e)) => tracing::error!(error = %e, "producer flush incomplete"),
            Err(e) => tracing::error!(error = %e, "producer flush task failed"),
        }
    }
}

/// The collector's producer settings (`acks=all` and the configured batching), shared with
/// the load bench's baseline so both produce alike.
pub fn producer_config(config: &KafkaConfig) -> ClientConfig {
    let mut client = ClientConfig::new();
    client
        .set("bootstrap.servers", &config.brokers)
        .set("acks", "all")
        // Idempotence is a per-deployment choice: on for Apache Kafka; off for the
        // local tansu 0.6.0, where an idempotent producer whose send timed out gets
        // OutOfOrderSequenceNumber and the broker then answers every client "Unknown
        // broker error" until restarted (shared/BROKER.md). Totals do not depend on
        // it: the aggregator removes duplicates by event id.
        .set("enable.idempotence", config.idempotence.to_string())
        .set("message.timeout.ms", config.message_timeout_ms.to_string())
        .set(
            "queue.buffering.max.messages",
            config.queue_max_messages.to_string(),
        )
        .set(
            "queue.buffering.max.kbytes",
            config.queue_max_kbytes.to_string(),
        )
        .set("linger.ms", config.linger_ms.to_string())
        .set("compression.type", &config.compression)
        // The Java client's partitioner, so other producers keying by tenant/customer
        // agree on the partition.
        .set("partitioner", "murmur2_random")
        .set("reconnect.backoff.max.ms", "1000");
    for (key, value) in &config.producer {
        client.set(key, value);
    }
    client
}

impl EventSink for Arc<KafkaSink> {
    async fn publish(&self, records: &[Encoded]) -> Published {
        let fail_all = |e: SinkError| Published {
            delivered: 0,
            failures: vec![e; records.len()],
        };
        if self.closing.load(Ordering::Acquire) {
            return fail_all(SinkError::ShuttingDown);
        }
        if !self.up.load(Ordering::Acquire) {
            return fail_all(SinkError::BrokerDown);
        }
        let started = Instant::now();
        let pending = Pending::new(records.len());
        let mut refused = None;
        for (i, record) in records.iter().enumerate() {
            let message = BaseRecord::with_opaque_to(&self.topic, pending.clone())
                .key(record.key())
                .payload(record.payload());
            if let Err((e, _)) = self.producer.send(message) {
                // The producer refused one: refuse the rest of the request for the same
                // reason rather than store a gap-filled remainder.
                let error = match e {
                    KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull) => {
                        SinkError::QueueFull
                    }
                    e => SinkError::Delivery(e.to_string()),
                };
                refused = Some((records.len() - i, error));
                break;
            }
        }
        if let Some((unsent, error)) = refused {
            for _ in 0..unsent {
                pending.fail(error.clone());
            }
            pending.count_down(unsent);
        }
        // The queue-depth gauge is set by the health loop (every `health_interval_ms`):
        // counting the queue takes librdkafka's locks, too dear for every request.
        pending.wait().await;
        self.delivery_duration
            .record(started.elapsed().as_secs_f64());
        let failures = pending.take_failures();
        Published {
            delivered: records.len() - failures.len(),
            failures,
        }
    }

    fn is_ready(&self) -> bool {
        self.up.load(Ordering::Acquire) && !self.closing.load(Ordering::Acquire)
    }
}

/// Creates the usage topic with its partition count; an existing topic is left as it is.
pub async fn ensure_topic(config: &KafkaConfig) -> Result<(), KafkaError> {
    tally_service::ensure_topic(config, &config.topic).await
}

#[cfg(test)]
mod tests {
    use super::{producer_config, Pending, SinkError};
    use std::path::Path;
    use std::time::Duration;

    #[tokio::test]
    async fn a_publish_waits_for_every_report_and_keeps_each_failure() {
        let pending = Pending::new(3);
        // Two reports land before anyone waits: nothing is lost.
        pending.count_down(1);
        pending.fail(SinkError::QueueFull);
        pending.count_down(1);
        let waiter = {
            let pending = pending.clone();
            tokio::spawn(async move { pending.wait().await })
        };
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!waiter.is_finished(), "one report is still missing");
        let reporter = {
            let pending = pending.clone();
            std::thread::spawn(move || {
                pending.fail(SinkError::BrokerDown);
                pending.count_down(1);
            })
        };
        tokio::time::timeout(Duration::from_secs(5), waiter)
            .await
            .expect("the last report wakes the request")
            .expect("task");
        reporter.join().expect("reporter");
        assert_eq!(
            pending.take_failures(),
            vec![SinkError::QueueFull, SinkError::BrokerDown]
        );
        // A publish with nothing to wait for returns at once.
        let none = Pending::new(0);
        tokio::time::timeout(Duration::from_secs(5), none.wait())
            .await
            .expect("nothing pending");
    }

    #[test]
    fn extra_producer_properties_are_applied_last() {
        let text = "[kafka]\nlinger_ms = 2\n\
                    producer = { \"socket.nagle.disable\" = \"true\", \"linger.ms\" = \"0\" }\n";
        let config = tally_core::Config::parse(text, Path::new("x.toml")).expect("parses");
        let client = producer_config(&config.kafka);
        assert_eq!(client.get("socket.nagle.disable"), Some("true"));
        assert_eq!(client.get("linger.ms"), Some("0"));
        assert_eq!(client.get("acks"), Some("all"));

        let plain = tally_core::Config::parse("", Path::new("x.toml")).expect("parses");
        assert_eq!(
            producer_config(&plain.kafka).get("socket.nagle.disable"),
            None
        );
    }
}
