//! The plan catalog, as code: one immutable TOML file per plan version.
//!
//! Layout: `<dir>/<plan>/v<N>.toml`, versions of a plan contiguous from `v1`. A published
//! version is never edited; a change is a new version. Each version carries the SHA-256 of
//! its file so a store can refuse a published version whose content changed.
//!
//! ```toml
//! plan = "pro"
//! version = 2
//! currency = "USD"          # ISO 4217; amounts round to its minor unit
//! interval = "monthly"      # or "yearly"
//! minimum = "50.00"         # optional commitment per invoice
//!
//! [[charges]]
//! id = "platform"
//! type = "flat"             # a recurring fee per interval, prorated
//! price = "29.00"
//!
//! [[charges]]
//! id = "api-requests"
//! type = "usage"
//! meter = "requests"
//! included = "100000"       # optional free units per period
//! minimum = "5.00"          # optional commitment for this charge
//! model = "graduated"       # per_unit { price } | package { size, price }
//! tiers = [                 #   | graduated { tiers } | volume { tiers }
//!   { up_to = "1000000", unit_price = "0.0002" },
//!   { unit_price = "0.0001", flat_fee = "0" },
//! ]
//!
//! [entitlements]
//! features = { sso = true }
//! [[entitlements.limits]]
//! meter = "requests"
//! window = "minute"         # second | minute | hour | day | billing_period
//! limit = "6000"
//! ```
//!
//! Amounts, quantities and bounds are TOML strings parsed as exact decimals (integers are
//! accepted too); a TOML float is refused, since it has already lost exactness.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;
use std::ops::Range;
use std::path::{Path, PathBuf};

use rust_decimal::Decimal;
use serde::Deserialize;
use sha2::{Digest, Sha256};
use toml::de::{DeTable, DeValue};

use crate::currency::Currency;
use crate::entitlements::{Limit, Window};
use crate::error::{Error, Result};
use crate::period::Interval;
use crate::pricing::{Model, Tier};

/// Every plan version under a folder, validated.
#[derive(Debug, Clone, Default)]
pub struct Catalog {
    /// Plan name → its versions, `v1` first.
    plans: BTreeMap<String, Vec<PlanVersion>>,
}

/// One immutable version of a plan.
#[derive(Debug, Clone)]
pub struct PlanVersion {
    file: PathBuf,
    plan: String,
    version: u32,
    currency: Currency,
    interval: Interval,
    minimum: Option<Decimal>,
    charges: Vec<Charge>,
    features: BTreeMap<String, bool>,
    limits: Vec<Limit>,
    digest: String,
}

/// One charge of a plan version; its id is unique within the version.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Charge {
    pub id: String,
    pub kind: ChargeKind,
}

#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum ChargeKind {
    /// A recurring fee per billing interval, prorated over partial periods.
    Flat {
        price: Decimal,
    },
    Usage(UsageCharge),
}

/// A charge on the quantity of one meter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UsageCharge {
    pub meter: String,
    pub model: Model,
    /// Free units per full period, deducted before the model applies.
    pub included: Decimal,
    /// Least amount this charge bills per full period.
    pub minimum: Option<Decimal>,
}

impl Catalog {
    /// Loads every `<plan>/v<N>.toml` under `dir`. Names starting with `.` are skipped;
    /// anything else that does not fit the layout is an error, as is any invalid version.
    pub fn load_dir(dir: impl AsRef<Path>) -> Result<Catalog> {
        let dir = dir.as_ref();
        let mut plans = BTreeMap::new();
        for (name, path) in entries(dir)? {
            if !path.is_dir() {
                return Err(layout(
                    &path,
                    "expected a folder per plan, holding v<N>.toml files",
                ));
            }
            if !valid_name(&name) {
                return Err(layout(
                    &path,
                    "plan names must be 1-64 characters of a-z, 0-9, _ and -",
                ));
            }
            let mut files = BTreeMap::new();
            for (file_name, file) in entries(&path)? {
                match version_of(&file_name) {
                    Some(n) if file.is_file() => {
                        files.insert(n, file);
                    }
                    _ => return Err(layout(&file, "expected only files named v<N>.toml")),
                }
            }
            if files.is_empty() {
                return Err(layout(&path, "no versions (expected v1.toml)"));
            }
            let mut versions = Vec::with_capacity(files.len());
            for (expected, (n, file)) in (1u32..).zip(files) {
                if n != expected {
                    return Err(layout(
                        &path,
                        &format!("versions must run from v1 without gaps: v{expected} is missing"),
                    ));
                }
                let bytes = std::fs::read(&file).map_err(|source| Error::Read {
                    path: file.clone(),
                    source,
                })?;
                versions.push(PlanVersion::parse(&file, &bytes)?);
            }
            plans.insert(name, versions);
        }
        if plans.is_empty() {
            return Err(layout(dir, "no plans (expected <plan>/v1.toml)"));
        }
        Ok(Catalog { plans })
    }

    pub fn version(&self, plan: &str, version: u32) -> Option<&PlanVersion> {
        let i = usize::try_from(version.checked_sub(1)?).ok()?;
        self.plans.get(plan)?.get(i)
    }

    pub fn latest(&self, plan: &str) -> Option<&PlanVersion> {
        self.plans.get(plan)?.last()
    }

