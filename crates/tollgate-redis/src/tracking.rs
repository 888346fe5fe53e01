//! A connection with Redis's client tracking on, for an in-process cache
//! that must hear of every change made to the keys it caches.
//!
//! Tracking runs in broadcasting mode (`BCAST`) over key prefixes: Redis
//! pushes the name of every key under those prefixes that anyone changes,
//! expires or deletes, without remembering what was read (remembering
//! costs Redis several microseconds per write of a long key). `NOLOOP` is
//! on: the connection's own writes are not pushed back to it, since the
//! cache applies them itself. (Redis 7.0 pushes back a script's writes all
//! the same: a cache that keeps what it wrote writes with plain
//! commands.)
//!
//! Pushes travel on the connection that reads, after the replies Redis
//! queued before the change, which is what lets a cache tell a value read
//! before a change from one read after it ([`Invalidate`] gives the
//! protocol a cache follows). The pool's connections speak RESP2 and are
//! shared by every layer, so this is a connection of its own, speaking
//! RESP3, built from the same settings.
//!
//! Invalidations can be lost with the connection: on every error and
//! every reconnection the cache is told to forget everything
//! ([`Invalidate::all`]), and it is not [`live`](TrackedConnection::is_live)
//! until tracking is on again. They are also lost on `FLUSHALL` and
//! `FLUSHDB`, whose notice (an invalidation of no key in particular) the
//! client library drops: a canary key, `{namespace}:tracking:canary`, is
//! checked every [`FLUSH_CHECK`], and a missing canary counts as a flush.
//! The same check catches a connection that stopped answering without
//! dropping (a frozen Redis, a silent network failure): the cache is
//! emptied and not live until the canary answers again.
//!
//! On Redis Cluster each primary tracks, and pushes, its own keys only:
//! tracking is turned on at every primary (on the connection to it), each
//! primary has a canary of its own (a key in one of its slots), and the
//! connection is live only while all of them are tracked and answer. A
//! change of topology (slots moved, a primary added or gone) empties the
//! cache and places the canaries again; a primary that reconnects is
//! tracked again, and until it is, nothing is served.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Weak};

use fred::clients::Client;
use fred::error::ErrorKind;
use fred::interfaces::{
    ClientLike, ClusterInterface, EventInterface, KeysInterface, TrackingInterface,
};
use fred::types::config::Server;
use fred::types::{ClusterHash, CustomCommand};
use tokio::sync::broadcast::error::RecvError;

use crate::error::Error;
use crate::handle::RedisHandle;
use crate::keys::KeySpace;

/// How often the connection checks that Redis was not flushed.
pub const FLUSH_CHECK: std::time::Duration = std::time::Duration::from_secs(1);

/// What a cache fed by a [`TrackedConnection`] does with invalidations.
///
/// The protocol that keeps such a cache exact: before a read is sent, the
/// cache marks the key as being read (with a token, and the cache's current
/// epoch); [`key`](Self::key) removes whatever the cache holds for the key,
/// mark included; a reply is kept only if its mark is still there and the
/// epoch unchanged. A change after the read is pushed after the reply, so
/// whichever of the two is handled first, the value read never outlives
/// the change.
pub trait Invalidate: Send + Sync + 'static {
    /// `key` changed, expired or was deleted in Redis.
    fn key(&self, key: &[u8]);
    /// Invalidations may have been lost (the connection dropped, the cache
    /// fell behind, or Redis was flushed): forget everything, and let no
    /// read begun before now fill the cache.
    fn all(&self);
}

/// A dedicated RESP3 connection with client tracking on, reporting to an
/// [`Invalidate`] sink. Cheap to clone; the connection closes when the last
/// clone is dropped or the sink is.
#[derive(Clone)]
pub struct TrackedConnection {
    inner: Arc<Inner>,
}

pub(crate) struct Inner {
    client: Client,
    handle: RedisHandle,
    /// Tracking is on and the connection answers.
    live: AtomicBool,
    /// Reconnects to a primary a Sentinel switched to.
    _follow: crate::FollowPrimary,
}

impl Drop for Inner {
    fn drop(&mut self) {
        crate::quit_in_background(&self.client);
    }
}

