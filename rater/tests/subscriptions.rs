//! Subscriptions against the real local ClickHouse, each test in a database of its own
//! (created, migrated, dropped at the end; `TALLY_TEST_KEEP=1` keeps it): the store's
//! round trip and audit trail, refusals that write nothing, idempotent change ids, batch
//! segments for 1,000 customers compared with the pure fold, and the CLI as a subprocess.

mod common;

use std::collections::BTreeMap;
use std::process::Output;
use std::time::Duration;

use common::{catalog, repo, Db};
use tally_rater::store::Recorded;
use tally_rater::subscription::{Admission, Change, ChangeKind, NewChange, State, Timeline};
use tally_rater::{Catalog, Error};
use time::format_description::well_known::Rfc3339;
use time::macros::datetime;
use time::OffsetDateTime;

impl Db {
    async fn rows(&self) -> u64 {
        self.client
            .query("SELECT count() FROM subscription_changes")
            .fetch_one::<u64>()
            .await
            .expect("count")
    }
}

fn written(r: tally_rater::Result<Recorded>) -> Change {
    match r {
        Ok(Recorded::Written(c)) => c,
        other => panic!("expected a write, got {other:?}"),
    }
}

#[tokio::test]
async fn create_upgrade_cancel_round_trip_with_audit_trail() {
    let db = Db::new("round_trip").await;
    let store = db.store();
    let plans = catalog();
    let before = OffsetDateTime::now_utc().replace_nanosecond(0).expect("ns");
    written(
        store
            .record(
                &plans,
                NewChange::create("demo", "c1", "pro", datetime!(2025-01-01 0:00 UTC))
                    .version(1)
                    .actor("alice")
                    .reason("signed up"),
            )
            .await,
    );
    written(
        store
            .record(
                &plans,
                NewChange::change("demo", "c1", "pro", datetime!(2025-02-15 0:00 UTC))
                    .actor("bob")
                    .reason("needs more seats"),
            )
            .await,
    );
    written(
        store
            .record(
                &plans,
                NewChange::cancel("demo", "c1", datetime!(2025-04-01 0:00 UTC))
                    .actor("carol")
                    .reason("moved to a competitor"),
            )
            .await,
    );
    let after = OffsetDateTime::now_utc();

    let history = store.history("demo", "c1").await.expect("history");
    let trail: Vec<_> = history
        .iter()
        .map(|c| {
            (
                c.kind,
                c.effective_at,
                c.plan.as_str(),
                c.version,
                c.actor.as_str(),
                c.reason.as_str(),
            )
        })
        .collect();
    assert_eq!(
        trail,
        [
            (
                ChangeKind::Create,
                datetime!(2025-01-01 0:00 UTC),
                "pro",
                1,
                "alice",
                "signed up"
            ),
            (
                ChangeKind::Change,
                datetime!(2025-02-15 0:00 UTC),
                "pro",
                2,
                "bob",
                "needs more seats"
            ),
            (
                ChangeKind::Cancel,
                datetime!(2025-04-01 0:00 UTC),
                "",
                0,
                "carol",
                "moved to a competitor"
            ),
        ]
    );
    for c in &history {
        assert!(before <= c.recorded_at && c.recorded_at <= after, "{c:?}");
        assert_eq!(c.billing_anchor, datetime!(2025-01-01 0:00 UTC));
        assert_eq!((c.tenant.as_str(), c.customer.as_str()), ("demo", "c1"));
    }

    let march = store
        .list("demo", datetime!(2025-03-01 0:00 UTC))
        .await
        .expect("list");
    assert_eq!(march.len(), 1);
    assert_eq!(
        (march[0].state, march[0].plan.as_str(), march[0].version),
        (State::Active, "pro", 2)
    );
    assert_eq!(march[0].since, datetime!(2025-02-15 0:00 UTC));
    let may = store
        .list("demo", datetime!(2025-05-01 0:00 UTC))
        .await
        .expect("list");
    assert_eq!(may[0].state, State::Cancelled);

    let customers = vec!["c1".to_owned()];
    let segments = store
        .segments(
            "demo",
            &customers,
            datetime!(2025-02-01 0:00 UTC),
            datetime!(2025-03-01 0:00 UTC),
        )
        .await
        .expect("segments");
    let pieces: Vec<_> = segments["c1"]
        .iter()
        .map(|s| (s.from, s.to, s.version))
        .collect();
    assert_eq!(
        pieces,
        [
            (
                datetime!(2025-02-01 0:00 UTC),
                datetime!(2025-02-15 0:00 UTC),
                1
            ),
            (
                datetime!(2025-02-15 0:00 UTC),
                datetime!(2025-03-01 0:00 UTC),
                2
            ),
        ]
    );
    assert_eq!(
        store
            .customers_with_subscriptions(
                "demo",
                datetime!(2025-03-01 0:00 UTC),
                datetime!(2025-04-01 0:00 UTC)
            )
            .await
            .expect("customers"),
        ["c1"]
    );
    assert!(store
        .customers_with_subscriptions(
            "demo",
            datetime!(2025-04-01 0:00 UTC),
            datetime!(2025-05-01 0:00 UTC)
        )
        .await
        .expect("customers")
        .is_empty());
    // Tenants do not see each other's customers.
    assert!(store
        .history("acme", "c1")
        .await
        .expect("history")
        .is_empty());
}

