//! tollgate: composable Tower layers that share one Redis client.
//!
//! This facade re-exports each layer behind a feature (all on by default).
//! Every layer takes the same [`redis::RedisHandle`], so one pool, one
//! deadline and one circuit breaker govern them all: when Redis stops
//! answering every layer switches to its in-process fallback at once.
//!
//! ```
//! use tollgate::redis::KeySpace;
//! assert_eq!(KeySpace::new("app", "ratelimit").tagged("ip:1.2.3.4", &["burst"]),
//!            "app:ratelimit:{ip:1.2.3.4}:burst");
//! ```

/// The shared Redis handle: pool, deadline, circuit breaker, scripts,
/// coalescing, health.
pub use tollgate_redis as redis;
