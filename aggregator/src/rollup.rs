//! The pure core of the aggregator: records in, one flush's ledger rows out.
//!
//! A [`PartitionBatch`] holds what one partition contributed since the last flush: the new
//! events (for `events_raw`), their meters' pre-aggregated hourly deltas, and the last
//! offset read. Duplicates are recognised against the partition's [`Dedupe`] state plus the
//! ids already in the batch; they only move the offset. Nothing here touches the network.

use std::borrow::Cow;
use std::collections::HashMap;
use std::hash::{Hash, Hasher};

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use tally_core::event::record_key;
use tally_core::{Aggregation, Catalog, EventData, MeterValue, Quantity};
use time::OffsetDateTime;

/// Row kinds of `ingest_ledger` (see `schemas/clickhouse/V2__rollups.sql`).
pub const KIND_EVENT: u8 = 1;
pub const KIND_ROLLUP: u8 = 2;
pub const KIND_CHECKPOINT: u8 = 3;
pub const KIND_COVERAGE: u8 = 4;

/// One row of the single insert a flush makes.
#[derive(Debug, Clone, Default, PartialEq, Eq, clickhouse::Row, Serialize)]
pub struct LedgerRow {
    pub kind: u8,
    pub tenant: String,
    pub customer: String,
    pub id: String,
    #[serde(rename = "type")]
    pub event_type: String,
    pub time: u32,
    pub time_nanos: u32,
    pub received_at: u32,
    pub source: String,
    pub data: String,
    pub topic: String,
    pub kafka_partition: u32,
    pub kafka_offset: u64,
    pub meter: String,
    pub hour: u32,
    pub dim_values: Vec<String>,
    pub d_count: u64,
    pub d_sum: i128,
    pub d_min: i128,
    pub d_max: i128,
    pub d_latest: i128,
    pub d_latest_at: u64,
    pub d_unique: String,
}

/// A record the aggregator cannot count, bound for the dead-letter topic.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Poison {
    /// Bounded label (metrics, the `reason` header).
    pub reason: &'static str,
    pub detail: String,
}

/// A 128-bit fingerprint of an event's identity, (tenant, customer, event id): collisions
/// are out of reach at any volume this state holds, and it costs 16 bytes instead of the
/// strings.
///
/// The customer is part of it because records are keyed (and partitioned) by tenant and
/// customer: a retry always lands in the partition of its first copy, but two customers who
/// happen to use one id may not, so a key without the customer would make "duplicate" depend
/// on partitioning. The quota feed counts once per the same identity.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct EventKey(u128);

