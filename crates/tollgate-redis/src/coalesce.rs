//! Coalescing: concurrent operations of one kind go to Redis as one round
//! trip, each caller getting its own answer.
//!
//! One drainer task per [`Coalescer`] takes everything queued, without
//! waiting for the batch to grow, and sends it as one call (a script over
//! many keys, or a pipeline). While that call is in flight new operations
//! queue up and form the next batch, so batches grow with load and a lone
//! request pays no added wait. On a cluster the batch is split by hash slot
//! and the groups run concurrently. Measured on 2 cores: one drainer beats
//! several, and waiting to grow batches only adds latency.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use fred::clients::Client;
use fred::interfaces::LuaInterface;
use fred::types::{FromValue, MultipleKeys, MultipleValues};
use futures::future::join_all;
use tokio::sync::{mpsc, oneshot};

use crate::error::{Error, is_outage_error};
use crate::handle::RedisHandle;
use crate::script::{Script, is_noscript};

/// One kind of batchable operation.
pub trait BatchOp: Send + Sync + 'static {
    /// What a caller submits.
    type Item: Send + 'static;
    /// What a caller gets back.
    type Output: Send + 'static;

    /// The cluster hash slot the item's keys live in (see
    /// [`slot`](crate::slot)). Items are grouped by it on a cluster;
    /// ignored on a standalone server.
    fn slot(&self, item: &Self::Item) -> u16;

    /// Runs the batch in one round trip and returns one output per item, in
    /// order. The coalescer applies the deadline and the breaker.
    fn execute(
        &self,
        conn: BatchConn<'_>,
        items: Vec<Self::Item>,
    ) -> impl Future<Output = Result<Vec<Self::Output>, Error>> + Send;
}

/// What [`BatchOp::execute`] runs its round trip on.
#[derive(Clone, Copy)]
pub struct BatchConn<'a> {
    client: &'a Client,
    reloaded: &'a AtomicU64,
}

impl<'a> BatchConn<'a> {
    pub(crate) fn new(client: &'a Client, reloaded: &'a AtomicU64) -> Self {
        BatchConn { client, reloaded }
    }

    /// The fred client (build a pipeline on it for multi-command batches).
    pub fn client(&self) -> &'a Client {
        self.client
    }

    /// EVALSHA, with EVAL on `NOSCRIPT`.
    pub async fn eval<R, K, V>(&self, script: &Script, keys: K, args: V) -> Result<R, Error>
    where
        R: FromValue,
        K: Into<MultipleKeys>,
        V: TryInto<MultipleValues>,
        V::Error: Into<fred::error::Error>,
    {
        let keys: MultipleKeys = keys.into();
        let fail = |source| Error::Script {
            name: script.name(),
            source,
        };
        let args: MultipleValues = args.try_into().map_err(|e| fail(e.into()))?;
        match self
            .client
            .evalsha::<R, _, _, _>(script.sha1(), keys.clone(), args.clone())
            .await
        {
            Ok(v) => Ok(v),
            Err(e) if is_noscript(&e) => {
                self.reloaded.fetch_add(1, Ordering::Relaxed);
                self.client
                    .eval(script.body(), keys, args)
                    .await
                    .map_err(fail)
            }
            Err(e) if is_outage_error(&e) => Err(Error::Redis(e)),
            Err(e) => Err(fail(e)),
        }
    }
}

/// Coalesced `GET`s: the keys of concurrent callers go out as one `MGET`
/// per round trip (grouped by slot on a cluster, so no `MGET` spans two
/// slots). Values come back as raw bytes.
///
/// A key asked for by several callers of one batch (a hot cache entry) is
/// sent once, and its value is shared by all of them: Redis copies it and
/// fred reads it once per batch, not once per caller.
///
/// ```no_run
/// # async fn f(handle: tollgate_redis::RedisHandle) -> Result<(), tollgate_redis::Error> {
/// use tollgate_redis::{CoalesceConfig, Coalescer, GetOp};
/// let gets = Coalescer::new(handle, GetOp, CoalesceConfig::default());
/// let value = gets.submit("app:cache:{k}:e".to_owned()).await?;
/// # let _ = value; Ok(()) }
/// ```
#[derive(Clone, Copy, Debug, Default)]
pub struct GetOp;

impl BatchOp for GetOp {
    type Item = String;
    type Output = Option<bytes::Bytes>;

    fn slot(&self, key: &String) -> u16 {
        crate::slot(key)
    }

    async fn execute(
        &self,
        conn: BatchConn<'_>,
        keys: Vec<String>,
    ) -> Result<Vec<Option<bytes::Bytes>>, Error> {
        use fred::interfaces::KeysInterface as _;
        use fred::types::Value;
        let (keys, positions) = distinct(keys);
        let n = keys.len();
        let values: Vec<Value> = conn.client().mget(keys).await.map_err(Error::Redis)?;
        if values.len() != n {
            return Err(Error::Protocol(
                format!("MGET of {n} keys answered {} values", values.len()).into(),
            ));
        }
        let values = values.into_iter().map(|v| match v {
            Value::Null => None,
            v => v.into_bytes(),
        });
        Ok(match positions {
            None => values.collect(),
            Some(positions) => {
                let values: Vec<_> = values.collect();
                positions.into_iter().map(|i| values[i].clone()).collect()
            }
        })
    }
}

