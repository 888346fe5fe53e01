//! Every server variant the harness can benchmark, in one place.
//!
//! Each variant serves `GET /api/ping` → `200 {"ok":true}` behind a
//! different stack of layers, so that the difference between a variant and
//! `bare` is the cost of its layers.
//!
//! # Adding a variant
//!
//! 1. Add a [`VariantSpec`] to [`VARIANTS`] (name, whether it needs Redis,
//!    one line saying what it measures).
//! 2. Add a match arm with the same name in [`build`] that returns the
//!    router: start from [`ping_router`] and `.layer(...)` what you measure.
//!    Take the shared Redis handle from [`Deps::redis`]. Configure limits so
//!    that nothing is denied under the benchmark: the point is the cost of
//!    the layer, not of a 429.
//!
//! The runner and `--list` read [`VARIANTS`]; a name there without an arm in
//! [`build`] fails when the server starts.

use std::net::SocketAddr;
use std::sync::{Arc, LazyLock};

use anyhow::{Context as _, bail};
use axum::Router;
use axum::extract::{ConnectInfo, Request, State};
use axum::http::{HeaderName, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use tollgate::cache::{Cache, ResponseCacheLayer, RouteRule};
use tollgate::ratelimit::{Policy, PolicyTable, Quota, RateLimitLayer, RateLimiter};
use tollgate::session::{CookieConfig, Session, SessionLayer, Sessions};
use tollgate::usage::{TenantSource, UsageConfig, UsageLayer, UsageTracker};
use tollgate_redis::fred::interfaces::KeysInterface as _;
use tollgate_redis::{RedisHandle, Script};
use tower::ServiceExt as _;
use tower_governor::GovernorLayer;
use tower_governor::governor::GovernorConfigBuilder;

/// What the runner knows about a variant before it starts the server.
#[derive(Clone, Copy, Debug)]
pub struct VariantSpec {
    /// The name given to `--variant` (server) and `--variants` (runner).
    pub name: &'static str,
    /// Whether the variant talks to Redis: it is skipped when Redis does not
    /// answer, and the runner measures Redis CPU and commands for it.
    pub needs_redis: bool,
    /// One line saying what the variant measures.
    pub about: &'static str,
}

/// All variants, in the order the runner uses by default. `bare` comes
/// first: every ratio in the table is relative to it.
pub const VARIANTS: &[VariantSpec] = &[
    VariantSpec {
        name: "bare",
        needs_redis: false,
        about: "plain axum, no layer: the baseline",
    },
    VariantSpec {
        name: "bare-layer",
        needs_redis: false,
        about: "plain axum with a layer that does nothing (`tower::layer::util::Identity`) added by `Router::layer`: the floor of any layer added that way",
    },
    VariantSpec {
        name: "bare-ratelimit-headers",
        needs_redis: false,
        about: "plain axum whose handler also sends the three `X-RateLimit-*` headers the rate limiter adds, with fixed values: the floor of any limiter that sends them",
    },
    VariantSpec {
        name: "bare-cache-headers",
        needs_redis: false,
        about: "plain axum whose handler also sends the `Age`, `X-Cache` and `Cache-Status` a cache hit carries, with fixed values: the floor of any cache that sends them",
    },
    VariantSpec {
        name: "bare-handoff",
        needs_redis: false,
        about: "plain axum, each request waits for an answer from another task (no Redis): the floor of any layer that waits on a batched round trip",
    },
    VariantSpec {
        name: "governor",
        needs_redis: false,
        about: "tower_governor per-IP limiter (in process), limit never reached",
    },
    VariantSpec {
        name: "governor-headers",
        needs_redis: false,
        about: "tower_governor per-IP limiter with its rate-limit headers on every response (the peer of the fallback, which always sends them)",
    },
    VariantSpec {
        name: "naive-incr",
        needs_redis: true,
        about: "per request: one fred pipeline INCR + EXPIRE on bench:{ip}",
    },
    VariantSpec {
        name: "naive-evalsha",
        needs_redis: true,
        about: "per request: one GCRA EVALSHA through fred",
    },
    VariantSpec {
        name: "ratelimit-exact",
        needs_redis: true,
        about: "tollgate RateLimitLayer, exact GCRA in Redis (coalesced EVALSHA), per IP",
    },
    VariantSpec {
        name: "ratelimit-lease",
        needs_redis: true,
        about: "tollgate RateLimitLayer, lease mode (chunks of 1,000 tokens from Redis)",
    },
    VariantSpec {
        name: "ratelimit-fallback",
        needs_redis: false,
        about: "tollgate RateLimitLayer on its governor fallback (no Redis)",
    },
    VariantSpec {
        name: "usage-batched",
        needs_redis: true,
        about: "tollgate UsageLayer, one tenant, batched flushes to Redis",
    },
    VariantSpec {
        name: "cache-redis-hit",
        needs_redis: true,
        about: "tollgate ResponseCacheLayer, every request a Redis hit",
    },
    VariantSpec {
        name: "cache-l1-hit",
        needs_redis: true,
        about: "tollgate ResponseCacheLayer with an in-process L1 (1 s), every request an L1 hit",
    },
    VariantSpec {
        name: "session-read",
        needs_redis: true,
        about: "tollgate SessionLayer, 1,024 clients each reusing its cookie, the handler reads the session",
    },
    VariantSpec {
        name: "session-rw",
        needs_redis: true,
        about: "tollgate SessionLayer, 1,024 clients each reusing its cookie, the handler reads and writes the session",
    },
    VariantSpec {
        name: "session-read-cached",
        needs_redis: true,
        about: "as session-read, with the in-process session cache kept exact by client tracking",
    },
    VariantSpec {
        name: "session-rw-cached",
        needs_redis: true,
        about: "as session-rw, with the in-process session cache kept exact by client tracking",
    },
    VariantSpec {
        name: "tower-sessions-rw",
        needs_redis: true,
        about: "peer: tower-sessions + tower-sessions-redis-store (fred), 1,024 clients each reusing its cookie, read and write",
    },
];

/// The spec of the variant called `name`.
pub fn find(name: &str) -> Option<&'static VariantSpec> {
    VARIANTS.iter().find(|v| v.name == name)
}

