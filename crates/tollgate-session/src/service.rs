use std::task::{Context, Poll};

use bytes::Bytes;
use http::{Request, Response, StatusCode, header};
use tower::Service;

use crate::config::Sessions;
use crate::future::ResponseFuture;
use crate::session::{ClientInfo, Session};

/// The session service: puts a lazy [`Session`] into the request's
/// extensions, calls the inner service, then writes what changed and sets
/// (or removes) the cookie. Store failures are logged and counted, never
/// an `Err`: the inner service's error type is kept, and with
/// [`FailureMode::FailClosed`](crate::FailureMode::FailClosed) they become
/// a 503 response.
#[derive(Debug)]
pub struct SessionManager<S> {
    inner: S,
    sessions: Sessions,
}

impl<S: Clone> Clone for SessionManager<S> {
    fn clone(&self) -> Self {
        SessionManager {
            inner: self.inner.clone(),
            sessions: self.sessions.clone(),
        }
    }
}

impl<S> SessionManager<S> {
    /// Wraps `inner`.
    pub fn new(inner: S, sessions: Sessions) -> Self {
        SessionManager { inner, sessions }
    }

    /// The wrapped service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }
}

impl<S, ReqBody, ResBody> Service<Request<ReqBody>> for SessionManager<S>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>>,
    ResBody: From<Bytes> + Send + 'static,
{
    type Response = Response<ResBody>;
    type Error = S::Error;
    type Future = ResponseFuture<S::Future, ResBody>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<ReqBody>) -> Self::Future {
        let shared = &self.sessions.shared;
        if shared.refuses() {
            return ResponseFuture::ready(problem(
                StatusCode::SERVICE_UNAVAILABLE,
                "the session store is unavailable",
            ));
        }
        let incoming = shared.transport.read(req.headers(), shared.ring.as_ref());
        let client = if shared.record_client {
            client_info(&req)
        } else {
            ClientInfo::default()
        };
        let session = Session::new(self.sessions.clone(), incoming, client);
        req.extensions_mut().insert(session.clone());
        // Called at once: the readied service itself, no clone (the
        // session is loaded by the handler, on first use).
        ResponseFuture::calling(self.inner.call(req), session)
    }
}

fn client_info<B>(req: &Request<B>) -> ClientInfo {
    let user_agent = req.headers().get(header::USER_AGENT).cloned();
    let ip = req
        .extensions()
        .get::<std::net::SocketAddr>()
        .copied()
        .or_else(|| connect_info(req))
        .map(|a| a.ip());
    ClientInfo { user_agent, ip }
}

#[cfg(feature = "axum")]
fn connect_info<B>(req: &Request<B>) -> Option<std::net::SocketAddr> {
    req.extensions()
        .get::<axum::extract::ConnectInfo<std::net::SocketAddr>>()
        .map(|a| a.0)
}

#[cfg(not(feature = "axum"))]
fn connect_info<B>(_: &Request<B>) -> Option<std::net::SocketAddr> {
    None
}

/// An `application/problem+json` response.
pub(crate) fn problem<B: From<Bytes>>(status: StatusCode, detail: &str) -> Response<B> {
    let body = serde_json::json!({
        "type": "about:blank",
        "title": status.canonical_reason().unwrap_or("Error"),
        "status": status.as_u16(),
        "detail": detail,
    });
    let mut res = Response::new(B::from(Bytes::from(body.to_string())));
    *res.status_mut() = status;
    res.headers_mut().insert(
        header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/problem+json"),
    );
    res.headers_mut().insert(
        header::CACHE_CONTROL,
        http::HeaderValue::from_static("no-store"),
    );
    res
}
