//! The two counting rules, as pure functions on integers. The Lua script in [`crate::script`]
//! applies the same rules inside Redis; the in-process fallback limiter applies them here.
//!
//! # Rate windows (second, minute): GCRA
//! A limit of `L` per window `W` is a generic cell rate algorithm with emission interval
//! `T = ⌈W / L⌉` µs and a burst of `L`: the state is one number, the theoretical arrival time
//! (TAT). A request for `n` units at `now` is granted when
//! `max(TAT, now) + n·T − now ≤ L·T`, and then moves TAT to `max(TAT, now) + n·T`.
//!
//! Why GCRA rather than a sliding window: it needs one key of eight bytes per customer and
//! meter whatever the limit (a sliding log needs one entry per request), it is exact (a
//! sliding-window counter interpolates between two fixed windows and so is approximate), and
//! it never allows the fixed window's burst of `2L` in an instant at a window edge: at most
//! `L` at once, then one unit per `T`. Over any span of length `t` it grants at most
//! `L + ⌊t / T⌋` units. `T` is rounded up, so the sustained rate never exceeds `L / W`.
//!
//! # Quota windows (hour, day, billing period): fixed counters
//! Hours and days are UTC calendar windows and the billing period is the subscription's
//! (anchored on its billing anchor). These are quotas, not rates: "1,000,000 tokens per day"
//! resets at the start of the day, as the invoice does. One counter per window, granted when
//! `used + n ≤ L`.

/// Microseconds, the unit of time of every rule.
pub type Micros = u64;

/// A rate window's GCRA parameters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Gcra {
    /// Units per window (≥ 1).
    pub limit: u64,
    /// Emission interval `⌈W / L⌉`, µs (≥ 1).
    pub interval: Micros,
}

impl Gcra {
    /// `limit` units per `window` µs. A limit of 0 grants nothing: use [`Gcra::limit`] 0 with
    /// an interval of 1.
    pub fn new(limit: u64, window: Micros) -> Gcra {
        Gcra {
            limit,
            interval: window.div_ceil(limit.max(1)).max(1),
        }
    }

    /// The burst capacity `L·T`, µs.
    pub fn capacity(&self) -> u64 {
        self.limit.saturating_mul(self.interval)
    }

    /// Decides a request of `amount` units at `now` against `tat` (0 when no state).
    pub fn check(&self, tat: Micros, now: Micros, amount: u64) -> Outcome {
        let base = tat.max(now);
        let backlog = base - now;
        let used = backlog.div_ceil(self.interval).min(self.limit);
        let allowed = amount <= self.limit
            && backlog.saturating_add(amount.saturating_mul(self.interval)) <= self.capacity();
        let after = if allowed {
            base + amount * self.interval
        } else {
            base
        };
        let used_after = if allowed { used + amount } else { used }.min(self.limit);
        Outcome {
            allowed,
            used: used_after,
            remaining: self.limit - used_after,
            reset_at: after,
            state: after,
        }
    }
}

/// A quota window's counter rule.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fixed {
    pub limit: u64,
    /// End of the window, µs since the epoch: when the counter starts again from zero.
    pub end: Micros,
}

impl Fixed {
    /// Decides a request of `amount` units against `used` units already counted.
    pub fn check(&self, used: u64, amount: u64) -> Outcome {
        let allowed = used
            .checked_add(amount)
            .is_some_and(|total| total <= self.limit);
        let used_after = if allowed { used + amount } else { used };
        Outcome {
            allowed,
            used: used_after,
            remaining: self.limit.saturating_sub(used_after),
            reset_at: self.end,
            state: used_after,
        }
    }
}

/// What one window says about one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Outcome {
    pub allowed: bool,
    /// Units counted in the window once the request is applied (if it is consumed and
    /// allowed; otherwise as before it).
    pub used: u64,
    /// `limit − used`.
    pub remaining: u64,
    /// When the whole limit is available again, µs since the epoch.
    pub reset_at: Micros,
    /// The window's state once the request is applied: TAT for GCRA, the count for fixed.
    pub state: u64,
}

/// One window's rule.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rule {
    Rate(Gcra),
    Fixed(Fixed),
}

impl Rule {
    pub fn limit(&self) -> u64 {
        match self {
            Rule::Rate(g) => g.limit,
            Rule::Fixed(f) => f.limit,
        }
    }

    pub fn check(&self, state: u64, now: Micros, amount: u64) -> Outcome {
        match self {
            Rule::Rate(g) => g.check(state, now, amount),
            Rule::Fixed(f) => f.check(state, amount),
        }
    }
}

/// Decides a request against every window of a meter at once: granted only if every window
/// grants it, and then consumed in all of them (all or nothing). Returns each window's
/// outcome; unless consumed, every outcome shows the state before the request, and `allowed`
/// says whether that window alone would grant it.
pub fn check_all(rules: &[(Rule, u64)], now: Micros, amount: u64, consume: bool) -> Vec<Outcome> {
    let trial: Vec<Outcome> = rules
        .iter()
        .map(|(rule, state)| rule.check(*state, now, amount))
        .collect();
    let allowed = trial.iter().all(|o| o.allowed);
    if allowed && consume {
        return trial;
    }
    rules
        .iter()
        .zip(trial)
        .map(|((rule, state), t)| {
            let mut before = rule.check(*state, now, 0);
            // Whether this window alone would grant it: a refusal names its window.
            before.allowed = t.allowed;
            before
        })
        .collect()
}

