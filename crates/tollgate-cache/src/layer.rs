use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http::HeaderName;
use tower::Layer;

use crate::cache::Cache;
use crate::entry::Entry;
use crate::error::Error;
use crate::flight::Flights;
use crate::key::KeyConfig;
use crate::route::{RouteRule, RouteTable};
use crate::service::ResponseCache;

/// What to do with a request's own `Cache-Control: no-cache` /
/// `max-age=0` / `Pragma: no-cache` and `no-store`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum RequestDirectives {
    /// Ignore them (the default): a client cannot make the cache forward
    /// every request to the origin. Reverse proxies commonly do this.
    #[default]
    Ignore,
    /// Honour them: `no-cache`/`max-age=0` go to the origin (the fresh
    /// response refreshes the entry), `no-store` is not stored.
    Honour,
}

/// Applies [`ResponseCache`] to a service. Cheap to clone: every clone
/// (axum clones per route) shares one configuration and one [`Cache`].
#[derive(Clone, Debug)]
pub struct ResponseCacheLayer {
    pub(crate) shared: Arc<Shared>,
}

pub(crate) struct Shared {
    pub cache: Cache,
    pub routes: RouteTable,
    pub keys: KeyConfig,
    pub max_body: usize,
    pub tag_header: HeaderName,
    pub directives: RequestDirectives,
    pub default_ttl: Duration,
    pub swr: Duration,
    pub sie: Duration,
    pub show_key: bool,
    /// The request headers a request is screened for, each with what it
    /// means ([`screen`] bits): one lookup per header the request carries
    /// instead of one per configured name.
    pub screened: tollgate_redis::local::RequestMap<HeaderName, u8>,
    pub coalesce_timeout: Duration,
    /// Keys whose last response could not be stored: requests for them go
    /// straight to the origin for a while instead of queueing.
    pub uncacheable: moka::sync::Cache<String, ()>,
    /// Keys with a stale-while-revalidate refresh in flight.
    pub refreshing: Mutex<HashSet<String>>,
    pub flights: Flights<Arc<Entry>>,
    pub lookup_timeout: Duration,
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ResponseCacheConfig")
            .field("cache", &self.cache)
            .field("routes", &self.routes)
            .field("max_body", &self.max_body)
            .field("default_ttl", &self.default_ttl)
            .finish_non_exhaustive()
    }
}

/// Builds a [`ResponseCacheLayer`].
#[derive(Debug)]
#[must_use]
pub struct ResponseCacheLayerBuilder {
    cache: Cache,
    rules: Vec<RouteRule>,
    default_rule: RouteRule,
    keys: KeyConfig,
    max_body: usize,
    tag_header: String,
    directives: RequestDirectives,
    default_ttl: Duration,
    swr: Duration,
    sie: Duration,
    show_key: bool,
    credentials: Vec<String>,
    unkeyed: Vec<String>,
    uncacheable_ttl: Duration,
}

impl ResponseCacheLayer {
    /// A builder storing in `cache` ([`Cache::redis`] or [`Cache::memory`]).
    pub fn builder(cache: Cache) -> ResponseCacheLayerBuilder {
        ResponseCacheLayerBuilder {
            cache,
            rules: Vec::new(),
            default_rule: RouteRule::new("/*"),
            keys: KeyConfig {
                allowed_hosts: Vec::new(),
                ignored_params: vec![
                    "utm_*".into(),
                    "fbclid".into(),
                    "gclid".into(),
                    "mc_cid".into(),
                    "mc_eid".into(),
                ],
                max_query_len: 1024,
                max_query_params: 32,
                default_scheme: "http".into(),
            },
            max_body: 1 << 20,
            tag_header: "x-cache-tags".into(),
            directives: RequestDirectives::Ignore,
            default_ttl: Duration::from_secs(300),
            swr: Duration::ZERO,
            sie: Duration::ZERO,
            show_key: false,
            credentials: vec!["authorization".into(), "cookie".into()],
            unkeyed: [
                // RFC 7239: `host=` and `proto=` (axum's `Host` extractor
                // reads it before `Host`).
                "forwarded",
                "x-forwarded-host",
                // Scheme and port: applications build links and
                // https redirects from them; the key's scheme is the URI's.
                "x-forwarded-proto",
                "x-forwarded-scheme",
                "x-forwarded-port",
                "x-forwarded-server",
                "x-host",
                "x-original-url",
                "x-rewrite-url",
                "x-http-method-override",
                "x-http-method",
                "x-method-override",
            ]
            .map(String::from)
            .to_vec(),
            uncacheable_ttl: Duration::from_secs(10),
        }
    }

