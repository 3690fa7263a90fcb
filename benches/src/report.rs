//! The bench's results: a table for the terminal and a markdown block for BENCHMARKS.md.

use std::fmt::Write as _;
use std::path::Path;

/// How a bench binary was launched, as someone would type it again.
pub fn command_line(bin: &str, args: &[String]) -> String {
    let rest = if args.is_empty() {
        String::new()
    } else {
        format!(" -- {}", args.join(" "))
    };
    let profile = crate::collector::profile_dir()
        .ok()
        .and_then(|d| d.file_name().map(|n| n.to_string_lossy().into_owned()));
    match (std::env::var_os("CARGO"), profile.as_deref()) {
        (Some(_), Some("release")) => {
            format!("cargo run --release -p tally-bench --bin {bin}{rest}")
        }
        (Some(_), _) => format!("cargo run -p tally-bench --bin {bin}{rest}"),
        _ => {
            let exe = std::env::args().next().unwrap_or_else(|| bin.into());
            std::iter::once(exe)
                .chain(args.iter().cloned())
                .collect::<Vec<_>>()
                .join(" ")
        }
    }
}

/// What `tansu --version` prints.
pub fn tansu_version(bin: &Path) -> String {
    std::process::Command::new(bin)
        .arg("--version")
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .filter(|v| !v.is_empty())
        .unwrap_or_else(|| "tansu (version unknown)".into())
}

/// Share of a core each process used during a phase (CPU seconds / wall seconds).
#[derive(Debug, Clone, Copy, Default)]
pub struct Cores {
    /// This process: the load generator, or the raw producer.
    pub bench: f64,
    /// The HTTP server under load (collector or bare hyper), if any.
    pub server: Option<f64>,
    pub broker: f64,
}

/// One measured phase.
#[derive(Debug, Clone, Default)]
pub struct Sample {
    /// Events/s or requests/s.
    pub rate: f64,
    pub p50_ms: Option<f64>,
    pub p99_ms: Option<f64>,
    pub errors: usize,
    pub seconds: f64,
    pub cores: Cores,
}

/// A figure: the collector against its baseline, over several rounds.
#[derive(Debug, Clone)]
pub struct Comparison {
    pub figure: &'static str,
    pub broker: &'static str,
    pub unit: &'static str,
    pub baseline_name: &'static str,
    pub baseline: Vec<Sample>,
    pub subject: Vec<Sample>,
    /// The ratio must be at least this.
    pub target: f64,
}

/// The median, or NaN for none.
pub fn median(mut xs: Vec<f64>) -> f64 {
    if xs.is_empty() {
        return f64::NAN;
    }
    xs.sort_by(f64::total_cmp);
    let n = xs.len();
    if n % 2 == 1 {
        xs[n / 2]
    } else {
        (xs[n / 2 - 1] + xs[n / 2]) / 2.0
    }
}

fn med(samples: &[Sample], f: impl Fn(&Sample) -> Option<f64>) -> Option<f64> {
    let xs: Vec<f64> = samples.iter().filter_map(f).collect();
    (!xs.is_empty()).then(|| median(xs))
}

impl Comparison {
    pub fn baseline_rate(&self) -> f64 {
        median(self.baseline.iter().map(|s| s.rate).collect())
    }

    pub fn subject_rate(&self) -> f64 {
        median(self.subject.iter().map(|s| s.rate).collect())
    }

    /// Ratio of the medians: one slow round on either side moves it little.
    pub fn ratio(&self) -> f64 {
        self.subject_rate() / self.baseline_rate()
    }

    /// Each round's ratio, to show the spread.
    pub fn round_ratios(&self) -> Vec<f64> {
        self.baseline
            .iter()
            .zip(&self.subject)
            .map(|(b, s)| s.rate / b.rate)
            .collect()
    }

    pub fn pass(&self) -> bool {
        self.ratio() >= self.target
    }
}

