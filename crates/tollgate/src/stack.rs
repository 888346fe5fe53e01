//! The layer stack in the one order that is correct.

use tower::Layer;
use tower::util::Either;

/// The tollgate layers in their fixed order, outermost first: usage
/// tracking → rate limiting → response cache → sessions → the handler.
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
    #[cfg(feature = "cache")]
    cache: Option<crate::cache::ResponseCacheLayer>,
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

    /// Adds the response cache (inside rate limiting, outside sessions: a
    /// hit never touches the session store).
    #[cfg(feature = "cache")]
    pub fn cache(mut self, layer: crate::cache::ResponseCacheLayer) -> Self {
        self.cache = Some(layer);
        self
    }

    /// Adds sessions (innermost, next to the handler).
    #[cfg(feature = "session")]
    pub fn session(mut self, sessions: crate::session::Sessions) -> Self {
        self.session = Some(crate::session::SessionLayer::new(sessions));
        self
    }
}

#[cfg(feature = "cache")]
type WithCache<S> = Either<crate::cache::ResponseCache<S>, Passthrough<S>>;
#[cfg(not(feature = "cache"))]
type WithCache<S> = S;

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
    type Service = WithUsage<WithRateLimit<WithCache<WithSession<S>>>>;

    fn layer(&self, inner: S) -> Self::Service {
        #[cfg(feature = "session")]
        let inner = match &self.session {
            Some(l) => Either::Left(l.layer(inner)),
            None => Either::Right(inner),
        };
        #[cfg(feature = "cache")]
        let inner = match &self.cache {
            Some(l) => Either::Left(l.layer(inner)),
            None => Either::Right(Passthrough { inner }),
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

/// Without the cache layer, gives responses the body type the cache layer
/// would have given them, so the stack has one type either way.
#[cfg(feature = "cache")]
#[derive(Clone, Debug)]
pub struct Passthrough<S> {
    inner: S,
}

#[cfg(feature = "cache")]
impl<S, Req, B> tower::Service<Req> for Passthrough<S>
where
    S: tower::Service<Req, Response = http::Response<B>>,
{
    type Response = http::Response<crate::cache::CacheBody<B>>;
    type Error = S::Error;
    type Future = futures::future::MapOk<S::Future, fn(http::Response<B>) -> Self::Response>;

    fn poll_ready(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Req) -> Self::Future {
        use futures::TryFutureExt;
        self.inner
            .call(req)
            .map_ok(|res: http::Response<B>| res.map(crate::cache::CacheBody::passthrough))
    }
}
