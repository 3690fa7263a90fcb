//! How a final invoice is laid out in ClickHouse (`invoices` and `invoice_lines`), written and
//! read back exactly.
//!
//! A line's fields with a column of their own (segment, kind, charge, meter, quantity,
//! amount) are only there. Its other fields are JSON in `line`, and the header's `invoice`
//! holds what the header's columns do not. Since schema V10 (`invoice_lines.layout` 1) both
//! are written by position, without field names: half the JSON's bytes, and 31 % fewer
//! bytes in all for a final run (1.5 KB an invoice of the bench's plan, against 2.2):
//! - `line`: `[included, billable_quantity, unit_price, packages, minimum, tiers, adjusts]`,
//!   an absent field `null` (no tiers: `[]`), absent fields at the end left out; each tier
//!   `[tier, from, to, units, unit_price, flat_fee, amount]`, `to` `null` for the open-ended
//!   tier. Decimals are strings, digit for digit as priced.
//! - `invoice`: `{"interval": …, "segments": [[from, to, plan, version, digest, seconds,
//!   period_seconds], …]}`, with `period_start` and `period_end` only when they are not whole
//!   seconds (the columns hold seconds). Customer, currency, subtotal and total are read from
//!   their columns.
//!
//! Rows written before hold named fields (layout 0): a line's fields as an object, a header
//! with the whole invoice but its lines (or, before V8, with them). Both layouts read back.

use std::fmt::{self, Write as _};

use rust_decimal::Decimal;
use serde::de::{self, Deserializer, IgnoredAny, SeqAccess, Visitor};
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use crate::currency::Currency;
use crate::invoice::{Line, LineKind, SegmentSummary};
use crate::period::Interval;
use crate::pricing::TierAmount;

/// `invoice_lines.layout` of the rows a final run writes now.
pub(crate) const LAYOUT: u8 = 1;

/// Appends `d` as [`Decimal`]'s `Display` writes it: every digit of its scale, `-` on a
/// negative (zero included), `0` before a leading point.
pub(crate) fn push_decimal(out: &mut String, d: Decimal) {
    // Right to left: fraction digits, point, whole digits, sign. At most 29 digits, 28 of
    // them after the point.
    let mut buf = [0u8; 40];
    let mut pos = buf.len();
    let scale = d.scale() as usize;
    let mut m = d.mantissa().unsigned_abs();
    for _ in 0..scale {
        pos -= 1;
        buf[pos] = pop_digit(&mut m);
    }
    if scale > 0 {
        pos -= 1;
        buf[pos] = b'.';
    }
    loop {
        pos -= 1;
        buf[pos] = pop_digit(&mut m);
        if m == 0 {
            break;
        }
    }
    if d.is_sign_negative() {
        pos -= 1;
        buf[pos] = b'-';
    }
    // ASCII only.
    out.push_str(std::str::from_utf8(&buf[pos..]).unwrap_or_default());
}

/// The last decimal digit of `m`, as ASCII, and `m` without it.
fn pop_digit(m: &mut u128) -> u8 {
    // 64-bit division where the value allows: 128-bit division is a library call.
    let digit = match u64::try_from(*m) {
        Ok(v) => {
            *m = u128::from(v / 10);
            v % 10
        }
        Err(_) => {
            let d = (*m % 10) as u64;
            *m /= 10;
            d
        }
    };
    b'0' + digit as u8
}

fn push_decimal_json(out: &mut String, d: Option<Decimal>) {
    match d {
        Some(d) => {
            out.push('"');
            push_decimal(out, d);
            out.push('"');
        }
        None => out.push_str("null"),
    }
}