#[tokio::test]
async fn refused_changes_write_nothing() {
    let db = Db::new("refusals").await;
    let store = db.store();
    let plans = catalog();
    written(
        store
            .record(
                &plans,
                NewChange::create("demo", "c1", "pro", datetime!(2025-01-10 0:00 UTC)).version(1),
            )
            .await,
    );
    assert_eq!(db.rows().await, 1);

    let refusals: Vec<(NewChange, &str)> = vec![
        (
            NewChange::change("demo", "c2", "pro", datetime!(2025-02-01 0:00 UTC)),
            "no subscription for customer \"c2\"",
        ),
        (
            NewChange::cancel("demo", "c2", datetime!(2025-02-01 0:00 UTC)),
            "no subscription for customer \"c2\"",
        ),
        (
            NewChange::create("demo", "c1", "starter", datetime!(2025-03-01 0:00 UTC)),
            "customer \"c1\" already has a subscription: plan \"pro\" v1 since \
             2025-01-10T00:00:00Z",
        ),
        (
            NewChange::change("demo", "c1", "pro", datetime!(2025-01-09 12:00 UTC)),
            "customer \"c1\": a change effective at 2025-01-09T12:00:00Z is before the \
             subscription starts at 2025-01-10T00:00:00Z",
        ),
        (
            NewChange::change("demo", "c1", "gold", datetime!(2025-02-01 0:00 UTC)).version(1),
            "plan \"gold\" v1: no such plan in the catalog",
        ),
        (
            NewChange::change("demo", "c1", "pro", datetime!(2025-02-01 0:00 UTC)).version(9),
            "plan \"pro\" v9: no such version in the catalog (latest is v2)",
        ),
    ];
    for (change, message) in refusals {
        let e = store.record(&plans, change).await.expect_err("refused");
        assert_eq!(e.to_string(), message);
        assert!(!e.is_retryable());
        assert_eq!(db.rows().await, 1, "after refusing: {message}");
    }

    written(
        store
            .record(
                &plans,
                NewChange::cancel("demo", "c1", datetime!(2025-04-01 0:00 UTC)),
            )
            .await,
    );
    assert_eq!(db.rows().await, 2);
    for change in [
        NewChange::change("demo", "c1", "starter", datetime!(2025-05-01 0:00 UTC)),
        NewChange::cancel("demo", "c1", datetime!(2025-05-01 0:00 UTC)),
    ] {
        let e = store.record(&plans, change).await.expect_err("refused");
        assert!(
            matches!(
                e,
                Error::AfterCancel {
                    cancelled_at,
                    effective_at,
                    ..
                } if cancelled_at == datetime!(2025-04-01 0:00 UTC)
                    && effective_at == datetime!(2025-05-01 0:00 UTC)
            ),
            "{e}"
        );
        assert_eq!(db.rows().await, 2);
    }
}

