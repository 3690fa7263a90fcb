//! The HTTP load generator: `concurrency` tasks, each on its own keep-alive connection,
//! sending pre-built bodies until all are sent or the deadline passes.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use bytes::Bytes;
use http::header::{AUTHORIZATION, CONTENT_TYPE, HOST};
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Empty, Full};
use hyper::client::conn::http1::{self, SendRequest};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use crate::events::{Body, API_KEY};

/// One request never waits longer than this: the collector's own broker timeout is 5 s.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(15);

/// What a load run achieved.
#[derive(Debug, Clone, Default)]
pub struct LoadResult {
    /// Requests answered 202 with every event accepted.
    pub requests: usize,
    /// Events in those requests.
    pub events: usize,
    pub errors: usize,
    pub first_error: Option<String>,
    pub elapsed: Duration,
    /// Latency of each successful request, sorted, in microseconds.
    pub latencies_us: Vec<u32>,
}

impl LoadResult {
    pub fn requests_per_sec(&self) -> f64 {
        self.requests as f64 / self.elapsed.as_secs_f64()
    }

    pub fn events_per_sec(&self) -> f64 {
        self.events as f64 / self.elapsed.as_secs_f64()
    }

    /// The `q` quantile of request latency (0.5, 0.99), in milliseconds.
    pub fn latency_ms(&self, q: f64) -> f64 {
        if self.latencies_us.is_empty() {
            return f64::NAN;
        }
        let idx = ((self.latencies_us.len() - 1) as f64 * q).round() as usize;
        f64::from(self.latencies_us[idx]) / 1000.0
    }
}

#[derive(Default)]
struct Worker {
    requests: usize,
    events: usize,
    errors: usize,
    first_error: Option<String>,
    latencies_us: Vec<u32>,
}

impl Worker {
    fn fail(&mut self, e: String) {
        self.errors += 1;
        self.first_error.get_or_insert(e);
    }
}

async fn connect(addr: SocketAddr) -> anyhow::Result<SendRequest<Full<Bytes>>> {
    let stream = TcpStream::connect(addr)
        .await
        .with_context(|| format!("connecting to {addr}"))?;
    stream.set_nodelay(true)?;
    let (sender, conn) = http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(sender)
}

/// POSTs `total` requests to `path`, cycling through `bodies` (shared among the tasks in
/// order), stopping early after `max_time`. Connections are opened before the clock starts.
/// A request succeeds when answered 202.
pub async fn drive(
    addr: SocketAddr,
    path: &'static str,
    bodies: Arc<Vec<Body>>,
    total: usize,
    concurrency: usize,
    max_time: Duration,
) -> anyhow::Result<LoadResult> {
    drive_expecting(
        addr,
        path,
        bodies,
        total,
        concurrency,
        max_time,
        StatusCode::ACCEPTED,
    )
    .await
}

/// [`drive`] for an endpoint whose success is `expect` rather than 202.
pub async fn drive_expecting(
    addr: SocketAddr,
    path: &'static str,
    bodies: Arc<Vec<Body>>,
    total: usize,
    concurrency: usize,
    max_time: Duration,
    expect: StatusCode,
) -> anyhow::Result<LoadResult> {
    anyhow::ensure!(!bodies.is_empty(), "no bodies to send");
    let mut senders = Vec::with_capacity(concurrency);
    for _ in 0..concurrency.max(1) {
        senders.push(connect(addr).await?);
    }
    let started = Instant::now();
    let plan = Arc::new(Plan {
        addr,
        path,
        host: addr.to_string(),
        bodies,
        total,
        next: AtomicUsize::new(0),
        stop_at: started + max_time,
        expect,
    });
    let tasks: Vec<_> = senders
        .into_iter()
        .map(|sender| tokio::spawn(worker(plan.clone(), sender)))
        .collect();
    let mut result = LoadResult::default();
    for task in tasks {
        let w = task.await.context("load task panicked")?;
        result.requests += w.requests;
        result.events += w.events;
        result.errors += w.errors;
        if result.first_error.is_none() {
            result.first_error = w.first_error;
        }
        result.latencies_us.extend(w.latencies_us);
    }
    result.elapsed = started.elapsed();
    result.latencies_us.sort_unstable();
    Ok(result)
}

