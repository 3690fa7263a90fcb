//! Event validation against the meter catalog and the configured limits. Pure: the caller
//! passes the clock reading, so window edges are testable without waiting.

use std::fmt;
use std::hash::BuildHasher;
use std::time::Duration;

use serde_json::{Map, Value};
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

use crate::body::{self, BodyError, BodyFormat, Candidate, RawCandidate};
use crate::catalog::{lookup, Catalog, Meter};
use crate::config::{Tenant, ValidationConfig};
use crate::event::{UsageRecord, RECORD_VERSION};
use crate::quantity::Quantity;

/// Which field names the body uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dialect {
    /// tally's own: `customer` (or CloudEvents' `subject`), `source` and `specversion` optional.
    Native,
    /// CloudEvents 1.0 as OpenMeter takes it: `specversion`, `source`, `subject` required.
    CloudEvents,
}

/// Why one event was refused: the field at fault and the reason, shown as `field: reason`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejection {
    pub field: String,
    pub reason: String,
}

impl Rejection {
    pub(crate) fn new(field: impl Into<String>, reason: impl Into<String>) -> Rejection {
        Rejection {
            field: field.into(),
            reason: reason.into(),
        }
    }

    /// A short, bounded label for metrics.
    pub fn metric_reason(&self) -> &'static str {
        match self.field.split('.').next().unwrap_or_default() {
            "id" => "id",
            "customer" | "subject" => "customer",
            "type" => "type",
            "time" => "time",
            "data" => "data",
            "event" => "malformed",
            "specversion" | "source" | "datacontenttype" | "dataschema" => "cloudevents",
            _ => "field",
        }
    }
}

impl fmt::Display for Rejection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.field, self.reason)
    }
}

/// An event refused inside a request, by its position in the request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refused {
    pub index: usize,
    /// The event's `id` when it had a readable one.
    pub id: Option<String>,
    pub error: String,
    pub reason: &'static str,
}

/// An accepted event as its Kafka record, key and value in one buffer (one allocation per
/// event instead of three).
#[derive(Debug, Clone)]
pub struct Encoded {
    /// The key, the value, then the id when the value does not hold it verbatim.
    buf: Vec<u8>,
    key_end: usize,
    payload_end: usize,
    id: std::ops::Range<usize>,
}

impl Encoded {
    fn of(record: &UsageRecord) -> Encoded {
        let mut buf = record.key().into_bytes();
        let key_end = buf.len();
        serde_json::to_writer(&mut buf, record).expect("a record always serializes");
        let payload_end = buf.len();
        buf.extend_from_slice(record.id.as_bytes());
        Encoded {
            id: payload_end..buf.len(),
            buf,
            key_end,
            payload_end,
        }
    }

    /// [`UsageRecord::key`].
    pub fn key(&self) -> &[u8] {
        &self.buf[..self.key_end]
    }

    /// [`UsageRecord::to_json`].
    pub fn payload(&self) -> &[u8] {
        &self.buf[self.key_end..self.payload_end]
    }

    /// The event's id.
    pub fn id(&self) -> &str {
        std::str::from_utf8(self.id_bytes()).expect("an id is a string")
    }

    fn id_bytes(&self) -> &[u8] {
        &self.buf[self.id.clone()]
    }

    /// Key and id: one event of a request (see `dedupe`).
    fn identity(&self) -> (&[u8], &[u8]) {
        (self.key(), self.id_bytes())
    }
}

impl PartialEq for Encoded {
    fn eq(&self, other: &Encoded) -> bool {
        self.key() == other.key()
            && self.payload() == other.payload()
            && self.id_bytes() == other.id_bytes()
    }
}

impl Eq for Encoded {}

/// Checks events for one tenant against the catalog and limits.
#[derive(Debug, Clone, Copy)]
pub struct Validator<'a> {
    pub catalog: &'a Catalog,
    pub limits: &'a ValidationConfig,
    pub dialect: Dialect,
}

const NATIVE_FIELDS: &[&str] = &[
    "id",
    "customer",
    "subject",
    "type",
    "time",
    "data",
    "source",
    "specversion",
    "datacontenttype",
    "dataschema",
];

