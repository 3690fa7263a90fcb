//! `tally-rater price`: one invoice from a plan file and given quantities, with no store.
//!
//! The input is JSON, either a flat object of meter → quantity, or an object with the dates
//! that proration needs beside the quantities:
//!
//! ```json
//! {"customer": "cus_1",
//!  "period_start": "2025-02-01T00:00:00Z",
//!  "anchor": "2025-01-31T00:00:00Z",
//!  "subscription_start": "2025-02-10T00:00:00Z",
//!  "subscription_end": "2025-02-20T00:00:00Z",
//!  "usage": {"requests": "250000", "tokens": 1234567}}
//! ```
//!
//! Every field but `usage` is optional. The period is the plan's interval from the billing
//! `anchor` (default: `period_start`, else `subscription_start`, else the first of the month,
//! or of the year for a yearly plan, that `at` falls in); it is the one that starts at
//! `period_start`, or else contains `subscription_start`, or else `at` (default now). The
//! subscription is in force from `subscription_start` to `subscription_end`, clipped to the
//! period: recurring fees and allowances are prorated by that share, usage is priced as
//! given. Quantities are exact decimals, as JSON numbers or strings; every meter named must
//! be one a usage charge of the plan reads.

use std::borrow::Cow;
use std::collections::BTreeMap;

use rust_decimal::Decimal;
use serde::Deserialize;
use serde_json::Value;
use time::format_description::well_known::Rfc3339;
use time::{Date, Month, OffsetDateTime, Time};

use crate::error::{rfc3339, Error, Result};
use crate::invoice::{Invoice, Segment};
use crate::period::{period_containing, Interval, Period};
use crate::plan::PlanVersion;

/// What `tally-rater price` prices: quantities, and the dates proration needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PriceRequest {
    pub customer: String,
    pub period_start: Option<OffsetDateTime>,
    pub anchor: Option<OffsetDateTime>,
    pub subscription_start: Option<OffsetDateTime>,
    pub subscription_end: Option<OffsetDateTime>,
    /// When the period is not fixed by `period_start` or `subscription_start`.
    pub at: Option<OffsetDateTime>,
    pub usage: BTreeMap<String, Decimal>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RequestFile {
    #[serde(default)]
    customer: Option<String>,
    #[serde(default)]
    period_start: Option<String>,
    #[serde(default)]
    anchor: Option<String>,
    #[serde(default)]
    subscription_start: Option<String>,
    #[serde(default)]
    subscription_end: Option<String>,
    #[serde(default)]
    at: Option<String>,
    usage: serde_json::Map<String, Value>,
}

/// The long form's fields besides `usage`.
const LONG_FORM: [&str; 6] = [
    "customer",
    "period_start",
    "anchor",
    "subscription_start",
    "subscription_end",
    "at",
];

fn invalid(field: impl Into<String>, reason: impl Into<String>) -> Error {
    Error::PriceInput {
        field: field.into(),
        reason: reason.into(),
    }
}

impl PriceRequest {
    /// Reads the JSON input; errors name the field (`usage.tokens`, `period_start`).
    pub fn parse(text: &str) -> Result<PriceRequest> {
        let value: Value = serde_json::from_str(text).map_err(|e| {
            invalid(
                format!("line {} column {}", e.line(), e.column()),
                format!("not valid JSON ({e})"),
            )
        })?;
        let Value::Object(object) = value else {
            return Err(invalid(
                "input",
                "must be a JSON object: meter → quantity, or {\"usage\": {…}, …}",
            ));
        };
        // Quantities are never objects, so an object under "usage" marks the long form.
        if !matches!(object.get("usage"), Some(Value::Object(_))) {
            if let Some(field) = LONG_FORM.iter().find(|f| object.contains_key(**f)) {
                return Err(invalid(
                    "usage",
                    format!(
                        "missing: with {field:?} given, quantities go in \"usage\": {{meter: quantity}}"
                    ),
                ));
            }
            return Ok(PriceRequest {
                customer: "customer".to_owned(),
                period_start: None,
                anchor: None,
                subscription_start: None,
                subscription_end: None,
                at: None,
                usage: quantities(&object, "")?,
            });
        }
        let file: RequestFile = serde_json::from_value(Value::Object(object))
            .map_err(|e| invalid("input", e.to_string()))?;
        let customer = file.customer.unwrap_or_else(|| "customer".to_owned());
        if customer.is_empty() || customer.len() > 256 {
            return Err(invalid("customer", "must be 1-256 characters"));
        }
        Ok(PriceRequest {
            customer,
            period_start: instant("period_start", file.period_start)?,
            anchor: instant("anchor", file.anchor)?,
            subscription_start: instant("subscription_start", file.subscription_start)?,
            subscription_end: instant("subscription_end", file.subscription_end)?,
            at: instant("at", file.at)?,
            usage: quantities(&file.usage, "usage.")?,
        })
    }