/// `keys` without repeats, in order of first appearance, and for each of
/// the original keys its place in that list (`None` when nothing repeats:
/// the list is `keys` itself).
fn distinct(keys: Vec<String>) -> (Vec<String>, Option<Vec<usize>>) {
    if keys.len() < 2 {
        return (keys, None);
    }
    let mut first: crate::local::RequestMap<&str, usize> =
        crate::local::RequestMap::with_capacity_and_hasher(keys.len(), Default::default());
    let mut positions = Vec::with_capacity(keys.len());
    let mut keep = Vec::with_capacity(keys.len());
    for (i, k) in keys.iter().enumerate() {
        let next = first.len();
        let at = *first.entry(k.as_str()).or_insert(next);
        if at == next {
            keep.push(i);
        }
        positions.push(at);
    }
    if keep.len() == keys.len() {
        return (keys, None);
    }
    drop(first);
    let mut keep = keep.into_iter().peekable();
    let unique = keys
        .into_iter()
        .enumerate()
        .filter_map(|(i, k)| {
            keep.next_if_eq(&i)?;
            Some(k)
        })
        .collect();
    (unique, Some(positions))
}

struct Pending<T, O> {
    item: T,
    tx: oneshot::Sender<Result<O, Error>>,
    /// When the caller submitted it: its answer is due a deadline later.
    since: Instant,
}

/// Tuning of a [`Coalescer`].
#[derive(Clone, Copy, Debug)]
pub struct CoalesceConfig {
    /// Most items in one round trip (default 256).
    pub max_batch: usize,
    /// Most items waiting; beyond it callers get [`Error::Overloaded`]
    /// (default 65,536).
    pub queue: usize,
}

impl Default for CoalesceConfig {
    fn default() -> Self {
        CoalesceConfig {
            max_batch: 256,
            queue: 65_536,
        }
    }
}

/// Batches concurrent [`BatchOp`] items into single round trips. Cheap to
/// clone; the drainer task stops when the last clone is dropped.
pub struct Coalescer<B: BatchOp> {
    tx: mpsc::Sender<Pending<B::Item, B::Output>>,
    handle: RedisHandle,
}

impl<B: BatchOp> Clone for Coalescer<B> {
    fn clone(&self) -> Self {
        Coalescer {
            tx: self.tx.clone(),
            handle: self.handle.clone(),
        }
    }
}

impl<B: BatchOp> std::fmt::Debug for Coalescer<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Coalescer")
            .field("queued", &(self.tx.max_capacity() - self.tx.capacity()))
            .finish()
    }
}

impl<B: BatchOp> Coalescer<B> {
    /// Starts the drainer for `op` on `handle` (needs a Tokio runtime).
    pub fn new(handle: RedisHandle, op: B, config: CoalesceConfig) -> Self {
        Self::start(handle, None, op, config)
    }

    /// A coalescer whose round trips all go through `client` (say, a
    /// [`TrackedConnection`](crate::TrackedConnection)'s) rather than the
    /// pool, still under `handle`'s deadline and breaker.
    pub fn on_client(handle: RedisHandle, client: Client, op: B, config: CoalesceConfig) -> Self {
        Self::start(handle, Some(client), op, config)
    }

    fn start(handle: RedisHandle, client: Option<Client>, op: B, config: CoalesceConfig) -> Self {
        let (tx, rx) = mpsc::channel(config.queue.max(1));
        tokio::spawn(drain(
            Target {
                handle: handle.clone(),
                client,
            },
            Arc::new(op),
            rx,
            config.max_batch.max(1),
        ));
        Coalescer { tx, handle }
    }

    /// Submits one item and waits for its own answer, at most the handle's
    /// deadline. Refused at once while the breaker is open.
    ///
    /// The deadline is kept by the drainer, not by a timer per caller: an
    /// item still queued when its deadline passes is answered
    /// [`Error::Timeout`] without being run, and a batch is cut off when
    /// its oldest item's deadline comes. One timer per batch instead of one
    /// per request.
    pub async fn submit(&self, item: B::Item) -> Result<B::Output, Error> {
        if !self.handle.is_available() {
            return Err(Error::Unavailable);
        }
        let (tx, rx) = oneshot::channel();
        self.tx
            .try_send(Pending {
                item,
                tx,
                since: Instant::now(),
            })
            .map_err(|e| match e {
                mpsc::error::TrySendError::Full(_) => Error::Overloaded,
                mpsc::error::TrySendError::Closed(_) => Error::Unavailable,
            })?;
        // The drainer answers every item it takes, by its deadline; a
        // dropped sender means the drainer is gone.
        rx.await.unwrap_or(Err(Error::Unavailable))
    }
}

