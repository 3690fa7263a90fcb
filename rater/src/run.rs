//! Invoice runs: a batch of customers' periods and plan segments, their usage in two
//! queries at most, their invoices; final invoices stored once in ClickHouse.
//!
//! A *preview* prices a period to date and stores nothing. A *final* run prices a closed
//! period and writes each invoice that is not stored yet: its lines to `invoice_lines`, then
//! its header to `invoices`, each in one insert per batch and both under the batch's run id.
//! Each value is stored once: a line's columns plus, as JSON, its fields without a column
//! (tier breakdown included); the header's columns plus, as JSON, what they do not hold;
//! both JSONs by position ([`crate::stored`] has the layouts, old and new). An
//! invoice's id is its tenant, customer and period start, so running a final run again finds
//! every invoice stored and writes nothing; what it returns for them is rebuilt from the
//! header and the lines of the header's run, and serializes to the bytes first returned.
//! Two final runs of the same tenant at once are not coordinated: run one per tenant.
//!
//! With a publisher ([`InvoiceRun::with_publisher`]), a final run then publishes the lines
//! of every invoice of its batch that is stored and not yet published to the invoice-lines
//! topic, and records that in `invoice_publications`: an invoice stored by a run that died
//! before publishing is published by the next run, from its stored bytes. Publishing is at
//! least once (no Kafka transactions): a run killed between publishing and recording
//! publishes the same lines again, which consumers recognise by `line_id`.
//!
//! Usage that reaches a period after its invoice is final is billed on the next final
//! invoice: the issued one is priced again with today's usage and the difference per charge
//! becomes adjustment lines. Only the period just before is looked at, so usage that
//! arrives after the next invoice is final too is not billed.

use std::borrow::Cow;
use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::Arc;
use std::time::Instant;

use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};
use tally_core::config::ClickHouseConfig;
use time::OffsetDateTime;

use crate::invoice::{Invoice, Line, Segment};
use crate::kafka::Notifier;
use crate::metrics::{BATCH_DURATION, INVOICES, PUBLISHED_LINES};
use crate::period::{period_containing, Period};
use crate::plan::{Catalog, ChargeKind};
use crate::store::SubscriptionStore;
use crate::stored::HeaderColumns;
pub use crate::stored::StoredLine;
use crate::subscription::{SegmentRef, State, Status, Timeline};
use crate::usage::{string_list, UsageError, UsageReader, UsageRequest, UsageTable};

/// Why a run failed. Per-customer pricing errors do not fail the run (see [`Priced`]).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RunError {
    #[error(transparent)]
    Usage(#[from] UsageError),
    #[error("clickhouse: {0}")]
    ClickHouse(#[from] clickhouse::error::Error),
    #[error("stored invoice {invoice_id}: {reason}")]
    Stored { invoice_id: String, reason: String },
    #[error(transparent)]
    Rater(#[from] crate::Error),
    #[error("usage read task failed: {0}")]
    Task(String),
}

impl RunError {
    pub fn is_retryable(&self) -> bool {
        match self {
            RunError::Usage(e) => e.is_retryable(),
            RunError::ClickHouse(e) => matches!(
                e,
                clickhouse::error::Error::Network(_) | clickhouse::error::Error::TimedOut
            ),
            RunError::Stored { .. } => false,
            RunError::Rater(e) => e.is_retryable(),
            RunError::Task(_) => false,
        }
    }
}

/// One customer to invoice: the period and the plan segments in force during it, in order
/// and contiguous.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Billable {
    pub customer: String,
    pub period: Period,
    pub segments: Vec<SegmentRef>,
    /// The period whose late usage this invoice adjusts when it is not the one before in
    /// the same anchor: the last period of the old anchor, after a change that anchored the
    /// subscription again (an interval change, a new subscription). `None`: the one before.
    pub previous: Option<Period>,
}

/// A batch's outcome, per customer, in the batch's order.
#[derive(Debug)]
pub struct Priced {
    pub invoices: Vec<Invoice>,
    /// Customers that could not be invoiced, and why (an unknown plan version, segments
    /// that do not fit the period, an amount out of range).
    pub refused: Vec<(String, String)>,
}

/// The customers of `tenant` to invoice for the periods that contain `at`, in batches of at
/// most `batch_size`, in customer order (each batch a contiguous range of the tenant's
/// subscribed customers): each customer's own period (its billing anchor, the interval of
/// the plan version in force at `at`) and the plan segments inside it, all from one streamed
/// read of the tenant's change log. A customer whose subscription was cancelled during that
/// period is included up to the cancel. Customers that cannot be placed are returned with
/// the reason.
pub async fn billables(
    store: &SubscriptionStore,
    catalog: &Catalog,
    tenant: &str,
    at: OffsetDateTime,
    batch_size: usize,
) -> Result<(Vec<Vec<Billable>>, Vec<(String, String)>), RunError> {
    let (mut generations, refused) =
        batched(store, tenant, batch_size, 1, place_at(catalog, at)).await?;
    Ok((generations.pop().unwrap_or_default(), refused))
}

/// Places each customer's period holding `at` (see [`billable`]) in the one generation.
fn place_at(catalog: &Catalog, at: OffsetDateTime) -> impl FnMut(&Timeline, &mut Vec<Placed>) + '_ {
    move |timeline, out| {
        if let Some(placed) = billable(timeline, catalog, at) {
            out.push((0, placed));
        }
    }
}

/// Like [`billables`], but for each customer's latest period that closed `grace` or more
/// before `now` (its own anchor and interval): what a final run may invoice at `now`.
/// Customers with no such period (a first period still open, a subscription cancelled
/// before the period before the current one) are left out.
pub async fn closed_billables(
    store: &SubscriptionStore,
    catalog: &Catalog,
    tenant: &str,
    now: OffsetDateTime,
    grace: time::Duration,
    batch_size: usize,
) -> Result<(Vec<Vec<Billable>>, Vec<(String, String)>), RunError> {
    let (mut generations, refused) =
        closed_generations(store, catalog, tenant, now, grace, 0, batch_size).await?;
    Ok((generations.pop().unwrap_or_default(), refused))
}

