//! Cache keys: method, scheme, host (allowlisted), path, normalised query,
//! the hashed user (per-user routes) and the Vary'd request headers. Nothing
//! else about the request reaches the key, and only what is in the key may
//! select a stored response.

use http::{HeaderMap, Uri};
use sha2::{Digest, Sha256};

/// Bounds and lists for building keys.
#[derive(Clone, Debug)]
pub(crate) struct KeyConfig {
    pub allowed_hosts: Vec<String>,
    pub ignored_params: Vec<String>,
    pub max_query_len: usize,
    pub max_query_params: usize,
    pub default_scheme: String,
}

/// The key of one URL (before Vary).
#[derive(Clone, Debug)]
pub(crate) struct UrlKey {
    /// The readable key material (hashed into the store key).
    pub material: String,
    /// Logical store key, `r:<sha256>`, made on first use: a hit in this
    /// thread's L1 front is found by the material and never needs it.
    key: std::sync::OnceLock<String>,
}

impl UrlKey {
    /// A key over `material`.
    pub(crate) fn new(material: String) -> Self {
        UrlKey {
            material,
            key: std::sync::OnceLock::new(),
        }
    }

    /// The logical store key: `r:` and the SHA-256 of the material.
    pub(crate) fn key(&self) -> &str {
        self.key.get_or_init(|| prefixed_hash("r:", &self.material))
    }

    /// The tag every entry of this path carries (any query, any user, any
    /// variant), for invalidation by unsafe methods. Computed only when a
    /// response is stored: the scheme, host and path are the material's
    /// second to fourth lines (none of them can hold a line break).
    pub(crate) fn url_tag(&self) -> String {
        let mut lines = self.material.split('\n').skip(1);
        let (scheme, host, path) = (
            lines.next().unwrap_or(""),
            lines.next().unwrap_or(""),
            lines.next().unwrap_or(""),
        );
        url_tag(scheme, host, path)
    }
}

/// `prefix` followed by the SHA-256 of `s` in hex.
fn prefixed_hash(prefix: &str, s: &str) -> String {
    tollgate_redis::prefixed_hex(prefix, &Sha256::digest(s.as_bytes()))
}

/// Host from the URI (HTTP/2) or the `Host` header, lowercased, when it is
/// well-formed and allowed.
pub(crate) fn host(
    cfg: &KeyConfig,
    uri: &Uri,
    headers: &HeaderMap,
) -> Result<String, &'static str> {
    checked_host(cfg, uri, headers).map(str::to_ascii_lowercase)
}

/// The bytes a host may hold: ASCII letters and digits, `-`, `.`, `_`, and
/// `:`, `[` and `]` for a port and an IPv6 literal. One table lookup per
/// byte: the host is checked on every cacheable request.
static HOST_BYTES: [bool; 256] = {
    let mut t = [false; 256];
    let mut b = 0;
    while b < 256 {
        let c = b as u8;
        t[b] = c.is_ascii_alphanumeric() || matches!(c, b'-' | b'.' | b'_' | b':' | b'[' | b']');
        b += 1;
    }
    t
};

/// [`host`] as the request spells it (not yet lowercased).
///
/// A URI authority (HTTP/2, or an absolute-form request line) is keyed
/// before the `Host` header, but applications read the header (axum's
/// `Host` extractor, `headers()["host"]`): when both are present and name
/// different hosts, the response may be built for the header's host, so
/// such a request is not cached at all (`host-mismatch`).
fn checked_host<'a>(
    cfg: &KeyConfig,
    uri: &'a Uri,
    headers: &'a HeaderMap,
) -> Result<&'a str, &'static str> {
    let header = || headers.get(http::header::HOST);
    let host = match uri.authority() {
        Some(a) => {
            let host = without_userinfo(a.as_str());
            if let Some(h) = header()
                && !h
                    .to_str()
                    .is_ok_and(|h| without_userinfo(h).eq_ignore_ascii_case(host))
            {
                return Err("host-mismatch");
            }
            host
        }
        None => without_userinfo(header().and_then(|v| v.to_str().ok()).ok_or("no-host")?),
    };
    if host.is_empty() || host.len() > 255 || !host.bytes().all(|b| HOST_BYTES[usize::from(b)]) {
        return Err("bad-host");
    }
    if !cfg.allowed_hosts.is_empty() {
        let name = strip_port(host);
        if !cfg
            .allowed_hosts
            .iter()
            .any(|a| a.eq_ignore_ascii_case(host) || a.eq_ignore_ascii_case(name))
        {
            return Err("unknown-host");
        }
    }
    Ok(host)
}

