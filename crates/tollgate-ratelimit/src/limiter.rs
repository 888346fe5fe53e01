//! The shared state behind every clone of the layer: table, stores, key
//! extractor, deny cache.

use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};
use tollgate_redis::local::RequestMap;

use http::StatusCode;
use tollgate_redis::{CoalesceConfig, Coalescer, KeySpace, Notice, RedisHandle, Subscription};

use crate::decision::{Decision, Outcome, Report, RequestVerdict, Source};
use crate::error::Error;
use crate::headers::HeaderOptions;
use crate::key::{KeyExtractor, PeerIp, RequestView};
use crate::policy::{FailureMode, PolicyTable};
use crate::quota::{Status, Verdict};
use crate::route::{RouteId, is_grpc, matched_path};
use crate::store::memory::MemoryStore;
use crate::store::redis::{DecideOp, Item};
use crate::store::{Checks, PolicyCheck};
use crate::telemetry::{self, Store};

/// The caller's plan tier, set as a request extension by an earlier layer
/// (authentication). Policies pick their quota by it
/// ([`Policy::with_plan`](crate::Policy::with_plan)).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Plan(pub String);

/// What one request costs, set as a request extension; overrides the
/// route's cost (0 only peeks).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cost(pub u32);

/// What happens to a request whose key cannot be extracted.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MissingKey {
    /// Refuse it with this status and a problem body (default 400).
    Reject(StatusCode),
    /// Let it through, unlimited.
    Allow,
    /// Limit every such request under this one shared key.
    Shared(String),
}

impl Default for MissingKey {
    fn default() -> Self {
        MissingKey::Reject(StatusCode::BAD_REQUEST)
    }
}

/// Builds a [`RateLimiter`].
#[must_use]
pub struct RateLimiterBuilder {
    table: PolicyTable,
    redis: Option<RedisHandle>,
    extractor: Arc<dyn KeyExtractor>,
    missing: MissingKey,
    shadow: bool,
    headers: HeaderOptions,
    deny_cache: usize,
    divisor: u32,
    housekeeping: Duration,
    coalesce: CoalesceConfig,
    exceeds_status: StatusCode,
    test_now: Option<u64>,
    lease: u32,
}

impl std::fmt::Debug for RateLimiterBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RateLimiterBuilder")
            .field("table", &self.table)
            .field("redis", &self.redis)
            .finish_non_exhaustive()
    }
}

impl RateLimiterBuilder {
    /// Decides in Redis through `handle` (without it every decision is in
    /// process).
    pub fn redis(mut self, handle: RedisHandle) -> Self {
        self.redis = Some(handle);
        self
    }

    /// Who a request is (default: [`PeerIp`]).
    pub fn key(mut self, ex: impl KeyExtractor) -> Self {
        self.extractor = Arc::new(ex);
        self
    }

    /// What to do without a key (default: 400).
    pub fn missing_key(mut self, m: MissingKey) -> Self {
        self.missing = m;
        self
    }

    /// Global shadow mode: every policy decides and counts, none denies.
    pub fn shadow(mut self, on: bool) -> Self {
        self.shadow = on;
        self
    }

    /// Adds the IETF `RateLimit-Policy` / `RateLimit` fields
    /// (draft-ietf-httpapi-ratelimit-headers-10 syntax).
    pub fn ietf_headers(mut self, on: bool) -> Self {
        self.headers.ietf = on;
        self
    }

    /// Whether to send the `X-RateLimit-*` headers (default true).
    pub fn legacy_headers(mut self, on: bool) -> Self {
        self.headers.legacy = on;
        self
    }

    /// Adds `X-RateLimit-Policy`, the name of the policy the other headers
    /// report, on every response (default false: one header fewer per
    /// response, and a denial's body names the policy already). Useful
    /// while tuning a table with several policies per route.
    pub fn policy_header(mut self, on: bool) -> Self {
        self.headers.policy = on;
        self
    }

    /// Remembers up to `capacity` denied identities until their retry
    /// time and answers them without asking Redis (0 disables; default
    /// 10,000). It only ever denies, and only while Redis itself said the
    /// request cannot conform.
    pub fn deny_cache(mut self, capacity: usize) -> Self {
        self.deny_cache = capacity;
        self
    }

    /// Divides every quota by `n` in the in-process fallback, for `n`
    /// instances sharing the limit while Redis is down (default 1).
    pub fn fallback_divisor(mut self, n: u32) -> Self {
        self.divisor = n.max(1);
        self
    }

    /// How often the fallback forgets idle keys (default 60 s).
    pub fn housekeeping_interval(mut self, d: Duration) -> Self {
        self.housekeeping = d;
        self
    }

    /// Tuning of the Redis batcher.
    pub fn coalesce(mut self, c: CoalesceConfig) -> Self {
        self.coalesce = c;
        self
    }

    /// The status for a request whose cost exceeds a policy's capacity
    /// (default 400: retrying cannot help, so no `Retry-After`).
    pub fn exceeds_capacity_status(mut self, s: StatusCode) -> Self {
        self.exceeds_status = s;
        self
    }

    /// Lease mode: for requests whose policies are all GCRA, take `chunk`
    /// tokens from Redis at a time and spend them locally (0, the default,
    /// is exact mode). Redis traffic drops by about `chunk`×. The chunk is
    /// capped at the smallest burst; a request costing at least the chunk
    /// is decided exactly.
    ///
    /// A lease is kept per identity and list of policies (a route's, or
    /// the default), and debits every policy of its list. A policy that
    /// several lists include (say a per-tenant policy on every route, each
    /// route with a burst policy of its own) gets an equal part of the
    /// chunk in each list's lease, so that its leases together never take
    /// more than one chunk.
    ///
    /// Each instance has at most one lease request per (policies, identity)
    /// in flight; concurrent requests for the same identity wait for it
    /// (within the handle's deadline, like a Redis call) and spend from it.
    /// So an instance never holds more than one chunk per identity, and a
    /// cold burst is shared between instances chunk by chunk. When Redis
    /// refuses a chunk, that identity is decided exactly until a chunk
    /// would conform again (the last tokens are not lost).
    ///
    /// Once three quarters of a lease are spent, the instance tops it up in
    /// the background with what was spent, so requests keep spending while
    /// the next tokens are on their way instead of waiting for them.
    ///
    /// Bound: tokens are debited in Redis before they are spent and an
    /// instance never holds more than one chunk per identity and policy, so in any
    /// window at most `chunk × instances` requests beyond what exact mode
    /// admits may be admitted. A lease may be spent for `chunk × T` after
    /// it was taken, and at least 1 s (a chunk of a generous quota would
    /// otherwise last a millisecond). Conversely a lease an instance does
    /// not use up is lost when it expires (under-admission of at most a
    /// chunk per instance and identity).
    pub fn lease(mut self, chunk: u32) -> Self {
        self.lease = chunk;
        self
    }

