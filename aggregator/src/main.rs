//! `tally-aggregator`: the aggregator service and its commands.
//!
//! - `tally-aggregator run [--config FILE]`: apply migrations, join the consumer group,
//!   roll events up into ClickHouse, serve the usage API on `aggregator.listen`.
//! - `tally-aggregator migrate [--config FILE]`: apply the ClickHouse schema only.
//! - `tally-aggregator rebuild --meter KEY [--config FILE]`: fill the rollups of the
//!   meter's current definition from the raw events (safe while ingest runs).
//!
//! `TALLY_CONFIG` names the file when `--config` is absent; `TALLY_LOG` sets the log
//! filter, `TALLY_LOG_FORMAT=json` switches to JSON lines.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tally_aggregator::{http, migrate, service};
use tally_core::Config;

// The consumer thread allocates and frees a batch's maps and buffers at every flush; glibc's
// allocator hands that heap back to the kernel and faults it in again (as in the rater).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

const USAGE: &str =
    "usage: tally-aggregator run|migrate [--config FILE] | rebuild --meter KEY [--config FILE]";

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tally_service::init_logging();
    let mut args = std::env::args().skip(1);
    let command = args.next().unwrap_or_default();
    let mut path = None;
    let mut meters = Vec::new();
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--config" => path = Some(args.next().context("--config needs a file")?),
            "--meter" => meters.push(args.next().context("--meter needs a meter key")?),
            other => anyhow::bail!("unknown argument {other:?}; {USAGE}"),
        }
    }
    let config = Config::load(path.as_deref().map(std::path::Path::new))?;
    match command.as_str() {
        "migrate" => {
            let applied = apply_migrations(&config, false).await?;
            println!(
                "clickhouse {} database {}: applied now: {applied:?}",
                config.clickhouse.url, config.clickhouse.database
            );
            Ok(())
        }
        "run" => run(config).await,
        "rebuild" => {
            anyhow::ensure!(!meters.is_empty(), "rebuild needs --meter KEY; {USAGE}");
            apply_migrations(&config, false).await?;
            let store =
                tally_aggregator::store::Store::new(&config.clickhouse, Duration::from_secs(120));
            let catalog = config.catalog();
            for key in meters {
                let meter = catalog
                    .meter(&key)
                    .with_context(|| format!("--meter: no meter {key:?} in the configuration"))?;
                let report = tally_aggregator::rebuild::rebuild(
                    &store,
                    &config.kafka.topic,
                    meter,
                    config.validation.max_dimension_chars,
                    200_000,
                )
                .await
                .with_context(|| format!("rebuilding {key}"))?;
                println!(
                    "rebuilt {key} ({}): {} range(s), {} event(s), {} row(s) written",
                    meter.storage_key(),
                    report.ranges,
                    report.events,
                    report.rows
                );
            }
            Ok(())
        }
        _ => anyhow::bail!(USAGE),
    }
}

async fn apply_migrations(config: &Config, wait: bool) -> anyhow::Result<Vec<u32>> {
    let migrations = migrate::load(&migrate::default_dir())?;
    let mut backoff = Duration::from_millis(200);
    loop {
        match migrate::apply(&config.clickhouse, &migrations).await {
            Ok(applied) => return Ok(applied),
            Err(e) if wait && e.is_retryable() => {
                tracing::warn!(error = %e, "cannot apply migrations yet; waiting");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
            Err(e) => {
                return Err(e)
                    .with_context(|| format!("applying migrations to {}", config.clickhouse.url))
            }
        }
    }
}

async fn run(config: Config) -> anyhow::Result<()> {
    tally_aggregator::metrics::prometheus();
    apply_migrations(&config, true).await?;
    let mut backoff = Duration::from_millis(200);
    for topic in [&config.kafka.topic, &config.aggregator.dead_letter_topic] {
        while let Err(e) = tally_service::ensure_topic(&config.kafka, topic).await {
            tracing::warn!(error = %e, %topic, "broker unavailable; waiting to create the topic");
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(5));
        }
    }
    let status = Arc::new(service::Status::default());
    status.clickhouse_ok.store(true, Ordering::Release);
    let (stop_http, stopped) = tokio::sync::watch::channel(false);
    let api = Arc::new(http::Api::new(&config, status.clone()));
    let (addr, http_task) = http::serve(&config.aggregator.listen, api, stopped)
        .await
        .with_context(|| format!("listening on {}", config.aggregator.listen))?;
    tracing::info!(%addr, "usage API listening");

    let stop = Arc::new(AtomicBool::new(false));
    let aggregator = service::Aggregator::new(
        config,
        tokio::runtime::Handle::current(),
        stop.clone(),
        status,
    );
    let consumer = std::thread::Builder::new()
        .name("consumer".into())
        .spawn(move || aggregator.run())?;

    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
    tracing::info!("signal received: flushing and leaving the group");
    stop.store(true, Ordering::Release);
    let joined = tokio::task::spawn_blocking(move || consumer.join()).await?;
    let _ = stop_http.send(true);
    let _ = http_task.await;
    match joined {
        Ok(result) => result.context("consumer")?,
        Err(_) => anyhow::bail!("consumer thread panicked"),
    }
    tracing::info!("aggregator stopped");
    Ok(())
}
