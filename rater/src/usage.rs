//! Usage per customer, subscription segment and meter, read from the aggregator's tables
//! with one query per batch of customers.
//!
//! Rollups are hourly (`rollups_hourly`, per dimension value) and daily (`usage_daily`, per
//! UTC day, schema V11), so a segment that starts or ends inside an hour cannot be cut out
//! of them. A customer whose bounds all fall on UTC midnights reads days: a month of an
//! active meter is 30 rows there against up to 720 per dimension value by the hour.
//!
//! A batch's customers do not travel in the statement: ClickHouse 18.16 spends about 20 µs
//! per literal parsing and analysing a list, which at a million customers is most of a
//! run. They go into a temporary table of a session of the read's own (one RowBinary
//! insert), grouped by their segment bounds: the statement carries each distinct set of
//! bounds once, and each group is one branch reading `customer IN` its part of that table.
//! Each meter's state is merged only for the rows of its own meter (`-MergeIf`): merging
//! every state of every row cost as much again. UNIQUE_COUNT meters are read from the
//! tables that keep their states apart (schema V13): every row of the other meters used to
//! carry a `uniqExact` state the server decoded for nothing (8–14 % of a read's server
//! time, BENCHMARKS.md). A customer whose segment bounds all fall
//! on whole hours (and not all on UTC midnights) is read from `rollups_hourly`; a customer
//! with any bound inside an hour (a change "at once", say) is read entirely from
//! `events_raw`, which holds the very events the rollups count (all are written by one
//! insert per flush, duplicates already removed), measured here by the aggregator's own
//! rules. Every read is exact; the raw one costs more, and only those customers pay it.

use std::collections::{BTreeMap, HashMap, HashSet};

use rust_decimal::Decimal;
use serde::Deserialize;
use tally_core::config::ClickHouseConfig;
use tally_core::{Aggregation, EventData, Meter};
use time::OffsetDateTime;

/// One unit in nano-units (meter values are `Decimal(38, 9)`).
const UNIT: i128 = 1_000_000_000;

/// Why usage could not be read.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum UsageError {
    #[error("usage: no meter {0:?} in the catalog")]
    UnknownMeter(String),
    #[error("usage: customer {customer:?}: segment bounds must increase and lie in 1970..2106")]
    Bounds { customer: String },
    #[error(
        "usage: customer {customer:?}, meter {meter}: {value} nano-units do not fit a decimal"
    )]
    TooLarge {
        customer: String,
        meter: String,
        value: i128,
    },
    #[error("clickhouse: {0}")]
    ClickHouse(#[from] clickhouse::error::Error),
}

impl UsageError {
    /// ClickHouse being unreachable clears up by itself; the rest does not.
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            Self::ClickHouse(
                clickhouse::error::Error::Network(_) | clickhouse::error::Error::TimedOut
            )
        )
    }
}

/// One customer's segments: `bounds[i]..bounds[i + 1]` is segment `i`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UsageRequest {
    pub customer: String,
    pub bounds: Vec<OffsetDateTime>,
}

impl UsageRequest {
    /// Whether every bound falls on a whole `seconds` (3,600: an hour; 86,400: a UTC day).
    fn on_whole(&self, seconds: i64) -> bool {
        self.bounds
            .iter()
            .all(|b| b.unix_timestamp() % seconds == 0 && b.nanosecond() == 0)
    }

    fn aligned(&self) -> bool {
        self.on_whole(HOUR.seconds)
    }

    fn seconds(&self) -> Result<Vec<u32>, UsageError> {
        let bad = || UsageError::Bounds {
            customer: self.customer.clone(),
        };
        if self.bounds.len() < 2 || self.bounds.windows(2).any(|w| w[0] >= w[1]) {
            return Err(bad());
        }
        self.bounds
            .iter()
            .map(|b| u32::try_from(b.unix_timestamp()).map_err(|_| bad()))
            .collect()
    }

    /// The segment holding `at` (unix nanoseconds), if any.
    fn segment_of(&self, at: i128) -> Option<usize> {
        let i = self
            .bounds
            .partition_point(|b| b.unix_timestamp_nanos() <= at);
        (i >= 1 && i < self.bounds.len()).then(|| i - 1)
    }
}

/// Quantities by (customer, segment index), then meter key. A meter without usage in a
/// segment is absent (the rater prices it as zero).
pub type UsageTable = HashMap<(String, usize), BTreeMap<String, Decimal>>;