/// Like [`closed_billables`], and also up to `catch_up` closed periods before each
/// customer's latest one, from the same read of the change log: one list of batches per
/// generation, oldest first (the last list holds the latest closed periods, the one before
/// the periods just before those, and so on). A customer whose older period cannot be
/// placed is returned with the reason, once, and nothing older is looked at.
pub async fn closed_generations(
    store: &SubscriptionStore,
    catalog: &Catalog,
    tenant: &str,
    now: OffsetDateTime,
    grace: time::Duration,
    catch_up: usize,
    batch_size: usize,
) -> Result<Generations, RunError> {
    batched(store, tenant, batch_size, catch_up + 1, |timeline, out| {
        closed_periods(timeline, catalog, now, grace, catch_up, out)
    })
    .await
}

/// Puts into `out` the customer's latest closed period (see [`last_closed`]) as generation
/// `catch_up`, and each of up to `catch_up` periods before it as the generation below, until
/// one has nothing in force or cannot be placed.
pub fn closed_periods(
    timeline: &Timeline,
    catalog: &Catalog,
    now: OffsetDateTime,
    grace: time::Duration,
    catch_up: usize,
    out: &mut Vec<Placed>,
) {
    let mut placed = last_closed(timeline, catalog, now, grace);
    let mut generation = catch_up;
    while let Some(p) = placed {
        let before = match &p {
            Ok(b) if generation > 0 => Some(b.period.start() - time::Duration::NANOSECOND),
            _ => None,
        };
        out.push((generation, p));
        placed = before.and_then(|at| billable(timeline, catalog, at));
        generation = generation.saturating_sub(1);
    }
}

/// A customer's billable in a generation, or the customer and why it cannot be placed.
pub type Placed = (usize, Result<Billable, (String, String)>);

/// The batches of each generation, and the customers that could not be placed.
pub type Generations = (Vec<Vec<Vec<Billable>>>, Vec<(String, String)>);

/// One streamed read of the tenant's change log; `place` puts each customer's billables
/// into generations `0..generations`, each generation batched in customer order.
async fn batched(
    store: &SubscriptionStore,
    tenant: &str,
    batch_size: usize,
    generations: usize,
    place: impl FnMut(&Timeline, &mut Vec<Placed>),
) -> Result<Generations, RunError> {
    let mut batches: Vec<Vec<Vec<Billable>>> = vec![Vec::new(); generations];
    let refused = batched_each(store, tenant, batch_size, generations, place, |g, batch| {
        batches[g].push(batch)
    })
    .await?;
    Ok((batches, refused))
}

/// Like [`batched`], handing each batch to `emit` (with its generation) as soon as the
/// change log has given all its customers; returns the customers that could not be placed.
async fn batched_each(
    store: &SubscriptionStore,
    tenant: &str,
    batch_size: usize,
    generations: usize,
    mut place: impl FnMut(&Timeline, &mut Vec<Placed>),
    mut emit: impl FnMut(usize, Vec<Billable>),
) -> Result<Vec<(String, String)>, RunError> {
    let batch_size = batch_size.max(1);
    let mut current: Vec<Vec<Billable>> = vec![Vec::new(); generations];
    let mut refused = Vec::new();
    let mut placed = Vec::new();
    store
        .timelines(tenant, |timeline| {
            placed.clear();
            place(&timeline, &mut placed);
            for (generation, p) in placed.drain(..) {
                match p {
                    Err(refusal) => refused.push(refusal),
                    Ok(b) => {
                        let open = &mut current[generation];
                        open.push(b);
                        if open.len() == batch_size {
                            emit(generation, std::mem::take(open));
                        }
                    }
                }
            }
        })
        .await?;
    for (generation, open) in current.into_iter().enumerate() {
        if !open.is_empty() {
            emit(generation, open);
        }
    }
    Ok(refused)
}

/// One customer's latest period that closed `grace` or more before `now`, placed as
/// [`billable`] places it; `None` if there is none.
pub fn last_closed(
    timeline: &Timeline,
    catalog: &Catalog,
    now: OffsetDateTime,
    grace: time::Duration,
) -> Option<Result<Billable, (String, String)>> {
    let cutoff = now - grace;
    // The period holding the cutoff ends after it; the one before is the latest closed.
    let open = match period_at(timeline, catalog, cutoff)? {
        Ok((status, _)) if status.billing_anchor > cutoff => return None,
        Ok((_, open)) => open,
        Err(refusal) => return Some(Err(refusal)),
    };
    match billable(timeline, catalog, open.start() - time::Duration::NANOSECOND)? {
        // A period cut short by a change of anchor closes at that change.
        Ok(b) if b.period.end().min(open.start()) > cutoff => None,
        placed => Some(placed),
    }
}

/// The customer's status at `at` and the period of its anchor and plan interval that holds
/// `at`: `None` with nothing in force yet, the reason when the plan version is unknown or
/// the period out of range.
fn period_at(
    timeline: &Timeline,
    catalog: &Catalog,
    at: OffsetDateTime,
) -> Option<Result<(Status, Period), (String, String)>> {
    let status = timeline.status(at)?;
    if status.state == State::Scheduled {
        return None;
    }
    let Some(plan) = catalog.version(&status.plan, status.version) else {
        return Some(Err((
            status.customer,
            format!("plan {:?} has no version {}", status.plan, status.version),
        )));
    };
    Some(
        match period_containing(status.billing_anchor, plan.interval(), at) {
            Ok(p) => Ok((status, p)),
            Err(e) => Err((status.customer, e.to_string())),
        },
    )
}

