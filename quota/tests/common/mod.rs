//! Test support: a private ClickHouse database for subscriptions, the test plan catalog,
//! unique customers on the stack's Redis, and private Redis servers a test may stop.
#![allow(dead_code, unreachable_pub)]

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rust_decimal::Decimal;
use tally_aggregator::migrate;
use tally_core::config::{ClickHouseConfig, QuotaMeterConfig};
use tally_core::{Catalog as Meters, Config, Meter};
use tally_quota::{Check, Decision, Quota};
use tally_rater::{Catalog, NewChange, SubscriptionStore};
use time::OffsetDateTime;

pub const TENANT: &str = "demo";

pub fn repo(path: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join(path)
}

pub fn redis_url() -> String {
    std::env::var("TALLY_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:16379".into())
}

pub fn clickhouse_url() -> String {
    std::env::var("TALLY_CLICKHOUSE_URL").unwrap_or_else(|_| "http://127.0.0.1:18123".into())
}

/// A name no other test run uses.
pub fn unique(name: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_nanos();
    format!("{name}_{}_{nanos}", std::process::id())
}

fn meter(key: &str, event_type: &str) -> Meter {
    toml::from_str(&format!(
        "key = \"{key}\"\nevent_type = \"{event_type}\"\naggregation = \"COUNT\""
    ))
    .expect("meter")
}

fn policy(meter: &str, counted_from: &str, when_redis_down: &str) -> QuotaMeterConfig {
    QuotaMeterConfig {
        meter: meter.into(),
        counted_from: counted_from.into(),
        when_redis_down: when_redis_down.into(),
        scale: 0,
    }
}

/// The dev configuration with three test meters (`api`, `burst`, `daily`: COUNT of events of
/// the same type), the test plans, a private database and no default plan.
pub fn config(db: &ClickHouseConfig) -> Config {
    let path = repo("config/tally.dev.toml");
    let mut config =
        Config::parse(&std::fs::read_to_string(&path).expect("dev config"), &path).expect("parses");
    for (key, ty) in [("api", "api"), ("burst", "burst"), ("daily", "daily")] {
        config.meters.push(meter(key, ty));
    }
    Meters::new(config.meters.clone()).expect("test meters");
    config.clickhouse = db.clone();
    config.quota.redis_url = redis_url();
    config.quota.plans_dir = repo("quota/tests/plans").display().to_string();
    config.quota.no_subscription = "deny".into();
    config.quota.meters = vec![
        policy("api", "checks", "open"),
        policy("burst", "checks", "closed"),
        policy("daily", "checks", "closed"),
        policy("tokens", "events", "closed"),
    ];
    config
}

pub fn plans() -> Catalog {
    Catalog::load_dir(repo("quota/tests/plans")).expect("test plans")
}

/// A private, migrated database.
pub async fn fresh_database(name: &str) -> ClickHouseConfig {
    let db = ClickHouseConfig {
        url: clickhouse_url(),
        database: unique(&format!("test_quota_{name}")),
        user: "default".into(),
        password: String::new(),
    };
    migrate::apply(
        &db,
        &migrate::load(&migrate::default_dir()).expect("migrations"),
    )
    .await
    .expect("migrate");
    db
}

pub async fn drop_database(db: &ClickHouseConfig) {
    if std::env::var("TALLY_TEST_KEEP").is_ok() {
        return;
    }
    migrate::client(db)
        .with_database("default")
        .query(&format!("DROP DATABASE IF EXISTS {}", db.database))
        .execute()
        .await
        .expect("drop");
}

/// The quota library on `config`, scripts loaded.
pub async fn quota(config: &Config) -> Arc<Quota> {
    let q = Quota::from_config(config).expect("quota");
    q.load_scripts().await.expect("scripts load");
    Arc::new(q)
}

