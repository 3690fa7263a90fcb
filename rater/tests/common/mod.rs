//! Test support: a private database with the migrations applied, events written through
//! the aggregator's own batch and store code, usage computed from the events alone, and
//! topics read back from the broker.
#![allow(dead_code, unreachable_pub)]

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::{ClientConfig, Message, Offset, TopicPartitionList};
use serde_json::Value;
use tally_core::config::KafkaConfig;

use rust_decimal::Decimal;
use serde_json::json;
use tally_aggregator::migrate;
use tally_aggregator::rollup::{Dedupe, Incoming, Meters, PartitionBatch};
use tally_aggregator::store::Store;
use tally_core::config::ClickHouseConfig;
use tally_core::Config;
use tally_rater::usage::UsageRequest;
use time::macros::datetime;
use time::OffsetDateTime;

pub fn config() -> Config {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../config/tally.dev.toml");
    Config::parse(&std::fs::read_to_string(&path).expect("dev config"), &path).expect("parses")
}

pub fn database(name: &str) -> ClickHouseConfig {
    ClickHouseConfig {
        url: clickhouse_url(),
        database: unique(name),
        user: "default".into(),
        password: String::new(),
    }
}

/// One test event: customer, type, time and its metered field.
#[derive(Debug, Clone)]
pub struct Ev {
    pub id: String,
    pub customer: &'static str,
    pub ty: &'static str,
    pub time: OffsetDateTime,
    pub value: &'static str,
}

fn data(e: &Ev) -> serde_json::Value {
    match e.ty {
        "request" => json!({"endpoint": e.value}),
        "completion" => json!({"tokens": e.value, "model": "m1"}),
        "storage" => json!({"gb": e.value}),
        _ => json!({"user": e.value}),
    }
}

pub fn events() -> Vec<Ev> {
    let base = datetime!(2026-10-01 0:00 UTC);
    let mut out = Vec::new();
    let mut n = 0;
    let mut push = |customer, ty, time, value| {
        n += 1;
        out.push(Ev {
            id: format!("e{n}"),
            customer,
            ty,
            time,
            value,
        });
    };
    for (i, c) in ["alpha", "beta", "it's"].into_iter().enumerate() {
        for h in 0..48i64 {
            let t = base + Duration::from_secs(h as u64 * 3600 * 7 + i as u64 * 61);
            push(c, "request", t, "/v1/a");
            push(c, "completion", t + Duration::from_secs(5), "12.5");
            push(
                c,
                "completion",
                t + Duration::from_millis(5500),
                "0.000000001",
            );
            push(
                c,
                "storage",
                t + Duration::from_secs(9),
                ["3", "7.25", "1"][h as usize % 3],
            );
            push(
                c,
                "login",
                t + Duration::from_secs(11),
                ["u1", "u2", "u3", "u4"][h as usize % 4],
            );
        }
    }
    // Two completions at the same instant: LATEST keeps the later record.
    let tie = datetime!(2026-10-05 10:30 UTC);
    push("beta", "storage", tie, "100");
    push("beta", "storage", tie, "200");
    push("what?", "request", tie, "/v1/q?x");
    out
}

/// Writes the events through the aggregator's batch (one partition, in order) and store.
pub async fn write(db: &ClickHouseConfig, events: &[Ev]) {
    let config = config();
    let catalog = config.catalog();
    let meters = Meters::new(&catalog, config.validation.max_dimension_chars);
    let mut batch = PartitionBatch::default();
    let dedupe = Dedupe::default();
    for (offset, e) in events.iter().enumerate() {
        let record = json!({"v": 1, "tenant": "demo", "id": e.id, "customer": e.customer,
            "type": e.ty, "time": e.time.format(&time::format_description::well_known::Rfc3339).expect("time"),
            "received_at": "2026-11-01T00:00:00Z", "data": data(e)});
        let payload = record.to_string().into_bytes();
        let key = format!("demo/{}", e.customer).into_bytes();
        let outcome = batch.add(
            &meters,
            &dedupe,
            Incoming {
                partition: 0,
                offset: offset as i64,
                key: Some(&key),
                payload: Some(&payload),
            },
        );
        assert_eq!(outcome, tally_aggregator::rollup::Outcome::Counted, "{e:?}");
    }
    let mut body = tally_aggregator::ledger::Body::default();
    batch.take_into(&meters, "usage-events", 0, 1_800_000_000, &mut body);
    Store::new(db, Duration::from_secs(30))
        .insert_body(body, &tally_aggregator::store::query_id("test-fill"))
        .await
        .expect("insert");
}

