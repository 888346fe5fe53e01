//! What happens to one request: lookup, freshness, coalescing, the origin
//! call, the store decision (RFC 9111 shared-cache rules through
//! `http-cache-semantics`), and the headers that report it.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::{Bytes, BytesMut};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, Response, StatusCode, Uri};
use http_body::Body;
use http_body_util::BodyExt;
use http_cache_semantics::{CacheOptions, CachePolicy};
use tower::Service;

use crate::body::{CacheBody, Capped};
use crate::cache::Fetched;
use crate::entry::{Entry, Meta, Stored};
use crate::flight::{FlightGuard, Role};
use crate::key::{self, UrlKey};
use crate::layer::{RequestDirectives, Shared, screen};
use crate::route::{RouteRule, matched_path};
use crate::store::now_ms;
use tollgate_redis::header_value::LastValue;

/// `X-Cache`.
pub static X_CACHE: HeaderName = HeaderName::from_static("x-cache");
/// `Cache-Status` (RFC 9211).
pub static CACHE_STATUS: HeaderName = HeaderName::from_static("cache-status");

/// Statuses stored (complete responses RFC 9110 lets caches reuse).
const STORABLE_STATUSES: [u16; 11] = [200, 203, 204, 300, 301, 308, 404, 405, 410, 414, 501];

const HOP_BY_HOP: [&str; 9] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "proxy-authenticate",
    "proxy-authorization",
];

/// Everything about a GET/HEAD request the cache needs after the request
/// itself went to the origin.
pub(crate) struct Ctx {
    pub url: UrlKey,
    pub rule: Arc<RouteRule>,
    pub label: Arc<str>,
    /// The request's URI and headers: empty until [`Ctx::attach`] copies
    /// them, which an L1 hit (answered from the request itself) never
    /// needs.
    pub uri: Uri,
    pub headers: HeaderMap,
    pub credentials: bool,
    pub per_user: bool,
    pub head: bool,
    pub conditional: bool,
    pub refresh: bool,
    pub no_store: bool,
    /// The cache's invalidation epoch when the request arrived.
    pub epoch: u64,
}

/// Cache-Control directives the cache reads.
#[derive(Default, Debug)]
pub(crate) struct Directives {
    pub no_store: bool,
    pub no_cache: bool,
    pub private: bool,
    pub public: bool,
    pub must_revalidate: bool,
    pub max_age: Option<u64>,
    pub s_maxage: Option<u64>,
    pub swr: Option<u64>,
    pub sie: Option<u64>,
}

pub(crate) fn directives(h: &HeaderMap) -> Directives {
    let mut d = Directives::default();
    for v in h.get_all(header::CACHE_CONTROL) {
        let Ok(s) = v.to_str() else { continue };
        for part in s.split(',') {
            let (name, value) = match part.split_once('=') {
                Some((n, v)) => (n.trim(), Some(v.trim().trim_matches('"'))),
                None => (part.trim(), None),
            };
            let num = || value.and_then(|v| v.parse::<u64>().ok());
            match name.to_ascii_lowercase().as_str() {
                "no-store" => d.no_store = true,
                // `no-cache="field"` also means "do not reuse without
                // validation" for us: we never store it.
                "no-cache" => d.no_cache = true,
                "private" => d.private = true,
                "public" => d.public = true,
                "must-revalidate" | "proxy-revalidate" => d.must_revalidate = true,
                "max-age" => d.max_age = Some(num().unwrap_or(0)),
                "s-maxage" => d.s_maxage = Some(num().unwrap_or(0)),
                "stale-while-revalidate" => d.swr = num(),
                "stale-if-error" => d.sie = num(),
                _ => {}
            }
        }
    }
    d
}

/// Decides how a GET/HEAD request is handled, before anything async.
pub(crate) fn prepare<B>(
    shared: &Shared,
    req: &Request<B>,
) -> Result<Ctx, (&'static str, Arc<str>)> {
    let template = matched_path(req.extensions());
    let (rule, label) = shared
        .routes
        .lookup(req.method(), req.uri().path(), template);
    let bypass = |why: &'static str| (why, label.clone());
    if !rule.enabled {
        return Err(bypass("route"));
    }
    let h = req.headers();
    let seen = h
        .keys()
        .filter_map(|n| shared.screened.get(n))
        .fold(0, |all, bits| all | bits);
    if seen & screen::RANGE != 0 {
        return Err(bypass("range"));
    }
    let credentials = seen & screen::CREDENTIALS != 0;
    let user = match (&rule.per_user, credentials) {
        (Some(k), true) => Some(
            k.identity(h, req.extensions())
                .ok_or_else(|| bypass("no-user"))?,
        ),
        _ => None,
    };
    let url = key::url_key(&shared.keys, req.uri(), h, user.as_deref()).map_err(bypass)?;
    let (mut refresh, mut no_store) = (false, false);
    if shared.directives == RequestDirectives::Honour {
        let d = directives(h);
        let pragma = h
            .get(header::PRAGMA)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.contains("no-cache"));
        refresh = d.no_cache
            || d.max_age == Some(0)
            || (pragma && !h.contains_key(header::CACHE_CONTROL));
        no_store = d.no_store;
    }
    if seen & screen::UNKEYED != 0 {
        no_store = true;
        warn_unkeyed_once(shared, h);
    }
    Ok(Ctx {
        url,
        per_user: user.is_some(),
        rule,
        label,
        uri: Uri::default(),
        headers: HeaderMap::new(),
        credentials,
        head: req.method() == Method::HEAD,
        conditional: seen & screen::CONDITIONAL != 0,
        refresh,
        no_store,
        epoch: shared.cache.epoch(),
    })
}

