//! The rater's Prometheus metrics, declared in one place. Invoice runs count into them
//! wherever they run; `tally-rater serve` exports them on `/metrics`.

use metrics::{describe_counter, describe_gauge, describe_histogram, Unit};
use metrics_exporter_prometheus::PrometheusHandle;

pub(crate) const INVOICES: &str = "tally_rater_invoices_total";
pub(crate) const PUBLISHED_LINES: &str = "tally_rater_published_lines_total";
pub(crate) const BATCH_DURATION: &str = "tally_rater_batch_duration_seconds";
pub(crate) const PREVIEW_DURATION: &str = "tally_rater_preview_duration_seconds";
pub(crate) const HTTP_REQUESTS: &str = "tally_rater_http_requests_total";
pub(crate) const FINAL_RUNS: &str = "tally_rater_scheduled_final_runs_total";
pub(crate) const FINAL_RUN_LAST_SUCCESS: &str = "tally_rater_scheduled_final_last_success_seconds";

/// The process-wide Prometheus recorder, installed on first use.
pub fn prometheus() -> &'static PrometheusHandle {
    tally_service::prometheus(&[], describe)
}

fn describe() {
    describe_counter!(
        INVOICES,
        "Invoices by run mode (preview, final) and outcome (priced, written, already_final, refused)"
    );
    describe_counter!(
        PUBLISHED_LINES,
        "Final invoice lines published to the invoice-lines topic"
    );
    describe_histogram!(
        BATCH_DURATION,
        Unit::Seconds,
        "Time to price (preview) or store (final) one batch of customers, its reads included, by mode"
    );
    describe_histogram!(
        PREVIEW_DURATION,
        Unit::Seconds,
        "Latency of one customer's invoice preview over HTTP"
    );
    describe_counter!(HTTP_REQUESTS, "HTTP requests answered, by route and status");
    describe_counter!(
        FINAL_RUNS,
        "Scheduled final runs of one tenant, by outcome (ok, failed)"
    );
    describe_gauge!(
        FINAL_RUN_LAST_SUCCESS,
        Unit::Seconds,
        "Unix time of the last scheduled pass in which every tenant's final run succeeded"
    );
}
