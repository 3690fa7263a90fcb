//! The aggregator against the real broker and ClickHouse: golden totals per aggregation
//! through the usage API, exactly once across SIGKILLs, dead letters, and a member killed
//! out of a two-member group.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use common::*;
use serde_json::{json, Value};
use tally_core::Quantity;
use time::macros::datetime;
use time::OffsetDateTime;

/// A small deterministic generator, so failures reproduce.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }
}

const BASE: OffsetDateTime = datetime!(2026-03-27 20:00:00 UTC);

fn stream(seed: u64, n: usize, prefix: &str) -> Vec<Ev> {
    let mut rng = Rng(seed);
    let mut out: Vec<Ev> = Vec::with_capacity(n);
    for i in 0..n {
        // Every tenth event retries an earlier one: same id, same body.
        if i > 10 && rng.below(10) == 0 {
            let j = rng.below(i as u64) as usize;
            out.push(out[j].clone());
            continue;
        }
        let customer = format!("c{}", rng.below(3));
        // Distinct times (one per index) keep LATEST free of ties.
        let time = BASE
            + time::Duration::seconds(rng.below(72 * 3600) as i64)
            + time::Duration::milliseconds(i as i64);
        let id = format!("{prefix}-{i}");
        let (ty, data) = match rng.below(4) {
            0 => {
                let endpoint = ["/a", "/b"][rng.below(2) as usize];
                (
                    "request",
                    json!({"endpoint": endpoint, "ms": rng.below(900) + 1}),
                )
            }
            1 => {
                let model = ["m1", "m2"][rng.below(2) as usize];
                (
                    "completion",
                    json!({"tokens": json_tokens(rng.below(5_000_000)), "model": model}),
                )
            }
            2 => ("storage", json!({"gb": rng.below(1000)})),
            _ => ("login", json!({"user": format!("u{}", rng.below(12))})),
        };
        out.push(Ev {
            id,
            customer,
            ty,
            time,
            data,
        });
    }
    out
}

/// The start of the day holding `t` at a fixed offset (seconds east of UTC).
/// Every meter of the test config (one per aggregation), with the dimension it groups by.
const METERS: [(&str, Option<&str>); 6] = [
    ("requests", Some("endpoint")),
    ("tokens", Some("model")),
    ("latency_min", Some("endpoint")),
    ("latency_max", Some("endpoint")),
    ("storage_gb", None),
    ("active_users", None),
];

fn fixed(off: i64) -> impl Fn(i64) -> i64 {
    move |t| (t + off).div_euclid(86_400) * 86_400 - off
}

/// The start of the day holding `t` in Europe/Berlin, written out for the events' dates:
/// CET (+01:00) until 2026-03-29T01:00:00Z, CEST (+02:00) after, so March 29 has 23 hours.
fn berlin_day(t: i64) -> i64 {
    const SWITCH: i64 = 1_774_746_000;
    let off = if t < SWITCH { 3600 } else { 7200 };
    let local_midnight = (t + off).div_euclid(86_400) * 86_400;
    if local_midnight - 3600 < SWITCH {
        local_midnight - 3600
    } else {
        local_midnight - 7200
    }
}