/// What a variant may build on.
#[derive(Clone, Debug, Default)]
pub struct Deps {
    redis: Option<RedisHandle>,
    redis_url: Option<String>,
}

impl Deps {
    /// Dependencies with, or without, a connected Redis handle.
    pub fn new(redis: Option<RedisHandle>) -> Self {
        Deps {
            redis,
            redis_url: None,
        }
    }

    /// Records the Redis URL, for peers that build their own client.
    pub fn with_url(mut self, url: String) -> Self {
        self.redis_url = Some(url);
        self
    }

    /// The shared Redis handle; an error for a variant that needs Redis but
    /// is not declared so in [`VARIANTS`].
    pub fn redis(&self) -> anyhow::Result<RedisHandle> {
        self.redis
            .clone()
            .context("this variant needs Redis: set `needs_redis: true` in VARIANTS")
    }
}

/// The body every variant answers with.
pub const PING_BODY: &str = r#"{"ok":true}"#;

/// The route every variant serves, without any layer.
pub fn ping_router() -> Router {
    Router::new().route("/api/ping", get(ping))
}

async fn ping() -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "application/json")], PING_BODY)
}

/// Builds the router of the variant called `name`.
///
/// Serve it with `into_make_service_with_connect_info::<SocketAddr>()`:
/// per-IP variants read the peer address.
pub async fn build(name: &str, deps: &Deps) -> anyhow::Result<Router> {
    let router = match name {
        "bare" => ping_router(),

        "bare-layer" => ping_router().layer(tower::layer::util::Identity::new()),

        "bare-ratelimit-headers" => Router::new().route(
            "/api/ping",
            get(|| async {
                (
                    [
                        (header::CONTENT_TYPE, "application/json"),
                        (HeaderName::from_static("x-ratelimit-limit"), "1000000"),
                        (HeaderName::from_static("x-ratelimit-remaining"), "999999"),
                        (HeaderName::from_static("x-ratelimit-reset"), "1"),
                    ],
                    PING_BODY,
                )
            }),
        ),

        "bare-cache-headers" => Router::new().route(
            "/api/ping",
            get(|| async {
                (
                    [
                        (header::CONTENT_TYPE, "application/json"),
                        (header::AGE, "0"),
                        (HeaderName::from_static("x-cache"), "HIT"),
                        (
                            HeaderName::from_static("cache-status"),
                            "tollgate; hit; ttl=599",
                        ),
                    ],
                    PING_BODY,
                )
            }),
        ),

        "bare-handoff" => {
            let echo = handoff_echo();
            ping_router().layer(middleware::from_fn(move |req: Request, next: Next| {
                let echo = echo.clone();
                async move {
                    let (tx, rx) = tokio::sync::oneshot::channel();
                    if echo.send(tx).is_err() || rx.await.is_err() {
                        return StatusCode::SERVICE_UNAVAILABLE.into_response();
                    }
                    next.run(req).await
                }
            }))
        }

        "governor" | "governor-headers" => {
            // 1,000,000 per second, burst 1,000,000: never denies under the
            // benchmark, so the table shows the cost of the layer alone.
            let mut config = GovernorConfigBuilder::default();
            config.per_nanosecond(1_000).burst_size(1_000_000);
            if name == "governor" {
                let config = config
                    .finish()
                    .context("tower_governor rejected the configuration")?;
                ping_router().layer(GovernorLayer::new(Arc::new(config)))
            } else {
                // x-ratelimit-* headers on every response, as the fallback.
                let config = config
                    .use_headers()
                    .finish()
                    .context("tower_governor rejected the configuration")?;
                ping_router().layer(GovernorLayer::new(Arc::new(config)))
            }
        }

        "naive-incr" => {
            ping_router().layer(middleware::from_fn_with_state(deps.redis()?, naive_incr))
        }

        "naive-evalsha" => {
            ping_router().layer(middleware::from_fn_with_state(deps.redis()?, naive_evalsha))
        }

        "ratelimit-exact" | "ratelimit-lease" | "ratelimit-fallback" => {
            let table = PolicyTable::builder()
                // 1,000,000 per second with a burst of 1,000,000: never denies here.
                .policy(Policy::new(
                    "bench",
                    Quota::per_second(1_000_000).with_burst(1_000_000),
                ))
                .default_policies(["bench"])
                .build()
                .context("rate-limit table")?;
            let builder = RateLimiter::builder(table);
            let limiter = match name {
                "ratelimit-exact" => builder.redis(deps.redis()?).build(),
                "ratelimit-lease" => builder.redis(deps.redis()?).lease(1_000).build(),
                _ => builder.build(),
            };
            ping_router().layer(RateLimitLayer::new(limiter))
        }

        "usage-batched" => {
            let tracker = UsageTracker::redis(deps.redis()?, UsageConfig::new());
            let layer =
                UsageLayer::new(tracker, TenantSource::from_fn_ref(|_| Some("bench-tenant")));
            ping_router().layer(layer)
        }

        "cache-redis-hit" | "cache-l1-hit" => {
            let mut cache = Cache::builder().redis(deps.redis()?);
            if name == "cache-l1-hit" {
                cache = cache.l1(std::time::Duration::from_secs(1), 16 << 20);
            }
            let layer = ResponseCacheLayer::builder(cache.build())
                .route(RouteRule::new("/api/ping").ttl(std::time::Duration::from_secs(600)))
                .build()
                .context("cache layer")?;
            ping_router().layer(layer)
        }

        "session-read" | "session-rw" | "session-read-cached" | "session-rw-cached" => {
            session_router(
                deps.redis()?,
                name.starts_with("session-rw"),
                name.ends_with("-cached"),
            )
            .await?
        }

        "tower-sessions-rw" => {
            let url = deps
                .redis_url
                .clone()
                .context("the peer needs the Redis URL")?;
            tower_sessions_router(&url).await?
        }

        // Add new variants above this line (and to VARIANTS).
        other => bail!(
            "unknown variant {other:?}; known: {}",
            VARIANTS
                .iter()
                .map(|v| v.name)
                .collect::<Vec<_>>()
                .join(", ")
        ),
    };
    Ok(router)
}

