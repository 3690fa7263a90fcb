//! The subscription log in ClickHouse (`subscription_changes`, `V4__subscriptions.sql`).
//!
//! "Recorded" means the change's row was inserted and the insert returned: it is then in
//! every later read. A change is validated against the customer's log as read just before
//! (see [`Timeline::validate`]); a change id already in that log is not written again.
//!
//! Writers for one customer are not coordinated: ClickHouse has no transactions or unique
//! keys, so two writers racing may both pass the check. For one change id that is harmless:
//! readers count an id once. Two different changes racing (two creates, say) can both land
//! and leave a log that breaks a rule; the fold is total, so every reader still computes the
//! same timeline, and later changes are judged only on rules they break themselves. That is
//! safe enough because subscription changes come from operators and one billing process, at
//! human rates: the window is the milliseconds between one customer's read and insert. Where
//! that does not hold, send a tenant's changes through one writer.
//!
//! Every read is one query, whatever the number of customers: batches travel inside the
//! statement, folded here per customer while the rows stream in (ordered by customer, so
//! one customer's rows are in memory at a time).

use std::collections::{BTreeMap, HashSet};
use std::future::Future;
use std::time::Duration;

use clickhouse::Client;
use serde::{Deserialize, Serialize};
use tally_core::config::ClickHouseConfig;
use time::OffsetDateTime;

use crate::error::{Error, Result};
use crate::kafka::Notifier;
use crate::migration::{self, Current, MigrationPlan, MigrationPreview, MigrationSpec};
use crate::plan::Catalog;
use crate::subscription::{Admission, Change, ChangeKind, NewChange, SegmentRef, Status, Timeline};

const TABLE: &str = "subscription_changes";

/// Default bound on one ClickHouse round trip.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(60);

/// What [`SubscriptionStore::record`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Recorded {
    /// The change was valid and is now in the log.
    Written(Change),
    /// A change with this id and content was already in the log (as returned); nothing
    /// was written.
    AlreadyRecorded(Change),
}

impl Recorded {
    pub fn change(&self) -> &Change {
        match self {
            Recorded::Written(c) | Recorded::AlreadyRecorded(c) => c,
        }
    }
}

/// One row of `subscription_changes`, by position (the server is too old for the crate's
/// schema check). `kind` is the `Enum8` code.
#[derive(Debug, Clone, clickhouse::Row, Serialize, Deserialize)]
struct ChangeRow {
    tenant: String,
    customer: String,
    change_id: String,
    kind: i8,
    #[serde(with = "clickhouse::serde::time::datetime")]
    effective_at: OffsetDateTime,
    #[serde(with = "clickhouse::serde::time::datetime")]
    recorded_at: OffsetDateTime,
    plan: String,
    version: u32,
    #[serde(with = "clickhouse::serde::time::datetime")]
    billing_anchor: OffsetDateTime,
    actor: String,
    reason: String,
    migration_id: String,
}

/// One row of `plan_versions` (V12).
#[derive(Debug, Clone, clickhouse::Row, Serialize, Deserialize)]
struct PlanVersionRow {
    plan: String,
    version: u32,
    digest: String,
    #[serde(with = "clickhouse::serde::time::datetime")]
    first_seen: OffsetDateTime,
}

/// `Enum8('create' = 1, 'change' = 2, 'cancel' = 3, 'migrate' = 4)` in the migration.
fn kind_code(kind: ChangeKind) -> i8 {
    match kind {
        ChangeKind::Create => 1,
        ChangeKind::Change => 2,
        ChangeKind::Cancel => 3,
        ChangeKind::Migrate => 4,
    }
}

impl ChangeRow {
    fn from_change(c: &Change) -> ChangeRow {
        ChangeRow {
            tenant: c.tenant.clone(),
            customer: c.customer.clone(),
            change_id: c.change_id.clone(),
            kind: kind_code(c.kind),
            effective_at: c.effective_at,
            recorded_at: c.recorded_at,
            plan: c.plan.clone(),
            version: c.version,
            billing_anchor: c.billing_anchor,
            actor: c.actor.clone(),
            reason: c.reason.clone(),
            migration_id: c.migration_id.clone(),
        }
    }

