use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::Bytes;
use futures::future::BoxFuture;
use http::{Response, StatusCode};
use pin_project_lite::pin_project;

use crate::config::FailureMode;
use crate::session::Session;

pin_project! {
    /// The response future of [`SessionManager`](crate::SessionManager).
    pub struct ResponseFuture<F, B> {
        #[pin]
        state: State<F, B>,
    }
}

pin_project! {
    #[project = Proj]
    enum State<F, B> {
        /// The inner service is handling the request.
        Calling {
            #[pin]
            fut: F,
            session: Option<Session>,
        },
        /// Writing the session and setting the cookie.
        Saving {
            fut: BoxFuture<'static, Response<B>>,
        },
        /// Refused before the inner service was called (fail closed).
        Ready {
            res: Option<Response<B>>,
        },
    }
}

impl<F, B> ResponseFuture<F, B> {
    pub(crate) fn calling(fut: F, session: Session) -> Self {
        ResponseFuture {
            state: State::Calling {
                fut,
                session: Some(session),
            },
        }
    }

    pub(crate) fn ready(res: Response<B>) -> Self {
        ResponseFuture {
            state: State::Ready { res: Some(res) },
        }
    }
}

impl<F, B, E> Future for ResponseFuture<F, B>
where
    F: Future<Output = Result<Response<B>, E>>,
    B: From<Bytes> + Send + 'static,
{
    type Output = Result<Response<B>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut state = self.project().state;
        loop {
            match state.as_mut().project() {
                Proj::Calling { fut, session } => {
                    let res = ready!(fut.poll(cx))?;
                    let Some(session) = session.take() else {
                        return Poll::Ready(Ok(res));
                    };
                    if session.is_idle() {
                        return Poll::Ready(Ok(res));
                    }
                    state.set(State::Saving {
                        fut: Box::pin(finish(session, res)),
                    });
                }
                Proj::Saving { fut } => return fut.as_mut().poll(cx).map(Ok),
                Proj::Ready { res } => {
                    return match res.take() {
                        Some(r) => Poll::Ready(Ok(r)),
                        None => Poll::Pending,
                    };
                }
            }
        }
    }
}

/// Saves the session and writes its cookie into `res`. An `async` block,
/// not an `async fn`, whose future would hold `session` and `res` twice.
#[allow(
    clippy::manual_async_fn,
    reason = "an async fn's future holds its arguments twice"
)]
pub(crate) fn finish<B: From<Bytes> + Send>(
    session: Session,
    mut res: Response<B>,
) -> impl Future<Output = Response<B>> + Send {
    async move {
        let commit = session.commit().await;
        let shared = session.sessions().shared.clone();
        if commit.failed && shared.failure == FailureMode::FailClosed {
            return crate::service::problem(
                StatusCode::SERVICE_UNAVAILABLE,
                "the session could not be saved",
            );
        }
        if let Some(out) = &commit.out {
            shared
                .transport
                .write(out, res.headers_mut(), shared.ring.as_ref());
        }
        res
    }
}

impl<F, B> std::fmt::Debug for ResponseFuture<F, B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let state = match &self.state {
            State::Calling { .. } => "calling",
            State::Saving { .. } => "saving",
            State::Ready { .. } => "ready",
        };
        f.debug_struct("ResponseFuture")
            .field("state", &state)
            .finish()
    }
}
