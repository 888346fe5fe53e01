//! [`Sessions`]: the shared state behind every [`SessionLayer`](crate::SessionLayer)
//! clone, and its builder.

use std::sync::Arc;
use std::time::Duration;

use http::HeaderName;
use rand::RngCore as _;
use tollgate_redis::RedisHandle;

use crate::error::Error;
use crate::id::{IdHasher, KeyRing};
use crate::store::{MemoryStore, RedisStore, SessionInfo, SessionStore, Timeouts};
use crate::transport::{CookieConfig, Transport};

/// What the layer does while Redis is unreachable.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FailureMode {
    /// Serve from the bounded in-memory store (default). Only sessions
    /// created during the outage are served from it: a session that lives
    /// in Redis is never authenticated by the fallback, so one revoked in
    /// Redis cannot come back. Those users get a fresh session until Redis
    /// answers again; their cookie is not removed, so their Redis session
    /// is theirs again once it does (unless the fresh session is written
    /// to, which gives it a cookie of its own). Sessions created in the
    /// fallback end when Redis answers again. Logging out a Redis session
    /// while the breaker is open fails with [`Error::Unavailable`]
    /// (see [`Session::destroy`](crate::Session::destroy)).
    #[default]
    Fallback,
    /// Answer 503 (`application/problem+json`) to every request while the
    /// breaker is open, and when a save fails.
    FailClosed,
}

/// Default bound of a session's data, in bytes (see
/// [`SessionsBuilder::max_data_bytes`]).
pub const DEFAULT_MAX_DATA_BYTES: usize = 128 * 1024;

/// Smallest accepted secret (hashing and signing keys), in bytes.
pub const MIN_SECRET_LEN: usize = 32;

/// The sessions of a service: stores, timeouts, cookie and keys. Cheap to
/// clone (an `Arc`). Build one with [`Sessions::builder`], wrap services
/// with [`SessionLayer::new`](crate::SessionLayer::new), and use it
/// directly for administration (list or revoke a user's sessions).
#[derive(Clone, Debug)]
pub struct Sessions {
    pub(crate) shared: Arc<Shared>,
}

#[derive(Debug)]
pub(crate) struct Shared {
    pub(crate) redis: Option<RedisStore>,
    pub(crate) memory: MemoryStore,
    pub(crate) hasher: IdHasher,
    pub(crate) ring: Option<KeyRing>,
    pub(crate) transport: Transport,
    pub(crate) timeouts: Timeouts,
    pub(crate) failure: FailureMode,
    pub(crate) record_client: bool,
    /// Most bytes of data (keys and JSON values) a session may hold.
    pub(crate) max_data_bytes: usize,
}

/// Which store serves a session.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Backend {
    /// Redis when configured, else the memory store.
    Primary,
    /// The memory store while Redis is unreachable.
    Fallback,
}

/// Runs `$body` with `$s` bound to the store serving `$backend`.
macro_rules! on_store {
    ($shared:expr, $backend:expr, |$s:ident| $body:expr) => {
        match ($backend, &$shared.redis) {
            ($crate::config::Backend::Primary, Some($s)) => $body,
            _ => {
                let $s = &$shared.memory;
                $body
            }
        }
    };
}
pub(crate) use on_store;

impl Shared {
    /// Whether every response carrying a live session re-sends its cookie
    /// (a cookie with Max-Age, whose expiry slides).
    pub(crate) fn refreshes_cookie(&self) -> bool {
        matches!(&self.transport, Transport::Cookie(c) if c.max_age.is_some())
    }

    /// The store for a new operation, or `Unavailable` when failing closed.
    pub(crate) fn backend(&self) -> Result<Backend, Error> {
        match &self.redis {
            Some(r) if !r.handle().is_available() => match self.failure {
                FailureMode::Fallback => Ok(Backend::Fallback),
                FailureMode::FailClosed => Err(Error::Unavailable),
            },
            _ => Ok(Backend::Primary),
        }
    }

    /// The metrics label of a backend.
    pub(crate) fn label(&self, b: Backend) -> &'static str {
        match (b, &self.redis) {
            (Backend::Primary, Some(_)) => "redis",
            (Backend::Primary, None) => "memory",
            (Backend::Fallback, _) => "fallback",
        }
    }

    /// Whether every request must be refused now (fail closed, Redis down).
    pub(crate) fn refuses(&self) -> bool {
        self.failure == FailureMode::FailClosed
            && self
                .redis
                .as_ref()
                .is_some_and(|r| !r.handle().is_available())
    }
}

