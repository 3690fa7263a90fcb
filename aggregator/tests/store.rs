//! The store's view of a flush that failed on the client's side: until ClickHouse has
//! ended the query, it is not settled (it may still land), against the real local server.

use std::time::{Duration, Instant};

use tally_aggregator::migrate;
use tally_aggregator::store::Store;
use tally_core::config::ClickHouseConfig;

fn config() -> ClickHouseConfig {
    ClickHouseConfig {
        url: std::env::var("TALLY_CLICKHOUSE_URL")
            .unwrap_or_else(|_| "http://127.0.0.1:18123".into()),
        database: "default".into(),
        user: "default".into(),
        password: String::new(),
    }
}

#[tokio::test]
async fn a_query_the_client_left_is_unsettled_until_the_server_ends_it() {
    let c = config();
    let store = Store::new(&c, Duration::from_secs(10));
    let id = format!(
        "tally-test-settled-{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .expect("clock")
            .as_nanos()
    );
    assert!(store.settled(&id).await.expect("asks"), "nothing runs yet");

    // A query the server keeps running for 3 s, named as a flush names its INSERT.
    let client = migrate::client(&c).with_setting("query_id", id.clone());
    let started = Instant::now();
    let running = tokio::spawn(async move {
        client
            .query("SELECT sleep(3)")
            .fetch_one::<u8>()
            .await
            .expect("sleeps")
    });
    let deadline = Instant::now() + Duration::from_secs(10);
    while store.settled(&id).await.expect("asks") {
        assert!(
            Instant::now() < deadline,
            "the server never showed query {id}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Seen running: it stays unsettled for as long as the server runs it.
    assert!(!running.is_finished());
    while !store.settled(&id).await.expect("asks") {
        assert!(Instant::now() < deadline, "query {id} never ended");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        started.elapsed() >= Duration::from_secs(2),
        "settled after {:?}, before the query could have ended",
        started.elapsed()
    );
    tokio::time::timeout(Duration::from_secs(5), running)
        .await
        .expect("the client has its answer")
        .expect("task");
}
