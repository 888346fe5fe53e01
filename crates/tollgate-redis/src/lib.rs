//! The shared Redis handle behind every tollgate layer.
//!
//! One [`RedisHandle`] (a fred pool) serves every layer of a service. It
//! gives each command a deadline, keeps one [`CircuitBreaker`] that sends
//! every layer to its in-process fallback at once when Redis stops
//! answering, runs Lua [`Script`]s with EVALSHA (reloading them after a
//! restart), batches concurrent operations into single round trips with a
//! [`Coalescer`], builds cluster-safe keys with [`KeySpace`], and reports
//! its [`health`](RedisHandle::health) (served as JSON by
//! [`HealthService`]). A [`Subscription`] carries notices between the
//! instances sharing a Redis over pub/sub.
//!
//! ```no_run
//! use std::time::Duration;
//! use tollgate_redis::{RedisConfig, RedisHandle};
//!
//! # async fn demo() -> Result<(), tollgate_redis::Error> {
//! let handle = RedisHandle::connect(
//!     RedisConfig::from_url("redis://127.0.0.1:6379")
//!         .namespace("shop")
//!         .deadline(Duration::from_millis(50)),
//! )
//! .await?;
//! // Starting with Redis down is not an error: the handle starts degraded.
//! println!("breaker: {}", handle.breaker().state());
//! # Ok(()) }
//! ```
#![warn(clippy::unwrap_used)]

mod breaker;
mod coalesce;
mod config;
pub mod counters;
mod error;
mod handle;
pub mod header_value;
mod health;
mod keys;
pub mod local;
mod readied;
mod route;
mod script;
mod sentinel;
mod subscription;
mod tracking;

pub use breaker::{BreakerState, CircuitBreaker};
pub use coalesce::{BatchConn, BatchOp, CoalesceConfig, Coalescer, GetOp};
pub use config::{RedisConfig, Topology};
pub use error::Error;
pub use handle::{FollowPrimary, RedisHandle, quit_in_background};
pub use health::{
    HealthReport, HealthService, HealthStatus, LayerHealth, LayerMode, LocalCacheHealth,
};
pub use keys::{KeySpace, hex_lower, prefixed_hex, slot};
pub use readied::take_readied;
pub use route::{RoutePattern, RoutePatternError};
pub use script::Script;
pub use subscription::{Notice, Subscription};
pub use tracking::{Invalidate, TrackedConnection};

/// The fred crate this handle is built on, for callers that need its types.
pub use fred;
