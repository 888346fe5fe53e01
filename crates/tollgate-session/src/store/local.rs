//! The optional in-process cache of session records, kept exact by Redis's
//! client tracking ([`tollgate_redis::TrackedConnection`]).
//!
//! A record is cached only when it was read, or written, through the
//! tracked connection: Redis then pushes an invalidation when anyone else
//! changes or deletes it. The protocol of [`tollgate_redis::Invalidate`]
//! keeps a reply that raced an invalidation out of the cache: a key being
//! read holds a [`Slot::Reading`] mark, which an invalidation removes, and
//! a reply fills the cache only over its own mark and in the epoch it
//! began in.

use std::collections::HashMap;
use std::hash::BuildHasher as _;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use super::Record;

/// Shards of the map: the two workers of a small machine rarely want the
/// same lock.
const SHARDS: usize = 16;

enum Slot {
    /// A read (or a write) of the key is in flight.
    Reading { token: u64 },
    /// The record as Redis holds it, as of `at`.
    Ready { record: Record, at: Instant },
}

/// What a read takes before it is sent, to fill the cache with its reply.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Ticket {
    token: u64,
    epoch: u64,
}

/// Session records by Redis key, bounded.
pub(crate) struct LocalCache {
    shards: Box<[Mutex<HashMap<String, Slot>>]>,
    per_shard: usize,
    max_age: Duration,
    /// Bumped whenever invalidations may have been lost.
    epoch: AtomicU64,
    tokens: AtomicU64,
    hasher: foldhash::fast::RandomState,
}

impl std::fmt::Debug for LocalCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalCache")
            .field("capacity", &(self.per_shard * SHARDS))
            .field("max_age", &self.max_age)
            .finish()
    }
}

impl LocalCache {
    /// At most about `capacity` records, each served for at most
    /// `max_age` after it was read (a bound on staleness should the
    /// connection fail silently).
    pub(crate) fn new(capacity: usize, max_age: Duration) -> Self {
        LocalCache {
            shards: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
            per_shard: capacity.div_ceil(SHARDS).max(1),
            max_age,
            epoch: AtomicU64::new(0),
            tokens: AtomicU64::new(0),
            hasher: foldhash::fast::RandomState::default(),
        }
    }

    fn shard(&self, key: &str) -> std::sync::MutexGuard<'_, HashMap<String, Slot>> {
        let i = (self.hasher.hash_one(key) as usize) % SHARDS;
        match self.shards[i].lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        }
    }

    /// A copy of the record under `key`, if one is cached and fresh.
    pub(crate) fn get(&self, key: &str) -> Option<Record> {
        let shard = self.shard(key);
        match shard.get(key) {
            Some(Slot::Ready { record, at }) if at.elapsed() < self.max_age => Some(record.clone()),
            _ => None,
        }
    }

    /// Marks `key` as being read (or written): from now until the reply,
    /// nothing is served for it, and an invalidation voids the reply.
    pub(crate) fn begin(&self, key: &str) -> Ticket {
        // The epoch first: a reply whose read began before a bump is
        // never kept.
        let epoch = self.epoch.load(Ordering::Acquire);
        let token = self.tokens.fetch_add(1, Ordering::Relaxed);
        let mut shard = self.shard(key);
        if let Some(slot) = shard.get_mut(key) {
            *slot = Slot::Reading { token };
        } else {
            if shard.len() >= self.per_shard {
                // Full: make room (any entry will do; a cache miss only
                // costs a read).
                if let Some(k) = shard.keys().next().cloned() {
                    shard.remove(&k);
                }
            }
            shard.insert(key.to_owned(), Slot::Reading { token });
        }
        Ticket { token, epoch }
    }

    /// Before this instance writes `key` over the record it loaded at
    /// `loaded`: when the cache still holds that record (no change heard
    /// of since), marks the key as being written, as
    /// [`begin`](Self::begin) does, and returns the ticket; otherwise
    /// `None`, and nothing changes.
    pub(crate) fn begin_write(&self, key: &str, loaded: u64) -> Option<Ticket> {
        let epoch = self.epoch.load(Ordering::Acquire);
        let mut shard = self.shard(key);
        let slot = shard.get_mut(key)?;
        match slot {
            Slot::Ready { record, at }
                if record.generation == loaded && at.elapsed() < self.max_age =>
            {
                let token = self.tokens.fetch_add(1, Ordering::Relaxed);
                *slot = Slot::Reading { token };
                Some(Ticket { token, epoch })
            }
            _ => None,
        }
    }

    /// Caches `record` as the reply of the read `ticket` began, unless an
    /// invalidation came in between. Whether it did.
    pub(crate) fn fill(&self, key: &str, ticket: Ticket, record: Record) -> bool {
        let mut shard = self.shard(key);
        if self.epoch.load(Ordering::Acquire) != ticket.epoch {
            return false;
        }
        let Some(slot) = shard.get_mut(key) else {
            return false;
        };
        if !matches!(slot, Slot::Reading { token } if *token == ticket.token) {
            return false;
        }
        *slot = Slot::Ready {
            record,
            at: Instant::now(),
        };
        true
    }

    /// After this instance's own write of `key` completed: caches what it
    /// wrote if nothing began on the key meanwhile; otherwise drops the
    /// key, so that a read sent before the write landed (whose reply may
    /// hold the old record, and whose change Redis need not push back to
    /// the connection that made it) cannot fill the cache.
    pub(crate) fn wrote(&self, key: &str, ticket: Ticket, record: Option<Record>) {
        if !record.is_some_and(|r| self.fill(key, ticket, r)) {
            self.forget(key);
        }
    }

    /// Drops whatever is held for `key`.
    pub(crate) fn forget(&self, key: &str) {
        self.shard(key).remove(key);
    }

    /// How many keys are held (reads in flight included).
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.shards
            .iter()
            .map(|s| s.lock().map(|m| m.len()).unwrap_or(0))
            .sum()
    }
}