    /// A plan's versions, `v1` first; empty for an unknown plan.
    pub fn versions(&self, plan: &str) -> &[PlanVersion] {
        self.plans.get(plan).map_or(&[], Vec::as_slice)
    }

    /// Plan names, sorted.
    pub fn plans(&self) -> impl Iterator<Item = &str> {
        self.plans.keys().map(String::as_str)
    }
}

impl PlanVersion {
    /// Parses and validates one version file. `file` must end in `<plan>/v<N>.toml`: the
    /// plan and version it names must be the ones the file states. Reads nothing.
    pub fn parse(file: &Path, bytes: &[u8]) -> Result<PlanVersion> {
        let (plan, version) = identity(file)?;
        let err = |field: &str, reason: String| Error::Plan {
            file: file.to_path_buf(),
            plan: plan.clone(),
            version,
            field: field.to_owned(),
            reason,
        };
        let text =
            std::str::from_utf8(bytes).map_err(|e| err("file", format!("not UTF-8 ({e})")))?;
        let raw = parse_toml(text).map_err(|(field, reason)| err(&field, reason))?;
        let mut v = PlanVersion::validate(raw, &plan, version)
            .map_err(|(field, reason)| err(&field, reason))?;
        v.file = file.to_path_buf();
        v.digest = hex::encode(Sha256::digest(bytes));
        Ok(v)
    }

    /// Parses one plan file on its own, as `tally-rater price` reads it. A file laid out as
    /// in a catalog (`<plan>/v<N>.toml`) is checked as [`PlanVersion::parse`] checks it;
    /// any other file is the plan and version it states.
    pub fn parse_standalone(file: &Path, bytes: &[u8]) -> Result<PlanVersion> {
        if identity(file).is_ok() {
            return PlanVersion::parse(file, bytes);
        }
        let err = |plan: &str, version: u32, field: &str, reason: String| Error::Plan {
            file: file.to_path_buf(),
            plan: plan.to_owned(),
            version,
            field: field.to_owned(),
            reason,
        };
        let text = std::str::from_utf8(bytes)
            .map_err(|e| err("?", 0, "file", format!("not UTF-8 ({e})")))?;
        let raw = parse_toml(text).map_err(|(field, reason)| err("?", 0, &field, reason))?;
        let (plan, version) = (raw.plan.clone(), raw.version);
        if !valid_name(&plan) {
            return Err(err(
                &plan,
                version,
                "plan",
                "must be 1-64 characters of a-z, 0-9, _ and -".into(),
            ));
        }
        if version == 0 {
            return Err(err(&plan, version, "version", "must be 1 or more".into()));
        }
        let mut v = PlanVersion::validate(raw, &plan, version)
            .map_err(|(field, reason)| err(&plan, version, &field, reason))?;
        v.file = file.to_path_buf();
        v.digest = hex::encode(Sha256::digest(bytes));
        Ok(v)
    }

    fn validate(raw: PlanFile, plan: &str, version: u32) -> Result<PlanVersion, Problem> {
        if raw.plan != plan {
            return problem(
                "plan",
                format!("{:?} does not match the folder name {plan:?}", raw.plan),
            );
        }
        if raw.version != version {
            return problem(
                "version",
                format!(
                    "{} does not match the file name v{version}.toml",
                    raw.version
                ),
            );
        }
        let currency = Currency::from_code(&raw.currency).ok_or_else(|| {
            (
                "currency".to_owned(),
                format!(
                    "unknown currency {:?} (an ISO 4217 code in capitals, e.g. \"USD\")",
                    raw.currency
                ),
            )
        })?;
        let interval = Interval::from_name(&raw.interval).ok_or_else(|| {
            (
                "interval".to_owned(),
                format!("must be \"monthly\" or \"yearly\" (got {:?})", raw.interval),
            )
        })?;
        let minimum = raw
            .minimum
            .map(|m| non_negative("minimum", m.0))
            .transpose()?;

        let mut charges = Vec::with_capacity(raw.charges.len());
        let mut ids: HashMap<String, usize> = HashMap::new();
        for (i, c) in raw.charges.into_iter().enumerate() {
            let at = |field: &str| format!("charges[{i}].{field}");
            if !valid_name(&c.id) {
                return problem(
                    &at("id"),
                    "must be 1-64 characters of a-z, 0-9, _ and -".into(),
                );
            }
            if let Some(first) = ids.insert(c.id.clone(), i) {
                return problem(
                    &at("id"),
                    format!("{:?} is already the id of charges[{first}]", c.id),
                );
            }
            charges.push(Charge {
                id: c.id.clone(),
                kind: c
                    .into_kind()
                    .map_err(|(field, reason)| (at(&field), reason))?,
            });
        }

        let mut limits: Vec<Limit> = Vec::with_capacity(raw.entitlements.limits.len());
        for (i, l) in raw.entitlements.limits.into_iter().enumerate() {
            let at = |field: &str| format!("entitlements.limits[{i}].{field}");
            check_meter(&l.meter).map_err(|reason| (at("meter"), reason))?;
            let window = Window::from_name(&l.window).ok_or_else(|| {
                (
                    at("window"),
                    format!(
                        "must be second, minute, hour, day or billing_period (got {:?})",
                        l.window
                    ),
                )
            })?;
            let limit = non_negative(&at("limit"), l.limit.0)?;
            if let Some(j) = limits
                .iter()
                .position(|o| o.meter == l.meter && o.window == window)
            {
                return problem(
                    &at("window"),
                    format!(
                        "{:?} per {window} is already limited by entitlements.limits[{j}]",
                        l.meter
                    ),
                );
            }
            limits.push(Limit {
                meter: l.meter,
                window,
                limit,
            });
        }
        for name in raw.entitlements.features.keys() {
            if !valid_name(name) {
                return problem(
                    &format!("entitlements.features.{name}"),
                    "feature names must be 1-64 characters of a-z, 0-9, _ and -".into(),
                );
            }
        }

        Ok(PlanVersion {
            file: PathBuf::new(),
            plan: raw.plan,
            version: raw.version,
            currency,
            interval,
            minimum,
            charges,
            features: raw.entitlements.features,
            limits,
            digest: String::new(),
        })
    }

