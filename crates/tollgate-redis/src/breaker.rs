//! One circuit breaker per handle, shared by every layer.
//!
//! Closed: commands go to Redis. After `failure_threshold` consecutive
//! outage errors (timeouts, connection errors) or a dropped connection
//! reported by fred, the breaker opens: commands are refused at once with
//! [`Error::Unavailable`](crate::Error::Unavailable) and every layer answers
//! from its fallback. A background task probes Redis (half-open) and closes
//! the breaker when a probe succeeds. Each transition is logged once and
//! exported as the `tollgate_redis_breaker_state` gauge.

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, AtomicU32, AtomicU64, Ordering};
use std::time::Instant;

use serde::Serialize;
use tokio::sync::watch;

/// The breaker's state.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum BreakerState {
    /// Redis is answering; commands are sent.
    Closed,
    /// Redis is considered down; commands are refused locally.
    Open,
    /// A probe is in flight; commands are still refused until it succeeds.
    HalfOpen,
}

impl BreakerState {
    fn from_u8(v: u8) -> Self {
        match v {
            0 => BreakerState::Closed,
            1 => BreakerState::Open,
            _ => BreakerState::HalfOpen,
        }
    }

    fn as_u8(self) -> u8 {
        match self {
            BreakerState::Closed => 0,
            BreakerState::Open => 1,
            BreakerState::HalfOpen => 2,
        }
    }

    /// `closed`, `open` or `half_open`.
    pub fn as_str(self) -> &'static str {
        match self {
            BreakerState::Closed => "closed",
            BreakerState::Open => "open",
            BreakerState::HalfOpen => "half_open",
        }
    }
}

impl fmt::Display for BreakerState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The shared breaker. Cheap to clone.
#[derive(Clone)]
pub struct CircuitBreaker {
    inner: Arc<Inner>,
}

struct Inner {
    name: String,
    state: AtomicU8,
    consecutive: AtomicU32,
    threshold: u32,
    opened: AtomicU64,
    errors: AtomicU64,
    timeouts: AtomicU64,
    since: std::sync::Mutex<Instant>,
    tx: watch::Sender<BreakerState>,
}

impl fmt::Debug for CircuitBreaker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CircuitBreaker")
            .field("state", &self.state())
            .field(
                "consecutive_failures",
                &self.inner.consecutive.load(Ordering::Relaxed),
            )
            .finish()
    }
}

impl CircuitBreaker {
    /// A closed breaker that opens after `threshold` consecutive failures
    /// (at least 1). `name` labels logs and metrics (the handle's namespace).
    pub fn new(name: impl Into<String>, threshold: u32) -> Self {
        let (tx, _) = watch::channel(BreakerState::Closed);
        let cb = CircuitBreaker {
            inner: Arc::new(Inner {
                name: name.into(),
                state: AtomicU8::new(0),
                consecutive: AtomicU32::new(0),
                threshold: threshold.max(1),
                opened: AtomicU64::new(0),
                errors: AtomicU64::new(0),
                timeouts: AtomicU64::new(0),
                since: std::sync::Mutex::new(Instant::now()),
                tx,
            }),
        };
        cb.export(BreakerState::Closed);
        cb
    }

    /// The current state.
    pub fn state(&self) -> BreakerState {
        BreakerState::from_u8(self.inner.state.load(Ordering::Acquire))
    }

    /// Whether commands may be sent (the breaker is closed).
    #[inline]
    pub fn allows(&self) -> bool {
        self.inner.state.load(Ordering::Acquire) == 0
    }

    /// A receiver that sees every state change (for layers that switch
    /// stores, and for tests).
    pub fn subscribe(&self) -> watch::Receiver<BreakerState> {
        self.inner.tx.subscribe()
    }

    /// How long the breaker has been in its current state.
    pub fn in_state_for(&self) -> std::time::Duration {
        self.inner
            .since
            .lock()
            .map(|t| t.elapsed())
            .unwrap_or_default()
    }

    /// Total outage errors seen (timeouts excluded).
    pub fn errors(&self) -> u64 {
        self.inner.errors.load(Ordering::Relaxed)
    }

    /// Total timeouts seen.
    pub fn timeouts(&self) -> u64 {
        self.inner.timeouts.load(Ordering::Relaxed)
    }

