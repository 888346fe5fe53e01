use std::task::{Context, Poll};

use bytes::Bytes;
use http::{Request, Response};
use tower::Service;

use crate::future::ResponseFuture;
use crate::headers;
use crate::key::RequestView;
use crate::limiter::{Prepared, RateLimiter};

/// The rate-limiting service: decides each request against the policies of
/// its route, answers 429 (or gRPC `RESOURCE_EXHAUSTED`) when over a limit,
/// and adds the rate-limit headers to every response of a limited route.
/// A limit is a response, never an `Err`: the inner service's error type is
/// kept.
#[derive(Debug)]
pub struct RateLimit<S> {
    inner: S,
    limiter: RateLimiter,
}

impl<S: Clone> Clone for RateLimit<S> {
    fn clone(&self) -> Self {
        RateLimit {
            inner: self.inner.clone(),
            limiter: self.limiter.clone(),
        }
    }
}

impl<S> RateLimit<S> {
    /// Wraps `inner`.
    pub fn new(inner: S, limiter: RateLimiter) -> Self {
        RateLimit { inner, limiter }
    }

    /// The limiter.
    pub fn limiter(&self) -> &RateLimiter {
        &self.limiter
    }

    /// The wrapped service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }
}

impl<S, ReqBody, ResBody> Service<Request<ReqBody>> for RateLimit<S>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>> + Clone + Send + 'static,
    ReqBody: Send + 'static,
    ResBody: From<Bytes>,
{
    type Response = Response<ResBody>;
    type Error = S::Error;
    type Future = ResponseFuture<S, ReqBody>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<ReqBody>) -> Self::Future {
        // A request decided here calls the readied inner service at once; only
        // one that waits for Redis takes the readied service into its future
        // (leaving a fresh clone, polled ready before its own call).
        match self.limiter.prepare(&RequestView::of(&req)) {
            Prepared::Pass => ResponseFuture::calling(self.inner.call(req)),
            Prepared::NoKey(status) => {
                let grpc = crate::route::is_grpc(req.headers());
                let code = if status == http::StatusCode::TOO_MANY_REQUESTS {
                    headers::grpc::RESOURCE_EXHAUSTED
                } else {
                    headers::grpc::INVALID_ARGUMENT
                };
                ResponseFuture::ready(headers::problem(
                    status,
                    code,
                    status
                        .canonical_reason()
                        .unwrap_or("Rate Limit Key Missing"),
                    "the request carries no key to rate-limit it by",
                    None,
                    grpc,
                ))
            }
            Prepared::Check(pending) => match self.limiter.decide_now(&pending) {
                // Decided in process (fallback, deny cache, lease): no
                // boxed future, no task switch, no clone of the inner
                // service.
                Some(report) => {
                    ResponseFuture::decided(&self.limiter, report, pending, req, &mut self.inner)
                }
                None => {
                    let inner = tollgate_redis::take_readied(&mut self.inner);
                    ResponseFuture::deciding(self.limiter.clone(), pending, req, inner)
                }
            },
        }
    }
}
