use super::*;
use crate::body::{split, BodyFormat};
use crate::config::Config;
use proptest::prelude::*;
use serde_json::json;
use time::macros::datetime;

const NOW: OffsetDateTime = datetime!(2026-11-24 12:00:00 UTC);

fn config() -> Config {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../config/tally.dev.toml");
    let text = std::fs::read_to_string(&path).expect("dev config");
    Config::parse(&text, &path).expect("dev config parses")
}

/// The dev config and its catalog, for validators that borrow them.
struct Setup {
    config: Config,
    catalog: Catalog,
}

impl Setup {
    fn new() -> Setup {
        let config = config();
        let catalog = config.catalog();
        Setup { config, catalog }
    }

    fn validator(&self, dialect: Dialect) -> Validator<'_> {
        Validator {
            catalog: &self.catalog,
            limits: &self.config.validation,
            dialect,
        }
    }
}

fn tenant(strict: bool) -> Tenant {
    Tenant {
        id: "demo".into(),
        strict,
    }
}

fn check(event: Value) -> Result<UsageRecord, Rejection> {
    check_with(event, Dialect::Native, true)
}

fn check_with(event: Value, dialect: Dialect, strict: bool) -> Result<UsageRecord, Rejection> {
    let setup = Setup::new();
    let v = setup.validator(dialect);
    let obj = match event {
        Value::Object(o) => o,
        _ => panic!("test events are objects"),
    };
    v.validate(obj, &tenant(strict), NOW)
}

fn rejected(event: Value) -> String {
    check(event).expect_err("should be refused").to_string()
}

fn completion(tokens: Value) -> Value {
    json!({"id": "e1", "customer": "c1", "type": "completion", "time": "2026-11-24T11:00:00Z",
           "data": {"tokens": tokens, "model": "m1"}})
}

#[test]
fn accepts_each_demo_meter() {
    let r = check(completion(json!(12.5))).expect("completion");
    assert_eq!(
        (
            r.tenant.as_str(),
            r.customer.as_str(),
            r.event_type.as_str()
        ),
        ("demo", "c1", "completion")
    );
    assert_eq!(r.time, datetime!(2026-11-24 11:00:00 UTC));
    assert_eq!(r.received_at, NOW);
    check(json!({"id": "r", "customer": "c", "type": "request", "data": {"endpoint": "/x"}}))
        .expect("request");
    check(json!({"id": "s", "customer": "c", "type": "storage", "data": {"gb": "3.25"}}))
        .expect("storage");
    check(json!({"id": "l", "customer": "c", "type": "login", "data": {"user": "u1"}}))
        .expect("login");
    check(json!({"id": "l", "customer": "c", "type": "login", "data": {"user": 42}}))
        .expect("numeric user");
}

#[test]
fn time_defaults_to_receipt_and_normalizes_to_utc() {
    let r = check(json!({"id": "r", "customer": "c", "type": "request"})).expect("no time");
    assert_eq!(r.time, NOW);
    let r = check(
        json!({"id": "r", "customer": "c", "type": "request", "time": "2026-11-24T13:30:00+02:00"}),
    )
    .expect("offset");
    assert_eq!(r.time, datetime!(2026-11-24 11:30:00 UTC));
    assert_eq!(r.time.offset(), time::UtcOffset::UTC);
}

#[test]
fn time_window_edges() {
    let at = |t: &str| check(json!({"id": "r", "customer": "c", "type": "request", "time": t}));
    assert!(
        at("2026-11-24T12:05:00Z").is_ok(),
        "exactly 5 minutes ahead"
    );
    let e = at("2026-11-24T12:05:00.000000001Z")
        .expect_err("past the limit")
        .to_string();
    assert!(e.starts_with("time: more than 300s in the future"), "{e}");
    assert!(at("2026-11-17T12:00:00Z").is_ok(), "exactly 7 days old");
    let e = at("2026-11-17T11:59:59Z").expect_err("too old").to_string();
    assert!(
        e.starts_with("time: older than the allowed lateness of 604800s"),
        "{e}"
    );
    assert!(at("yesterday")
        .expect_err("bad")
        .to_string()
        .starts_with("time: \"yesterday\" is not an RFC 3339"));
    assert!(at("2026-11-24T12:00:00").is_err(), "no offset");
    assert_eq!(
        check(json!({"id": "r", "customer": "c", "type": "request", "time": 1}))
            .expect_err("num")
            .to_string(),
        "time: must be an RFC 3339 string"
    );
}

