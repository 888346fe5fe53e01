//! The layer stack in the one order that is correct.

use tower::Layer;
use tower::util::Either;

/// The tollgate layers in their fixed order, outermost first: usage
/// tracking → rate limiting → (response cache) → sessions → the handler.
/// Each is optional.
///
/// Why this order: usage must count every request, including the ones the
/// rate limiter refuses (it records those as rate-limit hits); the rate
/// limiter must protect everything behind it, cache and session store
/// included; a cache hit must never touch the session store.
#[derive(Clone, Debug, Default)]
#[must_use]
pub struct Layers {
    #[cfg(feature = "usage")]
    usage: Option<crate::usage::UsageLayer>,
    #[cfg(feature = "ratelimit")]
    rate_limit: Option<crate::ratelimit::RateLimitLayer>,
    #[cfg(feature = "session")]
    session: Option<crate::session::SessionLayer>,
}

impl Layers {
    /// No layers.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds usage tracking (outermost).
    #[cfg(feature = "usage")]
    pub fn usage(mut self, layer: crate::usage::UsageLayer) -> Self {
        self.usage = Some(layer);
        self
    }

    /// Adds rate limiting (inside usage tracking).
    #[cfg(feature = "ratelimit")]
    pub fn rate_limit(mut self, limiter: crate::ratelimit::RateLimiter) -> Self {
        self.rate_limit = Some(crate::ratelimit::RateLimitLayer::new(limiter));
        self
    }

    /// Adds sessions (innermost, next to the handler).
    #[cfg(feature = "session")]
    pub fn session(mut self, sessions: crate::session::Sessions) -> Self {
        self.session = Some(crate::session::SessionLayer::new(sessions));
        self
    }
}

#[cfg(feature = "session")]
type WithSession<S> = Either<crate::session::SessionManager<S>, S>;
#[cfg(not(feature = "session"))]
type WithSession<S> = S;

#[cfg(feature = "ratelimit")]
type WithRateLimit<S> = Either<crate::ratelimit::RateLimit<S>, S>;
#[cfg(not(feature = "ratelimit"))]
type WithRateLimit<S> = S;

#[cfg(feature = "usage")]
type WithUsage<S> = Either<crate::usage::UsageTracking<S>, S>;
#[cfg(not(feature = "usage"))]
type WithUsage<S> = S;

impl<S> Layer<S> for Layers {
    type Service = WithUsage<WithRateLimit<WithSession<S>>>;

    fn layer(&self, inner: S) -> Self::Service {
        #[cfg(feature = "session")]
        let inner = match &self.session {
            Some(l) => Either::Left(l.layer(inner)),
            None => Either::Right(inner),
        };
        #[cfg(feature = "ratelimit")]
        let inner = match &self.rate_limit {
            Some(l) => Either::Left(l.layer(inner)),
            None => Either::Right(inner),
        };
        #[cfg(feature = "usage")]
        let inner = match &self.usage {
            Some(l) => Either::Left(l.layer(inner)),
            None => Either::Right(inner),
        };
        inner
    }
}
