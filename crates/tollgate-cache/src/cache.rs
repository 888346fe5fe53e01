//! [`Cache`]: a store, request coalescing, an optional in-process L1 kept
//! coherent across instances by Redis pub/sub, and `get_or_compute`.

use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use bytes::Bytes;
use serde::Serialize;
use serde::de::DeserializeOwned;
use tollgate_redis::{Notice, RedisHandle, Subscription};

use crate::entry::{Entry, Stored};
use crate::error::Error;
use crate::flight::{Flights, Role};
use crate::key::UrlKey;
use crate::l1::{L1, L1Value, LOCAL_MAX_BYTES};
use crate::pending::{Invalidation, Pending};
use crate::store::{MemoryStore, RedisStore, Store};

/// Keys invalidated per pub/sub message.
const KEYS_PER_MESSAGE: usize = 1000;

/// The pub/sub message that empties every instance's L1 (anything that is
/// not a JSON array of keys does).
const FORGET_ALL: &str = "*";

/// A cache of byte values with TTLs and tags, shared by every clone (and,
/// through Redis, by every instance): the store behind
/// [`ResponseCacheLayer`](crate::ResponseCacheLayer) and
/// [`get_or_compute`](Self::get_or_compute).
///
/// ```
/// use std::time::Duration;
/// use tollgate_cache::Cache;
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() {
/// let cache = Cache::memory();
/// let load = || async { Ok::<_, std::io::Error>(vec!["church-42".to_owned()]) };
/// let v: Vec<String> = cache
///     .get_or_compute("campaigns", Duration::from_secs(300), &["campaigns"], load)
///     .await
///     .unwrap();
/// assert_eq!(v, ["church-42"]);
/// // Cached: the closure is not called again.
/// let again: Vec<String> = cache
///     .get_or_compute("campaigns", Duration::from_secs(300), &[], || async {
///         Err::<Vec<String>, _>(std::io::Error::other("not called"))
///     })
///     .await
///     .unwrap();
/// assert_eq!(again, v);
/// assert_eq!(cache.invalidate_tag("campaigns").await.unwrap(), 1);
/// # }
/// ```
#[derive(Clone)]
pub struct Cache {
    pub(crate) inner: Arc<Inner>,
}

/// What an HTTP cache key holds, decoded.
pub(crate) enum Fetched {
    /// A response.
    Response(Arc<Entry>),
    /// The names of the request headers the response varies on.
    Vary(Vec<String>),
}

impl Fetched {
    fn decode(raw: &Bytes) -> Result<Self, Error> {
        Ok(match Stored::decode(raw)? {
            Stored::Response(e) => Fetched::Response(Arc::new(e)),
            Stored::Vary(names) => Fetched::Vary(names),
        })
    }
}

/// Entries decoded from recent store reads, each with the exact bytes it
/// was decoded from. A read that returns the same bytes again reuses the
/// decoded entry (header map included) instead of parsing it anew: the
/// store still answers every lookup, only the decoding is skipped, so
/// nothing here can be staler than the store. An entry is a function of
/// its bytes alone, so the key only picks the slot (and every cache in the
/// process can share the slots).
///
/// Each thread has its own slots: no lock, and the reference counts of an
/// entry, its body and its header values are touched by one thread only
/// (a hot entry shared by every worker made each hit bounce their cache
/// lines between cores). Bounded: 64 slots of at most 16 KiB per thread
/// (larger entries are not kept).
#[derive(Default)]
struct DecodeMemo;

/// The bytes last decoded in a slot, and what they decoded to.
type MemoSlot = Option<(Bytes, Arc<Entry>)>;

const MEMO_SLOTS: usize = 64;

thread_local! {
    static MEMO: std::cell::RefCell<(std::hash::RandomState, Vec<MemoSlot>)> =
        std::cell::RefCell::new((std::hash::RandomState::new(), vec![None; MEMO_SLOTS]));
}

impl DecodeMemo {
    fn with_slot<T>(key: &str, f: impl FnOnce(&mut MemoSlot) -> T) -> Option<T> {
        use std::hash::BuildHasher as _;
        MEMO.with(|m| {
            let mut m = m.try_borrow_mut().ok()?;
            let (hasher, slots) = &mut *m;
            let i = hasher.hash_one(key) as usize % MEMO_SLOTS;
            Some(f(&mut slots[i]))
        })
    }

    fn get(&self, key: &str, raw: &Bytes) -> Option<Arc<Entry>> {
        if raw.len() > LOCAL_MAX_BYTES {
            return None;
        }
        Self::with_slot(key, |slot| match slot {
            // The same bytes (callers of one coalesced read share them)
            // need no comparison.
            Some((bytes, entry))
                if (bytes.as_ptr() == raw.as_ptr() && bytes.len() == raw.len()) || bytes == raw =>
            {
                Some(entry.clone())
            }
            _ => None,
        })?
    }

    fn put(&self, key: &str, raw: Bytes, entry: &Arc<Entry>) {
        Self::with_slot(key, |slot| *slot = Some((raw, entry.clone())));
    }
}

pub(crate) struct Inner {
    store: Arc<dyn Store>,
    handle: Option<RedisHandle>,
    l1: Option<L1>,
    memo: DecodeMemo,
    flights: Flights<Bytes>,
    coalesce_timeout: Duration,
    /// Largest encoded value `get_or_compute` stores.
    max_value_bytes: usize,
    /// The L1 invalidation channel (with an L1 on Redis): stops listening
    /// when the cache is dropped.
    subscription: Option<Subscription>,
    /// Bumped by every invalidation seen by this instance (its own, and
    /// other instances' through pub/sub). A response fill that started
    /// before a bump is not stored, so a fill racing an invalidation can
    /// never put the old response back.
    epoch: Arc<AtomicU64>,
    /// Invalidations that failed on an outage, to run again: until they
    /// have, the store is not read.
    pending: Pending,
}

impl std::fmt::Debug for Cache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cache")
            .field("store", &self.inner.store)
            .field("l1", &self.inner.l1.is_some())
            .field("coalesce_timeout", &self.inner.coalesce_timeout)
            .finish()
    }
}

