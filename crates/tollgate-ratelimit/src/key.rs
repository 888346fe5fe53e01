//! Who a request is: key extractors.

use std::fmt;
use std::marker::PhantomData;
use std::net::{IpAddr, SocketAddr};

use http::{Extensions, HeaderMap, HeaderName, Method, Uri};
use ipnet::{IpNet, Ipv6Net};
use sha2::{Digest, Sha256};

/// The parts of a request a key extractor may look at.
#[derive(Clone, Copy, Debug)]
pub struct RequestView<'a> {
    /// The method.
    pub method: &'a Method,
    /// The URI.
    pub uri: &'a Uri,
    /// The headers.
    pub headers: &'a HeaderMap,
    /// The extensions (peer address, authenticated user, plan, ...).
    pub extensions: &'a Extensions,
}

impl<'a> RequestView<'a> {
    /// A view of `req`.
    pub fn of<B>(req: &'a http::Request<B>) -> Self {
        RequestView {
            method: req.method(),
            uri: req.uri(),
            headers: req.headers(),
            extensions: req.extensions(),
        }
    }
}

/// Finds the identity a request is limited under. `None` when the request
/// carries none (see [`MissingKey`](crate::MissingKey)).
///
/// Keys end up in Redis key names (inside a hash tag): keep them short and
/// never put secrets in them as they are (hash them, as
/// [`HeaderKey`] does).
pub trait KeyExtractor: Send + Sync + 'static {
    /// The identity of `req`, or `None`.
    fn key(&self, req: &RequestView<'_>) -> Option<String>;
}

/// Any closure is an extractor when wrapped by [`key_fn`].
#[derive(Clone)]
pub struct FnKey<F>(F);

impl<F> fmt::Debug for FnKey<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("FnKey")
    }
}