impl std::fmt::Debug for TrackedConnection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TrackedConnection")
            .field("live", &self.inner.live.load(Ordering::Relaxed))
            .finish()
    }
}

impl TrackedConnection {
    /// Opens the connection in the background (needs a Tokio runtime) and
    /// turns tracking of the keys under `prefixes` on once it is up (on a
    /// cluster, at every primary), and again after every reconnection.
    /// Until then, and whenever the connection is down, it is not
    /// [`live`](Self::is_live). If Redis refuses tracking (an ACL without
    /// `CLIENT`), it is not live until the next reconnection tries again,
    /// and says so in the log.
    pub fn start(
        handle: &RedisHandle,
        prefixes: Vec<String>,
        sink: Weak<dyn Invalidate>,
    ) -> Result<Self, Error> {
        let client = handle.dedicated_client(true)?;
        let inner = Arc::new(Inner {
            _follow: handle.follow_primary(&client),
            client,
            handle: handle.clone(),
            live: AtomicBool::new(false),
        });
        // Subscribed before connecting: the first connection (to each
        // primary, on a cluster) is announced as a reconnection too.
        let mut reconnects = inner.client.reconnect_rx();
        let mut errors = inner.client.error_rx();
        let mut invalidations = inner.client.invalidation_rx();
        let mut topology = inner.client.cluster_change_rx();
        let _connection = inner.client.connect();
        let weak = Arc::downgrade(&inner);
        handle.register_tracked(prefixes.clone(), weak.clone());
        let mut watch = Watch {
            cluster: handle.is_cluster(),
            keys: handle.keys("tracking"),
            prefixes,
            tracked: HashSet::new(),
            canaries: Vec::new(),
            complete: false,
            refused: false,
        };
        let mut flush_check = tokio::time::interval(FLUSH_CHECK);
        flush_check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tokio::spawn(async move {
            loop {
                let event = tokio::select! {
                    _ = flush_check.tick() => Event::FlushCheck,
                    r = reconnects.recv() => match r {
                        Ok(server) => Event::Reconnected(Some(server)),
                        Err(RecvError::Lagged(_)) => Event::Reconnected(None),
                        Err(RecvError::Closed) => return,
                    },
                    e = errors.recv() => match e {
                        Ok((_, server)) => Event::Error(server),
                        Err(RecvError::Lagged(_)) => Event::Error(None),
                        Err(RecvError::Closed) => return,
                    },
                    c = topology.recv() => match c {
                        Ok(_) | Err(RecvError::Lagged(_)) => Event::Topology,
                        Err(RecvError::Closed) => return,
                    },
                    i = invalidations.recv() => match i {
                        Ok(inv) => Event::Invalidated(inv.keys),
                        Err(RecvError::Lagged(_)) => Event::Lost,
                        Err(RecvError::Closed) => return,
                    },
                };
                let (Some(inner), Some(sink)) = (weak.upgrade(), sink.upgrade()) else {
                    return;
                };
                watch.handle(&inner, &*sink, event).await;
            }
        });
        Ok(TrackedConnection { inner })
    }

    /// Whether what was read through this connection may be served from a
    /// cache: tracking is on and the shared handle's breaker is closed.
    pub fn is_live(&self) -> bool {
        self.inner.is_live()
    }

    /// The connection's client: reads whose values are cached go through
    /// it (see [`Coalescer::on_client`](crate::Coalescer::on_client)).
    pub fn client(&self) -> &Client {
        &self.inner.client
    }

    /// The shared handle it was built from.
    pub fn handle(&self) -> &RedisHandle {
        &self.inner.handle
    }
}

impl Inner {
    /// See [`TrackedConnection::is_live`].
    pub(crate) fn is_live(&self) -> bool {
        self.live.load(Ordering::Acquire) && self.handle.is_available()
    }

    /// Waits for a command's reply within the handle's deadline.
    async fn within<T>(
        &self,
        fut: impl std::future::Future<Output = Result<T, fred::error::Error>>,
    ) -> Result<T, fred::error::Error> {
        tokio::time::timeout(self.handle.deadline(), fut)
            .await
            .unwrap_or_else(|_| {
                Err(fred::error::Error::new(
                    ErrorKind::Timeout,
                    "no answer within the deadline",
                ))
            })
    }