/// A task answering every queued request at once, in batches, the way a
/// coalescer's drainer does, but without any round trip.
fn handoff_echo() -> tokio::sync::mpsc::UnboundedSender<tokio::sync::oneshot::Sender<()>> {
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<tokio::sync::oneshot::Sender<()>>();
    tokio::spawn(async move {
        let mut batch = Vec::with_capacity(256);
        while rx.recv_many(&mut batch, 256).await > 0 {
            for reply in batch.drain(..) {
                let _ = reply.send(());
            }
        }
    });
    tx
}

/// A limit the naive counter never reaches (a trillion per window): it pays
/// for the check, never for a denial.
const NAIVE_LIMIT: i64 = 1_000_000_000_000;

/// What a hand-rolled fixed-window limiter does: INCR and EXPIRE in one
/// pipeline (one round trip) on every request.
async fn naive_incr(
    State(redis): State<RedisHandle>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    req: Request,
    next: Next,
) -> Response {
    let key = format!("bench:{}", peer.ip());
    let count = redis
        .call(|c| async move {
            let pipeline = c.pipeline();
            let () = pipeline.incr(&key).await?;
            let () = pipeline.expire(&key, 60, None).await?;
            pipeline.all::<(i64, i64)>().await
        })
        .await;
    match count {
        Ok((n, _)) if n <= NAIVE_LIMIT => next.run(req).await,
        Ok(_) => StatusCode::TOO_MANY_REQUESTS.into_response(),
        Err(e) => (StatusCode::SERVICE_UNAVAILABLE, e.to_string()).into_response(),
    }
}

