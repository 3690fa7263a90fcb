//! Handler behaviour without a socket or a broker: an in-memory sink stands in for Kafka
//! (the real broker is exercised by `tests/collector.rs`).

use std::sync::Mutex;

use super::*;
use crate::kafka::Published;
use http_body_util::Full;
use tally_core::UsageRecord;
use time::macros::datetime;

#[derive(Default)]
struct MemorySink {
    records: Mutex<Vec<UsageRecord>>,
    /// Fail the record at this index (and, when `fail_all`, every record).
    fail_from: Mutex<Option<(usize, SinkError)>>,
}

impl EventSink for Arc<MemorySink> {
    async fn publish(&self, records: &[Encoded]) -> Published {
        let fail = self.fail_from.lock().expect("lock").clone();
        let mut out = Published::default();
        for (i, r) in records.iter().enumerate() {
            match &fail {
                Some((from, e)) if i >= *from => out.failures.push(e.clone()),
                _ => {
                    let record: UsageRecord =
                        serde_json::from_slice(r.payload()).expect("a record");
                    assert_eq!(r.key(), record.key().as_bytes());
                    self.records.lock().expect("lock").push(record);
                    out.delivered += 1;
                }
            }
        }
        out
    }

    fn is_ready(&self) -> bool {
        self.fail_from.lock().expect("lock").is_none()
    }
}

fn app() -> (App<Arc<MemorySink>>, Arc<MemorySink>) {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../config/tally.dev.toml");
    let mut config =
        Config::parse(&std::fs::read_to_string(&path).expect("config"), &path).expect("parse");
    config.collector.max_body_bytes = 4096;
    let sink = Arc::new(MemorySink::default());
    let clock: Clock = Arc::new(|| datetime!(2026-11-24 12:00:00 UTC));
    (App::with_clock(config, sink.clone(), clock), sink)
}

fn post(path: &str, content_type: &str, key: Option<&str>, body: &str) -> Request<Full<Bytes>> {
    let mut b = Request::post(path).header(CONTENT_TYPE, content_type);
    if let Some(k) = key {
        b = b.header(AUTHORIZATION, format!("Bearer {k}"));
    }
    b.body(Full::new(Bytes::from(body.to_owned())))
        .expect("request")
}

async fn send(
    app: &App<Arc<MemorySink>>,
    req: Request<Full<Bytes>>,
) -> (StatusCode, http::HeaderMap, Value) {
    let r = app.handle(req).await;
    let status = r.status();
    let headers = r.headers().clone();
    let bytes = r.into_body().collect().await.expect("body").to_bytes();
    let body = if bytes.is_empty() {
        Value::Null
    } else {
        serde_json::from_slice(&bytes).expect("json body")
    };
    (status, headers, body)
}

const GOOD: &str = r#"{"id":"a","customer":"c1","type":"request","data":{"endpoint":"/x"}}"#;

#[tokio::test]
async fn single_batch_and_ndjson_are_accepted() {
    let (app, sink) = app();
    let (s, _, b) = send(
        &app,
        post("/v1/events", "application/json", Some("demo-key"), GOOD),
    )
    .await;
    assert_eq!((s, b), (StatusCode::ACCEPTED, json!({"accepted": 1})));
    let batch = r#"[{"id":"b","customer":"c1","type":"request"},{"id":"c","customer":"c2","type":"storage","data":{"gb":2}}]"#;
    let (s, _, b) = send(
        &app,
        post(
            "/v1/events",
            "application/json; charset=utf-8",
            Some("demo-key"),
            batch,
        ),
    )
    .await;
    assert_eq!((s, b), (StatusCode::ACCEPTED, json!({"accepted": 2})));
    let nd = "{\"id\":\"d\",\"customer\":\"c1\",\"type\":\"request\"}\n{\"id\":\"e\",\"customer\":\"c1\",\"type\":\"request\"}\n";
    let (s, _, b) = send(
        &app,
        post("/v1/events", "application/x-ndjson", Some("demo-key"), nd),
    )
    .await;
    assert_eq!((s, b), (StatusCode::ACCEPTED, json!({"accepted": 2})));
    let records = sink.records.lock().expect("lock");
    let ids: Vec<_> = records.iter().map(|r| r.id.as_str()).collect();
    assert_eq!(ids, ["a", "b", "c", "d", "e"]);
    assert!(records.iter().all(|r| r.tenant == "demo"));
}

