//! Invalidations the store could not take (Redis down or too slow), kept
//! to run again once it is back.
//!
//! An invalidation that fails leaves its entries in the store; served after
//! the outage, they would be what the application removed (a campaign's old
//! total after a donation, for up to its TTL). So the cache remembers each
//! one that failed on an outage and, until all of them have run, does not
//! serve from the store at all (requests bypass it, as during the outage).
//! Once the store answers again it runs them, then serves again. What it
//! remembers is bounded ([`MAX_PENDING`]); beyond that an invalidation is
//! counted as dropped and logged, and its entries live out their TTL.

use std::collections::HashSet;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};

/// How many failed invalidations (tags and keys together) are kept.
pub(crate) const MAX_PENDING: usize = 10_000;

/// One invalidation to run again.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) enum Invalidation {
    /// Everything tagged with it.
    Tag(String),
    /// One stored key.
    Key(String),
}

/// The failed invalidations of one cache.
#[derive(Debug, Default)]
pub(crate) struct Pending {
    /// Whether any are waiting: read by every request (one atomic load).
    waiting: AtomicBool,
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    items: HashSet<Invalidation>,
    /// A task is running them (or waiting for the store to run them).
    replaying: bool,
    /// Dropped since the set was last emptied (logged once per spell).
    dropped: u64,
}

impl Pending {
    /// Whether invalidations are waiting to run: the store may hold
    /// entries that should be gone.
    #[inline]
    pub(crate) fn waiting(&self) -> bool {
        self.waiting.load(Ordering::Acquire)
    }

    /// Keeps `item` to run again. Returns true when the caller must start
    /// the task that runs them ([`take`](Self::take), then
    /// [`settle`](Self::settle)).
    pub(crate) fn keep(&self, item: Invalidation) -> bool {
        let Ok(mut s) = self.state.lock() else {
            return false;
        };
        if s.items.len() >= MAX_PENDING && !s.items.contains(&item) {
            s.dropped += 1;
            metrics::counter!("tollgate_cache_invalidations_dropped_total").increment(1);
            if s.dropped == 1 {
                tracing::warn!(
                    kept = MAX_PENDING,
                    "too many cache invalidations waiting for the store: further ones are dropped, and their entries may be served until their TTL"
                );
            }
            return false;
        }
        s.items.insert(item);
        self.waiting.store(true, Ordering::Release);
        !std::mem::replace(&mut s.replaying, true)
    }

    /// The invalidations to run now (they stay [`waiting`](Self::waiting)
    /// until [`settle`](Self::settle) finds none left).
    pub(crate) fn take(&self) -> Vec<Invalidation> {
        self.state
            .lock()
            .map(|mut s| s.items.drain().collect())
            .unwrap_or_default()
    }

    /// After a round: true (and no longer waiting) when every invalidation
    /// ran; false when some failed again and were kept.
    pub(crate) fn settle(&self) -> bool {
        let Ok(mut s) = self.state.lock() else {
            return true;
        };
        if !s.items.is_empty() {
            return false;
        }
        s.replaying = false;
        s.dropped = 0;
        self.waiting.store(false, Ordering::Release);
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kept_until_a_round_runs_them_all() {
        let p = Pending::default();
        assert!(!p.waiting());
        assert!(p.keep(Invalidation::Tag("a".into())), "starts the task");
        assert!(!p.keep(Invalidation::Key("k".into())), "one task");
        assert!(!p.keep(Invalidation::Tag("a".into())));
        assert!(p.waiting());
        let mut round = p.take();
        round.sort_by_key(|i| format!("{i:?}"));
        assert_eq!(
            round,
            [Invalidation::Key("k".into()), Invalidation::Tag("a".into())]
        );
        assert!(p.waiting(), "until the round settles");
        // One failed again during the round.
        assert!(!p.keep(Invalidation::Tag("a".into())));
        assert!(!p.settle());
        assert!(p.waiting());
        assert_eq!(p.take(), [Invalidation::Tag("a".into())]);
        assert!(p.settle());
        assert!(!p.waiting());
        assert!(p.keep(Invalidation::Key("k".into())), "a new task");
    }

    #[test]
    fn bounded() {
        let p = Pending::default();
        for i in 0..MAX_PENDING + 5 {
            p.keep(Invalidation::Key(i.to_string()));
        }
        assert_eq!(p.take().len(), MAX_PENDING);
    }
}