impl Sessions {
    /// Starts a configuration.
    pub fn builder() -> SessionsBuilder {
        SessionsBuilder::default()
    }

    /// Sessions kept in process only (no Redis), with a random secret and
    /// the defaults: for tests, examples and single-instance services.
    pub fn in_memory() -> Self {
        // The defaults are valid by construction.
        match Self::builder().build() {
            Ok(s) => s,
            Err(e) => unreachable!("default session configuration is invalid: {e}"),
        }
    }

    /// The timeouts in force.
    pub fn timeouts(&self) -> Timeouts {
        self.shared.timeouts
    }

    /// The Redis store, when configured.
    pub fn redis_store(&self) -> Option<&RedisStore> {
        self.shared.redis.as_ref()
    }

    /// The in-memory store (the primary store without Redis, the fallback
    /// with it).
    pub fn memory_store(&self) -> &MemoryStore {
        &self.shared.memory
    }

    /// The keyed hash under which the store keeps the session whose id is
    /// carried by `value` (a cookie or header value), if it is well formed
    /// and correctly signed. For tools and tests; the raw id is never
    /// stored.
    pub fn id_hash_of(&self, value: &str) -> Option<String> {
        match crate::id::decode_value(value, self.shared.ring.as_ref()) {
            crate::id::Verified::Current(id) | crate::id::Verified::Previous(id) => {
                Some(self.shared.hasher.session(&id))
            }
            crate::id::Verified::Invalid => None,
        }
    }

    /// The live sessions of `user_id`, oldest first.
    pub async fn list(&self, user_id: &str) -> Result<Vec<SessionInfo>, Error> {
        let s = &self.shared;
        let user_hash = s.hasher.user(user_id);
        let backend = s.backend()?;
        on_store!(s, backend, |st| st.list_user(&user_hash, user_id).await)
    }

    /// Revokes one of `user_id`'s sessions by its id hash (as listed by
    /// [`list`](Self::list)). Returns whether it existed and belonged to the
    /// user.
    pub async fn revoke(&self, user_id: &str, id_hash: &str) -> Result<bool, Error> {
        let s = &self.shared;
        let listed = self.list(user_id).await?;
        if !listed.iter().any(|i| i.id_hash == id_hash) {
            return Ok(false);
        }
        let backend = s.backend()?;
        let gone = on_store!(s, backend, |st| st.delete(id_hash).await)?;
        if gone {
            metrics::counter!("tollgate_session_revocations_total", "store" => s.label(backend))
                .increment(1);
        }
        Ok(gone)
    }

    /// Revokes every session of `user_id`, except the one whose id hash is
    /// `except` (the caller's own, for "log out everywhere else"). Their
    /// next request gets a fresh, anonymous session. Returns how many were
    /// revoked.
    pub async fn revoke_all(&self, user_id: &str, except: Option<&str>) -> Result<usize, Error> {
        let s = &self.shared;
        let user_hash = s.hasher.user(user_id);
        // The in-process store may hold sessions created during an outage.
        let mut n = s.memory.revoke_user(&user_hash, user_id, except).await?;
        if let Some(r) = &s.redis {
            n += r.revoke_user(&user_hash, user_id, except).await?;
        }
        metrics::counter!("tollgate_session_revocations_total", "store" => "all")
            .increment(n as u64);
        Ok(n)
    }
}

/// Builds [`Sessions`]; every setting is checked by [`build`](Self::build),
/// and a bad one is an [`Error::Config`] naming the field.
///
/// ```
/// use tollgate_session::{CookieConfig, Error, Sessions};
///
/// // A `__Host-` cookie cannot carry a Domain: the error names the field.
/// let err = Sessions::builder()
///     .cookie(CookieConfig::new().host_prefixed("sid").domain("example.com"))
///     .build()
///     .unwrap_err();
/// assert!(matches!(err, Error::Config { field: "cookie.domain", .. }));
/// ```
#[derive(Default)]
#[must_use]
pub struct SessionsBuilder {
    redis: Option<RedisHandle>,
    secret: Option<Vec<u8>>,
    signing: Option<(Vec<u8>, Vec<Vec<u8>>)>,
    transport: Transport,
    timeouts: Timeouts,
    touch_after: Option<Duration>,
    capacity: Option<u64>,
    failure: FailureMode,
    no_client_info: bool,
    local_cache: Option<(usize, Duration)>,
    max_data_bytes: Option<usize>,
}

