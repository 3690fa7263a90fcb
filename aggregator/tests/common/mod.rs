//! Test support: aggregator processes on private topics and databases, a producer writing
//! records as the collector does, the usage API, and independent expected totals.
#![allow(dead_code, unreachable_pub)]

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::ClientConfig;
use serde_json::{json, Value};
use tally_core::{Quantity, UsageRecord};
use time::OffsetDateTime;

pub fn brokers() -> String {
    std::env::var("TALLY_KAFKA_BROKERS").unwrap_or_else(|_| "127.0.0.1:19092".into())
}

pub fn clickhouse_url() -> String {
    std::env::var("TALLY_CLICKHOUSE_URL").unwrap_or_else(|_| "http://127.0.0.1:18123".into())
}

pub fn unique(name: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_nanos();
    format!("{name}_{}_{nanos}", std::process::id())
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port()
}

/// The dev config plus MIN and MAX meters, so every aggregation has a meter.
pub fn write_config(dir: &std::path::Path) -> PathBuf {
    let dev = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../config/tally.dev.toml");
    let mut text = std::fs::read_to_string(dev).expect("dev config");
    text.push_str(
        r#"
[[meters]]
key = "latency_min"
event_type = "request"
aggregation = "MIN"
value = "ms"
group_by = ["endpoint"]

[[meters]]
key = "latency_max"
event_type = "request"
aggregation = "MAX"
value = "ms"
group_by = ["endpoint"]
"#,
    );
    text = text.replace("partitions = 8", "partitions = 4");
    let path = dir.join("tally.toml");
    std::fs::write(&path, text).expect("write config");
    path
}

/// One pipeline under test: its broker, topic, database and consumer group.
pub struct Pipeline {
    /// Kafka bootstrap servers (the shared local broker unless a test has its own).
    pub brokers: String,
    /// ClickHouse this pipeline writes to (the shared local server unless a test has its own).
    pub clickhouse: String,
    pub topic: String,
    pub database: String,
    pub group: String,
    pub dir: PathBuf,
    pub config: PathBuf,
}

impl Pipeline {
    pub fn new(name: &str) -> Pipeline {
        let id = unique(name);
        let dir = std::env::temp_dir().join(&id);
        std::fs::create_dir_all(&dir).expect("test dir");
        let config = write_config(&dir);
        Pipeline {
            brokers: brokers(),
            clickhouse: clickhouse_url(),
            topic: format!("agg-{id}"),
            database: format!("t_{id}"),
            group: format!("g-{id}"),
            dir,
            config,
        }
    }

    /// Replaces the configuration later starts and rebuilds use.
    pub fn set_config(&self, text: &str) {
        std::fs::write(&self.config, text).expect("write config");
    }

    pub fn config_text(&self) -> String {
        std::fs::read_to_string(&self.config).expect("read config")
    }

    /// Runs `tally-aggregator rebuild` for these meters; returns its output.
    pub async fn rebuild(&self, meters: &[&str]) -> String {
        let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_tally-aggregator"));
        cmd.arg("rebuild");
        for m in meters {
            cmd.args(["--meter", m]);
        }
        let out = tokio::time::timeout(
            Duration::from_secs(120),
            cmd.env("TALLY_CONFIG", &self.config)
                .env("TALLY_KAFKA_BROKERS", brokers())
                .env("TALLY_KAFKA_TOPIC", &self.topic)
                .env("TALLY_CLICKHOUSE_URL", &self.clickhouse)
                .env("TALLY_CLICKHOUSE_DATABASE", &self.database)
                .output(),
        )
        .await
        .expect("rebuild finished in 120 s")
        .expect("run rebuild");
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(out.status.success(), "rebuild failed:\n{text}");
        text
    }

    pub fn dead_letter_topic(&self) -> String {
        "usage-events-dead-letter".to_owned()
    }

