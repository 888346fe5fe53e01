//! Quotas and the pure maths of the three algorithms.
//!
//! Time is integer microseconds. GCRA follows the `governor` crate exactly:
//! emission interval `T = period / limit`, tolerance `τ = (burst − 1)·T`, a
//! request of cost `n` conforms when `now ≥ tat + (n − 1)·T − τ` and then
//! moves `tat` to `max(tat, now) + n·T`. The Lua script in
//! `store/gcra.lua` is a line-by-line transcription of these functions, and
//! the in-process fallback is `governor` itself, so the three agree.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::error::ConfigError;

/// How a policy counts.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Algorithm {
    /// Generic cell rate algorithm: a smooth rate with a burst allowance,
    /// one timestamp per key (the default).
    #[default]
    Gcra,
    /// Sliding window: the current window's count plus the previous
    /// window's count weighted by how much of it still overlaps.
    SlidingWindow,
    /// Fixed window: a counter per calendar window of `period`.
    FixedWindow,
}

impl Algorithm {
    /// The code the Lua script uses.
    pub(crate) fn code(self) -> u8 {
        match self {
            Algorithm::Gcra => 1,
            Algorithm::SlidingWindow => 2,
            Algorithm::FixedWindow => 3,
        }
    }

    /// `gcra`, `sliding_window` or `fixed_window`.
    pub fn as_str(self) -> &'static str {
        match self {
            Algorithm::Gcra => "gcra",
            Algorithm::SlidingWindow => "sliding_window",
            Algorithm::FixedWindow => "fixed_window",
        }
    }
}

/// `limit` requests per `period`, with a burst allowance.
///
/// For GCRA the burst is how many requests may arrive at once (default: the
/// limit); for the window algorithms the limit is the capacity of a window
/// and the burst is not used.
///
/// ```
/// use std::time::Duration;
/// use tollgate_ratelimit::Quota;
///
/// let q = Quota::per_minute(60).with_burst(10);
/// assert_eq!(q.emission_interval(), Duration::from_secs(1));
/// assert_eq!(q.tolerance(), Duration::from_secs(9));
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Quota {
    limit: u32,
    #[serde(with = "duration_repr")]
    period: Duration,
    #[serde(default)]
    burst: Option<u32>,
}

impl Quota {
    /// `limit` per `period`, burst = `limit`.
    pub const fn new(limit: u32, period: Duration) -> Self {
        Quota {
            limit,
            period,
            burst: None,
        }
    }

    /// `limit` per second.
    pub const fn per_second(limit: u32) -> Self {
        Self::new(limit, Duration::from_secs(1))
    }

    /// `limit` per minute.
    pub const fn per_minute(limit: u32) -> Self {
        Self::new(limit, Duration::from_secs(60))
    }

    /// `limit` per hour.
    pub const fn per_hour(limit: u32) -> Self {
        Self::new(limit, Duration::from_secs(3600))
    }

    /// Sets the burst (GCRA only).
    #[must_use]
    pub const fn with_burst(mut self, burst: u32) -> Self {
        self.burst = Some(burst);
        self
    }

    /// Requests per period.
    pub fn limit(&self) -> u32 {
        self.limit
    }

    /// The period.
    pub fn period(&self) -> Duration {
        self.period
    }

    /// The burst (the limit unless set).
    pub fn burst(&self) -> u32 {
        self.burst.unwrap_or(self.limit)
    }

    /// The capacity reported as `X-RateLimit-Limit`: the burst for GCRA,
    /// the limit for the window algorithms.
    pub fn capacity(&self, algorithm: Algorithm) -> u32 {
        match algorithm {
            Algorithm::Gcra => self.burst(),
            _ => self.limit,
        }
    }

    pub(crate) fn period_us(&self) -> u64 {
        u64::try_from(self.period.as_micros()).unwrap_or(u64::MAX)
    }

    /// `T`, in microseconds (at least 1).
    pub(crate) fn t_us(&self) -> u64 {
        (self.period_us() / u64::from(self.limit.max(1))).max(1)
    }

