//! `health()` and a Tower service that serves it as JSON.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::{Request, Response, StatusCode, header};
use http_body_util::Full;
use serde::Serialize;

use crate::breaker::BreakerState;
use crate::config::Topology;
use crate::handle::RedisHandle;

/// Overall verdict.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum HealthStatus {
    /// Redis answers and the breaker is closed.
    Healthy,
    /// Redis does not answer or the breaker is open: layers use fallbacks.
    Degraded,
    /// No Redis was configured: every layer runs on its in-process store by
    /// choice. Not an error.
    InProcess,
}

/// Where a layer keeps its state right now.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum LayerMode {
    /// In Redis, shared by every instance.
    Redis,
    /// In the layer's in-process fallback because Redis is unavailable.
    Fallback,
    /// In process by configuration (no Redis configured).
    Memory,
}

/// One layer's line in the report.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct LayerHealth {
    /// The layer (`ratelimit`, `session`, ...).
    pub name: String,
    /// Its store right now.
    pub mode: LayerMode,
}

/// An in-process cache kept exact by Redis client tracking (the session
/// store's local cache, for one), and whether it may serve right now.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct LocalCacheHealth {
    /// The key prefixes its connection tracks.
    pub prefixes: Vec<String>,
    /// Whether it serves: tracking is on, its connection is up and the
    /// shared handle's breaker is closed. Otherwise every read goes to
    /// Redis (or to the fallback) and the cache holds nothing.
    pub live: bool,
}

/// What [`RedisHandle::health`] returns, serialised as the JSON body of
/// [`HealthService`].
#[derive(Clone, Debug, Serialize)]
pub struct HealthReport {
    /// Overall verdict.
    pub status: HealthStatus,
    /// Whether a PING was answered within the deadline.
    pub connected: bool,
    /// PING round trip.
    pub latency_ms: Option<f64>,
    /// `redis_version` from INFO.
    pub server_version: Option<String>,
    /// `used_memory` from INFO.
    pub used_memory_bytes: Option<u64>,
    /// `maxmemory` from INFO (0: no limit).
    pub maxmemory_bytes: Option<u64>,
    /// `maxmemory_policy` from INFO.
    pub maxmemory_policy: Option<String>,
    /// `aof_enabled` from INFO.
    pub appendonly: Option<bool>,
    /// In words: settings of this Redis that can lose what the registered
    /// layers keep (sessions, usage counts), and a version older than a
    /// registered layer needs; empty when none.
    pub warnings: Vec<String>,
    /// Standalone, cluster or sentinel.
    pub topology: Option<Topology>,
    /// Key namespace.
    pub namespace: String,
    /// Circuit breaker state.
    pub breaker: Option<BreakerState>,
    /// Times the breaker has opened since start.
    pub breaker_opened: u64,
    /// Outage errors since start.
    pub errors: u64,
    /// Timeouts since start.
    pub timeouts: u64,
    /// Scripts reloaded after NOSCRIPT since start.
    pub scripts_reloaded: u64,
    /// Each registered layer and its mode.
    pub layers: Vec<LayerHealth>,
    /// Each in-process cache kept exact by client tracking, while it
    /// exists.
    pub local_caches: Vec<LocalCacheHealth>,
}

impl HealthReport {
    /// The report of a service that runs without Redis by configuration.
    pub fn in_process(layers: &[&str]) -> Self {
        HealthReport {
            status: HealthStatus::InProcess,
            connected: false,
            latency_ms: None,
            server_version: None,
            used_memory_bytes: None,
            maxmemory_bytes: None,
            maxmemory_policy: None,
            appendonly: None,
            warnings: Vec::new(),
            topology: None,
            namespace: String::new(),
            breaker: None,
            breaker_opened: 0,
            errors: 0,
            timeouts: 0,
            scripts_reloaded: 0,
            layers: layers
                .iter()
                .map(|l| LayerHealth {
                    name: (*l).to_owned(),
                    mode: LayerMode::Memory,
                })
                .collect(),
            local_caches: Vec::new(),
        }
    }

    /// 503 when degraded, 200 otherwise.
    pub fn http_status(&self) -> StatusCode {
        match self.status {
            HealthStatus::Degraded => StatusCode::SERVICE_UNAVAILABLE,
            HealthStatus::Healthy | HealthStatus::InProcess => StatusCode::OK,
        }
    }