/// Builds a [`Cache`].
#[derive(Debug)]
#[must_use]
pub struct CacheBuilder {
    store: Option<Arc<dyn Store>>,
    handle: Option<RedisHandle>,
    l1: Option<(Duration, u64)>,
    coalesce_timeout: Duration,
    memory_bytes: u64,
    max_value_bytes: usize,
}

/// How long a write or an invalidation of a store that does not bound its
/// own operations may take before it is given up (see
/// [`Cache::bounded_write`]).
const WRITE_BOUND: Duration = Duration::from_secs(2);

impl Cache {
    /// A builder (in memory unless given a Redis handle or a store).
    pub fn builder() -> CacheBuilder {
        CacheBuilder {
            store: None,
            handle: None,
            l1: None,
            coalesce_timeout: Duration::from_secs(5),
            memory_bytes: 64 << 20,
            max_value_bytes: 1 << 20,
        }
    }

    /// An in-process cache (moka, 64 MiB).
    pub fn memory() -> Self {
        Self::builder().build()
    }

    /// A cache in Redis through the shared handle. While Redis is
    /// unavailable, reads miss and writes are skipped (callers go to the
    /// origin); the handle recovers by itself.
    pub fn redis(handle: RedisHandle) -> Self {
        Self::builder().redis(handle).build()
    }

    /// The store.
    pub fn store(&self) -> &Arc<dyn Store> {
        &self.inner.store
    }

    /// The Redis handle, when the cache is in Redis.
    pub fn handle(&self) -> Option<&RedisHandle> {
        self.inner.handle.as_ref()
    }

    /// Whether the store can be asked now: false while the breaker is
    /// open, and after it closes until the invalidations that failed
    /// during the outage have run (the store may hold entries they
    /// remove).
    pub fn is_available(&self) -> bool {
        self.inner.store.is_available() && !self.inner.pending.waiting()
    }

