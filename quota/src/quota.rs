//! The quota check, as a library a gateway embeds: one multiplexed Redis connection, batches
//! of checks sent as one pipeline of `EVALSHA`s, limits read from the plan in force.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use futures::StreamExt;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{RedisError, Value};
use rust_decimal::Decimal;
use serde::Serialize;
use tally_core::config::QuotaConfig;
use tally_rater::{Catalog, SubscriptionStore, Window};
use time::OffsetDateTime;

use crate::algo::{binding, check_all, Outcome, Rule};
use crate::fallback::Fallback;
use crate::metrics::{BATCH_DURATION, CHECKS, CHECK_DURATION, FALLBACKS, REDIS_ERRORS, REDIS_UP};
use crate::resolve::{NoSubscription, ResolveError, Resolver, Source};
use crate::script;
use crate::window::{self, Applied};

/// Where a meter's usage comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CountedFrom {
    /// Checks with `consume: true`.
    Checks,
    /// Events ingested through the pipeline; checks only ask.
    Events,
}

/// How one meter is counted and what happens when Redis is unreachable.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MeterPolicy {
    pub counted_from: CountedFrom,
    /// Allow (through the in-process limiter) rather than refuse while Redis is down.
    pub fail_open: bool,
    /// Decimal places counted.
    pub scale: u32,
}

impl MeterPolicy {
    pub const DEFAULT: MeterPolicy = MeterPolicy {
        counted_from: CountedFrom::Checks,
        fail_open: false,
        scale: 0,
    };
}

/// Per-meter policies from the configuration (checked at load), for every catalog meter.
pub fn policies(
    config: &QuotaConfig,
    meters: &tally_core::Catalog,
) -> HashMap<String, MeterPolicy> {
    let mut out: HashMap<String, MeterPolicy> = meters
        .meters()
        .iter()
        .map(|m| (m.key.clone(), MeterPolicy::DEFAULT))
        .collect();
    for m in &config.meters {
        out.insert(
            m.meter.clone(),
            MeterPolicy {
                counted_from: if m.counted_from == "events" {
                    CountedFrom::Events
                } else {
                    CountedFrom::Checks
                },
                fail_open: m.when_redis_down == "open",
                scale: m.scale,
            },
        );
    }
    out
}

/// One question: may `customer` use `amount` more of `meter` now (and count it)?
#[derive(Debug, Clone, Copy)]
pub struct Check<'a> {
    pub tenant: &'a str,
    pub customer: &'a str,
    pub meter: &'a str,
    pub amount: Decimal,
    pub consume: bool,
}

/// One window's standing after a check.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct WindowState {
    pub window: Window,
    pub limit: Decimal,
    pub used: Decimal,
    pub remaining: Decimal,
    #[serde(with = "time::serde::rfc3339")]
    pub reset_at: OffsetDateTime,
}

/// Who answered a check.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Answered {
    /// Redis, atomically.
    Redis,
    /// The plan sets no limit on the meter (or no subscription, and the policy allows).
    Unlimited,
    /// No subscription, and the policy refuses.
    NoSubscription,
    /// Redis was unreachable; the meter fails open through the in-process limiter.
    FallbackOpen,
    /// Redis was unreachable; the meter fails closed.
    FallbackClosed,
}

impl Answered {
    fn name(self) -> &'static str {
        match self {
            Answered::Redis => "redis",
            Answered::Unlimited => "unlimited",
            Answered::NoSubscription => "no_subscription",
            Answered::FallbackOpen => "fallback_open",
            Answered::FallbackClosed => "fallback_closed",
        }
    }
}

/// The answer to a check. `limit`, `remaining` and `reset_at` are those of the binding
/// window (the refusing one, else the one with least remaining); `None` when unlimited.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Decision {
    pub allowed: bool,
    pub limit: Option<Decimal>,
    pub used: Decimal,
    pub remaining: Option<Decimal>,
    #[serde(with = "time::serde::rfc3339::option")]
    pub reset_at: Option<OffsetDateTime>,
    pub window: Option<Window>,
    /// Every limited window of the meter.
    pub windows: Vec<WindowState>,
    /// The plan version the limits came from.
    pub plan: String,
    pub answered: Answered,
}

