//! Meters: which events they read, how they aggregate, and which dimensions they group by.

use std::collections::HashSet;

use serde::Deserialize;

/// How a meter folds the values of its events within a window.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Aggregation {
    Sum,
    Count,
    Min,
    Max,
    /// Exact count of distinct values (billing-grade, not an estimate).
    UniqueCount,
    /// The value of the event with the latest event time.
    Latest,
}

impl Aggregation {
    /// The name as configuration spells it.
    pub fn name(self) -> &'static str {
        match self {
            Self::Sum => "SUM",
            Self::Count => "COUNT",
            Self::Min => "MIN",
            Self::Max => "MAX",
            Self::UniqueCount => "UNIQUE_COUNT",
            Self::Latest => "LATEST",
        }
    }

    /// Whether the value field must be a decimal number (every aggregation but COUNT and
    /// UNIQUE_COUNT, which count events or distinct identifiers).
    pub fn needs_number(self) -> bool {
        matches!(self, Self::Sum | Self::Min | Self::Max | Self::Latest)
    }

    pub fn needs_value(self) -> bool {
        self != Self::Count
    }
}

/// One meter, as declared in configuration.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Meter {
    /// Stable key used in rollups, queries and plans (`[a-z0-9_]`, 1–64 characters).
    pub key: String,
    /// The event `type` this meter reads.
    pub event_type: String,
    pub aggregation: Aggregation,
    /// Path of the value inside `data`, dot-separated (`tokens`, `usage.input_tokens`).
    /// Required for every aggregation but COUNT.
    #[serde(default)]
    pub value: Option<String>,
    /// Paths inside `data` whose string values the rollups group by.
    #[serde(default)]
    pub group_by: Vec<String>,
    /// Free text for dashboards.
    #[serde(default)]
    pub description: String,
}

impl Meter {
    /// Where this meter's rollups are stored: its key and a fingerprint of its definition.
    /// Changing what a meter reads or how it aggregates gives it new, empty rollups that
    /// `tally-aggregator rebuild` fills from the raw events; the old ones stay untouched.
    pub fn storage_key(&self) -> String {
        use sha2::{Digest, Sha256};
        let definition = format!(
            "{}\u{1f}{}\u{1f}{}\u{1f}{}",
            self.event_type,
            self.aggregation.name(),
            self.value.as_deref().unwrap_or(""),
            self.group_by.join("\u{1e}")
        );
        let digest = Sha256::digest(definition.as_bytes());
        format!("{}@{}", self.key, hex::encode(&digest[..4]))
    }
}

/// A configuration mistake in the meter catalog.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("meter {meter:?}: {field}: {reason}")]
pub struct CatalogError {
    pub meter: String,
    pub field: &'static str,
    pub reason: String,
}

/// The validated set of meters, indexed by event type.
#[derive(Debug, Clone, Default)]
pub struct Catalog {
    meters: Vec<Meter>,
    /// Looked up once or twice per event on the collector and the aggregator: hashbrown's
    /// default hasher, not SipHash (type names are the operator's, not the sender's).
    by_type: hashbrown::HashMap<String, Vec<usize>>,
}

impl Catalog {
    pub fn new(meters: Vec<Meter>) -> Result<Catalog, CatalogError> {
        let mut keys = HashSet::new();
        let mut by_type: hashbrown::HashMap<String, Vec<usize>> = hashbrown::HashMap::new();
        for (i, m) in meters.iter().enumerate() {
            let err = |field, reason: &str| CatalogError {
                meter: m.key.clone(),
                field,
                reason: reason.to_owned(),
            };
            let key_ok = (1..=64).contains(&m.key.len())
                && m.key
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_');
            if !key_ok {
                return Err(err("key", "must be 1-64 characters of a-z, 0-9 and _"));
            }
            if !keys.insert(m.key.as_str()) {
                return Err(err("key", "declared twice"));
            }
            if m.event_type.is_empty() {
                return Err(err("event_type", "must not be empty"));
            }
            match (&m.value, m.aggregation.needs_value()) {
                (None, true) => return Err(err("value", "required for this aggregation")),
                (Some(_), false) => return Err(err("value", "COUNT takes no value field")),
                (Some(p), _) if !valid_path(p) => {
                    return Err(err(
                        "value",
                        "must be a dot-separated path of non-empty names",
                    ))
                }
                _ => {}
            }
            let mut dims = HashSet::new();
            for d in &m.group_by {
                if !valid_path(d) {
                    return Err(err(
                        "group_by",
                        "each must be a dot-separated path of non-empty names",
                    ));
                }
                if !dims.insert(d) {
                    return Err(err("group_by", "dimension listed twice"));
                }
            }
            by_type.entry(m.event_type.clone()).or_default().push(i);
        }
        Ok(Catalog { meters, by_type })
    }

