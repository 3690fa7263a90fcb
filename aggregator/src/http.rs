//! The aggregator's HTTP edge: the usage API, `/healthz`, `/readyz`, `/metrics`.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{AUTHORIZATION, CONTENT_TYPE};
use http::{Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use hyper_util::server::graceful::GracefulShutdown;
use serde_json::{json, Value};
use tally_core::{Catalog, Config, Tenants};
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::metrics::{HTTP_REQUESTS, USAGE_DURATION};
use crate::query::{self, Bind};
use crate::service::Status;

type Reply = Response<Full<Bytes>>;

pub struct Api {
    client: clickhouse::Client,
    catalog: Catalog,
    tenants: Tenants,
    status: Arc<Status>,
}

impl Api {
    pub fn new(config: &Config, status: Arc<Status>) -> Api {
        Api {
            client: crate::migrate::client(&config.clickhouse),
            catalog: config.catalog(),
            tenants: config.tenants(),
            status,
        }
    }

    pub async fn handle<B>(&self, req: Request<B>) -> Reply {
        let route = match req.uri().path() {
            "/v1/usage" => "/v1/usage",
            "/healthz" => "/healthz",
            "/readyz" => "/readyz",
            "/metrics" => "/metrics",
            _ => "other",
        };
        let reply = match (req.method(), route) {
            (&Method::GET, "/v1/usage") => self.usage(&req).await,
            (&Method::GET, "/healthz") => json_reply(StatusCode::OK, &json!({"status": "ok"})),
            (&Method::GET, "/readyz") => {
                let consuming = self.status.consuming.load(Ordering::Acquire);
                let clickhouse = self.status.clickhouse_ok.load(Ordering::Acquire);
                let status = if consuming && clickhouse {
                    StatusCode::OK
                } else {
                    StatusCode::SERVICE_UNAVAILABLE
                };
                json_reply(
                    status,
                    &json!({"consuming": consuming, "clickhouse": clickhouse}),
                )
            }
            (&Method::GET, "/metrics") => {
                let mut r = Response::new(Full::new(Bytes::from(
                    crate::metrics::prometheus().render(),
                )));
                r.headers_mut().insert(
                    CONTENT_TYPE,
                    "text/plain; version=0.0.4".parse().expect("static"),
                );
                r
            }
            (_, "other") => error(StatusCode::NOT_FOUND, "no such route"),
            _ => error(
                StatusCode::METHOD_NOT_ALLOWED,
                "method not allowed on this route",
            ),
        };
        let status = reply.status().as_str().to_owned();
        metrics::counter!(HTTP_REQUESTS, "route" => route, "status" => status).increment(1);
        reply
    }

    async fn usage<B>(&self, req: &Request<B>) -> Reply {
        let started = Instant::now();
        let key = req
            .headers()
            .get(AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.split_once(' '))
            .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
            .map(|(_, k)| k.trim());
        let Some(tenant) = key.and_then(|k| self.tenants.authenticate(k)) else {
            return error(
                StatusCode::UNAUTHORIZED,
                "missing or unknown API key (Authorization: Bearer <key>)",
            );
        };
        let pairs = match decode_query(req.uri().query().unwrap_or("")) {
            Ok(p) => p,
            Err(e) => return error(StatusCode::BAD_REQUEST, &e),
        };
        let q = match query::parse(&pairs, &self.catalog) {
            Ok(q) => q,
            Err(e) => return error(StatusCode::BAD_REQUEST, &e.to_string()),
        };
        let sql = query::sql(&q, &tenant.id);
        let mut statement = self.client.query(&sql.text);
        for b in sql.binds {
            statement = match b {
                Bind::Str(s) => statement.bind(s),
                Bind::Int(i) => statement.bind(i),
            };
        }
        let rows = tokio::time::timeout(
            Duration::from_secs(30),
            statement.fetch_all::<query::UsageRow>(),
        )
        .await;
        metrics::histogram!(USAGE_DURATION).record(started.elapsed().as_secs_f64());
        match rows {
            Ok(Ok(rows)) => json_reply(StatusCode::OK, &query::answer(&q, &rows)),
            Ok(Err(e)) => {
                tracing::error!(error = %e, "usage query failed");
                error(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "usage store unavailable; retry",
                )
            }
            Err(_) => error(
                StatusCode::SERVICE_UNAVAILABLE,
                "usage query timed out; retry",
            ),
        }
    }
}

/// `application/x-www-form-urlencoded` pairs; invalid escapes or UTF-8 are refused.
pub fn decode_query(q: &str) -> Result<Vec<(String, String)>, String> {
    fn decode(s: &str) -> Result<String, String> {
        let mut out = Vec::with_capacity(s.len());
        let b = s.as_bytes();
        let mut i = 0;
        while i < b.len() {
            match b[i] {
                b'+' => out.push(b' '),
                b'%' => {
                    let hex = b
                        .get(i + 1..i + 3)
                        .and_then(|h| std::str::from_utf8(h).ok());
                    let byte = hex
                        .and_then(|h| u8::from_str_radix(h, 16).ok())
                        .ok_or_else(|| format!("query: bad escape in {s:?}"))?;
                    out.push(byte);
                    i += 2;
                }
                c => out.push(c),
            }
            i += 1;
        }
        String::from_utf8(out).map_err(|_| format!("query: {s:?} is not UTF-8"))
    }
    q.split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            Ok((decode(k)?, decode(v)?))
        })
        .collect()
}

fn json_reply(status: StatusCode, body: &Value) -> Reply {
    let mut r = Response::new(Full::new(Bytes::from(body.to_string())));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(CONTENT_TYPE, "application/json".parse().expect("static"));
    r
}

fn error(status: StatusCode, message: &str) -> Reply {
    json_reply(status, &json!({"error": message}))
}

/// Serves the API until `stop` flips.
pub async fn serve(
    listen: &str,
    api: Arc<Api>,
    mut stop: watch::Receiver<bool>,
) -> std::io::Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
    let listener = TcpListener::bind(listen).await?;
    let addr = listener.local_addr()?;
    let task = tokio::spawn(async move {
        let graceful = GracefulShutdown::new();
        loop {
            tokio::select! {
                accepted = listener.accept() => {
                    let Ok((stream, _)) = accepted else { continue };
                    let api = api.clone();
                    let service = service_fn(move |req| {
                        let api = api.clone();
                        async move { Ok::<_, Infallible>(api.handle(req).await) }
                    });
                    let conn = graceful.watch(http1::Builder::new().serve_connection(TokioIo::new(stream), service));
                    tokio::spawn(async move {
                        let _ = conn.await;
                    });
                }
                _ = stop.changed() => break,
            }
        }
        let _ = tokio::time::timeout(Duration::from_secs(5), graceful.shutdown()).await;
    });
    Ok((addr, task))
}

#[cfg(test)]
mod tests {
    use super::decode_query;

    #[test]
    fn query_strings_decode() {
        let got = decode_query("meter=tokens&filter%5Bmodel%5D=gpt-4o&tz=%2B02%3A00&x=a+b&flag")
            .expect("valid");
        let want = [
            ("meter", "tokens"),
            ("filter[model]", "gpt-4o"),
            ("tz", "+02:00"),
            ("x", "a b"),
            ("flag", ""),
        ];
        let want: Vec<(String, String)> = want
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        assert_eq!(got, want);
        assert!(decode_query("a=%zz").is_err());
        assert!(decode_query("a=%ff").is_err());
    }
}
