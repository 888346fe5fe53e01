//! What a rate-limit check concluded.

use std::sync::Arc;
use std::time::Duration;

use crate::quota::{Algorithm, Quota, Status, Verdict, ceil_secs};

/// One policy's verdict on one request.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Outcome {
    /// Within the limit.
    Allowed,
    /// Over the limit.
    Denied,
    /// Over the limit, but the policy is in shadow mode: not enforced.
    ShadowDenied,
    /// The request's cost exceeds the policy's capacity: it can never
    /// conform, retrying does not help.
    ExceedsCapacity,
}

/// Where a decision was made.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Source {
    /// In Redis, shared by every instance.
    Redis,
    /// In the in-process store: Redis is down (fallback) or not configured.
    Memory,
    /// Answered from the local deny cache without asking Redis.
    DenyCache,
    /// From tokens leased from Redis and spent locally.
    Lease,
    /// Redis is down and the policy fails open: not limited.
    FailOpen,
}

/// One policy's decision: what goes into the `X-RateLimit-*` headers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Decision {
    /// The policy's name.
    pub policy: Arc<str>,
    /// Whether this policy lets the request through (shadow denials do).
    pub allowed: bool,
    /// The detailed verdict.
    pub outcome: Outcome,
    /// The capacity (`X-RateLimit-Limit`): burst for GCRA, limit for windows.
    pub limit: u64,
    /// Requests left right now (`X-RateLimit-Remaining`).
    pub remaining: u64,
    /// Seconds until the quota is fully available again
    /// (`X-RateLimit-Reset`), rounded up.
    pub reset: u64,
    /// Seconds to wait before retrying (denials only), rounded up, at
    /// least 1.
    pub retry_after: Option<u64>,
    /// The time the whole capacity takes to come back, the IETF `w`
    /// parameter that goes with `limit` as `q`: the period for the window
    /// algorithms; for GCRA the burst times the emission interval (the
    /// period when the burst is the limit).
    pub window: Duration,
    /// Where it was decided.
    pub source: Source,
    /// Whether the policy is in shadow mode (counted, never enforced). A
    /// shadow policy's figures are not sent in the headers while an
    /// enforced policy applies to the request.
    pub shadow: bool,
    pub(crate) reset_us: u64,
    pub(crate) retry_us: u64,
}

impl Decision {
    pub(crate) fn from_verdict(
        policy: &Arc<str>,
        quota: &Quota,
        algorithm: Algorithm,
        v: Verdict,
        source: Source,
    ) -> Self {
        let outcome = match v.status {
            Status::Allowed => Outcome::Allowed,
            Status::Denied => Outcome::Denied,
            Status::ShadowDenied => Outcome::ShadowDenied,
            Status::ExceedsCapacity => Outcome::ExceedsCapacity,
        };
        let limit = u64::from(quota.capacity(algorithm));
        Decision {
            policy: tollgate_redis::local::local_str(policy),
            allowed: matches!(outcome, Outcome::Allowed | Outcome::ShadowDenied),
            outcome,
            limit,
            remaining: v.remaining.min(limit),
            reset: ceil_secs(v.reset_us),
            retry_after: (outcome == Outcome::Denied).then(|| ceil_secs(v.retry_us).max(1)),
            window: window_of(quota, algorithm),
            source,
            shadow: false,
            reset_us: v.reset_us,
            retry_us: v.retry_us,
        }
    }

    /// The same decision, of a policy in shadow mode when `shadow`.
    pub(crate) fn in_shadow(mut self, shadow: bool) -> Self {
        self.shadow = shadow;
        self
    }

    /// A copy holding this thread's own copy of the policy name
    /// ([`tollgate_redis::local`]).
    pub(crate) fn local_copy(&self) -> Self {
        Decision {
            policy: tollgate_redis::local::local_str(&self.policy),
            ..*self
        }
    }

    /// A decision for a policy that fails open while Redis is down.
    pub(crate) fn fail_open(policy: &Arc<str>, quota: &Quota, algorithm: Algorithm) -> Self {
        let limit = u64::from(quota.capacity(algorithm));
        Decision {
            policy: tollgate_redis::local::local_str(policy),
            allowed: true,
            outcome: Outcome::Allowed,
            limit,
            remaining: limit,
            reset: 0,
            retry_after: None,
            window: window_of(quota, algorithm),
            source: Source::FailOpen,
            shadow: false,
            reset_us: 0,
            retry_us: 0,
        }
    }
}

/// The time `quota`'s capacity under `algorithm` takes to come back.
fn window_of(quota: &Quota, algorithm: Algorithm) -> Duration {
    match algorithm {
        Algorithm::Gcra => {
            Duration::from_micros(quota.t_us().saturating_mul(u64::from(quota.burst())))
        }
        _ => quota.period(),
    }
}

/// The verdict on a whole request (all of its policies).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RequestVerdict {
    /// Let through.
    Allow,
    /// Refused: over the limit.
    Deny,
    /// Refused: the cost exceeds a policy's capacity.
    ExceedsCapacity,
    /// Refused: Redis is down and a policy fails closed.
    Unavailable,
}

/// Everything a check concluded about one request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Report {
    /// The route's label (pattern or template).
    pub route: Arc<str>,
    /// The overall verdict.
    pub verdict: RequestVerdict,
    /// One decision per policy that applied, in table order.
    pub decisions: Vec<Decision>,
}

impl Report {
    /// Whether the request goes through.
    pub fn allowed(&self) -> bool {
        self.verdict == RequestVerdict::Allow
    }

    /// The most constraining decision: on a denial the enforced denial with
    /// the longest wait; otherwise the enforced decision with the fewest
    /// remaining (ties: the longest reset), a shadow policy's only when
    /// every policy of the request is in shadow mode.
    pub fn most_constraining(&self) -> Option<&Decision> {
        let wanted = match self.verdict {
            RequestVerdict::Deny => Some(Outcome::Denied),
            RequestVerdict::ExceedsCapacity => Some(Outcome::ExceedsCapacity),
            _ => None,
        };
        if let Some(o) = wanted
            && let Some(d) = self
                .decisions
                .iter()
                .filter(|d| d.outcome == o)
                .max_by_key(|d| d.retry_us)
        {
            return Some(d);
        }
        let fewest = |shadow: bool| {
            self.decisions
                .iter()
                .filter(|d| d.shadow == shadow)
                .min_by(|a, b| {
                    a.remaining
                        .cmp(&b.remaining)
                        .then(b.reset_us.cmp(&a.reset_us))
                })
        };
        fewest(false).or_else(|| fewest(true))
    }
}
