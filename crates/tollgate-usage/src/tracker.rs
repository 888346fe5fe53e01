//! The tracker: in-process aggregation, the background flusher, hard
//! quotas and reporting.

use std::collections::{BTreeMap, VecDeque};
use std::fmt::Write as _;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock, Weak};
use std::time::Duration;

use serde::Serialize;
use tokio::sync::Notify;

use crate::error::UsageError;
use crate::period::{Period, PeriodKind, now_ms};
use crate::store::{
    Batch, MARKER_TTL_SECS, MemoryStore, QuotaAnswer, QuotaOp, RedisStore, Settle, Store,
    TenantIncrements, Totals,
};

/// The longest a write whose outcome is unknown is retried: the lifetime
/// of the markers that make a retry harmless, minus an hour for the retry
/// itself. Past it, a retry could count the units a second time.
const MAX_RETRY_AGE: Duration = Duration::from_secs(MARKER_TTL_SECS.unsigned_abs() - 3600);

/// Default of [`UsageConfig::max_unsettled`].
const DEFAULT_MAX_UNSETTLED: usize = 10_000;

/// Most quota operations settled in one round trip: a flush settles a
/// longer queue in several, each well within a command deadline.
const SETTLE_CHUNK: usize = 1_000;

/// Most counters a flush writes in one round trip: a buffer of more is
/// written as several batches, each well within a command deadline. In
/// one pipeline, a flush of 3,000 tenants outlasted the default 50 ms
/// deadline: it timed out on every retry (so was never confirmed), and
/// every timeout counted against the breaker the other layers share.
const FLUSH_CHUNK: usize = 500;

/// When increments reach Redis.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WriteMode {
    /// Aggregated in process and flushed in one pipelined round trip per
    /// interval (default). Requests never wait for Redis.
    #[default]
    Batched,
    /// Each request's increment is written before the response; on failure
    /// it is buffered (never lost) and flushed later.
    Sync,
}

/// Tracker settings.
#[derive(Clone, Debug)]
#[must_use]
pub struct UsageConfig {
    pub(crate) period: PeriodKind,
    pub(crate) retention: Duration,
    pub(crate) flush_interval: Duration,
    pub(crate) flush_threshold: usize,
    pub(crate) max_buffered: usize,
    pub(crate) top: bool,
    pub(crate) mode: WriteMode,
    pub(crate) shutdown_timeout: Duration,
    pub(crate) max_retry_age: Duration,
    pub(crate) max_unsettled: usize,
    pub(crate) replicas: u32,
}

impl Default for UsageConfig {
    fn default() -> Self {
        UsageConfig {
            period: PeriodKind::monthly(),
            retention: Duration::from_secs(90 * 24 * 3600),
            flush_interval: Duration::from_secs(1),
            flush_threshold: 10_000,
            max_buffered: 100_000,
            top: true,
            mode: WriteMode::Batched,
            shutdown_timeout: Duration::from_secs(10),
            max_retry_age: MAX_RETRY_AGE,
            max_unsettled: DEFAULT_MAX_UNSETTLED,
            replicas: 0,
        }
    }
}

impl UsageConfig {
    /// Defaults: calendar months in UTC, 90 days retention, flush every
    /// second or at 10,000 pending counters, at most 100,000 counters
    /// buffered during an outage.
    pub fn new() -> Self {
        Self::default()
    }
    /// The period kind.
    pub fn period(mut self, p: PeriodKind) -> Self {
        self.period = p;
        self
    }
    /// How long a period's data is kept after it ends (default 90 days).
    pub fn retention(mut self, d: Duration) -> Self {
        self.retention = d;
        self
    }
    /// Flush at least this often (default 1 s).
    pub fn flush_interval(mut self, d: Duration) -> Self {
        self.flush_interval = d;
        self
    }
    /// Flush early when this many counters are pending (default 10,000).
    pub fn flush_threshold(mut self, n: usize) -> Self {
        self.flush_threshold = n.max(1);
        self
    }
    /// Most distinct counters kept while Redis is unreachable; increments
    /// for new counters beyond it are dropped and counted (default 100,000).
    pub fn max_buffered(mut self, n: usize) -> Self {
        self.max_buffered = n.max(1);
        self
    }
    /// Maintain the top-consumers sets (default on).
    pub fn top_consumers(mut self, on: bool) -> Self {
        self.top = on;
        self
    }
    /// Batched (default) or synchronous writes.
    pub fn mode(mut self, m: WriteMode) -> Self {
        self.mode = m;
        self
    }
    /// How long [`UsageTracker::shutdown`] keeps retrying (default 10 s).
    pub fn shutdown_timeout(mut self, d: Duration) -> Self {
        self.shutdown_timeout = d;
        self
    }
    /// How long a write that was sent but not confirmed (its answer was
    /// lost) keeps being retried under its id. Default and maximum: 47
    /// hours, an hour less than the lifetime of the markers that make such
    /// a retry count once. Past it the units are counted as dropped, even
    /// though the first attempt may have been applied: retrying then could
    /// count them twice.
    pub fn max_retry_age(mut self, d: Duration) -> Self {
        self.max_retry_age = d.min(MAX_RETRY_AGE);
        self
    }
    /// Most hard-quota checks kept for settling after their answer was
    /// lost (default 10,000): a served request's check is applied again
    /// under its id, a refused request's is withdrawn. The same bound
    /// applies, separately, to synchronous writes
    /// ([`UsageTracker::record_now`]) whose answer was lost, which are
    /// retried under their id. During a long latency spike they would
    /// otherwise pile up without limit. Beyond it a check or write is not
    /// kept: its units are counted as dropped (a served request's may then
    /// be missing from its tenant's total, a refused request's may stay in
    /// it; a write may or may not have been applied).
    pub fn max_unsettled(mut self, n: usize) -> Self {
        self.max_unsettled = n.max(1);
        self
    }

    /// With Redis: a flush counts as written only once this many replicas
    /// have it (`WAIT`, for at most half the handle's deadline), so that a
    /// failover to a replica (Sentinel, or a cluster promoting a replica)
    /// loses no flushed count. On a cluster each primary a flush wrote to
    /// is asked, on the connection that wrote there, once the writes are
    /// answered (a second round trip); the flush is confirmed when every
    /// one of them reached that many replicas. A flush the replicas have
    /// not confirmed is retried under its batch id, which Redis applies at
    /// most once; a batch still unconfirmed after the retry window is
    /// counted as dropped, although the primary may hold it. Flushes then
    /// go over a connection of their own. `0` (the default) does not wait.
    ///
    /// Hard-quota checks are not waited for: a failover may lose the last
    /// few of them, and let that many more requests through.
    pub fn wait_for_replicas(mut self, replicas: u32) -> Self {
        self.replicas = replicas;
        self
    }
}

/// Counters of the tracker itself (also exported through `metrics`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct UsageStats {
    /// Units recorded into the buffer. Units are counted without their
    /// sign here, in `flushed` and in `dropped` (a refund of 5 is 5
    /// units); increments to one counter within a flush interval net out
    /// before they are written, so with mixed signs `flushed` can be less
    /// than `buffered`.
    pub buffered: u64,
    /// Units written to the store.
    pub flushed: u64,
    /// Flushes that failed (and will be retried).
    pub flush_errors: u64,
    /// Units that could not be kept: buffer full, recorded for a time
    /// outside the supported calendar, for a period whose retention ran
    /// out before they could be written, still unwritten at the end of
    /// shutdown or recorded after it, or unconfirmed for longer than
    /// [`UsageConfig::max_retry_age`]. Hard-quota checks and synchronous
    /// writes whose answer was lost and that could not be settled (beyond
    /// [`UsageConfig::max_unsettled`], too old, or at shutdown) count
    /// here too, a refused request's included: its units may stay in the
    /// tenant's total.
    pub dropped: u64,
    /// Units waiting to be written (their net total).
    pub pending: u64,
}