    /// How many times the breaker has opened.
    pub fn times_opened(&self) -> u64 {
        self.inner.opened.load(Ordering::Relaxed)
    }

    /// Records a successful command.
    #[inline]
    pub fn record_success(&self) {
        // Avoid a write on the hot path when nothing changes.
        if self.inner.consecutive.load(Ordering::Relaxed) != 0 {
            self.inner.consecutive.store(0, Ordering::Relaxed);
        }
    }

    /// Records an outage error or a timeout; opens the breaker when the
    /// threshold is reached. Returns true if this call opened it.
    pub fn record_failure(&self, timeout: bool) -> bool {
        if timeout {
            self.inner.timeouts.fetch_add(1, Ordering::Relaxed);
            metrics::counter!("tollgate_redis_timeouts_total", "handle" => self.inner.name.clone())
                .increment(1);
        } else {
            self.inner.errors.fetch_add(1, Ordering::Relaxed);
            metrics::counter!("tollgate_redis_errors_total", "handle" => self.inner.name.clone())
                .increment(1);
        }
        let n = self.inner.consecutive.fetch_add(1, Ordering::AcqRel) + 1;
        if n >= self.inner.threshold {
            self.trip("consecutive failures")
        } else {
            false
        }
    }

    /// Opens the breaker at once (a dropped connection, a failed start).
    /// Returns true if it was closed before.
    pub fn trip(&self, reason: &str) -> bool {
        if self.transition(BreakerState::Closed, BreakerState::Open) {
            self.inner.opened.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(handle = %self.inner.name, reason, "Redis circuit breaker opened: layers switch to their fallbacks");
            true
        } else {
            false
        }
    }

    /// Marks a probe in flight (open → half-open).
    pub(crate) fn begin_probe(&self) -> bool {
        self.transition_quiet(BreakerState::Open, BreakerState::HalfOpen)
    }

    /// A probe failed (half-open → open).
    pub(crate) fn probe_failed(&self) {
        self.transition_quiet(BreakerState::HalfOpen, BreakerState::Open);
    }

    /// A probe succeeded: closes the breaker.
    pub(crate) fn close(&self) {
        let from = self.state();
        if from != BreakerState::Closed && self.transition(from, BreakerState::Closed) {
            self.inner.consecutive.store(0, Ordering::Relaxed);
            tracing::info!(handle = %self.inner.name, "Redis circuit breaker closed: Redis is answering again");
        }
    }

    fn transition(&self, from: BreakerState, to: BreakerState) -> bool {
        let ok = self.transition_quiet(from, to);
        if ok && let Ok(mut t) = self.inner.since.lock() {
            *t = Instant::now();
        }
        ok
    }

    fn transition_quiet(&self, from: BreakerState, to: BreakerState) -> bool {
        let ok = self
            .inner
            .state
            .compare_exchange(
                from.as_u8(),
                to.as_u8(),
                Ordering::AcqRel,
                Ordering::Acquire,
            )
            .is_ok();
        if ok {
            self.export(to);
            self.inner.tx.send_replace(to);
        }
        ok
    }

    fn export(&self, s: BreakerState) {
        metrics::gauge!("tollgate_redis_breaker_state", "handle" => self.inner.name.clone())
            .set(f64::from(s.as_u8()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn opens_after_threshold_and_closes() {
        let cb = CircuitBreaker::new("t", 3);
        let mut rx = cb.subscribe();
        assert!(cb.allows());
        assert!(!cb.record_failure(true));
        cb.record_success();
        assert!(!cb.record_failure(false));
        assert!(!cb.record_failure(false));
        assert!(cb.record_failure(true), "third consecutive failure opens");
        assert_eq!(cb.state(), BreakerState::Open);
        assert!(rx.has_changed().unwrap_or(false));
        assert_eq!(*rx.borrow_and_update(), BreakerState::Open);
        assert!(!cb.record_failure(true), "already open");
        assert_eq!(cb.times_opened(), 1);
        assert!(cb.begin_probe());
        assert_eq!(cb.state(), BreakerState::HalfOpen);
        cb.probe_failed();
        assert_eq!(cb.state(), BreakerState::Open);
        cb.close();
        assert!(cb.allows());
        assert_eq!(cb.errors(), 2);
        assert_eq!(cb.timeouts(), 3);
    }
}