/// One customer's billable at `at`, as [`billables`] places it: `None` if no subscription
/// is in force then (none yet, scheduled, or cancelled before that period), or the
/// customer with the reason it cannot be placed.
pub fn billable(
    timeline: &Timeline,
    catalog: &Catalog,
    at: OffsetDateTime,
) -> Option<Result<Billable, (String, String)>> {
    let (status, period) = match period_at(timeline, catalog, at)? {
        Ok(placed) => placed,
        Err(refusal) => return Some(Err(refusal)),
    };
    let previous = match period_at(
        timeline,
        catalog,
        period.start() - time::Duration::NANOSECOND,
    ) {
        Some(Ok((_, p))) if p.anchor() != period.anchor() || p.interval() != period.interval() => {
            Some(p)
        }
        _ => None,
    };
    if status.state != State::Active && status.since <= period.start() {
        // Cancelled during the period before: this one has nothing to price, but usage of
        // that period reaching it after its final invoice is billed here (see
        // `price_final`), as it would be on the next invoice of a customer who stayed.
        let before = Period::nth(period.anchor(), period.interval(), period.index() - 1).ok()?;
        if status.since <= before.start() {
            return None;
        }
        return Some(Ok(Billable {
            customer: status.customer,
            period,
            segments: Vec::new(),
            previous,
        }));
    }
    // A change that anchors the subscription again ends this anchor's periods early.
    let end = timeline
        .anchor_moves(period.start(), status.billing_anchor)
        .map_or(period.end(), |t| t.min(period.end()));
    let segments = timeline
        .segments(period.start(), end)
        .into_iter()
        .filter_map(|s| clip(s, &period))
        .collect();
    Some(Ok(Billable {
        customer: status.customer,
        period,
        segments,
        previous,
    }))
}

/// [`billable`] for one customer, from their change log.
pub async fn billable_of(
    store: &SubscriptionStore,
    catalog: &Catalog,
    tenant: &str,
    customer: &str,
    at: OffsetDateTime,
) -> Result<Option<Result<Billable, (String, String)>>, RunError> {
    let changes = store.history(tenant, customer).await?;
    Ok(billable(&Timeline::new(customer, changes), catalog, at))
}

/// The id of the invoice `b` becomes (see [`invoice_id`]).
fn billable_id(tenant: &str, b: &Billable) -> String {
    format!(
        "{tenant}/{}/{}",
        b.customer,
        b.period.start().unix_timestamp()
    )
}

/// Counts a priced preview batch.
fn count_priced(priced: &Priced) {
    for (outcome, n) in [
        ("priced", priced.invoices.len()),
        ("refused", priced.refused.len()),
    ] {
        metrics::counter!(INVOICES, "mode" => "preview", "outcome" => outcome).increment(n as u64);
    }
}

/// The part of a segment inside a period.
fn clip(s: SegmentRef, period: &Period) -> Option<SegmentRef> {
    let from = s.from.max(period.start());
    let to = s.to.min(period.end());
    (from < to).then_some(SegmentRef { from, to, ..s })
}

/// The invoice id: one final invoice per tenant, customer and period.
pub fn invoice_id(tenant: &str, invoice: &Invoice) -> String {
    format!(
        "{tenant}/{}/{}",
        invoice.customer,
        invoice.period_start.unix_timestamp()
    )
}

/// Usage reads a preview run keeps under way. Each read runs on one ClickHouse thread
/// (`UsageReader`) and reading is most of a preview's time: with one read ahead the server
/// used one core while the rater priced; three keep both cores of the 2-core box busy
/// (a million invoices in 9.4–9.8 s against 12.5–14.5 s with one, 10.1–11.3 s with two;
/// BENCHMARKS.md).
pub const PREVIEW_READS: usize = 3;

/// A previewed batch, priced and counted; `started` is when its turn came.
fn priced_preview(
    catalog: &Catalog,
    batch: &[Billable],
    usage: &UsageTable,
    started: Instant,
) -> Priced {
    let priced = price(catalog, batch, usage);
    count_priced(&priced);
    metrics::histogram!(BATCH_DURATION, "mode" => "preview")
        .record(started.elapsed().as_secs_f64());
    priced
}

/// Prices a batch from usage already read. Pure.
pub fn price(catalog: &Catalog, batch: &[Billable], usage: &UsageTable) -> Priced {
    let mut out = Priced {
        invoices: Vec::with_capacity(batch.len()),
        refused: Vec::new(),
    };
    for b in batch {
        // The period after a cancellation (see `billable`): nothing in force to price.
        if b.segments.is_empty() {
            continue;
        }
        let mut segments = Vec::with_capacity(b.segments.len());
        for (i, s) in b.segments.iter().enumerate() {
            let Some(plan) = catalog.version(&s.plan, s.version) else {
                out.refused.push((
                    b.customer.clone(),
                    format!("plan {:?} has no version {}", s.plan, s.version),
                ));
                break;
            };
            segments.push(Segment {
                from: s.from,
                to: s.to,
                plan,
                usage: usage
                    .get(&(b.customer.clone(), i))
                    .map_or_else(Cow::default, Cow::Borrowed),
            });
        }
        if segments.len() != b.segments.len() {
            continue;
        }
        match Invoice::compute(&b.customer, &b.period, &segments) {
            Ok(inv) => out.invoices.push(inv),
            Err(e) => out.refused.push((b.customer.clone(), e.to_string())),
        }
    }
    out
}

/// The usage reads a batch needs: each customer's segment bounds, and the meters its plan
/// versions price. A customer whose segments are not contiguous is left to [`price`],
/// which refuses it by name.
pub fn requests(catalog: &Catalog, batch: &[Billable]) -> (Vec<UsageRequest>, Vec<String>) {
    let mut meters = BTreeSet::new();
    let mut requests = Vec::with_capacity(batch.len());
    for b in batch {
        let contiguous = b.segments.windows(2).all(|w| w[0].to == w[1].from);
        if b.segments.is_empty() || !contiguous {
            continue;
        }
        for s in &b.segments {
            if let Some(plan) = catalog.version(&s.plan, s.version) {
                for c in plan.charges() {
                    if let ChargeKind::Usage(u) = &c.kind {
                        meters.insert(u.meter.clone());
                    }
                }
            }
        }
        let mut bounds: Vec<OffsetDateTime> = b.segments.iter().map(|s| s.from).collect();
        bounds.extend(b.segments.last().map(|s| s.to));
        requests.push(UsageRequest {
            customer: b.customer.clone(),
            bounds,
        });
    }
    (requests, meters.into_iter().collect())
}

/// Runs invoices against one ClickHouse database.
#[derive(Clone)]
pub struct InvoiceRun {
    client: clickhouse::Client,
    usage: UsageReader,
    publisher: Option<Arc<Notifier>>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, clickhouse::Row)]