    /// A synthetic Redis clock in microseconds, for tests only.
    #[doc(hidden)]
    pub fn synthetic_clock(mut self, now_us: u64) -> Self {
        self.test_now = Some(now_us);
        self
    }

    /// Builds the limiter. With Redis it starts a batching task and
    /// subscribes to the resets of the other instances sharing that Redis
    /// (see [`RateLimiter::reset`]), so call it inside a Tokio runtime;
    /// without Redis it starts nothing and needs no runtime.
    pub fn build(self) -> RateLimiter {
        let redis = self.redis.map(|handle| {
            handle.register_layer("ratelimit");
            let coalescer = Coalescer::new(
                handle.clone(),
                DecideOp { now: self.test_now },
                self.coalesce,
            );
            RedisBackend {
                keys: handle.keys("ratelimit"),
                handle,
                coalescer,
            }
        });
        let memory = MemoryStore::new(self.table.len(), self.divisor, self.housekeeping);
        RateLimiter {
            // The reset listener holds a `Weak` of the state it clears: it
            // stops when the limiter is dropped.
            inner: Arc::new_cyclic(|weak| {
                let resets = redis
                    .as_ref()
                    .and_then(|r| listen_for_resets(&r.handle, weak.clone()));
                Inner {
                    table: self.table,
                    redis,
                    memory,
                    extractor: self.extractor,
                    missing: self.missing,
                    shadow: self.shadow,
                    headers: self.headers,
                    deny_cache: DenyCache::new(self.deny_cache),
                    exceeds_status: self.exceeds_status,
                    lease: self.lease,
                    leases: Mutex::new(RequestMap::default()),
                    resets,
                }
            }),
        }
    }
}

/// Subscribes to the resets broadcast by the instances sharing `handle`'s
/// Redis and namespace ([`RateLimiter::reset`]).
fn listen_for_resets(handle: &RedisHandle, inner: Weak<Inner>) -> Option<Subscription> {
    let channel = handle.keys("ratelimit").key(&["reset"]);
    let heard = move |notice: Notice<'_>| {
        if let Some(inner) = inner.upgrade() {
            inner.heard(notice);
        }
    };
    match Subscription::start(handle, channel, heard) {
        Ok(s) => Some(s),
        Err(e) => {
            tracing::warn!(error = %e, "rate limit: could not subscribe to resets; a reset made on another instance is seen here by the cached retry time");
            None
        }
    }
}

/// A reset, as broadcast to the other instances.
#[derive(serde::Serialize, serde::Deserialize)]
struct ResetMessage {
    /// The policy's name.
    policy: String,
    /// The identity.
    key: String,
}

struct RedisBackend {
    handle: RedisHandle,
    keys: KeySpace,
    coalescer: Coalescer<DecideOp>,
}

pub(crate) struct Inner {
    pub(crate) table: PolicyTable,
    redis: Option<RedisBackend>,
    memory: Arc<MemoryStore>,
    extractor: Arc<dyn KeyExtractor>,
    missing: MissingKey,
    shadow: bool,
    pub(crate) headers: HeaderOptions,
    deny_cache: DenyCache,
    pub(crate) exceeds_status: StatusCode,
    lease: u32,
    leases: Mutex<RequestMap<String, Lease>>,
    /// Resets made by other instances (with Redis).
    resets: Option<Subscription>,
}

impl Inner {
    /// The index of the policy named `name`.
    fn policy_index(&self, name: &str) -> Option<usize> {
        (0..self.table.len()).find(|&i| self.table.policy_at(i).name() == name)
    }

    /// Forgets what this instance remembers of `identity` under the policy
    /// at `index` (under every policy when `None`): cached denials and
    /// leases.
    fn forget(&self, identity: &str, index: Option<usize>) {
        self.deny_cache.forget(identity, index);
        if let Ok(mut m) = self.leases.lock() {
            m.retain(|k, _| !entry_of(k, identity, index));
        }
    }

    /// Forgets every cached denial and lease: the next requests ask Redis.
    fn forget_all(&self) {
        self.deny_cache.clear();
        if let Ok(mut m) = self.leases.lock() {
            m.clear();
        }
    }

    /// What the reset subscription heard: a reset (made here or on another
    /// instance), or that resets may have been missed.
    fn heard(&self, notice: Notice<'_>) {
        match notice {
            Notice::Message(payload) => match serde_json::from_slice::<ResetMessage>(payload) {
                Ok(m) => {
                    // A policy this table does not have (another version's
                    // table): everything of that identity.
                    let index = self.policy_index(&m.policy);
                    if let Some(i) = index {
                        self.memory.reset(i, &m.key);
                    }
                    self.forget(&m.key, index);
                }
                // A message from a newer version.
                Err(_) => self.forget_all(),
            },
            // Only the cached denials: a denial a missed reset lifted
            // would go on refusing requests Redis admits. A lease is kept:
            // its tokens were taken from Redis, and spending them is within
            // the lease mode's bound (`chunk × instances`) whether or not a
            // reset came since; dropping them would only waste them (this
            // notice also comes when the subscription first connects).
            Notice::Missed => self.deny_cache.clear(),
        }
    }
}

/// Whether `key`, an entry of the deny cache or of the lease map
/// (`identity|i|j…`), belongs to `identity` and to a list of policies that
/// includes the one at `index` (any list when `None`). An identity that
/// itself contains `|` may be taken for another one: that only forgets
/// more, which costs a Redis round trip.
fn entry_of(key: &str, identity: &str, index: Option<usize>) -> bool {
    let Some(rest) = key.strip_prefix(identity).and_then(|r| r.strip_prefix('|')) else {
        return false;
    };
    match index {
        None => true,
        Some(i) => rest
            .split('|')
            .any(|p| p.parse::<usize>().map_or(true, |p| p == i)),
    }
}

/// How many keys may hold a lease (or a lease request) at once.
const MAX_LEASES: usize = 100_000;

/// One instance's lease of one (policies, identity): tokens taken from
/// Redis, spent locally until `until`.
struct Lease {
    tokens: u64,
    until: Instant,
    /// Redis's report when the lease was taken.
    report: Option<Report>,
    /// Redis refused a chunk: decide exactly until then.
    exact_until: Option<Instant>,
    /// The lease request in flight, if any; requests wait on it.
    flight: Option<tokio::sync::watch::Receiver<FlightEnd>>,
}

impl Lease {
    fn empty() -> Self {
        Lease {
            tokens: 0,
            until: Instant::now(),
            report: None,
            exact_until: None,
            flight: None,
        }
    }

    /// Whether the entry still matters (memory bound).
    fn live(&self, now: Instant) -> bool {
        self.until > now || self.flight.is_some() || self.exact_until.is_some_and(|t| t > now)
    }
}

