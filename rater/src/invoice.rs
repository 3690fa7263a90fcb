//! One customer's invoice for one billing period.
//!
//! Input: the period, the subscription segments in force during it (`[from, to)` each with
//! a plan version; a mid-period plan change splits the period) and the usage of each meter
//! within each segment, as the caller measured it. Output: lines in a fixed order — segment
//! by segment, each segment's charges in plan-file order, a charge's minimum top-up right
//! after it, the invoice-minimum top-up last — then subtotal and total.
//!
//! # Rounding
//! Every amount is computed exactly (pricing in exact decimals; prorations as exact ratios
//! of nanoseconds). Each line's amount is then rounded once, to the currency's minor unit,
//! half away from zero (`MidpointAwayFromZero`). Subtotal and total are sums of the rounded
//! lines, so the lines always add up to the total.
//!
//! # Proration
//! A segment's fraction is its length over the period's length. Scaled by it:
//! - a flat charge's fee (the line is `fee × fraction`, rounded);
//! - a usage charge's `included` allowance, rounded half away from zero to 9 decimal places
//!   (the precision of meter values) or the allowance's own precision if finer, and shown on
//!   the line; the billable quantity is `max(0, quantity − prorated allowance)`;
//! - a charge's `minimum`, rounded to the minor unit; when the charge's rounded line is
//!   below it, a `charge_minimum` line adds the difference, so line + top-up = the prorated
//!   minimum;
//! - the plan's invoice `minimum`: each segment contributes its plan's minimum × its
//!   fraction (rounded to the minor unit), and if the subtotal is below the sum an
//!   `invoice_minimum` line adds the difference.
//!
//! A segment covering the whole period has fraction 1, so nothing changes for it. Usage
//! charges are not prorated: the quantity is what was used in the segment. A meter missing
//! from a segment's usage counts as zero; usage of meters no charge reads is ignored.

use std::borrow::Cow;
use std::collections::BTreeMap;

use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

use crate::currency::Currency;
use crate::error::{Error, Result};
use crate::exact;
use crate::period::{Interval, Period};
use crate::plan::{ChargeKind, PlanVersion};
use crate::pricing::{self, TierAmount};

/// Decimal places of meter values (ClickHouse `Decimal(38, 9)`), the precision a prorated
/// allowance is kept to.
const QUANTITY_SCALE: u32 = 9;

/// A stretch of the period during which one plan version was in force.
#[derive(Debug, Clone)]
pub struct Segment<'a> {
    pub from: OffsetDateTime,
    /// Exclusive.
    pub to: OffsetDateTime,
    pub plan: &'a PlanVersion,
    /// Meter key → quantity used within `[from, to)`; borrowed from a usage table by an
    /// invoice run, owned when built by hand.
    pub usage: Cow<'a, BTreeMap<String, Decimal>>,
}

/// An invoice: serializes to the same bytes for the same inputs (decimals as strings, times
/// in RFC 3339, fields and lines in a fixed order).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Invoice {
    pub customer: String,
    #[serde(with = "time::serde::rfc3339")]
    pub period_start: OffsetDateTime,
    #[serde(with = "time::serde::rfc3339")]
    pub period_end: OffsetDateTime,
    pub interval: Interval,
    pub currency: Currency,
    pub segments: Vec<SegmentSummary>,
    pub lines: Vec<Line>,
    /// Sum of this period's lines but the invoice-minimum top-up (adjustments excluded).
    pub subtotal: Decimal,
    /// Sum of every line.
    pub total: Decimal,
}

/// A segment as billed: which plan version priced it, by its content digest, and its share
/// of the period.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SegmentSummary {
    #[serde(with = "time::serde::rfc3339")]
    pub from: OffsetDateTime,
    #[serde(with = "time::serde::rfc3339")]
    pub to: OffsetDateTime,
    pub plan: String,
    pub version: u32,
    pub digest: String,
    /// The fraction prorations use: `seconds / period_seconds`.
    pub seconds: Decimal,
    pub period_seconds: Decimal,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LineKind {
    Flat,
    Usage,
    ChargeMinimum,
    InvoiceMinimum,
    /// A correction of an earlier final invoice whose usage grew after it was issued.
    Adjustment,
}