impl tollgate_redis::Invalidate for LocalCache {
    fn key(&self, key: &[u8]) {
        if let Ok(k) = std::str::from_utf8(key) {
            self.forget(k);
        }
    }

    fn all(&self) {
        self.epoch.fetch_add(1, Ordering::AcqRel);
        for s in &self.shards {
            match s.lock() {
                Ok(mut m) => m.clear(),
                Err(p) => p.into_inner().clear(),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;
    use tollgate_redis::Invalidate as _;

    fn record(generation: u64) -> Record {
        Record {
            v: super::super::RECORD_VERSION,
            generation,
            created_at: 0,
            last_seen: 0,
            expires_at: u64::MAX,
            user: None,
            user_agent: None,
            ip: None,
            data: BTreeMap::new(),
        }
    }

    fn cache() -> LocalCache {
        LocalCache::new(1_000, Duration::from_secs(60))
    }

    #[test]
    fn a_reply_fills_over_its_own_mark_only() {
        let c = cache();
        let t = c.begin("k");
        c.fill("k", t, record(1));
        assert_eq!(c.get("k").map(|r| r.generation), Some(1));
        // A second read of the key hides the cached copy until its reply;
        // the first read's late reply cannot fill over its mark.
        let t2 = c.begin("k");
        assert!(c.get("k").is_none());
        c.fill("k", t, record(0));
        assert!(c.get("k").is_none());
        c.fill("k", t2, record(2));
        assert_eq!(c.get("k").map(|r| r.generation), Some(2));
    }

    #[test]
    fn an_invalidation_voids_a_reply_in_flight_and_a_cached_copy() {
        let c = cache();
        // Invalidated while the read is in flight: the reply is stale.
        let t = c.begin("k");
        c.key(b"k");
        c.fill("k", t, record(1));
        assert!(c.get("k").is_none());
        // Invalidated after the fill: gone.
        let t = c.begin("k");
        c.fill("k", t, record(2));
        c.key(b"k");
        assert!(c.get("k").is_none());
    }

    #[test]
    fn losing_invalidations_voids_every_read_begun_before() {
        let c = cache();
        let cached = c.begin("a");
        c.fill("a", cached, record(1));
        let in_flight = c.begin("b");
        c.all();
        assert!(c.get("a").is_none());
        // The read of "b" began before: its mark may have been re-made
        // since, but its epoch is gone.
        let again = c.begin("b");
        c.fill(
            "b",
            Ticket {
                token: again.token,
                epoch: in_flight.epoch,
            },
            record(1),
        );
        assert!(c.get("b").is_none());
        c.fill("b", again, record(2));
        assert_eq!(c.get("b").map(|r| r.generation), Some(2));
    }

    #[test]
    fn a_write_voids_the_reads_begun_while_it_was_in_flight() {
        let c = cache();
        let write = c.begin("k");
        // A load of the key starts while the write is in flight: its
        // reply may predate the write.
        let read = c.begin("k");
        c.wrote("k", write, Some(record(2)));
        c.fill("k", read, record(1));
        assert!(c.get("k").is_none(), "the older read must not fill");
        // Alone, the write caches what it wrote; a failed one drops it.
        let write = c.begin("k");
        c.wrote("k", write, Some(record(3)));
        assert_eq!(c.get("k").map(|r| r.generation), Some(3));
        let write = c.begin("k");
        c.wrote("k", write, None);
        assert!(c.get("k").is_none());
    }

    #[test]
    fn a_write_begins_only_over_the_record_it_loaded() {
        let c = cache();
        assert!(c.begin_write("k", 1).is_none(), "nothing cached");
        let t = c.begin("k");
        c.fill("k", t, record(1));
        assert!(c.begin_write("k", 2).is_none(), "another generation");
        assert_eq!(c.get("k").map(|r| r.generation), Some(1), "left as it was");
        let w = c.begin_write("k", 1).expect("the loaded record");
        assert!(c.get("k").is_none(), "hidden while the write is in flight");
        assert!(c.begin_write("k", 1).is_none(), "a write already in flight");
        c.wrote("k", w, Some(record(7)));
        assert_eq!(c.get("k").map(|r| r.generation), Some(7));
        // Invalidations lost while it was in flight: what it wrote is not
        // kept.
        let w = c.begin_write("k", 7).expect("the written record");
        c.all();
        c.wrote("k", w, Some(record(8)));
        assert!(c.get("k").is_none());
    }

    #[test]
    fn stays_within_its_capacity_and_max_age() {
        let c = LocalCache::new(32, Duration::ZERO);
        for i in 0..1_000 {
            let k = format!("k{i}");
            let t = c.begin(&k);
            c.fill(&k, t, record(1));
            // Past its max age at once: never served.
            assert!(c.get(&k).is_none());
        }
        assert!(c.len() <= 32);
    }
}
