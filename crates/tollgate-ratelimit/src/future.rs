use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::Bytes;
use futures::future::BoxFuture;
use http::{Request, Response};
use pin_project_lite::pin_project;
use tower::Service;

use crate::decision::Report;
use crate::headers::{self, Stamp};
use crate::limiter::{Pending, RateLimiter};

pin_project! {
    /// The response future of [`RateLimit`](crate::RateLimit).
    pub struct ResponseFuture<S, ReqBody>
    where
        S: Service<Request<ReqBody>>,
    {
        #[pin]
        state: State<S, ReqBody>,
    }
}

pin_project! {
    #[project = Proj]
    enum State<S, ReqBody>
    where
        S: Service<Request<ReqBody>>,
    {
        /// Waiting for the decision.
        Deciding {
            #[pin]
            decide: BoxFuture<'static, (Report, Pending)>,
            req: Option<Request<ReqBody>>,
            inner: Option<S>,
            limiter: RateLimiter,
        },
        /// Serving the request; headers are added to its response.
        Calling {
            #[pin]
            fut: S::Future,
            stamp: Option<Stamp>,
        },
        /// Refused: the ready response (429, 503, 400).
        Ready {
            res: Option<S::Response>,
        },
    }
}

impl<S, ReqBody> ResponseFuture<S, ReqBody>
where
    S: Service<Request<ReqBody>>,
{
    /// Served without a check: no header.
    pub(crate) fn calling(fut: S::Future) -> Self {
        ResponseFuture {
            state: State::Calling { fut, stamp: None },
        }
    }

    /// A request decided without waiting: refused at once, or served.
    pub(crate) fn decided<ResBody>(
        limiter: &RateLimiter,
        report: Report,
        pending: Pending,
        req: Request<ReqBody>,
        inner: &mut S,
    ) -> Self
    where
        S: Service<Request<ReqBody>, Response = Response<ResBody>>,
        ResBody: From<Bytes>,
    {
        let opts = limiter.inner.headers;
        if !report.allowed() {
            return Self::ready(headers::refusal(
                &report,
                &pending.identity,
                opts,
                pending.grpc,
                limiter.inner.exceeds_status,
            ));
        }
        ResponseFuture {
            state: State::Calling {
                fut: inner.call(req),
                stamp: Stamp::of(report, pending.identity, opts),
            },
        }
    }

    pub(crate) fn ready(res: S::Response) -> Self {
        ResponseFuture {
            state: State::Ready { res: Some(res) },
        }
    }

    /// A request [`RateLimiter::decide_now`] could not answer: it waits
    /// for Redis.
    pub(crate) fn deciding(
        limiter: RateLimiter,
        pending: Pending,
        req: Request<ReqBody>,
        inner: S,
    ) -> Self {
        let l = limiter.clone();
        let decide: BoxFuture<'static, (Report, Pending)> = Box::pin(async move {
            let report = l.decide_remote(&pending).await;
            (report, pending)
        });
        ResponseFuture {
            state: State::Deciding {
                decide,
                req: Some(req),
                inner: Some(inner),
                limiter,
            },
        }
    }
}

impl<S, ReqBody, ResBody> Future for ResponseFuture<S, ReqBody>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>>,
    ResBody: From<Bytes>,
{
    type Output = Result<Response<ResBody>, S::Error>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut state = self.project().state;
        loop {
            match state.as_mut().project() {
                Proj::Deciding {
                    decide,
                    req,
                    inner,
                    limiter,
                } => {
                    let (report, pending) = ready!(decide.poll(cx));
                    let opts = limiter.inner.headers;
                    if !report.allowed() {
                        let res = headers::refusal(
                            &report,
                            &pending.identity,
                            opts,
                            pending.grpc,
                            limiter.inner.exceeds_status,
                        );
                        state.set(State::Ready { res: Some(res) });
                        continue;
                    }
                    let (Some(req), Some(mut svc)) = (req.take(), inner.take()) else {
                        // Polled after completion: nothing sensible to do.
                        return Poll::Pending;
                    };
                    let fut = svc.call(req);
                    state.set(State::Calling {
                        fut,
                        stamp: Stamp::of(report, pending.identity, opts),
                    });
                }
                Proj::Calling { fut, stamp } => {
                    let mut res = ready!(fut.poll(cx))?;
                    if let Some(stamp) = stamp.take() {
                        stamp.apply(res.headers_mut());
                    }
                    return Poll::Ready(Ok(res));
                }
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

impl<S, ReqBody> std::fmt::Debug for ResponseFuture<S, ReqBody>
where
    S: Service<Request<ReqBody>>,
{
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let state = match &self.state {
            State::Deciding { .. } => "deciding",
            State::Calling { .. } => "calling",
            State::Ready { .. } => "ready",
        };
        f.debug_struct("ResponseFuture")
            .field("state", &state)
            .finish()
    }
}
