//! How the session id travels: a cookie (default) or a header.

use std::time::Duration;

use cookie::Cookie;
use http::{HeaderMap, HeaderName, HeaderValue, header};

use crate::error::Error;
use crate::id::{KeyRing, SessionId, Verified, decode_value, encode_value};

/// The cookie's `SameSite` attribute.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum SameSite {
    /// Sent only on same-site requests.
    Strict,
    /// Sent on same-site requests and top-level cross-site navigations
    /// (the default).
    #[default]
    Lax,
    /// Sent on every request; requires `Secure`.
    None,
}

/// The session cookie's attributes. Defaults: name `id`, `HttpOnly`,
/// `Secure`, `SameSite=Lax`, `Path=/`, no `Domain`, no `Max-Age` (a
/// browser-session cookie; the server-side timeouts decide expiry).
///
/// A name starting with `__Host-` (see [`host_prefixed`](Self::host_prefixed))
/// is checked when the layer is built: it needs `Secure`, `Path=/` and no
/// `Domain`.
#[derive(Clone, Debug, PartialEq, Eq)]
#[must_use]
pub struct CookieConfig {
    pub(crate) name: String,
    pub(crate) domain: Option<String>,
    pub(crate) path: String,
    pub(crate) same_site: SameSite,
    pub(crate) secure: bool,
    pub(crate) http_only: bool,
    pub(crate) max_age: Option<Duration>,
}

impl Default for CookieConfig {
    fn default() -> Self {
        CookieConfig {
            name: "id".into(),
            domain: None,
            path: "/".into(),
            same_site: SameSite::Lax,
            secure: true,
            http_only: true,
            max_age: None,
        }
    }
}

impl CookieConfig {
    /// The defaults.
    pub fn new() -> Self {
        Self::default()
    }

    /// The cookie's name.
    pub fn name(mut self, name: impl Into<String>) -> Self {
        self.name = name.into();
        self
    }

    /// Names the cookie `__Host-{name}`: browsers then only accept it
    /// from a secure origin, for this host only, on path `/`.
    pub fn host_prefixed(mut self, name: &str) -> Self {
        self.name = format!("__Host-{name}");
        self
    }

    /// The `Domain` attribute (none by default: this host only).
    pub fn domain(mut self, domain: impl Into<String>) -> Self {
        self.domain = Some(domain.into());
        self
    }

    /// The `Path` attribute (`/` by default).
    pub fn path(mut self, path: impl Into<String>) -> Self {
        self.path = path.into();
        self
    }

    /// The `SameSite` attribute (`Lax` by default).
    pub fn same_site(mut self, same_site: SameSite) -> Self {
        self.same_site = same_site;
        self
    }

    /// The `Secure` attribute (on by default; turn off only for plain-HTTP
    /// development).
    pub fn secure(mut self, secure: bool) -> Self {
        self.secure = secure;
        self
    }

    /// The `HttpOnly` attribute (on by default).
    pub fn http_only(mut self, http_only: bool) -> Self {
        self.http_only = http_only;
        self
    }

    /// A `Max-Age`, making the cookie outlive the browser session. The
    /// server-side timeouts still decide when the session ends. At least
    /// one second (the attribute counts whole seconds, and `Max-Age=0`
    /// deletes the cookie); checked by
    /// [`SessionsBuilder::build`](crate::SessionsBuilder::build).
    pub fn max_age(mut self, max_age: Duration) -> Self {
        self.max_age = Some(max_age);
        self
    }

    pub(crate) fn validate(&self) -> Result<(), Error> {
        let token = |c: char| c.is_ascii_graphic() && !"()<>@,;:\\\"/[]?={}".contains(c);
        if self.name.is_empty() || !self.name.chars().all(token) {
            return Err(Error::Config {
                field: "cookie.name",
                reason: "must be a non-empty HTTP token",
            });
        }
        let attr = |c: char| !c.is_ascii_control() && c != ';';
        if !self.path.starts_with('/') || !self.path.chars().all(attr) {
            return Err(Error::Config {
                field: "cookie.path",
                reason: "must start with `/` and contain no `;` or control characters",
            });
        }
        if let Some(d) = &self.domain
            && (d.is_empty() || !d.chars().all(attr))
        {
            return Err(Error::Config {
                field: "cookie.domain",
                reason: "must be non-empty and contain no `;` or control characters",
            });
        }
        if self.max_age.is_some_and(|age| age < Duration::from_secs(1)) {
            return Err(Error::Config {
                field: "cookie.max_age",
                reason: "must be at least one second: Max-Age counts whole seconds, and 0 deletes the cookie",
            });
        }
        if self.name.starts_with("__Host-") {
            if self.domain.is_some() {
                return Err(Error::Config {
                    field: "cookie.domain",
                    reason: "a `__Host-` cookie must not set a Domain",
                });
            }
            if self.path != "/" {
                return Err(Error::Config {
                    field: "cookie.path",
                    reason: "a `__Host-` cookie must have Path=/",
                });
            }
        }
        if !self.secure {
            if self.name.starts_with("__Host-") || self.name.starts_with("__Secure-") {
                return Err(Error::Config {
                    field: "cookie.secure",
                    reason: "a `__Host-` or `__Secure-` cookie must be Secure",
                });
            }
            if self.same_site == SameSite::None {
                return Err(Error::Config {
                    field: "cookie.secure",
                    reason: "SameSite=None requires Secure",
                });
            }
        }
        Ok(())
    }