/// Subscribes `customer` to `gate` v`version` from `start`, anchored at `anchor`.
pub async fn subscribe(
    db: &ClickHouseConfig,
    customer: &str,
    version: u32,
    start: OffsetDateTime,
    anchor: OffsetDateTime,
) {
    // The log stores whole seconds.
    let whole = |t: OffsetDateTime| t.replace_nanosecond(0).expect("valid");
    let (start, anchor) = (whole(start), whole(anchor));
    let store = SubscriptionStore::new(db);
    store
        .record(
            &plans(),
            NewChange::create(TENANT, customer, "gate", start)
                .version(version)
                .anchor(anchor)
                .actor("test")
                .reason("quota test"),
        )
        .await
        .expect("subscribe");
}

pub fn check<'a>(customer: &'a str, meter: &'a str, amount: u64, consume: bool) -> Check<'a> {
    Check {
        tenant: TENANT,
        customer,
        meter,
        amount: Decimal::from(amount),
        consume,
    }
}

pub async fn ask(q: &Quota, customer: &str, meter: &str, amount: u64, consume: bool) -> Decision {
    q.check(&check(customer, meter, amount, consume))
        .await
        .expect("check answered")
}

/// A Redis server of the test's own on a free port, so the test can stop and restart it.
pub struct PrivateRedis {
    pub port: u16,
    dir: PathBuf,
    child: Option<Child>,
}

impl PrivateRedis {
    pub fn start() -> PrivateRedis {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("free port")
            .port();
        let dir = std::env::temp_dir().join(unique("tally-quota-redis"));
        std::fs::create_dir_all(&dir).expect("redis dir");
        let mut r = PrivateRedis {
            port,
            dir,
            child: None,
        };
        r.restart();
        r
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Starts the server (after [`PrivateRedis::stop`]) and waits until it answers.
    pub fn restart(&mut self) {
        let child = Command::new("redis-server")
            .args([
                "--port",
                &self.port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
            ])
            .arg(&self.dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server (install it: make stack-up does)");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let ping = Command::new("redis-cli")
                .args(["-p", &self.port.to_string(), "ping"])
                .output();
            if ping.is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "PONG") {
                return;
            }
            assert!(Instant::now() < deadline, "private redis did not start");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Kills the server: state is lost, as in a crash without persistence.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for PrivateRedis {
    fn drop(&mut self) {
        self.stop();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Polls `f` every 50 ms until it is true or `within` passes.
pub async fn eventually<F, Fut>(within: Duration, mut f: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + within;
    loop {
        if f().await {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A usage record as the collector writes it.
pub fn record(
    customer: &str,
    id: &str,
    ty: &str,
    time: OffsetDateTime,
    data: serde_json::Value,
) -> Vec<u8> {
    use time::format_description::well_known::Rfc3339;
    let t = time.format(&Rfc3339).expect("time");
    serde_json::json!({"v": 1, "tenant": TENANT, "id": id, "customer": customer, "type": ty,
        "time": t, "received_at": t, "data": data})
    .to_string()
    .into_bytes()
}

/// Writes records to ClickHouse through the aggregator's own batch and store (one partition,
/// in order), as its flush does.
pub async fn write_to_clickhouse(config: &Config, records: &[Vec<u8>]) {
    use tally_aggregator::rollup::{Dedupe, Incoming, Meters, PartitionBatch};
    let catalog = config.catalog();
    let meters = Meters::new(&catalog, config.validation.max_dimension_chars);
    let mut batch = PartitionBatch::default();
    let dedupe = Dedupe::default();
    for (offset, payload) in records.iter().enumerate() {
        let v: serde_json::Value = serde_json::from_slice(payload).expect("record");
        let key = format!("{TENANT}/{}", v["customer"].as_str().expect("customer"));
        let outcome = batch.add(
            &meters,
            &dedupe,
            Incoming {
                partition: 0,
                offset: offset as i64,
                key: Some(key.as_bytes()),
                payload: Some(payload),
            },
        );
        assert_eq!(
            outcome,
            tally_aggregator::rollup::Outcome::Counted,
            "{}",
            String::from_utf8_lossy(payload)
        );
    }
    let mut body = tally_aggregator::ledger::Body::default();
    batch.take_into(&meters, "usage-events", 0, 1_800_000_000, &mut body);
    tally_aggregator::store::Store::new(&config.clickhouse, Duration::from_secs(30))
        .insert_body(body, &tally_aggregator::store::query_id("test-fill"))
        .await
        .expect("insert");
}
