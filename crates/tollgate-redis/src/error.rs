use std::sync::Arc;
use std::time::Duration;

/// Everything that can go wrong between a tollgate layer and Redis.
///
/// The error is cheap to clone (a coalesced batch hands the same failure to
/// every caller in it). Layers never surface it to HTTP clients: each one maps
/// it to its documented fallback.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The connection URL could not be parsed. The URL is shown with its
    /// password removed.
    #[error("invalid Redis URL `{url}`")]
    InvalidUrl {
        /// The URL, password redacted.
        url: String,
        /// What fred reported.
        #[source]
        source: fred::error::Error,
    },
    /// A configuration value is unusable; `field` names it.
    #[error("invalid Redis configuration: {field}: {reason}")]
    Config {
        /// The offending field.
        field: &'static str,
        /// Why it was refused.
        reason: String,
    },
    /// Redis refused the credentials (wrong password, unknown or disabled
    /// ACL user). Retrying will not help.
    #[error("Redis rejected the credentials")]
    Auth {
        /// What Redis said.
        #[source]
        source: fred::error::Error,
    },
    /// The TLS handshake or configuration failed.
    #[error("TLS setup failed: {reason}")]
    Tls {
        /// Why.
        reason: String,
    },
    /// The circuit breaker is open: Redis is considered unreachable and no
    /// command was sent. Layers answer from their fallback.
    #[error("Redis is unavailable (circuit breaker open)")]
    Unavailable,
    /// Too many operations are already queued for Redis; the caller should
    /// answer from its fallback.
    #[error("too many Redis operations queued")]
    Overloaded,
    /// The command did not complete within the handle's deadline.
    #[error("Redis did not answer within {0:?}")]
    Timeout(Duration),
    /// Redis (or the connection to it) returned an error.
    #[error("Redis command failed")]
    Redis(#[source] fred::error::Error),
    /// A script failed inside Redis.
    #[error("Redis script `{name}` failed")]
    Script {
        /// The script's name in the registry.
        name: &'static str,
        /// What Redis said.
        #[source]
        source: fred::error::Error,
    },
    /// Redis answered with a value the caller did not expect.
    #[error("unexpected reply from Redis: {0}")]
    Protocol(Arc<str>),
}

impl Error {
    /// Whether this error says Redis is unreachable or unresponsive (and so
    /// counts against the circuit breaker), as opposed to Redis answering
    /// with an error of its own (a bad script argument, a wrong type).
    ///
    /// A Redis that answers but refuses every write counts as an outage
    /// too (see [`refuses_writes`](Self::refuses_writes)): every layer
    /// writes, so none could work on it.
    pub fn is_outage(&self) -> bool {
        match self {
            Error::Unavailable | Error::Timeout(_) => true,
            Error::Redis(e) | Error::Script { source: e, .. } => {
                is_outage_error(e) || refuses_writes(e)
            }
            _ => false,
        }
    }

    /// Whether Redis answered but refuses writes for now: over `maxmemory`
    /// with nothing it may evict (`OOM`), a replica (`READONLY`, as after
    /// a failover the client has not followed yet), a failed snapshot with
    /// `stop-writes-on-bgsave-error` (`MISCONF`), too few replicas for
    /// `min-replicas-to-write` (`NOREPLICAS`), or a replica cut off from
    /// its primary (`MASTERDOWN`). The handle opens its breaker at once on
    /// such an error, and closes it only once a write succeeds again.
    pub fn refuses_writes(&self) -> bool {
        match self {
            Error::Redis(e) | Error::Script { source: e, .. } => refuses_writes(e),
            _ => false,
        }
    }
}

/// See [`Error::refuses_writes`]. A script's error carries the command's
/// (`OOM command not allowed … script: …`).
pub(crate) fn refuses_writes(e: &fred::error::Error) -> bool {
    const PREFIXES: [&str; 5] = [
        "OOM ",
        "READONLY ",
        "MISCONF ",
        "NOREPLICAS ",
        "MASTERDOWN ",
    ];
    let d = e.details().trim_start();
    let d = d.strip_prefix("ERR ").unwrap_or(d);
    PREFIXES.iter().any(|p| d.starts_with(p))
}

impl From<fred::error::Error> for Error {
    fn from(e: fred::error::Error) -> Self {
        Error::Redis(e)
    }
}

