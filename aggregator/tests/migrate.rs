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

/// Inserts rollup deltas into the ledger as the aggregator's flushes do: `rows` are
/// `(kind, tenant, customer, meter, hour, dim_values, d_count, d_sum, d_min, d_max,
/// d_latest, d_latest_at, d_unique)` tuples.
async fn insert_rollup_deltas(db: &clickhouse::Client, rows: &str) {
    let sql = format!(
        "INSERT INTO ingest_ledger (kind, tenant, customer, meter, hour, dim_values, \
         d_count, d_sum, d_min, d_max, d_latest, d_latest_at, d_unique) VALUES {rows}"
    );
    db.query(&sql).execute().await.expect("ledger insert")
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
async fn a_backfill_waits_until_no_aggregator_flushes() {
    let c = config("quiet");
    let mut all = migrate::load(&migrate::default_dir()).expect("load");
    migrate::apply(&c, &all).await.expect("apply");
    let db = migrate::client(&c);
    let checkpoint = |seconds_ago: i64| {
        format!(
            "INSERT INTO aggregator_checkpoints (topic, kafka_partition, kafka_offset, flushed_at) \
             VALUES ('usage-events', 0, 41, now() - {seconds_ago})"
        )
    };
    // An aggregator flushed two seconds ago.
    db.query(&checkpoint(2))
        .execute()
        .await
        .expect("checkpoint");
    let next = all.last().map(|m| m.version + 1).expect("some migration");
    all.push(Migration {
        version: next,
        name: "fill".into(),
        checksum: "3".repeat(64),
        statements: vec![
            "CREATE TABLE IF NOT EXISTS fill (x UInt8) ENGINE = MergeTree ORDER BY x".into(),
            "INSERT INTO fill SELECT toUInt8(count()) FROM aggregator_checkpoints".into(),
        ],
    });
    let e = migrate::apply(&c, &all)
        .await
        .expect_err("a flush within the quiet period");
    match &e {
        Error::WritersActive {
            version,
            name,
            seconds_ago,
        } => {
            assert_eq!((*version, name.as_str()), (next, "fill"));
            assert!((0..=migrate::QUIET_SECS).contains(seconds_ago), "{e}");
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
    assert!(e.is_retryable(), "it clears once the aggregators stop");
    let text = e.to_string();
    assert!(
        text.contains(&format!("V{next} (fill)")) && text.contains("stop every aggregator"),
        "{text}"
    );
    // Nothing of it ran: not even its first statement.
    let tables: u64 = db
        .query("SELECT count() FROM system.tables WHERE database = currentDatabase() AND name = 'fill'")
        .fetch_one()
        .await
        .expect("tables");
    assert_eq!(tables, 0);

    // A migration that only declares is not held back by the flush.
    let mut declaring = all[..all.len() - 1].to_vec();
    declaring.push(Migration {
        version: next,
        name: "declare".into(),
        checksum: "4".repeat(64),
        statements: vec!["CREATE TABLE IF NOT EXISTS declared (x UInt8) ENGINE = Memory".into()],
    });
    let quiet = config("quiet_declare");
    migrate::apply(&quiet, &all[..all.len() - 1])
        .await
        .expect("apply");
    migrate::client(&quiet)
        .query(&checkpoint(1))
        .execute()
        .await
        .expect("checkpoint");
    assert_eq!(
        migrate::apply(&quiet, &declaring).await.expect("declaring"),
        [next]
    );
    drop_database(&quiet).await;

    // Once the last flush is older than the quiet period, the backfill runs.
    db.query("TRUNCATE TABLE aggregator_checkpoints")
        .execute()
        .await
        .expect("truncate");
    db.query(&checkpoint(migrate::QUIET_SECS + 5))
        .execute()
        .await
        .expect("old checkpoint");
    assert_eq!(migrate::apply(&c, &all).await.expect("quiet now"), [next]);
    let filled: u8 = db
        .query("SELECT x FROM fill")
        .fetch_one()
        .await
        .expect("filled");
    assert_eq!(filled, 1);
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
    // As if every statement of a migration had run and the process died before recording
    // it: run again (under a version of its own, so that nothing skips it) before the next
    // one, its statements (CREATE … IF NOT EXISTS, copies of only what is not there yet,
    // single-column ADD or DROP COLUMN) finish cleanly.
    for m in &all {
        let applied = migrate::apply(&c, std::slice::from_ref(m))
            .await
            .unwrap_or_else(|e| panic!("apply V{}: {e}", m.version));
        assert_eq!(applied, [m.version]);
        let again = Migration {
            version: 10_000 + m.version,
            name: format!("{}_again", m.name),
            ..m.clone()
        };
        migrate::apply(&c, &[again])
            .await
            .unwrap_or_else(|e| panic!("V{} again: {e}", m.version));
    }
    // A statement that fails for another reason still fails.
    let mut broken = all.clone();
    broken.push(Migration {
        version: 20_000,
        name: "broken".into(),
        checksum: "2".repeat(64),
        statements: vec!["ALTER TABLE no_such_table ADD COLUMN x UInt8".into()],
    });
    migrate::apply(&c, &broken)
        .await
        .expect_err("a missing table is an error");
    drop_database(&c).await;
}

/// A flush's events arrive from several partitions in arrival order; the insert sends them
/// in `events_raw`'s own order, so the server writes the part without sorting it (it counts
/// such blocks as `MergeTreeDataWriterBlocksAlreadySorted`).
#[tokio::test]
async fn a_flush_reaches_events_raw_already_in_its_order() {
    use tally_aggregator::ledger::{Body, Columns, LedgerRow, COLUMNS, KIND_EVENT};
    let c = config("sorted");
    let all = migrate::load(&migrate::default_dir()).expect("load");
    migrate::apply(&c, &all).await.expect("apply");
    let hour = 1_795_500_000u32;
    let mut body = Body::default();
    for partition in 0..3u32 {
        let mut part = Columns::default();
        for n in 0..200u32 {
            LedgerRow {
                kind: KIND_EVENT,
                tenant: "demo".into(),
                customer: format!("customer-{}", (n * 7919 + partition) % 37),
                id: format!("evt-{partition}-{n}"),
                event_type: ["request", "login", "completion"][(n % 3) as usize].into(),
                time: hour + (n * 13) % 3600,
                received_at: hour + 3600,
                data: "{}".into(),
                kafka_partition: partition,
                kafka_offset: u64::from(n),
                ..LedgerRow::default()
            }
            .encode(&mut part);
        }
        body.append(part);
    }
    let query_id = format!("{}_flush", c.database);
    let client = migrate::client(&c)
        .with_setting("query_id", query_id.as_str())
        .with_setting("log_queries", "1");
    let mut insert = client.insert_formatted_with(format!(
        "INSERT INTO ingest_ledger ({COLUMNS}) FORMAT Native"
    ));
    for chunk in body.into_chunks() {
        insert.send(bytes::Bytes::from(chunk)).await.expect("send");
    }
    insert.end().await.expect("insert");

    // The server logs a query when it finishes it, which may be just after it answered.
    let db = migrate::client(&c);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    let (blocks, sorted): (u64, u64) = loop {
        db.query("SYSTEM FLUSH LOGS")
            .execute()
            .await
            .expect("flush logs");
        let logged = db
            .query(
                "SELECT ProfileEvents.Values[indexOf(ProfileEvents.Names, 'MergeTreeDataWriterBlocks')], \
                 ProfileEvents.Values[indexOf(ProfileEvents.Names, 'MergeTreeDataWriterBlocksAlreadySorted')] \
                 FROM system.query_log WHERE query_id = ? AND type = 2",
            )
            .bind(&query_id)
            .fetch_optional()
            .await
            .expect("query_log");
        if let Some(counts) = logged {
            break counts;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the insert {query_id} is not in system.query_log after 20 s"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    };
    assert_eq!(blocks, 1, "one part, in events_raw");
    assert_eq!(sorted, blocks, "written without a sort");
    let stored: u64 = db
        .query("SELECT count() FROM events_raw")
        .fetch_one()
        .await
        .expect("count");
    assert_eq!(stored, 600);
    drop_database(&c).await;
}

/// V11's daily rollups: filled from the hourly rows already stored when it is applied, then
/// kept by the ledger's own view; either way each day holds what its hours hold, per
/// tenant, customer and meter, for every aggregation's state.
#[tokio::test]
async fn daily_rollups_hold_what_their_hours_hold() {
    let c = config("daily");
    let all = migrate::load(&migrate::default_dir()).expect("load");
    let before: Vec<Migration> = all.iter().filter(|m| m.version < 11).cloned().collect();
    let all: Vec<Migration> = all.into_iter().filter(|m| m.version <= 11).collect();
    assert_eq!(before.len() + 1, all.len(), "V11 is there");
    migrate::apply(&c, &before).await.expect("apply up to V10");
    let db = migrate::client(&c);
    let insert = |rows: &'static str| insert_rollup_deltas(&db, rows);
    // Before V11: two days of one customer's meter, two dimension values, and a second
    // customer; hours on both sides of midnight.
    insert(
        "(2, 'demo', 'c1', 'm', '2026-10-01 05:00:00', ['a'], 3, 1.5, 0.5, 1.0, 1.0, 100, 'u1'), \
         (2, 'demo', 'c1', 'm', '2026-10-01 23:00:00', ['b'], 1, 2.25, 2.25, 2.25, 2.25, 300, 'u2'), \
         (2, 'demo', 'c1', 'm', '2026-10-02 00:00:00', ['a'], 2, 4, 1, 3, 3, 400, 'u1'), \
         (2, 'demo', 'c2', 'm', '2026-10-01 12:00:00', [], 5, 10, 1, 4, 2, 200, 'u9')",
    )
    .await;
    migrate::apply(&c, &all).await.expect("apply V11");
    // After: the view keeps the days, on a day already filled and a new one.
    insert(
        "(2, 'demo', 'c1', 'm', '2026-10-01 07:00:00', ['b'], 4, 0.75, 0.25, 0.5, 9, 350, 'u3'), \
         (2, 'demo', 'c2', 'm', '2026-10-03 01:00:00', [], 1, 1, 1, 1, 1, 500, 'u1'), \
         (2, 'acme', 'c1', 'm', '2026-10-01 05:00:00', [], 1, 1, 1, 1, 1, 1, 'u1')",
    )
    .await;
    let per_day = |table: &str, time: &str| {
        format!(
            "SELECT tenant, customer, meter, toUInt32(toStartOfDay({time})) AS d, \
             sumMerge(events), toString(sumMerge(value_sum)), toString(minMerge(value_min)), \
             toString(maxMerge(value_max)), toString(argMaxMerge(value_latest)), \
             uniqExactMerge(value_unique) \
             FROM {table} GROUP BY tenant, customer, meter, d ORDER BY tenant, customer, meter, d"
        )
    };
    #[derive(Debug, PartialEq, clickhouse::Row, serde::Deserialize)]
    struct Day {
        tenant: String,
        customer: String,
        meter: String,
        day: u32,
        events: u64,
        sum: String,
        min: String,
        max: String,
        latest: String,
        unique: u64,
    }
    let hourly: Vec<Day> = db
        .query(&per_day("rollups_hourly", "hour"))
        .fetch_all()
        .await
        .expect("hourly");
    let daily: Vec<Day> = db
        .query(&per_day("usage_daily", "day"))
        .fetch_all()
        .await
        .expect("daily");
    assert_eq!(hourly.len(), 5, "{hourly:?}");
    assert_eq!(daily, hourly);
    // Applied again, as after a kill before its record: the days already there stay single.
    db.query("TRUNCATE TABLE schema_migrations")
        .execute()
        .await
        .expect("forget the records");
    migrate::apply(&c, &all).await.expect("apply again");
    let again: Vec<Day> = db
        .query(&per_day("usage_daily", "day"))
        .fetch_all()
        .await
        .expect("daily again");
    assert_eq!(again, hourly, "nothing counted twice");
    // c1's first day by hand: 3 + 1 + 4 events; latest is the value at 350 (9).
    let c1 = &daily[1];
    assert_eq!(
        (
            c1.customer.as_str(),
            c1.events,
            c1.sum.as_str(),
            c1.latest.as_str(),
            c1.unique
        ),
        ("c1", 8, "4.500000000", "9.000000000", 3)
    );
    drop_database(&c).await;
}

/// V13 moves UNIQUE_COUNT states into tables of their own and V14 drops the shared column:
/// every meter's hours and days read the same before and after, unique sets included, the
/// views route new flushes the new way, and both migrations finish after a kill.
#[tokio::test]
async fn unique_states_move_to_tables_of_their_own() {
    let c = config("unique");
    let all = migrate::load(&migrate::default_dir()).expect("load");
    let before: Vec<Migration> = all.iter().filter(|m| m.version < 13).cloned().collect();
    let v13 = all.iter().find(|m| m.version == 13).expect("V13").clone();
    let v14 = all.iter().find(|m| m.version == 14).expect("V14").clone();
    migrate::apply(&c, &before).await.expect("apply up to V12");
    let db = migrate::client(&c);
    let insert = |rows: &'static str| insert_rollup_deltas(&db, rows);
    // As the aggregator writes them: a SUM meter's deltas (no identifier) and a
    // UNIQUE_COUNT meter's, one row per identifier; two inserts, so two parts per table.
    insert(
        "(2, 'demo', 'c1', 'tokens', '2026-10-01 05:00:00', ['gpt'], 3, 1.5, 0.5, 1.0, 1.0, 100, ''), \
         (2, 'demo', 'c1', 'users', '2026-10-01 05:00:00', [], 2, 0, 0, 0, 0, 0, 'u1'), \
         (2, 'demo', 'c1', 'users', '2026-10-01 05:00:00', [], 1, 0, 0, 0, 0, 0, 'u2'), \
         (2, 'demo', 'c1', 'users', '2026-10-01 23:00:00', [], 1, 0, 0, 0, 0, 0, 'u3')",
    )
    .await;
    insert(
        "(2, 'demo', 'c1', 'tokens', '2026-10-01 05:00:00', ['gpt'], 1, 2, 2, 2, 2, 200, ''), \
         (2, 'demo', 'c1', 'users', '2026-10-01 05:00:00', [], 1, 0, 0, 0, 0, 0, 'u2'), \
         (2, 'demo', 'c2', 'users', '2026-10-02 01:00:00', [], 4, 0, 0, 0, 0, 0, 'u1')",
    )
    .await;
    let old = |table: &str, time: &str| {
        format!(
            "SELECT customer, meter, toUInt32({time}) AS t, sumMerge(events), \
             toString(sumMerge(value_sum)), uniqExactMerge(value_unique) \
             FROM {table} GROUP BY customer, meter, t ORDER BY customer, meter, t"
        )
    };
    // After V13 the unique count of a meter's hour (day) is in the table of its own; a
    // meter with no row there counts 0 (every meter but a UNIQUE_COUNT one).
    let new = |table: &str, unique: &str, time: &str| {
        format!(
            "SELECT customer, meter, t, e, s, u FROM \
             (SELECT customer, meter, toUInt32({time}) AS t, sumMerge(events) AS e, \
                     toString(sumMerge(value_sum)) AS s \
              FROM {table} GROUP BY customer, meter, t) \
             ANY LEFT JOIN \
             (SELECT customer, meter, toUInt32({time}) AS t, uniqExactMerge(value_unique) AS u \
              FROM {unique} GROUP BY customer, meter, t) USING (customer, meter, t) \
             ORDER BY customer, meter, t"
        )
    };
    type Row = (String, String, u32, u64, String, u64);
    let read = |sql: String| {
        let db = db.clone();
        async move { db.query(&sql).fetch_all::<Row>().await.expect("read") }
    };
    let hours_before = read(old("rollups_hourly", "hour")).await;
    let days_before = read(old("usage_daily", "day")).await;
    let row = |c: &str, m: &str, t: &str, e: u64, s: &str, u: u64| -> Row {
        let t = time::PrimitiveDateTime::parse(
            t,
            time::macros::format_description!("[year]-[month]-[day] [hour]:[minute]:[second]"),
        )
        .expect("time")
        .assume_utc()
        .unix_timestamp() as u32;
        (c.into(), m.into(), t, e, s.into(), u)
    };
    // Before: the SUM meter's rows hold a set with the empty string in it (count 1).
    assert_eq!(
        hours_before,
        vec![
            row("c1", "tokens", "2026-10-01 05:00:00", 4, "3.500000000", 1),
            row("c1", "users", "2026-10-01 05:00:00", 4, "0.000000000", 2),
            row("c1", "users", "2026-10-01 23:00:00", 1, "0.000000000", 1),
            row("c2", "users", "2026-10-02 01:00:00", 4, "0.000000000", 1),
        ]
    );
    // V13 run twice, as after a kill before its record (the second run under another
    // version number, so that its statements all run again).
    migrate::apply(&c, std::slice::from_ref(&v13))
        .await
        .expect("apply V13");
    let rerun = Migration {
        version: 113,
        name: "v13_again".into(),
        ..v13.clone()
    };
    migrate::apply(&c, &[rerun]).await.expect("apply V13 again");
    // V14 killed after its first statement.
    db.query(&v14.statements[0])
        .execute()
        .await
        .expect("first drop");
    migrate::apply(&c, &all)
        .await
        .expect("apply V14 after a kill");
    for table in ["rollups_hourly", "usage_daily"] {
        let n: u64 = db
            .query(&format!(
                "SELECT count() FROM system.columns WHERE database = '{}' AND table = '{table}' \
                 AND name = 'value_unique'",
                c.database
            ))
            .fetch_one()
            .await
            .expect("columns");
        assert_eq!(n, 0, "{table} keeps no unique state");
    }
    let unique_rows = |table: &str| {
        let db = db.clone();
        let sql = format!("SELECT meter, count() FROM {table} GROUP BY meter ORDER BY meter");
        async move {
            db.query(&sql)
                .fetch_all::<(String, u64)>()
                .await
                .expect("rows")
        }
    };
    // Only the UNIQUE_COUNT meter's keys moved, each once (a second copy would be a
    // second row: nothing has merged the tables' parts).
    assert_eq!(
        unique_rows("rollups_unique_hourly").await,
        vec![("users".to_string(), 3)]
    );
    assert_eq!(
        unique_rows("usage_unique_daily").await,
        vec![("users".to_string(), 2)]
    );
    let expect_moved = |rows: Vec<Row>| -> Vec<Row> {
        rows.into_iter()
            .map(|(c, m, t, e, s, u)| {
                let u = if m == "users" { u } else { 0 };
                (c, m, t, e, s, u)
            })
            .collect()
    };
    assert_eq!(
        read(new("rollups_hourly", "rollups_unique_hourly", "hour")).await,
        expect_moved(hours_before.clone())
    );
    assert_eq!(
        read(new("usage_daily", "usage_unique_daily", "day")).await,
        expect_moved(days_before)
    );
    // A flush after the migrations: the views send identifiers to the new tables only,
    // and the counts to the rollups as before.
    insert(
        "(2, 'demo', 'c1', 'tokens', '2026-10-01 05:00:00', ['gpt'], 1, 1, 1, 1, 1, 300, ''), \
         (2, 'demo', 'c1', 'users', '2026-10-01 05:00:00', [], 1, 0, 0, 0, 0, 0, 'u4'), \
         (2, 'demo', 'c1', 'users', '2026-10-01 05:00:00', [], 1, 0, 0, 0, 0, 0, 'u1')",
    )
    .await;
    assert_eq!(
        read(new("rollups_hourly", "rollups_unique_hourly", "hour")).await,
        vec![
            row("c1", "tokens", "2026-10-01 05:00:00", 5, "4.500000000", 0),
            row("c1", "users", "2026-10-01 05:00:00", 6, "0.000000000", 3),
            row("c1", "users", "2026-10-01 23:00:00", 1, "0.000000000", 1),
            row("c2", "users", "2026-10-02 01:00:00", 4, "0.000000000", 1),
        ]
    );
    assert_eq!(
        read(new("usage_daily", "usage_unique_daily", "day")).await,
        vec![
            row("c1", "tokens", "2026-10-01 00:00:00", 5, "4.500000000", 0),
            row("c1", "users", "2026-10-01 00:00:00", 7, "0.000000000", 4),
            row("c2", "users", "2026-10-02 00:00:00", 4, "0.000000000", 1),
        ]
    );
    drop_database(&c).await;
}