struct PublicationRow {
    tenant: String,
    invoice_id: String,
    topic: String,
    period_start: u32,
    lines: u32,
    published_at: u32,
}

/// An invoice header as inserted. `invoice` is the invoice as JSON without its lines, which
/// are the rows of `invoice_lines` with the same `invoice_id` and `run_id`.
#[derive(Debug, Serialize, clickhouse::Row)]
struct HeaderRow<'a> {
    tenant: &'a str,
    customer: &'a str,
    invoice_id: &'a str,
    period_start: u32,
    period_end: u32,
    currency: &'static str,
    subtotal: &'a str,
    total: &'a str,
    invoice: &'a str,
    finalized_at: u32,
    run_id: &'a str,
}

/// An invoice line as inserted: the line's fields with columns of their own, and the
/// others (allowance, billable quantity, prices, tier breakdown, what it adjusts) as JSON in
/// `line`.
#[derive(Debug, Serialize, clickhouse::Row)]
struct LineRow<'a> {
    tenant: &'a str,
    customer: &'a str,
    invoice_id: &'a str,
    period_start: u32,
    line_no: u32,
    segment: i32,
    kind: &'static str,
    charge: &'a str,
    meter: &'a str,
    quantity: &'a str,
    amount: &'a str,
    currency: &'static str,
    line: &'a str,
    run_id: &'a str,
    layout: u8,
}

/// An `invoices` row as read back.
#[derive(Deserialize, clickhouse::Row)]
struct StoredHeaderRow {
    invoice_id: String,
    invoice: String,
    run_id: String,
    columns: HeaderColumns,
}

#[derive(Deserialize, clickhouse::Row)]
struct StoredLineRow {
    invoice_id: String,
    run_id: String,
    line_no: u32,
    stored: StoredLine,
}

/// What a final run did.
#[derive(Debug, Default)]
pub struct Finalized {
    /// Every invoice of the batch as stored, newly written or not, in the batch's order.
    /// Serialized, an invoice read back from storage is byte for byte the one written.
    pub invoices: Vec<Invoice>,
    pub written: usize,
    pub already_final: usize,
    /// Invoices whose lines this run published (none without a publisher).
    pub published: usize,
    /// Lines published.
    pub published_lines: usize,
    pub refused: Vec<(String, String)>,
}

/// What [`InvoiceRun::finalize_closed`] did for one tenant.
#[derive(Debug, Default)]
pub struct ClosedRun {
    /// Closed periods found final already (and published, with a publisher): not read again.
    pub skipped: usize,
    pub written: usize,
    pub already_final: usize,
    pub published: usize,
    pub published_lines: usize,
    pub refused: Vec<(String, String)>,
}

/// A batch of a final run once its reads are done.
struct Prepared {
    ids: Vec<String>,
    stored: HashMap<String, Invoice>,
    /// The customers with no stored invoice, and their usage.
    pending: Vec<Billable>,
    usage: UsageTable,
    /// Customer → (id, issued invoice) of the period before, for those that have one.
    issued: HashMap<String, (String, Invoice)>,
    /// Those periods again, with the usage stored now.
    again: Vec<Billable>,
    again_usage: UsageTable,
}

/// A batch priced, to store.
struct ToStore {
    ids: Vec<String>,
    stored: HashMap<String, Invoice>,
    fresh: Vec<(String, Invoice)>,
    refused: Vec<(String, String)>,
}

/// Final runs of this process, for unique run ids.
static RUNS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// An id for one batch's inserts, unique across processes and restarts.
fn run_id() -> String {
    format!(
        "{:x}-{:x}-{:x}",
        OffsetDateTime::now_utc().unix_timestamp_nanos(),
        std::process::id(),
        RUNS.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    )
}

impl InvoiceRun {
    pub fn new(config: &ClickHouseConfig, usage: UsageReader) -> InvoiceRun {
        let client = clickhouse::Client::default()
            .with_url(&config.url)
            .with_user(&config.user)
            .with_password(&config.password)
            .with_database(&config.database)
            .with_validation(false);
        InvoiceRun {
            client,
            usage,
            publisher: None,
        }
    }

    /// Final runs publish final invoices' lines through `publisher` (to its topic).
    pub fn with_publisher(mut self, publisher: Notifier) -> InvoiceRun {
        self.publisher = Some(Arc::new(publisher));
        self
    }

    /// Prices a batch with usage read now (two queries at most). Stores nothing.
    pub async fn preview(
        &self,
        catalog: &Catalog,
        tenant: &str,
        batch: &[Billable],
    ) -> Result<Priced, RunError> {
        let (requests, meters) = requests(catalog, batch);
        let meters: Vec<&str> = meters.iter().map(String::as_str).collect();
        let usage = self.usage.read(tenant, &meters, &requests).await?;
        let priced = price(catalog, batch, &usage);
        count_priced(&priced);
        Ok(priced)
    }

    /// Reads a batch's usage on a task of its own.
    fn spawn_read(
        &self,
        catalog: &Catalog,
        tenant: &str,
        batch: &[Billable],
    ) -> tokio::task::JoinHandle<Result<UsageTable, UsageError>> {
        let (requests, meters) = requests(catalog, batch);
        let (usage, tenant) = (self.usage.clone(), tenant.to_owned());
        tokio::spawn(async move {
            let meters: Vec<&str> = meters.iter().map(String::as_str).collect();
            usage.read(&tenant, &meters, &requests).await
        })
    }

    /// Previews every batch in order, handing each batch's outcome to `each`: the next
    /// [`PREVIEW_READS`] batches' usage is read (by ClickHouse, on tasks of their own)
    /// while this one is priced.
    pub async fn previews(
        &self,
        catalog: &Catalog,
        tenant: &str,
        batches: &[Vec<Billable>],
        mut each: impl FnMut(Priced),
    ) -> Result<(), RunError> {
        let read = |batch: &[Billable]| self.spawn_read(catalog, tenant, batch);
        let mut pending: std::collections::VecDeque<_> = batches
            .iter()
            .take(PREVIEW_READS)
            .map(|b| read(b))
            .collect();
        for (i, batch) in batches.iter().enumerate() {
            let Some(next) = pending.pop_front() else {
                break;
            };
            let started = Instant::now();
            let usage = next.await.map_err(|e| RunError::Task(e.to_string()))??;
            if let Some(b) = batches.get(i + PREVIEW_READS) {
                pending.push_back(read(b));
            }
            each(priced_preview(catalog, batch, &usage, started));
        }
        Ok(())
    }

