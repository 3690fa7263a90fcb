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

use std::collections::BTreeMap;
use std::future::Future;
use std::time::Duration;

use clickhouse::Client;
use serde::{Deserialize, Serialize};
use tally_core::config::ClickHouseConfig;
use time::OffsetDateTime;

use crate::error::{Error, Result};
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