    /// Whether the store's reads end by themselves within the lookup
    /// deadline ([`Store::bounds_reads`]).
    pub(crate) fn bounds_reads(&self) -> bool {
        self.inner.store.bounds_reads()
    }

    /// How long one store operation may take: the Redis handle's deadline,
    /// or 100 ms for other stores.
    pub(crate) fn lookup_timeout(&self) -> Duration {
        self.inner
            .handle
            .as_ref()
            .map_or(Duration::from_millis(100), RedisHandle::deadline)
    }

    /// `op` under the lookup timeout, unless the store bounds its own
    /// operations ([`Store::bounds_reads`]): a store that hangs cannot
    /// hang its callers.
    pub(crate) async fn bounded<T>(
        &self,
        op: impl Future<Output = Result<T, Error>>,
    ) -> Result<T, Error> {
        self.within(self.lookup_timeout(), op).await
    }

    /// `op`, a write or an invalidation, under a generous bound
    /// ([`WRITE_BOUND`]) unless the store bounds its own operations: not
    /// the read deadline, which would cut off the ordinary writes of a slow
    /// store half way, but an end to those of a store that hangs, so that
    /// they do not pile up.
    pub(crate) async fn bounded_write<T>(
        &self,
        op: impl Future<Output = Result<T, Error>>,
    ) -> Result<T, Error> {
        self.within(WRITE_BOUND, op).await
    }

    /// `op` cut off after `limit`, unless the store bounds its own
    /// operations.
    async fn within<T>(
        &self,
        limit: Duration,
        op: impl Future<Output = Result<T, Error>>,
    ) -> Result<T, Error> {
        if self.bounds_reads() {
            return op.await;
        }
        tokio::time::timeout(limit, op)
            .await
            .unwrap_or(Err(Error::Store(tollgate_redis::Error::Timeout(limit))))
    }

    /// How long a coalesced waiter waits for the leader's fill.
    pub fn coalesce_timeout(&self) -> Duration {
        self.inner.coalesce_timeout
    }

    /// Whether the L1 invalidation subscriber is subscribed (always true
    /// without an L1 or without Redis).
    pub fn is_listening(&self) -> bool {
        self.inner.l1.is_none()
            || self.inner.handle.is_none()
            || self
                .inner
                .subscription
                .as_ref()
                .is_some_and(Subscription::is_listening)
    }

    /// The raw value under a logical key: L1, then the store.
    pub(crate) async fn get_raw(&self, key: &str) -> Result<Option<Bytes>, Error> {
        if let Some(v) = self.inner.l1.as_ref().and_then(|l1| l1.get(key)) {
            return Ok(Some(v.raw));
        }
        let v = self.inner.store.get(key).await?;
        if let (Some(l1), Some(v)) = (&self.inner.l1, &v) {
            l1.insert(key.to_owned(), L1Value::new(v.clone(), None));
        }
        Ok(v)
    }

    /// The stored response under `url`'s key in this instance's L1, decoded
    /// once per L1 entry (not per hit); a hit in this thread's front never
    /// computes the key. Synchronous: an L1 hit needs no task.
    pub(crate) fn l1_entry(&self, url: &UrlKey) -> Option<Arc<Entry>> {
        self.inner.l1.as_ref()?.entry(url)
    }

    /// What an HTTP cache key holds: L1 (decoded once), then the store.
    pub(crate) async fn get_stored(&self, key: &str) -> Result<Option<Fetched>, Error> {
        if let Some(v) = self.inner.l1.as_ref().and_then(|l1| l1.get(key)) {
            if let Some(e) = v.entry() {
                return Ok(Some(Fetched::Response(e)));
            }
            return Fetched::decode(&v.raw).map(Some);
        }
        let Some(raw) = self.inner.store.get(key).await? else {
            return Ok(None);
        };
        let fetched = match self.inner.memo.get(key, &raw) {
            Some(e) => Fetched::Response(e),
            None if raw.len() <= LOCAL_MAX_BYTES => {
                // A copy of its own: a slice of the client's read buffer
                // would keep all of that buffer alive in the memo.
                let own = Bytes::copy_from_slice(&raw);
                let fetched = Fetched::decode(&own)?;
                if let Fetched::Response(e) = &fetched {
                    self.inner.memo.put(key, own, e);
                }
                fetched
            }
            None => Fetched::decode(&raw)?,
        };
        if let Some(l1) = &self.inner.l1 {
            let entry = match &fetched {
                Fetched::Response(e) => Some(e.clone()),
                Fetched::Vary(_) => None,
            };
            l1.insert(key.to_owned(), L1Value::new(raw, entry));
        }
        Ok(Some(fetched))
    }