impl LineKind {
    /// The kind named `name` (as [`LineKind::name`] spells it).
    pub fn from_name(name: &str) -> Option<LineKind> {
        [
            LineKind::Flat,
            LineKind::Usage,
            LineKind::ChargeMinimum,
            LineKind::InvoiceMinimum,
            LineKind::Adjustment,
        ]
        .into_iter()
        .find(|k| k.name() == name)
    }

    pub fn name(self) -> &'static str {
        match self {
            LineKind::Flat => "flat",
            LineKind::Usage => "usage",
            LineKind::ChargeMinimum => "charge_minimum",
            LineKind::InvoiceMinimum => "invoice_minimum",
            LineKind::Adjustment => "adjustment",
        }
    }
}

/// One invoice line. Fields that do not apply to its kind are absent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Line {
    /// Index into `Invoice::segments`; absent on the invoice-minimum line.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub segment: Option<usize>,
    pub kind: LineKind,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub charge: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub meter: Option<String>,
    /// Usage in the segment.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quantity: Option<Decimal>,
    /// The prorated free allowance, when the charge has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub included: Option<Decimal>,
    /// `max(0, quantity − included)`: what the model priced.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub billable_quantity: Option<Decimal>,
    /// Per-unit and volume: the price of each unit. Flat: the fee for a full period.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unit_price: Option<Decimal>,
    /// Package: blocks charged.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub packages: Option<Decimal>,
    /// Top-up lines: the prorated minimum the top-up makes up to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub minimum: Option<Decimal>,
    /// Graduated and volume: what each tier contributed, exact.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tiers: Vec<TierAmount>,
    /// Rounded to the currency's minor unit.
    pub amount: Decimal,
    /// Adjustment lines: the invoice they correct (its id in storage).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub adjusts: Option<String>,
}

impl Line {
    fn new(segment: Option<usize>, kind: LineKind, amount: Decimal) -> Line {
        Line {
            segment,
            kind,
            charge: None,
            meter: None,
            quantity: None,
            included: None,
            billable_quantity: None,
            unit_price: None,
            packages: None,
            minimum: None,
            tiers: Vec::new(),
            amount,
            adjusts: None,
        }
    }
}

