//! The pure core of the aggregator: records in, one flush's ledger rows out.
//!
//! A [`PartitionBatch`] holds what one partition contributed since the last flush: the new
//! events (for `events_raw`), their meters' pre-aggregated hourly deltas, and the last
//! offset read. Duplicates are recognised against the partition's [`Dedupe`] state plus the
//! ids already in the batch; they only move the offset. Nothing here touches the network.

use std::borrow::Cow;
use std::hash::{Hash, Hasher};

use hashbrown::{Equivalent, HashMap};
use serde::Deserialize;
use serde_json::value::RawValue;
use tally_core::event::record_key;
use tally_core::{Aggregation, Catalog, EventData, MeterValue, Quantity};
use time::OffsetDateTime;

pub use crate::ledger::{
    Body, Columns, LedgerRow, RowRef, KIND_CHECKPOINT, KIND_COVERAGE, KIND_EVENT, KIND_ROLLUP,
};

/// A record the aggregator cannot count, bound for the dead-letter topic.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Poison {
    /// Bounded label (metrics, the `reason` header).
    pub reason: &'static str,
    pub detail: String,
}

/// A 128-bit fingerprint of an event's identity, (tenant, customer, event id): collisions
/// are out of reach at any volume this state holds, and it costs 16 bytes instead of the
/// strings. It is seeded at random per process: the state is always rebuilt from the stored
/// strings (`Store::load_dedupe`), never kept or compared across processes, so nobody who
/// picks event ids can aim at another event's fingerprint without knowing the seed.
///
/// The customer is part of it because records are keyed (and partitioned) by tenant and
/// customer: a retry always lands in the partition of its first copy, but two customers who
/// happen to use one id may not, so a key without the customer would make "duplicate" depend
/// on partitioning. The quota feed counts once per the same identity.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct EventKey(u128);

static SEED: std::sync::LazyLock<u64> = std::sync::LazyLock::new(|| {
    use std::hash::BuildHasher;
    std::collections::hash_map::RandomState::new().hash_one(0x7a11_u64)
});

impl EventKey {
    /// XXH3's 128-bit hash of the three fields, each preceded by its length (so no two
    /// different triples are the same bytes), under the process's seed. One pass over about
    /// 60 bytes, where two SipHash passes cost a tenth of the consumer thread.
    pub fn new(tenant: &str, customer: &str, id: &str) -> EventKey {
        let len = 24 + tenant.len() + customer.len() + id.len();
        let mut stack = [0u8; 256];
        let mut heap = Vec::new();
        let buf: &mut [u8] = if len <= stack.len() {
            &mut stack[..len]
        } else {
            heap.resize(len, 0);
            &mut heap[..]
        };
        let mut at = 0;
        for part in [tenant, customer, id] {
            buf[at..at + 8].copy_from_slice(&(part.len() as u64).to_le_bytes());
            buf[at + 8..at + 8 + part.len()].copy_from_slice(part.as_bytes());
            at += 8 + part.len();
        }
        EventKey(xxhash_rust::xxh3::xxh3_128_with_seed(buf, *SEED))
    }
}

/// The event ids one partition has counted within the dedupe window.
#[derive(Debug, Default)]
pub struct Dedupe {
    seen: HashMap<EventKey, u32>,
}

impl Dedupe {
    pub fn insert(&mut self, key: EventKey, received_at: u32) {
        self.seen.insert(key, received_at);
    }

    pub fn contains(&self, key: &EventKey) -> bool {
        self.seen.contains_key(key)
    }

    /// Forgets ids received before `oldest` (unix seconds).
    pub fn evict_before(&mut self, oldest: u32) {
        self.seen.retain(|_, at| *at >= oldest);
    }

    pub fn len(&self) -> usize {
        self.seen.len()
    }

    pub fn is_empty(&self) -> bool {
        self.seen.is_empty()
    }
}

/// A rollup row's identity. Looked up as a [`GroupRef`] borrowed from the record, so an
/// event whose hour and dimensions already have a row allocates nothing for it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct GroupKey {
    tenant: String,
    customer: String,
    meter: String,
    hour: u32,
    dims: Vec<String>,
}

#[derive(Debug, Clone, Copy, Hash)]
struct GroupRef<'a> {
    tenant: &'a str,
    customer: &'a str,
    meter: &'a str,
    hour: u32,
    dims: &'a [String],
}

