//! The two consumers the aggregator is compared with, each run by the bench in a child
//! process of its own so that its CPU is its own:
//!
//! - the **bare consumer**: assigns every partition from the beginning and reads the topic
//!   to its end, doing nothing with the records (the broker's ceiling);
//! - the **do-it-yourself pipeline**: what a hand-rolled Kafka → ClickHouse path typically
//!   is. It decodes each record, batches rows and inserts them with
//!   `INSERT … FORMAT JSONEachRow` over HTTP into a MergeTree table, whose materialized view
//!   rolls them up into an AggregatingMergeTree ([`diy_schema`]). No dedupe, no
//!   exactly-once: offsets are committed after each insert (at least once).

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use bytes::Bytes;
use http::StatusCode;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
use rdkafka::message::Message;
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use serde::Serialize;
use tally_core::UsageRecord;

use crate::agg::ch::{url_encode, Http};
use crate::procfs;

/// The do-it-yourself tables in `database`, for ClickHouse 18.16 and current versions alike.
/// The raw table keeps `data` as the JSON text it arrived as (the usual schema-agnostic
/// choice); the view reads values out of it with `visitParamExtract*` (Float64, as such
/// pipelines do), per tenant, customer, event type and hour.
pub fn diy_schema(database: &str) -> Vec<String> {
    vec![
        format!(
            "CREATE TABLE {database}.diy_events (tenant String, customer String, id String, \
             type String, time DateTime('UTC'), received_at DateTime('UTC'), data String) \
             ENGINE = MergeTree PARTITION BY toYYYYMM(time) \
             ORDER BY (tenant, customer, type, time, id)"
        ),
        format!(
            "CREATE TABLE {database}.diy_rollups (tenant String, customer String, type String, \
             hour DateTime('UTC'), events AggregateFunction(sum, UInt64), \
             value_sum AggregateFunction(sum, Float64), \
             users AggregateFunction(uniqExact, String)) \
             ENGINE = AggregatingMergeTree PARTITION BY toYYYYMM(hour) \
             ORDER BY (tenant, customer, type, hour)"
        ),
        format!(
            "CREATE MATERIALIZED VIEW {database}.diy_rollups_mv TO {database}.diy_rollups AS \
             SELECT tenant, customer, type, toStartOfHour(time) AS hour, \
             sumState(toUInt64(1)) AS events, \
             sumState(visitParamExtractFloat(data, 'tokens')) AS value_sum, \
             uniqExactState(visitParamExtractString(data, 'user')) AS users \
             FROM {database}.diy_events GROUP BY tenant, customer, type, hour"
        ),
    ]
}

/// What a drain achieved, as the child prints it (one JSON line on stdout).
#[derive(Debug, Clone, Default, Serialize, serde::Deserialize)]
pub struct Drained {
    /// Records read.
    pub records: u64,
    /// Payload bytes read.
    pub bytes: u64,
    /// From assigning the partitions to the last record read (and, for the DIY pipeline,
    /// its last insert acknowledged).
    pub seconds: f64,
    /// This process's CPU seconds, start to finish.
    pub cpu_seconds: f64,
    /// Inserts made (DIY only).
    pub inserts: u64,
    /// Records that did not decode (DIY only; skipped).
    pub undecodable: u64,
    /// Whether every partition was read to the end it had when the drain started.
    pub complete: bool,
}

/// `fetch.wait.max.ms` of the aggregator's consumer (`aggregator/src/service.rs`).
pub const AGGREGATOR_FETCH_WAIT_MS: u32 = 100;

/// `fetch.wait.max.ms` of the bare consumer that measures the broker's ceiling. tansu 0.6.0
/// holds every fetch response for the whole `fetch.wait.max.ms` even when it has records
/// (`tansu-storage-0.6.0/src/service/fetch.rs`: the loop sleeps the remaining wait
/// unconditionally) and fills at most 5 MiB per response, so a consumer on it reads at most
/// 5 MiB per `fetch.wait.max.ms`; 1 ms takes that cap out of the way.
pub const CEILING_FETCH_WAIT_MS: u32 = 1;

/// A consumer with the aggregator's settings for fetching (`service.rs`) but for
/// `fetch_wait_ms`, so the readers differ only in what they do with the records.
/// `TALLY_AGGBENCH_CONSUMER_CONFIG` (`key=value,…`) adds librdkafka settings to the bare and
/// DIY consumers (never the aggregator), to probe whether a ceiling is the broker's or the
/// client's settings.
fn consumer(brokers: &str, group: &str, fetch_wait_ms: u32) -> anyhow::Result<BaseConsumer> {
    let mut config = ClientConfig::new();
    config
        .set("bootstrap.servers", brokers)
        .set("group.id", group)
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("auto.offset.reset", "earliest")
        .set("fetch.wait.max.ms", fetch_wait_ms.to_string());
    if let Ok(extra) = std::env::var("TALLY_AGGBENCH_CONSUMER_CONFIG") {
        for kv in extra.split(',').filter(|s| !s.is_empty()) {
            let (k, v) = kv.split_once('=').with_context(|| {
                format!("TALLY_AGGBENCH_CONSUMER_CONFIG: {kv:?} is not key=value")
            })?;
            config.set(k.trim(), v.trim());
        }
    }
    config.create().context("creating a consumer")
}

