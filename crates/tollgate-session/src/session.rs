//! [`Session`]: the per-request handle.

use std::sync::Arc;

use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::sync::Mutex;

use crate::config::{Backend, Sessions, Shared, on_store};
use crate::error::Error;
use crate::id::SessionId;
use crate::store::{Diff, NewRecord, Record, SaveOutcome, SessionInfo, SessionStore};
use crate::transport::{Incoming, Outgoing};

/// How many fresh ids to try when one collides (it never should: 256
/// random bits).
const CREATE_ATTEMPTS: usize = 3;
/// Longest `User-Agent` kept in a record.
const MAX_USER_AGENT: usize = 256;

/// The session of one request, inserted into its extensions by the layer
/// (and an axum extractor with the `axum` feature).
///
/// Lazy: nothing is read from the store until a method needs the record,
/// so a handler that never touches the session costs nothing. Changes are
/// kept locally and written once, entry by entry, after the handler has
/// responded. Cheap to clone; clones share the request's state.
#[derive(Clone)]
pub struct Session {
    inner: Arc<Inner>,
}

struct Inner {
    sessions: Sessions,
    client: ClientInfo,
    state: Mutex<State>,
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session").finish_non_exhaustive()
    }
}

/// The client as seen by the request, kept as it came: it is written
/// (as text) only when the request creates a session, so the requests that
/// do not format nothing.
#[derive(Clone, Debug, Default)]
pub(crate) struct ClientInfo {
    pub(crate) user_agent: Option<http::HeaderValue>,
    pub(crate) ip: Option<std::net::IpAddr>,
}

impl ClientInfo {
    /// The `User-Agent`, when it is text.
    fn user_agent(&self) -> Option<String> {
        self.user_agent
            .as_ref()
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    }

    /// The IP address, as text.
    fn ip(&self) -> Option<String> {
        self.ip.map(|ip| ip.to_string())
    }
}

struct State {
    incoming: Incoming,
    phase: Phase,
    diff: Diff,
    rotate: bool,
}

impl State {
    /// The size of the session's data (keys and JSON values) once `key`
    /// holds `json`, counting this request's changes.
    fn data_bytes_with(&self, key: &str, json: &str) -> usize {
        let entry = |k: &String, v: &String| k.len() + v.len();
        let stored = match &self.phase {
            Phase::Loaded { record, .. } if !self.diff.clear => record
                .data
                .iter()
                .filter(|(k, _)| {
                    k.as_str() != key
                        && !self.diff.remove.contains(k.as_str())
                        && !self.diff.set.contains_key(k.as_str())
                })
                .map(|(k, v)| entry(k, v))
                .sum(),
            _ => 0,
        };
        let changed: usize = self
            .diff
            .set
            .iter()
            .filter(|(k, _)| k.as_str() != key)
            .map(|(k, v)| entry(k, v))
            .sum();
        stored + changed + key.len() + json.len()
    }
}

enum Phase {
    /// Nothing read yet.
    Unloaded,
    /// No record: a new one is created at the end if anything was written.
    Fresh {
        id: SessionId,
        backend: Backend,
        /// The incoming id may still have a record this request could not
        /// use: its load failed, was answered by the fallback, or found the
        /// record corrupt. Destroying the session must still delete it.
        unresolved: bool,
        /// The incoming id's record may live in Redis, which could not be
        /// read (Redis unreachable). The session cannot be changed in this
        /// request unless its id is rotated: saving it would create a new
        /// session in the fallback and replace the cookie, and the user
        /// would lose the Redis session once Redis answers.
        unreadable: bool,
    },
    /// A live record, under the incoming id.
    Loaded {
        /// The keyed hash of the id (what the store knows it by), kept
        /// from the load so the save does not hash again.
        hash: String,
        record: Box<Record>,
        backend: Backend,
    },
    /// Destroyed in this request.
    Destroyed,
}

/// What the layer must do once the handler has responded.
pub(crate) struct Commit {
    pub(crate) out: Option<Outgoing>,
    /// A store write failed.
    pub(crate) failed: bool,
}

impl Session {
    pub(crate) fn new(sessions: Sessions, incoming: Incoming, client: ClientInfo) -> Self {
        Session {
            inner: Arc::new(Inner {
                sessions,
                client,
                state: Mutex::new(State {
                    incoming,
                    phase: Phase::Unloaded,
                    diff: Diff::default(),
                    rotate: false,
                }),
            }),
        }
    }