#[tokio::test]
async fn a_change_id_is_recorded_once() {
    let db = Db::new("idempotent").await;
    let store = db.store();
    let plans = catalog();
    let signup = NewChange::create("demo", "c1", "starter", datetime!(2025-01-01 0:00 UTC))
        .actor("api")
        .change_id("signup-42");
    let first = written(store.record(&plans, signup.clone()).await);
    match store.record(&plans, signup.clone()).await {
        Ok(Recorded::AlreadyRecorded(c)) => assert_eq!(c, first),
        other => panic!("expected already recorded, got {other:?}"),
    }
    assert_eq!(db.rows().await, 1);

    // Without a client id, the same request derives the same id.
    let upgrade = NewChange::change("demo", "c1", "pro", datetime!(2025-02-01 0:00 UTC));
    let up = written(store.record(&plans, upgrade.clone()).await);
    assert!(matches!(
        store.record(&plans, upgrade).await,
        Ok(Recorded::AlreadyRecorded(c)) if c == up
    ));
    assert_eq!(db.rows().await, 2);

    // The id names one change: other content under it is refused.
    let mut other = signup;
    other.plan = Some("pro".into());
    assert!(matches!(
        store.record(&plans, other).await,
        Err(Error::ChangeIdReused { ref change_id, .. }) if change_id == "signup-42"
    ));
    assert_eq!(db.rows().await, 2);

    // Two writers racing the same change may both insert; readers count it once.
    let cancel = NewChange::cancel("demo", "c1", datetime!(2025-03-01 0:00 UTC)).change_id("bye");
    let (a, b) = tokio::join!(
        store.record(&plans, cancel.clone()),
        store.record(&plans, cancel)
    );
    assert_eq!(a.expect("first").change().change_id, "bye");
    assert_eq!(b.expect("second").change().change_id, "bye");
    let rows = db.rows().await;
    assert!((3..=4).contains(&rows), "{rows} rows");
    let history = store.history("demo", "c1").await.expect("history");
    assert_eq!(history.len(), 3);
    assert_eq!(history[2].change_id, "bye");
}

/// A deterministic pseudo-random sequence (xorshift).
struct Rng(u64);

impl Rng {
    fn next(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }
}

/// Valid histories for `n` customers, admitted one change at a time through the pure
/// rules (refused attempts are dropped): creates, plan changes, migrations, cancels and
/// re-creates at any second of 2025's first half, many inside an hour, some at one instant.
fn histories(plans: &Catalog, n: usize) -> BTreeMap<String, Timeline> {
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let base = datetime!(2025-01-01 0:00 UTC);
    let versions = [("pro", 1), ("pro", 2), ("starter", 1)];
    let mut out = BTreeMap::new();
    for i in 0..n {
        let customer = format!("cust-{i:05}");
        let mut timeline = Timeline::new(&customer, []);
        if i % 10 != 0 {
            for step in 0..6u64 {
                let at = base + Duration::from_secs(rng.next(181 * 86_400));
                let (plan, version) = versions[rng.next(3) as usize];
                let new = match (step, rng.next(5)) {
                    (0, _) | (_, 0) => NewChange::create("demo", &customer, plan, at),
                    (_, 1) => NewChange::cancel("demo", &customer, at),
                    (_, 2) => NewChange::migrate("demo", &customer, plan, at, "m-2025"),
                    _ => NewChange::change("demo", &customer, plan, at),
                };
                let new = match new.kind {
                    ChangeKind::Cancel => new,
                    _ => new.version(version),
                }
                .actor("generator");
                let recorded = datetime!(2026-01-01 0:00 UTC) + Duration::from_secs(step);
                if let Ok(Admission::New(c)) = timeline.admit(new, plans, recorded) {
                    let mut all = timeline.into_changes();
                    all.push(c);
                    timeline = Timeline::new(&customer, all);
                }
            }
        }
        out.insert(customer, timeline);
    }
    out
}

