//! `tally-rater price`: the pure pricing command, run as a process. Its output for the golden
//! cases' inputs must be the golden files' bytes; its refusals name what is wrong.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn plan_file(plan: &str, version: u32) -> String {
    repo()
        .join(format!("config/plans/{plan}/v{version}.toml"))
        .to_string_lossy()
        .into_owned()
}

fn golden(name: &str) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/golden")
        .join(name);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Runs the binary with `args` and `stdin`, outside the repository (it must need no config).
fn rater(args: &[&str], stdin: &str) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_tally-rater"))
        .args(args)
        .current_dir(std::env::temp_dir())
        .env_remove("TALLY_CONFIG")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("tally-rater runs");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(stdin.as_bytes())
        .expect("stdin written");
    child.wait_with_output().expect("tally-rater exits")
}

fn stdout(out: &Output) -> String {
    assert!(
        out.status.success(),
        "exit {:?}: {}",
        out.status.code(),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout.clone()).expect("UTF-8")
}

fn refused(out: &Output, code: i32) -> String {
    assert_eq!(
        out.status.code(),
        Some(code),
        "stdout: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert!(out.stdout.is_empty(), "a refusal prints no invoice");
    String::from_utf8(out.stderr.clone()).expect("UTF-8")
}

#[test]
fn the_golden_cases_price_to_the_golden_bytes() {
    let starter = plan_file("starter", 1);
    let usage = r#"{"customer": "cus_starter", "period_start": "2025-01-01T00:00:00Z",
                    "usage": {"requests": 250000, "tokens": "1234567"}}"#;
    let out = rater(&["price", "--plan", &starter, "--usage", usage], "");
    assert_eq!(stdout(&out), golden("starter_full_month.json"));

    // Read from standard input: a subscription that starts 10 days before its period ends.
    let pro = plan_file("pro", 2);
    let usage = r#"{"customer": "cus_new", "anchor": "2025-01-01T00:00:00Z",
                    "subscription_start": "2025-04-21T00:00:00Z",
                    "usage": {"tokens": "100000", "storage_gb": "2", "active_users": 4}}"#;
    let out = rater(&["price", "--plan", &pro, "--usage", "-"], usage);
    assert_eq!(stdout(&out), golden("pro_v2_partial_period.json"));
}

#[test]
fn a_usage_file_and_csv_output() {
    let dir = std::env::temp_dir().join(format!("tally-price-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let usage = dir.join("usage.json");
    std::fs::write(
        &usage,
        r#"{"customer": "cus_light", "period_start": "2025-03-15T12:00:00Z",
            "usage": {"requests": 50000, "tokens": 1000000, "storage_gb": 8, "active_users": 3}}"#,
    )
    .expect("usage file");
    let pro = plan_file("pro", 1);
    let usage = usage.to_string_lossy().into_owned();
    let json = stdout(&rater(&["price", "--plan", &pro, "--usage", &usage], ""));
    assert_eq!(json, golden("pro_v1_invoice_minimum.json"));

    let csv = stdout(&rater(
        &[
            "price", "--plan", &pro, "--usage", &usage, "--format", "csv",
        ],
        "",
    ));
    let invoice: tally_rater::Invoice = serde_json::from_str(&json).expect("invoice JSON");
    assert_eq!(csv, invoice.to_csv());
    assert!(csv.lines().count() > invoice.lines.len(), "{csv}");

    // A plan file anywhere, named anyhow: the plan and version are the ones it states.
    let copy = dir.join("my plan.toml");
    std::fs::copy(&pro, &copy).expect("copy plan");
    let copy = copy.to_string_lossy().into_owned();
    let again = stdout(&rater(&["price", "--plan", &copy, "--usage", &usage], ""));
    assert_eq!(again, json);
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn refusals_name_what_is_wrong() {
    let pro = plan_file("pro", 2);
    let err = refused(
        &rater(
            &["price", "--plan", &pro, "--usage", r#"{"tokenz": 5}"#],
            "",
        ),
        1,
    );
    assert!(
        err.contains("usage.tokenz: plan \"pro\" v2 prices no such meter"),
        "{err}"
    );
    let err = refused(
        &rater(
            &["price", "--plan", &pro, "--usage", r#"{"tokens": "lots"}"#],
            "",
        ),
        1,
    );
    assert!(
        err.contains("--usage: tokens: \"lots\" is not an exact decimal"),
        "{err}"
    );

    let err = refused(&rater(&["price", "--plan", &pro], ""), 2);
    assert!(err.contains("price needs --usage"), "{err}");
    let err = refused(
        &rater(
            &["price", "--plan", &pro, "--usage", "{}", "--format", "xml"],
            "",
        ),
        2,
    );
    assert!(
        err.contains("--format: \"xml\" is not json or csv"),
        "{err}"
    );
    let err = refused(
        &rater(
            &["price", "--plan", "/nonexistent/v1.toml", "--usage", "{}"],
            "",
        ),
        1,
    );
    assert!(
        err.contains("--plan: reading /nonexistent/v1.toml"),
        "{err}"
    );

    // An invalid plan names its file, plan, version and field.
    let dir = std::env::temp_dir().join(format!("tally-price-bad-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let bad = dir.join("bad.toml");
    std::fs::write(
        &bad,
        "plan = \"bad\"\nversion = 3\ncurrency = \"USD\"\ninterval = \"weekly\"\n",
    )
    .expect("plan file");
    let bad = bad.to_string_lossy().into_owned();
    let err = refused(&rater(&["price", "--plan", &bad, "--usage", "{}"], ""), 1);
    assert!(
        err.contains(&format!(
            "{bad}: plan \"bad\" v3: interval: must be \"monthly\" or \"yearly\" (got \"weekly\")"
        )),
        "{err}"
    );
    std::fs::remove_dir_all(&dir).ok();
}
