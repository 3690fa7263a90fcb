//! Listening to the rater's entitlement-change notifications, so a plan change or migration
//! is seen on the next check rather than when a cache entry ages out.
//!
//! Every quota process must see every notification, so this consumer joins no group: it
//! assigns itself all partitions of the topic at their end. Notifications published while it
//! was not listening are missed; it therefore drops its whole cache whenever it (re)starts
//! listening, and the cache TTL bounds staleness if a notification is lost anyway.

use std::sync::Arc;
use std::time::Duration;

use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::{ClientConfig, Message, Offset, TopicPartitionList};
use serde::Deserialize;
use tally_core::config::KafkaConfig;
use tokio::sync::watch;

use crate::metrics::INVALIDATIONS;
use crate::resolve::Resolver;

/// What the quota service reads of a notification: whose entitlements changed. Both the
/// rater's migration chunks and its single subscription changes carry these fields.
#[derive(Debug, Deserialize)]
struct Notice {
    tenant: String,
    #[serde(default)]
    customers: Vec<String>,
}

/// Applies one notification's bytes to the cache; returns how many entries it dropped.
/// A notification that cannot be read drops the tenant's whole cache if its tenant is
/// readable, otherwise everything: better a re-read than a stale limit.
pub fn apply(resolver: &Resolver, payload: &[u8]) -> usize {
    match serde_json::from_slice::<Notice>(payload) {
        Ok(n) => {
            let customers: Vec<&str> = n.customers.iter().map(String::as_str).collect();
            resolver.invalidate(&n.tenant, &customers)
        }
        Err(e) => {
            tracing::warn!(error = %e, "unreadable entitlement notification; dropping the whole cache");
            let n = resolver.cached();
            resolver.invalidate_all();
            n
        }
    }
}

/// Listens until `stop` flips, re-subscribing after errors.
pub async fn listen(
    kafka: KafkaConfig,
    topic: String,
    resolver: Arc<Resolver>,
    mut stop: watch::Receiver<bool>,
) {
    let mut backoff = Duration::from_millis(200);
    loop {
        let attempt = subscribe(&kafka, &topic);
        let consumer = match tokio::time::timeout(Duration::from_secs(10), attempt).await {
            Ok(Ok(c)) => c,
            Ok(Err(e)) => {
                tracing::warn!(error = %e, %topic, "cannot listen for entitlement changes; retrying");
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => {}
                    _ = stop.changed() => return,
                }
                backoff = (backoff * 2).min(Duration::from_secs(5));
                continue;
            }
            Err(_) => {
                tracing::warn!(%topic, "broker did not answer; retrying");
                continue;
            }
        };
        resolver.invalidate_all();
        tracing::info!(%topic, "listening for entitlement changes");
        loop {
            tokio::select! {
                m = consumer.recv() => match m {
                    Ok(m) => {
                        let n = apply(&resolver, m.payload().unwrap_or_default());
                        metrics::counter!(INVALIDATIONS).increment(n as u64);
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "entitlement-change consumer error");
                        tokio::time::sleep(Duration::from_millis(200)).await;
                    }
                },
                _ = stop.changed() => return,
            }
        }
    }
}

async fn subscribe(kafka: &KafkaConfig, topic: &str) -> anyhow::Result<StreamConsumer> {
    tally_service::ensure_topic(kafka, topic).await?;
    let (brokers, topic) = (kafka.brokers.clone(), topic.to_owned());
    tokio::task::spawn_blocking(move || {
        let group = format!("tally-quota-listener-{}", std::process::id());
        let consumer: StreamConsumer = ClientConfig::new()
            .set("bootstrap.servers", &brokers)
            .set("group.id", &group)
            .set("enable.auto.commit", "false")
            .set("enable.partition.eof", "false")
            .set("fetch.wait.max.ms", "100")
            .create()?;
        let metadata = consumer.fetch_metadata(Some(&topic), Duration::from_secs(5))?;
        let partitions = metadata
            .topics()
            .iter()
            .find(|t| t.name() == topic)
            .map_or(0, |t| t.partitions().len());
        anyhow::ensure!(partitions > 0, "topic {topic} has no partitions");
        let mut tpl = TopicPartitionList::new();
        for p in 0..partitions {
            tpl.add_partition_offset(&topic, i32::try_from(p)?, Offset::End)?;
        }
        consumer.assign(&tpl)?;
        Ok(consumer)
    })
    .await?
}
