//! `tally-ratebench`: the rater's bench (issue 11).
//!
//! Fills a private database on the stack's ClickHouse with N subscriptions to the bench's plan
//! (`benches/plans/bench/v1.toml`: a flat fee and five usage charges, all with graduated
//! tiers, and an invoice minimum; see `tally_bench::rate`) and one hour of rollups per
//! customer and meter (`--hours H`: H hours, as an active customer's month fills them),
//! with the days they make in `usage_daily` (a UNIQUE_COUNT meter's states in the tables
//! that keep them apart, schema V13), then invoices every customer's October twice,
//! in one run:
//! - baseline: the pure pricing loop (`tally_rater::run::price`) over usage already in
//!   memory, the same figures the database holds;
//! - the whole run: subscriptions and their segments from one streamed read of
//!   `subscription_changes`, usage per batch from `usage_daily` (each batch's read started
//!   as soon as the change log has given its customers, three under way while one is
//!   priced), then the same pricing (`InvoiceRun::preview_all`).
//!
//! Both must produce the same invoices (checked: count and the sum of totals). Target:
//! 1,000,000 customer-month invoices in under 10 s. Each round also reads every batch's
//! usage alone, by the day (as the runs read it: October's bounds are UTC midnights), and
//! the same usage by the hour (each period an hour wider on both sides), which must add up
//! to the same quantities.
//!
//! Then, in each round, the final run over the same batches (`InvoiceRun::finalize_all`, no
//! publisher) into emptied invoice tables: every invoice stored, header and lines, with the
//! same totals; and once more, which must find them all stored and write nothing.

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context};
use tally_bench::rate::{FILL, PLAN, SHAPE};
use tally_core::config::ClickHouseConfig;
use tally_core::{Aggregation, Config};
use tally_rater::run::{billables, price, Billable, InvoiceRun};
use tally_rater::store::SubscriptionStore;
use tally_rater::usage::{UsageReader, UsageTable};
use tally_rater::{period_containing, Decimal, Interval};
use time::macros::datetime;

// Pricing allocates and frees many small strings and vectors per batch; with glibc's
// allocator a batch's freed heap goes back to the kernel and is faulted in again for the
// next (measured on the pricing bench: 1.6x the time, and erratic).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

const USAGE: &str = "\
usage: tally-ratebench [OPTIONS]

Invoices N customers' month: the pure pricing loop over usage in memory (baseline) against
the whole run reading subscriptions and usage from ClickHouse, in one run.
  --customers N    customers (subscriptions)              [default 1000000]
  --batch B        customers per batch                    [default 10000]
  --rounds K       timed rounds of each (median shown)    [default 3]
  --hours H        hourly rollup rows per customer and meter, from October 1 00:00 UTC
                   (1..=744; the usage on the last of them, the others empty) [default 1]
  --quick          20,000 customers, 1 round (tests)
  --keep           keep the database afterwards
  -h, --help       this text

Environment: TALLY_CLICKHOUSE_URL (default http://127.0.0.1:18123, the stack's server).";

const TENANT: &str = "bench";

struct Options {
    customers: u64,
    batch: usize,
    rounds: usize,
    hours: u64,
    keep: bool,
}

fn options() -> anyhow::Result<Option<Options>> {
    let mut o = Options {
        customers: 1_000_000,
        batch: 10_000,
        rounds: 3,
        hours: 1,
        keep: false,
    };
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut value = |name: &str| -> anyhow::Result<u64> {
            let v = args
                .next()
                .with_context(|| format!("{name} needs a value"))?;
            v.parse()
                .with_context(|| format!("{name}: {v:?} is not a number"))
        };
        match a.as_str() {
            "-h" | "--help" => return Ok(None),
            "--customers" => o.customers = value("--customers")?.max(1),
            "--batch" => o.batch = value("--batch")?.max(1) as usize,
            "--rounds" => o.rounds = value("--rounds")?.max(1) as usize,
            "--hours" => {
                o.hours = value("--hours")?;
                ensure!((1..=744).contains(&o.hours), "--hours: 1 to 744 (a month)");
            }
            "--quick" => {
                o.customers = 20_000;
                o.rounds = 1;
            }
            "--keep" => o.keep = true,
            other => bail!("unknown option {other:?}\n{USAGE}"),
        }
    }
    Ok(Some(o))
}