/// Appends a line's fields without a column, by position (layout 1).
pub(crate) fn push_line_detail(out: &mut String, line: &Line) {
    let decimals = [
        line.included,
        line.billable_quantity,
        line.unit_price,
        line.packages,
        line.minimum,
    ];
    // Fields written: up to the last present one.
    let n = if line.adjusts.is_some() {
        7
    } else if !line.tiers.is_empty() {
        6
    } else {
        decimals
            .iter()
            .rposition(Option::is_some)
            .map_or(0, |i| i + 1)
    };
    out.push('[');
    for (i, d) in decimals.iter().take(n).enumerate() {
        if i > 0 {
            out.push(',');
        }
        push_decimal_json(out, *d);
    }
    if n >= 6 {
        out.push_str(",[");
        for (i, t) in line.tiers.iter().enumerate() {
            if i > 0 {
                out.push(',');
            }
            // Writing to a String cannot fail.
            let _ = write!(out, "[{}", t.tier);
            let fields = [
                Some(t.from),
                t.to,
                Some(t.units),
                Some(t.unit_price),
                Some(t.flat_fee),
                Some(t.amount),
            ];
            for d in fields {
                out.push(',');
                push_decimal_json(out, d);
            }
            out.push(']');
        }
        out.push(']');
    }
    if let Some(a) = &line.adjusts {
        out.push(',');
        // A str always serializes (escaped as JSON wants).
        out.push_str(&serde_json::to_string(a).unwrap_or_default());
    }
    out.push(']');
}

/// A line's fields without a column of their own, as read back. Rows of layout 0 hold them
/// by name (lines stored before schema V8 hold the whole line; its fields with columns are
/// ignored here, they equal the columns); layout 1 by position ([`ByPosition`]).
#[derive(Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(default)]
struct Detail {
    included: Option<Decimal>,
    billable_quantity: Option<Decimal>,
    unit_price: Option<Decimal>,
    packages: Option<Decimal>,
    minimum: Option<Decimal>,
    tiers: Vec<TierAmount>,
    adjusts: Option<String>,
}

/// [`Detail`] as layout 1 writes it: `[included, billable_quantity, unit_price, packages,
/// minimum, tiers, adjusts]`, absent fields at the end left out.
struct ByPosition(Detail);

/// A tier by position: `[tier, from, to, units, unit_price, flat_fee, amount]`.
#[derive(Deserialize)]
struct TierRow(
    usize,
    Decimal,
    Option<Decimal>,
    Decimal,
    Decimal,
    Decimal,
    Decimal,
);

impl<'de> Deserialize<'de> for ByPosition {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<ByPosition, D::Error> {
        struct Positional;
        impl<'de> Visitor<'de> for Positional {
            type Value = Detail;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a line's fields as an array of at most 7")
            }

            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Detail, A::Error> {
                let mut decimal = || -> Result<Option<Decimal>, A::Error> {
                    Ok(seq.next_element::<Option<Decimal>>()?.flatten())
                };
                let (included, billable_quantity, unit_price, packages, minimum) =
                    (decimal()?, decimal()?, decimal()?, decimal()?, decimal()?);
                let tiers = seq
                    .next_element::<Option<Vec<TierRow>>>()?
                    .flatten()
                    .unwrap_or_default()
                    .into_iter()
                    .map(|t| TierAmount {
                        tier: t.0,
                        from: t.1,
                        to: t.2,
                        units: t.3,
                        unit_price: t.4,
                        flat_fee: t.5,
                        amount: t.6,
                    })
                    .collect();
                let adjusts = seq.next_element::<Option<String>>()?.flatten();
                if seq.next_element::<IgnoredAny>()?.is_some() {
                    return Err(de::Error::invalid_length(8, &self));
                }
                Ok(Detail {
                    included,
                    billable_quantity,
                    unit_price,
                    packages,
                    minimum,
                    tiers,
                    adjusts,
                })
            }
        }
        deserializer.deserialize_seq(Positional).map(ByPosition)
    }
}

fn detail(json: &str, layout: u8) -> Result<Detail, String> {
    let read = match layout {
        0 => serde_json::from_str::<Detail>(json),
        LAYOUT => serde_json::from_str::<ByPosition>(json).map(|p| p.0),
        other => return Err(format!("layout {other} is not one this rater reads")),
    };
    read.map_err(|e| format!("line json: {e}"))
}

/// An `invoice_lines` row as read back: the columns a [`Line`] is rebuilt from.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, clickhouse::Row)]
pub struct StoredLine {
    pub segment: i32,
    pub kind: String,
    pub charge: String,
    pub meter: String,
    pub quantity: String,
    pub amount: String,
    pub line: String,
    /// How `line` is written: 0 named fields (before schema V10), 1 by position.
    pub layout: u8,
}

