//! The HTTP edge: routes, authentication, body limits and the answers clients rely on.
//!
//! Handlers take any `http_body::Body`, so they run in unit tests without a socket.

use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use http::header::{AUTHORIZATION, CONTENT_LENGTH, CONTENT_TYPE, RETRY_AFTER};
use http::{HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Body;
use serde_json::{json, Value};
use tally_core::body::BodyError;
use tally_core::config::{Config, Tenant, Tenants};
use tally_core::validate::Refused;
use tally_core::{BodyFormat, Catalog, Dialect, Encoded, Validator};
use time::OffsetDateTime;

use crate::error::SinkError;
use crate::kafka::EventSink;
use crate::metrics::{EVENTS, HTTP_DURATION, HTTP_REQUESTS, IN_FLIGHT};

/// Where a route's events come from and how it answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Api {
    /// `/v1/events`: 202 with counts; partial acceptance allowed.
    Native,
    /// `/api/v1/events`: OpenMeter-compatible; 204, problem+json, all or nothing.
    OpenMeter,
}

/// The clock the collector stamps and checks event times with.
pub type Clock = Arc<dyn Fn() -> OffsetDateTime + Send + Sync>;

/// Shared state of every request.
pub struct App<S> {
    pub(crate) sink: S,
    catalog: Catalog,
    tenants: Tenants,
    config: Config,
    clock: Clock,
    hot: Hot,
}

/// The metric handles every accepted request touches, looked up once: a `metrics::*!` macro
/// builds its key and searches the registry on every call (six per request, about 1.5 % of
/// the collector's CPU with one event per POST).
struct Hot {
    in_flight: metrics::Gauge,
    accepted: metrics::Counter,
    /// Per event route (native, OpenMeter): its success counter and its latency histogram.
    routes: [(metrics::Counter, metrics::Histogram); 2],
}

impl Hot {
    fn new() -> Hot {
        let route = |route: &'static str, status: StatusCode| {
            (
                metrics::counter!(HTTP_REQUESTS, "route" => route, "status" => status.as_str().to_owned()),
                metrics::histogram!(HTTP_DURATION, "route" => route),
            )
        };
        Hot {
            in_flight: metrics::gauge!(IN_FLIGHT),
            accepted: metrics::counter!(EVENTS, "outcome" => "accepted", "reason" => ""),
            routes: [
                route("/v1/events", StatusCode::ACCEPTED),
                route("/api/v1/events", StatusCode::NO_CONTENT),
            ],
        }
    }
}

type Reply = Response<Full<Bytes>>;
type BoxError = Box<dyn std::error::Error + Send + Sync>;

impl<S: EventSink> App<S> {
    pub fn new(config: Config, sink: S) -> App<S> {
        Self::with_clock(config, sink, Arc::new(OffsetDateTime::now_utc))
    }

    pub fn with_clock(config: Config, sink: S, clock: Clock) -> App<S> {
        App {
            sink,
            catalog: config.catalog(),
            tenants: config.tenants(),
            config,
            clock,
            hot: Hot::new(),
        }
    }

    /// Answers one request; never fails (errors are answers).
    pub async fn handle<B>(&self, req: Request<B>) -> Reply
    where
        B: Body<Data = Bytes> + Send,
        B::Error: Into<BoxError>,
    {
        let started = Instant::now();
        let route = match req.uri().path() {
            "/v1/events" => "/v1/events",
            "/api/v1/events" => "/api/v1/events",
            "/healthz" => "/healthz",
            "/readyz" => "/readyz",
            "/metrics" => "/metrics",
            _ => "other",
        };
        let reply = match (req.method(), route) {
            (&Method::POST, "/v1/events") => self.ingest(req, Api::Native).await,
            (&Method::POST, "/api/v1/events") => self.ingest(req, Api::OpenMeter).await,
            (&Method::GET, "/healthz") => json_reply(StatusCode::OK, &json!({"status": "ok"})),
            (&Method::GET, "/readyz") => self.readyz(),
            (&Method::GET, "/metrics") => {
                let text = crate::metrics::prometheus().render();
                let mut r = Response::new(Full::new(Bytes::from(text)));
                r.headers_mut().insert(
                    CONTENT_TYPE,
                    "text/plain; version=0.0.4".parse().expect("static"),
                );
                r
            }
            (_, "other") => error_reply(StatusCode::NOT_FOUND, "no such route"),
            _ => error_reply(
                StatusCode::METHOD_NOT_ALLOWED,
                "method not allowed on this route",
            ),
        };
        let hot = match (route, reply.status()) {
            ("/v1/events", StatusCode::ACCEPTED) => Some(&self.hot.routes[0]),
            ("/api/v1/events", StatusCode::NO_CONTENT) => Some(&self.hot.routes[1]),
            _ => None,
        };
        let elapsed = started.elapsed().as_secs_f64();
        match hot {
            Some((requests, duration)) => {
                requests.increment(1);
                duration.record(elapsed);
            }
            None => {
                let status = reply.status().as_str().to_owned();
                metrics::counter!(HTTP_REQUESTS, "route" => route, "status" => status).increment(1);
                metrics::histogram!(HTTP_DURATION, "route" => route).record(elapsed);
            }
        }
        reply
    }

