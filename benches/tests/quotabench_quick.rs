//! `tally-quotabench` with tiny settings on the stack's Redis and ClickHouse: every phase
//! runs once (redis-benchmark, the library pipelined and one at a time, the HTTP endpoint,
//! events through a collector into the counters) and the figures are printed. It asserts only that the run completes and reports; speed is
//! the bench's business, never a test's.

mod common;

use std::path::Path;
use std::time::Duration;

#[test]
fn tiny_run_completes_and_prints_every_figure() {
    let run = common::run(
        Path::new(env!("CARGO_BIN_EXE_tally-quotabench")),
        &[
            "--rounds",
            "1",
            "--checks",
            "2000",
            "--customers",
            "500",
            "--latency-checks",
            "200",
            "--latency-batches",
            "20",
            "--http-requests",
            "2000",
            "--fresh-events",
            "20",
            "--fresh-rate",
            "50",
            "--json",
            "{json}",
        ],
        Duration::from_secs(300),
    );
    for line in [
        "1. pipelined checks/s",
        "2a. single check, one at a time",
        "2b. batch of 100, one at a time",
        "3. POST /v1/quota/check",
        "target: pipelined library >= 0.50 x redis-benchmark:",
        "target: single check p99 < 1 ms:",
        "target: freshness (202 -> counted by the quota feed) p99 < 2000 ms:",
        "--- markdown for BENCHMARKS.md ---",
    ] {
        assert!(run.output.contains(line), "no {line:?} in:\n{}", run.output);
    }
    let summary = run.summary();
    let figures = summary["figures"].as_array().expect("figures");
    assert_eq!(figures.len(), 4, "{summary}");
    for f in figures {
        for side in ["baseline", "library"] {
            let rate = f[side]["rate"].as_f64().unwrap_or(f64::NAN);
            assert!(rate > 0.0 && rate.is_finite(), "{side} rate of {f}");
        }
        assert_eq!(f["library"]["failed"], 0, "{f}");
    }
    let fresh = &summary["freshness"];
    assert_eq!(fresh["sent"], 20, "{summary}");
    assert_eq!(
        fresh["counted"], 20,
        "every event accepted is counted: {summary}"
    );
}