/// The outcome of a hard-quota check.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum QuotaOutcome {
    /// Consumed; the metric's total after it.
    Allowed {
        /// Total after the increment.
        total: i64,
    },
    /// Refused: the increment would pass the limit.
    Exceeded {
        /// Current total.
        total: i64,
    },
    /// The store could not decide (Redis unavailable). After
    /// [`UsageTracker::try_consume`] the increment is counted anyway (it is
    /// written later, once); after
    /// [`UsageTracker::try_consume_or_refuse`] it is not counted.
    Unavailable,
}

/// A write that was sent, or may have been, and awaits confirmation.
#[derive(Clone, Debug)]
struct Unconfirmed<T> {
    write: T,
    /// When it was queued: when it was first sent, or at most a store
    /// deadline after (covered by the margin in [`MAX_RETRY_AGE`]). Its
    /// markers live [`MARKER_TTL_SECS`] from when it was applied, if it was.
    since: tokio::time::Instant,
}

impl<T> Unconfirmed<T> {
    fn new(write: T) -> Self {
        Unconfirmed {
            write,
            since: tokio::time::Instant::now(),
        }
    }
}

/// A write on its way to the store; shutdown waits until none is left.
struct InFlight<'a>(&'a Inner);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        if self.0.in_flight.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.0.settled.notify_waiters();
        }
    }
}

/// A write waiting for the store's answer. If its caller drops the future
/// before the answer comes (a client gone, a timeout around the call), the
/// write may have been sent and applied: it is queued like one whose
/// answer was lost. A synchronous write is retried under its id, so it
/// counts once; a quota check is withdrawn, as its request was not served.
struct Unanswered<'a, W: Unsettle> {
    tracker: &'a UsageTracker,
    write: Option<W>,
}

/// What becomes of a write whose caller stopped waiting for its answer.
trait Unsettle {
    fn unsettle(self, tracker: &UsageTracker);
}

impl Unsettle for Arc<Batch> {
    fn unsettle(self, tracker: &UsageTracker) {
        tracker.push_pending(self);
    }
}

impl Unsettle for QuotaOp {
    fn unsettle(self, tracker: &UsageTracker) {
        tracker.push_replay(Settle::Withdraw(self));
    }
}

impl<'a, W: Unsettle> Unanswered<'a, W> {
    fn new(tracker: &'a UsageTracker, write: W) -> Self {
        Unanswered {
            tracker,
            write: Some(write),
        }
    }

    /// The answer came: the write goes back to the caller.
    fn answered(mut self) -> Option<W> {
        self.write.take()
    }
}

impl<W: Unsettle> Drop for Unanswered<'_, W> {
    fn drop(&mut self) {
        if let Some(w) = self.write.take() {
            w.unsettle(self.tracker);
        }
    }
}

/// What [`UsageTracker::keep_unsettled`] counts and logs of a write.
struct Unsettled<'a> {
    /// "usage write", "quota operation".
    what: &'static str,
    id: &'a str,
    /// Its units while queued (net).
    pending: i64,
    /// Its units if not kept (without sign).
    dropped: u64,
}

/// A retry queue's lock, also after a panic elsewhere poisoned it (the
/// queue itself is always consistent: every change is one call).
fn locked<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// A copy of the oldest write of a retry queue (a batch's is shared, not
/// copied), taken without holding the lock across the retry.
fn front<T: Clone>(queue: &Mutex<VecDeque<Unconfirmed<T>>>) -> Option<Unconfirmed<T>> {
    queue.lock().ok().and_then(|q| q.front().cloned())
}

#[derive(Debug)]
struct Counter {
    metric: Arc<str>,
    /// Units for the hash and the top set, not yet written.
    pending: i64,
    /// Units for the top set only (the hash was written by a quota check).
    top_only: i64,
    /// The store's total at the last write we saw.
    known: i64,
}

#[derive(Debug)]
struct PeriodBuf {
    label: Arc<str>,
    expire_at: i64,
    counters: Vec<Counter>,
}

#[derive(Debug)]
struct TenantBuf {
    periods: Vec<PeriodBuf>,
    idle_flushes: u8,
}

/// One share of the in-process buffer. Each thread records into its own
/// share, so worker threads do not take one lock (and move its cache line
/// between cores) on every request; the flusher takes every share.
#[derive(Debug, Default)]
struct Buffer {
    tenants: tollgate_redis::local::RequestMap<Arc<str>, TenantBuf>,
    /// Counters of this share with something pending (the sum over the
    /// shares is `Inner::dirty`).
    dirty: usize,
    /// The period of the last increment made by time: the next one for a
    /// time inside it finds its label here, under the lock it takes anyway
    /// (no second lock, no reference count touched).
    recent: Option<RecentPeriod>,
    /// Units buffered by increments ([`UsageStats::buffered`]), counted
    /// here under the lock they take anyway: an atomic shared by every
    /// worker thread would bounce between cores on every request.
    added: u64,
    /// Their share of the pending units (the rest is counted in
    /// `Inner::pending_units`, by the paths that are not per request).
    added_pending: i64,
}

#[derive(Debug)]
struct RecentPeriod {
    start_ms: i64,
    end_ms: i64,
    label: Arc<str>,
    expire_at: i64,
}

/// A buffer share on cache lines of its own.
#[repr(align(128))]
#[derive(Debug, Default)]
struct Shard(Mutex<Buffer>);

/// The next share index handed to a thread.
static NEXT_SHARD: AtomicUsize = AtomicUsize::new(0);

thread_local! {
    /// This thread's share index (modulo the number of shares).
    static SHARD: usize = NEXT_SHARD.fetch_add(1, Ordering::Relaxed);
}

/// How many shares a tracker has: a few per core, so that worker threads
/// rarely share one.
fn shard_count() -> usize {
    std::thread::available_parallelism()
        .map_or(4, |n| n.get() * 2)
        .clamp(2, 64)
}

/// What an increment is.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Units {
    /// New units: counted as buffered.
    Fresh,
    /// Units of a batch that never reached the store: already counted.
    Restored,
    /// Units for the top set only (the hash was written by a quota check).
    TopOnly,
}

/// The period an increment is for.
#[derive(Clone, Copy)]
enum At<'a> {
    /// The period containing this time (Unix ms).
    Time(i64),
    /// This period (label, key expiry).
    Period(&'a Arc<str>, i64),
}

struct CurrentPeriod {
    period: Period,
    label: Arc<str>,
    expire_at: i64,
}

/// Tracks usage per tenant, metric and period. Cheap to clone; every clone
/// shares one buffer and one flusher. Call [`shutdown`](Self::shutdown)
/// before the process exits so nothing buffered is lost.
#[derive(Clone)]
pub struct UsageTracker {
    inner: Arc<Inner>,
}

