//! `tally-rater serve`: invoice previews over HTTP for consumption dashboards, `/healthz`,
//! `/readyz` and `/metrics`.
//!
//! `GET /v1/invoices/preview?customer=C[&at=TIME][&format=json|csv]`, authenticated with
//! the tenant's key (`Authorization: Bearer <key>`) and scoped to that tenant, answers the
//! customer's invoice for the billing period containing `at` (default now), to date: one
//! line per charge, priced from the aggregator's rollups exactly as `tally-rater invoice
//! --mode preview` prices it. Nothing is stored. Errors are JSON `{"error"}`: 400 names
//! the parameter, 401 a missing or unknown key, 404 a customer with no subscription in
//! force at `at`, 422 a subscription that cannot be invoiced (the reason given), 503 a
//! store that does not answer (retry).

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::CONTENT_TYPE;
use http::{Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use serde_json::json;
use tally_core::{Config, Tenants};
pub use tally_service::http::serve;
use tally_service::http::{
    counted, decode_query, error, json_reply, metrics_reply, no_route, tenant, unauthorized,
    Handler, Reply,
};
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

use crate::metrics::{HTTP_REQUESTS, PREVIEW_DURATION};
use crate::plan::Catalog;
use crate::run::{billable_of, InvoiceRun, RunError};
use crate::store::SubscriptionStore;
use crate::usage::UsageReader;

/// The longest a preview may take before it is answered 503.
const PREVIEW_TIMEOUT: Duration = Duration::from_secs(30);

pub struct Api {
    store: SubscriptionStore,
    run: InvoiceRun,
    plans: Arc<Catalog>,
    tenants: Tenants,
    client: clickhouse::Client,
}

/// A preview request's parameters.
#[derive(Debug, PartialEq)]
struct PreviewQuery {
    customer: String,
    at: Option<OffsetDateTime>,
    csv: bool,
}

impl Api {
    /// Installs the Prometheus recorder (once per process) so every preview is counted.
    pub fn new(config: &Config, plans: Catalog) -> Api {
        crate::metrics::prometheus();
        let reader = UsageReader::new(
            &config.clickhouse,
            config.catalog(),
            config.validation.max_dimension_chars,
        );
        Api {
            store: SubscriptionStore::new(&config.clickhouse),
            run: InvoiceRun::new(&config.clickhouse, reader),
            plans: Arc::new(plans),
            tenants: config.tenants(),
            client: tally_aggregator::migrate::client(&config.clickhouse),
        }
    }

    pub async fn handle<B>(&self, req: Request<B>) -> Reply {
        let route = match req.uri().path() {
            "/v1/invoices/preview" => "/v1/invoices/preview",
            "/healthz" => "/healthz",
            "/readyz" => "/readyz",
            "/metrics" => "/metrics",
            _ => "other",
        };
        let reply = match (req.method(), route) {
            (&Method::GET, "/v1/invoices/preview") => self.preview(&req).await,
            (&Method::GET, "/healthz") => json_reply(StatusCode::OK, &json!({"status": "ok"})),
            (&Method::GET, "/readyz") => {
                let up = tokio::time::timeout(
                    Duration::from_secs(2),
                    self.client.query("SELECT 1").fetch_one::<u8>(),
                )
                .await
                .is_ok_and(|r| r.is_ok());
                let status = if up {
                    StatusCode::OK
                } else {
                    StatusCode::SERVICE_UNAVAILABLE
                };
                json_reply(status, &json!({"clickhouse": up}))
            }
            (&Method::GET, "/metrics") => metrics_reply(crate::metrics::prometheus()),
            _ => no_route(route),
        };
        counted(HTTP_REQUESTS, route, reply)
    }

    async fn preview<B>(&self, req: &Request<B>) -> Reply {
        let started = Instant::now();
        let Some(tenant) = tenant(req, &self.tenants) else {
            return unauthorized();
        };
        let q = match decode_query(req.uri().query().unwrap_or("")).and_then(|p| parse(&p)) {
            Ok(q) => q,
            Err(e) => return error(StatusCode::BAD_REQUEST, &e),
        };
        let at = q.at.unwrap_or_else(OffsetDateTime::now_utc);
        let priced = tokio::time::timeout(PREVIEW_TIMEOUT, async {
            let Some(billable) =
                billable_of(&self.store, &self.plans, &tenant.id, &q.customer, at).await?
            else {
                return Ok(None);
            };
            match billable {
                Err((_, reason)) => Ok(Some(Err(reason))),
                // The period after a cancellation: nothing in force to preview.
                Ok(b) if b.segments.is_empty() => Ok(None),
                Ok(b) => {
                    let mut priced = self
                        .run
                        .preview(&self.plans, &tenant.id, std::slice::from_ref(&b))
                        .await?;
                    Ok::<_, RunError>(Some(match priced.invoices.pop() {
                        Some(invoice) => Ok(invoice),
                        None => Err(priced
                            .refused
                            .pop()
                            .map_or_else(|| "not priced".to_owned(), |(_, r)| r)),
                    }))
                }
            }
        })
        .await;
        metrics::histogram!(PREVIEW_DURATION).record(started.elapsed().as_secs_f64());
        let whole = at.replace_nanosecond(0).unwrap_or(at);
        let at_text = whole.format(&Rfc3339).unwrap_or_else(|_| at.to_string());
        match priced {
            Ok(Ok(Some(Ok(invoice)))) if q.csv => text(invoice.to_csv(), "text/csv"),
            // The bytes `tally-rater invoice` prints for the same invoice.
            Ok(Ok(Some(Ok(invoice)))) => match serde_json::to_string(&invoice) {
                Ok(json) => text(json, "application/json"),
                Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, &e.to_string()),
            },
            Ok(Ok(Some(Err(reason)))) => error(
                StatusCode::UNPROCESSABLE_ENTITY,
                &format!("customer {:?} cannot be invoiced: {reason}", q.customer),
            ),
            Ok(Ok(None)) => error(
                StatusCode::NOT_FOUND,
                &format!(
                    "customer {:?}: no subscription in force at {at_text}",
                    q.customer
                ),
            ),
            Ok(Err(e)) if e.is_retryable() => {
                tracing::warn!(error = %e, "preview: store unavailable");
                error(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "usage or subscription store unavailable; retry",
                )
            }
            Ok(Err(e)) => {
                tracing::error!(error = %e, customer = %q.customer, "preview failed");
                error(StatusCode::INTERNAL_SERVER_ERROR, &e.to_string())
            }
            Err(_) => error(StatusCode::SERVICE_UNAVAILABLE, "preview timed out; retry"),
        }
    }
}