impl Ctx {
    /// Keeps a copy of the request's URI and headers, for the steps after
    /// the request went to the origin.
    pub(crate) fn attach<B>(mut self, req: &Request<B>) -> Self {
        self.uri = req.uri().clone();
        self.headers = req.headers().clone();
        self
    }
}

enum Lookup {
    Found(Arc<Entry>),
    Miss { vary: bool },
}

/// Looks the request up. With a store that bounds its reads, the first
/// read ends within the deadline by itself (for Redis, the shared handle
/// cuts each command off at it, and `lookup_timeout` is that deadline), so
/// only a second read, for a variant, needs a timer: the time left. Other
/// stores' lookups run whole under a timer (see `serve`).
async fn lookup(shared: &Shared, ctx: &Ctx) -> Result<Lookup, crate::Error> {
    let started = std::time::Instant::now();
    let Some(found) = shared.cache.get_stored(ctx.url.key()).await? else {
        return Ok(Lookup::Miss { vary: false });
    };
    match found {
        Fetched::Response(e) => Ok(Lookup::Found(e)),
        Fetched::Vary(names) => {
            let Ok(values) = key::vary_values(&names, &ctx.headers) else {
                return Ok(Lookup::Miss { vary: true });
            };
            let variant = key::variant_key(&ctx.url, &values);
            let left = shared.lookup_timeout.saturating_sub(started.elapsed());
            let second = tokio::time::timeout(left, shared.cache.get_stored(&variant))
                .await
                .map_err(|_| {
                    crate::Error::Store(tollgate_redis::Error::Timeout(shared.lookup_timeout))
                })?;
            match second? {
                Some(Fetched::Response(e)) => Ok(Lookup::Found(e)),
                Some(Fetched::Vary(_)) | None => Ok(Lookup::Miss { vary: true }),
            }
        }
    }
}

/// A fresh, usable response in this instance's L1, answered without
/// waiting.
pub(crate) fn l1_hit<B>(
    shared: &Shared,
    ctx: &Ctx,
    req: &HeaderMap,
) -> Option<Response<CacheBody<B>>> {
    if ctx.refresh {
        return None;
    }
    let e = shared.cache.l1_entry(&ctx.url)?;
    let now = now_ms();
    if e.ttl_ms(now) <= 0 || !usable(ctx, req, &e) {
        return None;
    }
    Some(fresh_hit(shared, ctx, req, &e, now))
}

/// The response for a fresh hit on `e`, counted.
fn fresh_hit<B>(
    shared: &Shared,
    ctx: &Ctx,
    req: &HeaderMap,
    e: &Entry,
    now: u64,
) -> Response<CacheBody<B>> {
    count(&ctx.label, "hit");
    let ttl = e.ttl_ms(now) / 1000;
    // The key is appended to the text: no shared value with it shown.
    let status = if shared.show_key {
        format!("tollgate; hit; ttl={ttl}").into()
    } else {
        Status::Value(hit_status(ttl))
    };
    let report = Report {
        x_cache: "HIT",
        status,
    }
    .with_key(shared, ctx);
    from_entry(e, ctx, req, now, report)
}

/// `Cache-Status` of a fresh hit with `ttl` seconds left. It changes once
/// a second at most: this thread's last value is reused rather than
/// formatted and allocated for every hit.
fn hit_status(ttl: i64) -> HeaderValue {
    thread_local! {
        static LAST: LastValue<i64> = const { LastValue::new() };
    }
    LAST.with(|last| {
        last.get(
            |t| *t == ttl,
            || {
                let text = format!("tollgate; hit; ttl={ttl}");
                Some((ttl, HeaderValue::from_maybe_shared(Bytes::from(text)).ok()?))
            },
        )
    })
    .unwrap_or_else(|| HeaderValue::from_static("tollgate; hit"))
}