    /// Stores a raw value under a logical key.
    pub(crate) async fn put_raw(
        &self,
        key: &str,
        value: Bytes,
        ttl: Duration,
        tags: &[String],
    ) -> Result<(), Error> {
        if let Some(l1) = &self.inner.l1 {
            l1.insert(key.to_owned(), L1Value::new(value.clone(), None));
        }
        let r = self.inner.store.put(key, value, ttl, tags).await;
        if r.is_err() {
            metrics::counter!("tollgate_cache_store_errors_total", "op" => "put").increment(1);
        }
        r
    }

    /// The invalidation epoch (see [`Inner::epoch`]).
    pub(crate) fn epoch(&self) -> u64 {
        self.inner.epoch.load(Ordering::Acquire)
    }

    fn bump(&self) {
        self.inner.epoch.fetch_add(1, Ordering::AcqRel);
    }

    /// Removes one stored key without bumping the epoch (used to undo a
    /// write that raced an invalidation).
    pub(crate) async fn invalidate_quietly(&self, key: &str) -> Result<bool, Error> {
        let found = self.delete(key).await?;
        self.forget(std::slice::from_ref(&key.to_owned())).await;
        Ok(found)
    }

    pub(crate) async fn invalidate_raw(&self, key: &str) -> Result<bool, Error> {
        self.bump();
        let found = self.delete(key).await;
        // Told even when the store failed: the delete may have landed.
        self.forget(std::slice::from_ref(&key.to_owned())).await;
        found
    }

    /// Removes `key` from the store, kept to run again if that fails on an
    /// outage.
    async fn delete(&self, key: &str) -> Result<bool, Error> {
        let found = self.inner.store.invalidate_key(key).await;
        if let Err(e) = &found {
            self.failed(Invalidation::Key(key.to_owned()), e);
        }
        found
    }