/// A check that cannot be answered.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CheckError {
    /// Bad input: names the field.
    #[error("{field}: {message}")]
    Invalid {
        field: &'static str,
        message: String,
    },
    /// The customer's subscription cannot be read and nothing is cached.
    #[error("{0}")]
    Unavailable(String),
}

/// A check ready for Redis.
struct Prepared {
    index: usize,
    windows: Vec<Applied>,
    units: u64,
    consume: bool,
    scale: u32,
    fail_open: bool,
    plan: String,
}

/// The quota library.
pub struct Quota {
    conn: ConnectionManager,
    check_script: redis::Script,
    feed_script: redis::Script,
    resolver: Arc<Resolver>,
    policies: HashMap<String, MeterPolicy>,
    fallback: Fallback,
    timeout: Duration,
    redis_up: AtomicBool,
    /// While Redis is down: when to try it again (ms since `epoch`). Checks before then are
    /// answered by policy at once instead of each waiting out a connection attempt.
    retry_at_ms: AtomicU64,
    epoch: Instant,
}

/// Most subscription reads one batch runs at once.
const STORE_READS: usize = 16;

/// How long checks skip Redis after a failed round trip before one tries it again.
const REDIS_RETRY: Duration = Duration::from_millis(200);

impl Quota {
    /// Connects lazily: the first check opens the connection, and a lost connection is
    /// reopened by itself, so the quota service starts and recovers while Redis is down.
    pub fn new(
        redis_url: &str,
        timeout: Duration,
        resolver: Arc<Resolver>,
        policies: HashMap<String, MeterPolicy>,
    ) -> Result<Quota, RedisError> {
        let client = redis::Client::open(redis_url)?;
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(timeout))
            .set_response_timeout(Some(timeout))
            .set_number_of_retries(1)
            .set_max_delay(Duration::from_millis(500));
        let conn = ConnectionManager::new_lazy_with_config(client, config)?;
        Ok(Quota {
            conn,
            check_script: redis::Script::new(script::CHECK),
            feed_script: redis::Script::new(script::FEED),
            resolver,
            policies,
            fallback: Fallback::default(),
            timeout,
            redis_up: AtomicBool::new(true),
            retry_at_ms: AtomicU64::new(0),
            epoch: Instant::now(),
        })
    }

    /// The library as configured: plan catalog, subscription store, Redis.
    pub fn from_config(config: &tally_core::Config) -> anyhow::Result<Quota> {
        let q = &config.quota;
        let catalog = Catalog::load_dir(&q.plans_dir)
            .with_context(|| format!("loading plans from {}", q.plans_dir))?;
        let store = SubscriptionStore::new(&config.clickhouse).with_timeout(Duration::from_secs(5));
        let policy = NoSubscription::parse(&q.no_subscription).map_err(anyhow::Error::msg)?;
        let resolver = Resolver::new(
            store,
            Arc::new(catalog),
            policy,
            Duration::from_millis(q.cache_ttl_ms),
        )
        .map_err(anyhow::Error::msg)?;
        let policies = policies(q, &config.catalog());
        let quota = Quota::new(
            &q.redis_url,
            Duration::from_millis(q.redis_timeout_ms),
            Arc::new(resolver),
            policies,
        )
        .with_context(|| format!("redis url {}", q.redis_url))?;
        Ok(quota)
    }

    pub fn resolver(&self) -> &Arc<Resolver> {
        &self.resolver
    }

    pub fn policy(&self, meter: &str) -> Option<MeterPolicy> {
        self.policies.get(meter).copied()
    }

    /// Whether the last Redis round trip succeeded.
    pub fn redis_up(&self) -> bool {
        self.redis_up.load(Ordering::Acquire)
    }

    pub(crate) fn connection(&self) -> ConnectionManager {
        self.conn.clone()
    }

    pub(crate) fn feed_script(&self) -> &redis::Script {
        &self.feed_script
    }

    /// One check.
    pub async fn check(&self, check: &Check<'_>) -> Result<Decision, CheckError> {
        self.check_many(std::slice::from_ref(check))
            .await
            .pop()
            .expect("one answer per check")
    }

    /// Many checks in one pipelined round trip; one answer per check, in order. Each check
    /// is atomic on its own; the batch is not a transaction.
    pub async fn check_many(&self, checks: &[Check<'_>]) -> Vec<Result<Decision, CheckError>> {
        self.check_many_at(checks, OffsetDateTime::now_utc()).await
    }

    /// [`Quota::check_many`] with the plan in force and the quota windows (hour, day,
    /// billing period) taken at `now` instead of the present: for tests at window edges and
    /// for replaying. Rate windows always use the Redis server's clock.
    pub async fn check_many_at(
        &self,
        checks: &[Check<'_>],
        now: OffsetDateTime,
    ) -> Vec<Result<Decision, CheckError>> {
        let started = Instant::now();
        let mut answers: Vec<Option<Result<Decision, CheckError>>> = vec![None; checks.len()];
        let mut prepared = Vec::with_capacity(checks.len());
        // Cached customers resolve at once; uncached ones are read from the store a few at a
        // time (a cold batch must not open one store query per check all at once).
        let pending: Vec<_> = checks
            .iter()
            .enumerate()
            .map(|(index, c)| self.prepare(index, c, now))
            .collect();
        let resolved: Vec<_> = futures::stream::iter(pending)
            .buffered(STORE_READS)
            .collect()
            .await;
        for (index, r) in resolved.into_iter().enumerate() {
            match r {
                Ok(Ok(p)) => prepared.push(p),
                Ok(Err(done)) => answers[index] = Some(Ok(done)),
                Err(e) => answers[index] = Some(Err(e)),
            }
        }
        if !prepared.is_empty() {
            let since_epoch = |i: Instant| {
                u64::try_from(i.duration_since(self.epoch).as_millis()).unwrap_or(u64::MAX)
            };
            let skip = since_epoch(Instant::now()) < self.retry_at_ms.load(Ordering::Acquire);
            let result = if skip {
                Err(RedisError::from(std::io::Error::new(
                    std::io::ErrorKind::NotConnected,
                    "redis down; next attempt after a short pause",
                )))
            } else {
                self.run(&prepared).await
            };
            if result.is_err() && !skip {
                let retry = since_epoch(Instant::now() + REDIS_RETRY);
                self.retry_at_ms.store(retry, Ordering::Release);
            }
            match result {
                Ok(states) => {
                    self.mark_redis(true);
                    for (p, (allowed, now_us, states)) in prepared.iter().zip(states) {
                        let rules: Vec<(Rule, u64)> =
                            p.windows.iter().map(|w| w.rule).zip(states).collect();
                        let outcomes = check_all(&rules, now_us, p.units, p.consume);
                        if outcomes.iter().all(|o| o.allowed) != allowed {
                            tracing::error!(
                                "quota script and library disagree; answering with the script's decision"
                            );
                        }
                        let mut d = decision(p, &outcomes, Answered::Redis);
                        d.allowed = allowed;
                        answers[p.index] = Some(Ok(d));
                    }
                }
                Err(e) => {
                    self.mark_redis(false);
                    if !skip {
                        metrics::counter!(REDIS_ERRORS, "kind" => error_kind(&e)).increment(1);
                        tracing::warn!(error = %e, checks = prepared.len(), "redis unreachable; answering by policy");
                    }
                    let now_us = window::micros(now);
                    for p in &prepared {
                        answers[p.index] = Some(Ok(self.fallback(p, now_us)));
                    }
                }
            }
        }
        let elapsed = started.elapsed().as_secs_f64();
        metrics::histogram!(BATCH_DURATION).record(elapsed);
        answers
            .into_iter()
            .map(|a| {
                let a = a.expect("every check answered");
                if let Ok(d) = &a {
                    let outcome = if d.allowed { "allowed" } else { "refused" };
                    metrics::counter!(CHECKS, "outcome" => outcome, "source" => d.answered.name())
                        .increment(1);
                    metrics::histogram!(CHECK_DURATION).record(elapsed);
                }
                a
            })
            .collect()
    }

    /// Validates a check and finds its windows; `Ok(Err(decision))` when it is answered
    /// without Redis.
    async fn prepare(
        &self,
        index: usize,
        c: &Check<'_>,
        now: OffsetDateTime,
    ) -> Result<Result<Prepared, Decision>, CheckError> {
        let invalid = |field, message: String| CheckError::Invalid { field, message };
        if c.customer.is_empty() {
            return Err(invalid("customer", "must not be empty".into()));
        }
        let Some(policy) = self.policies.get(c.meter).copied() else {
            return Err(invalid(
                "meter",
                format!("no meter {:?} in the catalog", c.meter),
            ));
        };
        let units =
            window::amount_units(c.amount, policy.scale).map_err(|m| invalid("amount", m))?;
        if c.consume && policy.counted_from == CountedFrom::Events {
            return Err(invalid(
                "consume",
                format!(
                    "meter {:?} is counted from ingested events; ask with consume=false",
                    c.meter
                ),
            ));
        }
        let timeline = self
            .resolver
            .timeline(c.tenant, c.customer)
            .await
            .map_err(|e| CheckError::Unavailable(e.to_string()))?;
        let source = self
            .resolver
            .source(&timeline, now)
            .map_err(|e: ResolveError| CheckError::Unavailable(e.to_string()))?;
        let plan = source.label();
        let limits = source.limits(c.meter);
        let unanswered = |allowed, answered| Decision {
            allowed,
            limit: None,
            used: Decimal::ZERO,
            remaining: None,
            reset_at: None,
            window: None,
            windows: Vec::new(),
            plan: plan.clone(),
            answered,
        };
        match source {
            Source::Denied => return Ok(Err(unanswered(false, Answered::NoSubscription))),
            Source::Unlimited => return Ok(Err(unanswered(true, Answered::Unlimited))),
            Source::Plan { .. } if limits.is_empty() => {
                return Ok(Err(unanswered(true, Answered::Unlimited)))
            }
            Source::Plan { .. } => {}
        }
        let tag = window::customer_tag(c.tenant, c.customer);
        let windows = window::applied(&tag, c.meter, &limits, policy.scale, now, source.billing());
        Ok(Ok(Prepared {
            index,
            windows,
            units,
            consume: c.consume,
            scale: policy.scale,
            fail_open: policy.fail_open,
            plan,
        }))
    }

    /// Sends every prepared check in one pipeline; reloads the script once if Redis lost it
    /// (a restart flushes scripts).
    async fn run(&self, prepared: &[Prepared]) -> Result<Vec<(bool, u64, Vec<u64>)>, RedisError> {
        let mut pipe = redis::pipe();
        for p in prepared {
            let cmd = pipe
                .cmd("EVALSHA")
                .arg(self.check_script.get_hash())
                .arg(p.windows.len());
            for w in &p.windows {
                cmd.arg(&w.key);
            }
            cmd.arg(p.units).arg(if p.consume { "1" } else { "0" });
            for w in &p.windows {
                match w.rule {
                    Rule::Rate(g) => cmd.arg("r").arg(g.limit).arg(g.interval).arg(0),
                    Rule::Fixed(f) => cmd.arg("f").arg(f.limit).arg(0).arg(w.expire_at_ms),
                };
            }
        }
        let replies = self.query(&mut pipe).await?;
        replies
            .into_iter()
            .zip(prepared)
            .map(|(r, p)| parse_reply(r?, p.windows.len()))
            .collect()
    }

    /// Sends a pipeline of `EVALSHA`s, one reply per command. Commands refused with
    /// NOSCRIPT (Redis lost its scripts: a restart flushes them) ran nothing; the scripts are
    /// loaded and those commands alone are sent once more.
    pub(crate) async fn query(
        &self,
        pipe: &mut redis::Pipeline,
    ) -> Result<Vec<redis::RedisResult<Value>>, RedisError> {
        pipe.ignore_errors();
        let mut replies = self.send(pipe).await?;
        let lost: Vec<usize> = (0..replies.len())
            .filter(|&i| {
                replies[i].as_ref().is_err_and(|e| {
                    e.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::NoScript)
                })
            })
            .collect();
        if lost.is_empty() {
            return Ok(replies);
        }
        self.load_scripts().await?;
        let commands: Vec<&redis::Cmd> = pipe.cmd_iter().collect();
        let mut again = redis::pipe();
        for &i in &lost {
            again.add_command(commands[i].clone());
        }
        again.ignore_errors();
        for (i, r) in lost.into_iter().zip(self.send(&again).await?) {
            replies[i] = r;
        }
        Ok(replies)
    }

    async fn send(
        &self,
        pipe: &redis::Pipeline,
    ) -> Result<Vec<redis::RedisResult<Value>>, RedisError> {
        let mut conn = self.conn.clone();
        match tokio::time::timeout(self.timeout, pipe.query_async(&mut conn)).await {
            Ok(r) => r,
            Err(_) => Err(timeout_error()),
        }
    }

    /// Loads both scripts (after a Redis restart, or at start-up).
    pub async fn load_scripts(&self) -> Result<(), RedisError> {
        let mut conn = self.conn.clone();
        let load = async {
            for s in [script::CHECK, script::FEED] {
                redis::cmd("SCRIPT")
                    .arg("LOAD")
                    .arg(s)
                    .query_async::<String>(&mut conn)
                    .await?;
            }
            Ok(())
        };
        match tokio::time::timeout(self.timeout, load).await {
            Ok(r) => r,
            Err(_) => Err(timeout_error()),
        }
    }

    /// Answers without Redis, by the meter's policy.
    fn fallback(&self, p: &Prepared, now_us: u64) -> Decision {
        let policy = if p.fail_open { "open" } else { "closed" };
        metrics::counter!(FALLBACKS, "policy" => policy).increment(1);
        if !p.fail_open {
            let rules: Vec<(Rule, u64)> = p.windows.iter().map(|w| (w.rule, 0)).collect();
            let mut outcomes = check_all(&rules, now_us, 0, false);
            for o in &mut outcomes {
                o.allowed = false;
            }
            let mut d = decision(p, &outcomes, Answered::FallbackClosed);
            d.allowed = false;
            return d;
        }
        let windows: Vec<(&str, Rule, u64)> = p
            .windows
            .iter()
            .map(|w| (w.key.as_str(), w.rule, w.expire_at_ms.saturating_mul(1_000)))
            .collect();
        let outcomes = self.fallback.check(&windows, now_us, p.units, p.consume);
        decision(p, &outcomes, Answered::FallbackOpen)
    }

    pub(crate) fn mark_redis(&self, up: bool) {
        let was = self.redis_up.swap(up, Ordering::AcqRel);
        if up && !was {
            tracing::info!("redis reachable again; in-process fallback state dropped");
            self.fallback.clear();
        }
        metrics::gauge!(REDIS_UP).set(if up { 1.0 } else { 0.0 });
    }
}

