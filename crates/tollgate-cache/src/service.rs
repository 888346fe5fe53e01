use std::sync::Arc;
use std::task::{Context, Poll};

use http::{Method, Request, Response};
use http_body::Body;
use tower::Service;

use crate::body::CacheBody;
use crate::flow::{self, Report};
use crate::future::ResponseFuture;
use crate::key;
use crate::layer::Shared;

/// The response-caching service: answers GET/HEAD from the cache when it
/// may, stores what the origin lets it store, and invalidates a URL after
/// a successful POST/PUT/PATCH/DELETE to it. A cache failure is never an
/// error: the request goes to the origin. The inner service's error type is
/// kept.
pub struct ResponseCache<S> {
    inner: S,
    shared: Arc<Shared>,
}

impl<S: Clone> Clone for ResponseCache<S> {
    fn clone(&self) -> Self {
        ResponseCache {
            inner: self.inner.clone(),
            shared: self.shared.clone(),
        }
    }
}

impl<S: std::fmt::Debug> std::fmt::Debug for ResponseCache<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ResponseCache")
            .field("inner", &self.inner)
            .field("config", &self.shared)
            .finish()
    }
}

impl<S> ResponseCache<S> {
    pub(crate) fn new(inner: S, shared: Arc<Shared>) -> Self {
        ResponseCache { inner, shared }
    }

    /// The cache (for [`Cache::invalidate_tag`](crate::Cache::invalidate_tag)).
    pub fn cache(&self) -> &crate::Cache {
        &self.shared.cache
    }

    /// The wrapped service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }
}

impl<S, ReqBody, ResBody> Service<Request<ReqBody>> for ResponseCache<S>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    ReqBody: Send + 'static,
    ResBody: Body + Send + 'static,
    ResBody::Data: Send,
    ResBody::Error: Send,
{
    type Response = Response<CacheBody<ResBody>>;
    type Error = S::Error;
    type Future = ResponseFuture<S::Future, ResBody, S::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<ReqBody>) -> Self::Future {
        // Borrowed: only a request that waits for the store takes a
        // reference of its own (a count every worker thread shares).
        let shared = &self.shared;
        let ctx = match *req.method() {
            Method::GET | Method::HEAD => Some(flow::prepare(shared, &req)),
            _ => None,
        };
        let available = shared.cache.is_available();
        // An L1 hit is answered here: no task, no inner call (the readied
        // inner service stays readied for the next call).
        if available
            && let Some(Ok(ctx)) = &ctx
            && let Some(res) = flow::l1_hit(shared, ctx, req.headers())
        {
            return ResponseFuture::ready(res);
        }
        let tag_header = shared.tag_header.clone();
        let bypass = |inner: &mut S, req, label: &Arc<str>, why| {
            flow::count_bypass(label);
            ResponseFuture::passthrough(
                inner.call(req),
                Some(Report::bypass(why)),
                tag_header.clone(),
            )
        };
        match ctx {
            // GET and HEAD.
            Some(Err((why, label))) => bypass(&mut self.inner, req, &label, why),
            Some(Ok(ctx)) if !available => {
                bypass(&mut self.inner, req, &ctx.label, "store-unavailable")
            }
            Some(Ok(ctx)) => {
                let ctx = ctx.attach(&req);
                let shared = self.shared.clone();
                let inner = tollgate_redis::take_readied(&mut self.inner);
                ResponseFuture::flow(Box::pin(flow::serve(shared, inner, req, ctx)))
            }
            None => match *req.method() {
                Method::POST | Method::PUT | Method::PATCH | Method::DELETE => {
                    let tags = key::request_url_tags(&self.shared.keys, req.uri(), req.headers());
                    if tags.is_empty() {
                        ResponseFuture::passthrough(self.inner.call(req), None, tag_header)
                    } else {
                        let shared = self.shared.clone();
                        let inner = tollgate_redis::take_readied(&mut self.inner);
                        ResponseFuture::flow(Box::pin(flow::invalidating(shared, inner, req, tags)))
                    }
                }
                _ => ResponseFuture::passthrough(self.inner.call(req), None, tag_header),
            },
        }
    }
}
