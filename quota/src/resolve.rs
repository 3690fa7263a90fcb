//! Which limits apply to a customer now: the plan version in force, read from the rater's
//! subscription log and the plan catalog at check time.
//!
//! What is cached is each customer's whole subscription timeline (its change log, folded),
//! not its limits: the plan version in force is evaluated at every check, so a change or
//! migration scheduled for a later instant (the next period start, say) takes effect at that
//! instant without any invalidation. A change recorded later is picked up when the rater's
//! entitlement-change notification for the customer arrives ([`Resolver::invalidate`]), and
//! at the latest when the entry's TTL runs out.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use rust_decimal::Decimal;
use tally_rater::subscription::State;
use tally_rater::{Catalog, PlanVersion, SubscriptionStore, Timeline, Window};
use time::{OffsetDateTime, Time};

use crate::window::Billing;

/// What a customer without a subscription in force gets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NoSubscription {
    Deny,
    Allow,
    /// The limits of this plan's latest version, periods anchored on the first of the month.
    Plan(String),
}

impl NoSubscription {
    /// Parses `deny`, `allow` or `plan:<name>`.
    pub fn parse(s: &str) -> Result<NoSubscription, String> {
        match s {
            "deny" => Ok(NoSubscription::Deny),
            "allow" => Ok(NoSubscription::Allow),
            _ => match s.strip_prefix("plan:") {
                Some(p) if !p.is_empty() => Ok(NoSubscription::Plan(p.to_owned())),
                _ => Err(format!(
                    "quota.no_subscription: expected deny, allow or plan:<name>, got {s:?}"
                )),
            },
        }
    }
}

/// Where a customer's limits come from at one instant.
#[derive(Debug, Clone)]
pub enum Source<'a> {
    /// A plan version: its subscription's own, or the configured default's.
    Plan {
        version: &'a PlanVersion,
        billing: Billing,
        /// `false` when the version is the no-subscription default.
        subscribed: bool,
    },
    /// No subscription and the policy allows everything.
    Unlimited,
    /// No subscription and the policy refuses everything.
    Denied,
}

