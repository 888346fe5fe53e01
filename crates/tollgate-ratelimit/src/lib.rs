//! `RateLimitLayer`: per-route rate limiting for Tower services (axum,
//! tonic, hyper), decided exactly in Redis with an in-process `governor`
//! fallback.
//!
//! - A [`PolicyTable`] maps route patterns (+ method) to named
//!   [`Policy`]s; several policies on one request are decided
//!   **all-or-nothing in one Redis round trip** (one EVALSHA; nothing is
//!   consumed if any denies). Concurrent requests are coalesced into one
//!   script call per batch.
//! - Algorithms: GCRA (default, the same maths as `governor`), sliding
//!   window, fixed window; a cost per request (0 peeks).
//! - Every response of a limited route carries `X-RateLimit-Limit`,
//!   `X-RateLimit-Remaining`, `X-RateLimit-Reset` (seconds) for the most
//!   constraining policy; a denial is a 429 with `Retry-After` and an
//!   `application/problem+json` body, or for gRPC an HTTP 200 with
//!   `grpc-status: 8`. `X-RateLimit-Policy` (the reported policy's name)
//!   and the IETF `RateLimit-Policy`/`RateLimit` fields are optional
//!   ([`RateLimiterBuilder::policy_header`],
//!   [`RateLimiterBuilder::ietf_headers`]).
//! - While Redis is down each policy follows its [`FailureMode`]: the
//!   in-process fallback (default), fail open, or fail closed (503).
//! - Identity comes from a [`KeyExtractor`]: [`PeerIp`] (trusted proxies,
//!   IPv6 /56 grouping), [`HeaderKey`], [`ExtensionKey`], [`key_fn`].
//!
//! ```
//! use std::net::SocketAddr;
//! use tollgate_ratelimit::{Policy, PolicyTable, Quota, RateLimitLayer, RateLimiter};
//! use tower::{ServiceBuilder, ServiceExt, service_fn};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() {
//! let table = PolicyTable::builder()
//!     .policy(Policy::new("api", Quota::per_minute(2)))
//!     .default_policies(["api"])
//!     .build()
//!     .unwrap();
//! // No Redis configured: decisions are made in process.
//! let limiter = RateLimiter::builder(table).build();
//! let svc = ServiceBuilder::new()
//!     .layer(RateLimitLayer::new(limiter))
//!     .service(service_fn(|_req: http::Request<()>| async {
//!         Ok::<_, std::convert::Infallible>(http::Response::new(http_body_util::Full::new(bytes::Bytes::from("hello"))))
//!     }));
//!
//! let request = || {
//!     let mut r = http::Request::new(());
//!     r.extensions_mut().insert("203.0.113.7:4000".parse::<SocketAddr>().unwrap());
//!     r
//! };
//! let res = svc.clone().oneshot(request()).await.unwrap();
//! assert_eq!(res.status(), 200);
//! assert_eq!(res.headers()["x-ratelimit-limit"], "2");
//! assert_eq!(res.headers()["x-ratelimit-remaining"], "1");
//! svc.clone().oneshot(request()).await.unwrap();
//! let res = svc.clone().oneshot(request()).await.unwrap();
//! assert_eq!(res.status(), 429);
//! assert_eq!(res.headers()["retry-after"], "30");
//! assert_eq!(res.headers()["content-type"], "application/problem+json");
//! # }
//! ```
//!
//! # Modes and guarantees
//!
//! *Exact* (the default with Redis): every decision is made in Redis, so
//! N instances sharing one Redis admit exactly the quota. While Redis is
//! unavailable, the fallback limits per instance (divide with
//! [`RateLimiterBuilder::fallback_divisor`]); in the fallback, a request
//! with several GCRA policies may be charged on the first ones when a later
//! one denies (governor has no refund).
//!
//! *Lease* ([`RateLimiterBuilder::lease`]): each instance takes `chunk`
//! tokens at a time from Redis and spends them locally, at most one lease
//! request per identity in flight per instance. Overshoot is bounded by
//! `chunk × instances` (tokens are debited before they are spent; an
//! instance holds at most one chunk per identity); for generous limits
//! where throughput matters more than the last token.
//!
//! With tonic (`Server::builder().layer(...)`): the layer builds its
//! refusals from bytes, which `tonic::body::Body` cannot be, so map the
//! routes' body (e.g. `.map_response(|r| r.map(axum::body::Body::new))`
//! under the layer); and tonic records the peer as `TcpConnectInfo`, which
//! [`PeerIp`] does not read: key with [`key_fn`] (see `tests/tonic.rs`).
//!
//! One identity per layer: all policies of a request are keyed by the same
//! identity (one hash tag, so one cluster slot). To limit per IP *and* per
//! tenant, stack two layers.
#![cfg_attr(not(test), warn(clippy::unwrap_used))]

mod decision;
mod error;
mod future;
mod headers;
mod key;
mod layer;
mod limiter;
mod policy;
mod quota;
mod route;
mod service;
mod store;
mod telemetry;

pub use decision::{Decision, Outcome, Report, RequestVerdict, Source};
pub use error::{ConfigError, Error};
pub use future::ResponseFuture;
pub use headers::{
    RATELIMIT, RATELIMIT_POLICY, X_RATELIMIT_LIMIT, X_RATELIMIT_POLICY, X_RATELIMIT_REMAINING,
    X_RATELIMIT_RESET,
};
pub use key::{
    ExtensionKey, FnKey, HeaderKey, KeyExtractor, PeerIp, ProxyHeader, RequestView, key_fn,
};
pub use layer::RateLimitLayer;
pub use limiter::{Cost, MissingKey, Plan, RateLimiter, RateLimiterBuilder};
pub use policy::{
    FailureMode, PlanConfig, PlanQuota, Policy, PolicyConfig, PolicyTable, PolicyTableBuilder,
    RouteConfig, RouteRule, TableConfig,
};
pub use quota::{Algorithm, Quota};
pub use route::RoutePattern;
pub use service::RateLimit;