/// Whether a stored response may answer this request (`req`: its
/// headers).
fn usable(ctx: &Ctx, req: &HeaderMap, e: &Entry) -> bool {
    if ctx.credentials && !ctx.per_user && !e.meta.public {
        return false;
    }
    if e.meta.vary.is_empty() {
        return true;
    }
    let names: Vec<String> = e.meta.vary.iter().map(|(n, _)| n.clone()).collect();
    key::vary_values(&names, req).is_ok_and(|v| v == e.meta.vary)
}

/// How the response is reported.
pub(crate) struct Report {
    x_cache: &'static str,
    status: Status,
}

/// A `Cache-Status` value: text still to be made a header value, or one
/// made already.
enum Status {
    Text(String),
    Value(HeaderValue),
}

impl From<String> for Status {
    fn from(s: String) -> Self {
        Status::Text(s)
    }
}

impl Report {
    pub(crate) fn bypass(detail: &str) -> Self {
        Report {
            x_cache: "BYPASS",
            status: format!("tollgate; fwd=bypass; detail={detail}").into(),
        }
    }

    pub(crate) fn apply(self, h: &mut HeaderMap) {
        let (x_cache, cache_status) = self.values();
        h.insert(X_CACHE.clone(), x_cache);
        if let Some(v) = cache_status {
            h.insert(CACHE_STATUS.clone(), v);
        }
    }

    /// The `X-Cache` and `Cache-Status` values (none for a status that is
    /// not a valid header value).
    fn values(self) -> (HeaderValue, Option<HeaderValue>) {
        let cache_status = match self.status {
            // The report's own bytes become the value (no copy).
            Status::Text(s) => HeaderValue::from_maybe_shared(Bytes::from(s)).ok(),
            Status::Value(v) => Some(v),
        };
        (HeaderValue::from_static(self.x_cache), cache_status)
    }

    fn with_key(mut self, shared: &Shared, ctx: &Ctx) -> Self {
        if shared.show_key
            && let Status::Text(s) = &mut self.status
        {
            s.push_str(&format!("; key=\"{}\"", ctx.url.key()));
        }
        self
    }
}

fn count(label: &Arc<str>, outcome: &'static str) {
    tollgate_redis::counters::increment(
        "tollgate_cache_requests_total",
        [Some(("route", label)), None],
        [Some(("outcome", outcome)), None],
    );
}

pub(crate) fn count_bypass(label: &Arc<str>) {
    count(label, "bypass");
}

/// The GET/HEAD path.
///
/// An `async` block rather than an `async fn`: an `async fn`'s future
/// holds its arguments twice (as captured and as locals), which here took
/// a hit's future past the allocator's per-thread cache.
#[allow(
    clippy::manual_async_fn,
    reason = "an async fn's future holds its arguments twice"
)]
pub(crate) fn serve<S, ReqBody, ResBody>(
    shared: Arc<Shared>,
    inner: S,
    req: Request<ReqBody>,
    ctx: Ctx,
) -> impl Future<Output = Result<Response<CacheBody<ResBody>>, S::Error>> + Send
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>> + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    ReqBody: Send + 'static,
    ResBody: Body + Send + 'static,
    ResBody::Data: Send,
    ResBody::Error: Send,
{
    async move {
        // Every step past the lookup is boxed: a hit, the common case, then
        // carries only the lookup's state, and its future stays small enough
        // for the allocator's per-thread cache (under 1 KiB); a miss pays one
        // more allocation next to an origin call.
        let found = if shared.flights.contains(ctx.url.key(), shared.cache.epoch()) {
            // A fill is under way: wait for it rather than ask the store.
            Ok(Lookup::Miss { vary: false })
        } else if shared.cache.bounds_reads() {
            lookup(&shared, &ctx).await
        } else {
            // Boxed with its timer: only stores that do not bound their
            // own reads take this branch.
            let timed = tokio::time::timeout(shared.lookup_timeout, lookup(&shared, &ctx));
            match Box::pin(timed).await {
                Ok(r) => r,
                Err(_) => Err(crate::Error::Store(tollgate_redis::Error::Timeout(
                    shared.lookup_timeout,
                ))),
            }
        };
        let now = now_ms();
        match found {
            Err(e) => {
                metrics::counter!("tollgate_cache_store_errors_total", "op" => "get").increment(1);
                tracing::debug!(error = %e, "cache lookup failed; bypassing");
                count(&ctx.label, "bypass");
                let report = Report::bypass("store-unavailable");
                Box::pin(passthrough(&shared, inner, req, report)).await
            }
            Ok(Lookup::Found(e)) if !usable(&ctx, &ctx.headers, &e) => {
                Box::pin(fill(shared, inner, req, ctx, "vary-miss", None)).await
            }
            Ok(Lookup::Found(e)) => {
                let ttl = e.ttl_ms(now);
                // The entry answers an origin error only while it may:
                // fresh, or stale within its stale-if-error window.
                let answers_errors = ttl > 0 || ttl.unsigned_abs() <= e.meta.sie_ms;
                if ctx.refresh {
                    let fallback = answers_errors.then_some(e);
                    return Box::pin(fill(shared, inner, req, ctx, "request", fallback)).await;
                }
                if ttl > 0 {
                    return Ok(fresh_hit(&shared, &ctx, &ctx.headers, &e, now));
                }
                let stale_for = (-ttl) as u64;
                if stale_for <= e.meta.swr_ms {
                    count(&ctx.label, "stale");
                    let report = Report {
                        x_cache: "STALE",
                        status: format!(
                            "tollgate; hit; ttl=-{}; detail=stale-while-revalidate",
                            stale_for.div_ceil(1000)
                        )
                        .into(),
                    }
                    .with_key(&shared, &ctx);
                    let res = from_entry(&e, &ctx, &ctx.headers, now, report);
                    refresh_in_background(shared, inner, req, ctx);
                    return Ok(res);
                }
                let fallback = answers_errors.then_some(e);
                Box::pin(fill(shared, inner, req, ctx, "stale", fallback)).await
            }
            Ok(Lookup::Miss { vary }) => {
                let fwd = if vary { "vary-miss" } else { "uri-miss" };
                Box::pin(fill(shared, inner, req, ctx, fwd, None)).await
            }
        }
    }
}