    /// Starts an aggregator process and waits until it is ready.
    pub async fn start(&self, n: usize) -> Instance {
        let port = free_port();
        let log_path = self.dir.join(format!("aggregator-{n}-{port}.log"));
        let log = std::fs::File::create(&log_path).expect("log");
        let child = tokio::process::Command::new(env!("CARGO_BIN_EXE_tally-aggregator"))
            .arg("run")
            .env("TALLY_CONFIG", &self.config)
            .env("TALLY_KAFKA_BROKERS", &self.brokers)
            .env("TALLY_KAFKA_TOPIC", &self.topic)
            .env("TALLY_CLICKHOUSE_URL", &self.clickhouse)
            .env("TALLY_CLICKHOUSE_DATABASE", &self.database)
            .env("TALLY_AGGREGATOR_GROUP", &self.group)
            .env("TALLY_AGGREGATOR_LISTEN", format!("127.0.0.1:{port}"))
            .env("TALLY_LOG", "info")
            .stdout(Stdio::null())
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .expect("spawn aggregator");
        let instance = Instance {
            child: Some(child),
            addr: format!("127.0.0.1:{port}"),
            log: log_path,
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if get(&format!("http://{}/readyz", instance.addr)).await.0 == 200 {
                return instance;
            }
            assert!(
                Instant::now() < deadline,
                "aggregator not ready in 60 s:\n{}",
                instance.log_tail()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Waits until every partition's checkpoint reaches the topic's end, i.e. everything
    /// produced so far is flushed.
    pub async fn wait_caught_up(&self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            let ends = watermarks(&self.brokers, &self.topic).await;
            let checkpoints = self.checkpoints().await;
            let behind: Vec<_> = ends
                .iter()
                .filter(|(p, (_, high))| {
                    *high > 0 && checkpoints.get(p).is_none_or(|c| c + 1 < *high)
                })
                .collect();
            if behind.is_empty() {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "not caught up in {timeout:?}: ends {ends:?}, checkpoints {checkpoints:?}"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    pub async fn checkpoints(&self) -> BTreeMap<i32, i64> {
        let q = format!(
            "SELECT kafka_partition, max(kafka_offset) FROM {}.aggregator_checkpoints WHERE topic = '{}' GROUP BY kafka_partition FORMAT TSV",
            self.database, self.topic
        );
        let text = clickhouse_sql_at(&self.clickhouse, &q)
            .await
            .unwrap_or_default();
        text.lines()
            .filter_map(|l| {
                let (p, o) = l.split_once('\t')?;
                Some((p.parse().ok()?, o.parse().ok()?))
            })
            .collect()
    }

    pub async fn drop_database(&self) {
        let drop = format!("DROP DATABASE IF EXISTS {}", self.database);
        let _ = clickhouse_sql_at(&self.clickhouse, &drop).await;
    }
}

impl Drop for Pipeline {
    fn drop(&mut self) {
        // TALLY_TEST_KEEP=1 keeps the configs and aggregator logs for a post-mortem.
        if std::env::var_os("TALLY_TEST_KEEP").is_some() {
            eprintln!("kept {}", self.dir.display());
            return;
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

pub struct Instance {
    child: Option<tokio::process::Child>,
    pub addr: String,
    pub log: PathBuf,
}

impl Instance {
    pub async fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            c.kill().await.expect("SIGKILL aggregator");
        }
    }

    /// Sends `signal` (`STOP`, `CONT`, …) to the process.
    pub fn signal(&self, signal: &str) {
        let pid = self.child.as_ref().and_then(|c| c.id()).expect("running");
        let sent = std::process::Command::new("kill")
            .args([&format!("-{signal}"), &pid.to_string()])
            .status()
            .expect("kill runs");
        assert!(sent.success(), "kill -{signal} {pid}");
    }

    /// SIGTERM and wait: the instance flushes and leaves the group.
    pub async fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let pid = c.id().expect("pid");
            let _ = std::process::Command::new("kill")
                .args(["-TERM", &pid.to_string()])
                .status();
            let status = tokio::time::timeout(Duration::from_secs(30), c.wait()).await;
            assert!(
                matches!(status, Ok(Ok(s)) if s.success()),
                "graceful stop failed: {status:?}\n{}",
                self.log_tail()
            );
        }
    }

    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }

    pub async fn usage(&self, params: &str) -> Value {
        let url = format!("http://{}/v1/usage?{params}", self.addr);
        let (status, body) = get_with_key(&url, Some("demo-key")).await;
        assert_eq!(status, 200, "{url}: {body}");
        serde_json::from_str(&body).expect("usage json")
    }
}

pub async fn get(url: &str) -> (u16, String) {
    get_with_key(url, None).await
}

pub async fn get_with_key(url: &str, key: Option<&str>) -> (u16, String) {
    let client = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
    let mut req = http::Request::get(url);
    if let Some(k) = key {
        req = req.header("authorization", format!("Bearer {k}"));
    }
    let req = req.body(Full::new(Bytes::new())).expect("request");
    match tokio::time::timeout(Duration::from_secs(30), client.request(req)).await {
        Ok(Ok(resp)) => {
            let status = resp.status().as_u16();
            let bytes = resp.into_body().collect().await.expect("body").to_bytes();
            (status, String::from_utf8_lossy(&bytes).into_owned())
        }
        _ => (0, String::new()),
    }
}

pub async fn clickhouse_sql(q: &str) -> Option<String> {
    clickhouse_sql_at(&clickhouse_url(), q).await
}

pub async fn clickhouse_sql_at(url: &str, q: &str) -> Option<String> {
    let client = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
    let req = http::Request::post(url)
        .body(Full::new(Bytes::from(q.to_owned())))
        .expect("request");
    let resp = tokio::time::timeout(Duration::from_secs(30), client.request(req))
        .await
        .ok()?
        .ok()?;
    let ok = resp.status().is_success();
    let bytes = resp.into_body().collect().await.ok()?.to_bytes();
    ok.then(|| String::from_utf8_lossy(&bytes).into_owned())
}

pub async fn watermarks(brokers: &str, topic: &str) -> BTreeMap<i32, (i64, i64)> {
    let (brokers, topic) = (brokers.to_owned(), topic.to_owned());
    tokio::task::spawn_blocking(move || {
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", &brokers)
            .create()
            .expect("consumer");
        let timeout = Duration::from_secs(10);
        let md = consumer.fetch_metadata(None, timeout).expect("metadata");
        let mut out = BTreeMap::new();
        if let Some(t) = md.topics().iter().find(|t| t.name() == topic) {
            for p in t.partitions() {
                out.insert(
                    p.id(),
                    consumer
                        .fetch_watermarks(&topic, p.id(), timeout)
                        .expect("watermarks"),
                );
            }
        }
        out
    })
    .await
    .expect("watermarks task")
}

pub fn producer() -> FutureProducer {
    producer_for(&brokers())
}

pub fn producer_for(brokers: &str) -> FutureProducer {
    ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("message.timeout.ms", "60000")
        .set("acks", "all")
        .set("enable.idempotence", "false")
        .set("linger.ms", "5")
        .create()
        .expect("producer")
}

/// An event as the test sends it.
#[derive(Debug, Clone)]
pub struct Ev {
    pub id: String,
    pub customer: String,
    pub ty: &'static str,
    pub time: OffsetDateTime,
    pub data: Value,
}

impl Ev {
    pub fn record(&self) -> UsageRecord {
        UsageRecord {
            v: 1,
            tenant: "demo".into(),
            id: self.id.clone(),
            customer: self.customer.clone(),
            event_type: self.ty.into(),
            time: self.time,
            received_at: OffsetDateTime::now_utc(),
            source: None,
            data: self.data.as_object().cloned().unwrap_or_default(),
        }
    }
}

/// Produces records as the collector does (JSON, keyed by tenant/customer), all at once,
/// and waits for every acknowledgement.
pub async fn produce(p: &FutureProducer, topic: &str, events: &[Ev]) {
    let mut pending = Vec::with_capacity(events.len());
    for e in events {
        let r = e.record();
        let (key, payload) = (r.key(), r.to_json());
        let f = p
            .send_result(FutureRecord::to(topic).key(&key).payload(&payload))
            .map_err(|(e, _)| e)
            .expect("enqueue");
        pending.push(f);
    }
    for f in futures::future::join_all(pending).await {
        f.expect("delivery").expect("acknowledged");
    }
}

/// Independent totals: first occurrence of each id counts, per (meter, customer).
pub fn expected_totals(events: &[Ev]) -> BTreeMap<(String, String), String> {
    let mut seen = std::collections::HashSet::new();
    let mut sum: BTreeMap<(String, String), Quantity> = BTreeMap::new();
    let mut count: BTreeMap<(String, String), i64> = BTreeMap::new();
    let mut users: BTreeMap<(String, String), std::collections::BTreeSet<String>> = BTreeMap::new();
    for e in events {
        if !seen.insert(e.id.clone()) {
            continue;
        }
        let k = |m: &str| (m.to_owned(), e.customer.clone());
        match e.ty {
            "request" => *count.entry(k("requests")).or_default() += 1,
            "completion" => {
                let q: Quantity = e.data["tokens"]
                    .to_string()
                    .trim_matches('"')
                    .parse()
                    .expect("tokens");
                let s = sum.entry(k("tokens")).or_default();
                *s = s.checked_add(q).expect("in range");
            }
            "login" => {
                users
                    .entry(k("active_users"))
                    .or_default()
                    .insert(e.data["user"].as_str().expect("user").to_owned());
            }
            _ => {}
        }
    }
    let mut out = BTreeMap::new();
    for (k, v) in sum {
        out.insert(k, v.to_string());
    }
    for (k, v) in count {
        out.insert(k, v.to_string());
    }
    for (k, v) in users {
        out.insert(k, v.len().to_string());
    }
    out
}

/// Totals per (meter, customer) as the usage API reports them.
pub async fn api_totals(
    instance: &Instance,
    meters: &[&str],
) -> BTreeMap<(String, String), String> {
    let mut out = BTreeMap::new();
    for m in meters {
        let a = instance
            .usage(&format!("meter={m}&group_by=customer"))
            .await;
        for row in a["data"].as_array().expect("data") {
            let customer = row["customer"].as_str().expect("customer").to_owned();
            out.insert(
                (m.to_string(), customer),
                row["value"].as_str().expect("value").to_owned(),
            );
        }
    }
    out
}

pub fn json_tokens(n: u64) -> Value {
    json!(format!("{}.{:03}", n / 1000, n % 1000))
}

/// A private ClickHouse server (Debian's clickhouse-server) that a test may stop.
pub struct TestClickHouse {
    dir: PathBuf,
    pub http_port: u16,
    child: Option<tokio::process::Child>,
}

impl TestClickHouse {
    pub async fn start() -> TestClickHouse {
        let dir = std::env::temp_dir().join(unique("clickhouse"));
        std::fs::create_dir_all(&dir).expect("dir");
        std::fs::copy("/etc/clickhouse-server/users.xml", dir.join("users.xml"))
            .expect("users.xml (is clickhouse-server installed?)");
        let (http_port, tcp_port) = (free_port(), free_port());
        let d = dir.display();
        let config = format!(
            r#"<?xml version="1.0"?>
<yandex>
    <logger><level>warning</level><log>{d}/server.log</log><errorlog>{d}/error.log</errorlog></logger>
    <http_port>{http_port}</http_port>
    <tcp_port>{tcp_port}</tcp_port>
    <listen_host>127.0.0.1</listen_host>
    <path>{d}/data/</path>
    <tmp_path>{d}/tmp/</tmp_path>
    <user_files_path>{d}/user_files/</user_files_path>
    <format_schema_path>{d}/format_schemas/</format_schema_path>
    <users_config>{d}/users.xml</users_config>
    <default_profile>default</default_profile>
    <default_database>default</default_database>
    <timezone>UTC</timezone>
    <mark_cache_size>268435456</mark_cache_size>
</yandex>
"#
        );
        std::fs::write(dir.join("config.xml"), config).expect("config");
        let mut ch = TestClickHouse {
            dir,
            http_port,
            child: None,
        };
        ch.restart().await;
        ch
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.http_port)
    }

    pub async fn restart(&mut self) {
        let out = std::fs::File::create(self.dir.join("stdout.log")).expect("log");
        let child = tokio::process::Command::new("clickhouse-server")
            .arg(format!(
                "--config-file={}",
                self.dir.join("config.xml").display()
            ))
            .stdout(Stdio::null())
            .stderr(out)
            .kill_on_drop(true)
            .spawn()
            .expect("spawn clickhouse-server");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        while clickhouse_sql_at(&self.url(), "SELECT 1").await.as_deref() != Some("1\n") {
            let log = std::fs::read_to_string(self.dir.join("error.log")).unwrap_or_default();
            assert!(
                Instant::now() < deadline,
                "test clickhouse did not answer in 30 s:\n{log}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// SIGKILL: the server vanishes mid-whatever, as in a crash or a network cut.
    pub async fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            c.kill().await.expect("kill clickhouse");
        }
    }
}

impl Drop for TestClickHouse {
    fn drop(&mut self) {
        if let Some(c) = self.child.as_mut() {
            let _ = c.start_kill();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A private tansu broker with sqlite storage, so a test can stop and restart it.
pub struct TestBroker {
    pub port: u16,
    dir: PathBuf,
    child: Option<tokio::process::Child>,
}

impl TestBroker {
    pub async fn start() -> TestBroker {
        let dir = std::env::temp_dir().join(unique("broker"));
        std::fs::create_dir_all(&dir).expect("broker dir");
        let mut b = TestBroker {
            port: free_port(),
            dir,
            child: None,
        };
        b.restart().await;
        b
    }

    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    pub async fn restart(&mut self) {
        let bin = std::env::var("TALLY_TANSU_BIN")
            .map(PathBuf::from)
            .unwrap_or_else(|_| {
                PathBuf::from(std::env::var("HOME").expect("HOME"))
                    .join(".cache/tally/tansu-0.6.0/bin/tansu")
            });
        assert!(
            bin.exists(),
            "tansu not found at {} (run `make stack-up`)",
            bin.display()
        );
        let url = format!("tcp://127.0.0.1:{}", self.port);
        let log = std::fs::File::create(self.dir.join("tansu.log")).expect("log");
        let child = tokio::process::Command::new(bin)
            .args([
                "broker",
                "--listener-url",
                &url,
                "--advertised-listener-url",
                &url,
            ])
            .args(["--storage-engine", "sqlite://tansu.db"])
            .current_dir(&self.dir)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .expect("spawn tansu");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(self.addr()).is_err() {
            assert!(
                Instant::now() < deadline,
                "test broker did not listen within 20 s"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// SIGKILL, as a crash would.
    pub async fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            c.kill().await.expect("kill tansu");
        }
    }
}

impl Drop for TestBroker {
    fn drop(&mut self) {
        if let Some(c) = self.child.as_mut() {
            let _ = c.start_kill();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