    /// Previews every customer's period holding `at`, as [`billables`] followed by
    /// [`previews`](Self::previews) would, with the two overlapped: the change log is read
    /// on a task of its own, and each batch's usage read starts as soon as the log has given
    /// all its customers. Batches are handed to `each` in customer order. Returns the
    /// customers that could not be placed, with the reason.
    pub async fn preview_all(
        &self,
        store: &SubscriptionStore,
        catalog: &Catalog,
        tenant: &str,
        at: OffsetDateTime,
        batch_size: usize,
        mut each: impl FnMut(Priced),
    ) -> Result<Vec<(String, String)>, RunError> {
        let (sender, mut batches) = tokio::sync::mpsc::unbounded_channel::<Vec<Billable>>();
        let placing = {
            let (store, plans, tenant) = (store.clone(), catalog.clone(), tenant.to_owned());
            tokio::spawn(async move {
                let place = place_at(&plans, at);
                batched_each(&store, &tenant, batch_size, 1, place, |_, batch| {
                    // The receiver is gone only when the run already failed.
                    let _ = sender.send(batch);
                })
                .await
            })
        };
        let read = |batch: &[Billable]| self.spawn_read(catalog, tenant, batch);
        let mut pending = std::collections::VecDeque::new();
        let mut open = true;
        loop {
            // Up to PREVIEW_READS reads under way; wait for a batch only with none.
            while open && pending.len() < PREVIEW_READS {
                let next = if pending.is_empty() {
                    batches.recv().await
                } else {
                    match batches.try_recv() {
                        Ok(batch) => Some(batch),
                        Err(tokio::sync::mpsc::error::TryRecvError::Empty) => break,
                        Err(tokio::sync::mpsc::error::TryRecvError::Disconnected) => None,
                    }
                };
                match next {
                    Some(batch) => {
                        let reading = read(&batch);
                        pending.push_back((batch, reading));
                    }
                    None => open = false,
                }
            }
            let Some((batch, reading)) = pending.pop_front() else {
                break;
            };
            let started = Instant::now();
            let usage = reading.await.map_err(|e| RunError::Task(e.to_string()))??;
            each(priced_preview(catalog, &batch, &usage, started));
        }
        placing.await.map_err(|e| RunError::Task(e.to_string()))?
    }

    /// Finalizes a batch of closed periods: invoices already stored are returned as stored;
    /// the others are priced and written. See [`InvoiceRun::finalize_all`].
    pub async fn finalize(
        &self,
        catalog: &Catalog,
        tenant: &str,
        batch: &[Billable],
    ) -> Result<Finalized, RunError> {
        let mut out = None;
        self.finalize_all(
            catalog,
            tenant,
            std::slice::from_ref(&batch.to_vec()),
            |f| out = Some(f),
        )
        .await?;
        Ok(out.unwrap_or_default())
    }

    /// Finalizes every batch in order, handing each batch's outcome to `each`. Three batches
    /// are under way at once: the next one's reads (stored invoices, usage) and the last
    /// one's inserts and publishing run on tasks of their own while this one is priced.
    /// A batch's lines are inserted before its header, and published after both.
    pub async fn finalize_all(
        &self,
        catalog: &Catalog,
        tenant: &str,
        batches: &[Vec<Billable>],
        mut each: impl FnMut(Finalized),
    ) -> Result<(), RunError> {
        let catalog = Arc::new(catalog.clone());
        let prepare = |batch: &Vec<Billable>| {
            let (run, catalog, tenant, batch) = (
                self.clone(),
                catalog.clone(),
                tenant.to_owned(),
                batch.clone(),
            );
            tokio::spawn(async move { run.prepare(&catalog, &tenant, batch).await })
        };
        let mut next = batches.first().map(prepare);
        let mut storing: Option<tokio::task::JoinHandle<Result<Finalized, RunError>>> = None;
        for i in 0..batches.len() {
            let Some(pending) = next.take() else {
                break;
            };
            let prepared = pending.await.map_err(|e| RunError::Task(e.to_string()))??;
            next = batches.get(i + 1).map(prepare);
            let priced = price_final(&catalog, tenant, prepared)?;
            if let Some(done) = storing.take() {
                each(done.await.map_err(|e| RunError::Task(e.to_string()))??);
            }
            let (run, tenant) = (self.clone(), tenant.to_owned());
            storing = Some(tokio::spawn(
                async move { run.store(&tenant, priced).await },
            ));
        }
        if let Some(done) = storing {
            each(done.await.map_err(|e| RunError::Task(e.to_string()))??);
        }
        Ok(())
    }

    /// The final run a schedule makes at `now`: each customer's latest period closed
    /// `grace` or more before, and up to `catch_up` periods before it (see
    /// [`closed_generations`]), oldest first, less those already final (and, with a
    /// publisher, published), which one query of ids per generation finds without reading
    /// them back.
    #[allow(clippy::too_many_arguments)]
    pub async fn finalize_closed(
        &self,
        store: &SubscriptionStore,
        catalog: &Catalog,
        tenant: &str,
        now: OffsetDateTime,
        grace: time::Duration,
        catch_up: usize,
        batch_size: usize,
    ) -> Result<ClosedRun, RunError> {
        let (generations, refused) =
            closed_generations(store, catalog, tenant, now, grace, catch_up, batch_size).await?;
        let mut out = ClosedRun {
            refused,
            ..ClosedRun::default()
        };
        // Oldest first: a final invoice bills the late usage of the invoice before it, so
        // that one must be issued first.
        for batches in generations {
            let done = self.done(tenant, &batches).await?;
            let batches: Vec<Vec<Billable>> = batches
                .into_iter()
                .map(|batch| {
                    let before = batch.len();
                    let left: Vec<Billable> = batch
                        .into_iter()
                        .filter(|b| !done.contains(&billable_id(tenant, b)))
                        .collect();
                    out.skipped += before - left.len();
                    left
                })
                .filter(|batch| !batch.is_empty())
                .collect();
            self.finalize_all(catalog, tenant, &batches, |f| {
                out.written += f.written;
                out.already_final += f.already_final;
                out.published += f.published;
                out.published_lines += f.published_lines;
                out.refused.extend(f.refused);
            })
            .await?;
        }
        Ok(out)
    }