    fn into_change(self) -> Result<Change> {
        let kind = match self.kind {
            1 => ChangeKind::Create,
            2 => ChangeKind::Change,
            3 => ChangeKind::Cancel,
            4 => ChangeKind::Migrate,
            other => {
                return Err(Error::ClickHouse(clickhouse::error::Error::Custom(
                    format!("{TABLE}.kind: unknown code {other}"),
                )))
            }
        };
        Ok(Change {
            tenant: self.tenant,
            customer: self.customer,
            change_id: self.change_id,
            kind,
            effective_at: self.effective_at,
            recorded_at: self.recorded_at,
            plan: self.plan,
            version: self.version,
            billing_anchor: self.billing_anchor,
            actor: self.actor,
            reason: self.reason,
            migration_id: self.migration_id,
        })
    }
}

/// Reads and appends subscription changes of any tenant.
#[derive(Clone)]
pub struct SubscriptionStore {
    client: Client,
    timeout: Duration,
}

impl SubscriptionStore {
    /// A store on the configured database, which must hold the migrations
    /// (`tally-rater migrate`).
    pub fn new(config: &ClickHouseConfig) -> SubscriptionStore {
        SubscriptionStore {
            // A batch of customers travels in the statement: allow large statements.
            client: tally_aggregator::migrate::client(config)
                .with_setting("max_query_size", (256u64 << 20).to_string()),
            timeout: DEFAULT_TIMEOUT,
        }
    }

    /// Bounds every round trip by `timeout` instead of [`DEFAULT_TIMEOUT`].
    pub fn with_timeout(mut self, timeout: Duration) -> SubscriptionStore {
        self.timeout = timeout;
        self
    }

    async fn bounded<T>(&self, f: impl Future<Output = Result<T>>) -> Result<T> {
        tokio::time::timeout(self.timeout, f)
            .await
            .map_err(|_| Error::Timeout(self.timeout))?
    }

    /// Checks the catalog against the plan versions already published (`plan_versions`,
    /// V12) and records the new ones with their digests, first seen `now`. A version whose
    /// file changed since it was published is refused ([`Error::PlanVersionChanged`]):
    /// invoices and entitlements already computed from it would no longer be reproducible.
    /// Returns how many versions were new.
    pub async fn publish_plans(&self, catalog: &Catalog, now: OffsetDateTime) -> Result<usize> {
        let rows: Vec<PlanVersionRow> = self
            .bounded(async {
                Ok(self
                    .client
                    .query(
                        "SELECT plan, version, digest, first_seen FROM plan_versions \
                         ORDER BY plan, version, first_seen, digest",
                    )
                    .fetch_all()
                    .await?)
            })
            .await?;
        let mut published: BTreeMap<(String, u32), PlanVersionRow> = BTreeMap::new();
        for r in rows {
            published.entry((r.plan.clone(), r.version)).or_insert(r);
        }
        let mut new = Vec::new();
        for plan in catalog.plans() {
            for v in catalog.versions(plan) {
                match published.get(&(plan.to_owned(), v.version())) {
                    Some(p) if p.digest != v.digest() => {
                        return Err(Error::PlanVersionChanged {
                            file: v.file().to_path_buf(),
                            plan: plan.to_owned(),
                            version: v.version(),
                            published: p.digest.clone(),
                            first_seen: p.first_seen,
                            found: v.digest().to_owned(),
                        })
                    }
                    Some(_) => {}
                    None => new.push(PlanVersionRow {
                        plan: plan.to_owned(),
                        version: v.version(),
                        digest: v.digest().to_owned(),
                        first_seen: whole_seconds(now),
                    }),
                }
            }
        }
        if !new.is_empty() {
            self.bounded(async {
                let mut insert = self
                    .client
                    .insert::<PlanVersionRow>("plan_versions")
                    .await?;
                for row in &new {
                    insert.write(row).await?;
                }
                insert.end().await?;
                Ok(())
            })
            .await?;
        }
        Ok(new.len())
    }

