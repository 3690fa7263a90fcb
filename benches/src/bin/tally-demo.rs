//! `tally-demo`: a realistic load through the running collector, then what happened.
//!
//! Three tenants, a handful of customers each, all four demo meters, events spread over
//! the last day; batches, NDJSON and single events; some client retries (same ids, which
//! downstream dedupe counts once) and a few deliberately bad events, to show the refusals.
//! Prints accepted and refused counts (refusals by reason), the usage topic's offsets, and,
//! once the aggregator has caught up, each tenant's usage per customer and meter as the
//! usage API answers it. Then a gateway's quota checks, and last the demo tenant's
//! customers subscribed (once) from the start of this month and their invoices for the month
//! to date, priced from the usage the aggregator stored (an invoice preview).
//!
//! Environment: TALLY_COLLECTOR_URL (http://127.0.0.1:8700), TALLY_USAGE_URL
//! (http://127.0.0.1:8701), TALLY_KAFKA_BROKERS (127.0.0.1:19092), TALLY_KAFKA_TOPIC
//! (usage-events), TALLY_DEMO_EVENTS (20000).

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::ClientConfig;
use serde_json::{json, Value};

const TENANTS: &[(&str, &str)] = &[
    ("demo", "demo-key"),
    ("acme", "acme-key"),
    ("globex", "globex-key"),
];
const ENDPOINTS: &[&str] = &["/v1/chat", "/v1/embed", "/v1/search", "/v1/files"];
const MODELS: &[&str] = &["gpt-4o", "gpt-4o-mini", "claude-sonnet", "llama-70b"];

/// A small deterministic generator, so every demo run sends the same shape of load.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

#[derive(Default)]
struct Tally {
    requests: u64,
    accepted: u64,
    refused: BTreeMap<String, u64>,
    retried: u64,
}

fn env(name: &str, default: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| default.to_owned())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let base = env("TALLY_COLLECTOR_URL", "http://127.0.0.1:8700");
    let brokers = env("TALLY_KAFKA_BROKERS", "127.0.0.1:19092");
    let topic = env("TALLY_KAFKA_TOPIC", "usage-events");
    let total: usize = env("TALLY_DEMO_EVENTS", "20000")
        .parse()
        .context("TALLY_DEMO_EVENTS")?;
    let client = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
    let run = time::OffsetDateTime::now_utc().unix_timestamp();
    let before = offsets(&brokers, &topic).await.unwrap_or_default();

    let started = Instant::now();
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let mut per_tenant: BTreeMap<&str, Tally> = BTreeMap::new();
    let mut sent = 0usize;
    let mut batch_no = 0u64;
    while sent < total {
        let (tenant, key) = TENANTS[(batch_no % TENANTS.len() as u64) as usize];
        let size = (50 + rng.below(450) as usize).min(total - sent);
        let mut events: Vec<Value> = (0..size)
            .map(|i| event(&mut rng, tenant, run, batch_no, i))
            .collect();
        if batch_no % 10 == 3 {
            // A few mistakes a real SDK user makes, each refused with its reason.
            events.push(json!({"id": format!("bad-{run}-{batch_no}-1"), "customer": "c", "type": "completion",
                               "data": {"tokens": "lots", "model": "gpt-4o"}}));
            events.push(
                json!({"id": format!("bad-{run}-{batch_no}-2"), "customer": "c", "type": "request",
                               "time": "2020-01-01T00:00:00Z"}),
            );
            events.push(json!({"id": format!("bad-{run}-{batch_no}-3"), "type": "login", "data": {"user": "u"}}));
        }
        let ndjson = batch_no % 4 == 1;
        let (content_type, body) = if ndjson {
            let lines: Vec<String> = events.iter().map(Value::to_string).collect();
            ("application/x-ndjson", lines.join("\n"))
        } else {
            ("application/json", Value::Array(events).to_string())
        };
        let t = per_tenant.entry(tenant).or_default();
        let answer = post(&client, &base, key, content_type, body.clone()).await?;
        t.requests += 1;
        record(t, &answer);
        if batch_no % 7 == 5 {
            // The client did not see the answer and retries: same ids, counted once downstream.
            let again = post(&client, &base, key, content_type, body).await?;
            t.requests += 1;
            t.retried += again["accepted"].as_u64().unwrap_or(0);
        }
        sent += size;
        batch_no += 1;
    }
    let elapsed = started.elapsed();

    println!(
        "tally demo: {total} events to {base} in {batch_no} requests (+ retries), {:.2} s",
        elapsed.as_secs_f64()
    );
    println!(
        "{:<8} {:>9} {:>10} {:>16}  refused by reason",
        "tenant", "requests", "accepted", "retried (dupes)"
    );
    for (tenant, t) in &per_tenant {
        let reasons: Vec<String> = t.refused.iter().map(|(r, n)| format!("{n}× {r}")).collect();
        println!(
            "{tenant:<8} {:>9} {:>10} {:>16}  {}",
            t.requests,
            t.accepted,
            t.retried,
            reasons.join("; ")
        );
    }
    let after = offsets(&brokers, &topic).await?;
    println!("\ntopic {topic} on {brokers}: partition offsets (low..high, +new this run)");
    let mut total_new = 0;
    for (p, (low, high)) in &after {
        let prev = before.get(p).map_or(*low, |x| x.1);
        total_new += high - prev;
        println!("  partition {p}: {low}..{high} (+{})", high - prev);
    }
    println!("  {total_new} records written this run (accepted events, retries included)");

    let usage = env("TALLY_USAGE_URL", "http://127.0.0.1:8701");
    print_usage(&client, &usage).await?;
    let quota = env("TALLY_QUOTA_URL", "http://127.0.0.1:8702");
    gateway_loop(&client, &quota, run).await?;
    invoice_preview().await
}