/// An extractor from a closure.
///
/// ```
/// use tollgate_ratelimit::{KeyExtractor, RequestView, key_fn};
///
/// let by_tenant = key_fn(|r: &RequestView<'_>| {
///     r.headers.get("x-tenant")?.to_str().ok().map(|t| format!("tenant:{t}"))
/// });
/// let req = http::Request::builder().header("x-tenant", "42").body(()).unwrap();
/// assert_eq!(by_tenant.key(&RequestView::of(&req)).as_deref(), Some("tenant:42"));
/// ```
pub fn key_fn<F>(f: F) -> FnKey<F>
where
    F: Fn(&RequestView<'_>) -> Option<String> + Send + Sync + 'static,
{
    FnKey(f)
}

impl<F> KeyExtractor for FnKey<F>
where
    F: Fn(&RequestView<'_>) -> Option<String> + Send + Sync + 'static,
{
    fn key(&self, req: &RequestView<'_>) -> Option<String> {
        (self.0)(req)
    }
}

/// The client's IP address: the peer address (axum's
/// `ConnectInfo<SocketAddr>`, tonic's `TcpConnectInfo` with the `tonic`
/// feature, or a plain `SocketAddr` extension), or — when
/// the peer is a trusted proxy — the first untrusted address found walking
/// the proxies' forwarding header from right to left: `X-Forwarded-For` by
/// default, `Forwarded` when [`proxy_header`](PeerIp::proxy_header) says
/// so. Only that one header is read: most proxies append to one and pass
/// the other through from the client unchanged, so reading both would let
/// a client choose its own address.
///
/// IPv4-mapped IPv6 addresses are unwrapped; IPv6 addresses are grouped by
/// prefix (/56 by default: one customer's allocation), IPv4 by /32.
///
/// ```
/// use std::net::SocketAddr;
/// use tollgate_ratelimit::{KeyExtractor, PeerIp, RequestView};
///
/// let ex = PeerIp::new().trust_proxies(["10.0.0.0/8".parse().unwrap()]);
/// let mut req = http::Request::builder()
///     .header("x-forwarded-for", "6.6.6.6, 203.0.113.9, 10.0.0.2")
///     .body(())
///     .unwrap();
/// req.extensions_mut().insert("10.0.0.1:1234".parse::<SocketAddr>().unwrap());
/// // The spoofable leftmost value is not believed.
/// assert_eq!(ex.key(&RequestView::of(&req)).as_deref(), Some("ip:203.0.113.9"));
/// ```
#[derive(Clone, Debug)]
#[must_use]
pub struct PeerIp {
    trusted: Vec<IpNet>,
    header: ProxyHeader,
    v6_prefix: u8,
    v4_prefix: u8,
}

impl Default for PeerIp {
    fn default() -> Self {
        PeerIp {
            trusted: Vec::new(),
            header: ProxyHeader::default(),
            v6_prefix: 56,
            v4_prefix: 32,
        }
    }
}

/// The forwarding header the trusted proxies write, the one [`PeerIp`]
/// walks.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ProxyHeader {
    /// `X-Forwarded-For` (nginx, HAProxy, cloud load balancers, most
    /// CDNs). The default.
    #[default]
    XForwardedFor,
    /// `Forwarded` (RFC 7239): the `for=` parameter of each element. An
    /// element without one is an unreadable hop.
    Forwarded,
}

impl PeerIp {
    /// The peer address, no proxy trusted, IPv6 by /56.
    pub fn new() -> Self {
        Self::default()
    }

    /// Proxies (CIDRs) whose forwarding headers are believed.
    pub fn trust_proxies(mut self, nets: impl IntoIterator<Item = IpNet>) -> Self {
        self.trusted.extend(nets);
        self
    }

    /// Which forwarding header the trusted proxies write (default
    /// `X-Forwarded-For`); the other is ignored.
    pub fn proxy_header(mut self, header: ProxyHeader) -> Self {
        self.header = header;
        self
    }

    /// Groups IPv6 addresses by this prefix length (default 56; at most 128).
    pub fn ipv6_prefix(mut self, len: u8) -> Self {
        self.v6_prefix = len.min(128);
        self
    }

    /// Groups IPv4 addresses by this prefix length (default 32).
    pub fn ipv4_prefix(mut self, len: u8) -> Self {
        self.v4_prefix = len.min(32);
        self
    }

    fn trusted(&self, ip: IpAddr) -> bool {
        self.trusted.iter().any(|n| n.contains(&ip))
    }

    /// The client address (before grouping).
    pub fn client_ip(&self, req: &RequestView<'_>) -> Option<IpAddr> {
        let peer = unmap(peer_addr(req.extensions)?.ip());
        if !self.trusted(peer) {
            return Some(peer);
        }
        let hops = forwarded_for(req.headers, self.header);
        let mut client = peer;
        for hop in hops.iter().rev() {
            match hop {
                Some(ip) => {
                    client = unmap(*ip);
                    if !self.trusted(client) {
                        return Some(client);
                    }
                }
                // An unreadable hop: the last trusted proxy is as far as
                // the chain can be believed.
                None => return Some(client),
            }
        }
        Some(client)
    }

    /// The key of an address: `ip:1.2.3.4` or `ip:2001:db8:1200::/56`.
    pub fn key_of(&self, ip: IpAddr) -> String {
        match unmap(ip) {
            IpAddr::V4(v4) if self.v4_prefix >= 32 => {
                // The common case, without the formatting machinery.
                let mut k = String::with_capacity(18);
                k.push_str("ip:");
                for (i, o) in v4.octets().iter().enumerate() {
                    if i > 0 {
                        k.push('.');
                    }
                    push_u8(&mut k, *o);
                }
                k
            }
            IpAddr::V4(v4) => match ipnet::Ipv4Net::new(v4, self.v4_prefix) {
                Ok(n) => format!("ip:{}", n.trunc()),
                Err(_) => format!("ip:{v4}"),
            },
            IpAddr::V6(v6) if self.v6_prefix >= 128 => format!("ip:{v6}"),
            IpAddr::V6(v6) => match Ipv6Net::new(v6, self.v6_prefix) {
                Ok(n) => format!("ip:{}", n.trunc()),
                Err(_) => format!("ip:{v6}"),
            },
        }
    }
}

impl KeyExtractor for PeerIp {
    fn key(&self, req: &RequestView<'_>) -> Option<String> {
        self.client_ip(req).map(|ip| self.key_of(ip))
    }
}

fn push_u8(s: &mut String, n: u8) {
    if n >= 100 {
        s.push(char::from(b'0' + n / 100));
    }
    if n >= 10 {
        s.push(char::from(b'0' + n / 10 % 10));
    }
    s.push(char::from(b'0' + n % 10));
}

/// IPv4-mapped IPv6 (`::ffff:1.2.3.4`) is the IPv4 address.
fn unmap(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

fn peer_addr(ext: &Extensions) -> Option<SocketAddr> {
    #[cfg(feature = "axum")]
    if let Some(ci) = ext.get::<axum::extract::ConnectInfo<SocketAddr>>() {
        return Some(ci.0);
    }
    #[cfg(feature = "tonic")]
    if let Some(addr) = ext
        .get::<tonic::transport::server::TcpConnectInfo>()
        .and_then(|ci| ci.remote_addr())
    {
        return Some(addr);
    }
    ext.get::<SocketAddr>().copied()
}

/// The addresses of `header` (all lines, left to right). `None` marks an
/// unreadable hop. Each comma-separated element is read on its own, so a
/// byte a client put in its own element cannot hide the hops a proxy
/// appended after it.
fn forwarded_for(headers: &HeaderMap, header: ProxyHeader) -> Vec<Option<IpAddr>> {
    let name = match header {
        ProxyHeader::XForwardedFor => X_FORWARDED_FOR,
        ProxyHeader::Forwarded => http::header::FORWARDED,
    };
    let mut hops = Vec::new();
    for line in headers.get_all(name) {
        for elem in line.as_bytes().split(|&b| b == b',') {
            let Ok(elem) = std::str::from_utf8(elem) else {
                hops.push(None);
                continue;
            };
            hops.push(match header {
                ProxyHeader::XForwardedFor => parse_hop(elem),
                ProxyHeader::Forwarded => elem
                    .split(';')
                    .find_map(|pair| {
                        let (k, v) = pair.trim().split_once('=')?;
                        k.trim().eq_ignore_ascii_case("for").then(|| parse_hop(v))
                    })
                    .flatten(),
            });
        }
    }
    hops
}

const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");

/// `1.2.3.4`, `1.2.3.4:80`, `"[2001:db8::1]:4711"`, `2001:db8::1`.
fn parse_hop(v: &str) -> Option<IpAddr> {
    let v = v.trim().trim_matches('"');
    if let Ok(ip) = v.parse::<IpAddr>() {
        return Some(ip);
    }
    if let Ok(sa) = v.parse::<SocketAddr>() {
        return Some(sa.ip());
    }
    let inner = v.strip_prefix('[')?.split(']').next()?;
    inner.parse().ok()
}

/// A header's value (an API key), hashed: `hdr:<name>:<sha256 prefix>`, so
/// secrets never reach Redis key names.
#[derive(Clone, Debug)]
pub struct HeaderKey {
    name: HeaderName,
}

impl HeaderKey {
    /// Keys requests by the value of `name`.
    pub fn new(name: HeaderName) -> Self {
        HeaderKey { name }
    }
}

impl KeyExtractor for HeaderKey {
    fn key(&self, req: &RequestView<'_>) -> Option<String> {
        let v = req.headers.get(&self.name)?.as_bytes();
        if v.is_empty() {
            return None;
        }
        let digest = Sha256::digest(v);
        Some(format!(
            "hdr:{}:{}",
            self.name,
            tollgate_redis::hex_lower(&digest[..16])
        ))
    }
}

/// A request extension set by an earlier layer (the authenticated user,
/// the tenant), turned into a key by a function.
///
/// ```
/// use tollgate_ratelimit::{ExtensionKey, KeyExtractor, RequestView};
///
/// #[derive(Clone)]
/// struct Tenant(u64);
/// let ex = ExtensionKey::new(|t: &Tenant| format!("tenant:{}", t.0));
/// let mut req = http::Request::new(());
/// req.extensions_mut().insert(Tenant(7));
/// assert_eq!(ex.key(&RequestView::of(&req)).as_deref(), Some("tenant:7"));
/// ```
pub struct ExtensionKey<T, F> {
    f: F,
    _t: PhantomData<fn(&T)>,
}

impl<T, F: Clone> Clone for ExtensionKey<T, F> {
    fn clone(&self) -> Self {
        ExtensionKey {
            f: self.f.clone(),
            _t: PhantomData,
        }
    }
}

impl<T, F> fmt::Debug for ExtensionKey<T, F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ExtensionKey")
            .field("type", &std::any::type_name::<T>())
            .finish()
    }
}

