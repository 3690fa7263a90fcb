//! ClickHouse over HTTP for the aggregator bench: the server whose CPU is counted (a private
//! one by default, so other people's queries on the shared stack are not counted as ours),
//! plain SQL, and the small HTTP client every phase uses.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use bytes::Bytes;
use http::header::{AUTHORIZATION, CONTENT_TYPE};
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tokio::process::{Child, Command};

use crate::broker::free_port;
use crate::procfs;

/// No single request of the bench waits longer than this.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(60);

/// A keep-alive HTTP/1 client (connections are pooled per host).
#[derive(Clone)]
pub struct Http {
    client: Client<HttpConnector, Full<Bytes>>,
}

impl Default for Http {
    fn default() -> Self {
        Http::new()
    }
}

impl Http {
    pub fn new() -> Http {
        Http {
            client: Client::builder(TokioExecutor::new()).build_http(),
        }
    }

    /// One request; the status and the whole body.
    pub async fn request(
        &self,
        method: Method,
        url: &str,
        bearer: Option<&str>,
        body: Bytes,
    ) -> anyhow::Result<(StatusCode, Bytes)> {
        let mut req = Request::builder().method(method).uri(url);
        if let Some(key) = bearer {
            req = req.header(AUTHORIZATION, format!("Bearer {key}"));
        }
        if !body.is_empty() {
            req = req.header(CONTENT_TYPE, "application/json");
        }
        let req = req
            .body(Full::new(body))
            .with_context(|| format!("building a request to {url}"))?;
        tokio::time::timeout(REQUEST_TIMEOUT, async {
            let resp = self.client.request(req).await?;
            let status = resp.status();
            let bytes = resp.into_body().collect().await?.to_bytes();
            Ok::<_, anyhow::Error>((status, bytes))
        })
        .await
        .with_context(|| format!("{url}: no answer within {REQUEST_TIMEOUT:?}"))?
        .with_context(|| format!("requesting {url}"))
    }

    pub async fn get(
        &self,
        url: &str,
        bearer: Option<&str>,
    ) -> anyhow::Result<(StatusCode, Bytes)> {
        self.request(Method::GET, url, bearer, Bytes::new()).await
    }

    pub async fn post(&self, url: &str, body: Bytes) -> anyhow::Result<(StatusCode, Bytes)> {
        self.request(Method::POST, url, None, body).await
    }
}

/// `s` for a URL query string (everything but unreserved characters escaped).
pub fn url_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len() * 3);
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// A string literal for ClickHouse SQL.
pub fn quote(s: &str) -> String {
    format!("'{}'", s.replace('\\', "\\\\").replace('\'', "\\'"))
}

/// Where the ClickHouse server comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// A server started by the bench on free loopback ports, state in the work folder.
    Private,
    /// The local stack's server (`TALLY_CLICKHOUSE_URL`, else 127.0.0.1:18123).
    Stack,
}

impl Source {
    pub fn label(self) -> &'static str {
        match self {
            Source::Private => "private",
            Source::Stack => "stack",
        }
    }
}

/// The ClickHouse server the bench writes to, and the process whose CPU it counts.
pub struct ClickHouse {
    pub url: String,
    pub pid: u32,
    pub source: Source,
    http: Http,
    child: Option<Child>,
    dir: Option<PathBuf>,
}

impl ClickHouse {
    pub async fn start(source: Source, parent: &Path) -> anyhow::Result<ClickHouse> {
        match source {
            Source::Private => ClickHouse::private(parent).await,
            Source::Stack => ClickHouse::stack().await,
        }
    }