    pub fn plan(&self) -> &str {
        &self.plan
    }

    pub fn version(&self) -> u32 {
        self.version
    }

    /// The file this version was read from.
    pub fn file(&self) -> &Path {
        &self.file
    }

    pub fn currency(&self) -> Currency {
        self.currency
    }

    pub fn interval(&self) -> Interval {
        self.interval
    }

    /// Commitment per invoice (full period), if any.
    pub fn minimum(&self) -> Option<Decimal> {
        self.minimum
    }

    /// Charges in file order, which is invoice-line order.
    pub fn charges(&self) -> &[Charge] {
        &self.charges
    }

    /// The meters this version's usage charges read, each once, in charge order: what the
    /// caller must supply usage for.
    pub fn meters(&self) -> impl Iterator<Item = &str> {
        let mut seen = HashSet::new();
        self.charges.iter().filter_map(move |c| match &c.kind {
            ChargeKind::Usage(u) if seen.insert(u.meter.as_str()) => Some(u.meter.as_str()),
            _ => None,
        })
    }

    pub fn features(&self) -> &BTreeMap<String, bool> {
        &self.features
    }

    pub fn limits(&self) -> &[Limit] {
        &self.limits
    }

    /// Lowercase hex SHA-256 of the file's bytes.
    pub fn digest(&self) -> &str {
        &self.digest
    }
}

/// A field path inside the file and what is wrong with it.
type Problem = (String, String);

fn problem<T>(field: &str, reason: String) -> Result<T, Problem> {
    Err((field.to_owned(), reason))
}

fn non_negative(field: &str, d: Decimal) -> Result<Decimal, Problem> {
    if d.is_sign_negative() && !d.is_zero() {
        problem(field, format!("must not be negative (got {d})"))
    } else {
        Ok(d)
    }
}

fn check_meter(meter: &str) -> Result<(), String> {
    if meter.is_empty() {
        return Err("must not be empty".into());
    }
    let ok = meter.len() <= 64
        && meter
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_');
    if ok {
        Ok(())
    } else {
        Err(format!(
            "{meter:?} is not a meter key (1-64 characters of a-z, 0-9 and _)"
        ))
    }
}

/// Plan names, charge ids and feature names.
fn valid_name(s: &str) -> bool {
    (1..=64).contains(&s.len())
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-')
}

fn layout(path: &Path, reason: &str) -> Error {
    Error::Layout {
        path: path.to_path_buf(),
        reason: reason.to_owned(),
    }
}

/// A folder's entries as (name, path), sorted, without names starting with `.`.
fn entries(dir: &Path) -> Result<Vec<(String, PathBuf)>> {
    let read = |source| Error::Read {
        path: dir.to_path_buf(),
        source,
    };
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(read)? {
        let path = entry.map_err(read)?.path();
        let name = path
            .file_name()
            .and_then(|n| n.to_str())
            .ok_or_else(|| layout(&path, "file names must be UTF-8"))?
            .to_owned();
        if !name.starts_with('.') {
            out.push((name, path));
        }
    }
    out.sort();
    Ok(out)
}

/// `v12.toml` → 12; no leading zeros, no v0.
fn version_of(file_name: &str) -> Option<u32> {
    let digits = file_name.strip_prefix('v')?.strip_suffix(".toml")?;
    let ok = !digits.is_empty()
        && !digits.starts_with('0')
        && digits.bytes().all(|b| b.is_ascii_digit());
    ok.then(|| digits.parse().ok()).flatten()
}

/// The plan and version a file's path names (`…/<plan>/v<N>.toml`).
fn identity(file: &Path) -> Result<(String, u32)> {
    let version = file
        .file_name()
        .and_then(|n| n.to_str())
        .and_then(version_of)
        .ok_or_else(|| layout(file, "plan files must be named v<N>.toml"))?;
    let plan = file
        .parent()
        .and_then(Path::file_name)
        .and_then(|n| n.to_str())
        .filter(|n| valid_name(n))
        .ok_or_else(|| {
            layout(
                file,
                "plan files must sit in a folder named after the plan (1-64 characters of a-z, 0-9, _ and -)",
            )
        })?;
    Ok((plan.to_owned(), version))
}

