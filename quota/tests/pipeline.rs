//! Events posted to the collector move the quota counters once per unique id, and the
//! aggregator's ClickHouse totals agree with them: a batch, a client retry of part of it and
//! single events sent twice, for two customers (the real collector, aggregator and feed
//! in-process, on the local Kafka, Redis and ClickHouse).

mod common;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use common::*;
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use rust_decimal::Decimal;
use serde_json::{json, Value};
use tally_aggregator::service::{Aggregator, Status};
use tally_quota::reconcile::reconcile;
use tally_quota::{Answered, Quota};
use tally_rater::usage::{UsageReader, UsageRequest};
use tally_rater::Window;
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

/// The tokens meter's day limit in the `gate` plan.
const DAY_LIMIT: u64 = 1_000_000;

/// One HTTP exchange with the collector, within 10 s: (status, body), `None` if no answer.
async fn exchange(req: Request<Full<Bytes>>) -> Option<(StatusCode, Bytes)> {
    let client = Client::builder(TokioExecutor::new()).build_http();
    let answer = async {
        let resp = client.request(req).await.ok()?;
        let status = resp.status();
        let body = resp.into_body().collect().await.ok()?.to_bytes();
        Some((status, body))
    };
    tokio::time::timeout(Duration::from_secs(10), answer)
        .await
        .ok()?
}

async fn ready(addr: SocketAddr) -> bool {
    let req = Request::get(format!("http://{addr}/readyz"))
        .body(Full::new(Bytes::new()))
        .expect("request");
    exchange(req)
        .await
        .is_some_and(|(status, _)| status == StatusCode::OK)
}

/// Posts `events` (one event or a batch) as the dev tenant; every event must be accepted.
async fn post_accepted(addr: SocketAddr, events: &Value) {
    let req = Request::post(format!("http://{addr}/v1/events"))
        .header("authorization", "Bearer demo-key")
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(events.to_string())))
        .expect("request");
    let (status, body) = exchange(req)
        .await
        .expect("the collector answers within 10 s");
    let answer: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    let n = events.as_array().map_or(1, Vec::len);
    assert_eq!(
        (status, answer),
        (StatusCode::ACCEPTED, json!({ "accepted": n })),
        "posting {events}"
    );
}

fn completion(id: &str, customer: &str, tokens: u64) -> Value {
    let now = OffsetDateTime::now_utc().format(&Rfc3339).expect("time");
    json!({"id": id, "customer": customer, "type": "completion", "time": now,
        "data": {"tokens": tokens, "model": "m"}})
}

/// Tokens of the completions in `posted`, each id counted once.
fn once_per_id(posted: &[Value]) -> u64 {
    let by_id: BTreeMap<&str, u64> = posted
        .iter()
        .map(|e| {
            let tokens = e["data"]["tokens"].as_u64().expect("tokens");
            (e["id"].as_str().expect("id"), tokens)
        })
        .collect();
    by_id.values().sum()
}

/// Who answered a `tokens` check of `customer`, and the usage of each window.
async fn counters(q: &Quota, customer: &str) -> (Answered, Vec<(Window, Decimal)>) {
    let d = ask(q, customer, "tokens", 0, false).await;
    let mut used: Vec<_> = d.windows.iter().map(|w| (w.window, w.used)).collect();
    used.sort();
    (d.answered, used)
}

/// What `counters` answers once `want` tokens are counted.
fn counted(want: u64) -> (Answered, Vec<(Window, Decimal)>) {
    (
        Answered::Redis,
        vec![
            (Window::Day, want.into()),
            (Window::BillingPeriod, want.into()),
        ],
    )
}

