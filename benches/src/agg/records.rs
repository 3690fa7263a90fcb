//! The records the aggregator bench pre-fills a topic with: exactly what the collector
//! produces (its validator, `UsageRecord::to_json()`, keyed by `key()`), with client retries
//! mixed in, and a month of hourly history for one customer.

use serde_json::{json, Map, Value};
use tally_core::event::RECORD_VERSION;
use tally_core::{Config, UsageRecord};
use time::format_description::well_known::Rfc3339;
use time::{Duration, OffsetDateTime};

use crate::events::{payloads, Payload};

/// Distinct customers of the pre-filled topic.
pub const CUSTOMERS: usize = 3000;
/// One record in `RETRY_EVERY` is a client retry of an earlier event (same id): 5 %.
pub const RETRY_EVERY: usize = 20;
/// Event times spread over the current hour and the few before it.
const HOURS: i64 = 4;
const ENDPOINTS: [&str; 3] = ["/v1/chat", "/v1/embed", "/v1/search"];
const MODELS: [&str; 2] = ["large", "small"];

/// A pre-fill: the records in produce order.
#[derive(Debug, Default)]
pub struct Prefill {
    pub payloads: Vec<Payload>,
    /// Records that repeat an earlier record's id.
    pub retries: usize,
}

fn event(run: &str, i: usize, now: OffsetDateTime) -> Map<String, Value> {
    let (event_type, data) = match i % 4 {
        0 => (
            "request",
            json!({"endpoint": ENDPOINTS[i % ENDPOINTS.len()], "status": 200}),
        ),
        1 => (
            "completion",
            json!({"tokens": 100 + i % 4000, "model": MODELS[(i / 4) % MODELS.len()]}),
        ),
        2 => ("storage", json!({"gb": 12.5 + (i % 100) as f64})),
        _ => ("login", json!({"user": format!("user-{}", i % 5000)})),
    };
    let back = Duration::seconds(((i as i64 * 7) % (HOURS * 3600)).min(HOURS * 3600 - 1));
    let time = (now - back)
        .format(&Rfc3339)
        .expect("a time formats as RFC 3339");
    let event = json!({
        "id": format!("{run}-{i}"),
        "customer": format!("customer-{:05}", (i * 7919) % CUSTOMERS),
        "type": event_type,
        "time": time,
        "data": data,
    });
    match event {
        Value::Object(o) => o,
        _ => unreachable!("json! of an object literal"),
    }
}

/// `n` records of the four metered types for [`CUSTOMERS`] customers of the demo tenant;
/// every [`RETRY_EVERY`]th repeats the record sent 13 places earlier (a client retry:
/// same id, same key, so the same partition).
pub fn prefill(config: &Config, run: &str, n: usize, now: OffsetDateTime) -> Prefill {
    let mut out = Prefill {
        payloads: Vec::with_capacity(n),
        retries: 0,
    };
    let mut next_event = 0;
    const CHUNK: usize = 50_000;
    while out.payloads.len() < n {
        let want = (n - out.payloads.len()).min(CHUNK);
        let events: Vec<_> = (next_event..next_event + want)
            .map(|i| event(run, i, now))
            .collect();
        next_event += want;
        for p in payloads(config, &events, now) {
            if out.payloads.len() >= n {
                break;
            }
            let slot = out.payloads.len();
            if slot % RETRY_EVERY == RETRY_EVERY - 1 && slot >= 13 {
                let retry = out.payloads[slot - 13].clone();
                out.payloads.push(retry);
                out.retries += 1;
                if out.payloads.len() >= n {
                    break;
                }
            }
            out.payloads.push(p);
        }
    }
    out
}

/// One customer's month: `hours` whole hours ending before the current one, `per_hour`
/// completion events in each (tokens, by model). Built directly as records: the collector
/// would refuse most of them as too late, the aggregator takes them as they come.
pub fn month(customer: &str, hours: i64, per_hour: usize, now: OffsetDateTime) -> Vec<Payload> {
    let top = now.unix_timestamp() - now.unix_timestamp() % 3600;
    let received_at = now;
    let mut out = Vec::with_capacity(hours as usize * per_hour);
    for h in 1..=hours {
        let hour = top - h * 3600;
        for k in 0..per_hour {
            let offset = (k as i64 * 3600) / per_hour as i64;
            let time = OffsetDateTime::from_unix_timestamp(hour + offset)
                .expect("a time within the last month");
            let data = json!({"tokens": 100 + (h as usize * 31 + k) % 900, "model": MODELS[k % 2]});
            let record = UsageRecord {
                v: RECORD_VERSION,
                tenant: "demo".into(),
                id: format!("{customer}-{h}-{k}"),
                customer: customer.to_owned(),
                event_type: "completion".into(),
                time,
                received_at,
                source: None,
                data: match data {
                    Value::Object(o) => o,
                    _ => unreachable!("json! of an object literal"),
                },
            };
            out.push(Payload {
                key: record.key(),
                value: record.to_json(),
            });
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dev_config() -> Config {
        let path =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../config/tally.dev.toml");
        let text = std::fs::read_to_string(&path).expect("dev config");
        Config::parse(&text, &path).expect("dev config parses")
    }

    #[test]
    fn prefill_mixes_in_five_percent_retries() {
        let now = OffsetDateTime::now_utc();
        let p = prefill(&dev_config(), "t", 1000, now);
        assert_eq!(p.payloads.len(), 1000);
        assert!((45..=55).contains(&p.retries), "{}", p.retries);
        let ids: std::collections::HashSet<_> = p
            .payloads
            .iter()
            .map(|x| {
                let r: UsageRecord = serde_json::from_slice(&x.value).expect("record");
                assert_eq!(x.key, r.key());
                r.id
            })
            .collect();
        assert_eq!(ids.len(), 1000 - p.retries);
    }

    #[test]
    fn a_month_of_hours() {
        let now = OffsetDateTime::now_utc();
        let m = month("c", 720, 4, now);
        assert_eq!(m.len(), 2880);
        assert!(m.iter().all(|p| p.key == "demo/c"));
    }
}
