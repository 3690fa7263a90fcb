//! `tally-quotabench`: the quota check's load bench.
//!
//! On the stack's Redis, in one run, each figure against a baseline measured in the same run:
//! 1. pipelined throughput: `Quota::check_many` (several tasks sending batches over the
//!    library's one multiplexed connection) against `redis-benchmark` sending the very
//!    `EVALSHA` the library sends, with as many commands in flight;
//! 2. latency: single `Quota::check` calls and single batches, one at a time, against
//!    `redis-benchmark` with one connection;
//! 3. the HTTP endpoint: `POST /v1/quota/check` served in-process, over keep-alive
//!    connections, against the library called directly with the same concurrency;
//! 4. freshness: events accepted by a collector until the quota feed has counted them, against
//!    the p99 < 2 s target (`tally_bench::quota_fresh`).
//!
//! Customers have no subscription (a private, empty subscription database), so each gets the
//! limits of the `--plan` given as `quota.no_subscription`. `tally-quotabench --help` lists
//! the options.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context};
use bytes::Bytes;
use http::StatusCode;
use redis::Value;
use tally_bench::agg::report::{quantile, Freshness};
use tally_bench::events::Body;
use tally_bench::quota::{self as baseline, BenchRun, Load};
use tally_bench::quota_fresh;
use tally_bench::report::{median, thousands};
use tally_bench::{load, procfs};
use tally_core::Config;
use tally_quota::http::{serve, Api};
use tally_quota::{window, Answered, Check, Quota};
use tally_rater::Decimal;
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

const USAGE: &str = "\
usage: tally-quotabench [OPTIONS]

The quota check on Redis, each figure against a baseline from the same run:
  1. checks/s of Quota::check_many, pipelined, vs redis-benchmark sending the same EVALSHA
  2. p50/p99 of single Quota::check calls and of single batches, one at a time
  3. POST /v1/quota/check served in-process vs the library called directly
  4. freshness: 202 from a collector -> counted by the quota feed, p99 vs 2 s

  --rounds K            rounds, baseline then library in each (median shown) [default 3]
  --checks N            pipelined checks per round on each side            [default 200000]
  --customers N         customers c-0 ... c-(N-1) (redis-benchmark -r N)    [default 5000]
  --clients C           redis-benchmark connections (-c)                   [default 50]
  --pipeline P          redis-benchmark commands pipelined per client (-P) [default 16]
  --tasks T             library tasks calling check_many at once           [default 8]
  --batch B             checks per check_many call                         [default 100]
  --latency-checks N    single checks timed one at a time per round        [default 2000]
  --latency-batches N   batches timed one at a time per round              [default 200]
  --connections N       HTTP keep-alive connections (and direct tasks)     [default 32]
  --http-requests N     HTTP requests per round (and direct checks)        [default 100000]
  --fresh-events N      events of the freshness figure (0: skip it)        [default 500]
  --fresh-rate R        events per second sent for it                      [default 100]
  --plan NAME           quota.no_subscription = plan:NAME                  [default pro]
  --redis-url URL       Redis to measure           [default: quota.redis_url of the config]
  --config FILE         configuration                    [default config/tally.dev.toml]
  --max-phase-secs S    any phase gives up after S s                      [default 60]
  --json FILE           also write a JSON summary to FILE
  -h, --help            this text

Environment: the config's TALLY_* overrides (TALLY_REDIS_URL, TALLY_CLICKHOUSE_URL,
TALLY_PLANS, TALLY_KAFKA_BROKERS), TALLY_REDIS_BENCHMARK (default /usr/bin/redis-benchmark).";

const TENANT: &str = "demo";
const METER: &str = "requests";
const HTTP_CUSTOMER: &str = "c-17";
const HTTP_BODY: &str = r#"{"customer":"c-17","meter":"requests","amount":1,"consume":true}"#;
const PIPELINED_TARGET: f64 = 0.5;
const SINGLE_P99_TARGET_MS: f64 = 1.0;

#[derive(Debug, Clone)]
struct Options {
    rounds: usize,
    checks: usize,
    customers: usize,
    clients: usize,
    pipeline: usize,
    tasks: usize,
    batch: usize,
    latency_checks: usize,
    latency_batches: usize,
    connections: usize,
    http_requests: usize,
    fresh_events: usize,
    fresh_rate: f64,
    plan: String,
    redis_url: Option<String>,
    config: PathBuf,
    max_phase: Duration,
    json: Option<PathBuf>,
}

