//! Figures 1 and 2: three readers drain the same pre-filled topic, each measured alone —
//! the bare consumer, the aggregator, and the do-it-yourself pipeline — with the CPU of
//! each reader's process, of ClickHouse and of tansu over the drain.

use std::collections::{BTreeMap, VecDeque};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord};
use tally_core::Config;
use tokio::process::Command;

use crate::agg::aggregator::{migrate, AggregatorProcess, Target};
use crate::agg::ch::ClickHouse;
use crate::agg::consumers::{self, diy_schema, Drained};
use crate::agg::report::Run;
use crate::broker;
use crate::events::Payload;
use crate::procfs;
use crate::produce;

/// How often the bench asks ClickHouse whether a drain is done (the aggregator's
/// checkpoints; for the DIY pipeline an equally cheap `system.merges` count, so both pay
/// the same probing).
pub const PROBE_EVERY: Duration = Duration::from_millis(50);
/// Longest wait for ClickHouse's merges before and after a drain.
const SETTLE_MAX: Duration = Duration::from_secs(30);

/// Records in flight while pre-filling a topic.
const PREFILL_WINDOW: usize = 20_000;

/// A pre-filled topic on one broker.
#[derive(Debug, Clone)]
pub struct Topic {
    pub brokers: String,
    pub name: String,
    /// High watermark per partition after the pre-fill.
    pub ends: BTreeMap<i32, i64>,
    pub records: u64,
    /// Distinct event ids among the records (what an exactly-once reader counts).
    pub distinct: u64,
    pub broker_pid: Option<u32>,
    pub prefill_rate: f64,
}

/// Creates `name` with `partitions` and produces `payloads` to it with the collector's
/// producer settings; fails unless every record was acknowledged.
pub async fn prefill(
    config: &Config,
    brokers: &str,
    broker_pid: Option<u32>,
    name: &str,
    payloads: &[Payload],
    distinct: u64,
) -> anyhow::Result<Topic> {
    broker::create_topic(brokers, name, config.kafka.partitions).await?;
    let producer = produce::future_producer(&config.kafka, brokers)?;
    // Not a measured figure: a window the broker drains within the producer's message
    // timeout however slow its storage (tansu's sqlite took 31,000 records/s on one box, so
    // the 100,000-record queue bound timed records out there).
    let window = (config.kafka.queue_max_messages as usize).min(PREFILL_WINDOW);
    let started = Instant::now();
    let mut ends = BTreeMap::new();
    produce_all(&producer, name, payloads, window, &mut ends).await?;
    let prefill_rate = payloads.len() as f64 / started.elapsed().as_secs_f64();
    let records: i64 = ends.values().sum();
    if records != payloads.len() as i64 {
        bail!(
            "pre-fill: acknowledged offsets {ends:?} do not add up to the {} records sent",
            payloads.len()
        );
    }
    let watermarks = watermarks(brokers, name).await?;
    if watermarks != ends {
        eprintln!(
            "  note: the broker's high watermarks {watermarks:?} differ from the acknowledged \
             ends {ends:?}; the bench goes by the acknowledgements"
        );
    }
    Ok(Topic {
        brokers: brokers.to_owned(),
        name: name.to_owned(),
        ends,
        records: records as u64,
        distinct,
        broker_pid,
        prefill_rate,
    })
}

/// Sends every payload (up to `window` in flight) and raises `ends` to one past the offset
/// each acknowledgement reports. The broker's own high watermark is not used: tansu 0.6.0
/// with `memory://` storage reports one below what it holds once batches get large.
pub async fn produce_all(
    producer: &FutureProducer,
    topic: &str,
    payloads: &[Payload],
    window: usize,
    ends: &mut BTreeMap<i32, i64>,
) -> anyhow::Result<()> {
    let mut in_flight: VecDeque<DeliveryFuture> = VecDeque::with_capacity(window);
    let deadline = Instant::now() + Duration::from_secs(600);
    for p in payloads {
        if Instant::now() > deadline {
            bail!("producing {} records took over 600 s", payloads.len());
        }
        if in_flight.len() >= window.max(1) {
            if let Some(d) = in_flight.pop_front() {
                settle(d, ends).await?;
            }
        }
        loop {
            let record = FutureRecord::to(topic).key(&p.key).payload(&p.value);
            match producer.send_result(record) {
                Ok(d) => {
                    in_flight.push_back(d);
                    break;
                }
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), _)) => {
                    match in_flight.pop_front() {
                        Some(d) => settle(d, ends).await?,
                        None => tokio::time::sleep(Duration::from_millis(10)).await,
                    }
                }
                Err((e, _)) => bail!("enqueueing a record: {e}"),
            }
        }
    }
    while let Some(d) = in_flight.pop_front() {
        settle(d, ends).await?;
    }
    Ok(())
}

