//! The collector's Prometheus metrics, declared in one place.

use metrics::{describe_counter, describe_gauge, describe_histogram, Unit};
use metrics_exporter_prometheus::PrometheusHandle;

pub(crate) const HTTP_REQUESTS: &str = "tally_ingest_http_requests_total";
pub(crate) const HTTP_DURATION: &str = "tally_ingest_http_request_duration_seconds";
pub(crate) const EVENTS: &str = "tally_ingest_events_total";
pub(crate) const QUEUE_DEPTH: &str = "tally_ingest_producer_queue_messages";
pub(crate) const DELIVERY_DURATION: &str = "tally_ingest_delivery_duration_seconds";
pub(crate) const BROKER_UP: &str = "tally_ingest_broker_up";
pub(crate) const IN_FLIGHT: &str = "tally_ingest_http_requests_in_flight";

/// The process-wide Prometheus recorder, installed on first use.
pub fn prometheus() -> &'static PrometheusHandle {
    tally_service::prometheus(&[], describe)
}

fn describe() {
    describe_counter!(HTTP_REQUESTS, "HTTP requests answered, by route and status");
    describe_histogram!(
        HTTP_DURATION,
        Unit::Seconds,
        "HTTP request latency, by route"
    );
    describe_counter!(
        EVENTS,
        "Events by outcome (accepted, rejected, failed) and reason"
    );
    describe_gauge!(
        QUEUE_DEPTH,
        "Messages in the producer queue awaiting acknowledgement"
    );
    describe_histogram!(
        DELIVERY_DURATION,
        Unit::Seconds,
        "Time from enqueuing a request's events to the broker's last acknowledgement"
    );
    describe_gauge!(IN_FLIGHT, "Event requests being handled");
    describe_gauge!(BROKER_UP, "1 when the last broker metadata probe succeeded");
}