    /// `CLIENT TRACKING OFF`, then on in broadcasting mode for `prefixes`,
    /// on the connection to `server` (a cluster's primary), or on the
    /// client's one connection when `None`. Off
    /// first: a connection whose tracking is still on refuses the same
    /// prefixes again.
    async fn track(
        &self,
        server: Option<&Server>,
        prefixes: &[String],
    ) -> Result<(), fred::error::Error> {
        let mut on = vec!["TRACKING".to_owned(), "ON".to_owned(), "BCAST".to_owned()];
        for p in prefixes {
            on.push("PREFIX".to_owned());
            on.push(p.clone());
        }
        on.push("NOLOOP".to_owned());
        for args in [vec!["TRACKING".to_owned(), "OFF".to_owned()], on] {
            let cmd = CustomCommand::new_static("CLIENT", ClusterHash::Random, false);
            let reply: Result<fred::types::Value, _> = match server {
                Some(s) => {
                    self.within(self.client.with_cluster_node(s.clone()).custom(cmd, args))
                        .await
                }
                None => self.within(self.client.custom(cmd, args)).await,
            };
            reply?;
        }
        Ok(())
    }

    async fn set_canary(&self, canary: &str) -> Result<(), fred::error::Error> {
        self.within(self.client.set(canary, 1, None, None, false))
            .await
    }

    /// Checks every canary within the deadline; one that is gone (a
    /// flush) is set again.
    async fn canaries(&self, canaries: &[String]) -> Canary {
        let mut found = Canary::Present;
        for canary in canaries {
            match self.within(self.client.exists::<i64, _>(canary)).await {
                Ok(0) => {
                    let _ = self.set_canary(canary).await;
                    found = Canary::Missing;
                }
                Ok(_) => {}
                Err(_) => return Canary::NoAnswer,
            }
        }
        found
    }
}

/// The watcher's own state: which primaries track, where the canaries are.
struct Watch {
    cluster: bool,
    keys: KeySpace,
    prefixes: Vec<String>,
    /// The primaries whose connection has tracking on (`None`: the one
    /// connection, off a cluster).
    tracked: HashSet<Option<Server>>,
    /// One per primary (one in all, off a cluster).
    canaries: Vec<String>,
    /// Every primary tracks and the canaries are placed.
    complete: bool,
    /// Redis refused tracking on this connection: not tried again until
    /// the next reconnection.
    refused: bool,
}

impl Watch {
    async fn handle(&mut self, inner: &Inner, sink: &dyn Invalidate, event: Event) {
        match event {
            Event::Invalidated(keys) => {
                // No keys: the database was flushed.
                if keys.is_empty() {
                    sink.all();
                }
                for k in &keys {
                    sink.key(k.as_bytes());
                }
            }
            Event::Lost => sink.all(),
            Event::Error(server) => self.off(inner, sink, server.as_ref()),
            Event::Reconnected(server) => {
                self.off(inner, sink, server.as_ref());
                self.refused = false;
                self.track_missing(inner).await;
                self.complete_up(inner, sink).await;
            }
            Event::Topology => {
                // Slots moved or primaries came and went: the canaries
                // move with them, and what was read in between may have
                // been read where no push comes from.
                self.complete = false;
                inner.live.store(false, Ordering::Release);
                sink.all();
                let primaries = self.primaries(inner);
                self.tracked.retain(|s| primaries.contains(s));
                self.complete_up(inner, sink).await;
            }
            Event::FlushCheck if !self.complete => {
                if !self.refused {
                    self.track_missing(inner).await;
                }
                self.complete_up(inner, sink).await;
            }
            Event::FlushCheck => match inner.canaries(&self.canaries).await {
                Canary::Present if !inner.live.load(Ordering::Acquire) => {
                    // Redis answers again, and no connection dropped:
                    // every push sent before these replies has arrived.
                    sink.all();
                    inner.live.store(true, Ordering::Release);
                }
                Canary::Present => {}
                Canary::Missing => sink.all(),
                Canary::NoAnswer => {
                    // Pushes may be stuck with the answer (a silent
                    // network failure, a frozen Redis): serve nothing
                    // until it answers.
                    inner.live.store(false, Ordering::Release);
                    sink.all();
                }
            },
        }
    }