/// How a lease request ended, for the requests waiting on it.
#[derive(Debug)]
enum FlightEnd {
    Pending,
    Done,
    Failed(tollgate_redis::Error),
}

/// What a request does next in lease mode.
enum LeaseStep<'a> {
    /// Spent from this instance's lease.
    Spent(Report),
    /// Wait for the lease request in flight.
    Wait(tokio::sync::watch::Receiver<FlightEnd>),
    /// Take a chunk: this request is the only one in flight for the key.
    Lead(Flight<'a>),
    /// Decide exactly.
    Exact,
}

/// The one lease request in flight for a key. Dropping it (answered,
/// failed, or its caller went away) updates the slot, then wakes the
/// waiters.
struct Flight<'a> {
    leases: &'a Mutex<RequestMap<String, Lease>>,
    key: String,
    tx: tokio::sync::watch::Sender<FlightEnd>,
    lease: Option<Lease>,
    end: Option<FlightEnd>,
}

impl Flight<'_> {
    /// Redis granted a chunk. It replaces whatever was left (fewer tokens
    /// than a request costs): an instance never holds more than one chunk
    /// per key, which is what bounds the overshoot.
    fn granted(mut self, lease: Lease) {
        self.lease = Some(lease);
        self.end = Some(FlightEnd::Done);
    }

    /// Redis refused a chunk: exact decisions until `until`.
    fn denied(mut self, until: Instant) {
        let mut l = Lease::empty();
        l.exact_until = Some(until);
        self.lease = Some(l);
        self.end = Some(FlightEnd::Done);
    }

    /// Redis failed: the waiters fail the same way (no retry per waiter).
    fn failed(mut self, e: tollgate_redis::Error) {
        self.end = Some(FlightEnd::Failed(e));
    }
}

impl Drop for Flight<'_> {
    fn drop(&mut self) {
        let Ok(mut m) = self.leases.lock() else {
            return;
        };
        match self.lease.take() {
            Some(l) => {
                m.insert(std::mem::take(&mut self.key), l);
            }
            None => {
                if let Some(l) = m.get_mut(&self.key) {
                    l.flight = None;
                }
            }
        }
        // Under the lock, so a woken waiter sees the updated slot. Without
        // an end (the leader was dropped) the sender's drop wakes them.
        if let Some(end) = self.end.take() {
            self.tx.send_replace(end);
        }
    }
}

/// The rate limiter shared by every clone of the layer: the policy table,
/// the Redis store with its in-process fallback, the key extractor. Cheap
/// to clone; also the handle for admin operations.
#[derive(Clone)]
pub struct RateLimiter {
    pub(crate) inner: Arc<Inner>,
}

impl std::fmt::Debug for RateLimiter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RateLimiter")
            .field("table", &self.inner.table)
            .field("redis", &self.inner.redis.as_ref().map(|r| &r.handle))
            .finish_non_exhaustive()
    }
}

/// What the synchronous part of a check found.
pub(crate) enum Prepared {
    /// No policy applies.
    Pass,
    /// No key: refuse with this status.
    NoKey(StatusCode),
    /// Decide these.
    Check(Pending),
}

/// An owned, ready-to-decide request.
#[derive(Clone, Debug)]
pub(crate) struct Pending {
    pub route: Arc<str>,
    pub identity: String,
    pub checks: Checks,
    pub grpc: bool,
    /// When the decision began: the one clock reading a decision takes
    /// (its latency, the deny cache's and the lease's "now").
    pub started: Instant,
}

impl RateLimiter {
    /// A builder over `table`.
    pub fn builder(table: PolicyTable) -> RateLimiterBuilder {
        RateLimiterBuilder {
            table,
            redis: None,
            extractor: Arc::new(PeerIp::new()),
            missing: MissingKey::default(),
            shadow: false,
            headers: HeaderOptions {
                legacy: true,
                policy: false,
                ietf: false,
            },
            deny_cache: 10_000,
            divisor: 1,
            housekeeping: Duration::from_secs(60),
            coalesce: CoalesceConfig::default(),
            exceeds_status: StatusCode::BAD_REQUEST,
            test_now: None,
            lease: 0,
        }
    }

    /// The policy table.
    pub fn table(&self) -> &PolicyTable {
        &self.inner.table
    }

    /// Finds the route, the policies, the identity and the cost.
    pub(crate) fn prepare(&self, view: &RequestView<'_>) -> Prepared {
        let inner = &self.inner;
        let id = RouteId {
            template: matched_path(view.extensions),
            path: view.uri.path(),
            method: view.method,
        };
        let Some(resolved) = inner.table.resolve(&id) else {
            return Prepared::Pass;
        };
        let plan = view.extensions.get::<Plan>().map(|p| p.0.as_str());
        let cost = view.extensions.get::<Cost>().map_or(resolved.cost, |c| c.0);
        let checks: Checks = resolved
            .policies
            .iter()
            .filter_map(|&index| {
                let p = inner.table.policy_at(index);
                let quota = p.quota_for(plan)?;
                Some(PolicyCheck {
                    index,
                    quota,
                    algorithm: p.algorithm,
                    cost,
                    shadow: p.shadow || inner.shadow,
                })
            })
            .collect();
        if checks.is_empty() {
            return Prepared::Pass;
        }
        let identity = match inner.extractor.key(view) {
            Some(k) => k,
            None => match &inner.missing {
                MissingKey::Reject(s) => return Prepared::NoKey(*s),
                MissingKey::Allow => return Prepared::Pass,
                MissingKey::Shared(k) => k.clone(),
            },
        };
        Prepared::Check(Pending {
            route: resolved.route,
            identity,
            checks,
            grpc: is_grpc(view.headers),
            started: Instant::now(),
        })
    }

    /// Checks a request without serving it: the report of what the layer
    /// would do (and the quota it consumed). `None` when no policy applies.
    pub async fn check<B>(&self, req: &http::Request<B>) -> Option<Report> {
        match self.prepare(&RequestView::of(req)) {
            Prepared::Check(p) => Some(self.decide(&p).await),
            _ => None,
        }
    }

    /// Decides a prepared request without waiting, when that is possible:
    /// no Redis configured, the breaker open (fallback), the deny cache
    /// or this instance's lease answers. `None`: Redis must be asked
    /// ([`decide`](Self::decide)).
    pub(crate) fn decide_now(&self, p: &Pending) -> Option<Report> {
        let started = p.started;
        let inner = &self.inner;
        if let Some(hit) = inner.deny_cache.get(&p.identity, &p.checks, started) {
            self.deny_cache_hit(p, &hit, started);
            return Some(hit);
        }
        let (report, store) = match &inner.redis {
            None => (self.decide_memory(p, Source::Memory), Store::Memory),
            Some(r) if !r.handle.is_available() => (self.decide_degraded(p), Store::Fallback),
            Some(_) => {
                let chunk = self.lease_chunk(p);
                if chunk == 0 {
                    return None;
                }
                let spent = DenyCache::with_entry_key(&p.identity, &p.checks, |key| {
                    self.lease_spend(key, p, chunk)
                });
                (spent?, Store::Redis)
            }
        };
        self.record(p, &report, started, store);
        Some(report)
    }

