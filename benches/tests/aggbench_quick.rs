//! `tally-aggbench --quick` end to end: a private broker and ClickHouse, the bare, DIY and
//! aggregator drains, the usage query, freshness through the collector on the stack's
//! broker. It asserts only that the run completes and measures something; speed is the
//! bench's business, never a test's.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

#[test]
fn quick_run_completes_and_reports_positive_figures() {
    let dir = std::env::temp_dir().join(format!("tally-aggbench-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let json = dir.join("summary.json");
    let log_path = dir.join("output.log");
    let log = std::fs::File::create(&log_path).expect("log file");
    let mut child = Command::new(env!("CARGO_BIN_EXE_tally-aggbench"))
        .arg("--quick")
        .arg("--json")
        .arg(&json)
        .stdin(Stdio::null())
        .stdout(log.try_clone().expect("log handle"))
        .stderr(log)
        .spawn()
        .expect("start tally-aggbench");
    // Bounded: a first run may also build tally-aggregator and tally-ingest.
    let deadline = Instant::now() + Duration::from_secs(900);
    let output = || std::fs::read_to_string(&log_path).unwrap_or_default();
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait for tally-aggbench") {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "tally-aggbench --quick still running after 900 s:\n{}",
                output()
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    assert!(
        status.success(),
        "tally-aggbench --quick failed: {status}\n{}",
        output()
    );

    let text = std::fs::read_to_string(&json).expect("summary written");
    let summary: serde_json::Value = serde_json::from_str(&text).expect("summary is JSON");
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
    let _ = std::fs::remove_dir_all(&dir);
}
