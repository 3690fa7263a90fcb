//! The common case without a JSON tree: an event with string envelope fields and a flat
//! `data` object is read from borrowed slices of the body and its record is written
//! straight from them.
//!
//! The fast path only ever *accepts*. Anything it is not sure of — a field of the wrong
//! type, nested or escaped `data`, an exponent, any check that fails — returns `None`, and
//! the caller runs the full validator, which owns every error message. So both paths
//! accept the same events and write the same bytes; `tests.rs` checks that property.

use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

use super::{check_time, parse_time, valid_string, Dialect, Encoded, Validator};
use crate::body::{BodyFormat, RawCandidate};
use crate::config::Tenant;
use crate::data::measure_flat;
use crate::event::{parse_utc, push_record_key, RECORD_VERSION};
use crate::scan::{Cursor, Flat};

/// One envelope field as sent. A string with escapes is not read here (the event goes to
/// the full validator).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
enum Field<'a> {
    #[default]
    Absent,
    Null,
    Str(&'a str),
}

impl<'a> Field<'a> {
    fn get(self) -> Option<&'a str> {
        match self {
            Field::Str(s) => Some(s),
            Field::Absent | Field::Null => None,
        }
    }

    /// Reads the field's value at the cursor: a plain string or `null`, sent once.
    fn read(&mut self, c: &mut Cursor<'a>) -> Option<()> {
        if *self != Field::Absent {
            return None;
        }
        *self = if c.null() {
            Field::Null
        } else {
            Field::Str(c.plain_string()?)
        };
        Some(())
    }
}

/// An event in the common shape, read in one pass: envelope fields that are plain strings
/// (or null), each at most once, no other field, and `data` a flat object of scalars.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub(super) struct Envelope<'a> {
    id: Field<'a>,
    customer: Field<'a>,
    subject: Field<'a>,
    event_type: Field<'a>,
    time: Field<'a>,
    source: Field<'a>,
    specversion: Field<'a>,
    datacontenttype: Field<'a>,
    dataschema: Field<'a>,
    data: Option<Flat<'a>>,
}

