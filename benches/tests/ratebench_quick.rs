//! `tally-ratebench --quick` end to end on the stack's ClickHouse: 20,000 subscriptions and
//! their rollups, invoiced by the pure pricing loop, by the whole run from ClickHouse and by
//! a final run that stores them (twice: the second writes nothing). The bench itself fails
//! when they disagree (count, subtotals, totals); this checks it completes and reports all. Speed is the bench's business, never a test's.

mod common;

use std::path::Path;
use std::time::Duration;

#[test]
fn quick_run_invoices_every_customer_the_same_both_ways() {
    let run = common::run(
        Path::new(env!("CARGO_BIN_EXE_tally-ratebench")),
        &["--quick"],
        Duration::from_secs(600),
    );
    assert!(
        run.output.contains("invoices agree: 20000 with subtotals"),
        "{}",
        run.output
    );
    assert!(run.output.contains("pure pricing loop"), "{}", run.output);
    assert!(run.output.contains("whole run"), "{}", run.output);
    for line in [
        "final run 1: ",
        "(20000 invoices written, 0 already final;",
        "(0 invoices written, 20000 already final;",
    ] {
        assert!(run.output.contains(line), "no {line:?} in:\n{}", run.output);
    }
}
