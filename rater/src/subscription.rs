//! Subscriptions as a fold over their change log. Pure: no I/O.
//!
//! A customer's subscription is never kept as mutable state. Every create, plan change,
//! migration and cancel is one immutable [`Change`], and what was in force at any instant is
//! a function of those changes: a [`Timeline`].
//!
//! - Order: by `effective_at`, then `recorded_at`, then `change_id`. Changes at one instant
//!   all apply; the last one decides what is in force from that instant on.
//! - A create, change or migrate puts its plan version in force from `effective_at`; a
//!   cancel ends what was in force. The fold is total (every log gives one timeline), so
//!   every reader of the same log computes the same thing.
//! - The rules (no create while subscribed, no change before the start or after a cancel,
//!   only catalog plan versions) are checked by [`Timeline::validate`] before a change is
//!   written; a valid log is one every change of which passed them in its place.
//! - Instants are whole seconds inside ClickHouse's `DateTime` range (1970 to 2106), the
//!   resolution the log keeps, so the fold over stored changes equals the fold here.

use std::collections::HashSet;
use std::fmt;

use serde::Serialize;
use sha2::{Digest, Sha256};
use time::OffsetDateTime;

use crate::error::{Error, Result};
use crate::plan::Catalog;

/// Longest change id, customer and tenant, in bytes.
const MAX_ID_BYTES: usize = 256;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ChangeKind {
    /// Starts a subscription, fixing its billing anchor.
    Create,
    /// Moves the subscription to another plan or version. The anchor stays, unless the
    /// billing interval changes: then the subscription is anchored again at the change
    /// (see [`anchor_after`]).
    Change,
    /// Ends the subscription.
    Cancel,
    /// A plan change made by a bulk migration (`migration_id` names it).
    Migrate,
}

impl ChangeKind {
    pub fn name(self) -> &'static str {
        match self {
            ChangeKind::Create => "create",
            ChangeKind::Change => "change",
            ChangeKind::Cancel => "cancel",
            ChangeKind::Migrate => "migrate",
        }
    }

    pub fn from_name(name: &str) -> Option<ChangeKind> {
        match name {
            "create" => Some(ChangeKind::Create),
            "change" => Some(ChangeKind::Change),
            "cancel" => Some(ChangeKind::Cancel),
            "migrate" => Some(ChangeKind::Migrate),
            _ => None,
        }
    }
}

impl fmt::Display for ChangeKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// One recorded change of one customer's subscription: a row of `subscription_changes`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize)]
pub struct Change {
    pub tenant: String,
    pub customer: String,
    /// The idempotency key, unique per customer: recording a change whose id is already in
    /// the customer's log writes nothing.
    pub change_id: String,
    pub kind: ChangeKind,
    /// From when the change applies.
    #[serde(with = "time::serde::rfc3339")]
    pub effective_at: OffsetDateTime,
    /// When it was written; orders changes effective at the same instant.
    #[serde(with = "time::serde::rfc3339")]
    pub recorded_at: OffsetDateTime,
    /// The plan version in force from `effective_at`; empty, and version 0, for a cancel.
    pub plan: String,
    pub version: u32,
    /// The subscription's billing anchor: set by its create, kept by every later change.
    #[serde(with = "time::serde::rfc3339")]
    pub billing_anchor: OffsetDateTime,
    /// Who asked for the change.
    pub actor: String,
    /// Why, in the actor's words.
    pub reason: String,
    /// Which bulk migration wrote the change; empty unless `kind` is migrate.
    pub migration_id: String,
}

impl Change {
    fn order_key(&self) -> (OffsetDateTime, OffsetDateTime, &str) {
        (self.effective_at, self.recorded_at, &self.change_id)
    }

    fn plan_version(&self) -> (&str, u32) {
        (&self.plan, self.version)
    }
}

/// A change as a caller asks for it; [`Timeline::admit`] fills in the defaults and checks it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewChange {
    pub tenant: String,
    pub customer: String,
    pub kind: ChangeKind,
    pub effective_at: OffsetDateTime,
    /// Required for create, change and migrate; none for a cancel.
    pub plan: Option<String>,
    /// Default: the plan's latest version in the catalog.
    pub version: Option<u32>,
    /// A create's anchor, default `effective_at`. A change or migrate keeps the
    /// subscription's anchor, or takes `effective_at` when it changes the billing interval
    /// ([`anchor_after`]); naming another is an error (cancel and create again to move it).
    pub billing_anchor: Option<OffsetDateTime>,
    pub actor: String,
    pub reason: String,
    /// Required for migrate, refused for the other kinds.
    pub migration_id: String,
    /// Default: derived from the tenant, customer, kind, instant, plan, version, anchor and
    /// migration, so re-running the same request is recognised without a client id.
    pub change_id: Option<String>,
}

impl NewChange {
    fn new(tenant: &str, customer: &str, kind: ChangeKind, at: OffsetDateTime) -> NewChange {
        NewChange {
            tenant: tenant.to_owned(),
            customer: customer.to_owned(),
            kind,
            effective_at: at,
            plan: None,
            version: None,
            billing_anchor: None,
            actor: String::new(),
            reason: String::new(),
            migration_id: String::new(),
            change_id: None,
        }
    }

    pub fn create(tenant: &str, customer: &str, plan: &str, start: OffsetDateTime) -> NewChange {
        NewChange {
            plan: Some(plan.to_owned()),
            ..NewChange::new(tenant, customer, ChangeKind::Create, start)
        }
    }

    pub fn change(tenant: &str, customer: &str, plan: &str, at: OffsetDateTime) -> NewChange {
        NewChange {
            plan: Some(plan.to_owned()),
            ..NewChange::new(tenant, customer, ChangeKind::Change, at)
        }
    }

    pub fn migrate(
        tenant: &str,
        customer: &str,
        plan: &str,
        at: OffsetDateTime,
        migration_id: &str,
    ) -> NewChange {
        NewChange {
            plan: Some(plan.to_owned()),
            migration_id: migration_id.to_owned(),
            ..NewChange::new(tenant, customer, ChangeKind::Migrate, at)
        }
    }

    pub fn cancel(tenant: &str, customer: &str, at: OffsetDateTime) -> NewChange {
        NewChange::new(tenant, customer, ChangeKind::Cancel, at)
    }

    pub fn version(mut self, version: u32) -> NewChange {
        self.version = Some(version);
        self
    }

    pub fn anchor(mut self, anchor: OffsetDateTime) -> NewChange {
        self.billing_anchor = Some(anchor);
        self
    }

    pub fn actor(mut self, actor: &str) -> NewChange {
        actor.clone_into(&mut self.actor);
        self
    }

    pub fn reason(mut self, reason: &str) -> NewChange {
        reason.clone_into(&mut self.reason);
        self
    }

