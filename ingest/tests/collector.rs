//! The collector against the real broker: what gets a 2xx is in the topic, field by field.

mod common;

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use common::*;
use http::StatusCode;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn now_rfc3339(offset_secs: i64) -> String {
    let t = time::OffsetDateTime::now_utc() + time::Duration::seconds(offset_secs);
    t.format(&time::format_description::well_known::Rfc3339)
        .expect("format")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn single_batch_and_ndjson_events_land_in_the_topic_field_by_field() {
    let topic = unique_topic("roundtrip");
    let collector = start(config(&brokers(), &topic)).await;
    let url = format!("http://{}/v1/events", collector.addr());
    let t1 = now_rfc3339(-3600);

    let single = json!({"id": "s-1", "customer": "cust-a", "type": "completion", "time": t1,
                        "data": {"tokens": 1234.5, "model": "gpt-x"}});
    let r = post(
        &url,
        "application/json",
        Some("demo-key"),
        single.to_string(),
    )
    .await;
    assert_eq!(
        (r.status, r.body),
        (StatusCode::ACCEPTED, json!({"accepted": 1}))
    );

    let batch: Vec<_> = (0..20)
        .map(|i| {
            json!({"id": format!("b-{i}"), "customer": format!("cust-{}", i % 3), "type": "request",
                         "time": t1, "data": {"endpoint": format!("/v1/{}", i % 2)}})
        })
        .collect();
    let r = post(
        &url,
        "application/json",
        Some("demo-key"),
        json!(batch).to_string(),
    )
    .await;
    assert_eq!(
        (r.status, r.body),
        (StatusCode::ACCEPTED, json!({"accepted": 20}))
    );

    let nd = "{\"id\":\"n-1\",\"customer\":\"cust-a\",\"type\":\"storage\",\"data\":{\"gb\":\"10.25\"}}\n\
              {\"id\":\"n-2\",\"subject\":\"cust-b\",\"type\":\"login\",\"source\":\"auth\",\"data\":{\"user\":\"u-7\"}}\n";
    let r = post(&url, "application/x-ndjson", Some("acme-key"), nd).await;
    assert_eq!(
        (r.status, r.body),
        (StatusCode::ACCEPTED, json!({"accepted": 2}))
    );

    // The success path counts into the handles it looked up once. The recorder is shared by
    // every test of this binary, so these are lower bounds.
    let (_, _, metrics) = get(&format!("http://{}/metrics", collector.addr())).await;
    for (series, at_least) in [
        (
            r#"tally_ingest_http_requests_total{route="/v1/events",status="202"}"#,
            3.0,
        ),
        (
            r#"tally_ingest_http_request_duration_seconds_count{route="/v1/events"}"#,
            3.0,
        ),
        (
            r#"tally_ingest_events_total{outcome="accepted",reason=""}"#,
            23.0,
        ),
        // One delivery wait per request; the queue depth as the health loop last read it.
        ("tally_ingest_delivery_duration_seconds_count", 3.0),
        ("tally_ingest_producer_queue_messages", 0.0),
    ] {
        let value = metrics
            .lines()
            .find_map(|l| l.strip_prefix(series)?.trim().parse::<f64>().ok())
            .unwrap_or_else(|| panic!("{series} missing from /metrics:\n{metrics}"));
        assert!(
            value >= at_least,
            "{series} is {value}, expected >= {at_least}"
        );
    }

    let stored = read_topic(&brokers(), &topic).await;
    assert_eq!(stored.len(), 23, "exactly the accepted events");
    let by_id: HashMap<_, _> = stored.iter().map(|s| (s.record.id.as_str(), s)).collect();

    let s = by_id["s-1"];
    assert_eq!(s.key, "demo/cust-a");
    assert_eq!(
        (s.record.tenant.as_str(), s.record.customer.as_str()),
        ("demo", "cust-a")
    );
    assert_eq!(s.record.event_type, "completion");
    assert_eq!(
        s.record.time,
        time::OffsetDateTime::parse(&t1, &time::format_description::well_known::Rfc3339)
            .expect("t")
    );
    assert_eq!(
        s.record.data,
        *json!({"tokens": 1234.5, "model": "gpt-x"})
            .as_object()
            .expect("obj")
    );
    let age = time::OffsetDateTime::now_utc() - s.record.received_at;
    assert!(
        age >= time::Duration::ZERO && age < time::Duration::minutes(5),
        "received_at is the receipt time"
    );

    let n2 = by_id["n-2"];
    assert_eq!(
        (n2.key.as_str(), n2.record.tenant.as_str()),
        ("acme/cust-b", "acme")
    );
    assert_eq!(
        (n2.record.customer.as_str(), n2.record.source.as_deref()),
        ("cust-b", Some("auth"))
    );
    assert_eq!(by_id["n-1"].record.data["gb"], json!("10.25"));

    // One customer, one partition: the key is tenant/customer.
    let mut partition_of: HashMap<&str, HashSet<i32>> = HashMap::new();
    for s in &stored {
        assert_eq!(s.key, format!("{}/{}", s.record.tenant, s.record.customer));
        partition_of
            .entry(s.key.as_str())
            .or_default()
            .insert(s.partition);
    }
    assert!(
        partition_of.values().all(|p| p.len() == 1),
        "{partition_of:?}"
    );
    // Per-customer order is kept.
    let cust0: Vec<_> = stored
        .iter()
        .filter(|s| s.key == "demo/cust-0")
        .map(|s| (s.offset, s.record.id.clone()))
        .collect();
    let mut sorted = cust0.clone();
    sorted.sort();
    assert_eq!(
        cust0.iter().map(|x| &x.1).collect::<Vec<_>>(),
        sorted.iter().map(|x| &x.1).collect::<Vec<_>>()
    );
    collector.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mixed_batch_stores_only_its_good_events() {
    let topic = unique_topic("mixed");
    let collector = start(config(&brokers(), &topic)).await;
    let url = format!("http://{}/v1/events", collector.addr());
    let batch = json!([
        {"id": "g-1", "customer": "c", "type": "request"},
        {"id": "bad-1", "customer": "c", "type": "completion", "data": {"tokens": "many", "model": "m"}},
        {"id": "g-2", "customer": "c", "type": "completion", "data": {"tokens": 5, "model": "m"}},
        {"id": "bad-2", "customer": "c", "type": "request", "time": now_rfc3339(3600)},
        {"id": "bad-3", "customer": "c", "type": "teleport"},
        {"id": "g-1", "customer": "c", "type": "request"}
    ]);
    let r = post(
        &url,
        "application/json",
        Some("demo-key"),
        batch.to_string(),
    )
    .await;
    assert_eq!(r.status, StatusCode::ACCEPTED);
    assert_eq!(r.body["accepted"], 2);
    let rejected: Vec<_> = r.body["rejected"]
        .as_array()
        .expect("rejected")
        .iter()
        .map(|x| {
            (
                x["index"].as_u64().expect("index"),
                x["error"]
                    .as_str()
                    .expect("error")
                    .split(':')
                    .next()
                    .map(str::to_owned),
            )
        })
        .collect();
    assert_eq!(
        rejected,
        [
            (1, Some("data.tokens".into())),
            (3, Some("time".into())),
            (4, Some("type".into())),
            (5, Some("id".into()))
        ]
    );
    let stored = read_topic(&brokers(), &topic).await;
    let mut ids: Vec<_> = stored.iter().map(|s| s.record.id.clone()).collect();
    ids.sort();
    assert_eq!(ids, ["g-1", "g-2"]);
    collector.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn error_statuses_over_a_real_socket() {
    let topic = unique_topic("errors");
    let mut c = config(&brokers(), &topic);
    c.collector.max_body_bytes = 64 * 1024;
    let collector = start(c).await;
    let base = format!("http://{}", collector.addr());
    let url = format!("{base}/v1/events");
    let ev = r#"{"id":"e","customer":"c","type":"request"}"#;

    let error = |r: &Reply| r.body["error"].as_str().unwrap_or_default().to_owned();
    let r = post(&url, "application/json", None, ev).await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    assert_eq!(
        error(&r),
        "missing or unknown API key (Authorization: Bearer <key>)"
    );
    assert_eq!(r.headers["www-authenticate"], "Bearer");
    let r = post(&url, "application/json", Some("wrong"), ev).await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    assert!(
        error(&r).starts_with("missing or unknown API key"),
        "{}",
        r.body
    );
    let r = post(&url, "text/csv", Some("demo-key"), ev).await;
    assert_eq!(r.status, StatusCode::UNSUPPORTED_MEDIA_TYPE);
    assert!(error(&r).contains("text/csv"), "{}", r.body);
    assert_eq!(r.headers["content-type"], "application/json");

    // Every event refused: 400 with the same body as a partial batch, each one named.
    let bad = r#"[{"id":"b1","customer":"c","type":"completion","data":{"tokens":"x"}},
                  {"id":"b2","customer":"c","type":"no-such-type"}]"#;
    let r = post(&url, "application/json", Some("demo-key"), bad).await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST, "{}", r.body);
    assert_eq!(r.body["accepted"], 0, "{}", r.body);
    let rejected = r.body["rejected"].as_array().expect("rejected list");
    assert_eq!(rejected.len(), 2, "{}", r.body);
    for (i, (id, field)) in [("b1", "data.tokens"), ("b2", "type")].iter().enumerate() {
        assert_eq!(rejected[i]["index"], i, "{}", r.body);
        assert_eq!(rejected[i]["id"], *id, "{}", r.body);
        let e = rejected[i]["error"].as_str().expect("error");
        assert!(e.starts_with(&format!("{field}: ")), "{e}");
    }

    let r = post(&url, "application/json", Some("demo-key"), "[{\"id\":1,}]").await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    assert!(
        r.body["error"]
            .as_str()
            .expect("error")
            .starts_with("malformed JSON at line 1, column"),
        "{}",
        r.body
    );
    let r = post(
        &url,
        "application/json",
        Some("demo-key"),
        vec![b'['; 70 * 1024],
    )
    .await;
    assert_eq!(r.status, StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(error(&r), "body larger than 65536 bytes");

    // A huge declared length is refused from the headers alone, before the body is sent.
    let mut s = tokio::net::TcpStream::connect(collector.addr())
        .await
        .expect("connect");
    let head = "POST /v1/events HTTP/1.1\r\nhost: x\r\nauthorization: Bearer demo-key\r\n\
                content-type: application/json\r\ncontent-length: 1000000000\r\n\r\n[";
    s.write_all(head.as_bytes()).await.expect("write");
    let mut buf = vec![0u8; 512];
    let n = tokio::time::timeout(Duration::from_secs(10), s.read(&mut buf))
        .await
        .expect("answered without the body")
        .expect("read");
    assert!(
        String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 413"),
        "{}",
        String::from_utf8_lossy(&buf[..n])
    );

    let (status, _, body) = get(&format!("{base}/healthz")).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let (status, _, _) = get(&format!("{base}/readyz")).await;
    assert_eq!(status, StatusCode::OK);
    let (_, _, metrics) = get(&format!("{base}/metrics")).await;
    for name in [
        "tally_ingest_http_requests_total",
        "tally_ingest_events_total",
        "tally_ingest_http_request_duration_seconds_bucket",
        "tally_ingest_broker_up",
    ] {
        assert!(metrics.contains(name), "{name} missing from /metrics");
    }
    assert!(metrics.contains("status=\"415\""));
    collector.shutdown().await;
    assert!(
        read_topic(&brokers(), &topic).await.is_empty(),
        "no error path produced anything"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_producer_queue_answers_503_and_says_what_was_stored() {
    let topic = unique_topic("queuefull");
    let mut c = config(&brokers(), &topic);
    c.kafka.queue_max_messages = 10;
    c.kafka.linger_ms = 200;
    let collector = start(c).await;
    let url = format!("http://{}/v1/events", collector.addr());
    let batch: Vec<_> = (0..50)
        .map(|i| json!({"id": format!("q-{i}"), "customer": "c", "type": "request"}))
        .collect();
    let r = post(
        &url,
        "application/json",
        Some("demo-key"),
        json!(batch).to_string(),
    )
    .await;
    assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE, "{}", r.body);
    assert_eq!(
        r.headers.get("retry-after").map(|v| v.as_bytes()),
        Some(&b"1"[..])
    );
    let stored_count = r.body["stored"].as_u64().expect("stored");
    assert_eq!(r.body["not_stored"].as_u64(), Some(50 - stored_count));
    assert!(r.body["error"]
        .as_str()
        .expect("error")
        .starts_with("producer queue full"));
    let stored = read_topic(&brokers(), &topic).await;
    assert_eq!(
        stored.len() as u64,
        stored_count,
        "the answer names exactly what is in the topic"
    );

    // A request the queue can hold still succeeds.
    let r = post(
        &url,
        "application/json",
        Some("demo-key"),
        json!(batch[..5]).to_string(),
    )
    .await;
    assert_eq!(r.status, StatusCode::ACCEPTED);
    collector.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_outage_gets_503_then_recovers_and_loses_nothing_accepted() {
    let mut broker = TestBroker::start().await;
    let topic = unique_topic("outage");
    let collector = start(config(&broker.addr(), &topic)).await;
    let url = format!("http://{}/v1/events", collector.addr());

    let mut accepted: HashSet<String> = HashSet::new();
    let mut saw_503 = false;
    let mut seq = 0;
    let mut send = |n: usize| {
        let ids: Vec<String> = (0..n)
            .map(|_| {
                seq += 1;
                format!("o-{seq}")
            })
            .collect();
        let body: Vec<_> = ids.iter().map(|id| json!({"id": id, "customer": format!("c-{}", id.len() % 5), "type": "request"})).collect();
        (ids, json!(body).to_string())
    };

    for _ in 0..10 {
        let (ids, body) = send(10);
        let r = post(&url, "application/json", Some("demo-key"), body).await;
        assert_eq!(r.status, StatusCode::ACCEPTED, "{}", r.body);
        accepted.extend(ids);
    }

    broker.kill().await;
    let outage_end = Instant::now() + Duration::from_secs(6);
    while Instant::now() < outage_end {
        let (ids, body) = send(10);
        let r = post(&url, "application/json", Some("demo-key"), body).await;
        match r.status {
            StatusCode::ACCEPTED => accepted.extend(ids),
            StatusCode::SERVICE_UNAVAILABLE => {
                saw_503 = true;
                assert!(
                    r.headers.contains_key("retry-after"),
                    "503 without Retry-After"
                );
                let stored = r.body["stored"].as_u64().expect("stored count");
                assert_eq!(stored, 0, "a dead broker stores nothing: {}", r.body);
            }
            other => panic!("unexpected {other} during the outage: {}", r.body),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(saw_503, "requests during the outage must get 503");
    let (status, _, _) = get(&format!("http://{}/readyz", collector.addr())).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);

    broker.restart().await;
    let recovery_deadline = Instant::now() + Duration::from_secs(45);
    let mut recovered = 0;
    while recovered < 5 {
        assert!(
            Instant::now() < recovery_deadline,
            "collector did not recover within 45 s of the broker's return"
        );
        let (ids, body) = send(10);
        let r = post(&url, "application/json", Some("demo-key"), body).await;
        if r.status == StatusCode::ACCEPTED {
            accepted.extend(ids);
            recovered += 1;
        } else {
            assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE, "{}", r.body);
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    collector.shutdown().await;

    let stored: HashSet<String> = read_topic(&broker.addr(), &topic)
        .await
        .into_iter()
        .map(|s| s.record.id)
        .collect();
    let lost: Vec<_> = accepted.difference(&stored).collect();
    assert!(
        lost.is_empty(),
        "{} accepted events missing from the topic: {:?}",
        lost.len(),
        &lost[..lost.len().min(10)]
    );
    assert!(accepted.len() >= 150);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cloudevents_sdk_events_are_accepted_on_the_openmeter_route() {
    use cloudevents::{EventBuilder, EventBuilderV10};
    let topic = unique_topic("cloudevents");
    let collector = start(config(&brokers(), &topic)).await;
    let url = format!("http://{}/api/v1/events", collector.addr());
    let event = |i: u32| {
        EventBuilderV10::new()
            .id(format!("ce-{i}"))
            .source("billing-svc")
            .ty("completion")
            .subject(format!("cust-{}", i % 2))
            .time(now_rfc3339(-60))
            .data(
                "application/json",
                json!({"tokens": i * 10, "model": "m-1"}),
            )
            .build()
            .expect("valid CloudEvent")
    };

    let one = serde_json::to_vec(&event(1)).expect("structured mode");
    let r = post(&url, "application/cloudevents+json", Some("demo-key"), one).await;
    assert_eq!(
        (r.status, r.body),
        (StatusCode::NO_CONTENT, serde_json::Value::Null)
    );
    let batch = serde_json::to_vec(&(2..6).map(event).collect::<Vec<_>>()).expect("batch");
    let r = post(
        &url,
        "application/cloudevents-batch+json",
        Some("demo-key"),
        batch,
    )
    .await;
    assert_eq!(r.status, StatusCode::NO_CONTENT);
    let plain = serde_json::to_vec(&event(6)).expect("json");
    let r = post(&url, "application/json", Some("demo-key"), plain).await;
    assert_eq!(r.status, StatusCode::NO_CONTENT);

    let mut bad = serde_json::to_value(event(7)).expect("value");
    bad["data"]["tokens"] = json!("a lot");
    let batch = json!([serde_json::to_value(event(8)).expect("value"), bad]).to_string();
    let r = post(
        &url,
        "application/cloudevents-batch+json",
        Some("demo-key"),
        batch,
    )
    .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    assert_eq!(r.headers["content-type"], "application/problem+json");
    assert_eq!(r.body["errors"][0]["index"], 1);
    assert_eq!(r.body["errors"][0]["id"], "ce-7");
    assert!(r.body["errors"][0]["error"]
        .as_str()
        .expect("error")
        .starts_with("data.tokens:"));
    let r = post(
        &url,
        "application/cloudevents+json",
        None,
        serde_json::to_vec(&event(9)).expect("json"),
    )
    .await;
    assert_eq!(
        (r.status, r.body["status"].as_u64()),
        (StatusCode::UNAUTHORIZED, Some(401))
    );

    let stored = read_topic(&brokers(), &topic).await;
    let mut ids: Vec<_> = stored.iter().map(|s| s.record.id.as_str()).collect();
    ids.sort();
    assert_eq!(
        ids,
        ["ce-1", "ce-2", "ce-3", "ce-4", "ce-5", "ce-6"],
        "the refused batch stored nothing"
    );
    let s = stored.iter().find(|s| s.record.id == "ce-3").expect("ce-3");
    assert_eq!(
        (s.key.as_str(), s.record.source.as_deref()),
        ("demo/cust-1", Some("billing-svc"))
    );
    assert_eq!(
        s.record.data,
        *json!({"tokens": 30, "model": "m-1"})
            .as_object()
            .expect("obj")
    );
    collector.shutdown().await;
}
