//! The ClickHouse edge: the flush insert, checkpoints, and dedupe state.
//!
//! "Flushed" means one INSERT into `ingest_ledger` returned success: its events, rollup
//! deltas and checkpoints are then all in ClickHouse (see `V2__rollups.sql`). A failed or
//! timed-out insert may still have landed; callers never retry one blindly but reload the
//! checkpoints, which say exactly what landed.

use std::collections::HashMap;
use std::time::Duration;

use clickhouse::Client;
use tally_core::config::ClickHouseConfig;

use crate::ledger::{Body, COLUMNS};
use crate::rollup::{Dedupe, EventKey};

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    #[error("clickhouse: {0}")]
    ClickHouse(#[from] clickhouse::error::Error),
    #[error("clickhouse did not answer within {0:?}")]
    Timeout(Duration),
}

pub type Result<T, E = StoreError> = std::result::Result<T, E>;

/// Rows one flush's INSERT may hold. A Native body is one block whatever its size, so this
/// no longer decides atomicity; it keeps the block, and the memory ClickHouse needs to push
/// it through the ledger's views, bounded however many meters read one event type, and it
/// is below ClickHouse's default `max_insert_block_size` (1,048,576), so a flush would
/// stay one block in a row format too.
pub const MAX_ROWS_PER_INSERT: usize = 1_000_000;

/// A name for one INSERT (`tally-<kind>-<pid>-<nanos>-<n>`), unique across processes and
/// restarts: ClickHouse refuses a second query under a name still running, and
/// [`Store::settled`] looks one up by it.
pub fn query_id(kind: &str) -> String {
    static ISSUED: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    format!(
        "tally-{kind}-{}-{nanos}-{}",
        std::process::id(),
        ISSUED.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    )
}

#[derive(Clone)]
pub struct Store {
    client: Client,
    timeout: Duration,
}

#[derive(Debug, clickhouse::Row, serde::Deserialize)]
struct CheckpointRow {
    kafka_partition: u32,
    last_offset: u64,
}

#[derive(Debug, clickhouse::Row, serde::Deserialize)]
struct CoverageRow {
    meter: String,
    offset_from: u64,
    offset_to: u64,
}

/// One row of `events_raw`, as the rebuild reads it.
#[derive(Debug, Clone, clickhouse::Row, serde::Deserialize)]
pub struct RawEvent {
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
    pub kafka_offset: u64,
}

#[derive(Debug, clickhouse::Row, serde::Deserialize)]
struct SeenRow {
    tenant: String,
    customer: String,
    id: String,
    received_at: u32,
}

impl Store {
    pub fn new(config: &ClickHouseConfig, timeout: Duration) -> Store {
        Store {
            client: crate::migrate::client(config),
            timeout,
        }
    }

    async fn bounded<T>(&self, f: impl std::future::Future<Output = Result<T>>) -> Result<T> {
        tokio::time::timeout(self.timeout, f)
            .await
            .map_err(|_| StoreError::Timeout(self.timeout))?
    }

    /// Writes one flush as a single INSERT of one Native block (so one atomic write
    /// through the ledger's views). `query_id` names the INSERT in ClickHouse: after a
    /// failure, [`Store::settled`] says when it can no longer land.
    pub async fn insert_body(&self, body: Body, query_id: &str) -> Result<()> {
        if body.is_empty() {
            return Ok(());
        }
        self.bounded(async {
            let mut insert = self
                .client
                .insert_formatted_with(format!(
                    "INSERT INTO ingest_ledger ({COLUMNS}) FORMAT Native"
                ))
                .with_setting("query_id", query_id);
            for chunk in body.into_chunks() {
                insert.send(bytes::Bytes::from(chunk)).await?;
            }
            insert.end().await?;
            Ok(())
        })
        .await
    }

    /// Whether ClickHouse runs no query named `query_id` any more. An INSERT the client gave
    /// up on (a timeout, a lost connection) may still be running on the server and still
    /// land; the checkpoints say what landed only once it has ended, so a rewind waits for
    /// this first.
    pub async fn settled(&self, query_id: &str) -> Result<bool> {
        self.bounded(async {
            let running: u64 = self
                .client
                .query("SELECT count() FROM system.processes WHERE query_id = ?")
                .bind(query_id)
                .fetch_one()
                .await?;
            Ok(running == 0)
        })
        .await
    }

