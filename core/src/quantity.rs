//! Exact decimal quantities, the same representation as ClickHouse's `Decimal(38, 9)`.
//!
//! A meter value is an integer number of nano-units held in an `i128`: 38 significant
//! digits, 9 of them after the point. Parsing never rounds: a value with more than nine
//! decimal places or more than 29 integer digits is refused, so what the collector accepts
//! is exactly what the rollups sum.

use std::fmt;
use std::str::FromStr;

/// Digits after the decimal point.
pub const SCALE: u32 = 9;
const UNIT: i128 = 1_000_000_000;
/// Exclusive bound of the magnitude in nano-units: 38 digits.
const LIMIT: i128 = 100_000_000_000_000_000_000_000_000_000_000_000_000;

/// An exact decimal with 9 fractional digits, in range of `Decimal(38, 9)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Quantity(i128);

/// Why a string is not a valid quantity.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum QuantityError {
    #[error("not a decimal number")]
    Syntax,
    #[error("more than {SCALE} decimal places")]
    TooPrecise,
    #[error("out of range (at most 29 integer digits)")]
    OutOfRange,
}

impl Quantity {
    pub const ZERO: Quantity = Quantity(0);
    pub const ONE: Quantity = Quantity(UNIT);

    /// The value in nano-units (the raw `Decimal(38, 9)` integer).
    pub fn nanos(self) -> i128 {
        self.0
    }

    /// Builds a quantity from nano-units, if in range.
    pub fn from_nanos(nanos: i128) -> Option<Quantity> {
        (nanos > -LIMIT && nanos < LIMIT).then_some(Quantity(nanos))
    }

    pub fn from_int(n: i64) -> Quantity {
        Quantity(i128::from(n) * UNIT)
    }

    pub fn checked_add(self, other: Quantity) -> Option<Quantity> {
        self.0.checked_add(other.0).and_then(Quantity::from_nanos)
    }

    pub fn is_negative(self) -> bool {
        self.0 < 0
    }
}

impl FromStr for Quantity {
    type Err = QuantityError;

    /// Accepts JSON number syntax (`-12.5`, `3e6`, `0.000000001`), with leading zeros allowed.
    fn from_str(s: &str) -> Result<Quantity, QuantityError> {
        let bytes = s.as_bytes();
        let (negative, rest) = match bytes.first() {
            Some(b'-') => (true, &bytes[1..]),
            _ => (false, bytes),
        };
        let int_len = rest.iter().take_while(|b| b.is_ascii_digit()).count();
        let (int_digits, rest) = rest.split_at(int_len);
        let (frac_digits, rest) = match rest.first() {
            Some(b'.') => {
                let n = rest[1..].iter().take_while(|b| b.is_ascii_digit()).count();
                if n == 0 {
                    return Err(QuantityError::Syntax);
                }
                (&rest[1..=n], &rest[n + 1..])
            }
            _ => (&rest[..0], rest),
        };
        if int_digits.is_empty() {
            return Err(QuantityError::Syntax);
        }
        let exponent = match rest.first() {
            None => 0i64,
            Some(b'e' | b'E') => parse_exponent(&rest[1..])?,
            Some(_) => return Err(QuantityError::Syntax),
        };

        // value = D × 10^(exponent − |frac|), D being all digits as one integer.
        let digits = int_digits.iter().chain(frac_digits.iter());
        let significant: Vec<u8> = digits.copied().skip_while(|&d| d == b'0').collect();
        let trailing = significant.iter().rev().take_while(|&&d| d == b'0').count();
        let significant = &significant[..significant.len() - trailing];
        if significant.is_empty() {
            return Ok(Quantity::ZERO);
        }
        // Power of ten that turns D (without trailing zeros) into nano-units.
        let shift = exponent
            .saturating_sub(frac_digits.len() as i64)
            .saturating_add(trailing as i64)
            .saturating_add(i64::from(SCALE));
        if shift < 0 {
            return Err(QuantityError::TooPrecise);
        }
        if significant.len() as i64 + shift > 38 {
            return Err(QuantityError::OutOfRange);
        }
        let mut nanos: i128 = 0;
        for &d in significant {
            nanos = nanos * 10 + i128::from(d - b'0');
        }
        for _ in 0..shift {
            nanos *= 10;
        }
        Ok(Quantity(if negative { -nanos } else { nanos }))
    }
}

fn parse_exponent(bytes: &[u8]) -> Result<i64, QuantityError> {
    let (negative, digits) = match bytes.first() {
        Some(b'-') => (true, &bytes[1..]),
        Some(b'+') => (false, &bytes[1..]),
        _ => (false, bytes),
    };
    if digits.is_empty() || !digits.iter().all(u8::is_ascii_digit) {
        return Err(QuantityError::Syntax);
    }
    // Saturate: any exponent past a few hundred is out of range or too precise anyway.
    let mut e: i64 = 0;
    for &d in digits {
        e = (e * 10 + i64::from(d - b'0')).min(1_000_000);
    }
    Ok(if negative { -e } else { e })
}