async fn passthrough<S, ReqBody, ResBody>(
    shared: &Shared,
    mut inner: S,
    req: Request<ReqBody>,
    report: Report,
) -> Result<Response<CacheBody<ResBody>>, S::Error>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>>,
{
    let res = inner.call(req).await?;
    let (mut parts, body) = res.into_parts();
    parts.headers.remove(&shared.tag_header);
    report.apply(&mut parts.headers);
    Ok(Response::from_parts(parts, CacheBody::origin(body)))
}

/// Goes to the origin (leading or joining a coalesced fill when it may),
/// stores what may be stored, falls back to a stale entry on errors.
async fn fill<S, ReqBody, ResBody>(
    shared: Arc<Shared>,
    mut inner: S,
    req: Request<ReqBody>,
    ctx: Ctx,
    fwd: &'static str,
    stale: Option<Arc<Entry>>,
) -> Result<Response<CacheBody<ResBody>>, S::Error>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>>,
    ResBody: Body,
{
    let key = ctx.url.key().to_owned();
    let known_uncacheable = shared.uncacheable.contains_key(&key);
    let mut guard: Option<FlightGuard<Arc<Entry>>> = None;
    if !known_uncacheable && !ctx.refresh {
        let lead = !ctx.head && !ctx.conditional && !ctx.no_store;
        let waiter = if lead {
            match shared.flights.join(&key, shared.cache.epoch()) {
                Role::Leader(g) => {
                    guard = Some(g);
                    None
                }
                Role::Follower(w) => Some(w),
            }
        } else {
            shared.flights.follow(&key, shared.cache.epoch())
        };
        if let Some(w) = waiter
            && let Some(e) = w.wait(shared.coalesce_timeout).await
            && usable(&ctx, &ctx.headers, &e)
        {
            count(&ctx.label, "coalesced");
            let now = now_ms();
            let report = Report {
                x_cache: "HIT",
                status: format!(
                    "tollgate; fwd={fwd}; fwd-status={}; collapsed; ttl={}",
                    e.meta.status,
                    e.ttl_ms(now) / 1000
                )
                .into(),
            }
            .with_key(&shared, &ctx);
            return Ok(from_entry(&e, &ctx, &ctx.headers, now, report));
        }
    }
    count(
        &ctx.label,
        if fwd == "stale" { "stale-miss" } else { "miss" },
    );
    let res = match inner.call(req).await {
        Ok(res) => res,
        Err(err) => {
            return match stale {
                Some(e) => Ok(serve_stale(&shared, &e, &ctx, None)),
                None => Err(err),
            };
        }
    };
    if res.status().is_server_error()
        && let Some(e) = &stale
    {
        return Ok(serve_stale(&shared, e, &ctx, Some(res.status())));
    }
    let (mut parts, body) = res.into_parts();
    let header_tags = take_tags(&mut parts.headers, &shared.tag_header);
    let mut status = format!("tollgate; fwd={fwd}; fwd-status={}", parts.status.as_u16());
    let plan = if ctx.head {
        Err("head")
    } else {
        plan_store(&shared, &ctx, &parts, header_tags)
    };
    let body = match plan {
        Ok(plan) => {
            // Claimed only for a body of known length within the cap: one
            // of unknown length may still turn out too big. (A body cut
            // short after this, its client gone or its origin failing, is
            // still not stored.)
            let known = body
                .size_hint()
                .exact()
                .is_some_and(|n| n <= shared.max_body as u64);
            let stored = if known { "; stored" } else { "" };
            status.push_str(&format!("{stored}; ttl={}", plan.meta.fresh_ms / 1000));
            let recorder = Recorder {
                shared: shared.clone(),
                plan,
                guard,
                refreshing: None,
                buf: Capped {
                    buf: BytesMut::new(),
                    cap: shared.max_body,
                },
            };
            CacheBody::recording(body, recorder)
        }
        Err(why) => {
            if guard.is_some() {
                // Nobody should queue behind this key for a while.
                shared.uncacheable.insert(key, ());
            }
            tracing::trace!(why, "response not stored");
            drop(guard);
            CacheBody::origin(body)
        }
    };
    let report = Report {
        x_cache: "MISS",
        status: status.into(),
    }
    .with_key(&shared, &ctx);
    report.apply(&mut parts.headers);
    Ok(Response::from_parts(parts, body))
}

