//! The in-process limiter that answers for fail-open meters while Redis is unreachable,
//! so that failing open is not failing unlimited.
//!
//! It applies the same rules ([`crate::algo`]) to state held in this process, keyed like the
//! Redis counters. Its state starts empty: during an outage each gateway process grants up
//! to the limit on its own, so a fleet of `n` processes grants at most `n` times the limit
//! (plus what Redis had already counted in the window). When Redis answers again it is the
//! only source of truth; the local state is dropped.

use std::collections::HashMap;
use std::sync::Mutex;

use crate::algo::{check_all, Micros, Outcome, Rule};

/// Entries kept before expired ones are swept.
const SWEEP_AT: usize = 100_000;

#[derive(Default)]
pub struct Fallback {
    /// key → (state, expires at µs)
    state: Mutex<HashMap<String, (u64, Micros)>>,
}

impl Fallback {
    /// Decides like the Redis script: all windows or none.
    pub fn check(
        &self,
        windows: &[(&str, Rule, Micros)],
        now: Micros,
        amount: u64,
        consume: bool,
    ) -> Vec<Outcome> {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if state.len() > SWEEP_AT {
            state.retain(|_, (_, expires)| *expires > now);
        }
        let rules: Vec<(Rule, u64)> = windows
            .iter()
            .map(|(key, rule, _)| {
                let s = state
                    .get(*key)
                    .filter(|(_, expires)| *expires > now)
                    .map_or(0, |(s, _)| *s);
                (*rule, s)
            })
            .collect();
        let out = check_all(&rules, now, amount, consume);
        if consume && amount > 0 && out.iter().all(|o| o.allowed) {
            for ((key, rule, expires), o) in windows.iter().zip(&out) {
                let expires = match rule {
                    Rule::Rate(_) => o.state,
                    Rule::Fixed(_) => *expires,
                };
                state.insert((*key).to_owned(), (o.state, expires));
            }
        }
        out
    }

    /// Drops every local count (Redis is back).
    pub fn clear(&self) {
        self.state.lock().unwrap_or_else(|e| e.into_inner()).clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::algo::{Fixed, Gcra};

    #[test]
    fn fallback_limits_like_redis_and_forgets_on_clear() {
        let f = Fallback::default();
        let rules = [
            ("a:minute", Rule::Rate(Gcra::new(100, 60_000_000)), 0),
            (
                "a:day:0",
                Rule::Fixed(Fixed {
                    limit: 3,
                    end: 10_000_000,
                }),
                10_000_000,
            ),
        ];
        let now = 1_000_000;
        let granted = (0..10)
            .filter(|_| f.check(&rules, now, 1, true).iter().all(|o| o.allowed))
            .count();
        assert_eq!(granted, 3);
        assert!(!f.check(&rules, now, 1, false)[1].allowed);
        // The day counter expires with its window.
        assert!(f.check(&rules, 10_000_001, 1, true)[1].allowed);
        f.clear();
        assert_eq!(f.check(&rules, now, 0, false)[1].used, 0);
    }
}
