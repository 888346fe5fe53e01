use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::{HeaderValue, Request, Response, StatusCode, header};

use pin_project_lite::pin_project;

use crate::layer::LayerConfig;
use crate::plan::Enforcement;
use crate::tracker::{QuotaOutcome, UsageTracker, WriteMode};
use crate::{API_REQUEST, RATE_LIMITED};

/// The per-request handle handlers use to record custom metrics, found in
/// the request extensions (`axum::Extension<Usage>`).
#[derive(Clone)]
pub struct Usage {
    tracker: TrackerRef,
    tenant: Arc<str>,
}

/// Where a [`Usage`] finds its tracker. The layer hands out its own
/// configuration, which the request's future holds anyway: one reference
/// count per request shared with other worker threads, not two.
#[derive(Clone)]
enum TrackerRef {
    Tracker(UsageTracker),
    Layer(Arc<LayerConfig>),
}

impl std::fmt::Debug for Usage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Usage")
            .field("tracker", self.tracker())
            .field("tenant", &self.tenant)
            .finish()
    }
}

impl Usage {
    /// A handle for `tenant` on `tracker` (the layer builds these).
    pub fn new(tracker: UsageTracker, tenant: impl Into<Arc<str>>) -> Self {
        Usage {
            tracker: TrackerRef::Tracker(tracker),
            tenant: tenant.into(),
        }
    }

    fn of_layer(cfg: Arc<LayerConfig>, tenant: Arc<str>) -> Self {
        Usage {
            tracker: TrackerRef::Layer(cfg),
            tenant,
        }
    }

    fn tracker(&self) -> &UsageTracker {
        match &self.tracker {
            TrackerRef::Tracker(t) => t,
            TrackerRef::Layer(cfg) => &cfg.tracker,
        }
    }

    /// The request's tenant.
    pub fn tenant(&self) -> &str {
        &self.tenant
    }

    /// Records `n` units of `metric` (e.g. `record("donation_cents", 2500)`);
    /// returns the estimated total.
    pub fn record(&self, metric: &str, n: i64) -> i64 {
        self.tracker().record(&self.tenant, metric, n)
    }

    /// Consumes `n` units of `metric` only if the total stays within
    /// `limit`, atomically across instances.
    pub async fn try_consume(&self, metric: &str, n: i64, limit: i64) -> QuotaOutcome {
        self.tracker()
            .try_consume(&self.tenant, metric, n, limit)
            .await
    }
}

/// The service built by [`UsageLayer`](crate::UsageLayer).
pub struct UsageTracking<S> {
    pub(crate) inner: S,
    pub(crate) cfg: Arc<LayerConfig>,
}

impl<S: Clone> Clone for UsageTracking<S> {
    fn clone(&self) -> Self {
        UsageTracking {
            inner: self.inner.clone(),
            cfg: self.cfg.clone(),
        }
    }
}

impl<S> std::fmt::Debug for UsageTracking<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("UsageTracking")
    }
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

/// What is left to do once the inner service answered.
pub(crate) struct Post {
    cfg: Arc<LayerConfig>,
    tenant: Arc<str>,
    route: Option<String>,
    /// The plan's `api_request` limit and the total after this request.
    quota: Option<(i64, i64)>,
}

impl Post {
    fn finish<B>(self, res: &mut Response<B>) {
        let tracker = &self.cfg.tracker;
        if let Some(route) = &self.route {
            tracker.record(&self.tenant, route, 1);
        }
        if self.cfg.per_status_class {
            tracker.record(&self.tenant, status_class(res.status()), 1);
        }
        if res.status() == StatusCode::TOO_MANY_REQUESTS && is_rate_limit_denial(res.headers()) {
            tracker.record(&self.tenant, RATE_LIMITED, 1);
        }
        if let Some((limit, total)) = self.quota {
            quota_headers(res.headers_mut(), tracker, limit, total);
        }
    }
}

pin_project! {
    /// The response future of [`UsageTracking`]. The common case (batched
    /// counting, no hard quota) is this struct around the inner future:
    /// the request was counted in process before the inner call, and
    /// nothing is boxed.
    pub struct ResponseFuture<F, B, E> {
        #[pin]
        kind: Kind<F, B, E>,
    }
}