impl Validator<'_> {
    /// Validates a whole request's candidates: the accepted records in request order, and
    /// every refusal by index. A repeated `id` within the request is refused after its
    /// first occurrence.
    pub fn validate_batch(
        &self,
        candidates: Vec<Candidate>,
        tenant: &Tenant,
        now: OffsetDateTime,
    ) -> (Vec<UsageRecord>, Vec<Refused>) {
        let capacity = candidates.len();
        dedupe(
            candidates,
            capacity,
            |c| self.candidate(c, tenant, now),
            |r| (r.customer.as_bytes(), r.id.as_bytes()),
        )
    }

    /// Splits a request body and validates its events like [`body::split`] followed by
    /// [`Validator::validate_batch`], but writes each accepted event's record directly:
    /// events in the common shape are read without building a JSON tree.
    pub fn encode_body(
        &self,
        body: &[u8],
        format: BodyFormat,
        max_events: usize,
        tenant: &Tenant,
        now: OffsetDateTime,
    ) -> Result<(Vec<Encoded>, Vec<Refused>), BodyError> {
        let stamp = fast::Stamp::new(now, tenant);
        let whole_body_error = std::cell::Cell::new(false);
        let mut check = |item| {
            let (raw, line, envelope) = match item {
                fast::Item::Read(raw, e) => (raw, None, Some(e)),
                fast::Item::Skipped(raw) => (raw, None, None),
                fast::Item::Raw(RawCandidate::Parsed(c)) => {
                    return self.candidate(c, tenant, now).map(|r| Encoded::of(&r))
                }
                fast::Item::Raw(RawCandidate::Text { raw, line }) => {
                    (raw, line, fast::Envelope::parse(raw))
                }
            };
            if let Some(encoded) = envelope.and_then(|e| self.fast(raw, &e, tenant, &stamp)) {
                return Ok(encoded);
            }
            let candidate = match (serde_json::from_str::<Value>(raw), line) {
                (Ok(Value::Object(o)), _) => Ok(o),
                (Ok(_), _) => Err("event: must be a JSON object".to_owned()),
                (Err(_), Some(line)) => body::parse_line(raw.as_bytes(), line),
                (Err(_), None) => {
                    // Sliced out of a body that may not parse, or that parsed yet does not
                    // parse alone (a nesting limit): the whole body's error is the answer.
                    whole_body_error.set(true);
                    Err(String::new())
                }
            };
            self.candidate(candidate, tenant, now)
                .map(|r| Encoded::of(&r))
        };
        // The key is tenant/customer, the tenant the same for the whole request.
        let identity = Encoded::identity;
        let result = match fast::Array::new(body, format, max_events) {
            Some(mut array) => {
                let capacity = array.estimate();
                let result = dedupe(&mut array, capacity, &mut check, identity);
                // An array that turned out not to be plainly one (bad JSON, too many or no
                // events) is the general path's to answer.
                array.complete().then_some(result)
            }
            None => {
                let items = body::split_raw(body, format, max_events)?;
                let capacity = items.len();
                Some(dedupe(
                    items.into_iter().map(fast::Item::Raw),
                    capacity,
                    &mut check,
                    identity,
                ))
            }
        };
        match result {
            Some(result) if !whole_body_error.get() => Ok(result),
            _ => {
                let candidates = body::split(body, format, max_events)?;
                let (records, refused) = self.validate_batch(candidates, tenant, now);
                Ok((records.iter().map(Encoded::of).collect(), refused))
            }
        }
    }

    /// One candidate: its record, or its id (when readable), error and metric reason.
    fn candidate(
        &self,
        candidate: Candidate,
        tenant: &Tenant,
        now: OffsetDateTime,
    ) -> Result<UsageRecord, Failure> {
        match candidate {
            Err(error) => Err((None, error, "malformed")),
            Ok(obj) => {
                let id = obj.get("id").and_then(Value::as_str).map(str::to_owned);
                self.validate(obj, tenant, now)
                    .map_err(|r| (id, r.to_string(), r.metric_reason()))
            }
        }
    }

    /// Validates one event object and builds its record.
    pub fn validate(
        &self,
        mut obj: Map<String, Value>,
        tenant: &Tenant,
        now: OffsetDateTime,
    ) -> Result<UsageRecord, Rejection> {
        let l = self.limits;
        for key in obj.keys() {
            if !NATIVE_FIELDS.contains(&key.as_str()) {
                let expected = match self.dialect {
                    Dialect::Native => "events carry id, customer, type, time and data",
                    Dialect::CloudEvents => {
                        "CloudEvents carry specversion, id, source, type, subject, time and data"
                    }
                };
                return Err(Rejection::new(
                    key.clone(),
                    format!("unknown field; {expected}"),
                ));
            }
        }
        let specversion = take_string(&mut obj, "specversion", 16)?;
        let source = take_string(&mut obj, "source", 1024)?;
        match (self.dialect, specversion.as_deref()) {
            (_, Some("1.0")) | (Dialect::Native, None) => {}
            (_, Some(other)) => {
                return Err(Rejection::new(
                    "specversion",
                    format!("must be \"1.0\", got {other:?}"),
                ))
            }
            (Dialect::CloudEvents, None) => return Err(Rejection::new("specversion", "required")),
        }
        if self.dialect == Dialect::CloudEvents && source.is_none() {
            return Err(Rejection::new("source", "required"));
        }
        if let Some(ct) = take_string(&mut obj, "datacontenttype", 256)? {
            if !ct.starts_with("application/json") {
                return Err(Rejection::new(
                    "datacontenttype",
                    "only application/json data is accepted",
                ));
            }
        }
        take_string(&mut obj, "dataschema", 1024)?;

        let id = take_string(&mut obj, "id", l.max_id_chars)?
            .ok_or_else(|| Rejection::new("id", "required"))?;
        let customer = match (self.dialect, obj.contains_key("customer")) {
            (Dialect::CloudEvents, true) => {
                return Err(Rejection::new(
                    "customer",
                    "unknown field; CloudEvents name the customer in subject",
                ))
            }
            (Dialect::Native, true) if obj.contains_key("subject") => {
                return Err(Rejection::new(
                    "customer",
                    "give customer or subject, not both",
                ))
            }
            (_, true) => take_string(&mut obj, "customer", l.max_customer_chars)?
                .ok_or_else(|| Rejection::new("customer", "required"))?,
            (_, false) => {
                take_string(&mut obj, "subject", l.max_customer_chars)?.ok_or_else(|| {
                    let field = if self.dialect == Dialect::CloudEvents {
                        "subject"
                    } else {
                        "customer"
                    };
                    Rejection::new(field, "required")
                })?
            }
        };
        let event_type = take_string(&mut obj, "type", l.max_type_chars)?
            .ok_or_else(|| Rejection::new("type", "required"))?;
        let time = match obj.remove("time") {
            None | Some(Value::Null) => now,
            Some(Value::String(s)) => parse_time(&s)?,
            Some(_) => return Err(Rejection::new("time", "must be an RFC 3339 string")),
        };
        check_time(time, now, l)?;
        let data = match obj.remove("data") {
            None | Some(Value::Null) => Map::new(),
            Some(Value::Object(d)) => d,
            Some(_) => return Err(Rejection::new("data", "must be a JSON object")),
        };
        check_shape(&data, l)?;

        if tenant.strict && !self.catalog.knows_type(&event_type) {
            return Err(Rejection::new(
                "type",
                format!("no meter reads events of type {event_type:?}"),
            ));
        }
        for meter in self.catalog.meters_for_type(&event_type) {
            measure(meter, &data, l.max_dimension_chars)?;
        }

        Ok(UsageRecord {
            v: RECORD_VERSION,
            tenant: tenant.id.clone(),
            id,
            customer,
            event_type,
            time,
            received_at: now,
            source,
            data,
        })
    }
}