    fn deny_cache_hit(&self, p: &Pending, hit: &Report, started: Instant) {
        telemetry::deny_cache_hit(&p.route);
        self.record(p, hit, started, Store::DenyCache);
    }

    /// Decides a prepared request.
    pub(crate) async fn decide(&self, p: &Pending) -> Report {
        match self.decide_now(p) {
            Some(report) => report,
            None => self.decide_remote(p).await,
        }
    }

    /// The part of a decision that waits for Redis, for a request
    /// [`decide_now`](Self::decide_now) could not answer.
    pub(crate) async fn decide_remote(&self, p: &Pending) -> Report {
        let started = p.started;
        let inner = &self.inner;
        let seen = inner.deny_cache.generation();
        let (report, store) = match &inner.redis {
            None => (self.decide_memory(p, Source::Memory), Store::Memory),
            Some(r) => match self.decide_redis(r, p).await {
                Ok(report) => (report, Store::Redis),
                Err(e) => {
                    tracing::debug!(error = %e, route = %p.route, "rate limit: Redis unavailable, using fallback");
                    (self.decide_degraded(p), Store::Fallback)
                }
            },
        };
        if store == Store::Redis && report.verdict == RequestVerdict::Deny {
            inner
                .deny_cache
                .insert(&p.identity, &p.checks, &report, started, seen);
        }
        self.record(p, &report, started, store);
        report
    }

    fn record(&self, p: &Pending, report: &Report, started: Instant, store: Store) {
        for d in &report.decisions {
            telemetry::decision(&d.policy, &p.route, d.outcome);
            if matches!(d.source, Source::Memory | Source::FailOpen) && store == Store::Fallback {
                telemetry::fallback(&d.policy, &p.route);
            }
            if d.outcome == Outcome::ShadowDenied {
                tracing::info!(policy = %d.policy, route = %p.route, "rate limit would deny (shadow mode)");
            }
        }
        telemetry::latency(store, started.elapsed().as_secs_f64());
    }

    fn redis_item(&self, r: &RedisBackend, p: &Pending) -> Item {
        let keys: Vec<String> = p
            .checks
            .iter()
            .map(|c| {
                let policy = self.inner.table.policy_at(c.index);
                let name = policy.name();
                match window_part(policy, c.algorithm, &c.quota) {
                    None => r.keys.tagged(&p.identity, &[name]),
                    Some(part) => r.keys.tagged(&p.identity, &[name, &part]),
                }
            })
            .collect();
        let slot = keys.first().map_or(0, |k| tollgate_redis::slot(k));
        Item {
            keys,
            checks: p.checks.clone(),
            slot,
        }
    }

    async fn decide_redis(
        &self,
        r: &RedisBackend,
        p: &Pending,
    ) -> Result<Report, tollgate_redis::Error> {
        if !r.handle.is_available() {
            return Err(tollgate_redis::Error::Unavailable);
        }
        let chunk = self.lease_chunk(p);
        if chunk > 0 {
            // Waiting for another request's lease counts against the same
            // deadline as a Redis call of our own.
            // Boxed: a wait for a lease is rare, and inline its state
            // would make every exact decision's future too large for the
            // allocator's per-thread cache (over 1 KiB).
            let deadline = r.handle.deadline();
            return tokio::time::timeout(deadline, Box::pin(self.decide_leased(r, p, chunk)))
                .await
                .unwrap_or(Err(tollgate_redis::Error::Timeout(deadline)));
        }
        let verdicts = r.coalescer.submit(self.redis_item(r, p)).await?;
        Ok(self.report(p, &verdicts, Source::Redis))
    }

    /// The chunk to lease for `p`, 0 when lease mode does not apply.
    fn lease_chunk(&self, p: &Pending) -> u32 {
        let chunk = self.inner.lease;
        if chunk == 0
            || p.checks
                .iter()
                .any(|c| c.algorithm != crate::Algorithm::Gcra)
        {
            return 0;
        }
        let cost = p.checks[0].cost;
        let table = &self.inner.table;
        // A policy several lists share gets an equal part of the chunk in
        // each list's lease, so its leases together stay within one chunk.
        let chunk = p
            .checks
            .iter()
            .map(|c| c.quota.burst().min(chunk / table.lease_sets(c.index)))
            .min()
            .unwrap_or(0);
        if cost == 0 || chunk <= cost { 0 } else { chunk }
    }

    /// Lease mode. Each instance keeps at most one lease request per
    /// (policies, identity) in flight: concurrent requests for that key wait
    /// for it and spend from it rather than each taking a chunk of their own
    /// (which let one instance hoard several chunks under a cold burst and
    /// broke the `chunk × instances` bound).
    async fn decide_leased(
        &self,
        r: &RedisBackend,
        p: &Pending,
        chunk: u32,
    ) -> Result<Report, tollgate_redis::Error> {
        let key = DenyCache::entry_key(&p.identity, &p.checks);
        let cost = u64::from(p.checks[0].cost);
        loop {
            match self.lease_step(&key, p, chunk) {
                LeaseStep::Spent(report) => return Ok(report),
                LeaseStep::Exact => break,
                LeaseStep::Wait(mut rx) => {
                    // `Err` means the leader was dropped (its caller went
                    // away) without an answer: try again, maybe as leader.
                    if rx.changed().await.is_ok()
                        && let FlightEnd::Failed(e) = &*rx.borrow()
                    {
                        return Err(e.clone());
                    }
                }
                LeaseStep::Lead(flight) => {
                    let mut leased = Pending {
                        route: p.route.clone(),
                        identity: p.identity.clone(),
                        checks: p.checks.clone(),
                        grpc: p.grpc,
                        started: p.started,
                    };
                    for c in &mut leased.checks {
                        c.cost = chunk;
                    }
                    let verdicts = match r.coalescer.submit(self.redis_item(r, &leased)).await {
                        Ok(v) => v,
                        Err(e) => {
                            flight.failed(e.clone());
                            return Err(e);
                        }
                    };
                    let report = self.report(&leased, &verdicts, Source::Redis);
                    if report.allowed() {
                        let left = u64::from(chunk) - cost;
                        flight.granted(Lease {
                            tokens: left,
                            until: Instant::now() + lease_life(p, chunk),
                            report: Some(report.clone()),
                            exact_until: None,
                            flight: None,
                        });
                        return Ok(self.lease_report(report, left, Source::Redis));
                    }
                    // No chunk until Redis says one conforms: until then
                    // this key is decided exactly (one coalesced call per
                    // request, no doomed chunk request first).
                    flight.denied(Instant::now() + Duration::from_micros(retry_of(&report)));
                    break;
                }
            }
        }
        let verdicts = r.coalescer.submit(self.redis_item(r, p)).await?;
        Ok(self.report(p, &verdicts, Source::Redis))
    }