fn serve_stale<B>(
    shared: &Shared,
    e: &Entry,
    ctx: &Ctx,
    origin: Option<StatusCode>,
) -> Response<CacheBody<B>> {
    count(&ctx.label, "stale");
    let now = now_ms();
    let mut status = String::from("tollgate; fwd=stale");
    if let Some(s) = origin {
        status.push_str(&format!("; fwd-status={}", s.as_u16()));
    }
    status.push_str(&format!(
        "; ttl=-{}; detail=stale-if-error",
        ((-e.ttl_ms(now)).max(0) as u64).div_ceil(1000)
    ));
    let report = Report {
        x_cache: "STALE",
        status: status.into(),
    }
    .with_key(shared, ctx);
    from_entry(e, ctx, &ctx.headers, now, report)
}

fn take_tags(h: &mut HeaderMap, name: &HeaderName) -> Vec<String> {
    let mut tags = Vec::new();
    for v in h.get_all(name) {
        if let Ok(s) = v.to_str() {
            tags.extend(
                s.split([',', ' '])
                    .map(str::trim)
                    .filter(|t| !t.is_empty() && t.len() <= 256)
                    .map(str::to_owned),
            );
        }
    }
    h.remove(name);
    tags.truncate(64);
    tags
}

/// A response about to be stored.
pub(crate) struct Plan {
    base_key: String,
    store_key: String,
    vary: Vec<String>,
    meta: Meta,
    store_ttl: Duration,
    tags: Vec<String>,
    epoch: u64,
}