    pub fn change_id(mut self, id: &str) -> NewChange {
        self.change_id = Some(id.to_owned());
        self
    }
}

/// What [`Timeline::admit`] decided.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Admission {
    /// A valid change not yet in the log: write it.
    New(Change),
    /// The same change is already in the log (same id, same content): write nothing.
    Duplicate(Change),
}

/// A piece of time during which one plan version was in force: `[from, to)`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize)]
pub struct SegmentRef {
    #[serde(with = "time::serde::rfc3339")]
    pub from: OffsetDateTime,
    /// Exclusive.
    #[serde(with = "time::serde::rfc3339")]
    pub to: OffsetDateTime,
    pub plan: String,
    pub version: u32,
}

/// Where a subscription stands at an instant.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum State {
    /// Nothing in force yet; a create takes effect later.
    Scheduled,
    Active,
    Cancelled,
}

impl State {
    pub fn name(self) -> &'static str {
        match self {
            State::Scheduled => "scheduled",
            State::Active => "active",
            State::Cancelled => "cancelled",
        }
    }
}

impl fmt::Display for State {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A customer's subscription as of one instant.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Status {
    pub customer: String,
    pub state: State,
    /// Active: the plan version in force. Cancelled: the last one in force. Scheduled: the
    /// first one to come.
    pub plan: String,
    pub version: u32,
    #[serde(with = "time::serde::rfc3339")]
    pub billing_anchor: OffsetDateTime,
    /// When the state began: the plan version took effect, the cancel did, or (scheduled)
    /// the subscription will start.
    #[serde(with = "time::serde::rfc3339")]
    pub since: OffsetDateTime,
}

/// One customer's subscription over time: its changes in order, folded.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Timeline {
    customer: String,
    /// Every change once (by id), in application order.
    changes: Vec<Change>,
    /// One step per distinct instant, increasing: from `.0` on, `changes[.1]` is in force
    /// (`None`: nothing is).
    steps: Vec<(OffsetDateTime, Option<usize>)>,
}

impl Timeline {
    /// Folds one customer's changes, given in any order. A change id seen more than once
    /// (two writers racing the same retry) counts once: the earliest recorded, with the
    /// content breaking ties so that every reader keeps the same one.
    pub fn new(customer: &str, changes: impl IntoIterator<Item = Change>) -> Timeline {
        let mut changes: Vec<Change> = changes.into_iter().collect();
        changes.sort_by(|a, b| dedupe_key(a).cmp(&dedupe_key(b)));
        let mut seen = HashSet::new();
        changes.retain(|c| seen.insert(c.change_id.clone()));
        changes.sort_by(|a, b| a.order_key().cmp(&b.order_key()));
        let mut steps: Vec<(OffsetDateTime, Option<usize>)> = Vec::new();
        for (i, c) in changes.iter().enumerate() {
            let in_force = (c.kind != ChangeKind::Cancel).then_some(i);
            match steps.last_mut() {
                Some(last) if last.0 == c.effective_at => last.1 = in_force,
                _ => steps.push((c.effective_at, in_force)),
            }
        }
        Timeline {
            customer: customer.to_owned(),
            changes,
            steps,
        }
    }

    pub fn customer(&self) -> &str {
        &self.customer
    }

    /// The audit trail: every change once, in the order they apply.
    pub fn changes(&self) -> &[Change] {
        &self.changes
    }

    pub fn into_changes(self) -> Vec<Change> {
        self.changes
    }

    pub fn is_empty(&self) -> bool {
        self.changes.is_empty()
    }

    pub fn find(&self, change_id: &str) -> Option<&Change> {
        self.changes.iter().find(|c| c.change_id == change_id)
    }

    /// The change whose plan version is in force at `instant` (every change effective at or
    /// before it applied); `None` before the start and after a cancel.
    pub fn at(&self, instant: OffsetDateTime) -> Option<&Change> {
        let k = self.steps.partition_point(|s| s.0 <= instant);
        let step = self.steps[..k].last()?;
        step.1.map(|i| &self.changes[i])
    }

    /// The pieces of `[from, to)` during which each plan version was in force, in order:
    /// each inside the range, none empty, none overlapping, no two adjacent ones of the same
    /// plan version (a change to the version already in force does not split). Nothing is
    /// in force before the start, after a cancel, or between a cancel and a new create.
    pub fn segments(&self, from: OffsetDateTime, to: OffsetDateTime) -> Vec<SegmentRef> {
        let mut out = Vec::new();
        if from >= to {
            return out;
        }
        let key = |s: Option<usize>| s.map(|i| self.changes[i].plan_version());
        let k = self.steps.partition_point(|s| s.0 <= from);
        let mut current = k.checked_sub(1).and_then(|j| self.steps[j].1);
        let mut start = from;
        let mut close = |in_force: Option<usize>, start, end| {
            if let Some(i) = in_force {
                let c: &Change = &self.changes[i];
                out.push(SegmentRef {
                    from: start,
                    to: end,
                    plan: c.plan.clone(),
                    version: c.version,
                });
            }
        };
        for &(at, in_force) in self.steps[k..].iter().take_while(|s| s.0 < to) {
            if key(in_force) != key(current) {
                close(current, start, at);
                start = at;
            }
            current = in_force;
        }
        close(current, start, to);
        out
    }

    /// The first instant after `after` at which a change anchors the subscription other
    /// than at `anchor` (an interval change, or a new subscription after a cancel): the
    /// periods of `anchor` end there.
    pub fn anchor_moves(
        &self,
        after: OffsetDateTime,
        anchor: OffsetDateTime,
    ) -> Option<OffsetDateTime> {
        self.changes
            .iter()
            .find(|c| {
                c.effective_at > after && c.kind != ChangeKind::Cancel && c.billing_anchor != anchor
            })
            .map(|c| c.effective_at)
    }

    /// Where the subscription stands at `instant`; `None` for a customer without changes.
    pub fn status(&self, instant: OffsetDateTime) -> Option<Status> {
        let k = self.steps.partition_point(|s| s.0 <= instant);
        let status = |state, i: usize, since| {
            let c: &Change = &self.changes[i];
            Status {
                customer: self.customer.clone(),
                state,
                plan: c.plan.clone(),
                version: c.version,
                billing_anchor: c.billing_anchor,
                since,
            }
        };
        let before = &self.steps[..k];
        match before.last() {
            Some(&(_, Some(i))) => {
                // Since the plan version took effect, not since a no-op change repeated it.
                let key = self.changes[i].plan_version();
                let since = before
                    .iter()
                    .rev()
                    .take_while(|s| s.1.is_some_and(|j| self.changes[j].plan_version() == key))
                    .last()
                    .map_or(instant, |s| s.0);
                Some(status(State::Active, i, since))
            }
            Some(&(cancelled_at, None)) => {
                let last = before.iter().rev().find_map(|s| s.1)?;
                Some(status(State::Cancelled, last, cancelled_at))
            }
            None => {
                let &(start, first) = self.steps[k..].iter().find(|s| s.1.is_some())?;
                Some(status(State::Scheduled, first?, start))
            }
        }
    }