    /// Spends the request's cost from this instance's live lease of `key`,
    /// if it holds enough.
    fn lease_spend(&self, key: &str, p: &Pending, chunk: u32) -> Option<Report> {
        let mut m = self.inner.leases.lock().ok()?;
        // Called right after the request was prepared, without waiting:
        // its reading of the clock is current.
        self.spend(m.get_mut(key)?, key, p, chunk, p.started)
    }

    /// Spends from `l` (live, holding enough), starting a top-up when due.
    fn spend(
        &self,
        l: &mut Lease,
        key: &str,
        p: &Pending,
        chunk: u32,
        now: Instant,
    ) -> Option<Report> {
        let cost = u64::from(p.checks[0].cost);
        if l.until <= now || l.tokens < cost {
            return None;
        }
        // Rebuilt rather than cloned: the stored report's `Arc`s are shared
        // by every worker thread spending from this lease.
        let stored = l.report.as_ref()?;
        let report = Report {
            route: p.route.clone(),
            verdict: stored.verdict.clone(),
            decisions: stored.decisions.iter().map(Decision::local_copy).collect(),
        };
        l.tokens -= cost;
        self.maybe_renew(l, key, p, chunk, now);
        Some(self.lease_report(report, l.tokens, Source::Lease))
    }

    /// Tops the lease up in the background once three quarters of it are
    /// spent, so that requests keep spending while the next tokens are on
    /// their way instead of waiting for them. The top-up asks only for what
    /// was spent (`chunk` minus what is left), so the instance never holds
    /// more than one chunk: the `chunk × instances` bound stands.
    fn maybe_renew(&self, l: &mut Lease, key: &str, p: &Pending, chunk: u32, now: Instant) {
        let chunk64 = u64::from(chunk);
        if l.flight.is_some() || l.tokens * 4 >= chunk64 || l.exact_until.is_some_and(|t| t > now) {
            return;
        }
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let want = u32::try_from(chunk64 - l.tokens).unwrap_or(chunk);
        let (tx, rx) = tokio::sync::watch::channel(FlightEnd::Pending);
        l.flight = Some(rx);
        let limiter = self.clone();
        let (key, p) = (key.to_owned(), p.clone());
        rt.spawn(async move { limiter.top_up(key, p, want, tx).await });
    }

    /// The background top-up started by [`maybe_renew`](Self::maybe_renew).
    async fn top_up(
        &self,
        key: String,
        p: Pending,
        want: u32,
        tx: tokio::sync::watch::Sender<FlightEnd>,
    ) {
        let Some(r) = &self.inner.redis else { return };
        let mut leased = p;
        for c in &mut leased.checks {
            c.cost = want;
        }
        // `submit` keeps the handle's deadline.
        let answer = r.coalescer.submit(self.redis_item(r, &leased)).await;
        let Ok(mut m) = self.inner.leases.lock() else {
            return;
        };
        let now = Instant::now();
        let end = match answer {
            Ok(verdicts) => {
                let report = self.report(&leased, &verdicts, Source::Redis);
                if let Some(l) = m.get_mut(&key) {
                    if report.allowed() {
                        l.tokens += u64::from(want);
                        l.until = now + lease_life(&leased, want);
                        l.report = Some(report);
                    } else {
                        // Redis refused: spend what is left, then decide
                        // exactly until a chunk would conform again.
                        l.exact_until = Some(now + Duration::from_micros(retry_of(&report)));
                    }
                }
                FlightEnd::Done
            }
            Err(e) => FlightEnd::Failed(e),
        };
        if let Some(l) = m.get_mut(&key) {
            l.flight = None;
        }
        // Under the lock, so a woken waiter sees the updated slot.
        tx.send_replace(end);
    }

