use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use futures::future::BoxFuture;
use http::{HeaderName, Response};
use pin_project_lite::pin_project;

use crate::body::CacheBody;
use crate::flow::Report;

pin_project! {
    /// The response future of [`ResponseCache`](crate::ResponseCache).
    pub struct ResponseFuture<F, B, E> {
        #[pin]
        kind: Kind<F, B, E>,
    }
}

pin_project! {
    #[project = KindProj]
    enum Kind<F, B, E> {
        /// Straight to the origin (bypass, uncacheable methods).
        Passthrough {
            #[pin]
            fut: F,
            report: Option<Report>,
            tag_header: HeaderName,
        },
        /// Lookup, coalescing, origin and store, or invalidation.
        Flow {
            fut: BoxFuture<'static, Result<Response<CacheBody<B>>, E>>,
        },
        /// Answered without waiting (an L1 hit).
        Ready {
            res: Option<Response<CacheBody<B>>>,
        },
    }
}

impl<F, B, E> ResponseFuture<F, B, E> {
    pub(crate) fn passthrough(fut: F, report: Option<Report>, tag_header: HeaderName) -> Self {
        ResponseFuture {
            kind: Kind::Passthrough {
                fut,
                report,
                tag_header,
            },
        }
    }

    pub(crate) fn ready(res: Response<CacheBody<B>>) -> Self {
        ResponseFuture {
            kind: Kind::Ready { res: Some(res) },
        }
    }

    pub(crate) fn flow(fut: BoxFuture<'static, Result<Response<CacheBody<B>>, E>>) -> Self {
        ResponseFuture {
            kind: Kind::Flow { fut },
        }
    }
}

impl<F, B, E> Future for ResponseFuture<F, B, E>
where
    F: Future<Output = Result<Response<B>, E>>,
{
    type Output = Result<Response<CacheBody<B>>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project().kind.project() {
            KindProj::Passthrough {
                fut,
                report,
                tag_header,
            } => {
                let res = ready!(fut.poll(cx))?;
                let (mut parts, body) = res.into_parts();
                parts.headers.remove(&*tag_header);
                if let Some(r) = report.take() {
                    r.apply(&mut parts.headers);
                }
                Poll::Ready(Ok(Response::from_parts(parts, CacheBody::origin(body))))
            }
            KindProj::Flow { fut } => fut.as_mut().poll(cx),
            // Polled again after completion: nothing left to give.
            KindProj::Ready { res } => res.take().map_or(Poll::Pending, |r| Poll::Ready(Ok(r))),
        }
    }
}

impl<F, B, E> std::fmt::Debug for ResponseFuture<F, B, E> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kind = match &self.kind {
            Kind::Passthrough { .. } => "passthrough",
            Kind::Flow { .. } => "flow",
            Kind::Ready { .. } => "ready",
        };
        f.debug_struct("ResponseFuture")
            .field("kind", &kind)
            .finish()
    }
}
