//! `tally-aggbench`'s results: a table for the terminal, a markdown block for
//! BENCHMARKS.md and a JSON summary (used by the smoke test).

use std::fmt::Write as _;

use crate::agg::consumers::{AGGREGATOR_FETCH_WAIT_MS, CEILING_FETCH_WAIT_MS};
use crate::report::{median, thousands};

/// The PRODUCT.md targets.
pub const THROUGHPUT_TARGET: f64 = 0.8;
pub const COST_TARGET: f64 = 0.5;
pub const FRESHNESS_P99_MS: f64 = 2000.0;
pub const QUERY_P99_MS: f64 = 50.0;

/// One reader draining the pre-filled topic once.
#[derive(Debug, Clone, Default)]
pub struct Run {
    pub records: u64,
    /// The drain: partitions assigned → last record read (bare), last insert acknowledged
    /// (DIY), or every checkpoint at the topic's end (aggregator).
    pub seconds: f64,
    /// Process spawned → the same end.
    pub since_spawn: f64,
    /// CPU seconds of the reader's process, spawn to end (plus the merge settle).
    pub cpu_process: f64,
    /// CPU seconds of the ClickHouse server over the same span.
    pub cpu_clickhouse: f64,
    /// CPU seconds of tansu over the same span (context: both pay it alike).
    pub cpu_broker: f64,
    /// Seconds waited after the end for ClickHouse's merges to finish.
    pub settle: f64,
    /// Flushes (aggregator) or inserts (DIY), and the seconds spent in them (aggregator).
    pub flushes: (u64, f64),
}

impl Run {
    pub fn rate(&self) -> f64 {
        self.records as f64 / self.seconds
    }

    pub fn rate_since_spawn(&self) -> f64 {
        self.records as f64 / self.since_spawn
    }

    /// Reader plus ClickHouse, CPU seconds per million records.
    pub fn cpu_per_million(&self) -> f64 {
        (self.cpu_process + self.cpu_clickhouse) / self.records as f64 * 1e6
    }

    fn per_million(&self, cpu: f64) -> f64 {
        cpu / self.records as f64 * 1e6
    }
}

fn med(runs: &[Run], f: impl Fn(&Run) -> f64) -> f64 {
    median(runs.iter().map(f).collect())
}

/// Figures 1 and 2 on one broker.
#[derive(Debug, Clone, Default)]
pub struct BrokerRuns {
    pub storage: &'static str,
    pub records: u64,
    pub retries: usize,
    pub prefill_rate: f64,
    /// The bare consumer at the broker's ceiling (`fetch.wait.max.ms` 1).
    pub bare: Vec<Run>,
    /// The bare consumer with the aggregator's fetch settings (`fetch.wait.max.ms` 100).
    pub bare_same: Vec<Run>,
    pub ours: Vec<Run>,
    pub diy: Vec<Run>,
}

impl BrokerRuns {
    pub fn throughput_ratio(&self) -> f64 {
        med(&self.ours, Run::rate) / med(&self.bare, Run::rate)
    }

    pub fn since_spawn_ratio(&self) -> f64 {
        med(&self.ours, Run::rate_since_spawn) / med(&self.bare, Run::rate)
    }

    /// Against a bare consumer fetching exactly as the aggregator does.
    pub fn same_settings_ratio(&self) -> f64 {
        med(&self.ours, Run::rate) / med(&self.bare_same, Run::rate)
    }

    pub fn cost_ratio(&self) -> f64 {
        med(&self.ours, Run::cpu_per_million) / med(&self.diy, Run::cpu_per_million)
    }

    fn round_ratios(&self, f: impl Fn(&Run, &Run) -> f64, other: &[Run]) -> String {
        self.ours
            .iter()
            .zip(other)
            .map(|(o, b)| format!("{:.2}", f(o, b)))
            .collect::<Vec<_>>()
            .join(", ")
    }

    fn throughput_rounds(&self) -> String {
        self.round_ratios(|o, b| o.rate() / b.rate(), &self.bare)
    }