/// The demo tenant's customers on a plan from the first of this month (recorded once: a
/// second demo run finds the same changes in the log), then their invoices for the month to
/// date, priced from the rollups: one usage query for the batch.
async fn invoice_preview() -> anyhow::Result<()> {
    let config_path = std::env::var_os("TALLY_CONFIG")
        .is_none()
        .then(|| std::path::PathBuf::from("config/tally.dev.toml"));
    let config = tally_core::Config::load(config_path.as_deref())?;
    let plans = tally_rater::Catalog::load_dir("config/plans").context("loading config/plans")?;
    let store = tally_rater::store::SubscriptionStore::new(&config.clickhouse);
    let now = time::OffsetDateTime::now_utc();
    let month = now.replace_day(1)?.replace_time(time::Time::MIDNIGHT);
    println!("\ninvoice preview: tenant demo, month to date (plans from config/plans)");
    for n in 0..6 {
        let customer = format!("demo-cust-{n}");
        let plan = if n % 2 == 0 { "starter" } else { "pro" };
        let mut change = tally_rater::NewChange::create("demo", &customer, plan, month);
        change.actor = "tally-demo".into();
        change.reason = "demo subscription".into();
        if let Err(e) = store.record(&plans, change).await {
            // Subscribed by a demo run of an earlier month: it keeps that subscription.
            println!("  {customer}: {e}");
        }
    }
    let (batches, mut refused) =
        tally_rater::run::billables(&store, &plans, "demo", now, 1_000).await?;
    let reader = tally_rater::usage::UsageReader::new(
        &config.clickhouse,
        config.catalog(),
        config.validation.max_dimension_chars,
    );
    let run = tally_rater::run::InvoiceRun::new(&config.clickhouse, reader);
    let mut invoices = Vec::new();
    run.previews(&plans, "demo", &batches, |priced| {
        invoices.extend(priced.invoices);
        refused.extend(priced.refused);
    })
    .await?;
    for inv in &invoices {
        let plans: Vec<String> = inv
            .segments
            .iter()
            .map(|s| format!("{} v{}", s.plan, s.version))
            .collect();
        println!(
            "\n  {} on {}, {} to {} ({})",
            inv.customer,
            plans.join(", then "),
            inv.period_start.date(),
            inv.period_end.date(),
            inv.currency.code()
        );
        for l in &inv.lines {
            let what = l.charge.as_deref().unwrap_or(l.kind.name());
            let quantity = l.quantity.map(|q| q.to_string()).unwrap_or_default();
            let tiers = if l.tiers.len() > 1 {
                format!("  ({} tiers)", l.tiers.len())
            } else {
                String::new()
            };
            println!(
                "    {:<16} {:<16} {:>14} {:>12}{tiers}",
                l.kind.name(),
                what,
                quantity,
                l.amount
            );
        }
        println!(
            "    {:<16} {:<16} {:>14} {:>12}",
            "subtotal", "", "", inv.subtotal
        );
        println!(
            "    {:<16} {:<16} {:>14} {:>12}",
            "total", "", "", inv.total
        );
    }
    for (customer, reason) in &refused {
        println!("  {customer}: not invoiced: {reason}");
    }
    println!(
        "\n{} invoices previewed, nothing stored (`tally-rater invoice --tenant demo --mode final \
         --at <a time in the month>` stores them once the month and its grace period are over)",
        invoices.len()
    );
    Ok(())
}