impl GroupKey {
    fn as_ref(&self) -> GroupRef<'_> {
        GroupRef {
            tenant: &self.tenant,
            customer: &self.customer,
            meter: &self.meter,
            hour: self.hour,
            dims: &self.dims,
        }
    }
}

impl GroupRef<'_> {
    fn to_owned(self) -> GroupKey {
        GroupKey {
            tenant: self.tenant.to_owned(),
            customer: self.customer.to_owned(),
            meter: self.meter.to_owned(),
            hour: self.hour,
            dims: self.dims.to_vec(),
        }
    }
}

/// Hashes exactly as its [`GroupRef`] does, as [`Equivalent`] lookups require.
impl Hash for GroupKey {
    fn hash<H: Hasher>(&self, h: &mut H) {
        self.as_ref().hash(h);
    }
}

impl Equivalent<GroupKey> for GroupRef<'_> {
    fn equivalent(&self, k: &GroupKey) -> bool {
        self.hour == k.hour
            && self.customer == k.customer
            && self.meter == k.meter
            && self.tenant == k.tenant
            && self.dims == k.dims.as_slice()
    }
}

/// A distinct value of a UNIQUE_COUNT meter within a group; hashes as `(GroupKey, String)`.
#[derive(Debug, Clone, Copy, Hash)]
struct UniqueRef<'a>(GroupRef<'a>, &'a str);

impl Equivalent<(GroupKey, String)> for UniqueRef<'_> {
    fn equivalent(&self, k: &(GroupKey, String)) -> bool {
        self.1 == k.1 && self.0.equivalent(&k.0)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Acc {
    count: u64,
    sum: i128,
    min: i128,
    max: i128,
    latest: i128,
    latest_at: u64,
}

/// The meter catalog, each meter's storage key, and the limits measuring reads with.
#[derive(Debug, Clone)]
pub struct Meters<'a> {
    pub catalog: &'a Catalog,
    pub max_dimension_chars: usize,
    storage: HashMap<String, String>,
}

impl<'a> Meters<'a> {
    pub fn new(catalog: &'a Catalog, max_dimension_chars: usize) -> Meters<'a> {
        let storage = catalog
            .meters()
            .iter()
            .map(|m| (m.key.clone(), m.storage_key()))
            .collect();
        Meters {
            catalog,
            max_dimension_chars,
            storage,
        }
    }

    /// Most ledger rows one counted record can add to a flush: its event row, and one
    /// rollup row for each meter of its type (a UNIQUE_COUNT meter's row holds one value).
    pub fn rows_per_record(&self) -> usize {
        let mut per_type: HashMap<&str, usize> = HashMap::new();
        for m in self.catalog.meters() {
            *per_type.entry(m.event_type.as_str()).or_default() += 1;
        }
        1 + per_type.values().copied().max().unwrap_or(0)
    }

    /// Rows a flush adds beyond its records': a checkpoint per partition and a coverage
    /// range per partition and meter.
    pub fn rows_per_partition(&self) -> usize {
        1 + self.catalog.meters().len()
    }

    fn storage_key<'s>(&'s self, meter: &'s str) -> &'s str {
        self.storage.get(meter).map_or(meter, String::as_str)
    }
}

/// One record as read from Kafka.
#[derive(Debug, Clone, Copy)]
pub struct Incoming<'a> {
    pub partition: i32,
    pub offset: i64,
    pub key: Option<&'a [u8]>,
    pub payload: Option<&'a [u8]>,
}

/// What happened to one record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Counted,
    Duplicate,
    Poison(Poison),
}

/// One partition's contribution since its last flush.
#[derive(Debug, Default)]
pub struct PartitionBatch {
    /// The new events' ledger rows, already encoded column by column (see
    /// [`crate::ledger`]).
    events: Columns,
    groups: HashMap<GroupKey, Acc>,
    uniques: HashMap<(GroupKey, String), u64>,
    /// Ids counted in this batch, with their receipt time, for the dedupe state.
    new_keys: HashMap<EventKey, u32>,
    /// First and last offset read (counted, duplicate or poison alike).
    pub first_offset: Option<i64>,
    pub last_offset: Option<i64>,
    /// Records read into this batch.
    pub records: usize,
}

