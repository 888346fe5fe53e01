//! The in-process store: `governor` keyed limiters for GCRA (one per policy
//! and quota), a small map for the window algorithms. Used while Redis is
//! unavailable and when no Redis is configured.
//!
//! Decisions here are per instance. A request with several policies is
//! all-or-nothing for the window policies and the first GCRA policy; when a
//! later GCRA policy denies, the GCRA policies before it have already been
//! charged (governor has no refund). That errs on the strict side.

use std::collections::HashMap;
use std::hash::{BuildHasher as _, BuildHasherDefault, Hasher};
use std::num::NonZeroU32;
use std::sync::{Arc, Mutex, OnceLock, RwLock, Weak};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use governor::RateLimiter;
use governor::clock::{Clock, DefaultClock};
use governor::middleware::StateInformationMiddleware;
use governor::nanos::Nanos;
use governor::state::StateStore;
use governor::state::keyed::{DefaultKeyedStateStore, ShrinkableKeyedStateStore};
use smallvec::SmallVec;

use super::{PolicyCheck, Verdicts};
use crate::quota::{Algorithm, Quota, Status, Verdict, WindowState, window};

/// governor is keyed by a 64-bit keyed hash of the identity rather than
/// the identity itself: no allocation per decision, and with a random
/// per-process key two identities share a bucket with probability 2^-64.
type Gov = RateLimiter<u64, SharedState, DefaultClock, StateInformationMiddleware>;

/// The keyed state of one governor limiter (its `DashMap`), also held by
/// the store: governor has no way to forget one key, so an admin reset
/// removes the identity's entry here.
#[derive(Clone, Default)]
struct SharedState(Arc<DefaultKeyedStateStore<u64, BuildHasherDefault<PreHashed>>>);

impl StateStore for SharedState {
    type Key = u64;

    fn measure_and_replace<T, F, E>(&self, key: &u64, f: F) -> Result<T, E>
    where
        F: Fn(Option<Nanos>) -> Result<(T, Nanos), E>,
    {
        self.0.measure_and_replace(key, f)
    }
}

impl ShrinkableKeyedStateStore<u64> for SharedState {
    fn retain_recent(&self, drop_below: Nanos) {
        self.0.retain_recent(drop_below);
    }

    fn shrink_to_fit(&self) {
        ShrinkableKeyedStateStore::shrink_to_fit(&*self.0);
    }

    fn len(&self) -> usize {
        ShrinkableKeyedStateStore::len(&*self.0)
    }

    fn is_empty(&self) -> bool {
        ShrinkableKeyedStateStore::is_empty(&*self.0)
    }
}

/// A governor limiter for one quota, and its state.
struct Limiter {
    gov: Gov,
    state: SharedState,
}

impl Limiter {
    /// Forgets the identity whose key is `key`: its next request starts
    /// from a full quota.
    fn forget(&self, key: u64) {
        self.state.0.remove(&key);
    }
}

/// The hasher of governor's map. Its keys are keyed SipHash values
/// already: uniform, and unpredictable without this process's random key,
/// so the map uses them as they are instead of hashing them again.
#[derive(Clone, Copy, Debug, Default)]
struct PreHashed(u64);

impl Hasher for PreHashed {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        // Only `u64` keys reach this map; anything else is folded in.
        for &b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(b);
        }
    }

    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }
}

/// A policy's first limiter, made on first use.
type FirstSlot = OnceLock<(Quota, Limiter)>;

/// A window state's key: policy index, period in µs, identity.
type WindowKey = (usize, u64, String);

/// The in-process store. Housekeeping runs by itself while it lives.
pub(crate) struct MemoryStore {
    divisor: u32,
    hasher: std::collections::hash_map::RandomState,
    /// Per policy index, the limiter of the first quota seen for it (the
    /// policy's own quota, unless plans change it): found without a lock
    /// or a reference count.
    first: Box<[FirstSlot]>,
    /// Every other (policy, quota) pair: plan tiers.
    gcra: RwLock<HashMap<(usize, Quota), Arc<Limiter>>>,
    /// Window states by (policy index, period in µs, identity): plans whose
    /// windows differ count apart.
    windows: Mutex<HashMap<WindowKey, (WindowState, u64)>>,
}