    /// The synchronous part of lease mode: spend, wait, lead or go exact.
    fn lease_step(&self, key: &str, p: &Pending, chunk: u32) -> LeaseStep<'_> {
        let Ok(mut m) = self.inner.leases.lock() else {
            return LeaseStep::Exact;
        };
        let now = Instant::now();
        if let Some(l) = m.get_mut(key) {
            if let Some(report) = self.spend(l, key, p, chunk, now) {
                return LeaseStep::Spent(report);
            }
            if let Some(rx) = &l.flight {
                return LeaseStep::Wait(rx.clone());
            }
            if l.exact_until.is_some_and(|t| t > now) {
                return LeaseStep::Exact;
            }
        } else if m.len() >= MAX_LEASES {
            m.retain(|_, l| l.live(now));
            if m.len() >= MAX_LEASES {
                // Bounded memory: past this many live keys, decide exactly.
                return LeaseStep::Exact;
            }
        }
        let (tx, rx) = tokio::sync::watch::channel(FlightEnd::Pending);
        let l = m.entry(key.to_owned()).or_insert_with(Lease::empty);
        l.flight = Some(rx);
        LeaseStep::Lead(Flight {
            leases: &self.inner.leases,
            key: key.to_owned(),
            tx,
            lease: None,
            end: None,
        })
    }

    /// A lease's report: what Redis had left, plus what this instance
    /// still holds.
    fn lease_report(&self, mut report: Report, left: u64, source: Source) -> Report {
        for d in &mut report.decisions {
            d.remaining = (d.remaining + left).min(d.limit);
            d.source = source;
        }
        report
    }

    fn decide_memory(&self, p: &Pending, source: Source) -> Report {
        let verdicts = self.inner.memory.decide(&p.identity, &p.checks);
        self.report(p, &verdicts, source)
    }

    /// Redis is down: each policy follows its failure mode.
    fn decide_degraded(&self, p: &Pending) -> Report {
        let table = &self.inner.table;
        let closed = p
            .checks
            .iter()
            .any(|c| table.policy_at(c.index).failure == FailureMode::FailClosed && !c.shadow);
        let fallback: Vec<PolicyCheck> = p
            .checks
            .iter()
            .filter(|c| table.policy_at(c.index).failure == FailureMode::Fallback)
            .cloned()
            .collect();
        let mut verdicts = self.inner.memory.decide(&p.identity, &fallback).into_iter();
        let decisions: Vec<Decision> = p
            .checks
            .iter()
            .map(|c| {
                let policy = table.policy_at(c.index);
                match policy.failure {
                    FailureMode::Fallback => match verdicts.next() {
                        Some(v) => Decision::from_verdict(
                            &policy.name,
                            &c.quota,
                            c.algorithm,
                            v,
                            Source::Memory,
                        ),
                        None => Decision::fail_open(&policy.name, &c.quota, c.algorithm),
                    },
                    _ => Decision::fail_open(&policy.name, &c.quota, c.algorithm),
                }
                .in_shadow(c.shadow)
            })
            .collect();
        let mut report = Report {
            route: p.route.clone(),
            verdict: verdict_of(&decisions),
            decisions,
        };
        if closed {
            report.verdict = RequestVerdict::Unavailable;
        }
        report
    }

    fn report(&self, p: &Pending, verdicts: &[Verdict], source: Source) -> Report {
        let decisions: Vec<Decision> = p
            .checks
            .iter()
            .zip(verdicts)
            .map(|(c, v)| {
                let policy = self.inner.table.policy_at(c.index);
                let mut v = *v;
                if c.shadow && v.status != Status::Allowed {
                    v.status = Status::ShadowDenied;
                }
                Decision::from_verdict(&policy.name, &c.quota, c.algorithm, v, source)
                    .in_shadow(c.shadow)
            })
            .collect();
        Report {
            route: p.route.clone(),
            verdict: verdict_of(&decisions),
            decisions,
        }
    }

    fn admin_pending(&self, policy: &str, key: &str, cost: u32) -> Result<Pending, Error> {
        let index = self
            .inner
            .policy_index(policy)
            .ok_or_else(|| Error::UnknownPolicy(policy.to_owned()))?;
        let p = self.inner.table.policy_at(index);
        Ok(Pending {
            route: Arc::from("admin"),
            identity: key.to_owned(),
            checks: smallvec::smallvec![PolicyCheck {
                index,
                quota: p.quota,
                algorithm: p.algorithm,
                cost,
                shadow: false,
            }],
            grpc: false,
            started: Instant::now(),
        })
    }

    /// The state of `policy` for the identity `key` (as the key extractor
    /// produces it, e.g. `ip:1.2.3.4`), consuming nothing. Uses the
    /// policy's default quota. In the fallback, GCRA peeks report the full
    /// capacity (governor cannot peek).
    pub async fn peek(&self, policy: &str, key: &str) -> Result<Decision, Error> {
        let p = self.admin_pending(policy, key, 0)?;
        let report = match &self.inner.redis {
            Some(r) => {
                let item = self.redis_item(r, &p);
                let (keys, args) = crate::store::redis::encode(std::slice::from_ref(&item), None);
                let reply: Vec<i64> = r
                    .handle
                    .eval(&crate::store::redis::SCRIPT, keys, args)
                    .await?;
                let v = crate::store::redis::decode(std::slice::from_ref(&item), &reply)?;
                self.report(
                    &p,
                    v.first().map_or(&[][..], |v| v.as_slice()),
                    Source::Redis,
                )
            }
            None => self.decide_memory(&p, Source::Memory),
        };
        report
            .decisions
            .into_iter()
            .next()
            .ok_or_else(|| Error::UnknownPolicy(policy.to_owned()))
    }

    /// Forgets the state of `policy` for the identity `key`: the next
    /// request starts with a full quota. Clears this instance's cached
    /// denials and leases of that identity under the policy, and the
    /// in-process fallback's state of it.
    ///
    /// With Redis, once the key is deleted the reset is broadcast over
    /// Redis pub/sub to every limiter on that Redis and namespace, and each
    /// clears the same local state when the message arrives. A broadcast that
    /// fails is logged at warn and the reset still succeeds: an instance
    /// that did not hear it keeps answering the identity from its deny
    /// cache until the retry time it cached (at most the denial's
    /// `Retry-After`), and spends a lease it holds until the lease runs
    /// out. An instance whose subscription was cut off clears all of its
    /// cached denials when it is back, since it may have missed resets
    /// (its leases stay: spending them is within the lease bound).
    pub async fn reset(&self, policy: &str, key: &str) -> Result<(), Error> {
        let p = self.admin_pending(policy, key, 0)?;
        let index = p.checks[0].index;
        self.inner.forget(key, Some(index));
        self.inner.memory.reset(index, key);
        if let Some(r) = &self.inner.redis {
            // The policy's key, and those of its plans' other windows: exact
            // keys, one command.
            let p = self.inner.table.policy_at(index);
            let mut keys = vec![r.keys.tagged(key, &[policy])];
            for (_, plan) in &p.plans {
                if let crate::policy::PlanQuota::Limited(q) = plan
                    && let Some(part) = window_part(p, p.algorithm, q)
                {
                    keys.push(r.keys.tagged(key, &[policy, &part]));
                }
            }
            r.handle
                .call(|c| async move {
                    use tollgate_redis::fred::interfaces::KeysInterface;
                    c.del::<i64, _>(keys).await
                })
                .await?;
            self.broadcast_reset(policy, key).await;
        }
        Ok(())
    }

    /// Tells the other instances of a reset (see [`reset`](Self::reset)).
    async fn broadcast_reset(&self, policy: &str, key: &str) {
        let Some(resets) = &self.inner.resets else {
            return;
        };
        let message = ResetMessage {
            policy: policy.to_owned(),
            key: key.to_owned(),
        };
        let Ok(message) = serde_json::to_vec(&message) else {
            return;
        };
        if let Err(e) = resets.publish(message).await {
            tracing::warn!(error = %e, policy, "rate limit: could not broadcast a reset; other instances forget their cached denials of this identity by their retry time");
        }
    }

    /// Whether this instance hears the resets made on other instances (its
    /// subscription on Redis is up). Always true without Redis.
    pub fn is_listening(&self) -> bool {
        self.inner.redis.is_none()
            || self
                .inner
                .resets
                .as_ref()
                .is_some_and(Subscription::is_listening)
    }
}

/// The extra key part of a window policy checked with a plan's quota whose
/// window is not the policy's own (`w<period µs>`): such a plan counts in a
/// key of its own, since one window state read with another length is
/// taken for an old one and starts over. `None` for the policy's own
/// window and for GCRA, whose state is a time that any quota reads alike.
fn window_part(
    policy: &crate::policy::Policy,
    algorithm: crate::Algorithm,
    quota: &crate::Quota,
) -> Option<String> {
    (algorithm != crate::Algorithm::Gcra && quota.period() != policy.quota.period())
        .then(|| format!("w{}", quota.period_us()))
}

/// Shortest life of a lease: a chunk of a generous quota (1,000,000/s, say)
/// would otherwise be spendable for a millisecond only, and every instance
/// would ask Redis for tokens every few requests. Holding tokens longer does
/// not loosen the bound: an instance holds at most one chunk at any moment,
/// so in any window at most `chunk × instances` requests beyond what Redis
/// admits are let through, however long a chunk lives.
const MIN_LEASE_LIFE: Duration = Duration::from_secs(1);

/// How long a lease of `n` tokens for `p` may be spent: `n × T` of its
/// tightest policy, and at least [`MIN_LEASE_LIFE`].
fn lease_life(p: &Pending, n: u32) -> Duration {
    let us = p
        .checks
        .iter()
        .map(|c| c.quota.t_us().saturating_mul(u64::from(n)))
        .min()
        .unwrap_or(0);
    Duration::from_micros(us).max(MIN_LEASE_LIFE)
}

