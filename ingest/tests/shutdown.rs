//! Graceful shutdown: a request in flight when the collector is told to stop still gets
//! its answer, and its events are in the topic. Its own test binary, so the process-wide
//! in-flight gauge it waits on counts only this test's requests.

mod common;

use std::time::{Duration, Instant};

use common::*;
use http::StatusCode;
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_shutdown_finishes_in_flight_requests() {
    let topic = unique_topic("shutdown");
    let mut c = config(&brokers(), &topic);
    // A slow batch fill keeps the request in flight long enough to stop the collector under it.
    c.kafka.linger_ms = 500;
    let collector = start(c).await;
    let base = format!("http://{}", collector.addr());
    let batch: Vec<_> = (0..2000)
        .map(|i| json!({"id": format!("g-{i}"), "customer": format!("c-{}", i % 50), "type": "request"}))
        .collect();
    let body = json!(batch).to_string();
    let url = format!("{base}/v1/events");
    let in_flight =
        tokio::spawn(async move { post(&url, "application/json", Some("demo-key"), body).await });

    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (_, _, metrics) = get(&format!("{base}/metrics")).await;
        if metrics
            .lines()
            .any(|l| l.starts_with("tally_ingest_http_requests_in_flight ") && !l.ends_with(" 0"))
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the request never showed as in flight"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    collector.shutdown().await;
    let r = in_flight.await.expect("request task");
    assert_eq!(
        (r.status, r.body["accepted"].as_u64()),
        (StatusCode::ACCEPTED, Some(2000))
    );
    assert_eq!(read_topic(&brokers(), &topic).await.len(), 2000);
}