#[tokio::test]
async fn tenant_comes_from_the_key_only() {
    let (app, sink) = app();
    let body = r#"{"id":"a","customer":"c1","type":"request","tenant":"acme"}"#;
    let (s, _, b) = send(
        &app,
        post("/v1/events", "application/json", Some("demo-key"), body),
    )
    .await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    assert_eq!(
        b["rejected"][0]["error"],
        "tenant: unknown field; events carry id, customer, type, time and data"
    );
    let (s, _, _) = send(
        &app,
        post("/v1/events", "application/json", Some("acme-key"), GOOD),
    )
    .await;
    assert_eq!(s, StatusCode::ACCEPTED);
    assert_eq!(sink.records.lock().expect("lock")[0].tenant, "acme");
}

#[tokio::test]
async fn partial_batches_report_each_refusal() {
    let (app, sink) = app();
    let batch = r#"[{"id":"a","customer":"c","type":"request"},{"id":"b","customer":"c","type":"completion","data":{"tokens":"lots"}},{"id":"a","customer":"c","type":"request"}]"#;
    let (s, _, b) = send(
        &app,
        post("/v1/events", "application/json", Some("demo-key"), batch),
    )
    .await;
    assert_eq!(s, StatusCode::ACCEPTED);
    assert_eq!(
        b,
        json!({"accepted": 1, "rejected": [
            {"index": 1, "id": "b", "error": "data.tokens: \"lots\" is not a valid quantity: not a decimal number"},
            {"index": 2, "id": "a", "error": "id: duplicate of the event at index 0 in this request (same customer and id)"}
        ]})
    );
    assert_eq!(sink.records.lock().expect("lock").len(), 1);
    let all_bad = r#"[{"id":"a","type":"request"}]"#;
    let (s, _, b) = send(
        &app,
        post("/v1/events", "application/json", Some("demo-key"), all_bad),
    )
    .await;
    assert_eq!(
        (s, b),
        (
            StatusCode::BAD_REQUEST,
            json!({"accepted": 0, "rejected": [{"index": 0, "id": "a", "error": "customer: required"}]})
        )
    );
}

