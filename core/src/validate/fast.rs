//! The common case without a JSON tree: an event with string envelope fields and a flat
//! `data` object is read from borrowed slices of the body and its record is written
//! straight from them.
//!
//! The fast path only ever *accepts*. Anything it is not sure of — a field of the wrong
//! type, nested or escaped `data`, an exponent, any check that fails — returns `None`, and
//! the caller runs the full validator, which owns every error message. So both paths
//! accept the same events and write the same bytes; `tests.rs` checks that property.

use std::collections::BTreeMap;
use std::io::Write;

use serde::{Deserialize, Deserializer};
use serde_json::value::RawValue;
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

use super::{check_time, parse_time, valid_string, Dialect, Validator};
use crate::config::Tenant;
use crate::data::{flat, measure_flat};
use crate::event::{record_key, RECORD_VERSION};

/// One envelope field as sent. A string with escapes fails the parse (it cannot be
/// borrowed), which sends the event to the full validator.
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
}

impl<'de: 'a, 'a> Deserialize<'de> for Field<'a> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Ok(match Option::<&'de str>::deserialize(d)? {
            None => Field::Null,
            Some(s) => Field::Str(s),
        })
    }
}

/// The envelope as sent. Unknown fields, duplicate fields and non-string values fail the
/// parse, which sends the event to the full validator.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Envelope<'a> {
    #[serde(borrow, default)]
    id: Field<'a>,
    #[serde(borrow, default)]
    customer: Field<'a>,
    #[serde(borrow, default)]
    subject: Field<'a>,
    #[serde(borrow, default, rename = "type")]
    event_type: Field<'a>,
    #[serde(borrow, default)]
    time: Field<'a>,
    #[serde(borrow, default)]
    source: Field<'a>,
    #[serde(borrow, default)]
    specversion: Field<'a>,
    #[serde(borrow, default)]
    datacontenttype: Field<'a>,
    #[serde(borrow, default)]
    dataschema: Field<'a>,
    #[serde(borrow, default)]
    data: Option<&'a RawValue>,
}

/// `data` with scalar values only, keys in the order the record writes them (the record's
/// map is sorted, and a repeated key keeps its last value, as in the full path).
type FlatData<'a> = BTreeMap<&'a str, &'a RawValue>;

/// An event accepted by the fast path: its id and its record's bytes.
pub(super) struct Fast {
    pub(super) id: String,
    pub(super) key: String,
    pub(super) payload: Vec<u8>,
}

impl Validator<'_> {
    /// Accepts `raw` (one event object) without building a JSON tree, or returns `None`
    /// for the full validator to decide.
    pub(super) fn fast(&self, raw: &str, tenant: &Tenant, now: OffsetDateTime) -> Option<Fast> {
        let e: Envelope<'_> = serde_json::from_str(raw).ok()?;
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
            None => now,
            Some(s) => parse_time(s).ok()?,
        };
        check_time(time, now, l).ok()?;
        let data: FlatData<'_> = match e.data {
            None => BTreeMap::new(),
            Some(raw) => flat(raw.get())?,
        };
        if data.len() > l.max_properties || (!data.is_empty() && l.max_depth == 0) {
            return None;
        }
        if tenant.strict && !self.catalog.knows_type(event_type) {
            return None;
        }
        for meter in self.catalog.meters_for_type(event_type) {
            measure_flat(meter, &data, l.max_dimension_chars)?;
        }

        let mut payload = Vec::with_capacity(raw.len() + tenant.id.len() + 96);
        let record = Record {
            tenant: &tenant.id,
            id,
            customer,
            event_type,
            time,
            received_at: now,
            source,
        };
        record.write(&mut payload, &data)?;
        Some(Fast {
            key: record_key(&tenant.id, customer),
            id: id.to_owned(),
            payload,
        })
    }
}

/// The envelope of a record, borrowed.
struct Record<'a> {
    tenant: &'a str,
    id: &'a str,
    customer: &'a str,
    event_type: &'a str,
    time: OffsetDateTime,
    received_at: OffsetDateTime,
    source: Option<&'a str>,
}

impl Record<'_> {
    /// Writes the record exactly as `serde_json::to_vec(&UsageRecord)` does.
    fn write(&self, out: &mut Vec<u8>, data: &FlatData<'_>) -> Option<()> {
        let string = |out: &mut Vec<u8>, s: &str| serde_json::to_writer(out, s).ok();
        write!(out, "{{\"v\":{RECORD_VERSION},\"tenant\":").ok()?;
        string(out, self.tenant)?;
        out.extend_from_slice(b",\"id\":");
        string(out, self.id)?;
        out.extend_from_slice(b",\"customer\":");
        string(out, self.customer)?;
        out.extend_from_slice(b",\"type\":");
        string(out, self.event_type)?;
        out.extend_from_slice(b",\"time\":\"");
        self.time.format_into(out, &Rfc3339).ok()?;
        out.extend_from_slice(b"\",\"received_at\":\"");
        self.received_at.format_into(out, &Rfc3339).ok()?;
        out.push(b'"');
        if let Some(source) = self.source {
            out.extend_from_slice(b",\"source\":");
            string(out, source)?;
        }
        out.extend_from_slice(b",\"data\":{");
        for (i, (k, v)) in data.iter().enumerate() {
            if i > 0 {
                out.push(b',');
            }
            string(out, k)?;
            out.push(b':');
            out.extend_from_slice(v.get().as_bytes());
        }
        out.extend_from_slice(b"}}");
        Some(())
    }
}