/// Expected quantities per (customer, segment), computed from the events alone.
pub fn expected(
    events: &[Ev],
    requests: &[UsageRequest],
) -> BTreeMap<(String, usize), BTreeMap<String, Decimal>> {
    let mut out: BTreeMap<(String, usize), BTreeMap<String, Decimal>> = BTreeMap::new();
    let mut latest: BTreeMap<(String, usize), OffsetDateTime> = BTreeMap::new();
    let mut users: BTreeMap<(String, usize), BTreeSet<&str>> = BTreeMap::new();
    for e in events {
        let Some(r) = requests.iter().find(|r| r.customer == e.customer) else {
            continue;
        };
        let Some(seg) = r
            .bounds
            .windows(2)
            .position(|w| w[0] <= e.time && e.time < w[1])
        else {
            continue;
        };
        let key = (e.customer.to_owned(), seg);
        let m = out.entry(key.clone()).or_default();
        let v: Decimal = e.value.parse().unwrap_or_default();
        match e.ty {
            "request" => *m.entry("requests".into()).or_default() += Decimal::ONE,
            "completion" => *m.entry("tokens".into()).or_default() += v,
            "storage" => {
                if latest.get(&key).is_none_or(|t| e.time >= *t) {
                    latest.insert(key.clone(), e.time);
                    m.insert("storage_gb".into(), v);
                }
            }
            _ => {
                let set = users.entry(key).or_default();
                set.insert(e.value);
                m.insert("active_users".into(), Decimal::from(set.len()));
            }
        }
    }
    for m in out.values_mut() {
        for v in m.values_mut() {
            *v = v.normalize();
        }
    }
    out
}

/// A private database with every migration applied.
pub async fn fresh_database(name: &str) -> ClickHouseConfig {
    let db = database(name);
    migrate::apply(
        &db,
        &migrate::load(&migrate::default_dir()).expect("migrations"),
    )
    .await
    .expect("migrate");
    db
}

pub async fn drop_database(db: &ClickHouseConfig) {
    migrate::client(db)
        .with_database("default")
        .query(&format!("DROP DATABASE IF EXISTS {}", db.database))
        .execute()
        .await
        .expect("drop");
}

pub async fn count(db: &ClickHouseConfig, sql: &str) -> u64 {
    migrate::client(db)
        .query(sql)
        .fetch_one::<u64>()
        .await
        .expect("count")
}

/// A repository path. Tests run in the package folder; resolving at run time (not with
/// `env!`) keeps a build made from another checkout from pointing elsewhere.
pub fn repo(path: &str) -> std::path::PathBuf {
    std::env::current_dir().expect("cwd").join("..").join(path)
}

pub fn catalog() -> tally_rater::Catalog {
    tally_rater::Catalog::load_dir(repo("config/plans")).unwrap_or_else(|e| panic!("{e}"))
}

pub fn clickhouse_url() -> String {
    std::env::var("TALLY_CLICKHOUSE_URL").unwrap_or_else(|_| "http://127.0.0.1:18123".into())
}

/// A database name no other test run uses.
pub fn unique(name: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_nanos();
    format!("test_rater_{name}_{}_{nanos}", std::process::id())
}

/// A private, migrated database, dropped when this goes out of scope
/// (`TALLY_TEST_KEEP=1` keeps it).
pub struct Db {
    pub config: ClickHouseConfig,
    pub client: clickhouse::Client,
}

