//! Ingested events move the quota counters once per event id (real Kafka, Redis, ClickHouse).

mod common;

use std::time::Duration;

use common::*;
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::ClientConfig;
use serde_json::json;
use tally_quota::Answered;
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

async fn produce(producer: &FutureProducer, topic: &str, key: &str, payloads: &[Vec<u8>]) {
    for p in payloads {
        producer
            .send(
                FutureRecord::to(topic).key(key).payload(p),
                Duration::from_secs(10),
            )
            .await
            .expect("produced");
    }
}

fn record(customer: &str, id: &str, ty: &str, data: serde_json::Value) -> Vec<u8> {
    let now = OffsetDateTime::now_utc().format(&Rfc3339).expect("time");
    json!({"v": 1, "tenant": TENANT, "id": id, "customer": customer, "type": ty,
        "time": now, "received_at": now, "data": data})
    .to_string()
    .into_bytes()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_move_the_counters_once_per_unique_id() {
    let db = fresh_database("feed").await;
    let customer = unique("eater");
    let start = OffsetDateTime::now_utc() - time::Duration::days(1);
    subscribe(&db, &customer, 1, start, start).await;
    let mut config = config(&db);
    config.kafka.topic = unique("test-quota-feed");
    config.quota.feed_group = unique("test-quota-feed-group");
    tally_service::ensure_topic(&config.kafka, &config.kafka.topic)
        .await
        .expect("topic");
    let q = quota(&config).await;

    // Ten completions, each sent twice (a client retry); a request event (a meter counted
    // from checks, not events); an undecodable record.
    let mut payloads = Vec::new();
    let mut want = 0u64;
    for i in 0..10u64 {
        let tokens = 100 + i;
        want += tokens;
        let r = record(
            &customer,
            &format!("c{i}"),
            "completion",
            json!({"tokens": tokens, "model": "m"}),
        );
        payloads.push(r.clone());
        payloads.push(r);
    }
    payloads.push(record(&customer, "r1", "api", json!({})));
    payloads.push(b"not json".to_vec());
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", &config.kafka.brokers)
        .set("acks", "all")
        .set("enable.idempotence", "false")
        .create()
        .expect("producer");
    produce(
        &producer,
        &config.kafka.topic,
        &format!("{TENANT}/{customer}"),
        &payloads,
    )
    .await;

    let (stop_tx, stop) = tokio::sync::watch::channel(false);
    let feed = tokio::spawn(tally_quota::feed::run(
        q.clone(),
        config.clone(),
        stop.clone(),
    ));
    let used = |q: std::sync::Arc<tally_quota::Quota>, customer: String| async move {
        let d = ask(&q, &customer, "tokens", 0, false).await;
        assert_eq!(d.answered, Answered::Redis);
        d.windows.iter().map(|w| w.used).collect::<Vec<_>>()
    };
    let counted = eventually(Duration::from_secs(30), || {
        let (q, c) = (q.clone(), customer.clone());
        async move { used(q, c).await == vec![want.into(), want.into()] }
    })
    .await;
    assert!(
        counted,
        "day and billing-period counters hold {want}: {:?}",
        used(q.clone(), customer.clone()).await
    );
    let api = ask(&q, &customer, "api", 0, false).await;
    assert_eq!(
        api.used,
        0.into(),
        "events of a meter counted from checks are not fed"
    );

    // A second feed in a new group reads every record again: all recognised.
    let _ = stop_tx.send(true);
    feed.await.expect("feed task").expect("feed");
    let mut again = config.clone();
    again.quota.feed_group = unique("test-quota-feed-regroup");
    let (stop_tx, stop) = tokio::sync::watch::channel(false);
    let feed = tokio::spawn(tally_quota::feed::run(q.clone(), again, stop));
    // A new event after the replayed ones: once it counts, the replay is behind us.
    produce(
        &producer,
        &config.kafka.topic,
        &format!("{TENANT}/{customer}"),
        &[record(
            &customer,
            "late",
            "completion",
            json!({"tokens": 7, "model": "m"}),
        )],
    )
    .await;
    let settled = eventually(Duration::from_secs(30), || {
        let (q, c) = (q.clone(), customer.clone());
        async move { used(q, c).await == vec![(want + 7).into(), (want + 7).into()] }
    })
    .await;
    assert!(
        settled,
        "replayed records counted once: {:?}",
        used(q.clone(), customer.clone()).await
    );
    let _ = stop_tx.send(true);
    feed.await.expect("feed task").expect("feed");
    drop_database(&db).await;
}
