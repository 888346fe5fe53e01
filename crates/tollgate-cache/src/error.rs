//! The crate's error type.

/// Everything that can go wrong in the cache. Layers never surface it to
/// HTTP clients: a store failure makes the request bypass the cache.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// Redis failed, timed out or is unavailable (breaker open).
    #[error("cache store failed")]
    Store(#[source] tollgate_redis::Error),
    /// A value could not be encoded or decoded.
    #[error("cache value could not be encoded or decoded: {0}")]
    Codec(std::sync::Arc<str>),
    /// The runtime shut down before an operation running in a task of its
    /// own (a tag invalidation) finished.
    #[error("the cache operation was interrupted before it finished")]
    Interrupted,
    /// A configuration value is unusable; `field` names it.
    #[error("invalid cache configuration: {field}: {reason}")]
    Config {
        /// The offending field.
        field: String,
        /// Why it was refused.
        reason: String,
    },
}

impl From<tollgate_redis::Error> for Error {
    fn from(e: tollgate_redis::Error) -> Self {
        Error::Store(e)
    }
}

impl Error {
    pub(crate) fn config(field: impl Into<String>, reason: impl Into<String>) -> Self {
        Error::Config {
            field: field.into(),
            reason: reason.into(),
        }
    }
}

impl From<tollgate_redis::RoutePatternError> for Error {
    fn from(e: tollgate_redis::RoutePatternError) -> Self {
        Error::config(format!("route `{}`", e.pattern), e.reason)
    }
}