    /// An invalidation failed with `e`: on an outage, it is kept and runs
    /// again once the store answers (see [`crate::pending`]).
    fn failed(&self, item: Invalidation, e: &Error) {
        let Error::Store(e) = e else { return };
        if !e.is_outage() {
            return;
        }
        // Kept only where a task can run it again: a kept invalidation
        // turns the cache off until it has run.
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            return;
        };
        if self.inner.pending.keep(item) {
            rt.spawn(replay(Arc::downgrade(&self.inner)));
        }
    }

    /// Removes every entry (data values and responses) tagged `tag`, on
    /// every instance; returns how many entries were listed under it.
    ///
    /// The work runs in a task of its own: a caller that stops waiting (a
    /// timeout) does not cut it off half way, and the other instances are
    /// told even when a step fails (when the store cannot say what it
    /// removed, they drop their whole L1). A failed invalidation leaves the
    /// tag in place: running it again finishes the job. When it failed on
    /// an outage (Redis down or too slow) the cache runs it again itself
    /// once the store answers, and does not read the store until then (see
    /// [`is_available`](Self::is_available)). On Redis a large
    /// tag is removed a thousand entries per round, each round within the
    /// command deadline.
    pub async fn invalidate_tag(&self, tag: &str) -> Result<usize, Error> {
        // Fills under way from now on are not stored.
        self.bump();
        let cache = self.clone();
        let tag = tag.to_owned();
        let run = async move { cache.invalidate_tag_now(&tag).await };
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            return run.await;
        };
        match rt.spawn(run).await {
            Ok(r) => r,
            Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
            Err(_) => Err(Error::Interrupted),
        }
    }

    async fn invalidate_tag_now(&self, tag: &str) -> Result<usize, Error> {
        match self
            .bounded_write(self.inner.store.invalidate_tag(tag))
            .await
        {
            Ok(keys) => {
                self.forget(&keys).await;
                Ok(keys.len())
            }
            Err(e) => {
                self.failed(Invalidation::Tag(tag.to_owned()), &e);
                // Some entries may be gone without their keys known here.
                self.forget_all().await;
                Err(e)
            }
        }
    }

    /// Removes the value `get_or_compute` stored under `key`.
    pub async fn invalidate_key(&self, key: &str) -> Result<bool, Error> {
        self.invalidate_raw(&data_key(key)).await
    }

    /// Drops keys from this instance's L1 and tells the other instances.
    async fn forget(&self, keys: &[String]) {
        let Some(l1) = &self.inner.l1 else { return };
        for k in keys {
            l1.invalidate(k);
        }
        let Some(sub) = &self.inner.subscription else {
            return;
        };
        for chunk in keys.chunks(KEYS_PER_MESSAGE) {
            let Ok(msg) = serde_json::to_string(chunk) else {
                continue;
            };
            broadcast(sub, msg).await;
        }
    }

    /// Empties this instance's L1 and tells the other instances to empty
    /// theirs (an invalidation whose keys are not known).
    async fn forget_all(&self) {
        let Some(l1) = &self.inner.l1 else { return };
        l1.invalidate_all();
        if let Some(sub) = &self.inner.subscription {
            broadcast(sub, FORGET_ALL).await;
        }
    }

    /// The value cached under `key`, or the result of `compute`, which is
    /// then cached for `ttl` under `tags`.
    ///
    /// Concurrent misses on one key run `compute` once per instance; the
    /// other callers wait for its value, at most the
    /// [coalesce timeout](CacheBuilder::coalesce_timeout), and then run
    /// their own `compute`. Errors are returned, never cached (waiters of a
    /// failed leader run their own `compute`). Store failures are logged and
    /// counted, never returned: the value is computed instead.
    pub async fn get_or_compute<T, E, F, Fut>(
        &self,
        key: &str,
        ttl: Duration,
        tags: &[&str],
        compute: F,
    ) -> Result<T, E>
    where
        T: Serialize + DeserializeOwned,
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<T, E>>,
    {
        let key = data_key(key);
        let available = self.is_available();
        if available && !self.inner.flights.contains(&key, self.epoch()) {
            match self.bounded(self.get_raw(&key)).await {
                Ok(Some(bytes)) => {
                    if let Ok(v) = serde_json::from_slice(&bytes) {
                        metrics::counter!("tollgate_cache_data_total", "outcome" => "hit")
                            .increment(1);
                        return Ok(v);
                    }
                }
                Ok(None) => {}
                Err(e) => {
                    metrics::counter!("tollgate_cache_store_errors_total", "op" => "get")
                        .increment(1);
                    tracing::debug!(error = %e, "cache read failed; computing");
                }
            }
        }
        match self.inner.flights.join(&key, self.epoch()) {
            Role::Follower(w) => {
                if let Some(bytes) = w.wait(self.inner.coalesce_timeout).await
                    && let Ok(v) = serde_json::from_slice(&bytes)
                {
                    metrics::counter!("tollgate_cache_data_total", "outcome" => "coalesced")
                        .increment(1);
                    return Ok(v);
                }
                metrics::counter!("tollgate_cache_data_total", "outcome" => "miss").increment(1);
                compute().await
            }
            Role::Leader(guard) => {
                metrics::counter!("tollgate_cache_data_total", "outcome" => "miss").increment(1);
                let epoch = self.epoch();
                let v = compute().await?;
                if let Ok(bytes) = serde_json::to_vec(&v) {
                    let bytes = Bytes::from(bytes);
                    guard.complete(Some(bytes.clone()));
                    let fits = bytes.len() <= self.inner.max_value_bytes;
                    if !fits {
                        metrics::counter!("tollgate_cache_data_total", "outcome" => "too_large")
                            .increment(1);
                        tracing::debug!(bytes = bytes.len(), limit = self.inner.max_value_bytes, key = %key, "value over max_value_bytes: not cached");
                    }
                    // Not stored when an invalidation ran during the compute
                    // (the value may predate it), and taken back out when
                    // one ran during the write.
                    if fits && available && self.epoch() == epoch {
                        let tags: Vec<String> = tags.iter().map(|t| (*t).to_owned()).collect();
                        let put = self.bounded_write(self.put_raw(&key, bytes, ttl, &tags));
                        if let Err(e) = put.await {
                            tracing::debug!(error = %e, "cache write failed");
                        } else if self.epoch() != epoch {
                            let _ = self.invalidate_quietly(&key).await;
                        }
                    }
                }
                drop(guard);
                Ok(v)
            }
        }
    }
}