impl Handler for Api {
    fn handle(&self, req: Request<Incoming>) -> impl std::future::Future<Output = Reply> + Send {
        Api::handle(self, req)
    }
}

/// A 200 with `body` as `content_type`.
fn text(body: String, content_type: &'static str) -> Reply {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    r.headers_mut()
        .insert(CONTENT_TYPE, http::HeaderValue::from_static(content_type));
    r
}

/// The preview parameters, or an error naming the one that is wrong.
fn parse(pairs: &[(String, String)]) -> Result<PreviewQuery, String> {
    let (mut customer, mut at, mut csv) = (None, None, false);
    for (k, v) in pairs {
        let seen = match k.as_str() {
            "customer" => customer.replace(v.clone()).is_some(),
            "at" => {
                let t = OffsetDateTime::parse(v, &Rfc3339).map_err(|_| {
                    format!("at: {v:?} is not an RFC 3339 time like 2026-11-01T00:00:00Z")
                })?;
                at.replace(t).is_some()
            }
            "format" => {
                csv = match v.as_str() {
                    "json" => false,
                    "csv" => true,
                    _ => return Err(format!("format: {v:?} is not json or csv")),
                };
                false
            }
            other => return Err(format!("{other}: unknown parameter")),
        };
        if seen {
            return Err(format!("{k}: given more than once"));
        }
    }
    let customer = customer.ok_or("customer: missing")?;
    if customer.is_empty() {
        return Err("customer: must not be empty".into());
    }
    Ok(PreviewQuery { customer, at, csv })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn q(s: &str) -> Result<PreviewQuery, String> {
        decode_query(s).and_then(|p| parse(&p))
    }

    #[test]
    fn parameters_are_checked_by_name() {
        assert_eq!(
            q("customer=acme%20co").expect("valid"),
            PreviewQuery {
                customer: "acme co".into(),
                at: None,
                csv: false,
            }
        );
        let full = q("customer=c&at=2026-10-15T00:00:00Z&format=csv").expect("valid");
        assert_eq!(full.at, Some(time::macros::datetime!(2026-10-15 0:00 UTC)));
        assert!(full.csv);
        let err = |s: &str| q(s).expect_err(s);
        assert!(err("").starts_with("customer: missing"));
        assert!(err("customer=").starts_with("customer: must not be empty"));
        assert!(err("customer=a&customer=b").starts_with("customer: given more than once"));
        assert!(err("customer=a&at=yesterday").starts_with("at: "));
        assert!(err("customer=a&format=xml").starts_with("format: "));
        assert!(err("customer=a&tenant=other").starts_with("tenant: unknown parameter"));
    }
}
