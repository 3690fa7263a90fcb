//! Usage produced through the collector and the aggregator ends in the expected invoice
//! lines in ClickHouse and on the invoice-lines topic: the real collector (HTTP) and
//! aggregator run in-process against the local Kafka and ClickHouse, on a topic, group and
//! database of the test's own; events of last month's closed period are posted for three
//! customers (one plan all period, a plan change on a whole hour, a plan change inside an
//! hour), client retries among them; then the final invoice run runs as the CLI runs it.
//! The expected invoices are priced from the events the test sent, not from ClickHouse.

mod common;

use std::borrow::Cow;
use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::*;
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use rust_decimal::Decimal;
use serde_json::{json, Value};
use tally_aggregator::service::{Aggregator, Status};
use tally_rater::run::{billables, Billable, InvoiceRun};
use tally_rater::store::SubscriptionStore;
use tally_rater::subscription::{NewChange, SegmentRef};
use tally_rater::usage::UsageReader;
use tally_rater::{period_containing, Catalog, Interval, Invoice, Line, Notifier, Period, Segment};
use time::format_description::well_known::Rfc3339;
use time::{Date, OffsetDateTime};

const TENANT: &str = "demo";

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

/// Polls `f` every 100 ms until it is true or `within` passes.
async fn eventually<F, Fut>(within: Duration, mut f: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + within;
    loop {
        if f().await {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// How many messages `topic` holds (a blocking read, off the runtime's workers).
async fn size(topic: &str) -> i64 {
    let topic = topic.to_owned();
    tokio::task::spawn_blocking(move || topic_size(&topic))
        .await
        .expect("watermarks")
}

fn rfc3339(t: OffsetDateTime) -> String {
    t.format(&Rfc3339).expect("time")
}

/// One event as the test sends it.
#[derive(Debug, Clone)]
struct Sent {
    id: String,
    customer: String,
    ty: &'static str,
    time: OffsetDateTime,
    data: Value,
}

impl Sent {
    fn body(&self) -> Value {
        json!({"id": self.id, "customer": self.customer, "type": self.ty,
            "time": rfc3339(self.time), "data": self.data})
    }
}

/// A customer of the test: its plan segments over the period, as subscribed.
struct Customer {
    name: String,
    segments: Vec<SegmentRef>,
}

fn segment(from: OffsetDateTime, to: OffsetDateTime, plan: &str, version: u32) -> SegmentRef {
    SegmentRef {
        from,
        to,
        plan: plan.into(),
        version,
    }
}

/// The customer's events: eight slots spread over the period, each with a request, a
/// completion, a storage reading and a login; events on the period's edges (its first
/// instant and last nanosecond count, the instant before and its end do not); and around a
/// plan change, events on either side of the change instant.
fn events_for(c: &Customer, period: &Period, salt: i64) -> Vec<Sent> {
    let mut out = Vec::new();
    let mut push = |ty: &'static str, time: OffsetDateTime, data: Value| {
        let id = format!("{}-{}", c.name, out.len());
        out.push(Sent {
            id,
            customer: c.name.clone(),
            ty,
            time,
            data,
        });
    };
    let (start, end) = (period.start(), period.end());
    let slot = (end - start) / 8_i32;
    let users = ["u1", "u2", "u3", "u1", "u4"];
    let gbs = ["3", "7.25", "12", "1.5"];
    for k in 0..8i64 {
        let t = start + slot * (k as i32) + time::Duration::seconds(61 * salt + 37 * k + 13);
        push("request", t, json!({"endpoint": "/v1/chat"}));
        let tokens = if k == 3 {
            json!("12.5")
        } else {
            json!(1_000 + 137 * k + 1_000 * salt)
        };
        push(
            "completion",
            t + time::Duration::seconds(5),
            json!({"tokens": tokens, "model": "m1"}),
        );
        push(
            "storage",
            t + time::Duration::seconds(9),
            json!({"gb": gbs[((k + salt) % 4) as usize]}),
        );
        push(
            "login",
            t + time::Duration::seconds(11),
            json!({"user": users[((3 * k + salt) % 5) as usize]}),
        );
    }
    push("request", start, json!({"endpoint": "/v1/first"}));
    push(
        "completion",
        end - time::Duration::nanoseconds(1),
        json!({"tokens": 1, "model": "m1"}),
    );
    push("request", end, json!({"endpoint": "/v1/next-period"}));
    push(
        "request",
        start - time::Duration::seconds(1),
        json!({"endpoint": "/v1/before"}),
    );
    for s in &c.segments[1..] {
        let at = s.from;
        push("request", at, json!({"endpoint": "/v1/at-change"}));
        push(
            "storage",
            at - time::Duration::milliseconds(1),
            json!({"gb": "99"}),
        );
        push("login", at, json!({"user": "at-change"}));
    }
    out
}

/// Quantities by (customer, segment index) and meter, from the unique events alone: COUNT
/// of requests, SUM of tokens, LATEST storage reading by event time, UNIQUE_COUNT of users.
fn quantities(
    customers: &[Customer],
    unique_events: &[Sent],
) -> BTreeMap<(String, usize), BTreeMap<String, Decimal>> {
    let mut out: BTreeMap<(String, usize), BTreeMap<String, Decimal>> = BTreeMap::new();
    let mut latest: BTreeMap<(String, usize), OffsetDateTime> = BTreeMap::new();
    let mut users: BTreeMap<(String, usize), BTreeSet<String>> = BTreeMap::new();
    for e in unique_events {
        let c = customers
            .iter()
            .find(|c| c.name == e.customer)
            .expect("a test customer");
        let Some(seg) = c
            .segments
            .iter()
            .position(|s| s.from <= e.time && e.time < s.to)
        else {
            continue;
        };
        let key = (e.customer.clone(), seg);
        let m = out.entry(key.clone()).or_default();
        let number = |field: &str| -> Decimal {
            let v = &e.data[field];
            let text = v.as_str().map_or_else(|| v.to_string(), str::to_owned);
            text.parse().expect("a decimal")
        };
        match e.ty {
            "request" => *m.entry("requests".into()).or_default() += Decimal::ONE,
            "completion" => *m.entry("tokens".into()).or_default() += number("tokens"),
            "storage" => {
                assert!(
                    latest.get(&key) != Some(&e.time),
                    "no two readings at one instant: {e:?}"
                );
                if latest.get(&key).is_none_or(|t| e.time > *t) {
                    latest.insert(key.clone(), e.time);
                    m.insert("storage_gb".into(), number("gb"));
                }
            }
            "login" => {
                let set = users.entry(key).or_default();
                set.insert(e.data["user"].as_str().expect("user").to_owned());
                m.insert("active_users".into(), Decimal::from(set.len()));
            }
            other => panic!("unexpected type {other}"),
        }
    }
    for m in out.values_mut() {
        for v in m.values_mut() {
            *v = v.normalize();
        }
    }
    out
}

#[derive(Debug, clickhouse::Row, serde::Deserialize)]
struct StoredLine {
    invoice_id: String,
    line_no: u32,
    customer: String,
    period_start: u32,
    segment: i32,
    kind: String,
    charge: String,
    meter: String,
    quantity: String,
    amount: String,
    currency: String,
    line: String,
    layout: u8,
}

/// A stored line as compared: decimals as numbers, the line's JSON parsed.
type LineView = (
    String,
    u32,
    String,
    u32,
    i32,
    String,
    String,
    String,
    Option<Decimal>,
    Decimal,
    String,
    Line,
);

fn expected_lines(invoices: &BTreeMap<String, Invoice>) -> Vec<LineView> {
    let mut out = Vec::new();
    for (id, inv) in invoices {
        for (n, l) in inv.lines.iter().enumerate() {
            out.push((
                id.clone(),
                n as u32,
                inv.customer.clone(),
                inv.period_start.unix_timestamp() as u32,
                l.segment.map_or(-1, |s| s as i32),
                l.kind.name().to_owned(),
                l.charge.clone().unwrap_or_default(),
                l.meter.clone().unwrap_or_default(),
                l.quantity,
                l.amount,
                inv.currency.to_string(),
                l.clone(),
            ));
        }
    }
    out
}

fn stored_view(rows: Vec<StoredLine>) -> Vec<LineView> {
    rows.into_iter()
        .map(|r| {
            let quantity =
                (!r.quantity.is_empty()).then(|| r.quantity.parse::<Decimal>().expect("quantity"));
            let line = tally_rater::run::StoredLine {
                segment: r.segment,
                kind: r.kind.clone(),
                charge: r.charge.clone(),
                meter: r.meter.clone(),
                quantity: r.quantity.clone(),
                amount: r.amount.clone(),
                line: r.line.clone(),
                layout: r.layout,
            }
            .to_line()
            .expect("a stored line");
            (
                r.invoice_id,
                r.line_no,
                r.customer,
                r.period_start,
                r.segment,
                r.kind,
                r.charge,
                r.meter,
                quantity,
                r.amount.parse().expect("amount"),
                r.currency,
                line,
            )
        })
        .collect()
}

/// The message the topic must hold for line `n` of invoice `id`.
fn message(id: &str, inv: &Invoice, n: usize) -> Value {
    json!({
        "line_id": format!("{id}#{n}"),
        "invoice_id": id,
        "tenant": TENANT,
        "customer": inv.customer,
        "period_start": rfc3339(inv.period_start),
        "period_end": rfc3339(inv.period_end),
        "currency": inv.currency.to_string(),
        "line_no": n,
        "lines": inv.lines.len(),
        "line": serde_json::to_value(&inv.lines[n]).expect("line"),
        "subtotal": inv.subtotal.to_string(),
        "total": inv.total.to_string(),
    })
}

/// The first day of the month before the one holding `day`.
fn previous_month_start(day: Date) -> Date {
    day.replace_day(1)
        .expect("day 1")
        .previous_day()
        .expect("a previous day")
        .replace_day(1)
        .expect("day 1")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn usage_through_the_pipeline_ends_in_the_expected_invoice_lines() {
    let db = fresh_database("pipeline").await;
    let plans: Catalog = catalog();
    let now = OffsetDateTime::now_utc();

    // Last calendar month (the one before, in a month's first three days): closed, and past
    // the CLI's default grace of 24 hours.
    let anchor = previous_month_start((now - time::Duration::days(3)).date())
        .midnight()
        .assume_utc();
    let period = period_containing(anchor, Interval::Monthly, anchor).expect("period");
    let grace = time::Duration::hours(24);
    assert!(period.end() + grace <= now, "{period:?} is closed");
    let (start, end) = (period.start(), period.end());

    // Alice: starter all period. Bob: starter, then pro v1 from a whole hour (usage read
    // from the hourly rollups). Carol: pro v1, then pro v2 from an instant inside an hour
    // (usage read from the raw events).
    let bob_change = start + time::Duration::days(12);
    let carol_change = start + time::Duration::days(20) + time::Duration::seconds(37 * 60 + 11);
    let customers = vec![
        Customer {
            name: unique("alice"),
            segments: vec![segment(start, end, "starter", 1)],
        },
        Customer {
            name: unique("bob"),
            segments: vec![
                segment(start, bob_change, "starter", 1),
                segment(bob_change, end, "pro", 1),
            ],
        },
        Customer {
            name: unique("carol"),
            segments: vec![
                segment(start, carol_change, "pro", 1),
                segment(carol_change, end, "pro", 2),
            ],
        },
    ];
    let store = SubscriptionStore::new(&db).with_timeout(Duration::from_secs(30));
    for c in &customers {
        let first = &c.segments[0];
        store
            .record(
                &plans,
                NewChange::create(TENANT, &c.name, &first.plan, start)
                    .version(first.version)
                    .anchor(anchor)
                    .actor("test")
                    .reason("pipeline test"),
            )
            .await
            .expect("subscribe");
        for s in &c.segments[1..] {
            store
                .record(
                    &plans,
                    NewChange::change(TENANT, &c.name, &s.plan, s.from)
                        .version(s.version)
                        .actor("test")
                        .reason("pipeline test"),
                )
                .await
                .expect("plan change");
        }
    }

    // The pipeline's config: the dev config on the test's database, topic and group, with
    // last month's events within the allowed lateness (the collector refuses older ones).
    let mut config = config();
    let kafka = kafka();
    config.kafka.brokers = kafka.brokers.clone();
    config.clickhouse = db.clone();
    config.collector.listen = "127.0.0.1:0".into();
    config.collector.shutdown_grace_secs = 5;
    config.kafka.topic = unique("test-rater-pipeline");
    config.kafka.partitions = kafka.partitions;
    config.kafka.health_interval_ms = 200;
    config.kafka.message_timeout_ms = 3000;
    config.aggregator.group_id = unique("test-rater-pipeline-aggregator");
    config.aggregator.dead_letter_topic = unique("test-rater-pipeline-dead-letter");
    config.aggregator.flush_interval_ms = 200;
    let lateness = 100 * 24 * 3600;
    config.validation.allowed_lateness_secs = lateness;
    config.aggregator.dedupe_window_secs = config.aggregator.dedupe_window_secs.max(lateness);
    assert!(
        (now - (start - time::Duration::seconds(1))).whole_seconds() < lateness as i64,
        "the oldest event is within the allowed lateness"
    );
    for topic in [&config.kafka.topic, &config.aggregator.dead_letter_topic] {
        tally_service::ensure_topic(&config.kafka, topic)
            .await
            .expect("topic");
    }

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

    // Every customer's events, interleaved and out of time order (so LATEST must go by event
    // time, not arrival), in batches of ten; then client retries, same ids and bodies: the
    // first batch again, and three events singly.
    let mut unique_events: Vec<Sent> = customers
        .iter()
        .enumerate()
        .flat_map(|(i, c)| events_for(c, &period, i as i64))
        .collect();
    let n = unique_events.len();
    let mut order: Vec<usize> = (0..n).collect();
    order.sort_by_key(|&i| (i * 7_919) % n);
    unique_events = order.iter().map(|&i| unique_events[i].clone()).collect();
    let ids: BTreeSet<(&str, &str)> = unique_events
        .iter()
        .map(|e| (e.customer.as_str(), e.id.as_str()))
        .collect();
    assert_eq!(ids.len(), n, "ids are unique per customer");
    let batches: Vec<Value> = unique_events
        .chunks(10)
        .map(|b| Value::Array(b.iter().map(Sent::body).collect()))
        .collect();
    for b in &batches {
        post_accepted(addr, b).await;
    }
    let mut posted = n;
    post_accepted(addr, &batches[0]).await;
    posted += 10;
    for e in [
        &unique_events[3],
        &unique_events[n / 2],
        &unique_events[n - 1],
    ] {
        post_accepted(addr, &e.body()).await;
        posted += 1;
    }

    // The collector forwards every accepted event, retries included (the producer may add
    // copies of its own, which the aggregator drops as well); the aggregator has read them
    // all once its checkpoints reach the end of each partition.
    let topic = config.kafka.topic.clone();
    let sql = format!(
        "SELECT toUInt64(sum(last + 1)) FROM (SELECT kafka_partition, max(kafka_offset) AS last \
         FROM aggregator_checkpoints WHERE topic = '{topic}' GROUP BY kafka_partition)"
    );
    let (d, s, t) = (&db, sql.as_str(), topic.as_str());
    let flushed = eventually(Duration::from_secs(30), move || async move {
        let on_topic = size(t).await;
        on_topic >= posted as i64 && count(d, s).await == on_topic as u64
    })
    .await;
    assert!(
        flushed,
        "{posted} events on the topic and flushed within 30 s: {} on the topic, {} flushed",
        size(&topic).await,
        count(&db, &sql).await
    );
    assert_eq!(
        count(&db, "SELECT count() FROM events_raw").await,
        n as u64,
        "each unique event stored once, retries dropped"
    );
    assert_eq!(
        size(&config.aggregator.dead_letter_topic).await,
        0,
        "nothing dead-lettered"
    );

    // The final run, as `tally-rater invoice --mode final` runs it.
    let at = start + time::Duration::days(14);
    let (batches, refused) = billables(&store, &plans, TENANT, at, 10_000)
        .await
        .expect("billables");
    assert!(refused.is_empty(), "{refused:?}");
    let batch: Vec<Billable> = batches.into_iter().flatten().collect();
    let want_batch: Vec<Billable> = {
        let mut b: Vec<Billable> = customers
            .iter()
            .map(|c| Billable {
                customer: c.name.clone(),
                period,
                segments: c.segments.clone(),
                previous: None,
            })
            .collect();
        b.sort_by(|x, y| x.customer.cmp(&y.customer));
        b
    };
    assert_eq!(
        batch, want_batch,
        "each customer's period and plan segments"
    );
    let (closed, open): (Vec<Billable>, Vec<Billable>) = batch
        .into_iter()
        .partition(|b| b.period.end() + grace <= now);
    assert!(open.is_empty(), "{open:?}");
    let invoice_topic = unique("test-rater-pipeline-invoice-lines");
    let reader = UsageReader::new(&db, config.catalog(), config.validation.max_dimension_chars);
    let run = InvoiceRun::new(&db, reader)
        .with_publisher(Notifier::new(&kafka, &invoice_topic).expect("producer"));
    let finalized = run
        .finalize(&plans, TENANT, &closed)
        .await
        .expect("final run");

    // The invoices priced from the events the test sent.
    let usage = quantities(&customers, &unique_events);
    for c in &customers {
        for i in 0..c.segments.len() {
            let meters: Vec<&String> = usage[&(c.name.clone(), i)].keys().collect();
            assert_eq!(
                meters,
                ["active_users", "requests", "storage_gb", "tokens"],
                "every meter has usage in segment {i} of {}",
                c.name
            );
        }
    }
    let want: BTreeMap<String, Invoice> = customers
        .iter()
        .map(|c| {
            let segments: Vec<Segment<'_>> = c
                .segments
                .iter()
                .enumerate()
                .map(|(i, s)| Segment {
                    from: s.from,
                    to: s.to,
                    plan: plans.version(&s.plan, s.version).expect("plan"),
                    usage: Cow::Borrowed(&usage[&(c.name.clone(), i)]),
                })
                .collect();
            let inv = Invoice::compute(&c.name, &period, &segments).expect("invoice");
            let id = format!("{TENANT}/{}/{}", c.name, start.unix_timestamp());
            (id, inv)
        })
        .collect();
    let lines: usize = want.values().map(|i| i.lines.len()).sum();
    assert_eq!(
        (
            finalized.written,
            finalized.already_final,
            finalized.published,
            finalized.published_lines,
            finalized.refused.len()
        ),
        (3, 0, 3, lines, 0),
        "refused: {:?}",
        finalized.refused
    );
    let got: BTreeMap<String, Invoice> = finalized
        .invoices
        .iter()
        .cloned()
        .map(|i| {
            let id = format!(
                "{TENANT}/{}/{}",
                i.customer,
                i.period_start.unix_timestamp()
            );
            (id, i)
        })
        .collect();
    assert_eq!(got, want, "the final invoices");
    let mut got_json = jsons(&finalized);
    got_json.sort();
    let mut want_json: Vec<String> = want
        .values()
        .map(|i| serde_json::to_string(i).expect("json"))
        .collect();
    want_json.sort();
    assert_eq!(got_json, want_json, "the final invoices, byte for byte");

    // ClickHouse: exactly the expected lines, once each.
    let rows: Vec<StoredLine> = tally_aggregator::migrate::client(&db)
        .query(
            "SELECT invoice_id, line_no, customer, toUInt32(period_start) AS period_start, \
             segment, kind, charge, meter, quantity, amount, currency, line, layout \
             FROM invoice_lines WHERE tenant = 'demo' ORDER BY invoice_id, line_no",
        )
        .fetch_all()
        .await
        .expect("invoice lines");
    assert_eq!(stored_view(rows), expected_lines(&want), "invoice_lines");
    assert_eq!(count(&db, "SELECT count() FROM invoices").await, 3);

    // The topic: one message per line, keyed by invoice id, each invoice's lines in order.
    let t = invoice_topic.clone();
    let messages = tokio::task::spawn_blocking(move || read_topic(&t, lines))
        .await
        .expect("read topic");
    let mut by_invoice: BTreeMap<String, Vec<Value>> = BTreeMap::new();
    for (key, m) in messages {
        by_invoice.entry(key).or_default().push(m);
    }
    assert_eq!(
        by_invoice.keys().collect::<Vec<_>>(),
        want.keys().collect::<Vec<_>>()
    );
    for (id, got) in &by_invoice {
        let inv = &want[id];
        let expect: Vec<Value> = (0..inv.lines.len()).map(|n| message(id, inv, n)).collect();
        assert_eq!(got, &expect, "the messages of {id}");
    }

    // Run again: everything is final and published; nothing is written or sent twice.
    let again = run
        .finalize(&plans, TENANT, &closed)
        .await
        .expect("final run again");
    assert_eq!(
        (again.written, again.already_final, again.published),
        (0, 3, 0)
    );
    assert_eq!(jsons(&again), jsons(&finalized), "byte-identical");
    assert_eq!(
        count(&db, "SELECT count() FROM invoice_lines").await,
        lines as u64
    );
    assert_eq!(
        size(&invoice_topic).await,
        lines as i64,
        "nothing published twice"
    );

    tokio::time::timeout(Duration::from_secs(30), collector.shutdown())
        .await
        .expect("collector stops within 30 s");
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