impl std::fmt::Debug for SessionsBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print the secret or the signing keys.
        f.debug_struct("SessionsBuilder")
            .field("redis", &self.redis.is_some())
            .field("secret", &self.secret.as_ref().map(|_| "<redacted>"))
            .field(
                "signing_keys",
                &self.signing.as_ref().map(|(_, p)| 1 + p.len()),
            )
            .field("transport", &self.transport)
            .field("timeouts", &self.timeouts)
            .field("failure", &self.failure)
            .finish_non_exhaustive()
    }
}

impl SessionsBuilder {
    /// Keeps sessions in Redis through the shared handle (with the
    /// in-memory store as fallback). Requires [`secret`](Self::secret).
    pub fn redis(mut self, handle: RedisHandle) -> Self {
        self.redis = Some(handle);
        self
    }

    /// The server secret (at least 32 bytes) keying the hash under which
    /// records are stored: Redis never sees a raw session id. It must be
    /// the same on every instance and across restarts, or every session is
    /// lost. Required with Redis; random per process otherwise.
    pub fn secret(mut self, secret: impl AsRef<[u8]>) -> Self {
        self.secret = Some(secret.as_ref().to_vec());
        self
    }

    /// Signs the id with HMAC-SHA256 under `current` (at least 32 bytes);
    /// values signed with one of `previous` are still accepted and
    /// re-signed with `current`, so keys can rotate without logging anyone
    /// out. A value with a bad signature costs no store lookup.
    pub fn signing_keys<I, K>(mut self, current: impl AsRef<[u8]>, previous: I) -> Self
    where
        I: IntoIterator<Item = K>,
        K: AsRef<[u8]>,
    {
        self.signing = Some((
            current.as_ref().to_vec(),
            previous.into_iter().map(|k| k.as_ref().to_vec()).collect(),
        ));
        self
    }

    /// The session cookie's attributes.
    pub fn cookie(mut self, cookie: CookieConfig) -> Self {
        self.transport = Transport::Cookie(cookie);
        self
    }

    /// Carries the id in this header instead of a cookie (e.g.
    /// `x-session-id`, which gRPC clients send as metadata).
    pub fn header(mut self, name: HeaderName) -> Self {
        self.transport = Transport::Header(name);
        self
    }

    /// Sliding timeout: a session unused this long ends (default 30 min).
    pub fn idle_timeout(mut self, idle: Duration) -> Self {
        self.timeouts.idle = idle;
        self
    }

    /// Absolute timeout: a session ends this long after it began, however
    /// active (default 12 h).
    pub fn absolute_timeout(mut self, absolute: Duration) -> Self {
        self.timeouts.absolute = absolute;
        self
    }

    /// A read refreshes the session's idle clock (one write) only when the
    /// last refresh is older than this (default: a tenth of the idle
    /// timeout, at most one minute).
    pub fn touch_after(mut self, touch_after: Duration) -> Self {
        self.touch_after = Some(touch_after);
        self
    }

    /// Most sessions the in-memory store holds (default 100,000).
    pub fn memory_capacity(mut self, capacity: u64) -> Self {
        self.capacity = Some(capacity);
        self
    }

    /// What happens while Redis is unreachable.
    pub fn failure_mode(mut self, mode: FailureMode) -> Self {
        self.failure = mode;
        self
    }

    /// Whether new sessions record the client's `User-Agent` and IP (for
    /// session listings; default on).
    pub fn record_client(mut self, on: bool) -> Self {
        self.no_client_info = !on;
        self
    }

    /// With Redis: keeps up to about `capacity` records in process, so
    /// that a load usually costs no round trip, each for at most `max_age`
    /// (say 10 s). Redis's client tracking keeps the copies exact: a
    /// session changed, destroyed or revoked through any instance is
    /// dropped here when Redis pushes the invalidation, normally well
    /// under a millisecond after the change (a request arriving inside
    /// that window can still see the old record, as a request running at
    /// the time of the change would). Every write still goes to Redis
    /// before the response; a save from a cached record is a plain write
    /// whose record stays cached, so a request that reads and writes its
    /// session costs one round trip. Should another save of the same
    /// session land in the moment between that check and the write, the
    /// write notices and merges the other save's entries back at once:
    /// for that moment (one round trip) the record lacks them. (Three or
    /// more saves of one session racing from several instances within
    /// that moment are merged best effort.) Uses one
    /// more connection per instance
    /// (RESP3, `CLIENT TRACKING ... NOLOOP`; on Redis Cluster, tracked
    /// at every primary); stays off while that connection (or, on a
    /// cluster, any primary's) is down or the breaker is open, and while
    /// the ACL refuses `CLIENT TRACKING`. Off by default.
    pub fn local_cache(mut self, capacity: usize, max_age: Duration) -> Self {
        self.local_cache = Some((capacity, max_age));
        self
    }

