//! The quota service's Prometheus metrics, declared in one place.

use metrics::{describe_counter, describe_gauge, describe_histogram, Unit};
use metrics_exporter_prometheus::PrometheusHandle;

pub(crate) const CHECKS: &str = "tally_quota_checks_total";
pub(crate) const CHECK_DURATION: &str = "tally_quota_check_duration_seconds";
pub(crate) const BATCH_DURATION: &str = "tally_quota_batch_duration_seconds";
pub(crate) const FALLBACKS: &str = "tally_quota_fallback_activations_total";
pub(crate) const REDIS_UP: &str = "tally_quota_redis_up";
pub(crate) const REDIS_ERRORS: &str = "tally_quota_redis_errors_total";
pub(crate) const CACHE_FETCHES: &str = "tally_quota_subscription_fetches_total";
pub(crate) const INVALIDATIONS: &str = "tally_quota_invalidations_total";
pub(crate) const FED_EVENTS: &str = "tally_quota_fed_events_total";
pub(crate) const RECONCILE_DRIFT: &str = "tally_quota_reconcile_drift_units";
pub(crate) const RECONCILE_REPAIRS: &str = "tally_quota_reconcile_repairs_total";
pub(crate) const HTTP_REQUESTS: &str = "tally_quota_http_requests_total";

/// The process-wide Prometheus recorder, installed on first use.
pub fn prometheus() -> &'static PrometheusHandle {
    tally_service::prometheus(&[], describe)
}

fn describe() {
    describe_counter!(
        CHECKS,
        "Quota checks answered, by outcome (allowed, refused) and source (redis, fallback, unlimited, denied)"
    );
    describe_histogram!(CHECK_DURATION, Unit::Seconds, "Latency of one check");
    describe_histogram!(
        BATCH_DURATION,
        Unit::Seconds,
        "Latency of one pipelined batch of checks"
    );
    describe_counter!(
        FALLBACKS,
        "Checks answered without Redis, by meter and policy (open, closed)"
    );
    describe_gauge!(REDIS_UP, "1 while the last Redis round trip succeeded");
    describe_counter!(REDIS_ERRORS, "Failed Redis round trips, by kind");
    describe_counter!(
        CACHE_FETCHES,
        "Subscription timelines read from the store, by outcome"
    );
    describe_counter!(
        INVALIDATIONS,
        "Cached subscriptions dropped on entitlement-change notifications"
    );
    describe_counter!(
        FED_EVENTS,
        "Ingested events counted into quota counters, by outcome (counted, duplicate, skipped)"
    );
    describe_gauge!(
        RECONCILE_DRIFT,
        "Sum of |Redis − ClickHouse| over the counters of the last reconciliation, by meter"
    );
    describe_counter!(
        RECONCILE_REPAIRS,
        "Counters repaired by reconciliation, by meter"
    );
    describe_counter!(HTTP_REQUESTS, "HTTP requests answered, by route and status");
}