/// Parses the text into the file's shape; errors name the field path or the line.
fn parse_toml(text: &str) -> Result<PlanFile, Problem> {
    let table = DeTable::parse(text).map_err(|e| {
        let field = e
            .span()
            .map_or_else(|| "toml".to_owned(), |s| line_col(text, s.start));
        (field, e.message().to_owned())
    })?;
    PlanFile::deserialize(toml::de::Deserializer::from(table)).map_err(|e| {
        let path = match (e.span(), DeTable::parse(text)) {
            (Some(span), Ok(table)) => field_at(table.get_ref(), &span),
            _ => String::new(),
        };
        let message = e.message().trim_end();
        match message
            .strip_prefix("missing field `")
            .and_then(|m| m.strip_suffix('`'))
        {
            Some(missing) if path.is_empty() => (missing.to_owned(), "required".to_owned()),
            Some(missing) => (format!("{path}.{missing}"), "required".to_owned()),
            None if path.is_empty() => ("toml".to_owned(), message.to_owned()),
            None => (path, message.to_owned()),
        }
    })
}

fn line_col(text: &str, offset: usize) -> String {
    let before = text.get(..offset).unwrap_or(text);
    let line = before.matches('\n').count() + 1;
    let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    format!("line {line}, column {column}")
}

/// The path (`charges[1].tiers[0].up_to`) of the innermost key or value whose source span
/// covers `span`.
fn field_at(root: &DeTable<'_>, span: &Range<usize>) -> String {
    fn covers(outer: Range<usize>, inner: &Range<usize>) -> bool {
        outer.start <= inner.start && inner.end <= outer.end
    }
    fn table(
        t: &DeTable<'_>,
        prefix: &str,
        span: &Range<usize>,
        best: &mut Option<(usize, String)>,
    ) {
        for (k, v) in t.iter() {
            let path = if prefix.is_empty() {
                k.get_ref().to_string()
            } else {
                format!("{prefix}.{}", k.get_ref())
            };
            for s in [k.span(), v.span()] {
                if covers(s.clone(), span) && best.as_ref().is_none_or(|(len, _)| s.len() <= *len) {
                    *best = Some((s.len(), path.clone()));
                }
            }
            value(v.get_ref(), &path, span, best);
        }
    }
    fn value(v: &DeValue<'_>, path: &str, span: &Range<usize>, best: &mut Option<(usize, String)>) {
        match v {
            DeValue::Table(t) => table(t, path, span, best),
            DeValue::Array(a) => {
                for (i, e) in a.iter().enumerate() {
                    let path = format!("{path}[{i}]");
                    let s = e.span();
                    if covers(s.clone(), span)
                        && best.as_ref().is_none_or(|(len, _)| s.len() <= *len)
                    {
                        *best = Some((s.len(), path.clone()));
                    }
                    value(e.get_ref(), &path, span, best);
                }
            }
            _ => {}
        }
    }
    let mut best = None;
    table(root, "", span, &mut best);
    best.map(|(_, path)| path).unwrap_or_default()
}