    /// Which of the batches' invoices need nothing more: stored and, with a publisher,
    /// published to its topic (a publication is recorded only once the invoice is stored).
    async fn done(
        &self,
        tenant: &str,
        batches: &[Vec<Billable>],
    ) -> Result<HashSet<String>, RunError> {
        let starts: BTreeSet<i64> = batches
            .iter()
            .flatten()
            .map(|b| b.period.start().unix_timestamp())
            .collect();
        if starts.is_empty() {
            return Ok(HashSet::new());
        }
        let starts: Vec<String> = starts.iter().map(i64::to_string).collect();
        let filter = format!(
            "tenant = {} AND toInt64(toUInt32(period_start)) IN ({})",
            string_list([tenant]),
            starts.join(", ")
        );
        let sql = match &self.publisher {
            Some(p) => format!(
                "SELECT DISTINCT invoice_id FROM invoice_publications WHERE {filter} AND topic = {}",
                string_list([p.topic()])
            ),
            None => format!("SELECT DISTINCT invoice_id FROM invoices WHERE {filter}"),
        };
        Ok(self
            .client
            .query_raw(&sql)
            .fetch_all::<String>()
            .await?
            .into_iter()
            .collect())
    }

    /// A final batch's reads: its stored invoices; the usage of the others; the issued
    /// invoices of the period before and that period's usage now (for adjustments).
    async fn prepare(
        &self,
        catalog: &Catalog,
        tenant: &str,
        batch: Vec<Billable>,
    ) -> Result<Prepared, RunError> {
        let ids: Vec<String> = batch.iter().map(|b| billable_id(tenant, b)).collect();
        let stored = self.stored(tenant, &ids).await?;
        let pending: Vec<Billable> = batch
            .into_iter()
            .zip(&ids)
            .filter(|(_, id)| !stored.contains_key(*id))
            .map(|(b, _)| b)
            .collect();
        let usage = self.read_usage(catalog, tenant, &pending).await?;

        // Usage that reached the previous period after its invoice was final.
        let mut previous = Vec::new();
        for b in &pending {
            let before = match b.previous {
                Some(p) => Ok(p),
                None => Period::nth(b.period.anchor(), b.period.interval(), b.period.index() - 1),
            };
            if let Ok(p) = before {
                let id = format!("{tenant}/{}/{}", b.customer, p.start().unix_timestamp());
                previous.push((b.customer.clone(), p, id));
            }
        }
        let prev_ids: Vec<String> = previous.iter().map(|(_, _, id)| id.clone()).collect();
        let mut prev_stored = self.stored(tenant, &prev_ids).await?;
        let mut issued = HashMap::new();
        let mut again = Vec::new();
        for (customer, period, id) in previous {
            let Some(inv) = prev_stored.remove(&id) else {
                continue;
            };
            again.push(Billable {
                customer: customer.clone(),
                period,
                segments: inv
                    .segments
                    .iter()
                    .map(|s| SegmentRef {
                        from: s.from,
                        to: s.to,
                        plan: s.plan.clone(),
                        version: s.version,
                    })
                    .collect(),
                previous: None,
            });
            issued.insert(customer, (id, inv));
        }
        let again_usage = self.read_usage(catalog, tenant, &again).await?;
        Ok(Prepared {
            ids,
            stored,
            pending,
            usage,
            issued,
            again,
            again_usage,
        })
    }

    async fn read_usage(
        &self,
        catalog: &Catalog,
        tenant: &str,
        batch: &[Billable],
    ) -> Result<UsageTable, RunError> {
        if batch.is_empty() {
            return Ok(UsageTable::new());
        }
        let (requests, meters) = requests(catalog, batch);
        let meters: Vec<&str> = meters.iter().map(String::as_str).collect();
        Ok(self.usage.read(tenant, &meters, &requests).await?)
    }

