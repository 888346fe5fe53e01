//! A pub/sub subscription to one channel, for state that every instance
//! sharing a Redis must drop together (a cache's in-process copies, a rate
//! limiter's remembered denials).
//!
//! Subscribing puts a connection in pub/sub mode, where it can send
//! nothing but (un)subscriptions, so the subscription has a connection of
//! its own: a client built from the handle's settings (URL, TLS,
//! credentials, timeouts, reconnect policy). Messages are published
//! through the handle's pool ([`Subscription::publish`]).
//!
//! Pub/sub delivers at most once: what is published while the connection
//! is down, or while the listener lags behind, is lost. The owner hears of
//! that as [`Notice::Missed`] and drops whatever a lost message could have
//! been about. On Redis Cluster a message published at any primary reaches
//! subscribers at every primary.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use bytes::Bytes;
use fred::clients::Client;
use fred::interfaces::{ClientLike, EventInterface, PubsubInterface};
use tokio::sync::broadcast::error::RecvError;
use tokio::task::JoinHandle;

use crate::error::Error;
use crate::handle::RedisHandle;

/// How long the listener waits before subscribing again after Redis
/// refused or did not answer a subscription.
const RESUBSCRIBE_AFTER: Duration = Duration::from_secs(1);

/// What a [`Subscription`] hands its handler.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Notice<'a> {
    /// A message published on the channel (its payload).
    Message(&'a [u8]),
    /// Messages may have been missed: the connection was established
    /// again (the first connection is announced this way too), the
    /// subscription was renewed after a failure, or the listener fell
    /// behind and messages were dropped. Whatever a lost message could
    /// have been about should be forgotten.
    Missed,
}

/// A subscription to one Redis pub/sub channel on a connection of its own,
/// handing every message, and every moment messages may have been lost,
/// to a handler.
///
/// The connection is opened in the background. After every reconnection
/// the listener subscribes again and then calls the handler with
/// [`Notice::Missed`]; a subscription Redis refuses is tried again every
/// second. The handler runs on the listener's task, one notice at a time:
/// keep it short and never block in it.
///
/// Dropping the subscription stops the listener and closes the
/// connection, so an owner that keeps its subscription stops listening
/// when it is dropped. A handler must not keep its owner alive (capture a
/// [`Weak`](std::sync::Weak) of it, or the state it updates, not the
/// owner itself): the owner would never be dropped.
///
/// ```no_run
/// use std::sync::Arc;
/// use std::sync::atomic::{AtomicU64, Ordering};
/// use tollgate_redis::{Notice, RedisHandle, Subscription};
///
/// # async fn demo(handle: RedisHandle) -> Result<(), tollgate_redis::Error> {
/// let seen = Arc::new(AtomicU64::new(0));
/// let counter = seen.clone();
/// let channel = handle.keys("demo").key(&["events"]);
/// let sub = Subscription::start(&handle, channel, move |notice| {
///     if let Notice::Message(_) = notice {
///         counter.fetch_add(1, Ordering::Relaxed);
///     }
/// })?;
/// sub.publish("hello").await?;
/// # Ok(()) }
/// ```
pub struct Subscription {
    handle: RedisHandle,
    channel: String,
    client: Client,
    listening: Arc<AtomicBool>,
    task: JoinHandle<()>,
    /// Reconnects to a primary a Sentinel switched to.
    _follow: crate::FollowPrimary,
}

impl std::fmt::Debug for Subscription {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Subscription")
            .field("channel", &self.channel)
            .field("listening", &self.is_listening())
            .finish_non_exhaustive()
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        self.task.abort();
        crate::quit_in_background(&self.client);
    }
}

impl Subscription {
    /// Subscribes to `channel` on a new connection built from `handle`'s
    /// settings and starts the listener, which calls `handler` with every
    /// [`Notice`]. Returns at once: the connection is opened in the
    /// background (see [`is_listening`](Self::is_listening)).
    ///
    /// Fails only when a client cannot be built from the handle's
    /// settings.
    ///
    /// # Panics
    ///
    /// Outside a Tokio runtime.
    pub fn start<F>(
        handle: &RedisHandle,
        channel: impl Into<String>,
        handler: F,
    ) -> Result<Self, Error>
    where
        F: FnMut(Notice<'_>) + Send + 'static,
    {
        let channel = channel.into();
        let client = handle.dedicated_client(false)?;
        let listening = Arc::new(AtomicBool::new(false));
        let task = tokio::spawn(listen(
            client.clone(),
            channel.clone(),
            listening.clone(),
            handler,
        ));
        Ok(Subscription {
            _follow: handle.follow_primary(&client),
            handle: handle.clone(),
            channel,
            client,
            listening,
            task,
        })
    }

    /// The channel.
    pub fn channel(&self) -> &str {
        &self.channel
    }

    /// Whether Redis accepted the latest subscription: false until the
    /// connection is first up, and after Redis refused to subscribe again
    /// on a new connection (until a later attempt succeeds).
    pub fn is_listening(&self) -> bool {
        self.listening.load(Ordering::Acquire)
    }

    /// Publishes `message` on the channel, through the handle's pool under
    /// its deadline and breaker. Every subscriber hears it, this one
    /// included; a subscriber whose connection is down does not (it gets
    /// [`Notice::Missed`] when it is back).
    pub async fn publish(&self, message: impl Into<Bytes>) -> Result<(), Error> {
        let (channel, message) = (self.channel.clone(), message.into());
        self.handle
            .call(|c| async move { c.publish::<i64, _, _>(channel, message).await })
            .await
            .map(drop)
    }
}

/// The listener: connects, subscribes, and hands messages and losses to
/// the handler until the subscription is dropped.
async fn listen<F>(client: Client, channel: String, listening: Arc<AtomicBool>, mut handler: F)
where
    F: FnMut(Notice<'_>),
{
    // Taken before connecting: the first connection (to each primary, on
    // a cluster) is announced as a reconnection too.
    let mut messages = client.message_rx();
    let mut reconnects = client.reconnect_rx();
    let _connection = client.connect();
    while client.wait_for_connect().await.is_err() {
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let subscribe = || async {
        let ok = client.subscribe(channel.as_str()).await.is_ok();
        listening.store(ok, Ordering::Release);
        ok
    };
    subscribe().await;
    let mut retry = tokio::time::interval(RESUBSCRIBE_AFTER);
    retry.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            m = messages.recv() => match m {
                Ok(msg) => {
                    if *msg.channel == *channel {
                        handler(Notice::Message(msg.value.as_bytes().unwrap_or_default()));
                    }
                }
                Err(RecvError::Lagged(_)) => handler(Notice::Missed),
                Err(RecvError::Closed) => return,
            },
            r = reconnects.recv() => match r {
                // Subscribed first, then told: nothing published after the
                // handler ran can be lost.
                Ok(_) | Err(RecvError::Lagged(_)) => {
                    subscribe().await;
                    handler(Notice::Missed);
                }
                Err(RecvError::Closed) => return,
            },
            _ = retry.tick(), if !listening.load(Ordering::Acquire) => {
                if subscribe().await {
                    handler(Notice::Missed);
                }
            }
        }
    }
}