    fn into_response(self) -> Response<Full<Bytes>> {
        let status = self.http_status();
        let body = serde_json::to_vec(&self).unwrap_or_else(|_| b"{}".to_vec());
        let mut res = Response::new(Full::new(Bytes::from(body)));
        *res.status_mut() = status;
        res.headers_mut().insert(
            header::CONTENT_TYPE,
            header::HeaderValue::from_static("application/json"),
        );
        res.headers_mut().insert(
            header::CACHE_CONTROL,
            header::HeaderValue::from_static("no-store"),
        );
        res
    }
}

/// The oldest Redis version each layer's commands run on, and what fails
/// on an older one. (The rate limiter's scripts use nothing newer than
/// Redis 6.0, which client tracking and ACLs also need.)
pub(crate) const OLDEST_REDIS: [(&str, (u32, u32), &str); 3] = [
    ("cache", (7, 0), "PEXPIREAT with NX and GT (tag indexes)"),
    (
        "session",
        (6, 2),
        "SET with GET and GETDEL (saves with the session cache, rotations)",
    ),
    ("usage", (6, 2), "ZRANGE with REV (top consumers)"),
];

/// A warning for each layer (of those `used` says are in use) whose
/// commands Redis `version` lacks; none when the version cannot be read.
pub(crate) fn too_old(version: &str, used: impl Fn(&str) -> bool) -> Vec<String> {
    let Some(found) = major_minor(version) else {
        return Vec::new();
    };
    OLDEST_REDIS
        .iter()
        .filter(|(layer, oldest, _)| used(layer) && found < *oldest)
        .map(|(layer, (major, minor), needs)| {
            format!(
                "Redis {version} is older than {major}.{minor}, the oldest the {layer} layer runs on: {needs} fail on it; upgrade Redis"
            )
        })
        .collect()
}

/// `7.0.15` → `(7, 0)`.
fn major_minor(version: &str) -> Option<(u32, u32)> {
    let mut parts = version.split('.');
    let major = parts.next()?.parse().ok()?;
    let minor = parts.next()?.parse().ok()?;
    Some((major, minor))
}

/// What an INFO reply says about memory and persistence.
#[derive(Debug, Default)]
pub(crate) struct ServerSettings {
    pub(crate) version: Option<String>,
    pub(crate) used_memory: Option<u64>,
    pub(crate) maxmemory: Option<u64>,
    pub(crate) policy: Option<String>,
    pub(crate) appendonly: Option<bool>,
}

impl ServerSettings {
    /// Reads the fields of an INFO reply.
    pub(crate) fn from_info(info: &str) -> Self {
        let mut s = ServerSettings::default();
        for line in info.lines() {
            let Some((k, v)) = line.split_once(':') else {
                continue;
            };
            let v = v.trim();
            match k {
                "redis_version" => s.version = Some(v.to_owned()),
                "used_memory" => s.used_memory = v.parse().ok(),
                "maxmemory" => s.maxmemory = v.parse().ok(),
                "maxmemory_policy" => s.policy = Some(v.to_owned()),
                "aof_enabled" => s.appendonly = Some(v == "1"),
                _ => {}
            }
        }
        s
    }

    /// The settings that can lose what `layers` keep in Redis: sessions
    /// and usage counts must outlive memory pressure and restarts (cached
    /// responses and rate-limit state may not).
    ///
    /// Also a server older than a layer in use needs
    /// ([`OLDEST_REDIS`]): some of that layer's commands fail there.
    pub(crate) fn warnings(&self, layers: &[&str]) -> Vec<String> {
        let mut w = match self.version.as_deref() {
            Some(v) => too_old(v, |layer| layers.contains(&layer)),
            None => Vec::new(),
        };
        let kept: Vec<&str> = layers
            .iter()
            .copied()
            .filter(|l| matches!(*l, "session" | "usage"))
            .collect();
        if kept.is_empty() {
            return w;
        }
        let what = kept.join(" and ");
        if let (Some(policy), Some(max)) = (&self.policy, self.maxmemory)
            && max > 0
            && policy != "noeviction"
        {
            w.push(format!(
                "maxmemory-policy is {policy}: under memory pressure Redis may evict {what} data; use noeviction (the layers fall back when Redis refuses writes), or give the cache a Redis of its own"
            ));
        }
        if self.appendonly == Some(false) {
            w.push(format!(
                "appendonly is off: a Redis restart loses the {what} data written since the last snapshot (all of it without snapshots)"
            ));
        }
        w
    }
}