#[test]
fn required_fields_are_named() {
    assert_eq!(
        rejected(json!({"customer": "c", "type": "request"})),
        "id: required"
    );
    assert_eq!(
        rejected(json!({"id": "", "customer": "c", "type": "request"})),
        "id: must not be empty"
    );
    assert_eq!(
        rejected(json!({"id": 7, "customer": "c", "type": "request"})),
        "id: must be a string"
    );
    let long = "x".repeat(129);
    assert_eq!(
        rejected(json!({"id": long, "customer": "c", "type": "request"})),
        "id: longer than 128 characters"
    );
    assert!(
        check(json!({"id": "é".repeat(128), "customer": "c", "type": "request"})).is_ok(),
        "chars, not bytes"
    );
    assert_eq!(
        rejected(json!({"id": "a\nb", "customer": "c", "type": "request"})),
        "id: must not contain control characters"
    );
    assert_eq!(
        rejected(json!({"id": "i", "type": "request"})),
        "customer: required"
    );
    assert_eq!(
        rejected(json!({"id": "i", "customer": "c"})),
        "type: required"
    );
    assert_eq!(
        rejected(json!({"id": "i", "customer": "c", "type": "request", "data": [1]})),
        "data: must be a JSON object"
    );
    assert_eq!(
        rejected(json!({"id": "i", "costumer": "c", "type": "request"})),
        "costumer: unknown field; events carry id, customer, type, time and data"
    );
}

#[test]
fn subject_is_the_customer_in_both_dialects() {
    let r = check(json!({"id": "i", "subject": "c9", "type": "request"})).expect("subject");
    assert_eq!(r.customer, "c9");
    assert_eq!(
        rejected(json!({"id": "i", "subject": "a", "customer": "b", "type": "request"})),
        "customer: give customer or subject, not both"
    );
}

#[test]
fn strict_tenants_refuse_unknown_types() {
    let e = json!({"id": "i", "customer": "c", "type": "mystery"});
    assert_eq!(
        check_with(e.clone(), Dialect::Native, true)
            .expect_err("strict")
            .to_string(),
        "type: no meter reads events of type \"mystery\""
    );
    assert!(check_with(e, Dialect::Native, false).is_ok());
}

#[test]
fn meter_values_must_be_exact_numbers() {
    assert_eq!(
        rejected(json!({"id": "e", "customer": "c", "type": "completion", "data": {"model": "m"}})),
        "data.tokens: required by meter tokens"
    );
    assert_eq!(
        rejected(completion(json!(null))),
        "data.tokens: required by meter tokens"
    );
    assert_eq!(
        rejected(completion(json!("many"))),
        "data.tokens: \"many\" is not a valid quantity: not a decimal number"
    );
    assert_eq!(
        rejected(completion(json!(true))),
        "data.tokens: must be a number"
    );
    assert_eq!(
        rejected(completion(json!({"n": 1}))),
        "data.tokens: must be a number"
    );
    let huge: Value = serde_json::from_str("1e400").expect("arbitrary precision keeps it");
    let e = rejected(completion(huge));
    assert!(
        e.ends_with("is not a valid quantity: out of range (at most 29 integer digits)"),
        "{e}"
    );
    let fine: Value = serde_json::from_str("0.0000000001").expect("number");
    assert!(rejected(completion(fine)).contains("more than 9 decimal places"));
    assert!(
        check(completion(json!("42"))).is_ok(),
        "numeric strings are numbers"
    );
    let exact: Value = serde_json::from_str("12345678901234567890.123456789").expect("number");
    let r = check(completion(exact)).expect("exact");
    assert_eq!(
        r.data["tokens"].to_string(),
        "12345678901234567890.123456789"
    );
}