/// One INSERT of every change, written as SQL text (kind by name, times as unix seconds),
/// independently of the store's row encoding.
async fn insert_all(db: &Db, changes: impl Iterator<Item = Change>) {
    let mut sql = String::from(
        "INSERT INTO subscription_changes (tenant, customer, change_id, kind, effective_at, \
         recorded_at, plan, version, billing_anchor, actor, reason, migration_id) VALUES ",
    );
    for (i, c) in changes.enumerate() {
        if i > 0 {
            sql.push(',');
        }
        // Generated names hold no quote or backslash.
        sql.push_str(&format!(
            "('{}', '{}', '{}', '{}', {}, {}, '{}', {}, {}, '{}', '{}', '{}')",
            c.tenant,
            c.customer,
            c.change_id,
            c.kind,
            c.effective_at.unix_timestamp(),
            c.recorded_at.unix_timestamp(),
            c.plan,
            c.version,
            c.billing_anchor.unix_timestamp(),
            c.actor,
            c.reason,
            c.migration_id
        ));
    }
    db.client.query(&sql).execute().await.expect("bulk insert");
}

#[tokio::test]
async fn batch_segments_equal_the_fold_per_customer() {
    let db = Db::new("batch").await;
    let store = db.store();
    let plans = catalog();
    let mut expected = histories(&plans, 1_000);
    let total: usize = expected.values().map(|t| t.changes().len()).sum();
    insert_all(
        &db,
        expected.values().flat_map(|t| t.changes().iter().cloned()),
    )
    .await;
    assert_eq!(db.rows().await, total as u64);
    assert!(total > 2_000, "{total} changes");

    // A few more through the store itself, and their effect on the fold.
    for customer in ["cust-00000", "cust-00010", "cust-00020"] {
        let c = written(
            store
                .record(
                    &plans,
                    NewChange::create("demo", customer, "starter", datetime!(2025-03-10 10:30 UTC)),
                )
                .await,
        );
        let timeline = expected.get_mut(customer).expect("generated");
        *timeline = Timeline::new(customer, [c]);
    }

    // An invoice run's batch size: 10,000 customers, most of them without a log, with
    // long names, so the statement is well past ClickHouse's default 256 KiB limit.
    let mut customers: Vec<String> = expected.keys().cloned().collect();
    customers.push("never-seen".into());
    customers.extend((0..9_000).map(|i| format!("{i:06}-{}", "x".repeat(60))));
    for (from, to) in [
        (
            datetime!(2025-03-01 0:00 UTC),
            datetime!(2025-04-01 0:00 UTC),
        ),
        (
            datetime!(2025-01-15 8:20:05 UTC),
            datetime!(2025-06-30 23:59:59 UTC),
        ),
    ] {
        let batch = store
            .segments("demo", &customers, from, to)
            .await
            .expect("segments");
        assert_eq!(batch.len(), customers.len());
        assert!(batch["never-seen"].is_empty());
        assert!(batch.values().filter(|s| !s.is_empty()).count() <= expected.len());
        let mut with_segments = 0;
        for (customer, timeline) in &expected {
            let fold = timeline.segments(from, to);
            with_segments += usize::from(!fold.is_empty());
            assert_eq!(batch[customer], fold, "{customer} over [{from}, {to})");
        }
        assert!(
            with_segments > 300,
            "{with_segments} customers with segments"
        );

        let listed = store
            .customers_with_subscriptions("demo", from, to)
            .await
            .expect("customers");
        let folded: Vec<&String> = expected
            .iter()
            .filter(|(_, t)| !t.segments(from, to).is_empty())
            .map(|(c, _)| c)
            .collect();
        assert_eq!(listed.iter().collect::<Vec<_>>(), folded);
    }

    let at = datetime!(2025-04-15 12:00 UTC);
    let statuses = store.list("demo", at).await.expect("list");
    let folded: Vec<_> = expected.values().filter_map(|t| t.status(at)).collect();
    assert_eq!(statuses, folded);
}

