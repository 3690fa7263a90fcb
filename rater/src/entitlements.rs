//! Entitlements: what a plan version lets a subscriber use.
//!
//! They are read from the plan version each time they are asked for, never copied into
//! subscriptions: moving a million subscriptions to a new version changes one pointer each,
//! and `diff` tells which features and limits that move changed (what Stigg's "dynamic
//! entitlements" do for migrations, `seeds/003`).

use std::collections::BTreeMap;
use std::fmt;

use rust_decimal::Decimal;
use serde::Serialize;

use crate::plan::PlanVersion;

/// The window a usage limit counts over.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Window {
    Second,
    Minute,
    Hour,
    Day,
    /// The subscription's current billing period.
    BillingPeriod,
}

impl Window {
    /// The window named as in plan files.
    pub fn from_name(name: &str) -> Option<Window> {
        match name {
            "second" => Some(Window::Second),
            "minute" => Some(Window::Minute),
            "hour" => Some(Window::Hour),
            "day" => Some(Window::Day),
            "billing_period" => Some(Window::BillingPeriod),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Window::Second => "second",
            Window::Minute => "minute",
            Window::Hour => "hour",
            Window::Day => "day",
            Window::BillingPeriod => "billing_period",
        }
    }
}

impl fmt::Display for Window {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// At most `limit` units of `meter` per `window`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Limit {
    pub meter: String,
    pub window: Window,
    pub limit: Decimal,
}

/// A plan version's entitlements, borrowed from it.
#[derive(Debug, Clone, Copy)]
pub struct Entitlements<'a> {
    features: &'a BTreeMap<String, bool>,
    limits: &'a [Limit],
}

impl<'a> Entitlements<'a> {
    pub fn of(plan: &'a PlanVersion) -> Entitlements<'a> {
        Entitlements {
            features: plan.features(),
            limits: plan.limits(),
        }
    }

    /// Whether the feature is on; a feature the plan does not name is off.
    pub fn feature(&self, name: &str) -> bool {
        self.features.get(name).copied().unwrap_or(false)
    }

    /// Features as declared, by name.
    pub fn features(&self) -> &'a BTreeMap<String, bool> {
        self.features
    }

    /// The limit on `meter` per `window`; `None` means unlimited.
    pub fn limit(&self, meter: &str, window: Window) -> Option<Decimal> {
        self.limits
            .iter()
            .find(|l| l.meter == meter && l.window == window)
            .map(|l| l.limit)
    }

    /// Limits in plan-file order.
    pub fn limits(&self) -> &'a [Limit] {
        self.limits
    }
}

/// A feature switched on or off.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct FeatureChange {
    pub feature: String,
    pub old: bool,
    pub new: bool,
}

/// A limit added (`old` none), removed (`new` none: now unlimited) or changed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct LimitChange {
    pub meter: String,
    pub window: Window,
    pub old: Option<Decimal>,
    pub new: Option<Decimal>,
}

/// What moving a subscription from one plan version to another changes.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize)]
pub struct EntitlementDiff {
    /// Sorted by feature name.
    pub features: Vec<FeatureChange>,
    /// Sorted by meter, then window from shortest to longest.
    pub limits: Vec<LimitChange>,
}

impl EntitlementDiff {
    pub fn is_empty(&self) -> bool {
        self.features.is_empty() && self.limits.is_empty()
    }
}