/// Reads usage from one ClickHouse database.
#[derive(Clone)]
pub struct UsageReader {
    client: clickhouse::Client,
    meters: tally_core::Catalog,
    max_dimension_chars: usize,
}

#[derive(Debug, Deserialize, clickhouse::Row)]
struct RollupRow {
    customer: String,
    seg: u32,
    /// Index of the meter in the read's meter list.
    meter: u32,
    /// The meter's value in nano-units (`Decimal(38, 9)`).
    value: i128,
}

/// One customer of a batch, as sent to the session's temporary table.
#[derive(Debug, serde::Serialize, clickhouse::Row)]
struct BatchRow<'a> {
    customer: &'a str,
    /// Index of the customer's bounds among the batch's distinct bounds.
    bounds: u32,
    /// The bounds themselves (unix seconds), joined when the groups are many.
    b: Vec<u32>,
}

/// Sessions of this process, for unique session ids.
static SESSIONS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

#[derive(Debug, Deserialize, clickhouse::Row)]
struct RawRow {
    customer: String,
    event_type: String,
    t_secs: u32,
    time_nanos: u32,
    data: String,
}

impl UsageReader {
    pub fn new(
        config: &ClickHouseConfig,
        meters: tally_core::Catalog,
        max_dimension_chars: usize,
    ) -> UsageReader {
        // Rows are read by position: the crate's schema check needs a newer server than 18.16.
        let client = clickhouse::Client::default()
            .with_url(&config.url)
            .with_user(&config.user)
            .with_password(&config.password)
            .with_database(&config.database)
            .with_validation(false)
            // A batch's customers and bounds travel in the statement.
            .with_setting("max_query_size", "268435456")
            .with_setting("max_ast_elements", "50000000")
            .with_setting("max_expanded_ast_elements", "50000000")
            // One thread per statement: runs read one batch while pricing and storing
            // others, and two threads grouping halves of a batch and merging them cost the
            // server more CPU (a 300,000-invoice final run, twice each way: 4.5 and 6.2
            // CPU seconds with one thread, 5.5 and 7.1 with two).
            .with_setting("max_threads", "1");
        UsageReader {
            client,
            meters,
            max_dimension_chars,
        }
    }

    /// Usage of `meters` (catalog keys) for every request: three queries at most, whatever
    /// the number of customers (whole days, whole hours, raw events).
    pub async fn read(
        &self,
        tenant: &str,
        meters: &[&str],
        requests: &[UsageRequest],
    ) -> Result<UsageTable, UsageError> {
        let meters = self.meters_of(meters)?;
        let (days, hours, raw) = split(requests);
        let mut table = UsageTable::new();
        // The statements carry their values as quoted literals, so they go through
        // query_raw: query() would take a `?` inside a customer name for a bind.
        for (grain, requests) in [(DAY, &days), (HOUR, &hours)] {
            let Some(rollups) = rollup_sql(tenant, &meters, requests, grain)? else {
                continue;
            };
            let rows = self.rollups(&rollups, requests).await?;
            for row in rows {
                let Some(meter) = meters.get(row.meter as usize) else {
                    continue;
                };
                if row.seg == 0 {
                    continue;
                }
                let value = decimal(row.value, &row.customer, &meter.key)?;
                table
                    .entry((row.customer, row.seg as usize - 1))
                    .or_default()
                    .insert(meter.key.clone(), value);
            }
        }
        if let Some(sql) = raw_sql(tenant, &meters, &raw)? {
            let rows: Vec<RawRow> = self.client.query_raw(&sql).fetch_all().await?;
            let requests: HashMap<&str, &UsageRequest> =
                raw.iter().map(|r| (r.customer.as_str(), *r)).collect();
            let mut acc = RawAccumulator::default();
            for row in &rows {
                let Some(request) = requests.get(row.customer.as_str()) else {
                    continue;
                };
                let at = i128::from(row.t_secs) * 1_000_000_000 + i128::from(row.time_nanos);
                let Some(seg) = request.segment_of(at) else {
                    continue;
                };
                acc.add(&meters, row, seg, at, self.max_dimension_chars);
            }
            for ((customer, seg, meter), value) in acc.finish() {
                let value = decimal(value, &customer, &meter)?;
                table
                    .entry((customer, seg))
                    .or_default()
                    .insert(meter, value);
            }
        }
        Ok(table)
    }
}

