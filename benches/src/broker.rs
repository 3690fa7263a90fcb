//! A private tansu broker per run, on a free loopback port, so the bench never measures (or
//! disturbs) the shared local stack.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::types::RDKafkaErrorCode;
use tokio::process::{Child, Command};

/// tansu's storage engine.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Storage {
    /// `memory://`: keeps nothing, so the broker costs least.
    Memory,
    /// `sqlite://`: what the local stack runs (durable across restarts).
    Sqlite,
}

impl Storage {
    pub fn url(self) -> &'static str {
        match self {
            Storage::Memory => "memory://tansu/",
            Storage::Sqlite => "sqlite://tansu.db",
        }
    }

    pub fn label(self) -> &'static str {
        match self {
            Storage::Memory => "memory",
            Storage::Sqlite => "sqlite",
        }
    }
}

/// `TALLY_TANSU_BIN`, else where `scripts/stack.sh` caches the build.
pub fn tansu_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("TALLY_TANSU_BIN") {
        return PathBuf::from(p);
    }
    let home = std::env::var_os("HOME").unwrap_or_else(|| "/root".into());
    PathBuf::from(home).join(".cache/tally/tansu-0.6.0/bin/tansu")
}

/// A free loopback port (bound and released; the race with other processes is harmless here).
pub fn free_port() -> anyhow::Result<u16> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").context("binding a free port")?;
    Ok(listener.local_addr()?.port())
}

/// A running broker; killed when dropped.
pub struct Tansu {
    pub port: u16,
    pub storage: Storage,
    child: Child,
    dir: PathBuf,
}

impl Tansu {
    /// Starts tansu in its own folder under `parent` and waits until it listens.
    pub async fn start(bin: &Path, storage: Storage, parent: &Path) -> anyhow::Result<Tansu> {
        if !bin.exists() {
            bail!(
                "tansu not found at {} (set TALLY_TANSU_BIN, or run `make stack-up` to build it)",
                bin.display()
            );
        }
        let port = free_port()?;
        let dir = parent.join(format!("tansu-{}", storage.label()));
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let url = format!("tcp://127.0.0.1:{port}");
        let log = std::fs::File::create(dir.join("tansu.log")).context("tansu log file")?;
        let child = Command::new(bin)
            .args([
                "broker",
                "--listener-url",
                &url,
                "--advertised-listener-url",
                &url,
            ])
            .args(["--storage-engine", storage.url()])
            .current_dir(&dir)
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?;
        let mut broker = Tansu {
            port,
            storage,
            child,
            dir,
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        while tokio::net::TcpStream::connect(broker.addr()).await.is_err() {
            if let Some(status) = broker.child.try_wait()? {
                bail!("tansu exited with {status}; log:\n{}", broker.log());
            }
            if Instant::now() > deadline {
                bail!("tansu did not listen within 20 s; log:\n{}", broker.log());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(broker)
    }

    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.id()
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("tansu.log")).unwrap_or_default()
    }

    /// SIGKILL: nothing it holds is needed afterwards, and SIGTERM takes seconds.
    pub async fn stop(mut self) {
        let _ = self.child.kill().await;
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Creates `topic` with `partitions` (an existing one is fine), retrying until the broker
/// answers or 20 s pass.
pub async fn create_topic(brokers: &str, topic: &str, partitions: i32) -> anyhow::Result<()> {
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .create()
        .context("admin client")?;
    let new = NewTopic::new(topic, partitions, TopicReplication::Fixed(1));
    let options = AdminOptions::new().operation_timeout(Some(Duration::from_secs(5)));
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let outcome = match admin.create_topics([&new], &options).await {
            Ok(results) => match results.into_iter().next() {
                Some(Ok(_)) | Some(Err((_, RDKafkaErrorCode::TopicAlreadyExists))) => Ok(()),
                Some(Err((_, code))) => Err(format!("{code:?}")),
                None => Err("no result".into()),
            },
            Err(e) => Err(e.to_string()),
        };
        match outcome {
            Ok(()) => return Ok(()),
            Err(e) if Instant::now() > deadline => {
                bail!("creating topic {topic} on {brokers}: {e}")
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
}
