//! Plan-version migrations, planned. Pure: no I/O.
//!
//! A migration moves every subscription of one tenant on one plan (optionally only some of
//! its versions, optionally only some customers) to a newer version of that plan. It writes
//! one `migrate` change per subscription, a pointer to the new version: prices and
//! entitlements are read from the catalog when asked for, never copied per customer
//! (`seeds/003`: Stigg's move from pre-calculated to dynamic entitlements).
//!
//! Planning takes each candidate subscription's [`Current`] state as of the migration's
//! instant (`as_of`) and decides, per customer, whether it moves and from when:
//!
//! - it moves if it is active on the plan, on a selected version other than `to_version`,
//!   and nothing is recorded for it after the instant it would move (a scheduled change or
//!   cancel would make the migrate row break the log's rules, so it is left out and counted);
//! - [`Effective::NextPeriodStart`] moves it at the start of its next billing period after
//!   `as_of` (its own anchor, its current version's interval); [`Effective::At`] at one
//!   instant for everyone.
//!
//! Subscriptions moving from the same version form a [`Group`], and what the move changes in
//! entitlements is computed once per group, not per customer.

use std::collections::BTreeMap;
use std::fmt;

use serde::Serialize;
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

use crate::entitlements::{diff, EntitlementDiff, Entitlements};
use crate::error::{Error, Result};
use crate::period::period_containing;
use crate::plan::Catalog;
use crate::subscription::ChangeKind;

/// Longest migration id, in bytes; ids are `[A-Za-z0-9._-]`.
const MAX_MIGRATION_ID: usize = 64;

/// Most customers in one notification chunk.
pub const MAX_CHUNK_CUSTOMERS: usize = 10_000;

/// When the migrated subscriptions move.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Effective {
    /// Each at the start of its own next billing period after the migration's instant: no
    /// period is split, so nobody is prorated.
    NextPeriodStart,
    /// Everyone at this instant (whole seconds).
    At(OffsetDateTime),
}

impl Effective {
    /// `next-period`, or an RFC 3339 instant; the form [`Effective::parse`] reads.
    pub fn text(&self) -> String {
        match self {
            Effective::NextPeriodStart => "next-period".to_owned(),
            Effective::At(t) => t.format(&Rfc3339).unwrap_or_else(|_| format!("{t:?}")),
        }
    }

    pub fn parse(text: &str) -> Option<Effective> {
        match text {
            "next-period" => Some(Effective::NextPeriodStart),
            _ => OffsetDateTime::parse(text, &Rfc3339)
                .ok()
                .map(|t| Effective::At(t.to_offset(time::UtcOffset::UTC))),
        }
    }
}

impl fmt::Display for Effective {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text())
    }
}

/// What to migrate. The id is the migration's idempotency key: running the same spec again
/// resumes or reports it done; the same id with another spec is refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MigrationSpec {
    pub id: String,
    pub tenant: String,
    pub plan: String,
    pub to_version: u32,
    /// Versions to move; `None`: every version older than `to_version`.
    pub from_versions: Option<Vec<u32>>,
    /// Only these customers; `None`: every subscriber of the plan.
    pub customers: Option<Vec<String>>,
    pub effective: Effective,
    /// Who runs it, and why: written on every change and on the migration's record.
    pub actor: String,
    pub reason: String,
}

impl MigrationSpec {
    pub fn new(id: &str, tenant: &str, plan: &str, to_version: u32) -> MigrationSpec {
        MigrationSpec {
            id: id.to_owned(),
            tenant: tenant.to_owned(),
            plan: plan.to_owned(),
            to_version,
            from_versions: None,
            customers: None,
            effective: Effective::NextPeriodStart,
            actor: String::new(),
            reason: String::new(),
        }
    }

    /// The change id written for `customer`: deterministic, so a rerun finds what an
    /// interrupted run already wrote.
    pub fn change_id(&self, customer: &str) -> String {
        format!("migration-{}-{customer}", self.id)
    }

    /// Whether a subscription on `version` of the plan is selected.
    fn selects(&self, version: u32) -> bool {
        match &self.from_versions {
            Some(v) => v.contains(&version),
            None => version < self.to_version,
        }
    }