    /// The cache (for [`Cache::invalidate_tag`]).
    pub fn cache(&self) -> &Cache {
        &self.shared.cache
    }
}

impl ResponseCacheLayerBuilder {
    /// Adds a route rule.
    pub fn route(mut self, rule: RouteRule) -> Self {
        self.rules.push(rule);
        self
    }

    /// The rule for requests no route matches (default: cache by HTTP
    /// semantics with the default TTL). Use [`RouteRule::bypass`] to cache
    /// only the listed routes.
    pub fn default_rule(mut self, rule: RouteRule) -> Self {
        self.default_rule = rule;
        self
    }

    /// Freshness lifetime when neither the origin nor the route gives one
    /// (default 5 minutes).
    pub fn default_ttl(mut self, ttl: Duration) -> Self {
        self.default_ttl = ttl;
        self
    }

    /// Only these hosts (with or without port) are cached; other hosts pass
    /// through. Empty (the default) caches every well-formed host, each
    /// under its own keys.
    pub fn allowed_hosts<I, S>(mut self, hosts: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.keys.allowed_hosts = hosts.into_iter().map(Into::into).collect();
        self
    }

    /// Query parameters left out of the key (`name` or `prefix*`; default:
    /// `utm_*`, `fbclid`, `gclid`, `mc_cid`, `mc_eid`). An application that
    /// echoes one of them into its pages must keep it in the key (leave it
    /// off this list): otherwise one request's value is stored and served
    /// to everyone.
    pub fn ignored_query_params<I, S>(mut self, params: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.keys.ignored_params = params.into_iter().map(Into::into).collect();
        self
    }

    /// Requests whose query is longer (bytes, default 1024) or has more
    /// parameters (default 32) pass through uncached.
    pub fn query_bounds(mut self, max_len: usize, max_params: usize) -> Self {
        self.keys.max_query_len = max_len;
        self.keys.max_query_params = max_params;
        self
    }

    /// The scheme keyed when the request URI has none (default `http`).
    pub fn scheme(mut self, scheme: impl Into<String>) -> Self {
        self.keys.default_scheme = scheme.into();
        self
    }

    /// Largest body stored (default 1 MiB); larger responses stream through
    /// untouched.
    pub fn max_body_size(mut self, bytes: usize) -> Self {
        self.max_body = bytes;
        self
    }

    /// The response header listing tags (comma or space separated; default
    /// `x-cache-tags`). It is removed before the response leaves.
    pub fn tag_header(mut self, name: impl Into<String>) -> Self {
        self.tag_header = name.into();
        self
    }

    /// How a request's own cache directives are treated.
    pub fn request_directives(mut self, d: RequestDirectives) -> Self {
        self.directives = d;
        self
    }

    /// Default stale-while-revalidate window (default 0; routes and the
    /// response's `stale-while-revalidate` override it).
    pub fn stale_while_revalidate(mut self, d: Duration) -> Self {
        self.swr = d;
        self
    }

    /// Default stale-if-error window (default 0; routes and the response's
    /// `stale-if-error` override it).
    pub fn stale_if_error(mut self, d: Duration) -> Self {
        self.sie = d;
        self
    }

    /// Show the (hashed) key in `Cache-Status` (default off).
    pub fn show_key(mut self, on: bool) -> Self {
        self.show_key = on;
        self
    }

    /// Request headers that carry credentials (default `authorization`,
    /// `cookie`): such a request is only served responses marked `public`,
    /// unless its route caches [per user](RouteRule::per_user).
    pub fn credential_headers<I, S>(mut self, names: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.credentials = names.into_iter().map(Into::into).collect();
        self
    }