impl Invoice {
    /// Prices `segments` of `period` for `customer`. The segments must be non-empty, each
    /// inside the period, contiguous and in order, with plans in one currency and on the
    /// period's interval; they need not cover the whole period (a subscription may start or
    /// end within it).
    pub fn compute(customer: &str, period: &Period, segments: &[Segment<'_>]) -> Result<Invoice> {
        let currency = check_segments(period, segments)?;
        let dp = currency.minor_unit_exponent();
        let zero = exact::round_money(Decimal::ZERO, dp, "zero")?;
        let mut lines = Vec::new();
        let mut summaries = Vec::with_capacity(segments.len());
        let mut invoice_minimum: Option<Decimal> = None;

        for (i, s) in segments.iter().enumerate() {
            let fraction = period.fraction(s.from, s.to)?;
            summaries.push(SegmentSummary {
                from: s.from,
                to: s.to,
                plan: s.plan.plan().to_owned(),
                version: s.plan.version(),
                digest: s.plan.digest().to_owned(),
                seconds: fraction.seconds(),
                period_seconds: fraction.period_seconds(),
            });
            for charge in s.plan.charges() {
                match &charge.kind {
                    ChargeKind::Flat { price } => {
                        let mut line =
                            Line::new(Some(i), LineKind::Flat, fraction.apply(*price, dp)?);
                        line.charge = Some(charge.id.clone());
                        line.unit_price = Some(*price);
                        lines.push(line);
                    }
                    ChargeKind::Usage(u) => {
                        let quantity = s.usage.get(&u.meter).copied().unwrap_or_default();
                        if quantity.is_sign_negative() && !quantity.is_zero() {
                            return Err(Error::NegativeQuantity { quantity });
                        }
                        let included = if u.included.is_zero() {
                            None
                        } else {
                            let places = u.included.scale().max(QUANTITY_SCALE);
                            Some(fraction.apply(u.included, places)?.normalize())
                        };
                        let billable = exact::sub(
                            quantity,
                            included.unwrap_or_default(),
                            "billable quantity",
                        )?
                        .max(Decimal::ZERO)
                        .normalize();
                        let priced = pricing::price(&u.model, billable)?;
                        let amount = exact::round_money(priced.amount, dp, "line amount")?;
                        lines.push(Line {
                            charge: Some(charge.id.clone()),
                            meter: Some(u.meter.clone()),
                            quantity: Some(quantity.normalize()),
                            included,
                            billable_quantity: Some(billable),
                            unit_price: priced.unit_price,
                            packages: priced.packages,
                            tiers: priced.tiers,
                            ..Line::new(Some(i), LineKind::Usage, amount)
                        });
                        if let Some(minimum) = u.minimum {
                            let minimum = fraction.apply(minimum, dp)?;
                            if minimum > amount {
                                let top_up = exact::sub(minimum, amount, "minimum top-up")?;
                                let mut line = Line::new(Some(i), LineKind::ChargeMinimum, top_up);
                                line.charge = Some(charge.id.clone());
                                line.meter = Some(u.meter.clone());
                                line.minimum = Some(minimum);
                                lines.push(line);
                            }
                        }
                    }
                }
            }
            if let Some(m) = s.plan.minimum() {
                let share = fraction.apply(m, dp)?;
                let sum = exact::add(invoice_minimum.unwrap_or(zero), share, "invoice minimum")?;
                invoice_minimum = Some(sum);
            }
        }

        let subtotal = sum(&lines, zero)?;
        if let Some(minimum) = invoice_minimum {
            if minimum > subtotal {
                let top_up = exact::sub(minimum, subtotal, "invoice minimum top-up")?;
                let mut line = Line::new(None, LineKind::InvoiceMinimum, top_up);
                line.minimum = Some(minimum);
                lines.push(line);
            }
        }
        let total = sum(&lines, zero)?;
        Ok(Invoice {
            customer: customer.to_owned(),
            period_start: period.start(),
            period_end: period.end(),
            interval: period.interval(),
            currency,
            segments: summaries,
            lines,
            subtotal,
            total,
        })
    }

    /// What changed between an issued invoice (`issued`) and the same period priced again
    /// (`now`): one adjustment line per charge (all segments together) whose quantity or
    /// amount moved, and one for
    /// the invoice-minimum top-up, each the difference `now − issued`. A charge's minimum
    /// top-up counts with its charge, so a top-up that shrinks as usage grows nets out.
    pub fn adjustments(issued: &Invoice, now: &Invoice, adjusts: &str) -> Result<Vec<Line>> {
        // By charge across the issued invoice's segments: `segment` on a line indexes its
        // own invoice's segments, which an adjustment does not share.
        type Key = Option<String>;
        /// Quantity, amount and meter of one charge's lines.
        type Sums = BTreeMap<Key, (Decimal, Decimal, Option<String>)>;
        let totals = |inv: &Invoice| -> Result<Sums> {
            let mut out = Sums::new();
            for l in &inv.lines {
                if matches!(l.kind, LineKind::Flat | LineKind::Adjustment) {
                    continue;
                }
                let e = out.entry(l.charge.clone()).or_insert((
                    Decimal::ZERO,
                    Decimal::ZERO,
                    l.meter.clone(),
                ));
                if l.kind == LineKind::Usage {
                    e.0 = exact::add(e.0, l.quantity.unwrap_or_default(), "adjustment quantity")?;
                }
                e.1 = exact::add(e.1, l.amount, "adjustment amount")?;
            }
            Ok(out)
        };
        let (before, after) = (totals(issued)?, totals(now)?);
        let keys: std::collections::BTreeSet<&Key> = before.keys().chain(after.keys()).collect();
        let mut lines = Vec::new();
        for key in keys {
            let zero = (Decimal::ZERO, Decimal::ZERO, None);
            let (q0, a0, m0) = before.get(key).unwrap_or(&zero);
            let (q1, a1, m1) = after.get(key).unwrap_or(&zero);
            let quantity = exact::sub(*q1, *q0, "adjustment quantity")?;
            let amount = exact::sub(*a1, *a0, "adjustment amount")?;
            if quantity.is_zero() && amount.is_zero() {
                continue;
            }
            let mut line = Line::new(None, LineKind::Adjustment, amount);
            line.charge = key.clone();
            line.meter = m1.clone().or_else(|| m0.clone());
            line.quantity = (!quantity.is_zero()).then_some(quantity.normalize());
            line.adjusts = Some(adjusts.to_owned());
            lines.push(line);
        }
        Ok(lines)
    }

    /// Appends adjustment lines; they count in the total, not in the subtotal (which is
    /// this period's charges, the base of its invoice minimum).
    /// The invoice of a period with no subscription in force (the one after a
    /// cancellation) that carries adjustments of the period before: no segments, a zero
    /// subtotal, and the adjustments as its lines and total.
    pub fn adjustments_only(
        customer: &str,
        period: &Period,
        currency: Currency,
        lines: Vec<Line>,
    ) -> Result<Invoice> {
        let zero = exact::round_money(Decimal::ZERO, currency.minor_unit_exponent(), "zero")?;
        let mut invoice = Invoice {
            customer: customer.to_owned(),
            period_start: period.start(),
            period_end: period.end(),
            interval: period.interval(),
            currency,
            segments: Vec::new(),
            lines: Vec::new(),
            subtotal: zero,
            total: zero,
        };
        invoice.add_adjustments(lines)?;
        Ok(invoice)
    }

    pub fn add_adjustments(&mut self, lines: Vec<Line>) -> Result<()> {
        for l in lines {
            self.total = exact::add(self.total, l.amount, "invoice total")?;
            self.lines.push(l);
        }
        Ok(())
    }

    /// The lines as CSV (RFC 4180: CRLF line ends, fields quoted when they hold a comma,
    /// quote or line break), one row per line under a fixed header; the tier breakdown is
    /// left to the JSON form. `adjusts` names the invoice an adjustment line corrects.
    pub fn to_csv(&self) -> String {
        const HEADER: [&str; 18] = [
            "customer",
            "period_start",
            "period_end",
            "currency",
            "segment",
            "plan",
            "version",
            "kind",
            "charge",
            "meter",
            "quantity",
            "included",
            "billable_quantity",
            "unit_price",
            "packages",
            "minimum",
            "amount",
            "adjusts",
        ];
        let time = |t: OffsetDateTime| {
            t.format(&Rfc3339)
                .expect("billing periods lie in years 1-9999, which RFC 3339 can show")
        };
        let dec = |d: Option<Decimal>| d.map(|d| d.to_string()).unwrap_or_default();
        let mut out = String::new();
        push_row(&mut out, HEADER.iter().map(|h| h.to_string()));
        for line in &self.lines {
            let segment = line.segment.and_then(|i| self.segments.get(i));
            push_row(
                &mut out,
                [
                    self.customer.clone(),
                    time(self.period_start),
                    time(self.period_end),
                    self.currency.code().to_owned(),
                    line.segment.map(|i| i.to_string()).unwrap_or_default(),
                    segment.map(|s| s.plan.clone()).unwrap_or_default(),
                    segment.map(|s| s.version.to_string()).unwrap_or_default(),
                    line.kind.name().to_owned(),
                    line.charge.clone().unwrap_or_default(),
                    line.meter.clone().unwrap_or_default(),
                    dec(line.quantity),
                    dec(line.included),
                    dec(line.billable_quantity),
                    dec(line.unit_price),
                    dec(line.packages),
                    dec(line.minimum),
                    line.amount.to_string(),
                    line.adjusts.clone().unwrap_or_default(),
                ],
            );
        }
        out
    }
}

fn push_row(out: &mut String, fields: impl IntoIterator<Item = String>) {
    for (i, f) in fields.into_iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        if f.contains([',', '"', '\r', '\n']) {
            out.push('"');
            out.push_str(&f.replace('"', "\"\""));
            out.push('"');
        } else {
            out.push_str(&f);
        }
    }
    out.push_str("\r\n");
}