/// Fills `n` subscriptions, `hours` hourly rollup rows per customer and meter (and, for a
/// UNIQUE_COUNT meter, its unique states apart, as schema V13 keeps them), and the days
/// they make, grouped from the hours as the aggregator's daily views group them.
async fn fill(db: &ClickHouseConfig, config: &Config, n: u64, hours: u64) -> anyhow::Result<()> {
    let client = tally_aggregator::migrate::client(db);
    client
        .query(&format!(
            "INSERT INTO subscription_changes SELECT '{TENANT}', concat('c', toString(number)), \
             concat('bench-', toString(number)), 'create', toDateTime('2026-10-01 00:00:00', 'UTC'), \
             toDateTime('2026-10-01 00:00:00', 'UTC'), '{plan}', {version}, \
             toDateTime('2026-10-01 00:00:00', 'UTC'), 'bench', '', '' FROM numbers({n})",
            plan = PLAN.0,
            version = PLAN.1,
        ))
        .execute()
        .await?;
    let catalog = config.catalog();
    // `hours` hourly rows per customer and meter, each state built from its values as the
    // aggregator's view builds them. The last hour holds the customer's usage; the earlier
    // ones count nothing (LATEST's value is the last hour's, the distinct values the same
    // set each hour), so the totals are `usage_of`'s whatever `hours` is. In the SQL,
    // `number` is the customer's n and `k` the hour.
    let last = hours - 1;
    let rows = n * hours;
    let each_hour = format!(
        "FROM (SELECT intDiv(i, {hours}) AS number, i % {hours} AS k \
               FROM (SELECT number AS i FROM numbers({rows})))"
    );
    for (meter, events, sum, latest, distinct) in FILL {
        let m = catalog.meter(meter).context("bench meter")?;
        let key = m.storage_key();
        client
            .query(&format!(
                "INSERT INTO rollups_hourly (tenant, customer, meter, hour, dim_values, events, \
                   value_sum, value_min, value_max, value_latest) \
                 SELECT '{TENANT}', concat('c', toString(number)), '{key}', \
                 toDateTime('2026-10-01 00:00:00', 'UTC') + 3600 * k, emptyArrayString(), \
                 arrayReduce('sumState', [if(k = {last}, toUInt64({events}), toUInt64(0))]), \
                 arrayReduce('sumState', \
                   [if(k = {last}, toDecimal128({sum}, 9), toDecimal128(0, 9))]), \
                 arrayReduce('minState', [toDecimal128(0, 9)]), \
                 arrayReduce('maxState', [toDecimal128(0, 9)]), \
                 arrayReduce('argMaxState', [toDecimal128({latest}, 9)], [toUInt64(k + 1)]) \
                 {each_hour}"
            ))
            .execute()
            .await?;
        if m.aggregation == Aggregation::UniqueCount {
            client
                .query(&format!(
                    "INSERT INTO rollups_unique_hourly SELECT '{TENANT}', \
                     concat('c', toString(number)), '{key}', \
                     toDateTime('2026-10-01 00:00:00', 'UTC') + 3600 * k, emptyArrayString(), \
                     arrayReduce('uniqExactState', {distinct}) {each_hour}"
                ))
                .execute()
                .await?;
        }
    }
    client
        .query(
            "INSERT INTO usage_daily SELECT tenant, customer, meter, toStartOfDay(hour) AS day, \
             sumMergeState(events), sumMergeState(value_sum), minMergeState(value_min), \
             maxMergeState(value_max), argMaxMergeState(value_latest) \
             FROM rollups_hourly GROUP BY tenant, customer, meter, day",
        )
        .execute()
        .await?;
    client
        .query(
            "INSERT INTO usage_unique_daily SELECT tenant, customer, meter, \
             toStartOfDay(hour) AS day, uniqExactMergeState(value_unique) \
             FROM rollups_unique_hourly GROUP BY tenant, customer, meter, day",
        )
        .execute()
        .await?;
    // Each table merged into one part, as background merges leave a month that has settled:
    // the fill's inserts leave the tables with different numbers of parts (3 and 8 for a
    // million customers), and a read costs more the more parts it opens (a third more CPU
    // for the same rows with 8 parts against 3; the same once both are merged).
    for table in [
        "rollups_hourly",
        "usage_daily",
        "rollups_unique_hourly",
        "usage_unique_daily",
    ] {
        client
            .query(&format!("OPTIMIZE TABLE {table} FINAL"))
            .execute()
            .await?;
    }
    Ok(())
}