impl UsageReader {
    fn meters_of(&self, keys: &[&str]) -> Result<Vec<&Meter>, UsageError> {
        keys.iter()
            .map(|k| {
                self.meters
                    .meter(k)
                    .ok_or_else(|| UsageError::UnknownMeter((*k).to_owned()))
            })
            .collect()
    }

    /// The statements [`read`](Self::read) sends for `requests`, in order, with each batch
    /// table's rows written in as literals: the same SQL, to run elsewhere (the tests run it
    /// on current ClickHouse as well as on 18.16).
    pub fn statements(
        &self,
        tenant: &str,
        meters: &[&str],
        requests: &[UsageRequest],
    ) -> Result<Vec<String>, UsageError> {
        let meters = self.meters_of(meters)?;
        let (days, hours, raw) = split(requests);
        let mut out = Vec::new();
        for (grain, requests) in [(DAY, &days), (HOUR, &hours)] {
            let Some(q) = rollup_sql(tenant, &meters, requests, grain)? else {
                continue;
            };
            let rows: Vec<String> = requests
                .iter()
                .zip(&q.group_of)
                .map(|(r, &g)| {
                    let mut row = String::from("(");
                    quote(&mut row, &r.customer);
                    let b: Vec<String> = q.groups[g as usize].iter().map(u32::to_string).collect();
                    row.push_str(&format!(", {g}, [{}])", b.join(", ")));
                    row
                })
                .collect();
            out.push(CREATE_BATCH_TABLE.to_owned());
            out.push(format!(
                "INSERT INTO {BATCH_TABLE} VALUES {}",
                rows.join(", ")
            ));
            out.push(q.sql);
            out.push(format!("DROP TEMPORARY TABLE IF EXISTS {BATCH_TABLE}"));
        }
        out.extend(raw_sql(tenant, &meters, &raw)?);
        Ok(out)
    }

    /// Runs the rollups query in a session of its own, whose temporary table holds the
    /// batch's customers and the index of their bounds.
    async fn rollups(
        &self,
        q: &RollupQuery,
        requests: &[&UsageRequest],
    ) -> Result<Vec<RollupRow>, UsageError> {
        let session = format!(
            "tally-usage-{}-{}",
            std::process::id(),
            SESSIONS.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        );
        let client = self.client.clone().with_setting("session_id", session);
        client.query_raw(CREATE_BATCH_TABLE).execute().await?;
        let result = async {
            let mut insert = client.insert::<BatchRow<'_>>(BATCH_TABLE).await?;
            for (r, &bounds) in requests.iter().zip(&q.group_of) {
                insert
                    .write(&BatchRow {
                        customer: &r.customer,
                        bounds,
                        b: q.groups[bounds as usize].clone(),
                    })
                    .await?;
            }
            insert.end().await?;
            client.query_raw(&q.sql).fetch_all::<RollupRow>().await
        }
        .await;
        // The session's end would drop it too; dropping it now frees the memory at once.
        let _ = client
            .query_raw(&format!("DROP TEMPORARY TABLE IF EXISTS {BATCH_TABLE}"))
            .execute()
            .await;
        Ok(result?)
    }
}

fn decimal(nanos: i128, customer: &str, meter: &str) -> Result<Decimal, UsageError> {
    Decimal::try_from_i128_with_scale(nanos, 9)
        .map(|d| d.normalize())
        .map_err(|_| UsageError::TooLarge {
            customer: customer.to_owned(),
            meter: meter.to_owned(),
            value: nanos,
        })
}

/// A ClickHouse string literal.
fn quote(out: &mut String, s: &str) {
    out.push('\'');
    for c in s.chars() {
        match c {
            '\'' => out.push_str("\\'"),
            '\\' => out.push_str("\\\\"),
            c => out.push(c),
        }
    }
    out.push('\'');
}

pub(crate) fn string_list(items: impl IntoIterator<Item = impl AsRef<str>>) -> String {
    let mut out = String::new();
    for (i, s) in items.into_iter().enumerate() {
        if i > 0 {
            out.push_str(", ");
        }
        quote(&mut out, s.as_ref());
    }
    out
}

/// The session table holding a batch's customers.
const BATCH_TABLE: &str = "usage_batch";
const CREATE_BATCH_TABLE: &str =
    "CREATE TEMPORARY TABLE usage_batch (customer String, bounds UInt32, b Array(UInt32))";