#[test]
fn dimensions_and_identifiers_are_bounded_strings() {
    let req = |endpoint: Value| json!({"id": "r", "customer": "c", "type": "request", "data": {"endpoint": endpoint}});
    assert_eq!(
        rejected(req(json!(5))),
        "data.endpoint: dimension must be a string"
    );
    assert_eq!(
        rejected(req(json!("x".repeat(257)))),
        "data.endpoint: dimension longer than 256 characters"
    );
    assert!(
        check(req(json!(null))).is_ok(),
        "a missing dimension groups as empty"
    );
    let login =
        |user: Value| json!({"id": "l", "customer": "c", "type": "login", "data": {"user": user}});
    assert_eq!(rejected(login(json!(""))), "data.user: must not be empty");
    assert_eq!(
        rejected(login(json!(1.5))),
        "data.user: must be a string or an integer"
    );
}

#[test]
fn data_size_and_depth_are_bounded() {
    let mut wide = Map::new();
    for i in 0..65 {
        wide.insert(format!("k{i}"), json!(i));
    }
    let e = json!({"id": "r", "customer": "c", "type": "request", "data": wide});
    assert_eq!(rejected(e), "data: more than 64 properties");
    let mut nested = json!(1);
    for _ in 0..9 {
        nested = json!({"a": nested});
    }
    let e = json!({"id": "r", "customer": "c", "type": "request", "data": nested});
    assert_eq!(rejected(e), "data: nested deeper than 8 levels");
    let mut spread = Map::new();
    for i in 0..8 {
        let inner: Map<String, Value> = (0..8).map(|j| (format!("k{j}"), json!(j))).collect();
        spread.insert(format!("o{i}"), Value::Object(inner));
    }
    let e = json!({"id": "r", "customer": "c", "type": "request", "data": spread});
    assert_eq!(
        rejected(e),
        "data: more than 64 properties",
        "counted at every level"
    );
}

#[test]
fn cloudevents_dialect_requires_its_attributes() {
    let ce = json!({"specversion": "1.0", "id": "i", "source": "svc", "type": "request", "subject": "c",
                    "time": "2026-11-24T11:00:00Z", "datacontenttype": "application/json", "data": {"endpoint": "/a"}});
    let r = check_with(ce.clone(), Dialect::CloudEvents, true).expect("valid CloudEvent");
    assert_eq!(
        (r.customer.as_str(), r.source.as_deref()),
        ("c", Some("svc"))
    );
    let without = |field: &str| {
        let mut e = ce.clone();
        e.as_object_mut().expect("object").remove(field);
        check_with(e, Dialect::CloudEvents, true)
            .expect_err("missing")
            .to_string()
    };
    assert_eq!(without("specversion"), "specversion: required");
    assert_eq!(without("source"), "source: required");
    assert_eq!(without("subject"), "subject: required");
    let mut v2 = ce.clone();
    v2["specversion"] = json!("0.3");
    assert_eq!(
        check_with(v2, Dialect::CloudEvents, true)
            .expect_err("version")
            .to_string(),
        "specversion: must be \"1.0\", got \"0.3\""
    );
    let mut xml = ce.clone();
    xml["datacontenttype"] = json!("application/xml");
    assert!(check_with(xml, Dialect::CloudEvents, true).is_err());
    let mut with_customer = ce;
    with_customer["customer"] = json!("c");
    assert!(check_with(with_customer, Dialect::CloudEvents, true).is_err());
}

#[test]
fn batch_reports_each_refusal_by_index_and_refuses_repeated_ids() {
    let setup = Setup::new();
    let v = setup.validator(Dialect::Native);
    let body = br#"[
        {"id": "a", "customer": "c", "type": "request"},
        {"id": "b", "customer": "c", "type": "completion", "data": {"tokens": "x"}},
        {"id": "a", "customer": "c", "type": "request"},
        5,
        {"id": "d", "customer": "c", "type": "storage", "data": {"gb": 1}},
        {"id": "a", "customer": "other", "type": "request"},
        {"id": "d", "customer": "c", "type": "storage", "data": {"gb": 2}}
    ]"#;
    let candidates = split(body, BodyFormat::Json, 100).expect("body");
    let (ok, refused) = v.validate_batch(candidates, &tenant(true), NOW);
    let ids: Vec<_> = ok
        .iter()
        .map(|r| (r.customer.as_str(), r.id.as_str()))
        .collect();
    assert_eq!(
        ids,
        [("c", "a"), ("c", "d"), ("other", "a")],
        "another customer's id is another event"
    );
    let got: Vec<_> = refused
        .iter()
        .map(|r| (r.index, r.id.as_deref(), r.reason))
        .collect();
    assert_eq!(
        got,
        [
            (1, Some("b"), "data"),
            (2, Some("a"), "duplicate_id"),
            (3, None, "malformed"),
            (6, Some("d"), "duplicate_id")
        ]
    );
    assert_eq!(
        refused[1].error,
        "id: duplicate of the event at index 0 in this request (same customer and id)"
    );
    // The first copy is named by its place in the request, refusals before it counted.
    assert_eq!(
        refused[3].error,
        "id: duplicate of the event at index 4 in this request (same customer and id)"
    );
}

