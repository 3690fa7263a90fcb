//! `tally-load`: the collector's load bench (issue 9).
//!
//! Starts private tansu brokers, a `tally-ingest` child and a bare hyper child, then measures
//! each figure against its baseline in the same run: batched POSTs against a bare rdkafka
//! producer, one event per POST against a bare hyper server, and the collector's peak RSS.
//! `tally-load --help` lists the options.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use tally_bench::broker::{self, Storage, Tansu};
use tally_bench::collector::{self, CollectorProcess};
use tally_bench::events::{self, Body};
use tally_bench::load::{self, LoadResult};
use tally_bench::procfs;
use tally_bench::produce;
use tally_bench::produce::Producer;
use tally_bench::report::{Comparison, Cores, Report, Sample};
use tally_core::Config;
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;
use tokio::process::{Child, Command};

const USAGE: &str = "\
usage: tally-load [OPTIONS]

The collector's load bench: each figure is a ratio against a baseline measured in the same
run, on private tansu brokers (memory storage for every figure, sqlite for the batched one).

  --events N             events per round of the batched phase      [default 1000000]
  --batch B              events per batched POST                    [default 500]
  --batch-concurrency C  connections posting batches                [default 32]
  --raw-window W         raw producer: records in flight  [default: the producer queue bound]
  --requests N           requests per round of the one-event phase  [default 200000]
  --concurrency C        connections in the one-event phase         [default 64]
  --saturate C           the one-event figure again over C connections, enough to keep
                         both servers busy (0: not measured)   [default 1024; --quick: 0]
  --rounds K             measured rounds per figure (median shown)  [default 3]
  --max-phase-secs S     a measured phase stops after N sent or S s [default 10]
  --storage S            memory, sqlite or both                     [default both]
  --quick                a smoke run of a few seconds per phase (tests, CI)
  --config FILE          collector config [default config/tally.dev.toml]
  --markdown FILE        also write the BENCHMARKS.md block to FILE
  --json FILE            also write a JSON summary to FILE
  -h, --help             this text

Environment: TALLY_TANSU_BIN (the tansu binary), TALLY_INGEST_BIN (the collector binary;
default: tally-ingest beside this executable, rebuilt first when run through cargo).";

/// The PRODUCT.md targets.
const BATCHED_TARGET: f64 = 0.8;
const SINGLE_TARGET: f64 = 0.7;
const SINGLE: &str = "one event per POST vs bare hyper";
const SATURATED: &str = "one event per POST vs bare hyper, saturated";
const RSS_TARGET: u64 = 100_000_000;

#[derive(Debug, Clone)]
struct Options {
    events: usize,
    batch: usize,
    batch_concurrency: usize,
    requests: usize,
    concurrency: usize,
    saturate: usize,
    rounds: usize,
    raw_window: Option<usize>,
    max_phase: Duration,
    storages: Vec<Storage>,
    quick: bool,
    config: PathBuf,
    markdown: Option<PathBuf>,
    json: Option<PathBuf>,
}