static NAIVE_GCRA: LazyLock<Script> =
    LazyLock::new(|| Script::new("bench_naive_gcra", include_str!("lua/naive_gcra.lua")));

/// Emission interval of the naive GCRA: 1 µs, i.e. 1,000,000 per second.
const GCRA_INTERVAL_US: i64 = 1;
/// Burst tolerance of the naive GCRA: a burst of 1,000,000.
const GCRA_TOLERANCE_US: i64 = GCRA_INTERVAL_US * (1_000_000 - 1);

/// What a hand-rolled GCRA limiter does: one EVALSHA per request.
async fn naive_evalsha(
    State(redis): State<RedisHandle>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    req: Request,
    next: Next,
) -> Response {
    let key = format!("bench:gcra:{}", peer.ip());
    let decision: Result<(i64, i64), _> = redis
        .eval(&NAIVE_GCRA, key, vec![GCRA_INTERVAL_US, GCRA_TOLERANCE_US])
        .await;
    match decision {
        Ok((1, _)) => next.run(req).await,
        Ok(_) => StatusCode::TOO_MANY_REQUESTS.into_response(),
        Err(e) => (StatusCode::SERVICE_UNAVAILABLE, e.to_string()).into_response(),
    }
}

/// A session router whose every request carries the same session cookie,
/// as a client reusing its cookie would: the cookie is created once at
/// start-up through the layer, then added to each request by an outer
/// middleware (wrk sends no cookie).
async fn session_router(redis: RedisHandle, write: bool, cached: bool) -> anyhow::Result<Router> {
    let mut sessions = Sessions::builder()
        .redis(redis)
        .secret("tollgate bench secret, 32 bytes or more!!")
        .cookie(CookieConfig::new().secure(false));
    if cached {
        sessions = sessions.local_cache(10_000, std::time::Duration::from_secs(10));
    }
    let sessions = sessions.build().context("sessions")?;
    let handler = move |session: Session| async move {
        let n: u64 = match session.get("n").await {
            Ok(v) => v.unwrap_or(0),
            Err(e) => return (StatusCode::SERVICE_UNAVAILABLE, e.to_string()).into_response(),
        };
        if write && let Err(e) = session.insert("n", &(n + 1)).await {
            return (StatusCode::SERVICE_UNAVAILABLE, e.to_string()).into_response();
        }
        ([(header::CONTENT_TYPE, "application/json")], PING_BODY).into_response()
    };
    let login = |session: Session| async move {
        match session.insert("n", &0u64).await {
            Ok(()) => StatusCode::OK,
            Err(_) => StatusCode::SERVICE_UNAVAILABLE,
        }
    };
    let app = Router::new()
        .route("/api/ping", get(handler))
        .route("/bench/login", get(login))
        .layer(SessionLayer::new(sessions));
    with_login_cookie(app).await
}

