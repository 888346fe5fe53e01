//! The crate's error type.

/// A configuration the layer refuses: each variant names the entry at fault.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// A value is unusable.
    #[error("invalid rate-limit configuration: {field}: {reason}")]
    Invalid {
        /// The entry (policy name, route pattern, ...).
        field: String,
        /// Why it was refused.
        reason: String,
    },
    /// Two routes with the same pattern and method.
    #[error("duplicate route `{route}` in the rate-limit table")]
    DuplicateRoute {
        /// `METHOD pattern` or `pattern`.
        route: String,
    },
    /// Two policies with the same name.
    #[error("duplicate policy `{name}` in the rate-limit table")]
    DuplicatePolicy {
        /// The policy's name.
        name: String,
    },
    /// A route refers to a policy that is not defined.
    #[error("route `{route}` refers to unknown policy `{policy}`")]
    UnknownPolicy {
        /// The route.
        route: String,
        /// The missing policy.
        policy: String,
    },
}

/// Errors of the admin operations ([`RateLimiter::peek`](crate::RateLimiter::peek),
/// [`RateLimiter::reset`](crate::RateLimiter::reset)).
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// No policy with this name.
    #[error("unknown rate-limit policy `{0}`")]
    UnknownPolicy(String),
    /// Redis failed.
    #[error("rate-limit store failed")]
    Store(#[source] tollgate_redis::Error),
    /// The configuration was refused.
    #[error(transparent)]
    Config(#[from] ConfigError),
}

impl From<tollgate_redis::Error> for Error {
    fn from(e: tollgate_redis::Error) -> Self {
        Error::Store(e)
    }
}

impl From<tollgate_redis::RoutePatternError> for ConfigError {
    fn from(e: tollgate_redis::RoutePatternError) -> Self {
        ConfigError::Invalid {
            field: format!("route `{}`", e.pattern),
            reason: e.reason.to_owned(),
        }
    }
}