    /// Records one change for its customer, now (`recorded_at` is this machine's clock).
    /// See [`SubscriptionStore::record_at`].
    pub async fn record(&self, catalog: &Catalog, change: NewChange) -> Result<Recorded> {
        self.record_at(catalog, change, OffsetDateTime::now_utc())
            .await
    }

    /// Records one change with `recorded_at` as its record time: reads the customer's
    /// log, returns the change already there if its id is (same content) or refuses it (other
    /// content), otherwise validates it against the log and the catalog and inserts it. A
    /// refused change writes nothing.
    pub async fn record_at(
        &self,
        catalog: &Catalog,
        change: NewChange,
        recorded_at: OffsetDateTime,
    ) -> Result<Recorded> {
        let timeline = Timeline::new(
            &change.customer,
            self.history(&change.tenant, &change.customer).await?,
        );
        match timeline.admit(change, catalog, recorded_at)? {
            Admission::Duplicate(existing) => Ok(Recorded::AlreadyRecorded(existing)),
            Admission::New(change) => {
                let row = ChangeRow::from_change(&change);
                self.bounded(async {
                    let mut insert = self.client.insert::<ChangeRow>(TABLE).await?;
                    insert.write(&row).await?;
                    insert.end().await?;
                    Ok(())
                })
                .await?;
                tracing::info!(
                    tenant = %change.tenant,
                    change_id = %change.change_id,
                    kind = %change.kind,
                    "subscription change recorded"
                );
                Ok(Recorded::Written(change))
            }
        }
    }

    /// One customer's audit trail: every change once, in the order they apply (effective
    /// time, then record time, then id).
    pub async fn history(&self, tenant: &str, customer: &str) -> Result<Vec<Change>> {
        let rows: Vec<ChangeRow> = self
            .bounded(async {
                Ok(self
                    .client
                    .query("SELECT ?fields FROM subscription_changes WHERE tenant = ? AND customer = ?")
                    .bind(tenant)
                    .bind(customer)
                    .fetch_all()
                    .await?)
            })
            .await?;
        let changes = rows
            .into_iter()
            .map(ChangeRow::into_change)
            .collect::<Result<Vec<_>>>()?;
        Ok(Timeline::new(customer, changes).into_changes())
    }

    /// Every customer of `tenant` with a subscription log, and where it stands at `at`
    /// (pass the current time for "now"), by customer.
    pub async fn list(&self, tenant: &str, at: OffsetDateTime) -> Result<Vec<Status>> {
        let mut out = Vec::new();
        self.fold(
            "SELECT ?fields FROM subscription_changes WHERE tenant = ? ORDER BY customer",
            tenant,
            None,
            None,
            |t| out.extend(t.status(at)),
        )
        .await?;
        Ok(out)
    }

    /// Every customer's timeline of `tenant`, in customer order, handed to `each`: one
    /// streamed query over the tenant's change log.
    pub async fn timelines(&self, tenant: &str, each: impl FnMut(Timeline)) -> Result<()> {
        self.fold(
            "SELECT ?fields FROM subscription_changes WHERE tenant = ? ORDER BY customer",
            tenant,
            None,
            None,
            each,
        )
        .await
    }

    /// The plan segments of `[from, to)` for each of `customers`, in one query: every
    /// customer asked for is a key, with no segments if nothing was in force.
    pub async fn segments(
        &self,
        tenant: &str,
        customers: &[String],
        from: OffsetDateTime,
        to: OffsetDateTime,
    ) -> Result<BTreeMap<String, Vec<SegmentRef>>> {
        let mut out: BTreeMap<String, Vec<SegmentRef>> =
            customers.iter().map(|c| (c.clone(), Vec::new())).collect();
        if customers.is_empty() || from >= to {
            return Ok(out);
        }
        self.fold(
            "SELECT ?fields FROM subscription_changes \
             WHERE tenant = ? AND customer IN (SELECT arrayJoin(?)) \
             AND effective_at <= toDateTime(?, 'UTC') ORDER BY customer",
            tenant,
            Some(customers),
            Some(to),
            |t| {
                if let Some(segments) = out.get_mut(t.customer()) {
                    *segments = t.segments(from, to);
                }
            },
        )
        .await?;
        Ok(out)
    }

