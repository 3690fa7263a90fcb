//! The aggregator's Prometheus metrics, declared in one place.

use metrics::{describe_counter, describe_gauge, describe_histogram, Unit};
use metrics_exporter_prometheus::PrometheusHandle;

pub(crate) const RECORDS: &str = "tally_aggregator_records_total";
pub(crate) const DEAD_LETTERED: &str = "tally_aggregator_dead_lettered_total";
pub(crate) const FLUSH_ROWS: &str = "tally_aggregator_flush_rows";
pub(crate) const FLUSH_RECORDS: &str = "tally_aggregator_flush_records";
pub(crate) const FLUSH_DURATION: &str = "tally_aggregator_flush_duration_seconds";
pub(crate) const CLICKHOUSE_ERRORS: &str = "tally_aggregator_clickhouse_errors_total";
pub(crate) const CONSUMER_LAG: &str = "tally_aggregator_consumer_lag_records";
pub(crate) const PARTITIONS: &str = "tally_aggregator_assigned_partitions";
pub(crate) const DEDUPE_IDS: &str = "tally_aggregator_dedupe_ids";
pub(crate) const REBALANCES: &str = "tally_aggregator_rebalances_total";
pub(crate) const USAGE_DURATION: &str = "tally_aggregator_usage_query_duration_seconds";
pub(crate) const HTTP_REQUESTS: &str = "tally_aggregator_http_requests_total";

const SIZE_BUCKETS: &[f64] = &[1.0, 10.0, 100.0, 1_000.0, 10_000.0, 100_000.0, 1_000_000.0];

/// The process-wide Prometheus recorder, installed on first use.
pub fn prometheus() -> &'static PrometheusHandle {
    tally_service::prometheus(&[("tally_aggregator_flush_r", SIZE_BUCKETS)], describe)
}

fn describe() {
    describe_counter!(
        RECORDS,
        "Records read, by outcome (counted, duplicate, dead_letter)"
    );
    describe_counter!(
        DEAD_LETTERED,
        "Records sent to the dead-letter topic, by reason"
    );
    describe_histogram!(
        FLUSH_ROWS,
        "Rows in one flush insert (events, rollup deltas, checkpoints)"
    );
    describe_histogram!(FLUSH_RECORDS, "Kafka records covered by one flush");
    describe_histogram!(FLUSH_DURATION, Unit::Seconds, "Time of one flush insert");
    describe_counter!(
        CLICKHOUSE_ERRORS,
        "Failed ClickHouse operations, by operation"
    );
    describe_gauge!(
        CONSUMER_LAG,
        "Records behind the partition's high watermark, by partition"
    );
    describe_gauge!(PARTITIONS, "Partitions assigned to this instance");
    describe_gauge!(
        DEDUPE_IDS,
        "Event ids held for dedupe, all assigned partitions"
    );
    describe_counter!(REBALANCES, "Partitions assigned or revoked, by kind");
    describe_histogram!(USAGE_DURATION, Unit::Seconds, "Usage query latency");
    describe_counter!(HTTP_REQUESTS, "HTTP requests answered, by route and status");
}