    /// `τ = (burst − 1)·T`, in microseconds.
    pub(crate) fn tau_us(&self) -> u64 {
        self.t_us()
            .saturating_mul(u64::from(self.burst().saturating_sub(1)))
    }

    /// The emission interval `T = period / limit` (microsecond precision).
    pub fn emission_interval(&self) -> Duration {
        Duration::from_micros(self.t_us())
    }

    /// The GCRA tolerance `τ = (burst − 1)·T`.
    pub fn tolerance(&self) -> Duration {
        Duration::from_micros(self.tau_us())
    }

    /// Checks the quota; `field` names the policy in the error.
    pub fn validate(&self, field: &str) -> Result<(), ConfigError> {
        let bad = |reason: &str| {
            Err(ConfigError::Invalid {
                field: field.to_owned(),
                reason: reason.to_owned(),
            })
        };
        if self.limit == 0 {
            return bad("limit (rate) must be at least 1");
        }
        if self.period.is_zero() {
            return bad("period must be longer than zero");
        }
        if self.burst() == 0 {
            return bad("burst must be at least 1");
        }
        if self.period_us() / u64::from(self.limit) == 0 {
            return bad("rate is too high: period / limit is below one microsecond");
        }
        // Keep every product in the Lua script below 2^53 (exact doubles).
        if self.period_us() > (1 << 45) || self.tau_us() > (1 << 45) {
            return bad("period or burst is too large");
        }
        Ok(())
    }

    /// The same quota for `governor`, built from `T` in microseconds so
    /// both compute with the same numbers. `divisor` > 1 shares the quota
    /// between that many instances (fallback only).
    pub(crate) fn to_governor(self, divisor: u32) -> governor::Quota {
        let d = divisor.max(1);
        let t = Duration::from_micros(self.t_us().saturating_mul(u64::from(d)));
        let burst = (self.burst() / d).max(1);
        let nz = std::num::NonZeroU32::new(burst).unwrap_or(std::num::NonZeroU32::MIN);
        governor::Quota::with_period(t)
            .unwrap_or_else(|| governor::Quota::per_second(std::num::NonZeroU32::MIN))
            .allow_burst(nz)
    }
}

/// Serde form of durations: `"1s"`, `"15m"`, `"500ms"`, `"1h"`, `"1d"` or a
/// number of seconds.
pub(crate) mod duration_repr {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer, de};

    pub(crate) fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        if d.subsec_nanos() == 0 {
            s.serialize_str(&format!("{}s", d.as_secs()))
        } else {
            s.serialize_str(&format!("{}us", d.as_micros()))
        }
    }

    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Repr {
        Secs(u64),
        Text(String),
    }

    pub(crate) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        match Repr::deserialize(d)? {
            Repr::Secs(s) => Ok(Duration::from_secs(s)),
            Repr::Text(t) => parse(&t).ok_or_else(|| {
                de::Error::custom(format!(
                    "invalid duration `{t}` (expected e.g. \"1s\", \"15m\", \"500ms\")"
                ))
            }),
        }
    }

    pub(crate) fn parse(t: &str) -> Option<Duration> {
        let t = t.trim();
        let split = t.find(|c: char| !c.is_ascii_digit())?;
        let (n, unit) = t.split_at(split);
        let n: u64 = n.parse().ok()?;
        Some(match unit.trim() {
            "us" => Duration::from_micros(n),
            "ms" => Duration::from_millis(n),
            "s" | "sec" | "second" | "seconds" => Duration::from_secs(n),
            "m" | "min" | "minute" | "minutes" => Duration::from_secs(n.checked_mul(60)?),
            "h" | "hour" | "hours" => Duration::from_secs(n.checked_mul(3600)?),
            "d" | "day" | "days" => Duration::from_secs(n.checked_mul(86_400)?),
            _ => return None,
        })
    }
}

/// What one algorithm step concluded (microseconds).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Verdict {
    pub status: Status,
    pub remaining: u64,
    /// Until the quota is fully replenished (GCRA) or the window ends.
    pub reset_us: u64,
    /// Until a request of this cost could conform (denials only).
    pub retry_us: u64,
}