    /// Debian's `clickhouse-server` with a minimal config on free ports (as the aggregator's
    /// outage test starts one).
    pub async fn private(parent: &Path) -> anyhow::Result<ClickHouse> {
        let dir = parent.join("clickhouse");
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        std::fs::copy("/etc/clickhouse-server/users.xml", dir.join("users.xml")).context(
            "copying /etc/clickhouse-server/users.xml (is clickhouse-server installed?)",
        )?;
        let (http_port, tcp_port, interserver) = (free_port()?, free_port()?, free_port()?);
        let d = dir.display();
        let config = format!(
            r#"<?xml version="1.0"?>
<yandex>
    <logger><level>warning</level><log>{d}/server.log</log><errorlog>{d}/error.log</errorlog></logger>
    <http_port>{http_port}</http_port>
    <tcp_port>{tcp_port}</tcp_port>
    <interserver_http_port>{interserver}</interserver_http_port>
    <listen_host>127.0.0.1</listen_host>
    <path>{d}/data/</path>
    <tmp_path>{d}/tmp/</tmp_path>
    <user_files_path>{d}/user_files/</user_files_path>
    <format_schema_path>{d}/format_schemas/</format_schema_path>
    <users_config>{d}/users.xml</users_config>
    <default_profile>default</default_profile>
    <default_database>default</default_database>
    <timezone>UTC</timezone>
    <mark_cache_size>268435456</mark_cache_size>
</yandex>
"#
        );
        std::fs::write(dir.join("config.xml"), config).context("writing the clickhouse config")?;
        let out = std::fs::File::create(dir.join("stdout.log")).context("clickhouse log")?;
        let child = Command::new("clickhouse-server")
            .arg(format!(
                "--config-file={}",
                dir.join("config.xml").display()
            ))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(out)
            .kill_on_drop(true)
            .spawn()
            .context("starting clickhouse-server")?;
        let pid = child.id().context("clickhouse-server has no pid")?;
        let mut ch = ClickHouse {
            url: format!("http://127.0.0.1:{http_port}"),
            pid,
            source: Source::Private,
            http: Http::new(),
            child: Some(child),
            dir: Some(dir.clone()),
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if ch.sql("SELECT 1").await.is_ok_and(|r| r.trim() == "1") {
                return Ok(ch);
            }
            let exited = match ch.child.as_mut() {
                Some(c) => c.try_wait()?.is_some(),
                None => false,
            };
            if exited || Instant::now() > deadline {
                let log = std::fs::read_to_string(dir.join("error.log")).unwrap_or_default();
                bail!("private clickhouse-server did not answer within 30 s; error log:\n{log}");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The local stack's server; its pid from `TALLY_CLICKHOUSE_PID`, the stack's pid file,
    /// or the `clickhouse-server` process whose config lives under `.stack/`.
    pub async fn stack() -> anyhow::Result<ClickHouse> {
        let url = std::env::var("TALLY_CLICKHOUSE_URL")
            .unwrap_or_else(|_| "http://127.0.0.1:18123".into());
        let pid = stack_pid()
            .context("cannot find the stack's clickhouse-server pid (set TALLY_CLICKHOUSE_PID)")?;
        let ch = ClickHouse {
            url,
            pid,
            source: Source::Stack,
            http: Http::new(),
            child: None,
            dir: None,
        };
        ch.sql("SELECT 1")
            .await
            .with_context(|| format!("the stack's ClickHouse at {} (make stack-up)", ch.url))?;
        Ok(ch)
    }

    /// Runs one statement; the body of the answer (an error names the server's message).
    pub async fn sql(&self, query: &str) -> anyhow::Result<String> {
        let (status, body) = self
            .http
            .post(&format!("{}/", self.url), Bytes::from(query.to_owned()))
            .await?;
        let text = String::from_utf8_lossy(&body).into_owned();
        if status != StatusCode::OK {
            bail!("clickhouse {status}: {}\nquery: {query}", text.trim());
        }
        Ok(text)
    }

    /// CPU seconds the server has used so far.
    pub fn cpu_seconds(&self) -> f64 {
        procfs::cpu_seconds(self.pid).unwrap_or(f64::NAN)
    }

    pub async fn version(&self) -> String {
        self.sql("SELECT version()")
            .await
            .map(|v| v.trim().to_owned())
            .unwrap_or_else(|_| "unknown".into())
    }

    /// Background merges still running in `database`.
    pub async fn merges(&self, database: &str) -> anyhow::Result<u64> {
        let q = format!(
            "SELECT count() FROM system.merges WHERE database = {}",
            quote(database)
        );
        Ok(self.sql(&q).await?.trim().parse().unwrap_or(0))
    }

    /// Waits (at most `within`) until no merge has been running for three polls in a row:
    /// after a drain, so the merges its inserts cause are counted with it; before one, so
    /// an earlier drain's merges are not.
    pub async fn settle(&self, within: Duration) -> Duration {
        let started = Instant::now();
        let mut quiet = 0;
        while quiet < 3 && started.elapsed() < within {
            let merges = self.sql("SELECT count() FROM system.merges").await;
            match merges.map(|m| m.trim().parse::<u64>().unwrap_or(1)) {
                Ok(0) => quiet += 1,
                _ => quiet = 0,
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        started.elapsed()
    }

    pub async fn drop_database(&self, database: &str) {
        let _ = self
            .sql(&format!("DROP DATABASE IF EXISTS {database}"))
            .await;
    }

    pub async fn stop(mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill().await;
        }
        if let Some(dir) = self.dir.take() {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

/// The pid of the local stack's clickhouse-server (see [`ClickHouse::stack`]).
pub fn stack_pid() -> Option<u32> {
    let is_clickhouse = |pid: u32| {
        std::fs::read(format!("/proc/{pid}/cmdline"))
            .is_ok_and(|c| String::from_utf8_lossy(&c).contains("clickhouse"))
    };
    if let Some(pid) = std::env::var("TALLY_CLICKHOUSE_PID")
        .ok()
        .and_then(|p| p.trim().parse().ok())
    {
        return Some(pid);
    }
    let file = Path::new(env!("CARGO_MANIFEST_DIR")).join("../.stack/clickhouse/clickhouse.pid");
    if let Some(pid) = std::fs::read_to_string(file)
        .ok()
        .and_then(|p| p.trim().parse().ok())
        .filter(|&p| is_clickhouse(p))
    {
        return Some(pid);
    }
    let out = std::process::Command::new("pgrep")
        .args(["-f", "clickhouse-server.*\\.stack/"])
        .output()
        .ok()?;
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .find_map(|l| l.trim().parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes() {
        assert_eq!(url_encode("INSERT INTO t"), "INSERT%20INTO%20t");
        assert_eq!(quote("a'b\\c"), "'a\\'b\\\\c'");
    }
}
