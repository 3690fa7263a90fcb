//! `POST /v1/quota/check` over a real connection, against the real Redis and ClickHouse.

mod common;

use std::sync::Arc;

use common::*;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// One HTTP/1.1 exchange on a fresh connection: (status, JSON body or text).
async fn call(
    addr: std::net::SocketAddr,
    method: &str,
    path: &str,
    key: Option<&str>,
    body: &str,
) -> (u16, Value) {
    let mut s = TcpStream::connect(addr).await.expect("connect");
    let auth = key.map_or(String::new(), |k| format!("Authorization: Bearer {k}\r\n"));
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n{auth}Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).await.expect("write");
    let mut out = Vec::new();
    s.read_to_end(&mut out).await.expect("read");
    let text = String::from_utf8(out).expect("utf-8");
    let (head, body) = text.split_once("\r\n\r\n").expect("head");
    let status = head[9..12].parse().expect("status");
    let value = serde_json::from_str(body).unwrap_or(Value::String(body.to_owned()));
    (status, value)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_http_check_answers_refuses_and_names_bad_fields() {
    let db = fresh_database("http").await;
    let customer = unique("web");
    let start = time::OffsetDateTime::now_utc() - time::Duration::days(1);
    subscribe(&db, &customer, 1, start, start).await;
    let config = config(&db);
    let q = quota(&config).await;
    let api = Arc::new(tally_quota::http::Api::new(q, config.tenants()));
    let (stop_tx, stop) = tokio::sync::watch::channel(false);
    let (addr, server) = tally_quota::http::serve("127.0.0.1:0", api, stop)
        .await
        .expect("serve");
    let path = "/v1/quota/check";
    let body = |amount: u64, consume: bool| {
        json!({"customer": customer, "meter": "daily", "amount": amount, "consume": consume})
            .to_string()
    };

    let (status, v) = call(addr, "POST", path, Some("demo-key"), &body(4, true)).await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["allowed"], true);
    assert_eq!(v["limit"], "10");
    assert_eq!(v["used"], "4");
    assert_eq!(v["remaining"], "6");
    assert_eq!(v["window"], "day");
    assert!(
        v["reset_at"]
            .as_str()
            .expect("reset_at")
            .ends_with("T00:00:00Z"),
        "{v}"
    );

    // A refusal is an answer, not an error; asking consumes nothing.
    let (status, v) = call(addr, "POST", path, Some("demo-key"), &body(7, true)).await;
    assert_eq!((status, &v["allowed"]), (200, &json!(false)), "{v}");
    let (_, v) = call(addr, "POST", path, Some("demo-key"), &body(6, false)).await;
    assert_eq!(v["allowed"], true);
    assert_eq!(v["used"], "4");

    // A batch: one answer per element, errors in place.
    let batch = json!([
        {"customer": customer, "meter": "daily", "amount": 1, "consume": true},
        {"customer": customer, "meter": "nope"},
        {"customer": customer, "meter": "daily", "amount": "0.5"}
    ])
    .to_string();
    let (status, v) = call(addr, "POST", path, Some("demo-key"), &batch).await;
    assert_eq!(status, 200);
    assert_eq!(v[0]["used"], "5");
    assert!(
        v[1]["error"].as_str().expect("error").starts_with("meter:"),
        "{v}"
    );
    assert!(
        v[2]["error"]
            .as_str()
            .expect("error")
            .starts_with("amount:"),
        "{v}"
    );

    // Bad input: 400 naming the field. Keys: 401. Tenants are separate.
    for (bad, field) in [
        (json!({"meter": "daily"}), "customer:"),
        (
            json!({"customer": customer, "meter": "daily", "amount": -2}),
            "amount:",
        ),
        (
            json!({"customer": customer, "meter": "daily", "consume": 1}),
            "consume:",
        ),
        (
            json!({"customer": customer, "meter": "tokens", "consume": true}),
            "consume:",
        ),
        (
            json!({"customer": customer, "meter": "daily", "extra": 1}),
            "extra:",
        ),
    ] {
        let (status, v) = call(addr, "POST", path, Some("demo-key"), &bad.to_string()).await;
        assert_eq!(status, 400, "{bad}: {v}");
        assert!(
            v["error"].as_str().expect("error").starts_with(field),
            "{bad}: {v}"
        );
    }
    let (status, v) = call(addr, "POST", path, Some("demo-key"), "{oops").await;
    assert_eq!(status, 400);
    assert!(v["error"].as_str().expect("error").starts_with("body:"));
    assert_eq!(call(addr, "POST", path, None, &body(1, true)).await.0, 401);
    assert_eq!(
        call(addr, "POST", path, Some("wrong"), &body(1, true))
            .await
            .0,
        401
    );
    let (_, other) = call(addr, "POST", path, Some("acme-key"), &body(1, false)).await;
    assert_eq!(
        other["allowed"], false,
        "acme has no subscription for this customer: {other}"
    );
    assert_eq!(other["answered"], "no_subscription");

    assert_eq!(call(addr, "GET", "/healthz", None, "").await.0, 200);
    assert_eq!(call(addr, "GET", "/readyz", None, "").await.0, 200);
    let (status, metrics) = call(addr, "GET", "/metrics", None, "").await;
    assert_eq!(status, 200);
    assert!(metrics
        .as_str()
        .expect("text")
        .contains("tally_quota_checks_total"));
    assert_eq!(call(addr, "GET", path, Some("demo-key"), "").await.0, 405);
    let _ = stop_tx.send(true);
    server.await.expect("server");
    drop_database(&db).await;
}