/// The raw status codes shared with the Lua script.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Status {
    Denied = 0,
    Allowed = 1,
    /// Denied, but the policy is in shadow mode (not enforced).
    ShadowDenied = 2,
    /// The cost exceeds the capacity: can never conform.
    ExceedsCapacity = 3,
}

impl Status {
    pub(crate) fn from_code(c: i64) -> Option<Status> {
        Some(match c {
            0 => Status::Denied,
            1 => Status::Allowed,
            2 => Status::ShadowDenied,
            3 => Status::ExceedsCapacity,
            _ => return None,
        })
    }
}

/// One GCRA step (the reference the Lua script and governor are tested
/// against). Returns the verdict and the new `tat` to store (none for
/// a peek or a denial).
#[cfg_attr(not(test), allow(dead_code))]
pub(crate) fn gcra(
    t: u64,
    tau: u64,
    tat: Option<u64>,
    now: u64,
    cost: u32,
) -> (Verdict, Option<u64>) {
    let tat = tat.unwrap_or(now);
    let cap = tau + t;
    let reset = tat.saturating_sub(now);
    if cost == 0 {
        let remaining = (now + tau + t).saturating_sub(tat).min(cap) / t;
        let v = Verdict {
            status: Status::Allowed,
            remaining,
            reset_us: reset,
            retry_us: 0,
        };
        return (v, None);
    }
    let extra = t * u64::from(cost - 1);
    if extra > tau {
        let v = Verdict {
            status: Status::ExceedsCapacity,
            remaining: 0,
            reset_us: reset,
            retry_us: 0,
        };
        return (v, None);
    }
    let earliest = (tat + extra).saturating_sub(tau);
    if now < earliest {
        let v = Verdict {
            status: Status::Denied,
            remaining: 0,
            reset_us: reset,
            retry_us: earliest - now,
        };
        return (v, None);
    }
    let next = tat.max(now) + t * u64::from(cost);
    let remaining = (now + tau + t).saturating_sub(next).min(cap) / t;
    let v = Verdict {
        status: Status::Allowed,
        remaining,
        reset_us: next - now,
        retry_us: 0,
    };
    (v, Some(next))
}

/// The state of a window key: window index, count in it, count in the
/// previous one.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct WindowState {
    pub window: u64,
    pub count: u64,
    pub prev: u64,
}

/// One sliding- or fixed-window step. The sliding estimate is computed in
/// `f64` exactly as Lua does (both IEEE doubles), so the two agree.
pub(crate) fn window(
    sliding: bool,
    limit: u64,
    period: u64,
    state: Option<WindowState>,
    now: u64,
    cost: u32,
) -> (Verdict, Option<WindowState>) {
    let mut cur = now / period;
    let mut elapsed = now - cur * period;
    let (count, prev) = match state {
        Some(s) if s.window == cur => (s.count, s.prev),
        Some(s) if s.window + 1 == cur => (0, s.count),
        // The clock went back behind the stored window (Redis failed over
        // to a node whose clock is behind): go on counting in that window,
        // as at its start, rather than start the count again.
        Some(s) if s.window > cur => {
            (cur, elapsed) = (s.window, 0);
            (s.count, s.prev)
        }
        _ => (0, 0),
    };
    let left = period - elapsed;
    let prev = if sliding { prev } else { 0 };
    let weighted = if sliding {
        ((prev as f64) * (left as f64) / (period as f64)).floor() as u64
    } else {
        0
    };
    let used = count + weighted;
    let cost64 = u64::from(cost);
    let remaining_now = limit.saturating_sub(used);
    if cost == 0 {
        let v = Verdict {
            status: Status::Allowed,
            remaining: remaining_now,
            reset_us: left,
            retry_us: 0,
        };
        return (v, None);
    }
    if cost64 > limit {
        let v = Verdict {
            status: Status::ExceedsCapacity,
            remaining: remaining_now,
            reset_us: left,
            retry_us: 0,
        };
        return (v, None);
    }
    if used + cost64 > limit {
        let retry = if !sliding {
            left
        } else if count + cost64 <= limit {
            // Wait until the previous window's weight has decayed enough:
            // prev·(period − e)/period ≤ limit − count − cost.
            let room = (limit - count - cost64) as f64;
            let e = ((period as f64) * (1.0 - room / (prev as f64))).ceil() as u64;
            e.saturating_sub(elapsed).max(1)
        } else {
            // Next window: this window's count becomes the weighted one.
            let room = (limit - cost64) as f64;
            let e = ((period as f64) * (1.0 - room / (count as f64))).ceil() as u64;
            left + e.min(period)
        };
        let v = Verdict {
            status: Status::Denied,
            remaining: 0,
            reset_us: left,
            retry_us: retry,
        };
        return (v, None);
    }
    let v = Verdict {
        status: Status::Allowed,
        remaining: limit - used - cost64,
        reset_us: left,
        retry_us: 0,
    };
    let next = WindowState {
        window: cur,
        count: count + cost64,
        prev: if sliding { prev } else { 0 },
    };
    (v, Some(next))
}