impl StoredLine {
    /// The line the row stores, exactly as it was priced.
    pub fn to_line(&self) -> Result<Line, String> {
        let optional = |s: &str| (!s.is_empty()).then(|| s.to_owned());
        let kind = LineKind::from_name(&self.kind)
            .ok_or_else(|| format!("kind {:?} is not a line kind", self.kind))?;
        let detail = detail(&self.line, self.layout)?;
        Ok(Line {
            segment: usize::try_from(self.segment).ok(),
            kind,
            charge: optional(&self.charge),
            meter: optional(&self.meter),
            quantity: match self.quantity.as_str() {
                "" => None,
                q => Some(decimal("quantity", q)?),
            },
            included: detail.included,
            billable_quantity: detail.billable_quantity,
            unit_price: detail.unit_price,
            packages: detail.packages,
            minimum: detail.minimum,
            tiers: detail.tiers,
            amount: decimal("amount", &self.amount)?,
            adjusts: detail.adjusts,
        })
    }
}

fn decimal(what: &str, s: &str) -> Result<Decimal, String> {
    s.parse::<Decimal>()
        .map_err(|e| format!("{what} {s:?} is not a decimal: {e}"))
}

/// A segment by position: `[from, to, plan, version, digest, seconds, period_seconds]`.
#[derive(Serialize)]
struct SegmentOut<'a>(
    #[serde(with = "time::serde::rfc3339")] OffsetDateTime,
    #[serde(with = "time::serde::rfc3339")] OffsetDateTime,
    &'a str,
    u32,
    &'a str,
    Decimal,
    Decimal,
);

#[derive(Deserialize)]
struct SegmentIn(
    #[serde(with = "time::serde::rfc3339")] OffsetDateTime,
    #[serde(with = "time::serde::rfc3339")] OffsetDateTime,
    String,
    u32,
    String,
    Decimal,
    Decimal,
);

/// A header's segment in either layout.
#[derive(Deserialize)]
#[serde(untagged)]
enum StoredSegment {
    Positional(SegmentIn),
    Named(SegmentSummary),
}

impl StoredSegment {
    fn summary(self) -> SegmentSummary {
        match self {
            StoredSegment::Named(s) => s,
            StoredSegment::Positional(s) => SegmentSummary {
                from: s.0,
                to: s.1,
                plan: s.2,
                version: s.3,
                digest: s.4,
                seconds: s.5,
                period_seconds: s.6,
            },
        }
    }
}

#[derive(Serialize)]
struct HeaderOut<'a> {
    #[serde(
        with = "time::serde::rfc3339::option",
        skip_serializing_if = "Option::is_none"
    )]
    period_start: Option<OffsetDateTime>,
    #[serde(
        with = "time::serde::rfc3339::option",
        skip_serializing_if = "Option::is_none"
    )]
    period_end: Option<OffsetDateTime>,
    interval: Interval,
    segments: Vec<SegmentOut<'a>>,
}

/// The header JSON of a final invoice (layout 1): what its columns do not hold.
pub(crate) fn header_json(invoice: &crate::Invoice) -> Result<String, String> {
    let fractional = |t: OffsetDateTime| (t.nanosecond() != 0).then_some(t);
    let out = HeaderOut {
        period_start: fractional(invoice.period_start),
        period_end: fractional(invoice.period_end),
        interval: invoice.interval,
        segments: invoice
            .segments
            .iter()
            .map(|s| {
                SegmentOut(
                    s.from,
                    s.to,
                    &s.plan,
                    s.version,
                    &s.digest,
                    s.seconds,
                    s.period_seconds,
                )
            })
            .collect(),
    };
    serde_json::to_string(&out).map_err(|e| e.to_string())
}

/// An `invoices` row's JSON as read back, in any layout: fields absent from it come from
/// the row's columns ([`HeaderColumns`]).
#[derive(Deserialize)]
struct StoredHeader {
    #[serde(default)]
    customer: Option<String>,
    #[serde(default, with = "time::serde::rfc3339::option")]
    period_start: Option<OffsetDateTime>,
    #[serde(default, with = "time::serde::rfc3339::option")]
    period_end: Option<OffsetDateTime>,
    interval: Interval,
    #[serde(default)]
    currency: Option<Currency>,
    segments: Vec<StoredSegment>,
    #[serde(default)]
    lines: Option<Vec<Line>>,
    #[serde(default)]
    subtotal: Option<Decimal>,
    #[serde(default)]
    total: Option<Decimal>,
}