/// Everything one run measured.
#[derive(Debug, Clone)]
pub struct Report {
    pub date: String,
    pub command: String,
    pub cpus: usize,
    pub cpu_model: String,
    pub broker_version: String,
    pub settings: String,
    pub comparisons: Vec<Comparison>,
    /// Collector peak RSS (bytes) per broker run.
    pub peak_rss: Vec<(&'static str, u64)>,
    /// Largest acceptable peak RSS, in bytes.
    pub rss_target: u64,
    /// tansu's peak RSS (bytes) per broker run: context, not a target (`memory://` keeps
    /// every record).
    pub broker_rss: Vec<(&'static str, u64)>,
}

fn verdict(pass: bool) -> &'static str {
    if pass {
        "pass"
    } else {
        "FAIL"
    }
}

/// `12345.6` → `12,346`.
pub fn thousands(x: f64) -> String {
    if !x.is_finite() {
        return "-".into();
    }
    let digits = format!("{:.0}", x.abs());
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    if x < 0.0 {
        out.insert(0, '-');
    }
    out
}

fn ms(x: Option<f64>) -> String {
    x.map_or("-".into(), |v| format!("{v:.2}"))
}

fn mb(bytes: u64) -> String {
    format!("{:.1} MB", bytes as f64 / 1_000_000.0)
}

fn cores(c: &Cores) -> String {
    let server = c.server.map_or("-".into(), |s| format!("{s:.2}"));
    format!("{:.2} / {server} / {:.2}", c.bench, c.broker)
}

fn avg_cores(samples: &[Sample]) -> Cores {
    Cores {
        bench: med(samples, |s| Some(s.cores.bench)).unwrap_or(f64::NAN),
        server: med(samples, |s| s.cores.server),
        broker: med(samples, |s| Some(s.cores.broker)).unwrap_or(f64::NAN),
    }
}

impl Report {
    fn broker_rss_text(&self) -> String {
        self.broker_rss
            .iter()
            .map(|(b, bytes)| format!("{} ({b})", mb(*bytes)))
            .collect::<Vec<_>>()
            .join(", ")
    }

    pub fn peak_rss_max(&self) -> Option<u64> {
        self.peak_rss.iter().map(|(_, b)| *b).max()
    }

    pub fn all_pass(&self) -> bool {
        self.comparisons.iter().all(Comparison::pass)
            && self.peak_rss_max().is_some_and(|b| b < self.rss_target)
    }

    /// The terminal table.
    pub fn table(&self) -> String {
        let mut t = String::new();
        let _ = writeln!(
            t,
            "tally-load: {} on {} x {}; broker {}",
            self.date, self.cpus, self.cpu_model, self.broker_version
        );
        let _ = writeln!(t, "command: {}", self.command);
        let _ = writeln!(t, "settings: {}", self.settings);
        let _ = writeln!(t);
        let _ = writeln!(
            t,
            "{:<44} {:<7} {:>22} {:>22} {:>6} {:>7} {:>6}",
            "figure (median of rounds)",
            "broker",
            "baseline",
            "collector",
            "ratio",
            "target",
            "result"
        );
        for c in &self.comparisons {
            let _ = writeln!(
                t,
                "{:<44} {:<7} {:>22} {:>22} {:>6.2} {:>7} {:>6}",
                c.figure,
                c.broker,
                format!("{} {}", thousands(c.baseline_rate()), c.unit),
                format!("{} {}", thousands(c.subject_rate()), c.unit),
                c.ratio(),
                format!(">= {:.2}", c.target),
                verdict(c.pass()),
            );
            if c.subject.iter().any(|s| s.p50_ms.is_some()) {
                let lat = |s: &[Sample]| {
                    format!(
                        "p50 {} / p99 {} ms",
                        ms(med(s, |x| x.p50_ms)),
                        ms(med(s, |x| x.p99_ms))
                    )
                };
                let _ = writeln!(
                    t,
                    "{:<44} {:<7} {:>22} {:>22}",
                    "  latency per request",
                    "",
                    lat(&c.baseline),
                    lat(&c.subject)
                );
            }
        }
        for (broker, bytes) in &self.peak_rss {
            let _ = writeln!(
                t,
                "{:<44} {:<7} {:>22} {:>22} {:>6} {:>7} {:>6}",
                "collector peak RSS (VmHWM)",
                broker,
                "",
                mb(*bytes),
                "",
                format!("< {:.0} MB", self.rss_target as f64 / 1e6),
                verdict(*bytes < self.rss_target),
            );
        }
        let met = self.comparisons.iter().filter(|c| c.pass()).count()
            + self
                .peak_rss
                .iter()
                .filter(|(_, b)| *b < self.rss_target)
                .count();
        let total = self.comparisons.len() + self.peak_rss.len();
        let _ = writeln!(t, "targets met: {met} of {total}");
        if !self.broker_rss.is_empty() {
            let _ = writeln!(t, "tansu peak RSS: {}", self.broker_rss_text());
        }
        let _ = writeln!(t);
        let _ = writeln!(
            t,
            "rounds (rate (seconds); cores busy: bench / server / tansu, of {}):",
            self.cpus
        );
        for c in &self.comparisons {
            let ratios: Vec<String> = c.round_ratios().iter().map(|r| format!("{r:.2}")).collect();
            let _ = writeln!(
                t,
                "  {} [{}]: ratio per round {}",
                c.figure,
                c.broker,
                ratios.join(", ")
            );
            for (name, samples) in [(c.baseline_name, &c.baseline), ("collector", &c.subject)] {
                let rates: Vec<String> = samples
                    .iter()
                    .map(|s| format!("{} ({:.1} s)", thousands(s.rate), s.seconds))
                    .collect();
                let errors: usize = samples.iter().map(|s| s.errors).sum();
                let _ = writeln!(
                    t,
                    "    {:<18} {} {}; cores {}; errors {}",
                    name,
                    rates.join(", "),
                    c.unit,
                    cores(&avg_cores(samples)),
                    errors
                );
            }
        }
        t
    }