impl Options {
    fn parse(args: &[String]) -> anyhow::Result<Options> {
        let mut o = Options {
            rounds: 3,
            checks: 200_000,
            customers: 5_000,
            clients: 50,
            pipeline: 16,
            tasks: 8,
            batch: 100,
            latency_checks: 2_000,
            latency_batches: 200,
            connections: 32,
            http_requests: 100_000,
            fresh_events: 500,
            fresh_rate: 100.0,
            plan: "pro".into(),
            redis_url: None,
            config: root().join("config/tally.dev.toml"),
            max_phase: Duration::from_secs(60),
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
                "--rounds" => o.rounds = number(value()?)?,
                "--checks" => o.checks = number(value()?)?,
                "--customers" => o.customers = number(value()?)?,
                "--clients" => o.clients = number(value()?)?,
                "--pipeline" => o.pipeline = number(value()?)?,
                "--tasks" => o.tasks = number(value()?)?,
                "--batch" => o.batch = number(value()?)?,
                "--latency-checks" => o.latency_checks = number(value()?)?,
                "--latency-batches" => o.latency_batches = number(value()?)?,
                "--connections" => o.connections = number(value()?)?,
                "--http-requests" => o.http_requests = number(value()?)?,
                "--fresh-events" => {
                    let v = value()?;
                    o.fresh_events = v
                        .parse()
                        .with_context(|| format!("--fresh-events: expected a number, got {v:?}"))?;
                }
                "--fresh-rate" => {
                    let v = value()?;
                    o.fresh_rate = match v.parse::<f64>() {
                        Ok(r) if r > 0.0 && r.is_finite() => r,
                        _ => bail!("--fresh-rate: expected a positive number, got {v:?}"),
                    };
                }
                "--plan" => o.plan = value()?.clone(),
                "--redis-url" => o.redis_url = Some(value()?.clone()),
                "--config" => o.config = PathBuf::from(value()?),
                "--max-phase-secs" => o.max_phase = Duration::from_secs(number(value()?)? as u64),
                "--json" => o.json = Some(PathBuf::from(value()?)),
                other => bail!("unknown argument {other:?}\n\n{USAGE}"),
            }
        }
        Ok(o)
    }
}

/// The workspace root, for the default config and plan folder.
fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// CPU over one phase, as cores busy (CPU seconds / wall seconds).
#[derive(Debug, Clone, Copy, Default)]
struct Cores {
    bench: f64,
    redis_benchmark: Option<f64>,
    redis: Option<f64>,
}

struct CpuMeter {
    started: Instant,
    bench: Option<f64>,
    redis_pid: Option<u32>,
    redis: Option<f64>,
}

impl CpuMeter {
    fn start(redis_pid: Option<u32>) -> CpuMeter {
        CpuMeter {
            started: Instant::now(),
            bench: procfs::self_cpu_seconds(),
            redis_pid,
            redis: redis_pid.and_then(procfs::cpu_seconds),
        }
    }

    fn stop(self, redis_benchmark_cpu: Option<f64>) -> Cores {
        let wall = self.started.elapsed().as_secs_f64();
        let delta = |before: Option<f64>, after: Option<f64>| Some((after? - before?) / wall);
        Cores {
            bench: delta(self.bench, procfs::self_cpu_seconds()).unwrap_or(f64::NAN),
            redis_benchmark: redis_benchmark_cpu.map(|c| c / wall),
            redis: delta(self.redis, self.redis_pid.and_then(procfs::cpu_seconds)),
        }
    }
}

/// One measured phase.
#[derive(Debug, Clone, Default)]
struct Phase {
    /// Checks (or requests) per second answered by Redis.
    rate: f64,
    /// Latency per call: a request of redis-benchmark, a `check`/`check_many` call, an HTTP
    /// request.
    p50_ms: f64,
    p99_ms: f64,
    seconds: f64,
    /// Decisions by Redis; `None` where the baseline does not say.
    allowed: Option<u64>,
    refused: Option<u64>,
    /// Answered otherwise (fallback, errors, failed requests).
    failed: u64,
    cores: Cores,
}

impl Phase {
    fn from_benchmark(run: BenchRun, cores: Cores) -> Phase {
        Phase {
            rate: run.measured.rate,
            p50_ms: run.measured.p50_ms,
            p99_ms: run.measured.p99_ms,
            seconds: run.seconds,
            cores,
            ..Phase::default()
        }
    }
}

/// What a run of library calls achieved.
#[derive(Debug, Default)]
struct Calls {
    allowed: u64,
    refused: u64,
    /// Answered without Redis, or not answered.
    failed: u64,
    first_failure: Option<String>,
    elapsed: Duration,
    /// Latency of each call, µs, sorted.
    latencies_us: Vec<u32>,
}

impl Calls {
    fn answered(&self) -> u64 {
        self.allowed + self.refused
    }

    fn quantile_ms(&self, q: f64) -> f64 {
        if self.latencies_us.is_empty() {
            return f64::NAN;
        }
        let i = ((self.latencies_us.len() - 1) as f64 * q).round() as usize;
        f64::from(self.latencies_us[i]) / 1000.0
    }

    fn phase(&self, cores: Cores) -> Phase {
        Phase {
            rate: self.answered() as f64 / self.elapsed.as_secs_f64(),
            p50_ms: self.quantile_ms(0.5),
            p99_ms: self.quantile_ms(0.99),
            seconds: self.elapsed.as_secs_f64(),
            allowed: Some(self.allowed),
            refused: Some(self.refused),
            failed: self.failed,
            cores,
        }
    }
}

