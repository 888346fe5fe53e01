//! The tollgate showcase service, as a library so tests can run it in
//! process. The binary (`src/main.rs`) only parses arguments, installs the
//! Prometheus recorder and serves.

use std::net::SocketAddr;

use axum::Router;
use axum::routing::{get, post};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use tollgate::Tollgate;
use tollgate::cache::{Cache, ResponseCacheLayer, RouteRule};
use tollgate::redis::{RedisConfig, RedisHandle};
use tollgate::session::{CookieConfig, Sessions};
use tollgate::usage::{TenantSource, UsageConfig, UsageLayer, UsageTracker};

mod catalog;
pub mod limits;
mod routes;

pub use catalog::Catalog;

pub use routes::DemoState;

/// Layers the demo wires; reported by `/health/redis`.
pub const LAYERS: &[&str] = &["ratelimit", "usage", "cache", "session"];

/// Why the demo could not start.
#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    /// A command-line argument or environment variable is unusable.
    #[error("{0}")]
    Usage(String),
    /// Redis was configured but cannot be used (bad URL, wrong password).
    /// An unreachable Redis is not an error: the demo starts degraded.
    #[error("REDIS_URL is unusable: {0}")]
    Redis(#[from] tollgate::redis::Error),
    /// The session configuration was refused (e.g. a short SESSION_SECRET).
    #[error("session configuration: {0}")]
    Session(#[from] tollgate::session::Error),
    /// Serving failed.
    #[error("server error: {0}")]
    Io(#[from] std::io::Error),
}

/// Where to listen and which Redis to use.
#[derive(Clone, Debug)]
pub struct DemoConfig {
    /// Listen address (default 127.0.0.1:3000).
    pub addr: SocketAddr,
    /// `REDIS_URL`; `None` runs everything in process.
    pub redis_url: Option<String>,
}

impl DemoConfig {
    /// Reads `TOLLGATE_ADDR`, `REDIS_URL` and `--addr HOST:PORT` (the flag
    /// wins over the variable).
    pub fn from_env_and_args(args: impl IntoIterator<Item = String>) -> Result<Self, DemoError> {
        let mut addr = std::env::var("TOLLGATE_ADDR").ok();
        let mut args = args.into_iter();
        while let Some(a) = args.next() {
            match a.as_str() {
                "--addr" => {
                    addr = Some(
                        args.next()
                            .ok_or_else(|| DemoError::Usage("--addr needs HOST:PORT".into()))?,
                    );
                }
                s if s.starts_with("--addr=") => addr = Some(s["--addr=".len()..].to_owned()),
                other => return Err(DemoError::Usage(format!("unknown argument `{other}`"))),
            }
        }
        let addr = match addr {
            Some(a) => a
                .parse()
                .map_err(|e| DemoError::Usage(format!("bad listen address `{a}`: {e}")))?,
            None => SocketAddr::from(([127, 0, 0, 1], 3000)),
        };
        let redis_url = std::env::var("REDIS_URL")
            .ok()
            .filter(|u| !u.trim().is_empty());
        Ok(DemoConfig { addr, redis_url })
    }
}

/// Installs the global Prometheus recorder (once per process) and returns
/// its handle for `/metrics`.
pub fn install_metrics() -> PrometheusHandle {
    static HANDLE: std::sync::OnceLock<PrometheusHandle> = std::sync::OnceLock::new();
    HANDLE
        .get_or_init(|| {
            PrometheusBuilder::new()
                .install_recorder()
                // Another recorder was installed first (an embedding app):
                // serve an empty registry rather than fail.
                .unwrap_or_else(|_| PrometheusBuilder::new().build_recorder().handle())
        })
        .clone()
}

/// Sessions on the shared handle. The secret keys the hashes under which
/// sessions are stored, so it must survive restarts: `SESSION_SECRET` (at
/// least 32 bytes) when set; otherwise, with Redis, one generated once and
/// kept in Redis (a demo convenience: in production, give it from a secret
/// store); in process, a random one. The cookie drops `Secure` when the
/// demo listens on loopback, so plain-http `curl` and browsers keep it.
/// With Redis, records are also cached in process.
async fn sessions(tollgate: &Tollgate, config: &DemoConfig) -> Result<Sessions, DemoError> {
    let secret = match std::env::var("SESSION_SECRET")
        .ok()
        .filter(|s| !s.is_empty())
    {
        Some(s) => s.into_bytes(),
        None => match tollgate.redis() {
            Some(h) => shared_secret(h).await,
            None => random_secret(),
        },
    };
    let cookie = CookieConfig::new()
        .name("tollgate_demo")
        .secure(!config.addr.ip().is_loopback());
    // With Redis, most loads are served in process (kept exact by Redis's
    // client tracking); every write still goes to Redis.
    Ok(tollgate
        .sessions()
        .secret(secret)
        .cookie(cookie)
        .local_cache(10_000, std::time::Duration::from_secs(10))
        .build()?)
}

fn random_secret() -> Vec<u8> {
    hex::encode(rand::random::<[u8; 32]>()).into_bytes()
}

async fn shared_secret(h: &RedisHandle) -> Vec<u8> {
    use tollgate::redis::fred::interfaces::KeysInterface;
    use tollgate::redis::fred::types::SetOptions;
    let key = h.keys("demo").key(&["session-secret"]);
    let candidate = String::from_utf8(random_secret()).unwrap_or_default();
    let (k1, k2, c) = (key.clone(), key, candidate.clone());
    let stored: Result<Option<String>, _> = h
        .call(|cl| async move {
            let _: Option<String> = cl.set(k1, c, None, Some(SetOptions::NX), false).await?;
            cl.get(k2).await
        })
        .await;
    match stored {
        Ok(Some(s)) => s.into_bytes(),
        _ => {
            tracing::warn!(
                "Redis unavailable at start: sessions use a per-process secret until restart"
            );
            candidate.into_bytes()
        }
    }
}

/// The assembled service.
pub struct App {
    router: Router,
    tollgate: Tollgate,
    usage: UsageTracker,
}

impl App {
    /// Connects to Redis when configured (an unreachable Redis starts the
    /// demo degraded, it recovers by itself) and builds the routes.
    pub async fn build(config: &DemoConfig, metrics: PrometheusHandle) -> Result<Self, DemoError> {
        let tollgate = match &config.redis_url {
            Some(url) => {
                Tollgate::connect_with(RedisConfig::from_url(url.clone()).namespace("demo")).await?
            }
            None => Tollgate::in_process(),
        };
        let usage = tollgate.usage_tracker(UsageConfig::new());
        let limiter = tollgate
            .rate_limiter(limits::policy_table())
            .key(limits::caller())
            .build();
        let plans = limits::plans();
        let usage_layer = UsageLayer::new(usage.clone(), TenantSource::header("x-api-key"))
            .plans(plans, |key, _| Some(limits::plan_of(key).to_owned()));
        let sessions = sessions(&tollgate, config).await?;
        let cache = match tollgate.redis() {
            // A short in-process L1 in front of Redis, invalidated across
            // instances through pub/sub.
            Some(h) => Cache::builder()
                .redis(h.clone())
                .l1(std::time::Duration::from_secs(1), 16 << 20)
                .build(),
            None => Cache::memory(),
        };
        let catalog = Catalog::new(cache.clone());
        let cache_layer = ResponseCacheLayer::builder(cache)
            .route(
                RouteRule::new("/api/providers")
                    .ttl(std::time::Duration::from_secs(60))
                    .tags(["providers"]),
            )
            .route(
                RouteRule::new("/api/campaigns/{church}").ttl(std::time::Duration::from_secs(300)),
            )
            // Only the routes above are cached.
            .default_rule(RouteRule::bypass("/*"))
            // The API key is a credential: never serve one caller's entry to
            // another.
            .credential_headers(["authorization", "cookie", "x-api-key"])
            .build()
            .map_err(|e| DemoError::Usage(format!("cache configuration: {e}")))?;
        let layers = tollgate
            .layers()
            .usage(usage_layer)
            .rate_limit(limiter)
            .cache(cache_layer)
            .session(sessions);
        let cached = Router::new()
            .route("/api/providers", get(catalog::providers))
            .route(
                "/api/providers/{id}",
                axum::routing::put(catalog::update_provider),
            )
            .route("/api/campaigns/{church}", get(catalog::campaign))
            .route("/api/donations", post(catalog::donate))
            .with_state(catalog);

        let api = Router::new()
            .route("/api/ping", get(routes::ping))
            .route("/api/payments", post(routes::payment))
            .route("/api/webhooks/stripe", post(routes::stripe_webhook))
            .route("/api/auth/login", post(routes::login_session))
            .route("/api/auth/logout", post(routes::logout))
            .route("/api/me", get(routes::me))
            .route(
                "/api/sessions",
                get(routes::list_sessions).delete(routes::revoke_other_sessions),
            )
            .route("/api/search", get(routes::search))
            .route("/api/bookings", post(routes::booking))
            .route("/api/guest-checkout", post(routes::guest_checkout))
            .route("/api/usage", get(routes::usage))
            .route("/api/usage/top", get(routes::top))
            .route("/api/emails", post(routes::email))
            .with_state(DemoState::new(usage.clone()))
            .merge(cached)
            .layer(layers);

        let health = tollgate.health_service(LAYERS);
        let router = Router::new()
            .route("/", get(routes::index))
            .route_service("/health/redis", health)
            .route(
                "/metrics",
                get(move || {
                    let m = metrics.clone();
                    async move {
                        (
                            [(
                                axum::http::header::CONTENT_TYPE,
                                "text/plain; version=0.0.4",
                            )],
                            m.render(),
                        )
                    }
                }),
            )
            .merge(api);
        Ok(App {
            router,
            tollgate,
            usage,
        })
    }

    /// The routes, for in-process tests.
    pub fn router(&self) -> Router {
        self.router.clone()
    }

    /// The Redis handle, when configured.
    pub fn redis(&self) -> Option<&RedisHandle> {
        self.tollgate.redis()
    }

    /// The usage tracker.
    pub fn usage(&self) -> &UsageTracker {
        &self.usage
    }

    /// Serves until `shutdown` resolves, then lets in-flight requests finish.
    pub async fn serve(
        self,
        listener: tokio::net::TcpListener,
        shutdown: impl std::future::Future<Output = ()> + Send + 'static,
    ) -> Result<(), DemoError> {
        axum::serve(
            listener,
            self.router
                .into_make_service_with_connect_info::<SocketAddr>(),
        )
        .with_graceful_shutdown(shutdown)
        .await?;
        // Nothing counted is lost on exit.
        let stats = self.usage.shutdown().await;
        tracing::info!(
            flushed = stats.flushed,
            dropped = stats.dropped,
            "usage flushed"
        );
        Ok(())
    }
}