fn plan_store(
    shared: &Shared,
    ctx: &Ctx,
    parts: &http::response::Parts,
    header_tags: Vec<String>,
) -> Result<Plan, &'static str> {
    if ctx.no_store {
        return Err("request");
    }
    if !STORABLE_STATUSES.contains(&parts.status.as_u16()) {
        return Err("status");
    }
    let h = &parts.headers;
    if h.contains_key(header::SET_COOKIE) {
        return Err("set-cookie");
    }
    let cc = directives(h);
    if cc.no_store || cc.private || cc.no_cache {
        return Err("cache-control");
    }
    if ctx.credentials && !ctx.per_user && !cc.public {
        return Err("credentials");
    }
    let vary = key::vary_names(h)?;
    let vary_values = key::vary_values(&vary, &ctx.headers)?;
    if let Some(len) = h
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
        && len > shared.max_body as u64
    {
        return Err("too-big");
    }

    // The request as the policy sees it: only what is keyed. Credentials
    // were dealt with above and never reach the policy (nor the store).
    let mut policy_req = Request::builder().method(Method::GET).uri(ctx.uri.clone());
    if let Some(host) = ctx.headers.get(header::HOST) {
        policy_req = policy_req.header(header::HOST, host);
    }
    for (n, v) in &vary_values {
        if let Some(v) = v {
            policy_req = policy_req.header(n.as_str(), v.as_str());
        }
    }
    let policy_req = policy_req.body(()).map_err(|_| "request")?;
    let now = SystemTime::now();
    let policy = CachePolicy::new_options(
        &policy_req,
        parts,
        now,
        CacheOptions {
            shared: true,
            ..CacheOptions::default()
        },
    );
    if !policy.is_storable() {
        return Err("not-storable");
    }
    let explicit = cc.max_age.is_some() || cc.s_maxage.is_some() || h.contains_key(header::EXPIRES);
    let initial_age_s = h
        .get(header::AGE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok())
        .unwrap_or(0);
    let fresh = if explicit {
        policy.time_to_live(now)
    } else {
        ctx.rule
            .ttl
            .unwrap_or(shared.default_ttl)
            .saturating_sub(Duration::from_secs(initial_age_s))
    };
    let (swr, sie) = if cc.must_revalidate {
        (Duration::ZERO, Duration::ZERO)
    } else {
        (
            cc.swr
                .map(Duration::from_secs)
                .or(ctx.rule.swr)
                .unwrap_or(shared.swr),
            cc.sie
                .map(Duration::from_secs)
                .or(ctx.rule.sie)
                .unwrap_or(shared.sie),
        )
    };
    if fresh.is_zero() && swr.is_zero() && sie.is_zero() {
        return Err("expired");
    }

    let connection: Vec<String> = h
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|v| v.trim().to_ascii_lowercase())
        .collect();
    let mut headers = Vec::with_capacity(h.len());
    for (n, v) in h {
        let name = n.as_str();
        if HOP_BY_HOP.contains(&name)
            || connection.iter().any(|c| c == name)
            || crate::entry::is_filled(n)
        {
            continue;
        }
        let v = v.to_str().map_err(|_| "header-encoding")?;
        headers.push((name.to_owned(), v.to_owned()));
    }

    let mut tags = vec![ctx.url.url_tag()];
    for t in ctx.rule.tags.iter().chain(header_tags.iter()) {
        if !tags.contains(t) {
            tags.push(t.clone());
        }
    }
    let store_key = if vary.is_empty() {
        ctx.url.key().to_owned()
    } else {
        key::variant_key(&ctx.url, &vary_values)
    };
    Ok(Plan {
        base_key: ctx.url.key().to_owned(),
        store_key,
        vary,
        meta: Meta {
            status: parts.status.as_u16(),
            headers,
            stored_at_ms: now_ms(),
            initial_age_s,
            fresh_ms: fresh.as_millis() as u64,
            swr_ms: swr.as_millis() as u64,
            sie_ms: sie.as_millis() as u64,
            public: cc.public,
            vary: vary_values,
        },
        store_ttl: fresh + swr.max(sie) + Duration::from_secs(1),
        tags,
        epoch: ctx.epoch,
    })
}

/// Copies the body of a response being stored; stores it when the body
/// ends within the cap. Dropped unfinished (cap passed, error, client gone)
/// it stores nothing and releases coalesced waiters to the origin.
pub(crate) struct Recorder {
    shared: Arc<Shared>,
    plan: Plan,
    guard: Option<FlightGuard<Arc<Entry>>>,
    /// A background refresh's claim on its key, held until the store has
    /// landed so that requests in between don't start a second refresh.
    refreshing: Option<RefreshMark>,
    buf: Capped,
}

/// A key's claim in [`Shared::refreshing`]; dropping it releases the key.
struct RefreshMark(Arc<Shared>, String);

impl RefreshMark {
    /// Claims `key`; `None` when a refresh of it is already under way.
    fn claim(shared: &Arc<Shared>, key: &str) -> Option<Self> {
        let claimed = shared
            .refreshing
            .lock()
            .map(|mut r| r.insert(key.to_owned()))
            .unwrap_or(false);
        claimed.then(|| RefreshMark(shared.clone(), key.to_owned()))
    }
}

impl Drop for RefreshMark {
    fn drop(&mut self) {
        if let Ok(mut r) = self.0.refreshing.lock() {
            r.remove(&self.1);
        }
    }
}

impl std::fmt::Debug for Recorder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Recorder")
            .field("key", &self.plan.store_key)
            .field("bytes", &self.buf.buf.len())
            .finish()
    }
}

impl Recorder {
    pub(crate) fn push(&mut self, data: &Bytes) -> bool {
        if self.buf.push(data) {
            return true;
        }
        // Too big: streams through, never stored; don't queue behind it.
        self.shared
            .uncacheable
            .insert(self.plan.base_key.clone(), ());
        false
    }

    pub(crate) fn finish(self) {
        let Recorder {
            shared,
            plan,
            guard,
            refreshing,
            buf,
        } = self;
        let entry = Arc::new(Entry::new(plan.meta, buf.buf.freeze()));
        if let Some(g) = &guard {
            g.complete(Some(entry.clone()));
        }
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            return;
        };
        rt.spawn(async move {
            // An invalidation since the request arrived: this response may
            // predate it, so it is not stored.
            if shared.cache.epoch() != plan.epoch {
                drop(guard);
                return;
            }
            let stored = Stored::Response((*entry).clone());
            let Ok(bytes) = stored.encode() else { return };
            let len = bytes.len() as u64;
            let cache = &shared.cache;
            let mut ok = cache
                .bounded_write(cache.put_raw(&plan.store_key, bytes, plan.store_ttl, &plan.tags))
                .await
                .is_ok();
            if ok
                && !plan.vary.is_empty()
                && let Ok(v) = Stored::Vary(plan.vary).encode()
            {
                ok = cache
                    .bounded_write(cache.put_raw(&plan.base_key, v, plan.store_ttl, &plan.tags))
                    .await
                    .is_ok();
            }
            if ok && shared.cache.epoch() != plan.epoch {
                // An invalidation ran while this was being written and may
                // have missed it: take it back out.
                let _ = shared.cache.invalidate_quietly(&plan.store_key).await;
                ok = false;
            }
            if ok {
                metrics::counter!("tollgate_cache_stored_bytes_total").increment(len);
                shared.uncacheable.invalidate(&plan.base_key);
            }
            drop(guard);
            drop(refreshing);
        });
    }
}