/// How many clients the session variants simulate: each reuses its own
/// session cookie, as browsers do. (With one cookie shared by all 64
/// connections every write would race every other one: that measures
/// contention on a single session, not session throughput.)
const SESSION_CLIENTS: usize = 1_024;

/// Logs in [`SESSION_CLIENTS`] times through `app` (`GET /bench/login`) and
/// returns `app` with one of those session cookies added to each request,
/// in turn.
async fn with_login_cookie(app: Router) -> anyhow::Result<Router> {
    let mut cookies = Vec::with_capacity(SESSION_CLIENTS);
    for _ in 0..SESSION_CLIENTS {
        let res = app
            .clone()
            .oneshot(
                axum::http::Request::get("/bench/login")
                    .body(axum::body::Body::empty())
                    .context("login request")?,
            )
            .await
            .context("login")?;
        let cookie = res
            .headers()
            .get(header::SET_COOKIE)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.split(';').next())
            .map(str::to_owned)
            .context("the session layer set no cookie")?;
        cookies.push(axum::http::HeaderValue::from_str(&cookie).context("cookie")?);
    }
    let cookies: Arc<[axum::http::HeaderValue]> = cookies.into();
    let next_client = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    // A plain request map, not `middleware::from_fn` (which boxes a future
    // and a service per request): the stand-in for the browser should cost
    // the server as little as possible, since `bare` does not pay for it.
    Ok(app.layer(tower::util::MapRequestLayer::new(
        move |mut req: Request| {
            let i = next_client.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            req.headers_mut()
                .insert(header::COOKIE, cookies[i % cookies.len()].clone());
            req
        },
    )))
}

/// The same read-and-write handler on tower-sessions with its Redis store
/// (its own fred pool on the same Redis), cookie reused the same way.
async fn tower_sessions_router(url: &str) -> anyhow::Result<Router> {
    use tollgate_redis::fred::interfaces::ClientLike as _;
    use tower_sessions::{Session as PeerSession, SessionManagerLayer};
    // Its own fred pool with fred's defaults (no command deadline), as the
    // peer's documentation sets it up.
    let config =
        tollgate_redis::fred::types::config::Config::from_url(url).context("peer Redis URL")?;
    let pool = tollgate_redis::fred::types::Builder::from_config(config)
        .build_pool(2)
        .context("peer fred pool")?;
    pool.init().await.context("peer fred pool connect")?;
    let store = tower_sessions_redis_store::RedisStore::new(pool);
    let layer = SessionManagerLayer::new(store).with_secure(false);
    let handler = |session: PeerSession| async move {
        let n: u64 = match session.get("n").await {
            Ok(v) => v.unwrap_or(0),
            Err(e) => return (StatusCode::SERVICE_UNAVAILABLE, e.to_string()).into_response(),
        };
        if let Err(e) = session.insert("n", n + 1).await {
            return (StatusCode::SERVICE_UNAVAILABLE, e.to_string()).into_response();
        }
        ([(header::CONTENT_TYPE, "application/json")], PING_BODY).into_response()
    };
    let login = |session: PeerSession| async move {
        match session.insert("n", 0u64).await {
            Ok(()) => StatusCode::OK,
            Err(_) => StatusCode::SERVICE_UNAVAILABLE,
        }
    };
    let app = Router::new()
        .route("/api/ping", get(handler))
        .route("/bench/login", get(login))
        .layer(layer);
    with_login_cookie(app).await
}
