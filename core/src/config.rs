//! Configuration: one TOML file, overridable by `TALLY_*` environment variables.
//!
//! Defaults work against the local stack started by `make stack-up`.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};

use serde::Deserialize;
use sha2::{Digest, Sha256};

use crate::catalog::{Catalog, Meter};

/// A configuration file that cannot be used, naming the file and what is wrong.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    #[error("{file}: {source}")]
    Read {
        file: PathBuf,
        source: std::io::Error,
    },
    #[error("{file}: {message}")]
    Invalid { file: PathBuf, message: String },
    #[error("environment variable {name}: {reason}")]
    Env { name: &'static str, reason: String },
}

/// The whole configuration of a tally deployment.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// The HTTP ingest service.
    #[serde(default)]
    pub collector: CollectorConfig,
    /// The Kafka cluster and the usage topic.
    #[serde(default)]
    pub kafka: KafkaConfig,
    /// ClickHouse, where rollups and raw events live.
    #[serde(default)]
    pub clickhouse: ClickHouseConfig,
    /// Limits applied to every incoming event.
    #[serde(default)]
    pub validation: ValidationConfig,
    /// The aggregator: consumer group, flushing, dedupe, the usage API.
    #[serde(default)]
    pub aggregator: AggregatorConfig,
    /// The quota service: Redis counters and the gateway check.
    #[serde(default)]
    pub quota: QuotaConfig,
    /// The rater: invoice runs.
    #[serde(default)]
    pub rater: RaterConfig,
    /// Tenants and the hashes of their API keys.
    #[serde(default)]
    pub tenants: Vec<TenantConfig>,
    /// The meter catalog.
    #[serde(default)]
    pub meters: Vec<Meter>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CollectorConfig {
    /// Address the collector listens on (`TALLY_COLLECTOR_LISTEN`).
    #[serde(default = "default_collector_listen")]
    pub listen: String,
    /// Largest request body accepted, in bytes; larger bodies get 413 unread.
    #[serde(default = "default_max_body_bytes")]
    pub max_body_bytes: usize,
    /// Seconds a client is told to wait (`Retry-After`) when the broker cannot take events.
    #[serde(default = "default_retry_after_secs")]
    pub retry_after_secs: u32,
    /// Seconds given to in-flight requests and the producer flush on SIGTERM.
    #[serde(default = "default_shutdown_grace_secs")]
    pub shutdown_grace_secs: u64,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KafkaConfig {
    /// Bootstrap servers (`TALLY_KAFKA_BROKERS`).
    #[serde(default = "default_brokers")]
    pub brokers: String,
    /// Topic of accepted usage events (`TALLY_KAFKA_TOPIC`).
    #[serde(default = "default_topic")]
    pub topic: String,
    /// Partitions the topic is created with; bounds the aggregators' parallelism.
    #[serde(default = "default_partitions")]
    pub partitions: i32,
    /// Replication factor the topic is created with.
    #[serde(default = "default_replication")]
    pub replication_factor: i32,
    /// Idempotent producer (`TALLY_KAFKA_IDEMPOTENCE`). On for Apache Kafka; must stay off
    /// for the local tansu 0.6.0 broker, which wedges after an idempotent send times out.
    #[serde(default)]
    pub idempotence: bool,
    /// How long a send may wait for the broker before the request fails with 503.
    #[serde(default = "default_message_timeout_ms")]
    pub message_timeout_ms: u64,
    /// Producer queue bound (messages); a full queue answers 503 instead of growing.
    #[serde(default = "default_queue_max_messages")]
    pub queue_max_messages: u32,
    /// Producer queue bound (KiB).
    #[serde(default = "default_queue_max_kbytes")]
    pub queue_max_kbytes: u32,
    /// How long the producer waits to fill a batch.
    #[serde(default = "default_linger_ms")]
    pub linger_ms: u32,
    /// Compression codec of produced batches (`none`, `gzip`, `lz4`, `zstd`, `snappy`).
    #[serde(default = "default_compression")]
    pub compression: String,
    /// Interval of the broker health probe (a metadata request).
    #[serde(default = "default_health_interval_ms")]
    pub health_interval_ms: u64,
    /// Further librdkafka producer properties (`"socket.nagle.disable" = "true"`, say),
    /// applied after the ones above, so they can override them; except the ones the
    /// collector's guarantees rest on (`PINNED_PRODUCER_PROPERTIES`).
    #[serde(default)]
    pub producer: std::collections::BTreeMap<String, String>,
}

/// Producer properties `kafka.producer` may not set, and why.
const PINNED_PRODUCER_PROPERTIES: &[(&str, &str)] = &[
    ("acks", "an accepted event is one all in-sync replicas hold"),
    (
        "request.required.acks",
        "an accepted event is one all in-sync replicas hold",
    ),
    ("enable.idempotence", "use kafka.idempotence"),
    (
        "partitioner",
        "every retry of an event must reach the same partition, where its id is deduplicated",
    ),
];

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClickHouseConfig {
    /// HTTP endpoint (`TALLY_CLICKHOUSE_URL`).
    #[serde(default = "default_clickhouse_url")]
    pub url: String,
    /// Database holding tally's tables (`TALLY_CLICKHOUSE_DATABASE`).
    #[serde(default = "default_clickhouse_database")]
    pub database: String,
    #[serde(default = "default_clickhouse_user")]
    pub user: String,
    #[serde(default)]
    pub password: String,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ValidationConfig {
    /// How far in the future an event time may be, in seconds.
    #[serde(default = "default_max_future_secs")]
    pub max_future_secs: u64,
    /// How old an event may be when it arrives, in seconds (default 7 days).
    #[serde(default = "default_allowed_lateness_secs")]
    pub allowed_lateness_secs: u64,
    /// Longest `id`, in characters.
    #[serde(default = "default_max_id_chars")]
    pub max_id_chars: usize,
    /// Longest `customer`, in characters.
    #[serde(default = "default_max_customer_chars")]
    pub max_customer_chars: usize,
    /// Longest `type`, in characters.
    #[serde(default = "default_max_type_chars")]
    pub max_type_chars: usize,
    /// Longest dimension value and unique-count identifier, in characters.
    #[serde(default = "default_max_dimension_chars")]
    pub max_dimension_chars: usize,
    /// Most properties in `data`, counted at every nesting level.
    #[serde(default = "default_max_properties")]
    pub max_properties: usize,
    /// Deepest nesting of objects and arrays inside `data`.
    #[serde(default = "default_max_depth")]
    pub max_depth: usize,
    /// Most events in one request.
    #[serde(default = "default_max_batch_events")]
    pub max_batch_events: usize,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AggregatorConfig {
    /// Consumer group all aggregators of a deployment join (`TALLY_AGGREGATOR_GROUP`).
    #[serde(default = "default_group_id")]
    pub group_id: String,
    /// Topic that receives records the aggregator cannot count, with the reason.
    #[serde(default = "default_dead_letter_topic")]
    pub dead_letter_topic: String,
    /// Longest time an accepted event waits in memory before its flush.
    #[serde(default = "default_flush_interval_ms")]
    pub flush_interval_ms: u64,
    /// Most records in one flush (one ClickHouse insert). Large flushes are much cheaper
    /// for ClickHouse (each writes a part per table, and part files dominate its CPU for
    /// small inserts); under light load the interval flushes first anyway. The aggregator
    /// lowers it if the catalog's meters could make a flush's rows exceed 1,000,000.
    #[serde(default = "default_flush_max_records")]
    pub flush_max_records: usize,
    /// How long a retried event id is recognised as a duplicate, in seconds. Must cover
    /// the allowed lateness plus the time clients keep retrying.
    #[serde(default = "default_dedupe_window_secs")]
    pub dedupe_window_secs: u64,
    /// Longest a fetch waits for records. tansu 0.6.0 holds every fetch this long even when
    /// it has records, so this bounds the aggregator's throughput there (BENCHMARKS.md).
    #[serde(default = "default_fetch_wait_max_ms")]
    pub fetch_wait_max_ms: u64,
    /// Kafka session timeout: how soon a dead member's partitions move to the others.
    #[serde(default = "default_session_timeout_ms")]
    pub session_timeout_ms: u64,
    /// Address of the usage API, `/healthz`, `/readyz` and `/metrics`
    /// (`TALLY_AGGREGATOR_LISTEN`).
    #[serde(default = "default_aggregator_listen")]
    pub listen: String,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QuotaConfig {
    /// Address of `POST /v1/quota/check`, `/healthz`, `/readyz` and `/metrics`
    /// (`TALLY_QUOTA_LISTEN`).
    #[serde(default = "default_quota_listen")]
    pub listen: String,
    /// Redis holding the counters (`TALLY_REDIS_URL`).
    #[serde(default = "default_redis_url")]
    pub redis_url: String,
    /// Longest one Redis round trip may take before the meter's `when_redis_down` policy
    /// answers instead.
    #[serde(default = "default_redis_timeout_ms")]
    pub redis_timeout_ms: u64,
    /// Folder of plan files (`config/plans/<plan>/v<N>.toml`) (`TALLY_PLANS`).
    #[serde(default = "default_plans_dir")]
    pub plans_dir: String,
    /// Longest a customer's subscription stays cached when no entitlement-change
    /// notification arrives for it.
    #[serde(default = "default_cache_ttl_ms")]
    pub cache_ttl_ms: u64,
    /// What a customer without a subscription in force gets: `deny`, `allow` (unlimited) or
    /// `plan:<name>` (the limits of that plan's latest version, periods anchored on the
    /// first of the month).
    #[serde(default = "default_no_subscription")]
    pub no_subscription: String,
    /// Topic the rater publishes entitlement changes to.
    #[serde(default = "default_entitlement_topic")]
    pub entitlement_topic: String,
    /// Consumer group of the feed that counts metered events into the counters.
    #[serde(default = "default_feed_group")]
    pub feed_group: String,
    /// How long an event id is remembered by the feed, so a retried event counts once.
    #[serde(default = "default_dedupe_window_secs")]
    pub dedupe_window_secs: u64,
    /// How often the service reconciles the counters of meters counted from events with
    /// ClickHouse and repairs drift; 0 turns the periodic job off (`tally-quota reconcile`
    /// still runs it on demand).
    #[serde(default = "default_reconcile_interval_secs")]
    pub reconcile_interval_secs: u64,
    /// Per-meter settings; a meter not listed is counted from checks, fails closed, and
    /// counts whole units.
    #[serde(default)]
    pub meters: Vec<QuotaMeterConfig>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RaterConfig {
    /// Topic a final run publishes each final invoice's lines to, for a billing system
    /// (`TALLY_INVOICE_TOPIC`).
    #[serde(default = "default_invoice_topic")]
    pub invoice_topic: String,
    /// Address `tally-rater serve` (invoice previews, health, metrics) listens on
    /// (`TALLY_RATER_LISTEN`).
    #[serde(default = "default_rater_listen")]
    pub listen: String,
    /// How often `tally-rater serve` runs final invoices for every tenant: each customer's
    /// latest period closed `final_grace_hours` ago or more, if not yet final and published.
    /// 0 turns the schedule off (final runs then come from `tally-rater invoice --mode
    /// final`). `TALLY_RATER_FINAL_EVERY_SECS`.
    #[serde(default = "default_final_every_secs")]
    pub final_every_secs: u64,
    /// Hours after a period's end before its final invoice is written: usage of the period
    /// that arrives later becomes an adjustment on the next invoice.
    #[serde(default = "default_final_grace_hours")]
    pub final_grace_hours: u64,
    /// Closed periods before each customer's latest one that a scheduled run also
    /// finalizes when they are not final yet (the rater was down over a period end). Each
    /// costs one query of invoice ids per tenant and tick.
    #[serde(default = "default_final_catch_up_periods")]
    pub final_catch_up_periods: usize,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QuotaMeterConfig {
    /// A meter of the catalog.
    pub meter: String,
    /// `checks`: gateway checks with `consume: true` are the usage. `events`: events
    /// ingested through the pipeline are (checks only ask).
    #[serde(default = "default_counted_from")]
    pub counted_from: String,
    /// `closed`: refuse while Redis is unreachable. `open`: allow, up to the limits applied
    /// by an in-process limiter.
    #[serde(default = "default_when_redis_down")]
    pub when_redis_down: String,
    /// Decimal places counted: amounts and limits are held as integers of 10^-scale units.
    #[serde(default)]
    pub scale: u32,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TenantConfig {
    /// Tenant id: 1–64 characters of `a-z`, `0-9`, `_`, `-`.
    pub id: String,
    /// SHA-256 (hex) of each API key of this tenant; several allow rotation.
    pub api_key_sha256: Vec<String>,
    /// Refuse events whose type no meter reads.
    #[serde(default)]
    pub strict: bool,
}

fn default_collector_listen() -> String {
    "127.0.0.1:8700".into()
}
fn default_max_body_bytes() -> usize {
    1 << 20
}
fn default_retry_after_secs() -> u32 {
    1
}
fn default_shutdown_grace_secs() -> u64 {
    10
}
fn default_brokers() -> String {
    "127.0.0.1:19092".into()
}
fn default_topic() -> String {
    "usage-events".into()
}
fn default_partitions() -> i32 {
    8
}
fn default_replication() -> i32 {
    1
}
fn default_message_timeout_ms() -> u64 {
    5_000
}
fn default_queue_max_messages() -> u32 {
    100_000
}
fn default_queue_max_kbytes() -> u32 {
    64 * 1024
}
fn default_linger_ms() -> u32 {
    2
}
fn default_compression() -> String {
    "none".into()
}
fn default_health_interval_ms() -> u64 {
    1_000
}
fn default_clickhouse_url() -> String {
    "http://127.0.0.1:18123".into()
}
fn default_clickhouse_database() -> String {
    "tally".into()
}
fn default_clickhouse_user() -> String {
    "default".into()
}
fn default_group_id() -> String {
    "tally-aggregator".into()
}
fn default_dead_letter_topic() -> String {
    "usage-events-dead-letter".into()
}
fn default_flush_interval_ms() -> u64 {
    1_000
}
fn default_flush_max_records() -> usize {
    125_000
}
fn default_dedupe_window_secs() -> u64 {
    8 * 24 * 3600
}
fn default_fetch_wait_max_ms() -> u64 {
    100
}
fn default_session_timeout_ms() -> u64 {
    10_000
}
fn default_aggregator_listen() -> String {
    "127.0.0.1:8701".into()
}
fn default_quota_listen() -> String {
    "127.0.0.1:8702".into()
}
fn default_redis_url() -> String {
    "redis://127.0.0.1:16379".into()
}
fn default_redis_timeout_ms() -> u64 {
    250
}
fn default_plans_dir() -> String {
    "config/plans".into()
}
fn default_cache_ttl_ms() -> u64 {
    30_000
}
fn default_no_subscription() -> String {
    "deny".into()
}
fn default_entitlement_topic() -> String {
    "entitlement-changes".into()
}
fn default_final_every_secs() -> u64 {
    3600
}
fn default_final_grace_hours() -> u64 {
    24
}
fn default_final_catch_up_periods() -> usize {
    2
}
fn default_rater_listen() -> String {
    "127.0.0.1:8703".into()
}
fn default_invoice_topic() -> String {
    "invoice-lines".into()
}
fn default_feed_group() -> String {
    "tally-quota-feed".into()
}
fn default_reconcile_interval_secs() -> u64 {
    300
}
fn default_counted_from() -> String {
    "checks".into()
}
fn default_when_redis_down() -> String {
    "closed".into()
}
fn default_max_future_secs() -> u64 {
    300
}
fn default_allowed_lateness_secs() -> u64 {
    7 * 24 * 3600
}
fn default_max_id_chars() -> usize {
    128
}
fn default_max_customer_chars() -> usize {
    256
}
fn default_max_type_chars() -> usize {
    128
}
fn default_max_dimension_chars() -> usize {
    256
}
fn default_max_properties() -> usize {
    64
}
fn default_max_depth() -> usize {
    8
}
fn default_max_batch_events() -> usize {
    10_000
}

/// Kafka's rule for topic names: 1–249 characters of `a-z A-Z 0-9 . _ -`, not `.` or `..`.
fn check_topic(name: &str) -> Result<(), String> {
    let legal = |c: char| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-');
    if name.is_empty() || name.len() > 249 || name == "." || name == ".." {
        return Err(format!(
            "{name:?} is not a topic name (1 to 249 characters, not \".\" or \"..\")"
        ));
    }
    match name.chars().find(|c| !legal(*c)) {
        Some(c) => Err(format!(
            "{name:?}: {c:?} is not allowed in a topic name (letters, digits, '.', '_', '-')"
        )),
        None => Ok(()),
    }
}

macro_rules! default_from_serde {
    ($($t:ty),*) => {$(
        impl Default for $t {
            fn default() -> Self {
                toml::from_str("").expect("every field has a default")
            }
        }
    )*};
}
default_from_serde!(
    CollectorConfig,
    KafkaConfig,
    ClickHouseConfig,
    ValidationConfig,
    AggregatorConfig,
    QuotaConfig,
    RaterConfig
);

impl Default for Config {
    fn default() -> Self {
        toml::from_str("").expect("every field has a default")
    }
}

impl Config {
    /// Reads `path` (or the file named by `TALLY_CONFIG`, or built-in defaults), then applies
    /// environment overrides and checks the result.
    pub fn load(path: Option<&Path>) -> Result<Config, ConfigError> {
        let from_env = std::env::var_os("TALLY_CONFIG").map(PathBuf::from);
        let path = path.map(Path::to_path_buf).or(from_env);
        let mut config = match &path {
            Some(p) => {
                let text = std::fs::read_to_string(p).map_err(|source| ConfigError::Read {
                    file: p.clone(),
                    source,
                })?;
                Config::parse(&text, p)?
            }
            None => Config::default(),
        };
        config.apply_env(|k| std::env::var(k).ok())?;
        Ok(config)
    }

    /// Parses and checks one file's text; `file` only names it in errors.
    pub fn parse(text: &str, file: &Path) -> Result<Config, ConfigError> {
        let invalid = |message: String| ConfigError::Invalid {
            file: file.to_path_buf(),
            message,
        };
        let config: Config = toml::from_str(text).map_err(|e| invalid(e.to_string()))?;
        config.check().map_err(invalid)?;
        Ok(config)
    }

    /// Applies `TALLY_*` overrides read through `get`.
    pub fn apply_env(&mut self, get: impl Fn(&str) -> Option<String>) -> Result<(), ConfigError> {
        if let Some(v) = get("TALLY_COLLECTOR_LISTEN") {
            self.collector.listen = v;
        }
        if let Some(v) = get("TALLY_KAFKA_BROKERS") {
            self.kafka.brokers = v;
        }
        if let Some(v) = get("TALLY_KAFKA_TOPIC") {
            self.kafka.topic = v;
        }
        if let Some(v) = get("TALLY_KAFKA_IDEMPOTENCE") {
            self.kafka.idempotence = match v.as_str() {
                "true" | "1" => true,
                "false" | "0" => false,
                _ => {
                    return Err(ConfigError::Env {
                        name: "TALLY_KAFKA_IDEMPOTENCE",
                        reason: format!("expected true or false, got {v:?}"),
                    })
                }
            };
        }
        if let Some(v) = get("TALLY_AGGREGATOR_GROUP") {
            self.aggregator.group_id = v;
        }
        if let Some(v) = get("TALLY_AGGREGATOR_LISTEN") {
            self.aggregator.listen = v;
        }
        if let Some(v) = get("TALLY_QUOTA_LISTEN") {
            self.quota.listen = v;
        }
        if let Some(v) = get("TALLY_REDIS_URL") {
            self.quota.redis_url = v;
        }
        if let Some(v) = get("TALLY_INVOICE_TOPIC") {
            self.rater.invoice_topic = v;
        }
        if let Some(v) = get("TALLY_RATER_LISTEN") {
            self.rater.listen = v;
        }
        if let Some(v) = get("TALLY_RATER_FINAL_EVERY_SECS") {
            self.rater.final_every_secs = v.parse().map_err(|_| ConfigError::Env {
                name: "TALLY_RATER_FINAL_EVERY_SECS",
                reason: format!("{v:?} is not a whole number of seconds"),
            })?;
        }
        if let Some(v) = get("TALLY_PLANS") {
            self.quota.plans_dir = v;
        }
        if let Some(v) = get("TALLY_CLICKHOUSE_URL") {
            self.clickhouse.url = v;
        }
        if let Some(v) = get("TALLY_CLICKHOUSE_DATABASE") {
            self.clickhouse.database = v;
        }
        Ok(())
    }

    fn check(&self) -> Result<(), String> {
        Catalog::new(self.meters.clone()).map_err(|e| e.to_string())?;
        Tenants::new(&self.tenants)?;
        if self.kafka.partitions < 1 {
            return Err("kafka.partitions: must be at least 1".into());
        }
        for (key, why) in PINNED_PRODUCER_PROPERTIES {
            if self.kafka.producer.contains_key(*key) {
                return Err(format!("kafka.producer: {key:?} cannot be set here: {why}"));
            }
        }
        if self.aggregator.dedupe_window_secs < self.validation.allowed_lateness_secs {
            return Err(
                "aggregator.dedupe_window_secs: must cover validation.allowed_lateness_secs".into(),
            );
        }
        for (field, topic) in [
            ("kafka.topic", &self.kafka.topic),
            (
                "aggregator.dead_letter_topic",
                &self.aggregator.dead_letter_topic,
            ),
            ("quota.entitlement_topic", &self.quota.entitlement_topic),
            ("rater.invoice_topic", &self.rater.invoice_topic),
        ] {
            check_topic(topic).map_err(|e| format!("{field}: {e}"))?;
        }
        self.check_quota()?;
        if self.collector.max_body_bytes == 0 {
            return Err("collector.max_body_bytes: must be positive".into());
        }
        Ok(())
    }

    fn check_quota(&self) -> Result<(), String> {
        let q = &self.quota;
        let ns = q.no_subscription.as_str();
        let plan_ok = ns.strip_prefix("plan:").is_some_and(|p| !p.is_empty());
        if !(ns == "deny" || ns == "allow" || plan_ok) {
            return Err(format!(
                "quota.no_subscription: expected \"deny\", \"allow\" or \"plan:<name>\", got {ns:?}"
            ));
        }
        if q.redis_timeout_ms == 0 {
            return Err("quota.redis_timeout_ms: must be positive".into());
        }
        let catalog = Catalog::new(self.meters.clone()).map_err(|e| e.to_string())?;
        let mut seen = HashSet::new();
        for (i, m) in q.meters.iter().enumerate() {
            let at = |field: &str| format!("quota.meters[{i}].{field}");
            let Some(meter) = catalog.meter(&m.meter) else {
                return Err(format!(
                    "{}: no meter {:?} in the catalog",
                    at("meter"),
                    m.meter
                ));
            };
            // The counters add: a reading (LATEST, MIN, MAX) or a distinct count added up
            // per event would be neither the meter's value nor a usage.
            let additive = matches!(
                meter.aggregation,
                crate::Aggregation::Count | crate::Aggregation::Sum
            );
            if m.counted_from == "events" && !additive {
                return Err(format!(
                    "{}: meter {:?} is {}; only COUNT and SUM meters can be counted from events",
                    at("counted_from"),
                    m.meter,
                    meter.aggregation.name()
                ));
            }
            if !seen.insert(m.meter.as_str()) {
                return Err(format!("{}: meter {:?} listed twice", at("meter"), m.meter));
            }
            if !matches!(m.counted_from.as_str(), "checks" | "events") {
                return Err(format!(
                    "{}: expected \"checks\" or \"events\", got {:?}",
                    at("counted_from"),
                    m.counted_from
                ));
            }
            if !matches!(m.when_redis_down.as_str(), "open" | "closed") {
                return Err(format!(
                    "{}: expected \"open\" or \"closed\", got {:?}",
                    at("when_redis_down"),
                    m.when_redis_down
                ));
            }
            if m.scale > 9 {
                return Err(format!("{}: at most 9 decimal places", at("scale")));
            }
        }
        Ok(())
    }

    pub fn catalog(&self) -> Catalog {
        Catalog::new(self.meters.clone()).expect("checked at load")
    }

    pub fn tenants(&self) -> Tenants {
        Tenants::new(&self.tenants).expect("checked at load")
    }
}

/// API keys → tenants, holding only key hashes.
#[derive(Debug, Clone, Default)]
pub struct Tenants {
    by_hash: HashMap<[u8; 32], Tenant>,
}

/// A tenant, as resolved from its API key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tenant {
    pub id: String,
    pub strict: bool,
}

impl Tenants {
    pub fn new(configs: &[TenantConfig]) -> Result<Tenants, String> {
        let mut by_hash = HashMap::new();
        let mut ids = HashSet::new();
        for t in configs {
            let id_ok = (1..=64).contains(&t.id.len())
                && t.id.bytes().all(|b| {
                    b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-'
                });
            if !id_ok {
                return Err(format!(
                    "tenant {:?}: id: must be 1-64 characters of a-z, 0-9, _ and -",
                    t.id
                ));
            }
            if !ids.insert(&t.id) {
                return Err(format!("tenant {:?}: id: declared twice", t.id));
            }
            if t.api_key_sha256.is_empty() {
                return Err(format!(
                    "tenant {:?}: api_key_sha256: needs at least one key hash",
                    t.id
                ));
            }
            for h in &t.api_key_sha256 {
                let mut hash = [0u8; 32];
                hex::decode_to_slice(h, &mut hash).map_err(|_| {
                    format!(
                        "tenant {:?}: api_key_sha256: {h:?} is not 64 hex digits",
                        t.id
                    )
                })?;
                let tenant = Tenant {
                    id: t.id.clone(),
                    strict: t.strict,
                };
                if by_hash.insert(hash, tenant).is_some() {
                    return Err(format!(
                        "tenant {:?}: api_key_sha256: key hash used twice",
                        t.id
                    ));
                }
            }
        }
        Ok(Tenants { by_hash })
    }

    /// The tenant owning this API key, if any.
    pub fn authenticate(&self, api_key: &str) -> Option<&Tenant> {
        let hash: [u8; 32] = Sha256::digest(api_key.as_bytes()).into();
        self.by_hash.get(&hash)
    }
}

/// Hex SHA-256 of an API key, as stored in `api_key_sha256`.
pub fn hash_api_key(api_key: &str) -> String {
    hex::encode(Sha256::digest(api_key.as_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_config_in_the_repository_parses() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../config");
        let mut seen = 0;
        for entry in std::fs::read_dir(&dir).expect("config dir") {
            let path = entry.expect("entry").path();
            if path.extension().is_some_and(|e| e == "toml") {
                let text = std::fs::read_to_string(&path).expect("read");
                Config::parse(&text, &path).unwrap_or_else(|e| panic!("{e}"));
                seen += 1;
            }
        }
        assert!(seen >= 2, "expected the dev and example configs");
    }

    #[test]
    fn dev_config_knows_the_demo_key() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../config/tally.dev.toml");
        let text = std::fs::read_to_string(&path).expect("read");
        let config = Config::parse(&text, &path).expect("parse");
        let tenant = config.tenants().authenticate("demo-key").cloned();
        assert_eq!(tenant.map(|t| t.id), Some("demo".to_owned()));
        assert!(config.tenants().authenticate("demo-key ").is_none());
        let keys: Vec<_> = config.meters.iter().map(|m| m.key.as_str()).collect();
        assert_eq!(keys, ["requests", "tokens", "storage_gb", "active_users"]);
    }

    #[test]
    fn producer_properties_the_guarantees_rest_on_are_refused() {
        let text = "[kafka]\nproducer = { \"socket.nagle.disable\" = \"true\" }\n";
        assert!(Config::parse(text, Path::new("x.toml")).is_ok());
        for key in [
            "acks",
            "request.required.acks",
            "enable.idempotence",
            "partitioner",
        ] {
            let text = format!("[kafka]\nproducer = {{ {key:?} = \"1\" }}\n");
            let e = Config::parse(&text, Path::new("x.toml")).expect_err(key);
            let msg = e.to_string();
            assert!(
                msg.starts_with(&format!("x.toml: kafka.producer: {key:?} cannot be set")),
                "{msg}"
            );
        }
    }

    #[test]
    fn errors_name_the_file_and_field() {
        let e = Config::parse("[collector]\nlisten = 3\n", Path::new("x.toml")).expect_err("bad");
        let msg = e.to_string();
        assert!(
            msg.starts_with("x.toml: ") && msg.contains("listen"),
            "{msg}"
        );

        let e = Config::parse("[kafka]\nbrokrs = \"a\"\n", Path::new("x.toml")).expect_err("bad");
        assert!(e.to_string().contains("brokrs"), "{e}");

        let bad_meter = "[[meters]]\nkey = \"m\"\nevent_type = \"t\"\naggregation = \"SUM\"\n";
        let e = Config::parse(bad_meter, Path::new("x.toml")).expect_err("bad");
        assert_eq!(
            e.to_string(),
            "x.toml: meter \"m\": value: required for this aggregation"
        );

        let e = Config::parse(
            "[rater]\ninvoice_topic = \"lines/eu\"\n",
            Path::new("x.toml"),
        )
        .expect_err("bad");
        assert_eq!(
            e.to_string(),
            "x.toml: rater.invoice_topic: \"lines/eu\": '/' is not allowed in a topic name \
             (letters, digits, '.', '_', '-')"
        );
        let e = Config::parse("[kafka]\ntopic = \"\"\n", Path::new("x.toml")).expect_err("bad");
        assert!(e.to_string().starts_with("x.toml: kafka.topic: "), "{e}");
        let ok = Config::parse(
            "[rater]\ninvoice_topic = \"billing.lines_v2-eu\"\n",
            Path::new("x"),
        );
        assert_eq!(
            ok.expect("legal").rater.invoice_topic,
            "billing.lines_v2-eu"
        );

        let gauge =
            "[[meters]]\nkey = \"gb\"\nevent_type = \"storage\"\naggregation = \"LATEST\"\n\
                     value = \"gb\"\n[quota]\n[[quota.meters]]\nmeter = \"gb\"\n";
        Config::parse(gauge, Path::new("x.toml")).expect("a gauge counted from checks");
        let e = Config::parse(
            &format!("{gauge}counted_from = \"events\"\n"),
            Path::new("x.toml"),
        )
        .expect_err("a gauge counted from events");
        assert_eq!(
            e.to_string(),
            "x.toml: quota.meters[0].counted_from: meter \"gb\" is LATEST; only COUNT and SUM \
             meters can be counted from events"
        );

        let bad_hash = "[[tenants]]\nid = \"a\"\napi_key_sha256 = [\"zz\"]\n";
        let e = Config::parse(bad_hash, Path::new("x.toml")).expect_err("bad");
        assert!(e.to_string().contains("not 64 hex digits"), "{e}");
    }

    #[test]
    fn env_overrides_apply() {
        let mut c = Config::default();
        let env = |k: &str| match k {
            "TALLY_KAFKA_BROKERS" => Some("h:1".to_owned()),
            "TALLY_KAFKA_IDEMPOTENCE" => Some("true".to_owned()),
            _ => None,
        };
        c.apply_env(env).expect("valid env");
        assert_eq!(c.kafka.brokers, "h:1");
        assert!(c.kafka.idempotence);
        let bad = |k: &str| (k == "TALLY_KAFKA_IDEMPOTENCE").then(|| "yes".to_owned());
        assert!(c.apply_env(bad).is_err());

        assert_eq!(c.rater.final_every_secs, 3600, "hourly by default");
        let off = |k: &str| (k == "TALLY_RATER_FINAL_EVERY_SECS").then(|| "0".to_owned());
        c.apply_env(off).expect("0 turns it off");
        assert_eq!(c.rater.final_every_secs, 0);
        let bad = |k: &str| (k == "TALLY_RATER_FINAL_EVERY_SECS").then(|| "hourly".to_owned());
        let e = c.apply_env(bad).expect_err("not a number").to_string();
        assert!(e.contains("TALLY_RATER_FINAL_EVERY_SECS"), "{e}");
    }
}