    fn readyz(&self) -> Reply {
        if self.sink.is_ready() {
            json_reply(StatusCode::OK, &json!({"status": "ready"}))
        } else {
            let mut r = error_reply(StatusCode::SERVICE_UNAVAILABLE, "broker unreachable");
            self.retry_after(&mut r);
            r
        }
    }

    async fn ingest<B>(&self, req: Request<B>, api: Api) -> Reply
    where
        B: Body<Data = Bytes> + Send,
        B::Error: Into<BoxError>,
    {
        self.hot.in_flight.increment(1.0);
        let _done = Decrement(&self.hot.in_flight);
        let reply = |status, detail: &str| self.problem(api, status, detail, &[]);
        let Some(tenant) = self.authenticate(&req) else {
            let mut r = reply(
                StatusCode::UNAUTHORIZED,
                "missing or unknown API key (Authorization: Bearer <key>)",
            );
            r.headers_mut()
                .insert("www-authenticate", "Bearer".parse().expect("static"));
            return r;
        };
        let format = match content_type(&req, api) {
            Ok(f) => f,
            Err(detail) => return reply(StatusCode::UNSUPPORTED_MEDIA_TYPE, &detail),
        };
        let limit = self.config.collector.max_body_bytes;
        let declared = req
            .headers()
            .get(CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        let too_large = format!("body larger than {limit} bytes");
        if declared.is_some_and(|n| n > limit as u64) {
            return reply(StatusCode::PAYLOAD_TOO_LARGE, &too_large);
        }
        let bytes = match Limited::new(req.into_body(), limit).collect().await {
            Ok(b) => b.to_bytes(),
            Err(e) if e.is::<http_body_util::LengthLimitError>() => {
                return reply(StatusCode::PAYLOAD_TOO_LARGE, &too_large)
            }
            Err(e) => {
                return reply(
                    StatusCode::BAD_REQUEST,
                    &format!("body: could not be read: {e}"),
                )
            }
        };

        let dialect = match api {
            Api::Native => Dialect::Native,
            Api::OpenMeter => Dialect::CloudEvents,
        };
        let validator = Validator {
            catalog: &self.catalog,
            limits: &self.config.validation,
            dialect,
        };
        let max_events = self.config.validation.max_batch_events;
        let now = (self.clock)();
        let (records, refused) = match validator
            .encode_body(&bytes, format, max_events, tenant, now)
        {
            Ok(r) => r,
            Err(e) => {
                let reason = match e {
                    BodyError::Malformed { .. } => "malformed",
                    _ => "body",
                };
                metrics::counter!(EVENTS, "outcome" => "rejected", "reason" => reason).increment(1);
                return reply(StatusCode::BAD_REQUEST, &e.to_string());
            }
        };
        // The records own their bytes: the body (up to `max_body_bytes`) need not be held
        // while the broker acknowledges them.
        drop(bytes);
        for r in &refused {
            metrics::counter!(EVENTS, "outcome" => "rejected", "reason" => r.reason).increment(1);
        }
        if records.is_empty() || (api == Api::OpenMeter && !refused.is_empty()) {
            let detail = match api {
                Api::Native => "every event was refused",
                Api::OpenMeter => "invalid events; no event of this request was stored",
            };
            return self.problem(api, StatusCode::BAD_REQUEST, detail, &refused);
        }
        self.publish(api, &records, &refused).await
    }

    async fn publish(&self, api: Api, records: &[Encoded], refused: &[Refused]) -> Reply {
        let published = self.sink.publish(records).await;
        for e in &published.failures {
            metrics::counter!(EVENTS, "outcome" => "failed", "reason" => e.reason()).increment(1);
        }
        self.hot.accepted.increment(published.delivered as u64);
        if let Some(first) = published.failures.first() {
            debug_assert!(first.is_retryable());
            let failed = published.failures.len();
            let detail = format!(
                "{first}: {failed} of {} events not stored, {} stored; retry the request \
                 (events are deduplicated by id)",
                records.len(),
                published.delivered
            );
            if matches!(first, SinkError::Delivery(_)) {
                tracing::error!(error = %first, failed, "delivery failed");
            }
            let mut r = match api {
                Api::Native => json_reply(
                    StatusCode::SERVICE_UNAVAILABLE,
                    &json!({"error": detail, "stored": published.delivered, "not_stored": failed}),
                ),
                Api::OpenMeter => problem(StatusCode::SERVICE_UNAVAILABLE, &detail, &[]),
            };
            self.retry_after(&mut r);
            return r;
        }
        match api {
            Api::OpenMeter => {
                let mut r = Response::new(Full::new(Bytes::new()));
                *r.status_mut() = StatusCode::NO_CONTENT;
                r
            }
            Api::Native if refused.is_empty() => {
                // `{"accepted":N}` without building a JSON value: the answer to most requests.
                let body = format!("{{\"accepted\":{}}}", published.delivered);
                let mut r = Response::new(Full::new(Bytes::from(body)));
                *r.status_mut() = StatusCode::ACCEPTED;
                r.headers_mut().insert(CONTENT_TYPE, JSON);
                r
            }
            Api::Native => json_reply(
                StatusCode::ACCEPTED,
                &json!({"accepted": published.delivered, "rejected": rejected_json(refused)}),
            ),
        }
    }

    fn authenticate<B>(&self, req: &Request<B>) -> Option<&Tenant> {
        let value = req.headers().get(AUTHORIZATION)?.to_str().ok()?;
        let (scheme, key) = value.split_once(' ')?;
        if !scheme.eq_ignore_ascii_case("bearer") {
            return None;
        }
        self.tenants.authenticate(key.trim())
    }

    fn retry_after(&self, r: &mut Reply) {
        let secs = self.config.collector.retry_after_secs.to_string();
        r.headers_mut().insert(
            RETRY_AFTER,
            secs.parse().expect("digits are a valid header"),
        );
    }

    fn problem(&self, api: Api, status: StatusCode, detail: &str, refused: &[Refused]) -> Reply {
        match api {
            Api::OpenMeter => problem(status, detail, refused),
            Api::Native if refused.is_empty() => error_reply(status, detail),
            Api::Native => json_reply(
                status,
                &json!({"accepted": 0, "rejected": rejected_json(refused)}),
            ),
        }
    }
}

/// Lowers the in-flight gauge however the handler returns.
struct Decrement<'a>(&'a metrics::Gauge);