/// `total` checks of `customers` (in turn), `batch` per call, from `tasks` tasks at once;
/// stops early after `max_time`.
async fn calls(
    quota: &Arc<Quota>,
    customers: &Arc<Vec<String>>,
    total: usize,
    tasks: usize,
    batch: usize,
    consume: bool,
    max_time: Duration,
) -> anyhow::Result<Calls> {
    let next = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let stop_at = started + max_time;
    let handles: Vec<_> = (0..tasks.max(1))
        .map(|_| {
            let (quota, customers, next) = (quota.clone(), customers.clone(), next.clone());
            tokio::spawn(async move {
                let mut c = Calls::default();
                loop {
                    let from = next.fetch_add(batch, Ordering::Relaxed);
                    if from >= total || Instant::now() >= stop_at {
                        return c;
                    }
                    let checks: Vec<Check<'_>> = (from..total.min(from + batch))
                        .map(|i| Check {
                            tenant: TENANT,
                            customer: &customers[i % customers.len()],
                            meter: METER,
                            amount: Decimal::ONE,
                            consume,
                        })
                        .collect();
                    let sent = Instant::now();
                    let answers = match checks.as_slice() {
                        [one] => vec![quota.check(one).await],
                        many => quota.check_many(many).await,
                    };
                    c.latencies_us
                        .push(u32::try_from(sent.elapsed().as_micros()).unwrap_or(u32::MAX));
                    for a in answers {
                        match a {
                            Ok(d) if d.answered == Answered::Redis && d.allowed => c.allowed += 1,
                            Ok(d) if d.answered == Answered::Redis => c.refused += 1,
                            Ok(d) => {
                                c.failed += 1;
                                c.first_failure
                                    .get_or_insert(format!("answered by {:?}", d.answered));
                            }
                            Err(e) => {
                                c.failed += 1;
                                c.first_failure.get_or_insert(e.to_string());
                            }
                        }
                    }
                }
            })
        })
        .collect();
    let mut all = Calls::default();
    for h in handles {
        let c = h.await.context("a check task panicked")?;
        all.allowed += c.allowed;
        all.refused += c.refused;
        all.failed += c.failed;
        if all.first_failure.is_none() {
            all.first_failure = c.first_failure;
        }
        all.latencies_us.extend(c.latencies_us);
    }
    all.elapsed = started.elapsed();
    all.latencies_us.sort_unstable();
    ensure!(
        all.answered() > 0,
        "no check answered by Redis: {:?}",
        all.first_failure
    );
    Ok(all)
}

/// Everything a round needs.
struct Bench {
    options: Options,
    quota: Arc<Quota>,
    customers: Arc<Vec<String>>,
    http_customer: Arc<Vec<String>>,
    redis_url: String,
    redis_pid: Option<u32>,
    redis_benchmark: PathBuf,
    /// The `EVALSHA` command of one check, `__rand_int__` standing for the customer number.
    command: Vec<String>,
    http: std::net::SocketAddr,
}

fn rendered() -> String {
    tally_quota::metrics::prometheus().render()
}

fn subscription_reads() -> u64 {
    baseline::counter(&rendered(), "tally_quota_subscription_fetches_total", "")
}

/// One round's phases.
#[derive(Debug, Clone, Default)]
struct Round {
    pipelined: [Phase; 2],
    single: [Phase; 2],
    batch: [Phase; 2],
    http: [Phase; 2],
    /// Subscription reads while phases were timed (the cache expired mid-phase).
    reads_while_timed: u64,
    warm_up: Duration,
}

impl Bench {
    async fn benchmark(&self, load: Load) -> anyhow::Result<Phase> {
        let meter = CpuMeter::start(self.redis_pid);
        let run = baseline::run(
            &self.redis_benchmark,
            &self.redis_url,
            load,
            &self.command,
            self.options.max_phase,
        )
        .await?;
        let cores = meter.stop(Some(run.cpu));
        Ok(Phase::from_benchmark(run, cores))
    }

    /// Forgets every cached subscription and reads them again (one non-consuming check per
    /// customer), so no timed phase meets an expired entry.
    /// A customer whose read failed (the subscription store was slow) is not cached: the pass
    /// runs again, up to three times, where cached customers cost only a Redis round trip.
    async fn warm(&self, customers: &Arc<Vec<String>>) -> anyhow::Result<Duration> {
        let started = Instant::now();
        self.quota.resolver().invalidate(TENANT, &[]);
        for attempt in 1..=3 {
            let c = calls(
                &self.quota,
                customers,
                customers.len(),
                self.options.tasks,
                self.options.batch,
                false,
                self.options.max_phase,
            )
            .await?;
            if c.failed == 0 {
                break;
            }
            eprintln!(
                "warm-up pass {attempt}: {} customers not cached (first: {})",
                c.failed,
                c.first_failure.as_deref().unwrap_or("-")
            );
        }
        Ok(started.elapsed())
    }

    async fn library(
        &self,
        customers: &Arc<Vec<String>>,
        total: usize,
        tasks: usize,
        batch: usize,
        reads: &mut u64,
    ) -> anyhow::Result<Phase> {
        let before = subscription_reads();
        let meter = CpuMeter::start(self.redis_pid);
        let c = calls(
            &self.quota,
            customers,
            total,
            tasks,
            batch,
            true,
            self.options.max_phase,
        )
        .await?;
        let cores = meter.stop(None);
        *reads += subscription_reads() - before;
        if c.failed > 0 {
            eprintln!(
                "warning: {} checks not answered by Redis (first: {})",
                c.failed,
                c.first_failure.as_deref().unwrap_or("-")
            );
        }
        Ok(c.phase(cores))
    }