/// One background refresh per key at a time.
fn refresh_in_background<S, ReqBody, ResBody>(
    shared: Arc<Shared>,
    mut inner: S,
    mut req: Request<ReqBody>,
    mut ctx: Ctx,
) where
    S: Service<Request<ReqBody>, Response = Response<ResBody>> + Send + 'static,
    S::Future: Send + 'static,
    ReqBody: Send + 'static,
    ResBody: Body + Send + 'static,
    ResBody::Data: Send,
    ResBody::Error: Send,
{
    let Some(mark) = RefreshMark::claim(&shared, ctx.url.key()) else {
        return;
    };
    // The refresh wants a full response, not a 304 for this client.
    for h in [header::IF_NONE_MATCH, header::IF_MODIFIED_SINCE] {
        req.headers_mut().remove(&h);
        ctx.headers.remove(&h);
    }
    ctx.head = false;
    if req.method() == Method::HEAD {
        *req.method_mut() = Method::GET;
    }
    tokio::spawn(async move {
        let call = inner.call(req);
        let Ok(Ok(res)) = tokio::time::timeout(Duration::from_secs(60), call).await else {
            return;
        };
        if !res.status().is_success() && !STORABLE_STATUSES.contains(&res.status().as_u16()) {
            return;
        }
        let (mut parts, body) = res.into_parts();
        let tags = take_tags(&mut parts.headers, &shared.tag_header);
        let Ok(plan) = plan_store(&shared, &ctx, &parts, tags) else {
            return;
        };
        let recorder = Recorder {
            shared: shared.clone(),
            plan,
            guard: None,
            refreshing: Some(mark),
            buf: Capped {
                buf: BytesMut::new(),
                cap: shared.max_body,
            },
        };
        let mut body = std::pin::pin!(CacheBody::recording(body, recorder));
        while let Some(frame) = body.frame().await {
            if frame.is_err() {
                break;
            }
        }
    });
}

/// A response from a stored entry: `Age`, a 304 for a matching conditional
/// request, no body for HEAD.
fn from_entry<B>(
    e: &Entry,
    ctx: &Ctx,
    req: &HeaderMap,
    now: u64,
    report: Report,
) -> Response<CacheBody<B>> {
    let age = tollgate_redis::header_value::number(e.age_s(now));
    if not_modified(e, req) {
        let mut res = Response::new(CacheBody::empty());
        *res.status_mut() = StatusCode::NOT_MODIFIED;
        let h = res.headers_mut();
        let stored = e.stored_headers();
        for name in [
            header::CACHE_CONTROL,
            header::CONTENT_LOCATION,
            header::DATE,
            header::ETAG,
            header::EXPIRES,
            header::VARY,
            header::LAST_MODIFIED,
        ] {
            for v in stored.get_all(&name) {
                h.append(name.clone(), v.clone());
            }
        }
        h.insert(header::AGE, age);
        report.apply(h);
        return res;
    }
    let (x_cache, cache_status) = report.values();
    let body = if ctx.head {
        CacheBody::empty()
    } else {
        CacheBody::cached(e.body.clone())
    };
    let mut res = Response::new(body);
    *res.status_mut() = e.status();
    *res.headers_mut() = e.response_headers(age, x_cache, cache_status);
    res
}

/// RFC 9110 §13.1.2 / §13.1.3 (weak comparison for If-None-Match).
fn not_modified(e: &Entry, req: &HeaderMap) -> bool {
    if e.meta.status != 200 {
        return false;
    }
    if let Some(inm) = req.get(header::IF_NONE_MATCH).and_then(|v| v.to_str().ok()) {
        let Some(etag) = e.header("etag") else {
            return false;
        };
        let weak = |t: &str| t.trim().trim_start_matches("W/").to_owned();
        return inm.trim() == "*" || inm.split(',').any(|t| weak(t) == weak(etag));
    }
    if let (Some(ims), Some(lm)) = (
        req.get(header::IF_MODIFIED_SINCE)
            .and_then(|v| v.to_str().ok()),
        e.header("last-modified"),
    ) {
        let parse = |s: &str| {
            time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc2822).ok()
        };
        return match (parse(ims), parse(lm)) {
            (Some(ims), Some(lm)) => lm <= ims,
            _ => ims.trim() == lm.trim(),
        };
    }
    false
}

