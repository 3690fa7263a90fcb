//! Invoice runs against the real local ClickHouse: previews priced from the aggregator's
//! tables equal invoices priced from the events themselves, a final run stores each
//! invoice once and returns the same bytes when run again, and final invoices reach the
//! invoice-lines topic once each, also when the broker was down for the run that stored them.

mod common;

use std::borrow::Cow;
use std::collections::BTreeMap;

use common::*;
use tally_rater::run::{Billable, InvoiceRun};
use tally_rater::subscription::SegmentRef;
use tally_rater::usage::{UsageReader, UsageRequest};
use tally_rater::{period_containing, Catalog, Interval, Invoice, Line, LineKind, Segment};
use time::macros::datetime;

fn plans() -> Catalog {
    Catalog::load_dir(std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../config/plans"))
        .expect("plans")
}

/// A private database holding [`events`], and a usage reader over it.
async fn usage_database(name: &str) -> (tally_core::config::ClickHouseConfig, UsageReader) {
    let db = fresh_database(name).await;
    write(&db, &events()).await;
    let config = config();
    let reader = UsageReader::new(&db, config.catalog(), config.validation.max_dimension_chars);
    (db, reader)
}

/// Records a subscription from `start`, and its cancel at `cancel` if given.
async fn subscribe(
    store: &tally_rater::store::SubscriptionStore,
    customer: &str,
    (plan, version): (&str, u32),
    start: time::OffsetDateTime,
    cancel: Option<time::OffsetDateTime>,
) {
    use tally_rater::subscription::NewChange;
    let plans = plans();
    store
        .record(
            &plans,
            NewChange::create("demo", customer, plan, start).version(version),
        )
        .await
        .expect("subscribe");
    if let Some(at) = cancel {
        store
            .record(&plans, NewChange::cancel("demo", customer, at))
            .await
            .expect("cancel");
    }
}

fn segment(
    from: time::OffsetDateTime,
    to: time::OffsetDateTime,
    plan: &str,
    version: u32,
) -> SegmentRef {
    SegmentRef {
        from,
        to,
        plan: plan.into(),
        version,
    }
}

#[tokio::test]
async fn previews_price_the_stored_usage_and_finals_are_stored_once() {
    let (db, reader) = usage_database("invoices").await;
    let events = events();
    let run = InvoiceRun::new(&db, reader);
    let plans = plans();

    let anchor = datetime!(2026-01-01 0:00 UTC);
    let period = period_containing(anchor, Interval::Monthly, datetime!(2026-10-15 0:00 UTC))
        .expect("period");
    let (start, end) = (period.start(), period.end());
    let change = datetime!(2026-10-05 10:30:00.000000001 UTC);
    let batch = vec![
        Billable {
            customer: "alpha".into(),
            period,
            segments: vec![segment(start, end, "starter", 1)],
            previous: None,
        },
        // An upgrade inside an hour: usage split at the instant, each part priced by its plan.
        Billable {
            customer: "beta".into(),
            period,
            segments: vec![
                segment(start, change, "starter", 1),
                segment(change, end, "pro", 2),
            ],
            previous: None,
        },
        Billable {
            customer: "it's".into(),
            period,
            segments: vec![segment(start, end, "pro", 1)],
            previous: None,
        },
        Billable {
            customer: "gamma?".into(),
            period,
            segments: vec![segment(start, end, "pro", 9)],
            previous: None,
        },
    ];

    // The same invoices, priced from usage computed from the events alone.
    let requests: Vec<UsageRequest> = batch
        .iter()
        .map(|b| UsageRequest {
            customer: b.customer.clone(),
            bounds: std::iter::once(b.segments[0].from)
                .chain(b.segments.iter().map(|s| s.to))
                .collect(),
        })
        .collect();
    let usage = expected(&events, &requests);
    let expect: BTreeMap<String, Invoice> = batch
        .iter()
        .filter(|b| b.customer != "gamma?")
        .map(|b| {
            let segments: Vec<Segment<'_>> = b
                .segments
                .iter()
                .enumerate()
                .map(|(i, s)| Segment {
                    from: s.from,
                    to: s.to,
                    plan: plans.version(&s.plan, s.version).expect("plan"),
                    usage: usage
                        .get(&(b.customer.clone(), i))
                        .map_or_else(Cow::default, Cow::Borrowed),
                })
                .collect();
            let inv = Invoice::compute(&b.customer, &period, &segments).expect("invoice");
            (b.customer.clone(), inv)
        })
        .collect();

    let preview = run.preview(&plans, "demo", &batch).await.expect("preview");
    let got: BTreeMap<String, Invoice> = preview
        .invoices
        .iter()
        .map(|i| (i.customer.clone(), i.clone()))
        .collect();
    assert_eq!(got, expect);
    assert!(got["beta"].lines.iter().any(|l| l.segment == Some(1)));
    assert_eq!(preview.refused.len(), 1);
    assert!(
        preview.refused[0].1.contains("no version 9"),
        "{:?}",
        preview.refused
    );
    assert_eq!(
        count(&db, "SELECT count() FROM invoices").await,
        0,
        "a preview stores nothing"
    );

    // Batch by batch, with more batches than reads kept under way: each handed over in
    // order, priced as the one preview priced it.
    let singles: Vec<Vec<Billable>> = batch.iter().map(|b| vec![b.clone()]).collect();
    assert!(singles.len() > tally_rater::run::PREVIEW_READS);
    let mut handed = Vec::new();
    run.previews(&plans, "demo", &singles, |p| {
        handed.push((p.invoices, p.refused.len()))
    })
    .await
    .expect("previews");
    assert_eq!(handed.len(), singles.len());
    for ((invoices, refused), single) in handed.into_iter().zip(&singles) {
        let customer = &single[0].customer;
        match expect.get(customer) {
            Some(want) => assert_eq!((invoices, refused), (vec![want.clone()], 0)),
            None => assert_eq!((invoices.len(), refused), (0, 1), "{customer}"),
        }
    }

    let first = run.finalize(&plans, "demo", &batch).await.expect("final");
    assert_eq!((first.written, first.already_final), (3, 0));
    let lines: usize = expect.values().map(|i| i.lines.len()).sum();
    assert_eq!(
        count(&db, "SELECT count() FROM invoice_lines").await,
        lines as u64
    );
    let stored: Vec<String> = expect
        .values()
        .map(|i| serde_json::to_string(i).expect("json"))
        .collect();
    let mut first_json = jsons(&first);
    first_json.sort();
    let mut want = stored.clone();
    want.sort();
    assert_eq!(first_json, want);
    for json in jsons(&first) {
        let back: Invoice = serde_json::from_str(&json).expect("a stored invoice reads back");
        assert_eq!(serde_json::to_string(&back).expect("json"), json);
        assert!(back.to_csv().lines().count() == back.lines.len() + 1);
    }

    // Late usage after the period closed does not change a final invoice...
    let late = vec![
        Ev {
            id: "late-1".into(),
            customer: "alpha",
            ty: "request",
            time: datetime!(2026-10-20 8:00 UTC),
            value: "/v1/late",
        },
        Ev {
            id: "late-2".into(),
            customer: "alpha",
            ty: "completion",
            time: datetime!(2026-10-20 8:00:01 UTC),
            value: "1000",
        },
    ];
    write(&db, &late).await;
    let again = run
        .finalize(&plans, "demo", &batch)
        .await
        .expect("final again");
    assert_eq!((again.written, again.already_final), (0, 3));
    assert_eq!(jsons(&again), jsons(&first), "byte-identical");
    assert_eq!(count(&db, "SELECT count() FROM invoices").await, 3);
    assert_eq!(
        count(&db, "SELECT count() FROM invoice_lines").await,
        lines as u64
    );

    // ...it becomes adjustment lines on the next one: the request costs nothing (inside
    // starter's allowance), the 1,000 tokens one more package of 0.02.
    let november: Vec<Billable> = batch
        .iter()
        .map(|b| {
            let next = b.period.next().expect("next period");
            let last = b.segments.last().expect("segments");
            Billable {
                customer: b.customer.clone(),
                period: next,
                segments: vec![segment(next.start(), next.end(), &last.plan, last.version)],
                previous: None,
            }
        })
        .collect();
    let nov = run
        .finalize(&plans, "demo", &november)
        .await
        .expect("november");
    assert_eq!(nov.written, 3);
    let invoices: BTreeMap<String, Invoice> = nov
        .invoices
        .iter()
        .cloned()
        .map(|i| (i.customer.clone(), i))
        .collect();
    let adjust = |c: &str| -> Vec<(String, Option<String>, String)> {
        invoices[c]
            .lines
            .iter()
            .filter(|l| l.kind == LineKind::Adjustment)
            .map(|l| {
                (
                    l.charge.clone().unwrap_or_default(),
                    l.quantity.map(|q| q.to_string()),
                    l.amount.to_string(),
                )
            })
            .collect()
    };
    assert_eq!(
        adjust("alpha"),
        [
            (
                "requests".to_owned(),
                Some("1".to_owned()),
                "0.00".to_owned()
            ),
            (
                "tokens".to_owned(),
                Some("1000".to_owned()),
                "0.02".to_owned()
            ),
        ]
    );
    let alpha = &invoices["alpha"];
    assert!(alpha
        .lines
        .iter()
        .filter(|l| l.kind == LineKind::Adjustment)
        .all(|l| l.adjusts.as_deref() == Some("demo/alpha/1790812800")));
    assert_eq!(
        alpha.total - alpha.subtotal,
        "0.02".parse().expect("decimal")
    );
    assert!(adjust("beta").is_empty() && adjust("it's").is_empty());
    let nov_again = run
        .finalize(&plans, "demo", &november)
        .await
        .expect("november again");
    assert_eq!(jsons(&nov_again), jsons(&nov));

    drop_database(&db).await;
}

#[tokio::test]
async fn final_invoices_reach_the_topic_once_each() {
    let (db, reader) = usage_database("publish").await;
    let plans = plans();
    let topic = unique("test-invoice-lines");
    let period = period_containing(
        datetime!(2026-01-01 0:00 UTC),
        Interval::Monthly,
        datetime!(2026-10-15 0:00 UTC),
    )
    .expect("period");
    let billable = |customer: &str, plan: &str, version: u32| Billable {
        customer: customer.into(),
        period,
        segments: vec![segment(period.start(), period.end(), plan, version)],
        previous: None,
    };
    let batch = vec![billable("alpha", "starter", 1), billable("beta", "pro", 2)];

    // The broker is down: the run stores the invoices, then fails to publish them.
    let mut dead = kafka();
    dead.brokers = "127.0.0.1:1".into(); // nothing listens on port 1
    dead.message_timeout_ms = 1000;
    let down = InvoiceRun::new(&db, reader.clone())
        .with_publisher(tally_rater::Notifier::new(&dead, &topic).expect("producer"));
    let e = down
        .finalize(&plans, "demo", &batch)
        .await
        .expect_err("publishing fails");
    assert!(e.is_retryable(), "{e}");
    assert_eq!(count(&db, "SELECT count() FROM invoices").await, 2);
    assert_eq!(
        count(&db, "SELECT count() FROM invoice_publications").await,
        0
    );

    // The next run finds them final and not published: it publishes them as stored.
    let publishing = InvoiceRun::new(&db, reader.clone())
        .with_publisher(tally_rater::Notifier::new(&kafka(), &topic).expect("producer"));
    let second = publishing
        .finalize(&plans, "demo", &batch)
        .await
        .expect("final again");
    let invoices: BTreeMap<String, Invoice> = second
        .invoices
        .iter()
        .cloned()
        .map(|i| {
            (
                format!("demo/{}/{}", i.customer, i.period_start.unix_timestamp()),
                i,
            )
        })
        .collect();
    let lines: usize = invoices.values().map(|i| i.lines.len()).sum();
    assert_eq!(
        (
            second.written,
            second.already_final,
            second.published,
            second.published_lines
        ),
        (0, 2, 2, lines)
    );
    let messages = read_topic(&topic, lines);
    let mut by_invoice: BTreeMap<String, Vec<serde_json::Value>> = BTreeMap::new();
    for (key, m) in messages {
        assert_eq!(m["invoice_id"], key.as_str(), "keyed by invoice id: {m}");
        by_invoice.entry(key).or_default().push(m);
    }
    assert_eq!(
        by_invoice.keys().collect::<Vec<_>>(),
        invoices.keys().collect::<Vec<_>>()
    );
    for (id, got) in &by_invoice {
        let inv = &invoices[id];
        assert_eq!(got.len(), inv.lines.len(), "every line of {id}");
        for (n, m) in got.iter().enumerate() {
            // One partition per invoice: its lines arrive in order.
            assert_eq!(m["line_no"], n, "{m}");
            assert_eq!(m["line_id"], format!("{id}#{n}").as_str());
            assert_eq!(m["lines"], inv.lines.len());
            assert_eq!(m["tenant"], "demo");
            assert_eq!(m["customer"], inv.customer.as_str());
            assert_eq!(m["currency"], inv.currency.to_string().as_str());
            assert_eq!(m["subtotal"], inv.subtotal.to_string().as_str());
            assert_eq!(m["total"], inv.total.to_string().as_str());
            assert_eq!(
                m["line"],
                serde_json::to_value(&inv.lines[n]).expect("line"),
                "line {n} of {id} as stored"
            );
        }
    }
    assert_eq!(
        count(&db, "SELECT count() FROM invoice_publications").await,
        2
    );

    // Published invoices are not published again; a new one is, alone.
    let third = publishing
        .finalize(&plans, "demo", &batch)
        .await
        .expect("third");
    assert_eq!((third.already_final, third.published), (2, 0));
    assert_eq!(jsons(&third), jsons(&second), "byte-identical");
    assert_eq!(topic_size(&topic), lines as i64, "nothing sent twice");
    let mut more = batch.clone();
    more.push(billable("it's", "pro", 1));
    let fourth = publishing
        .finalize(&plans, "demo", &more)
        .await
        .expect("fourth");
    assert_eq!((fourth.written, fourth.published), (1, 1));
    assert_eq!(
        topic_size(&topic),
        (lines + fourth.published_lines) as i64,
        "only the new invoice's lines"
    );
    drop_database(&db).await;
}

/// A ClickHouse string literal.
fn lit(s: &str) -> String {
    format!("'{}'", s.replace('\\', "\\\\").replace('\'', "\\'"))
}

/// `priced` as an earlier run issued it: with an adjustment line that pricing does not give
/// now, so it can only come back by being read.
fn issued(priced: &Invoice, amount: &str, adjusts: &str) -> Invoice {
    let mut old = priced.clone();
    let mut extra = old.lines[0].clone();
    extra.kind = LineKind::Adjustment;
    extra.segment = None;
    extra.amount = amount.parse().expect("decimal");
    extra.adjusts = Some(adjusts.into());
    old.total += extra.amount;
    old.lines.push(extra);
    old
}

/// The statements that store `inv` as `customer`'s invoice `id` the way an earlier layout
/// did: `head` as the header's JSON, `line` giving each line's, under run id `run` (empty
/// before V8).
fn old_rows(
    customer: &str,
    id: &str,
    (start, end): (i64, i64),
    inv: &Invoice,
    head: String,
    line: impl Fn(&Line) -> String,
    run: &str,
) -> Vec<String> {
    let mut out = vec![format!(
        "INSERT INTO invoices (tenant, customer, invoice_id, period_start, period_end, currency, \
         subtotal, total, invoice, finalized_at, run_id) VALUES ('demo', {}, {}, {start}, {end}, \
         'USD', {}, {}, {}, now(), {})",
        lit(customer),
        lit(id),
        lit(&inv.subtotal.to_string()),
        lit(&inv.total.to_string()),
        lit(&head),
        lit(run),
    )];
    for (n, l) in inv.lines.iter().enumerate() {
        out.push(format!(
            "INSERT INTO invoice_lines (tenant, customer, invoice_id, period_start, line_no, \
             segment, kind, charge, meter, quantity, amount, currency, line, run_id) VALUES \
             ('demo', {}, {}, {start}, {n}, {}, {}, {}, {}, {}, {}, 'USD', {}, {})",
            lit(customer),
            lit(id),
            l.segment.map_or(-1, |s| s as i32),
            lit(l.kind.name()),
            lit(l.charge.as_deref().unwrap_or_default()),
            lit(l.meter.as_deref().unwrap_or_default()),
            lit(&l.quantity.map(|q| q.to_string()).unwrap_or_default()),
            lit(&l.amount.to_string()),
            lit(&line(l)),
            lit(run),
        ));
    }
    out
}

#[tokio::test]
async fn invoices_stored_in_earlier_layouts_and_lines_left_by_a_dead_run_read_right() {
    let (db, reader) = usage_database("layouts").await;
    let run = InvoiceRun::new(&db, reader);
    let plans = plans();
    let period = period_containing(
        datetime!(2026-01-01 0:00 UTC),
        Interval::Monthly,
        datetime!(2026-10-15 0:00 UTC),
    )
    .expect("period");
    let start = period.start().unix_timestamp();
    let billable = |customer: &str, plan: &str, version: u32| Billable {
        customer: customer.into(),
        period,
        segments: vec![segment(period.start(), period.end(), plan, version)],
        previous: None,
    };
    let batch = vec![
        billable("alpha", "starter", 1),
        billable("beta", "pro", 2),
        billable("gamma", "pro", 2),
    ];
    let priced: BTreeMap<String, Invoice> = run
        .preview(&plans, "demo", &batch)
        .await
        .expect("preview")
        .invoices
        .into_iter()
        .map(|i| (i.customer.clone(), i))
        .collect();
    let client = tally_aggregator::migrate::client(&db);
    let exec = |sql: String| {
        let client = client.clone();
        async move { client.query(&sql).execute().await.expect("insert") }
    };

    // alpha was finalized before V8: the whole invoice in its header, each whole line in
    // `line`, no run id.
    let old = issued(&priced["alpha"], "1.00", "demo/alpha/0");
    let id = format!("demo/alpha/{start}");
    let end = period.end().unix_timestamp();
    let whole = serde_json::to_string(&old).expect("json");
    let whole_line = |l: &Line| serde_json::to_string(l).expect("json");
    for sql in old_rows("alpha", &id, (start, end), &old, whole, whole_line, "") {
        exec(sql).await;
    }
    // gamma was finalized between V8 and V10: the header's JSON is the invoice without its
    // lines, each line's JSON its fields without a column, by name; both under a run id.
    let old_gamma = issued(&priced["gamma"], "2.50", "demo/gamma/0");
    let gamma_id = format!("demo/gamma/{start}");
    let mut head = serde_json::to_value(&old_gamma).expect("json");
    head.as_object_mut().expect("object").remove("lines");
    let named_line = |l: &Line| {
        let mut detail = serde_json::to_value(l).expect("json");
        for column in ["segment", "kind", "charge", "meter", "quantity", "amount"] {
            detail.as_object_mut().expect("object").remove(column);
        }
        detail.to_string()
    };
    let head = head.to_string();
    for sql in old_rows(
        "gamma",
        &gamma_id,
        (start, end),
        &old_gamma,
        head,
        named_line,
        "r9",
    ) {
        exec(sql).await;
    }
    // beta: a run died after inserting a line and before its header (its run id sorts
    // before any real one, so a reader that ignored run ids would take it).
    exec(format!(
        "INSERT INTO invoice_lines (tenant, customer, invoice_id, period_start, line_no, \
         segment, kind, charge, meter, quantity, amount, currency, line, run_id) VALUES \
         ('demo', 'beta', 'demo/beta/{start}', {start}, 0, 0, 'flat', 'platform', '', '', \
         '999.00', 'USD', '{{}}', '0-dead-run')"
    ))
    .await;

    let first = run.finalize(&plans, "demo", &batch).await.expect("final");
    assert_eq!((first.written, first.already_final), (1, 2));
    let got: BTreeMap<String, Invoice> = first
        .invoices
        .iter()
        .map(|i| (i.customer.clone(), i.clone()))
        .collect();
    assert_eq!(got["alpha"], old, "the invoice stored before V8, as stored");
    assert_eq!(
        got["gamma"], old_gamma,
        "the invoice stored before V10, as stored"
    );
    assert_eq!(
        got["beta"], priced["beta"],
        "beta priced now, not the dead run's line"
    );
    assert_eq!(
        serde_json::to_string(&got["alpha"]).expect("json"),
        serde_json::to_string(&old).expect("json")
    );

    // A reader of the tables takes the lines of each header's run: the dead run's line
    // matches no header. (The subquery's alias is for current ClickHouse, which needs it.)
    let joined = count(
        &db,
        "SELECT count() FROM invoice_lines ANY INNER JOIN \
         (SELECT invoice_id, run_id FROM invoices) AS header USING (invoice_id, run_id)",
    )
    .await;
    assert_eq!(
        joined as usize,
        old.lines.len() + old_gamma.lines.len() + priced["beta"].lines.len()
    );
    // beta, written now: its lines by position, its header without what its columns hold.
    assert_eq!(
        count(
            &db,
            "SELECT count() FROM invoice_lines WHERE customer = 'beta' AND layout = 1 \
             AND startsWith(line, '[')"
        )
        .await as usize,
        priced["beta"].lines.len()
    );
    assert_eq!(
        count(
            &db,
            "SELECT count() FROM invoices WHERE customer = 'beta' \
             AND startsWith(invoice, '{\"interval\":')"
        )
        .await,
        1
    );

    let again = run.finalize(&plans, "demo", &batch).await.expect("again");
    assert_eq!((again.written, again.already_final), (0, 3));
    assert_eq!(jsons(&again), jsons(&first), "byte-identical");
    drop_database(&db).await;
}

#[test]
fn a_stored_line_reads_back_as_the_line() {
    let bad = tally_rater::run::StoredLine {
        segment: 0,
        kind: "flat".into(),
        charge: "platform".into(),
        meter: String::new(),
        quantity: String::new(),
        amount: "ten".into(),
        line: "{}".into(),
        layout: 0,
    };
    assert!(bad
        .to_line()
        .expect_err("amount")
        .contains("amount \"ten\""));
    let kind = tally_rater::run::StoredLine {
        kind: "refund".into(),
        amount: "1".into(),
        ..bad.clone()
    };
    assert!(kind.to_line().expect_err("kind").contains("\"refund\""));
}

/// GET `path` from the rater API at `addr`: status, content type and body.
async fn get(
    addr: std::net::SocketAddr,
    path: &str,
    key: Option<&str>,
) -> (http::StatusCode, String, String) {
    use http_body_util::BodyExt;
    let mut req = http::Request::get(format!("http://{addr}{path}"));
    if let Some(key) = key {
        req = req.header("authorization", format!("Bearer {key}"));
    }
    let req = req
        .body(http_body_util::Full::new(bytes::Bytes::new()))
        .expect("request");
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http();
    let answer = async {
        let resp = client.request(req).await.expect("the rater API answers");
        let status = resp.status();
        let kind = resp
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned();
        let body = resp.into_body().collect().await.expect("body").to_bytes();
        (status, kind, String::from_utf8_lossy(&body).into_owned())
    };
    tokio::time::timeout(std::time::Duration::from_secs(30), answer)
        .await
        .expect("the rater API answers within 30 s")
}

#[tokio::test]
async fn the_preview_api_answers_what_a_preview_run_prices() {
    use http::StatusCode;
    use tally_rater::store::SubscriptionStore;

    let (db, reader) = usage_database("preview_api").await;
    let mut config = config();
    config.clickhouse = db.clone();
    let plans = plans();
    let store = SubscriptionStore::new(&db);
    let october = datetime!(2026-10-01 0:00 UTC);
    subscribe(&store, "alpha", ("starter", 1), october, None).await;
    subscribe(&store, "beta", ("pro", 2), october, None).await;
    // Cancelled in September: nothing in force in October.
    let (sep1, sep20) = (
        datetime!(2026-09-01 0:00 UTC),
        datetime!(2026-09-20 0:00 UTC),
    );
    subscribe(&store, "gone", ("starter", 1), sep1, Some(sep20)).await;
    let api = std::sync::Arc::new(tally_rater::http::Api::new(&config, plans.clone()));
    let (stop_tx, stop) = tokio::sync::watch::channel(false);
    let (addr, server) = tally_rater::http::serve("127.0.0.1:0", api, stop)
        .await
        .expect("listen");

    // What a preview run prices for the same customer and instant.
    let run = InvoiceRun::new(&db, reader);
    let at = datetime!(2026-10-15 0:00 UTC);
    for customer in ["alpha", "beta"] {
        let billable = tally_rater::run::billable_of(&store, &plans, "demo", customer, at)
            .await
            .expect("read")
            .expect("subscribed")
            .expect("placed");
        let want = run
            .preview(&plans, "demo", &[billable])
            .await
            .expect("preview")
            .invoices
            .pop()
            .expect("priced");
        assert!(want.total > tally_rater::Decimal::ZERO && !want.lines.is_empty());
        let path = format!("/v1/invoices/preview?customer={customer}&at=2026-10-15T00:00:00Z");
        let (status, kind, body) = get(addr, &path, Some("demo-key")).await;
        assert_eq!(
            (status, kind.as_str()),
            (StatusCode::OK, "application/json"),
            "{body}"
        );
        let got: Invoice = serde_json::from_str(&body).expect("an invoice");
        assert_eq!(got, want);
        // The bytes the CLI prints for it.
        assert_eq!(body, serde_json::to_string(&want).expect("json"));
        let (status, kind, csv) = get(addr, &format!("{path}&format=csv"), Some("demo-key")).await;
        assert_eq!((status, kind.as_str()), (StatusCode::OK, "text/csv"));
        assert_eq!(csv, want.to_csv());
    }

    // Errors name what was wrong.
    let q = "/v1/invoices/preview?customer=alpha";
    let (status, _, body) = get(addr, q, None).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{body}");
    let (status, _, body) = get(addr, q, Some("not-a-key")).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{body}");
    let (status, _, body) = get(addr, &format!("{q}&at=tomorrow"), Some("demo-key")).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(body.contains("at: "), "{body}");
    let (status, _, body) = get(addr, "/v1/invoices/preview", Some("demo-key")).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(body.contains("customer: missing"), "{body}");
    let (status, _, body) = get(
        addr,
        "/v1/invoices/preview?customer=nobody&at=2026-10-15T00:00:00Z",
        Some("demo-key"),
    )
    .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert!(
        body.contains("no subscription in force at 2026-10-15T00:00:00Z"),
        "{body}"
    );
    let (status, _, body) = get(
        addr,
        "/v1/invoices/preview?customer=gone&at=2026-10-15T00:00:00Z",
        Some("demo-key"),
    )
    .await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{body}");
    // Before the subscription starts, nothing is in force either.
    let (status, _, _) = get(
        addr,
        "/v1/invoices/preview?customer=alpha&at=2026-09-15T00:00:00Z",
        Some("demo-key"),
    )
    .await;
    assert_eq!(status, StatusCode::NOT_FOUND);

    let (status, _, _) = get(addr, "/healthz", None).await;
    assert_eq!(status, StatusCode::OK);
    let (status, _, body) = get(addr, "/readyz", None).await;
    assert_eq!(
        (status, body.as_str()),
        (StatusCode::OK, r#"{"clickhouse":true}"#)
    );
    let (status, _, body) = get(addr, "/metrics", None).await;
    assert_eq!(status, StatusCode::OK);
    assert!(
        body.contains("tally_rater_invoices_total{mode=\"preview\",outcome=\"priced\"}")
            && body.contains("tally_rater_http_requests_total"),
        "{body}"
    );

    let _ = stop_tx.send(true);
    server.await.expect("the server stops");
    drop_database(&db).await;
}

#[tokio::test]
async fn usage_reaching_a_cancelled_subscriptions_last_period_late_is_billed_after_it() {
    use tally_rater::run::billables;
    use tally_rater::store::SubscriptionStore;

    let (db, reader) = usage_database("invoices_churn").await;
    let run = InvoiceRun::new(&db, reader);
    let plans = plans();
    let store = SubscriptionStore::new(&db);
    // Both subscribed from September and cancelled on October 20th.
    let (sep1, oct20) = (
        datetime!(2026-09-01 0:00 UTC),
        datetime!(2026-10-20 0:00 UTC),
    );
    subscribe(&store, "alpha", ("starter", 1), sep1, Some(oct20)).await;
    subscribe(&store, "beta", ("pro", 2), sep1, Some(oct20)).await;
    let finalize = |at: time::OffsetDateTime| {
        let (run, store, plans) = (&run, &store, &plans);
        async move {
            let (batches, refused) = billables(store, plans, "demo", at, 100)
                .await
                .expect("billables");
            assert!(refused.is_empty(), "{refused:?}");
            let mut out = Vec::new();
            run.finalize_all(plans, "demo", &batches, |done| out.push(done))
                .await
                .expect("final");
            out
        }
    };
    let october = finalize(datetime!(2026-10-15 0:00 UTC)).await;
    let issued: BTreeMap<String, Invoice> = october
        .iter()
        .flat_map(|d| d.invoices.iter().cloned())
        .map(|i| (i.customer.clone(), i))
        .collect();
    assert_eq!(issued.len(), 2);

    // Usage of October 10th, after October's invoices are final.
    let late = vec![
        Ev {
            id: "churn-late-1".into(),
            customer: "alpha",
            ty: "request",
            time: datetime!(2026-10-10 8:00 UTC),
            value: "/v1/late",
        },
        Ev {
            id: "churn-late-2".into(),
            customer: "alpha",
            ty: "completion",
            time: datetime!(2026-10-10 8:00:01 UTC),
            value: "25000",
        },
    ];
    write(&db, &late).await;

    // November has nothing in force to preview for either...
    let (batches, _) = billables(&store, &plans, "demo", datetime!(2026-11-15 0:00 UTC), 100)
        .await
        .expect("billables");
    let mut previewed = 0;
    run.previews(&plans, "demo", &batches, |p| {
        previewed += p.invoices.len() + p.refused.len()
    })
    .await
    .expect("previews");
    assert_eq!(previewed, 0);

    // ...but its final run bills alpha's late October usage: October priced again with
    // the usage stored now, less what was issued.
    let (oct_batches, _) = billables(&store, &plans, "demo", datetime!(2026-10-15 0:00 UTC), 100)
        .await
        .expect("billables");
    let mut now = BTreeMap::new();
    run.previews(&plans, "demo", &oct_batches, |p| {
        now.extend(p.invoices.into_iter().map(|i| (i.customer.clone(), i)))
    })
    .await
    .expect("october again");
    // The overlapped run (change log and usage read at once) prices the same, one batch
    // per customer, handed over in customer order.
    let mut overlapped = BTreeMap::new();
    let mut order = Vec::new();
    let unplaced = run
        .preview_all(
            &store,
            &plans,
            "demo",
            datetime!(2026-10-15 0:00 UTC),
            1,
            |p| {
                order.extend(p.invoices.iter().map(|i| i.customer.clone()));
                overlapped.extend(p.invoices.into_iter().map(|i| (i.customer.clone(), i)));
            },
        )
        .await
        .expect("overlapped preview");
    assert!(unplaced.is_empty(), "{unplaced:?}");
    assert_eq!(overlapped, now);
    assert_eq!(order, ["alpha", "beta"]);
    let november = finalize(datetime!(2026-11-15 0:00 UTC)).await;
    let written: usize = november.iter().map(|d| d.written).sum();
    assert_eq!(written, 1, "alpha's adjustments only; beta has none");
    let alpha = &november[0].invoices[0];
    assert_eq!(alpha.customer, "alpha");
    assert!(alpha.segments.is_empty());
    assert_eq!(alpha.subtotal.to_string(), "0.00");
    assert_eq!(
        alpha.period_start,
        datetime!(2026-11-01 0:00 UTC),
        "the period after the cancellation"
    );
    assert!(!alpha.lines.is_empty());
    let october_id = format!(
        "demo/alpha/{}",
        datetime!(2026-10-01 0:00 UTC).unix_timestamp()
    );
    for l in &alpha.lines {
        assert_eq!(l.kind, LineKind::Adjustment);
        assert_eq!(l.adjusts.as_deref(), Some(october_id.as_str()));
    }
    assert_eq!(alpha.total, now["alpha"].total - issued["alpha"].total);
    assert!(alpha.total > tally_rater::Decimal::ZERO);
    assert_eq!(now["beta"], issued["beta"]);

    // Run again: stored once, the same bytes; December has nothing for either.
    let again = finalize(datetime!(2026-11-15 0:00 UTC)).await;
    let (written, already): (usize, usize) = again
        .iter()
        .fold((0, 0), |(w, a), d| (w + d.written, a + d.already_final));
    assert_eq!((written, already), (0, 1));
    assert_eq!(jsons(&again[0]), jsons(&november[0]));
    let december = finalize(datetime!(2026-12-15 0:00 UTC)).await;
    assert!(december.iter().all(|d| d.invoices.is_empty()));
    drop_database(&db).await;
}

#[tokio::test]
async fn the_schedule_finalizes_each_customers_latest_closed_period_once() {
    use tally_rater::store::SubscriptionStore;

    let (db, reader) = usage_database("schedule").await;
    let mut config = config();
    config.clickhouse = db.clone();
    config.kafka = kafka();
    config.rater.invoice_topic = unique("test-scheduled-lines");
    config.rater.final_grace_hours = 24;
    let plans = plans();
    let store = SubscriptionStore::new(&db);
    // Each on its own anchor: alpha from 1 October, beta from 20 September, it's from
    // 1 September until cancelled on 10 October.
    subscribe(
        &store,
        "alpha",
        ("starter", 1),
        datetime!(2026-10-01 0:00 UTC),
        None,
    )
    .await;
    subscribe(
        &store,
        "beta",
        ("pro", 2),
        datetime!(2026-09-20 0:00 UTC),
        None,
    )
    .await;
    subscribe(
        &store,
        "it's",
        ("pro", 1),
        datetime!(2026-09-01 0:00 UTC),
        Some(datetime!(2026-10-10 0:00 UTC)),
    )
    .await;
    let schedule = schedule_of(&config, &plans);
    let tick = |now| {
        let schedule = &schedule;
        async move {
            let mut out = schedule.tick(now).await;
            assert_eq!(
                out.iter().map(|(t, _)| t.as_str()).collect::<Vec<_>>(),
                ["demo", "acme", "globex"],
                "every tenant of the config"
            );
            let (_, demo) = out.remove(0);
            let demo = demo.expect("the run");
            assert!(demo.refused.is_empty(), "{:?}", demo.refused);
            (demo.written, demo.skipped, demo.published)
        }
    };
    let stored = || async {
        tally_aggregator::migrate::client(&db)
            .query("SELECT customer, toUInt32(period_start) FROM invoices ORDER BY customer, period_start")
            .fetch_all::<(String, u32)>()
            .await
            .expect("invoices")
            .into_iter()
            .map(|(c, s)| {
                let start = time::OffsetDateTime::from_unix_timestamp(s.into()).expect("time");
                (c, start.date().to_string())
            })
            .collect::<Vec<_>>()
    };
    let pairs = |list: &[(&str, &str)]| -> Vec<(String, String)> {
        list.iter()
            .map(|(c, d)| (c.to_string(), d.to_string()))
            .collect()
    };

    // 1 November, noon: alpha's October is not 24 hours closed; beta's period to
    // 20 October and it's September are.
    assert_eq!(tick(datetime!(2026-11-01 12:00 UTC)).await, (2, 0, 2));
    assert_eq!(
        stored().await,
        pairs(&[("beta", "2026-09-20"), ("it's", "2026-09-01")])
    );
    // 2 November: alpha's October and it's October (to the cancel) are; beta's period and
    // it's September (a period the catch-up looks at again) are final and published, so
    // they are not read again.
    assert_eq!(tick(datetime!(2026-11-02 0:00 UTC)).await, (2, 2, 2));
    assert_eq!(tick(datetime!(2026-11-02 0:00 UTC)).await, (0, 4, 0));
    // 2 December: alpha's November and beta's period to 20 November. it's has nothing in
    // force after its cancel, and no usage of October arrived late: nothing to bill. The
    // catch-up finds alpha's and it's October, it's September and beta's first period
    // final.
    assert_eq!(tick(datetime!(2026-12-02 0:00 UTC)).await, (2, 4, 2));
    assert_eq!(
        stored().await,
        pairs(&[
            ("alpha", "2026-10-01"),
            ("alpha", "2026-11-01"),
            ("beta", "2026-09-20"),
            ("beta", "2026-10-20"),
            ("it's", "2026-09-01"),
            ("it's", "2026-10-01"),
        ])
    );
    // The scheduled invoice is what a final run of that period writes, priced from the
    // same usage: alpha's October as a preview prices it.
    let october = period_containing(
        datetime!(2026-10-01 0:00 UTC),
        Interval::Monthly,
        datetime!(2026-10-15 0:00 UTC),
    )
    .expect("period");
    let alpha = Billable {
        customer: "alpha".into(),
        period: october,
        segments: vec![segment(october.start(), october.end(), "starter", 1)],
        previous: None,
    };
    let run = InvoiceRun::new(&db, reader);
    let preview = run
        .preview(&plans, "demo", std::slice::from_ref(&alpha))
        .await;
    let stored_alpha = run.finalize(&plans, "demo", &[alpha]).await.expect("final");
    assert_eq!(stored_alpha.already_final, 1);
    assert_eq!(
        jsons(&stored_alpha),
        vec![serde_json::to_string(&preview.expect("preview").invoices[0]).expect("json")]
    );
    assert_eq!(
        count(&db, "SELECT count() FROM invoice_publications").await,
        6
    );

    // Served: the loop ticks at once, and stops when told.
    let (stop_tx, stop) = tokio::sync::watch::channel(false);
    let looped = tokio::spawn(schedule_of(&config, &plans).run(stop));
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    stop_tx.send(true).expect("stop");
    tokio::time::timeout(std::time::Duration::from_secs(30), looped)
        .await
        .expect("the loop stops")
        .expect("no panic");
    drop_database(&db).await;
}

#[tokio::test]
async fn the_schedule_catches_up_on_periods_that_closed_while_it_was_down() {
    use tally_rater::store::SubscriptionStore;

    let (db, _reader) = usage_database("catch_up").await;
    let mut config = config();
    config.clickhouse = db.clone();
    config.kafka = kafka();
    config.rater.invoice_topic = unique("test-catch-up-lines");
    config.rater.final_grace_hours = 24;
    assert_eq!(config.rater.final_catch_up_periods, 2, "the default");
    let plans = plans();
    let store = SubscriptionStore::new(&db);
    // Monthly from 1 June; cancelled on 20 October. The rater first runs on 2 November.
    subscribe(
        &store,
        "gamma",
        ("starter", 1),
        datetime!(2026-06-01 0:00 UTC),
        Some(datetime!(2026-10-20 0:00 UTC)),
    )
    .await;
    let stored = || async {
        tally_aggregator::migrate::client(&db)
            .query("SELECT toUInt32(period_start) FROM invoices ORDER BY period_start")
            .fetch_all::<u32>()
            .await
            .expect("invoices")
            .into_iter()
            .map(|s| {
                let start = time::OffsetDateTime::from_unix_timestamp(s.into()).expect("time");
                start.date().to_string()
            })
            .collect::<Vec<_>>()
    };
    let tick = |config: tally_core::Config| {
        let plans = plans.clone();
        async move {
            let mut out = schedule_of(&config, &plans)
                .tick(datetime!(2026-11-02 0:00 UTC))
                .await;
            let (_, demo) = out.remove(0);
            let demo = demo.expect("the run");
            assert!(demo.refused.is_empty(), "{:?}", demo.refused);
            (demo.written, demo.skipped, demo.published)
        }
    };

    // October (to the cancel) is the latest closed period; September and August are the
    // two before it.
    assert_eq!(tick(config.clone()).await, (3, 0, 3));
    assert_eq!(stored().await, ["2026-08-01", "2026-09-01", "2026-10-01"]);
    assert_eq!(tick(config.clone()).await, (0, 3, 0));
    // A longer catch-up reaches back to June, where the subscription starts, and no
    // further.
    config.rater.final_catch_up_periods = 12;
    assert_eq!(tick(config.clone()).await, (2, 3, 2));
    assert_eq!(
        stored().await,
        [
            "2026-06-01",
            "2026-07-01",
            "2026-08-01",
            "2026-09-01",
            "2026-10-01"
        ]
    );
    assert_eq!(
        count(&db, "SELECT count() FROM invoice_publications").await,
        5
    );
    drop_database(&db).await;
}

/// The schedule `config` turns on (by default).
fn schedule_of(config: &tally_core::Config, plans: &Catalog) -> tally_rater::schedule::Schedule {
    tally_rater::schedule::Schedule::from_config(config, std::sync::Arc::new(plans.clone()))
        .expect("producer")
        .expect("on by default")
}
