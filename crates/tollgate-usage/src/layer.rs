use std::sync::Arc;

use http::StatusCode;
use http::request::Parts;

use crate::plan::Plans;
use crate::tracker::UsageTracker;

type TenantFn = dyn Fn(&Parts) -> Option<String> + Send + Sync;
type TenantRefFn = dyn for<'a> Fn(&'a Parts) -> Option<&'a str> + Send + Sync;
type PlanFn = dyn Fn(&str, &Parts) -> Option<String> + Send + Sync;

/// Where the tenant of a request comes from.
#[derive(Clone)]
pub struct TenantSource {
    kind: SourceKind,
}

#[derive(Clone)]
enum SourceKind {
    /// A header's value, borrowed from the request (no allocation); `None`
    /// for a name that is not a valid header name (matches nothing).
    Header(Option<http::HeaderName>),
    /// A function of the request head.
    Fn(Arc<TenantFn>),
    /// A function of the request head that borrows the tenant from it.
    FnRef(Arc<TenantRefFn>),
    /// The rate limiter's key extractor.
    #[cfg(feature = "ratelimit")]
    Key(Arc<dyn tollgate_ratelimit::KeyExtractor>),
}

impl std::fmt::Debug for TenantSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.kind {
            SourceKind::Header(h) => f.debug_tuple("TenantSource::Header").field(h).finish(),
            SourceKind::Fn(_) | SourceKind::FnRef(_) => f.write_str("TenantSource::Fn"),
            #[cfg(feature = "ratelimit")]
            SourceKind::Key(_) => f.write_str("TenantSource::Key"),
        }
    }
}

/// Longest tenant id taken from a header; a longer value counts as absent.
const MAX_HEADER_TENANT: usize = 256;

impl TenantSource {
    /// The value of a header (an API key, say), as it is. Empty, overlong
    /// (> 256 bytes) or non-UTF-8 values count as absent. The value becomes
    /// part of Redis key names and reports: for secrets, prefer
    /// [`key`](Self::key) with the rate limiter's hashing
    /// `HeaderKey`. The name is case-insensitive; one that is not a valid
    /// header name matches nothing.
    ///
    /// The value is whatever the client sent: every made-up key becomes a
    /// tenant, with a hash in Redis for the period and its retention (the
    /// process's buffer stays bounded by
    /// [`max_buffered`](crate::UsageConfig::max_buffered)). Where keys are
    /// not checked before this layer, take the tenant from what the auth
    /// layer verified ([`extension`](Self::extension)), or check the key in
    /// [`from_fn`](Self::from_fn).
    pub fn header(name: &str) -> Self {
        TenantSource {
            kind: SourceKind::Header(http::HeaderName::from_bytes(name.as_bytes()).ok()),
        }
    }

    /// A request extension set by an auth layer, turned into the tenant id.
    pub fn extension<T, F>(f: F) -> Self
    where
        T: Send + Sync + 'static,
        F: Fn(&T) -> String + Send + Sync + 'static,
    {
        Self::from_fn(move |p| p.extensions.get::<T>().map(&f))
    }

