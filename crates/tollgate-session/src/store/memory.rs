//! The in-process store: a bounded moka cache of records. The store of a
//! deployment without Redis, and the fallback while Redis is unreachable.

use std::sync::Arc;
use std::time::{Duration, Instant};

use moka::Expiry;
use moka::ops::compute::Op;
use moka::sync::Cache;

use super::{
    Diff, NewRecord, Record, SaveOutcome, SessionInfo, SessionStore, Timeouts, millis, now_ms,
};
use crate::error::Error;

/// Sessions in process memory, at most `capacity` of them (least recently
/// used evicted first). Same semantics as [`RedisStore`](super::RedisStore);
/// nothing is shared between instances and nothing survives a restart.
#[derive(Clone)]
pub struct MemoryStore {
    cache: Cache<String, Arc<Record>>,
    timeouts: Timeouts,
}

impl std::fmt::Debug for MemoryStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemoryStore")
            .field("entries", &self.cache.entry_count())
            .field("timeouts", &self.timeouts)
            .finish()
    }
}

/// Each entry lives until its record's own expiry.
struct RecordExpiry {
    idle: Duration,
}

impl RecordExpiry {
    fn ttl(&self, r: &Record) -> Option<Duration> {
        Some(r.ttl(now_ms(), self.idle))
    }
}

impl Expiry<String, Arc<Record>> for RecordExpiry {
    fn expire_after_create(&self, _: &String, r: &Arc<Record>, _: Instant) -> Option<Duration> {
        self.ttl(r)
    }

    fn expire_after_update(
        &self,
        _: &String,
        r: &Arc<Record>,
        _: Instant,
        _: Option<Duration>,
    ) -> Option<Duration> {
        self.ttl(r)
    }
}

impl MemoryStore {
    /// A store of at most `capacity` sessions enforcing `timeouts`.
    pub fn new(capacity: u64, timeouts: Timeouts) -> Self {
        MemoryStore {
            cache: Cache::builder()
                .max_capacity(capacity)
                .expire_after(RecordExpiry {
                    idle: timeouts.idle,
                })
                .build(),
            timeouts,
        }
    }

    /// Sessions currently held (approximate, as moka counts).
    pub fn len(&self) -> u64 {
        self.cache.run_pending_tasks();
        self.cache.entry_count()
    }

    /// Whether no session is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn live(&self, r: &Record, now: u64) -> bool {
        !r.is_expired(now, self.timeouts.idle)
    }

    fn user_entries(&self, user_id: &str) -> Vec<(String, Arc<Record>)> {
        let now = now_ms();
        self.cache
            .iter()
            .filter(|(_, r)| r.user.as_deref() == Some(user_id) && self.live(r, now))
            .map(|(k, r)| ((*k).clone(), r))
            .collect()
    }
}

impl SessionStore for MemoryStore {
    async fn create(
        &self,
        id_hash: &str,
        _user_hash: Option<&str>,
        new: &NewRecord,
    ) -> Result<bool, Error> {
        let now = now_ms();
        let record = new.record_at(now, self.timeouts.absolute);
        if record.expires_at <= now {
            return Ok(false);
        }
        let mut created = false;
        self.cache
            .entry(id_hash.to_owned())
            .and_compute_with(|e| match e {
                Some(e) if self.live(e.value(), now) => Op::Nop,
                _ => {
                    created = true;
                    Op::Put(Arc::new(record))
                }
            });
        Ok(created)
    }

    async fn load(&self, id_hash: &str) -> Result<Option<Record>, Error> {
        let now = now_ms();
        let Some(r) = self.cache.get(id_hash) else {
            return Ok(None);
        };
        if !self.live(&r, now) {
            self.cache.invalidate(id_hash);
            return Ok(None);
        }
        if now.saturating_sub(r.last_seen) < millis(self.timeouts.touch_after) {
            return Ok(Some((*r).clone()));
        }
        let mut out = None;
        self.cache
            .entry(id_hash.to_owned())
            .and_compute_with(|e| match e {
                Some(e) if self.live(e.value(), now) => {
                    let mut r = (**e.value()).clone();
                    r.last_seen = now;
                    out = Some(r.clone());
                    Op::Put(Arc::new(r))
                }
                Some(_) => Op::Remove,
                None => Op::Nop,
            });
        Ok(out)
    }

    async fn save(
        &self,
        id_hash: &str,
        _user_hash: Option<&str>,
        diff: &Diff,
        generation: u64,
    ) -> Result<SaveOutcome, Error> {
        let now = now_ms();
        let mut outcome = SaveOutcome::Missing;
        self.cache
            .entry(id_hash.to_owned())
            .and_compute_with(|e| match e {
                Some(e) if self.live(e.value(), now) => {
                    let mut r = (**e.value()).clone();
                    outcome = if r.generation == generation {
                        SaveOutcome::Saved
                    } else {
                        SaveOutcome::Merged
                    };
                    diff.apply(&mut r);
                    r.generation += 1;
                    r.last_seen = now;
                    Op::Put(Arc::new(r))
                }
                Some(_) => Op::Remove,
                None => Op::Nop,
            });
        Ok(outcome)
    }

    async fn take(&self, id_hash: &str) -> Result<Option<Record>, Error> {
        let now = now_ms();
        Ok(self
            .cache
            .remove(id_hash)
            .filter(|r| self.live(r, now))
            .map(|r| (*r).clone()))
    }

    async fn delete(&self, id_hash: &str) -> Result<bool, Error> {
        let now = now_ms();
        Ok(self
            .cache
            .remove(id_hash)
            .is_some_and(|r| self.live(&r, now)))
    }

    async fn list_user(&self, _user_hash: &str, user_id: &str) -> Result<Vec<SessionInfo>, Error> {
        let mut list: Vec<SessionInfo> = self
            .user_entries(user_id)
            .into_iter()
            .map(|(k, r)| SessionInfo::of(k, &r))
            .collect();
        list.sort_by_key(|s| s.created_at);
        Ok(list)
    }

    async fn revoke_user(
        &self,
        _user_hash: &str,
        user_id: &str,
        except: Option<&str>,
    ) -> Result<usize, Error> {
        let mut n = 0;
        for (k, _) in self.user_entries(user_id) {
            if Some(k.as_str()) != except && self.cache.remove(&k).is_some() {
                n += 1;
            }
        }
        Ok(n)
    }
}
