use super::*;
use proptest::prelude::*;
use serde_json::json;
use tally_core::Config;

fn catalog() -> Catalog {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../config/tally.dev.toml");
    let text = std::fs::read_to_string(&path).expect("dev config");
    Config::parse(&text, &path).expect("parses").catalog()
}

fn record(
    id: &str,
    customer: &str,
    ty: &str,
    time: &str,
    data: serde_json::Value,
) -> (Vec<u8>, Vec<u8>) {
    let r = json!({"v": 1, "tenant": "demo", "id": id, "customer": customer, "type": ty, "time": time,
                   "received_at": "2026-11-24T12:00:00Z", "data": data});
    (
        format!("demo/{customer}").into_bytes(),
        r.to_string().into_bytes(),
    )
}

fn incoming<'a>(offset: i64, key: Option<&'a [u8]>, payload: Option<&'a [u8]>) -> Incoming<'a> {
    Incoming {
        partition: 0,
        offset,
        key,
        payload,
    }
}

fn add(b: &mut PartitionBatch, d: &Dedupe, offset: i64, rec: &(Vec<u8>, Vec<u8>)) -> Outcome {
    let cat = catalog();
    let meters = Meters::new(&cat, 256);
    b.add(&meters, d, incoming(offset, Some(&rec.0), Some(&rec.1)))
}

fn rollups(b: &PartitionBatch) -> Vec<LedgerRow> {
    let mut rows = b.rollup_rows();
    rows.retain(|r| r.kind == KIND_ROLLUP);
    rows.sort_by(|a, b| {
        (&a.meter, a.hour, &a.dim_values, &a.d_unique).cmp(&(
            &b.meter,
            b.hour,
            &b.dim_values,
            &b.d_unique,
        ))
    });
    rows
}

const T: &str = "2026-11-24T10:15:00Z";
const HOUR_10: u32 = 1_795_514_400; // 2026-11-24T10:00:00Z

#[test]
fn sums_counts_and_extremes_per_hour_and_dimension() {
    let d = Dedupe::default();
    let mut b = PartitionBatch::default();
    for (i, (tokens, model)) in [("10", "a"), ("2.5", "a"), ("7", "b")].iter().enumerate() {
        let r = record(
            &format!("e{i}"),
            "c1",
            "completion",
            T,
            json!({"tokens": tokens, "model": model}),
        );
        assert_eq!(add(&mut b, &d, i as i64, &r), Outcome::Counted);
    }
    let rows = rollups(&b);
    assert_eq!(rows.len(), 2);
    let a = &rows[0];
    let tokens = catalog().meter("tokens").expect("tokens").storage_key();
    assert_eq!(
        (a.meter.as_str(), a.hour, a.dim_values.clone()),
        (tokens.as_str(), HOUR_10, vec!["a".to_owned()])
    );
    assert_eq!(
        (a.d_count, a.d_sum, a.d_min, a.d_max),
        (2, 12_500_000_000, 2_500_000_000, 10_000_000_000)
    );
    assert_eq!((rows[1].d_count, rows[1].d_sum), (1, 7_000_000_000));
}

#[test]
fn duplicates_in_the_batch_or_the_window_are_not_counted() {
    let mut d = Dedupe::default();
    let mut b = PartitionBatch::default();
    let r = record("same", "c1", "request", T, json!({"endpoint": "/x"}));
    assert_eq!(add(&mut b, &d, 0, &r), Outcome::Counted);
    assert_eq!(add(&mut b, &d, 1, &r), Outcome::Duplicate);
    assert_eq!(rollups(&b)[0].d_count, 1);
    assert_eq!(b.last_offset, Some(1), "a duplicate still moves the offset");
    b.commit_into(&mut d);
    let mut next = PartitionBatch::default();
    assert_eq!(add(&mut next, &d, 2, &r), Outcome::Duplicate);
    assert!(rollups(&next).is_empty());
    d.evict_before(1_795_600_000);
    assert!(d.is_empty(), "ids older than the window are forgotten");
}

