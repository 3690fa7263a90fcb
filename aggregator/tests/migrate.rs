//! Migrations against the real local ClickHouse, each run in a database of its own.

use tally_aggregator::migrate::{self, Error, Migration};
use tally_core::config::ClickHouseConfig;

fn config(name: &str) -> ClickHouseConfig {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_nanos();
    ClickHouseConfig {
        url: std::env::var("TALLY_CLICKHOUSE_URL")
            .unwrap_or_else(|_| "http://127.0.0.1:18123".into()),
        database: format!("test_{name}_{}_{nanos}", std::process::id()),
        user: "default".into(),
        password: String::new(),
    }
}

async fn drop_database(c: &ClickHouseConfig) {
    migrate::client(c)
        .with_database("default")
        .query(&format!("DROP DATABASE IF EXISTS {}", c.database))
        .execute()
        .await
        .expect("drop test database");
}

#[tokio::test]
async fn applies_every_migration_once_and_records_it() {
    let c = config("apply");
    let all = migrate::load(&migrate::default_dir()).expect("load");
    let first = migrate::apply(&c, &all).await.expect("first run");
    assert_eq!(first, all.iter().map(|m| m.version).collect::<Vec<_>>());
    let second = migrate::apply(&c, &all).await.expect("second run");
    assert!(
        second.is_empty(),
        "a second run applies nothing: {second:?}"
    );

    let db = migrate::client(&c);
    let recorded: Vec<u32> = db
        .query("SELECT version FROM schema_migrations ORDER BY version")
        .fetch_all()
        .await
        .expect("recorded");
    assert_eq!(recorded, first, "each version recorded exactly once");
    let columns: Vec<String> = db
        .query("SELECT name FROM system.columns WHERE database = ? AND table = 'events_raw' ORDER BY name")
        .bind(&c.database)
        .fetch_all()
        .await
        .expect("columns");
    for col in [
        "customer",
        "data",
        "id",
        "kafka_offset",
        "tenant",
        "time",
        "time_nanos",
        "type",
    ] {
        assert!(
            columns.iter().any(|x| x == col),
            "events_raw lacks {col}: {columns:?}"
        );
    }
    drop_database(&c).await;
}

#[tokio::test]
async fn an_edited_applied_migration_is_refused() {
    let c = config("edited");
    let all = migrate::load(&migrate::default_dir()).expect("load");
    migrate::apply(&c, &all).await.expect("apply");
    let mut edited: Vec<Migration> = all.clone();
    edited[0].checksum = "0".repeat(64);
    match migrate::apply(&c, &edited).await {
        Err(e @ Error::Changed { version: 1, .. }) => {
            assert!(!e.is_retryable());
            assert!(
                e.to_string().contains("changed after it was applied"),
                "{e}"
            );
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
    drop_database(&c).await;
}

#[tokio::test]
async fn a_new_migration_applies_on_top() {
    let c = config("newer");
    let mut all = migrate::load(&migrate::default_dir()).expect("load");
    migrate::apply(&c, &all).await.expect("apply");
    let next = all.last().map(|m| m.version + 1).expect("some migration");
    all.push(Migration {
        version: next,
        name: "extra".into(),
        checksum: "1".repeat(64),
        statements: vec![
            "CREATE TABLE IF NOT EXISTS extra (x UInt8) ENGINE = MergeTree ORDER BY x".into(),
        ],
    });
    assert_eq!(migrate::apply(&c, &all).await.expect("apply newer"), [next]);
    drop_database(&c).await;
}

#[tokio::test]
async fn unreachable_clickhouse_is_a_retryable_error() {
    let mut c = config("down");
    c.url = "http://127.0.0.1:1".into();
    let all = migrate::load(&migrate::default_dir()).expect("load");
    let e = migrate::apply(&c, &all)
        .await
        .expect_err("nothing listens on port 1");
    assert!(e.is_retryable(), "{e:?}");
}

#[tokio::test]
async fn a_migration_killed_before_its_record_finishes_next_time() {
    let c = config("killed");
    let all = migrate::load(&migrate::default_dir()).expect("load");
    migrate::apply(&c, &all).await.expect("apply");
    // As if every statement had run and the process died before recording any of it:
    // CREATE … IF NOT EXISTS and single-column ADD COLUMN statements run again cleanly.
    let db = migrate::client(&c);
    db.query("TRUNCATE TABLE schema_migrations")
        .execute()
        .await
        .expect("forget the records");
    let again = migrate::apply(&c, &all).await.expect("apply again");
    assert_eq!(again, all.iter().map(|m| m.version).collect::<Vec<_>>());
    // A statement that fails for another reason still fails.
    let mut broken = all.clone();
    broken.push(Migration {
        version: all.last().map(|m| m.version + 1).expect("some migration"),
        name: "broken".into(),
        checksum: "2".repeat(64),
        statements: vec!["ALTER TABLE no_such_table ADD COLUMN x UInt8".into()],
    });
    migrate::apply(&c, &broken)
        .await
        .expect_err("a missing table is an error");
    drop_database(&c).await;
}
