//! Keys, windows and units: where a counter lives and what it counts, as pure functions.
//!
//! Every key of one customer shares the hash tag `{<tenant>/<len>:<customer>}`, so a Redis
//! Cluster keeps a customer's counters on one shard and a check's script touches one slot.
//! The customer id's length makes the key unambiguous whatever characters the id holds.
//!
//! - rate window (GCRA state): `tq:{t/4:cust}:<meter>:<window>`
//! - quota window (counter): `tq:{t/4:cust}:<meter>:<window>:<start, ms since the epoch>`
//! - event seen by the feed: `tq:{t/4:cust}:seen:<event id>`

use rust_decimal::Decimal;
use tally_rater::{period_containing, Interval, Window};
use time::OffsetDateTime;

use crate::algo::{Fixed, Gcra, Micros, Rule};

/// Largest number of units a counter holds exactly (2^53: Lua numbers are doubles).
pub const MAX_UNITS: u64 = 1 << 53;

/// The hash-tagged prefix of every key of one customer.
pub fn customer_tag(tenant: &str, customer: &str) -> String {
    format!("tq:{{{tenant}/{}:{customer}}}", customer.len())
}

/// The customer a key of `tenant` belongs to, read back from its hash tag.
pub fn customer_of(key: &str, tenant: &str) -> Option<String> {
    let rest = key
        .strip_prefix("tq:{")?
        .strip_prefix(tenant)?
        .strip_prefix('/')?;
    let (len, rest) = rest.split_once(':')?;
    let len: usize = len.parse().ok()?;
    let customer = rest.get(..len)?;
    rest[len..].starts_with('}').then(|| customer.to_owned())
}

/// The key of one window's state.
pub fn window_key(tag: &str, meter: &str, window: Window, start: Option<OffsetDateTime>) -> String {
    match start {
        None => format!("{tag}:{meter}:{}", window.name()),
        Some(s) => format!("{tag}:{meter}:{}:{}", window.name(), millis(s)),
    }
}

/// The key remembering that the feed counted one event.
pub fn seen_key(tag: &str, event_id: &str) -> String {
    format!("{tag}:seen:{event_id}")
}

/// Milliseconds since the epoch (negative instants clamp to 0).
pub fn millis(t: OffsetDateTime) -> u64 {
    u64::try_from(t.unix_timestamp_nanos() / 1_000_000).unwrap_or(0)
}

/// Microseconds since the epoch (negative instants clamp to 0).
pub fn micros(t: OffsetDateTime) -> Micros {
    u64::try_from(t.unix_timestamp_nanos() / 1_000).unwrap_or(0)
}

/// The instant `us` microseconds after the epoch.
pub fn instant(us: Micros) -> OffsetDateTime {
    OffsetDateTime::from_unix_timestamp_nanos(i128::from(us) * 1_000)
        .unwrap_or(OffsetDateTime::UNIX_EPOCH)
}

/// Is this window a rate (GCRA) rather than a quota (fixed counter)?
pub fn is_rate(window: Window) -> bool {
    matches!(window, Window::Second | Window::Minute)
}

/// Length of a rate window, µs.
pub fn rate_length(window: Window) -> Option<Micros> {
    match window {
        Window::Second => Some(1_000_000),
        Window::Minute => Some(60_000_000),
        _ => None,
    }
}

/// The subscription facts a billing-period window needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Billing {
    pub anchor: OffsetDateTime,
    pub interval: Interval,
}

/// The quota window `[start, end)` containing `at`: UTC hour, UTC day, or the billing
/// period of `billing`. `None` for rate windows, or a billing period without billing facts.
pub fn fixed_bounds(
    window: Window,
    at: OffsetDateTime,
    billing: Option<Billing>,
) -> Option<(OffsetDateTime, OffsetDateTime)> {
    let align = |len: i64| {
        let s = at.unix_timestamp().div_euclid(len) * len;
        let start = OffsetDateTime::from_unix_timestamp(s).ok()?;
        Some((start, start + time::Duration::seconds(len)))
    };
    match window {
        Window::Hour => align(3_600),
        Window::Day => align(86_400),
        Window::BillingPeriod => {
            let b = billing?;
            let p = period_containing(b.anchor, b.interval, at).ok()?;
            Some((p.start(), p.end()))
        }
        Window::Second | Window::Minute => None,
    }
}

