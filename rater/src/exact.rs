//! Exact decimal arithmetic. `Decimal`'s own operators round a result that needs more than
//! 28 decimal places or 96 bits of mantissa; these refuse it instead, so an amount is either
//! exact or an error. Rounding happens only where the invoice rules say (`round_money`,
//! `mul_ratio_round`).

use rust_decimal::{Decimal, RoundingStrategy};

use crate::error::{Error, Result};

/// The largest scale a `Decimal` holds.
const MAX_SCALE: u32 = 28;

fn pow10(n: u32) -> Option<i128> {
    10i128.checked_pow(n)
}

/// `mantissa × 10^-scale`, dropping trailing zeros when that is what makes it fit.
fn from_parts(mut mantissa: i128, mut scale: u32) -> Option<Decimal> {
    loop {
        if scale <= MAX_SCALE {
            if let Ok(d) = Decimal::try_from_i128_with_scale(mantissa, scale) {
                return Some(d);
            }
        }
        if scale == 0 || mantissa % 10 != 0 {
            return None;
        }
        mantissa /= 10;
        scale -= 1;
    }
}

pub(crate) fn mul(a: Decimal, b: Decimal, what: &'static str) -> Result<Decimal> {
    a.mantissa()
        .checked_mul(b.mantissa())
        .and_then(|m| from_parts(m, a.scale() + b.scale()))
        .ok_or(Error::Overflow { what })
}

pub(crate) fn add(a: Decimal, b: Decimal, what: &'static str) -> Result<Decimal> {
    let scale = a.scale().max(b.scale());
    let aligned = |d: Decimal| pow10(scale - d.scale()).and_then(|p| d.mantissa().checked_mul(p));
    aligned(a)
        .zip(aligned(b))
        .and_then(|(x, y)| x.checked_add(y))
        .and_then(|m| from_parts(m, scale))
        .ok_or(Error::Overflow { what })
}

pub(crate) fn sub(a: Decimal, b: Decimal, what: &'static str) -> Result<Decimal> {
    add(a, -b, what)
}

/// `x` rounded half away from zero to `dp` decimal places, shown with exactly `dp` places.
pub(crate) fn round_money(x: Decimal, dp: u32, what: &'static str) -> Result<Decimal> {
    let r = x.round_dp_with_strategy(dp, RoundingStrategy::MidpointAwayFromZero);
    pow10(dp.saturating_sub(r.scale()))
        .and_then(|p| r.mantissa().checked_mul(p))
        .filter(|_| dp <= MAX_SCALE)
        .and_then(|m| Decimal::try_from_i128_with_scale(m, dp).ok())
        .ok_or(Error::Overflow { what })
}

/// `x × num ÷ den` rounded half away from zero to `dp` places, computed on integers so the
/// only rounding is the final one (a proration ratio is rarely a terminating decimal).
/// Requires `num ≥ 0`, `den > 0`.
pub(crate) fn mul_ratio_round(
    x: Decimal,
    num: i128,
    den: i128,
    dp: u32,
    what: &'static str,
) -> Result<Decimal> {
    let overflow = Error::Overflow { what };
    if num < 0 || den <= 0 || dp > MAX_SCALE {
        return Err(overflow);
    }
    let g = gcd(num, den);
    let (num, den) = (num / g, den / g);
    let e = x.scale();
    // x × num / den × 10^dp = a / (c × den)
    let (a, c) = if dp >= e {
        let a = pow10(dp - e)
            .and_then(|p| x.mantissa().checked_mul(num)?.checked_mul(p))
            .ok_or(Error::Overflow { what })?;
        (a, 1u128)
    } else {
        let a = x
            .mantissa()
            .checked_mul(num)
            .ok_or(Error::Overflow { what })?;
        let c = pow10(e - dp).ok_or(Error::Overflow { what })?;
        (a, c as u128)
    };
    // round(a / (c·den)) = floor((2a + c·den) / (2c·den)) = floor((floor(2a/c) + den) / 2den),
    // which never forms c·den.
    let den = den as u128;
    let q = a
        .unsigned_abs()
        .checked_mul(2)
        .map(|two_a| two_a / c)
        .and_then(|t| t.checked_add(den))
        .and_then(|t| den.checked_mul(2).map(|d| t / d))
        .and_then(|q| i128::try_from(q).ok())
        .ok_or(Error::Overflow { what })?;
    let q = if a < 0 { -q } else { q };
    Decimal::try_from_i128_with_scale(q, dp).map_err(|_| overflow)
}