pin_project! {
    #[project = KindProj]
    enum Kind<F, B, E> {
        /// Counted; the inner service runs.
        Counting {
            #[pin]
            fut: F,
            post: Option<Post>,
        },
        /// A hard quota or a synchronous write is checked first.
        Checking {
            fut: BoxFuture<Result<Response<B>, E>>,
        },
    }
}

impl<F, B, E> Future for ResponseFuture<F, B, E>
where
    F: Future<Output = Result<Response<B>, E>>,
{
    type Output = Result<Response<B>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project().kind.project() {
            KindProj::Counting { fut, post } => {
                let mut res = std::task::ready!(fut.poll(cx))?;
                if let Some(post) = post.take() {
                    post.finish(&mut res);
                }
                Poll::Ready(Ok(res))
            }
            KindProj::Checking { fut } => fut.as_mut().poll(cx),
        }
    }
}

impl<F, B, E> std::fmt::Debug for ResponseFuture<F, B, E> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ResponseFuture")
    }
}

impl<S, ReqBody, ResBody> tower::Service<Request<ReqBody>> for UsageTracking<S>
where
    S: tower::Service<Request<ReqBody>, Response = Response<ResBody>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    ReqBody: Send + 'static,
    ResBody: From<Bytes> + Send + 'static,
{
    type Response = Response<ResBody>;
    type Error = S::Error;
    type Future = ResponseFuture<S::Future, ResBody, S::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<ReqBody>) -> Self::Future {
        let cfg = &self.cfg;
        let (parts, body) = req.into_parts();
        let found = cfg.tenant.tenant(&parts);
        let Some(tenant) = found.as_deref().or(cfg.anonymous.as_deref()) else {
            drop(found);
            return ResponseFuture {
                kind: Kind::Counting {
                    fut: self.inner.call(Request::from_parts(parts, body)),
                    post: None,
                },
            };
        };
        let (limit, hard) = match &cfg.plans {
            Some((plans, plan_of)) => match plan_of(tenant, &parts).and_then(|n| plans.get(&n)) {
                Some(plan) => (
                    plan.included(API_REQUEST)
                        .map(|l| i64::try_from(l).unwrap_or(i64::MAX)),
                    plan.enforcement == Enforcement::Hard,
                ),
                None => (None, false),
            },
            None => (None, false),
        };
        let route = if cfg.per_route {
            route_template(&parts)
        } else {
            None
        };
        let tracker = &cfg.tracker;
        let checked = (limit.is_some() && hard) || tracker.config().mode == WriteMode::Sync;
        // Counted here, before the inner call, in the common case: batched
        // in process, no round trip. The checked path counts after its
        // round trip.
        let total = if checked {
            0
        } else {
            tracker.record(tenant, API_REQUEST, 1)
        };
        // This thread's own copy of the id: the request's future and its
        // `Usage` handle clone it without touching a reference count other
        // worker threads share.
        let tenant = tollgate_redis::local::local_str(tenant);
        drop(found);
        let mut req = Request::from_parts(parts, body);
        req.extensions_mut()
            .insert(Usage::of_layer(cfg.clone(), tenant.clone()));
        let post = Post {
            cfg: cfg.clone(),
            tenant,
            route,
            quota: limit.map(|l| (l, total)),
        };
        if !checked {
            // Called at once: the readied service itself, no clone.
            return ResponseFuture {
                kind: Kind::Counting {
                    fut: self.inner.call(req),
                    post: Some(post),
                },
            };
        }
        // The readied service goes into the future; a fresh clone stays.
        let inner = tollgate_redis::take_readied(&mut self.inner);
        ResponseFuture {
            kind: Kind::Checking {
                fut: Box::pin(checked_call(inner, req, post, limit.filter(|_| hard))),
            },
        }
    }
}