/// Connection-level fred errors; everything else is Redis answering.
pub(crate) fn is_outage_error(e: &fred::error::Error) -> bool {
    use fred::error::ErrorKind as K;
    match e.kind() {
        K::IO | K::Canceled | K::Timeout | K::Backpressure | K::Routing | K::Tls => true,
        K::Cluster => true,
        _ => {
            let d = e.details();
            // Redis replies while loading a dataset or during failover.
            d.starts_with("LOADING") || d.starts_with("CLUSTERDOWN") || d.starts_with("TRYAGAIN")
                // fred gave up on the connection, not Redis on the command:
                // its attempts went while a cluster changed primaries (a
                // redirection, then the connection it was on dropped), or
                // it had no connection to send it on.
                || ROUTING_FAILURES.contains(&d)
        }
    }
}

/// The details of fred's own errors of kind `Unknown` that mean it could
/// not deliver a command (checked by `is_outage_error`).
const ROUTING_FAILURES: [&str; 4] = [
    "Too many failed write attempts.",
    "Failed to route command.",
    "Missing expected connection.",
    "Max attempts exceeded",
];

/// Removes the secrets from a Redis URL so it can be logged: the password
/// of `user:password@` and the value of any query parameter whose name
/// mentions a password (Sentinel's `sentinelPassword`).
pub(crate) fn redact_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    let (before, query) = match rest.split_once('?') {
        Some((b, q)) => (b, Some(q)),
        None => (rest, None),
    };
    let mut out = format!("{scheme}://");
    match before.rsplit_once('@') {
        Some((userinfo, host)) => {
            match userinfo.split_once(':') {
                Some((user, _)) => out.push_str(&format!("{user}:***@")),
                None => out.push_str("***@"),
            }
            out.push_str(host);
        }
        None => out.push_str(before),
    }
    if let Some(query) = query {
        out.push('?');
        for (i, pair) in query.split('&').enumerate() {
            if i > 0 {
                out.push('&');
            }
            match pair.split_once('=') {
                Some((k, _)) if k.to_ascii_lowercase().contains("pass") => {
                    out.push_str(k);
                    out.push_str("=***");
                }
                _ => out.push_str(pair),
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusals_of_writes_are_outages_other_replies_are_not() {
        let reply = |d: &str| {
            Error::Redis(fred::error::Error::new(
                fred::error::ErrorKind::Unknown,
                d.to_owned(),
            ))
        };
        for d in [
            "OOM command not allowed when used memory > 'maxmemory'.",
            "OOM command not allowed when used memory > 'maxmemory'. script: 5c09, on @user_script:2.",
            "READONLY You can't write against a read only replica.",
            "MISCONF Redis is configured to save RDB snapshots, but it's currently unable to persist to disk.",
            "NOREPLICAS Not enough good replicas to write.",
            "MASTERDOWN Link with MASTER is down and replica-serve-stale-data is set to 'no'.",
        ] {
            assert!(reply(d).refuses_writes() && reply(d).is_outage(), "{d}");
        }
        for d in [
            "WRONGTYPE Operation against a key holding the wrong kind of value",
            "ERR value is not an integer or out of range",
            "ERR user_script:1: OOMPH is not a command",
            "NOSCRIPT No matching script.",
        ] {
            assert!(!reply(d).refuses_writes() && !reply(d).is_outage(), "{d}");
        }
        // fred's own failures to deliver a command: an outage that refuses
        // nothing.
        for d in ROUTING_FAILURES {
            assert!(reply(d).is_outage() && !reply(d).refuses_writes(), "{d}");
        }
        assert!(!reply("ERR Too many failed write attempts. (a script's own)").is_outage());
    }

    #[test]
    fn redacts_passwords() {
        assert_eq!(redact_url("redis://u:secret@h:1/0"), "redis://u:***@h:1/0");
        assert_eq!(redact_url("rediss://secret@h"), "rediss://***@h");
        assert_eq!(redact_url("redis://h:6379"), "redis://h:6379");
        assert_eq!(redact_url("nonsense"), "nonsense");
        // Sentinel's own password travels in the query.
        assert_eq!(
            redact_url(
                "redis-sentinel://u:pw@h:26379/0?sentinelServiceName=m&sentinelPassword=s3cret"
            ),
            "redis-sentinel://u:***@h:26379/0?sentinelServiceName=m&sentinelPassword=***"
        );
        // An `@` in a query value is not taken for the end of a password.
        assert_eq!(
            redact_url("redis-sentinel://h:26379/0?sentinelPassword=a@b"),
            "redis-sentinel://h:26379/0?sentinelPassword=***"
        );
    }
}
