use std::time::Duration;

use fred::types::config::{Config as FredConfig, ReconnectPolicy, ServerConfig};

use crate::error::{Error, redact_url};

/// How the handle reaches Redis.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Topology {
    /// One server (`redis://`, `rediss://`).
    Standalone,
    /// A Redis Cluster (`redis-cluster://`, `rediss-cluster://`).
    Cluster,
    /// A primary found through Sentinel (`redis-sentinel://`).
    Sentinel,
}

#[derive(Clone)]
enum Source {
    Url(String),
    Fred(Box<FredConfig>),
}

/// Without secrets: the URL with its passwords redacted, and of a fred
/// configuration only that it is one (fred's own `Debug` prints the
/// password).
impl std::fmt::Debug for Source {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Source::Url(url) => f.debug_tuple("Url").field(&redact_url(url)).finish(),
            Source::Fred(_) => f.write_str("Fred(..)"),
        }
    }
}

/// Everything needed to build a [`RedisHandle`](crate::RedisHandle).
///
/// ```
/// use std::time::Duration;
/// use tollgate_redis::RedisConfig;
///
/// let cfg = RedisConfig::from_url("redis://127.0.0.1:6379")
///     .namespace("shop")
///     .deadline(Duration::from_millis(30));
/// assert_eq!(cfg.get_deadline(), Duration::from_millis(30));
/// ```
/// Its `Debug` output carries no password.
#[derive(Clone, Debug)]
#[must_use]
pub struct RedisConfig {
    source: Source,
    pub(crate) namespace: String,
    pub(crate) deadline: Duration,
    pub(crate) pool_size: usize,
    pub(crate) failure_threshold: u32,
    pub(crate) probe_interval: Duration,
    pub(crate) startup_timeout: Duration,
    pub(crate) connect_timeout: Duration,
    tls_root_ca_pem: Option<Vec<u8>>,
    reconnect: ReconnectPolicy,
}

impl RedisConfig {
    /// From a URL: `redis://`, `rediss://` (TLS), `redis-cluster://`,
    /// `rediss-cluster://`, `redis-sentinel://`, with `user:password@` for
    /// ACL users. The URL is parsed by [`RedisHandle::connect`](crate::RedisHandle::connect).
    pub fn from_url(url: impl Into<String>) -> Self {
        Self::with_source(Source::Url(url.into()))
    }

    /// From a fred configuration, for what URLs cannot express.
    pub fn from_fred(config: FredConfig) -> Self {
        Self::with_source(Source::Fred(Box::new(config)))
    }

    fn with_source(source: Source) -> Self {
        RedisConfig {
            source,
            namespace: "tollgate".into(),
            deadline: Duration::from_millis(50),
            pool_size: 2,
            failure_threshold: 3,
            probe_interval: Duration::from_millis(250),
            startup_timeout: Duration::from_secs(3),
            connect_timeout: Duration::from_secs(1),
            tls_root_ca_pem: None,
            // Always set: without a policy fred gives up on the first
            // dropped connection and the handle would never recover.
            reconnect: ReconnectPolicy::new_exponential(0, 20, 1_000, 2),
        }
    }

    /// The first segment of every key (default `tollgate`).
    pub fn namespace(mut self, ns: impl Into<String>) -> Self {
        self.namespace = ns.into();
        self
    }

    /// The longest any command may take before the caller gets
    /// [`Error::Timeout`] and falls back (default 50 ms).
    pub fn deadline(mut self, d: Duration) -> Self {
        self.deadline = d;
        self
    }

    /// The configured deadline.
    pub fn get_deadline(&self) -> Duration {
        self.deadline
    }

    /// Connections in the pool (default 2: each fred client multiplexes
    /// many commands; more clients mostly add routing tasks).
    pub fn pool_size(mut self, n: usize) -> Self {
        self.pool_size = n;
        self
    }

    /// Consecutive outage errors or timeouts that open the breaker
    /// (default 3).
    pub fn failure_threshold(mut self, n: u32) -> Self {
        self.failure_threshold = n;
        self
    }

    /// How often an open breaker probes Redis (default 250 ms).
    pub fn probe_interval(mut self, d: Duration) -> Self {
        self.probe_interval = d;
        self
    }

    /// How long [`RedisHandle::connect`](crate::RedisHandle::connect) waits
    /// for the first connection before it returns a degraded handle
    /// (default 3 s). A refused connection returns degraded at once; bad
    /// credentials return an error.
    pub fn startup_timeout(mut self, d: Duration) -> Self {
        self.startup_timeout = d;
        self
    }

    /// TCP + TLS connect timeout of each attempt (default 1 s).
    pub fn connect_timeout(mut self, d: Duration) -> Self {
        self.connect_timeout = d;
        self
    }

    /// Trust this PEM-encoded CA (in addition to nothing else) for
    /// `rediss://` connections, for private CAs.
    pub fn tls_root_ca_pem(mut self, pem: impl Into<Vec<u8>>) -> Self {
        self.tls_root_ca_pem = Some(pem.into());
        self
    }

    /// fred's reconnect policy (default: exponential 20 ms → 1 s, forever).
    pub fn reconnect_policy(mut self, policy: ReconnectPolicy) -> Self {
        self.reconnect = policy;
        self
    }

    pub(crate) fn reconnect(&self) -> ReconnectPolicy {
        self.reconnect.clone()
    }

