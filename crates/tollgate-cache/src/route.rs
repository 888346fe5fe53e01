//! Per-route cache rules, in the route-table style of the rate limiter:
//! a pattern and an optional method map to a TTL, tags and opt-ins.

use std::sync::Arc;
use std::time::Duration;

use http::{Extensions, HeaderMap, Method};
use sha2::{Digest, Sha256};

use crate::error::Error;

pub use tollgate_redis::RoutePattern;

type UserFn = dyn Fn(&HeaderMap, &Extensions) -> Option<String> + Send + Sync;

/// Who the request is, for routes that cache per user. The identity is
/// hashed (SHA-256) before it enters a key, so credentials never reach
/// Redis.
#[derive(Clone)]
pub struct UserKey(Arc<UserFn>);

impl std::fmt::Debug for UserKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("UserKey")
    }
}

impl UserKey {
    /// The value of a request header (e.g. `authorization`, or a header an
    /// auth layer set).
    pub fn header(name: &'static str) -> Self {
        UserKey(Arc::new(move |h, _| {
            h.get(name)
                .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
        }))
    }

    /// A closure over the request headers and extensions (e.g. a user id an
    /// auth layer inserted). `None` means "unknown user": the request
    /// bypasses the cache.
    pub fn from_fn<F>(f: F) -> Self
    where
        F: Fn(&HeaderMap, &Extensions) -> Option<String> + Send + Sync + 'static,
    {
        UserKey(Arc::new(f))
    }

    pub(crate) fn identity(&self, h: &HeaderMap, e: &Extensions) -> Option<String> {
        let raw = (self.0)(h, e)?;
        Some(tollgate_redis::hex_lower(&Sha256::digest(raw.as_bytes())))
    }
}

/// What the cache does on one route.
///
/// ```
/// use std::time::Duration;
/// use tollgate_cache::RouteRule;
///
/// let r = RouteRule::new("/campaigns/{id}")
///     .ttl(Duration::from_secs(300))
///     .tags(["campaigns"]);
/// assert_eq!(r.pattern(), "/campaigns/{id}");
/// ```
#[derive(Clone, Debug)]
#[must_use]
pub struct RouteRule {
    pub(crate) pattern: String,
    pub(crate) method: Option<Method>,
    pub(crate) enabled: bool,
    pub(crate) ttl: Option<Duration>,
    pub(crate) tags: Vec<String>,
    pub(crate) per_user: Option<UserKey>,
    pub(crate) swr: Option<Duration>,
    pub(crate) sie: Option<Duration>,
}

impl RouteRule {
    /// Caching on for `pattern`, with the layer's defaults.
    pub fn new(pattern: impl Into<String>) -> Self {
        RouteRule {
            pattern: pattern.into(),
            method: None,
            enabled: true,
            ttl: None,
            tags: Vec::new(),
            per_user: None,
            swr: None,
            sie: None,
        }
    }

    /// Never cache `pattern` (requests pass through, `X-Cache: BYPASS`).
    pub fn bypass(pattern: impl Into<String>) -> Self {
        let mut r = Self::new(pattern);
        r.enabled = false;
        r
    }

    /// Only for this method (GET rules also serve HEAD).
    pub fn method(mut self, m: Method) -> Self {
        self.method = Some(m);
        self
    }

    /// Freshness lifetime when the origin gives none (no `max-age`,
    /// `s-maxage` or `Expires`).
    pub fn ttl(mut self, ttl: Duration) -> Self {
        self.ttl = Some(ttl);
        self
    }

    /// Tags every response of this route is stored under.
    pub fn tags<I, S>(mut self, tags: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.tags.extend(tags.into_iter().map(Into::into));
        self
    }

    /// Caches responses to requests carrying `Authorization` or `Cookie`
    /// per user: the key includes the hashed identity, so one user's
    /// response is never served to another.
    pub fn per_user(mut self, key: UserKey) -> Self {
        self.per_user = Some(key);
        self
    }

    /// Serve a stale response for this long past its freshness while one
    /// background request refreshes it (unless the response says
    /// otherwise).
    pub fn stale_while_revalidate(mut self, d: Duration) -> Self {
        self.swr = Some(d);
        self
    }

    /// Serve a stale response for this long past its freshness when the
    /// origin fails (5xx or an error).
    pub fn stale_if_error(mut self, d: Duration) -> Self {
        self.sie = Some(d);
        self
    }