impl Source<'_> {
    /// The limits on `meter`, by window, in plan order.
    pub fn limits(&self, meter: &str) -> Vec<(Window, Decimal)> {
        match self {
            Source::Plan { version, .. } => version
                .limits()
                .iter()
                .filter(|l| l.meter == meter)
                .map(|l| (l.window, l.limit))
                .collect(),
            _ => Vec::new(),
        }
    }

    pub fn billing(&self) -> Option<Billing> {
        match self {
            Source::Plan { billing, .. } => Some(*billing),
            _ => None,
        }
    }

    /// `plan@vN`, or what stands in for it.
    pub fn label(&self) -> String {
        match self {
            Source::Plan {
                version,
                subscribed: true,
                ..
            } => format!("{}@v{}", version.plan(), version.version()),
            Source::Plan { version, .. } => {
                format!("{}@v{} (default)", version.plan(), version.version())
            }
            Source::Unlimited => "none (allowed)".into(),
            Source::Denied => "none (denied)".into(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ResolveError {
    #[error("subscription store unavailable: {0}")]
    Store(String),
    #[error("plan {plan} v{version} is not in the plan catalog")]
    UnknownPlan { plan: String, version: u32 },
}

struct Entry {
    timeline: Arc<Timeline>,
    fetched: Instant,
}

type Key = (String, String);

/// Entries held before stale ones are swept out.
const MAX_CACHED: usize = 1_000_000;

/// Subscription timelines, cached per (tenant, customer).
pub struct Resolver {
    store: SubscriptionStore,
    catalog: Arc<Catalog>,
    policy: NoSubscription,
    ttl: Duration,
    cache: RwLock<HashMap<Key, Entry>>,
    /// Bumped by every invalidation: a fetch that raced one is used once, not cached.
    epoch: AtomicU64,
}

impl Resolver {
    pub fn new(
        store: SubscriptionStore,
        catalog: Arc<Catalog>,
        policy: NoSubscription,
        ttl: Duration,
    ) -> Result<Resolver, String> {
        if let NoSubscription::Plan(p) = &policy {
            if catalog.latest(p).is_none() {
                return Err(format!(
                    "quota.no_subscription: plan {p:?} is not in the plan catalog"
                ));
            }
        }
        Ok(Resolver {
            store,
            catalog,
            policy,
            ttl,
            cache: RwLock::new(HashMap::new()),
            epoch: AtomicU64::new(0),
        })
    }

    pub fn catalog(&self) -> &Catalog {
        &self.catalog
    }

    /// The customer's timeline: cached if fresh; fetched otherwise; a stale entry when the
    /// store cannot be reached (better an old plan than none).
    pub async fn timeline(
        &self,
        tenant: &str,
        customer: &str,
    ) -> Result<Arc<Timeline>, ResolveError> {
        let key = (tenant.to_owned(), customer.to_owned());
        let stale = {
            let cache = self.cache.read().unwrap_or_else(|e| e.into_inner());
            match cache.get(&key) {
                Some(e) if e.fetched.elapsed() < self.ttl => return Ok(e.timeline.clone()),
                Some(e) => Some(e.timeline.clone()),
                None => None,
            }
        };
        let epoch = self.epoch.load(Ordering::Acquire);
        match self.store.history(tenant, customer).await {
            Ok(changes) => {
                let timeline = Arc::new(Timeline::new(customer, changes));
                metrics::counter!(crate::metrics::CACHE_FETCHES, "outcome" => "ok").increment(1);
                if self.epoch.load(Ordering::Acquire) == epoch {
                    let mut cache = self.cache.write().unwrap_or_else(|e| e.into_inner());
                    if cache.len() >= MAX_CACHED {
                        let ttl = self.ttl;
                        cache.retain(|_, e| e.fetched.elapsed() < ttl);
                        if cache.len() >= MAX_CACHED {
                            cache.clear();
                        }
                    }
                    cache.insert(
                        key,
                        Entry {
                            timeline: timeline.clone(),
                            fetched: Instant::now(),
                        },
                    );
                }
                Ok(timeline)
            }
            Err(e) => {
                metrics::counter!(crate::metrics::CACHE_FETCHES, "outcome" => "error").increment(1);
                match stale {
                    Some(t) => {
                        tracing::warn!(tenant, customer, error = %e, "subscription store unreachable; using a stale entry");
                        Ok(t)
                    }
                    None => Err(ResolveError::Store(e.to_string())),
                }
            }
        }
    }

    /// Where the customer's limits come from at `at`.
    pub fn source<'a>(
        &'a self,
        timeline: &Timeline,
        at: OffsetDateTime,
    ) -> Result<Source<'a>, ResolveError> {
        match timeline.status(at) {
            Some(s) if s.state == State::Active => {
                let version = self.catalog.version(&s.plan, s.version).ok_or_else(|| {
                    ResolveError::UnknownPlan {
                        plan: s.plan.clone(),
                        version: s.version,
                    }
                })?;
                Ok(Source::Plan {
                    version,
                    billing: Billing {
                        anchor: s.billing_anchor,
                        interval: version.interval(),
                    },
                    subscribed: true,
                })
            }
            _ => Ok(self.default_source(at)),
        }
    }

    /// The no-subscription policy's source.
    pub fn default_source(&self, at: OffsetDateTime) -> Source<'_> {
        match &self.policy {
            NoSubscription::Deny => Source::Denied,
            NoSubscription::Allow => Source::Unlimited,
            NoSubscription::Plan(p) => {
                let version = self.catalog.latest(p).expect("checked in Resolver::new");
                let first = at
                    .to_offset(time::UtcOffset::UTC)
                    .replace_day(1)
                    .expect("day 1 exists")
                    .replace_time(Time::MIDNIGHT);
                Source::Plan {
                    version,
                    billing: Billing {
                        anchor: first,
                        interval: version.interval(),
                    },
                    subscribed: false,
                }
            }
        }
    }

    /// Forgets the named customers of `tenant` (all of them when `customers` is empty).
    pub fn invalidate(&self, tenant: &str, customers: &[&str]) -> usize {
        self.epoch.fetch_add(1, Ordering::AcqRel);
        let mut cache = self.cache.write().unwrap_or_else(|e| e.into_inner());
        if customers.is_empty() {
            let before = cache.len();
            cache.retain(|(t, _), _| t != tenant);
            return before - cache.len();
        }
        let mut n = 0;
        for c in customers {
            if cache
                .remove(&(tenant.to_owned(), (*c).to_owned()))
                .is_some()
            {
                n += 1;
            }
        }
        n
    }

    /// Forgets everything (after missed notifications, say).
    pub fn invalidate_all(&self) {
        self.epoch.fetch_add(1, Ordering::AcqRel);
        self.cache
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .clear();
    }

    pub fn cached(&self) -> usize {
        self.cache.read().unwrap_or_else(|e| e.into_inner()).len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn policy_parses_and_names_the_field_on_error() {
        assert_eq!(NoSubscription::parse("deny"), Ok(NoSubscription::Deny));
        assert_eq!(NoSubscription::parse("allow"), Ok(NoSubscription::Allow));
        assert_eq!(
            NoSubscription::parse("plan:starter"),
            Ok(NoSubscription::Plan("starter".into()))
        );
        assert!(NoSubscription::parse("plan:")
            .expect_err("refused")
            .contains("quota.no_subscription"));
        assert!(NoSubscription::parse("maybe").is_err());
    }
}