/// What every task of one load run shares.
struct Plan {
    addr: SocketAddr,
    path: &'static str,
    host: String,
    bodies: Arc<Vec<Body>>,
    total: usize,
    /// The next request to send, claimed by whichever task is free.
    next: AtomicUsize,
    stop_at: Instant,
    /// The status of a successful answer.
    expect: StatusCode,
}

async fn worker(plan: Arc<Plan>, mut sender: SendRequest<Full<Bytes>>) -> Worker {
    let mut w = Worker {
        latencies_us: Vec::with_capacity(plan.total.min(1 << 20) / 8),
        ..Worker::default()
    };
    loop {
        let i = plan.next.fetch_add(1, Ordering::Relaxed);
        if i >= plan.total || Instant::now() >= plan.stop_at {
            return w;
        }
        let body = &plan.bodies[i % plan.bodies.len()];
        if sender.ready().await.is_err() {
            // The server closed the connection: count it and open another.
            w.fail("connection closed".into());
            match connect(plan.addr).await {
                Ok(s) => sender = s,
                Err(e) => {
                    w.fail(e.to_string());
                    return w;
                }
            }
        }
        let req = Request::post(plan.path)
            .header(HOST, plan.host.as_str())
            .header(CONTENT_TYPE, "application/json")
            .header(AUTHORIZATION, format!("Bearer {API_KEY}"))
            .body(Full::new(body.bytes.clone()))
            .expect("a valid request");
        let sent = Instant::now();
        let answer = tokio::time::timeout(REQUEST_TIMEOUT, async {
            let resp = sender.send_request(req).await?;
            let status = resp.status();
            let bytes = resp.into_body().collect().await?.to_bytes();
            Ok::<_, hyper::Error>((status, bytes))
        })
        .await;
        let latency = sent.elapsed();
        match answer {
            Ok(Ok((status, bytes))) if status == plan.expect => {
                if body.events > 1 && accepted(&bytes) != Some(body.events) {
                    w.fail(format!(
                        "batch partly accepted: {}",
                        String::from_utf8_lossy(&bytes)
                    ));
                    continue;
                }
                w.requests += 1;
                w.events += body.events;
                w.latencies_us
                    .push(u32::try_from(latency.as_micros()).unwrap_or(u32::MAX));
            }
            Ok(Ok((status, bytes))) => {
                w.fail(format!("{status}: {}", String::from_utf8_lossy(&bytes)));
            }
            Ok(Err(e)) => w.fail(e.to_string()),
            Err(_) => w.fail(format!("no answer within {REQUEST_TIMEOUT:?}")),
        }
    }
}

fn accepted(body: &[u8]) -> Option<usize> {
    let v: serde_json::Value = serde_json::from_slice(body).ok()?;
    usize::try_from(v.get("accepted")?.as_u64()?).ok()
}

/// The status of `GET path` on a fresh connection, or `None` if nothing answered in 2 s.
pub async fn get_status(addr: SocketAddr, path: &str) -> Option<StatusCode> {
    tokio::time::timeout(Duration::from_secs(2), async {
        let stream = TcpStream::connect(addr).await.ok()?;
        let (mut sender, conn) = http1::handshake::<_, Empty<Bytes>>(TokioIo::new(stream))
            .await
            .ok()?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        let req = Request::get(path)
            .header(HOST, addr.to_string())
            .body(Empty::new())
            .ok()?;
        Some(sender.send_request(req).await.ok()?.status())
    })
    .await
    .ok()
    .flatten()
}

/// Waits until `GET path` answers 200, or fails after `within`.
pub async fn wait_ok(addr: SocketAddr, path: &str, within: Duration) -> anyhow::Result<()> {
    wait_for(addr, path, within, |s| s == StatusCode::OK).await
}

/// Waits until `GET path` gets any HTTP answer, or fails after `within`.
pub async fn wait_answer(addr: SocketAddr, path: &str, within: Duration) -> anyhow::Result<()> {
    wait_for(addr, path, within, |_| true).await
}

async fn wait_for(
    addr: SocketAddr,
    path: &str,
    within: Duration,
    good: impl Fn(StatusCode) -> bool,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + within;
    loop {
        if get_status(addr, path).await.is_some_and(&good) {
            return Ok(());
        }
        if Instant::now() > deadline {
            anyhow::bail!("http://{addr}{path} did not answer as expected within {within:?}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