#[test]
fn an_id_is_an_event_of_its_customer() {
    // Two customers sharing an id are two events, whether or not they share a partition.
    let d = Dedupe::default();
    let mut b = PartitionBatch::default();
    let first = record("same", "c1", "request", T, json!({"endpoint": "/x"}));
    let other = record("same", "c2", "request", T, json!({"endpoint": "/x"}));
    assert_eq!(add(&mut b, &d, 0, &first), Outcome::Counted);
    assert_eq!(add(&mut b, &d, 1, &other), Outcome::Counted);
    assert_eq!(add(&mut b, &d, 2, &other), Outcome::Duplicate);
    assert_ne!(
        EventKey::new("demo", "c1", "same"),
        EventKey::new("demo", "c2", "same")
    );
    assert_ne!(
        EventKey::new("demo", "c1", "same"),
        EventKey::new("demo2", "c1", "same")
    );
}

#[test]
fn latest_follows_event_time_not_arrival() {
    let d = Dedupe::default();
    let mut b = PartitionBatch::default();
    add(
        &mut b,
        &d,
        0,
        &record(
            "s1",
            "c1",
            "storage",
            "2026-11-24T10:50:00Z",
            json!({"gb": 5}),
        ),
    );
    add(
        &mut b,
        &d,
        1,
        &record(
            "s2",
            "c1",
            "storage",
            "2026-11-24T10:10:00Z",
            json!({"gb": 9}),
        ),
    );
    add(
        &mut b,
        &d,
        2,
        &record(
            "s3",
            "c1",
            "storage",
            "2026-11-24T10:50:00Z",
            json!({"gb": 6}),
        ),
    );
    let row = &rollups(&b)[0];
    assert_eq!(
        row.d_latest, 6_000_000_000,
        "the tie on event time goes to the later record"
    );
    assert_eq!(
        row.d_latest_at,
        (u64::from(HOUR_10) + 50 * 60) * 1_000_000_000
    );
}

#[test]
fn unique_counts_keep_each_distinct_value() {
    let d = Dedupe::default();
    let mut b = PartitionBatch::default();
    for (i, user) in ["u1", "u2", "u1"].iter().enumerate() {
        add(
            &mut b,
            &d,
            i as i64,
            &record(&format!("l{i}"), "c1", "login", T, json!({"user": user})),
        );
    }
    let rows = rollups(&b);
    let got: Vec<_> = rows
        .iter()
        .map(|r| (r.d_unique.as_str(), r.d_count))
        .collect();
    assert_eq!(got, [("u1", 2), ("u2", 1)]);
}

#[test]
fn late_events_land_in_their_own_hour() {
    let d = Dedupe::default();
    let mut b = PartitionBatch::default();
    add(
        &mut b,
        &d,
        0,
        &record("a", "c1", "request", "2026-11-24T10:59:59.999Z", json!({})),
    );
    add(
        &mut b,
        &d,
        1,
        &record("b", "c1", "request", "2026-11-20T03:00:00Z", json!({})),
    );
    let hours: Vec<_> = rollups(&b).iter().map(|r| r.hour).collect();
    assert_eq!(hours, [1_795_143_600, HOUR_10]);
}