proptest! {
    #[test]
    fn arbitrary_json_objects_never_panic(s in "\\PC{0,200}") {
        let setup = Setup::new();
        let v = setup.validator(Dialect::Native);
        if let Ok(candidates) = split(s.as_bytes(), BodyFormat::Json, 100) {
            let _ = v.validate_batch(candidates, &tenant(true), NOW);
        }
        if let Ok(candidates) = split(s.as_bytes(), BodyFormat::Ndjson, 100) {
            let _ = v.validate_batch(candidates, &tenant(false), NOW);
        }
    }

    #[test]
    fn accepted_values_round_trip_through_the_record(int in 0u64..u64::MAX, frac in 0u32..1_000_000_000) {
        let text = format!("{int}.{frac:09}");
        let value: Value = serde_json::from_str(&text).expect("number");
        let r = check(completion(value)).expect("in range");
        let back: UsageRecord = serde_json::from_slice(&r.to_json()).expect("record");
        let parsed = number(&back.data["tokens"]).expect("number");
        prop_assert_eq!(parsed, text.parse::<Quantity>().expect("quantity"));
    }

    #[test]
    fn event_time_inside_the_window_is_kept_exactly(offset in -604_800i64..=300) {
        let t = NOW + time::Duration::seconds(offset);
        let text = t.format(&Rfc3339).expect("format");
        let r = check(json!({"id": "r", "customer": "c", "type": "request", "time": text})).expect("inside");
        prop_assert_eq!(r.time, t);
    }
}

#[test]
fn measure_reads_values_and_dimensions_in_group_by_order() {
    let c = config();
    let catalog = c.catalog();
    let tokens = catalog.meter("tokens").expect("tokens meter");
    let data = json!({"tokens": "12.5", "model": "m1", "extra": 1});
    let m = measure(tokens, data.as_object().expect("object"), 256).expect("measure");
    assert_eq!(m.value, MeterValue::Number("12.5".parse().expect("q")));
    assert_eq!(m.dimensions, ["m1"]);
    let no_model = json!({"tokens": 3});
    let m = measure(tokens, no_model.as_object().expect("object"), 256).expect("measure");
    assert_eq!(m.dimensions, [""], "a missing dimension groups as empty");
    let requests = catalog.meter("requests").expect("requests meter");
    let m = measure(requests, &Map::new(), 256).expect("count needs no value");
    assert_eq!(
        (m.value, m.dimensions),
        (MeterValue::Event, vec![String::new()])
    );
    let users = catalog.meter("active_users").expect("active_users meter");
    let numeric = json!({"user": 42});
    let m = measure(users, numeric.as_object().expect("object"), 256).expect("integer identifier");
    assert_eq!(m.value, MeterValue::Identifier("42".into()));
}

/// A JSON string literal, sometimes with an escape the fast path cannot borrow.
fn text_literal() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => "[a-z0-9_./-]{1,12}".prop_map(|s| format!("\"{s}\"")),
        1 => Just("\"\"".to_owned()),
        1 => Just("\"\\u0041b\"".to_owned()),
        1 => Just("\"a\\u0000\"".to_owned()),
        1 => Just(format!("\"{}\"", "x".repeat(300))),
        1 => Just("\"é☃\"".to_owned()),
        1 => Just("null".to_owned()),
        1 => Just("7".to_owned()),
    ]
}