/// A gateway in front of an API: one quota check per request, until a customer hits its
/// limit; then what the events fed into the token counters.
async fn gateway_loop(
    client: &Client<hyper_util::client::legacy::connect::HttpConnector, Full<Bytes>>,
    base: &str,
    run: i64,
) -> anyhow::Result<()> {
    let url = format!("{base}/v1/quota/check");
    let customer = format!("gateway-{run}");
    println!(
        "
gateway loop against {url}: customer {customer}, one check per API request"
    );
    let started = Instant::now();
    let mut allowed = 0u64;
    let mut last = Value::Null;
    for attempt in 1..=5_000u64 {
        let body = json!({"customer": customer, "meter": "requests", "amount": 1, "consume": true});
        last = post_quota(client, &url, &body).await?;
        if last["allowed"] == true {
            allowed += 1;
            continue;
        }
        println!(
            "  {allowed} requests allowed, request {attempt} refused ({:.0} ms for all checks)",
            started.elapsed().as_secs_f64() * 1e3
        );
        break;
    }
    println!(
        "  refusal: allowed={} limit={} per {} used={} remaining={} reset_at={} plan={} answered by {}",
        last["allowed"],
        last["limit"].as_str().unwrap_or("-"),
        last["window"].as_str().unwrap_or("-"),
        last["used"].as_str().unwrap_or("-"),
        last["remaining"].as_str().unwrap_or("-"),
        last["reset_at"].as_str().unwrap_or("-"),
        last["plan"].as_str().unwrap_or("-"),
        last["answered"].as_str().unwrap_or("-"),
    );
    println!(
        "
tokens counted from this run's events into the quota counters (asked, not consumed):"
    );
    for c in 0..3 {
        let customer = format!("demo-cust-{c}");
        let body =
            json!({"customer": customer, "meter": "tokens", "amount": 1000, "consume": false});
        let d = post_quota(client, &url, &body).await?;
        let windows: Vec<String> = d["windows"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|w| {
                format!(
                    "{} of {} this {}",
                    w["used"].as_str().unwrap_or("?"),
                    w["limit"].as_str().unwrap_or("?"),
                    w["window"].as_str().unwrap_or("?")
                )
            })
            .collect();
        println!(
            "  {customer}: {} — 1000 more allowed: {}",
            windows.join(", "),
            d["allowed"]
        );
    }
    Ok(())
}