/// How often kept invalidations check whether the store is back.
const REPLAY_EVERY: Duration = Duration::from_millis(100);

/// Runs the invalidations kept by [`Pending`] once the store answers
/// again, round after round until none is left; ends early if the cache is
/// dropped.
async fn replay(cache: Weak<Inner>) {
    loop {
        tokio::time::sleep(REPLAY_EVERY).await;
        let Some(inner) = cache.upgrade() else { return };
        let cache = Cache { inner };
        if !cache.inner.store.is_available() {
            continue;
        }
        for item in cache.inner.pending.take() {
            // A failure on an outage keeps the item for the next round.
            let _ = match item {
                Invalidation::Tag(t) => cache.invalidate_tag_now(&t).await.map(drop),
                Invalidation::Key(k) => cache.invalidate_raw(&k).await.map(drop),
            };
        }
        if cache.inner.pending.settle() {
            tracing::info!(
                "the cache invalidations that failed during the outage have run: serving from the store again"
            );
            return;
        }
    }
}

/// Tells the other instances to drop L1 copies.
async fn broadcast(sub: &Subscription, msg: impl Into<Bytes>) {
    if let Err(e) = sub.publish(msg).await {
        tracing::warn!(error = %e, "could not broadcast a cache invalidation: other instances' L1 copies expire by their TTL");
    }
}

/// What the L1 invalidation subscription hears: keys to drop (a JSON
/// array), or anything else (`FORGET_ALL`, a message from a newer
/// version, messages possibly missed while disconnected or behind) drops
/// the whole L1.
fn on_notice(l1: &L1, epoch: &AtomicU64, notice: Notice<'_>) {
    match notice {
        Notice::Message(payload) => {
            epoch.fetch_add(1, Ordering::AcqRel);
            match serde_json::from_slice::<Vec<String>>(payload) {
                Ok(keys) => keys.iter().for_each(|k| l1.invalidate(k)),
                Err(_) => l1.invalidate_all(),
            }
        }
        Notice::Missed => l1.invalidate_all(),
    }
}

pub(crate) fn data_key(key: &str) -> String {
    format!("d:{key}")
}

impl CacheBuilder {
    /// Keeps the cache in Redis through `handle`.
    pub fn redis(mut self, handle: RedisHandle) -> Self {
        self.store = Some(Arc::new(RedisStore::new(handle.clone())));
        self.handle = Some(handle);
        self
    }

    /// Uses this store (a custom backend).
    pub fn store(mut self, store: impl Store) -> Self {
        self.store = Some(Arc::new(store));
        self
    }

    /// Size bound of the in-memory store used without Redis (default 64 MiB).
    pub fn memory_bytes(mut self, bytes: u64) -> Self {
        self.memory_bytes = bytes;
        self
    }

    /// An in-process L1 in front of Redis: values are kept here for at most
    /// `ttl` (keep it short: another instance's overwrite is seen within
    /// it) and at most `max_bytes`. Invalidations ([`Cache::invalidate_tag`],
    /// [`Cache::invalidate_key`], invalidating requests) are broadcast over
    /// Redis pub/sub and drop the L1 copies on every instance. Ignored
    /// without Redis.
    pub fn l1(mut self, ttl: Duration, max_bytes: u64) -> Self {
        self.l1 = Some((ttl, max_bytes));
        self
    }

