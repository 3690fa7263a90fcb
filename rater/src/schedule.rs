//! Final invoices on a schedule, inside `tally-rater serve`: every `rater.final_every_secs`
//! (and once at start), for every tenant of the configuration, each customer's latest
//! period that closed `rater.final_grace_hours` ago or more is finalized, stored and
//! published ([`InvoiceRun::finalize_closed`]), and so are up to
//! `rater.final_catch_up_periods` periods before it that are not final yet, oldest first.
//! Invoices final and published already are found by one query of ids per period
//! generation and not read again, so a tick where nothing closed costs one read of the
//! change log and those queries per tenant.
//!
//! A tenant whose run fails (ClickHouse or the broker down) is logged, counted, and run
//! again at the next tick: final runs are idempotent, and one killed midway (or stopped
//! with the service) is finished by the next. A rater down over several period ends
//! finalizes the missed periods when it is back, as long as they are within the catch-up;
//! older ones need `tally-rater invoice --mode final --at`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tally_core::Config;
use time::OffsetDateTime;
use tokio::sync::watch;

use crate::kafka::Notifier;
use crate::metrics::{FINAL_RUNS, FINAL_RUN_LAST_SUCCESS};
use crate::plan::Catalog;
use crate::run::{ClosedRun, InvoiceRun, RunError};
use crate::store::SubscriptionStore;
use crate::usage::UsageReader;

/// Customers per batch of a scheduled run.
const BATCH: usize = 10_000;

pub struct Schedule {
    run: InvoiceRun,
    store: SubscriptionStore,
    plans: Arc<Catalog>,
    tenants: Vec<String>,
    every: Duration,
    grace: time::Duration,
    catch_up: usize,
}

impl Schedule {
    /// The schedule of `config`, or `None` when `rater.final_every_secs` is 0.
    pub fn from_config(config: &Config, plans: Arc<Catalog>) -> crate::Result<Option<Schedule>> {
        if config.rater.final_every_secs == 0 {
            return Ok(None);
        }
        let reader = UsageReader::new(
            &config.clickhouse,
            config.catalog(),
            config.validation.max_dimension_chars,
        );
        let publisher = Notifier::new(&config.kafka, &config.rater.invoice_topic)?;
        Ok(Some(Schedule {
            run: InvoiceRun::new(&config.clickhouse, reader).with_publisher(publisher),
            store: SubscriptionStore::new(&config.clickhouse),
            plans,
            tenants: config.tenants.iter().map(|t| t.id.clone()).collect(),
            every: Duration::from_secs(config.rater.final_every_secs),
            grace: time::Duration::hours(config.rater.final_grace_hours as i64),
            catch_up: config.rater.final_catch_up_periods,
        }))
    }

    /// One pass over every tenant at `now`; each tenant's outcome.
    pub async fn tick(&self, now: OffsetDateTime) -> Vec<(String, Result<ClosedRun, RunError>)> {
        let mut out = Vec::with_capacity(self.tenants.len());
        for tenant in &self.tenants {
            let started = Instant::now();
            let result = self
                .run
                .finalize_closed(
                    &self.store,
                    &self.plans,
                    tenant,
                    now,
                    self.grace,
                    self.catch_up,
                    BATCH,
                )
                .await;
            match &result {
                Ok(r) => {
                    metrics::counter!(FINAL_RUNS, "outcome" => "ok").increment(1);
                    for (customer, reason) in &r.refused {
                        tracing::warn!(%tenant, %customer, %reason, "not invoiced");
                    }
                    tracing::info!(
                        %tenant,
                        written = r.written,
                        already_final = r.already_final,
                        skipped = r.skipped,
                        published = r.published,
                        published_lines = r.published_lines,
                        refused = r.refused.len(),
                        seconds = started.elapsed().as_secs_f64(),
                        "scheduled final run"
                    );
                }
                Err(e) => {
                    metrics::counter!(FINAL_RUNS, "outcome" => "failed").increment(1);
                    tracing::warn!(%tenant, error = %e, "scheduled final run failed; the next tick runs it again");
                }
            }
            out.push((tenant.clone(), result));
        }
        if out.iter().all(|(_, r)| r.is_ok()) {
            metrics::gauge!(FINAL_RUN_LAST_SUCCESS).set(now.unix_timestamp() as f64);
        }
        out
    }

    /// Ticks at once, then every period, until `stop` turns true. A tick under way when it
    /// does is dropped: the next start's tick finishes what it left.
    pub async fn run(self, mut stop: watch::Receiver<bool>) {
        tracing::info!(
            every_secs = self.every.as_secs(),
            grace_hours = self.grace.whole_hours(),
            catch_up_periods = self.catch_up,
            tenants = self.tenants.len(),
            "final invoices on a schedule"
        );
        loop {
            tokio::select! {
                _ = self.tick(OffsetDateTime::now_utc()) => {}
                _ = stop.wait_for(|s| *s) => {
                    tracing::info!("scheduled final run interrupted by shutdown");
                    return;
                }
            }
            tokio::select! {
                _ = tokio::time::sleep(self.every) => {}
                _ = stop.wait_for(|s| *s) => return,
            }
        }
    }
}