    /// The sessions this one belongs to (for administration).
    pub fn sessions(&self) -> &Sessions {
        &self.inner.sessions
    }

    fn shared(&self) -> &Shared {
        &self.inner.sessions.shared
    }

    /// The value stored under `key`, if any.
    pub async fn get<T: DeserializeOwned>(&self, key: &str) -> Result<Option<T>, Error> {
        let mut st = self.inner.state.lock().await;
        self.ensure_loaded(&mut st).await?;
        let raw = if st.diff.remove.contains(key) {
            None
        } else if let Some(v) = st.diff.set.get(key) {
            Some(v.as_str())
        } else if st.diff.clear {
            None
        } else {
            match &st.phase {
                Phase::Loaded { record, .. } => record.data.get(key).map(String::as_str),
                _ => None,
            }
        };
        raw.map(|r| serde_json::from_str(r))
            .transpose()
            .map_err(|source| Error::Serde {
                key: key.to_owned(),
                source,
            })
    }

    /// Stores `value` under `key` (written after the response).
    ///
    /// # Errors
    ///
    /// A value that cannot be encoded, and one that would take the
    /// session's data (keys and JSON values) over
    /// [`max_data_bytes`](crate::SessionsBuilder::max_data_bytes)
    /// ([`Error::TooLarge`]; the session is unchanged). While Redis is unreachable,
    /// a request whose cookie names a session that may live in Redis sees
    /// it empty (the user is anonymous meanwhile). Changing it
    /// (`insert`, `remove`, `clear`, `bind_user`) fails with
    /// [`Error::Unavailable`] (503 through `?`) and the response keeps the
    /// cookie: saving the change would start a new session in the fallback
    /// store under a new cookie, and the user would lose the Redis session
    /// once Redis answers. Call [`rotate_id`](Self::rotate_id) first (a
    /// login) to start a new session on purpose.
    pub async fn insert<T: Serialize + ?Sized>(&self, key: &str, value: &T) -> Result<(), Error> {
        let json = serde_json::to_string(value).map_err(|source| Error::Serde {
            key: key.to_owned(),
            source,
        })?;
        let mut st = self.inner.state.lock().await;
        self.ensure_writable(&mut st).await?;
        let limit = self.shared().max_data_bytes;
        let bytes = st.data_bytes_with(key, &json);
        if bytes > limit {
            return Err(Error::TooLarge {
                key: key.to_owned(),
                bytes,
                limit,
            });
        }
        st.diff.remove.remove(key);
        st.diff.set.insert(key.to_owned(), json);
        Ok(())
    }

    /// Removes `key`, returning whether it was present. Fails like
    /// [`insert`](Self::insert) while the session cannot be read.
    pub async fn remove(&self, key: &str) -> Result<bool, Error> {
        let mut st = self.inner.state.lock().await;
        self.ensure_writable(&mut st).await?;
        let had_local = st.diff.set.remove(key).is_some();
        let had_stored = !st.diff.clear
            && matches!(&st.phase, Phase::Loaded { record, .. } if record.data.contains_key(key));
        st.diff.remove.insert(key.to_owned());
        Ok(had_local || had_stored)
    }

    /// Removes every entry; the session itself (id, user) stays. Fails
    /// like [`insert`](Self::insert) while the session cannot be read.
    pub async fn clear(&self) -> Result<(), Error> {
        let mut st = self.inner.state.lock().await;
        self.ensure_writable(&mut st).await?;
        st.diff.clear = true;
        st.diff.set.clear();
        st.diff.remove.clear();
        Ok(())
    }

    /// Gives the session a new id at the end of the request, keeping its
    /// entries; the old id stops working. Call it on login (and on any
    /// privilege change) to defeat session fixation. While Redis cannot
    /// read the request's session, calling it first is what lets a login
    /// start a new session in the fallback store (see
    /// [`insert`](Self::insert)); the old record, if any, stays in Redis
    /// until it expires.
    pub async fn rotate_id(&self) -> Result<(), Error> {
        let mut st = self.inner.state.lock().await;
        self.ensure_loaded(&mut st).await?;
        st.rotate = true;
        Ok(())
    }

    /// Binds the session to a user (for listing and revoking a user's
    /// sessions). Usually paired with [`rotate_id`](Self::rotate_id), and
    /// fails like [`insert`](Self::insert) without it while the session
    /// cannot be read.
    pub async fn bind_user(&self, user_id: impl Into<String>) -> Result<(), Error> {
        let mut st = self.inner.state.lock().await;
        self.ensure_writable(&mut st).await?;
        st.diff.user = Some(Some(user_id.into()));
        Ok(())
    }