/// One window of one check: its key, rule and the limit as declared.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Applied {
    pub window: Window,
    pub key: String,
    pub rule: Rule,
    /// The limit in the meter's units, as the plan states it.
    pub limit: Decimal,
    /// Quota windows: when the counter key expires (ms since the epoch).
    pub expire_at_ms: u64,
}

/// How long a quota window's counter outlives the window: late events still count into it
/// and reconciliation can still read it.
pub const COUNTER_GRACE_MS: u64 = 2 * 86_400_000;

/// The windows `limits` (window, limit) impose at `at`, with their keys and rules.
/// A billing-period limit without billing facts is skipped.
pub fn applied(
    tag: &str,
    meter: &str,
    limits: &[(Window, Decimal)],
    scale: u32,
    at: OffsetDateTime,
    billing: Option<Billing>,
) -> Vec<Applied> {
    let mut out = Vec::with_capacity(limits.len());
    for &(window, limit) in limits {
        let units = limit_units(limit, scale);
        if let Some(len) = rate_length(window) {
            out.push(Applied {
                window,
                key: window_key(tag, meter, window, None),
                rule: Rule::Rate(Gcra::new(units, len)),
                limit,
                expire_at_ms: 0,
            });
        } else if let Some((start, end)) = fixed_bounds(window, at, billing) {
            out.push(Applied {
                window,
                key: window_key(tag, meter, window, Some(start)),
                rule: Rule::Fixed(Fixed {
                    limit: units,
                    end: micros(end),
                }),
                limit,
                expire_at_ms: millis(end) + COUNTER_GRACE_MS,
            });
        }
    }
    out
}

/// A limit in whole units of 10^-scale, rounded down (a limit is never exceeded), capped at
/// [`MAX_UNITS`]; negative limits count as 0.
pub fn limit_units(limit: Decimal, scale: u32) -> u64 {
    let scaled = limit * Decimal::from(10u64.pow(scale));
    let floor = scaled.floor();
    if floor <= Decimal::ZERO {
        0
    } else {
        u64::try_from(floor).map_or(MAX_UNITS, |u| u.min(MAX_UNITS))
    }
}

/// An amount in units of 10^-scale: it must be non-negative, have at most `scale` decimal
/// places, and fit [`MAX_UNITS`]. The error says which.
pub fn amount_units(amount: Decimal, scale: u32) -> Result<u64, String> {
    if amount.is_sign_negative() && !amount.is_zero() {
        return Err(format!("must not be negative, got {amount}"));
    }
    let scaled = amount
        .checked_mul(Decimal::from(10u64.pow(scale)))
        .ok_or_else(|| format!("{amount} is too large"))?;
    if scaled.fract() != Decimal::ZERO {
        return Err(if scale == 0 {
            format!("must be a whole number for this meter, got {amount}")
        } else {
            format!("at most {scale} decimal places for this meter, got {amount}")
        });
    }
    match u64::try_from(scaled) {
        Ok(u) if u <= MAX_UNITS => Ok(u),
        _ => Err(format!("{amount} is too large (at most 2^53 units)")),
    }
}

/// Units back to the meter's decimal amount.
pub fn from_units(units: u64, scale: u32) -> Decimal {
    Decimal::from_i128_with_scale(i128::from(units), scale).normalize()
}

/// Event value → units: rounded up, so usage is never under-counted; out of range → `None`.
pub fn event_units(value: Decimal, scale: u32) -> Option<u64> {
    let scaled = value.checked_mul(Decimal::from(10u64.pow(scale)))?.ceil();
    if scaled.is_sign_negative() {
        return Some(0);
    }
    u64::try_from(scaled).ok().filter(|u| *u <= MAX_UNITS)
}

#[cfg(test)]
mod tests {
    use super::*;
    use time::macros::datetime;