impl fmt::Display for Quantity {
    /// Shortest exact form: `1.5`, `-3`, `0.000000001`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let sign = if self.0 < 0 { "-" } else { "" };
        let abs = self.0.unsigned_abs();
        let int = abs / UNIT as u128;
        let frac = abs % UNIT as u128;
        if frac == 0 {
            write!(f, "{sign}{int}")
        } else {
            let frac = format!("{frac:09}");
            write!(f, "{sign}{int}.{}", frac.trim_end_matches('0'))
        }
    }
}

impl serde::Serialize for Quantity {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn q(s: &str) -> Result<Quantity, QuantityError> {
        s.parse()
    }

    #[test]
    fn parses_plain_and_exponent_forms() {
        assert_eq!(q("0"), Ok(Quantity::ZERO));
        assert_eq!(q("-0"), Ok(Quantity::ZERO));
        assert_eq!(q("1"), Ok(Quantity::ONE));
        assert_eq!(q("1.5").map(Quantity::nanos), Ok(1_500_000_000));
        assert_eq!(q("-2.25").map(Quantity::nanos), Ok(-2_250_000_000));
        assert_eq!(q("0.000000001").map(Quantity::nanos), Ok(1));
        assert_eq!(q("1e3"), Ok(Quantity::from_int(1000)));
        assert_eq!(q("1E+3"), Ok(Quantity::from_int(1000)));
        assert_eq!(q("25e-1").map(Quantity::nanos), Ok(2_500_000_000));
        assert_eq!(q("1e-9").map(Quantity::nanos), Ok(1));
        assert_eq!(q("0.10000000000000000000"), q("0.1"));
        assert_eq!(q("007"), Ok(Quantity::from_int(7)));
        assert_eq!(q("0e999999999999"), Ok(Quantity::ZERO));
    }

    #[test]
    fn refuses_rounding_and_overflow() {
        assert_eq!(q("0.0000000001"), Err(QuantityError::TooPrecise));
        assert_eq!(q("1e-10"), Err(QuantityError::TooPrecise));
        assert_eq!(q("1e29"), Err(QuantityError::OutOfRange));
        assert!(q("99999999999999999999999999999.999999999").is_ok());
        assert_eq!(
            q("100000000000000000000000000000"),
            Err(QuantityError::OutOfRange)
        );
        assert_eq!(q("1e400"), Err(QuantityError::OutOfRange));
        assert_eq!(q("1e99999999999999999999"), Err(QuantityError::OutOfRange));
        assert_eq!(q("1e-99999999999999999999"), Err(QuantityError::TooPrecise));
    }

    #[test]
    fn refuses_bad_syntax() {
        for s in [
            "", "-", ".5", "5.", "1e", "1e+", "abc", "1.2.3", "+1", " 1", "1 ", "NaN", "0x10", "١",
        ] {
            assert_eq!(q(s), Err(QuantityError::Syntax), "{s:?}");
        }
    }

    #[test]
    fn displays_shortest_exact_form() {
        assert_eq!(
            Quantity::from_nanos(1_500_000_000).map(|q| q.to_string()),
            Some("1.5".into())
        );
        assert_eq!(
            Quantity::from_nanos(-1).map(|q| q.to_string()),
            Some("-0.000000001".into())
        );
        assert_eq!(Quantity::ZERO.to_string(), "0");
        assert_eq!(Quantity::from_int(-42).to_string(), "-42");
    }

    #[test]
    fn checked_add_stays_in_range() {
        let max = Quantity::from_nanos(LIMIT - 1).expect("max in range");
        assert_eq!(max.checked_add(Quantity::from_nanos(1).expect("1")), None);
        assert_eq!(
            Quantity::ONE.checked_add(Quantity::ONE),
            Some(Quantity::from_int(2))
        );
    }

    proptest! {
        #[test]
        fn display_then_parse_is_identity(n in -LIMIT + 1..LIMIT) {
            let v = Quantity(n);
            prop_assert_eq!(v.to_string().parse::<Quantity>(), Ok(v));
        }

        #[test]
        fn exponent_shifts_agree_with_plain_form(int in 0u64..1_000_000, frac in 0u32..1000, e in 0i64..6) {
            let plain: Quantity = format!("{int}.{frac:03}").parse().expect("plain");
            let shifted: Quantity = format!("{int}{frac:03}e-3").parse().expect("shifted");
            prop_assert_eq!(plain, shifted);
            let scaled: Quantity = format!("{int}.{frac:03}e{e}").parse().expect("scaled");
            prop_assert_eq!(scaled.nanos(), plain.nanos() * 10i128.pow(e as u32));
        }

        #[test]
        fn never_panics(s in "\\PC{0,40}") {
            let _ = s.parse::<Quantity>();
        }
    }
}