/// `host[:port]` of an authority (what follows any `user@`).
fn without_userinfo(authority: &str) -> &str {
    authority.rsplit_once('@').map_or(authority, |(_, h)| h)
}

fn strip_port(host: &str) -> &str {
    if host.starts_with('[') {
        return host
            .split_once(']')
            .map_or(host, |(h, _)| h)
            .trim_start_matches('[');
    }
    host.rsplit_once(':').map_or(host, |(h, _)| h)
}

/// Sorted query with ignored parameters removed; `Err` past the bounds.
pub(crate) fn normalise_query(cfg: &KeyConfig, q: Option<&str>) -> Result<String, &'static str> {
    let Some(q) = q.filter(|q| !q.is_empty()) else {
        return Ok(String::new());
    };
    if q.len() > cfg.max_query_len {
        return Err("query-too-long");
    }
    let mut params: Vec<&str> = q
        .split('&')
        .filter(|p| !p.is_empty())
        .filter(|p| {
            let name = p.split_once('=').map_or(*p, |(n, _)| n);
            !cfg.ignored_params
                .iter()
                .any(|i| match i.strip_suffix('*') {
                    Some(prefix) => name.starts_with(prefix),
                    None => name == i,
                })
        })
        .collect();
    if params.len() > cfg.max_query_params {
        return Err("too-many-params");
    }
    params.sort_unstable();
    Ok(params.join("&"))
}

/// The key of a GET/HEAD request's URL.
pub(crate) fn url_key(
    cfg: &KeyConfig,
    uri: &Uri,
    headers: &HeaderMap,
    user: Option<&str>,
) -> Result<UrlKey, &'static str> {
    let host = checked_host(cfg, uri, headers)?;
    let scheme = uri.scheme_str().unwrap_or(&cfg.default_scheme);
    let path = uri.path();
    let query = normalise_query(cfg, uri.query())?;
    let user = user.unwrap_or("");
    let mut material = String::with_capacity(
        10 + scheme.len() + host.len() + path.len() + query.len() + user.len(),
    );
    for part in ["GET", scheme, host, path, &query, user] {
        material.push_str(part);
        material.push('\n');
    }
    // The line break after the last part is not part of the material.
    material.pop();
    // Lowercase the host in place (ASCII: same length).
    let at = 5 + scheme.len();
    material[at..at + host.len()].make_ascii_lowercase();
    Ok(UrlKey::new(material))
}

pub(crate) fn url_tag(scheme: &str, host: &str, path: &str) -> String {
    prefixed_hash("url:", &format!("{scheme}\n{host}\n{path}"))
}

/// The URL tags of any request (for invalidation by unsafe methods): one,
/// or, when the URI authority and the `Host` header name different hosts,
/// one for each (the application may have acted on either).
pub(crate) fn request_url_tags(cfg: &KeyConfig, uri: &Uri, headers: &HeaderMap) -> Vec<String> {
    let scheme = uri.scheme_str().unwrap_or(&cfg.default_scheme);
    let tag = |host: String| url_tag(scheme, &host, uri.path());
    match host(cfg, uri, headers) {
        Ok(h) => vec![tag(h)],
        Err("host-mismatch") => [
            host(cfg, uri, &HeaderMap::new()),
            host(cfg, &Uri::default(), headers),
        ]
        .into_iter()
        .filter_map(Result::ok)
        .map(tag)
        .collect(),
        Err(_) => Vec::new(),
    }
}

/// Most Vary'd headers a stored response may have.
pub(crate) const MAX_VARY: usize = 8;
const MAX_VARY_VALUE: usize = 1024;