impl PartitionBatch {
    /// After a flush took this batch's rows: an empty batch with room for as many ids,
    /// groups and event rows as this one held (the room [`take_into`](Self::take_into) left
    /// for event rows moves over), so a partition under steady load does not regrow its
    /// maps and columns every flush.
    pub fn successor(&mut self) -> PartitionBatch {
        PartitionBatch {
            events: std::mem::take(&mut self.events),
            groups: HashMap::with_capacity(self.groups.len()),
            uniques: HashMap::with_capacity(self.uniques.len()),
            new_keys: HashMap::with_capacity(self.new_keys.len()),
            ..PartitionBatch::default()
        }
    }

    /// Adds one record read from the partition: counted, recognised as a retry, or poison.
    pub fn add(&mut self, meters: &Meters<'_>, dedupe: &Dedupe, incoming: Incoming<'_>) -> Outcome {
        let Incoming {
            partition,
            offset,
            key,
            payload,
        } = incoming;
        self.note_offset(offset);
        match decode(key, payload) {
            Ok(event) => self.add_event(meters, dedupe, partition, offset, event),
            Err(p) => Outcome::Poison(p),
        }
    }

    fn note_offset(&mut self, offset: i64) {
        self.first_offset.get_or_insert(offset);
        self.last_offset = Some(offset);
        self.records += 1;
    }