/// A `data` value: numbers in every spelling, strings, and shapes the meters refuse.
fn data_value() -> impl Strategy<Value = String> {
    prop_oneof![
        3 => (0u64..100_000).prop_map(|n| n.to_string()),
        2 => (0u64..1000, 0u32..1000).prop_map(|(a, b)| format!("{a}.{b:03}")),
        1 => Just("-12.5".to_owned()),
        1 => Just("1E3".to_owned()),
        1 => Just("2.5e-2".to_owned()),
        1 => Just("0.0000000001".to_owned()),
        1 => Just("123456789012345678901234567890".to_owned()),
        1 => Just("18446744073709551616".to_owned()),
        1 => Just("-0".to_owned()),
        1 => Just("\"42.5\"".to_owned()),
        1 => Just("true".to_owned()),
        1 => Just("{\"x\": 1}".to_owned()),
        1 => Just("[1, 2]".to_owned()),
        4 => text_literal(),
    ]
}

fn data_object() -> impl Strategy<Value = String> {
    let key = prop_oneof![
        Just("tokens"),
        Just("model"),
        Just("gb"),
        Just("user"),
        Just("endpoint"),
        Just("other"),
        Just("a.b"),
        Just("t\\u006fkens"),
    ];
    proptest::collection::vec((key, data_value()), 0..6).prop_map(|kv| {
        let fields: Vec<String> = kv.iter().map(|(k, v)| format!("\"{k}\" : {v}")).collect();
        format!("{{ {} }}", fields.join(", "))
    })
}

/// Event objects close to valid, with every envelope field sometimes absent, null, of the
/// wrong type, escaped or out of bounds, in random order.
fn event_text() -> impl Strategy<Value = String> {
    let time = prop_oneof![
        3 => (-700_000i64..400).prop_map(|s| {
            let t = NOW + time::Duration::seconds(s);
            format!("\"{}\"", t.format(&Rfc3339).expect("format"))
        }),
        1 => Just("\"2026-11-24T13:00:00+02:00\"".to_owned()),
        1 => Just("\"2026-11-24T11:00:00.123456789Z\"".to_owned()),
        1 => Just("\"2026-11-24T11:59:60Z\"".to_owned()),
        2 => (-700_000_000_000_000i64..400_000_000_000).prop_map(|n| {
            let t = NOW + time::Duration::nanoseconds(n);
            format!("\"{}\"", t.format(&Rfc3339).expect("format"))
        }),
        1 => Just("\"2026-11-24T11:00:00.120Z\"".to_owned()),
        1 => Just("\"2026-11-24T11:00:00.5Z\"".to_owned()),
        1 => Just("\"2026-11-24T11:00:00.000Z\"".to_owned()),
        1 => Just("\"2026-11-24T11:00:00.Z\"".to_owned()),
        1 => Just("\"2026-11-24T11:00:00.1234567891Z\"".to_owned()),
        1 => Just("\"2026-11-24t11:00:00z\"".to_owned()),
        1 => Just("\"2026-02-30T11:00:00Z\"".to_owned()),
        1 => Just("\"2026-11-24T11:00:00+00:00\"".to_owned()),
        1 => Just("\"yesterday\"".to_owned()),
        1 => Just("null".to_owned()),
        1 => Just("17".to_owned()),
    ];
    let event_type = prop_oneof![
        Just("\"request\""),
        Just("\"completion\""),
        Just("\"storage\""),
        Just("\"login\""),
        Just("\"other\""),
        Just("null"),
        Just("3"),
    ];
    let field = |name: &'static str, value: BoxedStrategy<String>| prop_oneof![1 => Just(None), 4 => value.prop_map(move |v| Some(format!("\"{name}\": {v}")))];
    (
        field("id", text_literal().boxed()),
        field("customer", text_literal().boxed()),
        field("subject", prop_oneof![3 => Just(None::<String>).prop_map(|_| "null".to_owned()), 1 => text_literal()].boxed()),
        field("type", event_type.prop_map(str::to_owned).boxed()),
        field("time", time.boxed()),
        field("data", prop_oneof![8 => data_object(), 1 => Just("null".to_owned()), 1 => Just("[1]".to_owned())].boxed()),
        (
            field("specversion", prop_oneof![Just("\"1.0\"".to_owned()), Just("\"0.3\"".to_owned())].boxed()),
            field("source", text_literal().boxed()),
            field("datacontenttype", prop_oneof![Just("\"application/json\"".to_owned()), Just("\"text/plain\"".to_owned())].boxed()),
            proptest::option::weighted(0.05, Just("\"extra\": 1".to_owned())),
            proptest::option::weighted(0.05, Just("\"id\": \"again\"".to_owned())),
        ),
        any::<proptest::sample::Index>(),
    )
        .prop_map(|(id, customer, subject, ty, time, data, (sv, source, ct, extra, dup), rot)| {
            let mut fields: Vec<String> = [id, customer, subject, ty, time, data, sv, source, ct, extra, dup]
                .into_iter()
                .flatten()
                .collect();
            if !fields.is_empty() {
                let n = rot.index(fields.len());
                fields.rotate_left(n);
            }
            format!("{{{}}}", fields.join(","))
        })
}