    /// Checks a fully specified change against the catalog and this log, as if it were
    /// recorded in its place. Refuses a create while subscribed, a change, migrate or cancel
    /// without a subscription, before its start or after its cancel, a plan version not in
    /// the catalog, a change that moves the anchor, and a change that would make a later
    /// recorded change break one of these rules.
    pub fn validate(&self, change: &Change, catalog: &Catalog) -> Result<()> {
        check_fields(change, catalog)?;
        // Rules a concurrent writer may already have broken are not this change's fault.
        let existing: Vec<&Change> = self.changes.iter().collect();
        let broken: HashSet<&str> = violations(&self.customer, &existing, catalog)
            .into_iter()
            .map(|(i, _)| existing[i].change_id.as_str())
            .collect();
        let mut sequence = existing;
        let at = sequence.partition_point(|c| c.order_key() <= change.order_key());
        sequence.insert(at, change);
        for (i, e) in violations(&self.customer, &sequence, catalog) {
            if i == at {
                return Err(e);
            }
            let other = sequence[i];
            if !broken.contains(other.change_id.as_str()) {
                return Err(Error::Invalidates {
                    change_id: other.change_id.clone(),
                    effective_at: other.effective_at,
                    conflict: Box::new(e),
                });
            }
        }
        Ok(())
    }

    /// Turns a request into the change to record: fills the version (latest), anchor and
    /// change id, then either finds the same change already in the log or validates it.
    /// `recorded_at` is the writer's clock, truncated to seconds.
    pub fn admit(
        &self,
        mut new: NewChange,
        catalog: &Catalog,
        recorded_at: OffsetDateTime,
    ) -> Result<Admission> {
        let recorded_at = whole_seconds(recorded_at);
        let invalid = |change_id: &Option<String>, field, reason: &str| Error::InvalidChange {
            change_id: change_id.clone().unwrap_or_default(),
            field,
            reason: reason.to_owned(),
        };
        let (plan, version) = match (new.kind, new.plan.take()) {
            (ChangeKind::Cancel, None) if new.version.is_none() => (String::new(), 0),
            (ChangeKind::Cancel, _) => {
                return Err(invalid(&new.change_id, "plan", "a cancel names no plan"))
            }
            (kind, None) => {
                return Err(invalid(
                    &new.change_id,
                    "plan",
                    &format!("required for a {kind}"),
                ))
            }
            (_, Some(plan)) => {
                let version = match new.version {
                    Some(v) => v,
                    None => catalog
                        .latest(&plan)
                        .ok_or_else(|| Error::UnknownPlan {
                            plan: plan.clone(),
                            version: None,
                        })?
                        .version(),
                };
                (plan, version)
            }
        };
        let change_id = new.change_id.clone().unwrap_or_else(|| {
            derived_id(
                &new,
                &plan,
                version,
                new.billing_anchor.or(match new.kind {
                    ChangeKind::Create => Some(new.effective_at),
                    _ => None,
                }),
            )
        });

        if let Some(existing) = self.find(&change_id) {
            // Compare what the caller decided; an inherited anchor is not theirs.
            let anchor_matches = match (new.kind, new.billing_anchor) {
                (ChangeKind::Create, a) => existing.billing_anchor == a.unwrap_or(new.effective_at),
                (_, Some(a)) => existing.billing_anchor == a,
                (_, None) => true,
            };
            let same = existing.kind == new.kind
                && existing.effective_at == new.effective_at
                && existing.plan == plan
                && existing.version == version
                && existing.migration_id == new.migration_id
                && anchor_matches;
            return if same {
                Ok(Admission::Duplicate(existing.clone()))
            } else {
                Err(Error::ChangeIdReused {
                    customer: self.customer.clone(),
                    change_id,
                })
            };
        }

        let billing_anchor = match new.kind {
            ChangeKind::Create => new.billing_anchor.unwrap_or(new.effective_at),
            ChangeKind::Cancel => match (self.at(new.effective_at), new.billing_anchor) {
                (Some(c), Some(a)) if a != c.billing_anchor => {
                    return Err(anchor_error(&change_id, new.kind, c.billing_anchor, a))
                }
                (Some(c), _) => c.billing_anchor,
                (None, a) => a.unwrap_or(new.effective_at),
            },
            ChangeKind::Change | ChangeKind::Migrate => match self.at(new.effective_at) {
                Some(in_force) => {
                    let anchor = anchor_after(
                        catalog,
                        (&in_force.plan, in_force.version),
                        (&plan, version),
                        in_force.billing_anchor,
                        new.effective_at,
                    );
                    match new.billing_anchor {
                        Some(a) if a != anchor => {
                            return Err(anchor_error(&change_id, new.kind, anchor, a))
                        }
                        _ => anchor,
                    }
                }
                None => new.billing_anchor.unwrap_or(new.effective_at),
            },
        };
        let change = Change {
            tenant: new.tenant,
            customer: new.customer,
            change_id,
            kind: new.kind,
            effective_at: new.effective_at,
            recorded_at,
            plan,
            version,
            billing_anchor,
            actor: new.actor,
            reason: new.reason,
            migration_id: new.migration_id,
        };
        self.validate(&change, catalog)?;
        Ok(Admission::New(change))
    }
}

/// Duplicates of one id: keep the earliest recorded; the rest of the content only breaks
/// ties, so the choice does not depend on the order rows were read in.
#[allow(clippy::type_complexity)]
fn dedupe_key(
    c: &Change,
) -> (
    &str,
    OffsetDateTime,
    OffsetDateTime,
    ChangeKind,
    &str,
    u32,
    OffsetDateTime,
    (&str, &str, &str),
) {
    (
        &c.change_id,
        c.recorded_at,
        c.effective_at,
        c.kind,
        &c.plan,
        c.version,
        c.billing_anchor,
        (&c.actor, &c.reason, &c.migration_id),
    )
}