    #[test]
    fn keys_share_a_hash_tag_per_customer_and_stay_unambiguous() {
        let a = customer_tag("demo", "c-1");
        assert_eq!(a, "tq:{demo/3:c-1}");
        let k = window_key(&a, "requests", Window::Minute, None);
        assert_eq!(k, "tq:{demo/3:c-1}:requests:minute");
        let d = window_key(
            &a,
            "tokens",
            Window::Day,
            Some(datetime!(2026-11-24 00:00 UTC)),
        );
        assert_eq!(d, "tq:{demo/3:c-1}:tokens:day:1795478400000");
        // Ids that would collide without the length.
        assert_ne!(customer_tag("t", "a}:b"), customer_tag("t", "a}"));
        assert_eq!(seen_key(&a, "e1"), "tq:{demo/3:c-1}:seen:e1");
        assert_eq!(customer_of(&k, "demo").as_deref(), Some("c-1"));
        let odd = window_key(&customer_tag("demo", "a}:b{"), "m", Window::Day, None);
        assert_eq!(customer_of(&odd, "demo").as_deref(), Some("a}:b{"));
        assert_eq!(customer_of(&k, "dem"), None);
        assert_eq!(customer_of("tq:{demo/9:c-1}:x", "demo"), None);
    }

    #[test]
    fn fixed_windows_align_to_utc_and_the_billing_anchor() {
        let at = datetime!(2026-11-24 15:47:12 UTC);
        assert_eq!(
            fixed_bounds(Window::Hour, at, None),
            Some((
                datetime!(2026-11-24 15:00 UTC),
                datetime!(2026-11-24 16:00 UTC)
            ))
        );
        assert_eq!(
            fixed_bounds(Window::Day, at, None),
            Some((
                datetime!(2026-11-24 00:00 UTC),
                datetime!(2026-11-25 00:00 UTC)
            ))
        );
        let billing = Billing {
            anchor: datetime!(2026-01-31 09:30 UTC),
            interval: Interval::Monthly,
        };
        assert_eq!(
            fixed_bounds(Window::BillingPeriod, at, Some(billing)),
            Some((
                datetime!(2026-10-31 09:30 UTC),
                datetime!(2026-11-30 09:30 UTC)
            ))
        );
        assert_eq!(fixed_bounds(Window::BillingPeriod, at, None), None);
        assert_eq!(fixed_bounds(Window::Minute, at, None), None);
    }

    #[test]
    fn applied_builds_one_rule_per_window() {
        let at = datetime!(2026-11-24 15:47:12 UTC);
        let limits = [
            (Window::Minute, Decimal::from(600)),
            (Window::Day, Decimal::from(1_000)),
        ];
        let out = applied("tq:{d/1:c}", "requests", &limits, 0, at, None);
        assert_eq!(out.len(), 2);
        assert_eq!(out[0].rule, Rule::Rate(Gcra::new(600, 60_000_000)));
        assert_eq!(
            out[1].rule,
            Rule::Fixed(Fixed {
                limit: 1_000,
                end: micros(datetime!(2026-11-25 00:00 UTC))
            })
        );
        assert_eq!(
            out[1].expire_at_ms,
            millis(datetime!(2026-11-25 00:00 UTC)) + COUNTER_GRACE_MS
        );
    }

    #[test]
    fn amounts_are_whole_units_of_the_scale() {
        let d = |s: &str| s.parse::<Decimal>().expect("decimal");
        assert_eq!(amount_units(d("12"), 0), Ok(12));
        assert_eq!(amount_units(d("1.25"), 2), Ok(125));
        assert!(amount_units(d("1.5"), 0)
            .expect_err("refused")
            .contains("whole number"));
        assert!(amount_units(d("1.255"), 2)
            .expect_err("refused")
            .contains("at most 2 decimal places"));
        assert!(amount_units(d("-1"), 0)
            .expect_err("refused")
            .contains("negative"));
        assert!(amount_units(d("9007199254740993"), 0)
            .expect_err("refused")
            .contains("too large"));
        assert_eq!(limit_units(d("10.9"), 0), 10);
        assert_eq!(limit_units(d("-3"), 0), 0);
        assert_eq!(from_units(125, 2), d("1.25"));
        assert_eq!(event_units(d("0.2"), 0), Some(1), "rounded up");
        assert_eq!(event_units(d("3"), 1), Some(30));
    }
}