/// A Tower service answering any request with the handle's health as JSON:
/// 200 when healthy (or in process by configuration), 503 when degraded.
/// Mount it at `GET /health/redis`.
///
/// ```
/// use tollgate_redis::HealthService;
/// use tower::ServiceExt;
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() {
/// // Without Redis the layers are reported in process, with 200.
/// let svc = HealthService::in_process(&["ratelimit"]);
/// let res = svc.oneshot(http::Request::new(())).await.unwrap();
/// assert_eq!(res.status(), 200);
/// # }
/// ```
#[derive(Clone, Debug)]
pub struct HealthService {
    handle: Option<RedisHandle>,
    layers: Vec<&'static str>,
}

impl HealthService {
    /// Reports on `handle`.
    pub fn new(handle: RedisHandle) -> Self {
        HealthService {
            handle: Some(handle),
            layers: Vec::new(),
        }
    }

    /// Reports an in-process deployment with these layers.
    pub fn in_process(layers: &[&'static str]) -> Self {
        HealthService {
            handle: None,
            layers: layers.to_vec(),
        }
    }
}

impl<B> tower::Service<Request<B>> for HealthService {
    type Response = Response<Full<Bytes>>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Infallible>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _req: Request<B>) -> Self::Future {
        let handle = self.handle.clone();
        let layers = self.layers.clone();
        Box::pin(async move {
            let report = match handle {
                Some(h) => h.health().await,
                None => HealthReport::in_process(&layers),
            };
            Ok(report.into_response())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_that_lose_sessions_or_usage_are_reported() {
        let info = "# Server\r\nredis_version:7.0.15\r\n# Memory\r\nused_memory:1024\r\nmaxmemory:1048576\r\nmaxmemory_policy:allkeys-lru\r\n# Persistence\r\naof_enabled:0\r\n";
        let s = ServerSettings::from_info(info);
        assert_eq!(s.version.as_deref(), Some("7.0.15"));
        assert_eq!((s.used_memory, s.maxmemory), (Some(1024), Some(1_048_576)));
        assert_eq!(s.appendonly, Some(false));
        let w = s.warnings(&["ratelimit", "session", "usage"]);
        assert_eq!(w.len(), 2, "{w:?}");
        assert!(
            w[0].starts_with("maxmemory-policy is allkeys-lru")
                && w[0].contains("session and usage")
        );
        assert!(w[1].starts_with("appendonly is off"));
        assert!(
            s.warnings(&["ratelimit", "cache"]).is_empty(),
            "nothing kept"
        );

        let safe =
            ServerSettings::from_info("maxmemory:0\nmaxmemory_policy:allkeys-lru\naof_enabled:1\n");
        assert!(
            safe.warnings(&["session"]).is_empty(),
            "no limit: nothing evicted"
        );
        let safe = ServerSettings::from_info(
            "maxmemory:100\nmaxmemory_policy:noeviction\naof_enabled:1\n",
        );
        assert!(safe.warnings(&["usage"]).is_empty());
    }

    #[test]
    fn a_redis_older_than_a_layer_needs_is_reported() {
        let on = |v: &str, layers: &[&str]| {
            ServerSettings::from_info(&format!("redis_version:{v}\nmaxmemory:0\naof_enabled:1\n"))
                .warnings(layers)
        };
        let w = on("6.2.14", &["ratelimit", "cache", "session", "usage"]);
        assert_eq!(w.len(), 1, "{w:?}");
        assert!(
            w[0].starts_with(
                "Redis 6.2.14 is older than 7.0, the oldest the cache layer runs on: PEXPIREAT"
            ),
            "{w:?}"
        );
        let w = on("6.0.16", &["session", "usage"]);
        assert_eq!(w.len(), 2, "{w:?}");
        assert!(w[0].contains("6.2, the oldest the session layer"), "{w:?}");
        assert!(w[1].contains("6.2, the oldest the usage layer"), "{w:?}");
        assert!(on("6.0.16", &["ratelimit"]).is_empty());
        for v in ["7.0.0", "7.0.15", "7.2.4", "8.0.1", "10.1.0"] {
            assert!(on(v, &["cache", "session", "usage"]).is_empty(), "{v}");
        }
        // A version it cannot read is not guessed at.
        assert!(on("unknown", &["cache"]).is_empty());
    }
}