    async fn round(&self) -> anyhow::Result<Round> {
        let o = &self.options;
        let mut r = Round::default();
        let pipelined = Load {
            clients: o.clients,
            pipeline: o.pipeline,
            requests: o.checks,
            keyspace: o.customers,
        };
        r.pipelined[0] = self.benchmark(pipelined).await?;
        r.warm_up = self.warm(&self.customers).await?;
        r.pipelined[1] = self
            .library(
                &self.customers,
                o.checks,
                o.tasks,
                o.batch,
                &mut r.reads_while_timed,
            )
            .await?;

        let single = Load {
            clients: 1,
            pipeline: 1,
            requests: o.latency_checks,
            keyspace: o.customers,
        };
        r.single[0] = self.benchmark(single).await?;
        self.warm(&self.customers).await?;
        r.single[1] = self
            .library(
                &self.customers,
                o.latency_checks,
                1,
                1,
                &mut r.reads_while_timed,
            )
            .await?;
        let batches = Load {
            clients: 1,
            pipeline: o.batch,
            requests: o.batch * o.latency_batches,
            keyspace: o.customers,
        };
        r.batch[0] = self.benchmark(batches).await?;
        r.batch[1] = self
            .library(
                &self.customers,
                o.batch * o.latency_batches,
                1,
                o.batch,
                &mut r.reads_while_timed,
            )
            .await?;

        self.warm(&self.http_customer).await?;
        r.http[0] = self
            .library(
                &self.http_customer,
                o.http_requests,
                o.connections,
                1,
                &mut r.reads_while_timed,
            )
            .await?;
        r.http[1] = self.post(&mut r.reads_while_timed).await?;
        Ok(r)
    }

    async fn post(&self, reads: &mut u64) -> anyhow::Result<Phase> {
        let o = &self.options;
        let bodies = Arc::new(vec![Body {
            bytes: Bytes::from_static(HTTP_BODY.as_bytes()),
            events: 1,
        }]);
        let before = rendered();
        let checks = "tally_quota_checks_total";
        let meter = CpuMeter::start(self.redis_pid);
        let r = load::drive_expecting(
            self.http,
            "/v1/quota/check",
            bodies,
            o.http_requests,
            o.connections,
            o.max_phase,
            StatusCode::OK,
        )
        .await?;
        let cores = meter.stop(None);
        let after = rendered();
        let delta = |label: &str| {
            baseline::counter(&after, checks, label) - baseline::counter(&before, checks, label)
        };
        let name = "tally_quota_subscription_fetches_total";
        *reads += baseline::counter(&after, name, "") - baseline::counter(&before, name, "");
        if r.errors > 0 {
            eprintln!(
                "warning: {} HTTP requests failed (first: {})",
                r.errors,
                r.first_error.as_deref().unwrap_or("-")
            );
        }
        ensure!(
            r.requests > 0,
            "no HTTP request answered 200: {:?}",
            r.first_error
        );
        let redis = |outcome: &str| delta(&format!("outcome=\"{outcome}\",source=\"redis\""));
        let fallback = delta("source=\"fallback_");
        Ok(Phase {
            rate: r.requests_per_sec(),
            p50_ms: r.latency_ms(0.5),
            p99_ms: r.latency_ms(0.99),
            seconds: r.elapsed.as_secs_f64(),
            allowed: Some(redis("allowed")),
            refused: Some(redis("refused")),
            failed: r.errors as u64 + fallback,
            cores,
        })
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.iter().any(|a| a == "-h" || a == "--help") {
        println!("{USAGE}");
        return Ok(());
    }
    let options = Options::parse(&args)?;
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    // Either signal drops the run, and with it redis-benchmark (kill-on-drop).
    tokio::select! {
        result = run(options, &args) => result,
        _ = tokio::signal::ctrl_c() => bail!("interrupted"),
        _ = term.recv() => bail!("terminated"),
    }
}

/// A private, migrated subscription database, dropped when the run ends however it ends.
struct Database(tally_core::config::ClickHouseConfig);

impl Drop for Database {
    fn drop(&mut self) {
        let db = self.0.clone();
        // Drop runs inside the runtime: the statement goes out on a thread of its own.
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            rt.block_on(
                tally_aggregator::migrate::client(&db)
                    .with_database("default")
                    .query(&format!("DROP DATABASE IF EXISTS {}", db.database))
                    .execute(),
            )
            .map_err(std::io::Error::other)
        })
        .join();
    }
}