/// The reference: the full parse, the validator and `UsageRecord::to_json`.
fn encode_slow(
    v: &Validator<'_>,
    body: &[u8],
    format: BodyFormat,
    tenant: &Tenant,
) -> Result<(Vec<Encoded>, Vec<Refused>), BodyError> {
    let (records, refused) = v.validate_batch(split(body, format, 100)?, tenant, NOW);
    Ok((records.iter().map(Encoded::of).collect(), refused))
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn encode_body_matches_the_full_path_byte_for_byte(
        events in proptest::collection::vec(event_text(), 1..6),
        cloud in any::<bool>(),
        strict in any::<bool>(),
        ndjson in any::<bool>(),
    ) {
        let setup = Setup::new();
        let dialect = if cloud { Dialect::CloudEvents } else { Dialect::Native };
        let v = setup.validator(dialect);
        let (body, format) = match (ndjson, events.len()) {
            (true, _) => (events.join("\n"), BodyFormat::Ndjson),
            (false, 1) => (events[0].clone(), BodyFormat::Json),
            (false, _) => (format!("[ {} ]", events.join(" ,\n")), BodyFormat::Json),
        };
        let fast = v.encode_body(body.as_bytes(), format, 100, &tenant(strict), NOW);
        let slow = encode_slow(&v, body.as_bytes(), format, &tenant(strict));
        prop_assert_eq!(fast, slow, "body: {}", body);
    }

    /// Damaged bodies: one character that matters to JSON put anywhere. Whatever the
    /// one-pass reader makes of it, the answer (records, refusals or the body's error) is
    /// the full parse's.
    #[test]
    fn a_damaged_body_gets_the_full_paths_answer(
        events in proptest::collection::vec(event_text(), 1..5),
        at in any::<proptest::sample::Index>(),
        insert in prop_oneof![
            Just(","), Just("}"), Just("{"), Just("]"), Just("["), Just("\""), Just("\\"),
            Just("0"), Just("."), Just(":"), Just("\u{1}"), Just("e"), Just("-"), Just(" "),
        ],
        replace in any::<bool>(),
    ) {
        let setup = Setup::new();
        let v = setup.validator(Dialect::Native);
        let body = format!("[{}]", events.join(","));
        let mut i = at.index(body.len() + 1);
        while !body.is_char_boundary(i) {
            i -= 1;
        }
        let end = if replace { body[i..].chars().next().map_or(i, |ch| i + ch.len_utf8()) } else { i };
        let body = format!("{}{insert}{}", &body[..i], &body[end..]);
        let fast = v.encode_body(body.as_bytes(), BodyFormat::Json, 100, &tenant(true), NOW);
        let slow = encode_slow(&v, body.as_bytes(), BodyFormat::Json, &tenant(true));
        prop_assert_eq!(fast, slow, "body: {}", body);
    }
}

fn fast_text(v: &Validator<'_>, raw: &str) -> Option<Encoded> {
    let e = fast::Envelope::parse(raw)?;
    v.fast(
        raw,
        &e,
        &tenant(true),
        &fast::Stamp::new(NOW, &tenant(true)),
    )
}