    /// Checks the spec on its own and against the catalog; the error names the field.
    pub fn validate(&self, catalog: &Catalog) -> Result<()> {
        let invalid = |field, reason: String| {
            Err(Error::InvalidMigration {
                id: self.id.clone(),
                field,
                reason,
            })
        };
        if self.id.is_empty() {
            return invalid("id", "must not be empty".into());
        }
        if self.id.len() > MAX_MIGRATION_ID
            || !self
                .id
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
        {
            return invalid(
                "id",
                format!(
                    "must be 1-{MAX_MIGRATION_ID} characters of A-Z, a-z, 0-9, '.', '_' and '-'"
                ),
            );
        }
        if self.tenant.is_empty() {
            return invalid("tenant", "must not be empty".into());
        }
        let versions = catalog.versions(&self.plan);
        if versions.is_empty() {
            return invalid(
                "plan",
                format!("{:?}: no such plan in the catalog", self.plan),
            );
        }
        let latest = versions.len() as u32;
        if self.to_version == 0 || self.to_version > latest {
            return invalid(
                "to_version",
                format!(
                    "plan {:?} has no v{} (latest is v{latest})",
                    self.plan, self.to_version
                ),
            );
        }
        match &self.from_versions {
            None if self.to_version == 1 => {
                return invalid(
                    "to_version",
                    "v1 is the oldest version: there is nothing older to migrate from".into(),
                )
            }
            None => {}
            Some(from) if from.is_empty() => {
                return invalid("from_versions", "names no version".into())
            }
            Some(from) => {
                for &v in from {
                    if v == 0 || v > latest {
                        return invalid(
                            "from_versions",
                            format!("plan {:?} has no v{v} (latest is v{latest})", self.plan),
                        );
                    }
                    if v >= self.to_version {
                        return invalid(
                            "to_version",
                            format!(
                                "v{} is not newer than v{v} (from_versions)",
                                self.to_version
                            ),
                        );
                    }
                }
            }
        }
        if let Some(customers) = &self.customers {
            if customers.is_empty() || customers.iter().any(String::is_empty) {
                return invalid(
                    "customers",
                    "must list at least one non-empty customer".into(),
                );
            }
        }
        if let Effective::At(t) = self.effective {
            if t.nanosecond() != 0 || !(0..=i64::from(u32::MAX)).contains(&t.unix_timestamp()) {
                return invalid(
                    "effective",
                    "must be whole seconds between 1970 and 2106".into(),
                );
            }
        }
        Ok(())
    }
}

/// Where one customer's subscription stands at the migration's instant, as the store reads
/// it: the change in force then, and the last instant anything is recorded for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Current {
    pub customer: String,
    /// Kind of the change in force (a cancel: nothing is).
    pub kind: ChangeKind,
    pub plan: String,
    pub version: u32,
    pub billing_anchor: OffsetDateTime,
    /// Latest `effective_at` of the customer's log, after the instant included.
    pub last_effective: OffsetDateTime,
}

/// Why a candidate subscription does not move.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Skip {
    /// Already on `to_version`.
    AlreadyCurrent,
    /// On another plan, or cancelled.
    NotOnPlan,
    /// On a version the spec does not select.
    VersionNotSelected,
    /// A change is recorded after the instant it would move at.
    Pending,
}

impl Skip {
    pub fn name(self) -> &'static str {
        match self {
            Skip::AlreadyCurrent => "already_current",
            Skip::NotOnPlan => "not_on_plan",
            Skip::VersionNotSelected => "version_not_selected",
            Skip::Pending => "pending_change",
        }
    }
}

/// One subscription that moves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Move {
    pub customer: String,
    pub effective_at: OffsetDateTime,
    pub billing_anchor: OffsetDateTime,
}

/// The subscriptions moving from one version to another, and what that changes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Group {
    pub from_version: u32,
    pub to_version: u32,
    /// By customer.
    pub moves: Vec<Move>,
    /// Computed once for the group.
    pub changes: EntitlementDiff,
}

impl Group {
    pub fn effective_range(&self) -> Option<(OffsetDateTime, OffsetDateTime)> {
        let min = self.moves.iter().map(|m| m.effective_at).min()?;
        let max = self.moves.iter().map(|m| m.effective_at).max()?;
        Some((min, max))
    }