    /// The last offset flushed for each partition of `topic` that has one.
    pub async fn checkpoints(&self, topic: &str) -> Result<HashMap<i32, i64>> {
        self.bounded(async {
            let rows: Vec<CheckpointRow> = self
                .client
                .query(
                    "SELECT kafka_partition, max(kafka_offset) AS last_offset FROM aggregator_checkpoints \
                     WHERE topic = ? GROUP BY kafka_partition",
                )
                .bind(topic)
                .fetch_all()
                .await?;
            Ok(rows
                .into_iter()
                .map(|r| (r.kafka_partition as i32, r.last_offset as i64))
                .collect())
        })
        .await
    }

    /// The ids a partition counted since `since` (unix seconds): its dedupe state.
    pub async fn load_dedupe(&self, partition: i32, since: u32) -> Result<Dedupe> {
        self.bounded(async {
            let mut cursor = self
                .client
                .query(
                    "SELECT tenant, customer, id, toUInt32(received_at) AS received_at FROM events_raw \
                     WHERE kafka_partition = ? AND received_at >= toDateTime(?, 'UTC')",
                )
                .bind(partition as u32)
                .bind(since)
                .fetch::<SeenRow>()?;
            let mut dedupe = Dedupe::default();
            while let Some(row) = cursor.next().await? {
                dedupe.insert(EventKey::new(&row.tenant, &row.customer, &row.id), row.received_at);
            }
            Ok(dedupe)
        })
        .await
    }

    /// Offset ranges of `partition` counted for meter version `meter`, in order, and the last
    /// offset any meter version covers there (the partition's flushed end). Both come from
    /// one table that each flush writes in one part, so they agree.
    pub async fn coverage(
        &self,
        topic: &str,
        meter: &str,
        partition: i32,
    ) -> Result<(Vec<(i64, i64)>, Option<i64>)> {
        self.bounded(async {
            let rows: Vec<CoverageRow> = self
                .client
                .query(
                    "SELECT meter, offset_from, offset_to FROM meter_coverage \
                     WHERE topic = ? AND kafka_partition = ? ORDER BY offset_from",
                )
                .bind(topic)
                .bind(partition as u32)
                .fetch_all()
                .await?;
            let end = rows.iter().map(|r| r.offset_to as i64).max();
            let ranges = rows
                .into_iter()
                .filter(|r| r.meter == meter)
                .map(|r| (r.offset_from as i64, r.offset_to as i64))
                .collect();
            Ok((ranges, end))
        })
        .await
    }

    /// Partitions of `topic` that have flushed anything.
    pub async fn partitions(&self, topic: &str) -> Result<Vec<i32>> {
        Ok(self.checkpoints(topic).await?.into_keys().collect())
    }

    /// The stored events of `event_type` in offsets `lo..=hi` of `partition`, in offset order.
    pub async fn raw_events(
        &self,
        partition: i32,
        (lo, hi): (i64, i64),
        event_type: &str,
    ) -> Result<Vec<RawEvent>> {
        self.bounded(async {
            Ok(self
                .client
                .query(
                    "SELECT tenant, customer, id, type, toUInt32(time) AS time, time_nanos, \
                     toUInt32(received_at) AS received_at, source, data, kafka_offset FROM events_raw \
                     WHERE kafka_partition = ? AND kafka_offset >= ? AND kafka_offset <= ? AND type = ? \
                     ORDER BY kafka_offset",
                )
                .bind(partition as u32)
                .bind(lo as u64)
                .bind(hi as u64)
                .bind(event_type)
                .fetch_all()
                .await?)
        })
        .await
    }

    /// Whether ClickHouse answers.
    pub async fn ping(&self) -> Result<()> {
        self.bounded(async {
            self.client.query("SELECT 1").execute().await?;
            Ok(())
        })
        .await
    }
}