    /// Customers of `tenant` with a plan version in force at some instant of
    /// `[from, to)`, sorted; one query.
    pub async fn customers_with_subscriptions(
        &self,
        tenant: &str,
        from: OffsetDateTime,
        to: OffsetDateTime,
    ) -> Result<Vec<String>> {
        let mut out = Vec::new();
        if from >= to {
            return Ok(out);
        }
        self.fold(
            "SELECT ?fields FROM subscription_changes \
             WHERE tenant = ? AND effective_at <= toDateTime(?, 'UTC') ORDER BY customer",
            tenant,
            None,
            Some(to),
            |t| {
                if !t.segments(from, to).is_empty() {
                    out.push(t.customer().to_owned());
                }
            },
        )
        .await?;
        Ok(out)
    }

    /// Streams the rows of one query (ordered by customer) and hands each customer's
    /// timeline to `each`. Binds, in order: the tenant, the customers if any, and `until`
    /// (as whole seconds, rounded down: changes after it cannot affect instants before it).
    async fn fold(
        &self,
        sql: &str,
        tenant: &str,
        customers: Option<&[String]>,
        until: Option<OffsetDateTime>,
        mut each: impl FnMut(Timeline),
    ) -> Result<()> {
        let mut query = self.client.query(sql).bind(tenant);
        if let Some(customers) = customers {
            query = query.bind(customers);
        }
        if let Some(until) = until {
            let seconds = until.unix_timestamp().clamp(0, i64::from(u32::MAX));
            query = query.bind(seconds);
        }
        self.bounded(async {
            let mut cursor = query.fetch::<ChangeRow>()?;
            let mut customer: Option<String> = None;
            let mut changes: Vec<Change> = Vec::new();
            while let Some(row) = cursor.next().await? {
                if customer.as_deref() != Some(row.customer.as_str()) {
                    if let Some(done) = customer.replace(row.customer.clone()) {
                        each(Timeline::new(&done, std::mem::take(&mut changes)));
                    }
                }
                changes.push(row.into_change()?);
            }
            if let Some(done) = customer {
                each(Timeline::new(&done, changes));
            }
            Ok(())
        })
        .await
    }
}

// Plan-version migrations: the bulk writer of `migrate` changes and its audit record
// (`plan_migrations`, `V6__plan_migrations.sql`).

const MIGRATIONS: &str = "plan_migrations";

/// Change rows per insert of a migration.
pub const DEFAULT_MIGRATION_BATCH: usize = 100_000;

/// How far a migration got; each step is one row of `plan_migrations`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum MigrationState {
    /// The instant subscriptions are judged at is fixed; change rows may be partly written.
    Started,
    /// Every change row is written; notifications are not all acknowledged.
    Written,
    /// Done: every notification chunk was acknowledged.
    Notified,
}

impl MigrationState {
    fn code(self) -> i8 {
        match self {
            MigrationState::Started => 1,
            MigrationState::Written => 2,
            MigrationState::Notified => 3,
        }
    }

    fn from_code(code: i8) -> Result<MigrationState> {
        match code {
            1 => Ok(MigrationState::Started),
            2 => Ok(MigrationState::Written),
            3 => Ok(MigrationState::Notified),
            other => Err(Error::ClickHouse(clickhouse::error::Error::Custom(
                format!("{MIGRATIONS}.state: unknown code {other}"),
            ))),
        }
    }
}