    pub(crate) fn validate(&self) -> Result<(), Error> {
        let bad = |field, reason: &str| {
            Err(Error::Config {
                field,
                reason: reason.into(),
            })
        };
        if self.deadline.is_zero() {
            return bad("deadline", "must be greater than zero");
        }
        if self.pool_size == 0 {
            return bad("pool_size", "must be at least 1");
        }
        if self.failure_threshold == 0 {
            return bad("failure_threshold", "must be at least 1");
        }
        if self.probe_interval.is_zero() {
            return bad("probe_interval", "must be greater than zero");
        }
        if self.namespace.is_empty() {
            return bad("namespace", "must not be empty");
        }
        Ok(())
    }

    /// Builds fred's config and says which topology it describes.
    pub(crate) fn fred_config(&self) -> Result<(FredConfig, Topology), Error> {
        let mut cfg = match &self.source {
            Source::Url(url) => {
                let url = url.trim();
                const SCHEMES: [&str; 6] = [
                    "redis",
                    "rediss",
                    "redis-cluster",
                    "rediss-cluster",
                    "redis-sentinel",
                    "rediss-sentinel",
                ];
                let scheme = url.split_once("://").map(|(s, _)| s);
                if !scheme.is_some_and(|s| SCHEMES.contains(&s)) {
                    return Err(Error::Config {
                        field: "url",
                        reason: format!(
                            "`{}` does not start with one of {}",
                            redact_url(url),
                            SCHEMES.map(|s| format!("{s}://")).join(", ")
                        ),
                    });
                }
                FredConfig::from_url(url).map_err(|source| Error::InvalidUrl {
                    url: redact_url(url),
                    source,
                })?
            }
            Source::Fred(cfg) => (**cfg).clone(),
        };
        let topology = match cfg.server {
            ServerConfig::Centralized { .. } => Topology::Standalone,
            ServerConfig::Clustered { .. } => Topology::Cluster,
            ServerConfig::Sentinel { .. } => Topology::Sentinel,
        };
        if let Some(pem) = &self.tls_root_ca_pem {
            cfg.tls = Some(rustls_connector(pem)?.into());
        }
        // Reconnect on the first connection too: starting while Redis is down
        // is a degraded start, not an error.
        cfg.fail_fast = false;
        Ok((cfg, topology))
    }
}

fn rustls_connector(pem: &[u8]) -> Result<fred::types::config::TlsConnector, Error> {
    let tls = |reason: String| Error::Tls { reason };
    let mut roots = rustls::RootCertStore::empty();
    let mut reader = std::io::BufReader::new(pem);
    for cert in rustls_pemfile::certs(&mut reader) {
        let cert = cert.map_err(|e| tls(format!("reading the CA PEM: {e}")))?;
        roots
            .add(cert)
            .map_err(|e| tls(format!("adding the CA certificate: {e}")))?;
    }
    if roots.is_empty() {
        return Err(tls("the CA PEM holds no certificate".into()));
    }
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| tls(e.to_string()))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(config.into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_output_has_no_password() {
        let cfg = RedisConfig::from_url(
            "redis-sentinel://alice:hunter2@h:26379/0?sentinelServiceName=m&sentinelPassword=s3cret",
        );
        let shown = format!("{cfg:?}");
        assert!(
            !shown.contains("hunter2") && !shown.contains("s3cret"),
            "{shown}"
        );
        assert!(shown.contains("alice:***@h:26379"), "{shown}");
        let fred = FredConfig::from_url("redis://alice:hunter2@h:6379").expect("a valid URL");
        let shown = format!("{:?}", RedisConfig::from_fred(fred));
        assert!(!shown.contains("hunter2"), "{shown}");
    }

    #[test]
    fn parses_each_scheme() {
        let t = |u: &str| RedisConfig::from_url(u).fred_config().map(|(_, t)| t);
        assert_eq!(t("redis://127.0.0.1:6379").ok(), Some(Topology::Standalone));
        assert_eq!(
            t("redis://user:pw@127.0.0.1:6379/2").ok(),
            Some(Topology::Standalone)
        );
        assert_eq!(
            t("redis-cluster://127.0.0.1:7000?node=127.0.0.1:7001").ok(),
            Some(Topology::Cluster)
        );
        assert_eq!(
            t("redis-sentinel://127.0.0.1:26379/0?sentinelServiceName=mymaster").ok(),
            Some(Topology::Sentinel)
        );
        assert_eq!(
            t("rediss://127.0.0.1:6380").ok(),
            Some(Topology::Standalone)
        );
    }

    #[test]
    fn bad_urls_are_errors_that_hide_the_password() {
        let err = RedisConfig::from_url("http://user:hunter2@nowhere")
            .fred_config()
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(err.contains("url"), "{err}");
        assert!(!err.contains("hunter2"), "{err}");
        assert!(RedisConfig::from_url("not a url").fred_config().is_err());
    }

    #[test]
    fn validation_names_the_field() {
        let e = RedisConfig::from_url("redis://x")
            .deadline(Duration::ZERO)
            .validate();
        assert!(matches!(
            e,
            Err(Error::Config {
                field: "deadline",
                ..
            })
        ));
        let e = RedisConfig::from_url("redis://x").pool_size(0).validate();
        assert!(matches!(
            e,
            Err(Error::Config {
                field: "pool_size",
                ..
            })
        ));
    }

    #[test]
    fn a_pem_without_certificates_is_refused() {
        let e = RedisConfig::from_url("rediss://x")
            .tls_root_ca_pem("nothing")
            .fred_config();
        assert!(matches!(e, Err(Error::Tls { .. })));
    }
}
