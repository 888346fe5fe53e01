//! Where cached values live: one [`Store`] trait, a Redis implementation
//! and an in-memory one, tested by one conformance suite.

mod memory;
mod redis;

use std::time::Duration;

use bytes::Bytes;
use futures::future::BoxFuture;

pub use memory::MemoryStore;
pub use redis::RedisStore;

use crate::error::Error;

/// A key-value store with TTLs and tags.
///
/// Keys are *logical* keys (the store adds its namespace); tags group
/// entries for invalidation. Members of a tag expire with their entries, and
/// invalidating a tag costs in proportion to the tag's live entries.
pub trait Store: Send + Sync + std::fmt::Debug + 'static {
    /// The value under `key`, if present and not expired.
    fn get<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<Option<Bytes>, Error>>;

    /// Stores `value` under `key` for `ttl`, listed under each of `tags`.
    fn put<'a>(
        &'a self,
        key: &'a str,
        value: Bytes,
        ttl: Duration,
        tags: &'a [String],
    ) -> BoxFuture<'a, Result<(), Error>>;

    /// Removes `key`; returns whether it was present.
    fn invalidate_key<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<bool, Error>>;

    /// Removes every entry listed under `tag` and the tag itself; returns
    /// the keys that were listed (some may have expired already).
    ///
    /// An attempt that fails part way must leave the tag retryable: a
    /// member leaves the index only once its entry is gone, so running the
    /// invalidation again finishes the job.
    fn invalidate_tag<'a>(&'a self, tag: &'a str) -> BoxFuture<'a, Result<Vec<String>, Error>>;

    /// Whether the store can currently be asked (false while the Redis
    /// breaker is open).
    fn is_available(&self) -> bool {
        true
    }

    /// Whether every [`get`](Self::get) ends by itself within the cache's
    /// lookup deadline (the Redis store: the shared handle cuts each
    /// command off at that deadline; the memory store never waits). When
    /// false (the default, for stores written elsewhere), the layer runs
    /// each lookup under a timer of its own, so a store that hangs cannot
    /// hang requests.
    fn bounds_reads(&self) -> bool {
        false
    }
}

/// Milliseconds since the Unix epoch.
pub(crate) fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}