    /// Stores a priced batch (lines, then headers, under one run id), then publishes what
    /// is stored and not yet published.
    async fn store(&self, tenant: &str, batch: ToStore) -> Result<Finalized, RunError> {
        let started = Instant::now();
        let ToStore {
            ids,
            mut stored,
            fresh,
            refused,
        } = batch;
        let run_id = run_id();
        let now = OffsetDateTime::now_utc().unix_timestamp() as u32;
        // Lines first: an invoice is final once its header is stored, so a run killed
        // between the two inserts leaves lines no header names (another run id), and the
        // next run writes the invoice again under its own.
        if fresh.iter().any(|(_, inv)| !inv.lines.is_empty()) {
            let mut insert = self.client.insert::<LineRow<'_>>("invoice_lines").await?;
            // One buffer for a row's text columns: quantity, amount, then the JSON.
            let mut text = String::with_capacity(512);
            for (id, inv) in &fresh {
                let currency = inv.currency.code();
                for (n, line) in inv.lines.iter().enumerate() {
                    text.clear();
                    if let Some(q) = line.quantity {
                        crate::stored::push_decimal(&mut text, q);
                    }
                    let quantity_end = text.len();
                    crate::stored::push_decimal(&mut text, line.amount);
                    let amount_end = text.len();
                    crate::stored::push_line_detail(&mut text, line);
                    insert
                        .write(&LineRow {
                            tenant,
                            customer: &inv.customer,
                            invoice_id: id,
                            period_start: inv.period_start.unix_timestamp() as u32,
                            line_no: n as u32,
                            segment: line.segment.map_or(-1, |s| s as i32),
                            kind: line.kind.name(),
                            charge: line.charge.as_deref().unwrap_or_default(),
                            meter: line.meter.as_deref().unwrap_or_default(),
                            quantity: &text[..quantity_end],
                            amount: &text[quantity_end..amount_end],
                            currency,
                            line: &text[amount_end..],
                            run_id: &run_id,
                            layout: crate::stored::LAYOUT,
                        })
                        .await?;
                }
            }
            insert.end().await?;
        }
        if !fresh.is_empty() {
            let mut insert = self.client.insert::<HeaderRow<'_>>("invoices").await?;
            let mut text = String::with_capacity(64);
            for (id, inv) in &fresh {
                let head = crate::stored::header_json(inv).map_err(|reason| RunError::Stored {
                    invoice_id: id.clone(),
                    reason,
                })?;
                text.clear();
                crate::stored::push_decimal(&mut text, inv.subtotal);
                let subtotal_end = text.len();
                crate::stored::push_decimal(&mut text, inv.total);
                insert
                    .write(&HeaderRow {
                        tenant,
                        customer: &inv.customer,
                        invoice_id: id,
                        period_start: inv.period_start.unix_timestamp() as u32,
                        period_end: inv.period_end.unix_timestamp() as u32,
                        currency: inv.currency.code(),
                        subtotal: &text[..subtotal_end],
                        total: &text[subtotal_end..],
                        invoice: &head,
                        finalized_at: now,
                        run_id: &run_id,
                    })
                    .await?;
            }
            insert.end().await?;
        }
        let mut out = Finalized {
            written: fresh.len(),
            already_final: stored.len(),
            refused,
            ..Finalized::default()
        };
        if let Some(publisher) = &self.publisher {
            (out.published, out.published_lines) =
                self.publish(publisher, tenant, &stored, &fresh).await?;
        }
        for (outcome, n) in [
            ("written", out.written),
            ("already_final", out.already_final),
            ("refused", out.refused.len()),
        ] {
            metrics::counter!(INVOICES, "mode" => "final", "outcome" => outcome)
                .increment(n as u64);
        }
        metrics::counter!(PUBLISHED_LINES).increment(out.published_lines as u64);
        metrics::histogram!(BATCH_DURATION, "mode" => "final")
            .record(started.elapsed().as_secs_f64());
        let mut fresh: HashMap<String, Invoice> = fresh.into_iter().collect();
        for id in &ids {
            if let Some(inv) = stored.remove(id).or_else(|| fresh.remove(id)) {
                out.invoices.push(inv);
            }
        }
        Ok(out)
    }

    /// Publishes the invoices of a batch not published yet: all of `fresh` (stored just now),
    /// and those of `stored` with no publication row. Returns (invoices, lines) published.
    async fn publish(
        &self,
        publisher: &Notifier,
        tenant: &str,
        stored: &HashMap<String, Invoice>,
        fresh: &[(String, Invoice)],
    ) -> Result<(usize, usize), RunError> {
        let topic = publisher.topic();
        let done: HashSet<String> = if stored.is_empty() {
            HashSet::new()
        } else {
            let ids: Vec<String> = stored.keys().cloned().collect();
            self.client
                .query_raw(&format!(
                    "SELECT DISTINCT invoice_id FROM invoice_publications \
                     WHERE tenant = {} AND topic = {} AND {}",
                    string_list([tenant]),
                    string_list([topic]),
                    id_filter(&ids)
                ))
                .fetch_all::<String>()
                .await?
                .into_iter()
                .filter(|id| stored.contains_key(id))
                .collect()
        };
        let mut pending: Vec<(&str, &Invoice)> = stored
            .iter()
            .filter(|(id, _)| !done.contains(*id))
            .chain(fresh.iter().map(|(id, inv)| (id, inv)))
            .map(|(id, inv)| (id.as_str(), inv))
            .collect();
        if pending.is_empty() {
            return Ok((0, 0));
        }
        // In id order: the same batch publishes in the same order every time.
        pending.sort_by(|a, b| a.0.cmp(b.0));
        let lines = publisher.publish_invoices(tenant, &pending).await?;
        let now = OffsetDateTime::now_utc().unix_timestamp() as u32;
        let mut insert = self
            .client
            .insert::<PublicationRow>("invoice_publications")
            .await?;
        for (id, invoice) in &pending {
            insert
                .write(&PublicationRow {
                    tenant: tenant.to_owned(),
                    invoice_id: (*id).to_owned(),
                    topic: topic.to_owned(),
                    period_start: invoice.period_start.unix_timestamp() as u32,
                    lines: invoice.lines.len() as u32,
                    published_at: now,
                })
                .await?;
        }
        insert.end().await?;
        Ok((pending.len(), lines))
    }

