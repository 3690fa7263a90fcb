//! The common case without a JSON tree: an event with string envelope fields and a flat
//! `data` object is read from borrowed slices of the body and its record is written
//! straight from them.
//!
//! The fast path only ever *accepts*. Anything it is not sure of — a field of the wrong
//! type, nested or escaped `data`, an exponent, any check that fails — returns `None`, and
//! the caller runs the full validator, which owns every error message. So both paths
//! accept the same events and write the same bytes; `tests.rs` checks that property.

use std::io::Write;

use time::format_description::well_known::Rfc3339;
use time::{Date, Month, OffsetDateTime, PrimitiveDateTime, Time};

use super::{check_time, parse_time, valid_string, Dialect, Validator};
use crate::body::{BodyFormat, RawCandidate};
use crate::config::Tenant;
use crate::data::measure_flat;
use crate::event::{record_key, RECORD_VERSION};
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
    Raw(RawCandidate<'a>),
}

/// A JSON array body in one pass: each event in the common shape read as it is met, any
/// other element stepped over and left for the full parse. `None` when the body is not
/// plainly an array of 1..=`max_events` values (the general split then decides, with its
/// errors). Steps are loose only around elements left for the full parse, and each of
/// those is parsed alone before it is trusted (see `encode_body`).
pub(super) fn array(body: &[u8], format: BodyFormat, max_events: usize) -> Option<Vec<Item<'_>>> {
    if !matches!(format, BodyFormat::Json | BodyFormat::CloudEventsBatch) {
        return None;
    }
    let text = std::str::from_utf8(body).ok()?;
    let mut c = Cursor::new(text);
    c.ws();
    if !c.eat(b'[') {
        return None;
    }
    let mut items = Vec::with_capacity((body.len() / 128).clamp(1, max_events.max(1)));
    loop {
        c.ws();
        if items.len() == max_events {
            return None;
        }
        let start = c.pos();
        let item = match Envelope::read(&mut c) {
            Some(e) => Item::Read(&text[start..c.pos()], e),
            None => {
                let mut skip = Cursor::new(text);
                skip.advance(start);
                skip.skip()?;
                c = skip;
                Item::Raw(RawCandidate::Text {
                    raw: &text[start..c.pos()],
                    line: None,
                })
            }
        };
        items.push(item);
        c.ws();
        if c.eat(b',') {
            continue;
        }
        if !c.eat(b']') {
            return None;
        }
        c.ws();
        return c.at_end().then_some(items);
    }
}

/// What every event of one request shares: the receipt time, and its text in records.
pub(super) struct Stamp {
    pub(super) now: OffsetDateTime,
    pub(super) text: String,
}

impl Stamp {
    pub(super) fn new(now: OffsetDateTime) -> Stamp {
        let text = now
            .format(&Rfc3339)
            .expect("a clock reading formats as RFC 3339");
        Stamp { now, text }
    }
}

/// An event accepted by the fast path: its id and its record's bytes.
pub(super) struct Fast {
    pub(super) id: String,
    pub(super) key: String,
    pub(super) payload: Vec<u8>,
}

impl Validator<'_> {
    /// Accepts an event read by [`Envelope::read`], or returns `None` for the full
    /// validator to decide.
    pub(super) fn fast(&self, e: &Envelope<'_>, tenant: &Tenant, stamp: &Stamp) -> Option<Fast> {
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

        let mut payload = Vec::with_capacity(
            96 + tenant.id.len() + id.len() + customer.len() + event_type.len() + 2 * 32,
        );
        let record = Record {
            tenant: &tenant.id,
            id,
            customer,
            event_type,
            time,
            received_at: &stamp.text,
            source,
        };
        record.write(&mut payload, data)?;
        Some(Fast {
            key: record_key(&tenant.id, customer),
            id: id.to_owned(),
            payload,
        })
    }
}

/// An event's time as the record writes it.
#[derive(Clone, Copy)]
enum EventTime<'a> {
    /// Absent: the receipt time.
    Now,
    /// Sent as `YYYY-MM-DDTHH:MM:SSZ`, which is already how the record writes it.
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

/// `YYYY-MM-DDTHH:MM:SSZ` read without the general parser; `None` for any other spelling
/// and for anything the calendar refuses (a leap second included), which the general
/// parser then decides. For every text it accepts, `OffsetDateTime`'s RFC 3339 output is
/// that same text.
fn canonical_utc(s: &str) -> Option<OffsetDateTime> {
    let b = s.as_bytes();
    if b.len() != 20
        || b[4] != b'-'
        || b[7] != b'-'
        || b[10] != b'T'
        || b[13] != b':'
        || b[16] != b':'
        || b[19] != b'Z'
    {
        return None;
    }
    let num = |from: usize, to: usize| -> Option<u32> {
        b[from..to].iter().try_fold(0u32, |n, &d| {
            d.is_ascii_digit().then(|| n * 10 + u32::from(d - b'0'))
        })
    };
    let year = i32::try_from(num(0, 4)?).ok()?;
    let month = Month::try_from(u8::try_from(num(5, 7)?).ok()?).ok()?;
    let day = u8::try_from(num(8, 10)?).ok()?;
    let date = Date::from_calendar_date(year, month, day).ok()?;
    let t = Time::from_hms(
        u8::try_from(num(11, 13)?).ok()?,
        u8::try_from(num(14, 16)?).ok()?,
        u8::try_from(num(17, 19)?).ok()?,
    )
    .ok()?;
    Some(PrimitiveDateTime::new(date, t).assume_utc())
}

/// The envelope of a record, borrowed.
struct Record<'a> {
    tenant: &'a str,
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
    /// serde_json writes as it is between quotes.
    fn write(&self, out: &mut Vec<u8>, data: &Flat<'_>) -> Option<()> {
        let plain = |out: &mut Vec<u8>, s: &str| {
            out.push(b'"');
            out.extend_from_slice(s.as_bytes());
            out.push(b'"');
        };
        write!(out, "{{\"v\":{RECORD_VERSION},\"tenant\":").ok()?;
        serde_json::to_writer(&mut *out, self.tenant).ok()?;
        out.extend_from_slice(b",\"id\":");
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
        Some(())
    }
}