impl Options {
    fn parse(args: &[String]) -> anyhow::Result<Options> {
        let quick = args.iter().any(|a| a == "--quick");
        let mut o = Options {
            events: if quick { 20_000 } else { 1_000_000 },
            batch: 500,
            batch_concurrency: 32,
            requests: if quick { 2_000 } else { 200_000 },
            concurrency: 64,
            saturate: if quick { 0 } else { 1024 },
            rounds: if quick { 1 } else { 3 },
            raw_window: None,
            max_phase: Duration::from_secs(if quick { 5 } else { 10 }),
            storages: vec![Storage::Memory, Storage::Sqlite],
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
                "--batch" => o.batch = number(value()?)?,
                "--batch-concurrency" => o.batch_concurrency = number(value()?)?,
                "--requests" => o.requests = number(value()?)?,
                "--concurrency" => o.concurrency = number(value()?)?,
                "--saturate" => {
                    let v = value()?;
                    o.saturate = if v == "0" { 0 } else { number(v)? }
                }
                "--rounds" => o.rounds = number(value()?)?,
                "--raw-window" => o.raw_window = Some(number(value()?)?),
                "--max-phase-secs" => o.max_phase = Duration::from_secs(number(value()?)? as u64),
                "--storage" => {
                    o.storages = match value()?.as_str() {
                        "memory" => vec![Storage::Memory],
                        "sqlite" => vec![Storage::Sqlite],
                        "both" => vec![Storage::Memory, Storage::Sqlite],
                        other => bail!("--storage: memory, sqlite or both, not {other:?}"),
                    }
                }
                "--quick" => {}
                "--config" => o.config = PathBuf::from(value()?),
                "--markdown" => o.markdown = Some(PathBuf::from(value()?)),
                "--json" => o.json = Some(PathBuf::from(value()?)),
                other => bail!("unknown argument {other:?}\n\n{USAGE}"),
            }
        }
        Ok(o)
    }

    /// Warm-up size: enough for connections, metadata and allocator pools to settle.
    fn warm(n: usize) -> usize {
        (n / 10).max(500)
    }
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.iter().any(|a| a == "-h" || a == "--help") {
        println!("{USAGE}");
        return Ok(());
    }
    // Internal: the bench re-runs itself as the bare hyper baseline, so that server has a
    // process and runtime of its own, as the collector does.
    if let [flag, addr] = args.as_slice() {
        if flag == "--serve-bare" {
            return serve_bare(addr);
        }
    }
    let options = Options::parse(&args)?;
    let runtime = tokio::runtime::Runtime::new().context("tokio runtime")?;
    runtime.block_on(async {
        tokio::select! {
            result = run(options, &args) => result,
            _ = tokio::signal::ctrl_c() => bail!("interrupted"),
        }
    })
}

fn serve_bare(addr: &str) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Runtime::new().context("tokio runtime")?;
    runtime.block_on(async {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("binding {addr}"))?;
        tally_bench::bare::serve(listener).await?;
        Ok(())
    })
}

/// The bare hyper baseline, a child process killed on drop.
struct BareServer {
    addr: SocketAddr,
    child: Child,
}

impl BareServer {
    async fn start() -> anyhow::Result<BareServer> {
        let addr: SocketAddr = ([127, 0, 0, 1], broker::free_port()?).into();
        let exe = std::env::current_exe().context("locating this executable")?;
        let child = Command::new(exe)
            .args(["--serve-bare", &addr.to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .context("starting the bare hyper server")?;
        let server = BareServer { addr, child };
        load::wait_answer(addr, "/", Duration::from_secs(10)).await?;
        Ok(server)
    }
}

/// CPU counters of the processes in play, read before and after a phase.
struct CpuMeter {
    server: Option<u32>,
    broker: Option<u32>,
    started: Instant,
    bench0: f64,
    server0: Option<f64>,
    broker0: f64,
}

impl CpuMeter {
    fn start(server: Option<u32>, broker: Option<u32>) -> CpuMeter {
        CpuMeter {
            server,
            broker,
            started: Instant::now(),
            bench0: procfs::self_cpu_seconds().unwrap_or(0.0),
            server0: server.and_then(procfs::cpu_seconds),
            broker0: broker.and_then(procfs::cpu_seconds).unwrap_or(0.0),
        }
    }

    fn stop(self) -> Cores {
        let wall = self.started.elapsed().as_secs_f64();
        let bench = procfs::self_cpu_seconds().unwrap_or(0.0) - self.bench0;
        let server = match (self.server.and_then(procfs::cpu_seconds), self.server0) {
            (Some(now), Some(then)) => Some((now - then) / wall),
            _ => None,
        };
        let broker = self.broker.and_then(procfs::cpu_seconds).unwrap_or(0.0) - self.broker0;
        Cores {
            bench: bench / wall,
            server,
            broker: broker / wall,
        }
    }
}

/// Distinct events built per round; longer phases cycle through them (the collector does
/// not deduplicate and the bench reads nothing back, so repeats cost what new events cost).
const POOL: usize = 100_000;

/// What one broker run needs.
struct Suite<'a> {
    options: &'a Options,
    config: &'a Config,
    broker: &'a Tansu,
    collector: &'a CollectorProcess,
    producer: &'a Producer,
    topic: &'a str,
    raw_window: usize,
}

impl Suite<'_> {
    async fn raw(&self, payloads: &[events::Payload], total: usize) -> anyhow::Result<Sample> {
        let meter = CpuMeter::start(None, self.broker.pid());
        let r = produce::produce(
            self.producer,
            self.topic,
            payloads,
            total,
            self.raw_window,
            self.options.max_phase,
        )
        .await;
        let cores = meter.stop();
        if r.delivered == 0 {
            bail!(
                "raw produce: nothing delivered ({} errors, first: {:?}); broker log:\n{}",
                r.errors,
                r.first_error,
                self.broker.log()
            );
        }
        warn_errors("raw produce", r.errors, &r.first_error);
        Ok(Sample {
            rate: r.events_per_sec(),
            p50_ms: None,
            p99_ms: None,
            errors: r.errors,
            seconds: r.elapsed.as_secs_f64(),
            cores,
        })
    }