impl<T, F> ExtensionKey<T, F>
where
    T: Send + Sync + 'static,
    F: Fn(&T) -> String + Send + Sync + 'static,
{
    /// Keys requests by the `T` extension, rendered by `f`.
    pub fn new(f: F) -> Self {
        ExtensionKey { f, _t: PhantomData }
    }
}

impl<T, F> KeyExtractor for ExtensionKey<T, F>
where
    T: Send + Sync + 'static,
    F: Fn(&T) -> String + Send + Sync + 'static,
{
    fn key(&self, req: &RequestView<'_>) -> Option<String> {
        req.extensions.get::<T>().map(&self.f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(peer: &str, headers: &[(&str, &str)]) -> http::Request<()> {
        let mut b = http::Request::builder();
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        let mut r = b.body(()).unwrap();
        r.extensions_mut()
            .insert(peer.parse::<SocketAddr>().unwrap());
        r
    }

    fn key(ex: &PeerIp, r: &http::Request<()>) -> Option<String> {
        ex.key(&RequestView::of(r))
    }

    #[test]
    fn untrusted_peer_headers_are_ignored() {
        let ex = PeerIp::new();
        let r = req("1.2.3.4:5", &[("x-forwarded-for", "9.9.9.9")]);
        assert_eq!(key(&ex, &r).as_deref(), Some("ip:1.2.3.4"));
    }

    #[test]
    fn trusted_chain_walked_right_to_left() {
        let ex = PeerIp::new().trust_proxies([
            "10.0.0.0/8".parse().unwrap(),
            "192.168.0.0/16".parse().unwrap(),
        ]);
        let r = req(
            "10.0.0.1:5",
            &[
                ("x-forwarded-for", "6.6.6.6, 7.7.7.7"),
                ("x-forwarded-for", "192.168.1.1"),
            ],
        );
        assert_eq!(key(&ex, &r).as_deref(), Some("ip:7.7.7.7"));
        let fwd = ex.clone().proxy_header(ProxyHeader::Forwarded);
        let r = req(
            "10.0.0.1:5",
            &[
                (
                    "forwarded",
                    "for=6.6.6.6, for=\"[2001:db8:cafe::17]:4711\";proto=https",
                ),
                ("x-forwarded-for", "5.5.5.5"),
            ],
        );
        assert_eq!(key(&fwd, &r).as_deref(), Some("ip:2001:db8:cafe::/56"));
        // An element without `for=`: as far as the chain can be believed.
        let r = req("10.0.0.1:5", &[("forwarded", "for=6.6.6.6, proto=https")]);
        assert_eq!(key(&fwd, &r).as_deref(), Some("ip:10.0.0.1"));
        // Unreadable hop: stop at the last trusted proxy.
        let r = req(
            "10.0.0.1:5",
            &[("x-forwarded-for", "6.6.6.6, garbage, 10.0.0.9")],
        );
        assert_eq!(key(&ex, &r).as_deref(), Some("ip:10.0.0.9"));
        // No header: the proxy itself.
        let r = req("10.0.0.1:5", &[]);
        assert_eq!(key(&ex, &r).as_deref(), Some("ip:10.0.0.1"));
    }

    /// Proxies append to `X-Forwarded-For` and pass a client's own
    /// `Forwarded` through: reading it too would let the client pick its
    /// key (and the other way round when `Forwarded` is the proxies').
    #[test]
    fn only_the_proxies_header_is_read() {
        let trusted = || PeerIp::new().trust_proxies(["10.0.0.0/8".parse().unwrap()]);
        let spoofed = req(
            "10.0.0.1:5",
            &[("forwarded", "for=1.1.1.1"), ("x-forwarded-for", "6.6.6.6")],
        );
        assert_eq!(key(&trusted(), &spoofed).as_deref(), Some("ip:6.6.6.6"));
        let only_forwarded = req("10.0.0.1:5", &[("forwarded", "for=1.1.1.1")]);
        assert_eq!(
            key(&trusted(), &only_forwarded).as_deref(),
            Some("ip:10.0.0.1")
        );
        let fwd = trusted().proxy_header(ProxyHeader::Forwarded);
        let spoofed = req(
            "10.0.0.1:5",
            &[("x-forwarded-for", "1.1.1.1"), ("forwarded", "for=6.6.6.6")],
        );
        assert_eq!(key(&fwd, &spoofed).as_deref(), Some("ip:6.6.6.6"));
    }

    /// A byte that is not text, in the client's own element, makes only
    /// that element unreadable: the address the proxy appended after it on
    /// the same line still keys the request.
    #[test]
    fn a_bad_byte_spoils_only_its_own_hop() {
        let ex = PeerIp::new().trust_proxies(["10.0.0.0/8".parse().unwrap()]);
        let mut r = req("10.0.0.1:5", &[]);
        r.headers_mut().insert(
            "x-forwarded-for",
            http::HeaderValue::from_bytes(b"\x80, 6.6.6.6").unwrap(),
        );
        assert_eq!(key(&ex, &r).as_deref(), Some("ip:6.6.6.6"));
        // Behind a second trusted proxy, the unreadable hop stops the walk.
        r.headers_mut().insert(
            "x-forwarded-for",
            http::HeaderValue::from_bytes(b"6.6.6.6, \x80, 10.0.0.9").unwrap(),
        );
        assert_eq!(key(&ex, &r).as_deref(), Some("ip:10.0.0.9"));
    }

    #[test]
    fn mapped_and_grouped() {
        let ex = PeerIp::new();
        let a = req("[::ffff:1.2.3.4]:80", &[]);
        let b = req("1.2.3.4:81", &[]);
        assert_eq!(key(&ex, &a), key(&ex, &b));
        let c = req("[2001:db8:0:12ff:1::1]:80", &[]);
        let d = req("[2001:db8:0:1200:ffff::2]:80", &[]);
        assert_eq!(key(&ex, &c), key(&ex, &d));
        assert_eq!(key(&ex, &c).as_deref(), Some("ip:2001:db8:0:1200::/56"));
        let e = req("[2001:db8:0:1300::1]:80", &[]);
        assert_ne!(key(&ex, &c), key(&ex, &e));
        let ex64 = PeerIp::new().ipv6_prefix(64);
        assert_ne!(key(&ex64, &c), key(&ex64, &d));
        // No peer at all: no key.
        assert_eq!(ex.key(&RequestView::of(&http::Request::new(()))), None);
    }

    #[test]
    fn header_key_is_hashed() {
        let ex = HeaderKey::new(HeaderName::from_static("x-api-key"));
        let r = http::Request::builder()
            .header("x-api-key", "sk_live_secret")
            .body(())
            .unwrap();
        let k = ex.key(&RequestView::of(&r)).unwrap();
        assert!(
            k.starts_with("hdr:x-api-key:") && !k.contains("secret"),
            "{k}"
        );
        let r = http::Request::new(());
        assert_eq!(ex.key(&RequestView::of(&r)), None);
    }
}
