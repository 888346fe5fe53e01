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
//! emptied and not live until the canary answers again. On a cluster a broadcasting connection
//! would hear of one node's keys only, so it is not started there.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Weak};

use fred::clients::Client;
use fred::interfaces::{ClientLike, EventInterface, TrackingInterface};
use tokio::sync::broadcast::error::RecvError;

use crate::error::Error;
use crate::handle::RedisHandle;

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
    /// Tracking was turned on on the current connection.
    tracking: AtomicBool,
}

impl Drop for Inner {
    fn drop(&mut self) {
        let client = self.client.clone();
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(async move {
                let _ = client.quit().await;
            });
        }
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
    /// turns tracking of the keys under `prefixes` on once it is up, and
    /// again after every reconnection. Until then, and whenever the
    /// connection is down, it is not [`live`](Self::is_live). If Redis
    /// refuses tracking (an ACL without `CLIENT`), it never becomes live
    /// and says so in the log. On a cluster: [`Error::Config`].
    pub fn start(
        handle: &RedisHandle,
        prefixes: Vec<String>,
        sink: Weak<dyn Invalidate>,
    ) -> Result<Self, Error> {
        if handle.is_cluster() {
            return Err(Error::Config {
                field: "url",
                reason: "client tracking by prefix is not available on a cluster".into(),
            });
        }
        let client = handle.dedicated_client(true)?;
        let inner = Arc::new(Inner {
            client,
            handle: handle.clone(),
            live: AtomicBool::new(false),
            tracking: AtomicBool::new(false),
        });
        // Subscribed before connecting: the first connection is announced
        // as a reconnection too.
        let mut reconnects = inner.client.reconnect_rx();
        let mut errors = inner.client.error_rx();
        let mut invalidations = inner.client.invalidation_rx();
        let _connection = inner.client.connect();
        let weak = Arc::downgrade(&inner);
        handle.register_tracked(prefixes.clone(), weak.clone());
        let canary = handle.keys("tracking").key(&["canary"]);
        let mut flush_check = tokio::time::interval(FLUSH_CHECK);
        flush_check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tokio::spawn(async move {
            loop {
                let event = tokio::select! {
                    _ = flush_check.tick() => Event::FlushCheck,
                    r = reconnects.recv() => Event::Reconnected(r.is_err_and(|e| matches!(e, RecvError::Closed))),
                    e = errors.recv() => Event::Error(e.is_err_and(|e| matches!(e, RecvError::Closed))),
                    i = invalidations.recv() => Event::Invalidated(i),
                };
                let (Some(inner), Some(sink)) = (weak.upgrade(), sink.upgrade()) else {
                    return;
                };
                match event {
                    Event::Reconnected(true) | Event::Error(true) => return,
                    Event::Invalidated(Err(RecvError::Closed)) => return,
                    Event::Error(false) => {
                        inner.tracking.store(false, Ordering::Release);
                        inner.live.store(false, Ordering::Release);
                        sink.all();
                    }
                    Event::FlushCheck if inner.tracking.load(Ordering::Acquire) => {
                        match inner.canary(&canary).await {
                            Canary::Present if !inner.live.load(Ordering::Acquire) => {
                                // The connection answers again, and it
                                // never dropped: every push sent before
                                // this reply has arrived.
                                sink.all();
                                inner.live.store(true, Ordering::Release);
                            }
                            Canary::Present => {}
                            Canary::Missing => sink.all(),
                            Canary::NoAnswer => {
                                // Pushes may be stuck with the answer (a
                                // silent network failure, a frozen Redis):
                                // serve nothing until it answers.
                                inner.live.store(false, Ordering::Release);
                                sink.all();
                            }
                        }
                    }
                    Event::FlushCheck => {}
                    Event::Reconnected(false) => {
                        inner.tracking.store(false, Ordering::Release);
                        inner.live.store(false, Ordering::Release);
                        sink.all();
                        let tracking = match inner.set_canary(&canary).await {
                            Ok(()) => {
                                inner
                                    .client
                                    .start_tracking(prefixes.clone(), true, false, false, true)
                                    .await
                            }
                            Err(e) => Err(e),
                        };
                        match tracking {
                            Ok(()) => {
                                // Reads sent before this point were not
                                // tracked: none of them may fill the cache.
                                sink.all();
                                inner.tracking.store(true, Ordering::Release);
                                inner.live.store(true, Ordering::Release);
                            }
                            Err(e) => {
                                tracing::warn!(error = %e, "Redis refused client tracking: the in-process cache stays off");
                            }
                        }
                    }
                    Event::Invalidated(Ok(inv)) => {
                        // No keys: the database was flushed.
                        if inv.keys.is_empty() {
                            sink.all();
                        }
                        for k in &inv.keys {
                            sink.key(k.as_bytes());
                        }
                    }
                    Event::Invalidated(Err(RecvError::Lagged(_))) => sink.all(),
                }
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

    async fn set_canary(&self, canary: &str) -> Result<(), fred::error::Error> {
        use fred::interfaces::KeysInterface as _;
        self.client.set(canary, 1, None, None, false).await
    }

    /// Checks the canary within the deadline; when it is gone (a flush),
    /// sets it again.
    async fn canary(&self, canary: &str) -> Canary {
        use fred::interfaces::KeysInterface as _;
        let deadline = self.handle.deadline();
        match tokio::time::timeout(deadline, self.client.exists::<i64, _>(canary)).await {
            Ok(Ok(0)) => {
                let _ = tokio::time::timeout(deadline, self.set_canary(canary)).await;
                Canary::Missing
            }
            Ok(Ok(_)) => Canary::Present,
            _ => Canary::NoAnswer,
        }
    }
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
    /// `true`: the channel closed (the client is gone).
    Reconnected(bool),
    Error(bool),
    Invalidated(Result<fred::types::client::Invalidation, RecvError>),
}