    /// The block to paste into BENCHMARKS.md.
    pub fn markdown(&self) -> String {
        let mut m = String::new();
        let _ = writeln!(m, "Run {}, `{}`.", self.date, self.command);
        let _ = writeln!(
            m,
            "Machine: {} CPUs ({}). Broker: {}, private to the run, on loopback. {}.",
            self.cpus, self.cpu_model, self.broker_version, self.settings
        );
        let _ = writeln!(m);
        let _ = writeln!(
            m,
            "| figure | tansu storage | baseline | collector | ratio (rounds) | target | result |"
        );
        let _ = writeln!(m, "|---|---|---:|---:|---|---|---|");
        for c in &self.comparisons {
            let ratios: Vec<String> = c.round_ratios().iter().map(|r| format!("{r:.2}")).collect();
            let lat = |s: &[Sample]| match (med(s, |x| x.p50_ms), med(s, |x| x.p99_ms)) {
                (Some(a), Some(b)) => format!("<br>p50 {a:.2} ms, p99 {b:.2} ms"),
                _ => String::new(),
            };
            let _ = writeln!(
                m,
                "| {} | `{}` | {}: {} {}{} | {} {}{} | **{:.2}** ({}) | ≥ {:.2} | {} |",
                c.figure,
                c.broker,
                c.baseline_name,
                thousands(c.baseline_rate()),
                c.unit,
                lat(&c.baseline),
                thousands(c.subject_rate()),
                c.unit,
                lat(&c.subject),
                c.ratio(),
                ratios.join(", "),
                c.target,
                verdict(c.pass()),
            );
        }
        for (broker, bytes) in &self.peak_rss {
            let _ = writeln!(
                m,
                "| collector peak RSS (`VmHWM`) | `{broker}` | | {} | | < {:.0} MB | {} |",
                mb(*bytes),
                self.rss_target as f64 / 1e6,
                verdict(*bytes < self.rss_target),
            );
        }
        if !self.broker_rss.is_empty() {
            let _ = writeln!(m);
            let _ = writeln!(m, "tansu's own peak RSS: {}.", self.broker_rss_text());
        }
        let _ = writeln!(m);
        let _ = writeln!(
            m,
            "Cores busy during each phase (median of rounds; CPU seconds / wall seconds, of {}):",
            self.cpus
        );
        let _ = writeln!(m);
        let _ = writeln!(
            m,
            "| phase | tansu storage | bench process | server | tansu |"
        );
        let _ = writeln!(m, "|---|---|---:|---:|---:|");
        for c in &self.comparisons {
            for (name, samples) in [(c.baseline_name, &c.baseline), ("collector", &c.subject)] {
                let k = avg_cores(samples);
                let _ = writeln!(
                    m,
                    "| {} ({}) | `{}` | {:.2} | {} | {:.2} |",
                    c.figure,
                    name,
                    c.broker,
                    k.bench,
                    k.server.map_or("-".into(), |s| format!("{s:.2}")),
                    k.broker
                );
            }
        }
        m
    }

    /// Machine-readable summary (used by the smoke test).
    pub fn json(&self) -> serde_json::Value {
        let figures: Vec<_> = self
            .comparisons
            .iter()
            .map(|c| {
                serde_json::json!({
                    "figure": c.figure,
                    "broker": c.broker,
                    "unit": c.unit,
                    "baseline": c.baseline_rate(),
                    "collector": c.subject_rate(),
                    "ratio": c.ratio(),
                    "target": c.target,
                    "pass": c.pass(),
                    "errors": c.baseline.iter().chain(&c.subject).map(|s| s.errors).sum::<usize>(),
                })
            })
            .collect();
        let rss: Vec<_> = self
            .peak_rss
            .iter()
            .map(|(b, bytes)| serde_json::json!({"broker": b, "bytes": bytes}))
            .collect();
        serde_json::json!({
            "date": self.date,
            "command": self.command,
            "figures": figures,
            "collector_peak_rss": rss,
            "all_targets_met": self.all_pass(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn medians_and_thousands() {
        assert_eq!(median(vec![3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(vec![4.0, 1.0, 2.0, 3.0]), 2.5);
        assert!(median(vec![]).is_nan());
        assert_eq!(thousands(1234567.4), "1,234,567");
        assert_eq!(thousands(999.0), "999");
    }
}