#[test]
fn poison_is_named_and_still_moves_the_offset() {
    let d = Dedupe::default();
    let mut b = PartitionBatch::default();
    let wrong_key = record("x", "c", "request", T, json!({})).1;
    let bad_value = record("y", "c", "completion", T, json!({"tokens": "x"})).1;
    type Case<'a> = (Option<&'a [u8]>, Option<&'a [u8]>, &'a str);
    let cases: Vec<Case<'_>> = vec![
        (Some(b"demo/c"), Some(b"not json"), "undecodable"),
        (Some(b"demo/c"), None, "empty"),
        (Some(b"demo/other"), Some(&wrong_key), "key"),
        (Some(b"demo-c"), Some(&wrong_key), "key"),
        (Some(b"demo/cc"), Some(&wrong_key), "key"),
        (Some(b"dem/oc"), Some(&wrong_key), "key"),
        (None, Some(&wrong_key), "key"),
        (Some(b"demo/c"), Some(&bad_value), "invalid"),
    ];
    let end = cases.len() as u64 - 1;
    for (i, (key, payload, reason)) in cases.into_iter().enumerate() {
        let cat = catalog();
        let meters = Meters::new(&cat, 256);
        match b.add(&meters, &d, incoming(i as i64, key, payload)) {
            Outcome::Poison(p) => assert_eq!(p.reason, reason, "{}", p.detail),
            other => panic!("case {i}: {other:?}"),
        }
    }
    let cat = catalog();
    let rows = b.other_rows(&Meters::new(&cat, 256), "topic-a", 3, 7);
    assert!(
        b.encoded_events().is_empty(),
        "poison is never an event row"
    );
    let last = rows.last().expect("checkpoint");
    assert_eq!(
        (
            last.kind,
            last.kafka_partition,
            last.kafka_offset,
            last.topic.as_str()
        ),
        (KIND_CHECKPOINT, 3, end, "topic-a")
    );
    let coverage: Vec<_> = rows
        .iter()
        .filter(|r| r.kind == KIND_COVERAGE)
        .map(|r| (r.d_count, r.kafka_offset))
        .collect();
    assert_eq!(
        coverage,
        vec![(0, end); cat.meters().len()],
        "every meter version covers the batch's range"
    );
    assert_eq!(rows.len(), cat.meters().len() + 1);
}

#[test]
fn events_of_types_no_meter_reads_are_kept_raw() {
    let d = Dedupe::default();
    let mut b = PartitionBatch::default();
    assert_eq!(
        add(
            &mut b,
            &d,
            0,
            &record("m", "c1", "mystery", T, json!({"x": 1}))
        ),
        Outcome::Counted
    );
    let cat = catalog();
    let rows = b.other_rows(&Meters::new(&cat, 256), "t", 0, 0);
    let kinds: Vec<_> = rows
        .iter()
        .map(|r| r.kind)
        .filter(|k| *k != KIND_COVERAGE)
        .collect();
    assert_eq!(kinds, [KIND_CHECKPOINT]);
    // The event row, encoded as it was read, is the row the owned encoder writes.
    let mut want = Columns::default();
    LedgerRow {
        kind: KIND_EVENT,
        tenant: "demo".into(),
        customer: "c1".into(),
        id: "m".into(),
        event_type: "mystery".into(),
        time: HOUR_10 + 15 * 60,
        received_at: 1_795_521_600, // 2026-11-24T12:00:00Z
        data: r#"{"x":1}"#.into(),
        ..LedgerRow::default()
    }
    .encode(&mut want);
    assert_eq!(b.encoded_events(), &want);
    assert_eq!(want.rows(), 1);
}

#[test]
fn an_overflowing_sum_is_refused_whole() {
    let d = Dedupe::default();
    let mut b = PartitionBatch::default();
    // 10^28 tokens fit Decimal(38, 9); twice that within one hour does not.
    let big: serde_json::Value =
        serde_json::from_str("10000000000000000000000000000").expect("number");
    let first = record(
        "a",
        "c",
        "completion",
        T,
        json!({"tokens": big, "model": "m"}),
    );
    assert_eq!(add(&mut b, &d, 0, &first), Outcome::Counted);
    let before = rollups(&b);
    for (i, id) in ["b", "c", "d", "e", "f", "g", "h", "i", "j"]
        .iter()
        .enumerate()
    {
        let again = record(
            id,
            "c",
            "completion",
            T,
            json!({"tokens": big, "model": "m"}),
        );
        let outcome = add(&mut b, &d, 1 + i as i64, &again);
        if i < 8 {
            assert_eq!(outcome, Outcome::Counted, "{id}");
            continue;
        }
        match outcome {
            Outcome::Poison(p) => assert_eq!(p.reason, "overflow", "{}", p.detail),
            other => panic!("{other:?}"),
        }
    }
    // Nine counted, the tenth refused with nothing of it in the batch.
    let after = rollups(&b);
    assert_eq!(before.len(), after.len());
    assert_eq!((after[0].d_count, after[0].d_sum), (9, 9 * 10i128.pow(37)));
    assert_eq!(b.encoded_events().rows(), 9);
}

