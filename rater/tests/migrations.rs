//! Plan-version migrations against the real local ClickHouse and Kafka broker, each test in a
//! database and topic of its own: preview counts, exactly the matching subscriptions moved,
//! next-period and at-once moves as the fold sees them, resuming after a simulated kill
//! without writing anything twice, a failed publish repeated by a rerun, a notification
//! chunk read back from the topic, the CLI, and (ignored by default) a million subscriptions.

mod common;

use std::collections::BTreeMap;
use std::time::Instant;

use common::{catalog, kafka, read_topic, repo, unique, Db};
use serde_json::Value;
use tally_rater::migration::Effective;
use tally_rater::store::{MigrationState, RunOptions, RunResult, SubscriptionStore};
use tally_rater::subscription::{NewChange, Timeline};
use tally_rater::{Error, MigrationSpec, Notifier};
use time::macros::datetime;
use time::OffsetDateTime;

impl Db {
    /// Rows per customer (all kinds), and the migration's rows per customer.
    async fn rows(&self, migration: &str) -> (BTreeMap<String, u64>, BTreeMap<String, u64>) {
        let all: Vec<(String, u64)> = self
            .client
            .query("SELECT customer, count() FROM subscription_changes GROUP BY customer")
            .fetch_all()
            .await
            .expect("count");
        let mine: Vec<(String, u64)> = self
            .client
            .query(
                "SELECT customer, count() FROM subscription_changes WHERE migration_id = ? \
                 GROUP BY customer",
            )
            .bind(migration)
            .fetch_all()
            .await
            .expect("count");
        (all.into_iter().collect(), mine.into_iter().collect())
    }
}

const T: &str = "acme";
const NOW: OffsetDateTime = datetime!(2026-03-10 12:00 UTC);

async fn subscribe(
    store: &SubscriptionStore,
    customer: &str,
    plan: &str,
    version: u32,
    start: OffsetDateTime,
) {
    store
        .record(
            &catalog(),
            NewChange::create(T, customer, plan, start).version(version),
        )
        .await
        .expect("subscribed");
}

async fn timeline(store: &SubscriptionStore, customer: &str) -> Timeline {
    Timeline::new(customer, store.history(T, customer).await.expect("history"))
}

fn notifier(topic: &str) -> Notifier {
    Notifier::new(&kafka(), topic).expect("producer")
}