/// The Vary'd request header values, normalised.
pub(crate) fn vary_values(
    names: &[String],
    headers: &HeaderMap,
) -> Result<Vec<(String, Option<String>)>, &'static str> {
    let mut out = Vec::with_capacity(names.len());
    for n in names {
        let mut vals = headers.get_all(n.as_str()).iter().peekable();
        let v = if vals.peek().is_none() {
            None
        } else {
            let mut joined = String::new();
            for v in vals {
                let s = v.to_str().map_err(|_| "vary-value")?;
                for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
                    if !joined.is_empty() {
                        joined.push(',');
                    }
                    joined.push_str(part);
                }
            }
            if n == "accept-encoding" {
                joined.make_ascii_lowercase();
            }
            Some(joined)
        };
        if v.as_ref().is_some_and(|v| v.len() > MAX_VARY_VALUE) {
            return Err("vary-value-too-long");
        }
        out.push((n.clone(), v));
    }
    Ok(out)
}

/// The logical key of one variant.
pub(crate) fn variant_key(url: &UrlKey, values: &[(String, Option<String>)]) -> String {
    let mut m = url.material.clone();
    m.push_str("\nvary");
    for (n, v) in values {
        m.push('\n');
        m.push_str(n);
        match v {
            Some(v) => {
                m.push('=');
                m.push_str(v);
            }
            None => m.push('\0'),
        }
    }
    prefixed_hash("r:", &m)
}

