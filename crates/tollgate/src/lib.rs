//! tollgate: composable Tower layers that share one Redis client.
//!
//! This facade re-exports each layer behind a feature (all on by default)
//! and gives one [`Tollgate`] value that owns the shared
//! [`redis::RedisHandle`] (or none: everything in process) and wires it
//! into every layer. One pool, one deadline and one circuit breaker govern
//! them all: when Redis stops answering every layer switches to its
//! in-process fallback at once.
//!
//! Layer order, outermost first: usage tracking (counts every request,
//! denials included) → rate limiting (protects everything behind it) →
//! response cache → sessions → the handler. [`Layers`] applies that order
//! whatever order you hand it the layers in.
//!
//! ```
//! use tollgate::Tollgate;
//! use tollgate::ratelimit::{Policy, PolicyTable, Quota};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() {
//! // No REDIS_URL: in process. With one: `Tollgate::connect(Some(url)).await?`.
//! let tg = Tollgate::in_process();
//! let table = PolicyTable::builder()
//!     .policy(Policy::new("api", Quota::per_minute(100)))
//!     .default_policies(["api"])
//!     .build()
//!     .unwrap();
//! let layers = tg.layers().rate_limit(tg.rate_limiter(table).build());
//! assert!(tg.redis().is_none());
//! # let _ = layers;
//! # }
//! ```

use tollgate_redis::{HealthService, RedisConfig, RedisHandle};

/// The shared Redis handle: pool, deadline, circuit breaker, scripts,
/// coalescing, health.
pub use tollgate_redis as redis;

/// Rate limiting.
#[cfg(feature = "ratelimit")]
pub use tollgate_ratelimit as ratelimit;

/// Usage tracking.
#[cfg(feature = "usage")]
pub use tollgate_usage as usage;

/// Sessions.
#[cfg(feature = "session")]
pub use tollgate_session as session;

/// Response caching and `get_or_compute`.
#[cfg(feature = "cache")]
pub use tollgate_cache as cache;

mod stack;

pub use stack::Layers;

/// The shared state of a tollgate deployment: the Redis handle every layer
/// uses, or none (everything in process).
#[derive(Clone, Debug)]
pub struct Tollgate {
    redis: Option<RedisHandle>,
}

impl Tollgate {
    /// Everything in process (no Redis): fine for one instance, and what
    /// the demo does when `REDIS_URL` is unset. State is per process.
    pub fn in_process() -> Self {
        Tollgate { redis: None }
    }

    /// Uses an existing handle.
    pub fn with_handle(handle: RedisHandle) -> Self {
        Tollgate {
            redis: Some(handle),
        }
    }

    /// Connects to `url` (any form [`RedisConfig::from_url`] takes), or runs
    /// in process when `url` is `None`. An unreachable Redis is not an
    /// error: the handle starts degraded and recovers by itself.
    pub async fn connect(url: Option<&str>) -> Result<Self, redis::Error> {
        match url {
            Some(u) => Self::connect_with(RedisConfig::from_url(u)).await,
            None => Ok(Self::in_process()),
        }
    }

    /// Connects with a full configuration.
    pub async fn connect_with(config: RedisConfig) -> Result<Self, redis::Error> {
        Ok(Self::with_handle(RedisHandle::connect(config).await?))
    }

    /// The shared handle, if Redis is configured.
    pub fn redis(&self) -> Option<&RedisHandle> {
        self.redis.as_ref()
    }

    /// `GET /health/redis`: the handle's health, or an in-process report
    /// listing `layers`.
    pub fn health_service(&self, layers: &[&'static str]) -> HealthService {
        match &self.redis {
            Some(h) => {
                for l in layers {
                    h.register_layer(l);
                }
                HealthService::new(h.clone())
            }
            None => HealthService::in_process(layers),
        }
    }

    /// A rate limiter builder for `table`, wired to the shared handle.
    #[cfg(feature = "ratelimit")]
    pub fn rate_limiter(&self, table: ratelimit::PolicyTable) -> ratelimit::RateLimiterBuilder {
        let b = ratelimit::RateLimiter::builder(table);
        match &self.redis {
            Some(h) => b.redis(h.clone()),
            None => b,
        }
    }

    /// A usage tracker on the shared handle (or in memory). Call
    /// [`shutdown`](usage::UsageTracker::shutdown) on it before exiting.
    #[cfg(feature = "usage")]
    pub fn usage_tracker(&self, config: usage::UsageConfig) -> usage::UsageTracker {
        match &self.redis {
            Some(h) => usage::UsageTracker::redis(h.clone(), config),
            None => usage::UsageTracker::in_memory(config),
        }
    }

    /// A sessions builder wired to the shared handle (give it a
    /// [`secret`](session::SessionsBuilder::secret) when Redis is used).
    #[cfg(feature = "session")]
    pub fn sessions(&self) -> session::SessionsBuilder {
        let b = session::Sessions::builder();
        match &self.redis {
            Some(h) => b.redis(h.clone()),
            None => b,
        }
    }

    /// A cache on the shared handle (or in memory), for `get_or_compute`
    /// and [`ResponseCacheLayer`](cache::ResponseCacheLayer).
    #[cfg(feature = "cache")]
    pub fn cache(&self) -> cache::Cache {
        match &self.redis {
            Some(h) => cache::Cache::redis(h.clone()),
            None => cache::Cache::memory(),
        }
    }

    /// An empty layer stack; add layers and `.layer()` it onto a router.
    pub fn layers(&self) -> Layers {
        Layers::new()
    }
}