/// Adds every quantity of `usage` to its meter's total.
fn add_usage(totals: &mut BTreeMap<String, Decimal>, usage: &UsageTable) {
    for quantities in usage.values() {
        for (meter, q) in quantities {
            *totals.entry(meter.clone()).or_default() += *q;
        }
    }
}

/// Running sums of subtotals and totals.
fn totals(acc: (Decimal, Decimal), invoices: &[tally_rater::Invoice]) -> (Decimal, Decimal) {
    invoices
        .iter()
        .fold(acc, |(s, t), i| (s + i.subtotal, t + i.total))
}

/// CPU seconds used so far by this process and by the stack's ClickHouse server.
fn cpu_now() -> (Option<f64>, Option<f64>) {
    let ch = tally_bench::agg::ch::stack_pid().and_then(tally_bench::procfs::cpu_seconds);
    (tally_bench::procfs::self_cpu_seconds(), ch)
}

/// The CPU seconds both used since `before`, as the bench prints them.
fn cpu_used(before: (Option<f64>, Option<f64>)) -> String {
    let now = cpu_now();
    let used = |a: Option<f64>, b: Option<f64>| {
        a.zip(b)
            .map_or_else(|| "?".to_owned(), |(a, b)| format!("{:.1}", b - a))
    };
    format!(
        "CPU seconds: rater {}, ClickHouse {}",
        used(before.0, now.0),
        used(before.1, now.1)
    )
}