    async fn post(
        &self,
        (addr, server): (SocketAddr, Option<u32>),
        bodies: &Arc<Vec<Body>>,
        total: usize,
        concurrency: usize,
        what: &str,
    ) -> anyhow::Result<(Sample, LoadResult)> {
        let meter = CpuMeter::start(server, self.broker.pid());
        let r = load::drive(
            addr,
            "/v1/events",
            bodies.clone(),
            total,
            concurrency,
            self.options.max_phase,
        )
        .await?;
        let cores = meter.stop();
        if r.requests == 0 {
            bail!(
                "{what}: no request succeeded ({} errors, first: {:?}); collector log:\n{}",
                r.errors,
                r.first_error,
                self.collector.log()
            );
        }
        warn_errors(what, r.errors, &r.first_error);
        let sample = Sample {
            rate: 0.0,
            p50_ms: Some(r.latency_ms(0.5)),
            p99_ms: Some(r.latency_ms(0.99)),
            errors: r.errors,
            seconds: r.elapsed.as_secs_f64(),
            cores,
        };
        Ok((sample, r))
    }

    async fn batched(&self, bodies: &Arc<Vec<Body>>, events: usize) -> anyhow::Result<Sample> {
        let batch = self.options.batch;
        let requests = events.div_ceil(batch);
        let (mut s, r) = self
            .post(
                (self.collector.addr, self.collector.pid()),
                bodies,
                requests,
                self.options.batch_concurrency,
                "collector, batched",
            )
            .await?;
        s.rate = r.events_per_sec();
        Ok(s)
    }

    /// Figure 1: batched POSTs against the raw producer, rounds alternating which goes first
    /// so a drift in the machine or broker does not favour either.
    async fn batched_figure(&self, label: &'static str) -> anyhow::Result<Comparison> {
        let o = self.options;
        let warm_n = Options::warm(o.events);
        let now = OffsetDateTime::now_utc();
        let warm = events::events("warm-batched", warm_n.min(POOL), now);
        eprintln!("  [{label}] warm-up: {warm_n} events each way");
        self.raw(&events::payloads(self.config, &warm, now), warm_n)
            .await?;
        self.batched(&Arc::new(events::batch_bodies(&warm, o.batch)), warm_n)
            .await?;

        let mut comparison = Comparison {
            figure: "batched POSTs vs raw produce",
            broker: label,
            unit: "events/s",
            baseline_name: "raw producer",
            baseline: Vec::new(),
            subject: Vec::new(),
            target: BATCHED_TARGET,
        };
        for round in 0..o.rounds {
            let now = OffsetDateTime::now_utc();
            // A whole number of batches, so cycling never sends a short one mid-run.
            let pool = (o.events.min(POOL) / o.batch).max(1) * o.batch;
            let evs = events::events(&format!("{label}-b{round}"), pool, now);
            let payloads = events::payloads(self.config, &evs, now);
            let bodies = Arc::new(events::batch_bodies(&evs, o.batch));
            drop(evs);
            let (raw, posted) = if round % 2 == 0 {
                let raw = self.raw(&payloads, o.events).await?;
                (raw, self.batched(&bodies, o.events).await?)
            } else {
                let posted = self.batched(&bodies, o.events).await?;
                (self.raw(&payloads, o.events).await?, posted)
            };
            eprintln!(
                "  [{label}] round {}: raw {:.0} events/s in {:.1} s, collector {:.0} events/s in \
                 {:.1} s ({:.2})",
                round + 1,
                raw.rate,
                raw.seconds,
                posted.rate,
                posted.seconds,
                posted.rate / raw.rate
            );
            comparison.baseline.push(raw);
            comparison.subject.push(posted);
        }
        Ok(comparison)
    }