async fn cli(db: &Db, args: &[&str]) -> Output {
    let config = repo("config/tally.dev.toml");
    let plans = repo("config/plans");
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_tally-rater"));
    cmd.arg("--config")
        .arg(&config)
        .arg("--plans")
        .arg(&plans)
        .args(args)
        .env_remove("TALLY_CONFIG")
        .env("TALLY_CLICKHOUSE_URL", &db.config.url)
        .env("TALLY_CLICKHOUSE_DATABASE", &db.config.database)
        .env("TALLY_SCHEMAS", repo("schemas/clickhouse"))
        .kill_on_drop(true);
    tokio::time::timeout(Duration::from_secs(60), cmd.output())
        .await
        .expect("tally-rater finished in 60 s")
        .expect("run tally-rater")
}

fn text(out: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test]
async fn cli_subscribe_and_history() {
    let db = Db::new("cli").await;

    let out = cli(&db, &["migrate"]).await;
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stdout}{stderr}");
    assert!(stdout.contains("applied now: []"), "{stdout}");

    let subscribe = [
        "subscribe",
        "--tenant",
        "demo",
        "--customer",
        "cli-1",
        "--plan",
        "pro",
        "--start",
        "2025-01-01T00:00:00Z",
        "--actor",
        "ops@example.com",
        "--reason",
        "first order",
    ];
    let out = cli(&db, &subscribe).await;
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stdout}{stderr}");
    assert!(
        stdout.starts_with("recorded: subscription to pro v2"),
        "{stdout}"
    );
    let out = cli(&db, &subscribe).await;
    let (stdout, _) = text(&out);
    assert!(out.status.success());
    assert!(stdout.starts_with("already recorded"), "{stdout}");

    let out = cli(
        &db,
        &[
            "--json",
            "history",
            "--tenant",
            "demo",
            "--customer",
            "cli-1",
        ],
    )
    .await;
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stdout}{stderr}");
    let lines: Vec<serde_json::Value> = stdout
        .lines()
        .map(|l| serde_json::from_str(l).expect("a JSON line"))
        .collect();
    assert_eq!(lines.len(), 1, "{stdout}");
    let c = &lines[0];
    assert_eq!(c["kind"], "create");
    assert_eq!(c["plan"], "pro");
    assert_eq!(c["version"], 2);
    assert_eq!(c["actor"], "ops@example.com");
    assert_eq!(c["reason"], "first order");
    assert_eq!(c["effective_at"], "2025-01-01T00:00:00Z");
    assert_eq!(c["billing_anchor"], "2025-01-01T00:00:00Z");
    let recorded = c["recorded_at"].as_str().expect("recorded_at");
    OffsetDateTime::parse(recorded, &Rfc3339).expect("RFC 3339");

    let out = cli(&db, &["history", "--tenant", "demo", "--customer", "cli-1"]).await;
    let (stdout, _) = text(&out);
    assert!(out.status.success());
    let table: Vec<&str> = stdout.lines().collect();
    assert_eq!(table.len(), 2, "{stdout}");
    assert!(table[0].starts_with("EFFECTIVE"), "{stdout}");
    for field in [
        "2025-01-01T00:00:00Z",
        "create",
        "pro v2",
        "ops@example.com",
        "first order",
    ] {
        assert!(table[1].contains(field), "{field} in {stdout}");
    }

    // Argument errors name the flag and exit 2; refusals exit 1 and say why.
    let out = cli(&db, &["subscribe", "--tenant", "demo", "--customer", "x"]).await;
    let (_, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("--plan"), "{stderr}");
    let out = cli(
        &db,
        &[
            "change",
            "--tenant",
            "demo",
            "--customer",
            "x",
            "--plan",
            "pro",
            "--at",
            "soon",
        ],
    )
    .await;
    let (_, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("--at: \"soon\""), "{stderr}");
    let out = cli(
        &db,
        &[
            "change",
            "--tenant",
            "demo",
            "--customer",
            "x",
            "--plan",
            "pro",
            "--at",
            "2025-02-01T00:00:00Z",
        ],
    )
    .await;
    let (_, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("no subscription for customer \"x\""),
        "{stderr}"
    );
    assert_eq!(db.rows().await, 1);
}

