//! `SessionLayer`: server-side sessions for Tower services (axum, tonic,
//! hyper), kept in Redis through the shared [`tollgate_redis`] handle, with
//! a bounded in-memory fallback. A drop-in for `tower-sessions` +
//! `tower-sessions-redis-store`.
//!
//! - **Opaque ids**: 256 bits from a CSPRNG, URL-safe base64, in a cookie
//!   with secure defaults (`HttpOnly`, `Secure`, `SameSite=Lax`, `Path=/`;
//!   `__Host-` prefix validated) or in a header (`x-session-id`, usable as
//!   gRPC metadata). Optional HMAC signing with a key ring for rotation: a
//!   tampered value costs no store lookup.
//! - **Redis never sees a raw id**: records are keyed by
//!   HMAC-SHA256(secret, id). Records are readable JSON (entries,
//!   `created_at`, `last_seen`, `expires_at`, user, user agent, IP,
//!   generation).
//! - **Lazy and minimal**: a handler that never touches the [`Session`]
//!   costs no command; a read costs one; a read and a write two; creating a
//!   session one; logging out one. Saves merge only the changed entries
//!   (two concurrent requests writing different keys both survive) and
//!   never resurrect a session destroyed mid-request.
//! - **Timeouts enforced server side**: idle (sliding, touch throttled so
//!   reads do not rewrite the record) and absolute, whatever the client
//!   replays.
//! - **Login and logout**: [`Session::rotate_id`], [`Session::destroy`];
//!   per-user index: [`Sessions::list`], [`Sessions::revoke`],
//!   [`Sessions::revoke_all`].
//! - **Redis down**: the bounded in-memory store serves sessions created
//!   during the outage (never ids that live in Redis, so a revoked session
//!   cannot come back), or the layer fails closed with 503
//!   ([`FailureMode`]). Health reports the `session` layer's mode.
//!
//! ```
//! use axum::{Router, routing::get};
//! use tollgate_session::{Session, SessionLayer, Sessions};
//! use tower::ServiceExt;
//!
//! async fn visit(session: Session) -> Result<String, tollgate_session::Error> {
//!     let n: u64 = session.get("visits").await?.unwrap_or(0) + 1;
//!     session.insert("visits", &n).await?;
//!     Ok(n.to_string())
//! }
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() {
//! // In process (no Redis); with Redis:
//! // Sessions::builder().redis(handle).secret(secret).build()?
//! let app = Router::new()
//!     .route("/", get(visit))
//!     .layer(SessionLayer::new(Sessions::in_memory()));
//!
//! let res = app.clone().oneshot(http::Request::new(axum::body::Body::empty())).await.unwrap();
//! let cookie = res.headers()["set-cookie"].to_str().unwrap().to_owned();
//! assert!(cookie.contains("HttpOnly") && cookie.contains("Secure") && cookie.contains("SameSite=Lax"));
//!
//! let pair = cookie.split(';').next().unwrap();
//! let req = http::Request::builder().header("cookie", pair).body(axum::body::Body::empty()).unwrap();
//! let res = app.oneshot(req).await.unwrap();
//! let body = axum::body::to_bytes(res.into_body(), 64).await.unwrap();
//! assert_eq!(body, "2");
//! # }
//! ```
//!
//! # Metrics
//!
//! Counters (`metrics` facade): `tollgate_session_loads_total{store,result}`,
//! `tollgate_session_saves_total{store,result}`,
//! `tollgate_session_creates_total{store}`,
//! `tollgate_session_rotations_total{store}`,
//! `tollgate_session_destroys_total{store}`,
//! `tollgate_session_revocations_total{store}`,
//! `tollgate_session_write_conflicts_total{store}`,
//! `tollgate_session_store_errors_total{store,op}`,
//! `tollgate_session_fallback_total{op}`. `store` is `redis`, `memory` or
//! `fallback`.
#![warn(clippy::unwrap_used)]

mod config;
mod error;
mod future;
mod id;
mod layer;
mod service;
mod session;
pub mod store;
mod transport;

pub use config::{DEFAULT_MAX_DATA_BYTES, FailureMode, MIN_SECRET_LEN, Sessions, SessionsBuilder};
pub use error::Error;
pub use future::ResponseFuture;
pub use layer::SessionLayer;
pub use service::SessionManager;
pub use session::Session;
pub use store::{SessionInfo, Timeouts};
pub use transport::{CookieConfig, SameSite, Transport};