fn decision(p: &Prepared, outcomes: &[Outcome], answered: Answered) -> Decision {
    let windows: Vec<WindowState> = p
        .windows
        .iter()
        .zip(outcomes)
        .map(|(w, o)| WindowState {
            window: w.window,
            limit: w.limit,
            used: window::from_units(o.used, p.scale),
            remaining: window::from_units(o.remaining, p.scale),
            reset_at: window::instant(o.reset_at),
        })
        .collect();
    let allowed = outcomes.iter().all(|o| o.allowed);
    let bind = binding(outcomes).map(|i| &windows[i]);
    Decision {
        allowed,
        limit: bind.map(|w| w.limit),
        used: bind.map_or(Decimal::ZERO, |w| w.used),
        remaining: bind.map(|w| w.remaining),
        reset_at: bind.map(|w| w.reset_at),
        window: bind.map(|w| w.window),
        windows,
        plan: p.plan.clone(),
        answered,
    }
}

fn parse_reply(v: Value, n: usize) -> Result<(bool, u64, Vec<u64>), RedisError> {
    let bad = || {
        RedisError::from((
            redis::ErrorKind::Parse,
            "quota script reply",
            format!("{v:?}"),
        ))
    };
    let Value::Array(items) = &v else {
        return Err(bad());
    };
    let ints: Vec<u64> = items
        .iter()
        .map(|i| match i {
            Value::Int(x) => u64::try_from(*x).ok(),
            _ => None,
        })
        .collect::<Option<Vec<_>>>()
        .ok_or_else(bad)?;
    if ints.len() != n + 2 {
        return Err(bad());
    }
    Ok((ints[0] == 1, ints[1], ints[2..].to_vec()))
}

fn timeout_error() -> RedisError {
    RedisError::from(std::io::Error::new(
        std::io::ErrorKind::TimedOut,
        "redis did not answer in time",
    ))
}

fn error_kind(e: &RedisError) -> &'static str {
    if e.is_timeout() {
        "timeout"
    } else if e.is_io_error() || e.is_connection_dropped() || e.is_connection_refusal() {
        "connection"
    } else {
        "other"
    }
}