    fn cost_rounds(&self) -> String {
        self.round_ratios(|o, d| o.cpu_per_million() / d.cpu_per_million(), &self.diy)
    }
}

/// Figure 3.
#[derive(Debug, Clone, Default)]
pub struct Freshness {
    pub sent: usize,
    /// Accepted → visible, sorted, in milliseconds.
    pub latencies_ms: Vec<f64>,
    /// Accepted but not visible by the deadline.
    pub missing: usize,
    /// Not accepted by the collector.
    pub refused: usize,
    pub per_second: f64,
    pub flush_interval_ms: u64,
    pub polls: usize,
}

/// Figure 4.
#[derive(Debug, Clone, Default)]
pub struct QueryLatency {
    pub hours: i64,
    pub rows: usize,
    pub api_ms: Vec<f64>,
    pub direct_ms: Vec<f64>,
}

/// The `q` quantile of sorted `xs` (nearest rank), NaN for none.
pub fn quantile(xs: &[f64], q: f64) -> f64 {
    if xs.is_empty() {
        return f64::NAN;
    }
    xs[((xs.len() - 1) as f64 * q).round() as usize]
}

#[derive(Debug, Clone, Default)]
pub struct AggReport {
    pub date: String,
    pub command: String,
    pub cpus: usize,
    pub cpu_model: String,
    pub broker_version: String,
    pub clickhouse: String,
    pub settings: String,
    pub brokers: Vec<BrokerRuns>,
    pub freshness: Option<Freshness>,
    pub query: Option<QueryLatency>,
    /// ClickHouse's own CPU while nothing of ours ran (cores), measured before the phases.
    pub clickhouse_idle_cores: f64,
}

/// Each reader of a broker run, named.
fn readers(b: &BrokerRuns) -> [(&'static str, &Vec<Run>); 4] {
    [
        ("bare consumer", &b.bare),
        ("bare, aggregator's fetch", &b.bare_same),
        ("aggregator", &b.ours),
        ("DIY pipeline", &b.diy),
    ]
}

fn verdict(pass: bool) -> &'static str {
    if pass {
        "pass"
    } else {
        "FAIL"
    }
}

/// One headline row: figure, broker, baseline, ours, ratio, target, result.
struct Row {
    figure: String,
    broker: String,
    baseline: String,
    ours: String,
    ratio: String,
    rounds: String,
    target: String,
    pass: bool,
}