    /// The stored invoices among `ids`: their headers in one query, then the lines of
    /// those stored since schema V8 in one more (see [`id_filter`]). An invoice with two
    /// headers (two runs at once) is the first finalized.
    async fn stored(
        &self,
        tenant: &str,
        ids: &[String],
    ) -> Result<HashMap<String, Invoice>, RunError> {
        if ids.is_empty() {
            return Ok(HashMap::new());
        }
        let filter = id_filter(ids);
        let t = string_list([tenant]);
        let rows: Vec<StoredHeaderRow> = self
            .client
            // Literals, not `?` binds: query() would take a `?` inside an id for one.
            .query_raw(&format!(
                "SELECT invoice_id, invoice, run_id, customer, toUInt32(period_start), \
                 toUInt32(period_end), currency, subtotal, total FROM invoices \
                 WHERE tenant = {t} AND {filter} \
                 ORDER BY invoice_id, finalized_at, run_id LIMIT 1 BY invoice_id",
            ))
            .fetch_all()
            .await?;
        let wanted: HashSet<&String> = ids.iter().collect();
        let mut out = HashMap::new();
        // Headers whose lines are in invoice_lines: (id, run id) → (header, lines so far).
        let mut split: HashMap<(String, String), (Invoice, Vec<Line>)> = HashMap::new();
        for row in rows {
            let id = row.invoice_id;
            if !wanted.contains(&id) {
                continue;
            }
            let header = crate::stored::header(&row.invoice, row.columns).map_err(|reason| {
                RunError::Stored {
                    invoice_id: id.clone(),
                    reason,
                }
            })?;
            if header.has_lines {
                let inv = invoice_of(&id, header.invoice, None)?;
                out.insert(id, inv);
            } else {
                split.insert((id, row.run_id), (header.invoice, Vec::new()));
            }
        }
        if split.is_empty() {
            return Ok(out);
        }
        let runs: BTreeSet<&str> = split.keys().map(|(_, r)| r.as_str()).collect();
        let split_ids: Vec<String> = split.keys().map(|(id, _)| id.clone()).collect();
        let mut cursor = self
            .client
            .query_raw(&format!(
                "SELECT invoice_id, run_id, line_no, segment, kind, charge, meter, quantity, \
                 amount, line, layout FROM invoice_lines \
                 WHERE tenant = {t} AND run_id IN ({}) AND {} \
                 ORDER BY invoice_id, run_id, line_no",
                string_list(runs),
                id_filter(&split_ids)
            ))
            .fetch::<StoredLineRow>()?;
        while let Some(row) = cursor.next().await? {
            let key = (row.invoice_id, row.run_id);
            let Some((_, lines)) = split.get_mut(&key) else {
                continue;
            };
            // Rows come in line order; a line number seen already is a copy.
            if row.line_no as usize != lines.len() {
                if (row.line_no as usize) < lines.len() {
                    continue;
                }
                return Err(RunError::Stored {
                    invoice_id: key.0,
                    reason: format!("line {} is missing", lines.len()),
                });
            }
            let line = row.stored.to_line().map_err(|reason| RunError::Stored {
                invoice_id: key.0.clone(),
                reason: format!("line {}: {reason}", row.line_no),
            })?;
            lines.push(line);
        }
        for ((id, _), (header, lines)) in split {
            let inv = invoice_of(&id, header, Some(lines))?;
            out.insert(id, inv);
        }
        Ok(out)
    }
}

/// A stored invoice from its header and (for headers without them) its lines, checked:
/// the lines must add up to the stored total.
fn invoice_of(id: &str, mut inv: Invoice, lines: Option<Vec<Line>>) -> Result<Invoice, RunError> {
    if let Some(lines) = lines {
        inv.lines = lines;
    }
    let mut sum = Decimal::ZERO;
    for l in &inv.lines {
        sum = crate::exact::add(sum, l.amount, "stored total")?;
    }
    if sum != inv.total {
        return Err(RunError::Stored {
            invoice_id: id.to_owned(),
            reason: format!(
                "its {} stored lines add up to {sum}, not its total {}",
                inv.lines.len(),
                inv.total
            ),
        });
    }
    Ok(inv)
}

/// Prices a prepared final batch: its invoices, each with adjustment lines for what the
/// previous period's issued invoice, priced again with the usage stored now, differs by.
fn price_final(catalog: &Catalog, tenant: &str, p: Prepared) -> Result<ToStore, RunError> {
    let mut adjustments: HashMap<String, Vec<Line>> = HashMap::new();
    for now in price(catalog, &p.again, &p.again_usage).invoices {
        if let Some((id, old)) = p.issued.get(&now.customer) {
            let lines = Invoice::adjustments(old, &now, id)?;
            if !lines.is_empty() {
                adjustments.insert(now.customer.clone(), lines);
            }
        }
    }
    let priced = price(catalog, &p.pending, &p.usage);
    let mut fresh = Vec::with_capacity(priced.invoices.len());
    for mut inv in priced.invoices {
        if let Some(lines) = adjustments.remove(&inv.customer) {
            inv.add_adjustments(lines)?;
        }
        fresh.push((invoice_id(tenant, &inv), inv));
    }
    // Customers whose subscription ended during the period before: an invoice of the
    // adjustments alone, in the issued invoice's currency, when there are any.
    for b in p.pending.iter().filter(|b| b.segments.is_empty()) {
        let (Some(lines), Some((_, issued))) =
            (adjustments.remove(&b.customer), p.issued.get(&b.customer))
        else {
            continue;
        };
        let inv = Invoice::adjustments_only(&b.customer, &b.period, issued.currency, lines)?;
        fresh.push((invoice_id(tenant, &inv), inv));
    }

    Ok(ToStore {
        ids: p.ids,
        stored: p.stored,
        fresh,
        refused: priced.refused,
    })
}

/// A condition on `invoice_id` (and `period_start`) matching at least `ids` (of the form
/// `tenant/customer/<period start>`); the caller drops rows outside them. A long list is
/// asked for by its range of ids and its period starts rather than id by id: ClickHouse
/// 18.16 spends about 20 µs per literal parsing a list, most of a large run. Batches are
/// contiguous ranges of customers, so the range holds little else.
fn id_filter(ids: &[String]) -> String {
    const LISTED: usize = 1_000;
    let starts: Option<BTreeSet<u32>> = ids
        .iter()
        .map(|id| id.rsplit_once('/')?.1.parse::<u32>().ok())
        .collect();
    match (starts, ids.iter().min(), ids.iter().max()) {
        (Some(starts), Some(lo), Some(hi)) if ids.len() > LISTED => {
            let starts: Vec<String> = starts.iter().map(u32::to_string).collect();
            format!(
                "invoice_id >= {} AND invoice_id <= {} AND toUInt32(period_start) IN ({})",
                string_list([lo]),
                string_list([hi]),
                starts.join(", ")
            )
        }
        _ => format!("invoice_id IN ({})", string_list(ids)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_id_lists_become_a_range_and_its_period_starts() {
        let short = vec!["t/a/100".to_owned(), "t/it's/200".to_owned()];
        assert_eq!(
            id_filter(&short),
            r"invoice_id IN ('t/a/100', 't/it\'s/200')"
        );

        let long: Vec<String> = (0..1_500)
            .map(|i| format!("t/c{i:05}/{}", 1_000 + i % 2))
            .collect();
        assert_eq!(
            id_filter(&long),
            "invoice_id >= 't/c00000/1000' AND invoice_id <= 't/c01499/1001' \
             AND toUInt32(period_start) IN (1000, 1001)"
        );

        // A start that is not a u32 cannot be matched by period: listed one by one.
        let mut odd = long.clone();
        odd.push("t/x/-5".to_owned());
        assert!(id_filter(&odd).starts_with("invoice_id IN ("));
    }
}