/// The columns of an `invoices` row a header is rebuilt from.
#[derive(Debug, Deserialize, clickhouse::Row)]
pub(crate) struct HeaderColumns {
    pub customer: String,
    pub period_start: u32,
    pub period_end: u32,
    pub currency: String,
    pub subtotal: String,
    pub total: String,
}

/// A stored invoice without its lines (unless stored before schema V8, when its header
/// held them too).
pub(crate) struct Header {
    pub invoice: crate::Invoice,
    /// Whether `invoice.lines` are the stored lines (a header from before V8).
    pub has_lines: bool,
}

/// Reads an `invoices` row's JSON, taking what it leaves out from its columns.
pub(crate) fn header(json: &str, columns: HeaderColumns) -> Result<Header, String> {
    let h: StoredHeader = serde_json::from_str(json).map_err(|e| format!("header json: {e}"))?;
    let time = |what: &str, secs: u32| {
        OffsetDateTime::from_unix_timestamp(i64::from(secs))
            .map_err(|e| format!("{what} {secs}: {e}"))
    };
    let period_start = match h.period_start {
        Some(t) => t,
        None => time("period_start", columns.period_start)?,
    };
    let period_end = match h.period_end {
        Some(t) => t,
        None => time("period_end", columns.period_end)?,
    };
    let currency = match h.currency {
        Some(c) => c,
        None => Currency::from_code(&columns.currency)
            .ok_or_else(|| format!("currency {:?} is not one the rater knows", columns.currency))?,
    };
    let subtotal = match h.subtotal {
        Some(d) => d,
        None => decimal("subtotal", &columns.subtotal)?,
    };
    let total = match h.total {
        Some(d) => d,
        None => decimal("total", &columns.total)?,
    };
    let has_lines = h.lines.is_some();
    Ok(Header {
        invoice: crate::Invoice {
            customer: h.customer.unwrap_or(columns.customer),
            period_start,
            period_end,
            interval: h.interval,
            currency,
            segments: h.segments.into_iter().map(StoredSegment::summary).collect(),
            lines: h.lines.unwrap_or_default(),
            subtotal,
            total,
        },
        has_lines,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn d(s: &str) -> Decimal {
        s.parse().expect("decimal")
    }

    fn text(x: Decimal) -> String {
        let mut out = String::new();
        push_decimal(&mut out, x);
        out
    }

    #[test]
    fn decimals_are_written_as_display_writes_them() {
        for s in [
            "0",
            "0.00",
            "-0",
            "49.00",
            "0.000015",
            "-1.5",
            "1000000",
            "15.284985",
            "79228162514264337593543950335",
            "-7.9228162514264337593543950335",
            "0.0000000000000000000000000001",
        ] {
            let x = d(s);
            assert_eq!(text(x), x.to_string(), "{s}");
        }
        let mut negative_zero = Decimal::new(0, 3);
        negative_zero.set_sign_negative(true);
        assert_eq!(text(negative_zero), negative_zero.to_string());
        assert_eq!(text(negative_zero), "-0.000");
    }

    fn decimal_strategy() -> impl Strategy<Value = Decimal> {
        (
            any::<u32>(),
            any::<u32>(),
            any::<u32>(),
            any::<bool>(),
            0u32..=28,
        )
            .prop_map(|(lo, mid, hi, negative, scale)| {
                Decimal::from_parts(lo, mid, hi, negative, scale)
            })
    }

    fn small_decimal() -> impl Strategy<Value = Decimal> {
        prop_oneof![
            decimal_strategy(),
            (any::<i64>(), 0u32..=12).prop_map(|(m, s)| Decimal::new(m, s)),
        ]
    }

    fn tier_strategy() -> impl Strategy<Value = TierAmount> {
        (
            0usize..40,
            small_decimal(),
            proptest::option::of(small_decimal()),
            small_decimal(),
            small_decimal(),
            small_decimal(),
            small_decimal(),
        )
            .prop_map(
                |(tier, from, to, units, unit_price, flat_fee, amount)| TierAmount {
                    tier,
                    from,
                    to,
                    units,
                    unit_price,
                    flat_fee,
                    amount,
                },
            )
    }

    fn line_strategy() -> impl Strategy<Value = Line> {
        let kinds = prop_oneof![
            Just(LineKind::Flat),
            Just(LineKind::Usage),
            Just(LineKind::ChargeMinimum),
            Just(LineKind::InvoiceMinimum),
            Just(LineKind::Adjustment),
        ];
        let maybe = || proptest::option::of(small_decimal());
        (
            (proptest::option::of(0usize..5), kinds),
            (maybe(), maybe(), maybe(), maybe(), maybe(), maybe()),
            proptest::collection::vec(tier_strategy(), 0..4),
            small_decimal(),
            proptest::option::of("[ -~]{0,12}|\\PC{0,6}|[\"\\\\\u{0}-\u{1f}]{1,3}"),
        )
            .prop_map(
                |(
                    (segment, kind),
                    (quantity, included, billable, unit, packages, minimum),
                    tiers,
                    amount,
                    adjusts,
                )| {
                    Line {
                        segment,
                        kind,
                        charge: Some("c".into()),
                        meter: None,
                        quantity,
                        included,
                        billable_quantity: billable,
                        unit_price: unit,
                        packages,
                        minimum,
                        tiers,
                        amount,
                        adjusts,
                    }
                },
            )
    }

    fn row(line: &Line, json: String, layout: u8) -> StoredLine {
        let mut amount = String::new();
        push_decimal(&mut amount, line.amount);
        StoredLine {
            segment: line.segment.map_or(-1, |s| s as i32),
            kind: line.kind.name().into(),
            charge: line.charge.clone().unwrap_or_default(),
            meter: line.meter.clone().unwrap_or_default(),
            quantity: line.quantity.map(text).unwrap_or_default(),
            amount,
            line: json,
            layout,
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]

        #[test]
        fn any_decimal_is_written_as_display_writes_it(x in decimal_strategy()) {
            prop_assert_eq!(text(x), x.to_string());
        }

        /// A line written by position reads back as the same line, serializing to the
        /// same bytes; the JSON is valid JSON.
        #[test]
        fn a_line_by_position_reads_back_exactly(line in line_strategy()) {
            let mut json = String::new();
            push_line_detail(&mut json, &line);
            let value: serde_json::Value = serde_json::from_str(&json).expect("valid JSON");
            prop_assert!(value.is_array());
            let back = row(&line, json, LAYOUT).to_line().expect("reads back");
            prop_assert_eq!(
                serde_json::to_string(&back).expect("json"),
                serde_json::to_string(&line).expect("json")
            );
            prop_assert_eq!(back, line);
        }
    }

    /// A header written now reads back, with the row's columns, as the invoice without its
    /// lines; period bounds inside a second go into the JSON, whole ones stay in columns.
    #[test]
    fn a_header_reads_back_from_its_json_and_columns() {
        use time::macros::datetime;
        let segment = |from, to, plan: &str, version| SegmentSummary {
            from,
            to,
            plan: plan.into(),
            version,
            digest: "ab".repeat(32),
            seconds: d("1296000"),
            period_seconds: d("2678400"),
        };
        for (start, end) in [
            (
                datetime!(2026-10-01 0:00 UTC),
                datetime!(2026-11-01 0:00 UTC),
            ),
            (
                datetime!(2026-10-01 0:00:00.25 UTC),
                datetime!(2026-11-01 0:00:00.25 UTC),
            ),
        ] {
            let invoice = crate::Invoice {
                customer: "it's \"q\"".into(),
                period_start: start,
                period_end: end,
                interval: Interval::Yearly,
                currency: Currency::from_code("EUR").expect("EUR"),
                segments: vec![
                    segment(start, datetime!(2026-10-16 12:00 UTC), "pro", 2),
                    segment(datetime!(2026-10-16 12:00 UTC), end, "team", 1),
                ],
                lines: Vec::new(),
                subtotal: d("10.50"),
                total: d("-0.00"),
            };
            let json = header_json(&invoice).expect("json");
            assert!(json.starts_with(r#"{"#), "{json}");
            assert_eq!(
                json.contains("period_start"),
                start.nanosecond() != 0,
                "{json}"
            );
            let columns = HeaderColumns {
                customer: invoice.customer.clone(),
                period_start: start.unix_timestamp() as u32,
                period_end: end.unix_timestamp() as u32,
                currency: "EUR".into(),
                subtotal: text(invoice.subtotal),
                total: text(invoice.total),
            };
            let back = header(&json, columns).expect("reads back");
            assert!(!back.has_lines);
            assert_eq!(back.invoice, invoice);
            assert_eq!(
                serde_json::to_string(&back.invoice).expect("json"),
                serde_json::to_string(&invoice).expect("json")
            );
        }
        let columns = || HeaderColumns {
            customer: "c".into(),
            period_start: 0,
            period_end: 1,
            currency: "XYZ".into(),
            subtotal: "1".into(),
            total: "1".into(),
        };
        let e = header(r#"{"interval":"monthly","segments":[]}"#, columns());
        assert!(e.err().expect("currency").contains("\"XYZ\""));
        let e = header(r#"{"interval":"weekly","segments":[]}"#, columns());
        assert!(e.err().expect("interval").contains("header json"));
    }

    #[test]
    fn absent_fields_at_the_end_are_left_out() {
        let mut line = Line {
            segment: Some(0),
            kind: LineKind::Flat,
            charge: Some("platform".into()),
            meter: None,
            quantity: None,
            included: None,
            billable_quantity: None,
            unit_price: Some(d("49.00")),
            packages: None,
            minimum: None,
            tiers: Vec::new(),
            amount: d("49.00"),
            adjusts: None,
        };
        let json = |l: &Line| {
            let mut s = String::new();
            push_line_detail(&mut s, l);
            s
        };
        assert_eq!(json(&line), r#"[null,null,"49.00"]"#);
        line.unit_price = None;
        assert_eq!(json(&line), "[]");
        line.tiers.push(TierAmount {
            tier: 1,
            from: d("50"),
            to: None,
            units: d("29.99"),
            unit_price: d("0.05"),
            flat_fee: d("0"),
            amount: d("1.4995"),
        });
        line.billable_quantity = Some(d("79.99"));
        assert_eq!(
            json(&line),
            r#"[null,"79.99",null,null,null,[[1,"50",null,"29.99","0.05","0","1.4995"]]]"#
        );
        line.tiers.clear();
        line.adjusts = Some("t/it's \"q\"/1".into());
        assert_eq!(
            json(&line),
            r#"[null,"79.99",null,null,null,[],"t/it's \"q\"/1"]"#
        );
    }

    #[test]
    fn both_layouts_read_and_bad_rows_name_what_is_wrong() {
        let named = StoredLine {
            segment: 0,
            kind: "usage".into(),
            charge: "tokens".into(),
            meter: "tokens".into(),
            quantity: "10".into(),
            amount: "0.02".into(),
            line: r#"{"billable_quantity":"10","tiers":[{"tier":0,"from":"0","units":"10","unit_price":"0.002","flat_fee":"0","amount":"0.020"}]}"#.into(),
            layout: 0,
        };
        let positional = StoredLine {
            line: r#"[null,"10",null,null,null,[[0,"0",null,"10","0.002","0","0.020"]]]"#.into(),
            layout: 1,
            ..named.clone()
        };
        let a = named.to_line().expect("layout 0");
        assert_eq!(a, positional.to_line().expect("layout 1"));
        assert_eq!(a.tiers[0].amount.to_string(), "0.020");

        let long = StoredLine {
            line: r#"[null,null,null,null,null,[],null,"extra"]"#.into(),
            ..positional.clone()
        };
        assert!(long.to_line().expect_err("8 fields").contains("line json"));
        let short_tier = StoredLine {
            line: r#"[null,null,null,null,null,[[0,"0"]]]"#.into(),
            ..positional.clone()
        };
        assert!(short_tier
            .to_line()
            .expect_err("tier")
            .contains("line json"));
        let unknown = StoredLine {
            layout: 7,
            ..positional
        };
        assert!(unknown.to_line().expect_err("layout").contains("layout 7"));
    }
}
