//! `tally-load --quick` end to end: private brokers, the collector child, every phase. It
//! asserts only that the run completes and measures something; speed is the bench's
//! business, never a test's.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

#[test]
fn quick_run_completes_and_reports_positive_rates() {
    let dir = std::env::temp_dir().join(format!("tally-load-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let json = dir.join("summary.json");
    let log_path = dir.join("output.log");
    let log = std::fs::File::create(&log_path).expect("log file");
    let mut child = Command::new(env!("CARGO_BIN_EXE_tally-load"))
        .arg("--quick")
        .arg("--json")
        .arg(&json)
        .stdin(Stdio::null())
        .stdout(log.try_clone().expect("log handle"))
        .stderr(log)
        .spawn()
        .expect("start tally-load");
    // Bounded: a first run may also build tally-ingest, hence more than the quick run needs.
    let deadline = Instant::now() + Duration::from_secs(600);
    let output = || std::fs::read_to_string(&log_path).unwrap_or_default();
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait for tally-load") {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!(
                "tally-load --quick still running after 600 s:\n{}",
                output()
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    assert!(
        status.success(),
        "tally-load --quick failed: {status}\n{}",
        output()
    );

    let text = std::fs::read_to_string(&json).expect("summary written");
    let summary: serde_json::Value = serde_json::from_str(&text).expect("summary is JSON");
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
    let _ = std::fs::remove_dir_all(&dir);
}