/// The latest step of a migration's audit record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct MigrationRecord {
    pub id: String,
    pub tenant: String,
    pub plan: String,
    /// Empty: every version older than `to_version`.
    pub from_versions: Vec<u32>,
    pub to_version: u32,
    /// Empty: every subscriber.
    pub customers: Vec<String>,
    pub effective: String,
    pub actor: String,
    pub reason: String,
    pub state: MigrationState,
    #[serde(with = "time::serde::rfc3339")]
    pub as_of: OffsetDateTime,
    pub affected: u64,
    /// JSON: per group, from/to version, count and effective range.
    pub groups: String,
    #[serde(with = "time::serde::rfc3339")]
    pub started_at: OffsetDateTime,
    #[serde(with = "time::serde::rfc3339")]
    pub recorded_at: OffsetDateTime,
}

#[derive(Debug, Clone, clickhouse::Row, Serialize, Deserialize)]
struct MigrationRow {
    id: String,
    tenant: String,
    plan: String,
    from_versions: Vec<u32>,
    to_version: u32,
    customers: Vec<String>,
    effective: String,
    actor: String,
    reason: String,
    state: i8,
    #[serde(with = "clickhouse::serde::time::datetime")]
    as_of: OffsetDateTime,
    affected: u64,
    groups: String,
    written: u64,
    #[serde(with = "clickhouse::serde::time::datetime")]
    started_at: OffsetDateTime,
    #[serde(with = "clickhouse::serde::time::datetime")]
    recorded_at: OffsetDateTime,
}

/// One customer's state as the migration query returns it; `kind` is the `Enum8` code.
#[derive(Debug, Clone, clickhouse::Row, Deserialize)]
struct CurrentRow {
    customer: String,
    kind: i8,
    plan: String,
    version: u32,
    #[serde(with = "clickhouse::serde::time::datetime")]
    billing_anchor: OffsetDateTime,
    #[serde(with = "clickhouse::serde::time::datetime")]
    last_effective: OffsetDateTime,
}

/// How a run writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RunOptions {
    /// Change rows per insert.
    pub batch_rows: usize,
    /// Write at most this many change rows, then stop as if killed (result
    /// [`RunResult::Interrupted`]): a staged rollout, or a test of resuming.
    pub stop_after: Option<u64>,
}

impl Default for RunOptions {
    fn default() -> RunOptions {
        RunOptions {
            batch_rows: DEFAULT_MIGRATION_BATCH,
            stop_after: None,
        }
    }
}

/// What a migration run did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum RunResult {
    /// Every change is written and every notification acknowledged.
    Done,
    /// It was done before this run; nothing was written or sent.
    AlreadyDone,
    /// Stopped at `stop_after`; run it again to finish.
    Interrupted,
}

/// The outcome of [`SubscriptionStore::run_migration`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct MigrationReport {
    pub id: String,
    pub result: RunResult,
    /// The plan; for [`RunResult::AlreadyDone`], the recorded counts only (`groups` empty).
    pub preview: MigrationPreview,
    /// Change rows this run inserted.
    pub written: u64,
    /// Change rows an earlier, interrupted run had inserted.
    pub already_written: u64,
    /// Notification messages acknowledged.
    pub published: usize,
}

impl MigrationRow {
    fn into_record(self) -> Result<MigrationRecord> {
        Ok(MigrationRecord {
            state: MigrationState::from_code(self.state)?,
            id: self.id,
            tenant: self.tenant,
            plan: self.plan,
            from_versions: self.from_versions,
            to_version: self.to_version,
            customers: self.customers,
            effective: self.effective,
            actor: self.actor,
            reason: self.reason,
            as_of: self.as_of,
            affected: self.affected,
            groups: self.groups,
            started_at: self.started_at,
            recorded_at: self.recorded_at,
        })
    }
}

fn whole_seconds(t: OffsetDateTime) -> OffsetDateTime {
    t.replace_nanosecond(0).unwrap_or(t)
}