#[tokio::test]
async fn moves_exactly_the_matching_subscriptions_and_notifies() {
    let db = Db::new("matching").await;
    let store = db.store();
    let topic = unique("entitlements");
    // a1, a2 on pro v1 (anchors on the 15th and the 31st); b1 already on v2; s1 on another
    // plan; f1 on pro v1 but filtered out; x1 cancelled.
    subscribe(&store, "a1", "pro", 1, datetime!(2025-01-15 0:00 UTC)).await;
    subscribe(&store, "a2", "pro", 1, datetime!(2025-01-31 9:00 UTC)).await;
    subscribe(&store, "b1", "pro", 2, datetime!(2025-01-01 0:00 UTC)).await;
    subscribe(&store, "s1", "starter", 1, datetime!(2025-01-01 0:00 UTC)).await;
    subscribe(&store, "f1", "pro", 1, datetime!(2025-01-01 0:00 UTC)).await;
    subscribe(&store, "x1", "pro", 1, datetime!(2025-01-01 0:00 UTC)).await;
    store
        .record(
            &catalog(),
            NewChange::cancel(T, "x1", datetime!(2026-02-01 0:00 UTC)),
        )
        .await
        .expect("cancelled");
    let (before, _) = db.rows("m1").await;

    let mut spec = MigrationSpec::new("m1", T, "pro", 2);
    spec.customers = Some(["a1", "a2", "b1", "s1", "x1"].map(String::from).to_vec());
    spec.actor = "ops".into();
    spec.reason = "pro v2 for everyone".into();

    let preview = store
        .preview_migration(&catalog(), &spec, NOW)
        .await
        .expect("preview");
    assert_eq!(preview.total, 2);
    assert_eq!(preview.groups.len(), 1);
    let g = &preview.groups[0];
    assert_eq!((g.from_version, g.to_version, g.count), (1, 2, 2));
    assert_eq!(
        (g.effective_min, g.effective_max),
        (
            Some(datetime!(2026-03-15 0:00 UTC)),
            Some(datetime!(2026-03-31 9:00 UTC))
        )
    );
    assert_eq!(preview.skipped.get("already_current"), Some(&1));
    // The preview wrote nothing.
    assert_eq!(db.rows("m1").await.0, before);
    assert!(store
        .migration_record(T, "m1")
        .await
        .expect("record")
        .is_none());

    let report = store
        .run_migration(
            &catalog(),
            &spec,
            &notifier(&topic),
            RunOptions::default(),
            NOW,
        )
        .await
        .expect("run");
    assert_eq!(report.result, RunResult::Done);
    assert_eq!(
        (report.written, report.already_written, report.published),
        (2, 0, 1)
    );

    let (after, mine) = db.rows("m1").await;
    assert_eq!(mine, BTreeMap::from([("a1".into(), 1), ("a2".into(), 1)]));
    for c in ["b1", "s1", "f1", "x1"] {
        assert_eq!(after[c], before[c], "{c} untouched");
    }

    // Next period: still v1 until each one's own period ends, then v2, anchor kept.
    let a1 = timeline(&store, "a1").await;
    assert_eq!(
        a1.segments(
            datetime!(2026-03-01 0:00 UTC),
            datetime!(2026-04-01 0:00 UTC)
        )
        .iter()
        .map(|s| (s.from, s.to, s.version))
        .collect::<Vec<_>>(),
        [
            (
                datetime!(2026-03-01 0:00 UTC),
                datetime!(2026-03-15 0:00 UTC),
                1
            ),
            (
                datetime!(2026-03-15 0:00 UTC),
                datetime!(2026-04-01 0:00 UTC),
                2
            ),
        ]
    );
    let m = a1.find("migration-m1-a1").expect("the migrate change");
    assert_eq!((m.actor.as_str(), m.migration_id.as_str()), ("ops", "m1"));
    assert_eq!(m.billing_anchor, datetime!(2025-01-15 0:00 UTC));
    let a2 = timeline(&store, "a2").await;
    assert_eq!(a2.status(NOW).expect("status").version, 1);
    assert_eq!(
        a2.status(datetime!(2026-03-31 9:00 UTC))
            .expect("status")
            .version,
        2
    );

    // The audit record.
    let record = store
        .migration_record(T, "m1")
        .await
        .expect("record")
        .expect("recorded");
    assert_eq!(record.state, MigrationState::Notified);
    assert_eq!((record.affected, record.as_of), (2, NOW));
    assert_eq!(
        (record.actor.as_str(), record.reason.as_str()),
        ("ops", "pro v2 for everyone")
    );

    // The chunk on the topic: both customers and the v1 → v2 diff.
    let messages = read_topic(&topic, 1);
    let (key, msg) = &messages[0];
    assert_eq!(key, "acme/pro");
    assert_eq!(msg["migration_id"], "m1");
    assert_eq!(
        (msg["from_version"].as_u64(), msg["to_version"].as_u64()),
        (Some(1), Some(2))
    );
    assert_eq!(msg["customers"], serde_json::json!(["a1", "a2"]));
    assert_eq!(msg["effective_from_min"], "2026-03-15T00:00:00Z");
    assert_eq!(
        msg["changes"]["features"],
        serde_json::json!([{"feature": "audit_log", "old": false, "new": true}])
    );
    assert_eq!(msg["changes"]["limits"].as_array().map(Vec::len), Some(2));

    // Done: a rerun writes and sends nothing.
    let again = store
        .run_migration(
            &catalog(),
            &spec,
            &notifier(&topic),
            RunOptions::default(),
            NOW,
        )
        .await
        .expect("rerun");
    assert_eq!(again.result, RunResult::AlreadyDone);
    assert_eq!((again.written, again.published), (0, 0));
    assert_eq!(db.rows("m1").await.1, mine);

    // The same id with another spec is refused, naming what differs.
    let other = MigrationSpec {
        effective: Effective::At(NOW),
        ..spec.clone()
    };
    assert!(matches!(
        store
            .run_migration(
                &catalog(),
                &other,
                &notifier(&topic),
                RunOptions::default(),
                NOW
            )
            .await,
        Err(Error::MigrationIdReused {
            field: "effective",
            ..
        })
    ));
}