async fn settle(d: DeliveryFuture, ends: &mut BTreeMap<i32, i64>) -> anyhow::Result<()> {
    match d.await {
        Ok(Ok(delivery)) => {
            let end = ends.entry(delivery.partition).or_insert(0);
            *end = (*end).max(delivery.offset + 1);
            Ok(())
        }
        Ok(Err((e, _))) => bail!("produce failed: {e}"),
        Err(_) => bail!("produce canceled"),
    }
}

/// The broker's high watermark per partition of `topic`.
pub async fn watermarks(brokers: &str, topic: &str) -> anyhow::Result<BTreeMap<i32, i64>> {
    let (brokers, topic) = (brokers.to_owned(), topic.to_owned());
    tokio::task::spawn_blocking(move || consumers::watermarks(&brokers, &topic))
        .await
        .context("watermarks task")?
}

/// `ends` as a child's argument: `partition:end,…`.
pub fn ends_arg(ends: &BTreeMap<i32, i64>) -> String {
    ends.iter()
        .map(|(p, e)| format!("{p}:{e}"))
        .collect::<Vec<_>>()
        .join(",")
}

/// CPU counters of ClickHouse and the broker, read at the start and end of a drain.
struct Meter {
    clickhouse: f64,
    broker: f64,
    broker_pid: Option<u32>,
}

impl Meter {
    fn start(ch: &ClickHouse, broker_pid: Option<u32>) -> Meter {
        Meter {
            clickhouse: ch.cpu_seconds(),
            broker: broker_pid.and_then(procfs::cpu_seconds).unwrap_or(0.0),
            broker_pid,
        }
    }

    /// (ClickHouse, broker) CPU seconds since the start.
    fn stop(&self, ch: &ClickHouse) -> (f64, f64) {
        let broker = self.broker_pid.and_then(procfs::cpu_seconds).unwrap_or(0.0);
        (ch.cpu_seconds() - self.clickhouse, broker - self.broker)
    }
}

/// What every drain needs.
pub struct Bench<'a> {
    /// This executable: the bare and DIY consumers are it, re-invoked.
    pub exe: PathBuf,
    pub aggregator_bin: &'a Path,
    pub config_path: &'a Path,
    pub ch: &'a ClickHouse,
    pub dir: &'a Path,
    /// A drain (and any single wait) gives up after this.
    pub max_phase: Duration,
    pub diy_batch: usize,
}

