//! What putting a flush's events in `events_raw`'s order costs the aggregator.
//!
//! One flush of the aggregator bench's shape: 125,000 event rows from 8 partitions' batches
//! (3,000 customers, four event types, times over four hours). The baseline, in the same
//! run, assembles the same rows into the insert's block in arrival order, as flushes did
//! before they were sorted; the other assembles it sorted.

use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use tally_aggregator::ledger::{Body, Columns, LedgerRow, KIND_EVENT};

const ROWS: usize = 125_000;

fn parts() -> Vec<Columns> {
    let mut parts: Vec<Columns> = (0..8).map(|_| Columns::default()).collect();
    for i in 0..ROWS {
        LedgerRow {
            kind: KIND_EVENT,
            tenant: "demo".into(),
            customer: format!("customer-{:05}", (i * 7919) % 3000),
            id: format!("run-1764040000-{i}"),
            event_type: ["request", "completion", "storage", "login"][i % 4].into(),
            time: 1_764_000_000 + ((i * 7) % 14_400) as u32,
            time_nanos: 123_456_789,
            received_at: 1_764_014_400,
            data: r#"{"tokens":1234,"model":"large"}"#.into(),
            kafka_partition: (i % 8) as u32,
            kafka_offset: i as u64,
            ..LedgerRow::default()
        }
        .encode(&mut parts[i % 8]);
    }
    parts
}

fn bench(c: &mut Criterion) {
    let parts = parts();
    let mut g = c.benchmark_group("flush_block");
    g.throughput(Throughput::Elements(ROWS as u64));
    g.sample_size(20);
    // Each part's rows handed to the body the one way or the other, then the block.
    let assemble = |add: fn(&mut Body, Columns)| {
        move |parts: Vec<Columns>| {
            let mut body = Body::default();
            for p in parts {
                add(&mut body, p);
            }
            body.into_chunks()
        }
    };
    g.bench_function("baseline_arrival_order", |b| {
        b.iter_batched(
            || parts.clone(),
            assemble(Body::append_unordered),
            BatchSize::LargeInput,
        )
    });
    g.bench_function("table_order", |b| {
        b.iter_batched(
            || parts.clone(),
            assemble(Body::append),
            BatchSize::LargeInput,
        )
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
