//! Billing periods and proration, in UTC.
//!
//! A subscription's periods are fixed by its billing anchor: period `k` starts `k` intervals
//! after the anchor, on the anchor's day of the month clamped to the month's length, at the
//! anchor's time of day. An anchor on Jan 31 gives periods starting Feb 28 (29), Mar 31,
//! Apr 30, …; a yearly anchor on Feb 29 gives Feb 28 in common years. Clamping never carries
//! over, so periods tile time: each ends where the next starts.

use std::fmt;

use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};
use time::{Date, Month, OffsetDateTime, UtcOffset};

use crate::error::{Error, Result};
use crate::exact;

/// How often a plan bills.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Interval {
    Monthly,
    Yearly,
}

impl Interval {
    /// The interval named as in plan files (`monthly`, `yearly`).
    pub fn from_name(name: &str) -> Option<Interval> {
        match name {
            "monthly" => Some(Interval::Monthly),
            "yearly" => Some(Interval::Yearly),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Interval::Monthly => "monthly",
            Interval::Yearly => "yearly",
        }
    }

    fn months(self) -> i64 {
        match self {
            Interval::Monthly => 1,
            Interval::Yearly => 12,
        }
    }
}

impl fmt::Display for Interval {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// One billing period, `[start, end)`, of a subscription with a given anchor and interval.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Period {
    anchor: OffsetDateTime,
    interval: Interval,
    index: i64,
    start: OffsetDateTime,
    end: OffsetDateTime,
}

/// The period of the subscription anchored at `anchor` that contains `instant`. Instants
/// before the anchor fall in periods with negative indexes, laid out the same way.
pub fn period_containing(
    anchor: OffsetDateTime,
    interval: Interval,
    instant: OffsetDateTime,
) -> Result<Period> {
    let anchor = anchor.to_offset(UtcOffset::UTC);
    let instant = instant.to_offset(UtcOffset::UTC);
    let months = |t: OffsetDateTime| i64::from(t.year()) * 12 + i64::from(u8::from(t.month()));
    let mut k = (months(instant) - months(anchor)).div_euclid(interval.months());
    // The estimate is off by at most one either way: day and time of day are not compared.
    while boundary(anchor, interval, k)? > instant {
        k -= 1;
    }
    while boundary(anchor, interval, k + 1)? <= instant {
        k += 1;
    }
    Period::nth(anchor, interval, k)
}

/// Start of period `k`: the anchor moved `k` intervals, its day clamped to the month.
fn boundary(anchor: OffsetDateTime, interval: Interval, k: i64) -> Result<OffsetDateTime> {
    let out_of_range = Error::DateOutOfRange {
        what: "billing period",
    };
    let month0 = i64::from(anchor.year()) * 12 + i64::from(u8::from(anchor.month())) - 1;
    let target = k
        .checked_mul(interval.months())
        .and_then(|m| m.checked_add(month0))
        .ok_or(Error::DateOutOfRange {
            what: "billing period",
        })?;
    let year = i32::try_from(target.div_euclid(12)).map_err(|_| Error::DateOutOfRange {
        what: "billing period",
    })?;
    let month = u8::try_from(target.rem_euclid(12) + 1)
        .ok()
        .and_then(|m| Month::try_from(m).ok())
        .ok_or(Error::DateOutOfRange {
            what: "billing period",
        })?;
    if !(1..=9999).contains(&year) {
        return Err(out_of_range);
    }
    let day = anchor.day().min(month.length(year));
    let date = Date::from_calendar_date(year, month, day).map_err(|_| out_of_range)?;
    Ok(date.with_time(anchor.time()).assume_utc())
}

impl Period {
    /// Period `index` of the subscription anchored at `anchor`; period 0 starts at the anchor.
    pub fn nth(anchor: OffsetDateTime, interval: Interval, index: i64) -> Result<Period> {
        let anchor = anchor.to_offset(UtcOffset::UTC);
        let next = index.checked_add(1).ok_or(Error::DateOutOfRange {
            what: "billing period",
        })?;
        Ok(Period {
            anchor,
            interval,
            index,
            start: boundary(anchor, interval, index)?,
            end: boundary(anchor, interval, next)?,
        })
    }

    pub fn start(&self) -> OffsetDateTime {
        self.start
    }

    /// Exclusive end: the next period's start.
    pub fn end(&self) -> OffsetDateTime {
        self.end
    }

    pub fn interval(&self) -> Interval {
        self.interval
    }

    pub fn anchor(&self) -> OffsetDateTime {
        self.anchor
    }

    /// Periods since the anchor: 0 for the one starting at it.
    pub fn index(&self) -> i64 {
        self.index
    }

    pub fn next(&self) -> Result<Period> {
        let index = self.index.checked_add(1).ok_or(Error::DateOutOfRange {
            what: "billing period",
        })?;
        Period::nth(self.anchor, self.interval, index)
    }