/// A plan version file as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PlanFile {
    /// Plan name; must be the name of the folder the file is in.
    plan: String,
    /// Version number; must be the one in the file name (`v<version>.toml`).
    version: u32,
    /// ISO 4217 code of every amount in the plan (`USD`).
    currency: String,
    /// Billing interval: `monthly` or `yearly`.
    interval: String,
    /// Least amount an invoice bills per full period; a shortfall is a top-up line.
    #[serde(default)]
    minimum: Option<Dec>,
    /// Charges, in the order their lines appear on invoices.
    #[serde(default)]
    charges: Vec<ChargeFile>,
    /// Features and usage limits of the plan.
    #[serde(default)]
    entitlements: EntitlementsFile,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ChargeFile {
    /// Identifies the charge on invoice lines; unique within the version.
    id: String,
    /// `flat` (a recurring fee) or `usage` (priced on a meter).
    #[serde(rename = "type")]
    kind: String,
    /// Usage: the meter key whose quantity is priced.
    #[serde(default)]
    meter: Option<String>,
    /// Usage: `per_unit`, `package`, `graduated` or `volume`.
    #[serde(default)]
    model: Option<String>,
    /// Flat: the fee per interval. Per-unit: price of one unit. Package: price of a block.
    #[serde(default)]
    price: Option<Dec>,
    /// Package: units per block.
    #[serde(default)]
    size: Option<Dec>,
    /// Graduated and volume: the tiers, bounds increasing, the last one open-ended.
    #[serde(default)]
    tiers: Option<Vec<TierFile>>,
    /// Usage: free units per full period, deducted before the model applies.
    #[serde(default)]
    included: Option<Dec>,
    /// Usage: least amount this charge bills per full period.
    #[serde(default)]
    minimum: Option<Dec>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TierFile {
    /// Inclusive upper bound of the tier; omitted on the last tier.
    #[serde(default)]
    up_to: Option<Dec>,
    /// Price of each unit priced in this tier.
    unit_price: Dec,
    /// Fee charged once when the tier is reached (graduated) or is the total's (volume).
    #[serde(default)]
    flat_fee: Option<Dec>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct EntitlementsFile {
    /// Feature name → on or off; a feature not named is off.
    #[serde(default)]
    features: BTreeMap<String, bool>,
    /// Usage limits per meter and window.
    #[serde(default)]
    limits: Vec<LimitFile>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct LimitFile {
    /// Meter key the limit counts.
    meter: String,
    /// `second`, `minute`, `hour`, `day` or `billing_period`.
    window: String,
    /// Most units allowed per window.
    limit: Dec,
}

impl ChargeFile {
    /// Checks which fields the charge's type and model allow and require. Field names in
    /// problems are relative to the charge.
    fn into_kind(self) -> Result<ChargeKind, Problem> {
        let forbid = |field: &str, present: bool, context: &str| {
            if present {
                problem(field, format!("not allowed {context}"))
            } else {
                Ok(())
            }
        };
        let require = |field: &str, value: Option<Dec>, context: &str| {
            value
                .map(|d| d.0)
                .ok_or_else(|| (field.to_owned(), format!("required {context}")))
        };
        match self.kind.as_str() {
            "flat" => {
                let ctx = "on a flat charge";
                forbid("meter", self.meter.is_some(), ctx)?;
                forbid("model", self.model.is_some(), ctx)?;
                forbid("size", self.size.is_some(), ctx)?;
                forbid("tiers", self.tiers.is_some(), ctx)?;
                forbid("included", self.included.is_some(), ctx)?;
                forbid("minimum", self.minimum.is_some(), ctx)?;
                let price = non_negative("price", require("price", self.price, ctx)?)?;
                Ok(ChargeKind::Flat { price })
            }
            "usage" => {
                let meter = self
                    .meter
                    .ok_or_else(|| ("meter".to_owned(), "required on a usage charge".to_owned()))?;
                check_meter(&meter).map_err(|reason| ("meter".to_owned(), reason))?;
                let model_name = self
                    .model
                    .ok_or_else(|| ("model".to_owned(), "required on a usage charge".to_owned()))?;
                let ctx = format!("with model {model_name:?}");
                let tiers = |tiers: Option<Vec<TierFile>>| {
                    tiers
                        .ok_or_else(|| ("tiers".to_owned(), format!("required {ctx}")))
                        .map(|ts| {
                            ts.into_iter()
                                .map(|t| Tier {
                                    up_to: t.up_to.map(|d| d.0),
                                    unit_price: t.unit_price.0,
                                    flat_fee: t.flat_fee.map_or(Decimal::ZERO, |d| d.0),
                                })
                                .collect()
                        })
                };
                let model = match model_name.as_str() {
                    "per_unit" => {
                        forbid("size", self.size.is_some(), &ctx)?;
                        forbid("tiers", self.tiers.is_some(), &ctx)?;
                        Model::PerUnit {
                            price: require("price", self.price, &ctx)?,
                        }
                    }
                    "package" => {
                        forbid("tiers", self.tiers.is_some(), &ctx)?;
                        Model::Package {
                            size: require("size", self.size, &ctx)?,
                            price: require("price", self.price, &ctx)?,
                        }
                    }
                    "graduated" | "volume" => {
                        forbid("price", self.price.is_some(), &ctx)?;
                        forbid("size", self.size.is_some(), &ctx)?;
                        let tiers = tiers(self.tiers)?;
                        if model_name == "graduated" {
                            Model::Graduated { tiers }
                        } else {
                            Model::Volume { tiers }
                        }
                    }
                    other => {
                        return problem(
                            "model",
                            format!(
                                "must be per_unit, package, graduated or volume (got {other:?})"
                            ),
                        )
                    }
                };
                model.check().map_err(|e| match e {
                    Error::InvalidModel { field, reason } => (field, reason),
                    other => ("model".to_owned(), other.to_string()),
                })?;
                let included = self
                    .included
                    .map(|d| non_negative("included", d.0))
                    .transpose()?
                    .unwrap_or(Decimal::ZERO);
                let minimum = self
                    .minimum
                    .map(|d| non_negative("minimum", d.0))
                    .transpose()?;
                Ok(ChargeKind::Usage(UsageCharge {
                    meter,
                    model,
                    included,
                    minimum,
                }))
            }
            other => problem(
                "type",
                format!("must be \"flat\" or \"usage\" (got {other:?})"),
            ),
        }
    }
}

/// A decimal as a plan file writes it: a string (`"0.0015"`) or an integer, never a float.
#[derive(Debug, Clone, Copy)]
struct Dec(Decimal);

impl<'de> Deserialize<'de> for Dec {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Dec, D::Error> {
        struct Visitor;
        impl serde::de::Visitor<'_> for Visitor {
            type Value = Dec;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a decimal number as a string, e.g. \"0.0015\"")
            }
            fn visit_str<E: serde::de::Error>(self, s: &str) -> Result<Dec, E> {
                let plain = !s.is_empty()
                    && s.bytes()
                        .all(|b| b.is_ascii_digit() || b == b'.' || b == b'-');
                Decimal::from_str_exact(s)
                    .ok()
                    .filter(|_| plain)
                    .map(Dec)
                    .ok_or_else(|| {
                        E::custom(format!(
                            "{s:?} is not a decimal number (digits, an optional - and ., at most 28 decimal places)"
                        ))
                    })
            }
            fn visit_i64<E: serde::de::Error>(self, n: i64) -> Result<Dec, E> {
                Ok(Dec(Decimal::from(n)))
            }
            fn visit_u64<E: serde::de::Error>(self, n: u64) -> Result<Dec, E> {
                Ok(Dec(Decimal::from(n)))
            }
            fn visit_f64<E: serde::de::Error>(self, x: f64) -> Result<Dec, E> {
                Err(E::custom(format!(
                    "{x} is a TOML float, which is not exact: quote decimal numbers (\"{x}\")"
                )))
            }
        }
        d.deserialize_any(Visitor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dec(s: &str) -> Decimal {
        Decimal::from_str_exact(s).expect("decimal literal")
    }

    const GOOD: &str = r#"
plan = "pro"
version = 2
currency = "USD"
interval = "monthly"
minimum = "50.00"

[[charges]]
id = "platform"
type = "flat"
price = "29.00"

[[charges]]
id = "api"
type = "usage"
meter = "requests"
included = "1000"
minimum = "5"
model = "graduated"
tiers = [
  { up_to = "1000", unit_price = "0.01" },
  { up_to = 10000, unit_price = "0.005", flat_fee = "1" },
  { unit_price = "0.001" },
]

[[charges]]
id = "storage"
type = "usage"
meter = "storage_gb"
model = "package"
size = "10"
price = "1.50"

[entitlements]
features = { sso = true }
"#;

    /// Parses `GOOD` with `from` replaced by `to` (the first occurrence).
    fn edited(from: &str, to: &str) -> String {
        assert!(GOOD.contains(from), "{from:?} not in the sample");
        let err = PlanVersion::parse(
            Path::new("plans/pro/v2.toml"),
            GOOD.replacen(from, to, 1).as_bytes(),
        )
        .expect_err("invalid");
        err.to_string()
    }

    #[test]
    fn parses_a_valid_version() {
        let v = PlanVersion::parse(Path::new("plans/pro/v2.toml"), GOOD.as_bytes()).expect("valid");
        assert_eq!((v.plan(), v.version()), ("pro", 2));
        assert_eq!(v.currency().code(), "USD");
        assert_eq!(v.interval(), Interval::Monthly);
        assert_eq!(v.minimum(), Some(dec("50.00")));
        assert_eq!(v.charges().len(), 3);
        assert_eq!(v.meters().collect::<Vec<_>>(), ["requests", "storage_gb"]);
        match &v.charges()[1].kind {
            ChargeKind::Usage(u) => {
                assert_eq!(u.included, dec("1000"));
                assert_eq!(u.minimum, Some(dec("5")));
                let Model::Graduated { tiers } = &u.model else {
                    panic!("graduated expected")
                };
                assert_eq!(tiers[1].up_to, Some(dec("10000")));
                assert_eq!(tiers[1].flat_fee, dec("1"));
                assert_eq!(tiers[2].up_to, None);
            }
            other => panic!("usage expected, got {other:?}"),
        }
        assert_eq!(v.digest(), hex::encode(Sha256::digest(GOOD.as_bytes())));
        assert!(v.features()["sso"]);
    }

    #[test]
    fn errors_name_file_plan_version_and_field() {
        let cases = [
            // Tier bounds.
            (
                r#"{ up_to = 10000, unit_price"#,
                r#"{ up_to = "100", unit_price"#,
                "charges[1].tiers[1].up_to: tier bounds must increase (got 100 after 1000)",
            ),
            (
                r#"{ unit_price = "0.001" }"#,
                r#"{ up_to = "20000", unit_price = "0.001" }"#,
                "charges[1].tiers[2].up_to: the last tier must be open-ended (got 20000); remove up_to",
            ),
            (
                r#"{ up_to = "1000", unit_price = "0.01" }"#,
                r#"{ unit_price = "0.01" }"#,
                "charges[1].tiers[0].up_to: only the last tier may be open-ended",
            ),
            (
                r#"{ up_to = "1000", unit_price = "0.01" }"#,
                r#"{ up_to = "0", unit_price = "0.01" }"#,
                "charges[1].tiers[0].up_to: tier bounds must be positive (got 0)",
            ),
            // Prices, sizes, allowances, minimums.
            (
                r#"unit_price = "0.01""#,
                r#"unit_price = "-0.01""#,
                "charges[1].tiers[0].unit_price: must not be negative (got -0.01)",
            ),
            (
                r#"flat_fee = "1""#,
                r#"flat_fee = "-1""#,
                "charges[1].tiers[1].flat_fee: must not be negative (got -1)",
            ),
            (
                r#"price = "29.00""#,
                r#"price = "-29.00""#,
                "charges[0].price: must not be negative (got -29.00)",
            ),
            (
                r#"size = "10""#,
                r#"size = "0""#,
                "charges[2].size: must be positive (got 0)",
            ),
            (
                r#"included = "1000""#,
                r#"included = "-1""#,
                "charges[1].included: must not be negative (got -1)",
            ),
            (
                r#"minimum = "5""#,
                r#"minimum = "-5""#,
                "charges[1].minimum: must not be negative (got -5)",
            ),
            (
                r#"minimum = "50.00""#,
                r#"minimum = "-50.00""#,
                "minimum: must not be negative (got -50.00)",
            ),
            // Ids and meters.
            (
                r#"id = "storage""#,
                r#"id = "api""#,
                "charges[2].id: \"api\" is already the id of charges[1]",
            ),
            (
                r#"id = "storage""#,
                r#"id = "Storage Fee""#,
                "charges[2].id: must be 1-64 characters of a-z, 0-9, _ and -",
            ),
            (
                r#"meter = "requests""#,
                r#"meter = """#,
                "charges[1].meter: must not be empty",
            ),
            (
                r#"meter = "requests""#,
                r#"meter = "Requests""#,
                "charges[1].meter: \"Requests\" is not a meter key (1-64 characters of a-z, 0-9 and _)",
            ),
            // Types, models and the fields they take.
            (
                r#"type = "flat""#,
                r#"type = "fixed""#,
                "charges[0].type: must be \"flat\" or \"usage\" (got \"fixed\")",
            ),
            (
                r#"model = "package""#,
                r#"model = "tiered""#,
                "charges[2].model: must be per_unit, package, graduated or volume (got \"tiered\")",
            ),
            (
                r#"model = "package""#,
                r#"model = "per_unit""#,
                "charges[2].size: not allowed with model \"per_unit\"",
            ),
            (
                r#"size = "10""#,
                "",
                "charges[2].size: required with model \"package\"",
            ),
            (
                r#"price = "29.00""#,
                "meter = \"requests\"\nprice = \"29.00\"",
                "charges[0].meter: not allowed on a flat charge",
            ),
            (
                r#"meter = "storage_gb""#,
                "",
                "charges[2].meter: required on a usage charge",
            ),
            // Header fields.
            (
                r#"currency = "USD""#,
                r#"currency = "usd""#,
                "currency: unknown currency \"usd\" (an ISO 4217 code in capitals, e.g. \"USD\")",
            ),
            (
                r#"currency = "USD""#,
                r#"currency = "XYZ""#,
                "currency: unknown currency \"XYZ\" (an ISO 4217 code in capitals, e.g. \"USD\")",
            ),
            (
                r#"interval = "monthly""#,
                r#"interval = "weekly""#,
                "interval: must be \"monthly\" or \"yearly\" (got \"weekly\")",
            ),
            (
                "version = 2",
                "version = 3",
                "version: 3 does not match the file name v2.toml",
            ),
            (
                r#"plan = "pro""#,
                r#"plan = "pro2""#,
                "plan: \"pro2\" does not match the folder name \"pro\"",
            ),
            // What serde refuses, with the path found from the source span.
            (
                r#"price = "1.50""#,
                "price = 1.5",
                "charges[2].price: 1.5 is a TOML float, which is not exact: quote decimal numbers (\"1.5\")",
            ),
            (
                r#"{ unit_price = "0.001" }"#,
                r#"{ unit_price = "0.001", colour = "red" }"#,
                "charges[1].tiers[2].colour: unknown field `colour`, expected one of `up_to`, `unit_price`, `flat_fee`",
            ),
            (
                r#"{ unit_price = "0.001" }"#,
                r#"{ }"#,
                "charges[1].tiers[2].unit_price: required",
            ),
            (
                r#"currency = "USD""#,
                "",
                "currency: required",
            ),
            (
                r#"size = "10""#,
                r#"size = "ten""#,
                "charges[2].size: \"ten\" is not a decimal number (digits, an optional - and ., at most 28 decimal places)",
            ),
            (
                r#"size = "10""#,
                r#"size = "1e3""#,
                "charges[2].size: \"1e3\" is not a decimal number (digits, an optional - and ., at most 28 decimal places)",
            ),
            (
                "interval = \"monthly\"\n",
                "interval = \"monthly\"\ntimezone = \"UTC\"\n",
                "timezone: unknown field `timezone`, expected one of `plan`, `version`, `currency`, `interval`, `minimum`, `charges`, `entitlements`",
            ),
            (
                "features = { sso = true }",
                "features = { sso = \"yes\" }",
                "entitlements.features.sso: invalid type: string \"yes\", expected a boolean",
            ),
            (
                "plan = \"pro\"",
                "plan = \"pro",
                "line 2, column 12: invalid basic string, expected `\"`",
            ),
        ];
        for (from, to, want) in cases {
            assert_eq!(
                edited(from, to),
                format!("plans/pro/v2.toml: plan \"pro\" v2: {want}"),
                "{to}"
            );
        }
    }

    #[test]
    fn entitlement_errors_name_the_field() {
        let with = |limits: &str| edited("[entitlements]", &format!("{limits}\n[entitlements]"));
        let limit = |meter: &str, window: &str, value: &str| {
            format!("[[entitlements.limits]]\nmeter = \"{meter}\"\nwindow = \"{window}\"\nlimit = \"{value}\"\n")
        };
        let prefix = "plans/pro/v2.toml: plan \"pro\" v2: ";
        assert_eq!(
            with(&limit("requests", "week", "1")),
            format!("{prefix}entitlements.limits[0].window: must be second, minute, hour, day or billing_period (got \"week\")")
        );
        assert_eq!(
            with(&limit("requests", "day", "-1")),
            format!("{prefix}entitlements.limits[0].limit: must not be negative (got -1)")
        );
        assert_eq!(
            with(&limit("", "day", "1")),
            format!("{prefix}entitlements.limits[0].meter: must not be empty")
        );
        assert_eq!(
            with(&(limit("requests", "day", "1") + &limit("requests", "day", "2"))),
            format!("{prefix}entitlements.limits[1].window: \"requests\" per day is already limited by entitlements.limits[0]")
        );
        assert_eq!(
            edited("features = { sso = true }", "features = { \"Single Sign-On\" = true }"),
            format!("{prefix}entitlements.features.Single Sign-On: feature names must be 1-64 characters of a-z, 0-9, _ and -")
        );
    }

    #[test]
    fn file_names_must_follow_the_layout() {
        for name in [
            "plans/pro/v0.toml",
            "plans/pro/v02.toml",
            "plans/pro/2.toml",
            "plans/pro/v2.tml",
            "v2.toml",
            "plans/Pro/v2.toml",
        ] {
            let e = PlanVersion::parse(Path::new(name), GOOD.as_bytes()).expect_err(name);
            assert!(matches!(e, Error::Layout { .. }), "{name}: {e}");
        }
        let e = PlanVersion::parse(Path::new("p/pro/v2.toml"), b"\xff").expect_err("binary");
        assert!(
            e.to_string()
                .starts_with("p/pro/v2.toml: plan \"pro\" v2: file: not UTF-8"),
            "{e}"
        );
    }

    /// A fresh folder under the system temp dir, removed on drop.
    struct TempDir(PathBuf);

    impl TempDir {
        fn new(name: &str) -> TempDir {
            let dir =
                std::env::temp_dir().join(format!("tally-rater-{}-{name}", std::process::id()));
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir).expect("create temp dir");
            TempDir(dir)
        }

        fn write(&self, rel: &str, text: &str) {
            let path = self.0.join(rel);
            std::fs::create_dir_all(path.parent().expect("has parent")).expect("mkdir");
            std::fs::write(path, text).expect("write");
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn minimal(plan: &str, version: u32) -> String {
        format!(
            "plan = \"{plan}\"\nversion = {version}\ncurrency = \"EUR\"\ninterval = \"yearly\"\n"
        )
    }

    #[test]
    fn load_dir_reads_every_version() {
        let dir = TempDir::new("every-version");
        dir.write("a/v1.toml", &minimal("a", 1));
        dir.write("a/v2.toml", &minimal("a", 2));
        dir.write("b/v1.toml", &minimal("b", 1));
        dir.write("b/.v2.toml.swp", "editor junk");
        dir.write(".git-keep", "");
        let c = Catalog::load_dir(&dir.0).expect("loads");
        assert_eq!(c.plans().collect::<Vec<_>>(), ["a", "b"]);
        assert_eq!(c.versions("a").len(), 2);
        assert_eq!(c.latest("a").map(PlanVersion::version), Some(2));
        assert_eq!(c.version("a", 1).map(PlanVersion::version), Some(1));
        assert!(c.version("a", 0).is_none());
        assert!(c.version("a", 3).is_none());
        assert!(c.latest("zzz").is_none());
        assert!(c.versions("zzz").is_empty());
        assert_ne!(
            c.version("a", 1).map(PlanVersion::digest),
            c.version("a", 2).map(PlanVersion::digest)
        );
        assert_eq!(
            c.version("a", 1).map(|v| v.file().to_path_buf()),
            Some(dir.0.join("a/v1.toml"))
        );
    }

    #[test]
    fn load_dir_refuses_gaps_and_strays() {
        let dir = TempDir::new("gap");
        dir.write("a/v1.toml", &minimal("a", 1));
        dir.write("a/v3.toml", &minimal("a", 3));
        let e = Catalog::load_dir(&dir.0).expect_err("gap");
        assert_eq!(
            e.to_string(),
            format!(
                "{}: versions must run from v1 without gaps: v2 is missing",
                dir.0.join("a").display()
            )
        );

        let dir = TempDir::new("stray");
        dir.write("a/v1.toml", &minimal("a", 1));
        dir.write("a/notes.md", "");
        let e = Catalog::load_dir(&dir.0).expect_err("stray");
        assert!(
            e.to_string()
                .ends_with("notes.md: expected only files named v<N>.toml"),
            "{e}"
        );

        let dir = TempDir::new("loose");
        dir.write("a.toml", &minimal("a", 1));
        let e = Catalog::load_dir(&dir.0).expect_err("loose file");
        assert!(
            e.to_string()
                .ends_with("a.toml: expected a folder per plan, holding v<N>.toml files"),
            "{e}"
        );

        let dir = TempDir::new("empty");
        assert!(Catalog::load_dir(&dir.0)
            .expect_err("empty")
            .to_string()
            .ends_with("no plans (expected <plan>/v1.toml)"));

        let dir = TempDir::new("bad-version");
        dir.write("a/v1.toml", &minimal("a", 1).replace("EUR", "EURO"));
        let e = Catalog::load_dir(&dir.0).expect_err("bad");
        assert_eq!(
            e.to_string(),
            format!(
                "{}: plan \"a\" v1: currency: unknown currency \"EURO\" (an ISO 4217 code in capitals, e.g. \"USD\")",
                dir.0.join("a/v1.toml").display()
            )
        );

        let e = Catalog::load_dir(dir.0.join("missing")).expect_err("missing");
        assert!(matches!(e, Error::Read { .. }), "{e}");
    }

    #[test]
    fn the_sample_plans_load() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../config/plans");
        let c = Catalog::load_dir(&dir).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(c.plans().collect::<Vec<_>>(), ["pro", "starter"]);
        assert_eq!(c.latest("pro").map(PlanVersion::version), Some(2));
        let dev_meters = ["requests", "tokens", "storage_gb", "active_users"];
        let mut used = HashSet::new();
        for plan in ["pro", "starter"] {
            for v in c.versions(plan) {
                for m in v.meters() {
                    assert!(
                        dev_meters.contains(&m),
                        "{plan} v{}: unknown meter {m}",
                        v.version()
                    );
                    used.insert(m.to_owned());
                }
            }
        }
        assert_eq!(
            used.len(),
            dev_meters.len(),
            "every dev meter is priced somewhere"
        );
    }
}