/// The rules of a valid log, applied in order. Returns every change that breaks one (by
/// index) with why; the state moves on as the fold does, so later changes are judged by
/// what readers will see. A change or migrate must carry the anchor [`anchor_after`] gives
/// it, so a change that moves the anchor of later ones (an interval change inserted before
/// them) breaks them.
fn violations(customer: &str, sequence: &[&Change], catalog: &Catalog) -> Vec<(usize, Error)> {
    enum S<'a> {
        Never,
        Active {
            start: OffsetDateTime,
            current: &'a Change,
            anchor: OffsetDateTime,
        },
        Cancelled(OffsetDateTime),
    }
    let mut out = Vec::new();
    let mut state = S::Never;
    for (i, c) in sequence.iter().enumerate() {
        let error = match (&state, c.kind) {
            (
                S::Active {
                    start,
                    current: in_force,
                    ..
                },
                ChangeKind::Create,
            ) => Some(Error::AlreadySubscribed {
                customer: customer.to_owned(),
                plan: in_force.plan.clone(),
                version: in_force.version,
                since: *start,
            }),
            (
                S::Active {
                    anchor,
                    current: in_force,
                    ..
                },
                ChangeKind::Change | ChangeKind::Migrate,
            ) => {
                let expected = anchor_after(
                    catalog,
                    in_force.plan_version(),
                    c.plan_version(),
                    *anchor,
                    c.effective_at,
                );
                (c.billing_anchor != expected)
                    .then(|| anchor_error(&c.change_id, c.kind, expected, c.billing_anchor))
            }
            (S::Active { .. }, _) | (S::Never | S::Cancelled(_), ChangeKind::Create) => None,
            (S::Never, _) => Some(
                match sequence[i..].iter().find(|l| l.kind == ChangeKind::Create) {
                    Some(create) => Error::BeforeStart {
                        customer: customer.to_owned(),
                        effective_at: c.effective_at,
                        start: create.effective_at,
                    },
                    None => Error::NoSubscription {
                        customer: customer.to_owned(),
                    },
                },
            ),
            (S::Cancelled(at), _) => Some(Error::AfterCancel {
                customer: customer.to_owned(),
                cancelled_at: *at,
                effective_at: c.effective_at,
            }),
        };
        if let Some(e) = error {
            out.push((i, e));
        }
        state = match (state, c.kind) {
            (_, ChangeKind::Cancel) => S::Cancelled(c.effective_at),
            (S::Active { start, .. }, ChangeKind::Change | ChangeKind::Migrate) => S::Active {
                start,
                current: c,
                anchor: c.billing_anchor,
            },
            _ => S::Active {
                start: c.effective_at,
                current: c,
                anchor: c.billing_anchor,
            },
        };
    }
    out
}

/// The checks one change passes on its own.
fn check_fields(c: &Change, catalog: &Catalog) -> Result<()> {
    let invalid = |field, reason: String| {
        Err(Error::InvalidChange {
            change_id: c.change_id.clone(),
            field,
            reason,
        })
    };
    for (field, value) in [
        ("tenant", &c.tenant),
        ("customer", &c.customer),
        ("change_id", &c.change_id),
    ] {
        if value.is_empty() || value.len() > MAX_ID_BYTES || value.chars().any(char::is_control) {
            return invalid(
                field,
                format!("must be 1-{MAX_ID_BYTES} bytes without control characters"),
            );
        }
    }
    for (field, t) in [
        ("effective_at", c.effective_at),
        ("recorded_at", c.recorded_at),
        ("billing_anchor", c.billing_anchor),
    ] {
        if !storable(t) {
            return invalid(
                field,
                format!(
                    "{} must be whole seconds between 1970-01-01 and 2106-02-07 (the log \
                     stores DateTime)",
                    show(t)
                ),
            );
        }
    }
    match (c.kind, c.migration_id.is_empty()) {
        (ChangeKind::Migrate, true) => {
            return invalid("migration_id", "required for a migrate".into())
        }
        (ChangeKind::Create | ChangeKind::Change | ChangeKind::Cancel, false) => {
            return invalid(
                "migration_id",
                format!("only a migrate names a migration, not a {}", c.kind),
            )
        }
        _ => {}
    }
    if c.kind == ChangeKind::Cancel {
        if !c.plan.is_empty() || c.version != 0 {
            return invalid("plan", "a cancel names no plan (empty, version 0)".into());
        }
        return Ok(());
    }
    if catalog.version(&c.plan, c.version).is_none() {
        return Err(match catalog.versions(&c.plan).len() {
            0 => Error::UnknownPlan {
                plan: c.plan.clone(),
                version: Some(c.version),
            },
            n => Error::UnknownPlanVersion {
                plan: c.plan.clone(),
                version: c.version,
                latest: u32::try_from(n).unwrap_or(u32::MAX),
            },
        });
    }
    Ok(())
}

/// Whether ClickHouse's `DateTime` holds `t` exactly.
fn storable(t: OffsetDateTime) -> bool {
    t.nanosecond() == 0 && u32::try_from(t.unix_timestamp()).is_ok()
}

fn whole_seconds(t: OffsetDateTime) -> OffsetDateTime {
    t - time::Duration::nanoseconds(i64::from(t.nanosecond()))
}

/// A stable id for a request that came without one: the same request gives the same id.
fn derived_id(new: &NewChange, plan: &str, version: u32, anchor: Option<OffsetDateTime>) -> String {
    let mut h = Sha256::new();
    for part in [
        new.tenant.as_str(),
        new.customer.as_str(),
        new.kind.name(),
        &new.effective_at.unix_timestamp_nanos().to_string(),
        plan,
        &version.to_string(),
        &anchor.map_or_else(String::new, |a| a.unix_timestamp_nanos().to_string()),
        &new.migration_id,
    ] {
        h.update(part.len().to_le_bytes());
        h.update(part.as_bytes());
    }
    format!("auto-{}", &hex::encode(h.finalize())[..32])
}

/// The anchor a change or migrate at `at` from plan version `from` (anchored at `anchor`)
/// to `to` must carry: the same anchor, or `at` itself when it moves to another billing
/// interval. Monthly periods cannot hold a yearly plan's segment (nor the
/// reverse), so the period in force then ends at the change, like a cancel, and the new
/// interval's periods start there. A plan version missing from the catalog keeps the anchor.
pub fn anchor_after(
    catalog: &Catalog,
    from: (&str, u32),
    to: (&str, u32),
    anchor: OffsetDateTime,
    at: OffsetDateTime,
) -> OffsetDateTime {
    let interval =
        |(plan, version): (&str, u32)| catalog.version(plan, version).map(|v| v.interval());
    match (interval(from), interval(to)) {
        (Some(before), Some(after)) if before != after => at,
        _ => anchor,
    }
}

fn anchor_error(
    change_id: &str,
    kind: ChangeKind,
    expected: OffsetDateTime,
    got: OffsetDateTime,
) -> Error {
    Error::InvalidChange {
        change_id: change_id.to_owned(),
        field: "billing_anchor",
        reason: format!(
            "a {kind} is anchored at {} (the subscription's anchor, or the change itself when \
             it moves to another billing interval), not {}; cancel and subscribe again to move \
             it",
            show(expected),
            show(got)
        ),
    }
}