proptest! {
    /// However a stream with retries is cut into batches, the rows sum to the distinct
    /// events' totals.
    #[test]
    fn batching_and_retries_never_change_totals(
        events in prop::collection::vec((0u8..20, 0u8..3, 0u64..1_000_000), 1..200),
        cuts in prop::collection::vec(any::<bool>(), 200),
    ) {
        let cat = catalog();
        let mut d = Dedupe::default();
        let mut b = PartitionBatch::default();
        let mut expected: HashMap<(String, u8), i128> = HashMap::new();
        let mut first: HashMap<u8, (u8, u64)> = HashMap::new();
        let mut got: HashMap<(String, u8), i128> = HashMap::new();
        let drain = |b: PartitionBatch, d: &mut Dedupe, got: &mut HashMap<(String, u8), i128>| {
            let rows = b.rollup_rows();
            for r in rows.iter().filter(|r| r.kind == KIND_ROLLUP) {
                let model: u8 = r.dim_values[0].parse().expect("model");
                let key = r.meter.split('@').next().expect("key").to_owned();
                *got.entry((key, model)).or_default() += r.d_sum;
            }
            b.commit_into(d);
        };
        for (offset, (id, model, tokens)) in events.iter().enumerate() {
            // A retry carries the same id and the same body as the first send.
            let (model, tokens) = *first.entry(*id).or_insert((*model, *tokens));
            let rec = record(&format!("e{id}"), "c", "completion", T, json!({"tokens": tokens, "model": model.to_string()}));
            let meters = Meters::new(&cat, 256);
            if b.add(&meters, &d, incoming(offset as i64, Some(&rec.0), Some(&rec.1))) == Outcome::Counted {
                *expected.entry(("tokens".into(), model)).or_default() += i128::from(tokens) * 1_000_000_000;
            }
            if cuts[offset] {
                drain(std::mem::take(&mut b), &mut d, &mut got);
            }
        }
        drain(b, &mut d, &mut got);
        let distinct: i128 = first.values().map(|(_, t)| i128::from(*t) * 1_000_000_000).sum();
        prop_assert_eq!(expected.values().sum::<i128>(), distinct);
        prop_assert_eq!(got, expected);
    }
}

#[test]
fn decode_reads_what_the_collector_writes() {
    let data: serde_json::Map<String, serde_json::Value> =
        serde_json::from_str(r#"{"tokens": 12.5, "model": "m\"1", "deep": {"a": [1, 2]}}"#)
            .expect("data");
    let r = tally_core::UsageRecord {
        v: 1,
        tenant: "demo".into(),
        id: "e\u{e9}\"1".into(),
        customer: "c/1\\x".into(),
        event_type: "completion".into(),
        time: time::macros::datetime!(2026-11-24 10:00:00.25 UTC),
        received_at: time::macros::datetime!(2026-11-24 10:00:01 UTC),
        source: Some("app\t1".into()),
        data,
    };
    let payload = r.to_json();
    let key = r.key().into_bytes();
    let e = decode(Some(&key), Some(&payload)).expect("decodes");
    assert_eq!(
        (&*e.tenant, &*e.id, &*e.customer, &*e.event_type),
        ("demo", "e\u{e9}\"1", "c/1\\x", "completion")
    );
    assert_eq!((e.time, e.received_at), (r.time, r.received_at));
    assert_eq!(e.source.as_deref(), Some("app\t1"));
    let back: serde_json::Map<String, serde_json::Value> =
        serde_json::from_str(e.data).expect("data text");
    assert_eq!(back, r.data);
    // A record without `source` and with escapes only in `data`.
    let plain = br#"{"v":1,"tenant":"demo","id":"a","customer":"c","type":"request","time":"2026-11-24T10:00:00Z","received_at":"2026-11-24T10:00:00Z","data":{"endpoint":"\/x"}}"#;
    let e = decode(Some(b"demo/c"), Some(plain)).expect("decodes");
    assert!(matches!(e.id, Cow::Borrowed("a")) && e.source.is_none());
    assert_eq!(e.data, r#"{"endpoint":"\/x"}"#);
}