impl Db {
    pub async fn new(name: &str) -> Db {
        let config = ClickHouseConfig {
            url: clickhouse_url(),
            database: unique(name),
            user: "default".into(),
            password: String::new(),
        };
        let server = migrate::client(&config).with_database("default");
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while let Err(e) = server.query("SELECT 1").execute().await {
            assert!(
                std::time::Instant::now() < deadline,
                "clickhouse at {} not answering in 30 s (make stack-up): {e}",
                config.url
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let migrations = migrate::load(&repo("schemas/clickhouse")).expect("migrations");
        migrate::apply(&config, &migrations)
            .await
            .expect("migrations apply");
        Db {
            client: migrate::client(&config),
            config,
        }
    }

    pub fn store(&self) -> tally_rater::store::SubscriptionStore {
        tally_rater::store::SubscriptionStore::new(&self.config)
            .with_timeout(Duration::from_secs(120))
    }
}

impl Drop for Db {
    fn drop(&mut self) {
        if std::env::var_os("TALLY_TEST_KEEP").is_some() {
            eprintln!("kept database {}", self.config.database);
            return;
        }
        let server = migrate::client(&self.config).with_database("default");
        let sql = format!("DROP DATABASE IF EXISTS {}", self.config.database);
        // Drop cannot await: a runtime of its own, on a thread of its own.
        let dropped = std::thread::spawn(move || {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime")
                .block_on(async {
                    tokio::time::timeout(Duration::from_secs(30), server.query(&sql).execute())
                        .await
                })
        })
        .join();
        if !matches!(dropped, Ok(Ok(Ok(())))) {
            eprintln!("could not drop {}", self.config.database);
        }
    }
}

/// The dev config's broker settings (`TALLY_KAFKA_BROKERS` overrides), two partitions.
pub fn kafka() -> KafkaConfig {
    let path = repo("config/tally.dev.toml");
    let text = std::fs::read_to_string(&path).expect("dev config");
    let mut k = tally_core::Config::parse(&text, &path)
        .expect("dev config parses")
        .kafka;
    if let Ok(brokers) = std::env::var("TALLY_KAFKA_BROKERS") {
        k.brokers = brokers;
    }
    k.partitions = 2;
    k
}

/// Every message of `topic` (all partitions, from the start) until `want` have arrived.
pub fn read_topic(topic: &str, want: usize) -> Vec<(String, Value)> {
    let k = kafka();
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", &k.brokers)
        .set("group.id", unique("reader"))
        .set("enable.auto.commit", "false")
        .create()
        .expect("consumer");
    let mut tpl = TopicPartitionList::new();
    for p in 0..k.partitions {
        tpl.add_partition_offset(topic, p, Offset::Beginning)
            .expect("partition");
    }
    consumer.assign(&tpl).expect("assign");
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut out = Vec::new();
    while out.len() < want {
        assert!(
            Instant::now() < deadline,
            "{} of {want} messages of {topic} in 30 s",
            out.len()
        );
        if let Some(m) = consumer.poll(Duration::from_millis(200)) {
            let m = m.expect("message");
            let key = String::from_utf8(m.key().expect("key").to_vec()).expect("utf-8 key");
            let value = serde_json::from_slice(m.payload().expect("payload")).expect("json");
            out.push((key, value));
        }
    }
    out
}

/// How many messages `topic` holds: the sum of its partitions' high watermarks.
pub fn topic_size(topic: &str) -> i64 {
    let k = kafka();
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", &k.brokers)
        .create()
        .expect("consumer");
    (0..k.partitions)
        .map(|p| {
            consumer
                .fetch_watermarks(topic, p, Duration::from_secs(10))
                .expect("watermarks")
                .1
        })
        .sum()
}

/// A final run's invoices as the bytes a consumer of the run gets.
pub fn jsons(done: &tally_rater::run::Finalized) -> Vec<String> {
    done.invoices
        .iter()
        .map(|i| serde_json::to_string(i).expect("invoice json"))
        .collect()
}