async fn run(o: Options, args: &[String]) -> anyhow::Result<()> {
    let started = Instant::now();
    let mut config = Config::load(Some(&o.config))?;
    if let Some(url) = &o.redis_url {
        config.quota.redis_url = url.clone();
    }
    if Path::new(&config.quota.plans_dir).is_relative() {
        config.quota.plans_dir = root().join(&config.quota.plans_dir).display().to_string();
    }
    config.quota.no_subscription = format!("plan:{}", o.plan);
    // Letters, digits and _ only: it names a database.
    config.clickhouse.database = format!("quotabench_{}", std::process::id());
    tally_aggregator::migrate::apply(
        &config.clickhouse,
        &tally_aggregator::migrate::load(&tally_aggregator::migrate::default_dir())?,
    )
    .await
    .with_context(|| {
        format!(
            "migrating {} at {}",
            config.clickhouse.database, config.clickhouse.url
        )
    })?;
    let _database = Database(config.clickhouse.clone());

    tally_quota::metrics::prometheus();
    let quota = Arc::new(Quota::from_config(&config)?);
    quota
        .load_scripts()
        .await
        .with_context(|| format!("loading the quota scripts into {}", config.quota.redis_url))?;
    let redis_url = config.quota.redis_url.clone();
    let mut conn = redis::Client::open(redis_url.as_str())?
        .get_multiplexed_async_connection()
        .await?;
    let info: String = redis::cmd("INFO")
        .arg("server")
        .query_async(&mut conn)
        .await?;
    let field = |name: &str| {
        info.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
            .map(|v| v.trim().to_owned())
    };
    let redis_version = field("redis_version").unwrap_or_else(|| "?".into());
    // Redis's CPU is counted only when the server runs on this machine.
    let redis_pid = field("process_id")
        .and_then(|p| p.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/comm"))
                .is_ok_and(|c| c.starts_with("redis"))
        });

    // The check the library makes for a customer of the default plan, as redis-benchmark
    // sends it: the same script, keys of the same shape, the same arguments.
    let now = OffsetDateTime::now_utc();
    let source = quota.resolver().default_source(now);
    let limits = source.limits(METER);
    ensure!(
        !limits.is_empty(),
        "plan {:?} sets no limit on {METER}",
        o.plan
    );
    let scale = quota.policy(METER).context("meter policy")?.scale;
    let units = window::amount_units(Decimal::ONE, scale).map_err(anyhow::Error::msg)?;
    let windows = window::applied(
        &window::customer_tag(TENANT, "c-__rand_int__"),
        METER,
        &limits,
        scale,
        now,
        source.billing(),
    );
    let sha = redis::Script::new(tally_quota::script::CHECK)
        .get_hash()
        .to_owned();
    let command = baseline::evalsha_args(&sha, &windows, units, true);
    let mut probe = redis::cmd(&command[0]);
    for a in &command[1..] {
        probe.arg(a.replace("__rand_int__", "000000000000"));
    }
    match probe.query_async::<Value>(&mut conn).await? {
        Value::Array(v) if v.len() == windows.len() + 2 => {}
        other => bail!("the baseline command does not answer as the script does: {other:?}"),
    }

    let (stop_tx, stop) = tokio::sync::watch::channel(false);
    let api = Arc::new(Api::new(quota.clone(), config.tenants()));
    let (http, server) = serve("127.0.0.1:0", api, stop).await?;

    let bench = Bench {
        customers: Arc::new((0..o.customers).map(|i| format!("c-{i}")).collect()),
        http_customer: Arc::new(vec![HTTP_CUSTOMER.to_owned()]),
        quota: quota.clone(),
        redis_url,
        redis_pid,
        redis_benchmark: std::env::var_os("TALLY_REDIS_BENCHMARK")
            .map_or_else(|| PathBuf::from("/usr/bin/redis-benchmark"), PathBuf::from),
        command,
        http,
        options: o.clone(),
    };
    let (cpus, cpu_model) = procfs::machine();
    let date = now
        .replace_nanosecond(0)
        .ok()
        .and_then(|d| d.format(&Rfc3339).ok())
        .unwrap_or_default();
    let header = Header {
        date,
        command: tally_bench::report::command_line("tally-quotabench", args),
        machine: format!("{cpus} CPUs ({cpu_model})"),
        redis: format!(
            "Redis {redis_version} at {}{}",
            bench.redis_url,
            if redis_pid.is_some() {
                ""
            } else {
                " (not on this machine: its CPU is not counted)"
            }
        ),
        baseline_command: format!(
            "{} -u {} -c {} -P {} -n {} -r {} --csv {}",
            bench.redis_benchmark.display(),
            bench.redis_url,
            o.clients,
            o.pipeline,
            o.checks,
            o.customers,
            bench
                .command
                .iter()
                .map(|a| if a.contains(['{', '}']) {
                    format!("'{a}'")
                } else {
                    a.clone()
                })
                .collect::<Vec<_>>()
                .join(" ")
        ),
        plan: source.label(),
        limits: limits
            .iter()
            .map(|(w, l)| format!("{l} per {}", w.name()))
            .collect::<Vec<_>>()
            .join(", "),
    };
    eprintln!(
        "tally-quotabench: {}; plan {} ({}); HTTP API on {http}",
        header.redis, header.plan, header.limits
    );

    let mut rounds = Vec::with_capacity(o.rounds);
    for n in 1..=o.rounds {
        let r = bench.round().await?;
        eprintln!(
            "round {n}: pipelined redis-benchmark {} / library {} checks/s; single check p99 {:.3} / {:.3} ms; HTTP direct {} / POST {} checks/s",
            thousands(r.pipelined[0].rate),
            thousands(r.pipelined[1].rate),
            r.single[0].p99_ms,
            r.single[1].p99_ms,
            thousands(r.http[0].rate),
            thousands(r.http[1].rate),
        );
        rounds.push(r);
    }
    let _ = stop_tx.send(true);
    let _ = server.await;

    let freshness = if o.fresh_events > 0 {
        let run = format!(
            "{}-{}",
            std::process::id(),
            now.unix_timestamp_nanos() / 1_000_000
        );
        let f = quota_fresh::measure(&quota, &config, TENANT, &run, o.fresh_events, o.fresh_rate)
            .await
            .context("freshness")?;
        eprintln!("freshness: {}", quota_fresh::summary(&f));
        Some(f)
    } else {
        None
    };

    let report = Report {
        header,
        options: o.clone(),
        rounds,
        freshness,
    };
    println!("{}", report.text());
    println!(
        "--- markdown for BENCHMARKS.md ---\n{}--- end ---",
        report.markdown()
    );
    println!("finished in {:.0} s", started.elapsed().as_secs_f64());
    if let Some(path) = &o.json {
        let json = serde_json::to_string_pretty(&report.json())?;
        std::fs::write(path, json).with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}

