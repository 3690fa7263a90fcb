//! The collector under test: the real `tally-ingest` binary as a child process, so its
//! memory and CPU are its own and readable from `/proc`.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{bail, Context};
use tokio::process::{Child, Command};

use crate::broker::free_port;
use crate::procfs;

/// `TALLY_INGEST_BIN`, else `tally-ingest` beside this executable in the target folder
/// (test executables sit one level deeper, in `deps/`).
pub fn locate_binary() -> anyhow::Result<PathBuf> {
    if let Some(p) = std::env::var_os("TALLY_INGEST_BIN") {
        return Ok(PathBuf::from(p));
    }
    let dir = profile_dir()?;
    let bin = dir.join("tally-ingest");
    if bin.exists() {
        Ok(bin)
    } else {
        bail!(
            "{} not found: build it first (`cargo build --release -p tally-ingest`) or set \
             TALLY_INGEST_BIN",
            bin.display()
        )
    }
}

/// The target folder of the running profile (`target/release`, `target/debug`, …).
pub fn profile_dir() -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe().context("locating the running executable")?;
    let mut dir = exe
        .parent()
        .context("the executable has no parent folder")?
        .to_path_buf();
    if dir.ends_with("deps") {
        dir.pop();
    }
    Ok(dir)
}

/// When cargo launched us (`cargo run`, `cargo test`), rebuilds `tally-ingest` in the same
/// profile first, so the bench never measures a stale collector.
pub fn build_with_cargo() -> anyhow::Result<()> {
    let Some(cargo) = std::env::var_os("CARGO") else {
        return Ok(());
    };
    if std::env::var_os("TALLY_INGEST_BIN").is_some() {
        return Ok(());
    }
    let dir = profile_dir()?;
    let profile = dir.file_name().and_then(|n| n.to_str()).map_or("dev", |n| {
        if n == "debug" {
            "dev"
        } else {
            n
        }
    });
    let mut cmd = std::process::Command::new(cargo);
    cmd.args([
        "build",
        "--quiet",
        "-p",
        "tally-ingest",
        "--bin",
        "tally-ingest",
    ])
    .args(["--profile", profile])
    .arg("--manifest-path")
    .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("../Cargo.toml"))
    .stdin(Stdio::null());
    let status = cmd
        .status()
        .context("running cargo build -p tally-ingest")?;
    if !status.success() {
        bail!("cargo build -p tally-ingest failed: {status}");
    }
    Ok(())
}

/// A running collector; killed when dropped.
pub struct CollectorProcess {
    pub addr: SocketAddr,
    child: Child,
    log: PathBuf,
}

impl CollectorProcess {
    /// Starts `bin --config config` against `brokers`/`topic` on a free port and waits until
    /// `/readyz` says the broker answers and the topic exists.
    pub async fn start(
        bin: &Path,
        config: &Path,
        brokers: &str,
        topic: &str,
        dir: &Path,
    ) -> anyhow::Result<CollectorProcess> {
        let addr: SocketAddr = ([127, 0, 0, 1], free_port()?).into();
        let log = dir.join(format!("tally-ingest-{}.log", addr.port()));
        let child = Command::new(bin)
            .arg("--config")
            .arg(config)
            .env("TALLY_COLLECTOR_LISTEN", addr.to_string())
            .env("TALLY_KAFKA_BROKERS", brokers)
            .env("TALLY_KAFKA_TOPIC", topic)
            // The producer settings must be the config file's, whatever this shell exports.
            .env_remove("TALLY_KAFKA_IDEMPOTENCE")
            .env_remove("TALLY_CONFIG")
            .env("TALLY_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).context("collector log file")?)
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?;
        let mut collector = CollectorProcess { addr, child, log };
        let ready = crate::load::wait_ok(addr, "/readyz", Duration::from_secs(30)).await;
        if let Err(e) = ready {
            let exited = collector.child.try_wait()?;
            bail!(
                "collector not ready ({e}; exited: {exited:?}); log:\n{}",
                collector.log()
            );
        }
        Ok(collector)
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.id()
    }

    /// Peak resident set so far (`VmHWM`), in bytes.
    pub fn peak_rss(&self) -> Option<u64> {
        procfs::status_bytes(self.pid()?, "VmHWM")
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub async fn stop(mut self) {
        let _ = self.child.kill().await;
    }
}
