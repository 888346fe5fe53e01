/// Errors of the usage tracker.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum UsageError {
    /// A configuration value is unusable; `field` names it.
    #[error("invalid usage configuration: {field}: {reason}")]
    Config {
        /// The offending field.
        field: &'static str,
        /// Why.
        reason: String,
    },
    /// The store failed.
    #[error("usage store failed")]
    Store(#[from] tollgate_redis::Error),
    /// The operation must be retried (scripts were reloaded after a Redis
    /// restart); nothing was applied twice.
    #[error("retry: {0}")]
    Retry(String),
}

impl UsageError {
    /// Whether the operation certainly never reached the store (so its
    /// increments can simply be buffered again).
    pub fn not_sent(&self) -> bool {
        matches!(
            self,
            UsageError::Store(
                tollgate_redis::Error::Unavailable | tollgate_redis::Error::Overloaded
            )
        )
    }
}
