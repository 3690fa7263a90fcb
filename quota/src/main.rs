//! `tally-quota`: the quota service.
//!
//! - `tally-quota serve [--config FILE]`: `POST /v1/quota/check`, `/healthz`, `/readyz`,
//!   `/metrics` on `quota.listen`, with the entitlement-change listener and the feed that
//!   counts ingested events into the counters.
//!
//! `TALLY_CONFIG` names the file when `--config` is absent; `TALLY_LOG` sets the log filter,
//! `TALLY_LOG_FORMAT=json` switches to JSON lines.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tally_core::Config;
use tally_quota::http::{self, Api};
use tally_quota::{invalidate, Quota};

const USAGE: &str = "usage: tally-quota serve [--config FILE]";

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tally_service::init_logging();
    let mut args = std::env::args().skip(1);
    let command = args.next().unwrap_or_default();
    let mut path = None;
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--config" => path = Some(args.next().context("--config needs a file")?),
            other => anyhow::bail!("unknown argument {other:?}; {USAGE}"),
        }
    }
    let config = Config::load(path.as_deref().map(std::path::Path::new))?;
    match command.as_str() {
        "serve" => serve(config).await,
        _ => anyhow::bail!(USAGE),
    }
}

async fn serve(config: Config) -> anyhow::Result<()> {
    tally_quota::metrics::prometheus();
    let migrations = tally_aggregator::migrate::load(&tally_aggregator::migrate::default_dir())?;
    let mut backoff = Duration::from_millis(200);
    while let Err(e) = tally_aggregator::migrate::apply(&config.clickhouse, &migrations).await {
        anyhow::ensure!(e.is_retryable(), "applying migrations: {e}");
        tracing::warn!(error = %e, "clickhouse unavailable; waiting to apply migrations");
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(5));
    }
    let quota = Arc::new(Quota::from_config(&config)?);
    if let Err(e) = quota.load_scripts().await {
        tracing::warn!(error = %e, "redis unavailable at start; checks follow each meter's policy until it answers");
    }
    let (stop_tx, stop) = tokio::sync::watch::channel(false);
    let listener = tokio::spawn(invalidate::listen(
        config.kafka.clone(),
        config.quota.entitlement_topic.clone(),
        quota.resolver().clone(),
        stop.clone(),
    ));
    let feed = tokio::spawn(tally_quota::feed::run(
        quota.clone(),
        config.clone(),
        stop.clone(),
    ));
    let api = Arc::new(Api::new(quota, config.tenants()));
    let (addr, http_task) = http::serve(&config.quota.listen, api, stop)
        .await
        .with_context(|| format!("listening on {}", config.quota.listen))?;
    tracing::info!(%addr, "quota API listening");
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
    tracing::info!("signal received: finishing in-flight checks");
    let _ = stop_tx.send(true);
    let _ = http_task.await;
    let _ = listener.await;
    match feed.await {
        Ok(Err(e)) => tracing::error!(error = %e, "event feed stopped with an error"),
        Err(e) => tracing::error!(error = %e, "event feed panicked"),
        Ok(Ok(())) => {}
    }
    tracing::info!("quota service stopped");
    Ok(())
}