async fn post_quota(
    client: &Client<hyper_util::client::legacy::connect::HttpConnector, Full<Bytes>>,
    url: &str,
    body: &Value,
) -> anyhow::Result<Value> {
    let req = http::Request::post(url)
        .header("authorization", "Bearer demo-key")
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body.to_string())))?;
    let resp = tokio::time::timeout(Duration::from_secs(10), client.request(req))
        .await
        .context("quota API did not answer within 10 s")?
        .with_context(|| format!("cannot reach the quota API at {url} (is `make up` running?)"))?;
    let status = resp.status();
    let bytes = resp.into_body().collect().await?.to_bytes();
    if status != http::StatusCode::OK {
        bail!(
            "quota API answered {status}: {}",
            String::from_utf8_lossy(&bytes)
        );
    }
    Ok(serde_json::from_slice(&bytes)?)
}

const METERS: &[&str] = &["requests", "tokens", "storage_gb", "active_users"];

/// Waits until the usage API's totals stop moving (the aggregator caught up), then prints
/// every tenant's usage to date per customer and meter.
async fn print_usage(
    client: &Client<hyper_util::client::legacy::connect::HttpConnector, Full<Bytes>>,
    base: &str,
) -> anyhow::Result<()> {
    let mut last = None;
    let deadline = Instant::now() + Duration::from_secs(60);
    let tables = loop {
        let mut tables = BTreeMap::new();
        for (tenant, key) in TENANTS {
            let mut table: BTreeMap<String, BTreeMap<&str, String>> = BTreeMap::new();
            for meter in METERS {
                let url = format!("{base}/v1/usage?meter={meter}&group_by=customer");
                let answer = get_json(client, &url, key).await?;
                for row in answer["data"].as_array().into_iter().flatten() {
                    let customer = row["customer"].as_str().unwrap_or("?").to_owned();
                    let value = row["value"].as_str().unwrap_or("?").to_owned();
                    table.entry(customer).or_default().insert(meter, value);
                }
            }
            tables.insert(*tenant, table);
        }
        let settled = last.as_ref() == Some(&tables);
        if settled || Instant::now() > deadline {
            if !settled {
                eprintln!("usage still moving after 60 s; showing the latest answer");
            }
            break tables;
        }
        last = Some(tables);
        tokio::time::sleep(Duration::from_millis(1500)).await;
    };
    println!("\nusage to date from {base}/v1/usage (each event counted once, retries included)");
    for (tenant, table) in tables {
        println!("\ntenant {tenant}");
        println!(
            "  {:<18} {:>10} {:>14} {:>11} {:>13}",
            "customer", "requests", "tokens", "storage_gb", "active_users"
        );
        for (customer, values) in table {
            let v = |m: &str| values.get(m).cloned().unwrap_or_else(|| "-".into());
            println!(
                "  {customer:<18} {:>10} {:>14} {:>11} {:>13}",
                v("requests"),
                v("tokens"),
                v("storage_gb"),
                v("active_users")
            );
        }
    }
    Ok(())
}

async fn get_json(
    client: &Client<hyper_util::client::legacy::connect::HttpConnector, Full<Bytes>>,
    url: &str,
    key: &str,
) -> anyhow::Result<Value> {
    let req = http::Request::get(url)
        .header("authorization", format!("Bearer {key}"))
        .body(Full::new(Bytes::new()))?;
    let resp = tokio::time::timeout(Duration::from_secs(30), client.request(req))
        .await
        .context("usage API did not answer within 30 s")?
        .with_context(|| format!("cannot reach the usage API at {url} (is `make up` running?)"))?;
    let status = resp.status();
    let bytes = resp.into_body().collect().await?.to_bytes();
    if !status.is_success() {
        bail!(
            "usage API answered {status}: {}",
            String::from_utf8_lossy(&bytes)
        );
    }
    Ok(serde_json::from_slice(&bytes)?)
}