/// Refuses a recorded migration whose spec differs from `spec`.
fn same_spec(record: &MigrationRecord, spec: &MigrationSpec) -> Result<()> {
    let reused = |field, recorded: String| {
        Err(Error::MigrationIdReused {
            id: spec.id.clone(),
            field,
            recorded,
        })
    };
    if record.plan != spec.plan {
        return reused("plan", record.plan.clone());
    }
    if record.to_version != spec.to_version {
        return reused("to_version", format!("v{}", record.to_version));
    }
    if record.from_versions != spec.from_versions.clone().unwrap_or_default() {
        return reused("from_versions", format!("{:?}", record.from_versions));
    }
    if record.customers != spec.customers.clone().unwrap_or_default() {
        return reused("customers", format!("{} customers", record.customers.len()));
    }
    if record.effective != spec.effective.text() {
        return reused("effective", record.effective.clone());
    }
    Ok(())
}

impl SubscriptionStore {
    /// The latest step recorded for migration `id` of `tenant`, if any.
    pub async fn migration_record(
        &self,
        tenant: &str,
        id: &str,
    ) -> Result<Option<MigrationRecord>> {
        let row: Option<MigrationRow> = self
            .bounded(async {
                Ok(self
                    .client
                    .query(
                        "SELECT ?fields FROM plan_migrations WHERE tenant = ? AND id = ? \
                         ORDER BY state DESC, recorded_at DESC LIMIT 1",
                    )
                    .bind(tenant)
                    .bind(id)
                    .fetch_optional()
                    .await?)
            })
            .await?;
        row.map(MigrationRow::into_record).transpose()
    }

    /// Where each subscription of `spec`'s tenant that is on `spec.plan` at `as_of` stands,
    /// in one query: the change in force (the latest by effective time, record time and id,
    /// as the fold orders them) and the latest instant recorded. Rows `spec` itself wrote are
    /// left out, so a resumed run plans what the first one did.
    async fn current_on_plan(
        &self,
        spec: &MigrationSpec,
        as_of: OffsetDateTime,
    ) -> Result<Vec<Current>> {
        let filter = if spec.customers.is_some() {
            "AND customer IN (SELECT arrayJoin(?))"
        } else {
            ""
        };
        let sql = format!(
            "WITH toDateTime(?, 'UTC') AS as_of \
             SELECT customer, \
                 argMaxIf(kind, (effective_at, recorded_at, change_id), effective_at <= as_of) AS k, \
                 argMaxIf(plan, (effective_at, recorded_at, change_id), effective_at <= as_of) AS p, \
                 argMaxIf(version, (effective_at, recorded_at, change_id), effective_at <= as_of) AS v, \
                 argMaxIf(billing_anchor, (effective_at, recorded_at, change_id), effective_at <= as_of) AS a, \
                 max(effective_at) AS last \
             FROM subscription_changes \
             WHERE tenant = ? AND migration_id != ? {filter} \
             GROUP BY customer \
             HAVING countIf(effective_at <= as_of) > 0 AND p = ? AND k != 'cancel'"
        );
        let mut query = self
            .client
            .query(&sql)
            .bind(as_of.unix_timestamp().clamp(0, i64::from(u32::MAX)))
            .bind(&spec.tenant)
            .bind(&spec.id);
        if let Some(customers) = &spec.customers {
            query = query.bind(customers);
        }
        let query = query.bind(&spec.plan);
        let rows: Vec<CurrentRow> = self.bounded(async { Ok(query.fetch_all().await?) }).await?;
        rows.into_iter()
            .map(|r| {
                let kind = match r.kind {
                    1 => ChangeKind::Create,
                    2 => ChangeKind::Change,
                    3 => ChangeKind::Cancel,
                    4 => ChangeKind::Migrate,
                    other => {
                        return Err(Error::ClickHouse(clickhouse::error::Error::Custom(
                            format!("{TABLE}.kind: unknown code {other}"),
                        )))
                    }
                };
                Ok(Current {
                    customer: r.customer,
                    kind,
                    plan: r.plan,
                    version: r.version,
                    billing_anchor: r.billing_anchor,
                    last_effective: r.last_effective,
                })
            })
            .collect()
    }