    pub fn summary(&self) -> GroupSummary {
        let range = self.effective_range();
        GroupSummary {
            from_version: self.from_version,
            to_version: self.to_version,
            count: self.moves.len() as u64,
            effective_min: range.map(|r| r.0),
            effective_max: range.map(|r| r.1),
            changes: self.changes.clone(),
        }
    }

    /// The group's customers in chunks of at most `max_customers` and about `max_bytes` of
    /// ids (a chunk always holds at least one).
    pub fn chunks(&self, max_customers: usize, max_bytes: usize) -> Vec<&[Move]> {
        let mut out = Vec::new();
        let (mut start, mut bytes) = (0, 0);
        for (i, m) in self.moves.iter().enumerate() {
            let size = m.customer.len() + 3;
            if i > start && (i - start >= max_customers || bytes + size > max_bytes) {
                out.push(&self.moves[start..i]);
                (start, bytes) = (i, 0);
            }
            bytes += size;
        }
        if start < self.moves.len() {
            out.push(&self.moves[start..]);
        }
        out
    }
}

/// A group as the preview and the outcome show it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct GroupSummary {
    pub from_version: u32,
    pub to_version: u32,
    pub count: u64,
    #[serde(with = "time::serde::rfc3339::option")]
    pub effective_min: Option<OffsetDateTime>,
    #[serde(with = "time::serde::rfc3339::option")]
    pub effective_max: Option<OffsetDateTime>,
    pub changes: EntitlementDiff,
}

/// Everything a migration would do, as of one instant.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MigrationPlan {
    pub as_of: OffsetDateTime,
    /// By from_version.
    pub groups: Vec<Group>,
    pub skipped: BTreeMap<Skip, u64>,
}

impl MigrationPlan {
    pub fn total(&self) -> u64 {
        self.groups.iter().map(|g| g.moves.len() as u64).sum()
    }

    pub fn preview(&self) -> MigrationPreview {
        MigrationPreview {
            as_of: self.as_of,
            groups: self.groups.iter().map(Group::summary).collect(),
            total: self.total(),
            skipped: self
                .skipped
                .iter()
                .map(|(k, n)| (k.name().to_owned(), *n))
                .collect(),
        }
    }
}

/// What a migration would move: per group, how many and when.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct MigrationPreview {
    #[serde(with = "time::serde::rfc3339")]
    pub as_of: OffsetDateTime,
    pub groups: Vec<GroupSummary>,
    pub total: u64,
    /// Candidates left where they are, by reason.
    pub skipped: BTreeMap<String, u64>,
}

/// Plans `spec` over the candidates' states at `as_of` (whole seconds). Validates the spec
/// first; a customer outside the spec's filter is ignored.
pub fn plan(
    spec: &MigrationSpec,
    catalog: &Catalog,
    candidates: impl IntoIterator<Item = Current>,
    as_of: OffsetDateTime,
) -> Result<MigrationPlan> {
    spec.validate(catalog)?;
    let filter: Option<std::collections::HashSet<&str>> = spec
        .customers
        .as_ref()
        .map(|c| c.iter().map(String::as_str).collect());
    let to = catalog
        .version(&spec.plan, spec.to_version)
        .ok_or_else(|| Error::UnknownPlanVersion {
            plan: spec.plan.clone(),
            version: spec.to_version,
            latest: catalog.versions(&spec.plan).len() as u32,
        })?;
    let mut groups: BTreeMap<u32, Vec<Move>> = BTreeMap::new();
    let mut skipped: BTreeMap<Skip, u64> = BTreeMap::new();
    for c in candidates {
        if filter
            .as_ref()
            .is_some_and(|f| !f.contains(c.customer.as_str()))
        {
            continue;
        }
        let skip = if c.kind == ChangeKind::Cancel || c.plan != spec.plan {
            Some(Skip::NotOnPlan)
        } else if c.version == spec.to_version {
            Some(Skip::AlreadyCurrent)
        } else if !spec.selects(c.version) {
            Some(Skip::VersionNotSelected)
        } else {
            None
        };
        if let Some(skip) = skip {
            *skipped.entry(skip).or_default() += 1;
            continue;
        }
        let Some(from) = catalog.version(&spec.plan, c.version) else {
            // A version the catalog lost: not one this migration may judge.
            *skipped.entry(Skip::VersionNotSelected).or_default() += 1;
            continue;
        };
        let effective_at = match spec.effective {
            Effective::At(t) => t,
            Effective::NextPeriodStart => {
                period_containing(c.billing_anchor, from.interval(), as_of)?.end()
            }
        };
        // Nothing may be recorded between what the log says now and the move.
        if c.last_effective > as_of.min(effective_at) {
            *skipped.entry(Skip::Pending).or_default() += 1;
            continue;
        }
        // A version on another billing interval anchors the subscription at the move.
        let billing_anchor = crate::subscription::anchor_after(
            catalog,
            (&spec.plan, c.version),
            (&spec.plan, spec.to_version),
            c.billing_anchor,
            effective_at,
        );
        groups.entry(c.version).or_default().push(Move {
            customer: c.customer,
            effective_at,
            billing_anchor,
        });
    }
    let groups = groups
        .into_iter()
        .filter_map(|(from_version, mut moves)| {
            let from = catalog.version(&spec.plan, from_version)?;
            moves.sort_by(|a, b| a.customer.cmp(&b.customer));
            Some(Group {
                from_version,
                to_version: spec.to_version,
                moves,
                changes: diff(&Entitlements::of(from), &Entitlements::of(to)),
            })
        })
        .collect();
    Ok(MigrationPlan {
        as_of,
        groups,
        skipped,
    })
}