    /// Adds a decoded event (the rebuild reads them from `events_raw`).
    pub fn add_event(
        &mut self,
        meters: &Meters<'_>,
        dedupe: &Dedupe,
        partition: i32,
        offset: i64,
        record: Event<'_>,
    ) -> Outcome {
        if self.last_offset != Some(offset) {
            self.note_offset(offset);
        }
        let (catalog, max_dimension_chars) = (meters.catalog, meters.max_dimension_chars);
        let event_key = EventKey::new(&record.tenant, &record.customer, &record.id);
        if dedupe.contains(&event_key) || self.new_keys.contains_key(&event_key) {
            return Outcome::Duplicate;
        }
        let data = match EventData::parse(record.data) {
            Ok(d) => d,
            Err(e) => {
                return Outcome::Poison(Poison {
                    reason: "undecodable",
                    detail: format!("not a usage record: data: {e}"),
                })
            }
        };
        let mut measured = Vec::new();
        for meter in catalog.meters_for_type(&record.event_type) {
            match data.measure(meter, max_dimension_chars) {
                Ok(m) => measured.push((meter, m)),
                Err(e) => {
                    return Outcome::Poison(Poison {
                        reason: "invalid",
                        detail: format!("meter {}: {e}", meter.key),
                    })
                }
            }
        }
        let Some(at_nanos) = epoch_nanos(&record) else {
            return Outcome::Poison(Poison {
                reason: "invalid",
                detail: "time: before 1970 or after 2106".into(),
            });
        };
        let time = record.time.unix_timestamp() as u32;
        let hour = time - time % 3600;
        let received_at = record
            .received_at
            .unix_timestamp()
            .clamp(0, i64::from(u32::MAX)) as u32;
        fn group_of<'a>(
            record: &'a Event<'_>,
            meter: &'a str,
            hour: u32,
            dims: &'a [String],
        ) -> GroupRef<'a> {
            GroupRef {
                tenant: &record.tenant,
                customer: &record.customer,
                meter,
                hour,
                dims,
            }
        }
        // Checked before anything is added, so a refused event leaves no partial trace.
        for (meter, m) in &measured {
            if let MeterValue::Number(q) = &m.value {
                if meter.aggregation == Aggregation::UniqueCount {
                    continue;
                }
                let before = self
                    .groups
                    .get(&group_of(
                        &record,
                        meters.storage_key(&meter.key),
                        hour,
                        &m.dimensions,
                    ))
                    .map_or(0, |a| a.sum);
                if before
                    .checked_add(q.nanos())
                    .and_then(Quantity::from_nanos)
                    .is_none()
                {
                    return Outcome::Poison(Poison {
                        reason: "overflow",
                        detail: format!("meter {}: hourly sum out of Decimal(38, 9)", meter.key),
                    });
                }
            }
        }
        for (meter, m) in &measured {
            let group = group_of(&record, meters.storage_key(&meter.key), hour, &m.dimensions);
            match (meter.aggregation, &m.value) {
                (Aggregation::UniqueCount, MeterValue::Identifier(v)) => {
                    let key = UniqueRef(group, v);
                    match self.uniques.get_mut(&key) {
                        Some(n) => *n += 1,
                        None => {
                            self.uniques.insert((group.to_owned(), v.clone()), 1);
                        }
                    }
                }
                (_, value) => {
                    let n = match value {
                        MeterValue::Number(q) => q.nanos(),
                        _ => 0,
                    };
                    let acc = match self.groups.get_mut(&group) {
                        Some(acc) => acc,
                        None => self.groups.entry(group.to_owned()).or_insert(Acc {
                            count: 0,
                            sum: 0,
                            min: n,
                            max: n,
                            latest: n,
                            latest_at: at_nanos,
                        }),
                    };
                    acc.count += 1;
                    acc.sum += n; // checked above
                    acc.min = acc.min.min(n);
                    acc.max = acc.max.max(n);
                    // Ties on event time keep the later record: deterministic within a
                    // partition, which holds every event of one customer.
                    if at_nanos >= acc.latest_at {
                        acc.latest = n;
                        acc.latest_at = at_nanos;
                    }
                }
            }
        }
        self.new_keys.insert(event_key, received_at);
        RowRef {
            kind: KIND_EVENT,
            tenant: &record.tenant,
            customer: &record.customer,
            id: &record.id,
            event_type: &record.event_type,
            time,
            time_nanos: record.time.nanosecond(),
            received_at,
            source: record.source.as_deref().unwrap_or_default(),
            data: record.data,
            kafka_partition: partition as u32,
            kafka_offset: offset as u64,
            ..RowRef::default()
        }
        .encode(&mut self.events);
        Outcome::Counted
    }

    /// Moves this batch's rows into a flush's insert: the new events (encoded as they
    /// came, not copied), rollup deltas, the offset range each meter version now covers,
    /// and the checkpoint. The batch keeps its offsets and ids for
    /// [`commit_into`](Self::commit_into) and must not be flushed again (a failed flush
    /// discards its batches).
    pub fn take_into(
        &mut self,
        meters: &Meters<'_>,
        topic: &str,
        partition: i32,
        now: u32,
        body: &mut Body,
    ) {
        let room = self.events.sized_like();
        body.append(std::mem::replace(&mut self.events, room));
        self.each_rest(meters, topic, partition, now, |r| body.push(r));
    }

    fn each_rest(
        &self,
        meters: &Meters<'_>,
        topic: &str,
        partition: i32,
        now: u32,
        mut each: impl FnMut(RowRef<'_>),
    ) {
        self.each_rollup(&mut each);
        if let (Some(first), Some(last)) = (self.first_offset, self.last_offset) {
            for meter in meters.catalog.meters() {
                each(coverage_row(
                    topic,
                    meters.storage_key(&meter.key),
                    partition,
                    (first, last),
                    "live",
                    now,
                ));
            }
            each(RowRef {
                kind: KIND_CHECKPOINT,
                topic,
                kafka_partition: partition as u32,
                kafka_offset: last as u64,
                received_at: now,
                ..RowRef::default()
            });
        }
    }

    /// Only the rollup deltas (what a rebuild writes).
    pub fn encode_rollups(&self, body: &mut Body) {
        self.each_rollup(|r| body.push(r));
    }

    /// The rollup deltas as owned rows (for tests and tools).
    pub fn rollup_rows(&self) -> Vec<LedgerRow> {
        let mut rows = Vec::new();
        self.each_rollup(|r| rows.push(r.to_row()));
        rows
    }

    fn each_rollup(&self, mut each: impl FnMut(RowRef<'_>)) {
        for (g, a) in &self.groups {
            each(RowRef {
                kind: KIND_ROLLUP,
                tenant: &g.tenant,
                customer: &g.customer,
                meter: &g.meter,
                hour: g.hour,
                dim_values: &g.dims,
                d_count: a.count,
                d_sum: a.sum,
                d_min: a.min,
                d_max: a.max,
                d_latest: a.latest,
                d_latest_at: a.latest_at,
                ..RowRef::default()
            });
        }
        for ((g, value), count) in &self.uniques {
            each(RowRef {
                kind: KIND_ROLLUP,
                tenant: &g.tenant,
                customer: &g.customer,
                meter: &g.meter,
                hour: g.hour,
                dim_values: &g.dims,
                d_count: *count,
                d_unique: value,
                ..RowRef::default()
            });
        }
    }

    /// The new events' rows as they will be sent.
    pub fn encoded_events(&self) -> &Columns {
        &self.events
    }

    /// Every row but the events, decoded back into owned rows (for tests and tools): what
    /// [`take_into`](Self::take_into) adds after the events.
    pub fn other_rows(
        &self,
        meters: &Meters<'_>,
        topic: &str,
        partition: i32,
        now: u32,
    ) -> Vec<LedgerRow> {
        let mut rows = Vec::new();
        self.each_rest(meters, topic, partition, now, |r| rows.push(r.to_row()));
        rows
    }

    /// After the flush landed: its ids join the partition's dedupe state.
    pub fn commit_into(self, dedupe: &mut Dedupe) {
        for (k, at) in self.new_keys {
            dedupe.insert(k, at);
        }
    }
}

/// A `meter_coverage` row: `meter` counts offsets `range` of `partition` (inclusive).
pub fn coverage_row<'a>(
    topic: &'a str,
    meter: &'a str,
    partition: i32,
    range: (i64, i64),
    source: &'a str,
    now: u32,
) -> RowRef<'a> {
    RowRef {
        kind: KIND_COVERAGE,
        topic,
        meter,
        kafka_partition: partition as u32,
        d_count: range.0 as u64,
        kafka_offset: range.1 as u64,
        source,
        received_at: now,
        ..RowRef::default()
    }
}