/// `partition:end,…` (what [`crate::agg::drain::ends_arg`] writes).
pub fn parse_ends(arg: &str) -> anyhow::Result<BTreeMap<i32, i64>> {
    arg.split(',')
        .filter(|s| !s.is_empty())
        .map(|pe| {
            let (p, e) = pe.split_once(':').context("ends: partition:end")?;
            Ok((p.parse()?, e.parse()?))
        })
        .collect()
}

/// The broker's high watermark of every partition of `topic`.
pub fn watermarks(brokers: &str, topic: &str) -> anyhow::Result<BTreeMap<i32, i64>> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .create()
        .context("creating a metadata consumer")?;
    let timeout = Duration::from_secs(10);
    let md = consumer
        .fetch_metadata(Some(topic), timeout)
        .with_context(|| format!("metadata of {topic}"))?;
    let mut out = BTreeMap::new();
    for t in md.topics().iter().filter(|t| t.name() == topic) {
        for p in t.partitions() {
            let (_, high) = consumer
                .fetch_watermarks(topic, p.id(), timeout)
                .with_context(|| format!("watermarks of {topic}/{}", p.id()))?;
            out.insert(p.id(), high);
        }
    }
    if out.is_empty() {
        bail!("topic {topic} has no partitions on {brokers}");
    }
    Ok(out)
}

/// Tracks how far each partition has been read.
struct Progress {
    ends: BTreeMap<i32, i64>,
    next: BTreeMap<i32, i64>,
    behind: usize,
}

impl Progress {
    fn new(ends: BTreeMap<i32, i64>) -> Progress {
        let behind = ends.values().filter(|&&e| e > 0).count();
        Progress {
            next: ends.keys().map(|&p| (p, 0)).collect(),
            ends,
            behind,
        }
    }

    fn read(&mut self, partition: i32, offset: i64) {
        let end = self.ends.get(&partition).copied().unwrap_or(0);
        if let Some(next) = self.next.get_mut(&partition) {
            if *next < end && offset + 1 >= end {
                self.behind -= 1;
            }
            *next = (*next).max(offset + 1);
        }
    }

    fn done(&self) -> bool {
        self.behind == 0
    }

    fn assignment(&self, topic: &str) -> anyhow::Result<TopicPartitionList> {
        let mut tpl = TopicPartitionList::new();
        for &p in self.ends.keys() {
            tpl.add_partition_offset(topic, p, Offset::Beginning)
                .context("building the assignment")?;
        }
        Ok(tpl)
    }

    /// Offsets to commit: the next record to read, per partition read so far.
    fn commit_list(&self, topic: &str) -> TopicPartitionList {
        let mut tpl = TopicPartitionList::new();
        for (&p, &next) in self.next.iter().filter(|(_, &n)| n > 0) {
            let _ = tpl.add_partition_offset(topic, p, Offset::Offset(next));
        }
        tpl
    }
}

/// The bare consumer: reads `topic` from the beginning to `ends`, or for at most
/// `max_time`.
pub fn bare(
    brokers: &str,
    topic: &str,
    ends: BTreeMap<i32, i64>,
    fetch_wait_ms: u32,
    max_time: Duration,
) -> anyhow::Result<Drained> {
    let mut progress = Progress::new(ends);
    let consumer = consumer(brokers, &format!("{topic}-bare"), fetch_wait_ms)?;
    let started = Instant::now();
    consumer
        .assign(&progress.assignment(topic)?)
        .context("assigning the partitions")?;
    let mut out = Drained::default();
    while !progress.done() && started.elapsed() < max_time {
        match consumer.poll(Duration::from_millis(100)) {
            Some(Ok(m)) => {
                out.records += 1;
                out.bytes += m.payload_len() as u64;
                progress.read(m.partition(), m.offset());
            }
            Some(Err(e)) => eprintln!("bare consumer: {e}"),
            None => {}
        }
    }
    out.seconds = started.elapsed().as_secs_f64();
    out.complete = progress.done();
    out.cpu_seconds = procfs::self_cpu_seconds().unwrap_or(f64::NAN);
    Ok(out)
}