impl Drop for Decrement<'_> {
    fn drop(&mut self) {
        self.0.decrement(1.0);
    }
}

fn content_type<B>(req: &Request<B>, api: Api) -> Result<BodyFormat, String> {
    let raw = req
        .headers()
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let essence = raw
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    match (api, essence.as_str()) {
        (_, "application/json") => Ok(BodyFormat::Json),
        (Api::Native, "application/x-ndjson" | "application/ndjson") => Ok(BodyFormat::Ndjson),
        (Api::OpenMeter, "application/cloudevents+json") => Ok(BodyFormat::CloudEvent),
        (Api::OpenMeter, "application/cloudevents-batch+json") => Ok(BodyFormat::CloudEventsBatch),
        (Api::Native, _) => Err(format!(
            "content type {raw:?} not supported; send application/json or application/x-ndjson"
        )),
        (Api::OpenMeter, _) => Err(format!(
            "content type {raw:?} not supported; send application/cloudevents+json, \
             application/cloudevents-batch+json or application/json"
        )),
    }
}

fn rejected_json(refused: &[Refused]) -> Value {
    refused
        .iter()
        .map(|r| json!({"index": r.index, "id": r.id, "error": r.error}))
        .collect()
}

const JSON: HeaderValue = HeaderValue::from_static("application/json");

fn json_reply(status: StatusCode, body: &Value) -> Reply {
    let mut r = Response::new(Full::new(Bytes::from(body.to_string())));
    *r.status_mut() = status;
    r.headers_mut().insert(CONTENT_TYPE, JSON);
    r
}

fn error_reply(status: StatusCode, error: &str) -> Reply {
    json_reply(status, &json!({"error": error}))
}

/// RFC 9457 problem details, as OpenMeter's clients expect.
fn problem(status: StatusCode, detail: &str, refused: &[Refused]) -> Reply {
    let mut body = json!({
        "type": "about:blank",
        "title": status.canonical_reason().unwrap_or("Error"),
        "status": status.as_u16(),
        "detail": detail,
    });
    if !refused.is_empty() {
        body["errors"] = rejected_json(refused);
    }
    let mut r = json_reply(status, &body);
    r.headers_mut().insert(
        CONTENT_TYPE,
        "application/problem+json".parse().expect("static"),
    );
    r
}

#[cfg(test)]
mod tests;
