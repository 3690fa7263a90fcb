//! Graceful shutdown: a request in flight when the collector is told to stop still gets
//! its answer, and its events are in the topic. Its own test binary, so the process-wide
//! in-flight gauge it waits on counts only this test's requests.

mod common;

use std::time::{Duration, Instant};

use common::*;
use http::StatusCode;
use serde_json::json;

/// Posts `n` request events (ids `<prefix>-<i>`) to the collector at `base` in one batch,
/// and returns once the collector shows the request in flight.
async fn post_in_flight(base: &str, prefix: &str, n: usize) -> tokio::task::JoinHandle<Reply> {
    let batch: Vec<_> = (0..n)
        .map(|i| json!({"id": format!("{prefix}-{i}"), "customer": format!("c-{}", i % 50), "type": "request"}))
        .collect();
    let body = json!(batch).to_string();
    let url = format!("{base}/v1/events");
    let in_flight =
        tokio::spawn(async move { post(&url, "application/json", Some("demo-key"), body).await });
    wait_in_flight(base).await;
    in_flight
}

/// Waits (20 s at most) until the collector at `base` shows a request in flight.
async fn wait_in_flight(base: &str) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (_, _, metrics) = get(&format!("{base}/metrics")).await;
        if metrics
            .lines()
            .any(|l| l.starts_with("tally_ingest_http_requests_in_flight ") && !l.ends_with(" 0"))
        {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "the request never showed as in flight"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_shutdown_finishes_in_flight_requests() {
    let topic = unique_topic("shutdown");
    let mut c = config(&brokers(), &topic);
    // A slow batch fill keeps the request in flight long enough to stop the collector under it.
    c.kafka.linger_ms = 500;
    let collector = start(c).await;
    let base = format!("http://{}", collector.addr());
    let in_flight = post_in_flight(&base, "g", 2000).await;
    collector.shutdown().await;
    let r = in_flight.await.expect("request task");
    assert_eq!(
        (r.status, r.body["accepted"].as_u64()),
        (StatusCode::ACCEPTED, Some(2000))
    );
    assert_eq!(read_topic(&brokers(), &topic).await.len(), 2000);
}

/// The binary itself on SIGTERM: the request in flight is answered 202 with every event
/// stored, the process exits 0, and then nothing listens on its port.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_on_the_binary_answers_the_request_in_flight_and_exits_cleanly() {
    let topic = unique_topic("sigterm");
    let dev = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../config/tally.dev.toml");
    let text = std::fs::read_to_string(&dev)
        .expect("dev config")
        // A slow batch fill keeps the request in flight while the signal arrives.
        .replace(
            "[kafka]\n",
            "[kafka]\nlinger_ms = 500\nhealth_interval_ms = 200\n",
        );
    let file = std::env::temp_dir().join(format!("{topic}.toml"));
    std::fs::write(&file, text).expect("config file");
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_tally-ingest"))
        .arg("--config")
        .arg(&file)
        .env("TALLY_COLLECTOR_LISTEN", &addr)
        .env("TALLY_KAFKA_BROKERS", brokers())
        .env("TALLY_KAFKA_TOPIC", &topic)
        .env_remove("TALLY_CONFIG")
        .kill_on_drop(true)
        .spawn()
        .expect("tally-ingest starts");
    let base = format!("http://{addr}");
    let deadline = Instant::now() + Duration::from_secs(30);
    while get(&format!("{base}/readyz")).await.0 != StatusCode::OK {
        assert!(Instant::now() < deadline, "collector not ready within 30 s");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let in_flight = post_in_flight(&base, "t", 1000).await;
    let pid = child.id().expect("running").to_string();
    let killed = std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .expect("kill runs");
    assert!(killed.success());

    let r = tokio::time::timeout(Duration::from_secs(30), in_flight)
        .await
        .expect("answered")
        .expect("request task");
    assert_eq!(
        (r.status, r.body["accepted"].as_u64()),
        (StatusCode::ACCEPTED, Some(1000)),
        "{}",
        r.body
    );
    let status = tokio::time::timeout(Duration::from_secs(30), child.wait())
        .await
        .expect("exits within 30 s of SIGTERM")
        .expect("exit status");
    assert!(status.success(), "{status:?}");
    assert!(
        tokio::net::TcpStream::connect(&addr).await.is_err(),
        "nothing listens after the exit"
    );
    assert_eq!(read_topic(&brokers(), &topic).await.len(), 1000);
    std::fs::remove_file(&file).ok();
}