struct Header {
    date: String,
    command: String,
    machine: String,
    redis: String,
    baseline_command: String,
    plan: String,
    limits: String,
}

struct Report {
    header: Header,
    options: Options,
    rounds: Vec<Round>,
    freshness: Option<Freshness>,
}

/// A figure: baseline and subject phases per round.
struct Figure<'a> {
    name: String,
    baseline_name: &'static str,
    subject_name: &'static str,
    unit: &'static str,
    baseline: Vec<&'a Phase>,
    subject: Vec<&'a Phase>,
}

impl Figure<'_> {
    fn med(phases: &[&Phase], f: impl Fn(&Phase) -> f64) -> f64 {
        median(phases.iter().map(|p| f(p)).collect())
    }

    fn rates(&self) -> (f64, f64) {
        (
            Self::med(&self.baseline, |p| p.rate),
            Self::med(&self.subject, |p| p.rate),
        )
    }

    fn ratio(&self) -> f64 {
        let (b, s) = self.rates();
        s / b
    }

    fn round_ratios(&self) -> String {
        self.baseline
            .iter()
            .zip(&self.subject)
            .map(|(b, s)| format!("{:.2}", s.rate / b.rate))
            .collect::<Vec<_>>()
            .join(", ")
    }

    fn latency(phases: &[&Phase]) -> (f64, f64) {
        (
            Self::med(phases, |p| p.p50_ms),
            Self::med(phases, |p| p.p99_ms),
        )
    }

    /// Decisions summed over the rounds, where the side reports them.
    fn split(phases: &[&Phase]) -> Option<String> {
        let sum =
            |f: fn(&Phase) -> Option<u64>| -> Option<u64> { phases.iter().map(|p| f(p)).sum() };
        let failed: u64 = phases.iter().map(|p| p.failed).sum();
        let (allowed, refused) = (sum(|p| p.allowed)?, sum(|p| p.refused)?);
        Some(format!(
            "{} allowed / {} refused{}",
            thousands(allowed as f64),
            thousands(refused as f64),
            if failed > 0 {
                format!(" / {failed} not answered by Redis")
            } else {
                String::new()
            }
        ))
    }
}

fn cell_split(phases: &[&Phase]) -> String {
    Figure::split(phases).map_or(String::new(), |s| format!("<br>{s}"))
}

fn cores(c: &[&Phase]) -> String {
    let med = |f: fn(&Phase) -> Option<f64>| {
        let xs: Vec<f64> = c.iter().filter_map(|p| f(p)).collect();
        if xs.is_empty() {
            "-".to_owned()
        } else {
            format!("{:.2}", median(xs))
        }
    };
    format!(
        "{} / {} / {}",
        med(|p| Some(p.cores.bench)),
        med(|p| p.cores.redis_benchmark),
        med(|p| p.cores.redis)
    )
}

fn verdict(pass: bool) -> &'static str {
    if pass {
        "PASS"
    } else {
        "FAIL"
    }
}

impl Report {
    fn figures(&self) -> [Figure<'_>; 4] {
        let o = &self.options;
        let pick = |f: fn(&Round) -> &[Phase; 2], i: usize| -> Vec<&Phase> {
            self.rounds.iter().map(|r| &f(r)[i]).collect()
        };
        [
            Figure {
                name: "1. pipelined checks/s".into(),
                baseline_name: "redis-benchmark EVALSHA",
                subject_name: "Quota::check_many",
                unit: "checks/s",
                baseline: pick(|r| &r.pipelined, 0),
                subject: pick(|r| &r.pipelined, 1),
            },
            Figure {
                name: "2a. single check, one at a time".into(),
                baseline_name: "redis-benchmark -c 1 -P 1",
                subject_name: "Quota::check",
                unit: "checks/s",
                baseline: pick(|r| &r.single, 0),
                subject: pick(|r| &r.single, 1),
            },
            Figure {
                name: format!("2b. batch of {}, one at a time", o.batch),
                baseline_name: "redis-benchmark -c 1 -P B",
                subject_name: "Quota::check_many",
                unit: "checks/s",
                baseline: pick(|r| &r.batch, 0),
                subject: pick(|r| &r.batch, 1),
            },
            Figure {
                name: "3. POST /v1/quota/check".into(),
                baseline_name: "Quota::check direct",
                subject_name: "HTTP",
                unit: "checks/s",
                baseline: pick(|r| &r.http, 0),
                subject: pick(|r| &r.http, 1),
            },
        ]
    }

