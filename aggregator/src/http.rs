//! The aggregator's HTTP edge: the usage API, `/healthz`, `/readyz`, `/metrics`.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use http::{Method, Request, StatusCode};
use hyper::body::Incoming;
use serde_json::json;
use tally_core::{Catalog, Config, Tenants};
use tally_service::http::{
    counted, error, json_reply, metrics_reply, no_route, tenant, unauthorized, Handler, Reply,
};
pub use tally_service::http::{decode_query, serve};

use crate::metrics::{HTTP_REQUESTS, USAGE_DURATION};
use crate::query::{self, Bind};
use crate::service::Status;

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
                // An idle instance has no flush to fail: ask ClickHouse itself, which the
                // usage API needs as well.
                let clickhouse = self.status.clickhouse_ok.load(Ordering::Acquire)
                    && self.clickhouse_answers().await;
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
            (&Method::GET, "/metrics") => metrics_reply(crate::metrics::prometheus()),
            _ => no_route(route),
        };
        counted(HTTP_REQUESTS, route, reply)
    }

    async fn clickhouse_answers(&self) -> bool {
        let probe = self.client.query("SELECT 1").execute();
        matches!(
            tokio::time::timeout(std::time::Duration::from_secs(2), probe).await,
            Ok(Ok(()))
        )
    }

    async fn usage<B>(&self, req: &Request<B>) -> Reply {
        let started = Instant::now();
        let Some(tenant) = tenant(req, &self.tenants) else {
            return unauthorized();
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
            Ok(Ok(rows)) => match query::check(&q, &rows) {
                Ok(()) => json_reply(StatusCode::OK, &query::answer(&q, &rows)),
                Err(e) => error(StatusCode::BAD_REQUEST, &e.to_string()),
            },
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

impl Handler for Api {
    fn handle(&self, req: Request<Incoming>) -> impl std::future::Future<Output = Reply> + Send {
        Api::handle(self, req)
    }
}
