//! `ResponseCacheLayer` and `get_or_compute`: an HTTP cache in Redis (or in
//! process) that never leaks, never hangs, and invalidates by tag.
//!
//! - RFC 9111 shared-cache rules (through `http-cache-semantics`): GET and
//!   HEAD only; `Cache-Control` (`no-store`, `private`, `no-cache`,
//!   `max-age`, `s-maxage`, `must-revalidate`, `stale-while-revalidate`,
//!   `stale-if-error`) and `Expires` honoured; `Age` on hits; `Vary` (one
//!   entry per variant, `Vary: *` never stored); `ETag`/`Last-Modified`
//!   answer conditional requests with 304. A response with `no-cache` is
//!   not stored (it could never be served without revalidation).
//! - Safe by default: a response with `Set-Cookie` is never stored; a
//!   request carrying `Authorization` or `Cookie` is only served responses
//!   marked `public`, unless its route caches [per user](RouteRule::per_user);
//!   only allowlisted hosts are cached when an allowlist is set; a request
//!   whose URI authority and `Host` header disagree is not cached; request
//!   headers that could change a response without being keyed
//!   (`Forwarded`, `X-Forwarded-Host`, `X-Forwarded-Proto`, ...) prevent
//!   storing.
//! - Key: method (HEAD reads GET's entry and never stores), scheme, host,
//!   path, normalised query (sorted, tracking parameters dropped, bounded),
//!   the hashed user (per-user routes), the Vary'd headers.
//! - Per-route [`RouteRule`]s (TTL when the origin gives none, default 5
//!   minutes; tags; opt-ins), tags from the `x-cache-tags` response header
//!   (removed before the response leaves), [`Cache::invalidate_tag`], and a
//!   successful POST/PUT/PATCH/DELETE invalidates every stored response of
//!   its path. Never `KEYS` or `SCAN`.
//! - Request coalescing (one origin call per key per instance, waiters
//!   bounded), stale-while-revalidate (one background refresh per key),
//!   stale-if-error, a body size cap (bigger responses stream through), an
//!   optional in-process L1 kept coherent by Redis pub/sub.
//! - `Cache-Status` (RFC 9211) and `X-Cache: HIT | MISS | STALE | BYPASS`;
//!   metrics by route template: `tollgate_cache_requests_total{route,
//!   outcome}`, `tollgate_cache_store_errors_total{op}`,
//!   `tollgate_cache_stored_bytes_total`,
//!   `tollgate_cache_invalidations_dropped_total`.
//! - Redis down (breaker open) or slower than the handle's deadline: the
//!   request goes to the origin (`X-Cache: BYPASS`), never a 5xx; the cache
//!   comes back by itself. Invalidations that failed meanwhile run again
//!   first, and the cache is not read until they have.
//!
//! ```
//! use std::time::Duration;
//! use bytes::Bytes;
//! use http_body_util::{BodyExt, Full};
//! use tollgate_cache::{Cache, ResponseCacheLayer, RouteRule};
//! use tower::{ServiceBuilder, ServiceExt, service_fn};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() {
//! // In process here; `Cache::redis(handle)` shares it between instances.
//! let cache = Cache::memory();
//! let layer = ResponseCacheLayer::builder(cache.clone())
//!     .route(RouteRule::new("/campaigns/{id}").ttl(Duration::from_secs(300)).tags(["campaigns"]))
//!     .build()
//!     .unwrap();
//! let svc = ServiceBuilder::new().layer(layer).service(service_fn(|_req: http::Request<()>| async {
//!     Ok::<_, std::convert::Infallible>(http::Response::new(Full::new(Bytes::from("church-42"))))
//! }));
//! let get = || http::Request::get("/campaigns/42").header("host", "example.com").body(()).unwrap();
//!
//! let res = svc.clone().oneshot(get()).await.unwrap();
//! assert_eq!(res.headers()["x-cache"], "MISS");
//! res.into_body().collect().await.unwrap(); // stored once the body has been read
//! # tokio::time::sleep(Duration::from_millis(20)).await;
//! let res = svc.clone().oneshot(get()).await.unwrap();
//! assert_eq!(res.headers()["x-cache"], "HIT");
//! assert_eq!(res.headers()["cache-status"], "tollgate; hit; ttl=299");
//! assert_eq!(res.into_body().collect().await.unwrap().to_bytes(), "church-42");
//!
//! // A donation landed: drop every campaign response, on every instance.
//! assert_eq!(cache.invalidate_tag("campaigns").await.unwrap(), 1);
//! let res = svc.clone().oneshot(get()).await.unwrap();
//! assert_eq!(res.headers()["x-cache"], "MISS");
//! # }
//! ```
//!
//! # Consistency notes
//!
//! A fill that started before an invalidation may store its (older)
//! response after it; the entry then lives until its TTL. L1 copies may
//! outlive an overwrite (not an invalidation) by the L1 TTL. Tag expiry
//! scores use each instance's clock.
#![cfg_attr(not(test), warn(clippy::unwrap_used))]

mod body;
mod cache;
mod entry;
mod error;
mod flight;
mod flow;
mod future;
mod key;
mod l1;
mod layer;
mod pending;
mod route;
mod service;
mod store;

pub use body::CacheBody;
pub use cache::{Cache, CacheBuilder};
pub use error::Error;
pub use flow::{CACHE_STATUS, X_CACHE};
pub use future::ResponseFuture;
pub use layer::{RequestDirectives, ResponseCacheLayer, ResponseCacheLayerBuilder};
pub use route::{RoutePattern, RouteRule, UserKey};
pub use service::ResponseCache;
pub use store::{MemoryStore, RedisStore, Store};