/// Requests whose bounds are all on UTC midnights (read by the day), the other ones on
/// whole hours (by the hour), and the rest (from raw events).
fn split(
    requests: &[UsageRequest],
) -> (Vec<&UsageRequest>, Vec<&UsageRequest>, Vec<&UsageRequest>) {
    let (aligned, raw): (Vec<&UsageRequest>, Vec<&UsageRequest>) =
        requests.iter().partition(|r| r.aligned());
    let (days, hours): (Vec<&UsageRequest>, Vec<&UsageRequest>) =
        aligned.into_iter().partition(|r| r.on_whole(DAY.seconds));
    (days, hours, raw)
}

/// The rollups statement of a batch, and each request's bounds group (in request order).
#[derive(Debug)]
struct RollupQuery {
    sql: String,
    groups: Vec<Vec<u32>>,
    group_of: Vec<u32>,
}

/// Most bounds groups read as branches of their own; past this, one branch joins each
/// customer's bounds from the session table (a join costs about half as much again as a
/// constant, but a statement of thousands of branches costs far more).
const MAX_BRANCHES: usize = 16;

/// A rollup table, the table that keeps its UNIQUE_COUNT states apart (schema V13), and the
/// time column their rows are keyed by.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Grain {
    table: &'static str,
    unique_table: &'static str,
    column: &'static str,
    seconds: i64,
}

/// `rollups_hourly`: every hour and dimension value.
const HOUR: Grain = Grain {
    table: "rollups_hourly",
    unique_table: "rollups_unique_hourly",
    column: "hour",
    seconds: 3_600,
};

/// `usage_daily` (schema V11): the same states per UTC day, without dimensions.
const DAY: Grain = Grain {
    table: "usage_daily",
    unique_table: "usage_unique_daily",
    column: "day",
    seconds: 86_400,
};