fn median(mut xs: Vec<Duration>) -> Duration {
    xs.sort();
    xs[xs.len() / 2]
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let Some(o) = options()? else {
        println!("{USAGE}");
        return Ok(());
    };
    let root = tally_bench::rate::root();
    let config = tally_bench::rate::config()?;
    let plans = tally_bench::rate::plans()?;
    let db = ClickHouseConfig {
        url: std::env::var("TALLY_CLICKHOUSE_URL")
            .unwrap_or_else(|_| "http://127.0.0.1:18123".into()),
        database: format!("ratebench_{}", std::process::id()),
        user: "default".into(),
        password: String::new(),
    };
    let migrations = tally_aggregator::migrate::load(&root.join("schemas/clickhouse"))?;
    tally_aggregator::migrate::apply(&db, &migrations).await?;
    let started = Instant::now();
    fill(&db, &config, o.customers, o.hours).await?;
    println!(
        "filled {} subscriptions and {} hourly rollup rows ({} per customer and meter) in {:.1} s",
        o.customers,
        o.customers * FILL.len() as u64 * o.hours,
        o.hours,
        started.elapsed().as_secs_f64()
    );

    let at = datetime!(2026-10-15 0:00 UTC);
    let period = period_containing(datetime!(2026-10-01 0:00 UTC), Interval::Monthly, at)?;
    let batches: Vec<(Vec<Billable>, UsageTable)> = (0..o.customers)
        .collect::<Vec<_>>()
        .chunks(o.batch)
        .map(|chunk| {
            let mut usage = HashMap::new();
            let batch = chunk
                .iter()
                .map(|&n| {
                    let b = tally_bench::rate::billable(n, period);
                    usage.insert((b.customer.clone(), 0), tally_bench::rate::usage_of(n));
                    b
                })
                .collect();
            (batch, usage)
        })
        .collect();

    let store = SubscriptionStore::new(&db);
    let reader = UsageReader::new(&db, config.catalog(), config.validation.max_dimension_chars);
    let run = InvoiceRun::new(&db, reader.clone());
    let (mut pure, mut whole, mut reads) = (Vec::new(), Vec::new(), Vec::new());
    // Final runs per round: writing every invoice, then finding them all stored.
    let mut finals: [Vec<Duration>; 2] = [Vec::new(), Vec::new()];
    let client = tally_aggregator::migrate::client(&db);
    let (mut pure_sum, mut whole_sum) = (
        (Decimal::ZERO, Decimal::ZERO),
        (Decimal::ZERO, Decimal::ZERO),
    );
    let (mut pure_n, mut whole_n) = (0, 0);
    for round in 1..=o.rounds {
        let t = Instant::now();
        let (mut n, mut sum) = (0usize, (Decimal::ZERO, Decimal::ZERO));
        for (batch, usage) in &batches {
            let priced = price(&plans, batch, usage);
            n += priced.invoices.len();
            sum = totals(sum, &priced.invoices);
        }
        pure.push(t.elapsed());
        (pure_n, pure_sum) = (n, sum);

        let t = Instant::now();
        let (mut n, mut sum) = (0usize, (Decimal::ZERO, Decimal::ZERO));
        let refused = run
            .preview_all(&store, &plans, TENANT, at, o.batch, |priced| {
                n += priced.invoices.len();
                sum = totals(sum, &priced.invoices);
            })
            .await?;
        whole.push(t.elapsed());
        (whole_n, whole_sum) = (n, sum);

        // The batches for the phases below; reading them alone is the whole run's part
        // that overlaps the usage reads.
        let t = Instant::now();
        let (read, _) = billables(&store, &plans, TENANT, at, o.batch).await?;
        let placed = t.elapsed();

        // Where the whole run's time goes: the usage reads alone, one batch at a time.
        let cpu0 = cpu_now();
        let t = Instant::now();
        let mut rows = 0usize;
        let mut by_day = BTreeMap::<String, Decimal>::new();
        for batch in &read {
            let (requests, meters) = tally_rater::run::requests(&plans, batch);
            let meters: Vec<&str> = meters.iter().map(String::as_str).collect();
            let usage = reader.read(TENANT, &meters, &requests).await?;
            rows += usage.len();
            add_usage(&mut by_day, &usage);
        }
        reads.push(t.elapsed());
        let read_cpu = cpu_used(cpu0);
        ensure!(
            rows == whole_n,
            "usage of {rows} customers read, {whole_n} invoiced"
        );
        // The same usage read by the hour, as every read was before the daily rollups
        // (V11): each period an hour wider on both sides, where there is no usage.
        let cpu0 = cpu_now();
        let t = Instant::now();
        let mut by_hour = BTreeMap::<String, Decimal>::new();
        for batch in &read {
            let (mut requests, meters) = tally_rater::run::requests(&plans, batch);
            let meters: Vec<&str> = meters.iter().map(String::as_str).collect();
            for r in &mut requests {
                r.bounds[0] -= time::Duration::HOUR;
                let end = r.bounds.len() - 1;
                r.bounds[end] += time::Duration::HOUR;
            }
            add_usage(
                &mut by_hour,
                &reader.read(TENANT, &meters, &requests).await?,
            );
        }
        ensure!(
            by_hour == by_day,
            "usage by the hour {by_hour:?} differs from usage by the day {by_day:?}"
        );
        let hourly_reads = t.elapsed();
        let hourly_cpu = cpu_used(cpu0);
        println!(
            "round {round}: pure pricing {:.2} s, whole run {:.2} s ({} refused); subscriptions \
             and segments alone {:.2} s; usage reads alone {:.2} s ({read_cpu}); \
             the same by the hour {:.2} s ({hourly_cpu})",
            pure[round - 1].as_secs_f64(),
            whole[round - 1].as_secs_f64(),
            refused.len(),
            placed.as_secs_f64(),
            reads[round - 1].as_secs_f64(),
            hourly_reads.as_secs_f64(),
        );

        // The final run: the same invoices stored (headers and lines), then the run again,
        // which must find every invoice stored and write nothing. Each round starts from
        // empty invoice tables.
        for table in ["invoices", "invoice_lines"] {
            client
                .query(&format!("TRUNCATE TABLE {table}"))
                .execute()
                .await?;
        }
        for (pass, times) in finals.iter_mut().enumerate() {
            let cpu0 = cpu_now();
            let t = Instant::now();
            let (mut written, mut already, mut stored_sum) = (0, 0, (Decimal::ZERO, Decimal::ZERO));
            run.finalize_all(&plans, TENANT, &read, |done| {
                written += done.written;
                already += done.already_final;
                stored_sum = totals(stored_sum, &done.invoices);
            })
            .await?;
            let took = t.elapsed();
            let want = if pass == 0 {
                (whole_n, 0)
            } else {
                (0, whole_n)
            };
            ensure!(
                (written, already) == want,
                "final pass {}: {written} written, {already} already final; expected {want:?}",
                pass + 1
            );
            ensure!(
                stored_sum == whole_sum,
                "final pass {}: stored totals {stored_sum:?} differ from the preview's {whole_sum:?}",
                pass + 1
            );
            println!(
                "round {round}: final run {}: {:.2} s ({written} invoices written, {already} \
                 already final; {})",
                pass + 1,
                took.as_secs_f64(),
                cpu_used(cpu0),
            );
            times.push(took);
        }
    }
    let lines: u64 = client
        .query("SELECT count() FROM invoice_lines")
        .fetch_one()
        .await?;
    let rounds = |xs: &[Duration]| {
        let each: Vec<String> = xs
            .iter()
            .map(|d| format!("{:.2}", d.as_secs_f64()))
            .collect();
        each.join(", ")
    };
    let (write, again) = (median(finals[0].clone()), median(finals[1].clone()));
    println!(
        "  final run          {:.2} s ({:.2} s per million; rounds {}) to {} stored invoices and \
         {lines} lines; run again (nothing to write) {:.2} s (rounds {})",
        write.as_secs_f64(),
        write.as_secs_f64() * 1_000_000.0 / o.customers as f64,
        rounds(&finals[0]),
        whole_n,
        again.as_secs_f64(),
        rounds(&finals[1]),
    );
    if (pure_n, pure_sum) != (whole_n, whole_sum) {
        bail!(
            "the runs disagree: pure {pure_n} invoices {pure_sum:?}, whole {whole_n} {whole_sum:?}"
        );
    }
    let (p, w) = (median(pure), median(whole));
    let per_million = |d: Duration| d.as_secs_f64() * 1_000_000.0 / o.customers as f64;
    println!(
        "\n{} customer-month invoices ({SHAPE}), \
         batches of {}, {} round(s), median:\n  \
         pure pricing loop  {:.2} s ({:.2} s per million)\n  \
         whole run          {:.2} s ({:.2} s per million): {:.1}x the pure loop; target < 10 s per million: {}\n  \
         invoices agree: {} with subtotals {} and totals {}",
        o.customers,
        o.batch,
        o.rounds,
        p.as_secs_f64(),
        per_million(p),
        w.as_secs_f64(),
        per_million(w),
        w.as_secs_f64() / p.as_secs_f64(),
        if per_million(w) < 10.0 { "pass" } else { "FAIL" },
        whole_n,
        whole_sum.0,
        whole_sum.1
    );
    if !o.keep {
        tally_aggregator::migrate::client(&db)
            .with_database("default")
            .query(&format!("DROP DATABASE IF EXISTS {}", db.database))
            .execute()
            .await?;
    }
    Ok(())
}