/// Where a drainer sends its batches.
struct Target {
    handle: RedisHandle,
    /// A client of its own; the pool's otherwise.
    client: Option<Client>,
}

impl Target {
    fn client(&self) -> &Client {
        self.client.as_ref().unwrap_or_else(|| self.handle.client())
    }
}

async fn drain<B: BatchOp>(
    target: Target,
    op: Arc<B>,
    mut rx: mpsc::Receiver<Pending<B::Item, B::Output>>,
    max_batch: usize,
) {
    let handle = &target.handle;
    let mut batch = Vec::with_capacity(max_batch);
    while rx.recv_many(&mut batch, max_batch).await > 0 {
        // A caller that went away (its request dropped) needs no answer.
        batch.retain(|p: &Pending<_, _>| !p.tx.is_closed());
        // One whose deadline passed while it queued (behind a slow batch)
        // is answered now and not run: it goes on with its fallback, and
        // running it late would, say, spend tokens twice.
        let deadline = handle.deadline();
        let now = Instant::now();
        for p in batch.extract_if(.., |p| now.saturating_duration_since(p.since) >= deadline) {
            let _ = p.tx.send(Err(Error::Timeout(deadline)));
        }
        if batch.is_empty() {
            continue;
        }
        if !handle.is_available() {
            for p in batch.drain(..) {
                let _ = p.tx.send(Err(Error::Unavailable));
            }
            continue;
        }
        if handle.is_cluster() {
            let mut groups: Vec<(u16, Vec<Pending<_, _>>)> = Vec::new();
            for p in batch.drain(..) {
                let slot = op.slot(&p.item);
                match groups.iter_mut().find(|(s, _)| *s == slot) {
                    Some((_, g)) => g.push(p),
                    None => groups.push((slot, vec![p])),
                }
            }
            join_all(
                groups
                    .into_iter()
                    .map(|(_, g)| run_group(&target, op.as_ref(), g.into_iter(), deadline)),
            )
            .await;
        } else {
            // Drained in place: the batch buffer is reused, not reallocated.
            run_group(&target, op.as_ref(), batch.drain(..), deadline).await;
        }
    }
}

/// Runs one group in one round trip and answers its callers, each by its
/// deadline: the group is cut off when its oldest item is due.
async fn run_group<B: BatchOp>(
    target: &Target,
    op: &B,
    group: impl ExactSizeIterator<Item = Pending<B::Item, B::Output>>,
    deadline: Duration,
) {
    let mut items = Vec::with_capacity(group.len());
    let mut txs = Vec::with_capacity(group.len());
    let mut oldest: Option<Instant> = None;
    for p in group {
        oldest = Some(oldest.map_or(p.since, |o| o.min(p.since)));
        items.push(p.item);
        txs.push(p.tx);
    }
    // When the oldest caller's answer is due.
    let due = oldest.unwrap_or_else(Instant::now) + deadline;
    let handle = &target.handle;
    let conn = BatchConn::new(target.client(), handle.reload_counter());
    let n = txs.len();
    // The handle's own deadline still bounds the round trip and feeds the
    // breaker; `due` only decides when the callers stop waiting.
    let run = handle.run(op.execute(conn, items));
    tokio::pin!(run);
    let result = tokio::select! {
        biased;
        r = &mut run => r,
        () = tokio::time::sleep_until(due.into()) => {
            for tx in txs {
                let _ = tx.send(Err(Error::Timeout(deadline)));
            }
            // Its outcome still counts for the breaker.
            let _ = run.await;
            return;
        }
    };
    match result {
        Ok(outs) if outs.len() == n => {
            for (tx, out) in txs.into_iter().zip(outs) {
                let _ = tx.send(Ok(out));
            }
        }
        Ok(outs) => {
            let e = Error::Protocol(format!("batch of {n} returned {} answers", outs.len()).into());
            for tx in txs {
                let _ = tx.send(Err(e.clone()));
            }
        }
        Err(e) => {
            for tx in txs {
                let _ = tx.send(Err(e.clone()));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::distinct;

    fn keys(k: &[&str]) -> Vec<String> {
        k.iter().map(|s| (*s).to_owned()).collect()
    }

    #[test]
    fn repeated_keys_are_asked_for_once() {
        let (unique, positions) = distinct(keys(&["a", "b", "a", "c", "b", "a"]));
        assert_eq!(unique, keys(&["a", "b", "c"]));
        assert_eq!(positions, Some(vec![0, 1, 0, 2, 1, 0]));
    }

    #[test]
    fn distinct_keys_are_kept_as_they_are() {
        assert_eq!(
            distinct(keys(&["a", "b", "c"])),
            (keys(&["a", "b", "c"]), None)
        );
        assert_eq!(distinct(keys(&["a"])), (keys(&["a"]), None));
        assert_eq!(distinct(Vec::new()), (Vec::new(), None));
    }

    #[test]
    fn one_hot_key() {
        let (unique, positions) = distinct(keys(&["hot"; 64]));
        assert_eq!(unique, keys(&["hot"]));
        assert_eq!(positions, Some(vec![0; 64]));
    }
}