    /// Plans `spec` as of its recorded instant, or `now` if it never ran.
    async fn plan_migration(
        &self,
        catalog: &Catalog,
        spec: &MigrationSpec,
        now: OffsetDateTime,
    ) -> Result<(MigrationPlan, Option<MigrationRecord>)> {
        spec.validate(catalog)?;
        let record = self.migration_record(&spec.tenant, &spec.id).await?;
        if let Some(r) = &record {
            same_spec(r, spec)?;
        }
        let as_of = record.as_ref().map_or(whole_seconds(now), |r| r.as_of);
        let candidates = self.current_on_plan(spec, as_of).await?;
        Ok((migration::plan(spec, catalog, candidates, as_of)?, record))
    }

    /// What `spec` would move, judged at `now` (or at the instant a run of it recorded):
    /// one query, nothing written.
    pub async fn preview_migration(
        &self,
        catalog: &Catalog,
        spec: &MigrationSpec,
        now: OffsetDateTime,
    ) -> Result<MigrationPreview> {
        Ok(self.plan_migration(catalog, spec, now).await?.0.preview())
    }

    /// Runs `spec`: records its start (fixing the instant it judges subscriptions at),
    /// writes one `migrate` change per moving subscription (change id
    /// [`MigrationSpec::change_id`]; those an interrupted run already wrote are found in one
    /// query and skipped), records it written, publishes the entitlement changes, and
    /// records it notified. Each step is resumable: run the same spec again after a kill or a
    /// failed publish. A migration already notified writes and sends nothing.
    ///
    /// Changes are not checked one by one against the full log as [`Self::record`] does:
    /// the planning rules are the same ones (active on the plan, nothing recorded after the
    /// move), judged from one aggregate query, and writers racing a migration for the same
    /// customer are not coordinated (see the module notes).
    pub async fn run_migration(
        &self,
        catalog: &Catalog,
        spec: &MigrationSpec,
        notifier: &Notifier,
        options: RunOptions,
        now: OffsetDateTime,
    ) -> Result<MigrationReport> {
        let now = whole_seconds(now);
        let (plan, record) = self.plan_migration(catalog, spec, now).await?;
        let preview = plan.preview();
        let report = |result, written, already_written, published| MigrationReport {
            id: spec.id.clone(),
            result,
            preview: preview.clone(),
            written,
            already_written,
            published,
        };
        let state = record.as_ref().map(|r| r.state);
        if state == Some(MigrationState::Notified) {
            return Ok(report(RunResult::AlreadyDone, 0, plan.total(), 0));
        }
        let started_at = record.as_ref().map_or(now, |r| r.started_at);
        let groups_json = serde_json::to_string(
            &preview
                .groups
                .iter()
                .map(|g| {
                    serde_json::json!({
                        "from_version": g.from_version,
                        "to_version": g.to_version,
                        "count": g.count,
                        "effective_min": g.effective_min.map(|t| t.unix_timestamp()),
                        "effective_max": g.effective_max.map(|t| t.unix_timestamp()),
                    })
                })
                .collect::<Vec<_>>(),
        )
        .unwrap_or_default();
        let step = |state: MigrationState, written: u64| MigrationRow {
            id: spec.id.clone(),
            tenant: spec.tenant.clone(),
            plan: spec.plan.clone(),
            from_versions: spec.from_versions.clone().unwrap_or_default(),
            to_version: spec.to_version,
            customers: spec.customers.clone().unwrap_or_default(),
            effective: spec.effective.text(),
            actor: spec.actor.clone(),
            reason: spec.reason.clone(),
            state: state.code(),
            as_of: plan.as_of,
            affected: if state == MigrationState::Started {
                0
            } else {
                plan.total()
            },
            groups: if state == MigrationState::Started {
                "[]".into()
            } else {
                groups_json.clone()
            },
            written,
            started_at,
            recorded_at: whole_seconds(OffsetDateTime::now_utc()),
        };
        if record.is_none() {
            self.insert_step(step(MigrationState::Started, 0)).await?;
        }

        let (mut written, mut already_written) = (0u64, 0u64);
        if state < Some(MigrationState::Written) {
            let present = self.migration_change_ids(&spec.tenant, &spec.id).await?;
            let mut batch: Vec<ChangeRow> = Vec::with_capacity(options.batch_rows.max(1));
            let mut stopped = false;
            'groups: for g in &plan.groups {
                for m in &g.moves {
                    let change_id = spec.change_id(&m.customer);
                    if present.contains(&change_id) {
                        already_written += 1;
                        continue;
                    }
                    if options
                        .stop_after
                        .is_some_and(|cap| written + batch.len() as u64 >= cap)
                    {
                        stopped = true;
                        break 'groups;
                    }
                    batch.push(ChangeRow {
                        tenant: spec.tenant.clone(),
                        customer: m.customer.clone(),
                        change_id,
                        kind: kind_code(ChangeKind::Migrate),
                        effective_at: m.effective_at,
                        recorded_at: now,
                        plan: spec.plan.clone(),
                        version: g.to_version,
                        billing_anchor: m.billing_anchor,
                        actor: spec.actor.clone(),
                        reason: spec.reason.clone(),
                        migration_id: spec.id.clone(),
                    });
                    if batch.len() >= options.batch_rows.max(1) {
                        written += self.insert_changes(&mut batch).await?;
                    }
                }
            }
            written += self.insert_changes(&mut batch).await?;
            tracing::info!(
                tenant = %spec.tenant,
                migration = %spec.id,
                written,
                already_written,
                "migration changes written"
            );
            if stopped {
                return Ok(report(RunResult::Interrupted, written, already_written, 0));
            }
            self.insert_step(step(MigrationState::Written, written))
                .await?;
        } else {
            already_written = plan.total();
        }

