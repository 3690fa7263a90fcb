//! The usage event once accepted, and its Kafka record.
//!
//! Records are JSON. The aggregator parses each record once and the payloads are small, so
//! a binary encoding would save little, while JSON keeps the topic readable by any
//! consumer, keeps `data` exactly as sent (numbers keep their decimal text), and lets the
//! dead-letter topic carry the original bytes in a form an operator can read.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use time::{Date, Month, OffsetDateTime, PrimitiveDateTime, Time};

/// Version of the record layout, carried in every record.
pub const RECORD_VERSION: u32 = 1;

/// An accepted usage event, owned by a tenant.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct UsageRecord {
    /// Layout version ([`RECORD_VERSION`]).
    pub v: u32,
    /// Tenant, from the API key (never from the body).
    pub tenant: String,
    /// Client-chosen idempotency key: an event is its tenant, customer and id, so a retry
    /// (same customer, same id) counts once, and so does a repeat inside one request.
    pub id: String,
    pub customer: String,
    #[serde(rename = "type")]
    pub event_type: String,
    /// Event time, UTC.
    #[serde(with = "time::serde::rfc3339")]
    pub time: OffsetDateTime,
    /// When the collector received the event, UTC.
    #[serde(with = "time::serde::rfc3339")]
    pub received_at: OffsetDateTime,
    /// CloudEvents `source`, when the client sent one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
    pub data: Map<String, Value>,
}

impl UsageRecord {
    /// The Kafka record key: tenant and customer, so one customer's events (and every
    /// retry of one event) land in one partition, in order.
    pub fn key(&self) -> String {
        record_key(&self.tenant, &self.customer)
    }

    pub fn to_json(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("a record always serializes")
    }
}

/// `tenant/customer`; tenant ids never contain `/`, so the first `/` splits them.
pub fn record_key(tenant: &str, customer: &str) -> String {
    let mut key = Vec::with_capacity(tenant.len() + 1 + customer.len());
    push_record_key(&mut key, tenant, customer);
    String::from_utf8(key).expect("two strings and a slash")
}

/// Appends [`record_key`] to `out`.
pub fn push_record_key(out: &mut Vec<u8>, tenant: &str, customer: &str) {
    out.extend_from_slice(tenant.as_bytes());
    out.push(b'/');
    out.extend_from_slice(customer.as_bytes());
}

/// A time in the spelling records use, `YYYY-MM-DDTHH:MM:SS[.f{1,9}]Z`, read without the
/// general RFC 3339 parser (the collector reads events sent that way, the aggregator every
/// record). `None` for any other spelling (offsets, leap seconds, more than nine digits)
/// and for anything the calendar refuses; the general parser then decides.
pub fn parse_utc(s: &str) -> Option<OffsetDateTime> {
    let b = s.as_bytes();
    if b.len() < 20
        || b[4] != b'-'
        || b[7] != b'-'
        || b[10] != b'T'
        || b[13] != b':'
        || b[16] != b':'
        || b[b.len() - 1] != b'Z'
    {
        return None;
    }
    let num = |digits: &[u8]| -> Option<u32> {
        digits.iter().try_fold(0u32, |n, &d| {
            d.is_ascii_digit().then(|| n * 10 + u32::from(d - b'0'))
        })
    };
    let nanos = match &b[19..b.len() - 1] {
        [] => 0,
        [b'.', fraction @ ..] if (1..=9).contains(&fraction.len()) => {
            num(fraction)? * 10u32.pow(9 - fraction.len() as u32)
        }
        _ => return None,
    };
    let byte = |from: usize| u8::try_from(num(&b[from..from + 2])?).ok();
    let year = i32::try_from(num(&b[0..4])?).ok()?;
    let date = Date::from_calendar_date(year, Month::try_from(byte(5)?).ok()?, byte(8)?).ok()?;
    let t = Time::from_hms_nano(byte(11)?, byte(14)?, byte(17)?, nanos).ok()?;
    Some(PrimitiveDateTime::new(date, t).assume_utc())
}

#[cfg(test)]
mod tests {
    use super::*;
    use time::macros::datetime;

    #[test]
    fn record_round_trips_with_exact_numbers() {
        let data: Map<String, Value> =
            serde_json::from_str(r#"{"tokens": 12345678901234567890.123456789, "m": "x"}"#)
                .expect("data");
        let r = UsageRecord {
            v: RECORD_VERSION,
            tenant: "demo".into(),
            id: "e1".into(),
            customer: "c/1".into(),
            event_type: "completion".into(),
            time: datetime!(2026-11-24 10:00:00.5 UTC),
            received_at: datetime!(2026-11-24 10:00:01 UTC),
            source: None,
            data,
        };
        let bytes = r.to_json();
        let text = std::str::from_utf8(&bytes).expect("utf8");
        assert!(text.contains("12345678901234567890.123456789"), "{text}");
        assert!(
            text.contains(r#""time":"2026-11-24T10:00:00.5Z""#),
            "{text}"
        );
        let back: UsageRecord = serde_json::from_slice(&bytes).expect("parse");
        assert_eq!(back, r);
        assert_eq!(r.key(), "demo/c/1");
    }
}
