//! What every tally service shares at its edges: structured logging, the process-wide
//! Prometheus recorder, creating the Kafka topics a stage needs, and the HTTP server.

pub mod http;

use std::sync::OnceLock;
use std::time::Duration;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::ClientConfig;
use tally_core::config::KafkaConfig;

/// Latency buckets (seconds) for every `*_seconds` histogram.
pub const LATENCY_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

/// Logs to stderr, filtered by `TALLY_LOG` (default `info`); `TALLY_LOG_FORMAT=json` writes
/// JSON lines; colours only on a terminal.
pub fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("TALLY_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    if std::env::var("TALLY_LOG_FORMAT").is_ok_and(|f| f == "json") {
        builder.json().init();
    } else {
        builder.init();
    }
}

/// The process-wide Prometheus recorder, installed on first use with the latency buckets
/// and any extra `(metric-name prefix, buckets)`; `describe` runs once, after installing.
pub fn prometheus(extra: &[(&str, &[f64])], describe: fn()) -> &'static PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE.get_or_init(|| {
        let mut builder = PrometheusBuilder::new()
            .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), LATENCY_BUCKETS);
        for (prefix, buckets) in extra {
            builder = builder
                .and_then(|b| b.set_buckets_for_metric(Matcher::Prefix((*prefix).into()), buckets));
        }
        let handle = builder
            .and_then(|b| b.install_recorder())
            .unwrap_or_else(|e| {
                // Another recorder is already installed (a host process embedding us): keep an
                // unconnected handle so /metrics still answers.
                tracing::warn!(error = %e, "prometheus recorder not installed");
                PrometheusBuilder::new().build_recorder().handle()
            });
        describe();
        handle
    })
}

/// Creates `topic` with the configured partitions and replication unless it exists (an
/// existing topic is left as it is).
pub async fn ensure_topic(kafka: &KafkaConfig, topic: &str) -> Result<(), KafkaError> {
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", &kafka.brokers)
        .create()?;
    let new = NewTopic::new(
        topic,
        kafka.partitions,
        TopicReplication::Fixed(kafka.replication_factor),
    );
    let options = AdminOptions::new().operation_timeout(Some(Duration::from_secs(5)));
    for result in admin.create_topics([&new], &options).await? {
        match result {
            Ok(name) => {
                tracing::info!(topic = %name, partitions = kafka.partitions, "topic created")
            }
            Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((name, code)) => {
                tracing::error!(topic = %name, ?code, "topic creation failed");
                return Err(KafkaError::AdminOp(code));
            }
        }
    }
    Ok(())
}