#[tokio::test]
async fn at_once_moves_everyone_at_the_instant() {
    let db = Db::new("at_once").await;
    let store = db.store();
    subscribe(&store, "a1", "pro", 1, datetime!(2025-01-15 0:00 UTC)).await;
    subscribe(&store, "a2", "pro", 1, datetime!(2025-02-03 0:00 UTC)).await;
    let mut spec = MigrationSpec::new("now", T, "pro", 2);
    spec.effective = Effective::At(NOW);
    let report = store
        .run_migration(
            &catalog(),
            &spec,
            &notifier(&unique("entitlements")),
            RunOptions::default(),
            NOW,
        )
        .await
        .expect("run");
    assert_eq!(report.written, 2);
    for c in ["a1", "a2"] {
        let t = timeline(&store, c).await;
        let s = t.status(NOW).expect("status");
        assert_eq!((s.version, s.since), (2, NOW));
        // The period containing the instant is split at it.
        let pieces = t.segments(
            datetime!(2026-03-01 0:00 UTC),
            datetime!(2026-03-20 0:00 UTC),
        );
        assert_eq!(pieces.len(), 2, "{c}");
        assert_eq!(
            (pieces[0].to, pieces[1].from, pieces[1].version),
            (NOW, NOW, 2)
        );
    }
}

#[tokio::test]
async fn resumes_after_a_kill_without_writing_twice() {
    let db = Db::new("resume").await;
    let store = db.store();
    // 25 subscriptions inserted in one statement.
    db.client
        .query(
            "INSERT INTO subscription_changes SELECT 'acme', concat('c', toString(number)), \
             'create', 'create', toDateTime('2025-01-01 00:00:00', 'UTC'), \
             toDateTime('2025-01-01 00:00:00', 'UTC'), 'pro', 1, \
             toDateTime('2025-01-01 00:00:00', 'UTC'), 'seed', '', '' FROM numbers(25)",
        )
        .execute()
        .await
        .expect("seeded");
    let spec = MigrationSpec::new("resume", T, "pro", 2);
    let topic = unique("entitlements");
    let kill = RunOptions {
        batch_rows: 4,
        stop_after: Some(10),
    };
    let first = store
        .run_migration(&catalog(), &spec, &notifier(&topic), kill, NOW)
        .await
        .expect("partial run");
    assert_eq!((first.result, first.written), (RunResult::Interrupted, 10));
    let record = store
        .migration_record(T, "resume")
        .await
        .expect("record")
        .expect("started");
    assert_eq!(record.state, MigrationState::Started);
    assert_eq!(db.rows("resume").await.1.len(), 10);

    // Resumed an hour later: judged at the recorded instant, the rest written once.
    let later = NOW + time::Duration::hours(1);
    let second = store
        .run_migration(
            &catalog(),
            &spec,
            &notifier(&topic),
            RunOptions::default(),
            later,
        )
        .await
        .expect("resumed");
    assert_eq!(second.result, RunResult::Done);
    assert_eq!((second.written, second.already_written), (15, 10));
    assert_eq!(second.preview.as_of, NOW);
    let (all, mine) = db.rows("resume").await;
    assert_eq!(mine.len(), 25);
    assert!(mine.values().all(|n| *n == 1), "{mine:?}");
    assert!(all.values().all(|n| *n == 2), "{all:?}");
    let s = timeline(&store, "c7")
        .await
        .status(datetime!(2026-04-01 0:00 UTC))
        .expect("status");
    assert_eq!(s.version, 2);
}

