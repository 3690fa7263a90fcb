//! The events every phase sends, and the exact Kafka records the collector makes of them.

use bytes::Bytes;
use serde_json::{json, Map, Value};
use tally_core::{Config, Dialect, UsageRecord, Validator};
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

/// The dev config's demo tenant.
pub const API_KEY: &str = "demo-key";

/// Distinct customers; spreads records over every partition as real traffic would.
const CUSTOMERS: usize = 1000;
const ENDPOINTS: [&str; 3] = ["/v1/chat", "/v1/embed", "/v1/search"];
const MODELS: [&str; 2] = ["large", "small"];

/// `n` event objects as an SDK would send them, cycling through the four event types the
/// dev catalog meters, so validation does the work real traffic asks of it.
pub fn events(prefix: &str, n: usize, now: OffsetDateTime) -> Vec<Map<String, Value>> {
    let time = now.format(&Rfc3339).expect("now formats as RFC 3339");
    (0..n)
        .map(|i| {
            let (event_type, data) = match i % 4 {
                0 => (
                    "request",
                    json!({"endpoint": ENDPOINTS[i % ENDPOINTS.len()], "status": 200}),
                ),
                1 => (
                    "completion",
                    json!({"tokens": 100 + i % 4000, "model": MODELS[i % MODELS.len()]}),
                ),
                2 => ("storage", json!({"gb": 12.5 + (i % 100) as f64})),
                _ => ("login", json!({"user": format!("user-{}", i % 5000)})),
            };
            let event = json!({
                "id": format!("{prefix}-{i}"),
                "customer": format!("customer-{:04}", (i * 7919) % CUSTOMERS),
                "type": event_type,
                "time": time,
                "data": data,
            });
            match event {
                Value::Object(o) => o,
                _ => unreachable!("json! of an object literal"),
            }
        })
        .collect()
}

/// One Kafka record: key and value bytes.
#[derive(Debug, Clone)]
pub struct Payload {
    pub key: String,
    pub value: Vec<u8>,
}

/// The records the collector would produce for `events` (same validator, same tenant, same
/// serialization; only `received_at` differs).
pub fn payloads(
    config: &Config,
    events: &[Map<String, Value>],
    now: OffsetDateTime,
) -> Vec<Payload> {
    let catalog = config.catalog();
    let tenants = config.tenants();
    let tenant = tenants
        .authenticate(API_KEY)
        .expect("the config knows the demo key");
    let validator = Validator {
        catalog: &catalog,
        limits: &config.validation,
        dialect: Dialect::Native,
    };
    let candidates = events.iter().cloned().map(Ok).collect();
    let (records, refused): (Vec<UsageRecord>, _) =
        validator.validate_batch(candidates, tenant, now);
    assert!(
        refused.is_empty(),
        "bench events must all be valid: {refused:?}"
    );
    records
        .iter()
        .map(|r| Payload {
            key: r.key(),
            value: r.to_json(),
        })
        .collect()
}

/// A request body and the number of events in it.
#[derive(Debug, Clone)]
pub struct Body {
    pub bytes: Bytes,
    pub events: usize,
}

/// One body per event (a JSON object each).
pub fn single_bodies(events: &[Map<String, Value>]) -> Vec<Body> {
    events
        .iter()
        .map(|e| Body {
            bytes: Bytes::from(serde_json::to_vec(e).expect("event serializes")),
            events: 1,
        })
        .collect()
}

/// JSON arrays of `batch` events (the last one may be shorter).
pub fn batch_bodies(events: &[Map<String, Value>], batch: usize) -> Vec<Body> {
    events
        .chunks(batch.max(1))
        .map(|chunk| Body {
            bytes: Bytes::from(serde_json::to_vec(chunk).expect("batch serializes")),
            events: chunk.len(),
        })
        .collect()
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
    fn every_event_is_valid_and_becomes_one_record() {
        let now = OffsetDateTime::now_utc();
        let events = events("t", 101, now);
        let payloads = payloads(&dev_config(), &events, now);
        assert_eq!(payloads.len(), 101);
        assert!(payloads[0].key.starts_with("demo/customer-"));
        let bodies = batch_bodies(&events, 50);
        assert_eq!(
            bodies.iter().map(|b| b.events).collect::<Vec<_>>(),
            [50, 50, 1]
        );
        assert_eq!(single_bodies(&events).len(), 101);
    }
}
