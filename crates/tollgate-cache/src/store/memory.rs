use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::future::BoxFuture;
use moka::Expiry;

use super::Store;
use crate::error::Error;

#[derive(Clone)]
struct MemEntry {
    value: Bytes,
    expires: Instant,
}

struct PerEntry;

impl Expiry<String, MemEntry> for PerEntry {
    fn expire_after_create(&self, _k: &String, v: &MemEntry, now: Instant) -> Option<Duration> {
        Some(v.expires.saturating_duration_since(now))
    }

    fn expire_after_update(
        &self,
        _k: &String,
        v: &MemEntry,
        now: Instant,
        _left: Option<Duration>,
    ) -> Option<Duration> {
        Some(v.expires.saturating_duration_since(now))
    }
}

/// An in-process store (moka), bounded by total bytes, with per-entry TTLs
/// and a tag index whose members expire with their entries. Cheap to clone:
/// clones share the entries.
///
/// ```
/// use std::time::Duration;
/// use tollgate_cache::{MemoryStore, Store};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() {
/// let store = MemoryStore::new(1 << 20);
/// store.put("k", "v".into(), Duration::from_secs(60), &["t".to_owned()]).await.unwrap();
/// assert_eq!(store.get("k").await.unwrap().as_deref(), Some(&b"v"[..]));
/// assert_eq!(store.invalidate_tag("t").await.unwrap(), vec!["k".to_owned()]);
/// assert_eq!(store.get("k").await.unwrap(), None);
/// # }
/// ```
#[derive(Clone)]
pub struct MemoryStore {
    inner: Arc<Inner>,
}

struct Inner {
    entries: moka::sync::Cache<String, MemEntry>,
    /// tag -> key -> expiry of that key's entry.
    tags: Mutex<HashMap<String, HashMap<String, Instant>>>,
    puts: AtomicU64,
}

impl std::fmt::Debug for MemoryStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemoryStore")
            .field("entries", &self.inner.entries.entry_count())
            .field("bytes", &self.inner.entries.weighted_size())
            .finish()
    }
}

impl Default for MemoryStore {
    fn default() -> Self {
        Self::new(64 << 20)
    }
}

impl MemoryStore {
    /// A store holding at most about `max_bytes` of keys and values.
    pub fn new(max_bytes: u64) -> Self {
        let entries = moka::sync::Cache::builder()
            .max_capacity(max_bytes)
            .weigher(|k: &String, v: &MemEntry| {
                u32::try_from(k.len() + v.value.len() + 64).unwrap_or(u32::MAX)
            })
            .expire_after(PerEntry)
            .build();
        MemoryStore {
            inner: Arc::new(Inner {
                entries,
                tags: Mutex::new(HashMap::new()),
                puts: AtomicU64::new(0),
            }),
        }
    }

    /// Entries currently held (approximate: moka applies evictions lazily).
    pub fn entry_count(&self) -> u64 {
        self.inner.entries.run_pending_tasks();
        self.inner.entries.entry_count()
    }

    /// Removes every entry.
    pub fn clear(&self) {
        self.inner.entries.invalidate_all();
        if let Ok(mut t) = self.inner.tags.lock() {
            t.clear();
        }
    }

    pub(crate) fn get_now(&self, key: &str) -> Option<Bytes> {
        self.inner
            .entries
            .get(key)
            .filter(|e| e.expires > Instant::now())
            .map(|e| e.value)
    }

    pub(crate) fn put_now(&self, key: &str, value: Bytes, ttl: Duration, tags: &[String]) {
        let now = Instant::now();
        let expires = now + ttl;
        self.inner
            .entries
            .insert(key.to_owned(), MemEntry { value, expires });
        if tags.is_empty() {
            return;
        }
        let sweep = self.inner.puts.fetch_add(1, Ordering::Relaxed) % 1024 == 1023;
        if let Ok(mut index) = self.inner.tags.lock() {
            for tag in tags {
                let members = index.entry(tag.clone()).or_default();
                members.retain(|_, exp| *exp > now);
                members.insert(key.to_owned(), expires);
            }
            if sweep {
                // Tags nobody writes to any more would otherwise keep their
                // expired members forever.
                index.retain(|_, members| {
                    members.retain(|_, exp| *exp > now);
                    !members.is_empty()
                });
            }
        }
    }

    pub(crate) fn remove_now(&self, key: &str) -> bool {
        self.inner.entries.remove(key).is_some()
    }

    fn take_tag(&self, tag: &str) -> Vec<String> {
        let members = self
            .inner
            .tags
            .lock()
            .ok()
            .and_then(|mut t| t.remove(tag))
            .unwrap_or_default();
        let keys: Vec<String> = members.into_keys().collect();
        for k in &keys {
            self.inner.entries.invalidate(k);
        }
        keys
    }
}

impl Store for MemoryStore {
    fn bounds_reads(&self) -> bool {
        true
    }

    fn get<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<Option<Bytes>, Error>> {
        Box::pin(async move { Ok(self.get_now(key)) })
    }

    fn put<'a>(
        &'a self,
        key: &'a str,
        value: Bytes,
        ttl: Duration,
        tags: &'a [String],
    ) -> BoxFuture<'a, Result<(), Error>> {
        Box::pin(async move {
            self.put_now(key, value, ttl, tags);
            Ok(())
        })
    }

    fn invalidate_key<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<bool, Error>> {
        Box::pin(async move { Ok(self.remove_now(key)) })
    }

    fn invalidate_tag<'a>(&'a self, tag: &'a str) -> BoxFuture<'a, Result<Vec<String>, Error>> {
        Box::pin(async move { Ok(self.take_tag(tag)) })
    }
}