impl EventKey {
    pub fn new(tenant: &str, customer: &str, id: &str) -> EventKey {
        let half = |salt: u8| {
            let mut h = std::hash::DefaultHasher::new();
            salt.hash(&mut h);
            tenant.hash(&mut h);
            customer.hash(&mut h);
            id.hash(&mut h);
            h.finish()
        };
        EventKey((u128::from(half(1)) << 64) | u128::from(half(2)))
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

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct GroupKey {
    tenant: String,
    customer: String,
    meter: String,
    hour: u32,
    dims: Vec<String>,
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
    events: Vec<LedgerRow>,
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
        for (meter, m) in measured {
            let group = GroupKey {
                tenant: record.tenant.to_string(),
                customer: record.customer.to_string(),
                meter: meters.storage_key(&meter.key).to_owned(),
                hour,
                dims: m.dimensions,
            };
            match (meter.aggregation, m.value) {
                (Aggregation::UniqueCount, MeterValue::Identifier(v)) => {
                    *self.uniques.entry((group, v)).or_default() += 1;
                }
                (_, value) => {
                    let n = match value {
                        MeterValue::Number(q) => q.nanos(),
                        _ => 0,
                    };
                    let acc = self.groups.entry(group).or_insert(Acc {
                        count: 0,
                        sum: 0,
                        min: n,
                        max: n,
                        latest: n,
                        latest_at: at_nanos,
                    });
                    acc.count += 1;
                    acc.sum = match acc.sum.checked_add(n).and_then(Quantity::from_nanos) {
                        Some(s) => s.nanos(),
                        None => {
                            return Outcome::Poison(Poison {
                                reason: "overflow",
                                detail: format!(
                                    "meter {}: hourly sum out of Decimal(38, 9)",
                                    meter.key
                                ),
                            })
                        }
                    };
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
        self.events.push(LedgerRow {
            kind: KIND_EVENT,
            tenant: record.tenant.into_owned(),
            customer: record.customer.into_owned(),
            id: record.id.into_owned(),
            event_type: record.event_type.into_owned(),
            time,
            time_nanos: record.time.nanosecond(),
            received_at,
            source: record.source.map(Cow::into_owned).unwrap_or_default(),
            data: record.data.to_owned(),
            kafka_partition: partition as u32,
            kafka_offset: offset as u64,
            ..LedgerRow::default()
        });
        Outcome::Counted
    }

    /// The rows of this batch for the flush insert: new events, rollup deltas, the offset
    /// range each meter version now covers, and the checkpoint.
    pub fn rows(
        &self,
        meters: &Meters<'_>,
        topic: &str,
        partition: i32,
        now: u32,
        out: &mut Vec<LedgerRow>,
    ) {
        out.extend(self.events.iter().cloned());
        self.rollup_rows(out);
        if let (Some(first), Some(last)) = (self.first_offset, self.last_offset) {
            for meter in meters.catalog.meters() {
                out.push(coverage_row(
                    topic,
                    meters.storage_key(&meter.key),
                    partition,
                    (first, last),
                    "live",
                    now,
                ));
            }
            out.push(LedgerRow {
                kind: KIND_CHECKPOINT,
                topic: topic.to_owned(),
                kafka_partition: partition as u32,
                kafka_offset: last as u64,
                received_at: now,
                ..LedgerRow::default()
            });
        }
    }

    /// As [`rows`](Self::rows), moving the event rows out instead of copying them: the
    /// batch keeps its offsets and ids for [`commit_into`](Self::commit_into), and must not
    /// be flushed again (a failed flush discards its batches).
    pub fn take_rows(
        &mut self,
        meters: &Meters<'_>,
        topic: &str,
        partition: i32,
        now: u32,
        out: &mut Vec<LedgerRow>,
    ) {
        out.append(&mut self.events);
        self.rows(meters, topic, partition, now, out);
    }

    /// Only the rollup deltas (what a rebuild writes).
    pub fn rollup_rows(&self, out: &mut Vec<LedgerRow>) {
        for (g, a) in &self.groups {
            out.push(LedgerRow {
                kind: KIND_ROLLUP,
                tenant: g.tenant.clone(),
                customer: g.customer.clone(),
                meter: g.meter.clone(),
                hour: g.hour,
                dim_values: g.dims.clone(),
                d_count: a.count,
                d_sum: a.sum,
                d_min: a.min,
                d_max: a.max,
                d_latest: a.latest,
                d_latest_at: a.latest_at,
                ..LedgerRow::default()
            });
        }
        for ((g, value), count) in &self.uniques {
            out.push(LedgerRow {
                kind: KIND_ROLLUP,
                tenant: g.tenant.clone(),
                customer: g.customer.clone(),
                meter: g.meter.clone(),
                hour: g.hour,
                dim_values: g.dims.clone(),
                d_count: *count,
                d_unique: value.clone(),
                ..LedgerRow::default()
            });
        }
    }

    /// After the flush landed: its ids join the partition's dedupe state.
    pub fn commit_into(self, dedupe: &mut Dedupe) {
        for (k, at) in self.new_keys {
            dedupe.insert(k, at);
        }
    }
}

/// A `meter_coverage` row: `meter` counts offsets `range` of `partition` (inclusive).
pub fn coverage_row(
    topic: &str,
    meter: &str,
    partition: i32,
    range: (i64, i64),
    source: &str,
    now: u32,
) -> LedgerRow {
    LedgerRow {
        kind: KIND_COVERAGE,
        topic: topic.to_owned(),
        meter: meter.to_owned(),
        kafka_partition: partition as u32,
        d_count: range.0 as u64,
        kafka_offset: range.1 as u64,
        source: source.to_owned(),
        received_at: now,
        ..LedgerRow::default()
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
    let record: Event<'a> = serde_json::from_slice(payload).map_err(|e| Poison {
        reason: "undecodable",
        detail: format!("not a usage record: {e}"),
    })?;
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
    let expected = record_key(&record.tenant, &record.customer);
    if key != Some(expected.as_bytes()) {
        return Err(Poison {
            reason: "key",
            detail: format!("record key must be {expected:?}"),
        });
    }
    Ok(record)
}

#[cfg(test)]
mod tests;
