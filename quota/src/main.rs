//! `tally-quota`: the quota service.
//!
//! - `tally-quota serve [--config FILE]`: `POST /v1/quota/check`, `/healthz`, `/readyz`,
//!   `/metrics` on `quota.listen`, with the entitlement-change listener and the feed that
//!   counts ingested events into the counters.
//!
//! - `tally-quota reconcile --tenant T [--repair] [--json] [--config FILE]`: compare the
//!   counters of meters counted from events with ClickHouse, print each discrepancy, and
//!   with `--repair` fix it. `serve` also does this (with repair) every
//!   `quota.reconcile_interval_secs`.
//!
//! `TALLY_CONFIG` names the file when `--config` is absent; `TALLY_LOG` sets the log filter,
//! `TALLY_LOG_FORMAT=json` switches to JSON lines.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tally_core::Config;
use tally_quota::http::{self, Api};
use tally_quota::reconcile::reconcile;
use tally_quota::{invalidate, Quota};

/// How long a difference must persist to count as drift.
const SETTLE: Duration = Duration::from_secs(3);

const USAGE: &str =
    "usage: tally-quota serve [--config FILE] | reconcile --tenant T [--repair] [--json] [--config FILE]";

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tally_service::init_logging();
    let mut args = std::env::args().skip(1);
    let command = args.next().unwrap_or_default();
    let mut path = None;
    let (mut tenant, mut repair, mut json) = (None, false, false);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--config" => path = Some(args.next().context("--config needs a file")?),
            "--tenant" => tenant = Some(args.next().context("--tenant needs a tenant id")?),
            "--repair" => repair = true,
            "--json" => json = true,
            other => anyhow::bail!("unknown argument {other:?}; {USAGE}"),
        }
    }
    let config = Config::load(path.as_deref().map(std::path::Path::new))?;
    match command.as_str() {
        "serve" => serve(config).await,
        "reconcile" => {
            let tenant = tenant.context("reconcile needs --tenant")?;
            anyhow::ensure!(
                config.tenants.iter().any(|t| t.id == tenant),
                "--tenant: no tenant {tenant:?} in the configuration"
            );
            let quota = Quota::from_config(&config)?;
            let report = reconcile(
                &quota,
                &config,
                &tenant,
                time::OffsetDateTime::now_utc(),
                SETTLE,
                repair,
            )
            .await?;
            if json {
                println!("{}", serde_json::to_string(&report)?);
            } else {
                println!(
                    "tenant {}: meters counted from events {:?}, {} customers, {} counters, {} drifting",
                    report.tenant,
                    report.meters,
                    report.customers,
                    report.counters,
                    report.drift.len()
                );
                for d in &report.drift {
                    println!(
                        "  {} {} {} [{} .. {}): redis {} clickhouse {}{}",
                        d.customer,
                        d.meter,
                        d.window,
                        d.start,
                        d.end,
                        d.redis,
                        d.clickhouse,
                        if d.repaired { " → repaired" } else { "" }
                    );
                }
            }
            Ok(())
        }
        _ => anyhow::bail!(USAGE),
    }
}

async fn serve(config: Config) -> anyhow::Result<()> {
    tally_quota::metrics::prometheus();
    let migrations = tally_aggregator::migrate::load(&tally_aggregator::migrate::default_dir())?;
    let mut backoff = Duration::from_millis(200);
    while let Err(e) = tally_aggregator::migrate::apply(&config.clickhouse, &migrations).await {
        anyhow::ensure!(e.is_retryable(), "applying migrations: {e}");
        tracing::warn!(error = %e, "cannot apply migrations yet; waiting");
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
    let periodic = tokio::spawn(reconcile_every(quota.clone(), config.clone(), stop.clone()));
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
    let _ = periodic.await;
    match feed.await {
        Ok(Err(e)) => tracing::error!(error = %e, "event feed stopped with an error"),
        Err(e) => tracing::error!(error = %e, "event feed panicked"),
        Ok(Ok(())) => {}
    }
    tracing::info!("quota service stopped");
    Ok(())
}

/// Reconciles (and repairs) every tenant every `quota.reconcile_interval_secs`.
async fn reconcile_every(
    quota: Arc<Quota>,
    config: tally_core::Config,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let secs = config.quota.reconcile_interval_secs;
    if secs == 0 {
        return;
    }
    loop {
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(secs)) => {}
            _ = stop.changed() => return,
        }
        for t in &config.tenants {
            let now = time::OffsetDateTime::now_utc();
            match reconcile(&quota, &config, &t.id, now, SETTLE, true).await {
                Ok(r) => {
                    tracing::info!(tenant = %t.id, customers = r.customers, counters = r.counters,
                    drift = r.drift.len(), "reconciled quota counters")
                }
                Err(e) => {
                    tracing::warn!(tenant = %t.id, error = %e, "reconciliation failed; next round retries")
                }
            }
        }
    }
}