#[tokio::test]
async fn cli_invoice_preview_and_final() {
    let db = Db::new("cli_invoice").await;
    for args in [
        &[
            "subscribe",
            "--tenant",
            "demo",
            "--customer",
            "acme-co",
            "--plan",
            "starter",
            "--start",
            "2025-10-01T00:00:00Z",
        ][..],
        &[
            "change",
            "--tenant",
            "demo",
            "--customer",
            "acme-co",
            "--plan",
            "pro",
            "--version",
            "2",
            "--at",
            "2025-10-20T12:30:00Z",
        ][..],
    ] {
        let out = cli(&db, args).await;
        assert!(out.status.success(), "{:?}", text(&out));
    }
    let period = [
        "invoice",
        "--tenant",
        "demo",
        "--at",
        "2025-10-15T00:00:00Z",
    ];

    // A preview stores nothing and splits the period at the upgrade.
    let out = cli(&db, &[&period[..], &["--format", "csv"]].concat()).await;
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stdout}{stderr}");
    assert!(stdout.starts_with("customer,period_start,"), "{stdout}");
    assert!(stdout.contains(",0,starter,1,flat,platform,"), "{stdout}");
    assert!(stdout.contains(",1,pro,2,flat,platform,"), "{stdout}");

    // Final, twice: written once, then returned as stored, byte for byte.
    let final_run = [&period[..], &["--mode", "final"]].concat();
    let first = cli(&db, &final_run).await;
    let (json1, stderr) = text(&first);
    assert!(first.status.success(), "{json1}{stderr}");
    assert!(
        stderr.contains("1 invoices written, 0 already final"),
        "{stderr}"
    );
    let invoice: serde_json::Value = serde_json::from_str(json1.trim()).expect("one JSON invoice");
    assert_eq!(invoice["customer"], "acme-co");
    assert_eq!(invoice["period_start"], "2025-10-01T00:00:00Z");
    let second = cli(&db, &final_run).await;
    let (json2, stderr) = text(&second);
    assert!(
        stderr.contains("0 invoices written, 1 already final"),
        "{stderr}"
    );
    assert_eq!(json1, json2);

    // Without --at, a final run takes each customer's latest period closed a day ago or
    // more: for acme-co, anchored on the 1st, the month before the one 24 hours ago.
    let out = cli(&db, &["invoice", "--tenant", "demo", "--mode", "final"]).await;
    let (json, stderr) = text(&out);
    assert!(out.status.success(), "{json}{stderr}");
    assert!(stderr.contains("1 invoices written"), "{stderr}");
    let latest: serde_json::Value = serde_json::from_str(json.trim()).expect("one JSON invoice");
    let day_ago = OffsetDateTime::now_utc() - time::Duration::hours(24);
    let month_before = day_ago
        .date()
        .replace_day(1)
        .expect("first")
        .previous_day()
        .expect("a day")
        .replace_day(1)
        .expect("first");
    assert_eq!(
        latest["period_start"],
        format!("{month_before}T00:00:00Z").as_str()
    );
    // The current period is not closed yet; a bad mode is an argument error.
    let now = OffsetDateTime::now_utc()
        .replace_nanosecond(0)
        .expect("whole second")
        .format(&Rfc3339)
        .expect("time");
    let out = cli(
        &db,
        &[
            "invoice", "--tenant", "demo", "--at", &now, "--mode", "final",
        ],
    )
    .await;
    assert!(
        text(&out).1.contains("period not closed until"),
        "{:?}",
        text(&out)
    );
    let out = cli(&db, &["invoice", "--tenant", "demo", "--mode", "later"]).await;
    assert_eq!(out.status.code(), Some(2));
    assert!(
        text(&out).1.contains("--mode: \"later\""),
        "{:?}",
        text(&out)
    );
}