/// Usage of `api` and `tokens` in ClickHouse, by customer, over each request's one segment.
async fn usage(
    reader: &UsageReader,
    requests: &[UsageRequest],
) -> BTreeMap<String, BTreeMap<String, Decimal>> {
    let table = reader
        .read(TENANT, &["api", "tokens"], requests)
        .await
        .expect("usage read");
    table
        .into_iter()
        .map(|((customer, _), meters)| (customer, meters))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn posted_events_move_the_counters_once_per_unique_id() {
    let db = fresh_database("pipeline").await;
    let (alice, bob) = (unique("alice"), unique("bob"));
    let now = OffsetDateTime::now_utc();
    let start = now - time::Duration::days(1);
    for customer in [&alice, &bob] {
        subscribe(&db, customer, 1, start, start).await;
    }
    let mut config = config(&db);
    config.collector.listen = "127.0.0.1:0".into();
    config.collector.shutdown_grace_secs = 5;
    config.kafka.topic = unique("test-quota-pipeline");
    // One partition: Alice and Bob share it, so an id they both use meets the aggregator's
    // dedupe state of the other customer's event.
    config.kafka.partitions = 1;
    config.kafka.health_interval_ms = 200;
    config.kafka.message_timeout_ms = 3000;
    config.aggregator.group_id = unique("test-quota-pipeline-aggregator");
    config.aggregator.dead_letter_topic = unique("test-quota-pipeline-dead-letter");
    config.aggregator.flush_interval_ms = 200;
    config.quota.feed_group = unique("test-quota-pipeline-feed");
    for topic in [&config.kafka.topic, &config.aggregator.dead_letter_topic] {
        tally_service::ensure_topic(&config.kafka, topic)
            .await
            .expect("topic");
    }
    let q = quota(&config).await;

    // The collector, the aggregator (a blocking consumer loop on its own thread) and the feed.
    let collector = tally_ingest::serve(config.clone())
        .await
        .expect("collector starts");
    let addr = collector.addr();
    assert!(
        eventually(Duration::from_secs(30), move || ready(addr)).await,
        "collector ready within 30 s"
    );
    let stop_aggregator = Arc::new(AtomicBool::new(false));
    let aggregator = Aggregator::new(
        config.clone(),
        tokio::runtime::Handle::current(),
        stop_aggregator.clone(),
        Arc::new(Status::default()),
    );
    let aggregator = std::thread::Builder::new()
        .name("aggregator".into())
        .spawn(move || aggregator.run())
        .expect("aggregator thread");
    let (stop_feed, stopped) = tokio::sync::watch::channel(false);
    let feed = tokio::spawn(tally_quota::feed::run(q.clone(), config.clone(), stopped));

    // Alice: a batch of eight completions and one `api` event (a meter counted from checks,
    // which events must not move); the client retries the first half of the batch (same ids,
    // same bodies); two more completions, each sent twice. Bob: a batch of three, one of them
    // sent again, and one with an id of Alice's. Each customer's events share a partition, in the order posted.
    let batch: Vec<Value> = (0..8)
        .map(|i| completion(&format!("a{i}"), &alice, 1_000 + 37 * i))
        .collect();
    let api = json!({"id": "a-api", "customer": alice, "type": "api", "data": {}});
    let mut first = batch.clone();
    first.push(api);
    post_accepted(addr, &Value::Array(first)).await;
    post_accepted(addr, &Value::Array(batch[..4].to_vec())).await;
    let mut alice_posted = batch.iter().chain(&batch[..4]).cloned().collect::<Vec<_>>();
    for (id, tokens) in [("a8", 5_000), ("a9", 7)] {
        let e = completion(id, &alice, tokens);
        post_accepted(addr, &e).await;
        post_accepted(addr, &e).await;
        alice_posted.extend([e.clone(), e]);
    }
    let bob_batch: Vec<Value> = (0..3)
        .map(|i| completion(&format!("b{i}"), &bob, 20_000 + i))
        .collect();
    post_accepted(addr, &Value::Array(bob_batch.clone())).await;
    post_accepted(addr, &bob_batch[1]).await;
    // An id Alice used too: an event of Bob's, not a retry of hers.
    let shared = completion("a8", &bob, 300);
    post_accepted(addr, &shared).await;
    let bob_posted: Vec<Value> = bob_batch
        .iter()
        .chain(&bob_batch[1..2])
        .chain([&shared])
        .cloned()
        .collect();
    let (alice_want, bob_want) = (once_per_id(&alice_posted), once_per_id(&bob_posted));
    assert_eq!(
        (alice_want, bob_want),
        (8 * 1_000 + 37 * 28 + 5_007, 3 * 20_000 + 3 + 300),
        "the expected totals are those of unique ids"
    );

    // Redis: both windows of each customer hold exactly the customer's unique tokens.
    let (qr, a, b) = (&*q, alice.as_str(), bob.as_str());
    let fed = eventually(Duration::from_secs(30), move || async move {
        counters(qr, a).await == counted(alice_want) && counters(qr, b).await == counted(bob_want)
    })
    .await;
    assert!(
        fed,
        "day and billing-period counters hold {alice_want} for alice, {bob_want} for bob: \
         alice {:?}, bob {:?}",
        counters(&q, &alice).await,
        counters(&q, &bob).await
    );
    // The `api` event precedes a9 in Alice's partition: the feed has read it, and skipped it.
    let checked = ask(&q, &alice, "api", 0, false).await;
    assert_eq!(
        (checked.answered, checked.used),
        (Answered::Redis, Decimal::ZERO),
        "an event of a meter counted from checks moves no counter: {checked:?}"
    );

    // The gate: the day window binds (least remaining), and a check beyond it is refused.
    let left = DAY_LIMIT - alice_want;
    let d = ask(&q, &alice, "tokens", 0, false).await;
    assert_eq!(
        (d.allowed, d.window, d.limit, d.remaining),
        (
            true,
            Some(Window::Day),
            Some(DAY_LIMIT.into()),
            Some(left.into())
        ),
        "{d:?}"
    );
    assert!(ask(&q, &alice, "tokens", left, false).await.allowed);
    let over = ask(&q, &alice, "tokens", left + 1, false).await;
    assert!(!over.allowed, "past the day limit: {over:?}");

    // ClickHouse: the aggregator's rollups hold the same unique totals (and the `api` event).
    let reader = UsageReader::new(
        &config.clickhouse,
        config.catalog(),
        config.validation.max_dimension_chars,
    );
    let hour = now.replace_time(time::Time::from_hms(now.hour(), 0, 0).expect("hour"));
    let requests: Vec<UsageRequest> = [&alice, &bob]
        .into_iter()
        .map(|c| UsageRequest {
            customer: c.clone(),
            bounds: vec![hour, hour + time::Duration::hours(2)],
        })
        .collect();
    let want = BTreeMap::from([
        (
            alice.clone(),
            BTreeMap::from([
                ("api".to_owned(), Decimal::ONE),
                ("tokens".to_owned(), alice_want.into()),
            ]),
        ),
        (
            bob.clone(),
            BTreeMap::from([("tokens".to_owned(), bob_want.into())]),
        ),
    ]);
    let (r, reqs, w) = (&reader, &requests[..], &want);
    let flushed = eventually(Duration::from_secs(30), move || async move {
        usage(r, reqs).await == *w
    })
    .await;
    assert!(
        flushed,
        "clickhouse totals {want:?}: {:?}",
        usage(&reader, &requests).await
    );

    // Both sides settled: reconciliation compares every window in force and finds no drift.
    let report = reconcile(
        &q,
        &config,
        TENANT,
        OffsetDateTime::now_utc(),
        Duration::from_millis(200),
        false,
    )
    .await
    .expect("reconcile");
    assert!(
        report.drift.is_empty() && report.counters == 4,
        "day and billing period of both customers agree with ClickHouse: {report:?}"
    );

    tokio::time::timeout(Duration::from_secs(30), collector.shutdown())
        .await
        .expect("collector stops within 30 s");
    let _ = stop_feed.send(true);
    tokio::time::timeout(Duration::from_secs(30), feed)
        .await
        .expect("feed stops within 30 s")
        .expect("feed task")
        .expect("feed");
    stop_aggregator.store(true, Ordering::Release);
    tokio::time::timeout(
        Duration::from_secs(30),
        tokio::task::spawn_blocking(move || aggregator.join()),
    )
    .await
    .expect("aggregator stops within 30 s")
    .expect("join task")
    .expect("aggregator thread")
    .expect("aggregator");
    drop_database(&db).await;
}