    /// The pattern.
    pub fn pattern(&self) -> &str {
        &self.pattern
    }
}

/// The compiled table.
#[derive(Debug)]
pub(crate) struct RouteTable {
    /// Each rule with its pattern and the label it reports under.
    rules: Vec<(RoutePattern, Arc<RouteRule>, Arc<str>)>,
    default: Arc<RouteRule>,
}

/// The label of requests no rule matched and no template names.
static OTHER: std::sync::LazyLock<Arc<str>> = std::sync::LazyLock::new(|| Arc::from("other"));

impl RouteTable {
    pub(crate) fn new(rules: Vec<RouteRule>, default: RouteRule) -> Result<Self, Error> {
        let mut compiled = Vec::with_capacity(rules.len());
        for r in rules {
            let p = RoutePattern::parse(&r.pattern)?;
            if compiled
                .iter()
                .any(|(q, o): &(RoutePattern, Arc<RouteRule>)| q == &p && o.method == r.method)
            {
                return Err(Error::config(
                    format!("route `{}`", r.pattern),
                    "duplicate route",
                ));
            }
            compiled.push((p, Arc::new(r)));
        }
        // Most specific first; a method-specific rule before a general one.
        compiled.sort_by(|(a, ra), (b, rb)| {
            b.specificity()
                .cmp(&a.specificity())
                .then(rb.method.is_some().cmp(&ra.method.is_some()))
        });
        Ok(RouteTable {
            rules: compiled
                .into_iter()
                .map(|(p, r)| {
                    let label = Arc::from(p.as_str());
                    (p, r, label)
                })
                .collect(),
            default: Arc::new(default),
        })
    }

    /// The rule for a request, and the label to report it under.
    pub(crate) fn lookup(
        &self,
        method: &Method,
        path: &str,
        template: Option<&str>,
    ) -> (Arc<RouteRule>, Arc<str>) {
        let method = if method == Method::HEAD {
            &Method::GET
        } else {
            method
        };
        let probe = template.unwrap_or(path);
        // A template's label is this thread's own copy
        // ([`tollgate_redis::local`]): no allocation, no lock, no count
        // shared with other threads. Templates are the application's routes,
        // never raw paths, so the set stays small.
        let label = |fallback: &Arc<str>| match template {
            Some(t) => tollgate_redis::local::local_str(t),
            None => fallback.clone(),
        };
        for (p, r, l) in &self.rules {
            if r.method.as_ref().is_none_or(|m| m == method) && p.matches(probe) {
                return (r.clone(), label(l));
            }
        }
        (self.default.clone(), label(&OTHER))
    }
}

/// The route template axum put in the request's extensions, if any.
#[cfg(feature = "axum")]
pub(crate) fn matched_path(ext: &Extensions) -> Option<&str> {
    ext.get::<axum::extract::MatchedPath>().map(|m| m.as_str())
}

/// Without the `axum` feature only the path is matched.
#[cfg(not(feature = "axum"))]
pub(crate) fn matched_path(_ext: &Extensions) -> Option<&str> {
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_prefers_specific_and_method_rules() {
        let t = RouteTable::new(
            vec![
                RouteRule::new("/api/*").ttl(Duration::from_secs(1)),
                RouteRule::new("/api/users/{id}").ttl(Duration::from_secs(2)),
                RouteRule::bypass("/api/users/{id}").method(Method::GET),
            ],
            RouteRule::new("/"),
        )
        .unwrap();
        let (r, label) = t.lookup(&Method::GET, "/api/users/7", None);
        assert!(!r.enabled);
        assert_eq!(&*label, "/api/users/{id}");
        let (r, _) = t.lookup(&Method::POST, "/api/users/7", None);
        assert_eq!(r.ttl, Some(Duration::from_secs(2)));
        let (r, label) = t.lookup(&Method::GET, "/api/x", None);
        assert_eq!(r.ttl, Some(Duration::from_secs(1)));
        assert_eq!(&*label, "/api/*");
        let (_, label) = t.lookup(&Method::GET, "/elsewhere", None);
        assert_eq!(&*label, "other", "raw paths never become labels");
        assert!(RouteTable::new(vec![RouteRule::new("x")], RouteRule::new("/")).is_err());
    }
}