    /// How long a coalesced waiter waits for the leader's fill before it
    /// goes to the origin itself (default 5 s).
    pub fn coalesce_timeout(mut self, d: Duration) -> Self {
        self.coalesce_timeout = d;
        self
    }

    /// Largest value (encoded as JSON) that
    /// [`get_or_compute`](Cache::get_or_compute) stores (default 1 MiB, as
    /// the response cache's body cap). A larger one is computed and
    /// returned but not stored: writing and reading it would take longer
    /// than a command's deadline, and the timeouts would open the breaker
    /// that every layer shares.
    pub fn max_value_bytes(mut self, bytes: usize) -> Self {
        self.max_value_bytes = bytes;
        self
    }

    /// Builds the cache. With an L1 on Redis, starts the invalidation
    /// subscriber (needs a Tokio runtime).
    pub fn build(self) -> Cache {
        let store = self
            .store
            .unwrap_or_else(|| Arc::new(MemoryStore::new(self.memory_bytes)));
        let mut l1 = match (&self.handle, self.l1) {
            (Some(_), Some((ttl, bytes))) => Some(L1::new(ttl, bytes)),
            _ => None,
        };
        let epoch = Arc::new(AtomicU64::new(0));
        // Other instances' invalidations, on a connection of its own
        // (subscribing puts a connection in pub/sub mode). The handler
        // holds the L1 and the epoch, not the cache: dropping the cache
        // stops it.
        let subscription = match (&self.handle, &l1) {
            (Some(h), Some(local)) => {
                let (local, epoch) = (local.clone(), epoch.clone());
                let channel = h.keys("cache").key(&["invalidate"]);
                match Subscription::start(h, channel, move |n| on_notice(&local, &epoch, n)) {
                    Ok(s) => Some(s),
                    Err(e) => {
                        // An L1 that hears no invalidation would serve
                        // what other instances removed.
                        tracing::warn!(error = %e, "could not start the L1 invalidation subscriber: running without the L1");
                        l1 = None;
                        None
                    }
                }
            }
            _ => None,
        };
        Cache {
            inner: Arc::new(Inner {
                store,
                handle: self.handle,
                l1,
                memo: DecodeMemo,
                flights: Flights::default(),
                coalesce_timeout: self.coalesce_timeout,
                max_value_bytes: self.max_value_bytes,
                subscription,
                epoch,
                pending: Pending::default(),
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn encoded(body: &'static [u8], etag: &str) -> Bytes {
        Stored::Response(crate::entry::test_entry(etag, body))
            .encode()
            .expect("encode")
    }

    fn response(f: Option<Fetched>) -> Arc<Entry> {
        match f {
            Some(Fetched::Response(e)) => e,
            _ => panic!("no response entry"),
        }
    }

    /// The same stored bytes are decoded once; new bytes under the same
    /// key are decoded anew, never answered from the old entry.
    #[tokio::test]
    async fn decoded_entries_are_reused_only_for_identical_bytes() {
        let cache = Cache::memory();
        let ttl = Duration::from_secs(60);
        cache
            .put_raw("k", encoded(b"one", "\"1\""), ttl, &[])
            .await
            .expect("put");
        let a = response(cache.get_stored("k").await.expect("get"));
        let b = response(cache.get_stored("k").await.expect("get"));
        assert!(Arc::ptr_eq(&a, &b), "identical bytes: one decoding");
        cache
            .put_raw("k", encoded(b"two", "\"2\""), ttl, &[])
            .await
            .expect("put");
        let c = response(cache.get_stored("k").await.expect("get"));
        assert_eq!(c.body, Bytes::from_static(b"two"));
        assert_eq!(c.header("etag"), Some("\"2\""));
        // Another key whose slot may be the same one.
        cache
            .put_raw("other", encoded(b"three", "\"3\""), ttl, &[])
            .await
            .expect("put");
        let d = response(cache.get_stored("other").await.expect("get"));
        assert_eq!(d.body, Bytes::from_static(b"three"));
        let e = response(cache.get_stored("k").await.expect("get"));
        assert_eq!(e.body, Bytes::from_static(b"two"));
    }
}