/// How long until every denying policy of `report` conforms again (µs).
fn retry_of(report: &Report) -> u64 {
    report
        .decisions
        .iter()
        .filter(|d| d.outcome == Outcome::Denied)
        .map(|d| d.retry_us)
        .max()
        .unwrap_or(0)
}

fn verdict_of(decisions: &[Decision]) -> RequestVerdict {
    if decisions
        .iter()
        .any(|d| d.outcome == Outcome::ExceedsCapacity)
    {
        RequestVerdict::ExceedsCapacity
    } else if decisions.iter().any(|d| d.outcome == Outcome::Denied) {
        RequestVerdict::Deny
    } else {
        RequestVerdict::Allow
    }
}

/// Identities Redis denied, until the time Redis gave: answered locally.
struct DenyCache {
    capacity: usize,
    /// Whether the map may hold anything: lets the common case (nobody
    /// denied) skip the lock.
    used: std::sync::atomic::AtomicBool,
    map: Mutex<RequestMap<String, CachedDenial>>,
    /// Moves (under the map's lock) whenever denials are forgotten (a
    /// reset, here or heard from another instance): a denial Redis decided
    /// before that is not cached when its answer comes after it.
    forgotten: std::sync::atomic::AtomicU64,
}

struct CachedDenial {
    policies: Vec<usize>,
    cost: u32,
    /// When the denied request began: the report's times count from then.
    at: Instant,
    until: Instant,
    report: Report,
}

impl DenyCache {
    fn new(capacity: usize) -> Self {
        DenyCache {
            capacity,
            used: std::sync::atomic::AtomicBool::new(false),
            map: Mutex::new(RequestMap::default()),
            forgotten: std::sync::atomic::AtomicU64::new(0),
        }
    }

    /// How many times denials were forgotten so far: taken before a
    /// decision is sent, and handed back to [`insert`](Self::insert).
    fn generation(&self) -> u64 {
        self.forgotten.load(std::sync::atomic::Ordering::Acquire)
    }

    fn entry_key(identity: &str, checks: &[PolicyCheck]) -> String {
        let mut k = String::with_capacity(identity.len() + 8);
        Self::write_entry_key(&mut k, identity, checks);
        k
    }

    fn write_entry_key(k: &mut String, identity: &str, checks: &[PolicyCheck]) {
        k.push_str(identity);
        for c in checks {
            use std::fmt::Write as _;
            let _ = write!(k, "|{}", c.index);
        }
    }

    /// Runs `f` on the entry key of `(identity, checks)`, built in this
    /// thread's buffer: a lookup allocates nothing.
    fn with_entry_key<T>(identity: &str, checks: &[PolicyCheck], f: impl FnOnce(&str) -> T) -> T {
        thread_local! {
            static BUF: std::cell::RefCell<String> = const { std::cell::RefCell::new(String::new()) };
        }
        BUF.with(|buf| match buf.try_borrow_mut() {
            Ok(mut k) => {
                k.clear();
                Self::write_entry_key(&mut k, identity, checks);
                f(&k)
            }
            // Re-entered from `f` (never on the request path): a key of
            // its own.
            Err(_) => f(&Self::entry_key(identity, checks)),
        })
    }

    fn get(&self, identity: &str, checks: &[PolicyCheck], now: Instant) -> Option<Report> {
        if self.capacity == 0 || !self.used.load(std::sync::atomic::Ordering::Relaxed) {
            return None;
        }
        let cost = checks.first().map_or(0, |c| c.cost);
        if cost == 0 {
            return None;
        }
        let mut map = self.map.lock().ok()?;
        let (mut report, left, elapsed) = Self::with_entry_key(identity, checks, |key| {
            let e = map.get(key)?;
            if e.until <= now {
                map.remove(key);
                return None;
            }
            // Only the same cost: a cheaper request may conform earlier
            // than the cached one, a dearer one later (or never: more than
            // the capacity is its own answer, which Redis gives).
            if cost != e.cost || e.policies.len() != checks.len() {
                return None;
            }
            let left = u64::try_from((e.until - now).as_micros()).unwrap_or(u64::MAX);
            let elapsed = u64::try_from((now - e.at).as_micros()).unwrap_or(u64::MAX);
            Some((e.report.clone(), left, elapsed))
        })?;
        drop(map);
        for d in &mut report.decisions {
            d.source = Source::DenyCache;
            // The reset counts down from when the denial was cached.
            d.reset_us = d.reset_us.saturating_sub(elapsed);
            d.reset = crate::quota::ceil_secs(d.reset_us);
            if d.outcome == Outcome::Denied {
                d.retry_us = left.min(d.retry_us);
                d.retry_after = Some(crate::quota::ceil_secs(d.retry_us).max(1));
            }
        }
        Some(report)
    }

    /// `started` is when the request began, which is no later than the
    /// moment Redis decided: the entry never outlives Redis's own answer.
    /// `seen` is the [`generation`](Self::generation) taken before the
    /// decision was sent: if denials were forgotten since (a reset that
    /// may have come after Redis decided), the denial is not cached.
    fn insert(
        &self,
        identity: &str,
        checks: &[PolicyCheck],
        report: &Report,
        started: Instant,
        seen: u64,
    ) {
        if self.capacity == 0 {
            return;
        }
        let Some(retry) = report
            .decisions
            .iter()
            .filter(|d| d.outcome == Outcome::Denied)
            .map(|d| d.retry_us)
            // Every denying policy must conform first.
            .max()
        else {
            return;
        };
        let until = started + Duration::from_micros(retry);
        let Ok(mut map) = self.map.lock() else { return };
        if self.forgotten.load(std::sync::atomic::Ordering::Relaxed) != seen {
            return;
        }
        if map.len() >= self.capacity {
            let now = Instant::now();
            map.retain(|_, e| e.until > now);
            if map.len() >= self.capacity {
                return;
            }
        }
        self.used.store(true, std::sync::atomic::Ordering::Relaxed);
        map.insert(
            Self::entry_key(identity, checks),
            CachedDenial {
                policies: checks.iter().map(|c| c.index).collect(),
                cost: checks.first().map_or(1, |c| c.cost),
                at: started,
                until,
                report: report.clone(),
            },
        );
    }

    /// Forgets `identity`'s denials by lists of policies that include the
    /// one at `index` (every list when `None`).
    fn forget(&self, identity: &str, index: Option<usize>) {
        self.forgetting()
            .retain(|k, _| !entry_of(k, identity, index));
    }

    /// Forgets every denial.
    fn clear(&self) {
        self.forgetting().clear();
    }