    pub fn contains(&self, instant: OffsetDateTime) -> bool {
        self.start <= instant && instant < self.end
    }

    /// The share of this period that `[from, to)` covers, which must lie inside it.
    pub fn fraction(&self, from: OffsetDateTime, to: OffsetDateTime) -> Result<Fraction> {
        if !(self.start <= from && from <= to && to <= self.end) {
            return Err(Error::OutsidePeriod {
                from,
                to,
                start: self.start,
                end: self.end,
            });
        }
        Ok(Fraction {
            part: (to - from).whole_nanoseconds(),
            whole: (self.end - self.start).whole_nanoseconds(),
        })
    }
}

/// An exact share of a billing period: the covered time over the period's length, both in
/// nanoseconds. It is kept as a ratio because it is rarely a terminating decimal (a day of a
/// 31-day month is 1/31); `apply` rounds the prorated value once, at the end.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Fraction {
    part: i128,
    whole: i128,
}

impl Fraction {
    /// Covered time in seconds, exact (nanosecond precision).
    pub fn seconds(&self) -> Decimal {
        Decimal::from_i128_with_scale(self.part, 9).normalize()
    }

    /// The period's length in seconds, exact.
    pub fn period_seconds(&self) -> Decimal {
        Decimal::from_i128_with_scale(self.whole, 9).normalize()
    }

    /// The whole period.
    pub fn is_whole(&self) -> bool {
        self.part == self.whole
    }

    /// Sum of two shares of the same period (`None` if the periods differ in length or the
    /// sum exceeds the period).
    pub fn checked_add(self, other: Fraction) -> Option<Fraction> {
        let part = self.part.checked_add(other.part)?;
        (self.whole == other.whole && part <= self.whole).then_some(Fraction {
            part,
            whole: self.whole,
        })
    }

