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
    /// A write was sent but its outcome is unknown (the answer was lost, or
    /// a later attempt of the same write could not be sent). It is retried
    /// under the same id, so it is applied at most once.
    #[error("usage write unconfirmed")]
    Unconfirmed(#[source] tollgate_redis::Error),
}

impl UsageError {
    /// Whether the operation certainly never reached the store (so its
    /// increments can simply be buffered again). Only meaningful for a
    /// first attempt: once a write was sent, every later failure of it is
    /// reported as [`Unconfirmed`](Self::Unconfirmed).
    pub fn not_sent(&self) -> bool {
        matches!(
            self,
            UsageError::Store(
                tollgate_redis::Error::Unavailable | tollgate_redis::Error::Overloaded
            )
        )
    }

    /// This error, for an attempt of a write that was already sent once:
    /// "never sent" no longer means "never applied".
    pub(crate) fn after_sent(self) -> Self {
        match self {
            e if e.not_sent() => match e {
                UsageError::Store(e) => UsageError::Unconfirmed(e),
                other => other,
            },
            other => other,
        }
    }
}