    /// Most bytes of data a session may hold, keys and JSON-encoded values
    /// together (default 128 KiB). An [`insert`](crate::Session::insert)
    /// that would go over it fails with [`Error::TooLarge`] and changes
    /// nothing. Every request that reads a session moves its whole record,
    /// and on Redis within the command deadline: without a bound, one
    /// session grown without end (a list appended to on every request)
    /// would make its own requests time out, and its timeouts would open
    /// the breaker that every layer shares.
    pub fn max_data_bytes(mut self, bytes: usize) -> Self {
        self.max_data_bytes = Some(bytes);
        self
    }

    /// Checks the configuration.
    pub fn build(self) -> Result<Sessions, Error> {
        let max_data_bytes = self.max_data_bytes.unwrap_or(DEFAULT_MAX_DATA_BYTES);
        if max_data_bytes == 0 {
            return Err(Error::Config {
                field: "max_data_bytes",
                reason: "must be positive",
            });
        }
        let mut t = self.timeouts;
        if t.idle.is_zero() {
            return Err(Error::Config {
                field: "idle_timeout",
                reason: "must be positive",
            });
        }
        if t.absolute.is_zero() {
            return Err(Error::Config {
                field: "absolute_timeout",
                reason: "must be positive",
            });
        }
        t.touch_after = self
            .touch_after
            .unwrap_or_else(|| (t.idle / 10).min(Duration::from_secs(60)));
        if t.touch_after >= t.idle {
            return Err(Error::Config {
                field: "touch_after",
                reason: "must be shorter than the idle timeout",
            });
        }
        if let Transport::Cookie(c) = &self.transport {
            c.validate()?;
        }
        let secret = match (self.secret, &self.redis) {
            (Some(s), _) if s.len() < MIN_SECRET_LEN => {
                return Err(Error::Config {
                    field: "secret",
                    reason: "must be at least 32 bytes",
                });
            }
            (Some(s), _) => s,
            (None, Some(_)) => {
                return Err(Error::Config {
                    field: "secret",
                    reason: "required with Redis: it must be stable across instances and restarts",
                });
            }
            (None, None) => {
                let mut s = vec![0u8; MIN_SECRET_LEN];
                rand::rng().fill_bytes(&mut s);
                s
            }
        };
        let ring = match self.signing {
            Some((cur, prev)) => {
                if cur.len() < MIN_SECRET_LEN || prev.iter().any(|k| k.len() < MIN_SECRET_LEN) {
                    return Err(Error::Config {
                        field: "signing_keys",
                        reason: "every key must be at least 32 bytes",
                    });
                }
                Some(KeyRing::new(&cur, &prev))
            }
            None => None,
        };
        let capacity = self.capacity.unwrap_or(100_000);
        if capacity == 0 {
            return Err(Error::Config {
                field: "memory_capacity",
                reason: "must be positive",
            });
        }
        if let Some((capacity, max_age)) = self.local_cache
            && (capacity == 0 || max_age.is_zero())
        {
            return Err(Error::Config {
                field: "local_cache",
                reason: "capacity and max_age must be positive",
            });
        }
        let local_cache = self.local_cache;
        let redis = self.redis.map(|h| {
            h.register_layer("session");
            let store = RedisStore::new(h, t);
            match local_cache {
                Some((capacity, max_age)) => store.with_local_cache(capacity, max_age),
                None => store,
            }
        });
        Ok(Sessions {
            shared: Arc::new(Shared {
                redis,
                memory: MemoryStore::new(capacity, t),
                hasher: IdHasher::new(&secret),
                ring,
                transport: self.transport,
                timeouts: t,
                failure: self.failure,
                record_client: !self.no_client_info,
                max_data_bytes,
            }),
        })
    }
}