/// A plan folder of its own: `p` v1 (and v2 when given), monthly, one flat fee each.
fn plan_folder(name: &str, fees: &[&str]) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(common::unique(name));
    std::fs::create_dir_all(dir.join("p")).expect("plan folder");
    for (i, fee) in fees.iter().enumerate() {
        let text = format!(
            "plan = \"p\"\nversion = {}\ncurrency = \"USD\"\ninterval = \"monthly\"\n\
             [[charges]]\nid = \"fee\"\ntype = \"flat\"\nprice = \"{fee}\"\n",
            i + 1
        );
        std::fs::write(dir.join(format!("p/v{}.toml", i + 1)), text).expect("plan file");
    }
    dir
}

#[tokio::test]
async fn a_published_plan_version_cannot_change_under_its_number() {
    let db = Db::new("published").await;
    let store = db.store();
    let at = datetime!(2025-06-01 0:00 UTC);
    let dir = plan_folder("published", &["10.00"]);
    let v1 = Catalog::load_dir(&dir).expect("catalog");
    assert_eq!(store.publish_plans(&v1, at).await.expect("first"), 1);
    assert_eq!(store.publish_plans(&v1, at).await.expect("again"), 0);

    // v1's price edited in place: refused, naming the file, the version and both digests.
    let edited = plan_folder("published-edited", &["12.00"]);
    let changed = Catalog::load_dir(&edited).expect("catalog");
    let e = store
        .publish_plans(&changed, at)
        .await
        .expect_err("v1 changed");
    let text = e.to_string();
    assert!(matches!(e, Error::PlanVersionChanged { .. }), "{text}");
    assert!(
        text.contains("p/v1.toml: plan \"p\" v1 was published with digest")
            && text.contains(v1.version("p", 1).expect("v1").digest())
            && text.contains(changed.version("p", 1).expect("v1").digest())
            && text.contains("first loaded 2025-06-01T00:00:00Z"),
        "{text}"
    );
    // The change published as v2 is taken; v1 as published stays.
    let next = plan_folder("published-v2", &["10.00", "12.00"]);
    let v2 = Catalog::load_dir(&next).expect("catalog");
    assert_eq!(store.publish_plans(&v2, at).await.expect("v2"), 1);
    let rows = db
        .client
        .query("SELECT count() FROM plan_versions")
        .fetch_one::<u64>()
        .await
        .expect("count");
    assert_eq!(rows, 2);

    // The CLI refuses to record against the edited catalog, and records nothing.
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_tally-rater"))
        .arg("--config")
        .arg(repo("config/tally.dev.toml"))
        .arg("--plans")
        .arg(&edited)
        .args([
            "subscribe",
            "--tenant",
            "demo",
            "--customer",
            "c1",
            "--plan",
            "p",
            "--start",
            "2025-06-01T00:00:00Z",
        ])
        .env_remove("TALLY_CONFIG")
        .env("TALLY_CLICKHOUSE_URL", &db.config.url)
        .env("TALLY_CLICKHOUSE_DATABASE", &db.config.database)
        .output()
        .await
        .expect("tally-rater runs");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("publish the change as a new version"),
        "{stderr}"
    );
    assert_eq!(db.rows().await, 0);
    for d in [dir, edited, next] {
        std::fs::remove_dir_all(d).ok();
    }
}
