//! An event's `data` object read for measuring, without a JSON tree when it is flat.
//!
//! Most metering data is one level of scalars (`{"tokens": 812, "model": "m1"}`). Such an
//! object is read as borrowed slices of its text; anything else (nesting, escapes, numbers
//! with exponents) is parsed into a tree and measured by [`measure`]. Both readings give the
//! same [`Measurement`] or the same refusal: a flat reading that would refuse defers to the
//! tree, which owns the error messages. `validate/tests.rs` checks the equivalence.

use serde_json::{Map, Value};

use crate::catalog::Meter;
use crate::quantity::Quantity;
use crate::scan::{Cursor, Flat};
use crate::validate::{measure, Measurement, MeterValue, Rejection};

/// A `data` object ready to be measured by any number of meters.
#[derive(Debug)]
pub struct EventData<'a> {
    text: &'a str,
    flat: Option<Flat<'a>>,
}

impl<'a> EventData<'a> {
    /// Reads `text`, which must be a JSON object.
    pub fn parse(text: &'a str) -> Result<EventData<'a>, serde_json::Error> {
        if let Some(flat) = flat(text) {
            return Ok(EventData {
                text,
                flat: Some(flat),
            });
        }
        serde_json::from_str::<Map<String, Value>>(text)?;
        Ok(EventData { text, flat: None })
    }

    /// The object's text, as given.
    pub fn text(&self) -> &'a str {
        self.text
    }

    /// What this event contributes to `meter`, exactly as [`measure`] reads the tree.
    pub fn measure(&self, meter: &Meter, max_chars: usize) -> Result<Measurement, Rejection> {
        if let Some(m) = self
            .flat
            .as_ref()
            .and_then(|f| measure_flat(meter, f, max_chars))
        {
            return Ok(m);
        }
        let tree: Map<String, Value> =
            serde_json::from_str(self.text).map_err(|e| Rejection::new("data", e.to_string()))?;
        measure(meter, &tree, max_chars)
    }
}

/// The object as borrowed scalars, or `None` when it needs the tree.
pub(crate) fn flat(text: &str) -> Option<Flat<'_>> {
    let mut cursor = Cursor::new(text);
    cursor.ws();
    let flat = Flat::read(&mut cursor)?;
    cursor.ws();
    cursor.at_end().then_some(flat)
}

/// The content of a JSON string literal without escapes.
fn unquote(v: &str) -> Option<&str> {
    v.strip_prefix('"')?.strip_suffix('"')
}

/// [`measure`] on flat data; `None` where it would refuse.
pub(crate) fn measure_flat(
    meter: &Meter,
    data: &Flat<'_>,
    max_chars: usize,
) -> Option<Measurement> {
    // A dotted path reaches into an object; flat data has none.
    let get = |path: &str| {
        if path.contains('.') {
            None
        } else {
            data.get(path).filter(|v| *v != "null")
        }
    };
    let value = match &meter.value {
        None => MeterValue::Event,
        Some(path) => {
            let v = get(path)?;
            if meter.aggregation.needs_number() {
                let text = match v.as_bytes()[0] {
                    b'"' => unquote(v)?,
                    b'-' | b'0'..=b'9' => v,
                    _ => return None,
                };
                MeterValue::Number(text.parse::<Quantity>().ok()?)
            } else if let Some(s) = unquote(v) {
                if s.is_empty() || s.chars().count() > max_chars {
                    return None;
                }
                MeterValue::Identifier(s.to_owned())
            } else if v.parse::<i64>().is_ok() || v.parse::<u64>().is_ok() {
                MeterValue::Identifier(v.to_owned())
            } else {
                return None;
            }
        }
    };
    let mut dimensions = Vec::with_capacity(meter.group_by.len());
    for dim in &meter.group_by {
        match get(dim) {
            None => dimensions.push(String::new()),
            Some(v) => {
                let s = unquote(v).filter(|s| s.chars().count() <= max_chars)?;
                dimensions.push(s.to_owned());
            }
        }
    }
    Some(Measurement { value, dimensions })
}
