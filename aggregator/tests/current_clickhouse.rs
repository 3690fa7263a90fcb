//! Every migration, run through chdb (today's ClickHouse engine in process) by
//! `schemas/check_current_clickhouse.py`: the SQL must hold on current ClickHouse as well as
//! on the local 18.16 server. `make test` provides the Python environment (`TALLY_PYTHON`).

use std::path::Path;
use std::process::Command;

#[test]
fn migrations_run_on_current_clickhouse() {
    let python = std::env::var("TALLY_PYTHON")
        .expect("TALLY_PYTHON names the test virtualenv's python; run the tests with `make test`");
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let out = Command::new(&python)
        .arg(root.join("schemas/check_current_clickhouse.py"))
        .arg(root.join("schemas/clickhouse"))
        .output()
        .expect("run the chdb check");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "chdb check failed:\n{stdout}\n{stderr}"
    );
    assert!(
        stdout.contains("migration file(s) on ClickHouse 2"),
        "{stdout}"
    );
}