struct Inner {
    store: Store,
    config: UsageConfig,
    shards: Box<[Shard]>,
    /// Counters with something pending, over all shares: bounds the
    /// buffer and triggers a flush. Written only when a counter becomes
    /// pending or is flushed, not on every increment.
    dirty: AtomicUsize,
    /// Batches that were (or may have been) sent, oldest first: retried
    /// under their id until confirmed, never merged back into the buffer.
    /// Shared with the flush that sends it: queueing it costs no copy.
    pending: Mutex<VecDeque<Unconfirmed<Arc<Batch>>>>,
    /// Quota operations whose answer was lost, oldest first (at most
    /// [`UsageConfig::max_unsettled`]).
    replays: Mutex<VecDeque<Unconfirmed<Settle>>>,
    /// Whether the last lost quota operation found `replays` full (logged
    /// once per spell, not once per operation).
    replays_full: AtomicBool,
    /// The same for synchronous writes and `pending`.
    pending_full: AtomicBool,
    /// The period of now: replaced only by the period of a later now, never
    /// by the period of a time given to [`UsageTracker::record_at`].
    current: RwLock<CurrentPeriod>,
    instance: u64,
    seq: AtomicU64,
    flush_lock: tokio::sync::Mutex<()>,
    notify: Notify,
    closed: AtomicBool,
    /// Set once shutdown has flushed: increments made from then on are
    /// counted as dropped (nothing would write them), and writes begun
    /// from then on are not waited for.
    finished: AtomicBool,
    /// Set, under each retry queue's lock, when shutdown has emptied them
    /// for the last time: a write whose answer is lost from then on is
    /// counted as dropped at once instead of being queued (nothing would
    /// retry it).
    sealed: AtomicBool,
    /// Writes on their way to the store ([`UsageTracker::record_now`],
    /// quota checks) that began before `finished` was set: shutdown waits
    /// for them, so that a lost answer among them is queued and retried
    /// (or counted) before it returns.
    in_flight: AtomicUsize,
    /// Wakes shutdown when `in_flight` reaches zero.
    settled: Notify,
    flushed: AtomicU64,
    flush_errors: AtomicU64,
    dropped: AtomicU64,
    pending_units: AtomicI64,
    exported: Mutex<UsageStats>,
}

impl std::fmt::Debug for UsageTracker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UsageTracker")
            .field("store", &self.inner.store)
            .field("stats", &self.stats())
            .finish()
    }
}

impl UsageTracker {
    /// A tracker writing to Redis through `handle` (needs a Tokio runtime).
    pub fn redis(handle: tollgate_redis::RedisHandle, config: UsageConfig) -> Self {
        Self::new(Store::Redis(RedisStore::new(handle)), config)
    }

    /// A tracker keeping usage in this process only.
    pub fn in_memory(config: UsageConfig) -> Self {
        Self::new(Store::Memory(MemoryStore::new()), config)
    }

    /// A tracker on `store`; spawns the flusher (needs a Tokio runtime).
    pub fn new(store: Store, config: UsageConfig) -> Self {
        let store = match store {
            Store::Redis(s) if config.replicas > 0 => {
                Store::Redis(s.wait_for_replicas(config.replicas))
            }
            other => other,
        };
        let current = Self::make_current(&config, config.period.period_at(now_ms()));
        let inner = Arc::new(Inner {
            store,
            config,
            shards: (0..shard_count()).map(|_| Shard::default()).collect(),
            dirty: AtomicUsize::new(0),
            pending: Mutex::new(VecDeque::new()),
            replays: Mutex::new(VecDeque::new()),
            replays_full: AtomicBool::new(false),
            pending_full: AtomicBool::new(false),
            current: RwLock::new(current),
            instance: rand::random(),
            seq: AtomicU64::new(0),
            flush_lock: tokio::sync::Mutex::new(()),
            notify: Notify::new(),
            closed: AtomicBool::new(false),
            finished: AtomicBool::new(false),
            sealed: AtomicBool::new(false),
            in_flight: AtomicUsize::new(0),
            settled: Notify::new(),
            flushed: AtomicU64::new(0),
            flush_errors: AtomicU64::new(0),
            dropped: AtomicU64::new(0),
            pending_units: AtomicI64::new(0),
            exported: Mutex::new(UsageStats::default()),
        });
        // In every mode and with every store: even synchronous mode buffers
        // (per-route and status counters, custom metrics, failed writes).
        tokio::spawn(flusher(Arc::downgrade(&inner)));
        UsageTracker { inner }
    }

    fn make_current(config: &UsageConfig, period: Period) -> CurrentPeriod {
        let retention_ms = i64::try_from(config.retention.as_millis()).unwrap_or(i64::MAX / 2);
        let expire_at = (period.end_ms.saturating_add(retention_ms)) / 1000;
        CurrentPeriod {
            label: Arc::from(period.label.as_str()),
            period,
            expire_at,
        }
    }

    /// The settings.
    pub fn config(&self) -> &UsageConfig {
        &self.inner.config
    }

    /// The store.
    pub fn store(&self) -> &Store {
        &self.inner.store
    }

    /// The period containing now.
    pub fn current_period(&self) -> Period {
        self.current().period.clone()
    }

