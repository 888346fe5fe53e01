//! Where session records live: one [`SessionStore`] trait, a Redis
//! implementation ([`RedisStore`]) and a bounded in-memory one
//! ([`MemoryStore`]), held to the same behaviour by one conformance suite.
//!
//! Stores key records by the **keyed hash** of the session id (never the
//! raw id) and enforce both timeouts themselves: a record is gone once it
//! has been idle for longer than the idle timeout or has lived past its
//! absolute expiry, whatever the client replays.

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::error::Error;

mod local;
mod memory;
mod redis;

pub use memory::MemoryStore;
pub use redis::RedisStore;

/// Current record format.
pub const RECORD_VERSION: u32 = 1;

/// One session as stored: readable JSON.
///
/// Entry values are kept as JSON *text* (`"cart": "[1,2]"`) so that the
/// Redis scripts can merge entries without decoding them: Lua's JSON
/// library would turn `[]` into `{}` and round large integers.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    /// Format version ([`RECORD_VERSION`]).
    pub v: u32,
    /// Changed by every save (not by touches), by one or, for a plain
    /// write from the in-process cache, to a fresh random value: a save
    /// that finds another generation than the one it loaded merges over a
    /// concurrent write.
    pub generation: u64,
    /// Creation time, milliseconds since the Unix epoch.
    pub created_at: u64,
    /// Last time the session was seen (throttled), ms since the epoch.
    pub last_seen: u64,
    /// Absolute expiry, ms since the epoch; never extended.
    pub expires_at: u64,
    /// The user bound to the session, if any.
    pub user: Option<String>,
    /// The client's `User-Agent` at creation, if recorded.
    pub user_agent: Option<String>,
    /// The client's IP at creation, if recorded.
    pub ip: Option<String>,
    /// Entries: key → JSON text of the value.
    pub data: BTreeMap<String, String>,
}

impl Record {
    /// Parses a stored record.
    pub fn from_json(s: &str) -> Result<Self, Error> {
        serde_json::from_str(s).map_err(Error::Corrupt)
    }

    /// Whether the record is dead at `now` (ms) under `idle`.
    pub fn is_expired(&self, now: u64, idle: Duration) -> bool {
        now >= self.expires_at || now.saturating_sub(self.last_seen) >= millis(idle)
    }

    /// How long the record may live from `now`: the smaller of the idle
    /// timeout and what remains of its absolute lifetime.
    pub fn ttl(&self, now: u64, idle: Duration) -> Duration {
        let abs = self.expires_at.saturating_sub(now);
        Duration::from_millis(
            abs.min(millis(idle).saturating_sub(now.saturating_sub(self.last_seen))),
        )
    }
}

/// What a new record starts with.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct NewRecord {
    /// Initial entries (JSON text per key).
    pub data: BTreeMap<String, String>,
    /// User bound at creation.
    pub user: Option<String>,
    /// Client `User-Agent`.
    pub user_agent: Option<String>,
    /// Client IP.
    pub ip: Option<String>,
    /// Keep this creation time (id rotation) instead of now.
    #[serde(skip)]
    pub created_at: Option<u64>,
    /// Keep this absolute expiry (id rotation: rotating never extends a
    /// session's lifetime) instead of now + absolute timeout.
    #[serde(skip)]
    pub expires_at: Option<u64>,
}

impl NewRecord {
    /// The record created from this at `now` (ms): generation 1, seen now,
    /// expiring after `absolute` unless a rotation keeps its own times.
    pub fn record_at(&self, now: u64, absolute: Duration) -> Record {
        Record {
            v: RECORD_VERSION,
            generation: 1,
            created_at: self.created_at.unwrap_or(now),
            last_seen: now,
            expires_at: self
                .expires_at
                .unwrap_or_else(|| now.saturating_add(millis(absolute))),
            user: self.user.clone(),
            user_agent: self.user_agent.clone(),
            ip: self.ip.clone(),
            data: self.data.clone(),
        }
    }
}

/// Changes made by one request, merged into the stored record entry by
/// entry so that concurrent requests writing different keys all survive.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Diff {
    /// Drop every stored entry first.
    pub clear: bool,
    /// Entries to set (JSON text).
    pub set: BTreeMap<String, String>,
    /// Entries to remove.
    pub remove: BTreeSet<String>,
    /// `Some(user)` binds (or with `None` unbinds) the session's user.
    pub user: Option<Option<String>>,
}

impl Diff {
    /// Whether applying it would change nothing.
    pub fn is_empty(&self) -> bool {
        !self.clear && self.set.is_empty() && self.remove.is_empty() && self.user.is_none()
    }

    /// Applies the diff to `record` (the memory store, and the Rust mirror
    /// of `save.lua`).
    pub fn apply(&self, record: &mut Record) {
        if self.clear {
            record.data.clear();
        }
        for k in &self.remove {
            record.data.remove(k);
        }
        for (k, v) in &self.set {
            // An entry written again (the common case) reuses its key and
            // the old value's buffer.
            match record.data.get_mut(k) {
                Some(old) => old.clone_from(v),
                None => {
                    record.data.insert(k.clone(), v.clone());
                }
            }
        }
        if let Some(u) = &self.user {
            record.user.clone_from(u);
        }
    }
}