        let messages = migration::notifications(spec, &plan);
        let published = notifier.publish(&messages).await.map_err(|e| {
            Error::Kafka(format!(
                "migration {:?}: changes written, entitlement changes not published (run it \
                 again to publish): {e}",
                spec.id
            ))
        })?;
        self.insert_step(step(MigrationState::Notified, written))
            .await?;
        tracing::info!(
            tenant = %spec.tenant,
            migration = %spec.id,
            published,
            topic = notifier.topic(),
            "migration notified"
        );
        Ok(report(RunResult::Done, written, already_written, published))
    }

    /// Change ids migration `id` already wrote for `tenant`, in one query.
    async fn migration_change_ids(&self, tenant: &str, id: &str) -> Result<HashSet<String>> {
        let ids: Vec<String> = self
            .bounded(async {
                Ok(self
                    .client
                    .query(
                        "SELECT change_id FROM subscription_changes \
                         WHERE tenant = ? AND migration_id = ?",
                    )
                    .bind(tenant)
                    .bind(id)
                    .fetch_all()
                    .await?)
            })
            .await?;
        Ok(ids.into_iter().collect())
    }

    /// Inserts and empties `batch`, in one insert; returns how many rows it held.
    async fn insert_changes(&self, batch: &mut Vec<ChangeRow>) -> Result<u64> {
        if batch.is_empty() {
            return Ok(0);
        }
        self.bounded(async {
            let mut insert = self.client.insert::<ChangeRow>(TABLE).await?;
            for row in batch.iter() {
                insert.write(row).await?;
            }
            insert.end().await?;
            Ok(())
        })
        .await?;
        let n = batch.len() as u64;
        batch.clear();
        Ok(n)
    }

    async fn insert_step(&self, row: MigrationRow) -> Result<()> {
        self.bounded(async {
            let mut insert = self.client.insert::<MigrationRow>(MIGRATIONS).await?;
            insert.write(&row).await?;
            insert.end().await?;
            Ok(())
        })
        .await
    }
}