    /// The period of now, moved on first when now has left it. Only ever
    /// the period of a time read from the clock here, never of a time from
    /// a caller: an import's old (or future) time does not become it.
    fn current(&self) -> std::sync::RwLockReadGuard<'_, CurrentPeriod> {
        {
            if let Ok(c) = self.inner.current.read()
                && c.period.contains(now_ms())
            {
                return c;
            }
        }
        if let Ok(mut w) = self.inner.current.write() {
            // Read under the lock: a thread that read the clock before
            // another moved the period on cannot move it back.
            let now = now_ms();
            if !w.period.contains(now) {
                *w =
                    Self::make_current(&self.inner.config, self.inner.config.period.period_at(now));
            }
        }
        match self.inner.current.read() {
            Ok(c) => c,
            Err(p) => p.into_inner(),
        }
    }

    /// Adds `n` units of `metric` for `tenant` in the current period, in
    /// process; the flusher writes them. Returns the tenant's estimated
    /// total for the metric: the store's total at the last flush plus what
    /// this thread's share of the buffer holds (increments made since by
    /// other threads or instances show after the next flush). Recording
    /// for a counter already seen does not allocate.
    pub fn record(&self, tenant: &str, metric: &str, n: i64) -> i64 {
        self.record_at(tenant, metric, n, now_ms())
    }

    /// [`record`](Self::record) at an explicit time (Unix ms), for imports
    /// and tests of period boundaries. A time whose period is outside the
    /// supported calendar ([`PeriodKind::checked_period_at`]), such as a
    /// timestamp in microseconds, is never written: its units are counted
    /// as dropped and 0 is returned.
    pub fn record_at(&self, tenant: &str, metric: &str, n: i64, at_ms: i64) -> i64 {
        if n == 0 {
            return 0;
        }
        self.add(tenant, metric, At::Time(at_ms), n, Units::Fresh)
    }

    /// The period of now (always in the calendar).
    fn period_for(&self) -> (Arc<str>, i64) {
        let cur = self.current();
        (cur.label.clone(), cur.expire_at)
    }

    /// The period containing `at_ms`, if it is in the supported calendar.
    /// The current period's label is shared; another period is made for
    /// this increment alone and leaves the current period as it is.
    fn recent_period(&self, at_ms: i64) -> Option<RecentPeriod> {
        let recent = |c: &CurrentPeriod| RecentPeriod {
            start_ms: c.period.start_ms,
            end_ms: c.period.end_ms,
            label: c.label.clone(),
            expire_at: c.expire_at,
        };
        {
            let cur = self.current();
            if cur.period.contains(at_ms) {
                return Some(recent(&cur));
            }
        }
        let period = self.inner.config.period.checked_period_at(at_ms)?;
        Some(recent(&Self::make_current(&self.inner.config, period)))
    }

    /// Buffers `n` units that could not be written now, in the period
    /// they were meant for: the flusher writes them later.
    fn buffer_units(&self, tenant: &str, metric: &str, label: &Arc<str>, expire_at: i64, n: i64) {
        self.add(
            tenant,
            metric,
            At::Period(label, expire_at),
            n,
            Units::Fresh,
        );
    }

    /// This thread's share of the buffer.
    fn shard(&self) -> &Mutex<Buffer> {
        let shards = &self.inner.shards;
        &shards[SHARD.with(|i| *i) % shards.len()].0
    }

    /// Every share of the buffer, in turn (one lock at a time).
    fn each_shard(&self, mut f: impl FnMut(&mut Buffer)) {
        for shard in &self.inner.shards {
            match shard.0.lock() {
                Ok(mut b) => f(&mut b),
                Err(p) => f(&mut p.into_inner()),
            }
        }
    }

    /// The store total another share last saw for a counter this share
    /// does not have yet (0 when none did, or its lock is busy): the
    /// estimate of a new counter starts from it rather than from zero.
    fn known_elsewhere(&self, own: &Mutex<Buffer>, tenant: &str, label: &str, metric: &str) -> i64 {
        self.inner
            .shards
            .iter()
            .filter(|s| !std::ptr::eq(&s.0, own))
            // try_lock: this thread holds its own share's lock, and
            // waiting for another's could deadlock with a thread doing the
            // same the other way round.
            .filter_map(|s| s.0.try_lock().ok())
            .filter_map(|mut b| counter_in(&mut b, tenant, label, metric).map(|c| c.known))
            .max()
            .unwrap_or(0)
    }

    /// The one entry point of every kind of increment.
    fn add(&self, tenant: &str, metric: &str, at: At<'_>, n: i64, units: Units) -> i64 {
        let inner = &self.inner;
        let shard = self.shard();
        let Ok(mut buf) = shard.lock() else {
            return 0;
        };
        // Checked under the share's lock: shutdown sets the flag before it
        // takes each share for the last time, so an increment either lands
        // before that and is flushed, or sees the flag here.
        if units == Units::Fresh && inner.finished.load(Ordering::Acquire) {
            return self.drop_units(n, units, &mut buf.added_pending);
        }
        let Buffer {
            tenants,
            dirty,
            recent,
            added,
            added_pending,
        } = &mut *buf;
        let (label, expire_at) = match at {
            At::Period(label, expire_at) => (label, expire_at),
            At::Time(ms) => {
                if !recent
                    .as_ref()
                    .is_some_and(|r| (r.start_ms..r.end_ms).contains(&ms))
                {
                    match self.recent_period(ms) {
                        // A period whose retention has run out: Redis
                        // would delete what was written at once.
                        Some(r) if r.expire_at <= now_ms() / 1000 => {
                            return self.drop_units(n, units, added_pending);
                        }
                        Some(r) => *recent = Some(r),
                        // Outside the calendar: written nowhere, counted.
                        None => return self.drop_units(n, units, added_pending),
                    }
                }
                match recent.as_ref() {
                    Some(r) => (&r.label, r.expire_at),
                    None => return 0,
                }
            }
        };
        let full = inner.dirty.load(Ordering::Relaxed) >= inner.config.max_buffered;
        let tb = match tenants.get_mut(tenant) {
            Some(tb) => tb,
            None if full => return self.drop_units(n, units, added_pending),
            None => tenants.entry(Arc::from(tenant)).or_insert(TenantBuf {
                periods: Vec::new(),
                idle_flushes: 0,
            }),
        };
        let pb = match tb.periods.iter().position(|p| p.label == *label) {
            Some(i) => &mut tb.periods[i],
            None if full => return self.drop_units(n, units, added_pending),
            None => {
                tb.periods.push(PeriodBuf {
                    label: label.clone(),
                    expire_at,
                    counters: Vec::new(),
                });
                tb.periods.last_mut().expect("just pushed")
            }
        };
        let c = match pb.counters.iter().position(|c| &*c.metric == metric) {
            Some(i) => &mut pb.counters[i],
            None if full => return self.drop_units(n, units, added_pending),
            None => {
                let known = self.known_elsewhere(shard, tenant, label, metric);
                pb.counters.push(Counter {
                    metric: Arc::from(metric),
                    pending: 0,
                    top_only: 0,
                    known,
                });
                pb.counters.last_mut().expect("just pushed")
            }
        };
        let mut dirty_total = None;
        if c.pending == 0 && c.top_only == 0 {
            if full {
                return self.drop_units(n, units, added_pending);
            }
            *dirty += 1;
            dirty_total = Some(inner.dirty.fetch_add(1, Ordering::Relaxed) + 1);
        }
        if units == Units::TopOnly {
            c.top_only += n;
        } else {
            c.pending += n;
        }
        let estimate = c.known + c.pending;
        if units == Units::Fresh {
            *added += n.unsigned_abs();
            *added_pending += n;
        }
        let dirty_total = dirty_total.unwrap_or_else(|| inner.dirty.load(Ordering::Relaxed));
        if dirty_total >= inner.config.flush_threshold {
            inner.notify.notify_one();
        }
        estimate
    }

    /// Counts units the buffer has no room for as dropped; restored units
    /// also stop being pending (`added_pending` is the share's).
    fn drop_units(&self, n: i64, units: Units, added_pending: &mut i64) -> i64 {
        if units == Units::Restored {
            *added_pending -= n;
        }
        // A top-only increment is already in the tenant's hash: only the
        // ranking misses it.
        if units != Units::TopOnly {
            self.inner
                .dropped
                .fetch_add(n.unsigned_abs(), Ordering::Relaxed);
        }
        0
    }

    /// Writes `n` units now (one round trip) and returns the new total. On
    /// failure the units are buffered (never lost) and the error returned.
    /// If the returned future is dropped before the answer comes, the
    /// write is retried under its id by the flusher: it counts once.
    pub async fn record_now(&self, tenant: &str, metric: &str, n: i64) -> Result<i64, UsageError> {
        let _write = self.begin_write();
        let (label, expire_at) = self.period_for();
        let batch = Arc::new(Batch {
            id: self.next_id(),
            tenants: vec![TenantIncrements {
                tenant: Arc::from(tenant),
                period: label.clone(),
                expire_at,
                metrics: vec![(Arc::from(metric), n)],
                top_only: Vec::new(),
            }],
            top: self.inner.config.top,
        });
        let waiting = Unanswered::new(self, batch.clone());
        let result = self.inner.store.apply(&batch).await;
        waiting.answered();
        match result {
            Ok(totals) => {
                self.inner
                    .flushed
                    .fetch_add(n.unsigned_abs(), Ordering::Relaxed);
                self.learn(&totals);
                Ok(totals.first().and_then(|t| t.2.first()).map_or(n, |m| m.1))
            }
            Err(e) if e.not_sent() => {
                self.buffer_units(tenant, metric, &label, expire_at, n);
                Err(e)
            }
            Err(e) => {
                // It may have been applied: retry the same batch later.
                self.push_pending(batch);
                Err(e)
            }
        }
    }

    /// Checks a hard quota and consumes `n` units when the total stays
    /// within `limit`, atomically across instances (one coalesced script
    /// call). When the store cannot decide
    /// ([`Unavailable`](QuotaOutcome::Unavailable)) the units are counted
    /// anyway, exactly once: for a caller that then serves the request
    /// (fails open). If the returned future is dropped before the answer
    /// comes (the request was not served), the check is withdrawn by the
    /// flusher, as for a refused request.
    pub async fn try_consume(
        &self,
        tenant: &str,
        metric: &str,
        n: i64,
        limit: i64,
    ) -> QuotaOutcome {
        self.consume(tenant, metric, n, limit, false).await
    }

    /// [`try_consume`](Self::try_consume) for a caller that refuses the
    /// request when the store cannot decide (fails closed): then nothing
    /// is counted. If the check was sent and its answer lost, it may have
    /// been applied in Redis; the flusher withdraws it (undoes its
    /// increment, or keeps it from applying if it arrives later), so the
    /// refused request is not counted once that succeeds. Until then (at
    /// most [`UsageConfig::max_retry_age`]) the tenant's total may include
    /// it.
    pub async fn try_consume_or_refuse(
        &self,
        tenant: &str,
        metric: &str,
        n: i64,
        limit: i64,
    ) -> QuotaOutcome {
        self.consume(tenant, metric, n, limit, true).await
    }

    /// [`try_consume`](Self::try_consume), or with `refuse`
    /// [`try_consume_or_refuse`](Self::try_consume_or_refuse).
    pub(crate) async fn consume(
        &self,
        tenant: &str,
        metric: &str,
        n: i64,
        limit: i64,
        refuse: bool,
    ) -> QuotaOutcome {
        let _write = self.begin_write();
        let (label, expire_at) = self.period_for();
        let op = QuotaOp {
            op_id: self.next_id(),
            tenant: Arc::from(tenant),
            period: label.clone(),
            expire_at,
            metric: Arc::from(metric),
            n,
            limit: Some(limit),
        };
        let waiting = Unanswered::new(self, op.clone());
        let answer = self.inner.store.quota(op).await;
        let op = waiting.answered();
        match answer {
            Ok(QuotaAnswer {
                allowed: true,
                total,
            }) => {
                self.set_known(tenant, metric, &label, total);
                if self.inner.config.top {
                    self.add(
                        tenant,
                        metric,
                        At::Period(&label, expire_at),
                        n,
                        Units::TopOnly,
                    );
                }
                QuotaOutcome::Allowed { total }
            }
            Ok(QuotaAnswer {
                allowed: false,
                total,
            }) => {
                self.set_known(tenant, metric, &label, total);
                QuotaOutcome::Exceeded { total }
            }
            Err(e) if e.not_sent() => {
                if !refuse {
                    // Counted in the buffer like any other increment.
                    self.buffer_units(tenant, metric, &label, expire_at, n);
                }
                QuotaOutcome::Unavailable
            }
            Err(_) => {
                // The answer was lost: the increment may have been applied.
                // Settle the same operation later; its marker makes sure it
                // counts once (served) or not at all (refused).
                if let Some(op) = op {
                    self.push_replay(if refuse {
                        Settle::Withdraw(op)
                    } else {
                        Settle::Apply(QuotaOp { limit: None, ..op })
                    });
                }
                QuotaOutcome::Unavailable
            }
        }
    }

    /// Marks a write to the store as on its way, for shutdown to wait for
    /// (see `Inner::in_flight`). A write begun once shutdown has set
    /// `finished` is not waited for: its outcome is counted when it comes.
    fn begin_write(&self) -> Option<InFlight<'_>> {
        let inner = &*self.inner;
        // SeqCst, as shutdown's store of `finished` and load of
        // `in_flight`: either this write sees the flag, or shutdown sees
        // the write.
        inner.in_flight.fetch_add(1, Ordering::SeqCst);
        let write = InFlight(inner);
        if inner.finished.load(Ordering::SeqCst) {
            return None;
        }
        Some(write)
    }

    /// Waits (at most until `deadline`) for the writes that began before
    /// `finished` was set.
    async fn writes_done(&self, deadline: tokio::time::Instant) {
        loop {
            let done = self.inner.settled.notified();
            tokio::pin!(done);
            done.as_mut().enable();
            if self.inner.in_flight.load(Ordering::SeqCst) == 0 {
                return;
            }
            if tokio::time::timeout_at(deadline, done).await.is_err() {
                return;
            }
        }
    }

    /// Records the store's total for a counter, in every share that has it.
    fn set_known(&self, tenant: &str, metric: &str, label: &Arc<str>, total: i64) {
        self.each_shard(|buf| {
            if let Some(c) = counter_in(buf, tenant, label, metric) {
                c.known = total;
            }
        });
    }

    /// Records the store's totals after a flush, in every share.
    fn learn(&self, totals: &Totals) {
        self.each_shard(|buf| {
            for (tenant, period, metrics) in totals {
                for (m, total) in metrics {
                    if let Some(c) = counter_in(buf, tenant, period, m) {
                        c.known = *total;
                    }
                }
            }
        });
    }

    fn next_id(&self) -> String {
        format!(
            "{:016x}-{}",
            self.inner.instance,
            self.inner.seq.fetch_add(1, Ordering::Relaxed)
        )
    }

    /// Takes everything pending out of every share of the buffer as one
    /// batch (counters stay, at zero, so recording for them again does not
    /// allocate).
    fn take(&self) -> Option<Batch> {
        let current = self.current().label.clone();
        let now_s = now_ms() / 1000;
        // Units of periods whose retention ran out while they waited:
        // written, Redis would delete them at once (their expiry is
        // absolute, and past).
        let (mut expired, mut expired_units) = (0_i64, 0_u64);
        let mut tenants: Vec<TenantIncrements> = Vec::new();
        // (tenant, period) → its place in `tenants`: shares holding the
        // same counters merge into one entry.
        let mut index: std::collections::HashMap<(Arc<str>, Arc<str>), usize> =
            std::collections::HashMap::new();
        self.each_shard(|buf| {
            if buf.dirty == 0 {
                // Forget tenants idle for several flushes to bound memory.
                buf.tenants.retain(|_, t| {
                    t.idle_flushes = t.idle_flushes.saturating_add(1);
                    t.idle_flushes < 3
                });
                return;
            }
            for (tenant, tb) in &mut buf.tenants {
                let mut any = false;
                for pb in &mut tb.periods {
                    let mut metrics = Vec::new();
                    let mut top_only = Vec::new();
                    for c in &mut pb.counters {
                        if c.pending != 0 {
                            metrics.push((c.metric.clone(), std::mem::take(&mut c.pending)));
                        }
                        if c.top_only != 0 {
                            top_only.push((c.metric.clone(), std::mem::take(&mut c.top_only)));
                        }
                    }
                    if metrics.is_empty() && top_only.is_empty() {
                        continue;
                    }
                    if pb.expire_at <= now_s {
                        // Its top-only units are in no hash that still
                        // exists: nothing to count.
                        for (_, n) in metrics {
                            expired += n;
                            expired_units += n.unsigned_abs();
                        }
                        continue;
                    }
                    any = true;
                    match index.entry((tenant.clone(), pb.label.clone())) {
                        std::collections::hash_map::Entry::Occupied(e) => {
                            let t = &mut tenants[*e.get()];
                            merge(&mut t.metrics, metrics);
                            merge(&mut t.top_only, top_only);
                        }
                        std::collections::hash_map::Entry::Vacant(e) => {
                            e.insert(tenants.len());
                            tenants.push(TenantIncrements {
                                tenant: tenant.clone(),
                                period: pb.label.clone(),
                                expire_at: pb.expire_at,
                                metrics,
                                top_only,
                            });
                        }
                    }
                }
                tb.idle_flushes = if any {
                    0
                } else {
                    tb.idle_flushes.saturating_add(1)
                };
            }
            self.inner.dirty.fetch_sub(buf.dirty, Ordering::Relaxed);
            buf.dirty = 0;
            // Drop periods that are over and fully written.
            for tb in buf.tenants.values_mut() {
                tb.periods.retain(|p| p.label == current);
            }
            buf.tenants.retain(|_, t| t.idle_flushes < 3);
        });
        if expired_units > 0 {
            self.inner
                .pending_units
                .fetch_sub(expired, Ordering::Relaxed);
            self.inner
                .dropped
                .fetch_add(expired_units, Ordering::Relaxed);
            tracing::error!(
                units = expired_units,
                "usage buffered past its period's retention: counted as dropped, not written"
            );
        }
        if tenants.is_empty() {
            return None;
        }
        Some(Batch {
            id: self.next_id(),
            tenants,
            top: self.inner.config.top,
        })
    }

    /// Puts a batch that never reached the store back into the buffer
    /// (still counted as pending: it never stopped being).
    fn restore(&self, batch: Batch) {
        for t in batch.tenants {
            let at = At::Period(&t.period, t.expire_at);
            for (m, n) in t.metrics {
                self.add(&t.tenant, &m, at, n, Units::Restored);
            }
            for (m, n) in t.top_only {
                self.add(&t.tenant, &m, at, n, Units::TopOnly);
            }
        }
    }

    /// Writes everything pending now: retried batches first (same ids, so
    /// nothing counts twice), then the quota operations whose answer was
    /// lost (settled together: one pipelined round trip for up to 1,000 of
    /// them), then the buffer, in pipelined round trips of at most 500
    /// counters each.
    pub async fn flush(&self) -> Result<(), UsageError> {
        let _guard = self.inner.flush_lock.lock().await;
        let result = self.flush_locked().await;
        if result.is_err() {
            self.inner.flush_errors.fetch_add(1, Ordering::Relaxed);
        }
        self.export();
        result
    }

    async fn flush_locked(&self) -> Result<(), UsageError> {
        let max_age = self.inner.config.max_retry_age;
        // Batches sent before: retried under their id whatever the error
        // (even "not sent": an earlier attempt may have been applied), so
        // they never count twice.
        while let Some(p) = front(&self.inner.pending) {
            if p.since.elapsed() >= max_age {
                self.give_up_batch(&p.write);
                continue;
            }
            let Some(batch) = self.without_expired(&p.write) else {
                continue;
            };
            self.apply(&batch).await?;
            self.remove_pending(&batch.id);
        }
        self.inner.pending_full.store(false, Ordering::Relaxed);
        // Quota operations whose answer was lost: the same op ids again.
        self.settle_replays().await?;
        let Some(batch) = self.take() else {
            return Ok(());
        };
        let parts: Vec<Arc<Batch>> = self.split(batch).into_iter().map(Arc::new).collect();
        // Pending before the first attempt: if this flush is dropped while
        // it waits for the store, each part is retried under its id, not
        // lost.
        locked(&self.inner.pending).extend(parts.iter().map(|b| Unconfirmed::new(b.clone())));
        let mut parts = parts.into_iter();
        while let Some(batch) = parts.next() {
            if let Err(e) = self.apply(&batch).await {
                // This part may have been applied, unless it was never
                // sent; the parts after it were not: those merge back.
                let unsent = e.not_sent().then_some(batch);
                for b in unsent.into_iter().chain(parts) {
                    self.remove_pending(&b.id);
                    self.restore(Arc::unwrap_or_clone(b));
                }
                return Err(e);
            }
            self.remove_pending(&batch.id);
        }
        Ok(())
    }

    /// Splits a batch into batches of at most [`FLUSH_CHUNK`] counters
    /// (a tenant's period is never split), each with an id of its own: the
    /// markers of the top sets are per batch.
    fn split(&self, mut batch: Batch) -> Vec<Batch> {
        let counters = |t: &TenantIncrements| (t.metrics.len() + t.top_only.len()).max(1);
        if batch.tenants.iter().map(counters).sum::<usize>() <= FLUSH_CHUNK {
            return vec![batch];
        }
        let mut parts = Vec::new();
        let mut tenants = std::mem::take(&mut batch.tenants).into_iter().peekable();
        while tenants.peek().is_some() {
            let mut size = 0;
            let mut part = Vec::new();
            while let Some(t) =
                tenants.next_if(|t| part.is_empty() || size + counters(t) <= FLUSH_CHUNK)
            {
                size += counters(&t);
                part.push(t);
            }
            parts.push(Batch {
                id: if parts.is_empty() {
                    std::mem::take(&mut batch.id)
                } else {
                    self.next_id()
                },
                tenants: part,
                top: batch.top,
            });
        }
        parts
    }

    /// A queued batch without its tenant-periods whose retention ran out
    /// while it waited: a retry would write them with an expiry in the
    /// past, and Redis would delete them at once. Their units are counted
    /// as dropped (even if the first attempt was applied: then they were
    /// deleted since, with their period's data). What is left keeps the
    /// batch's id and replaces it in the queue: each of its parts has
    /// markers of its own, and the members of a top set share their
    /// period's expiry, so what is left is still applied at most once.
    /// `None` when nothing is left (it is then off the queue).
    fn without_expired(&self, batch: &Arc<Batch>) -> Option<Arc<Batch>> {
        let now_s = now_ms() / 1000;
        if batch.tenants.iter().all(|t| t.expire_at > now_s) {
            return Some(batch.clone());
        }
        let (kept, gone): (Vec<_>, Vec<_>) = batch
            .tenants
            .iter()
            .cloned()
            .partition(|t| t.expire_at > now_s);
        let increments = || gone.iter().flat_map(|t| t.metrics.iter().map(|(_, n)| *n));
        let units: i64 = increments().sum();
        let dropped: u64 = increments().map(i64::unsigned_abs).sum();
        let rest = (!kept.is_empty()).then(|| {
            Arc::new(Batch {
                id: batch.id.clone(),
                tenants: kept,
                top: batch.top,
            })
        });
        {
            let mut q = locked(&self.inner.pending);
            let i = q.iter().position(|b| b.write.id == batch.id)?;
            match &rest {
                Some(r) => q[i].write = r.clone(),
                None => {
                    q.remove(i);
                }
            }
        }
        self.inner.pending_units.fetch_sub(units, Ordering::Relaxed);
        self.inner.dropped.fetch_add(dropped, Ordering::Relaxed);
        tracing::error!(
            batch = %batch.id,
            units = dropped,
            "usage batch unconfirmed past its period's retention: counted as dropped, not written"
        );
        rest
    }

    /// Settles the quota operations whose answer was lost, oldest first:
    /// one pipelined round trip for up to [`SETTLE_CHUNK`] of them. Those
    /// too old to retry, or for a period whose data Redis has deleted, are
    /// given up first.
    async fn settle_replays(&self) -> Result<(), UsageError> {
        let max_age = self.inner.config.max_retry_age;
        loop {
            let now_s = now_ms() / 1000;
            let mut given_up = Vec::new();
            let chunk: Vec<Settle> = {
                let mut q = locked(&self.inner.replays);
                q.retain(|r| {
                    let keep = r.since.elapsed() < max_age && r.write.op().expire_at > now_s;
                    if !keep {
                        given_up.push(r.write.clone());
                    }
                    keep
                });
                if q.len() < self.inner.config.max_unsettled {
                    self.inner.replays_full.store(false, Ordering::Relaxed);
                }
                q.iter()
                    .take(SETTLE_CHUNK)
                    .map(|r| r.write.clone())
                    .collect()
            };
            for s in &given_up {
                self.give_up_replay(s, now_s);
            }
            if chunk.is_empty() {
                return Ok(());
            }
            let outcomes = self.inner.store.settle(&chunk).await?;
            let mut failed = None;
            for (s, outcome) in chunk.iter().zip(outcomes) {
                match outcome {
                    Ok(()) => self.settled(s),
                    Err(e) => {
                        failed.get_or_insert(e);
                    }
                }
            }
            if let Some(e) = failed {
                return Err(e);
            }
        }
    }

    /// Takes a settled quota operation off the queue and counts it.
    fn settled(&self, s: &Settle) {
        if !self.remove_replay(&s.op().op_id) {
            return;
        }
        if let Settle::Apply(op) = s {
            self.inner.pending_units.fetch_sub(op.n, Ordering::Relaxed);
            self.inner
                .flushed
                .fetch_add(op.n.unsigned_abs(), Ordering::Relaxed);
            if self.inner.config.top {
                self.add(
                    &op.tenant,
                    &op.metric,
                    At::Period(&op.period, op.expire_at),
                    op.n,
                    Units::TopOnly,
                );
            }
        }
    }

    /// Removes a confirmed (or abandoned) batch from the retry queue.
    fn remove_pending(&self, id: &str) {
        let mut p = locked(&self.inner.pending);
        if let Some(i) = p.iter().position(|b| b.write.id == id) {
            p.remove(i);
        }
    }

    /// Removes a settled quota operation from its queue; whether it was
    /// there.
    fn remove_replay(&self, op_id: &str) -> bool {
        let mut r = locked(&self.inner.replays);
        match r.iter().position(|r| r.write.op().op_id == op_id) {
            Some(i) => r.remove(i).is_some(),
            None => false,
        }
    }

    /// A batch unconfirmed for too long: its markers may be gone, so a
    /// retry could count it twice. Counted as dropped instead.
    fn give_up_batch(&self, batch: &Batch) {
        let units = batch.magnitude();
        tracing::error!(
            batch = %batch.id,
            units,
            "usage batch unconfirmed for too long: counted as dropped"
        );
        self.remove_pending(&batch.id);
        self.inner
            .pending_units
            .fetch_sub(batch.units(), Ordering::Relaxed);
        self.inner.dropped.fetch_add(units, Ordering::Relaxed);
    }

    /// A quota operation taken off its queue unsettled: too old to retry
    /// (see [`give_up_batch`](Self::give_up_batch)), or for a period whose
    /// data is gone (an increment would be deleted at once, and there is
    /// nothing left to withdraw from).
    fn give_up_replay(&self, s: &Settle, now_s: i64) {
        let op = s.op();
        let expired = op.expire_at <= now_s;
        if let Settle::Apply(op) = s {
            self.inner.pending_units.fetch_sub(op.n, Ordering::Relaxed);
        } else if expired {
            return;
        }
        self.inner
            .dropped
            .fetch_add(op.n.unsigned_abs(), Ordering::Relaxed);
        match (s, expired) {
            (Settle::Apply(_), true) => {
                tracing::error!(op = %op.op_id, units = op.n, "quota operation unconfirmed past its period's retention: counted as dropped");
            }
            (Settle::Apply(_), false) => {
                tracing::error!(op = %op.op_id, units = op.n, "quota operation unconfirmed for too long: counted as dropped");
            }
            (Settle::Withdraw(_), _) => {
                tracing::error!(op = %op.op_id, units = op.n, "refused request's quota operation could not be withdrawn: it may stay counted");
            }
        }
    }

    /// Queues a synchronous write that was sent but not confirmed, for a
    /// retry under its id. Once shutdown has sealed the queue nothing would
    /// retry it, and beyond [`UsageConfig::max_unsettled`] queued ones it
    /// is not kept (each lost write of a latency spike would otherwise stay
    /// in memory): then its units are counted as dropped. Decided under the
    /// queue's lock, so that shutdown either finds it queued or it finds
    /// the queue sealed.
    fn push_pending(&self, batch: Arc<Batch>) {
        let (units, dropped) = (batch.units(), batch.magnitude());
        let id = batch.id.clone();
        self.keep_unsettled(
            &self.inner.pending,
            &self.inner.pending_full,
            batch,
            Unsettled {
                what: "usage write",
                id: &id,
                pending: units,
                dropped,
            },
        );
    }

    /// Queues a quota operation whose answer was lost (see
    /// [`push_pending`](Self::push_pending)), unless
    /// [`UsageConfig::max_unsettled`] are queued already: then its units
    /// are counted as dropped.
    fn push_replay(&self, s: Settle) {
        let op = s.op();
        let (n, id) = (op.n, op.op_id.clone());
        // A withdrawal adds nothing pending: it undoes a check.
        let pending = if matches!(s, Settle::Apply(_)) { n } else { 0 };
        self.keep_unsettled(
            &self.inner.replays,
            &self.inner.replays_full,
            s,
            Unsettled {
                what: "quota operation",
                id: &id,
                pending,
                dropped: n.unsigned_abs(),
            },
        );
    }

    /// Queues `write` on `queue` (a retry queue) with its pending units,
    /// both under the queue's lock, so that shutdown either finds it
    /// queued or finds the queue sealed. Once sealed, or with
    /// [`UsageConfig::max_unsettled`] queued already, it is not kept: its
    /// units are counted as dropped (logged once per spell when full).
    fn keep_unsettled<T>(
        &self,
        queue: &Mutex<VecDeque<Unconfirmed<T>>>,
        full: &AtomicBool,
        write: T,
        u: Unsettled<'_>,
    ) {
        let mut q = locked(queue);
        let sealed = self.inner.sealed.load(Ordering::Acquire);
        if sealed || q.len() >= self.inner.config.max_unsettled {
            drop(q);
            self.inner.dropped.fetch_add(u.dropped, Ordering::Relaxed);
            if sealed {
                tracing::warn!(
                    id = u.id,
                    units = u.dropped,
                    "{} unconfirmed after shutdown: counted as dropped",
                    u.what
                );
            } else if !full.swap(true, Ordering::Relaxed) {
                tracing::warn!(
                    max = self.inner.config.max_unsettled,
                    "too many {}s with lost answers await a retry: more are counted as dropped",
                    u.what
                );
            }
            return;
        }
        self.inner
            .pending_units
            .fetch_add(u.pending, Ordering::Relaxed);
        q.push_back(Unconfirmed::new(write));
    }

    async fn apply(&self, batch: &Batch) -> Result<(), UsageError> {
        let totals = self.inner.store.apply(batch).await?;
        self.inner
            .pending_units
            .fetch_sub(batch.units(), Ordering::Relaxed);
        self.inner
            .flushed
            .fetch_add(batch.magnitude(), Ordering::Relaxed);
        self.learn(&totals);
        Ok(())
    }

    fn export(&self) {
        let now = self.stats();
        let Ok(mut last) = self.inner.exported.lock() else {
            return;
        };
        metrics::counter!("tollgate_usage_buffered_total")
            .increment(now.buffered.saturating_sub(last.buffered));
        metrics::counter!("tollgate_usage_flushed_total")
            .increment(now.flushed.saturating_sub(last.flushed));
        metrics::counter!("tollgate_usage_flush_errors_total")
            .increment(now.flush_errors.saturating_sub(last.flush_errors));
        metrics::counter!("tollgate_usage_dropped_total")
            .increment(now.dropped.saturating_sub(last.dropped));
        #[allow(clippy::cast_precision_loss)]
        metrics::gauge!("tollgate_usage_pending_units").set(now.pending as f64);
        *last = now;
    }

    /// The tracker's own counters.
    pub fn stats(&self) -> UsageStats {
        let i = &self.inner;
        let (mut added, mut added_pending) = (0, 0);
        self.each_shard(|b| {
            added += b.added;
            added_pending += b.added_pending;
        });
        let pending = i.pending_units.load(Ordering::Relaxed) + added_pending;
        UsageStats {
            buffered: added,
            flushed: i.flushed.load(Ordering::Relaxed),
            flush_errors: i.flush_errors.load(Ordering::Relaxed),
            dropped: i.dropped.load(Ordering::Relaxed),
            pending: u64::try_from(pending.max(0)).unwrap_or(0),
        }
    }

    /// Stops the flusher and writes everything pending, retrying until the
    /// shutdown timeout. Writes already on their way
    /// ([`record_now`](Self::record_now), hard-quota checks) are waited
    /// for (each is bounded by the store's deadline), so that one whose
    /// answer is lost is retried under its id with the rest. Whatever is
    /// still unwritten then is counted as dropped (and logged), never
    /// silently lost, and is never written later. From then on nothing is
    /// left waiting: increments recorded after shutdown, and writes whose
    /// answer is lost after it, are counted as dropped too (nothing would
    /// write or retry them).
    pub async fn shutdown(&self) -> UsageStats {
        self.inner.closed.store(true, Ordering::Release);
        self.inner.notify.notify_one();
        let deadline = tokio::time::Instant::now() + self.inner.config.shutdown_timeout;
        loop {
            let ok = self.flush().await.is_ok();
            if ok && self.stats().pending == 0 {
                if self.inner.finished.load(Ordering::SeqCst) {
                    break;
                }
                // From now on increments are dropped and new writes are
                // not waited for; those already on their way are. One more
                // flush writes the increments made since the last one and
                // retries the writes whose answer was lost.
                self.inner.finished.store(true, Ordering::SeqCst);
                self.writes_done(deadline).await;
                continue;
            }
            if tokio::time::Instant::now() >= deadline {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        self.inner.finished.store(true, Ordering::SeqCst);
        self.seal().await;
        self.stats()
    }

    /// Counts everything still unwritten as dropped and forgets it (the
    /// buffer, the batches awaiting a retry, the quota operations awaiting
    /// settling), and seals the retry queues: a write whose answer is lost
    /// from now on is counted as dropped at once, not queued.
    async fn seal(&self) {
        let _guard = self.inner.flush_lock.lock().await;
        let mut units = self.take().map_or(0, |b| b.magnitude());
        // Before the queues are emptied: a write that finds a queue after
        // that finds it sealed (the queue's lock orders the two).
        self.inner.sealed.store(true, Ordering::Release);
        units += locked(&self.inner.pending)
            .drain(..)
            .map(|b| b.write.magnitude())
            .sum::<u64>();
        let mut withdrawals = 0;
        for r in locked(&self.inner.replays).drain(..) {
            units += r.write.op().n.unsigned_abs();
            if matches!(r.write, Settle::Withdraw(_)) {
                withdrawals += 1;
            }
        }
        self.each_shard(|b| b.added_pending = 0);
        self.inner.pending_units.store(0, Ordering::Relaxed);
        if units != 0 || withdrawals != 0 {
            self.inner.dropped.fetch_add(units, Ordering::Relaxed);
            tracing::error!(
                units,
                withdrawals,
                "usage still unwritten at shutdown: counted as dropped"
            );
        }
        self.export();
    }

    /// A tenant's usage in a period (default: the current one): one HGETALL.
    pub async fn usage(
        &self,
        tenant: &str,
        period: Option<&str>,
    ) -> Result<BTreeMap<String, i64>, UsageError> {
        let label = match period {
            Some(p) => p.to_owned(),
            None => self.current_period().label,
        };
        self.inner.store.usage(tenant, &label).await
    }

    /// The `n` biggest consumers of `metric` in a period (default: the
    /// current one): one ZRANGE.
    pub async fn top(
        &self,
        metric: &str,
        period: Option<&str>,
        n: usize,
    ) -> Result<Vec<(String, i64)>, UsageError> {
        let label = match period {
            Some(p) => p.to_owned(),
            None => self.current_period().label,
        };
        self.inner.store.top(metric, &label, n).await
    }

    /// Tenants with the most rate-limit denials (the metric
    /// [`RATE_LIMITED`](crate::RATE_LIMITED)).
    pub async fn rate_limited(
        &self,
        period: Option<&str>,
        n: usize,
    ) -> Result<Vec<(String, i64)>, UsageError> {
        self.top(crate::RATE_LIMITED, period, n).await
    }

    /// CSV (`tenant,period,metric,value`) of several tenants' usage in a
    /// period. Text fields are quoted when needed, and those a spreadsheet
    /// would read as a formula (starting with `=`, `+`, `-`, `@`, a tab or
    /// a carriage return) are prefixed with `'`: tenant ids come from
    /// clients.
    pub async fn csv(&self, tenants: &[&str], period: Option<&str>) -> Result<String, UsageError> {
        let label = match period {
            Some(p) => p.to_owned(),
            None => self.current_period().label,
        };
        let mut out = String::from("tenant,period,metric,value\n");
        let period = csv_field(&label);
        for t in tenants {
            for (m, v) in self.inner.store.usage(t, &label).await? {
                let _ = writeln!(out, "{},{},{},{}", csv_field(t), period, csv_field(&m), v);
            }
        }
        Ok(out)
    }
}

/// The counter of `metric` for `tenant` in `label`, if the share has it.
fn counter_in<'b>(
    buf: &'b mut Buffer,
    tenant: &str,
    label: &str,
    metric: &str,
) -> Option<&'b mut Counter> {
    buf.tenants
        .get_mut(tenant)?
        .periods
        .iter_mut()
        .find(|p| &*p.label == label)?
        .counters
        .iter_mut()
        .find(|c| &*c.metric == metric)
}