/// A refused candidate: its id when readable, the error, the metric reason.
type Failure = (Option<String>, String, &'static str);

/// Runs `check` over a request's candidates in order, refusing a repeated event after its
/// first occurrence. An event is its customer and id (the tenant is the request's), as in
/// the aggregator's dedupe: `identity` gives a candidate's customer (or record key) and id.
/// `capacity` (how many candidates are likely) sizes its tables.
fn dedupe<C, T>(
    candidates: impl IntoIterator<Item = C>,
    capacity: usize,
    mut check: impl FnMut(C) -> Result<T, Failure>,
    identity: impl Fn(&T) -> (&[u8], &[u8]),
) -> (Vec<T>, Vec<Refused>) {
    let mut accepted: Vec<T> = Vec::with_capacity(capacity);
    // Each accepted event's index in the request.
    let mut at: Vec<usize> = Vec::with_capacity(capacity);
    let mut refused = Vec::new();
    // The accepted events by identity, as positions in `accepted`: nothing is copied.
    let hasher = hashbrown::DefaultHashBuilder::default();
    let mut seen: hashbrown::HashTable<usize> = hashbrown::HashTable::with_capacity(capacity);
    for (index, candidate) in candidates.into_iter().enumerate() {
        let result = check(candidate).and_then(|t| {
            let key = identity(&t);
            let hash = hasher.hash_one(key);
            match seen.find(hash, |&i| identity(&accepted[i]) == key) {
                Some(&i) => Err((
                    Some(String::from_utf8_lossy(key.1).into_owned()),
                    format!(
                        "id: duplicate of the event at index {} in this request \
                         (same customer and id)",
                        at[i]
                    ),
                    "duplicate_id",
                )),
                None => {
                    seen.insert_unique(hash, accepted.len(), |&i| {
                        hasher.hash_one(identity(&accepted[i]))
                    });
                    Ok(t)
                }
            }
        });
        match result {
            Ok(t) => {
                accepted.push(t);
                at.push(index);
            }
            Err((id, error, reason)) => refused.push(Refused {
                index,
                id,
                error,
                reason,
            }),
        }
    }
    (accepted, refused)
}

/// 1..=max characters without control characters.
fn valid_string(s: &str, max: usize) -> bool {
    if s.is_ascii() {
        // One byte per character; the only ASCII controls are below 0x20 and DEL.
        return !s.is_empty() && s.len() <= max && !s.bytes().any(|b| b < 0x20 || b == 0x7f);
    }
    let mut n = 0;
    for c in s.chars() {
        if c.is_control() {
            return false;
        }
        n += 1;
    }
    n > 0 && n <= max
}

/// Removes a string field, checking it is 1..=max characters without control characters.
fn take_string(
    obj: &mut Map<String, Value>,
    field: &str,
    max: usize,
) -> Result<Option<String>, Rejection> {
    match obj.remove(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => {
            let n = s.chars().count();
            if n == 0 {
                Err(Rejection::new(field, "must not be empty"))
            } else if n > max {
                Err(Rejection::new(
                    field,
                    format!("longer than {max} characters"),
                ))
            } else if s.chars().any(char::is_control) {
                Err(Rejection::new(field, "must not contain control characters"))
            } else {
                Ok(Some(s))
            }
        }
        Some(_) => Err(Rejection::new(field, "must be a string")),
    }
}

fn parse_time(s: &str) -> Result<OffsetDateTime, Rejection> {
    OffsetDateTime::parse(s, &Rfc3339)
        .map(|t| t.to_offset(time::UtcOffset::UTC))
        .map_err(|_| {
            Rejection::new(
                "time",
                format!("{s:?} is not an RFC 3339 timestamp such as 2026-11-24T10:00:00Z"),
            )
        })
}

fn check_time(
    t: OffsetDateTime,
    now: OffsetDateTime,
    l: &ValidationConfig,
) -> Result<(), Rejection> {
    let future = now + Duration::from_secs(l.max_future_secs);
    let oldest = now - Duration::from_secs(l.allowed_lateness_secs);
    if t > future {
        let reason = format!(
            "more than {}s in the future (latest allowed {})",
            l.max_future_secs,
            rfc3339(future)
        );
        return Err(Rejection::new("time", reason));
    }
    if t < oldest {
        let reason = format!(
            "older than the allowed lateness of {}s (oldest allowed {})",
            l.allowed_lateness_secs,
            rfc3339(oldest)
        );
        return Err(Rejection::new("time", reason));
    }
    Ok(())
}

fn rfc3339(t: OffsetDateTime) -> String {
    t.format(&Rfc3339).unwrap_or_else(|_| t.to_string())
}

/// Counts properties at every level and checks nesting depth.
fn check_shape(data: &Map<String, Value>, l: &ValidationConfig) -> Result<(), Rejection> {
    fn walk(
        v: &Value,
        depth: usize,
        count: &mut usize,
        l: &ValidationConfig,
    ) -> Result<(), Rejection> {
        if depth > l.max_depth {
            return Err(Rejection::new(
                "data",
                format!("nested deeper than {} levels", l.max_depth),
            ));
        }
        match v {
            Value::Object(o) => {
                *count += o.len();
                if *count > l.max_properties {
                    return Err(Rejection::new(
                        "data",
                        format!("more than {} properties", l.max_properties),
                    ));
                }
                o.values().try_for_each(|v| walk(v, depth + 1, count, l))
            }
            Value::Array(a) => a.iter().try_for_each(|v| walk(v, depth + 1, count, l)),
            _ => Ok(()),
        }
    }
    let mut count = data.len();
    if count > l.max_properties {
        return Err(Rejection::new(
            "data",
            format!("more than {} properties", l.max_properties),
        ));
    }
    data.values().try_for_each(|v| walk(v, 1, &mut count, l))
}

/// What one event contributes to one meter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Measurement {
    pub value: MeterValue,
    /// Dimension values in the meter's `group_by` order; a missing dimension is `""`.
    pub dimensions: Vec<String>,
}