    pub fn meters(&self) -> &[Meter] {
        &self.meters
    }

    pub fn meter(&self, key: &str) -> Option<&Meter> {
        self.meters.iter().find(|m| m.key == key)
    }

    /// The meters that read events of this type (empty for an unknown type).
    pub fn meters_for_type(&self, event_type: &str) -> impl Iterator<Item = &Meter> {
        self.by_type
            .get(event_type)
            .into_iter()
            .flatten()
            .map(|&i| &self.meters[i])
    }

    pub fn knows_type(&self, event_type: &str) -> bool {
        self.by_type.contains_key(event_type)
    }
}

fn valid_path(p: &str) -> bool {
    !p.is_empty() && p.split('.').all(|s| !s.is_empty())
}

/// Looks a dot-separated path up inside an event's `data`.
pub fn lookup<'a>(
    data: &'a serde_json::Map<String, serde_json::Value>,
    path: &str,
) -> Option<&'a serde_json::Value> {
    let mut parts = path.split('.');
    let mut cur = data.get(parts.next()?)?;
    for p in parts {
        cur = cur.as_object()?.get(p)?;
    }
    Some(cur)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meter(key: &str, agg: Aggregation, value: Option<&str>) -> Meter {
        Meter {
            key: key.into(),
            event_type: "t".into(),
            aggregation: agg,
            value: value.map(Into::into),
            group_by: vec![],
            description: String::new(),
        }
    }

    #[test]
    fn indexes_meters_by_type() {
        let mut a = meter("a", Aggregation::Count, None);
        a.event_type = "x".into();
        let b = meter("b", Aggregation::Sum, Some("v"));
        let c = meter("c", Aggregation::Max, Some("v"));
        let cat = Catalog::new(vec![a, b, c]).expect("valid");
        let keys: Vec<_> = cat.meters_for_type("t").map(|m| m.key.as_str()).collect();
        assert_eq!(keys, ["b", "c"]);
        assert!(cat.knows_type("x"));
        assert!(!cat.knows_type("y"));
        assert_eq!(cat.meters_for_type("y").count(), 0);
    }

    #[test]
    fn refuses_bad_declarations() {
        let cases = [
            (vec![meter("A", Aggregation::Count, None)], "key"),
            (
                vec![
                    meter("a", Aggregation::Count, None),
                    meter("a", Aggregation::Count, None),
                ],
                "key",
            ),
            (vec![meter("a", Aggregation::Sum, None)], "value"),
            (vec![meter("a", Aggregation::Count, Some("v"))], "value"),
            (vec![meter("a", Aggregation::Sum, Some("v..w"))], "value"),
        ];
        for (meters, field) in cases {
            let e = Catalog::new(meters).expect_err("invalid");
            assert_eq!(e.field, field, "{e}");
        }
        let mut m = meter("a", Aggregation::Count, None);
        m.group_by = vec!["x".into(), "x".into()];
        assert_eq!(Catalog::new(vec![m]).expect_err("dup").field, "group_by");
    }

    #[test]
    fn storage_keys_follow_the_definition_not_the_description() {
        let a = meter("tokens", Aggregation::Sum, Some("tokens"));
        let mut described = a.clone();
        described.description = "LLM tokens".into();
        assert_eq!(a.storage_key(), described.storage_key());
        assert!(
            a.storage_key().starts_with("tokens@") && a.storage_key().len() == "tokens@".len() + 8
        );
        let mut grouped = a.clone();
        grouped.group_by = vec!["model".into()];
        let mut other_value = a.clone();
        other_value.value = Some("usage.tokens".into());
        let mut other_agg = a.clone();
        other_agg.aggregation = Aggregation::Max;
        for changed in [grouped, other_value, other_agg] {
            assert_ne!(a.storage_key(), changed.storage_key());
        }
    }

    #[test]
    fn looks_up_nested_paths() {
        let data = serde_json::json!({"a": {"b": 3}, "c": 1});
        let data = data.as_object().expect("object");
        assert_eq!(lookup(data, "a.b"), Some(&serde_json::json!(3)));
        assert_eq!(lookup(data, "c"), Some(&serde_json::json!(1)));
        assert_eq!(lookup(data, "c.d"), None);
        assert_eq!(lookup(data, "z"), None);
    }
}
