use tower::Layer;

use crate::config::Sessions;
use crate::service::SessionManager;

/// Adds a [`Session`](crate::Session) to every request and saves it after
/// the response. Cheap to clone: the state is in [`Sessions`].
#[derive(Clone, Debug)]
pub struct SessionLayer {
    sessions: Sessions,
}

impl SessionLayer {
    /// The layer for `sessions`.
    pub fn new(sessions: Sessions) -> Self {
        SessionLayer { sessions }
    }

    /// The sessions (for administration: list, revoke).
    pub fn sessions(&self) -> &Sessions {
        &self.sessions
    }
}

impl<S> Layer<S> for SessionLayer {
    type Service = SessionManager<S>;

    fn layer(&self, inner: S) -> Self::Service {
        SessionManager::new(inner, self.sessions.clone())
    }
}