fn epoch_nanos(r: &Event<'_>) -> Option<u64> {
    let secs = r.time.unix_timestamp();
    if !(0..=i64::from(u32::MAX)).contains(&secs) {
        return None;
    }
    Some(secs as u64 * 1_000_000_000 + u64::from(r.time.nanosecond()))
}

/// A usage record as the aggregator reads it: [`tally_core::UsageRecord`]'s fields,
/// borrowed from the Kafka payload where they need no unescaping, and `data` as its JSON
/// text (stored as sent, measured through [`EventData`]).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct Event<'a> {
    pub v: u32,
    #[serde(borrow)]
    pub tenant: Cow<'a, str>,
    #[serde(borrow)]
    pub id: Cow<'a, str>,
    #[serde(borrow)]
    pub customer: Cow<'a, str>,
    #[serde(borrow, rename = "type")]
    pub event_type: Cow<'a, str>,
    #[serde(with = "time::serde::rfc3339")]
    pub time: OffsetDateTime,
    #[serde(with = "time::serde::rfc3339")]
    pub received_at: OffsetDateTime,
    #[serde(default, borrow, deserialize_with = "borrowed_option")]
    pub source: Option<Cow<'a, str>>,
    #[serde(borrow, deserialize_with = "raw_text")]
    pub data: &'a str,
}

/// `Option<Cow<str>>` does not borrow by itself.
fn borrowed_option<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> Result<Option<Cow<'de, str>>, D::Error> {
    #[derive(Deserialize)]
    struct Borrowed<'a>(#[serde(borrow)] Cow<'a, str>);
    Ok(Option::<Borrowed<'de>>::deserialize(d)?.map(|b| b.0))
}

fn raw_text<'de, D: serde::Deserializer<'de>>(d: D) -> Result<&'de str, D::Error> {
    <&'de RawValue>::deserialize(d).map(RawValue::get)
}

/// Decodes a Kafka record into an event, checking its key.
pub fn decode<'a>(key: Option<&[u8]>, payload: Option<&'a [u8]>) -> Result<Event<'a>, Poison> {
    let payload = payload.ok_or_else(|| Poison {
        reason: "empty",
        detail: "record has no payload".into(),
    })?;
    let record: Event<'a> = match fast::decode(payload) {
        Some(record) => record,
        None => serde_json::from_slice(payload).map_err(|e| Poison {
            reason: "undecodable",
            detail: format!("not a usage record: {e}"),
        })?,
    };
    if record.v != tally_core::event::RECORD_VERSION {
        return Err(Poison {
            reason: "version",
            detail: format!("record layout v{} not understood", record.v),
        });
    }
    if record.id.is_empty() || record.tenant.is_empty() || record.customer.is_empty() {
        return Err(Poison {
            reason: "invalid",
            detail: "tenant, id and customer must not be empty".into(),
        });
    }
    // Retries of one event must share a partition for per-partition dedupe to hold.
    let (tenant, customer) = (record.tenant.as_bytes(), record.customer.as_bytes());
    let keyed = key.is_some_and(|k| {
        k.len() == tenant.len() + 1 + customer.len()
            && k.starts_with(tenant)
            && k[tenant.len()] == b'/'
            && k.ends_with(customer)
    });
    if !keyed {
        let expected = record_key(&record.tenant, &record.customer);
        return Err(Poison {
            reason: "key",
            detail: format!("record key must be {expected:?}"),
        });
    }
    Ok(record)
}

mod fast;
#[cfg(test)]
mod tests;