/// The value an event carries for a meter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MeterValue {
    /// COUNT: the event itself.
    Event,
    /// SUM, MIN, MAX, LATEST.
    Number(Quantity),
    /// UNIQUE_COUNT: the identifier (integers in their decimal form).
    Identifier(String),
}

/// Reads a meter's value and dimensions from an event's `data`. The collector refuses an
/// event for which this fails; the aggregator dead-letters one.
pub fn measure(
    meter: &Meter,
    data: &Map<String, Value>,
    max_dimension_chars: usize,
) -> Result<Measurement, Rejection> {
    let value = match &meter.value {
        None => MeterValue::Event,
        Some(path) => {
            let field = || format!("data.{path}");
            let raw = lookup(data, path).filter(|v| !v.is_null()).ok_or_else(|| {
                Rejection::new(field(), format!("required by meter {}", meter.key))
            })?;
            if meter.aggregation.needs_number() {
                MeterValue::Number(number(raw).map_err(|reason| Rejection::new(field(), reason))?)
            } else {
                MeterValue::Identifier(
                    identifier(raw, max_dimension_chars).map_err(|r| Rejection::new(field(), r))?,
                )
            }
        }
    };
    let mut dimensions = Vec::with_capacity(meter.group_by.len());
    for dim in &meter.group_by {
        match lookup(data, dim) {
            None | Some(Value::Null) => dimensions.push(String::new()),
            Some(Value::String(s)) if s.chars().count() <= max_dimension_chars => {
                dimensions.push(s.clone())
            }
            Some(Value::String(_)) => {
                let reason = format!("dimension longer than {max_dimension_chars} characters");
                return Err(Rejection::new(format!("data.{dim}"), reason));
            }
            Some(_) => {
                return Err(Rejection::new(
                    format!("data.{dim}"),
                    "dimension must be a string",
                ))
            }
        }
    }
    Ok(Measurement { value, dimensions })
}

/// A meter value: a JSON number, or a string holding one, exact in `Decimal(38, 9)`.
pub fn number(v: &Value) -> Result<Quantity, String> {
    let text = match v {
        Value::Number(n) => n.to_string(),
        Value::String(s) => s.clone(),
        _ => return Err("must be a number".to_owned()),
    };
    text.parse::<Quantity>()
        .map_err(|e| format!("{text:?} is not a valid quantity: {e}"))
}

/// A unique-count value: a non-empty string or an integer.
fn identifier(v: &Value, max: usize) -> Result<String, String> {
    match v {
        Value::String(s) if s.is_empty() => Err("must not be empty".to_owned()),
        Value::String(s) if s.chars().count() > max => Err(format!("longer than {max} characters")),
        Value::String(s) => Ok(s.clone()),
        Value::Number(n) if n.is_i64() || n.is_u64() => Ok(n.to_string()),
        _ => Err("must be a string or an integer".to_owned()),
    }
}

mod fast;
#[cfg(test)]
mod tests;
