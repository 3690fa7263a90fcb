//! Runs SQL on current ClickHouse: `schemas/check_current_clickhouse.py` applies every
//! migration through chdb (today's ClickHouse engine, in process), then the given
//! statements, and returns their rows. The services' SQL must hold there as well as on the
//! local 18.16 server; the tests of both crates that write SQL check it with this.

use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::process::Command;

/// What the check printed, and each statement's rows (fields as ClickHouse writes TSV).
#[derive(Debug)]
pub struct Checked {
    pub stdout: String,
    pub results: BTreeMap<String, Vec<Vec<String>>>,
}

/// Runs `statements` (name, SQL), in order, after the migrations, with `python` (the test
/// virtualenv's, which has chdb). An error holds everything the check printed.
pub fn run(python: &OsStr, statements: &[(String, String)]) -> Result<Checked, String> {
    let schemas = crate::migrate::default_dir();
    let queries: Vec<serde_json::Value> = statements
        .iter()
        .map(|(name, sql)| serde_json::json!({"name": name, "sql": sql}))
        .collect();
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    let file = std::env::temp_dir().join(format!("tally-chdb-{}-{nanos}.json", std::process::id()));
    let json = serde_json::to_vec(&queries).map_err(|e| e.to_string())?;
    std::fs::write(&file, json).map_err(|e| format!("{}: {e}", file.display()))?;
    let out = Command::new(python)
        .arg(schemas.join("../check_current_clickhouse.py"))
        .arg(&schemas)
        .arg(&file)
        .output();
    let _ = std::fs::remove_file(&file);
    let out = out.map_err(|e| format!("running {}: {e}", python.to_string_lossy()))?;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr);
        return Err(format!("chdb check failed:\n{stdout}\n{stderr}"));
    }
    let json = stdout
        .lines()
        .find_map(|l| l.strip_prefix("results "))
        .ok_or_else(|| format!("no results line:\n{stdout}"))?;
    let results = serde_json::from_str(json).map_err(|e| format!("{e}:\n{stdout}"))?;
    Ok(Checked { stdout, results })
}