/// Most bytes of customer ids (quoted, with separators) in one notification chunk: keeps a
/// chunk of long ids under the broker's default 1 MB message limit.
pub const MAX_CHUNK_BYTES: usize = 512 * 1024;

/// One message of the `entitlement-changes` topic: a chunk of the customers one group moves,
/// and what the move changes for each of them. Keyed by `tenant/plan`. Consumers must
/// tolerate the same chunk twice: a rerun after a failed or interrupted publish sends every
/// chunk of the migration again.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Notification<'a> {
    pub migration_id: &'a str,
    pub tenant: &'a str,
    pub plan: &'a str,
    pub from_version: u32,
    pub to_version: u32,
    /// The earliest instant a customer of the chunk moves at.
    #[serde(with = "time::serde::rfc3339")]
    pub effective_from_min: OffsetDateTime,
    pub customers: Vec<&'a str>,
    pub changes: &'a EntitlementDiff,
}

impl Notification<'_> {
    pub fn key(&self) -> String {
        format!("{}/{}", self.tenant, self.plan)
    }
}

/// The notifications of a planned migration: per group, chunks of at most
/// [`MAX_CHUNK_CUSTOMERS`] customers (and [`MAX_CHUNK_BYTES`] of ids), in customer order.
pub fn notifications<'a>(
    spec: &'a MigrationSpec,
    plan: &'a MigrationPlan,
) -> Vec<Notification<'a>> {
    let mut out = Vec::new();
    for g in &plan.groups {
        for chunk in g.chunks(MAX_CHUNK_CUSTOMERS, MAX_CHUNK_BYTES) {
            let Some(effective_from_min) = chunk.iter().map(|m| m.effective_at).min() else {
                continue;
            };
            out.push(Notification {
                migration_id: &spec.id,
                tenant: &spec.tenant,
                plan: &spec.plan,
                from_version: g.from_version,
                to_version: g.to_version,
                effective_from_min,
                customers: chunk.iter().map(|m| m.customer.as_str()).collect(),
                changes: &g.changes,
            });
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use time::macros::datetime;

    fn catalog() -> Catalog {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../config/plans");
        Catalog::load_dir(dir).expect("repository plans load")
    }

    const NOW: OffsetDateTime = datetime!(2026-03-10 12:00 UTC);

    fn on(customer: &str, plan: &str, version: u32, anchor: OffsetDateTime) -> Current {
        Current {
            customer: customer.into(),
            kind: ChangeKind::Create,
            plan: plan.into(),
            version,
            billing_anchor: anchor,
            last_effective: anchor,
        }
    }

    fn spec() -> MigrationSpec {
        MigrationSpec::new("m1", "t", "pro", 2)
    }

    fn field_of(e: Error) -> &'static str {
        match e {
            Error::InvalidMigration { field, .. } => field,
            other => panic!("expected an invalid migration, got {other:?}"),
        }
    }

    #[test]
    fn validation_names_the_field() {
        let plans = catalog();
        assert!(spec().validate(&plans).is_ok());
        let bad = |f: fn(&mut MigrationSpec)| {
            let mut s = spec();
            f(&mut s);
            field_of(s.validate(&plans).expect_err("refused"))
        };
        assert_eq!(bad(|s| s.id.clear()), "id");
        assert_eq!(bad(|s| s.id = "a b".into()), "id");
        assert_eq!(bad(|s| s.tenant.clear()), "tenant");
        assert_eq!(bad(|s| s.plan = "gold".into()), "plan");
        assert_eq!(bad(|s| s.to_version = 3), "to_version");
        assert_eq!(bad(|s| s.to_version = 1), "to_version");
        assert_eq!(
            bad(|s| {
                s.to_version = 1;
                s.from_versions = Some(vec![1]);
            }),
            "to_version"
        );
        assert_eq!(bad(|s| s.from_versions = Some(vec![])), "from_versions");
        assert_eq!(bad(|s| s.from_versions = Some(vec![7])), "from_versions");
        assert_eq!(bad(|s| s.customers = Some(vec![])), "customers");
        assert_eq!(
            bad(|s| s.effective = Effective::At(datetime!(2026-01-01 0:00:00.5 UTC))),
            "effective"
        );
        let e = MigrationSpec {
            id: String::new(),
            ..spec()
        }
        .validate(&plans)
        .expect_err("refused");
        assert_eq!(e.to_string(), "migration \"\": id: must not be empty");
    }

    /// A version on another billing interval anchors each moved subscription at its move,
    /// as a single change does; one on the same interval keeps the anchor.
    #[test]
    fn a_move_to_another_interval_anchors_at_the_move() {
        let dir =
            std::env::temp_dir().join(format!("tally-migration-yearly-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("p")).expect("plan folder");
        for (version, interval) in [(1, "monthly"), (2, "monthly"), (3, "yearly")] {
            let text = format!(
                "plan = \"p\"\nversion = {version}\ncurrency = \"USD\"\n\
                 interval = \"{interval}\"\n[[charges]]\nid = \"fee\"\ntype = \"flat\"\n\
                 price = \"10.00\"\n"
            );
            std::fs::write(dir.join(format!("p/v{version}.toml")), text).expect("plan");
        }
        let plans = Catalog::load_dir(&dir).expect("catalog");
        std::fs::remove_dir_all(&dir).ok();
        let anchor = datetime!(2025-01-15 0:00 UTC);
        let to = |version| MigrationSpec {
            plan: "p".into(),
            to_version: version,
            from_versions: Some(vec![1]),
            ..spec()
        };
        let moves = |version| {
            let planned =
                plan(&to(version), &plans, vec![on("c1", "p", 1, anchor)], NOW).expect("planned");
            planned.groups[0].moves[0].clone()
        };
        // The next period start of the monthly anchor: March 15, 2026.
        let same = moves(2);
        assert_eq!(same.effective_at, datetime!(2026-03-15 0:00 UTC));
        assert_eq!(same.billing_anchor, anchor);
        let yearly = moves(3);
        assert_eq!(yearly.effective_at, datetime!(2026-03-15 0:00 UTC));
        assert_eq!(yearly.billing_anchor, yearly.effective_at);
    }

    #[test]
    fn groups_by_version_and_skips_the_rest() {
        let plans = catalog();
        let a = datetime!(2025-01-15 0:00 UTC);
        let candidates = vec![
            on("c3", "pro", 1, a),
            on("c1", "pro", 1, datetime!(2025-01-31 9:00 UTC)),
            on("c2", "pro", 2, a),
            on("c4", "starter", 1, a),
            Current {
                kind: ChangeKind::Cancel,
                ..on("c5", "pro", 1, a)
            },
            Current {
                last_effective: datetime!(2026-04-01 0:00 UTC),
                ..on("c6", "pro", 1, a)
            },
        ];
        let p = plan(&spec(), &plans, candidates, NOW).expect("plans");
        assert_eq!(p.total(), 2);
        assert_eq!(p.groups.len(), 1);
        let g = &p.groups[0];
        assert_eq!((g.from_version, g.to_version), (1, 2));
        // Each at the start of its own next period: anchors on the 15th and the 31st.
        let moves: Vec<_> = g
            .moves
            .iter()
            .map(|m| (m.customer.as_str(), m.effective_at))
            .collect();
        assert_eq!(
            moves,
            [
                ("c1", datetime!(2026-03-31 9:00 UTC)),
                ("c3", datetime!(2026-03-15 0:00 UTC)),
            ]
        );
        assert_eq!(
            g.effective_range(),
            Some((
                datetime!(2026-03-15 0:00 UTC),
                datetime!(2026-03-31 9:00 UTC)
            ))
        );
        // pro v1 → v2: audit_log on, requests per minute 6000 → 12000, storage limit gone.
        let features: Vec<_> = g.changes.features.iter().map(|f| &f.feature).collect();
        assert_eq!(features, ["audit_log"]);
        assert_eq!(g.changes.limits.len(), 2);
        assert_eq!(
            p.skipped,
            BTreeMap::from([
                (Skip::AlreadyCurrent, 1),
                (Skip::NotOnPlan, 2),
                (Skip::Pending, 1)
            ])
        );
        let preview = p.preview();
        assert_eq!(preview.total, 2);
        assert_eq!(preview.groups[0].count, 2);
    }

    #[test]
    fn at_once_filters_and_version_selection() {
        let plans = catalog();
        let a = datetime!(2025-01-15 0:00 UTC);
        let at = datetime!(2026-03-10 0:00 UTC);
        let s = MigrationSpec {
            effective: Effective::At(at),
            customers: Some(vec!["c1".into(), "c3".into()]),
            ..spec()
        };
        let candidates = || {
            vec![
                on("c1", "pro", 1, a),
                on("c2", "pro", 1, a),
                Current {
                    // Changed after the instant it would move at: not judged by this run.
                    last_effective: datetime!(2026-03-10 6:00 UTC),
                    ..on("c3", "pro", 1, a)
                },
            ]
        };
        let p = plan(&s, &plans, candidates(), NOW).expect("plans");
        assert_eq!(p.total(), 1);
        assert_eq!(p.groups[0].moves[0].customer, "c1");
        assert_eq!(p.groups[0].moves[0].effective_at, at);
        assert_eq!(p.skipped, BTreeMap::from([(Skip::Pending, 1)]));

        // At the next period instead: c3's change came before now, so it moves too.
        let next = MigrationSpec {
            from_versions: Some(vec![1]),
            ..spec()
        };
        assert_eq!(
            plan(&next, &plans, candidates(), NOW)
                .expect("plans")
                .total(),
            3
        );
    }

    #[test]
    fn the_diff_is_computed_once_per_group() {
        // A group of many shares one diff; its chunks split by count and bytes.
        let plans = catalog();
        let a = datetime!(2025-01-01 0:00 UTC);
        let many = (0..25_001).map(|i| on(&format!("c{i:06}"), "pro", 1, a));
        let p = plan(&spec(), &plans, many, NOW).expect("plans");
        assert_eq!(p.groups.len(), 1);
        let g = &p.groups[0];
        let chunks = g.chunks(MAX_CHUNK_CUSTOMERS, usize::MAX);
        assert_eq!(
            chunks.iter().map(|c| c.len()).collect::<Vec<_>>(),
            [10_000, 10_000, 5_001]
        );
        // "c000000" is 7 bytes, 10 with quotes and comma: 3 per 30 bytes.
        assert_eq!(g.chunks(10, 30)[0].len(), 3);
        assert_eq!(g.chunks(10, 1)[0].len(), 1);
    }

    #[test]
    fn effective_parses_its_own_text() {
        for e in [
            Effective::NextPeriodStart,
            Effective::At(datetime!(2026-04-01 0:00 UTC)),
        ] {
            assert_eq!(Effective::parse(&e.text()), Some(e));
        }
        assert_eq!(Effective::parse("tomorrow"), None);
    }
}
