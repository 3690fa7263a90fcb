//! `tally-load --quick` end to end: private brokers, the collector child, every phase. It
//! asserts only that the run completes and measures something; speed is the bench's
//! business, never a test's.

mod common;

use std::path::Path;
use std::time::Duration;

#[test]
fn quick_run_completes_and_reports_positive_rates() {
    // Bounded: a first run may also build tally-ingest, hence more than the quick run needs.
    let run = common::run(
        Path::new(env!("CARGO_BIN_EXE_tally-load")),
        &["--quick", "--saturate", "16", "--json", "{json}"],
        Duration::from_secs(600),
    );
    let summary = run.summary();
    let figures = summary["figures"].as_array().expect("figures");
    let brokers: Vec<(&str, &str)> = figures
        .iter()
        .map(|f| {
            (
                f["figure"].as_str().expect("figure name"),
                f["broker"].as_str().expect("broker"),
            )
        })
        .collect();
    assert_eq!(
        brokers,
        [
            ("batched POSTs vs raw produce", "memory"),
            ("one event per POST vs bare hyper", "memory"),
            ("one event per POST vs bare hyper, saturated", "memory"),
            ("batched POSTs vs raw produce", "sqlite"),
        ]
    );
    for f in figures {
        for side in ["baseline", "collector", "ratio"] {
            let rate = f[side].as_f64().expect("a number");
            assert!(rate > 0.0, "{side} of {f} is not positive");
        }
    }
    let rss = summary["collector_peak_rss"].as_array().expect("rss");
    assert_eq!(rss.len(), 2);
    assert!(rss.iter().all(|r| r["bytes"].as_u64() > Some(0)), "{rss:?}");
}