/// What the usage API must answer for `meter`, per (window start, customer, dimension),
/// computed here from the events alone; `day_of` gives the start of an instant's day.
fn expected(
    events: &[Ev],
    meter: &str,
    day_of: impl Fn(i64) -> i64,
) -> BTreeMap<(i64, String, String), String> {
    let mut seen = BTreeSet::new();
    type Window = (i64, String, String);
    let mut acc: BTreeMap<Window, Vec<(i64, Quantity, String)>> = BTreeMap::new();
    for e in events {
        if !seen.insert(e.id.clone()) {
            continue;
        }
        let (ty, value_field, dim) = match meter {
            "requests" => ("request", None, Some("endpoint")),
            "latency_min" | "latency_max" => ("request", Some("ms"), Some("endpoint")),
            "tokens" => ("completion", Some("tokens"), Some("model")),
            "storage_gb" => ("storage", Some("gb"), None),
            "active_users" => ("login", None, None),
            _ => unreachable!(),
        };
        if e.ty != ty {
            continue;
        }
        let t = e.time.unix_timestamp();
        let day = day_of(t);
        let dim = dim
            .map(|d| e.data[d].as_str().expect("dim").to_owned())
            .unwrap_or_default();
        let q: Quantity = value_field
            .map(|f| {
                e.data[f]
                    .to_string()
                    .trim_matches('"')
                    .parse()
                    .expect("quantity")
            })
            .unwrap_or_default();
        let user = e.data["user"].as_str().unwrap_or_default().to_owned();
        let at = t * 1000 + i64::from(e.time.millisecond());
        acc.entry((day, e.customer.clone(), dim))
            .or_default()
            .push((at, q, user));
    }
    acc.into_iter()
        .map(|(k, v)| {
            let value = match meter {
                "requests" => v.len().to_string(),
                "tokens" => v
                    .iter()
                    .fold(Quantity::ZERO, |s, x| s.checked_add(x.1).expect("sum"))
                    .to_string(),
                "latency_min" => v.iter().map(|x| x.1).min().expect("min").to_string(),
                "latency_max" => v.iter().map(|x| x.1).max().expect("max").to_string(),
                "storage_gb" => v.iter().max_by_key(|x| x.0).expect("latest").1.to_string(),
                "active_users" => v
                    .iter()
                    .map(|x| &x.2)
                    .collect::<BTreeSet<_>>()
                    .len()
                    .to_string(),
                _ => unreachable!(),
            };
            (k, value)
        })
        .collect()
}