/// What a save found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SaveOutcome {
    /// Merged; nobody else wrote since the load.
    Saved,
    /// Merged, but another request saved since this one loaded (counted as
    /// a write conflict; entries it wrote that this one did not touch are
    /// kept).
    Merged,
    /// The record is gone (destroyed, revoked or expired): nothing was
    /// written. A session is never resurrected.
    Missing,
}

/// The timeouts every store enforces.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Timeouts {
    /// Sliding: a session unused for this long is gone.
    pub idle: Duration,
    /// Absolute: a session older than this is gone, however active.
    pub absolute: Duration,
    /// A read refreshes `last_seen` (a write) only when the last refresh is
    /// at least this old, so reads do not rewrite the record every time.
    pub touch_after: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Timeouts {
            idle: Duration::from_secs(30 * 60),
            absolute: Duration::from_secs(12 * 3600),
            touch_after: Duration::from_secs(60),
        }
    }
}

/// One of a user's sessions, as listed by [`SessionStore::list_user`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct SessionInfo {
    /// The keyed hash of the session id (pass it to revoke; the raw id is
    /// never exposed).
    pub id_hash: String,
    /// Creation time, ms since the epoch.
    pub created_at: u64,
    /// Last seen (throttled), ms since the epoch.
    pub last_seen: u64,
    /// Absolute expiry, ms since the epoch.
    pub expires_at: u64,
    /// `User-Agent` at creation, if recorded.
    pub user_agent: Option<String>,
    /// Client IP at creation, if recorded.
    pub ip: Option<String>,
}

impl SessionInfo {
    pub(crate) fn of(id_hash: String, r: &Record) -> Self {
        SessionInfo {
            id_hash,
            created_at: r.created_at,
            last_seen: r.last_seen,
            expires_at: r.expires_at,
            user_agent: r.user_agent.clone(),
            ip: r.ip.clone(),
        }
    }
}

/// A session backend. Every key is a keyed hash (64 hex characters): the
/// session id's (`id_hash`) or the user id's (`user_hash`).
pub trait SessionStore: Send + Sync + 'static {
    /// Creates a record unless one exists under `id_hash` (`Ok(false)`:
    /// the id collided, or a rotation's absolute expiry has passed).
    /// A bound user is added to the user's index first.
    fn create(
        &self,
        id_hash: &str,
        user_hash: Option<&str>,
        new: &NewRecord,
    ) -> impl Future<Output = Result<bool, Error>> + Send;

    /// Loads a live record, refreshing `last_seen` and the expiry when the
    /// last refresh is older than [`Timeouts::touch_after`].
    fn load(&self, id_hash: &str) -> impl Future<Output = Result<Option<Record>, Error>> + Send;

    /// Merges `diff` into a live record loaded at `generation`; refuses to
    /// write when the record is gone. A user bound by the diff is added to
    /// the user's index first.
    fn save(
        &self,
        id_hash: &str,
        user_hash: Option<&str>,
        diff: &Diff,
        generation: u64,
    ) -> impl Future<Output = Result<SaveOutcome, Error>> + Send;

    /// [`save`](Self::save) for a request that holds the record it loaded
    /// (`base`, at `base.generation`, handed over: the request is done
    /// with it): a store may write the merged record as a whole when
    /// nobody saved since, and merge entry by entry otherwise. The default
    /// merges.
    fn save_from(
        &self,
        id_hash: &str,
        user_hash: Option<&str>,
        diff: &Diff,
        base: Record,
    ) -> impl Future<Output = Result<SaveOutcome, Error>> + Send {
        self.save(id_hash, user_hash, diff, base.generation)
    }

    /// Atomically removes a live record and returns it (id rotation: the
    /// entries move to the new id, the old id is dead, and a record that
    /// was destroyed meanwhile is not brought back).
    fn take(&self, id_hash: &str) -> impl Future<Output = Result<Option<Record>, Error>> + Send;

    /// Deletes a record; `Ok(true)` if it existed.
    fn delete(&self, id_hash: &str) -> impl Future<Output = Result<bool, Error>> + Send;

    /// The live sessions of the user `user_id` (hashed as `user_hash`).
    fn list_user(
        &self,
        user_hash: &str,
        user_id: &str,
    ) -> impl Future<Output = Result<Vec<SessionInfo>, Error>> + Send;

    /// Deletes every session of the user except `except` (an id hash);
    /// returns how many were deleted.
    fn revoke_user(
        &self,
        user_hash: &str,
        user_id: &str,
        except: Option<&str>,
    ) -> impl Future<Output = Result<usize, Error>> + Send;
}

pub(crate) fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

pub(crate) fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(millis)
        .unwrap_or_default()
}