#[test]
fn the_fast_path_takes_the_common_shapes() {
    let setup = Setup::new();
    let v = setup.validator(Dialect::Native);
    for raw in [
        r#"{"id":"e1","customer":"c1","type":"completion","time":"2026-11-24T11:00:00Z","data":{"tokens":12.5,"model":"m1"}}"#,
        r#"{"id":"e2","customer":"c1","type":"request","data":{"endpoint":"/v1/x"}}"#,
        r#"{"id":"e3","subject":"c1","type":"storage","time":"2026-11-24T11:00:00.25Z","data":{"gb":"3.5"}}"#,
        r#"{"id":"e4","customer":"c1","type":"login","data":{"user":42}}"#,
    ] {
        let fast = fast_text(&v, raw).expect(raw);
        let slow = check(serde_json::from_str(raw).expect("json")).expect(raw);
        assert_eq!(fast.payload(), slow.to_json(), "{raw}");
        assert_eq!(fast.key(), slow.key().as_bytes());
        assert_eq!(fast.id(), slow.id);
    }
    for raw in [
        r#"{"id":"e1","customer":"c1","type":"completion","data":{"tokens":"x","model":"m1"}}"#,
        r#"{"id":"e\u0031","customer":"c1","type":"request"}"#,
        r#"{"id":"e1","customer":"c1","type":"request","data":{"endpoint":{"a":1}}}"#,
    ] {
        assert!(fast_text(&v, raw).is_none(), "{raw}");
    }
}

#[test]
fn arrays_that_end_badly_get_the_full_paths_answer() {
    let setup = Setup::new();
    let v = setup.validator(Dialect::Native);
    let e = |i: u32| {
        format!(r#"{{"id":"e{i}","customer":"c1","type":"request","data":{{"endpoint":"/x"}}}}"#)
    };
    for body in [
        "[]".to_owned(),
        " [ ] ".to_owned(),
        format!("[{}]", e(1)),
        format!("[{},{}]", e(1), e(2)),
        format!("[{},{},{}]", e(1), e(2), e(3)),
        format!("[{},]", e(1)),
        format!("[{}] x", e(1)),
        format!("[{}", e(1)),
        format!("[{} {}]", e(1), e(2)),
        format!("[{},{}]", e(1), e(1)),
        format!("[{}, 7, {{\"id\": \"e\\u0032\"}}]", e(1)),
    ] {
        let fast = v.encode_body(body.as_bytes(), BodyFormat::Json, 2, &tenant(true), NOW);
        let slow = (|| {
            let (records, refused) = v.validate_batch(
                split(body.as_bytes(), BodyFormat::Json, 2)?,
                &tenant(true),
                NOW,
            );
            Ok::<_, BodyError>((records.iter().map(Encoded::of).collect::<Vec<_>>(), refused))
        })();
        assert_eq!(fast, slow, "{body}");
    }
}

#[test]
fn a_body_too_deep_for_one_event_gets_the_whole_body_error() {
    let setup = Setup::new();
    let v = setup.validator(Dialect::Native);
    let deep = format!("[{}1{}]", "{\"a\":".repeat(200), "}".repeat(200));
    let fast = v.encode_body(deep.as_bytes(), BodyFormat::Json, 10, &tenant(true), NOW);
    let slow = encode_slow(&v, deep.as_bytes(), BodyFormat::Json, &tenant(true));
    assert_eq!(fast, slow);
    assert!(fast.is_err());
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(1000))]

    #[test]
    fn event_data_measures_like_the_tree(text in data_object()) {
        let c = config();
        let catalog = c.catalog();
        let tree: Map<String, Value> = serde_json::from_str(&text).expect("object");
        let data = crate::data::EventData::parse(&text).expect("object");
        for meter in catalog.meters() {
            prop_assert_eq!(
                data.measure(meter, 256),
                measure(meter, &tree, 256),
                "meter {} data {}", meter.key, text
            );
        }
    }
}

#[test]
fn event_data_refuses_what_is_not_an_object() {
    for text in ["[1]", "3", "\"x\"", "{\"a\":", "null"] {
        assert!(crate::data::EventData::parse(text).is_err(), "{text}");
    }
}