/// The rollups query for segments whose bounds all fall on whole `grain`s: per customer,
/// segment (1-based) and meter, the merged value of the meter's aggregation. UNIQUE_COUNT
/// meters are read from the table that keeps their states (a branch of their own), the
/// others from the rollups, whose rows no longer carry a unique state to decode.
fn rollup_sql(
    tenant: &str,
    meters: &[&Meter],
    requests: &[&UsageRequest],
    grain: Grain,
) -> Result<Option<RollupQuery>, UsageError> {
    if requests.is_empty() || meters.is_empty() {
        return Ok(None);
    }
    let mut groups: Vec<Vec<u32>> = Vec::new();
    let mut index: HashMap<Vec<u32>, u32> = HashMap::new();
    let mut group_of = Vec::with_capacity(requests.len());
    for r in requests {
        let secs = r.seconds()?;
        let g = *index.entry(secs.clone()).or_insert_with(|| {
            groups.push(secs);
            groups.len() as u32 - 1
        });
        group_of.push(g);
    }
    let mut t = String::new();
    quote(&mut t, tenant);
    let keys_of = |agg: Option<Aggregation>| -> Vec<String> {
        meters
            .iter()
            .filter(|m| match agg {
                Some(a) => m.aggregation == a,
                None => m.aggregation != Aggregation::UniqueCount,
            })
            .map(|m| m.storage_key())
            .collect()
    };
    // Each row of the rollups is one meter's: of the merges below, only its aggregation's
    // merges anything, the others are empty (0), so their sum is the meter's value.
    let mut merges = Vec::new();
    for (agg, merge) in [
        (
            Aggregation::Count,
            "toDecimal128(sumMergeIf(events, {c}), 9)",
        ),
        (Aggregation::Sum, "sumMergeIf(value_sum, {c})"),
        (Aggregation::Min, "minMergeIf(value_min, {c})"),
        (Aggregation::Max, "maxMergeIf(value_max, {c})"),
        (Aggregation::Latest, "argMaxMergeIf(value_latest, {c})"),
    ] {
        let keys = keys_of(Some(agg));
        if !keys.is_empty() {
            let condition = format!("meter IN ({})", string_list(keys));
            merges.push(merge.replace("{c}", &condition));
        }
    }
    // (table, the state columns it reads, the value, its meters)
    let mut parts: Vec<(&str, &str, String, String)> = Vec::new();
    let shared = keys_of(None);
    if !shared.is_empty() {
        parts.push((
            grain.table,
            "events, value_sum, value_min, value_max, value_latest",
            merges.join(" + "),
            string_list(&shared),
        ));
    }
    let unique = keys_of(Some(Aggregation::UniqueCount));
    if !unique.is_empty() {
        parts.push((
            grain.unique_table,
            "value_unique",
            "toDecimal128(uniqExactMerge(value_unique), 9)".to_owned(),
            string_list(&unique),
        ));
    }
    let storage_keys: Vec<String> = meters.iter().map(|m| m.storage_key()).collect();
    let meter_keys = string_list(&storage_keys);
    let indexes: Vec<String> = (0..meters.len()).map(|i| i.to_string()).collect();
    let meter_index = format!(
        "toUInt32(transform(meter, [{meter_keys}], [{}], {}))",
        indexes.join(", "),
        u32::MAX
    );
    let column = grain.column;
    // `seg` counts the bounds at or before the row's hour (or day): 0 before the first,
    // the bound count past the last; both are outside every segment.
    let select = |bounds: &str, n: &str, join: &str, filter: &str, lo: u32, hi: u32| {
        let branches: Vec<String> = parts
            .iter()
            .map(|(table, states, value, keys)| {
                format!(
                    "SELECT customer, seg, {meter_index} AS meter_index, {value} AS value \
                     FROM (SELECT customer, meter, {states}, \
                             toUInt32(arrayCount(x -> x <= toUInt32({column}), {bounds})) AS raw_seg, \
                             if(raw_seg < {n}, raw_seg, toUInt32(0)) AS seg \
                           FROM {table} {join} \
                           PREWHERE customer IN (SELECT customer FROM {BATCH_TABLE}{filter}) \
                           WHERE tenant = {t} AND meter IN ({keys}) \
                             AND {column} >= toDateTime({lo}, 'UTC') \
                             AND {column} < toDateTime({hi}, 'UTC')) \
                     WHERE seg > 0 \
                     GROUP BY customer, seg, meter"
                )
            })
            .collect();
        branches.join(" UNION ALL ")
    };
    let sql = if groups.len() <= MAX_BRANCHES {
        let branches: Vec<String> = groups
            .iter()
            .enumerate()
            .map(|(g, bounds)| {
                let list: Vec<String> = bounds.iter().map(|b| format!("toUInt32({b})")).collect();
                select(
                    &format!("[{}]", list.join(", ")),
                    &bounds.len().to_string(),
                    "",
                    &format!(" WHERE bounds = {g}"),
                    bounds[0],
                    bounds[bounds.len() - 1],
                )
            })
            .collect();
        branches.join(" UNION ALL ")
    } else {
        let lo = groups.iter().map(|b| b[0]).min().unwrap_or(0);
        let hi = groups.iter().map(|b| b[b.len() - 1]).max().unwrap_or(0);
        select(
            "b",
            "length(b)",
            &format!(
                "ANY INNER JOIN (SELECT customer, b FROM {BATCH_TABLE}) AS batch USING customer"
            ),
            "",
            lo,
            hi,
        )
    };
    Ok(Some(RollupQuery {
        sql,
        groups,
        group_of,
    }))
}

/// The raw events of customers whose segments cut hours, in topic order (LATEST's ties).
fn raw_sql(
    tenant: &str,
    meters: &[&Meter],
    requests: &[&UsageRequest],
) -> Result<Option<String>, UsageError> {
    if requests.is_empty() || meters.is_empty() {
        return Ok(None);
    }
    let (mut lo, mut hi) = (u32::MAX, 0);
    for r in requests {
        let secs = r.seconds()?;
        lo = lo.min(secs[0]);
        // The last bound may fall inside a second: include that second.
        hi = hi.max(secs[secs.len() - 1].saturating_add(1));
    }
    let types: HashSet<&str> = meters.iter().map(|m| m.event_type.as_str()).collect();
    let mut t = String::new();
    quote(&mut t, tenant);
    Ok(Some(format!(
        "SELECT customer, type AS event_type, toUInt32(time) AS t_secs, time_nanos, data \
         FROM events_raw \
         WHERE tenant = {t} AND customer IN ({customers}) AND type IN ({types}) \
           AND time >= toDateTime({lo}, 'UTC') AND time < toDateTime({hi}, 'UTC') \
         ORDER BY kafka_partition, kafka_offset",
        customers = string_list(requests.iter().map(|r| &r.customer)),
        types = string_list(types),
    )))
}