fn sum(lines: &[Line], zero: Decimal) -> Result<Decimal> {
    lines
        .iter()
        .try_fold(zero, |acc, l| exact::add(acc, l.amount, "invoice total"))
}

/// Checks the segments against the period and each other; returns the invoice currency.
fn check_segments(period: &Period, segments: &[Segment<'_>]) -> Result<Currency> {
    let first = segments.first().ok_or(Error::NoSegments)?;
    let currency = first.plan.currency();
    for (index, s) in segments.iter().enumerate() {
        if s.from >= s.to {
            return Err(Error::EmptySegment {
                index,
                from: s.from,
                to: s.to,
            });
        }
        if s.from < period.start() || s.to > period.end() {
            return Err(Error::SegmentOutsidePeriod {
                index,
                from: s.from,
                to: s.to,
                start: period.start(),
                end: period.end(),
            });
        }
        if let Some(prev) = index.checked_sub(1).and_then(|p| segments.get(p)) {
            if s.from != prev.to {
                return Err(Error::SegmentNotContiguous {
                    index,
                    expected: prev.to,
                    found: s.from,
                });
            }
        }
        if s.plan.currency() != currency {
            return Err(Error::CurrencyMismatch {
                index,
                plan: s.plan.plan().to_owned(),
                version: s.plan.version(),
                expected: currency,
                found: s.plan.currency(),
            });
        }
        if s.plan.interval() != period.interval() {
            return Err(Error::IntervalMismatch {
                index,
                plan: s.plan.plan().to_owned(),
                version: s.plan.version(),
                expected: period.interval(),
                found: s.plan.interval(),
            });
        }
    }
    Ok(currency)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::period::period_containing;
    use proptest::prelude::*;
    use std::path::Path;
    use time::macros::datetime;

    fn d(s: &str) -> Decimal {
        Decimal::from_str_exact(s).expect("decimal literal")
    }

    fn plan(file: &str, text: &str) -> PlanVersion {
        PlanVersion::parse(Path::new(file), text.as_bytes()).unwrap_or_else(|e| panic!("{e}"))
    }

    /// $30/month flat, requests at $0.01 with 1000 included and a $5 minimum, $20 invoice
    /// minimum.
    fn basic() -> PlanVersion {
        plan(
            "p/basic/v1.toml",
            r#"
plan = "basic"
version = 1
currency = "USD"
interval = "monthly"
minimum = "20"

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
minimum = "5"
"#,
        )
    }

    /// Graduated tokens, no flat fee, no minimum.
    fn metered() -> PlanVersion {
        plan(
            "p/metered/v1.toml",
            r#"
plan = "metered"
version = 1
currency = "USD"
interval = "monthly"

[[charges]]
id = "tok"
type = "usage"
meter = "tokens"
model = "graduated"
tiers = [{ up_to = "1000", unit_price = "0.002" }, { unit_price = "0.001" }]
"#,
        )
    }

    fn usage(pairs: &[(&str, &str)]) -> BTreeMap<String, Decimal> {
        pairs.iter().map(|(m, q)| ((*m).to_owned(), d(q))).collect()
    }

    /// January 2025 (31 days), anchored on the 1st.
    fn january() -> Period {
        period_containing(
            datetime!(2024-06-01 0:00 UTC),
            Interval::Monthly,
            datetime!(2025-01-10 0:00 UTC),
        )
        .expect("period")
    }

    fn whole<'a>(p: &'a PlanVersion, u: &[(&str, &str)]) -> Segment<'a> {
        let period = january();
        Segment {
            from: period.start(),
            to: period.end(),
            plan: p,
            usage: Cow::Owned(usage(u)),
        }
    }

    #[test]
    fn full_period_bills_fee_usage_and_no_minimums() {
        let p = basic();
        let inv = Invoice::compute("c1", &january(), &[whole(&p, &[("requests", "2500")])])
            .expect("invoice");
        let amounts: Vec<_> = inv
            .lines
            .iter()
            .map(|l| (l.kind, l.amount.to_string()))
            .collect();
        // 30.00 flat; (2500 − 1000) × 0.01 = 15.00 ≥ 5 minimum; 45.00 ≥ 20 invoice minimum.
        assert_eq!(
            amounts,
            [
                (LineKind::Flat, "30.00".into()),
                (LineKind::Usage, "15.00".into())
            ]
        );
        assert_eq!(inv.lines[1].included, Some(d("1000")));
        assert_eq!(inv.lines[1].billable_quantity, Some(d("1500")));
        assert_eq!(inv.total.to_string(), "45.00");
        assert_eq!(inv.subtotal, inv.total);
    }

    #[test]
    fn included_covering_usage_bills_nothing_and_minimums_top_up() {
        let p = basic();
        let inv = Invoice::compute("c1", &january(), &[whole(&p, &[("requests", "800")])])
            .expect("invoice");
        let kinds: Vec<_> = inv
            .lines
            .iter()
            .map(|l| (l.kind, l.amount.to_string()))
            .collect();
        assert_eq!(
            kinds,
            [
                (LineKind::Flat, "30.00".into()),
                (LineKind::Usage, "0.00".into()),
                (LineKind::ChargeMinimum, "5.00".into()),
            ]
        );
        assert_eq!(inv.lines[1].billable_quantity, Some(d("0")));
        assert_eq!(inv.total.to_string(), "35.00");

        // No flat fee, little usage: the invoice minimum applies.
        let m = plan(
            "p/min/v1.toml",
            "plan = \"min\"\nversion = 1\ncurrency = \"JPY\"\ninterval = \"monthly\"\nminimum = \"1000\"\n\
             [[charges]]\nid = \"tok\"\ntype = \"usage\"\nmeter = \"tokens\"\nmodel = \"per_unit\"\nprice = \"0.35\"\n",
        );
        let inv =
            Invoice::compute("c1", &january(), &[whole(&m, &[("tokens", "7")])]).expect("invoice");
        // 7 × 0.35 = 2.45 → 2 yen; top-up 998.
        let kinds: Vec<_> = inv
            .lines
            .iter()
            .map(|l| (l.kind, l.amount.to_string()))
            .collect();
        assert_eq!(
            kinds,
            [
                (LineKind::Usage, "2".into()),
                (LineKind::InvoiceMinimum, "998".into())
            ]
        );
        assert_eq!(inv.subtotal.to_string(), "2");
        assert_eq!(inv.total.to_string(), "1000");
        assert_eq!(inv.lines[1].segment, None);
    }

    #[test]
    fn mid_period_upgrade_prices_each_segment_by_its_plan() {
        let (b, m) = (basic(), metered());
        let period = january();
        let cut = datetime!(2025-01-11 0:00 UTC); // 10 days of 31 on basic, 21 on metered
        let segments = [
            Segment {
                from: period.start(),
                to: cut,
                plan: &b,
                usage: Cow::Owned(usage(&[("requests", "500"), ("tokens", "99999")])),
            },
            Segment {
                from: cut,
                to: period.end(),
                plan: &m,
                usage: Cow::Owned(usage(&[("tokens", "3000")])),
            },
        ];
        let inv = Invoice::compute("c1", &period, &segments).expect("invoice");
        let got: Vec<_> = inv
            .lines
            .iter()
            .map(|l| (l.segment, l.kind, l.charge.as_deref(), l.amount.to_string()))
            .collect();
        assert_eq!(
            got,
            [
                // 30.00 × 10/31 = 9.677… → 9.68
                (Some(0), LineKind::Flat, Some("base"), "9.68".into()),
                // allowance 1000 × 10/31 = 322.580645161 (9 places); 500 − that = 177.419354839
                // billable × 0.01 = 1.774… → 1.77. The minimum 5 × 10/31 = 1.61 is met.
                // Tokens used during the basic segment are not priced: basic has no such charge.
                (Some(0), LineKind::Usage, Some("req"), "1.77".into()),
                // 1000 × 0.002 + 2000 × 0.001
                (Some(1), LineKind::Usage, Some("tok"), "4.00".into()),
            ]
        );
        // Invoice minimum: 20 × 10/31 = 6.45 from basic, none from metered; 15.45 ≥ 6.45.
        assert_eq!(inv.lines[1].included, Some(d("322.580645161")));
        assert_eq!(inv.lines[1].billable_quantity, Some(d("177.419354839")));
        assert_eq!(inv.total.to_string(), "15.45");
        assert_eq!(inv.segments[0].seconds, d("864000"));
        assert_eq!(inv.segments[1].seconds, d("1814400"));
        assert_eq!(inv.segments[0].period_seconds, d("2678400"));
    }

    #[test]
    fn bad_segments_are_refused_clearly() {
        let (b, m) = (basic(), metered());
        let period = january();
        let cut = datetime!(2025-01-11 0:00 UTC);
        let seg = |from, to, plan| Segment {
            from,
            to,
            plan,
            usage: Cow::Owned(BTreeMap::new()),
        };
        let err = |segments: &[Segment<'_>]| {
            Invoice::compute("c", &period, segments)
                .expect_err("invalid")
                .to_string()
        };
        assert_eq!(err(&[]), "no subscription segment in the period");
        assert_eq!(
            err(&[seg(cut, cut, &b)]),
            "segment 0: [2025-01-11T00:00:00Z, 2025-01-11T00:00:00Z) is empty or reversed"
        );
        assert_eq!(
            err(&[seg(datetime!(2024-12-31 0:00 UTC), cut, &b)]),
            "segment 0: [2024-12-31T00:00:00Z, 2025-01-11T00:00:00Z) is not inside the period \
             [2025-01-01T00:00:00Z, 2025-02-01T00:00:00Z)"
        );
        assert_eq!(
            err(&[
                seg(period.start(), cut, &b),
                seg(datetime!(2025-01-12 0:00 UTC), period.end(), &m)
            ]),
            "segment 1: starts at 2025-01-12T00:00:00Z, expected 2025-01-11T00:00:00Z where segment 0 ends"
        );
        assert_eq!(
            err(&[
                seg(period.start(), cut, &b),
                seg(datetime!(2025-01-10 0:00 UTC), period.end(), &m)
            ]),
            "segment 1: starts at 2025-01-10T00:00:00Z, expected 2025-01-11T00:00:00Z where segment 0 ends"
        );
        let eur = plan(
            "p/eur/v1.toml",
            "plan = \"eur\"\nversion = 1\ncurrency = \"EUR\"\ninterval = \"monthly\"\n",
        );
        assert_eq!(
            err(&[seg(period.start(), cut, &b), seg(cut, period.end(), &eur)]),
            "segment 1: plan \"eur\" v1 is in EUR, the invoice in USD"
        );
        let yearly = plan(
            "p/y/v1.toml",
            "plan = \"y\"\nversion = 1\ncurrency = \"USD\"\ninterval = \"yearly\"\n",
        );
        assert_eq!(
            err(&[seg(period.start(), period.end(), &yearly)]),
            "segment 0: plan \"y\" v1 is billed yearly, the period is monthly"
        );
        let negative = Segment {
            usage: Cow::Owned(usage(&[("requests", "-1")])),
            ..whole(&b, &[])
        };
        assert_eq!(err(&[negative]), "quantity -1: must not be negative");
    }

    #[test]
    fn a_segment_may_cover_part_of_the_period() {
        let b = basic();
        let period = january();
        let seg = Segment {
            from: datetime!(2025-01-16 12:00 UTC),
            to: period.end(),
            plan: &b,
            usage: Cow::Owned(BTreeMap::new()),
        };
        let inv = Invoice::compute("c", &period, &[seg]).expect("invoice");
        // 15.5 of 31 days: exactly half.
        let amounts: Vec<_> = inv.lines.iter().map(|l| l.amount.to_string()).collect();
        assert_eq!(amounts, ["15.00", "0.00", "2.50"]);
        assert_eq!(inv.lines[1].included, Some(d("500")));
        assert_eq!(inv.total.to_string(), "17.50");
        // Invoice minimum: 20 × ½ = 10 ≤ 17.50.
        assert!(inv.lines.iter().all(|l| l.kind != LineKind::InvoiceMinimum));
    }

    #[test]
    fn adjustments_are_the_difference_per_charge_with_its_minimum() {
        let p = basic();
        let issued = Invoice::compute("c", &january(), &[whole(&p, &[("requests", "1200")])])
            .expect("issued");
        // 200 billable requests: $2.00 of usage, topped up to the $5 minimum.
        let amounts: Vec<String> = issued.lines.iter().map(|l| l.amount.to_string()).collect();
        assert_eq!(amounts, ["30.00", "2.00", "3.00"]);
        // Late usage: 600 billable, $6.00; the top-up goes away. Net +1.00 on `req`.
        let now = Invoice::compute("c", &january(), &[whole(&p, &[("requests", "1600")])])
            .expect("again");
        let lines = Invoice::adjustments(&issued, &now, "t/c/jan").expect("adjustments");
        assert_eq!(lines.len(), 1);
        let l = &lines[0];
        assert_eq!(
            (l.kind, l.charge.as_deref(), l.quantity, l.amount),
            (LineKind::Adjustment, Some("req"), Some(d("400")), d("1.00"))
        );
        assert_eq!(l.adjusts.as_deref(), Some("t/c/jan"));
        assert!(Invoice::adjustments(&issued, &issued, "x")
            .expect("none")
            .is_empty());
        let mut next = now.clone();
        let total = next.total;
        next.add_adjustments(lines).expect("add");
        assert_eq!(next.total, total + d("1.00"));
        assert_eq!(next.subtotal, now.subtotal);
    }

    #[test]
    fn csv_has_a_fixed_header_and_quotes_when_needed() {
        let b = basic();
        let inv = Invoice::compute(
            "acme, \"inc\"",
            &january(),
            &[whole(&b, &[("requests", "800")])],
        )
        .expect("invoice");
        let csv = inv.to_csv();
        let rows: Vec<&str> = csv.split("\r\n").collect();
        assert_eq!(
            rows[0],
            "customer,period_start,period_end,currency,segment,plan,version,kind,charge,meter,\
             quantity,included,billable_quantity,unit_price,packages,minimum,amount,adjusts"
        );
        assert_eq!(
            rows[2],
            "\"acme, \"\"inc\"\"\",2025-01-01T00:00:00Z,2025-02-01T00:00:00Z,USD,0,basic,1,usage,req,requests,800,1000,0,0.01,,,0.00,"
        );
        // An adjustment line names the invoice it corrects.
        let mut adjusted = inv.clone();
        let mut line = adjusted.lines[1].clone();
        line.adjusts = Some("t/acme/1735689600".into());
        adjusted.add_adjustments(vec![line]).expect("adjusted");
        let last = adjusted.to_csv();
        assert!(
            last.trim_end().ends_with(",0.00,t/acme/1735689600"),
            "{last}"
        );
        assert_eq!(
            rows.len(),
            inv.lines.len() + 2,
            "header, lines, and the final CRLF"
        );
        assert_eq!(rows.last(), Some(&""));
    }

    fn instant_in(period: &Period) -> impl Strategy<Value = OffsetDateTime> {
        let (start, len) = (
            period.start(),
            (period.end() - period.start()).whole_seconds(),
        );
        (0..len).prop_map(move |s| start + time::Duration::seconds(s))
    }

    proptest! {
        #[test]
        fn lines_add_up_and_runs_repeat(
            cuts in proptest::collection::vec(instant_in(&january()), 0..4),
            reqs in proptest::collection::vec(0u64..100_000, 5),
            toks in proptest::collection::vec(0u64..100_000_000, 5),
        ) {
            let (b, m) = (basic(), metered());
            let period = january();
            let mut points = cuts;
            points.push(period.start());
            points.push(period.end());
            points.sort();
            points.dedup();
            let segments: Vec<Segment<'_>> = points
                .windows(2)
                .enumerate()
                .map(|(i, w)| Segment {
                    from: w[0],
                    to: w[1],
                    plan: if i % 2 == 0 { &b } else { &m },
                    usage: Cow::Owned(usage(&[
                        ("requests", &reqs[i].to_string()),
                        ("tokens", &toks[i].to_string()),
                    ])),
                })
                .collect();
            let inv = Invoice::compute("c", &period, &segments).expect("invoice");
            let sum: Decimal = inv.lines.iter().map(|l| l.amount).sum();
            prop_assert_eq!(sum, inv.total);
            prop_assert!(inv.lines.iter().all(|l| l.amount.scale() == 2 && l.amount >= Decimal::ZERO));
            prop_assert_eq!(inv.total.scale(), 2);
            let seconds: Decimal = inv.segments.iter().map(|s| s.seconds).sum();
            prop_assert_eq!(seconds, inv.segments[0].period_seconds);
            // Line order: segment by segment.
            let order: Vec<usize> = inv.lines.iter().filter_map(|l| l.segment).collect();
            prop_assert!(order.windows(2).all(|w| w[0] <= w[1]));
            let again = Invoice::compute("c", &period, &segments).expect("invoice");
            prop_assert_eq!(
                serde_json::to_string(&inv).expect("json"),
                serde_json::to_string(&again).expect("json")
            );
        }

        #[test]
        fn included_at_least_usage_bills_zero(q in 0u64..=1000) {
            let b = basic();
            let inv = Invoice::compute("c", &january(), &[whole(&b, &[("requests", &q.to_string())])]).expect("invoice");
            prop_assert_eq!(inv.lines[1].amount, Decimal::ZERO);
            prop_assert_eq!(inv.lines[1].billable_quantity, Some(Decimal::ZERO));
        }
    }
}
