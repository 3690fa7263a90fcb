//! The HTTP edge every tally service shares: a graceful hyper server loop, JSON replies and
//! errors, the Prometheus page, bearer keys and query strings.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::header::{AUTHORIZATION, CONTENT_TYPE};
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use hyper_util::server::graceful::GracefulShutdown;
use metrics_exporter_prometheus::PrometheusHandle;
use serde_json::{json, Value};
use tally_core::config::{Tenant, Tenants};
use tokio::net::TcpListener;
use tokio::sync::watch;

pub type Reply = Response<Full<Bytes>>;

/// Time in-flight requests get to finish once a server is told to stop.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// A service's routes.
pub trait Handler: Send + Sync + 'static {
    fn handle(&self, req: Request<Incoming>) -> impl Future<Output = Reply> + Send;
}

/// Serves `api` on `listen` until `stop` flips, then lets in-flight requests finish (up to
/// [`SHUTDOWN_GRACE`]). Returns the bound address (port 0 picks one) and the server task.
pub async fn serve<H: Handler>(
    listen: &str,
    api: Arc<H>,
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
                    let _ = stream.set_nodelay(true);
                    let api = api.clone();
                    let service = service_fn(move |req| {
                        let api = api.clone();
                        async move { Ok::<_, Infallible>(api.handle(req).await) }
                    });
                    let conn = graceful.watch(
                        http1::Builder::new().serve_connection(TokioIo::new(stream), service),
                    );
                    tokio::spawn(async move {
                        let _ = conn.await;
                    });
                }
                _ = stop.changed() => break,
            }
        }
        let _ = tokio::time::timeout(SHUTDOWN_GRACE, graceful.shutdown()).await;
    });
    Ok((addr, task))
}

pub fn json_reply(status: StatusCode, body: &Value) -> Reply {
    let mut r = Response::new(Full::new(Bytes::from(body.to_string())));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(CONTENT_TYPE, "application/json".parse().expect("static"));
    r
}

/// `{"error": message}` with `status`.
pub fn error(status: StatusCode, message: &str) -> Reply {
    json_reply(status, &json!({"error": message}))
}

/// The Prometheus text page of `handle`.
pub fn metrics_reply(handle: &PrometheusHandle) -> Reply {
    let mut r = Response::new(Full::new(Bytes::from(handle.render())));
    r.headers_mut().insert(
        CONTENT_TYPE,
        "text/plain; version=0.0.4".parse().expect("static"),
    );
    r
}

/// The tenant whose key the request bears (answer [`unauthorized`] if none).
pub fn tenant<'a, B>(req: &Request<B>, tenants: &'a Tenants) -> Option<&'a Tenant> {
    bearer(req).and_then(|k| tenants.authenticate(k))
}

/// The 401 for a request without a known key.
pub fn unauthorized() -> Reply {
    error(
        StatusCode::UNAUTHORIZED,
        "missing or unknown API key (Authorization: Bearer <key>)",
    )
}

/// The answer to a request no route took: 404 for an unknown path (`route` "other"), 405
/// for a known path asked with the wrong method.
pub fn no_route(route: &str) -> Reply {
    if route == "other" {
        error(StatusCode::NOT_FOUND, "no such route")
    } else {
        error(
            StatusCode::METHOD_NOT_ALLOWED,
            "method not allowed on this route",
        )
    }
}

/// Counts `reply` in the counter `name` by route and status, and returns it.
pub fn counted(name: &'static str, route: &'static str, reply: Reply) -> Reply {
    let status = reply.status().as_str().to_owned();
    metrics::counter!(name, "route" => route, "status" => status).increment(1);
    reply
}

/// The key of `Authorization: Bearer <key>`, if the request has one.
pub fn bearer<B>(req: &Request<B>) -> Option<&str> {
    req.headers()
        .get(AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split_once(' '))
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .map(|(_, k)| k.trim())
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

#[cfg(test)]
mod tests {
    use super::*;

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

    #[test]
    fn bearer_keys() {
        let req = |v: &str| {
            Request::builder()
                .header(AUTHORIZATION, v)
                .body(())
                .expect("request")
        };
        assert_eq!(bearer(&req("Bearer k1")), Some("k1"));
        assert_eq!(bearer(&req("bearer  k2 ")), Some("k2"));
        assert_eq!(bearer(&req("Basic k3")), None);
        assert_eq!(bearer(&Request::new(())), None);
    }
}