/// Microseconds to whole seconds, rounded up.
pub(crate) fn ceil_secs(us: u64) -> u64 {
    us.div_ceil(1_000_000)
}

#[cfg(test)]
mod tests {
    use super::*;
    use governor::clock::FakeRelativeClock;
    use governor::middleware::StateInformationMiddleware;
    use governor::{RateLimiter, state::keyed::DefaultKeyedStateStore};
    use proptest::prelude::*;

    #[test]
    fn quota_validation_names_the_field() {
        let e = Quota::per_second(0).validate("api").unwrap_err();
        assert!(e.to_string().contains("api"), "{e}");
        assert!(Quota::per_second(5).with_burst(0).validate("x").is_err());
        assert!(Quota::new(5, Duration::ZERO).validate("x").is_err());
        assert!(
            Quota::new(10, Duration::from_micros(5))
                .validate("x")
                .is_err()
        );
        assert!(Quota::per_minute(10).validate("x").is_ok());
    }

    #[test]
    fn gcra_burst_then_rate() {
        let q = Quota::per_second(10).with_burst(3);
        let (t, tau) = (q.t_us(), q.tau_us());
        let mut tat = None;
        for i in 0..3 {
            let (v, n) = gcra(t, tau, tat, 0, 1);
            assert_eq!(v.status, Status::Allowed, "request {i}");
            assert_eq!(v.remaining, 2 - i);
            tat = n;
        }
        let (v, n) = gcra(t, tau, tat, 0, 1);
        assert_eq!(v.status, Status::Denied);
        assert_eq!(v.retry_us, 100_000);
        assert!(n.is_none());
        let (v, _) = gcra(t, tau, tat, 100_000, 1);
        assert_eq!(v.status, Status::Allowed);
        // cost > burst can never conform; cost 0 only peeks.
        assert_eq!(gcra(t, tau, None, 0, 4).0.status, Status::ExceedsCapacity);
        let (v, n) = gcra(t, tau, tat, 0, 0);
        assert_eq!((v.status, v.remaining, n), (Status::Allowed, 0, None));
    }

    #[test]
    fn fixed_window_counts_per_window() {
        let mut s = None;
        for _ in 0..5 {
            let (v, n) = window(false, 5, 1_000_000, s, 10, 1);
            assert_eq!(v.status, Status::Allowed);
            s = n;
        }
        let (v, _) = window(false, 5, 1_000_000, s, 10, 1);
        assert_eq!(v.status, Status::Denied);
        assert_eq!(v.retry_us, 999_990);
        assert_eq!(ceil_secs(v.retry_us), 1);
        let (v, _) = window(false, 5, 1_000_000, s, 1_000_000, 1);
        assert_eq!((v.status, v.remaining), (Status::Allowed, 4));
    }

    #[test]
    fn sliding_window_weighs_previous() {
        let mut s = None;
        for _ in 0..10 {
            s = window(true, 10, 1_000_000, s, 0, 1).1;
        }
        // Halfway through the next window, half of the previous 10 count.
        let (v, _) = window(true, 10, 1_000_000, s, 1_500_000, 1);
        assert_eq!((v.status, v.remaining), (Status::Allowed, 4));
        let (v, _) = window(true, 10, 1_000_000, s, 1_000_000, 1);
        assert_eq!(v.status, Status::Denied);
        // The retry hint is honest: at now + retry the request conforms.
        let (v2, _) = window(true, 10, 1_000_000, s, 1_000_000 + v.retry_us, 1);
        assert_eq!(v2.status, Status::Allowed);
    }