impl AggReport {
    fn rows(&self) -> Vec<Row> {
        let mut rows = Vec::new();
        for b in &self.brokers {
            let ratio = b.throughput_ratio();
            rows.push(Row {
                figure: "1. throughput: aggregator vs bare consumer".into(),
                broker: b.storage.into(),
                baseline: format!(
                    "{} events/s (fetch.wait.max.ms {}); with the aggregator's {} ms: {} events/s",
                    thousands(med(&b.bare, Run::rate)),
                    CEILING_FETCH_WAIT_MS,
                    AGGREGATOR_FETCH_WAIT_MS,
                    thousands(med(&b.bare_same, Run::rate)),
                ),
                ours: format!(
                    "{} events/s (from spawn {}); {:.2} of the bare consumer at {} ms",
                    thousands(med(&b.ours, Run::rate)),
                    thousands(med(&b.ours, Run::rate_since_spawn)),
                    b.same_settings_ratio(),
                    AGGREGATOR_FETCH_WAIT_MS,
                ),
                ratio: format!("{ratio:.2}"),
                rounds: b.throughput_rounds(),
                target: format!(">= {THROUGHPUT_TARGET:.2}"),
                pass: ratio >= THROUGHPUT_TARGET,
            });
            let ratio = b.cost_ratio();
            rows.push(Row {
                figure: "2. cost: aggregator vs DIY, CPU s per M events".into(),
                broker: b.storage.into(),
                baseline: format!("{:.2} CPU s/M", med(&b.diy, Run::cpu_per_million)),
                ours: format!("{:.2} CPU s/M", med(&b.ours, Run::cpu_per_million)),
                ratio: format!("{ratio:.2}"),
                rounds: b.cost_rounds(),
                target: format!("<= {COST_TARGET:.2}"),
                pass: ratio <= COST_TARGET,
            });
        }
        if let Some(f) = &self.freshness {
            let p99 = quantile(&f.latencies_ms, 0.99);
            rows.push(Row {
                figure: "3. freshness: 202 → visible in /v1/usage".into(),
                broker: "sqlite (stack)".into(),
                baseline: format!("flush interval {} ms", f.flush_interval_ms),
                ours: format!(
                    "p50 {:.0} ms, p99 {:.0} ms, max {:.0} ms",
                    quantile(&f.latencies_ms, 0.5),
                    p99,
                    quantile(&f.latencies_ms, 1.0)
                ),
                ratio: format!(
                    "{:.2}",
                    quantile(&f.latencies_ms, 0.5) / f.flush_interval_ms as f64
                ),
                rounds: String::new(),
                target: format!("p99 < {FRESHNESS_P99_MS:.0} ms"),
                pass: p99 < FRESHNESS_P99_MS && f.missing == 0 && !f.latencies_ms.is_empty(),
            });
        }
        if let Some(q) = &self.query {
            let p99 = quantile(&q.api_ms, 0.99);
            rows.push(Row {
                figure: format!("4. usage query, {} hourly windows", q.rows),
                broker: self.brokers.first().map_or("-", |b| b.storage).into(),
                baseline: format!(
                    "same SQL direct: p50 {:.2} ms, p99 {:.2} ms",
                    quantile(&q.direct_ms, 0.5),
                    quantile(&q.direct_ms, 0.99)
                ),
                ours: format!(
                    "GET /v1/usage: p50 {:.2} ms, p99 {:.2} ms",
                    quantile(&q.api_ms, 0.5),
                    p99
                ),
                ratio: format!(
                    "{:.2}",
                    quantile(&q.api_ms, 0.5) / quantile(&q.direct_ms, 0.5)
                ),
                rounds: String::new(),
                target: format!("p99 < {QUERY_P99_MS:.0} ms"),
                pass: p99 < QUERY_P99_MS,
            });
        }
        rows
    }

    pub fn all_pass(&self) -> bool {
        self.rows().iter().all(|r| r.pass)
    }

    /// The terminal table.
    pub fn table(&self) -> String {
        let mut t = String::new();
        let _ = writeln!(
            t,
            "tally-aggbench: {} on {} x {}; broker {}; ClickHouse {}",
            self.date, self.cpus, self.cpu_model, self.broker_version, self.clickhouse
        );
        let _ = writeln!(t, "command: {}", self.command);
        let _ = writeln!(t, "settings: {}", self.settings);
        let _ = writeln!(t);
        let rows = self.rows();
        for r in &rows {
            let _ = writeln!(t, "{} [{}]", r.figure, r.broker);
            let _ = writeln!(t, "    baseline  {}", r.baseline);
            let _ = writeln!(t, "    ours      {}", r.ours);
            let rounds = if r.rounds.is_empty() {
                String::new()
            } else {
                format!(" (rounds {})", r.rounds)
            };
            let _ = writeln!(
                t,
                "    ratio     {}{rounds}   target {}   {}",
                r.ratio,
                r.target,
                verdict(r.pass)
            );
        }
        let met = rows.iter().filter(|r| r.pass).count();
        let _ = writeln!(t, "targets met: {met} of {}", rows.len());
        let _ = writeln!(t);
        let _ = write!(t, "{}", self.details());
        t
    }

