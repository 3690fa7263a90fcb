//! Currencies the rater bills in, with their ISO 4217 minor-unit exponents.

use std::fmt;

/// An ISO 4217 currency whose minor unit the rater knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Currency {
    code: &'static str,
    exponent: u32,
}

/// ISO 4217 code → digits after the decimal point of its minor unit. A currency missing here
/// is refused rather than guessed: a wrong exponent rounds every invoice wrongly.
const KNOWN: &[(&str, u32)] = &[
    ("AED", 2),
    ("ARS", 2),
    ("AUD", 2),
    ("BGN", 2),
    ("BHD", 3),
    ("BRL", 2),
    ("CAD", 2),
    ("CHF", 2),
    ("CLP", 0),
    ("CNY", 2),
    ("COP", 2),
    ("CZK", 2),
    ("DKK", 2),
    ("EGP", 2),
    ("EUR", 2),
    ("GBP", 2),
    ("HKD", 2),
    ("HUF", 2),
    ("IDR", 2),
    ("ILS", 2),
    ("INR", 2),
    ("ISK", 0),
    ("JOD", 3),
    ("JPY", 0),
    ("KES", 2),
    ("KRW", 0),
    ("KWD", 3),
    ("MXN", 2),
    ("MYR", 2),
    ("NGN", 2),
    ("NOK", 2),
    ("NZD", 2),
    ("OMR", 3),
    ("PHP", 2),
    ("PKR", 2),
    ("PLN", 2),
    ("PYG", 0),
    ("RON", 2),
    ("SAR", 2),
    ("SEK", 2),
    ("SGD", 2),
    ("THB", 2),
    ("TND", 3),
    ("TRY", 2),
    ("TWD", 2),
    ("UAH", 2),
    ("UGX", 0),
    ("USD", 2),
    ("VND", 0),
    ("XAF", 0),
    ("XOF", 0),
    ("ZAR", 2),
];

impl Currency {
    /// The currency with this ISO 4217 code (capitals: `USD`), if known.
    pub fn from_code(code: &str) -> Option<Currency> {
        KNOWN
            .binary_search_by(|(c, _)| (*c).cmp(code))
            .ok()
            .map(|i| Currency {
                code: KNOWN[i].0,
                exponent: KNOWN[i].1,
            })
    }

    pub fn code(self) -> &'static str {
        self.code
    }

    /// Digits after the decimal point of the minor unit: 2 for USD (cents), 0 for JPY.
    pub fn minor_unit_exponent(self) -> u32 {
        self.exponent
    }
}

impl fmt::Display for Currency {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.code)
    }
}

impl<'de> serde::Deserialize<'de> for Currency {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Currency, D::Error> {
        let code = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        Currency::from_code(&code)
            .ok_or_else(|| serde::de::Error::custom(format!("unknown currency {code:?}")))
    }
}

impl serde::Serialize for Currency {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.code)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_is_sorted_and_unique() {
        assert!(KNOWN.windows(2).all(|w| w[0].0 < w[1].0));
        assert!(KNOWN
            .iter()
            .all(|(c, e)| c.len() == 3 && c.bytes().all(|b| b.is_ascii_uppercase()) && *e <= 3));
    }

    #[test]
    fn knows_the_usual_exponents() {
        let exp = |c: &str| Currency::from_code(c).map(Currency::minor_unit_exponent);
        assert_eq!(exp("USD"), Some(2));
        assert_eq!(exp("EUR"), Some(2));
        assert_eq!(exp("GBP"), Some(2));
        assert_eq!(exp("JPY"), Some(0));
        assert_eq!(exp("KWD"), Some(3));
        assert_eq!(exp("usd"), None);
        assert_eq!(exp("XXX"), None);
        assert_eq!(exp(""), None);
    }
}
