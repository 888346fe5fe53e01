//! The crate's one error type.

/// Everything that can go wrong in the session layer.
///
/// Handlers see it from [`Session`](crate::Session) methods; with the
/// `axum` feature it is also a response (503 for
/// [`Unavailable`](Error::Unavailable), 500 otherwise), so `?` works in
/// handlers.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A configuration value is unusable; `field` names it.
    #[error("invalid session configuration: {field}: {reason}")]
    Config {
        /// The offending field (`cookie.domain`, `secret`, ...).
        field: &'static str,
        /// Why it was refused.
        reason: &'static str,
    },
    /// The session store failed (Redis down, timed out, answered an error).
    #[error("session store failed")]
    Store(#[source] tollgate_redis::Error),
    /// The store cannot be reached and the operation cannot be served
    /// without it: the layer is configured to fail closed,
    /// [`Session::destroy`](crate::Session::destroy) could not delete a
    /// record that may live in Redis, or a change was made to a session
    /// whose record may live in Redis but could not be read (see
    /// [`Session::insert`](crate::Session::insert)).
    #[error("the session store is unavailable")]
    Unavailable,
    /// A value could not be encoded to, or decoded from, JSON.
    #[error("session value `{key}` could not be (de)serialised")]
    Serde {
        /// The entry's key.
        key: String,
        /// What serde said.
        #[source]
        source: serde_json::Error,
    },
    /// A stored record is not valid session JSON.
    #[error("stored session record is corrupt")]
    Corrupt(#[source] serde_json::Error),
    /// The session was destroyed earlier in this request.
    #[error("the session was destroyed in this request")]
    Destroyed,
    /// The session has no user bound to it (user-index operations).
    #[error("the session has no user bound to it")]
    NoUser,
    /// Storing the value would take the session's data over its size limit
    /// ([`SessionsBuilder::max_data_bytes`](crate::SessionsBuilder::max_data_bytes)).
    /// Nothing was changed.
    #[error(
        "session value `{key}` would make the session's data {bytes} bytes, over its limit of {limit}"
    )]
    TooLarge {
        /// The entry's key.
        key: String,
        /// The data's size with the value.
        bytes: usize,
        /// The limit.
        limit: usize,
    },
}

impl From<tollgate_redis::Error> for Error {
    fn from(e: tollgate_redis::Error) -> Self {
        Error::Store(e)
    }
}

#[cfg(feature = "axum")]
impl axum::response::IntoResponse for Error {
    fn into_response(self) -> axum::response::Response {
        let status = match self {
            Error::Unavailable | Error::Store(_) => http::StatusCode::SERVICE_UNAVAILABLE,
            _ => http::StatusCode::INTERNAL_SERVER_ERROR,
        };
        tracing::debug!(error = %self, "session error answered as {status}");
        crate::service::problem::<axum::body::Body>(status, &self.to_string())
    }
}
