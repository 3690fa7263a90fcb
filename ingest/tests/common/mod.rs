//! Test support: collectors on ephemeral ports against the real local broker, a private
//! tansu broker for outage tests, an HTTP client, and reading a topic back.
#![allow(dead_code, unreachable_pub)]

use std::net::TcpListener as StdListener;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderMap, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::{ClientConfig, Message, Offset, TopicPartitionList};
use tally_core::{Config, UsageRecord};
use tally_ingest::Collector;

pub fn brokers() -> String {
    std::env::var("TALLY_KAFKA_BROKERS").unwrap_or_else(|_| "127.0.0.1:19092".into())
}

/// A topic name no other test (or earlier run) uses.
pub fn unique_topic(name: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_nanos();
    format!("test-{name}-{}-{nanos}", std::process::id())
}

/// The development config pointed at `brokers` and a fresh topic, listening on port 0.
pub fn config(brokers: &str, topic: &str) -> Config {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../config/tally.dev.toml");
    let text = std::fs::read_to_string(&path).expect("dev config");
    let mut c = Config::parse(&text, &path).expect("dev config parses");
    c.collector.listen = "127.0.0.1:0".into();
    c.collector.shutdown_grace_secs = 5;
    c.kafka.brokers = brokers.into();
    c.kafka.topic = topic.into();
    c.kafka.partitions = 4;
    c.kafka.health_interval_ms = 200;
    c.kafka.message_timeout_ms = 3000;
    c
}

/// Starts a collector and waits (with a deadline) until it reports ready.
pub async fn start(config: Config) -> Collector {
    let collector = tally_ingest::serve(config).await.expect("collector starts");
    let url = format!("http://{}/readyz", collector.addr());
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (status, _, _) = get(&url).await;
        if status == StatusCode::OK {
            return collector;
        }
        assert!(Instant::now() < deadline, "collector not ready within 30 s");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

pub struct Reply {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: serde_json::Value,
}

pub async fn post(
    url: &str,
    content_type: &str,
    key: Option<&str>,
    body: impl Into<Bytes>,
) -> Reply {
    let mut req = Request::post(url).header("content-type", content_type);
    if let Some(k) = key {
        req = req.header("authorization", format!("Bearer {k}"));
    }
    let req = req.body(Full::new(body.into())).expect("request");
    let client = Client::builder(TokioExecutor::new()).build_http();
    let resp = tokio::time::timeout(Duration::from_secs(30), client.request(req))
        .await
        .expect("answer within 30 s")
        .expect("http");
    let status = resp.status();
    let headers = resp.headers().clone();
    let bytes = tokio::time::timeout(Duration::from_secs(30), resp.into_body().collect())
        .await
        .expect("whole body within 30 s")
        .expect("body")
        .to_bytes();
    let body = if bytes.is_empty() {
        serde_json::Value::Null
    } else {
        serde_json::from_slice(&bytes).expect("json answer")
    };
    Reply {
        status,
        headers,
        body,
    }
}

pub async fn get(url: &str) -> (StatusCode, HeaderMap, String) {
    let client = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
    let req = Request::get(url)
        .body(Full::new(Bytes::new()))
        .expect("request");
    let answer = async {
        let resp = client.request(req).await.ok()?;
        let status = resp.status();
        let headers = resp.headers().clone();
        let bytes = resp.into_body().collect().await.ok()?.to_bytes();
        Some((
            status,
            headers,
            String::from_utf8_lossy(&bytes).into_owned(),
        ))
    };
    match tokio::time::timeout(Duration::from_secs(10), answer).await {
        Ok(Some(answered)) => answered,
        _ => (StatusCode::BAD_GATEWAY, HeaderMap::new(), String::new()),
    }
}

/// One record read back from the topic.
#[derive(Debug, Clone)]
pub struct Stored {
    pub partition: i32,
    pub offset: i64,
    pub key: String,
    pub record: UsageRecord,
}

/// Reads every record of `topic` up to the current high watermarks.
pub async fn read_topic(brokers: &str, topic: &str) -> Vec<Stored> {
    let (brokers, topic) = (brokers.to_owned(), topic.to_owned());
    tokio::task::spawn_blocking(move || read_topic_blocking(&brokers, &topic))
        .await
        .expect("reader")
}

fn read_topic_blocking(brokers: &str, topic: &str) -> Vec<Stored> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", format!("reader-{topic}"))
        .set("enable.auto.commit", "false")
        .create()
        .expect("consumer");
    let timeout = Duration::from_secs(10);
    let md = consumer.fetch_metadata(None, timeout).expect("metadata");
    let partitions: Vec<i32> = md
        .topics()
        .iter()
        .find(|t| t.name() == topic)
        .map(|t| t.partitions().iter().map(|p| p.id()).collect())
        .unwrap_or_default();
    assert!(!partitions.is_empty(), "topic {topic} has no partitions");
    let mut tpl = TopicPartitionList::new();
    let mut remaining = 0i64;
    for &p in &partitions {
        let (low, high) = consumer
            .fetch_watermarks(topic, p, timeout)
            .expect("watermarks");
        remaining += high - low;
        tpl.add_partition_offset(topic, p, Offset::Beginning)
            .expect("offset");
    }
    consumer.assign(&tpl).expect("assign");
    let mut out = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    while (out.len() as i64) < remaining {
        assert!(
            Instant::now() < deadline,
            "read {} of {remaining} records in 60 s",
            out.len()
        );
        let Some(msg) = consumer.poll(Duration::from_millis(200)) else {
            continue;
        };
        let msg = msg.expect("message");
        let key = String::from_utf8(msg.key().expect("key").to_vec()).expect("utf8 key");
        let record = serde_json::from_slice(msg.payload().expect("payload")).expect("record json");
        out.push(Stored {
            partition: msg.partition(),
            offset: msg.offset(),
            key,
            record,
        });
    }
    out
}

pub fn tansu_bin() -> PathBuf {
    if let Ok(p) = std::env::var("TALLY_TANSU_BIN") {
        return PathBuf::from(p);
    }
    let home = std::env::var("HOME").expect("HOME");
    PathBuf::from(home).join(".cache/tally/tansu-0.6.0/bin/tansu")
}

pub fn free_port() -> u16 {
    StdListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port()
}

/// A private broker with sqlite storage, so a test can stop and restart it.
pub struct TestBroker {
    pub port: u16,
    dir: PathBuf,
    child: Option<tokio::process::Child>,
}

impl TestBroker {
    pub async fn start() -> TestBroker {
        let dir = std::env::temp_dir().join(unique_topic("broker"));
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
        let bin = tansu_bin();
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
            if Instant::now() > deadline {
                let log = std::fs::read_to_string(self.dir.join("tansu.log")).unwrap_or_default();
                panic!("test broker did not listen within 20 s; log:\n{log}");
            }
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