    /// The user bound to the session, if any.
    pub async fn user_id(&self) -> Result<Option<String>, Error> {
        let mut st = self.inner.state.lock().await;
        self.ensure_loaded(&mut st).await?;
        Ok(Self::user_of(&st))
    }

    fn user_of(st: &State) -> Option<String> {
        match (&st.diff.user, &st.phase) {
            (Some(u), _) => u.clone(),
            (None, Phase::Loaded { record, .. }) => record.user.clone(),
            _ => None,
        }
    }

    /// Ends the session now: the record is deleted (one store command, no
    /// read) and the response removes the cookie. A request still running
    /// on the same session cannot bring it back.
    ///
    /// # Errors
    ///
    /// When the record may live in Redis and Redis cannot delete it (the
    /// breaker is open: [`Error::Unavailable`]; the command failed:
    /// [`Error::Store`]), nothing is deleted and nothing changes: the
    /// session stays as it was and the response keeps the cookie, so the
    /// user can log out again once Redis answers. Removing the cookie
    /// without deleting the record would leave a copy of the cookie
    /// working.
    pub async fn destroy(&self) -> Result<(), Error> {
        let mut st = self.inner.state.lock().await;
        let shared = self.shared();
        let target = match &st.phase {
            Phase::Loaded { hash, backend, .. } => Some((hash.clone(), Some(*backend))),
            Phase::Unloaded
            | Phase::Fresh {
                unresolved: true, ..
            } => match &st.incoming {
                Incoming::Valid { id, .. } => Some((shared.hasher.session(id), None)),
                _ => None,
            },
            Phase::Fresh { .. } | Phase::Destroyed => None,
        };
        if let Some((hash, backend)) = target {
            // On failure the state is untouched: see the doc above.
            let backend = Box::pin(self.delete_record(&hash, backend)).await?;
            metrics::counter!("tollgate_session_destroys_total", "store" => shared.label(backend))
                .increment(1);
        }
        st.phase = Phase::Destroyed;
        st.diff = Diff::default();
        st.rotate = false;
        Ok(())
    }

    /// Deletes the record under `hash` from the store that served it
    /// (`Some`), or, for an id never looked up there (`None`), from
    /// wherever it may live. Returns the store it was deleted from.
    async fn delete_record(&self, hash: &str, served: Option<Backend>) -> Result<Backend, Error> {
        let shared = self.shared();
        // The in-process store holds the sessions created during an outage
        // (never an id that lives in Redis).
        let in_memory = shared.memory.delete(hash).await?;
        let backend = match served {
            Some(b) => b,
            None if in_memory => {
                return Ok(if shared.redis.is_some() {
                    Backend::Fallback
                } else {
                    Backend::Primary
                });
            }
            // Breaker open: the record may be in Redis, which cannot be
            // told to delete it.
            None => shared.backend().and_then(|b| match b {
                Backend::Fallback => Err(Error::Unavailable),
                Backend::Primary => Ok(b),
            })?,
        };
        if backend == Backend::Primary
            && let Some(r) = &shared.redis
        {
            r.delete(hash).await.inspect_err(|e| {
                store_error(shared, backend, "destroy", e);
            })?;
        }
        Ok(backend)
    }

    /// The keyed hash of the session's id: what stores and user listings
    /// know it by (log this, never the id). `None` before the session is
    /// persisted or after it is destroyed.
    pub async fn id_hash(&self) -> Result<Option<String>, Error> {
        let mut st = self.inner.state.lock().await;
        self.ensure_loaded(&mut st).await?;
        Ok(match &st.phase {
            Phase::Loaded { hash, .. } => Some(hash.clone()),
            _ => None,
        })
    }

    /// The sessions of the bound user (every device), oldest first.
    pub async fn user_sessions(&self) -> Result<Vec<SessionInfo>, Error> {
        let user = self.user_id().await?.ok_or(Error::NoUser)?;
        self.inner.sessions.list(&user).await
    }

    /// Revokes one of the bound user's sessions by its id hash.
    pub async fn revoke_session(&self, id_hash: &str) -> Result<bool, Error> {
        let user = self.user_id().await?.ok_or(Error::NoUser)?;
        self.inner.sessions.revoke(&user, id_hash).await
    }

    /// Revokes every other session of the bound user ("log out my other
    /// devices"); this one stays. Returns how many were revoked.
    pub async fn revoke_other_sessions(&self) -> Result<usize, Error> {
        let user = self.user_id().await?.ok_or(Error::NoUser)?;
        let current = self.id_hash().await?;
        self.inner
            .sessions
            .revoke_all(&user, current.as_deref())
            .await
    }