    async fn single(
        &self,
        target: (SocketAddr, Option<u32>),
        bodies: &Arc<Vec<Body>>,
        requests: usize,
        concurrency: usize,
        what: &str,
    ) -> anyhow::Result<Sample> {
        let (mut s, r) = self
            .post(target, bodies, requests, concurrency, what)
            .await?;
        s.rate = r.requests_per_sec();
        Ok(s)
    }

    /// Figure 2: one event per POST, the collector against the bare hyper server, under the
    /// same load (same bodies, `concurrency` connections and request count).
    async fn single_figure(
        &self,
        label: &'static str,
        bare: &BareServer,
        concurrency: usize,
        figure: &'static str,
    ) -> anyhow::Result<Comparison> {
        let o = self.options;
        let c = concurrency;
        let collector = (self.collector.addr, self.collector.pid());
        let baseline = (bare.addr, bare.child.id());
        let warm_n = Options::warm(o.requests);
        let now = OffsetDateTime::now_utc();
        let warm = Arc::new(events::single_bodies(&events::events(
            "warm-single",
            warm_n.min(POOL),
            now,
        )));
        eprintln!("  [{label}] warm-up: {warm_n} requests each way over {c} connections");
        self.single(baseline, &warm, warm_n, c, "bare hyper")
            .await?;
        self.single(collector, &warm, warm_n, c, "collector, one event")
            .await?;

        let mut comparison = Comparison {
            figure,
            broker: label,
            unit: "req/s",
            baseline_name: "bare hyper",
            baseline: Vec::new(),
            subject: Vec::new(),
            target: SINGLE_TARGET,
        };
        for round in 0..o.rounds {
            let now = OffsetDateTime::now_utc();
            let bodies = Arc::new(events::single_bodies(&events::events(
                &format!("{label}-s{round}"),
                o.requests.min(POOL),
                now,
            )));
            let n = o.requests;
            let (base, coll) = if round % 2 == 0 {
                let base = self.single(baseline, &bodies, n, c, "bare hyper").await?;
                let coll = self
                    .single(collector, &bodies, n, c, "collector, one event")
                    .await?;
                (base, coll)
            } else {
                let coll = self
                    .single(collector, &bodies, n, c, "collector, one event")
                    .await?;
                let base = self.single(baseline, &bodies, n, c, "bare hyper").await?;
                (base, coll)
            };
            eprintln!(
                "  [{label}] round {} ({c} connections): bare {:.0} req/s in {:.1} s, collector \
                 {:.0} req/s in {:.1} s ({:.2})",
                round + 1,
                base.rate,
                base.seconds,
                coll.rate,
                coll.seconds,
                coll.rate / base.rate
            );
            comparison.baseline.push(base);
            comparison.subject.push(coll);
        }
        Ok(comparison)
    }
}

fn warn_errors(what: &str, errors: usize, first: &Option<String>) {
    if errors > 0 {
        eprintln!("  warning: {what}: {errors} failures, first: {first:?}");
    }
}