/// One meter's running value over raw events, as the aggregator's rollups combine them.
#[derive(Debug, Default)]
struct Running {
    count: i128,
    sum: i128,
    min: Option<i128>,
    max: Option<i128>,
    latest: Option<(i128, i128)>,
    unique: HashSet<String>,
}

#[derive(Debug, Default)]
struct RawAccumulator {
    values: BTreeMap<(String, usize, String), (Aggregation, Running)>,
}

impl RawAccumulator {
    fn add(&mut self, meters: &[&Meter], row: &RawRow, seg: usize, at: i128, max_chars: usize) {
        let Ok(data) = EventData::parse(&row.data) else {
            return;
        };
        for meter in meters.iter().filter(|m| m.event_type == row.event_type) {
            // The aggregator counted the event only if every meter of its type could measure it.
            let Ok(m) = data.measure(meter, max_chars) else {
                continue;
            };
            let (_, r) = self
                .values
                .entry((row.customer.clone(), seg, meter.key.clone()))
                .or_insert_with(|| (meter.aggregation, Running::default()));
            let n = match &m.value {
                tally_core::MeterValue::Number(q) => q.nanos(),
                _ => 0,
            };
            r.count += 1;
            r.sum += n;
            r.min = Some(r.min.map_or(n, |v| v.min(n)));
            r.max = Some(r.max.map_or(n, |v| v.max(n)));
            // Ties on event time keep the later record, as the rollups do.
            if r.latest.is_none_or(|(t, _)| at >= t) {
                r.latest = Some((at, n));
            }
            if let tally_core::MeterValue::Identifier(v) = m.value {
                r.unique.insert(v);
            }
        }
    }

    fn finish(self) -> impl Iterator<Item = ((String, usize, String), i128)> {
        self.values.into_iter().map(|(k, (agg, r))| {
            let v = match agg {
                Aggregation::Count => r.count * UNIT,
                Aggregation::Sum => r.sum,
                Aggregation::Min => r.min.unwrap_or_default(),
                Aggregation::Max => r.max.unwrap_or_default(),
                Aggregation::Latest => r.latest.map_or(0, |(_, v)| v),
                Aggregation::UniqueCount => r.unique.len() as i128 * UNIT,
            };
            (k, v)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use time::macros::datetime;

    #[test]
    fn the_batch_table_is_created_under_its_own_name() {
        assert!(CREATE_BATCH_TABLE.starts_with(&format!("CREATE TEMPORARY TABLE {BATCH_TABLE} (")));
    }

    fn request(customer: &str, bounds: &[OffsetDateTime]) -> UsageRequest {
        UsageRequest {
            customer: customer.into(),
            bounds: bounds.to_vec(),
        }
    }

    #[test]
    fn segments_split_at_their_bounds() {
        let r = request(
            "c",
            &[
                datetime!(2026-11-01 0:00 UTC),
                datetime!(2026-11-10 12:30:00.5 UTC),
                datetime!(2026-12-01 0:00 UTC),
            ],
        );
        assert!(!r.aligned());
        let at = |t: OffsetDateTime| t.unix_timestamp_nanos();
        assert_eq!(r.segment_of(at(datetime!(2026-10-31 23:59:59 UTC))), None);
        assert_eq!(r.segment_of(at(datetime!(2026-11-01 0:00 UTC))), Some(0));
        assert_eq!(
            r.segment_of(at(datetime!(2026-11-10 12:30:00.499999999 UTC))),
            Some(0)
        );
        assert_eq!(
            r.segment_of(at(datetime!(2026-11-10 12:30:00.5 UTC))),
            Some(1)
        );
        assert_eq!(r.segment_of(at(datetime!(2026-12-01 0:00 UTC))), None);
    }

    #[test]
    fn bounds_must_increase() {
        let t = datetime!(2026-11-01 0:00 UTC);
        assert!(request("c", &[t]).seconds().is_err());
        assert!(request("c", &[t, t]).seconds().is_err());
        assert!(request("c", &[t, t - time::Duration::HOUR])
            .seconds()
            .is_err());
        assert!(request("c", &[datetime!(1960-01-01 0:00 UTC), t])
            .seconds()
            .is_err());
    }

    #[test]
    fn literals_are_quoted() {
        let mut s = String::new();
        quote(&mut s, r"it's \ here");
        assert_eq!(s, r"'it\'s \\ here'");
    }
}