    /// The map, locked for forgetting denials: the generation moves under
    /// the lock, so an insert either lands before (and is forgotten) or
    /// sees the new generation.
    fn forgetting(&self) -> std::sync::MutexGuard<'_, RequestMap<String, CachedDenial>> {
        let map = self
            .map
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        self.forgotten
            .fetch_add(1, std::sync::atomic::Ordering::Release);
        map
    }
}

#[cfg(test)]
mod future_size {
    use super::{Pending, RateLimiter};

    fn output_size<F>(_: fn(&'static RateLimiter, &'static Pending) -> F) -> usize {
        std::mem::size_of::<F>()
    }

    /// A request that waits for Redis boxes this future (with the request
    /// it holds). glibc serves allocations up to 1,032 bytes from a
    /// per-thread cache, a larger one from its shared heap, so the rare
    /// wait for a lease is boxed on its own rather than kept inline (it
    /// took this future to 1 KiB by itself).
    #[test]
    fn a_redis_decision_future_is_small() {
        let size = output_size(RateLimiter::decide_remote);
        assert!(size <= 512, "decide_remote: {size} bytes");
    }
}

#[cfg(test)]
mod deny_cache_tests {
    use std::sync::Arc;
    use std::time::{Duration, Instant};

    use super::DenyCache;
    use crate::decision::{Decision, Report, RequestVerdict, Source};
    use crate::quota::{Algorithm, Quota, Status, Verdict};
    use crate::store::PolicyCheck;

    fn checks(cost: u32) -> Vec<PolicyCheck> {
        vec![PolicyCheck {
            index: 0,
            quota: Quota::per_minute(5),
            algorithm: Algorithm::FixedWindow,
            cost,
            shadow: false,
        }]
    }

    /// A fixed window of 5 per minute, denied with 50 s of it left.
    pub(super) fn denial() -> Report {
        let v = Verdict {
            status: Status::Denied,
            remaining: 0,
            reset_us: 50_000_000,
            retry_us: 50_000_000,
        };
        let name: Arc<str> = Arc::from("api");
        Report {
            route: Arc::from("/"),
            verdict: RequestVerdict::Deny,
            decisions: vec![Decision::from_verdict(
                &name,
                &Quota::per_minute(5),
                Algorithm::FixedWindow,
                v,
                Source::Redis,
            )],
        }
    }

    /// A cached denial's `Reset` counts down with its `Retry-After`
    /// instead of repeating what Redis said when it was cached.
    #[test]
    fn a_cached_denial_counts_down() {
        let cache = DenyCache::new(8);
        let at = Instant::now();
        cache.insert("ip:1", &checks(1), &denial(), at, cache.generation());
        let hit = cache
            .get("ip:1", &checks(1), at + Duration::from_secs(20))
            .expect("cached");
        let d = &hit.decisions[0];
        assert_eq!((d.reset, d.retry_after), (30, Some(30)));
        assert_eq!(d.source, Source::DenyCache);
    }

    /// A denial decided before a reset whose answer comes after it is not
    /// cached: the reset may have deleted the state Redis denied on.
    #[test]
    fn a_denial_decided_before_a_forget_is_not_cached() {
        let cache = DenyCache::new(8);
        let at = Instant::now();
        let seen = cache.generation();
        cache.forget("ip:9", None);
        cache.insert("ip:1", &checks(1), &denial(), at, seen);
        assert!(cache.get("ip:1", &checks(1), at).is_none());
        cache.insert("ip:1", &checks(1), &denial(), at, cache.generation());
        assert!(cache.get("ip:1", &checks(1), at).is_some());
    }

    /// Only a request of the same cost is answered from the cache: a
    /// cheaper one may conform sooner, a dearer one later or never (more
    /// than the capacity is Redis's answer to give, not a 429).
    #[test]
    fn only_the_same_cost_is_answered() {
        let cache = DenyCache::new(8);
        let at = Instant::now();
        cache.insert("ip:1", &checks(2), &denial(), at, cache.generation());
        let later = at + Duration::from_secs(1);
        assert!(cache.get("ip:1", &checks(2), later).is_some());
        assert!(cache.get("ip:1", &checks(1), later).is_none());
        assert!(cache.get("ip:1", &checks(6), later).is_none());
        assert!(cache.get("ip:2", &checks(2), later).is_none());
    }
}

#[cfg(test)]
mod reset_tests {
    use std::time::{Duration, Instant};

    use super::deny_cache_tests::denial;
    use super::{DenyCache, RateLimiter, entry_of};
    use crate::policy::{Policy, PolicyTable};
    use crate::quota::{Algorithm, Quota};
    use crate::store::PolicyCheck;

    fn checks(indices: &[usize]) -> Vec<PolicyCheck> {
        indices
            .iter()
            .map(|&index| PolicyCheck {
                index,
                quota: Quota::per_minute(5),
                algorithm: Algorithm::Gcra,
                cost: 1,
                shadow: false,
            })
            .collect()
    }

    #[test]
    fn entries_are_matched_by_identity_and_policy() {
        let key = DenyCache::entry_key("ip:1", &checks(&[0, 2]));
        assert!(entry_of(&key, "ip:1", None));
        assert!(entry_of(&key, "ip:1", Some(0)));
        assert!(entry_of(&key, "ip:1", Some(2)));
        assert!(!entry_of(&key, "ip:1", Some(1)));
        assert!(!entry_of(&key, "ip:", None), "another identity");
        assert!(!entry_of(&key, "ip:10", None));
    }

    /// A reset of one policy forgets the denials by every list of policies
    /// that includes it, and only those.
    #[test]
    fn forgetting_one_policy_keeps_the_other_lists() {
        let cache = DenyCache::new(8);
        let at = Instant::now();
        for list in [&[0][..], &[1], &[0, 1]] {
            cache.insert("ip:1", &checks(list), &denial(), at, cache.generation());
        }
        cache.insert("ip:2", &checks(&[0]), &denial(), at, cache.generation());
        cache.forget("ip:1", Some(0));
        let later = at + Duration::from_secs(1);
        assert!(cache.get("ip:1", &checks(&[0]), later).is_none());
        assert!(cache.get("ip:1", &checks(&[0, 1]), later).is_none());
        assert!(cache.get("ip:1", &checks(&[1]), later).is_some());
        assert!(cache.get("ip:2", &checks(&[0]), later).is_some());
        cache.clear();
        assert!(cache.get("ip:2", &checks(&[0]), later).is_none());
    }

    /// Without Redis the builder starts nothing: no runtime needed, no
    /// subscription.
    #[test]
    fn builds_without_a_runtime_when_there_is_no_redis() {
        let table = PolicyTable::builder()
            .policy(Policy::new("api", Quota::per_minute(2)))
            .default_policies(["api"])
            .build()
            .expect("table");
        let limiter = RateLimiter::builder(table).build();
        assert!(limiter.inner.resets.is_none());
        assert!(limiter.is_listening());
    }
}