impl<'a> Envelope<'a> {
    /// Reads one event object at the cursor, or `None` when it is not in the common shape.
    pub(super) fn read(c: &mut Cursor<'a>) -> Option<Envelope<'a>> {
        let mut e = Envelope::default();
        c.object(|key, c| match key {
            "id" => e.id.read(c),
            "customer" => e.customer.read(c),
            "subject" => e.subject.read(c),
            "type" => e.event_type.read(c),
            "time" => e.time.read(c),
            "source" => e.source.read(c),
            "specversion" => e.specversion.read(c),
            "datacontenttype" => e.datacontenttype.read(c),
            "dataschema" => e.dataschema.read(c),
            "data" if e.data.is_none() => {
                e.data = Some(Flat::read(c)?);
                Some(())
            }
            _ => None,
        })?;
        Some(e)
    }

    /// Reads `text`, one event object with nothing but whitespace around it.
    pub(super) fn parse(text: &'a str) -> Option<Envelope<'a>> {
        let mut c = Cursor::new(text);
        c.ws();
        let e = Envelope::read(&mut c)?;
        c.ws();
        c.at_end().then_some(e)
    }
}

/// One event of a request body: read in the common shape already, or as the body split
/// gave it.
// Nearly every item is `Read`: boxing it would cost an allocation per event.
#[allow(clippy::large_enum_variant)]
pub(super) enum Item<'a> {
    Read(&'a str, Envelope<'a>),
    /// An array element the reader gave up on: for the full parse.
    Skipped(&'a str),
    Raw(RawCandidate<'a>),
}

/// A JSON array body read in one pass, as an iterator: each event in the common shape is
/// read as it is met, any other element stepped over and left for the full parse. Steps
/// are loose only around elements left for the full parse, and each of those is parsed
/// alone before it is trusted (see `encode_body`).
pub(super) struct Array<'a> {
    text: &'a str,
    cursor: Cursor<'a>,
    count: usize,
    max_events: usize,
    state: ArrayState,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ArrayState {
    /// At an element: the first, or one after a comma.
    Reading,
    /// After the closing bracket and nothing but whitespace: the body was plainly an array
    /// of 1..=`max_events` values.
    Done,
    /// Anything else: the general split decides, with its errors.
    Failed,
}

impl<'a> Array<'a> {
    /// `None` when the body is not (the start of) a JSON array of events.
    pub(super) fn new(body: &'a [u8], format: BodyFormat, max_events: usize) -> Option<Array<'a>> {
        if !matches!(format, BodyFormat::Json | BodyFormat::CloudEventsBatch) {
            return None;
        }
        let text = std::str::from_utf8(body).ok()?;
        let mut cursor = Cursor::new(text);
        cursor.ws();
        if !cursor.eat(b'[') {
            return None;
        }
        Some(Array {
            text,
            cursor,
            count: 0,
            max_events,
            state: ArrayState::Reading,
        })
    }

    /// How many events the body likely holds (events run to a hundred-odd bytes), to size
    /// the results; not a bound.
    pub(super) fn estimate(&self) -> usize {
        (self.text.len() / 100 + 1).min(self.max_events)
    }

    /// Whether every element was read and the body ended as an array must.
    pub(super) fn complete(&self) -> bool {
        self.state == ArrayState::Done
    }

    fn fail(&mut self) -> Option<Item<'a>> {
        self.state = ArrayState::Failed;
        None
    }
}

impl<'a> Iterator for Array<'a> {
    type Item = Item<'a>;

    fn next(&mut self) -> Option<Item<'a>> {
        if self.state != ArrayState::Reading {
            return None;
        }
        let c = &mut self.cursor;
        c.ws();
        if self.count == self.max_events {
            return self.fail();
        }
        let start = c.pos();
        let item = match Envelope::read(c) {
            Some(e) => Item::Read(&self.text[start..c.pos()], e),
            None => {
                c.rewind(start);
                if c.skip().is_none() {
                    return self.fail();
                }
                Item::Skipped(&self.text[start..c.pos()])
            }
        };
        self.count += 1;
        c.ws();
        if !c.eat(b',') {
            let closed = c.eat(b']');
            c.ws();
            self.state = if closed && c.at_end() {
                ArrayState::Done
            } else {
                ArrayState::Failed
            };
        }
        Some(item)
    }
}

/// What every event of one request shares: the receipt time and its text in records, and
/// the tenant with the start of every record.
pub(super) struct Stamp {
    pub(super) now: OffsetDateTime,
    pub(super) text: String,
    /// `{"v":1,"tenant":"…","id":` as `serde_json` writes it.
    head: Vec<u8>,
}

impl Stamp {
    pub(super) fn new(now: OffsetDateTime, tenant: &Tenant) -> Stamp {
        let text = now
            .format(&Rfc3339)
            .expect("a clock reading formats as RFC 3339");
        let mut head = format!("{{\"v\":{RECORD_VERSION},\"tenant\":").into_bytes();
        serde_json::to_writer(&mut head, &tenant.id).expect("a string serializes");
        head.extend_from_slice(b",\"id\":");
        Stamp { now, text, head }
    }
}

impl Validator<'_> {
    /// Accepts an event read by [`Envelope::read`] from `raw`, or returns `None` for the full
    /// validator to decide.
    pub(super) fn fast(
        &self,
        raw: &str,
        e: &Envelope<'_>,
        tenant: &Tenant,
        stamp: &Stamp,
    ) -> Option<Encoded> {
        let now = stamp.now;
        let l = self.limits;
        let ok = |f: Field<'_>, max| f.get().is_none_or(|s| valid_string(s, max));
        if !(ok(e.specversion, 16)
            && ok(e.source, 1024)
            && ok(e.datacontenttype, 256)
            && ok(e.dataschema, 1024))
        {
            return None;
        }
        match (self.dialect, e.specversion.get()) {
            (_, Some("1.0")) | (Dialect::Native, None) => {}
            _ => return None,
        }
        let source = e.source.get();
        if self.dialect == Dialect::CloudEvents && source.is_none() {
            return None;
        }
        if e.datacontenttype
            .get()
            .is_some_and(|ct| !ct.starts_with("application/json"))
        {
            return None;
        }
        let id = e.id.get().filter(|s| valid_string(s, l.max_id_chars))?;
        let customer = match (self.dialect, e.customer, e.subject) {
            (Dialect::Native, Field::Str(c), Field::Absent) => c,
            (_, Field::Absent, Field::Str(s)) => s,
            _ => return None,
        };
        if !valid_string(customer, l.max_customer_chars) {
            return None;
        }
        let event_type = e
            .event_type
            .get()
            .filter(|s| valid_string(s, l.max_type_chars))?;
        let time = match e.time.get() {
            None => EventTime::Now,
            Some(s) => match canonical_utc(s) {
                Some(t) => EventTime::Canonical(t, s),
                None => EventTime::Other(parse_time(s).ok()?),
            },
        };
        check_time(time.at(now), now, l).ok()?;
        let empty = Flat::default();
        let data = e.data.as_ref().unwrap_or(&empty);
        if data.len() > l.max_properties || (!data.is_empty() && l.max_depth == 0) {
            return None;
        }
        if tenant.strict && !self.catalog.knows_type(event_type) {
            return None;
        }
        for meter in self.catalog.meters_for_type(event_type) {
            measure_flat(meter, data, l.max_dimension_chars)?;
        }

        // The key, then the record: the event's text plus the tenant, the receipt time and
        // some keys.
        let mut buf = Vec::with_capacity(2 * tenant.id.len() + customer.len() + raw.len() + 100);
        push_record_key(&mut buf, &tenant.id, customer);
        let key_end = buf.len();
        let record = Record {
            head: &stamp.head,
            id,
            customer,
            event_type,
            time,
            received_at: &stamp.text,
            source,
        };
        let id_at = record.write(&mut buf, data)?;
        Some(Encoded {
            id: id_at..id_at + id.len(),
            payload_end: buf.len(),
            key_end,
            buf,
        })
    }
}

/// An event's time as the record writes it.
#[derive(Clone, Copy)]
enum EventTime<'a> {
    /// Absent: the receipt time.
    Now,
    /// Sent as the record writes it (see [`canonical_utc`]).
    Canonical(OffsetDateTime, &'a str),
    /// Any other RFC 3339 spelling, normalized to UTC.
    Other(OffsetDateTime),
}

impl EventTime<'_> {
    fn at(self, now: OffsetDateTime) -> OffsetDateTime {
        match self {
            EventTime::Now => now,
            EventTime::Canonical(t, _) | EventTime::Other(t) => t,
        }
    }
}

