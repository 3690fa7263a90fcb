//! The quota bench's baseline: `redis-benchmark` sending the quota script's `EVALSHA` with the
//! arguments the library would send, and reading the library's check counters.

use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use tally_quota::algo::Rule;
use tally_quota::window::Applied;

/// What `redis-benchmark --csv` measured.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Measured {
    /// Requests per second.
    pub rate: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
}

/// One `redis-benchmark` run: its figures, wall time and CPU.
#[derive(Debug, Clone, Copy)]
pub struct BenchRun {
    pub measured: Measured,
    pub seconds: f64,
    /// CPU seconds of the `redis-benchmark` process.
    pub cpu: f64,
}

/// How `redis-benchmark` loads the server.
#[derive(Debug, Clone, Copy)]
pub struct Load {
    /// `-c`: connections.
    pub clients: usize,
    /// `-P`: requests pipelined per connection.
    pub pipeline: usize,
    /// `-n`: requests in all.
    pub requests: usize,
    /// `-r`: `__rand_int__` takes values below this.
    pub keyspace: usize,
}

/// The arguments of one check as [`tally_quota::Quota`] sends it: `EVALSHA`, the script's
/// hash, the window keys, the amount in units, the consume flag, then four values per window.
pub fn evalsha_args(sha: &str, windows: &[Applied], units: u64, consume: bool) -> Vec<String> {
    let mut args = vec![
        "EVALSHA".to_owned(),
        sha.to_owned(),
        windows.len().to_string(),
    ];
    args.extend(windows.iter().map(|w| w.key.clone()));
    args.push(units.to_string());
    args.push(if consume { "1" } else { "0" }.to_owned());
    for w in windows {
        let [kind, limit, interval, expiry] = match w.rule {
            Rule::Rate(g) => [
                "r".to_owned(),
                g.limit.to_string(),
                g.interval.to_string(),
                "0".to_owned(),
            ],
            Rule::Fixed(f) => [
                "f".to_owned(),
                f.limit.to_string(),
                "0".to_owned(),
                w.expire_at_ms.to_string(),
            ],
        };
        args.extend([kind, limit, interval, expiry]);
    }
    args
}

/// Runs `bin` against `url` with `command` (`__rand_int__` in it is replaced per request),
/// killed after `limit`. Fails if the server answered any request with an error.
pub async fn run(
    bin: &Path,
    url: &str,
    load: Load,
    command: &[String],
    limit: Duration,
) -> anyhow::Result<BenchRun> {
    let before = crate::procfs::children_cpu_seconds();
    let started = Instant::now();
    let child = tokio::process::Command::new(bin)
        .args(["-u", url])
        .args(["-c", &load.clients.to_string()])
        .args(["-P", &load.pipeline.to_string()])
        .args(["-n", &load.requests.to_string()])
        .args(["-r", &load.keyspace.to_string()])
        .arg("--csv")
        .args(command)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("starting {}", bin.display()))?;
    let out = tokio::time::timeout(limit, child.wait_with_output())
        .await
        .with_context(|| format!("{} still running after {limit:?}", bin.display()))??;
    let seconds = started.elapsed().as_secs_f64();
    let cpu = match (before, crate::procfs::children_cpu_seconds()) {
        (Some(a), Some(b)) => b - a,
        _ => f64::NAN,
    };
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    if !out.status.success() {
        bail!(
            "{} failed ({}): {stderr}{stdout}",
            bin.display(),
            out.status
        );
    }
    if let Some(line) = stderr
        .lines()
        .chain(stdout.lines())
        .find(|l| l.contains("Error from server"))
    {
        bail!(
            "{}: the server answered with an error: {line}",
            bin.display()
        );
    }
    let measured = parse_csv(&stdout)
        .with_context(|| format!("{}: no figures in its output: {stdout}", bin.display()))?;
    Ok(BenchRun {
        measured,
        seconds,
        cpu,
    })
}