    /// A connection dropped or failed (`None`: which one is not known):
    /// nothing is served until it tracks again.
    fn off(&mut self, inner: &Inner, sink: &dyn Invalidate, server: Option<&Server>) {
        match server {
            Some(s) if self.cluster => {
                self.tracked.remove(&Some(s.clone()));
            }
            _ => self.tracked.clear(),
        }
        self.complete = false;
        inner.live.store(false, Ordering::Release);
        sink.all();
    }

    /// The primaries as the client last saw them; off a cluster, the one
    /// connection (`None`).
    fn primaries(&self, inner: &Inner) -> Vec<Option<Server>> {
        if !self.cluster {
            return vec![None];
        }
        inner
            .client
            .cached_cluster_state()
            .map(|s| s.unique_primary_nodes().into_iter().map(Some).collect())
            .unwrap_or_default()
    }

    /// Turns tracking on at every primary where it is not on.
    async fn track_missing(&mut self, inner: &Inner) {
        for p in self.primaries(inner) {
            if !self.tracked.contains(&p) {
                self.track(inner, p).await;
            }
        }
    }

    async fn track(&mut self, inner: &Inner, server: Option<Server>) {
        match inner.track(server.as_ref(), &self.prefixes).await {
            Ok(()) => {
                self.tracked.insert(server);
            }
            Err(e) if transient(&e) => {
                tracing::debug!(error = %e, "client tracking not on yet: tried again in a second");
            }
            Err(e) => {
                self.refused = true;
                tracing::warn!(error = %e, "Redis refused client tracking: the in-process cache stays off");
            }
        }
    }

    /// Once every primary tracks: places the canaries, forgets whatever
    /// was read before (it was not tracked), and goes live.
    async fn complete_up(&mut self, inner: &Inner, sink: &dyn Invalidate) {
        if self.complete {
            return;
        }
        let primaries = self.primaries(inner);
        if primaries.is_empty() || primaries.iter().any(|p| !self.tracked.contains(p)) {
            return;
        }
        let state = inner.client.cached_cluster_state();
        let canary = |p: &Option<Server>| match (p, &state) {
            (None, _) => Some(self.keys.key(&["canary"])),
            (Some(p), Some(state)) => crate::keys::key_in_slots(&self.keys, "canary", |slot| {
                state.get_server(slot) == Some(p)
            }),
            (Some(_), None) => None,
        };
        let Some(canaries) = primaries.iter().map(canary).collect::<Option<Vec<_>>>() else {
            return;
        };
        for c in &canaries {
            if inner.set_canary(c).await.is_err() {
                return;
            }
        }
        self.canaries = canaries;
        // Reads sent before this point were not tracked: none of them may
        // fill the cache.
        sink.all();
        self.complete = true;
        inner.live.store(true, Ordering::Release);
    }
}

/// Whether a failure to turn tracking on may pass by itself (the
/// connection, not a refusal).
fn transient(e: &fred::error::Error) -> bool {
    matches!(
        e.kind(),
        ErrorKind::IO
            | ErrorKind::Timeout
            | ErrorKind::Canceled
            | ErrorKind::Routing
            | ErrorKind::Cluster
            | ErrorKind::Backpressure
    )
}

/// What a check of the canary found.
enum Canary {
    Present,
    /// Redis was flushed.
    Missing,
    /// No answer within the deadline.
    NoAnswer,
}

enum Event {
    /// Time to check that Redis was not flushed.
    FlushCheck,
    /// A connection (to this server, when known) is up again.
    Reconnected(Option<Server>),
    /// A connection (to this server, when known) failed.
    Error(Option<Server>),
    /// The cluster's slots or primaries changed.
    Topology,
    /// These keys changed (none: the database was flushed).
    Invalidated(Vec<fred::types::Key>),
    /// Pushes were dropped: the listener fell behind.
    Lost,
}
