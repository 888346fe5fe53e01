//! Request coalescing: concurrent misses on one key run the fill once per
//! instance; the others wait (bounded) for its result.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::watch;

#[derive(Clone)]
enum State<V> {
    Pending,
    /// `None`: the fill failed or its result cannot be shared.
    Done(Option<V>),
}

/// key → (the cache's invalidation epoch when the flight started, result).
type Map<V> = Arc<Mutex<HashMap<String, (u64, watch::Receiver<State<V>>)>>>;

/// The fills in progress on this instance, by key.
pub(crate) struct Flights<V> {
    map: Map<V>,
}

impl<V> Default for Flights<V> {
    fn default() -> Self {
        Flights {
            map: Arc::new(Mutex::new(HashMap::new())),
        }
    }
}

/// What a caller does for a key.
pub(crate) enum Role<V> {
    /// Run the fill and report through the guard.
    Leader(FlightGuard<V>),
    /// Wait for the leader.
    Follower(Waiter<V>),
}

impl<V: Clone + Send + Sync + 'static> Flights<V> {
    /// Joins the fill of `key`, or starts one.
    /// Joins the flight for `key`, or leads a new one. A flight started
    /// before an invalidation (an older `epoch`) is not joined: its result
    /// may predate the invalidation.
    pub(crate) fn join(&self, key: &str, epoch: u64) -> Role<V> {
        let Ok(mut map) = self.map.lock() else {
            // A poisoned map only costs the coalescing: lead alone.
            let (tx, _) = watch::channel(State::Pending);
            return Role::Leader(FlightGuard {
                map: None,
                key: String::new(),
                tx,
            });
        };
        if let Some((e, rx)) = map.get(key)
            && *e == epoch
        {
            return Role::Follower(Waiter { rx: rx.clone() });
        }
        let (tx, rx) = watch::channel(State::Pending);
        map.insert(key.to_owned(), (epoch, rx));
        Role::Leader(FlightGuard {
            map: Some(self.map.clone()),
            key: key.to_owned(),
            tx,
        })
    }

    /// Waits on the fill of `key` if there is one, without starting one.
    pub(crate) fn follow(&self, key: &str, epoch: u64) -> Option<Waiter<V>> {
        let map = self.map.lock().ok()?;
        map.get(key)
            .filter(|(e, _)| *e == epoch)
            .map(|(_, rx)| Waiter { rx: rx.clone() })
    }

    /// Whether a fill of `key` started since the last invalidation is in
    /// progress.
    pub(crate) fn contains(&self, key: &str, epoch: u64) -> bool {
        self.map
            .lock()
            .map(|m| m.get(key).is_some_and(|(e, _)| *e == epoch))
            .unwrap_or(false)
    }
}

/// Held by the leader. [`complete`](Self::complete) hands the result to the
/// waiters at once; dropping the guard removes the flight (waiters of a
/// flight never completed are told it failed).
pub(crate) struct FlightGuard<V> {
    map: Option<Map<V>>,
    key: String,
    tx: watch::Sender<State<V>>,
}

impl<V> FlightGuard<V> {
    /// Shares the result; the flight stays joinable (newcomers get the
    /// result at once) until the guard is dropped, typically after the
    /// store write, so nobody starts a second fill in between.
    pub(crate) fn complete(&self, v: Option<V>) {
        self.tx.send_replace(State::Done(v));
    }
}

impl<V> Drop for FlightGuard<V> {
    fn drop(&mut self) {
        if matches!(*self.tx.borrow(), State::Pending) {
            self.tx.send_replace(State::Done(None));
        }
        if let Some(map) = &self.map
            && let Ok(mut m) = map.lock()
            && m.get(&self.key)
                .is_some_and(|(_, rx)| rx.same_channel(&self.tx.subscribe()))
        {
            m.remove(&self.key);
        }
    }
}

/// Held by a follower.
pub(crate) struct Waiter<V> {
    rx: watch::Receiver<State<V>>,
}

impl<V: Clone> Waiter<V> {
    /// The leader's result, or `None` when it failed, could not be shared,
    /// or did not come within `bound`.
    pub(crate) async fn wait(mut self, bound: Duration) -> Option<V> {
        let done = self.rx.wait_for(|s| matches!(s, State::Done(_)));
        match tokio::time::timeout(bound, done).await {
            Ok(Ok(state)) => match &*state {
                State::Done(v) => v.clone(),
                State::Pending => None,
            },
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn one_leader_many_followers() {
        let f: Flights<u32> = Flights::default();
        let Role::Leader(g) = f.join("k", 0) else {
            panic!("first is leader")
        };
        let Role::Follower(w) = f.join("k", 0) else {
            panic!("second follows")
        };
        let waiting = tokio::spawn(w.wait(Duration::from_secs(5)));
        g.complete(Some(7));
        assert_eq!(waiting.await.unwrap(), Some(7));
        // Still joinable until the guard drops.
        let Role::Follower(w) = f.join("k", 0) else {
            panic!("completed flight still joinable")
        };
        assert_eq!(w.wait(Duration::from_secs(1)).await, Some(7));
        drop(g);
        assert!(!f.contains("k", 0));
        assert!(matches!(f.join("k", 0), Role::Leader(_)));
    }

    #[tokio::test]
    async fn dropped_leader_fails_followers_and_timeout_bounds() {
        let f: Flights<u32> = Flights::default();
        let Role::Leader(g) = f.join("k", 0) else {
            panic!()
        };
        let Role::Follower(w) = f.join("k", 0) else {
            panic!()
        };
        assert_eq!(w.wait(Duration::from_millis(20)).await, None, "timed out");
        let Role::Follower(w) = f.join("k", 0) else {
            panic!()
        };
        drop(g);
        assert_eq!(w.wait(Duration::from_secs(5)).await, None);
    }
}