    fn build(&self, value: String) -> Cookie<'static> {
        let mut c = Cookie::build((self.name.clone(), value))
            .path(self.path.clone())
            .http_only(self.http_only)
            .secure(self.secure)
            .same_site(match self.same_site {
                SameSite::Strict => cookie::SameSite::Strict,
                SameSite::Lax => cookie::SameSite::Lax,
                SameSite::None => cookie::SameSite::None,
            });
        if let Some(d) = &self.domain {
            c = c.domain(d.clone());
        }
        c.build()
    }

    /// The `Set-Cookie` value carrying `value`.
    pub(crate) fn set_cookie(&self, value: String) -> String {
        let mut c = self.build(value);
        if let Some(age) = self.max_age {
            c.set_max_age(cookie::time::Duration::seconds(
                i64::try_from(age.as_secs()).unwrap_or(i64::MAX),
            ));
        }
        c.to_string()
    }

    /// The `Set-Cookie` value removing the cookie: the same attributes
    /// (browsers match on name, domain and path), an empty value, `Max-Age=0`.
    pub(crate) fn removal(&self) -> String {
        let mut c = self.build(String::new());
        c.set_max_age(cookie::time::Duration::ZERO);
        c.set_expires(cookie::time::OffsetDateTime::UNIX_EPOCH);
        c.to_string()
    }
}

/// Where the session id travels.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Transport {
    /// In a cookie (the default).
    Cookie(CookieConfig),
    /// In a request/response header (e.g. `x-session-id`, usable as gRPC
    /// metadata). The response carries the header when the id is issued or
    /// changes, and an empty value when the handler destroys the session
    /// (either way with `Cache-Control: no-store`).
    Header(HeaderName),
}

impl Default for Transport {
    fn default() -> Self {
        Transport::Cookie(CookieConfig::default())
    }
}

/// The id a request carried.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Incoming {
    /// None at all.
    Absent,
    /// Something malformed, unsigned, or tampered with.
    Invalid,
    /// A well-formed id; `resign` when signed with a previous key.
    Valid { id: SessionId, resign: bool },
}

impl Incoming {
    fn of(v: Verified) -> Self {
        match v {
            Verified::Current(id) => Incoming::Valid { id, resign: false },
            Verified::Previous(id) => Incoming::Valid { id, resign: true },
            Verified::Invalid => Incoming::Invalid,
        }
    }
}

/// What the response must say about the id.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Outgoing {
    Set(SessionId),
    Remove,
}

impl Transport {
    /// Reads the id from a request: the first valid value wins, so a
    /// garbage duplicate cannot shadow a good cookie.
    pub(crate) fn read(&self, headers: &HeaderMap, ring: Option<&KeyRing>) -> Incoming {
        let mut seen = false;
        match self {
            Transport::Cookie(cfg) => {
                for h in headers.get_all(header::COOKIE) {
                    let Ok(h) = h.to_str() else {
                        continue;
                    };
                    for c in Cookie::split_parse(h).flatten() {
                        if c.name() != cfg.name {
                            continue;
                        }
                        seen = true;
                        if let v @ Incoming::Valid { .. } =
                            Incoming::of(decode_value(c.value(), ring))
                        {
                            return v;
                        }
                    }
                }
            }
            Transport::Header(name) => {
                for h in headers.get_all(name) {
                    seen = true;
                    let Ok(h) = h.to_str() else {
                        continue;
                    };
                    if let v @ Incoming::Valid { .. } = Incoming::of(decode_value(h.trim(), ring)) {
                        return v;
                    }
                }
            }
        }
        if seen {
            Incoming::Invalid
        } else {
            Incoming::Absent
        }
    }

    /// Writes `out` into response headers, with `Cache-Control: no-store`
    /// in place of whatever the handler set.
    pub(crate) fn write(&self, out: &Outgoing, headers: &mut HeaderMap, ring: Option<&KeyRing>) {
        let (name, value) = match (self, out) {
            (Transport::Cookie(cfg), Outgoing::Set(id)) => {
                (header::SET_COOKIE, cfg.set_cookie(encode_value(id, ring)))
            }
            (Transport::Cookie(cfg), Outgoing::Remove) => (header::SET_COOKIE, cfg.removal()),
            (Transport::Header(name), Outgoing::Set(id)) => (name.clone(), encode_value(id, ring)),
            (Transport::Header(name), Outgoing::Remove) => (name.clone(), String::new()),
        };
        match HeaderValue::try_from(value) {
            Ok(v) => {
                headers.append(name, v);
            }
            Err(_) => tracing::error!("session cookie is not a valid header value"),
        }
        // A response that sets (or removes) the session id must never be
        // stored by a shared cache, which would hand it to other visitors:
        // the handler's caching policy (say `public, max-age=600`) gives way.
        headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    }
}