    fn settings(&self) -> String {
        let o = &self.options;
        format!(
            "tenant {TENANT}, meter {METER}, amount 1, consume true; {} customers without a \
             subscription on plan {} ({}); pipelined: redis-benchmark -c {} -P {} ({} in flight) \
             vs {} tasks x check_many of {} ({} in flight, one multiplexed connection), {} checks \
             per side per round; latency: {} single checks and {} batches of {}, one at a time \
             (redis-benchmark -c 1 -P 1 and -c 1 -P {}); HTTP: {} requests over {} keep-alive \
             connections, all for {HTTP_CUSTOMER}, vs {} tasks calling Quota::check; {} round(s), \
             baseline first, median shown; subscription cache re-read before each library phase",
            o.customers,
            self.header.plan,
            self.header.limits,
            o.clients,
            o.pipeline,
            o.clients * o.pipeline,
            o.tasks,
            o.batch,
            o.tasks * o.batch,
            o.checks,
            o.latency_checks,
            o.latency_batches,
            o.batch,
            o.batch,
            o.http_requests,
            o.connections,
            o.connections,
            o.rounds,
        )
    }

    fn pipelined_pass(&self) -> bool {
        self.figures()[0].ratio() >= PIPELINED_TARGET
    }

    fn single_p99(&self) -> f64 {
        Figure::latency(&self.figures()[1].subject).1
    }

    fn text(&self) -> String {
        let h = &self.header;
        let mut t = vec![
            format!("tally-quotabench: {} on {}; {}", h.date, h.machine, h.redis),
            format!("command: {}", h.command),
            format!("baseline: {}", h.baseline_command),
            format!("settings: {}", self.settings()),
            String::new(),
        ];
        for f in self.figures() {
            let (b, s) = f.rates();
            let (bp50, bp99) = Figure::latency(&f.baseline);
            let (sp50, sp99) = Figure::latency(&f.subject);
            t.push(f.name.clone());
            t.push(format!(
                "  {:<28} {:>12} {}  p50 {:.3} ms  p99 {:.3} ms  (cores bench / redis-benchmark / redis: {})",
                f.baseline_name,
                thousands(b),
                f.unit,
                bp50,
                bp99,
                cores(&f.baseline)
            ));
            t.push(format!(
                "  {:<28} {:>12} {}  p50 {:.3} ms  p99 {:.3} ms  (cores bench / redis-benchmark / redis: {})",
                f.subject_name,
                thousands(s),
                f.unit,
                sp50,
                sp99,
                cores(&f.subject)
            ));
            let splits: Vec<String> =
                [(f.baseline_name, &f.baseline), (f.subject_name, &f.subject)]
                    .into_iter()
                    .filter_map(|(name, phases)| {
                        Some(format!("{name}: {}", Figure::split(phases)?))
                    })
                    .collect();
            t.push(format!(
                "  ratio {:.2} (rounds {}); {}",
                f.ratio(),
                f.round_ratios(),
                splits.join("; ")
            ));
        }
        t.push(String::new());
        t.push("rounds (rate (seconds)):".to_owned());
        for f in self.figures() {
            t.push(format!("  {}", f.name));
            for (name, phases) in [(f.baseline_name, &f.baseline), (f.subject_name, &f.subject)] {
                let rates: Vec<String> = phases
                    .iter()
                    .map(|p| format!("{} ({:.2} s)", thousands(p.rate), p.seconds))
                    .collect();
                t.push(format!("    {:<28} {}", name, rates.join(", ")));
            }
        }
        t.push(String::new());
        t.push(format!(
            "target: pipelined library >= {PIPELINED_TARGET:.2} x redis-benchmark: {:.2} {}",
            self.figures()[0].ratio(),
            verdict(self.pipelined_pass())
        ));
        t.push(format!(
            "target: single check p99 < {SINGLE_P99_TARGET_MS:.0} ms: {:.3} ms {}",
            self.single_p99(),
            verdict(self.single_p99() < SINGLE_P99_TARGET_MS)
        ));
        let reads: u64 = self.rounds.iter().map(|r| r.reads_while_timed).sum();
        let warm: Vec<f64> = self
            .rounds
            .iter()
            .map(|r| r.warm_up.as_secs_f64())
            .collect();
        if let Some(f) = &self.freshness {
            t.push(format!(
                "target: freshness (202 -> counted by the quota feed) p99 < {:.0} ms: {:.0} ms {}",
                quota_fresh::TARGET_P99_MS,
                quantile(&f.latencies_ms, 0.99),
                verdict(quota_fresh::pass(f))
            ));
            t.push(format!("  freshness: {}", quota_fresh::summary(f)));
        }
        t.push(format!(
            "subscription cache: {} customers read in {:.2} s before each library phase (median of rounds); {reads} subscription reads during timed phases",
            self.options.customers,
            median(warm)
        ));
        t.join("\n")
    }