/// The figures of the last row of `redis-benchmark --csv`:
/// `"test","rps","avg_latency_ms","min_latency_ms","p50_latency_ms","p95_latency_ms","p99_latency_ms","max_latency_ms"`.
pub fn parse_csv(text: &str) -> Option<Measured> {
    let line = text.lines().rev().find(|l| !l.trim().is_empty())?;
    // The test name holds the command and may hold commas: the figures are the last seven.
    let mut fields = line.rsplitn(8, ',');
    let mut figures = [0.0; 7];
    for slot in figures.iter_mut().rev() {
        *slot = fields.next()?.trim().trim_matches('"').parse().ok()?;
    }
    let [rate, _avg, _min, p50_ms, _p95, p99_ms, _max] = figures;
    Some(Measured {
        rate,
        p50_ms,
        p99_ms,
    })
}

/// The sum of counter `name` over the series whose labels hold `label` (every series when
/// `label` is empty), from the Prometheus text `rendered`.
pub fn counter(rendered: &str, name: &str, label: &str) -> u64 {
    rendered
        .lines()
        .filter_map(|line| line.strip_prefix(name))
        .filter_map(|rest| match rest.strip_prefix('{') {
            Some(labelled) => labelled.rsplit_once("} "),
            None => rest.strip_prefix(' ').map(|v| ("", v)),
        })
        .filter(|(labels, _)| labels.contains(label))
        .map(|(_, value)| value.trim().parse::<f64>().unwrap_or(0.0) as u64)
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;
    use tally_quota::algo::Gcra;
    use tally_quota::window::{customer_tag, window_key};
    use tally_rater::{Decimal, Window};

    #[test]
    fn the_baseline_sends_what_the_library_sends() {
        let tag = customer_tag("demo", "c-__rand_int__");
        let key = window_key(&tag, "requests", Window::Minute, None);
        assert_eq!(key, "tq:{demo/14:c-__rand_int__}:requests:minute");
        let windows = [Applied {
            window: Window::Minute,
            key,
            rule: Rule::Rate(Gcra::new(600, 60_000_000)),
            limit: Decimal::from(600),
            expire_at_ms: 0,
        }];
        assert_eq!(
            evalsha_args("abc", &windows, 1, true),
            [
                "EVALSHA",
                "abc",
                "1",
                "tq:{demo/14:c-__rand_int__}:requests:minute",
                "1",
                "1",
                "r",
                "600",
                "100000",
                "0"
            ]
        );
    }

    #[test]
    fn reads_redis_benchmark_csv() {
        let out = "\"test\",\"rps\",\"avg_latency_ms\",\"min_latency_ms\",\"p50_latency_ms\",\"p95_latency_ms\",\"p99_latency_ms\",\"max_latency_ms\"\n\
                   \"EVALSHA dd8c 1 tq:{demo/14:c-__rand_int__}:requests:minute 1 1 r 600 100000 0\",\"108695.65\",\"7.120\",\"0.928\",\"7.127\",\"8.847\",\"10.023\",\"10.639\"\n";
        assert_eq!(
            parse_csv(out),
            Some(Measured {
                rate: 108695.65,
                p50_ms: 7.127,
                p99_ms: 10.023
            })
        );
        assert_eq!(parse_csv("\"test\",\"rps\"\n"), None);
    }

    #[test]
    fn counts_allowed_and_refused_checks() {
        let text = "# TYPE tally_quota_checks_total counter\n\
                    tally_quota_checks_total{outcome=\"allowed\",source=\"redis\"} 12\n\
                    tally_quota_checks_total{outcome=\"refused\",source=\"redis\"} 30\n\
                    tally_quota_checks_total{outcome=\"allowed\",source=\"fallback_open\"} 1\n\
                    tally_quota_http_requests_total{route=\"/v1/quota/check\",status=\"200\"} 43\n";
        let checks = "tally_quota_checks_total";
        assert_eq!(counter(text, checks, "outcome=\"allowed\""), 13);
        assert_eq!(counter(text, checks, "outcome=\"refused\""), 30);
        assert_eq!(counter(text, checks, ""), 43);
        assert_eq!(counter("tally_quota_checks_total 7\n", checks, ""), 7);
        assert_eq!(counter(text, "tally_quota_fed_events_total", ""), 0);
    }
}
