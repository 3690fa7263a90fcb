//! The quota service's HTTP edge: `POST /v1/quota/check`, `/healthz`, `/readyz`, `/metrics`.
//!
//! `POST /v1/quota/check` takes `{"customer", "meter", "amount", "consume"}` (`amount`
//! defaults to 1, `consume` to false; `amount` is a JSON number or a decimal string), or a
//! JSON array of them, answered in one pipelined Redis round trip. It answers
//! `{"allowed", "limit", "used", "remaining", "reset_at", ...}`; a refusal is a 200 with
//! `allowed: false`. Bad input is a 400 naming the field (for an array, per element: the
//! answer array holds `{"error"}` objects in their places).

use std::sync::Arc;

use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use rust_decimal::Decimal;
use serde_json::{json, Map, Value};
use tally_core::Tenants;
pub use tally_service::http::serve;
use tally_service::http::{
    counted, error, json_reply, metrics_reply, no_route, tenant, unauthorized, Handler, Reply,
};

use crate::metrics::HTTP_REQUESTS;
use crate::quota::{Check, CheckError, Quota};

/// Largest request body, and most checks in one array.
const MAX_BODY: usize = 1 << 20;
const MAX_CHECKS: usize = 10_000;

pub struct Api {
    quota: Arc<Quota>,
    tenants: Tenants,
}

/// One parsed element of a request body.
struct Asked {
    customer: String,
    meter: String,
    amount: Decimal,
    consume: bool,
}

impl Api {
    /// Installs the Prometheus recorder (once per process) so every check is counted.
    pub fn new(quota: Arc<Quota>, tenants: Tenants) -> Api {
        crate::metrics::prometheus();
        Api { quota, tenants }
    }

    pub async fn handle(&self, req: Request<Incoming>) -> Reply {
        let route = match req.uri().path() {
            "/v1/quota/check" => "/v1/quota/check",
            "/healthz" => "/healthz",
            "/readyz" => "/readyz",
            "/metrics" => "/metrics",
            _ => "other",
        };
        let reply = match (req.method(), route) {
            (&Method::POST, "/v1/quota/check") => self.check(req).await,
            (&Method::GET, "/healthz") => json_reply(StatusCode::OK, &json!({"status": "ok"})),
            (&Method::GET, "/readyz") => {
                let redis = self.quota.redis_up();
                let status = if redis {
                    StatusCode::OK
                } else {
                    StatusCode::SERVICE_UNAVAILABLE
                };
                json_reply(status, &json!({"redis": redis}))
            }
            (&Method::GET, "/metrics") => metrics_reply(crate::metrics::prometheus()),
            _ => no_route(route),
        };
        counted(HTTP_REQUESTS, route, reply)
    }

    async fn check(&self, req: Request<Incoming>) -> Reply {
        let Some(tenant) = tenant(&req, &self.tenants) else {
            return unauthorized();
        };
        let tenant = tenant.id.clone();
        let body = match Limited::new(req.into_body(), MAX_BODY).collect().await {
            Ok(b) => b.to_bytes(),
            Err(_) => {
                return error(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    &format!("body: larger than {MAX_BODY} bytes"),
                )
            }
        };
        let value: Value = match serde_json::from_slice(&body) {
            Ok(v) => v,
            Err(e) => return error(StatusCode::BAD_REQUEST, &format!("body: not JSON: {e}")),
        };
        let (items, batch) = match value {
            Value::Array(items) if items.len() > MAX_CHECKS => {
                return error(
                    StatusCode::BAD_REQUEST,
                    &format!("body: at most {MAX_CHECKS} checks per request"),
                )
            }
            Value::Array(items) => (items, true),
            other => (vec![other], false),
        };
        let parsed: Vec<Result<Asked, String>> = items.iter().map(parse).collect();
        let checks: Vec<Check<'_>> = parsed
            .iter()
            .filter_map(|p| p.as_ref().ok())
            .map(|a| Check {
                tenant: &tenant,
                customer: &a.customer,
                meter: &a.meter,
                amount: a.amount,
                consume: a.consume,
            })
            .collect();
        let mut answers = self.quota.check_many(&checks).await.into_iter();
        let mut out = Vec::with_capacity(parsed.len());
        for p in &parsed {
            let item = match p {
                Err(message) => (StatusCode::BAD_REQUEST, json!({"error": message})),
                Ok(_) => match answers.next().expect("one answer per check") {
                    Ok(d) => (
                        StatusCode::OK,
                        serde_json::to_value(&d).expect("decisions serialize"),
                    ),
                    Err(e @ CheckError::Invalid { .. }) => {
                        (StatusCode::BAD_REQUEST, json!({"error": e.to_string()}))
                    }
                    Err(e @ CheckError::Unavailable(_)) => (
                        StatusCode::SERVICE_UNAVAILABLE,
                        json!({"error": e.to_string()}),
                    ),
                },
            };
            out.push(item);
        }
        if batch {
            let body: Vec<Value> = out.into_iter().map(|(_, v)| v).collect();
            return json_reply(StatusCode::OK, &Value::Array(body));
        }
        let (status, body) = out.pop().expect("one element");
        let mut r = json_reply(status, &body);
        if status == StatusCode::SERVICE_UNAVAILABLE {
            r.headers_mut()
                .insert("retry-after", "1".parse().expect("static"));
        }
        r
    }
}