    fn markdown(&self) -> String {
        let h = &self.header;
        let mut m = vec![
            format!("Run {}, `{}`.", h.date, h.command),
            format!("Machine: {}. {}. {}.", h.machine, h.redis, self.settings()),
            String::new(),
            format!("Baseline of figure 1: `{}`.", h.baseline_command),
            String::new(),
            "| figure | baseline | library | ratio (rounds) | target | result |".to_owned(),
            "|---|---:|---:|---|---|---|".to_owned(),
        ];
        for (i, f) in self.figures().iter().enumerate() {
            let (b, s) = f.rates();
            let (bp50, bp99) = Figure::latency(&f.baseline);
            let (sp50, sp99) = Figure::latency(&f.subject);
            let (target, result) = match i {
                0 => (
                    format!("≥ {PIPELINED_TARGET:.2}"),
                    verdict(self.pipelined_pass()).to_owned(),
                ),
                1 => (
                    format!("p99 < {SINGLE_P99_TARGET_MS:.0} ms"),
                    verdict(sp99 < SINGLE_P99_TARGET_MS).to_owned(),
                ),
                _ => (String::new(), String::new()),
            };
            m.push(format!(
                "| {} | {}: {} {}<br>p50 {:.3} ms, p99 {:.3} ms{} | {}: {} {}<br>p50 {:.3} ms, p99 {:.3} ms{} | **{:.2}** ({}) | {} | {} |",
                f.name,
                f.baseline_name,
                thousands(b),
                f.unit,
                bp50,
                bp99,
                cell_split(&f.baseline),
                f.subject_name,
                thousands(s),
                f.unit,
                sp50,
                sp99,
                cell_split(&f.subject),
                f.ratio(),
                f.round_ratios(),
                target,
                result
            ));
        }
        if let Some(f) = &self.freshness {
            m.push(format!(
                "| 4. freshness: 202 → counted in Redis ({} events at {:.0}/s, `{}`) | - | p50 {:.0} ms, p99 {:.0} ms, max {:.0} ms; {} not counted, {} refused | - | p99 < {:.0} ms | {} |",
                f.sent,
                f.per_second,
                quota_fresh::METER,
                quantile(&f.latencies_ms, 0.5),
                quantile(&f.latencies_ms, 0.99),
                f.latencies_ms.last().copied().unwrap_or(f64::NAN),
                f.missing,
                f.refused,
                quota_fresh::TARGET_P99_MS,
                verdict(quota_fresh::pass(f))
            ));
        }
        m.push(String::new());
        m.push("Cores busy (median of rounds; CPU seconds / wall seconds): bench process / redis-benchmark / redis-server:".to_owned());
        m.push(String::new());
        m.push("| figure | baseline | library |".to_owned());
        m.push("|---|---|---|".to_owned());
        for f in self.figures() {
            m.push(format!(
                "| {} | {} | {} |",
                f.name,
                cores(&f.baseline),
                cores(&f.subject)
            ));
        }
        m.push(String::new());
        m.join("\n")
    }

    fn json(&self) -> serde_json::Value {
        let figures: Vec<_> = self
            .figures()
            .iter()
            .map(|f| {
                let (b, s) = f.rates();
                let (bp50, bp99) = Figure::latency(&f.baseline);
                let (sp50, sp99) = Figure::latency(&f.subject);
                let sum = |g: fn(&Phase) -> Option<u64>| -> Option<u64> {
                    f.subject.iter().map(|p| g(p)).sum()
                };
                serde_json::json!({
                    "figure": f.name,
                    "baseline": {"name": f.baseline_name, "rate": b, "p50_ms": bp50, "p99_ms": bp99},
                    "library": {
                        "name": f.subject_name, "rate": s, "p50_ms": sp50, "p99_ms": sp99,
                        "allowed": sum(|p| p.allowed), "refused": sum(|p| p.refused),
                        "failed": f.subject.iter().map(|p| p.failed).sum::<u64>(),
                    },
                    "ratio": f.ratio(),
                })
            })
            .collect();
        serde_json::json!({
            "date": self.header.date,
            "command": self.header.command,
            "figures": figures,
            "pipelined_pass": self.pipelined_pass(),
            "single_p99_ms": self.single_p99(),
            "single_p99_pass": self.single_p99() < SINGLE_P99_TARGET_MS,
            "freshness": self.freshness.as_ref().map(|f| serde_json::json!({
                "sent": f.sent,
                "per_second": f.per_second,
                "counted": f.latencies_ms.len(),
                "missing": f.missing,
                "refused": f.refused,
                "p50_ms": quantile(&f.latencies_ms, 0.5),
                "p99_ms": quantile(&f.latencies_ms, 0.99),
                "pass": quota_fresh::pass(f),
            })),
        })
    }
}