/// Features whose effective value differs (an absent feature counts as off) and limits whose
/// value differs numerically (`100` and `100.0` are the same limit).
pub fn diff(old: &Entitlements<'_>, new: &Entitlements<'_>) -> EntitlementDiff {
    let mut names: Vec<&str> = old
        .features
        .keys()
        .chain(new.features.keys())
        .map(String::as_str)
        .collect();
    names.sort_unstable();
    names.dedup();
    let features = names
        .into_iter()
        .filter_map(|name| {
            let (o, n) = (old.feature(name), new.feature(name));
            (o != n).then(|| FeatureChange {
                feature: name.to_owned(),
                old: o,
                new: n,
            })
        })
        .collect();

    let mut keys: Vec<(&str, Window)> = old
        .limits
        .iter()
        .chain(new.limits)
        .map(|l| (l.meter.as_str(), l.window))
        .collect();
    keys.sort_unstable();
    keys.dedup();
    let limits = keys
        .into_iter()
        .filter_map(|(meter, window)| {
            let (o, n) = (old.limit(meter, window), new.limit(meter, window));
            (o != n).then(|| LimitChange {
                meter: meter.to_owned(),
                window,
                old: o,
                new: n,
            })
        })
        .collect();
    EntitlementDiff { features, limits }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn plan(file: &str, text: &str) -> PlanVersion {
        PlanVersion::parse(Path::new(file), text.as_bytes()).expect("valid plan")
    }

    const HEAD: &str = "currency = \"USD\"\ninterval = \"monthly\"\n";

    #[test]
    fn reads_features_and_limits() {
        let p = plan(
            "p/a/v1.toml",
            &format!(
                "plan = \"a\"\nversion = 1\n{HEAD}\
                 [entitlements]\nfeatures = {{ sso = true, audit_log = false }}\n\
                 [[entitlements.limits]]\nmeter = \"requests\"\nwindow = \"minute\"\nlimit = \"600\"\n"
            ),
        );
        let e = Entitlements::of(&p);
        assert!(e.feature("sso"));
        assert!(!e.feature("audit_log"));
        assert!(!e.feature("never_declared"));
        assert_eq!(
            e.limit("requests", Window::Minute),
            Some(Decimal::from(600))
        );
        assert_eq!(e.limit("requests", Window::Hour), None);
        assert_eq!(e.limits().len(), 1);
    }

    #[test]
    fn diff_reports_effective_changes_only() {
        let old = plan(
            "p/a/v1.toml",
            &format!(
                "plan = \"a\"\nversion = 1\n{HEAD}\
                 [entitlements]\nfeatures = {{ sso = false, export = true, beta = false }}\n\
                 [[entitlements.limits]]\nmeter = \"requests\"\nwindow = \"minute\"\nlimit = \"600\"\n\
                 [[entitlements.limits]]\nmeter = \"tokens\"\nwindow = \"day\"\nlimit = \"100\"\n\
                 [[entitlements.limits]]\nmeter = \"storage_gb\"\nwindow = \"billing_period\"\nlimit = \"10\"\n"
            ),
        );
        let new = plan(
            "p/a/v2.toml",
            &format!(
                "plan = \"a\"\nversion = 2\n{HEAD}\
                 [entitlements]\nfeatures = {{ sso = true, export = true }}\n\
                 [[entitlements.limits]]\nmeter = \"tokens\"\nwindow = \"day\"\nlimit = \"100.0\"\n\
                 [[entitlements.limits]]\nmeter = \"requests\"\nwindow = \"minute\"\nlimit = \"1200\"\n\
                 [[entitlements.limits]]\nmeter = \"requests\"\nwindow = \"second\"\nlimit = \"50\"\n"
            ),
        );
        let d = diff(&Entitlements::of(&old), &Entitlements::of(&new));
        assert_eq!(
            d.features,
            [FeatureChange {
                feature: "sso".into(),
                old: false,
                new: true
            }]
        );
        let limits: Vec<_> = d
            .limits
            .iter()
            .map(|c| (c.meter.as_str(), c.window, c.old, c.new))
            .collect();
        assert_eq!(
            limits,
            [
                ("requests", Window::Second, None, Some(Decimal::from(50))),
                (
                    "requests",
                    Window::Minute,
                    Some(Decimal::from(600)),
                    Some(Decimal::from(1200))
                ),
                (
                    "storage_gb",
                    Window::BillingPeriod,
                    Some(Decimal::from(10)),
                    None
                ),
            ]
        );
        assert!(diff(&Entitlements::of(&new), &Entitlements::of(&new)).is_empty());
    }
}