fn from_api(answer: &Value) -> BTreeMap<(i64, String, String), String> {
    answer["data"]
        .as_array()
        .expect("data")
        .iter()
        .map(|row| {
            let start = OffsetDateTime::parse(
                row["start"].as_str().expect("start"),
                &time::format_description::well_known::Rfc3339,
            )
            .expect("rfc3339")
            .unix_timestamp();
            let dim = row["dimensions"]
                .as_object()
                .and_then(|d| d.values().next())
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_owned();
            let customer = row["customer"].as_str().expect("customer").to_owned();
            (
                (start, customer, dim),
                row["value"].as_str().expect("value").to_owned(),
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn golden_totals_per_aggregation_dimension_and_time_zone() {
    let pipeline = Pipeline::new("golden");
    let events = stream(7, 3000, "g");
    let producer = producer();
    let mut instance = pipeline.start(0).await;
    produce(&producer, &pipeline.topic, &events).await;
    pipeline.wait_caught_up(Duration::from_secs(60)).await;

    for (meter, dim) in METERS {
        let zones: [(&str, &dyn Fn(i64) -> i64); 4] = [
            ("UTC", &fixed(0)),
            ("%2B02:00", &fixed(7200)),
            ("-05:00", &fixed(-18_000)),
            // A named zone across its spring clock change.
            ("Europe/Berlin", &berlin_day),
        ];
        for (tz, day_of) in zones {
            let group = dim.map_or("customer".to_owned(), |d| format!("customer,{d}"));
            let params = format!(
                "meter={meter}&window=DAY&tz={tz}&group_by={group}&from=2026-03-27T00:00:00Z&to=2026-04-02T00:00:00Z"
            );
            let got = from_api(&instance.usage(&params).await);
            let want = expected(&events, meter, day_of);
            assert!(!want.is_empty());
            assert_eq!(got, want, "{meter} by day in {tz}");
        }
    }
    // Days in UTC without dimensions come from the daily rollups: the same as the hours'
    // days summed over dimension values.
    for meter in ["requests", "tokens"] {
        let params = format!(
            "meter={meter}&window=DAY&tz=UTC&group_by=customer&from=2026-03-27T00:00:00Z&to=2026-04-02T00:00:00Z"
        );
        let got = from_api(&instance.usage(&params).await);
        let mut want: BTreeMap<(i64, String, String), Quantity> = BTreeMap::new();
        for ((day, customer, _), v) in expected(&events, meter, fixed(0)) {
            let sum = want.entry((day, customer, String::new())).or_default();
            *sum = sum.checked_add(v.parse().expect("q")).expect("sum");
        }
        let want: BTreeMap<_, String> = want.into_iter().map(|(k, v)| (k, v.to_string())).collect();
        assert!(!want.is_empty());
        assert_eq!(got, want, "{meter} by UTC day, dimensions summed");
    }
    // Berlin's March 29 is 23 hours, shown at the offset in force at each end.
    let berlin = instance
        .usage("meter=requests&window=DAY&tz=Europe/Berlin&from=2026-03-28T23:00:00Z&to=2026-03-30T22:00:00Z")
        .await;
    let bounds: Vec<(&str, &str)> = berlin["data"]
        .as_array()
        .expect("data")
        .iter()
        .map(|r| {
            (
                r["start"].as_str().expect("start"),
                r["end"].as_str().expect("end"),
            )
        })
        .collect();
    assert_eq!(
        bounds,
        [
            ("2026-03-29T00:00:00+01:00", "2026-03-30T00:00:00+02:00"),
            ("2026-03-30T00:00:00+02:00", "2026-03-31T00:00:00+02:00")
        ]
    );
    assert_eq!(berlin["tz"], "Europe/Berlin");
    // Days in a zone whose offset splits UTC hours are refused, naming the parameter.
    let (status, body) = get_with_key(
        &format!(
            "http://{}/v1/usage?meter=requests&window=DAY&tz=Asia/Kolkata",
            instance.addr
        ),
        Some("demo-key"),
    )
    .await;
    assert_eq!(status, 400, "{body}");
    assert!(
        body.contains("tz: Asia/Kolkata is +05:30 from UTC"),
        "{body}"
    );

    // Hours sum to the same totals as the one-window answer, and filters select.
    let hourly = instance
        .usage("meter=tokens&window=HOUR&customer=c1&filter%5Bmodel%5D=m1")
        .await;
    let hourly_sum =
        hourly["data"]
            .as_array()
            .expect("data")
            .iter()
            .fold(Quantity::ZERO, |s, r| {
                s.checked_add(r["value"].as_str().expect("v").parse().expect("q"))
                    .expect("sum")
            });
    let total = instance
        .usage("meter=tokens&customer=c1&filter=model:m1")
        .await;
    assert_eq!(
        total["data"][0]["value"].as_str().expect("v"),
        hourly_sum.to_string()
    );
    let want: Quantity = expected(&events, "tokens", fixed(0))
        .iter()
        .filter(|((_, c, d), _)| c == "c1" && d == "m1")
        .fold(Quantity::ZERO, |s, (_, v)| {
            s.checked_add(v.parse().expect("q")).expect("sum")
        });
    assert_eq!(hourly_sum, want);

    let (status, body) = get_with_key(
        &format!("http://{}/v1/usage?meter=tokens&window=WEEK", instance.addr),
        Some("demo-key"),
    )
    .await;
    assert_eq!(
        (status, body.as_str()),
        (
            400,
            r#"{"error":"window: must be HOUR, DAY, MONTH or absent"}"#
        )
    );
    let (status, _) = get_with_key(
        &format!("http://{}/v1/usage?meter=tokens", instance.addr),
        Some("acme-key"),
    )
    .await;
    assert_eq!(status, 200);
    let other = get_with_key(
        &format!("http://{}/v1/usage?meter=tokens", instance.addr),
        Some("acme-key"),
    )
    .await
    .1;
    assert_eq!(
        serde_json::from_str::<Value>(&other).expect("json")["data"],
        json!([]),
        "tenants see only their own usage"
    );
    assert_eq!(
        get(&format!("http://{}/v1/usage?meter=tokens", instance.addr))
            .await
            .0,
        401
    );
    instance.stop().await;
    pipeline.drop_database().await;
}

/// Every meter (one per aggregation) per hour, customer and dimension value equals the
/// independent computation, and `events_raw` holds each distinct event once.
async fn every_hour_exact_and_each_event_stored_once(
    pipeline: &Pipeline,
    instance: &Instance,
    events: &[Ev],
    when: &str,
) {
    for (meter, dim) in METERS {
        let group = dim.map_or("customer".to_owned(), |d| format!("customer,{d}"));
        let params = format!(
            "meter={meter}&window=HOUR&group_by={group}&from=2026-03-27T00:00:00Z&to=2026-04-02T00:00:00Z"
        );
        let got = from_api(&instance.usage(&params).await);
        let want = expected(events, meter, |t: i64| t.div_euclid(3600) * 3600);
        assert!(want.len() > 100, "{meter}: {} hours", want.len());
        assert_eq!(got, want, "{meter} per hour {when}");
    }
    let raw = clickhouse_sql(&format!(
        "SELECT count(), uniqExact(id) FROM {}.events_raw FORMAT TSV",
        pipeline.database
    ))
    .await
    .expect("raw count");
    let distinct = events.iter().map(|e| &e.id).collect::<BTreeSet<_>>().len();
    assert_eq!(
        raw.trim(),
        format!("{distinct}\t{distinct}"),
        "each event stored raw exactly once {when}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exactly_once_across_sigkills_at_random_points() {
    let pipeline = Pipeline::new("sigkill");
    let events = stream(42, 24_000, "k");
    let producer = producer();
    let mut rng = Rng(99);
    let chunks: Vec<&[Ev]> = events.chunks(3000).collect();
    let mut instance = pipeline.start(0).await;
    for (i, chunk) in chunks.iter().enumerate() {
        produce(&producer, &pipeline.topic, chunk).await;
        if i % 2 == 1 {
            tokio::time::sleep(Duration::from_millis(100 + rng.below(1200))).await;
            instance.kill().await;
            instance = pipeline.start(i + 1).await;
        }
    }
    pipeline.wait_caught_up(Duration::from_secs(120)).await;
    let got = api_totals(&instance, &["requests", "tokens", "active_users"]).await;
    assert_eq!(
        got,
        expected_totals(&events),
        "totals after 4 SIGKILLs must equal the independent computation"
    );
    // Every rollup, not only the totals: each meter (every aggregation) per hour, customer
    // and dimension value. Event times spread over 72 hours in every chunk, so most chunks
    // bring late events to hours flushed before a kill.
    every_hour_exact_and_each_event_stored_once(&pipeline, &instance, &events, "after 4 SIGKILLs")
        .await;
    // The daily rollups (written by the same inserts) hold what their hours hold, and so do
    // the daily unique states (kept apart, schema V13).
    let per_day = |table: &str, time: &str, values: &str| {
        format!(
            "SELECT tenant, customer, meter, toStartOfDay({time}) AS d, {values} \
             FROM {}.{table} \
             GROUP BY tenant, customer, meter, d ORDER BY tenant, customer, meter, d FORMAT TSV",
            pipeline.database
        )
    };
    let shared = "sumMerge(events), toString(sumMerge(value_sum)), \
                  toString(argMaxMerge(value_latest))";
    let unique = "uniqExactMerge(value_unique)";
    for (hours, days, values, least) in [
        ("rollups_hourly", "usage_daily", shared, 10),
        ("rollups_unique_hourly", "usage_unique_daily", unique, 2),
    ] {
        let hourly = clickhouse_sql(&per_day(hours, "hour", values))
            .await
            .expect("hourly");
        let daily = clickhouse_sql(&per_day(days, "day", values))
            .await
            .expect("daily");
        assert!(hourly.lines().count() >= least, "{hourly}");
        assert_eq!(daily, hourly, "{days} after 4 SIGKILLs");
    }
    instance.stop().await;
    pipeline.drop_database().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn poison_records_go_to_the_dead_letter_topic_and_the_partition_moves_on() {
    use rdkafka::producer::FutureRecord;
    let pipeline = Pipeline::new("poison");
    let producer = producer();
    let mut instance = pipeline.start(0).await;
    let good = stream(3, 50, "p");
    // Same key as good events of c0, so they share a partition with them.
    let poison: [(&str, &[u8]); 3] = [
        ("not-json", b"{{{ not json"),
        ("bad-value", br#"{"v":1,"tenant":"demo","id":"bad","customer":"c0","type":"completion","time":"2026-03-28T00:00:00Z","received_at":"2026-03-28T00:00:00Z","data":{"tokens":"lots","model":"m1"}}"#),
        ("wrong-version", br#"{"v":9,"tenant":"demo","id":"v9","customer":"c0","type":"request","time":"2026-03-28T00:00:00Z","received_at":"2026-03-28T00:00:00Z","data":{}}"#),
    ];
    produce(&producer, &pipeline.topic, &good[..25]).await;
    for (name, payload) in poison {
        producer
            .send(
                FutureRecord::to(&pipeline.topic)
                    .key("demo/c0")
                    .payload(payload),
                Duration::from_secs(10),
            )
            .await
            .unwrap_or_else(|(e, _)| panic!("produce {name}: {e}"));
    }
    produce(&producer, &pipeline.topic, &good[25..]).await;
    pipeline.wait_caught_up(Duration::from_secs(60)).await;
    assert_eq!(
        api_totals(&instance, &["requests", "tokens", "active_users"]).await,
        expected_totals(&good)
    );

    let metrics = get(&format!("http://{}/metrics", instance.addr)).await.1;
    let dead: Vec<&str> = metrics
        .lines()
        .filter(|l| l.starts_with("tally_aggregator_dead_lettered_total"))
        .collect();
    for reason in ["undecodable", "invalid", "version"] {
        assert!(
            dead.iter()
                .any(|l| l.contains(&format!("reason=\"{reason}\"")) && l.ends_with(" 1")),
            "{reason}: {dead:?}"
        );
    }
    let letters = read_dead_letters(&pipeline.dead_letter_topic(), &pipeline.topic).await;
    let reasons: BTreeSet<String> = letters.iter().map(|(r, _)| r.clone()).collect();
    assert_eq!(
        reasons,
        ["invalid", "undecodable", "version"]
            .iter()
            .map(|s| s.to_string())
            .collect()
    );
    assert!(
        letters
            .iter()
            .any(|(_, payload)| payload == b"{{{ not json"),
        "original bytes kept"
    );
    instance.stop().await;
    pipeline.drop_database().await;
}

/// Dead letters whose `source_topic` header names `source`: (reason, original payload).
async fn read_dead_letters(dlq: &str, source: &str) -> Vec<(String, Vec<u8>)> {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    use rdkafka::message::{Headers, Message};
    let (dlq, source) = (dlq.to_owned(), source.to_owned());
    tokio::task::spawn_blocking(move || {
        let ends = {
            let c: BaseConsumer = rdkafka::ClientConfig::new()
                .set("bootstrap.servers", brokers())
                .create()
                .expect("c");
            let md = c.fetch_metadata(None, Duration::from_secs(10)).expect("md");
            let t = md
                .topics()
                .iter()
                .find(|t| t.name() == dlq)
                .expect("dead-letter topic exists");
            t.partitions()
                .iter()
                .map(|p| {
                    (
                        p.id(),
                        c.fetch_watermarks(&dlq, p.id(), Duration::from_secs(10))
                            .expect("wm"),
                    )
                })
                .collect::<Vec<_>>()
        };
        let c: BaseConsumer = rdkafka::ClientConfig::new()
            .set("bootstrap.servers", brokers())
            .set("group.id", unique("dlq-reader"))
            .create()
            .expect("consumer");
        let mut tpl = rdkafka::TopicPartitionList::new();
        let mut remaining = 0;
        for (p, (low, high)) in &ends {
            tpl.add_partition_offset(&dlq, *p, rdkafka::Offset::Offset(*low))
                .expect("tpl");
            remaining += high - low;
        }
        c.assign(&tpl).expect("assign");
        let mut out = Vec::new();
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        while remaining > 0 && std::time::Instant::now() < deadline {
            let Some(Ok(m)) = c.poll(Duration::from_millis(200)) else {
                continue;
            };
            remaining -= 1;
            let header = |name: &str| {
                m.headers()
                    .and_then(|h| h.iter().find(|x| x.key == name))
                    .and_then(|x| x.value)
                    .map(|v| String::from_utf8_lossy(v).into_owned())
            };
            if header("source_topic").as_deref() == Some(source.as_str()) {
                out.push((
                    header("reason").unwrap_or_default(),
                    m.payload().unwrap_or_default().to_vec(),
                ));
            }
        }
        out
    })
    .await
    .expect("reader")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_member_s_partitions_move_to_the_survivor_and_totals_stay_exact() {
    let pipeline = Pipeline::new("rebalance");
    let events = stream(11, 12_000, "r");
    let producer = producer();
    let mut a = pipeline.start(0).await;
    let mut b = pipeline.start(1).await;
    produce(&producer, &pipeline.topic, &events[..6000]).await;
    wait_for_partitions(&a, |n| n > 0 && n < 4).await;
    wait_for_partitions(&b, |n| n > 0 && n < 4).await;
    b.kill().await;
    produce(&producer, &pipeline.topic, &events[6000..]).await;
    // Session timeout (10 s) plus a rejoin: the survivor ends up with every partition.
    wait_for_partitions(&a, |n| n == 4).await;
    pipeline.wait_caught_up(Duration::from_secs(120)).await;
    assert_eq!(
        api_totals(&a, &["requests", "tokens", "active_users"]).await,
        expected_totals(&events)
    );
    a.stop().await;
    pipeline.drop_database().await;
}

/// A member frozen (SIGSTOP) past its session timeout while it holds records it has not
/// flushed, then woken (SIGCONT): nothing is lost and nothing counted twice. On Apache Kafka
/// the group hands a frozen member's partitions to the others after the session timeout;
/// tansu 0.6.0 instead stalls the whole group until the member is back (the other member
/// loses its own partitions too), and the woken member's client then finds its session
/// expired, gives up its partitions (dropping what it held) and rejoins.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_frozen_past_its_session_and_woken_keeps_totals_exact() {
    let pipeline = Pipeline::new("frozen");
    // Batches held for 4 s, so the member surely holds some when it is frozen.
    pipeline.set_config(&format!(
        "{}\n[aggregator]\nflush_interval_ms = 4000\n",
        pipeline.config_text()
    ));
    let events = stream(31, 9000, "z");
    let producer = producer();
    let a = pipeline.start(0).await;
    let mut b = pipeline.start(1).await;
    wait_for_partitions(&a, |n| n > 0 && n < 4).await;
    wait_for_partitions(&b, |n| n > 0 && n < 4).await;
    produce(&producer, &pipeline.topic, &events[..3000]).await;
    pipeline.wait_caught_up(Duration::from_secs(60)).await;

    produce(&producer, &pipeline.topic, &events[3000..6000]).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    a.signal("STOP");
    let ends = watermarks(&pipeline.brokers, &pipeline.topic).await;
    let flushed = pipeline.checkpoints().await;
    assert!(
        ends.iter()
            .any(|(p, (_, high))| *high > 0 && flushed.get(p).is_none_or(|c| c + 1 < *high)),
        "records held unflushed when the member froze: ends {ends:?}, checkpoints {flushed:?}"
    );
    // Well past the session timeout (10 s).
    tokio::time::sleep(Duration::from_secs(20)).await;
    a.signal("CONT");
    // Time for the woken member to act on what it held before it learns it was evicted.
    tokio::time::sleep(Duration::from_secs(6)).await;
    produce(&producer, &pipeline.topic, &events[6000..]).await;
    pipeline.wait_caught_up(Duration::from_secs(120)).await;
    // Anything a member still held would be flushed within its 4 s interval.
    tokio::time::sleep(Duration::from_secs(5)).await;

    every_hour_exact_and_each_event_stored_once(
        &pipeline,
        &b,
        &events,
        "after a frozen member woke",
    )
    .await;
    drop(a);
    b.stop().await;
    pipeline.drop_database().await;
}

async fn assigned_partitions(i: &Instance) -> Option<u64> {
    let metrics = get(&format!("http://{}/metrics", i.addr)).await.1;
    metrics
        .lines()
        .find_map(|l| l.strip_prefix("tally_aggregator_assigned_partitions "))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .map(|v| v as u64)
}

async fn wait_for_partitions(i: &Instance, ok: impl Fn(u64) -> bool) {
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let n = assigned_partitions(i).await;
        if n.is_some_and(&ok) {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "partitions assigned: {n:?}\n{}",
            i.log_tail()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn members_leaving_gracefully_and_joining_mid_stream_keep_totals_exact() {
    let pipeline = Pipeline::new("membership");
    let events = stream(23, 15_000, "m");
    let producer = producer();
    let mut a = pipeline.start(0).await;
    let mut b = pipeline.start(1).await;
    let mut c = pipeline.start(2).await;
    produce(&producer, &pipeline.topic, &events[..5000]).await;
    for i in [&a, &b, &c] {
        wait_for_partitions(i, |n| n > 0).await;
    }
    c.stop().await;
    produce(&producer, &pipeline.topic, &events[5000..10_000]).await;
    let mut d = pipeline.start(3).await;
    produce(&producer, &pipeline.topic, &events[10_000..]).await;
    wait_for_partitions(&d, |n| n > 0).await;
    pipeline.wait_caught_up(Duration::from_secs(120)).await;
    assert_eq!(
        api_totals(&d, &["requests", "tokens", "active_users"]).await,
        expected_totals(&events)
    );
    for i in [&mut a, &mut b, &mut d] {
        i.stop().await;
    }
    pipeline.drop_database().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clickhouse_outage_mid_stream_loses_nothing_once_it_is_back() {
    let mut ch = TestClickHouse::start().await;
    let mut pipeline = Pipeline::new("outage");
    pipeline.clickhouse = ch.url();
    let events = stream(5, 12_000, "o");
    let producer = producer();
    let mut instance = pipeline.start(0).await;
    produce(&producer, &pipeline.topic, &events[..4000]).await;
    pipeline.wait_caught_up(Duration::from_secs(60)).await;

    ch.kill().await;
    // Idle, with no flush to fail: readyz asks ClickHouse itself.
    let (status, body) = get(&format!("http://{}/readyz", instance.addr)).await;
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("\"clickhouse\":false"), "{body}");
    produce(&producer, &pipeline.topic, &events[4000..8000]).await;
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while get(&format!("http://{}/readyz", instance.addr)).await.0 != 503 {
        assert!(
            std::time::Instant::now() < deadline,
            "readyz never reported the outage"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    ch.restart().await;
    produce(&producer, &pipeline.topic, &events[8000..]).await;
    pipeline.wait_caught_up(Duration::from_secs(120)).await;
    assert_eq!(
        get(&format!("http://{}/readyz", instance.addr)).await.0,
        200
    );
    assert_eq!(
        api_totals(&instance, &["requests", "tokens", "active_users"]).await,
        expected_totals(&events)
    );
    instance.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_changed_and_an_added_meter_are_rebuilt_from_raw_events_while_ingest_goes_on() {
    let pipeline = Pipeline::new("rebuild");
    let events = stream(31, 16_000, "b");
    let producer = producer();
    let mut old = pipeline.start(0).await;
    produce(&producer, &pipeline.topic, &events[..8000]).await;
    pipeline.wait_caught_up(Duration::from_secs(60)).await;

    // tokens loses its model dimension; a new meter counts completions per model.
    let changed = pipeline
        .config_text()
        .replace("value = \"tokens\"\ngroup_by = [\"model\"]", "value = \"tokens\"")
        + "\n[[meters]]\nkey = \"completions\"\nevent_type = \"completion\"\naggregation = \"COUNT\"\ngroup_by = [\"model\"]\n";
    assert!(
        !changed.contains("value = \"tokens\"\ngroup_by"),
        "the test edits the tokens meter"
    );
    pipeline.set_config(&changed);
    old.stop().await;
    let instance = pipeline.start(1).await;
    let rest = events[8000..].to_vec();
    let topic = pipeline.topic.clone();
    let ingest = tokio::spawn(async move {
        let producer = common::producer();
        for chunk in rest.chunks(1000) {
            produce(&producer, &topic, chunk).await;
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    });
    let first = pipeline.rebuild(&["tokens", "completions"]).await;
    assert!(
        first.contains("rebuilt tokens") && first.contains("rebuilt completions"),
        "{first}"
    );
    let counted: Vec<u64> = first
        .lines()
        .filter(|l| l.starts_with("rebuilt "))
        .filter_map(|l| {
            l.split(", ")
                .nth(1)?
                .strip_suffix(" event(s)")?
                .parse()
                .ok()
        })
        .collect();
    assert!(
        counted.len() == 2 && counted.iter().all(|&n| n > 0),
        "the first run counts the history: {first}"
    );
    ingest.await.expect("producer");
    pipeline.wait_caught_up(Duration::from_secs(60)).await;
    let again = pipeline.rebuild(&["tokens", "completions"]).await;
    assert!(
        again.contains("0 event(s)"),
        "a second run finds nothing left to count: {again}"
    );

    let want = expected_totals(&events);
    let got = api_totals(&instance, &["tokens"]).await;
    let want_tokens: BTreeMap<_, _> = want
        .iter()
        .filter(|((m, _), _)| m == "tokens")
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    assert_eq!(got, want_tokens);
    let url = format!(
        "http://{}/v1/usage?meter=tokens&group_by=model",
        instance.addr
    );
    let (status, body) = get_with_key(&url, Some("demo-key")).await;
    assert_eq!(
        (status, body.as_str()),
        (
            400,
            r#"{"error":"group_by: meter tokens has no dimension \"model\""}"#
        )
    );

    let mut completions: BTreeMap<(String, String), u64> = BTreeMap::new();
    let mut seen = BTreeSet::new();
    for e in events.iter().filter(|e| e.ty == "completion") {
        if seen.insert(e.id.clone()) {
            *completions
                .entry((
                    e.customer.clone(),
                    e.data["model"].as_str().expect("model").to_owned(),
                ))
                .or_default() += 1;
        }
    }
    let answer = instance
        .usage("meter=completions&group_by=customer,model")
        .await;
    let got: BTreeMap<(String, String), u64> = answer["data"]
        .as_array()
        .expect("data")
        .iter()
        .map(|r| {
            let key = (
                r["customer"].as_str().expect("c").to_owned(),
                r["dimensions"]["model"].as_str().expect("m").to_owned(),
            );
            (key, r["value"].as_str().expect("v").parse().expect("count"))
        })
        .collect();
    assert_eq!(got, completions);
    drop(instance);
    pipeline.drop_database().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_outage_mid_stream_is_waited_out_and_nothing_is_lost() {
    let mut broker = TestBroker::start().await;
    let mut pipeline = Pipeline::new("broker_down");
    pipeline.brokers = broker.addr();
    let events = stream(17, 9000, "d");
    let producer = producer_for(&broker.addr());
    let mut instance = pipeline.start(0).await;
    produce(&producer, &pipeline.topic, &events[..3000]).await;
    pipeline.wait_caught_up(Duration::from_secs(60)).await;

    broker.kill().await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        get(&format!("http://{}/healthz", instance.addr)).await.0,
        200,
        "the aggregator waits, it does not die"
    );
    broker.restart().await;
    produce(&producer, &pipeline.topic, &events[3000..]).await;
    pipeline.wait_caught_up(Duration::from_secs(120)).await;
    assert_eq!(
        api_totals(&instance, &["requests", "tokens", "active_users"]).await,
        expected_totals(&events)
    );
    instance.stop().await;
    pipeline.drop_database().await;
}