    /// Per-round figures and where the CPU went.
    fn details(&self) -> String {
        let mut t = String::new();
        let _ = writeln!(
            t,
            "per round (drain seconds; CPU seconds: reader / ClickHouse / tansu; merge settle; \
             CPU s per M events = (reader + ClickHouse) / records):"
        );
        for b in &self.brokers {
            let _ = writeln!(
                t,
                "  [{}] {} records ({} retries of an earlier id), pre-filled at {} events/s",
                b.storage,
                thousands(b.records as f64),
                thousands(b.retries as f64),
                thousands(b.prefill_rate)
            );
            for (name, runs) in readers(b) {
                for (i, r) in runs.iter().enumerate() {
                    let flushes = match (name, r.flushes) {
                        ("aggregator", (n, s)) => format!(
                            "; {n} flushes, {s:.2} s in them ({:.0} % of the drain)",
                            s / r.seconds * 100.0
                        ),
                        ("DIY pipeline", (n, _)) => format!("; {n} inserts"),
                        _ => String::new(),
                    };
                    let _ = writeln!(
                        t,
                        "    {name:<24} round {}: {} events/s in {:.2} s (spawn→end {:.2} s); \
                         CPU {:.2} / {:.2} / {:.2} s; settle {:.1} s; {:.2} CPU s/M \
                         (reader {:.2} + ClickHouse {:.2}){flushes}",
                        i + 1,
                        thousands(r.rate()),
                        r.seconds,
                        r.since_spawn,
                        r.cpu_process,
                        r.cpu_clickhouse,
                        r.cpu_broker,
                        r.settle,
                        r.cpu_per_million(),
                        r.per_million(r.cpu_process),
                        r.per_million(r.cpu_clickhouse),
                    );
                }
            }
        }
        let _ = writeln!(
            t,
            "  ClickHouse idle before the phases: {:.3} cores",
            self.clickhouse_idle_cores
        );
        if let Some(f) = &self.freshness {
            let _ = writeln!(
                t,
                "  freshness: {} sent at {:.0}/s, {} visible, {} not visible in time, {} refused; \
                 p50 {:.0} ms, p90 {:.0} ms, p99 {:.0} ms, min {:.0} ms, max {:.0} ms; {} polls",
                f.sent,
                f.per_second,
                f.latencies_ms.len(),
                f.missing,
                f.refused,
                quantile(&f.latencies_ms, 0.5),
                quantile(&f.latencies_ms, 0.9),
                quantile(&f.latencies_ms, 0.99),
                quantile(&f.latencies_ms, 0.0),
                quantile(&f.latencies_ms, 1.0),
                f.polls
            );
        }
        if let Some(q) = &self.query {
            let _ = writeln!(
                t,
                "  usage query: {} calls each way, interleaved; {} hours of data, {} rows per \
                 answer; API p50 {:.2} / p90 {:.2} / p99 {:.2} / max {:.2} ms; direct p50 {:.2} / \
                 p99 {:.2} ms",
                q.api_ms.len(),
                q.hours,
                q.rows,
                quantile(&q.api_ms, 0.5),
                quantile(&q.api_ms, 0.9),
                quantile(&q.api_ms, 0.99),
                quantile(&q.api_ms, 1.0),
                quantile(&q.direct_ms, 0.5),
                quantile(&q.direct_ms, 0.99),
            );
        }
        t
    }

    /// The block to paste into BENCHMARKS.md.
    pub fn markdown(&self) -> String {
        let mut m = String::new();
        let _ = writeln!(m, "Run {}, `{}`.", self.date, self.command);
        let _ = writeln!(
            m,
            "Machine: {} CPUs ({}). Broker: {}. ClickHouse {}. {}.",
            self.cpus, self.cpu_model, self.broker_version, self.clickhouse, self.settings
        );
        let _ = writeln!(m);
        let _ = writeln!(
            m,
            "| figure | broker | baseline | aggregator | ratio (rounds) | target | result |"
        );
        let _ = writeln!(m, "|---|---|---|---|---|---|---|");
        for r in self.rows() {
            let rounds = if r.rounds.is_empty() {
                String::new()
            } else {
                format!(" ({})", r.rounds)
            };
            let _ = writeln!(
                m,
                "| {} | `{}` | {} | {} | **{}**{rounds} | {} | {} |",
                r.figure,
                r.broker,
                r.baseline,
                r.ours,
                r.ratio,
                r.target.replace(">=", "≥").replace("<=", "≤"),
                verdict(r.pass)
            );
        }
        let _ = writeln!(m);
        let _ = writeln!(m, "Where the CPU went (median of rounds, CPU seconds per million events; reader = the bare consumer, the aggregator, or the DIY consumer process):");
        let _ = writeln!(m);
        let _ = writeln!(
            m,
            "| broker | reader | drain events/s | reader | ClickHouse | reader + ClickHouse | tansu | merge settle |"
        );
        let _ = writeln!(m, "|---|---|---:|---:|---:|---:|---:|---:|");
        for b in &self.brokers {
            for (name, runs) in readers(b) {
                let _ = writeln!(
                    m,
                    "| `{}` | {name} | {} | {:.2} | {:.2} | {:.2} | {:.2} | {:.1} s |",
                    b.storage,
                    thousands(med(runs, Run::rate)),
                    med(runs, |r| r.per_million(r.cpu_process)),
                    med(runs, |r| r.per_million(r.cpu_clickhouse)),
                    med(runs, Run::cpu_per_million),
                    med(runs, |r| r.per_million(r.cpu_broker)),
                    med(runs, |r| r.settle),
                );
            }
        }
        let _ = writeln!(m);
        let _ = writeln!(m, "As printed:");
        let _ = writeln!(m);
        let _ = writeln!(m, "```");
        let _ = write!(m, "{}", self.details());
        let _ = writeln!(m, "```");
        m
    }