/// One check object; the error names the field.
fn parse(v: &Value) -> Result<Asked, String> {
    let Value::Object(o) = v else {
        return Err("body: expected a JSON object (or an array of them)".into());
    };
    if let Some(k) = o
        .keys()
        .find(|k| !matches!(k.as_str(), "customer" | "meter" | "amount" | "consume"))
    {
        return Err(format!(
            "{k}: unknown field (expected customer, meter, amount, consume)"
        ));
    }
    let text = |o: &Map<String, Value>, field: &str| match o.get(field) {
        Some(Value::String(s)) if !s.is_empty() => Ok(s.clone()),
        Some(Value::String(_)) => Err(format!("{field}: must not be empty")),
        Some(_) => Err(format!("{field}: must be a string")),
        None => Err(format!("{field}: missing")),
    };
    let customer = text(o, "customer")?;
    let meter = text(o, "meter")?;
    let amount = match o.get("amount") {
        None => Decimal::ONE,
        Some(Value::Number(n)) => n
            .to_string()
            .parse::<Decimal>()
            .or_else(|_| Decimal::from_scientific(&n.to_string()))
            .map_err(|_| format!("amount: {n} is not a decimal number"))?,
        Some(Value::String(s)) => s
            .parse::<Decimal>()
            .map_err(|_| format!("amount: {s:?} is not a decimal number"))?,
        Some(_) => return Err("amount: must be a number or a decimal string".into()),
    };
    let consume = match o.get("consume") {
        None => false,
        Some(Value::Bool(b)) => *b,
        Some(_) => return Err("consume: must be true or false".into()),
    };
    Ok(Asked {
        customer,
        meter,
        amount,
        consume,
    })
}

impl Handler for Api {
    fn handle(&self, req: Request<Incoming>) -> impl std::future::Future<Output = Reply> + Send {
        Api::handle(self, req)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_names_the_bad_field() {
        let err = |v: Value| parse(&v).err().expect("refused");
        assert!(err(json!({"meter": "requests"})).starts_with("customer: missing"));
        assert!(err(json!({"customer": "c", "meter": 3})).starts_with("meter: must be a string"));
        assert!(
            err(json!({"customer": "", "meter": "m"})).starts_with("customer: must not be empty")
        );
        assert!(err(json!({"customer": "c", "meter": "m", "amount": "x"})).starts_with("amount:"));
        assert!(err(json!({"customer": "c", "meter": "m", "amount": true})).starts_with("amount:"));
        assert!(
            err(json!({"customer": "c", "meter": "m", "consume": "yes"})).starts_with("consume:")
        );
        assert!(err(json!({"customer": "c", "meter": "m", "tenant": "x"}))
            .starts_with("tenant: unknown field"));
        assert!(err(json!([1])).starts_with("body:"));
        let ok = parse(&json!({"customer": "c", "meter": "m", "amount": 2.5, "consume": true}))
            .expect("valid");
        assert_eq!(ok.amount, "2.5".parse::<Decimal>().expect("decimal"));
        assert!(ok.consume);
        let d = parse(&json!({"customer": "c", "meter": "m"})).expect("valid");
        assert_eq!(d.amount, Decimal::ONE);
        assert!(!d.consume);
    }
}