/// [`parse_utc`] for the spellings that `OffsetDateTime`'s RFC 3339 output gives back
/// unchanged: those whose fraction, if any, does not end in 0.
fn canonical_utc(s: &str) -> Option<OffsetDateTime> {
    let b = s.as_bytes();
    if b.len() > 20 && b[b.len() - 2] == b'0' {
        return None;
    }
    parse_utc(s)
}

/// The envelope of a record, borrowed.
struct Record<'a> {
    /// Everything before the id's value ([`Stamp`]).
    head: &'a [u8],
    id: &'a str,
    customer: &'a str,
    event_type: &'a str,
    time: EventTime<'a>,
    received_at: &'a str,
    source: Option<&'a str>,
}

impl Record<'_> {
    /// Writes the record exactly as `serde_json::to_vec(&UsageRecord)` does. Every string
    /// but the tenant was read as a plain string (no escapes, no control characters), which
    /// serde_json writes as it is between quotes; the head was written by serde_json.
    /// Returns where the id's text starts.
    fn write(&self, out: &mut Vec<u8>, data: &Flat<'_>) -> Option<usize> {
        let plain = |out: &mut Vec<u8>, s: &str| {
            out.push(b'"');
            out.extend_from_slice(s.as_bytes());
            out.push(b'"');
        };
        out.extend_from_slice(self.head);
        let id_at = out.len() + 1;
        plain(out, self.id);
        out.extend_from_slice(b",\"customer\":");
        plain(out, self.customer);
        out.extend_from_slice(b",\"type\":");
        plain(out, self.event_type);
        out.extend_from_slice(b",\"time\":");
        match self.time {
            EventTime::Now => plain(out, self.received_at),
            EventTime::Canonical(_, text) => plain(out, text),
            EventTime::Other(t) => {
                out.push(b'"');
                t.format_into(out, &Rfc3339).ok()?;
                out.push(b'"');
            }
        }
        out.extend_from_slice(b",\"received_at\":");
        plain(out, self.received_at);
        if let Some(source) = self.source {
            out.extend_from_slice(b",\"source\":");
            plain(out, source);
        }
        out.extend_from_slice(b",\"data\":{");
        for (i, (k, v)) in data.iter().enumerate() {
            if i > 0 {
                out.push(b',');
            }
            plain(out, k);
            out.push(b':');
            out.extend_from_slice(v.as_bytes());
        }
        out.extend_from_slice(b"}}");
        Some(id_at)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]

        #[test]
        fn any_time_the_record_writes_is_read_back_canonically(
            secs in 0i64..4_000_000_000,
            nanos in prop_oneof![Just(0u32), 0u32..1_000_000_000, (0u32..1000).prop_map(|m| m * 1_000_000)],
        ) {
            let t = OffsetDateTime::from_unix_timestamp(secs).expect("in range")
                + time::Duration::nanoseconds(i64::from(nanos));
            let s = t.format(&Rfc3339).expect("formats");
            prop_assert_eq!(canonical_utc(&s), Some(t), "{}", s);
        }

        #[test]
        fn whatever_is_read_canonically_is_written_back_unchanged(
            s in "20[0-9]{2}-(0[1-9]|1[0-3])-([0-2][0-9]|3[01])T([01][0-9]|2[0-4]):[0-5][0-9]:([0-5][0-9]|60)(\\.[0-9]{0,10})?Z",
        ) {
            if let Some(t) = canonical_utc(&s) {
                prop_assert_eq!(t.format(&Rfc3339).expect("formats"), s.clone());
                prop_assert_eq!(parse_time(&s).expect("parses"), t);
            }
        }
    }

    #[test]
    fn canonical_times_are_exactly_what_the_record_writes() {
        for s in [
            "2026-11-24T11:00:00Z",
            "2026-11-24T11:00:00.5Z",
            "2026-11-24T11:00:00.12Z",
            "2026-11-24T11:00:00.123456789Z",
            "2024-02-29T23:59:59.000000001Z",
        ] {
            let t = canonical_utc(s).expect(s);
            assert_eq!(t, parse_time(s).expect(s), "{s}");
            assert_eq!(t.format(&Rfc3339).expect("formats"), s);
        }
        for s in [
            "2026-11-24T11:00:00.120Z",
            "2026-11-24T11:00:00.000Z",
            "2026-11-24T11:00:00.Z",
            "2026-11-24T11:00:00.1234567891Z",
            "2026-11-24T11:59:60Z",
            "2026-02-29T11:00:00Z",
            "2026-11-24t11:00:00z",
            "2026-11-24T11:00:00+00:00",
            "2026-11-24T24:00:00Z",
            "2026-13-24T11:00:00Z",
            "+026-11-24T11:00:00Z",
        ] {
            assert_eq!(canonical_utc(s), None, "{s}");
        }
    }
}