    /// `x × seconds ÷ period_seconds`, rounded half away from zero to `dp` decimal places,
    /// computed exactly before that one rounding.
    pub fn apply(&self, x: Decimal, dp: u32) -> Result<Decimal> {
        exact::mul_ratio_round(x, self.part, self.whole, dp, "prorated amount")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use time::macros::datetime;

    fn period(anchor: OffsetDateTime, interval: Interval, at: OffsetDateTime) -> Period {
        period_containing(anchor, interval, at).expect("period")
    }

    #[test]
    fn month_end_anchor_clamps_without_drifting() {
        let anchor = datetime!(2024-01-31 10:30 UTC);
        let starts: Vec<_> = (0..6)
            .map(|k| {
                Period::nth(anchor, Interval::Monthly, k)
                    .expect("period")
                    .start()
            })
            .collect();
        assert_eq!(
            starts,
            [
                datetime!(2024-01-31 10:30 UTC),
                datetime!(2024-02-29 10:30 UTC),
                datetime!(2024-03-31 10:30 UTC),
                datetime!(2024-04-30 10:30 UTC),
                datetime!(2024-05-31 10:30 UTC),
                datetime!(2024-06-30 10:30 UTC),
            ]
        );
        let feb = period(anchor, Interval::Monthly, datetime!(2025-03-01 0:00 UTC));
        assert_eq!(feb.start(), datetime!(2025-02-28 10:30 UTC));
        assert_eq!(feb.end(), datetime!(2025-03-31 10:30 UTC));
        assert_eq!(feb.index(), 13);
    }

    #[test]
    fn yearly_leap_day_anchor() {
        let anchor = datetime!(2024-02-29 0:00 UTC);
        let p = period(anchor, Interval::Yearly, datetime!(2025-06-01 0:00 UTC));
        assert_eq!(p.start(), datetime!(2025-02-28 0:00 UTC));
        assert_eq!(p.end(), datetime!(2026-02-28 0:00 UTC));
        let p = period(anchor, Interval::Yearly, datetime!(2028-03-01 0:00 UTC));
        assert_eq!(p.start(), datetime!(2028-02-29 0:00 UTC));
        assert_eq!(p.end(), datetime!(2029-02-28 0:00 UTC));
    }

    #[test]
    fn boundaries_belong_to_the_later_period() {
        let anchor = datetime!(2025-01-15 12:00 UTC);
        let p = period(anchor, Interval::Monthly, datetime!(2025-02-15 12:00 UTC));
        assert_eq!(p.start(), datetime!(2025-02-15 12:00 UTC));
        let p = period(
            anchor,
            Interval::Monthly,
            datetime!(2025-02-15 11:59:59.999999999 UTC),
        );
        assert_eq!(p.start(), datetime!(2025-01-15 12:00 UTC));
        // Before the anchor, and with the anchor given in another offset.
        let p = period(
            datetime!(2025-01-15 14:00 +02:00),
            Interval::Monthly,
            datetime!(2024-12-01 0:00 UTC),
        );
        assert_eq!(p.start(), datetime!(2024-11-15 12:00 UTC));
        assert_eq!(p.index(), -2);
    }

    #[test]
    fn fractions_are_exact_ratios() {
        let p = Period::nth(datetime!(2025-01-01 0:00 UTC), Interval::Monthly, 0).expect("p");
        let f = p
            .fraction(
                datetime!(2025-01-01 0:00 UTC),
                datetime!(2025-01-02 0:00 UTC),
            )
            .expect("fraction");
        assert_eq!(f.seconds(), Decimal::from(86_400));
        assert_eq!(f.period_seconds(), Decimal::from(31 * 86_400));
        // 31.00 for one day of 31: exactly 1.00; 10.00 for one day: 0.3225… → 0.32
        assert_eq!(
            f.apply(Decimal::new(3100, 2), 2).expect("ok"),
            Decimal::new(100, 2)
        );
        assert_eq!(
            f.apply(Decimal::new(1000, 2), 2).expect("ok"),
            Decimal::new(32, 2)
        );
        let whole = p.fraction(p.start(), p.end()).expect("whole");
        assert!(whole.is_whole());
        assert_eq!(
            whole
                .apply(Decimal::new(4900, 2), 2)
                .expect("ok")
                .to_string(),
            "49.00"
        );
        let e = p
            .fraction(
                datetime!(2024-12-31 0:00 UTC),
                datetime!(2025-01-02 0:00 UTC),
            )
            .expect_err("outside");
        assert_eq!(
            e.to_string(),
            "[2024-12-31T00:00:00Z, 2025-01-02T00:00:00Z) is not inside the period \
             [2025-01-01T00:00:00Z, 2025-02-01T00:00:00Z)"
        );
    }

    #[test]
    fn far_dates_are_errors() {
        let anchor = datetime!(9999-12-01 0:00 UTC);
        assert!(matches!(
            period_containing(anchor, Interval::Monthly, datetime!(9999-12-15 0:00 UTC)),
            Err(Error::DateOutOfRange { .. })
        ));
        assert!(Period::nth(anchor, Interval::Yearly, i64::MAX).is_err());
        assert!(Period::nth(anchor, Interval::Yearly, i64::MIN).is_err());
    }

    fn instant() -> impl Strategy<Value = OffsetDateTime> {
        // 1990 .. 2100, nanosecond resolution.
        (631_152_000i64..4_102_444_800, 0u32..1_000_000_000).prop_map(|(s, ns)| {
            OffsetDateTime::from_unix_timestamp(s).expect("in range")
                + time::Duration::nanoseconds(i64::from(ns))
        })
    }

    fn interval() -> impl Strategy<Value = Interval> {
        prop_oneof![Just(Interval::Monthly), Just(Interval::Yearly)]
    }

    proptest! {
        #[test]
        fn the_period_contains_the_instant(a in instant(), i in interval(), t in instant()) {
            let p = period_containing(a, i, t).expect("period");
            prop_assert!(p.contains(t));
            prop_assert_eq!(p.start().time(), a.time());
            prop_assert!(p.start().day() <= a.day());
            prop_assert_eq!(p, Period::nth(a, i, p.index()).expect("nth"));
        }

        #[test]
        fn consecutive_periods_tile_time(a in instant(), i in interval(), t in instant()) {
            let p = period_containing(a, i, t).expect("period");
            let next = p.next().expect("next");
            prop_assert_eq!(p.end(), next.start());
            prop_assert!(p.start() < p.end());
            prop_assert_eq!(period_containing(a, i, p.end()).expect("at end"), next);
            let just_before = p.end() - time::Duration::nanoseconds(1);
            prop_assert_eq!(period_containing(a, i, just_before).expect("before end"), p);
            let days = (p.end() - p.start()).whole_days();
            let range = match i { Interval::Monthly => 28..=31, Interval::Yearly => 365..=366 };
            prop_assert!(range.contains(&days), "{} days", days);
        }

        #[test]
        fn fractions_of_a_partition_sum_to_one(
            a in instant(), t in instant(), cuts in proptest::collection::vec(0u64..u64::MAX, 0..6),
        ) {
            let p = period_containing(a, Interval::Monthly, t).expect("period");
            let len = (p.end() - p.start()).whole_nanoseconds();
            let mut points: Vec<OffsetDateTime> = cuts
                .iter()
                .map(|c| p.start() + time::Duration::nanoseconds_i128(i128::from(*c) % len))
                .collect();
            points.push(p.start());
            points.push(p.end());
            points.sort();
            let mut total: Option<Fraction> = None;
            for w in points.windows(2) {
                let f = p.fraction(w[0], w[1]).expect("inside");
                total = Some(match total { None => f, Some(s) => s.checked_add(f).expect("fits") });
            }
            let total = total.expect("at least one piece");
            prop_assert!(total.is_whole());
            prop_assert_eq!(total.seconds(), total.period_seconds());
        }
    }
}