/// The header names a `Vary` lists, lowercased and sorted; `Err` for
/// `Vary: *` or too many.
pub(crate) fn vary_names(headers: &HeaderMap) -> Result<Vec<String>, &'static str> {
    let mut names = Vec::new();
    for v in headers.get_all(http::header::VARY) {
        let s = v.to_str().map_err(|_| "vary")?;
        for n in s.split(',').map(str::trim).filter(|n| !n.is_empty()) {
            if n == "*" {
                return Err("vary-star");
            }
            let n = n.to_ascii_lowercase();
            if http::HeaderName::try_from(n.as_str()).is_err() {
                return Err("vary");
            }
            if !names.contains(&n) {
                names.push(n);
            }
        }
    }
    if names.len() > MAX_VARY {
        return Err("vary-too-many");
    }
    names.sort();
    Ok(names)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> KeyConfig {
        KeyConfig {
            allowed_hosts: vec!["example.com".into()],
            ignored_params: vec!["utm_*".into(), "fbclid".into()],
            max_query_len: 64,
            max_query_params: 4,
            default_scheme: "http".into(),
        }
    }

    fn h(host: &str) -> HeaderMap {
        let mut m = HeaderMap::new();
        m.insert("host", host.parse().unwrap());
        m
    }

    #[test]
    fn queries_are_normalised_and_bounded() {
        let c = cfg();
        assert_eq!(
            normalise_query(&c, Some("b=2&a=1&utm_source=x&fbclid=y")).unwrap(),
            "a=1&b=2"
        );
        assert_eq!(normalise_query(&c, None).unwrap(), "");
        assert!(normalise_query(&c, Some(&"a".repeat(65))).is_err());
        assert!(normalise_query(&c, Some("a&b&c&d&e")).is_err());
        let a = url_key(&c, &"/p?b=2&a=1".parse().unwrap(), &h("example.com"), None).unwrap();
        let b = url_key(
            &c,
            &"/p?a=1&b=2&utm_x=1".parse().unwrap(),
            &h("EXAMPLE.com"),
            None,
        )
        .unwrap();
        assert_eq!(a.key(), b.key());
    }

    #[test]
    fn hosts_are_allowlisted_and_keyed() {
        let c = cfg();
        let uri: Uri = "/p".parse().unwrap();
        assert_eq!(
            url_key(&c, &uri, &h("evil.com"), None).unwrap_err(),
            "unknown-host"
        );
        assert!(url_key(&c, &uri, &h("example.com:8080"), None).is_ok());
        let mut open = cfg();
        open.allowed_hosts.clear();
        let a = url_key(&open, &uri, &h("a.com"), None).unwrap();
        let b = url_key(&open, &uri, &h("b.com"), None).unwrap();
        assert_ne!(a.key(), b.key());
        assert_ne!(a.url_tag(), b.url_tag());
        assert!(url_key(&open, &uri, &h("a.com\"x"), None).is_err());
        let u = url_key(&open, &uri, &h("a.com"), Some("u1")).unwrap();
        assert_ne!(u.key(), a.key());
        assert_eq!(u.url_tag(), a.url_tag(), "one URL tag for every user");
        // The tag a stored entry carries is the one an unsafe method on the
        // same URL invalidates, whatever the query.
        let q: Uri = "/p?b=2&a=1".parse().unwrap();
        let with_query = url_key(&open, &q, &h("a.com"), None).unwrap();
        assert_eq!(
            vec![with_query.url_tag()],
            request_url_tags(&open, &uri, &h("a.com"))
        );
    }

    #[test]
    fn an_authority_and_a_host_header_must_agree() {
        let c = cfg();
        let abs: Uri = "http://example.com/p".parse().unwrap();
        let mut open = cfg();
        open.allowed_hosts.clear();
        assert_eq!(
            url_key(&open, &abs, &h("evil.example"), None).unwrap_err(),
            "host-mismatch"
        );
        assert_eq!(
            url_key(&c, &abs, &h("example.com:80"), None).unwrap_err(),
            "host-mismatch"
        );
        let same = url_key(&c, &abs, &h("EXAMPLE.com"), None).unwrap();
        let plain = url_key(&c, &"/p".parse().unwrap(), &h("example.com"), None).unwrap();
        assert_eq!(same.key(), plain.key());
        // No Host header (HTTP/2): the authority alone.
        assert!(url_key(&c, &abs, &HeaderMap::new(), None).is_ok());
        // Userinfo is not part of the host on either side.
        let with_user: Uri = "http://u@example.com/p".parse().unwrap();
        assert!(url_key(&c, &with_user, &h("example.com"), None).is_ok());
        // An unsafe method on a mismatched request invalidates both hosts'
        // responses (only allowed hosts have any).
        let tags = request_url_tags(&open, &abs, &h("evil.example"));
        assert_eq!(tags.len(), 2);
        assert_eq!(tags[0], plain.url_tag());
        assert_eq!(request_url_tags(&c, &abs, &h("evil.example")).len(), 1);
    }

    #[test]
    fn hosts_hold_only_host_bytes() {
        let mut open = cfg();
        open.allowed_hosts.clear();
        let uri: Uri = "/p".parse().unwrap();
        for good in [
            "a.com",
            "A-b_c.example.com:8080",
            "127.0.0.1:3000",
            "[::1]:8080",
            "[2001:db8::1]",
            "user@a.com",
        ] {
            assert!(url_key(&open, &uri, &h(good), None).is_ok(), "{good}");
        }
        for bad in [
            "a.com/x", "a .com", "a.com%2f", "a.com\"x", "a.com;x", "a,b", "a.com?", "a.com#", "",
        ] {
            assert_eq!(
                url_key(&open, &uri, &h(bad), None).unwrap_err(),
                "bad-host",
                "{bad:?}"
            );
        }
        // Every byte outside the set, alone in a host, is refused.
        for b in 0x21u8..0x7f {
            if b.is_ascii_alphanumeric() || b"-._:[]@".contains(&b) {
                continue;
            }
            let host = format!("a{}b.com", char::from(b));
            assert_eq!(
                url_key(&open, &uri, &h(&host), None).unwrap_err(),
                "bad-host",
                "{host:?}"
            );
        }
        assert!(url_key(&open, &uri, &h(&"a".repeat(256)), None).is_err());
    }

    #[test]
    fn vary() {
        let mut res = HeaderMap::new();
        res.append("vary", "Accept-Encoding, accept-language".parse().unwrap());
        assert_eq!(
            vary_names(&res).unwrap(),
            ["accept-encoding", "accept-language"]
        );
        res.append("vary", "*".parse().unwrap());
        assert!(vary_names(&res).is_err());
        let mut req = HeaderMap::new();
        req.insert("accept-encoding", "GZIP,  br".parse().unwrap());
        let v = vary_values(&["accept-encoding".into()], &req).unwrap();
        assert_eq!(
            v,
            [("accept-encoding".to_owned(), Some("gzip,br".to_owned()))]
        );
    }
}
