//! `tally-aggbench --quick` end to end: a private broker and ClickHouse, the bare, DIY and
//! aggregator drains, the usage query, freshness through the collector on the stack's
//! broker. It asserts only that the run completes and measures something; speed is the
//! bench's business, never a test's.

mod common;

use std::path::Path;
use std::time::Duration;

#[test]
fn quick_run_completes_and_reports_positive_figures() {
    // Bounded: a first run may also build tally-aggregator and tally-ingest.
    let run = common::run(
        Path::new(env!("CARGO_BIN_EXE_tally-aggbench")),
        &["--quick", "--json", "{json}"],
        Duration::from_secs(900),
    );
    let summary = run.summary();
    let positive = |v: &serde_json::Value, what: &str| {
        let x = v
            .as_f64()
            .unwrap_or_else(|| panic!("{what} is not a number: {summary}"));
        assert!(x > 0.0 && x.is_finite(), "{what} is {x}: {summary}");
    };
    let brokers = summary["brokers"].as_array().expect("brokers");
    assert_eq!(brokers.len(), 1, "{summary}");
    for b in brokers {
        assert_eq!(b["storage"], "memory");
        for field in [
            "bare_events_per_s",
            "bare_same_settings_events_per_s",
            "aggregator_events_per_s",
            "aggregator_events_per_s_since_spawn",
            "throughput_ratio",
            "diy_cpu_s_per_m",
            "aggregator_cpu_s_per_m",
            "cost_ratio",
        ] {
            positive(&b[field], field);
        }
    }
    let freshness = &summary["freshness"];
    assert_eq!(freshness["missing"], 0, "{summary}");
    assert!(freshness["visible"].as_u64() > Some(0), "{summary}");
    positive(&freshness["p50_ms"], "freshness p50");
    positive(&freshness["p99_ms"], "freshness p99");
    let query = &summary["query"];
    assert_eq!(query["rows"], 720, "{summary}");
    for field in ["api_p50_ms", "api_p99_ms", "direct_p50_ms", "direct_p99_ms"] {
        positive(&query[field], field);
    }
}