fn show(t: OffsetDateTime) -> String {
    t.format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_else(|_| format!("{t:?}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::sync::OnceLock;
    use time::macros::datetime;

    /// Plans `basic` (v1, v2, monthly) and `annual` (v1, yearly), in the loader's layout.
    fn catalog() -> &'static Catalog {
        static CATALOG: OnceLock<Catalog> = OnceLock::new();
        CATALOG.get_or_init(|| {
            let dir = std::env::temp_dir().join(format!(
                "tally-rater-subscription-plans-{}",
                std::process::id()
            ));
            for (plan, version, interval) in [
                ("basic", 1, "monthly"),
                ("basic", 2, "monthly"),
                ("annual", 1, "yearly"),
            ] {
                let folder = dir.join(plan);
                std::fs::create_dir_all(&folder).expect("plan folder");
                let text = format!(
                    "plan = \"{plan}\"\nversion = {version}\ncurrency = \"USD\"\n\
                     interval = \"{interval}\"\n[[charges]]\nid = \"fee\"\ntype = \"flat\"\n\
                     price = \"10.00\"\n"
                );
                std::fs::write(folder.join(format!("v{version}.toml")), text).expect("plan");
            }
            let catalog = Catalog::load_dir(&dir).expect("test catalog");
            let _ = std::fs::remove_dir_all(&dir);
            catalog
        })
    }

    const NOW: OffsetDateTime = datetime!(2026-01-01 0:00 UTC);

    /// Admits each request in turn, as the store does, and returns the timeline.
    fn build(requests: Vec<NewChange>) -> Timeline {
        let mut t = Timeline::new("c1", []);
        for (i, r) in requests.into_iter().enumerate() {
            let recorded = NOW + time::Duration::seconds(i as i64);
            match t.admit(r, catalog(), recorded).expect("valid") {
                Admission::New(c) => {
                    let mut all = t.into_changes();
                    all.push(c);
                    t = Timeline::new("c1", all);
                }
                Admission::Duplicate(c) => panic!("unexpected duplicate {c:?}"),
            }
        }
        t
    }

    fn seg(from: OffsetDateTime, to: OffsetDateTime, plan: &str, version: u32) -> SegmentRef {
        SegmentRef {
            from,
            to,
            plan: plan.into(),
            version,
        }
    }

    fn create(plan: &str, at: OffsetDateTime) -> NewChange {
        NewChange::create("t", "c1", plan, at)
    }

    fn change(plan: &str, at: OffsetDateTime) -> NewChange {
        NewChange::change("t", "c1", plan, at)
    }

    fn cancel(at: OffsetDateTime) -> NewChange {
        NewChange::cancel("t", "c1", at)
    }

    fn refused(t: &Timeline, r: NewChange) -> Error {
        t.admit(r, catalog(), NOW + time::Duration::days(1))
            .expect_err("refused")
    }

    #[test]
    fn create_upgrade_cancel_segments() {
        let t = build(vec![
            create("basic", datetime!(2025-01-10 0:00 UTC)).version(1),
            change("basic", datetime!(2025-02-20 12:00 UTC)),
            cancel(datetime!(2025-04-01 0:00 UTC)),
        ]);
        assert_eq!(t.changes()[1].version, 2, "latest version by default");
        assert_eq!(
            t.segments(
                datetime!(2025-02-10 0:00 UTC),
                datetime!(2025-03-10 0:00 UTC)
            ),
            [
                seg(
                    datetime!(2025-02-10 0:00 UTC),
                    datetime!(2025-02-20 12:00 UTC),
                    "basic",
                    1
                ),
                seg(
                    datetime!(2025-02-20 12:00 UTC),
                    datetime!(2025-03-10 0:00 UTC),
                    "basic",
                    2
                ),
            ]
        );
        // Before the start and after the cancel nothing is in force.
        assert_eq!(
            t.segments(
                datetime!(2025-01-01 0:00 UTC),
                datetime!(2025-05-01 0:00 UTC)
            ),
            [
                seg(
                    datetime!(2025-01-10 0:00 UTC),
                    datetime!(2025-02-20 12:00 UTC),
                    "basic",
                    1
                ),
                seg(
                    datetime!(2025-02-20 12:00 UTC),
                    datetime!(2025-04-01 0:00 UTC),
                    "basic",
                    2
                ),
            ]
        );
        assert!(t
            .segments(
                datetime!(2025-04-01 0:00 UTC),
                datetime!(2025-05-01 0:00 UTC)
            )
            .is_empty());
        assert!(t
            .segments(
                datetime!(2025-03-01 0:00 UTC),
                datetime!(2025-03-01 0:00 UTC)
            )
            .is_empty());
    }

    #[test]
    fn at_and_status() {
        let t = build(vec![
            create("basic", datetime!(2025-01-10 0:00 UTC)).version(1),
            change("basic", datetime!(2025-02-20 12:00 UTC)).version(2),
            cancel(datetime!(2025-04-01 0:00 UTC)),
        ]);
        assert!(t.at(datetime!(2025-01-09 23:59:59 UTC)).is_none());
        assert_eq!(
            t.at(datetime!(2025-01-10 0:00 UTC)).map(|c| c.version),
            Some(1)
        );
        assert_eq!(
            t.at(datetime!(2025-02-20 12:00 UTC)).map(|c| c.version),
            Some(2)
        );
        assert!(t.at(datetime!(2025-04-01 0:00 UTC)).is_none());

        let s = t.status(datetime!(2025-01-01 0:00 UTC)).expect("status");
        assert_eq!(
            (s.state, s.version, s.since),
            (State::Scheduled, 1, datetime!(2025-01-10 0:00 UTC))
        );
        let s = t.status(datetime!(2025-03-01 0:00 UTC)).expect("status");
        assert_eq!(
            (s.state, s.plan.as_str(), s.version, s.since),
            (State::Active, "basic", 2, datetime!(2025-02-20 12:00 UTC))
        );
        assert_eq!(s.billing_anchor, datetime!(2025-01-10 0:00 UTC));
        let s = t.status(datetime!(2025-06-01 0:00 UTC)).expect("status");
        assert_eq!(
            (s.state, s.version, s.since),
            (State::Cancelled, 2, datetime!(2025-04-01 0:00 UTC))
        );
        assert!(Timeline::new("x", []).status(NOW).is_none());
    }

    #[test]
    fn refusals_name_what_is_wrong() {
        let empty = Timeline::new("c1", []);
        let e = refused(&empty, change("basic", datetime!(2025-01-10 0:00 UTC)));
        assert_eq!(e.to_string(), "no subscription for customer \"c1\"");
        assert!(matches!(
            refused(&empty, cancel(datetime!(2025-01-10 0:00 UTC))),
            Error::NoSubscription { .. }
        ));

        let t = build(vec![create("basic", datetime!(2025-01-10 0:00 UTC))]);
        let e = refused(&t, create("annual", datetime!(2025-03-01 0:00 UTC)));
        assert_eq!(
            e.to_string(),
            "customer \"c1\" already has a subscription: plan \"basic\" v2 since \
             2025-01-10T00:00:00Z"
        );
        let e = refused(
            &t,
            change("basic", datetime!(2025-01-09 0:00 UTC)).version(1),
        );
        assert_eq!(
            e.to_string(),
            "customer \"c1\": a change effective at 2025-01-09T00:00:00Z is before the \
             subscription starts at 2025-01-10T00:00:00Z"
        );
        assert!(matches!(
            refused(&t, cancel(datetime!(2025-01-09 23:59:59 UTC))),
            Error::BeforeStart { .. }
        ));
        let e = refused(
            &t,
            change("gold", datetime!(2025-02-01 0:00 UTC)).version(3),
        );
        assert_eq!(
            e.to_string(),
            "plan \"gold\" v3: no such plan in the catalog"
        );
        let e = refused(&t, change("gold", datetime!(2025-02-01 0:00 UTC)));
        assert_eq!(e.to_string(), "plan \"gold\": no such plan in the catalog");
        let e = refused(
            &t,
            change("basic", datetime!(2025-02-01 0:00 UTC)).version(7),
        );
        assert_eq!(
            e.to_string(),
            "plan \"basic\" v7: no such version in the catalog (latest is v2)"
        );
        assert!(matches!(
            refused(
                &t,
                change("basic", datetime!(2025-02-01 0:00 UTC)).version(0)
            ),
            Error::UnknownPlanVersion { version: 0, .. }
        ));

        let t = build(vec![
            create("basic", datetime!(2025-01-10 0:00 UTC)),
            cancel(datetime!(2025-03-01 0:00 UTC)),
        ]);
        let e = refused(&t, change("annual", datetime!(2025-03-05 0:00 UTC)));
        assert_eq!(
            e.to_string(),
            "customer \"c1\": the subscription was cancelled at 2025-03-01T00:00:00Z; \
             nothing can change at 2025-03-05T00:00:00Z"
        );
        // At the cancel's own instant the cancel, recorded first, applies first.
        assert!(matches!(
            refused(&t, change("annual", datetime!(2025-03-01 0:00 UTC))),
            Error::AfterCancel { .. }
        ));
        assert!(matches!(
            refused(&t, cancel(datetime!(2025-04-01 0:00 UTC))),
            Error::AfterCancel { .. }
        ));
    }

    #[test]
    fn field_refusals() {
        let t = build(vec![create("basic", datetime!(2025-01-10 0:00 UTC))]);
        let field = |e: Error| match e {
            Error::InvalidChange { field, .. } => field,
            other => panic!("expected InvalidChange, got {other}"),
        };
        assert_eq!(
            field(refused(
                &t,
                change("basic", datetime!(2025-02-01 0:00:00.5 UTC))
            )),
            "effective_at"
        );
        assert_eq!(
            field(refused(
                &Timeline::new("c1", []),
                create("basic", datetime!(1969-12-31 0:00 UTC))
            )),
            "effective_at"
        );
        assert_eq!(
            field(refused(
                &t,
                change("basic", datetime!(2025-02-01 0:00 UTC)).change_id("")
            )),
            "change_id"
        );
        assert_eq!(
            field(refused(
                &t,
                change("basic", datetime!(2025-02-01 0:00 UTC))
                    .anchor(datetime!(2025-02-01 0:00 UTC))
            )),
            "billing_anchor"
        );
        let mut no_plan = cancel(datetime!(2025-02-01 0:00 UTC));
        no_plan.kind = ChangeKind::Change;
        assert_eq!(field(refused(&t, no_plan)), "plan");
        let mut with_plan = cancel(datetime!(2025-02-01 0:00 UTC));
        with_plan.plan = Some("basic".into());
        assert_eq!(field(refused(&t, with_plan)), "plan");
        let mut migration = change("basic", datetime!(2025-02-01 0:00 UTC));
        migration.migration_id = "m1".into();
        assert_eq!(field(refused(&t, migration)), "migration_id");
        let mut unnamed =
            NewChange::migrate("t", "c1", "basic", datetime!(2025-02-01 0:00 UTC), "");
        unnamed.version = Some(1);
        assert_eq!(field(refused(&t, unnamed)), "migration_id");
        // A named migration is a plan change like any other.
        assert!(matches!(
            t.admit(
                NewChange::migrate("t", "c1", "basic", datetime!(2025-02-01 0:00 UTC), "m1")
                    .version(1),
                catalog(),
                NOW
            ),
            Ok(Admission::New(Change {
                kind: ChangeKind::Migrate,
                ..
            }))
        ));
    }

    #[test]
    fn an_interval_change_anchors_the_subscription_again() {
        let anchor = datetime!(2025-01-31 9:00 UTC);
        let to_yearly = datetime!(2025-03-15 0:00 UTC);
        let t = build(vec![
            create("basic", anchor),
            change("basic", datetime!(2025-02-10 0:00 UTC)).version(1),
            change("annual", to_yearly),
        ]);
        // A change within the interval keeps the anchor; the move to yearly starts the
        // yearly periods at its own instant.
        let anchors: Vec<_> = t.changes().iter().map(|c| c.billing_anchor).collect();
        assert_eq!(anchors, [anchor, anchor, to_yearly]);
        let s = t.status(datetime!(2025-06-01 0:00 UTC)).expect("in force");
        assert_eq!((s.plan.as_str(), s.billing_anchor), ("annual", to_yearly));
        assert_eq!(
            catalog().version("annual", 1).map(|v| v.interval()),
            Some(crate::Interval::Yearly)
        );

        // And back to monthly: anchored again at that change.
        let back = datetime!(2025-09-01 12:00 UTC);
        let t = build(vec![
            create("basic", anchor),
            change("annual", to_yearly),
            change("basic", back),
        ]);
        let anchors: Vec<_> = t.changes().iter().map(|c| c.billing_anchor).collect();
        assert_eq!(anchors, [anchor, to_yearly, back]);

        // Naming another anchor for an interval change is refused, naming the one it takes.
        let t = build(vec![create("basic", anchor)]);
        let e = refused(&t, change("annual", to_yearly).anchor(anchor));
        assert!(
            e.to_string()
                .contains("a change is anchored at 2025-03-15T00:00:00Z"),
            "{e}"
        );
        assert!(t
            .admit(
                change("annual", to_yearly).anchor(to_yearly),
                catalog(),
                NOW
            )
            .is_ok());

        // An interval change inserted before a later change would move that one's anchor.
        let t = build(vec![
            create("basic", anchor),
            change("basic", datetime!(2025-05-01 0:00 UTC)).version(2),
        ]);
        let e = refused(&t, change("annual", to_yearly));
        assert!(matches!(e, Error::Invalidates { .. }), "{e}");
    }

    #[test]
    fn a_change_to_the_version_in_force_does_not_split() {
        // Pricing a period in two pieces of one version would tier usage twice.
        let t = build(vec![
            create("basic", datetime!(2025-01-01 0:00 UTC)).version(2),
            change("basic", datetime!(2025-01-20 0:00 UTC)).version(2),
        ]);
        assert_eq!(
            t.segments(
                datetime!(2025-01-10 0:00 UTC),
                datetime!(2025-02-01 0:00 UTC)
            ),
            [seg(
                datetime!(2025-01-10 0:00 UTC),
                datetime!(2025-02-01 0:00 UTC),
                "basic",
                2
            )]
        );
        let s = t.status(datetime!(2025-01-25 0:00 UTC)).expect("status");
        assert_eq!(s.since, datetime!(2025-01-01 0:00 UTC));
    }

    #[test]
    fn resubscribing_after_a_cancel() {
        let t = build(vec![
            create("basic", datetime!(2025-01-01 0:00 UTC)),
            cancel(datetime!(2025-02-01 0:00 UTC)),
            create("annual", datetime!(2025-03-01 0:00 UTC)),
        ]);
        assert_eq!(
            t.segments(
                datetime!(2025-01-15 0:00 UTC),
                datetime!(2025-03-15 0:00 UTC)
            ),
            [
                seg(
                    datetime!(2025-01-15 0:00 UTC),
                    datetime!(2025-02-01 0:00 UTC),
                    "basic",
                    2
                ),
                seg(
                    datetime!(2025-03-01 0:00 UTC),
                    datetime!(2025-03-15 0:00 UTC),
                    "annual",
                    1
                ),
            ]
        );
        assert_eq!(
            t.changes()[2].billing_anchor,
            datetime!(2025-03-01 0:00 UTC)
        );
        // Between the cancel and the new create the customer has no subscription.
        assert!(matches!(
            refused(&t, change("basic", datetime!(2025-02-15 0:00 UTC))),
            Error::AfterCancel { .. }
        ));
    }

    #[test]
    fn a_change_that_breaks_a_later_one_is_refused() {
        // A plan change scheduled for March; a cancel in February would leave it after a
        // cancel.
        let t = build(vec![
            create("basic", datetime!(2025-01-01 0:00 UTC)).version(1),
            change("basic", datetime!(2025-03-01 0:00 UTC)).change_id("march"),
        ]);
        let e = refused(&t, cancel(datetime!(2025-02-01 0:00 UTC)));
        assert_eq!(
            e.to_string(),
            "that would invalidate change \"march\" effective at 2025-03-01T00:00:00Z: \
             customer \"c1\": the subscription was cancelled at 2025-02-01T00:00:00Z; \
             nothing can change at 2025-03-01T00:00:00Z"
        );
        // A create before a later create: the later one would be a create while subscribed.
        let t = build(vec![
            create("basic", datetime!(2025-03-01 0:00 UTC)).change_id("first")
        ]);
        assert!(matches!(
            refused(&t, create("annual", datetime!(2025-02-01 0:00 UTC))),
            Error::Invalidates { ref change_id, .. } if change_id == "first"
        ));
        // A backdated plan change inside the subscription is fine.
        let t = build(vec![
            create("basic", datetime!(2025-01-01 0:00 UTC)).version(1),
            cancel(datetime!(2025-04-01 0:00 UTC)),
            change("annual", datetime!(2025-02-01 0:00 UTC)),
        ]);
        assert_eq!(
            t.segments(
                datetime!(2025-01-01 0:00 UTC),
                datetime!(2025-05-01 0:00 UTC)
            )
            .len(),
            2
        );
    }

    #[test]
    fn a_broken_log_does_not_block_new_changes() {
        // Two creates raced past each other's check; later valid changes are still taken.
        let racing = |id: &str, plan: &str| Change {
            tenant: "t".into(),
            customer: "c1".into(),
            change_id: id.into(),
            kind: ChangeKind::Create,
            effective_at: datetime!(2025-01-01 0:00 UTC),
            recorded_at: NOW,
            plan: plan.into(),
            version: 1,
            billing_anchor: datetime!(2025-01-01 0:00 UTC),
            actor: String::new(),
            reason: String::new(),
            migration_id: String::new(),
        };
        let t = Timeline::new("c1", [racing("a", "basic"), racing("b", "annual")]);
        // Ties apply in change id order: b's plan is in force.
        assert_eq!(
            t.at(datetime!(2025-01-01 0:00 UTC))
                .map(|c| c.plan.as_str()),
            Some("annual")
        );
        assert!(t
            .admit(
                change("basic", datetime!(2025-02-01 0:00 UTC)),
                catalog(),
                NOW
            )
            .is_ok());
    }

    #[test]
    fn ties_apply_in_recorded_then_id_order() {
        let at = datetime!(2025-02-01 0:00 UTC);
        let base = build(vec![
            create("basic", datetime!(2025-01-01 0:00 UTC)).version(1)
        ]);
        let mut changes = base.into_changes();
        let mut push = |id: &str, recorded: OffsetDateTime, version: u32| {
            let mut c = changes[0].clone();
            c.change_id = id.into();
            c.kind = ChangeKind::Change;
            c.effective_at = at;
            c.recorded_at = recorded;
            c.version = version;
            changes.push(c);
        };
        push("z", NOW + time::Duration::seconds(5), 1);
        push("b", NOW + time::Duration::seconds(9), 2);
        push("a", NOW + time::Duration::seconds(9), 1);
        let t = Timeline::new("c1", changes.clone());
        let order: Vec<&str> = t.changes().iter().map(|c| c.change_id.as_str()).collect();
        assert_eq!(order[1..], ["z", "a", "b"]);
        assert_eq!(t.at(at).map(|c| c.version), Some(2));
        // Input order does not matter.
        changes.reverse();
        assert_eq!(Timeline::new("c1", changes), t);
    }

    #[test]
    fn duplicate_ids_count_once() {
        let t = build(vec![
            create("basic", datetime!(2025-01-01 0:00 UTC)).change_id("x")
        ]);
        let mut twice = t.changes().to_vec();
        let mut later = twice[0].clone();
        later.recorded_at += time::Duration::seconds(3);
        later.plan = "annual".into();
        twice.push(later.clone());
        let folded = Timeline::new("c1", twice);
        assert_eq!(folded.changes(), t.changes());
        assert_eq!(
            Timeline::new("c1", [later, t.changes()[0].clone()]).changes(),
            t.changes()
        );
    }

    #[test]
    fn the_same_request_twice_is_a_duplicate() {
        let t = build(vec![
            create("basic", datetime!(2025-01-01 0:00 UTC)),
            change("annual", datetime!(2025-02-01 0:00 UTC)),
            cancel(datetime!(2025-03-01 0:00 UTC)),
        ]);
        for (i, again) in [
            create("basic", datetime!(2025-01-01 0:00 UTC)),
            change("annual", datetime!(2025-02-01 0:00 UTC)),
            cancel(datetime!(2025-03-01 0:00 UTC)),
        ]
        .into_iter()
        .enumerate()
        {
            match t.admit(again, catalog(), NOW + time::Duration::days(9)) {
                Ok(Admission::Duplicate(c)) => assert_eq!(c, t.changes()[i]),
                other => panic!("expected a duplicate, got {other:?}"),
            }
        }
        // Generated ids differ between different requests.
        let ids: HashSet<&str> = t.changes().iter().map(|c| c.change_id.as_str()).collect();
        assert_eq!(ids.len(), 3);
        assert!(ids.iter().all(|id| id.starts_with("auto-")));

        // A client id reused for something else is refused, not silently ignored.
        let t = build(vec![
            create("basic", datetime!(2025-01-01 0:00 UTC)).change_id("k1")
        ]);
        assert!(matches!(
            t.admit(
                create("annual", datetime!(2025-01-01 0:00 UTC)).change_id("k1"),
                catalog(),
                NOW
            ),
            Err(Error::ChangeIdReused { .. })
        ));
        // Who and why do not make a change different.
        assert!(matches!(
            t.admit(
                create("basic", datetime!(2025-01-01 0:00 UTC))
                    .change_id("k1")
                    .actor("someone else"),
                catalog(),
                NOW
            ),
            Ok(Admission::Duplicate(_))
        ));
    }

    #[test]
    fn recorded_at_is_truncated_to_seconds() {
        let t = Timeline::new("c1", []);
        let Ok(Admission::New(c)) = t.admit(
            create("basic", datetime!(2025-01-01 0:00 UTC)),
            catalog(),
            datetime!(2026-01-01 10:00:00.75 UTC),
        ) else {
            panic!("admitted")
        };
        assert_eq!(c.recorded_at, datetime!(2026-01-01 10:00 UTC));
    }

    // Laws of the fold, over any log (valid or not): seconds 0..100 after a base instant,
    // three plan versions, with many ties.
    const BASE: i64 = 1_700_000_000;

    fn instant(s: i64) -> OffsetDateTime {
        OffsetDateTime::from_unix_timestamp(BASE + s).expect("in range")
    }

    fn arbitrary_log() -> impl Strategy<Value = Vec<Change>> {
        proptest::collection::vec((0u8..4, 0i64..100, 0i64..4, 0u8..3), 0..10).prop_map(|raw| {
            raw.into_iter()
                .enumerate()
                .map(|(i, (kind, at, recorded, plan))| {
                    let kind = [
                        ChangeKind::Create,
                        ChangeKind::Change,
                        ChangeKind::Cancel,
                        ChangeKind::Migrate,
                    ][usize::from(kind)];
                    let (plan, version) = match kind {
                        ChangeKind::Cancel => (String::new(), 0),
                        _ => (
                            ["a", "b", "a"][usize::from(plan)].to_owned(),
                            1 + u32::from(plan) / 2,
                        ),
                    };
                    Change {
                        tenant: "t".into(),
                        customer: "c".into(),
                        change_id: format!("id{i}"),
                        kind,
                        effective_at: instant(at),
                        recorded_at: instant(recorded),
                        plan,
                        version,
                        billing_anchor: instant(0),
                        actor: String::new(),
                        reason: String::new(),
                        migration_id: String::new(),
                    }
                })
                .collect()
        })
    }

    proptest! {
        #[test]
        fn segments_tile_what_is_in_force(
            log in arbitrary_log(), a in -5i64..110, len in 0i64..60,
        ) {
            let t = Timeline::new("c", log);
            let (from, to) = (instant(a), instant(a + len));
            let segments = t.segments(from, to);
            for s in &segments {
                prop_assert!(from <= s.from && s.from < s.to && s.to <= to, "{:?}", s);
            }
            for w in segments.windows(2) {
                prop_assert!(w[0].to <= w[1].from, "overlap {:?}", w);
                if w[0].to == w[1].from {
                    prop_assert!((&w[0].plan, w[0].version) != (&w[1].plan, w[1].version));
                }
            }
            // Every instant of the range, on and between the seconds changes fall on, is in
            // the segment of the plan version in force then, or in none if nothing is.
            let half = time::Duration::milliseconds(500);
            for s in a..a + len {
                for x in [instant(s), instant(s) + half] {
                    let in_force = t.at(x).map(|c| (c.plan.clone(), c.version));
                    let covering = segments
                        .iter()
                        .find(|g| g.from <= x && x < g.to)
                        .map(|g| (g.plan.clone(), g.version));
                    prop_assert_eq!(in_force, covering, "at {}", x);
                }
            }
            // A change at t that alters what is in force splits the range at exactly t.
            for c in t.changes() {
                let at = c.effective_at;
                if from < at && at < to {
                    let key = |x| t.at(x).map(|c| (c.plan.clone(), c.version));
                    if key(at - time::Duration::nanoseconds(1)) != key(at) {
                        prop_assert!(
                            segments.iter().any(|g| g.from == at || g.to == at),
                            "no boundary at {}", at
                        );
                    }
                }
            }
        }

        #[test]
        fn a_plan_change_splits_at_its_instant(
            start in 0i64..50, gap in 1i64..50, before in 0i64..60, after in 1i64..60,
        ) {
            let t = build(vec![
                create("basic", instant(start)).version(1),
                change("annual", instant(start + gap)),
            ]);
            let at = instant(start + gap);
            let from = at - time::Duration::seconds(before);
            let to = at + time::Duration::seconds(after);
            let segments = t.segments(from, to);
            let first_from = from.max(instant(start));
            let mut expected = Vec::new();
            if first_from < at {
                expected.push(seg(first_from, at, "basic", 1));
            }
            expected.push(seg(at, to, "annual", 1));
            prop_assert_eq!(segments, expected);
        }

        #[test]
        fn folding_ignores_input_order(log in arbitrary_log(), seed in any::<u64>()) {
            let mut shuffled = log.clone();
            let n = shuffled.len();
            for i in 0..n {
                let j = (seed.rotate_left(i as u32) as usize) % n;
                shuffled.swap(i, j);
            }
            prop_assert_eq!(Timeline::new("c", log), Timeline::new("c", shuffled));
        }
    }
}