fn event(rng: &mut Rng, tenant: &str, run: i64, batch: u64, i: usize) -> Value {
    let customer = format!("{tenant}-cust-{}", rng.below(6));
    let ago = rng.below(24 * 3600) as i64;
    let time = time::OffsetDateTime::from_unix_timestamp(run - ago)
        .expect("recent time")
        .format(&time::format_description::well_known::Rfc3339)
        .expect("rfc3339");
    let id = format!("{run}-{batch}-{i}");
    match rng.below(10) {
        0..=4 => json!({"id": id, "customer": customer, "type": "request", "time": time,
                        "data": {"endpoint": ENDPOINTS[rng.below(4) as usize], "status": 200}}),
        5..=7 => json!({"id": id, "customer": customer, "type": "completion", "time": time,
                        "data": {"tokens": 50 + rng.below(4000), "model": MODELS[rng.below(4) as usize]}}),
        8 => json!({"id": id, "customer": customer, "type": "storage", "time": time,
                    "data": {"gb": format!("{}.{:02}", rng.below(500), rng.below(100))}}),
        _ => json!({"id": id, "customer": customer, "type": "login", "time": time,
                    "data": {"user": format!("user-{}", rng.below(40))}}),
    }
}

fn record(t: &mut Tally, answer: &Value) {
    t.accepted += answer["accepted"].as_u64().unwrap_or(0);
    for r in answer["rejected"].as_array().into_iter().flatten() {
        let error = r["error"].as_str().unwrap_or("?");
        let reason = error.split(" (").next().unwrap_or(error);
        let reason = if reason.starts_with("time: older") {
            "time: older than the allowed lateness"
        } else {
            reason
        };
        *t.refused.entry(reason.to_owned()).or_default() += 1;
    }
}

async fn post(
    client: &Client<hyper_util::client::legacy::connect::HttpConnector, Full<Bytes>>,
    base: &str,
    key: &str,
    content_type: &str,
    body: String,
) -> anyhow::Result<Value> {
    for attempt in 0..20 {
        let req = http::Request::post(format!("{base}/v1/events"))
            .header("authorization", format!("Bearer {key}"))
            .header("content-type", content_type)
            .body(Full::new(Bytes::from(body.clone())))?;
        let resp = tokio::time::timeout(Duration::from_secs(30), client.request(req))
            .await
            .context("collector did not answer within 30 s")?
            .with_context(|| {
                format!("cannot reach the collector at {base} (is `make up` running?)")
            })?;
        let status = resp.status();
        let retry_after = resp
            .headers()
            .get("retry-after")
            .and_then(|v| v.to_str().ok()?.parse().ok());
        let bytes = resp.into_body().collect().await?.to_bytes();
        let answer: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
        match status.as_u16() {
            202 | 400 => return Ok(answer),
            503 => {
                let wait = retry_after.unwrap_or(1u64);
                eprintln!(
                    "collector busy (503, attempt {}): {}; retrying in {wait} s",
                    attempt + 1,
                    answer["error"]
                );
                tokio::time::sleep(Duration::from_secs(wait)).await;
            }
            other => bail!("collector answered {other}: {answer}"),
        }
    }
    bail!("collector kept answering 503")
}

/// Low and high watermark of every partition of `topic`.
async fn offsets(brokers: &str, topic: &str) -> anyhow::Result<BTreeMap<i32, (i64, i64)>> {
    let (brokers, topic) = (brokers.to_owned(), topic.to_owned());
    tokio::task::spawn_blocking(move || {
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", &brokers)
            .create()?;
        let timeout = Duration::from_secs(10);
        let md = consumer.fetch_metadata(None, timeout)?;
        let t = md
            .topics()
            .iter()
            .find(|t| t.name() == topic)
            .context("topic not found")?;
        let mut out = BTreeMap::new();
        for p in t.partitions() {
            out.insert(p.id(), consumer.fetch_watermarks(&topic, p.id(), timeout)?);
        }
        Ok(out)
    })
    .await?
}