/// Adds `more` into `into`, metric by metric.
fn merge(into: &mut Vec<(Arc<str>, i64)>, more: Vec<(Arc<str>, i64)>) {
    for (m, n) in more {
        match into.iter_mut().find(|(k, _)| *k == m) {
            Some((_, total)) => *total += n,
            None => into.push((m, n)),
        }
    }
}

/// A text field of the CSV export: neutralised when a spreadsheet would
/// run it as a formula (OWASP "CSV injection"), quoted when it holds a
/// separator, a quote or a line break.
fn csv_field(s: &str) -> String {
    let formula = s.starts_with(['=', '+', '-', '@', '\t', '\r']);
    let s = if formula {
        format!("'{s}")
    } else {
        s.to_owned()
    };
    if s.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s
    }
}

async fn flusher(weak: Weak<Inner>) {
    let mut failed = false;
    loop {
        let Some(inner) = weak.upgrade() else { return };
        if inner.closed.load(Ordering::Acquire) {
            return;
        }
        let interval = inner.config.flush_interval;
        let notified = async {
            // After a failed flush the next waits the whole interval: a
            // full buffer (or the units a failed flush put back) would
            // otherwise wake the flusher at once, and during an outage it
            // would fail, put them back and wake again without pause.
            if failed {
                std::future::pending::<()>().await;
            }
            inner.notify.notified().await;
        };
        tokio::select! {
            () = tokio::time::sleep(interval) => {}
            () = notified => {}
        }
        if inner.closed.load(Ordering::Acquire) {
            return;
        }
        let tracker = UsageTracker { inner };
        failed = match tracker.flush().await {
            Ok(_) => false,
            Err(e) => {
                tracing::debug!(error = %e, "usage flush failed; will retry");
                true
            }
        };
    }
}
