//! `tally-aggbench`: the aggregator's load bench (issue 10).
//!
//! Pre-fills a topic on private tansu brokers, then drains it with a bare consumer, the real
//! `tally-aggregator run` and a do-it-yourself Kafka → ClickHouse pipeline, each measured
//! alone (throughput, and CPU per event counting ClickHouse); then times a customer's month
//! of hourly usage through the API against the same SQL sent straight to ClickHouse, and
//! the accepted → visible delay of single events through a `tally-ingest` child on the
//! stack's broker. `tally-aggbench --help` lists the options.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use tally_bench::agg::aggregator::{build_with_cargo, locate};
use tally_bench::agg::ch::{self, ClickHouse};
use tally_bench::agg::consumers::{
    self, DiyTarget, AGGREGATOR_FETCH_WAIT_MS, CEILING_FETCH_WAIT_MS,
};
use tally_bench::agg::drain::{self, Bench};
use tally_bench::agg::report::{AggReport, BrokerRuns};
use tally_bench::agg::{freshness, query, records};
use tally_bench::broker::{self, Storage, Tansu};
use tally_bench::collector;
use tally_bench::procfs;
use tally_core::Config;
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

const USAGE: &str = "\
usage: tally-aggbench [OPTIONS]

The aggregator's load bench: each figure against a baseline measured in the same run.
  1. throughput: tally-aggregator draining a pre-filled topic vs a bare rdkafka consumer
  2. cost: CPU s per million events (process + ClickHouse) vs a do-it-yourself pipeline
     (JSONEachRow inserts into MergeTree + a materialized view into AggregatingMergeTree)
  3. freshness: collector 202 -> visible in GET /v1/usage (stack broker), p50/p99
  4. usage query: one customer's month by hour, API vs the same SQL sent to ClickHouse

  --events N             records pre-filled on each broker          [default 500000]
  --rounds K             drains per reader and broker (median shown) [default 3]
  --storage S            private tansu storage: memory, sqlite, both [default both]
  --diy-batch B          DIY pipeline: rows per insert               [default 10000]
  --fresh-events N       freshness: single events sent              [default 200]
  --fresh-rate R         freshness: events per second               [default 20]
  --query-calls N        usage query: calls each way                [default 100]
  --hours H              usage query: hours of history              [default 720]
  --clickhouse C         private (a server of the bench's own, so only our work is
                         counted) or stack (127.0.0.1:18123)         [default private]
  --max-phase-secs S     any drain or wait gives up after S s       [default 300]
  --skip-freshness       leave out figure 3 (needs the stack's broker)
  --quick                a smoke run well under a minute (tests, CI)
  --config FILE          config for the collector and aggregator [default config/tally.dev.toml]
  --markdown FILE        also write the BENCHMARKS.md block to FILE
  --json FILE            also write a JSON summary to FILE
  -h, --help             this text

Environment: TALLY_TANSU_BIN, TALLY_AGGREGATOR_BIN, TALLY_INGEST_BIN (default: beside this
executable, rebuilt first when run through cargo), TALLY_KAFKA_BROKERS (the stack's broker
for figure 3, default 127.0.0.1:19092), TALLY_CLICKHOUSE_URL and TALLY_CLICKHOUSE_PID (with
--clickhouse stack), TALLY_AGGBENCH_CONSUMER_CONFIG (key=value,... librdkafka settings for
the bare and DIY consumers only), TALLY_BENCH_KEEP=1 (keep the work folder and its logs).";

/// Events per hour of the query customer's month.
const PER_HOUR: usize = 4;

#[derive(Debug, Clone)]
struct Options {
    events: usize,
    rounds: usize,
    storages: Vec<Storage>,
    diy_batch: usize,
    fresh_events: usize,
    fresh_rate: f64,
    query_calls: usize,
    hours: i64,
    clickhouse: ch::Source,
    max_phase: Duration,
    freshness: bool,
    quick: bool,
    config: PathBuf,
    markdown: Option<PathBuf>,
    json: Option<PathBuf>,
}

impl Options {
    fn parse(args: &[String]) -> anyhow::Result<Options> {
        let quick = args.iter().any(|a| a == "--quick");
        let mut o = Options {
            events: if quick { 20_000 } else { 500_000 },
            rounds: if quick { 1 } else { 3 },
            storages: if quick {
                vec![Storage::Memory]
            } else {
                vec![Storage::Memory, Storage::Sqlite]
            },
            diy_batch: 10_000,
            fresh_events: if quick { 20 } else { 200 },
            fresh_rate: 20.0,
            query_calls: if quick { 20 } else { 100 },
            hours: 720,
            clickhouse: ch::Source::Private,
            max_phase: Duration::from_secs(if quick { 60 } else { 300 }),
            freshness: true,
            quick,
            config: Path::new(env!("CARGO_MANIFEST_DIR")).join("../config/tally.dev.toml"),
            markdown: None,
            json: None,
        };
        let mut it = args.iter();
        while let Some(arg) = it.next() {
            let mut value = || {
                it.next()
                    .with_context(|| format!("{arg} needs a value\n\n{USAGE}"))
            };
            let number = |v: &String| -> anyhow::Result<usize> {
                match v.parse::<usize>() {
                    Ok(n) if n > 0 => Ok(n),
                    _ => bail!("{arg}: expected a positive number, got {v:?}"),
                }
            };
            match arg.as_str() {
                "--events" => o.events = number(value()?)?,
                "--rounds" => o.rounds = number(value()?)?,
                "--diy-batch" => o.diy_batch = number(value()?)?,
                "--fresh-events" => o.fresh_events = number(value()?)?,
                "--fresh-rate" => o.fresh_rate = number(value()?)? as f64,
                "--query-calls" => o.query_calls = number(value()?)?,
                "--hours" => o.hours = number(value()?)? as i64,
                "--max-phase-secs" => o.max_phase = Duration::from_secs(number(value()?)? as u64),
                "--storage" => {
                    o.storages = match value()?.as_str() {
                        "memory" => vec![Storage::Memory],
                        "sqlite" => vec![Storage::Sqlite],
                        "both" => vec![Storage::Memory, Storage::Sqlite],
                        other => bail!("--storage: memory, sqlite or both, not {other:?}"),
                    }
                }
                "--clickhouse" => {
                    o.clickhouse = match value()?.as_str() {
                        "private" => ch::Source::Private,
                        "stack" => ch::Source::Stack,
                        other => bail!("--clickhouse: private or stack, not {other:?}"),
                    }
                }
                "--skip-freshness" => o.freshness = false,
                "--quick" => {}
                "--config" => o.config = PathBuf::from(value()?),
                "--markdown" => o.markdown = Some(PathBuf::from(value()?)),
                "--json" => o.json = Some(PathBuf::from(value()?)),
                other => bail!("unknown argument {other:?}\n\n{USAGE}"),
            }
        }
        Ok(o)
    }
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.iter().any(|a| a == "-h" || a == "--help") {
        println!("{USAGE}");
        return Ok(());
    }
    // Internal: the bench re-runs itself as the bare consumer and as the DIY pipeline, so
    // each has a process (and CPU counters) of its own.
    match args.first().map(String::as_str) {
        Some("--bare-consumer") => return child_bare(&args[1..]),
        Some("--diy-consumer") => return child_diy(&args[1..]),
        _ => {}
    }
    let options = Options::parse(&args)?;
    let runtime = tokio::runtime::Runtime::new().context("tokio runtime")?;
    runtime.block_on(async {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        // Either signal drops the run, and with it every child (all are kill-on-drop).
        tokio::select! {
            result = run(options, &args) => result,
            _ = tokio::signal::ctrl_c() => bail!("interrupted"),
            _ = term.recv() => bail!("terminated"),
        }
    })
}

/// The run's work folder, removed when the run ends however it ends (`TALLY_BENCH_KEEP=1`
/// keeps it, with the aggregator and collector logs).
struct WorkDir(PathBuf);

impl Drop for WorkDir {
    fn drop(&mut self) {
        if std::env::var_os("TALLY_BENCH_KEEP").is_some() {
            eprintln!("kept {}", self.0.display());
        } else {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

fn secs(v: &str) -> anyhow::Result<Duration> {
    Ok(Duration::from_secs(v.parse().context("seconds")?))
}

/// `--bare-consumer BROKERS TOPIC ENDS FETCH_WAIT_MS MAX_SECS`: prints one JSON line.
fn child_bare(args: &[String]) -> anyhow::Result<()> {
    let [brokers, topic, ends, wait, max] = args else {
        bail!("--bare-consumer BROKERS TOPIC ENDS FETCH_WAIT_MS MAX_SECS");
    };
    let ends = consumers::parse_ends(ends)?;
    let wait = wait.parse().context("fetch wait")?;
    let drained = consumers::bare(brokers, topic, ends, wait, secs(max)?)?;
    println!("{}", serde_json::to_string(&drained)?);
    Ok(())
}

/// `--diy-consumer BROKERS TOPIC ENDS CLICKHOUSE_URL DATABASE BATCH MAX_SECS`: prints one
/// JSON line.
fn child_diy(args: &[String]) -> anyhow::Result<()> {
    let [brokers, topic, ends, url, database, batch, max] = args else {
        bail!("--diy-consumer BROKERS TOPIC ENDS CLICKHOUSE_URL DATABASE BATCH MAX_SECS");
    };
    let target = DiyTarget {
        clickhouse_url: url.clone(),
        database: database.clone(),
        batch: batch.parse().context("batch")?,
        interval: Duration::from_secs(1),
    };
    let ends = consumers::parse_ends(ends)?;
    let drained = consumers::diy(brokers, topic, ends, &target, secs(max)?)?;
    println!("{}", serde_json::to_string(&drained)?);
    Ok(())
}

#[derive(Debug, Clone, Copy)]
enum Reader {
    /// The bare consumer at the broker's ceiling.
    Bare,
    /// The bare consumer fetching as the aggregator does.
    BareSame,
    Aggregator,
    Diy,
}

/// Round `r` starts `r` places further along, so a drift in the machine favours no reader.
fn order(round: usize) -> [Reader; 4] {
    let mut readers = [
        Reader::Bare,
        Reader::Aggregator,
        Reader::BareSame,
        Reader::Diy,
    ];
    let n = readers.len();
    readers.rotate_left(round % n);
    readers
}

async fn run(options: Options, args: &[String]) -> anyhow::Result<()> {
    let started = Instant::now();
    let text = std::fs::read_to_string(&options.config)
        .with_context(|| format!("reading {}", options.config.display()))?;
    // Parsed without the environment's overrides: brokers, topics and databases are the
    // bench's own.
    let config = Config::parse(&text, &options.config)?;
    let partitions = config.kafka.partitions;
    build_with_cargo(&[
        ("tally-aggregator", "TALLY_AGGREGATOR_BIN"),
        ("tally-ingest", "TALLY_INGEST_BIN"),
    ])?;
    let aggregator_bin = locate("tally-aggregator", "TALLY_AGGREGATOR_BIN")?;
    let ingest_bin = collector::locate_binary()?;
    let tansu_bin = broker::tansu_bin();
    let stack_brokers =
        std::env::var("TALLY_KAFKA_BROKERS").unwrap_or_else(|_| "127.0.0.1:19092".into());
    let (cpus, cpu_model) = procfs::machine();
    let now = OffsetDateTime::now_utc();
    let date = now
        .replace_nanosecond(0)
        .ok()
        .and_then(|d| d.format(&Rfc3339).ok())
        .unwrap_or_default();
    // Letters, digits and _ only: it names databases as well as topics.
    let run_id = format!("{}_{}", now.unix_timestamp(), std::process::id());
    let tmp = std::env::temp_dir().join(format!("tally-aggbench-{run_id}"));
    std::fs::create_dir_all(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
    let _work_dir = WorkDir(tmp.clone());
    eprintln!(
        "tally-aggbench: aggregator {}, collector {}, broker {}, work dir {}",
        aggregator_bin.display(),
        ingest_bin.display(),
        tansu_bin.display(),
        tmp.display()
    );

    let ch = ClickHouse::start(options.clickhouse, &tmp).await?;
    let ch_version = ch.version().await;
    let idle = drain::idle_cores(&ch, Duration::from_secs(if options.quick { 1 } else { 3 })).await;
    eprintln!(
        "ClickHouse {ch_version} ({}) at {}, pid {}: {idle:.3} cores idle",
        ch.source.label(),
        ch.url,
        ch.pid
    );

    eprintln!("generating {} records", options.events);
    let prefill = records::prefill(&config, &run_id, options.events, now);
    let bench = Bench {
        exe: std::env::current_exe().context("locating this executable")?,
        aggregator_bin: &aggregator_bin,
        config_path: &options.config,
        ch: &ch,
        dir: &tmp,
        max_phase: options.max_phase,
        diy_batch: options.diy_batch,
    };

    let mut report = AggReport {
        date,
        command: tally_bench::report::command_line("tally-aggbench", args),
        cpus,
        cpu_model,
        broker_version: tally_bench::report::tansu_version(&tansu_bin),
        clickhouse: format!("{ch_version} ({}, {})", ch.source.label(), ch.url),
        clickhouse_idle_cores: idle,
        ..AggReport::default()
    };
    for &storage in &options.storages {
        let label = storage.label();
        eprintln!(
            "[{label}] starting tansu; pre-filling {} records",
            prefill.payloads.len()
        );
        let tansu = Tansu::start(&tansu_bin, storage, &tmp).await?;
        let topic_name = format!("aggbench-{label}-{run_id}");
        let distinct = (prefill.payloads.len() - prefill.retries) as u64;
        let topic = drain::prefill(
            &config,
            &tansu.addr(),
            tansu.pid(),
            &topic_name,
            &prefill.payloads,
            distinct,
        )
        .await?;
        eprintln!(
            "[{label}] pre-filled {} records at {:.0} events/s",
            topic.records, topic.prefill_rate
        );
        let mut runs = BrokerRuns {
            storage: label,
            records: topic.records,
            retries: prefill.retries,
            prefill_rate: topic.prefill_rate,
            ..BrokerRuns::default()
        };
        // The last aggregator database of the first broker serves the usage query.
        let mut kept: Option<String> = None;
        for round in 0..options.rounds {
            for reader in order(round) {
                let name = format!("aggbench_{run_id}_{label}_{round}");
                match reader {
                    Reader::Bare | Reader::BareSame => {
                        let (wait, what) = match reader {
                            Reader::Bare => (CEILING_FETCH_WAIT_MS, "bare consumer"),
                            _ => (
                                AGGREGATOR_FETCH_WAIT_MS,
                                "bare consumer, aggregator's fetch",
                            ),
                        };
                        let r = bench.bare(&topic, wait).await?;
                        eprintln!(
                            "[{label}] round {}: {what} {:.0} events/s in {:.2} s",
                            round + 1,
                            r.rate(),
                            r.seconds
                        );
                        match reader {
                            Reader::Bare => runs.bare.push(r),
                            _ => runs.bare_same.push(r),
                        }
                    }
                    Reader::Aggregator => {
                        let database = format!("{name}_agg");
                        let group = format!("aggbench-{run_id}-{label}-{round}");
                        let r = bench.aggregator(&topic, &database, &group).await?;
                        let done = if report.query.is_none() {
                            kept.replace(database)
                        } else {
                            Some(database)
                        };
                        if let Some(done) = done {
                            ch.drop_database(&done).await;
                        }
                        eprintln!(
                            "[{label}] round {}: aggregator {:.0} events/s in {:.2} s \
                             ({:.2} s from spawn), {:.2} CPU s/M",
                            round + 1,
                            r.rate(),
                            r.seconds,
                            r.since_spawn,
                            r.cpu_per_million()
                        );
                        runs.ours.push(r);
                    }
                    Reader::Diy => {
                        let r = bench.diy(&topic, &format!("{name}_diy")).await?;
                        eprintln!(
                            "[{label}] round {}: DIY pipeline {:.0} events/s in {:.2} s, \
                             {:.2} CPU s/M",
                            round + 1,
                            r.rate(),
                            r.seconds,
                            r.cpu_per_million()
                        );
                        runs.diy.push(r);
                    }
                }
            }
        }
        report.brokers.push(runs);
        if let Some(database) = kept.take() {
            {
                eprintln!(
                    "[{label}] usage query: {} hours x {PER_HOUR} events for one customer",
                    options.hours
                );
                let setup = query::Setup {
                    config: &config,
                    config_path: &options.config,
                    aggregator_bin: &aggregator_bin,
                    ch: &ch,
                    dir: &tmp,
                    topic: &topic,
                    database: &database,
                    run: &run_id,
                    max_phase: options.max_phase,
                };
                report.query = Some(
                    query::measure(&setup, options.hours, PER_HOUR, options.query_calls).await?,
                );
            }
            ch.drop_database(&database).await;
        }
        tansu.stop().await;
    }
    drop(prefill);

    if options.freshness {
        eprintln!(
            "[freshness] {} single events at {}/s through tally-ingest on {stack_brokers}",
            options.fresh_events, options.fresh_rate
        );
        let setup = freshness::Setup {
            ingest_bin: &ingest_bin,
            aggregator_bin: &aggregator_bin,
            config_path: &options.config,
            partitions,
            flush_interval_ms: config.aggregator.flush_interval_ms,
            ch: &ch,
            brokers: &stack_brokers,
            dir: &tmp,
            run: &run_id,
        };
        report.freshness =
            Some(freshness::measure(&setup, options.fresh_events, options.fresh_rate).await?);
    }
    ch.stop().await;

    report.settings = format!(
        "{} records per broker ({} of them retries of an earlier id, {} customers, 4 event \
         types over the last 4 hours) on {partitions} partitions of a private tansu per \
         storage; aggregator: `tally-aggregator run` with {} (flush every {} ms or {} \
         records); DIY: inserts of {} rows `FORMAT JSONEachRow`, raw `data` as text, a \
         materialized view to an AggregatingMergeTree; {} round(s), readers alternating \
         order, median shown; schema created before each drain, CPU counted from spawn until \
         ClickHouse's merges settle; \
         freshness: {} events at {}/s on the stack's broker; usage query: {} calls each way \
         over {} hours x {PER_HOUR} events{}",
        report.brokers.first().map_or(0, |b| b.records),
        report.brokers.first().map_or(0, |b| b.retries),
        records::CUSTOMERS,
        options
            .config
            .file_name()
            .map_or("config".into(), |n| n.to_string_lossy()),
        config.aggregator.flush_interval_ms,
        config.aggregator.flush_max_records,
        options.diy_batch,
        options.rounds,
        options.fresh_events,
        options.fresh_rate,
        options.query_calls,
        options.hours,
        if options.quick { " (--quick)" } else { "" },
    );
    let markdown = report.markdown();
    println!("{}", report.table());
    println!("--- markdown for BENCHMARKS.md ---\n{markdown}--- end ---");
    println!("finished in {:.0} s", started.elapsed().as_secs_f64());
    if let Some(path) = &options.markdown {
        std::fs::write(path, &markdown).with_context(|| format!("writing {}", path.display()))?;
    }
    if let Some(path) = &options.json {
        let json = serde_json::to_string_pretty(&report.json())?;
        std::fs::write(path, json).with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}