impl Bench<'_> {
    /// Runs `args` as a child of this executable and reads the [`Drained`] it prints,
    /// calling `probe` every [`PROBE_EVERY`] meanwhile.
    async fn child<F, Fut>(&self, args: &[String], mut probe: F) -> anyhow::Result<Drained>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = ()>,
    {
        let child = Command::new(&self.exe)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .context("starting a consumer child")?;
        let output = child.wait_with_output();
        tokio::pin!(output);
        let deadline = tokio::time::sleep(self.max_phase + Duration::from_secs(30));
        tokio::pin!(deadline);
        let output = loop {
            tokio::select! {
                out = &mut output => break out.context("waiting for a consumer child")?,
                _ = &mut deadline => bail!("consumer child {args:?} still running after {:?}", self.max_phase),
                _ = tokio::time::sleep(PROBE_EVERY) => probe().await,
            }
        };
        if !output.status.success() {
            bail!("consumer child {args:?} failed: {}", output.status);
        }
        let text = String::from_utf8_lossy(&output.stdout);
        let line = text.lines().last().unwrap_or_default();
        let drained: Drained = serde_json::from_str(line)
            .with_context(|| format!("reading the consumer child's result {line:?}"))?;
        if !drained.complete {
            bail!("consumer child {args:?} did not reach the topic's end in time: {drained:?}");
        }
        Ok(drained)
    }

    /// The bare consumer's drain, with `fetch.wait.max.ms` `fetch_wait_ms`.
    pub async fn bare(&self, topic: &Topic, fetch_wait_ms: u32) -> anyhow::Result<Run> {
        self.ch.settle(SETTLE_MAX).await;
        let meter = Meter::start(self.ch, topic.broker_pid);
        let spawned = Instant::now();
        let args = vec![
            "--bare-consumer".to_owned(),
            topic.brokers.clone(),
            topic.name.clone(),
            ends_arg(&topic.ends),
            fetch_wait_ms.to_string(),
            self.max_phase.as_secs().to_string(),
        ];
        let d = self.child(&args, || async {}).await?;
        let since_spawn = spawned.elapsed().as_secs_f64();
        let (cpu_clickhouse, cpu_broker) = meter.stop(self.ch);
        Ok(Run {
            records: d.records,
            seconds: d.seconds,
            since_spawn,
            cpu_process: d.cpu_seconds,
            cpu_clickhouse,
            cpu_broker,
            settle: 0.0,
            ..Run::default()
        })
    }

    /// The aggregator's drain on a fresh database and consumer group: spawn, partitions
    /// assigned, every checkpoint at the topic's end, merges settled. Leaves the database.
    pub async fn aggregator(
        &self,
        topic: &Topic,
        database: &str,
        group: &str,
    ) -> anyhow::Result<Run> {
        let target = Target {
            brokers: topic.brokers.clone(),
            topic: topic.name.clone(),
            clickhouse_url: self.ch.url.clone(),
            database: database.to_owned(),
            group: group.to_owned(),
        };
        migrate(self.aggregator_bin, self.config_path, &target).await?;
        self.ch.settle(SETTLE_MAX).await;
        let meter = Meter::start(self.ch, topic.broker_pid);
        let mut agg =
            AggregatorProcess::spawn(self.aggregator_bin, self.config_path, &target, self.dir)?;
        let assigned = agg
            .wait_assigned(topic.ends.len(), Duration::from_secs(90))
            .await?;
        let done = agg
            .wait_caught_up(self.ch, &target, &topic.ends, PROBE_EVERY, self.max_phase)
            .await?;
        let settle = self.ch.settle(SETTLE_MAX).await;
        let cpu_process = agg.cpu_seconds();
        let (cpu_clickhouse, cpu_broker) = meter.stop(self.ch);
        let since_spawn = (done - agg.spawned).as_secs_f64();
        let flushes = agg.flushes().await;
        agg.stop().await;
        // Exactly once: every distinct id stored once, none of the retries.
        let stored: u64 = self
            .ch
            .sql(&format!("SELECT count() FROM {database}.events_raw"))
            .await?
            .trim()
            .parse()
            .unwrap_or(0);
        if stored != topic.distinct {
            bail!(
                "the aggregator stored {stored} events for {} distinct ids",
                topic.distinct
            );
        }
        Ok(Run {
            records: topic.records,
            seconds: (done - assigned).as_secs_f64(),
            since_spawn,
            cpu_process,
            cpu_clickhouse,
            cpu_broker,
            settle: settle.as_secs_f64(),
            flushes,
        })
    }

    /// The do-it-yourself pipeline's drain into fresh tables in `database`; checks that
    /// every record landed, then drops the database.
    pub async fn diy(&self, topic: &Topic, database: &str) -> anyhow::Result<Run> {
        self.ch
            .sql(&format!("CREATE DATABASE IF NOT EXISTS {database}"))
            .await?;
        for statement in diy_schema(database) {
            self.ch.sql(&statement).await?;
        }
        self.ch.settle(SETTLE_MAX).await;
        let meter = Meter::start(self.ch, topic.broker_pid);
        let spawned = Instant::now();
        let args = vec![
            "--diy-consumer".to_owned(),
            topic.brokers.clone(),
            topic.name.clone(),
            ends_arg(&topic.ends),
            self.ch.url.clone(),
            database.to_owned(),
            self.diy_batch.to_string(),
            self.max_phase.as_secs().to_string(),
        ];
        let d = self
            .child(&args, || async {
                let _ = self.ch.merges(database).await;
            })
            .await?;
        let since_spawn = spawned.elapsed().as_secs_f64();
        let settle = self.ch.settle(SETTLE_MAX).await;
        let (cpu_clickhouse, cpu_broker) = meter.stop(self.ch);
        let rows: u64 = self
            .ch
            .sql(&format!("SELECT count() FROM {database}.diy_events"))
            .await?
            .trim()
            .parse()
            .unwrap_or(0);
        self.ch.drop_database(database).await;
        if rows != d.records - d.undecodable {
            bail!(
                "DIY pipeline: {rows} rows in diy_events for {} records read",
                d.records
            );
        }
        Ok(Run {
            records: d.records,
            seconds: d.seconds,
            since_spawn,
            cpu_process: d.cpu_seconds,
            cpu_clickhouse,
            cpu_broker,
            settle: settle.as_secs_f64(),
            flushes: (d.inserts, f64::NAN),
        })
    }
}

/// ClickHouse's own CPU use (cores) over `span` while the bench does nothing.
pub async fn idle_cores(ch: &ClickHouse, span: Duration) -> f64 {
    let before = ch.cpu_seconds();
    tokio::time::sleep(span).await;
    (ch.cpu_seconds() - before) / span.as_secs_f64()
}
