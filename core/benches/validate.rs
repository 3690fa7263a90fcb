//! Parsing and validation cost per event, for single events and batches.

use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use tally_core::body::split;
use tally_core::{BodyFormat, Config, Dialect, Tenant, Validator};

fn batch(n: usize) -> Vec<u8> {
    let events: Vec<String> = (0..n)
        .map(|i| {
            format!(
                r#"{{"id":"evt-{i:08}","customer":"cust-{}","type":"completion","time":"2026-11-24T11:{:02}:00Z","data":{{"tokens":{},"model":"gpt-{}"}}}}"#,
                i % 100,
                i % 60,
                i * 7 % 5000,
                i % 3
            )
        })
        .collect();
    format!("[{}]", events.join(",")).into_bytes()
}

fn bench(c: &mut Criterion) {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../config/tally.dev.toml");
    let config =
        Config::parse(&std::fs::read_to_string(&path).expect("config"), &path).expect("parse");
    let catalog = config.catalog();
    let v = Validator {
        catalog: &catalog,
        limits: &config.validation,
        dialect: Dialect::Native,
    };
    let tenant = Tenant {
        id: "demo".into(),
        strict: true,
    };
    let now = time::macros::datetime!(2026-11-24 12:00:00 UTC);

    // Baseline in the same run: parsing the same body into a JSON tree and nothing else.
    let mut base = c.benchmark_group("baseline_json_parse");
    for n in [1usize, 100, 1000] {
        let body = batch(n);
        base.throughput(Throughput::Elements(n as u64));
        base.bench_function(format!("batch_{n}"), |b| {
            b.iter(|| serde_json::from_slice::<serde_json::Value>(&body).expect("json"))
        });
    }
    base.finish();

    let mut g = c.benchmark_group("ingest_parse_validate");
    for n in [1usize, 100, 1000] {
        let body = batch(n);
        g.throughput(Throughput::Elements(n as u64));
        g.bench_function(format!("batch_{n}"), |b| {
            b.iter_batched(
                || body.clone(),
                |body| {
                    let candidates = split(&body, BodyFormat::Json, 10_000).expect("body");
                    let (ok, refused) = v.validate_batch(candidates, &tenant, now);
                    assert!(refused.is_empty());
                    ok.into_iter().map(|r| r.to_json().len()).sum::<usize>()
                },
                BatchSize::SmallInput,
            )
        });
    }
    g.finish();

    // What the collector runs: the split and validation straight to record bytes.
    let mut e = c.benchmark_group("ingest_encode_body");
    for n in [1usize, 100, 1000] {
        let body = batch(n);
        e.throughput(Throughput::Elements(n as u64));
        e.bench_function(format!("batch_{n}"), |b| {
            b.iter(|| {
                let (ok, refused) = v
                    .encode_body(&body, BodyFormat::Json, 10_000, &tenant, now)
                    .expect("body");
                assert!(refused.is_empty());
                ok.into_iter().map(|r| r.payload().len()).sum::<usize>()
            })
        });
    }
    e.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
