//! The aggregator under test: the real `tally-aggregator run` binary as a child process on
//! its own topic, ClickHouse database and consumer group (the environment overrides the
//! aggregator's integration tests use), and the checks that say how far it got.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use http::StatusCode;
use tokio::process::{Child, Command};

use crate::agg::ch::{quote, ClickHouse, Http};
use crate::broker::free_port;
use crate::collector::profile_dir;
use crate::procfs;

/// `env` if set, else `name` beside this executable in the target folder.
pub fn locate(name: &str, env: &str) -> anyhow::Result<PathBuf> {
    if let Some(p) = std::env::var_os(env) {
        return Ok(PathBuf::from(p));
    }
    let bin = profile_dir()?.join(name);
    if bin.exists() {
        Ok(bin)
    } else {
        bail!(
            "{} not found: build it first (`cargo build --release -p {name}`) or set {env}",
            bin.display()
        )
    }
}

/// When cargo launched us (`cargo run`, `cargo test`), rebuilds the binaries the bench runs
/// in the same profile first (those not given by their environment variable), so it never
/// measures a stale build.
pub fn build_with_cargo(binaries: &[(&str, &str)]) -> anyhow::Result<()> {
    let Some(cargo) = std::env::var_os("CARGO") else {
        return Ok(());
    };
    let wanted: Vec<&str> = binaries
        .iter()
        .filter(|(_, env)| std::env::var_os(env).is_none())
        .map(|(name, _)| *name)
        .collect();
    if wanted.is_empty() {
        return Ok(());
    }
    let dir = profile_dir()?;
    let profile = match dir.file_name().and_then(|n| n.to_str()) {
        Some("debug") | None => "dev",
        Some(n) => n,
    };
    let mut cmd = std::process::Command::new(cargo);
    cmd.args(["build", "--quiet", "--profile", profile]);
    for name in &wanted {
        cmd.args(["-p", name, "--bin", name]);
    }
    cmd.arg("--manifest-path")
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("../Cargo.toml"))
        .stdin(Stdio::null());
    let status = cmd.status().context("running cargo build")?;
    if !status.success() {
        bail!("cargo build of {wanted:?} failed: {status}");
    }
    Ok(())
}

/// Where one aggregator instance reads and writes.
#[derive(Debug, Clone)]
pub struct Target {
    pub brokers: String,
    pub topic: String,
    pub clickhouse_url: String,
    pub database: String,
    pub group: String,
}

/// A running `tally-aggregator run`; killed when dropped.
pub struct AggregatorProcess {
    pub addr: SocketAddr,
    /// When the process was spawned.
    pub spawned: Instant,
    child: Child,
    log: PathBuf,
    http: Http,
}

fn command(bin: &Path, config: &Path, target: &Target, listen: &str) -> Command {
    let mut cmd = Command::new(bin);
    cmd.env("TALLY_CONFIG", config)
        .env("TALLY_KAFKA_BROKERS", &target.brokers)
        .env("TALLY_KAFKA_TOPIC", &target.topic)
        .env("TALLY_CLICKHOUSE_URL", &target.clickhouse_url)
        .env("TALLY_CLICKHOUSE_DATABASE", &target.database)
        .env("TALLY_AGGREGATOR_GROUP", &target.group)
        .env("TALLY_AGGREGATOR_LISTEN", listen)
        // The settings must be the config file's, whatever this shell exports.
        .env_remove("TALLY_KAFKA_IDEMPOTENCE")
        .env("TALLY_LOG", "info")
        .stdin(Stdio::null());
    cmd
}