    /// A clock that goes back behind the stored window (Redis failed over
    /// to a node whose clock is behind) keeps counting in that window
    /// instead of starting the count again.
    #[test]
    fn a_clock_gone_back_keeps_the_window_count() {
        for sliding in [false, true] {
            let mut s = None;
            for _ in 0..3 {
                s = window(sliding, 4, 1_000_000, s, 10_000_500, 1).1;
            }
            let (v, next) = window(sliding, 4, 1_000_000, s, 9_999_500, 1);
            assert_eq!((v.status, v.remaining), (Status::Allowed, 0), "{sliding}");
            assert_eq!(next.map(|n| (n.window, n.count)), Some((10, 4)));
            let (v, _) = window(sliding, 4, 1_000_000, next, 9_999_600, 1);
            assert_eq!(v.status, Status::Denied, "{sliding}");
            // Timed from the stored window's start: the full window.
            assert_eq!(v.reset_us, 1_000_000);
            assert!(v.retry_us >= 1_000_000, "{sliding}: {}", v.retry_us);
        }
    }

    type Gov =
        RateLimiter<u8, DefaultKeyedStateStore<u8>, FakeRelativeClock, StateInformationMiddleware>;

    proptest! {
        /// The pure GCRA agrees with governor on any timeline.
        #[test]
        fn gcra_matches_governor(
            limit in 1u32..50,
            period_ms in 1u64..5_000,
            burst in 1u32..20,
            steps in proptest::collection::vec((0u64..400_000, 0u32..6), 1..60),
        ) {
            let q = Quota::new(limit, Duration::from_millis(period_ms)).with_burst(burst);
            prop_assume!(q.validate("p").is_ok());
            let clock = FakeRelativeClock::default();
            let gov: Gov = RateLimiter::<u8, _, _, governor::middleware::NoOpMiddleware<_>>::new(
                q.to_governor(1),
                DefaultKeyedStateStore::default(),
                clock.clone(),
            )
            .with_middleware::<StateInformationMiddleware>();
            let (t, tau) = (q.t_us(), q.tau_us());
            let mut now = 0u64;
            let mut tat = None;
            for (dt, cost) in steps {
                now += dt;
                clock.advance(Duration::from_micros(dt));
                if cost == 0 {
                    continue;
                }
                let (v, next) = gcra(t, tau, tat, now, cost);
                let n = std::num::NonZeroU32::new(cost).unwrap();
                match gov.check_key_n(&0, n) {
                    Err(_) => prop_assert_eq!(v.status, Status::ExceedsCapacity),
                    Ok(Ok(snap)) => {
                        prop_assert_eq!(v.status, Status::Allowed);
                        prop_assert_eq!(v.remaining, u64::from(snap.remaining_burst_capacity()));
                    }
                    Ok(Err(nu)) => {
                        prop_assert_eq!(v.status, Status::Denied);
                        let wait = nu.wait_time_from(governor::clock::Clock::now(&clock));
                        prop_assert_eq!(u128::from(v.retry_us), wait.as_micros());
                    }
                }
                if let Some(n) = next {
                    tat = Some(n);
                }
            }
        }

        /// Retry hints are honest for the window algorithms too.
        #[test]
        fn window_retry_is_sufficient(
            sliding in any::<bool>(),
            limit in 1u64..20,
            period in 1_000u64..2_000_000,
            steps in proptest::collection::vec((0u64..500_000, 1u32..4), 1..60),
        ) {
            let mut now = 0u64;
            let mut s = None;
            for (dt, cost) in steps {
                now += dt;
                let (v, n) = window(sliding, limit, period, s, now, cost);
                if v.status == Status::Denied {
                    prop_assert!(v.retry_us >= 1);
                    let (v2, _) = window(sliding, limit, period, s, now + v.retry_us, cost);
                    prop_assert_eq!(v2.status, Status::Allowed);
                }
                if let Some(n) = n {
                    s = Some(n);
                }
            }
        }
    }
}