    /// The billing period priced, of `plan`'s interval; `now` stands in for a missing `at`.
    pub fn period(&self, interval: Interval, now: OffsetDateTime) -> Result<Period> {
        let at = self
            .period_start
            .or(self.subscription_start)
            .or(self.at)
            .unwrap_or(now);
        let anchor = match self
            .anchor
            .or(self.period_start)
            .or(self.subscription_start)
        {
            Some(a) => a,
            None => calendar_anchor(at, interval)?,
        };
        let period = period_containing(anchor, interval, at)?;
        if let Some(start) = self.period_start {
            if period.start() != start {
                return Err(invalid(
                    "period_start",
                    format!(
                        "{} is not where a {} period of anchor {} starts (the one containing it starts at {})",
                        rfc3339(&start),
                        interval.name(),
                        rfc3339(&anchor),
                        rfc3339(&period.start())
                    ),
                ));
            }
        }
        Ok(period)
    }
}

/// Prices `request` on `plan`: one segment, the subscription's share of the period.
pub fn quote(plan: &PlanVersion, request: &PriceRequest, now: OffsetDateTime) -> Result<Invoice> {
    let read: Vec<&str> = plan.meters().collect();
    if let Some(meter) = request.usage.keys().find(|m| !read.contains(&m.as_str())) {
        return Err(invalid(
            format!("usage.{meter}"),
            format!(
                "plan {:?} v{} prices no such meter (it prices {})",
                plan.plan(),
                plan.version(),
                if read.is_empty() {
                    "none".to_owned()
                } else {
                    read.join(", ")
                }
            ),
        ));
    }
    if let (Some(start), Some(end)) = (request.subscription_start, request.subscription_end) {
        if end <= start {
            return Err(invalid(
                "subscription_end",
                format!(
                    "{} is not after subscription_start {}",
                    rfc3339(&end),
                    rfc3339(&start)
                ),
            ));
        }
    }
    let period = request.period(plan.interval(), now)?;
    let from = request
        .subscription_start
        .map_or(period.start(), |s| s.max(period.start()));
    let to = request
        .subscription_end
        .map_or(period.end(), |e| e.min(period.end()));
    if from >= to {
        return Err(invalid(
            "subscription_start",
            format!(
                "the subscription is not in force in the period [{}, {})",
                rfc3339(&period.start()),
                rfc3339(&period.end())
            ),
        ));
    }
    let segment = Segment {
        from,
        to,
        plan,
        usage: Cow::Borrowed(&request.usage),
    };
    Invoice::compute(&request.customer, &period, &[segment])
}

fn quantities(
    object: &serde_json::Map<String, Value>,
    prefix: &str,
) -> Result<BTreeMap<String, Decimal>> {
    let mut out = BTreeMap::new();
    for (meter, value) in object {
        let field = || format!("{prefix}{meter}");
        let text = match value {
            // arbitrary_precision: the number's own digits, never through f64.
            Value::Number(n) => n.to_string(),
            Value::String(s) => s.clone(),
            other => {
                return Err(invalid(
                    field(),
                    format!("must be a number or a decimal string (got {other})"),
                ))
            }
        };
        let q = Decimal::from_str_exact(&text)
            .or_else(|_| Decimal::from_scientific(&text))
            .map_err(|_| {
                invalid(
                    field(),
                    format!("{text:?} is not an exact decimal (at most 28 significant digits)"),
                )
            })?;
        if q.is_sign_negative() && !q.is_zero() {
            return Err(invalid(field(), format!("{text} is negative")));
        }
        out.insert(meter.clone(), q);
    }
    Ok(out)
}