/// `tally-aggregator migrate`: creates `target`'s database and tables, so that a drain
/// measures consuming, not schema set-up (the DIY tables are made before their drain too).
pub async fn migrate(bin: &Path, config: &Path, target: &Target) -> anyhow::Result<()> {
    let out = tokio::time::timeout(
        Duration::from_secs(60),
        command(bin, config, target, "127.0.0.1:0")
            .arg("migrate")
            .kill_on_drop(true)
            .output(),
    )
    .await
    .context("tally-aggregator migrate did not finish within 60 s")?
    .context("running tally-aggregator migrate")?;
    if !out.status.success() {
        bail!(
            "tally-aggregator migrate failed: {}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

impl AggregatorProcess {
    /// Spawns the aggregator with `config` and `target`'s overrides; does not wait.
    pub fn spawn(
        bin: &Path,
        config: &Path,
        target: &Target,
        dir: &Path,
    ) -> anyhow::Result<AggregatorProcess> {
        let addr: SocketAddr = ([127, 0, 0, 1], free_port()?).into();
        let log = dir.join(format!(
            "aggregator-{}-{}.log",
            target.database,
            addr.port()
        ));
        let spawned = Instant::now();
        let child = command(bin, config, target, &addr.to_string())
            .arg("run")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).context("aggregator log file")?)
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?;
        Ok(AggregatorProcess {
            addr,
            spawned,
            child,
            log,
            http: Http::new(),
        })
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.id()
    }

    /// CPU seconds the process has used since it was spawned.
    pub fn cpu_seconds(&self) -> f64 {
        self.pid().and_then(procfs::cpu_seconds).unwrap_or(f64::NAN)
    }

    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }

    fn check_alive(&mut self) -> anyhow::Result<()> {
        if let Some(status) = self.child.try_wait()? {
            bail!(
                "the aggregator exited with {status}; log:\n{}",
                self.log_tail()
            );
        }
        Ok(())
    }

    /// A sample of its Prometheus metrics (the first line starting `name `), if it answers.
    async fn metric(&self, name: &str) -> Option<f64> {
        let url = format!("http://{}/metrics", self.addr);
        let (status, body) = self.http.get(&url, None).await.ok()?;
        if status != StatusCode::OK {
            return None;
        }
        let prefix = format!("{name} ");
        String::from_utf8_lossy(&body)
            .lines()
            .find_map(|l| l.strip_prefix(&prefix).and_then(|v| v.trim().parse().ok()))
    }

    async fn assigned(&self) -> Option<f64> {
        self.metric("tally_aggregator_assigned_partitions").await
    }

    /// Flushes so far and the seconds the consumer spent in them (it reads nothing while
    /// it flushes).
    pub async fn flushes(&self) -> (u64, f64) {
        let count = self
            .metric("tally_aggregator_flush_duration_seconds_count")
            .await;
        let sum = self
            .metric("tally_aggregator_flush_duration_seconds_sum")
            .await;
        (count.unwrap_or(0.0) as u64, sum.unwrap_or(f64::NAN))
    }

    /// Waits until the consumer holds `partitions` partitions (polling its metrics every
    /// 10 ms); the instant it saw them.
    pub async fn wait_assigned(
        &mut self,
        partitions: usize,
        within: Duration,
    ) -> anyhow::Result<Instant> {
        let deadline = Instant::now() + within;
        loop {
            if self
                .assigned()
                .await
                .is_some_and(|n| n >= partitions as f64)
            {
                return Ok(Instant::now());
            }
            self.check_alive()?;
            if Instant::now() > deadline {
                bail!(
                    "the aggregator held fewer than {partitions} partitions after {within:?}; \
                     log:\n{}",
                    self.log_tail()
                );
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Waits until every partition's checkpoint reaches `ends` (polling ClickHouse every
    /// `every`); the instant it saw that.
    pub async fn wait_caught_up(
        &mut self,
        ch: &ClickHouse,
        target: &Target,
        ends: &BTreeMap<i32, i64>,
        every: Duration,
        within: Duration,
    ) -> anyhow::Result<Instant> {
        let deadline = Instant::now() + within;
        loop {
            let checkpoints = checkpoints(ch, &target.database, &target.topic)
                .await
                .unwrap_or_default();
            if caught_up(ends, &checkpoints) {
                return Ok(Instant::now());
            }
            self.check_alive()?;
            if Instant::now() > deadline {
                bail!(
                    "the aggregator did not catch up within {within:?}: ends {ends:?}, \
                     checkpoints {checkpoints:?}; log:\n{}",
                    self.log_tail()
                );
            }
            tokio::time::sleep(every).await;
        }
    }

    /// SIGTERM (it flushes and leaves the group, so the next member of the group gets the
    /// partitions at once), SIGKILL if it has not exited within 15 s.
    pub async fn stop(mut self) {
        if let Some(pid) = self.pid() {
            let _ = std::process::Command::new("kill")
                .args(["-TERM", &pid.to_string()])
                .status();
            if tokio::time::timeout(Duration::from_secs(15), self.child.wait())
                .await
                .is_ok()
            {
                return;
            }
        }
        let _ = self.child.kill().await;
    }
}

/// Whether every non-empty partition's checkpoint is at its last record.
pub fn caught_up(ends: &BTreeMap<i32, i64>, checkpoints: &BTreeMap<i32, i64>) -> bool {
    ends.iter()
        .all(|(p, &end)| end == 0 || checkpoints.get(p).is_some_and(|&c| c + 1 >= end))
}

/// The last offset flushed per partition of `topic` (`aggregator_checkpoints`).
pub async fn checkpoints(
    ch: &ClickHouse,
    database: &str,
    topic: &str,
) -> anyhow::Result<BTreeMap<i32, i64>> {
    let q = format!(
        "SELECT kafka_partition, max(kafka_offset) FROM {database}.aggregator_checkpoints \
         WHERE topic = {} GROUP BY kafka_partition FORMAT TSV",
        quote(topic)
    );
    let text = ch.sql(&q).await?;
    Ok(text
        .lines()
        .filter_map(|l| {
            let (p, o) = l.split_once('\t')?;
            Some((p.parse().ok()?, o.parse().ok()?))
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn caught_up_needs_every_partition() {
        let ends = BTreeMap::from([(0, 10), (1, 0), (2, 5)]);
        assert!(!caught_up(&ends, &BTreeMap::from([(0, 9)])));
        assert!(!caught_up(&ends, &BTreeMap::from([(0, 9), (2, 3)])));
        assert!(caught_up(&ends, &BTreeMap::from([(0, 9), (2, 4)])));
    }
}