/// Round trips of a tag invalidation (list, delete, prune, broadcast),
/// each under the store's deadline: how many deadlines an unsafe request's
/// response waits for its invalidation at most.
const INVALIDATION_STEPS: u32 = 4;

/// The unsafe-method path: a successful response invalidates every stored
/// response of the URL's path (any query, user or variant), on every
/// instance, before it is returned (or, when the store is slow, after: the
/// invalidation runs to its end in a task of its own).
pub(crate) async fn invalidating<S, ReqBody, ResBody>(
    shared: Arc<Shared>,
    mut inner: S,
    req: Request<ReqBody>,
    url_tags: Vec<String>,
) -> Result<Response<CacheBody<ResBody>>, S::Error>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>>,
{
    let res = inner.call(req).await?;
    let (mut parts, body) = res.into_parts();
    parts.headers.remove(&shared.tag_header);
    if parts.status.is_success() || parts.status.is_redirection() {
        let all =
            futures::future::join_all(url_tags.iter().map(|t| shared.cache.invalidate_tag(t)));
        let wait = shared.lookup_timeout * INVALIDATION_STEPS;
        match tokio::time::timeout(wait, all)
            .await
            .map(|r| r.into_iter().find(Result::is_err).unwrap_or(Ok(0)))
        {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => {
                metrics::counter!("tollgate_cache_store_errors_total", "op" => "invalidate")
                    .increment(1);
                tracing::warn!(error = %e, "could not invalidate the cached responses of a modified URL");
            }
            Err(_) => {
                metrics::counter!("tollgate_cache_store_errors_total", "op" => "invalidate")
                    .increment(1);
                tracing::warn!("invalidating the cached responses of a modified URL timed out");
            }
        }
    }
    Ok(Response::from_parts(parts, CacheBody::origin(body)))
}

#[cfg(test)]
mod future_size {
    use super::*;
    use axum::body::Body;
    use axum::routing::Route;

    type Serve<F> = fn(Arc<Shared>, Route, Request<Body>, Ctx) -> F;

    fn output_size<F>(_: Serve<F>) -> usize {
        std::mem::size_of::<F>()
    }

    /// Each request that asks the store boxes this future. glibc serves
    /// allocations up to 1,032 bytes from a per-thread cache, a larger one
    /// from its shared heap (where it can consolidate its free lists), so
    /// everything past the lookup is boxed on its own: a hit carries only
    /// the request, its context and the lookup.
    #[test]
    fn a_lookup_future_fits_the_allocator_cache() {
        let size = output_size(serve::<Route, Body, Body>);
        assert!(size <= 1024, "serve: {size} bytes");
    }
}

#[cfg(test)]
mod hit_status_value {
    use super::hit_status;

    #[test]
    fn each_ttl_gets_its_own_value() {
        assert_eq!(hit_status(299), "tollgate; hit; ttl=299");
        // The same second again: this thread's value, unchanged.
        assert_eq!(hit_status(299), "tollgate; hit; ttl=299");
        assert_eq!(hit_status(298), "tollgate; hit; ttl=298");
        assert_eq!(hit_status(299), "tollgate; hit; ttl=299");
        assert_eq!(hit_status(0), "tollgate; hit; ttl=0");
    }
}

/// Says once per process, at `warn`, which screened header keeps responses
/// from being stored: behind a proxy that adds one to every request (a load
/// balancer's `X-Forwarded-Proto`), the cache would otherwise store nothing
/// without a word.
fn warn_unkeyed_once(shared: &Shared, h: &HeaderMap) {
    use std::sync::atomic::{AtomicBool, Ordering};
    static WARNED: AtomicBool = AtomicBool::new(false);
    // Read first: behind such a proxy every request gets here, and a
    // write per request would bounce the flag's cache line between cores.
    if WARNED.load(Ordering::Relaxed) || WARNED.swap(true, Ordering::Relaxed) {
        return;
    }
    let names: Vec<&str> = h
        .keys()
        .filter(|n| {
            shared
                .screened
                .get(*n)
                .is_some_and(|b| b & screen::UNKEYED != 0)
        })
        .map(http::HeaderName::as_str)
        .collect();
    tracing::warn!(
        headers = ?names,
        "response cache: a request carries a header that can change the response without being in the key, so its response is not stored; if a proxy in front sets it on every request, see ResponseCacheLayer's unkeyed_headers (logged once)"
    );
}