fn gcd(mut a: i128, mut b: i128) -> i128 {
    while b != 0 {
        (a, b) = (b, a % b);
    }
    a.abs().max(1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn d(s: &str) -> Decimal {
        Decimal::from_str_exact(s).expect("decimal literal")
    }

    #[test]
    fn mul_and_add_are_exact_or_refused() {
        assert_eq!(
            mul(d("0.0015"), d("1234.5"), "t").expect("fits"),
            d("1.85175")
        );
        assert_eq!(
            add(d("0.1"), d("0.0000000000000000000000000001"), "t").expect("fits"),
            d("0.1000000000000000000000000001")
        );
        // Decimal's `*` would round this to 28 places; we refuse.
        let tiny = d("0.0000000000000001");
        assert!(mul(tiny, d("0.0000000000000003"), "t").is_err());
        assert!(mul(Decimal::MAX, d("2"), "t").is_err());
        assert!(add(Decimal::MAX, d("1"), "t").is_err());
        assert!(add(d("10000000000000000000000000000"), d("0.1"), "t").is_err());
        // Trailing zeros are dropped when that is what makes a product fit.
        assert_eq!(
            mul(
                d("0.10000000000000000000"),
                d("0.10000000000000000000"),
                "t"
            )
            .expect("fits"),
            d("0.01")
        );
        assert_eq!(sub(d("1"), d("1.5"), "t").expect("fits"), d("-0.5"));
    }

    #[test]
    fn round_money_is_half_away_from_zero_with_fixed_places() {
        assert_eq!(
            round_money(d("1.005"), 2, "t").expect("ok").to_string(),
            "1.01"
        );
        assert_eq!(
            round_money(d("1.0049"), 2, "t").expect("ok").to_string(),
            "1.00"
        );
        assert_eq!(
            round_money(d("-1.005"), 2, "t").expect("ok").to_string(),
            "-1.01"
        );
        assert_eq!(round_money(d("2.5"), 0, "t").expect("ok").to_string(), "3");
        assert_eq!(
            round_money(d("7"), 3, "t").expect("ok").to_string(),
            "7.000"
        );
    }

    #[test]
    fn ratio_rounding_is_exact() {
        // 10.00 × 1/3 = 3.333… → 3.33; × 2/3 = 6.666… → 6.67
        assert_eq!(
            mul_ratio_round(d("10.00"), 1, 3, 2, "t").expect("ok"),
            d("3.33")
        );
        assert_eq!(
            mul_ratio_round(d("10.00"), 2, 3, 2, "t").expect("ok"),
            d("6.67")
        );
        // Exactly on the midpoint: 0.01 × 1/2 = 0.005 → 0.01, and away from zero below it.
        assert_eq!(
            mul_ratio_round(d("0.01"), 1, 2, 2, "t").expect("ok"),
            d("0.01")
        );
        assert_eq!(
            mul_ratio_round(d("-0.01"), 1, 2, 2, "t").expect("ok"),
            d("-0.01")
        );
        // Just under a midpoint by far less than Decimal's 28th digit still rounds down.
        let den = 1_000_000_000_000_000_000_000_000_000_000i128;
        let num = den / 2 - 1;
        assert_eq!(
            mul_ratio_round(d("0.01"), num, den, 2, "t").expect("ok"),
            d("0.00")
        );
        assert_eq!(
            mul_ratio_round(d("49"), 7, 7, 2, "t")
                .expect("ok")
                .to_string(),
            "49.00"
        );
        assert!(mul_ratio_round(d("1"), 1, 0, 2, "t").is_err());
        assert!(mul_ratio_round(Decimal::MAX, 3, 1, 2, "t").is_err());
    }

    proptest! {
        #[test]
        fn ratio_rounding_agrees_with_decimal_when_the_ratio_terminates(
            m in -1_000_000_000_000i64..1_000_000_000_000,
            scale in 0u32..8,
            num in 0i64..10_000,
            den_exp in 0u32..10,
            dp in 0u32..6,
        ) {
            let x = Decimal::new(m, scale);
            let den = 2i128.pow(den_exp) * 5i128.pow(den_exp / 2);
            let exact = x * Decimal::from(num) / Decimal::from_i128_with_scale(den, 0);
            let want = exact.round_dp_with_strategy(dp, RoundingStrategy::MidpointAwayFromZero);
            let got = mul_ratio_round(x, i128::from(num), den, dp, "t").expect("fits");
            prop_assert_eq!(got, want);
            prop_assert_eq!(got.scale(), dp);
        }

        #[test]
        fn add_and_mul_match_decimal_where_it_is_exact(
            a in -1_000_000_000i64..1_000_000_000, sa in 0u32..10,
            b in -1_000_000_000i64..1_000_000_000, sb in 0u32..10,
        ) {
            let (x, y) = (Decimal::new(a, sa), Decimal::new(b, sb));
            prop_assert_eq!(add(x, y, "t").expect("fits"), x + y);
            prop_assert_eq!(mul(x, y, "t").expect("fits"), x * y);
        }
    }
}