/// The request path with a round trip before the inner call: a hard quota
/// (check and consume atomically) or a synchronous write.
async fn checked_call<S, ReqBody, ResBody>(
    mut inner: S,
    req: Request<ReqBody>,
    mut post: Post,
    hard_limit: Option<i64>,
) -> Result<Response<ResBody>, S::Error>
where
    S: tower::Service<Request<ReqBody>, Response = Response<ResBody>>,
    ResBody: From<Bytes>,
{
    let cfg = post.cfg.clone();
    let tracker = &cfg.tracker;
    let tenant = post.tenant.clone();
    let total = match hard_limit {
        Some(limit) => {
            // Failing closed, a request the store cannot decide on is
            // refused, and so not counted.
            let outcome = tracker
                .consume(&tenant, API_REQUEST, 1, limit, cfg.fail_closed)
                .await;
            match outcome {
                QuotaOutcome::Allowed { total } => Some(total),
                QuotaOutcome::Exceeded { total } => {
                    return Ok(quota_response(cfg.quota_status, tracker, limit, total));
                }
                QuotaOutcome::Unavailable if cfg.fail_closed => {
                    return Ok(unavailable_response());
                }
                QuotaOutcome::Unavailable => None,
            }
        }
        None => match tracker.config().mode {
            WriteMode::Batched => Some(tracker.record(&tenant, API_REQUEST, 1)),
            // Written (or, on failure, kept for a later write) but no
            // total known: no quota headers rather than a made-up total.
            WriteMode::Sync => tracker.record_now(&tenant, API_REQUEST, 1).await.ok(),
        },
    };
    post.quota = match (post.quota, total) {
        (Some((limit, _)), Some(total)) => Some((limit, total)),
        _ => None,
    };
    let mut res = inner.call(req).await?;
    post.finish(&mut res);
    Ok(res)
}

/// Whether a 429 comes from a rate limiter: it carries the limiter's
/// headers, legacy (`X-RateLimit-Limit`) or IETF (`RateLimit`,
/// `RateLimit-Policy`).
fn is_rate_limit_denial(h: &http::HeaderMap) -> bool {
    h.contains_key("x-ratelimit-limit")
        || h.contains_key("ratelimit")
        || h.contains_key("ratelimit-policy")
}

fn status_class(s: StatusCode) -> &'static str {
    match s.as_u16() {
        100..=199 => "api_request:status:1xx",
        200..=299 => "api_request:status:2xx",
        300..=399 => "api_request:status:3xx",
        400..=499 => "api_request:status:4xx",
        _ => "api_request:status:5xx",
    }
}

#[cfg(feature = "axum")]
fn route_template(parts: &http::request::Parts) -> Option<String> {
    parts
        .extensions
        .get::<axum::extract::MatchedPath>()
        .map(|m| format!("api_request:route:{}", m.as_str()))
}

#[cfg(not(feature = "axum"))]
fn route_template(_: &http::request::Parts) -> Option<String> {
    None
}

fn quota_headers(h: &mut http::HeaderMap, tracker: &UsageTracker, limit: i64, total: i64) {
    let reset = tracker
        .current_period()
        .seconds_left(crate::period::now_ms());
    h.insert("x-quota-limit", HeaderValue::from(limit));
    h.insert(
        "x-quota-remaining",
        HeaderValue::from((limit - total).max(0)),
    );
    h.insert("x-quota-reset", HeaderValue::from(reset));
}

fn quota_response<B: From<Bytes>>(
    status: StatusCode,
    tracker: &UsageTracker,
    limit: i64,
    total: i64,
) -> Response<B> {
    let body = serde_json::json!({
        "type": "https://tollgate.dev/problems/quota-exceeded",
        "title": "Monthly quota exceeded",
        "status": status.as_u16(),
        "detail": format!("{API_REQUEST}: {total} of {limit} used this period"),
    });
    let mut res = Response::new(B::from(Bytes::from(body.to_string())));
    *res.status_mut() = status;
    res.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/problem+json"),
    );
    quota_headers(res.headers_mut(), tracker, limit, total);
    let reset = res.headers().get("x-quota-reset").cloned();
    if let Some(r) = reset {
        res.headers_mut().insert(header::RETRY_AFTER, r);
    }
    res
}

fn unavailable_response<B: From<Bytes>>() -> Response<B> {
    let body = serde_json::json!({
        "type": "https://tollgate.dev/problems/quota-unavailable",
        "title": "Quota cannot be checked right now",
        "status": 503,
    });
    let mut res = Response::new(B::from(Bytes::from(body.to_string())));
    *res.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
    res.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/problem+json"),
    );
    res
}