    /// Loads the session for a change; refuses the change when its record
    /// may live in Redis but could not be read (see [`insert`](Self::insert)).
    async fn ensure_writable(&self, st: &mut State) -> Result<(), Error> {
        self.ensure_loaded(st).await?;
        match st.phase {
            Phase::Fresh {
                unreadable: true, ..
            } if !st.rotate => Err(Error::Unavailable),
            _ => Ok(()),
        }
    }

    async fn ensure_loaded(&self, st: &mut State) -> Result<(), Error> {
        match st.phase {
            Phase::Unloaded => {}
            Phase::Destroyed => return Err(Error::Destroyed),
            _ => return Ok(()),
        }
        let shared = self.shared();
        let backend = shared.backend()?;
        let Incoming::Valid { id, .. } = &st.incoming else {
            st.phase = Phase::Fresh {
                id: SessionId::generate(),
                backend,
                unresolved: false,
                unreadable: false,
            };
            return Ok(());
        };
        let hash = shared.hasher.session(id);
        // Whether a miss may hide a record in Redis: the fallback cannot
        // see Redis's.
        let mut unreadable = backend == Backend::Fallback;
        let mut unresolved = unreadable;
        // Boxed: inline, a store's load future (half a KiB for Redis) would
        // be part of the future of every `get`, `insert` and `remove`, and
        // so of every handler awaiting one.
        let (found, backend) = match on_store!(shared, backend, |s| Box::pin(s.load(&hash)).await) {
            Ok(r) => (r, backend),
            // Not a store outage: the record is unusable, start afresh.
            Err(e @ Error::Corrupt(_)) => {
                store_error(shared, backend, "load", &e);
                unresolved = true;
                (None, backend)
            }
            Err(e) => {
                store_error(shared, backend, "load", &e);
                if backend == Backend::Fallback || shared.failure == crate::FailureMode::FailClosed
                {
                    return Err(Error::Unavailable);
                }
                metrics::counter!("tollgate_session_fallback_total", "op" => "load").increment(1);
                unreadable = true;
                unresolved = true;
                (shared.memory.load(&hash).await?, Backend::Fallback)
            }
        };
        tollgate_redis::counters::increment(
            "tollgate_session_loads_total",
            [None, None],
            [
                Some(("store", shared.label(backend))),
                Some(("result", if found.is_some() { "hit" } else { "miss" })),
            ],
        );
        st.phase = match found {
            Some(record) => Phase::Loaded {
                hash,
                record: Box::new(record),
                backend,
            },
            None => Phase::Fresh {
                id: SessionId::generate(),
                backend,
                unresolved,
                unreadable,
            },
        };
        Ok(())
    }

    /// Whether the request needs nothing written or sent (checked without
    /// waiting: a handler still holding the state is not idle). Mirrors
    /// the cases of [`commit`](Self::commit) that neither touch the store
    /// nor set a cookie: nothing read, a record read and left as it was
    /// (the common read-only request), or no record and nothing written.
    pub(crate) fn is_idle(&self) -> bool {
        let Ok(st) = self.inner.state.try_lock() else {
            return false;
        };
        let resign = matches!(st.incoming, Incoming::Valid { resign: true, .. });
        match &st.phase {
            Phase::Unloaded => !resign,
            Phase::Loaded { .. } => {
                !st.rotate && st.diff.is_empty() && !resign && !self.shared().refreshes_cookie()
            }
            Phase::Fresh { .. } => st.diff.is_empty(),
            Phase::Destroyed => false,
        }
    }