impl std::fmt::Debug for MemoryStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemoryStore")
            .field("divisor", &self.divisor)
            .finish()
    }
}

fn wall_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

impl MemoryStore {
    /// A store for `policies` policies whose quotas are divided by
    /// `divisor` (instances sharing the limit while Redis is down), with
    /// housekeeping every `every`.
    pub(crate) fn new(policies: usize, divisor: u32, every: Duration) -> Arc<Self> {
        let store = Arc::new(MemoryStore {
            divisor: divisor.max(1),
            first: (0..policies).map(|_| OnceLock::new()).collect(),
            hasher: std::collections::hash_map::RandomState::new(),
            gcra: RwLock::new(HashMap::new()),
            windows: Mutex::new(HashMap::new()),
        });
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            let weak: Weak<MemoryStore> = Arc::downgrade(&store);
            rt.spawn(async move {
                let mut tick = tokio::time::interval(every.max(Duration::from_millis(10)));
                tick.tick().await;
                loop {
                    tick.tick().await;
                    let Some(store) = weak.upgrade() else { return };
                    store.housekeep();
                }
            });
        }
        store
    }

    /// Forgets keys that are back to a full quota and frees memory.
    pub(crate) fn housekeep(&self) {
        for (_, l) in self.first.iter().filter_map(OnceLock::get) {
            l.gov.retain_recent();
            l.gov.shrink_to_fit();
        }
        let limiters: Vec<Arc<Limiter>> = match self.gcra.read() {
            Ok(m) => m.values().cloned().collect(),
            Err(_) => return,
        };
        for l in limiters {
            l.gov.retain_recent();
            l.gov.shrink_to_fit();
        }
        let now = wall_us();
        if let Ok(mut w) = self.windows.lock() {
            // A state two windows old is indistinguishable from none.
            w.retain(|_, (s, period)| s.window.saturating_add(2) > now / (*period).max(1));
            w.shrink_to_fit();
        }
    }

    /// How many GCRA keys are held (tests).
    #[cfg(test)]
    pub(crate) fn gcra_keys(&self) -> usize {
        let first: usize = self
            .first
            .iter()
            .filter_map(OnceLock::get)
            .map(|(_, l)| l.gov.len())
            .sum();
        first
            + self
                .gcra
                .read()
                .map(|m| m.values().map(|l| l.gov.len()).sum::<usize>())
                .unwrap_or(0)
    }

    fn new_limiter(&self, quota: Quota) -> Limiter {
        let state = SharedState::default();
        let gov: Gov = RateLimiter::new(
            quota.to_governor(self.divisor),
            state.clone(),
            DefaultClock::default(),
        );
        Limiter { gov, state }
    }

    /// Runs `f` on the limiter of `(index, quota)`, made on first use.
    fn with_limiter<T>(&self, index: usize, quota: Quota, f: impl FnOnce(&Gov) -> T) -> T {
        if let Some(slot) = self.first.get(index) {
            let (q, l) = slot.get_or_init(|| (quota, self.new_limiter(quota)));
            if *q == quota {
                return f(&l.gov);
            }
        }
        f(&self.limiter(index, quota).gov)
    }

    fn limiter(&self, index: usize, quota: Quota) -> Arc<Limiter> {
        if let Ok(m) = self.gcra.read()
            && let Some(g) = m.get(&(index, quota))
        {
            return g.clone();
        }
        let mut m = match self.gcra.write() {
            Ok(m) => m,
            Err(p) => p.into_inner(),
        };
        m.entry((index, quota))
            .or_insert_with(|| Arc::new(self.new_limiter(quota)))
            .clone()
    }

    fn divided(&self, q: &Quota) -> (u64, u64) {
        let d = u64::from(self.divisor);
        ((u64::from(q.limit()) / d).max(1), q.period_us())
    }

    /// Decides one request against all its policies.
    pub(crate) fn decide(&self, identity: &str, checks: &[PolicyCheck]) -> Verdicts {
        let mut out: SmallVec<[Option<Verdict>; 2]> = smallvec::smallvec![None; checks.len()];
        let mut writes = Vec::new();
        let mut denied = false;
        // Only window policies need the map (and the wall clock).
        let any_window = checks.iter().any(|c| c.algorithm != Algorithm::Gcra);
        let now = if any_window { wall_us() } else { 0 };
        let mut windows = if any_window {
            Some(match self.windows.lock() {
                Ok(w) => w,
                Err(p) => p.into_inner(),
            })
        } else {
            None
        };
        // Window policies first: they can be checked without writing.
        for (i, c) in checks.iter().enumerate() {
            if c.algorithm == Algorithm::Gcra {
                continue;
            }
            let (limit, period) = self.divided(&c.quota);
            let Some(windows) = windows.as_mut() else {
                continue;
            };
            let key = (c.index, period, identity.to_owned());
            let state = windows.get(&key).map(|(s, _)| *s);
            let (v, next) = window(
                c.algorithm == Algorithm::SlidingWindow,
                limit,
                period,
                state,
                now,
                c.cost,
            );
            let mut v = self.beyond_share(c, v);
            if v.status != Status::Allowed {
                if c.shadow {
                    v.status = Status::ShadowDenied;
                } else {
                    denied = true;
                }
            } else if let Some(n) = next {
                writes.push((key, (n, period)));
            }
            out[i] = Some(v);
        }
        // The identity's key in governor's maps: hashed once per request,
        // whatever the number of GCRA policies.
        let mut gcra_key = None;
        for (i, c) in checks.iter().enumerate() {
            if c.algorithm != Algorithm::Gcra {
                continue;
            }
            let v = if denied {
                // Not charged: report the quota as it stands.
                self.gcra_peek(c)
            } else {
                let key = *gcra_key.get_or_insert_with(|| self.hasher.hash_one(identity));
                let mut v = self.beyond_share(c, self.gcra_check(key, c));
                if v.status != Status::Allowed {
                    if c.shadow {
                        v.status = Status::ShadowDenied;
                    } else {
                        denied = true;
                    }
                }
                v
            };
            out[i] = Some(v);
        }
        if !denied && let Some(windows) = windows.as_mut() {
            for (k, s) in writes {
                windows.insert(k, s);
            }
        }
        drop(windows);
        out.into_iter()
            .map(|v| {
                v.unwrap_or(Verdict {
                    status: Status::Allowed,
                    remaining: 0,
                    reset_us: 0,
                    retry_us: 0,
                })
            })
            .collect()
    }

    /// A cost over this instance's share of the capacity (the divisor's
    /// doing) but within the whole capacity is a denial until the period
    /// has passed, not "more than the policy can ever allow": Redis, back,
    /// would admit it.
    fn beyond_share(&self, c: &PolicyCheck, v: Verdict) -> Verdict {
        if v.status != Status::ExceedsCapacity
            || self.divisor <= 1
            || c.cost > c.quota.capacity(c.algorithm)
        {
            return v;
        }
        let period = c.quota.period_us();
        Verdict {
            status: Status::Denied,
            remaining: 0,
            reset_us: period,
            retry_us: period,
        }
    }

    fn gcra_peek(&self, c: &PolicyCheck) -> Verdict {
        // governor cannot peek; report the full capacity.
        let burst = (c.quota.burst() / self.divisor).max(1);
        Verdict {
            status: Status::Allowed,
            remaining: u64::from(burst),
            reset_us: 0,
            retry_us: 0,
        }
    }

    /// Charges `c` to the identity whose governor key is `key`.
    fn gcra_check(&self, key: u64, c: &PolicyCheck) -> Verdict {
        let Some(n) = NonZeroU32::new(c.cost) else {
            return self.gcra_peek(c);
        };
        self.with_limiter(c.index, c.quota, |gov| self.gcra_verdict(gov, c, key, n))
    }

    fn gcra_verdict(&self, gov: &Gov, c: &PolicyCheck, key: u64, n: NonZeroU32) -> Verdict {
        let q = c.quota.to_governor(self.divisor);
        let t = u64::try_from(q.replenish_interval().as_micros()).unwrap_or(u64::MAX);
        let burst = u64::from(q.burst_size().get());
        match gov.check_key_n(&key, n) {
            Ok(Ok(snap)) => {
                let rem = u64::from(snap.remaining_burst_capacity());
                Verdict {
                    status: Status::Allowed,
                    remaining: rem,
                    reset_us: burst.saturating_sub(rem).saturating_mul(t),
                    retry_us: 0,
                }
            }
            Ok(Err(not_until)) => {
                let wait = not_until.wait_time_from(gov.clock().now());
                let retry = u64::try_from(wait.as_micros()).unwrap_or(u64::MAX).max(1);
                let tau = t.saturating_mul(burst - 1);
                let extra = t.saturating_mul(u64::from(c.cost - 1));
                Verdict {
                    status: Status::Denied,
                    remaining: 0,
                    reset_us: (retry + tau).saturating_sub(extra),
                    retry_us: retry,
                }
            }
            Err(_) => Verdict {
                status: Status::ExceedsCapacity,
                remaining: 0,
                reset_us: 0,
                retry_us: 0,
            },
        }
    }

    /// Forgets one identity's state for one policy (admin reset).
    pub(crate) fn reset(&self, index: usize, identity: &str) {
        if let Ok(mut w) = self.windows.lock() {
            w.retain(|(i, _, id), _| !(*i == index && id == identity));
        }
        // The identity's entry in each of the policy's limiters (its own
        // quota and its plans'); every other identity keeps its state.
        let key = self.hasher.hash_one(identity);
        if let Some((_, l)) = self.first.get(index).and_then(OnceLock::get) {
            l.forget(key);
        }
        if let Ok(m) = self.gcra.read() {
            m.iter()
                .filter(|((i, _), _)| *i == index)
                .for_each(|(_, l)| l.forget(key));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(index: usize, quota: Quota, algorithm: Algorithm) -> PolicyCheck {
        PolicyCheck {
            index,
            quota,
            algorithm,
            cost: 1,
            shadow: false,
        }
    }

    /// How many of ten requests of `id` under `c` are allowed.
    fn allowed(store: &MemoryStore, c: &[PolicyCheck], id: &str) -> usize {
        (0..10)
            .filter(|_| store.decide(id, c)[0].status == Status::Allowed)
            .count()
    }

    #[tokio::test]
    async fn governor_fallback_limits_and_is_all_or_nothing_for_windows() {
        let store = MemoryStore::new(2, 1, Duration::from_secs(60));
        let checks = [
            check(0, Quota::per_hour(10), Algorithm::Gcra),
            check(1, Quota::per_hour(2), Algorithm::FixedWindow),
        ];
        for _ in 0..2 {
            let v = store.decide("a", &checks);
            assert!(v.iter().all(|v| v.status == Status::Allowed), "{v:?}");
        }
        let v = store.decide("a", &checks);
        assert_eq!(v[1].status, Status::Denied);
        // The window denial came first: governor was not charged.
        assert_eq!(v[0].remaining, 10);
        let v = store.decide("b", &checks[..1]);
        assert_eq!(v[0].remaining, 9);
        assert_eq!(store.gcra_keys(), 2);
        store.housekeep();
    }

    #[tokio::test]
    async fn reset_and_plan_quotas_get_limiters_of_their_own() {
        let store = MemoryStore::new(1, 1, Duration::from_secs(60));
        let free = [check(0, Quota::per_hour(2), Algorithm::Gcra)];
        let pro = [check(0, Quota::per_hour(5), Algorithm::Gcra)];
        // The policy's first quota lives in its slot, a plan's other quota
        // in the map: each keeps its own state.
        assert_eq!(allowed(&store, &free, "a"), 2);
        assert_eq!(allowed(&store, &pro, "a"), 5);
        assert_eq!(store.gcra_keys(), 2);
        // A reset starts both quotas over for the identity.
        store.reset(0, "a");
        assert_eq!(allowed(&store, &free, "a"), 2);
        assert_eq!(allowed(&store, &pro, "a"), 5);
        // And a second one again.
        store.reset(0, "a");
        assert_eq!(allowed(&store, &free, "a"), 2);
        store.housekeep();
    }

    /// A reset forgets one identity: the others of the policy keep their
    /// state (an application resetting a user's login attempts must not
    /// reset everybody's), under the policy's own quota and its plans'.
    #[tokio::test]
    async fn a_reset_forgets_only_its_identity() {
        let store = MemoryStore::new(2, 1, Duration::from_secs(60));
        let free = [check(0, Quota::per_hour(2), Algorithm::Gcra)];
        let pro = [check(0, Quota::per_hour(5), Algorithm::Gcra)];
        let other_policy = [check(1, Quota::per_hour(1), Algorithm::Gcra)];
        for id in ["a", "b"] {
            assert_eq!(allowed(&store, &free, id), 2);
            assert_eq!(allowed(&store, &pro, id), 5);
            assert_eq!(allowed(&store, &other_policy, id), 1);
        }
        store.reset(0, "a");
        assert_eq!(allowed(&store, &free, "a"), 2);
        assert_eq!(allowed(&store, &pro, "a"), 5);
        assert_eq!(
            allowed(&store, &free, "b"),
            0,
            "b keeps its free-plan state"
        );
        assert_eq!(allowed(&store, &pro, "b"), 0, "b keeps its pro-plan state");
        assert_eq!(
            allowed(&store, &other_policy, "a"),
            0,
            "another policy is untouched"
        );
        // Housekeeping still sees every limiter's keys.
        assert_eq!(store.gcra_keys(), 6);
    }

    #[tokio::test]
    async fn divisor_shares_the_quota() {
        let store = MemoryStore::new(1, 2, Duration::from_secs(60));
        let c = [check(0, Quota::per_hour(10), Algorithm::Gcra)];
        let allowed = (0..10)
            .filter(|_| store.decide("k", &c)[0].status == Status::Allowed)
            .count();
        assert_eq!(allowed, 5);
        let d = store.decide("k", &c);
        assert_eq!(d[0].status, Status::Denied);
        assert!(d[0].retry_us > 0);
    }

    /// Two plans of one policy whose windows have different lengths count
    /// apart: sharing one state, each would find the other's window and
    /// start over, and neither would ever limit.
    #[tokio::test]
    async fn plans_with_other_windows_count_apart() {
        let store = MemoryStore::new(1, 1, Duration::from_secs(60));
        let free = [check(0, Quota::per_minute(2), Algorithm::SlidingWindow)];
        let pro = [check(0, Quota::per_hour(2), Algorithm::SlidingWindow)];
        for _ in 0..2 {
            assert_eq!(store.decide("k", &free)[0].status, Status::Allowed);
            assert_eq!(store.decide("k", &pro)[0].status, Status::Allowed);
        }
        assert_eq!(store.decide("k", &free)[0].status, Status::Denied);
        assert_eq!(store.decide("k", &pro)[0].status, Status::Denied);
        store.reset(0, "k");
        assert_eq!(store.decide("k", &free)[0].status, Status::Allowed);
        assert_eq!(store.decide("k", &pro)[0].status, Status::Allowed);
    }

    /// With the quota shared by a divisor, a cost within the policy's
    /// capacity but over this instance's share is denied (429 and a
    /// retry), not refused as more than the policy can ever allow (400);
    /// a cost over the whole capacity still is.
    #[tokio::test]
    async fn a_cost_over_the_share_is_a_denial() {
        let store = MemoryStore::new(2, 4, Duration::from_secs(60));
        for algorithm in [Algorithm::Gcra, Algorithm::FixedWindow] {
            let index = usize::from(algorithm != Algorithm::Gcra);
            let mut c = [check(index, Quota::per_minute(10), algorithm)];
            c[0].cost = 5;
            let v = store.decide("k", &c);
            assert_eq!(v[0].status, Status::Denied, "{algorithm:?}");
            assert_eq!(v[0].retry_us, 60_000_000);
            c[0].cost = 11;
            let v = store.decide("k", &c);
            assert_eq!(v[0].status, Status::ExceedsCapacity, "{algorithm:?}");
        }
    }
}