/// One `diy_events` row in JSONEachRow: times as unix seconds, `data` as its JSON text.
#[derive(Serialize)]
struct DiyRow<'a> {
    tenant: &'a str,
    customer: &'a str,
    id: &'a str,
    #[serde(rename = "type")]
    event_type: &'a str,
    time: i64,
    received_at: i64,
    data: String,
}

/// Where and how the DIY pipeline writes.
#[derive(Debug, Clone)]
pub struct DiyTarget {
    pub clickhouse_url: String,
    pub database: String,
    /// Rows per insert.
    pub batch: usize,
    /// An insert at least this often while records arrive.
    pub interval: Duration,
}

/// The do-it-yourself pipeline: reads `topic` to `ends` (or for `max_time`), inserting
/// every record as it comes, in batches.
pub fn diy(
    brokers: &str,
    topic: &str,
    ends: BTreeMap<i32, i64>,
    target: &DiyTarget,
    max_time: Duration,
) -> anyhow::Result<Drained> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("tokio runtime")?;
    let http = Http::new();
    let url = format!(
        "{}/?database={}&query={}",
        target.clickhouse_url,
        url_encode(&target.database),
        url_encode("INSERT INTO diy_events FORMAT JSONEachRow")
    );
    let insert = |body: Vec<u8>| -> anyhow::Result<()> {
        let (status, answer) = rt.block_on(http.post(&url, Bytes::from(body)))?;
        if status != StatusCode::OK {
            bail!(
                "insert refused: {status}: {}",
                String::from_utf8_lossy(&answer).trim()
            );
        }
        Ok(())
    };

    let mut progress = Progress::new(ends);
    let group = format!("{topic}-diy-{}", target.database);
    let consumer = consumer(brokers, &group, AGGREGATOR_FETCH_WAIT_MS)?;
    let started = Instant::now();
    consumer
        .assign(&progress.assignment(topic)?)
        .context("assigning the partitions")?;
    let mut out = Drained::default();
    let mut body: Vec<u8> = Vec::with_capacity(target.batch * 320);
    let mut rows = 0usize;
    let mut oldest: Option<Instant> = None;
    loop {
        let finished = progress.done() || started.elapsed() >= max_time;
        if !finished {
            match consumer.poll(Duration::from_millis(100)) {
                Some(Ok(m)) => {
                    out.records += 1;
                    out.bytes += m.payload_len() as u64;
                    progress.read(m.partition(), m.offset());
                    match serde_json::from_slice::<UsageRecord>(m.payload().unwrap_or_default()) {
                        Ok(r) => {
                            let row = DiyRow {
                                tenant: &r.tenant,
                                customer: &r.customer,
                                id: &r.id,
                                event_type: &r.event_type,
                                time: r.time.unix_timestamp(),
                                received_at: r.received_at.unix_timestamp(),
                                data: serde_json::to_string(&r.data)
                                    .context("re-serializing data")?,
                            };
                            serde_json::to_writer(&mut body, &row).context("writing a row")?;
                            body.push(b'\n');
                            rows += 1;
                            oldest.get_or_insert_with(Instant::now);
                        }
                        Err(_) => out.undecodable += 1,
                    }
                }
                Some(Err(e)) => eprintln!("diy consumer: {e}"),
                None => {}
            }
        }
        let due = oldest.is_some_and(|t| t.elapsed() >= target.interval);
        if rows > 0 && (rows >= target.batch || due || finished) {
            insert(std::mem::take(&mut body))?;
            body.reserve(target.batch * 320);
            out.inserts += 1;
            rows = 0;
            oldest = None;
            // At least once: the offsets move only after the rows landed.
            let _ = consumer.commit(&progress.commit_list(topic), CommitMode::Async);
        }
        if finished {
            break;
        }
    }
    out.seconds = started.elapsed().as_secs_f64();
    out.complete = progress.done();
    out.cpu_seconds = procfs::self_cpu_seconds().unwrap_or(f64::NAN);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ends_round_trip() {
        let ends = BTreeMap::from([(0, 5), (3, 0), (7, 12)]);
        let arg = crate::agg::drain::ends_arg(&ends);
        assert_eq!(arg, "0:5,3:0,7:12");
        assert_eq!(parse_ends(&arg).expect("parses"), ends);
    }

    #[test]
    fn progress_counts_partitions_to_their_ends() {
        let mut p = Progress::new(BTreeMap::from([(0, 2), (1, 0), (2, 1)]));
        assert!(!p.done());
        p.read(0, 0);
        p.read(2, 0);
        assert!(!p.done());
        p.read(0, 1);
        assert!(p.done());
        assert_eq!(p.commit_list("t").count(), 2);
    }
}