    /// Writes what the request changed and says what the response must
    /// carry.
    ///
    /// Only [`destroy`](Self::destroy) removes the cookie. A request that
    /// finds no record, or no usable one (unknown, expired, revoked,
    /// rotated away by a concurrent login, corrupt, unreadable while Redis
    /// is down, a malformed or badly signed value), leaves the cookie
    /// alone: a removal could reach the browser after a concurrent
    /// response that set a new id and delete that one, and while Redis is
    /// down the record may well still be alive. A dead cookie costs at most
    /// a lookup per request that reads the session, and is replaced when a
    /// session is next created.
    pub(crate) async fn commit(&self) -> Commit {
        let mut st = self.inner.state.lock().await;
        let shared = self.shared();
        let had_cookie = !matches!(st.incoming, Incoming::Absent);
        let phase = std::mem::replace(&mut st.phase, Phase::Destroyed);
        let diff = std::mem::take(&mut st.diff);
        let max_age = shared.refreshes_cookie();
        match phase {
            Phase::Unloaded => Commit {
                out: match &st.incoming {
                    Incoming::Valid { id, resign: true } => Some(Outgoing::Set(id.clone())),
                    _ => None,
                },
                failed: false,
            },
            Phase::Destroyed => Commit {
                out: had_cookie.then_some(Outgoing::Remove),
                failed: false,
            },
            Phase::Fresh { .. } if diff.is_empty() => Commit {
                out: None,
                failed: false,
            },
            Phase::Fresh { id, backend, .. } => {
                let new = NewRecord {
                    data: diff.set,
                    user: diff.user.flatten(),
                    user_agent: self.inner.client.user_agent(),
                    ip: self.inner.client.ip(),
                    created_at: None,
                    expires_at: None,
                };
                // Boxed, as below: creating is the rare end of a request,
                // and its store futures would enlarge every commit's.
                match Box::pin(self.create(id, backend, &new, true)).await {
                    Some(id) => Commit {
                        out: Some(Outgoing::Set(id)),
                        failed: false,
                    },
                    None => Commit {
                        out: None,
                        failed: true,
                    },
                }
            }
            Phase::Loaded {
                hash: old, backend, ..
            } if st.rotate => {
                // Take the current record (concurrent writes included) and
                // kill the old id in one command; a session destroyed
                // meanwhile stays dead.
                let taken = on_store!(shared, backend, |s| Box::pin(s.take(&old)).await);
                let mut record = match taken {
                    Ok(Some(r)) => r,
                    // Destroyed, expired, or rotated by a concurrent
                    // request (whose new cookie must survive).
                    Ok(None) => {
                        return Commit {
                            out: None,
                            failed: false,
                        };
                    }
                    Err(e) => {
                        store_error(shared, backend, "rotate", &e);
                        return Commit {
                            out: None,
                            failed: true,
                        };
                    }
                };
                diff.apply(&mut record);
                let new = NewRecord {
                    data: std::mem::take(&mut record.data),
                    user: record.user.take(),
                    user_agent: record.user_agent.take(),
                    ip: record.ip.take(),
                    created_at: Some(record.created_at),
                    expires_at: Some(record.expires_at),
                };
                // No fallback here: the record came from `backend`.
                let created =
                    Box::pin(self.create(SessionId::generate(), backend, &new, false)).await;
                if created.is_some() {
                    metrics::counter!("tollgate_session_rotations_total", "store" => shared.label(backend))
                        .increment(1);
                }
                Commit {
                    failed: created.is_none(),
                    out: created.map(Outgoing::Set),
                }
            }
            Phase::Loaded {
                hash,
                record,
                backend,
            } => {
                // The cookie goes out again, with the id it came with,
                // when it must be re-signed or its Max-Age slides.
                let again = || match &st.incoming {
                    Incoming::Valid { id, resign } if *resign || max_age => {
                        Some(Outgoing::Set(id.clone()))
                    }
                    _ => None,
                };
                if diff.is_empty() {
                    return Commit {
                        out: again(),
                        failed: false,
                    };
                }
                let user_hash = match &diff.user {
                    Some(Some(u)) => Some(shared.hasher.user(u)),
                    _ => None,
                };
                // Boxed: the save future would otherwise make the commit's
                // (and the response future's) too large for the
                // allocator's per-thread cache.
                let saved = on_store!(shared, backend, |s| {
                    Box::pin(s.save_from(&hash, user_hash.as_deref(), &diff, *record)).await
                });
                let label = shared.label(backend);
                match saved {
                    Ok(SaveOutcome::Missing) => {
                        metrics::counter!("tollgate_session_saves_total", "store" => label, "result" => "missing")
                            .increment(1);
                        tracing::debug!(session = %hash, "session ended during the request: nothing saved");
                        Commit {
                            out: None,
                            failed: false,
                        }
                    }
                    Ok(outcome) => {
                        let result = if outcome == SaveOutcome::Merged {
                            metrics::counter!("tollgate_session_write_conflicts_total", "store" => label)
                                .increment(1);
                            "merged"
                        } else {
                            "saved"
                        };
                        tollgate_redis::counters::increment(
                            "tollgate_session_saves_total",
                            [None, None],
                            [Some(("store", label)), Some(("result", result))],
                        );
                        Commit {
                            out: again(),
                            failed: false,
                        }
                    }
                    Err(e) => {
                        store_error(shared, backend, "save", &e);
                        Commit {
                            out: None,
                            failed: true,
                        }
                    }
                }
            }
        }
    }