    /// A request extension set by an auth layer, whose tenant id is
    /// borrowed from it: no allocation per request (unlike
    /// [`extension`](Self::extension)).
    ///
    /// ```
    /// use tollgate_usage::TenantSource;
    ///
    /// struct Org { id: String }
    /// let source = TenantSource::extension_ref(|o: &Org| o.id.as_str());
    /// # let _ = source;
    /// ```
    pub fn extension_ref<T, F>(f: F) -> Self
    where
        T: Send + Sync + 'static,
        F: for<'a> Fn(&'a T) -> &'a str + Send + Sync + 'static,
    {
        Self::from_fn_ref(move |p| p.extensions.get::<T>().map(&f))
    }

    /// Any function of the request head that borrows the tenant from it
    /// (a header, an extension) or returns a `&'static str`: no
    /// allocation per request (unlike [`from_fn`](Self::from_fn)).
    pub fn from_fn_ref<F>(f: F) -> Self
    where
        F: for<'a> Fn(&'a Parts) -> Option<&'a str> + Send + Sync + 'static,
    {
        TenantSource {
            kind: SourceKind::FnRef(Arc::new(f)),
        }
    }

    /// Any function of the request head.
    pub fn from_fn<F>(f: F) -> Self
    where
        F: Fn(&Parts) -> Option<String> + Send + Sync + 'static,
    {
        TenantSource {
            kind: SourceKind::Fn(Arc::new(f)),
        }
    }

    /// The same key extractors as rate limiting (`PeerIp`, `HeaderKey`,
    /// `ExtensionKey`, `key_fn`): the tenant is the extracted key.
    ///
    /// ```
    /// use tollgate_ratelimit::ExtensionKey;
    /// use tollgate_usage::TenantSource;
    ///
    /// struct Org(String);
    /// let source = TenantSource::key(ExtensionKey::new(|o: &Org| o.0.clone()));
    /// # let _ = source;
    /// ```
    #[cfg(feature = "ratelimit")]
    pub fn key(extractor: impl tollgate_ratelimit::KeyExtractor) -> Self {
        TenantSource {
            kind: SourceKind::Key(Arc::new(extractor)),
        }
    }

    pub(crate) fn tenant<'a>(&self, parts: &'a Parts) -> Option<std::borrow::Cow<'a, str>> {
        use std::borrow::Cow;
        match &self.kind {
            SourceKind::Header(name) => parts
                .headers
                .get(name.as_ref()?)
                .and_then(|v| v.to_str().ok())
                .map(str::trim)
                .filter(|v| !v.is_empty() && v.len() <= MAX_HEADER_TENANT)
                .map(Cow::Borrowed),
            SourceKind::Fn(f) => f(parts).map(Cow::Owned),
            SourceKind::FnRef(f) => f(parts).map(Cow::Borrowed),
            #[cfg(feature = "ratelimit")]
            SourceKind::Key(ex) => ex
                .key(&tollgate_ratelimit::RequestView {
                    method: &parts.method,
                    uri: &parts.uri,
                    headers: &parts.headers,
                    extensions: &parts.extensions,
                })
                .map(Cow::Owned),
        }
    }
}

/// Tower layer counting every request per tenant (denials and cache hits
/// included, so it belongs outermost), exposing a [`Usage`](crate::Usage)
/// handle to handlers, and enforcing plan quotas.
///
/// ```
/// use tollgate_usage::{Plans, TenantSource, UsageConfig, UsageLayer, UsageTracker};
/// # #[tokio::main(flavor = "current_thread")] async fn main() {
/// let tracker = UsageTracker::in_memory(UsageConfig::new());
/// let layer = UsageLayer::new(tracker.clone(), TenantSource::header("x-api-key"))
///     .plans(Plans::example(), |key, _| Some(if key.starts_with("free_") { "free" } else { "starter" }.into()));
/// # let _ = layer;
/// tracker.record("acme", "email_sent", 2);
/// tracker.flush().await.unwrap();
/// assert_eq!(tracker.usage("acme", None).await.unwrap()["email_sent"], 2);
/// # }
/// ```
#[derive(Clone)]
pub struct UsageLayer {
    pub(crate) cfg: Arc<LayerConfig>,
}

pub(crate) struct LayerConfig {
    pub(crate) tracker: UsageTracker,
    pub(crate) tenant: TenantSource,
    pub(crate) anonymous: Option<String>,
    pub(crate) plans: Option<(Plans, Arc<PlanFn>)>,
    pub(crate) per_route: bool,
    pub(crate) per_status_class: bool,
    pub(crate) quota_status: StatusCode,
    pub(crate) fail_closed: bool,
}

impl std::fmt::Debug for UsageLayer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UsageLayer")
            .field("anonymous", &self.cfg.anonymous)
            .field("per_route", &self.cfg.per_route)
            .field("per_status_class", &self.cfg.per_status_class)
            .finish()
    }
}

impl UsageLayer {
    /// Counts requests on `tracker`, per tenant from `tenant`. Requests
    /// without a tenant are not counted unless
    /// [`anonymous`](Self::anonymous) names a bucket.
    pub fn new(tracker: UsageTracker, tenant: TenantSource) -> Self {
        UsageLayer {
            cfg: Arc::new(LayerConfig {
                tracker,
                tenant,
                anonymous: None,
                plans: None,
                per_route: false,
                per_status_class: false,
                quota_status: StatusCode::TOO_MANY_REQUESTS,
                fail_closed: false,
            }),
        }
    }