    /// Machine-readable summary.
    pub fn json(&self) -> serde_json::Value {
        let brokers: Vec<_> = self
            .brokers
            .iter()
            .map(|b| {
                serde_json::json!({
                    "storage": b.storage,
                    "records": b.records,
                    "bare_events_per_s": med(&b.bare, Run::rate),
                    "bare_same_settings_events_per_s": med(&b.bare_same, Run::rate),
                    "aggregator_events_per_s": med(&b.ours, Run::rate),
                    "aggregator_events_per_s_since_spawn": med(&b.ours, Run::rate_since_spawn),
                    "throughput_ratio": b.throughput_ratio(),
                    "diy_cpu_s_per_m": med(&b.diy, Run::cpu_per_million),
                    "aggregator_cpu_s_per_m": med(&b.ours, Run::cpu_per_million),
                    "cost_ratio": b.cost_ratio(),
                })
            })
            .collect();
        let freshness = self.freshness.as_ref().map(|f| {
            serde_json::json!({
                "sent": f.sent,
                "visible": f.latencies_ms.len(),
                "missing": f.missing,
                "p50_ms": quantile(&f.latencies_ms, 0.5),
                "p99_ms": quantile(&f.latencies_ms, 0.99),
            })
        });
        let query = self.query.as_ref().map(|q| {
            serde_json::json!({
                "rows": q.rows,
                "api_p50_ms": quantile(&q.api_ms, 0.5),
                "api_p99_ms": quantile(&q.api_ms, 0.99),
                "direct_p50_ms": quantile(&q.direct_ms, 0.5),
                "direct_p99_ms": quantile(&q.direct_ms, 0.99),
            })
        });
        serde_json::json!({
            "date": self.date,
            "command": self.command,
            "brokers": brokers,
            "freshness": freshness,
            "query": query,
            "all_targets_met": self.all_pass(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_and_ratios() {
        let xs = [1.0, 2.0, 3.0, 4.0, 5.0];
        assert_eq!(quantile(&xs, 0.5), 3.0);
        assert_eq!(quantile(&xs, 1.0), 5.0);
        assert!(quantile(&[], 0.5).is_nan());
        let run = |records, seconds, cpu| Run {
            records,
            seconds,
            since_spawn: seconds,
            cpu_process: cpu,
            ..Run::default()
        };
        let b = BrokerRuns {
            storage: "memory",
            bare: vec![run(100, 1.0, 1.0)],
            bare_same: vec![run(100, 2.0, 1.0)],
            ours: vec![run(100, 2.0, 1.0)],
            diy: vec![run(100, 2.0, 4.0)],
            ..BrokerRuns::default()
        };
        assert_eq!(b.throughput_ratio(), 0.5);
        assert_eq!(b.cost_ratio(), 0.25);
        assert_eq!(b.same_settings_ratio(), 1.0);
        assert!(AggReport {
            brokers: vec![b],
            ..AggReport::default()
        }
        .table()
        .contains("FAIL"));
    }
}
