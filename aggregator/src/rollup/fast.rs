//! A decoder for the exact bytes the collector writes (`UsageRecord::to_json`): fields in
//! their declared order, no whitespace, strings without escapes, times as
//! `YYYY-MM-DDTHH:MM:SS[.f…]Z`. It reads such a record without a JSON state machine and
//! answers `None` for anything else, which then goes through serde (`decode`), so it only
//! decides how fast a record is read, never what it says. `data` is taken as the text
//! between `"data":` and the record's closing brace; `EventData::parse` checks it as JSON
//! before anything is counted, as it does after serde.
//!
//! Decoding a record through serde was a third of the consumer thread (BENCHMARKS.md).

use std::borrow::Cow;

use time::OffsetDateTime;

use super::Event;

pub(super) fn decode(payload: &[u8]) -> Option<Event<'_>> {
    let text = std::str::from_utf8(payload).ok()?;
    let mut r = Reader { text, at: 0 };
    r.expect("{\"v\":")?;
    let v = r.number()?;
    r.expect(",\"tenant\":")?;
    let tenant = r.string()?;
    r.expect(",\"id\":")?;
    let id = r.string()?;
    r.expect(",\"customer\":")?;
    let customer = r.string()?;
    r.expect(",\"type\":")?;
    let event_type = r.string()?;
    r.expect(",\"time\":")?;
    let time = rfc3339(r.string()?)?;
    r.expect(",\"received_at\":")?;
    let received_at = rfc3339(r.string()?)?;
    let source = if r.expect(",\"source\":").is_some() {
        Some(Cow::Borrowed(r.string()?))
    } else {
        None
    };
    r.expect(",\"data\":")?;
    // `data` must be the last field: its closing brace is followed by the record's.
    let end = object_end(&text.as_bytes()[r.at..])? + r.at;
    if end + 1 != text.len() - 1 || !text.ends_with('}') {
        return None;
    }
    let data = &text[r.at..=end];
    Some(Event {
        v,
        tenant: Cow::Borrowed(tenant),
        id: Cow::Borrowed(id),
        customer: Cow::Borrowed(customer),
        event_type: Cow::Borrowed(event_type),
        time,
        received_at,
        source,
        data,
    })
}

struct Reader<'a> {
    text: &'a str,
    at: usize,
}

impl<'a> Reader<'a> {
    fn expect(&mut self, what: &str) -> Option<()> {
        self.text[self.at..].starts_with(what).then(|| {
            self.at += what.len();
        })
    }

    fn number(&mut self) -> Option<u32> {
        let rest = &self.text.as_bytes()[self.at..];
        let digits = rest.iter().take_while(|b| b.is_ascii_digit()).count();
        // JSON has no leading zeros; "0" itself is fine.
        if digits == 0 || (digits > 1 && rest[0] == b'0') {
            return None;
        }
        let n = self.text[self.at..self.at + digits].parse().ok()?;
        self.at += digits;
        Some(n)
    }

    /// A string with nothing to unescape: no backslash and no control character (which
    /// JSON forbids raw) before its closing quote.
    fn string(&mut self) -> Option<&'a str> {
        self.expect("\"")?;
        let rest = &self.text.as_bytes()[self.at..];
        let len = rest
            .iter()
            .position(|&b| b == b'"' || b == b'\\' || b < 0x20)?;
        if rest[len] != b'"' {
            return None;
        }
        let s = &self.text[self.at..self.at + len];
        self.at += len + 1;
        Some(s)
    }
}

/// Where the object starting at `b[0]` closes: braces counted outside strings, escapes
/// skipped inside them. Whether the text between is valid JSON is for `EventData::parse`.
fn object_end(b: &[u8]) -> Option<usize> {
    if b.first() != Some(&b'{') {
        return None;
    }
    let (mut depth, mut in_string, mut escaped) = (0usize, false, false);
    for (i, &c) in b.iter().enumerate() {
        if in_string {
            match c {
                _ if escaped => escaped = false,
                b'\\' => escaped = true,
                b'"' => in_string = false,
                _ => {}
            }
            continue;
        }
        match c {
            b'"' => in_string = true,
            b'{' => depth += 1,
            b'}' => {
                depth -= 1;
                if depth == 0 {
                    return Some(i);
                }
            }
            _ => {}
        }
    }
    None
}