fn instant(field: &str, text: Option<String>) -> Result<Option<OffsetDateTime>> {
    let Some(text) = text else { return Ok(None) };
    let t = OffsetDateTime::parse(&text, &Rfc3339).map_err(|_| {
        invalid(
            field,
            format!("{text:?} is not an RFC 3339 time (like 2025-01-01T00:00:00Z)"),
        )
    })?;
    if t.nanosecond() != 0 {
        return Err(invalid(
            field,
            format!("{text:?} has a fraction of a second; periods are whole seconds"),
        ));
    }
    Ok(Some(t.to_offset(time::UtcOffset::UTC)))
}

/// The first of `at`'s month (or year, for a yearly plan), UTC midnight.
fn calendar_anchor(at: OffsetDateTime, interval: Interval) -> Result<OffsetDateTime> {
    let at = at.to_offset(time::UtcOffset::UTC);
    let month = match interval {
        Interval::Monthly => at.month(),
        Interval::Yearly => Month::January,
    };
    let date =
        Date::from_calendar_date(at.year(), month, 1).map_err(|_| Error::DateOutOfRange {
            what: "billing period",
        })?;
    Ok(date.with_time(Time::MIDNIGHT).assume_utc())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;
    use time::macros::datetime;

    fn plan(text: &str) -> PlanVersion {
        PlanVersion::parse(Path::new("p/basic/v1.toml"), text.as_bytes())
            .unwrap_or_else(|e| panic!("{e}"))
    }

    /// $30/month flat, requests at $0.01 with 1000 included.
    fn basic(interval: &str) -> PlanVersion {
        plan(&format!(
            r#"
plan = "basic"
version = 1
currency = "USD"
interval = "{interval}"

[[charges]]
id = "base"
type = "flat"
price = "30.00"

[[charges]]
id = "req"
type = "usage"
meter = "requests"
model = "per_unit"
price = "0.01"
included = "1000"
"#
        ))
    }

    fn amounts(inv: &Invoice) -> Vec<String> {
        inv.lines.iter().map(|l| l.amount.to_string()).collect()
    }

    fn err(text: &str) -> String {
        PriceRequest::parse(text)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_else(|| panic!("{text} parsed"))
    }

    const NOW: OffsetDateTime = datetime!(2025-03-17 10:00 UTC);

    #[test]
    fn a_flat_object_is_meter_to_quantity_for_the_current_calendar_month() {
        let r = PriceRequest::parse(r#"{"requests": 3000}"#).expect("parses");
        let inv = quote(&basic("monthly"), &r, NOW).expect("prices");
        assert_eq!(inv.period_start, datetime!(2025-03-01 0:00 UTC));
        assert_eq!(inv.period_end, datetime!(2025-04-01 0:00 UTC));
        // 30.00; (3000 − 1000) × 0.01 = 20.00
        assert_eq!(amounts(&inv), ["30.00", "20.00"]);
        assert_eq!(inv.customer, "customer");
        let yearly = quote(&basic("yearly"), &r, NOW).expect("prices");
        assert_eq!(yearly.period_start, datetime!(2025-01-01 0:00 UTC));
        assert_eq!(yearly.period_end, datetime!(2026-01-01 0:00 UTC));
    }

    #[test]
    fn quantities_are_exact_from_numbers_and_strings() {
        let r = PriceRequest::parse(
            r#"{"usage": {"requests": 1000.000000001, "tokens": "12345678901234567890.5"}}"#,
        )
        .expect("parses");
        assert_eq!(r.usage["requests"].to_string(), "1000.000000001");
        assert_eq!(r.usage["tokens"].to_string(), "12345678901234567890.5");
        let sci = PriceRequest::parse(r#"{"requests": 1.5e3}"#).expect("parses");
        assert_eq!(sci.usage["requests"], Decimal::from(1500));
    }

    #[test]
    fn a_subscription_starting_mid_period_prorates_fees_and_allowance() {
        let r = PriceRequest::parse(
            r#"{"customer": "c1", "subscription_start": "2024-02-20T00:00:00Z",
                "anchor": "2024-02-01T00:00:00Z", "usage": {"requests": "1000"}}"#,
        )
        .expect("parses");
        let inv = quote(&basic("monthly"), &r, NOW).expect("prices");
        // February 2024 has 29 days; in force for 10: 30.00 × 10/29 = 10.344… → 10.34;
        // allowance 1000 × 10/29 = 344.827586207, billable 655.172413793 × 0.01 → 6.55.
        assert_eq!(inv.period_start, datetime!(2024-02-01 0:00 UTC));
        assert_eq!(amounts(&inv), ["10.34", "6.55"]);
        assert_eq!(inv.total.to_string(), "16.89");
        assert_eq!(inv.customer, "c1");
    }

    #[test]
    fn a_period_start_must_be_one_of_the_anchor() {
        let r = PriceRequest::parse(
            r#"{"period_start": "2025-02-28T00:00:00Z", "anchor": "2025-01-31T00:00:00Z",
                "usage": {}}"#,
        )
        .expect("parses");
        let inv = quote(&basic("monthly"), &r, NOW).expect("prices");
        assert_eq!(inv.period_end, datetime!(2025-03-31 0:00 UTC));
        let off = PriceRequest::parse(
            r#"{"period_start": "2025-02-27T00:00:00Z", "anchor": "2025-01-31T00:00:00Z",
                "usage": {}}"#,
        )
        .expect("parses");
        let e = quote(&basic("monthly"), &off, NOW).expect_err("refused");
        assert!(
            e.to_string()
                .starts_with("period_start: 2025-02-27T00:00:00Z is not where"),
            "{e}"
        );
    }

    #[test]
    fn bad_input_names_the_field() {
        assert!(
            err("{").starts_with("line 1 column 1: not valid JSON"),
            "{}",
            err("{")
        );
        assert!(err("[1]").starts_with("input: must be a JSON object"));
        assert_eq!(
            err(r#"{"requests": "ten"}"#),
            "requests: \"ten\" is not an exact decimal (at most 28 significant digits)"
        );
        assert_eq!(
            err(r#"{"usage": {"requests": -1}}"#),
            "usage.requests: -1 is negative"
        );
        assert_eq!(
            err(r#"{"usage": {"requests": [1]}}"#),
            "usage.requests: must be a number or a decimal string (got [1])"
        );
        assert_eq!(
            err(r#"{"usage": {}, "period_start": "yesterday"}"#),
            "period_start: \"yesterday\" is not an RFC 3339 time (like 2025-01-01T00:00:00Z)"
        );
        assert!(
            err(r#"{"usage": {}, "subscription_start": "2025-01-01T00:00:00.5Z"}"#)
                .starts_with("subscription_start: ")
        );
        assert!(err(r#"{"usage": {}, "plan": "pro"}"#).contains("unknown field `plan`"));
        assert_eq!(
            err(r#"{"period_start": "2025-01-01T00:00:00Z", "requests": 5}"#),
            "usage: missing: with \"period_start\" given, quantities go in \"usage\": {meter: quantity}"
        );
        assert_eq!(
            err(r#"{"usage": {}, "customer": ""}"#),
            "customer: must be 1-256 characters"
        );
    }

    #[test]
    fn refusals_that_need_the_plan_name_the_field() {
        let p = basic("monthly");
        let quote_err = |text: &str| {
            let r = PriceRequest::parse(text).expect("parses");
            quote(&p, &r, NOW).expect_err("refused").to_string()
        };
        assert_eq!(
            quote_err(r#"{"tokens": 5}"#),
            "usage.tokens: plan \"basic\" v1 prices no such meter (it prices requests)"
        );
        assert_eq!(
            quote_err(
                r#"{"usage": {}, "subscription_start": "2025-03-10T00:00:00Z",
                    "subscription_end": "2025-03-10T00:00:00Z"}"#
            ),
            "subscription_end: 2025-03-10T00:00:00Z is not after subscription_start 2025-03-10T00:00:00Z"
        );
        assert!(quote_err(
            r#"{"usage": {}, "period_start": "2025-03-01T00:00:00Z",
                "subscription_end": "2025-02-10T00:00:00Z"}"#
        )
        .starts_with("subscription_start: the subscription is not in force in the period"));
    }

    #[test]
    fn the_same_input_prices_to_the_same_bytes() {
        let text = r#"{"usage": {"requests": "123456.789"}, "at": "2025-06-30T23:59:59Z"}"#;
        let p = basic("monthly");
        let a = quote(&p, &PriceRequest::parse(text).expect("parses"), NOW).expect("prices");
        let b = quote(&p, &PriceRequest::parse(text).expect("parses"), NOW).expect("prices");
        assert_eq!(
            serde_json::to_string(&a).expect("json"),
            serde_json::to_string(&b).expect("json")
        );
        assert_eq!(a.period_start, datetime!(2025-06-01 0:00 UTC));
    }
}
