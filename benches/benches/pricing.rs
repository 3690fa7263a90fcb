//! The pure pricing loop: a batch of customer-month invoices priced from usage in memory
//! (`run::price`), the same as `tally-ratebench`'s (the bench plan: a flat fee, five usage
//! charges with graduated tiers, an invoice minimum; `tally_bench::rate`). Baseline in the same run: writing
//! the same invoices as JSON, the least any output of them costs.

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use tally_bench::rate::{billable, plans, usage_of};
use tally_rater::run::{price, Billable};
use tally_rater::usage::UsageTable;
use tally_rater::{period_containing, Interval};
use time::macros::datetime;

// Pricing allocates and frees many small strings and vectors per batch; with glibc's
// allocator a batch's freed heap goes back to the kernel and is faulted in again for the
// next (measured on the pricing bench: 1.6x the time, and erratic).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

const BATCH: u64 = 10_000;

fn bench(c: &mut Criterion) {
    let plans = plans().expect("plans");
    let period = period_containing(
        datetime!(2026-10-01 0:00 UTC),
        Interval::Monthly,
        datetime!(2026-10-15 0:00 UTC),
    )
    .expect("period");
    let mut usage = UsageTable::new();
    let batch: Vec<Billable> = (0..BATCH)
        .map(|n| {
            let b = billable(n, period);
            usage.insert((b.customer.clone(), 0), usage_of(n));
            b
        })
        .collect();
    let invoices = price(&plans, &batch, &usage).invoices;
    assert_eq!(invoices.len() as u64, BATCH, "every customer priced");

    let mut g = c.benchmark_group("rater_pricing");
    g.throughput(Throughput::Elements(BATCH));
    g.bench_function("baseline_invoices_to_json", |b| {
        b.iter(|| {
            invoices
                .iter()
                .map(|i| serde_json::to_string(i).expect("json").len())
                .sum::<usize>()
        })
    });
    g.bench_function("price_batch", |b| {
        b.iter(|| price(&plans, &batch, &usage).invoices.len())
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