async fn run(options: Options, args: &[String]) -> anyhow::Result<()> {
    let started = Instant::now();
    let text = std::fs::read_to_string(&options.config)
        .with_context(|| format!("reading {}", options.config.display()))?;
    // Parsed without the environment's overrides: the brokers and topic are the bench's own.
    let config = Config::parse(&text, &options.config)?;
    let topic = config.kafka.topic.clone();
    // Deep enough to keep every partition's batch full: the baseline is the broker's ceiling.
    let raw_window = options
        .raw_window
        .unwrap_or(config.kafka.queue_max_messages as usize);
    let tansu_bin = broker::tansu_bin();
    collector::build_with_cargo()?;
    let ingest_bin = collector::locate_binary()?;
    let (cpus, cpu_model) = procfs::machine();
    let date = OffsetDateTime::now_utc()
        .replace_nanosecond(0)
        .ok()
        .and_then(|d| d.format(&Rfc3339).ok())
        .unwrap_or_default();

    let nanos = OffsetDateTime::now_utc().unix_timestamp_nanos();
    let tmp = std::env::temp_dir().join(format!("tally-load-{}-{nanos}", std::process::id()));
    std::fs::create_dir_all(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
    eprintln!(
        "tally-load: collector {}, broker {}, work dir {}",
        ingest_bin.display(),
        tansu_bin.display(),
        tmp.display()
    );

    let bare = BareServer::start().await?;
    let mut comparisons = Vec::new();
    let mut peak_rss = Vec::new();
    let mut broker_rss = Vec::new();
    for &storage in &options.storages {
        let label = storage.label();
        eprintln!("[{label}] starting tansu and the collector");
        let tansu = Tansu::start(&tansu_bin, storage, &tmp).await?;
        broker::create_topic(&tansu.addr(), &topic, config.kafka.partitions).await?;
        let collector =
            CollectorProcess::start(&ingest_bin, &options.config, &tansu.addr(), &topic, &tmp)
                .await?;
        let producer = produce::producer(&config.kafka, &tansu.addr())?;
        let suite = Suite {
            raw_window,
            options: &options,
            config: &config,
            broker: &tansu,
            collector: &collector,
            producer: &producer,
            topic: &topic,
        };
        comparisons.push(suite.batched_figure(label).await?);
        // The one-event figure compares HTTP handling, which the broker's storage touches
        // only through the collector's produce latency: measured on the faster broker.
        if storage == Storage::Memory {
            let c = options.concurrency;
            comparisons.push(suite.single_figure(label, &bare, c, SINGLE).await?);
            // At 64 connections the collector waits on the broker with cores to spare
            // (throughput = connections / latency); this load keeps both servers busy.
            if options.saturate > 0 {
                let c = options.saturate;
                comparisons.push(suite.single_figure(label, &bare, c, SATURATED).await?);
            }
        }
        let rss = collector
            .peak_rss()
            .context("reading the collector's VmHWM")?;
        peak_rss.push((label, rss));
        if let Some(b) = tansu.pid().and_then(|p| procfs::status_bytes(p, "VmHWM")) {
            broker_rss.push((label, b));
        }
        drop(producer);
        collector.stop().await;
        tansu.stop().await;
    }
    drop(bare);
    let _ = std::fs::remove_dir_all(&tmp);

    let settings = format!(
        "Topic `{topic}` with {} partitions; producer settings from {} (acks=all, idempotence \
         off, linger.ms {}); batched: {} events/round in POSTs of {} over {} connections, raw \
         producer window {} records; one event per POST: {} requests/round over {} keep-alive \
         connections{}; each phase stops after its count or {} s, cycling through at most {POOL} \
         distinct events; {} round(s), median shown, warm-up before each phase{}",
        config.kafka.partitions,
        options
            .config
            .file_name()
            .map_or("config".into(), |n| n.to_string_lossy()),
        config.kafka.linger_ms,
        options.events,
        options.batch,
        options.batch_concurrency,
        raw_window,
        options.requests,
        options.concurrency,
        if options.saturate > 0 {
            format!(", and over {} (\"saturated\")", options.saturate)
        } else {
            String::new()
        },
        options.max_phase.as_secs(),
        options.rounds,
        if options.quick { " (--quick)" } else { "" },
    );
    let report = Report {
        date,
        command: tally_bench::report::command_line("tally-load", args),
        cpus,
        cpu_model,
        broker_version: tally_bench::report::tansu_version(&tansu_bin),
        settings,
        comparisons,
        peak_rss,
        rss_target: RSS_TARGET,
        broker_rss,
    };
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