    fn edit(mut self, f: impl FnOnce(&mut LayerConfig)) -> Self {
        if let Some(cfg) = Arc::get_mut(&mut self.cfg) {
            f(cfg);
        } else {
            let old = &*self.cfg;
            let mut cfg = LayerConfig {
                tracker: old.tracker.clone(),
                tenant: old.tenant.clone(),
                anonymous: old.anonymous.clone(),
                plans: old.plans.clone(),
                per_route: old.per_route,
                per_status_class: old.per_status_class,
                quota_status: old.quota_status,
                fail_closed: old.fail_closed,
            };
            f(&mut cfg);
            self.cfg = Arc::new(cfg);
        }
        self
    }

    /// Counts requests without a tenant under this bucket.
    #[must_use]
    pub fn anonymous(self, bucket: impl Into<String>) -> Self {
        let b = bucket.into();
        self.edit(|c| c.anonymous = Some(b))
    }

    /// Plans and how to find a tenant's plan (`None`: no plan, no limits).
    /// The plan's `api_request` limit is announced in `X-Quota-*` headers
    /// and, for hard plans, enforced.
    #[must_use]
    pub fn plans<F>(self, plans: Plans, plan_of: F) -> Self
    where
        F: Fn(&str, &Parts) -> Option<String> + Send + Sync + 'static,
    {
        self.edit(|c| c.plans = Some((plans, Arc::new(plan_of))))
    }

    /// Also counts `api_request:route:{template}` per route template
    /// (axum's `MatchedPath`; never the raw path).
    #[must_use]
    pub fn per_route(self, on: bool) -> Self {
        self.edit(|c| c.per_route = on)
    }

    /// Also counts `api_request:status:{1xx..5xx}`.
    #[must_use]
    pub fn per_status_class(self, on: bool) -> Self {
        self.edit(|c| c.per_status_class = on)
    }

    /// Status of a request refused by a hard quota: 429 (default) or 402.
    #[must_use]
    pub fn quota_status(self, status: StatusCode) -> Self {
        self.edit(|c| c.quota_status = status)
    }

    /// When a hard quota cannot be checked (Redis unavailable): refuse with
    /// 503, not counted, instead of letting the request through (default:
    /// through, and counted). See
    /// [`UsageTracker::try_consume_or_refuse`](crate::UsageTracker::try_consume_or_refuse)
    /// for a check whose answer was lost.
    #[must_use]
    pub fn fail_closed(self, on: bool) -> Self {
        self.edit(|c| c.fail_closed = on)
    }
}

impl<S> tower::Layer<S> for UsageLayer {
    type Service = crate::service::UsageTracking<S>;

    fn layer(&self, inner: S) -> Self::Service {
        crate::service::UsageTracking {
            inner,
            cfg: self.cfg.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::borrow::Cow;

    use super::*;

    #[derive(Clone)]
    struct Org {
        id: String,
    }

    fn parts(org: Option<&str>, key: Option<&str>) -> Parts {
        let mut req = http::Request::builder();
        if let Some(k) = key {
            req = req.header("x-api-key", k);
        }
        let (mut parts, ()) = req.body(()).expect("request").into_parts();
        if let Some(o) = org {
            parts.extensions.insert(Org { id: o.to_owned() });
        }
        parts
    }

    #[test]
    fn borrowing_sources_lend_the_tenant() {
        let p = parts(Some("acme"), Some("key_1"));
        let by_ext = TenantSource::extension_ref(|o: &Org| o.id.as_str());
        assert!(matches!(by_ext.tenant(&p), Some(Cow::Borrowed("acme"))));
        let by_fn =
            TenantSource::from_fn_ref(|p| p.headers.get("x-api-key").and_then(|v| v.to_str().ok()));
        assert!(matches!(by_fn.tenant(&p), Some(Cow::Borrowed("key_1"))));
        let constant = TenantSource::from_fn_ref(|_| Some("everyone"));
        assert!(matches!(
            constant.tenant(&p),
            Some(Cow::Borrowed("everyone"))
        ));
        // The owning forms give the same tenants.
        let owned = TenantSource::extension(|o: &Org| o.id.clone());
        assert_eq!(owned.tenant(&p).as_deref(), Some("acme"));
        let header = TenantSource::header("x-api-key");
        assert_eq!(header.tenant(&p).as_deref(), Some("key_1"));
    }

    #[test]
    fn a_missing_extension_is_no_tenant() {
        let p = parts(None, None);
        assert_eq!(
            TenantSource::extension_ref(|o: &Org| o.id.as_str()).tenant(&p),
            None
        );
        assert_eq!(TenantSource::from_fn_ref(|_| None).tenant(&p), None);
    }
}
