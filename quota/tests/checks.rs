//! Quota checks against the real Redis and ClickHouse of the local stack.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use redis::AsyncCommands;
use tally_quota::{Answered, CheckError, Quota};
use tally_rater::{NewChange, Notifier, SubscriptionStore, Window};
use time::{OffsetDateTime, Time};

const RACE_ENV: &str = "TALLY_QUOTA_RACE";

fn now_s() -> OffsetDateTime {
    let t = OffsetDateTime::now_utc();
    t.replace_nanosecond(0).expect("valid")
}

/// Consumes one unit at a time from `tasks` tasks, `each` attempts per task; returns grants.
async fn hammer(q: &Arc<Quota>, customer: &str, tasks: usize, each: usize) -> usize {
    let mut handles = Vec::new();
    for _ in 0..tasks {
        let q = q.clone();
        let customer = customer.to_owned();
        handles.push(tokio::spawn(async move {
            let mut granted = 0;
            for _ in 0..each {
                if ask(&q, &customer, "api", 1, true).await.allowed {
                    granted += 1;
                }
            }
            granted
        }));
    }
    let mut total = 0;
    for h in handles {
        total += h.await.expect("task");
    }
    total
}

/// Run by `concurrent_checks_grant_exactly_the_limit` as a second and third process:
/// says READY, waits for GO on stdin, races, prints GRANTED <n>.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a child of concurrent_checks_grant_exactly_the_limit"]
async fn race_child() {
    let Ok(spec) = std::env::var(RACE_ENV) else {
        return;
    };
    let (db_name, customer) = spec.split_once('|').expect("db|customer");
    let db = tally_core::config::ClickHouseConfig {
        url: clickhouse_url(),
        database: db_name.to_owned(),
        user: "default".into(),
        password: String::new(),
    };
    let q = quota(&config(&db)).await;
    // Warm the subscription cache so the race is on Redis alone.
    ask(&q, customer, "api", 0, false).await;
    println!("READY");
    let mut line = String::new();
    std::io::stdin().read_line(&mut line).expect("GO");
    let granted = hammer(&q, customer, 4, 150).await;
    println!("GRANTED {granted}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_checks_grant_exactly_the_limit() {
    let db = fresh_database("race").await;
    let customer = unique("racer");
    let start = now_s() - time::Duration::days(3);
    subscribe(&db, &customer, 1, start, start).await;
    let q = quota(&config(&db)).await;
    ask(&q, &customer, "api", 0, false).await;

    let exe = std::env::current_exe().expect("test binary");
    let mut children: Vec<_> = (0..2)
        .map(|_| {
            Command::new(&exe)
                .args(["race_child", "--exact", "--ignored", "--nocapture"])
                .env(RACE_ENV, format!("{}|{customer}", db.database))
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .spawn()
                .expect("child process")
        })
        .collect();
    let mut readers: Vec<_> = children
        .iter_mut()
        .map(|c| BufReader::new(c.stdout.take().expect("stdout")))
        .collect();
    for r in &mut readers {
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut line = String::new();
        while line.trim() != "READY" {
            line.clear();
            assert!(
                r.read_line(&mut line).expect("child output") > 0,
                "child exited before READY"
            );
            assert!(Instant::now() < deadline, "child not ready");
        }
    }
    for c in &mut children {
        writeln!(c.stdin.as_mut().expect("stdin"), "GO").expect("go");
    }
    // 8 tasks here and 4 in each child, 1,800 attempts on a limit of 300.
    let here = hammer(&q, &customer, 8, 150).await;
    let mut total = here;
    for (mut c, mut r) in children.into_iter().zip(readers) {
        let mut out = String::new();
        std::io::Read::read_to_string(&mut r, &mut out).expect("child output");
        assert!(c.wait().expect("child").success(), "child failed: {out}");
        let granted: usize = out
            .lines()
            .find_map(|l| l.strip_prefix("GRANTED "))
            .and_then(|n| n.trim().parse().ok())
            .unwrap_or_else(|| panic!("no GRANTED line in {out:?}"));
        total += granted;
    }
    eprintln!("granted: {here} here, {} in the children", total - here);
    assert_eq!(total, 300, "granted across processes (here {here})");
    let d = ask(&q, &customer, "api", 1, false).await;
    assert!(!d.allowed);
    assert_eq!(d.used, 300.into());
    assert_eq!(d.remaining, Some(0.into()));
    assert_eq!(d.window, Some(Window::BillingPeriod));
    assert_eq!(d.answered, Answered::Redis);
    drop_database(&db).await;
}

#[tokio::test]
async fn rate_window_grants_a_burst_then_one_per_interval_and_expires() {
    let db = fresh_database("rate").await;
    let customer = unique("bursty");
    let start = now_s() - time::Duration::days(1);
    subscribe(&db, &customer, 1, start, start).await;
    let q = quota(&config(&db)).await;
    let mut allowed = 0;
    for _ in 0..8 {
        if ask(&q, &customer, "burst", 1, true).await.allowed {
            allowed += 1;
        }
    }
    // 8 checks take far less than the 200 ms interval on any machine that runs these tests;
    // if one interval did pass, one more unit is due.
    assert!((5..=6).contains(&allowed), "burst of 5, got {allowed}");
    let d = ask(&q, &customer, "burst", 1, false).await;
    assert_eq!(d.limit, Some(5.into()));
    assert_eq!(d.window, Some(Window::Second));
    assert!(d.reset_at.expect("reset") <= OffsetDateTime::now_utc() + Duration::from_secs(2));
    let mut conn = redis::Client::open(redis_url())
        .expect("url")
        .get_multiplexed_async_connection()
        .await
        .expect("redis");
    let key = format!("tq:{{demo/{}:{customer}}}:burst:second", customer.len());
    let ttl: i64 = conn.pttl(&key).await.expect("pttl");
    assert!(
        ttl > 0 && ttl <= 2_000,
        "the GCRA key expires once drained: {ttl} ms"
    );
    // After the window drains, the whole burst is available again, and the key is gone.
    tokio::time::sleep(Duration::from_millis(2_100)).await;
    let exists: bool = conn.exists(&key).await.expect("exists");
    assert!(!exists, "the drained GCRA key expired");
    let mut again = 0;
    for _ in 0..5 {
        if ask(&q, &customer, "burst", 1, true).await.allowed {
            again += 1;
        }
    }
    assert_eq!(again, 5);
    // Amounts larger than the burst are refused whole.
    tokio::time::sleep(Duration::from_millis(1_100)).await;
    let big = ask(&q, &customer, "burst", 6, true).await;
    assert!(!big.allowed);
    drop_database(&db).await;
}

#[tokio::test]
async fn quota_windows_roll_over_at_the_utc_day_and_the_billing_anchor() {
    let db = fresh_database("windows").await;
    let customer = unique("roller");
    // Anchored ten days ago at 10:00 UTC: the next period starts in about 20 days.
    let anchor =
        (now_s() - time::Duration::days(10)).replace_time(Time::from_hms(10, 0, 0).expect("time"));
    subscribe(&db, &customer, 1, anchor, anchor).await;
    let q = quota(&config(&db)).await;
    let at = |t: OffsetDateTime, meter: &'static str, amount: u64, consume: bool| {
        let q = q.clone();
        let customer = customer.clone();
        async move {
            q.check_many_at(&[check(&customer, meter, amount, consume)], t)
                .await
                .pop()
                .expect("answer")
                .expect("answered")
        }
    };

    // The UTC day: tomorrow's last second, then the day after's first.
    let tomorrow = (OffsetDateTime::now_utc() + time::Duration::days(1)).date();
    let last = tomorrow
        .with_time(Time::from_hms(23, 59, 59).expect("time"))
        .assume_utc();
    let next = tomorrow.next_day().expect("date").midnight().assume_utc();
    assert!(at(last, "daily", 10, true).await.allowed);
    let refused = at(last, "daily", 1, true).await;
    assert!(!refused.allowed);
    assert_eq!(refused.used, 10.into());
    assert_eq!(refused.reset_at, Some(next));
    let fresh = at(next, "daily", 1, true).await;
    assert!(fresh.allowed, "a new day starts from zero");
    assert_eq!(fresh.used, 1.into());

    // The billing period ends at the anchor's day and time next month, not the calendar's.
    let end = tally_rater::period_containing(anchor, tally_rater::Interval::Monthly, now_s())
        .expect("period")
        .end();
    let before = end - time::Duration::seconds(1);
    assert!(at(before, "api", 300, true).await.allowed);
    let full = at(before, "api", 1, false).await;
    assert!(!full.allowed);
    assert_eq!(full.reset_at, Some(end));
    assert_eq!(full.window, Some(Window::BillingPeriod));
    let after = at(end, "api", 1, true).await;
    assert!(after.allowed, "the next billing period starts from zero");
    assert_eq!(after.used, 1.into());

    // Counters expire two days after their window, so nothing grows forever.
    let mut conn = redis::Client::open(redis_url())
        .expect("url")
        .get_multiplexed_async_connection()
        .await
        .expect("redis");
    let day_key = format!(
        "tq:{{demo/{}:{customer}}}:daily:day:{}",
        customer.len(),
        tally_quota::window::millis(next)
    );
    let expire_ms: i64 = redis::cmd("PEXPIRETIME")
        .arg(&day_key)
        .query_async(&mut conn)
        .await
        .expect("pexpiretime");
    let want = tally_quota::window::millis(next + time::Duration::days(1))
        + tally_quota::window::COUNTER_GRACE_MS;
    assert_eq!(expire_ms, want as i64);
    drop_database(&db).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upgrade_mid_period_raises_the_limit_at_the_next_check() {
    let db = fresh_database("upgrade").await;
    let customer = unique("grower");
    let start = now_s() - time::Duration::days(5);
    subscribe(&db, &customer, 1, start, start).await;
    let mut config = config(&db);
    config.quota.entitlement_topic = unique("test-entitlements");
    // A long TTL: only the notification can make the change visible within the test.
    config.quota.cache_ttl_ms = 600_000;
    let q = quota(&config).await;
    let (stop_tx, stop) = tokio::sync::watch::channel(false);
    let listener = tokio::spawn(tally_quota::invalidate::listen(
        config.kafka.clone(),
        config.quota.entitlement_topic.clone(),
        q.resolver().clone(),
        stop,
    ));
    assert!(ask(&q, &customer, "api", 300, true).await.allowed);
    assert!(!ask(&q, &customer, "api", 1, true).await.allowed);
    // The listener drops the cache when it starts; wait for that, then warm the cache.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(!ask(&q, &customer, "api", 1, true).await.allowed);

    let store = SubscriptionStore::new(&db);
    let recorded = store
        .record(
            &plans(),
            NewChange::change(TENANT, &customer, "gate", now_s())
                .version(2)
                .actor("test")
                .reason("upgrade"),
        )
        .await
        .expect("upgrade");
    let notifier = Notifier::new(&config.kafka, &config.quota.entitlement_topic).expect("notifier");
    notifier
        .publish_changes(&[recorded.change()])
        .await
        .expect("published");
    let raised = eventually(Duration::from_secs(15), || async {
        ask(&q, &customer, "api", 1, false).await.limit == Some(600.into())
    })
    .await;
    assert!(raised, "the upgrade's limit is seen after the notification");
    let d = ask(&q, &customer, "api", 1, true).await;
    assert!(d.allowed);
    assert_eq!(d.used, 301.into(), "the same counter, no bulk rewrite");
    assert_eq!(d.plan, "gate@v2");
    let _ = stop_tx.send(true);
    let _ = listener.await;
    drop_database(&db).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_down_follows_each_meters_policy_and_recovers() {
    let db = fresh_database("outage").await;
    let customer = unique("outage");
    let start = now_s() - time::Duration::days(2);
    subscribe(&db, &customer, 1, start, start).await;
    let mut redis = PrivateRedis::start();
    let mut config = config(&db);
    config.quota.redis_url = redis.url();
    let q = quota(&config).await;
    assert!(ask(&q, &customer, "daily", 3, true).await.allowed);
    assert!(ask(&q, &customer, "api", 0, false).await.allowed);
    assert!(q.redis_up());

    redis.stop();
    // Closed: refused while Redis is away.
    let closed = ask(&q, &customer, "daily", 1, true).await;
    assert!(!closed.allowed);
    assert_eq!(closed.answered, Answered::FallbackClosed);
    assert!(!q.redis_up());
    // Open: allowed, but only up to the limit, by the in-process limiter.
    let mut granted = 0;
    for _ in 0..320 {
        let d = ask(&q, &customer, "api", 1, true).await;
        assert_eq!(d.answered, Answered::FallbackOpen);
        if d.allowed {
            granted += 1;
        }
    }
    assert_eq!(granted, 300, "fail-open is bounded by the limit");

    // Back (empty: it kept nothing): exact again, from Redis.
    redis.restart();
    let back = eventually(Duration::from_secs(15), || async {
        ask(&q, &customer, "daily", 0, false).await.answered == Answered::Redis
    })
    .await;
    assert!(back, "checks go back to Redis by themselves");
    assert!(q.redis_up());
    let mut exact = 0;
    for _ in 0..12 {
        if ask(&q, &customer, "daily", 1, true).await.allowed {
            exact += 1;
        }
    }
    assert_eq!(exact, 10);
    drop_database(&db).await;
}

#[tokio::test]
async fn bad_checks_name_the_field_and_policies_apply_without_subscription() {
    let db = fresh_database("input").await;
    let customer = unique("nobody");
    let mut cfg = config(&db);
    let q = quota(&cfg).await;
    let err = |r: Result<_, CheckError>| match r {
        Err(CheckError::Invalid { field, .. }) => field,
        other => panic!("expected a field error, got {other:?}"),
    };
    let one = |meter: &'static str, amount: &str, consume: bool| tally_quota::Check {
        tenant: TENANT,
        customer: "c",
        meter,
        amount: amount.parse().expect("decimal"),
        consume,
    };
    let answers = q
        .check_many(&[
            one("nope", "1", true),
            one("api", "1.5", true),
            one("api", "-1", true),
            one("tokens", "1", true),
        ])
        .await;
    let fields: Vec<&str> = answers.into_iter().map(err).collect();
    assert_eq!(fields, ["meter", "amount", "amount", "consume"]);
    let empty = q
        .check(&tally_quota::Check {
            customer: "",
            ..one("api", "1", true)
        })
        .await;
    assert_eq!(err(empty), "customer");

    // No subscription: deny, allow, or a default plan's limits.
    let denied = ask(&q, &customer, "api", 1, true).await;
    assert!(!denied.allowed);
    assert_eq!(denied.answered, Answered::NoSubscription);
    cfg.quota.no_subscription = "allow".into();
    let open = quota(&cfg).await;
    let d = ask(&open, &customer, "api", 1, true).await;
    assert!(d.allowed && d.limit.is_none());
    assert_eq!(d.answered, Answered::Unlimited);
    cfg.quota.no_subscription = "plan:gate".into();
    let default = quota(&cfg).await;
    let d = ask(&default, &customer, "daily", 10, true).await;
    assert!(d.allowed);
    assert_eq!(d.limit, Some(10.into()));
    assert!(d.plan.ends_with("(default)"), "{}", d.plan);
    assert!(!ask(&default, &customer, "daily", 1, true).await.allowed);
    drop_database(&db).await;
}