    /// Creates a record under `id` (or a fresh id on collision). With
    /// `may_fall_back`, a primary failure creates it in the fallback.
    async fn create(
        &self,
        mut id: SessionId,
        mut backend: Backend,
        new: &NewRecord,
        may_fall_back: bool,
    ) -> Option<SessionId> {
        let shared = self.shared();
        let user_hash = new.user.as_deref().map(|u| shared.hasher.user(u));
        let mut new = new.clone();
        if let Some(ua) = &mut new.user_agent
            && ua.len() > MAX_USER_AGENT
        {
            let mut end = MAX_USER_AGENT;
            while !ua.is_char_boundary(end) {
                end -= 1;
            }
            ua.truncate(end);
        }
        for _ in 0..CREATE_ATTEMPTS {
            let hash = shared.hasher.session(&id);
            let res = on_store!(shared, backend, |s| s
                .create(&hash, user_hash.as_deref(), &new)
                .await);
            match res {
                Ok(true) => {
                    metrics::counter!("tollgate_session_creates_total", "store" => shared.label(backend))
                        .increment(1);
                    return Some(id);
                }
                // A collision (or a rotation past its absolute expiry).
                Ok(false) if new.expires_at.is_some() => return None,
                Ok(false) => id = SessionId::generate(),
                Err(e) => {
                    store_error(shared, backend, "create", &e);
                    if !may_fall_back
                        || backend == Backend::Fallback
                        || shared.failure == crate::FailureMode::FailClosed
                    {
                        return None;
                    }
                    metrics::counter!("tollgate_session_fallback_total", "op" => "create")
                        .increment(1);
                    backend = Backend::Fallback;
                }
            }
        }
        None
    }
}

fn store_error(shared: &Shared, backend: Backend, op: &'static str, e: &Error) {
    metrics::counter!("tollgate_session_store_errors_total", "store" => shared.label(backend), "op" => op)
        .increment(1);
    tracing::warn!(op, store = shared.label(backend), error = %e, "session store failed");
}

#[cfg(feature = "axum")]
impl<S: Send + Sync> axum::extract::FromRequestParts<S> for Session {
    type Rejection = (http::StatusCode, &'static str);

    async fn from_request_parts(
        parts: &mut http::request::Parts,
        _: &S,
    ) -> Result<Self, Self::Rejection> {
        parts.extensions.get::<Session>().cloned().ok_or((
            http::StatusCode::INTERNAL_SERVER_ERROR,
            "Session extractor used without SessionLayer",
        ))
    }
}

#[cfg(test)]
mod future_size {
    /// Every request moves these futures, and allocates them: axum boxes
    /// the handler's (which holds whichever `get`/`insert` it awaits), the
    /// layer boxes the save at the end. glibc serves allocations up to
    /// 1,032 bytes from a per-thread cache; a larger one takes its shared
    /// heap and can make it consolidate its free lists. So store steps are
    /// boxed where they would make these futures larger than 1 KiB: a fred
    /// command's future alone is kilobytes, and with it inline a session
    /// read was a 14 KB future.
    const ALLOCATOR_CACHE: usize = 1024;

    #[test]
    fn request_path_futures_fit_the_allocator_cache() {
        let sessions = crate::Sessions::builder()
            .secret("a test secret of at least thirty-two bytes")
            .build()
            .expect("sessions");
        let s = super::Session::new(
            sessions,
            super::Incoming::Absent,
            super::ClientInfo::default(),
        );
        let sizes = [
            ("get", std::mem::size_of_val(&s.get::<u64>("n"))),
            ("insert", std::mem::size_of_val(&s.insert("n", &1u64))),
            ("remove", std::mem::size_of_val(&s.remove("n"))),
            ("commit", std::mem::size_of_val(&s.commit())),
        ];
        for (name, size) in sizes {
            // A handler awaits several of these: well under the line.
            let bound = if name == "commit" {
                ALLOCATOR_CACHE
            } else {
                ALLOCATOR_CACHE / 2
            };
            assert!(size <= bound, "{name}: {size} bytes, over {bound}");
        }
        let save = crate::future::finish(s.clone(), http::Response::new(axum::body::Body::empty()));
        let size = std::mem::size_of_val(&save);
        assert!(size <= ALLOCATOR_CACHE, "the boxed save: {size} bytes");
    }
}