#[tokio::test]
async fn a_failed_publish_is_repeated_by_a_rerun() {
    let db = Db::new("publish").await;
    let store = db.store();
    subscribe(&store, "a1", "pro", 1, datetime!(2025-01-15 0:00 UTC)).await;
    let spec = MigrationSpec::new("pub", T, "pro", 2);
    // Nothing listens on port 1.
    let mut dead = kafka();
    dead.brokers = "127.0.0.1:1".into();
    dead.message_timeout_ms = 1000;
    let down = Notifier::new(&dead, &unique("entitlements")).expect("producer");
    let e = store
        .run_migration(&catalog(), &spec, &down, RunOptions::default(), NOW)
        .await
        .expect_err("publish fails");
    assert!(e.is_retryable(), "{e}");
    assert!(e.to_string().contains("run it again"), "{e}");
    let record = store
        .migration_record(T, "pub")
        .await
        .expect("record")
        .expect("written");
    assert_eq!(record.state, MigrationState::Written);

    let topic = unique("entitlements");
    let rerun = store
        .run_migration(
            &catalog(),
            &spec,
            &notifier(&topic),
            RunOptions::default(),
            NOW,
        )
        .await
        .expect("rerun");
    assert_eq!(
        (rerun.result, rerun.written, rerun.published),
        (RunResult::Done, 0, 1)
    );
    assert_eq!(db.rows("pub").await.1["a1"], 1);
    let messages = read_topic(&topic, 1);
    assert_eq!(messages[0].1["customers"], serde_json::json!(["a1"]));
}

#[tokio::test]
async fn cli_previews_and_runs() {
    let db = Db::new("cli").await;
    subscribe(&db.store(), "a1", "pro", 1, datetime!(2025-01-15 0:00 UTC)).await;
    let run = |extra: &[&str]| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_tally-rater"))
            .current_dir(repo(""))
            .env("TALLY_CLICKHOUSE_URL", &db.config.url)
            .env("TALLY_CLICKHOUSE_DATABASE", &db.config.database)
            .args([
                "--json",
                "migrate-plan",
                "--tenant",
                T,
                "--plan",
                "pro",
                "--to-version",
                "2",
                "--id",
                "cli",
                "--effective",
                "2026-03-10T12:00:00Z",
            ])
            .args(extra)
            .output()
            .expect("runs");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice::<Value>(&out.stdout).expect("json")
    };
    let preview = run(&["--preview"]);
    assert_eq!(preview["total"], 1);
    assert_eq!(preview["groups"][0]["count"], 1);
    let done = run(&[]);
    assert_eq!(done["report"]["result"], "done");
    assert_eq!(done["report"]["written"], 1);
    assert!(done["seconds"].as_f64().is_some());
    assert_eq!(run(&[])["report"]["result"], "already_done");
}

/// A million subscriptions created by one INSERT … SELECT, then migrated; prints the wall
/// time (BENCHMARKS.md). `cargo test -p tally-rater --release --test migrations -- --ignored
/// --nocapture`.
#[tokio::test]
#[ignore]
async fn a_million_subscriptions() {
    const N: u64 = 1_000_000;
    let db = Db::new("million").await;
    let store = db.store();
    db.client
        .query(&format!(
            "INSERT INTO subscription_changes SELECT 'acme', concat('cust-', toString(number)), \
             concat('create-', toString(number)), 'create', \
             toDateTime('2025-01-01 00:00:00', 'UTC') + (number % 28) * 86400, \
             toDateTime('2025-01-01 00:00:00', 'UTC'), 'pro', 1, \
             toDateTime('2025-01-01 00:00:00', 'UTC') + (number % 28) * 86400, \
             'seed', '', '' FROM numbers({N})"
        ))
        .execute()
        .await
        .expect("seeded");
    let spec = MigrationSpec::new("big", T, "pro", 2);
    let topic = unique("entitlements");
    let started = Instant::now();
    let report = store
        .run_migration(
            &catalog(),
            &spec,
            &notifier(&topic),
            RunOptions::default(),
            NOW,
        )
        .await
        .expect("run");
    let seconds = started.elapsed().as_secs_f64();
    eprintln!(
        "migrated {} subscriptions in {seconds:.2} s ({} notification messages)",
        report.written, report.published
    );
    assert_eq!(report.written, N);
    assert_eq!(report.published, 100);
    let (_, mine) = db.rows("big").await;
    assert_eq!(mine.len() as u64, N);
}