#[tokio::test]
async fn every_error_status_has_a_clear_body() {
    let (app, _) = app();
    let (s, h, b) = send(&app, post("/v1/events", "application/json", None, GOOD)).await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    assert_eq!(
        h.get("www-authenticate").map(|v| v.as_bytes()),
        Some(&b"Bearer"[..])
    );
    assert!(b["error"].as_str().expect("error").contains("API key"));
    let (s, _, _) = send(
        &app,
        post("/v1/events", "application/json", Some("nope"), GOOD),
    )
    .await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    let (s, _, b) = send(
        &app,
        post("/v1/events", "text/plain", Some("demo-key"), GOOD),
    )
    .await;
    assert_eq!(s, StatusCode::UNSUPPORTED_MEDIA_TYPE);
    assert!(b["error"]
        .as_str()
        .expect("error")
        .contains("application/x-ndjson"));
    let big = format!("[{}]", vec![GOOD; 100].join(","));
    let (s, _, b) = send(
        &app,
        post("/v1/events", "application/json", Some("demo-key"), &big),
    )
    .await;
    assert_eq!(
        (s, b),
        (
            StatusCode::PAYLOAD_TOO_LARGE,
            json!({"error": "body larger than 4096 bytes"})
        )
    );
    let (s, _, b) = send(
        &app,
        post(
            "/v1/events",
            "application/json",
            Some("demo-key"),
            "{\"id\":",
        ),
    )
    .await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    assert_eq!(
        b["error"],
        "malformed JSON at line 1, column 6: EOF while parsing a value"
    );
    let get = Request::get("/v1/events")
        .body(Full::new(Bytes::new()))
        .expect("req");
    assert_eq!(send(&app, get).await.0, StatusCode::METHOD_NOT_ALLOWED);
    let nowhere = Request::get("/nope")
        .body(Full::new(Bytes::new()))
        .expect("req");
    assert_eq!(send(&app, nowhere).await.0, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn broker_failures_answer_503_with_retry_after_and_counts() {
    let (app, sink) = app();
    *sink.fail_from.lock().expect("lock") = Some((1, SinkError::QueueFull));
    let batch = r#"[{"id":"a","customer":"c","type":"request"},{"id":"b","customer":"c","type":"request"}]"#;
    let (s, h, b) = send(
        &app,
        post("/v1/events", "application/json", Some("demo-key"), batch),
    )
    .await;
    assert_eq!(s, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(h.get(RETRY_AFTER).map(|v| v.as_bytes()), Some(&b"1"[..]));
    assert_eq!(
        (b["stored"].clone(), b["not_stored"].clone()),
        (json!(1), json!(1))
    );
    assert!(b["error"]
        .as_str()
        .expect("error")
        .starts_with("producer queue full: 1 of 2 events not stored"));
    let ready = Request::get("/readyz")
        .body(Full::new(Bytes::new()))
        .expect("req");
    let (s, h, _) = send(&app, ready).await;
    assert_eq!(s, StatusCode::SERVICE_UNAVAILABLE);
    assert!(h.contains_key(RETRY_AFTER));
    let health = Request::get("/healthz")
        .body(Full::new(Bytes::new()))
        .expect("req");
    assert_eq!(
        send(&app, health).await.0,
        StatusCode::OK,
        "health is the process, not the broker"
    );
}

#[tokio::test]
async fn openmeter_route_speaks_cloudevents_and_problem_json() {
    let (app, sink) = app();
    let ce = r#"{"specversion":"1.0","id":"x1","source":"svc","type":"request","subject":"c9","data":{"endpoint":"/a"}}"#;
    let r = app
        .handle(post(
            "/api/v1/events",
            "application/cloudevents+json",
            Some("demo-key"),
            ce,
        ))
        .await;
    assert_eq!(r.status(), StatusCode::NO_CONTENT);
    let rec = sink.records.lock().expect("lock")[0].clone();
    assert_eq!(
        (rec.customer.as_str(), rec.source.as_deref()),
        ("c9", Some("svc"))
    );

    let batch = format!(
        "[{ce},{{\"specversion\":\"1.0\",\"id\":\"x2\",\"type\":\"request\",\"subject\":\"c\"}}]"
    );
    let r = app
        .handle(post(
            "/api/v1/events",
            "application/cloudevents-batch+json",
            Some("demo-key"),
            &batch,
        ))
        .await;
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    assert_eq!(r.headers()[CONTENT_TYPE], "application/problem+json");
    let b: Value = serde_json::from_slice(&r.into_body().collect().await.expect("b").to_bytes())
        .expect("json");
    assert_eq!(
        b["errors"],
        json!([{"index": 1, "id": "x2", "error": "source: required"}])
    );
    assert_eq!(
        sink.records.lock().expect("lock").len(),
        1,
        "all or nothing on this route"
    );

    let r = app
        .handle(post("/api/v1/events", "application/json", None, ce))
        .await;
    assert_eq!(
        (r.status(), r.headers()[CONTENT_TYPE].as_bytes()),
        (StatusCode::UNAUTHORIZED, &b"application/problem+json"[..])
    );
    let r = app
        .handle(post(
            "/api/v1/events",
            "application/x-ndjson",
            Some("demo-key"),
            ce,
        ))
        .await;
    assert_eq!(r.status(), StatusCode::UNSUPPORTED_MEDIA_TYPE);
    *sink.fail_from.lock().expect("lock") = Some((0, SinkError::BrokerDown));
    let r = app
        .handle(post(
            "/api/v1/events",
            "application/json",
            Some("demo-key"),
            ce,
        ))
        .await;
    assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(r.headers()[RETRY_AFTER], "1");
}
