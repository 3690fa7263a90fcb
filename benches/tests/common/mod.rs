//! Running a bench binary as a child with a deadline, its output kept for the failure
//! message.
#![allow(dead_code, unreachable_pub)]

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// A bench run finished successfully: its output, and its scratch folder (removed on drop).
pub struct Run {
    pub dir: PathBuf,
    pub output: String,
}

impl Drop for Run {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl Run {
    /// The JSON summary written by `--json <dir>/summary.json`.
    pub fn summary(&self) -> serde_json::Value {
        let text = std::fs::read_to_string(self.dir.join("summary.json")).expect("summary written");
        serde_json::from_str(&text).expect("summary is JSON")
    }
}

/// Runs `bin` with `args`; `{json}` in an argument stands for the summary file's path.
/// Panics with the output if it fails or outlives `limit`.
pub fn run(bin: &Path, args: &[&str], limit: Duration) -> Run {
    let name = bin
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or("bench")
        .to_owned();
    let dir = std::env::temp_dir().join(format!("{name}-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let json = dir.join("summary.json");
    let log_path = dir.join("output.log");
    let log = std::fs::File::create(&log_path).expect("log file");
    let args: Vec<String> = args
        .iter()
        .map(|a| a.replace("{json}", &json.to_string_lossy()))
        .collect();
    let mut child = Command::new(bin)
        .args(&args)
        .stdin(Stdio::null())
        .stdout(log.try_clone().expect("log handle"))
        .stderr(log)
        .spawn()
        .unwrap_or_else(|e| panic!("start {name}: {e}"));
    let deadline = Instant::now() + limit;
    let output = || std::fs::read_to_string(&log_path).unwrap_or_default();
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait for the bench") {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "{name} {} still running after {} s:\n{}",
                args.join(" "),
                limit.as_secs(),
                output()
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    assert!(
        status.success(),
        "{name} {} failed: {status}\n{}",
        args.join(" "),
        output()
    );
    Run {
        output: output(),
        dir,
    }
}