/// `YYYY-MM-DDTHH:MM:SS[.f{1,9}]Z`, the form the collector writes; any other RFC 3339 form
/// (offsets, leap seconds, more than nine digits) is left to serde.
fn rfc3339(s: &str) -> Option<OffsetDateTime> {
    tally_core::event::parse_utc(s)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde_json::{Map, Value};
    use tally_core::UsageRecord;

    fn serde_decode(payload: &[u8]) -> Option<Event<'_>> {
        serde_json::from_slice(payload).ok()
    }

    fn record(
        tenant: &str,
        id: &str,
        customer: &str,
        ty: &str,
        nanos: i128,
        source: Option<&str>,
        data: &str,
    ) -> Vec<u8> {
        let at = OffsetDateTime::from_unix_timestamp_nanos(nanos).expect("time");
        let data: Map<String, Value> = serde_json::from_str(data).expect("data");
        UsageRecord {
            v: 1,
            tenant: tenant.into(),
            id: id.into(),
            customer: customer.into(),
            event_type: ty.into(),
            time: at,
            received_at: at + time::Duration::seconds(3),
            source: source.map(str::to_owned),
            data,
        }
        .to_json()
    }

    #[test]
    fn reads_what_the_collector_writes() {
        let bytes = record(
            "demo",
            "e-1",
            "c/1",
            "completion",
            1_795_514_400_250_000_000,
            Some("app"),
            r#"{"tokens": 12.5, "model": "m1", "deep": {"a": [1, {"b": "}"}]}}"#,
        );
        let fast = decode(&bytes).expect("fast path");
        assert_eq!(Some(&fast), serde_decode(&bytes).as_ref());
        // serde_json's map writes its keys in order.
        assert_eq!(
            fast.data,
            r#"{"deep":{"a":[1,{"b":"}"}]},"model":"m1","tokens":12.5}"#
        );
        assert_eq!(fast.time.nanosecond(), 250_000_000);
        // Escaped quotes and braces inside data's strings do not end it.
        let bytes = record(
            "demo",
            "e",
            "c",
            "t",
            0,
            None,
            r#"{"a": "\"}{\\", "b": "}"}"#,
        );
        let fast = decode(&bytes).expect("fast path");
        assert_eq!(Some(&fast), serde_decode(&bytes).as_ref());
        assert_eq!(fast.data, r#"{"a":"\"}{\\","b":"}"}"#);
    }

    #[test]
    fn leaves_everything_else_to_serde() {
        let plain = br#"{"v":1,"tenant":"demo","id":"a","customer":"c","type":"request","time":"2026-11-24T10:00:00Z","received_at":"2026-11-24T10:00:00Z","data":{}}"#;
        let e = decode(plain).expect("fast path");
        assert_eq!((e.data, e.source.is_none()), ("{}", true));
        let others: [&[u8]; 13] = [
            // a field after data, with braces in strings that must not end it early
            br#"{"v":1,"tenant":"demo","id":"a","customer":"c","type":"request","time":"2026-11-24T10:00:00Z","received_at":"2026-11-24T10:00:00Z","data":{"a":"}"},"x":{}}"#,
            // escapes anywhere but data
            br#"{"v":1,"tenant":"demo","id":"a\"b","customer":"c","type":"request","time":"2026-11-24T10:00:00Z","received_at":"2026-11-24T10:00:00Z","data":{}}"#,
            // whitespace
            br#"{"v": 1,"tenant":"demo","id":"a","customer":"c","type":"request","time":"2026-11-24T10:00:00Z","received_at":"2026-11-24T10:00:00Z","data":{}}"#,
            // another order
            br#"{"tenant":"demo","v":1,"id":"a","customer":"c","type":"request","time":"2026-11-24T10:00:00Z","received_at":"2026-11-24T10:00:00Z","data":{}}"#,
            // an offset, a leap second, ten fraction digits, a lower-case z
            br#"{"v":1,"tenant":"demo","id":"a","customer":"c","type":"request","time":"2026-11-24T10:00:00+01:00","received_at":"2026-11-24T10:00:00Z","data":{}}"#,
            br#"{"v":1,"tenant":"demo","id":"a","customer":"c","type":"request","time":"2016-12-31T23:59:60Z","received_at":"2026-11-24T10:00:00Z","data":{}}"#,
            br#"{"v":1,"tenant":"demo","id":"a","customer":"c","type":"request","time":"2026-11-24T10:00:00.1234567890Z","received_at":"2026-11-24T10:00:00Z","data":{}}"#,
            br#"{"v":1,"tenant":"demo","id":"a","customer":"c","type":"request","time":"2026-11-24T10:00:00z","received_at":"2026-11-24T10:00:00Z","data":{}}"#,
            // impossible dates and times
            br#"{"v":1,"tenant":"demo","id":"a","customer":"c","type":"request","time":"2026-02-29T10:00:00Z","received_at":"2026-11-24T10:00:00Z","data":{}}"#,
            br#"{"v":1,"tenant":"demo","id":"a","customer":"c","type":"request","time":"2026-11-24T24:00:00Z","received_at":"2026-11-24T10:00:00Z","data":{}}"#,
            // a leading zero, data that is not an object, a raw control character
            br#"{"v":01,"tenant":"demo","id":"a","customer":"c","type":"request","time":"2026-11-24T10:00:00Z","received_at":"2026-11-24T10:00:00Z","data":{}}"#,
            br#"{"v":1,"tenant":"demo","id":"a","customer":"c","type":"request","time":"2026-11-24T10:00:00Z","received_at":"2026-11-24T10:00:00Z","data":[]}"#,
            b"{\"v\":1,\"tenant\":\"demo\",\"id\":\"a\tb\",\"customer\":\"c\",\"type\":\"request\",\"time\":\"2026-11-24T10:00:00Z\",\"received_at\":\"2026-11-24T10:00:00Z\",\"data\":{}}",
        ];
        for (i, payload) in others.iter().enumerate() {
            assert_eq!(decode(payload), None, "case {i}");
        }
    }

    #[test]
    fn leap_days_and_fractions_read_as_serde_reads_them() {
        for t in [
            "2024-02-29T23:59:59.999999999Z",
            "2000-01-01T00:00:00.1Z",
            "1970-01-01T00:00:00Z",
            "2106-02-07T06:28:15.000000001Z",
        ] {
            let want: OffsetDateTime =
                time::OffsetDateTime::parse(t, &time::format_description::well_known::Rfc3339)
                    .expect("parses");
            assert_eq!(rfc3339(t), Some(want), "{t}");
        }
    }

    proptest! {
        /// Whatever the collector writes, the fast path reads exactly what serde reads; when
        /// it declines, serde is the one that decides.
        #[test]
        fn agrees_with_serde(
            tenant in "[a-z0-9_-]{1,12}",
            id in "\\PC{1,20}",
            customer in "(\\PC|[\"\\\\/\u{1}\t]){1,12}",
            ty in "[a-z_]{1,10}",
            nanos in 0i128..4_102_444_800_000_000_000,
            source in proptest::option::of("\\PC{0,8}"),
            tokens in 0u64..1_000_000_000,
        ) {
            let data = format!(r#"{{"tokens": {tokens}, "model": "m\"{tokens}"}}"#);
            let bytes = record(&tenant, &id, &customer, &ty, nanos, source.as_deref(), &data);
            let slow = serde_decode(&bytes).expect("serde reads every record");
            match decode(&bytes) {
                Some(fast) => prop_assert_eq!(fast, slow),
                None => prop_assert!(
                    [&id, &customer].iter().any(|s| s.contains(['"', '\\']) || s.contains(|c: char| c < ' '))
                        || source.as_deref().is_some_and(|s| s.contains(['"', '\\']) || s.contains(|c: char| c < ' ')),
                    "declined a plain record: {}", String::from_utf8_lossy(&bytes)
                ),
            }
        }
    }
}