/// The window that binds a decision: the first refusing one, otherwise the one with the
/// least remaining (the earliest in declaration order on a tie).
pub fn binding(outcomes: &[Outcome]) -> Option<usize> {
    if let Some(i) = outcomes.iter().position(|o| !o.allowed) {
        return Some(i);
    }
    outcomes
        .iter()
        .enumerate()
        .min_by_key(|(i, o)| (o.remaining, *i))
        .map(|(i, _)| i)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const SEC: Micros = 1_000_000;

    #[test]
    fn gcra_grants_a_burst_of_the_limit_then_one_per_interval() {
        let g = Gcra::new(10, SEC);
        assert_eq!(g.interval, 100_000);
        let now = 1_000 * SEC;
        let mut tat = 0;
        for i in 0..10 {
            let o = g.check(tat, now, 1);
            assert!(o.allowed, "unit {i}");
            assert_eq!(o.used, i + 1);
            tat = o.state;
        }
        let refused = g.check(tat, now, 1);
        assert!(!refused.allowed);
        assert_eq!(refused.remaining, 0);
        assert_eq!(refused.reset_at, now + SEC);
        // One interval later, exactly one more unit.
        let later = now + g.interval;
        let o = g.check(tat, later, 1);
        assert!(o.allowed);
        assert!(!g.check(o.state, later, 1).allowed);
    }

    #[test]
    fn gcra_refuses_more_than_the_limit_at_once_and_all_of_a_too_large_request() {
        let g = Gcra::new(5, SEC);
        assert!(!g.check(0, SEC, 6).allowed);
        assert!(g.check(0, SEC, 5).allowed);
        let o = g.check(0, SEC, 3);
        let o2 = g.check(o.state, SEC, 3);
        assert!(!o2.allowed, "3 + 3 > 5");
        assert_eq!(o2.used, 3);
        assert_eq!(o2.state, o.state, "a refusal changes nothing");
    }

    #[test]
    fn gcra_rounds_the_interval_up_so_the_rate_never_exceeds_the_limit() {
        let g = Gcra::new(7, SEC);
        assert_eq!(g.interval, 142_858);
        assert!(g.capacity() >= SEC);
    }

    #[test]
    fn fixed_counts_up_to_the_limit() {
        let f = Fixed {
            limit: 100,
            end: 50,
        };
        assert!(f.check(99, 1).allowed);
        assert!(!f.check(100, 1).allowed);
        assert!(f.check(100, 0).allowed);
        assert!(!f.check(0, 101).allowed);
        assert!(!f.check(u64::MAX, 1).allowed, "overflow refuses");
        assert_eq!(f.check(40, 10).remaining, 50);
        assert_eq!(f.check(40, 10).reset_at, 50);
    }

    #[test]
    fn check_all_is_all_or_nothing() {
        let rules = [
            (Rule::Rate(Gcra::new(10, SEC)), 0),
            (
                Rule::Fixed(Fixed {
                    limit: 3,
                    end: 99 * SEC,
                }),
                2,
            ),
        ];
        let out = check_all(&rules, SEC, 2, true);
        assert!(out[0].allowed, "the rate window alone would grant it");
        assert!(!out[1].allowed);
        assert_eq!(out[0].used, 0, "the rate window is not consumed");
        assert_eq!(out[1].used, 2);
        assert_eq!(binding(&out), Some(1), "the refusing window binds");
        let ok = check_all(&rules, SEC, 1, true);
        assert!(ok.iter().all(|o| o.allowed));
        assert_eq!(ok[1].used, 3);
        assert_eq!(binding(&ok), Some(1), "least remaining");
        let ask = check_all(&rules, SEC, 1, false);
        assert!(ask.iter().all(|o| o.allowed));
        assert_eq!(ask[1].used, 2, "asking consumes nothing");
    }

    proptest! {
        /// Over any sequence of requests, the units GCRA grants in any span of length `t`
        /// never exceed `L + ⌊t / T⌋`, and never exceed `L` at one instant.
        #[test]
        fn gcra_never_grants_more_than_its_bound(
            limit in 1u64..50,
            window in 1u64..5_000,
            steps in proptest::collection::vec((0u64..400, 1u64..6), 1..200),
        ) {
            let g = Gcra::new(limit, window);
            let mut now = 10_000_000u64;
            let mut tat = 0;
            let mut granted: Vec<(u64, u64)> = Vec::new();
            for (gap, amount) in steps {
                now += gap;
                let o = g.check(tat, now, amount);
                if o.allowed {
                    granted.push((now, amount));
                    tat = o.state;
                } else {
                    prop_assert_eq!(o.state, tat.max(now));
                }
                prop_assert!(o.used <= limit);
                prop_assert_eq!(o.used + o.remaining, limit);
            }
            for (i, &(start, _)) in granted.iter().enumerate() {
                let mut sum = 0;
                for &(at, amount) in &granted[i..] {
                    sum += amount;
                    let span = at - start;
                    prop_assert!(sum <= limit + span / g.interval,
                        "{} units in {} µs, limit {} interval {}", sum, span, limit, g.interval);
                }
            }
        }

        /// A fixed window grants exactly the limit when asked one unit at a time.
        #[test]
        fn fixed_grants_exactly_the_limit(limit in 0u64..500, asks in 0u64..1_000) {
            let f = Fixed { limit, end: 0 };
            let mut used = 0;
            let mut granted = 0;
            for _ in 0..asks {
                let o = f.check(used, 1);
                if o.allowed {
                    granted += 1;
                    used = o.state;
                }
            }
            prop_assert_eq!(granted, asks.min(limit));
        }
    }
}