    /// Request headers that can change a response without being in the key
    /// (default: `forwarded`, `x-forwarded-host`, `x-forwarded-proto`,
    /// `x-forwarded-scheme`, `x-forwarded-port`, `x-forwarded-server`,
    /// `x-host`, `x-original-url`, `x-rewrite-url`, method overrides). A
    /// request carrying one may be served from the cache but its response
    /// is never stored, so it cannot poison an entry.
    ///
    /// Behind a proxy that adds one of them to every request (a load
    /// balancer's `X-Forwarded-Proto`), nothing would be stored: leave it
    /// out of this list only if the proxy always overwrites the client's
    /// value and the value is the same for every request of a key (the
    /// proxy only forwards https, say).
    pub fn unkeyed_headers<I, S>(mut self, names: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.unkeyed = names.into_iter().map(Into::into).collect();
        self
    }

    /// How long a key whose response could not be stored skips coalescing
    /// (default 10 s).
    pub fn uncacheable_ttl(mut self, d: Duration) -> Self {
        self.uncacheable_ttl = d;
        self
    }

    /// Checks the configuration.
    pub fn build(self) -> Result<ResponseCacheLayer, Error> {
        let header = |field: &str, n: &str| {
            HeaderName::try_from(n.to_ascii_lowercase())
                .map_err(|_| Error::config(field, format!("`{n}` is not a header name")))
        };
        let tag_header = header("tag_header", &self.tag_header)?;
        let mut screened = tollgate_redis::local::RequestMap::default();
        for (name, bit) in [
            (http::header::RANGE, screen::RANGE),
            (http::header::IF_NONE_MATCH, screen::CONDITIONAL),
            (http::header::IF_MODIFIED_SINCE, screen::CONDITIONAL),
        ] {
            *screened.entry(name).or_insert(0) |= bit;
        }
        for n in &self.credentials {
            *screened
                .entry(header("credential_headers", n)?)
                .or_insert(0) |= screen::CREDENTIALS;
        }
        for n in &self.unkeyed {
            *screened.entry(header("unkeyed_headers", n)?).or_insert(0) |= screen::UNKEYED;
        }
        if self.keys.default_scheme != "http" && self.keys.default_scheme != "https" {
            return Err(Error::config("scheme", "must be `http` or `https`"));
        }
        let routes = RouteTable::new(self.rules, self.default_rule)?;
        let lookup_timeout = self.cache.lookup_timeout();
        let coalesce_timeout = self.cache.coalesce_timeout();
        Ok(ResponseCacheLayer {
            shared: Arc::new(Shared {
                cache: self.cache,
                routes,
                keys: self.keys,
                max_body: self.max_body,
                tag_header,
                directives: self.directives,
                default_ttl: self.default_ttl,
                swr: self.swr,
                sie: self.sie,
                show_key: self.show_key,
                screened,
                coalesce_timeout,
                uncacheable: moka::sync::Cache::builder()
                    .max_capacity(100_000)
                    .time_to_live(self.uncacheable_ttl.max(Duration::from_millis(1)))
                    .build(),
                refreshing: Mutex::new(HashSet::new()),
                flights: Flights::default(),
                lookup_timeout,
            }),
        })
    }
}

impl<S> Layer<S> for ResponseCacheLayer {
    type Service = ResponseCache<S>;

    fn layer(&self, inner: S) -> ResponseCache<S> {
        ResponseCache::new(inner, self.shared.clone())
    }
}

/// What a screened request header means (bits of `Shared::screened`).
pub(crate) mod screen {
    /// It carries credentials (`Authorization`, `Cookie`, configurable).
    pub(crate) const CREDENTIALS: u8 = 1;
    /// It could change the response without being part of the key.
    pub(crate) const UNKEYED: u8 = 2;
    /// `Range`.
    pub(crate) const RANGE: u8 = 4;
    /// `If-None-Match` or `If-Modified-Since`.
    pub(crate) const CONDITIONAL: u8 = 8;
}
