//! The Redis store: one JSON string per session, written by Lua scripts.

use std::sync::{Arc, LazyLock, OnceLock, Weak};
use std::time::Duration;

use futures::future::join_all;
use tollgate_redis::fred::interfaces::{KeysInterface, SortedSetsInterface};
use tollgate_redis::fred::types::{Expiration, SetOptions, Value};
use tollgate_redis::{
    BatchConn, BatchOp, CoalesceConfig, Coalescer, GetOp, Invalidate, KeySpace, RedisHandle,
    Script, TrackedConnection,
};

use super::local::LocalCache;
use super::{Diff, NewRecord, Record, SaveOutcome, SessionInfo, SessionStore, Timeouts, millis};
use crate::error::Error;

static SAVE: LazyLock<Script> =
    LazyLock::new(|| Script::new("session_save", include_str!("save.lua")));
static SAVE_FAST: LazyLock<Script> =
    LazyLock::new(|| Script::new("session_save_fast", include_str!("save_fast.lua")));
static INDEX_ADD: LazyLock<Script> =
    LazyLock::new(|| Script::new("session_index_add", include_str!("index_add.lua")));
static INDEX_LIST: LazyLock<Script> =
    LazyLock::new(|| Script::new("session_index_list", include_str!("index_list.lua")));

/// Index scores are an upper bound of a session's expiry computed on
/// another node's (or the app's) clock: this much slack keeps a live
/// session from being trimmed out of its user's index (and so escaping
/// "revoke all") under clock skew.
const INDEX_SLACK_MS: u64 = 5 * 60 * 1000;

/// Sessions in Redis.
///
/// Keys: `{namespace}:session:{id_hash}` for a record (a JSON string with a
/// PX expiry of min(idle, absolute remaining)), and
/// `{namespace}:session:{user_hash}:user` for a user's index (a sorted set
/// of id hashes scored by expiry). On a cluster a user's index and their
/// records live in different slots, so index maintenance is its own
/// command, always sent *before* the record is bound (a session can never
/// be bound to a user without being in the index that "revoke all" reads).
///
/// Round trips: load 1 (a read inside the touch window writes nothing;
/// none when served from the optional in-process cache,
/// [`with_local_cache`](Self::with_local_cache)), save 1, create 1 (+1
/// when a user is bound), delete 1.
///
/// Redis does no JSON work on the common paths: a load is a plain `GET`
/// (the loads of concurrent requests go out as one `MGET`), the record is
/// decoded and its timeouts checked here, a create is `SET NX PX`, and a
/// save from a loaded record writes the merged record whole when nobody
/// saved since the load (a short script compares the generation). Only a
/// save that raced another one merges inside Redis, entry by entry. Both
/// timeouts are also enforced by Redis itself: every write sets the key's
/// expiry to min(idle, absolute expiry - now).
///
/// With the in-process cache, a save from a record the cache still holds
/// is a plain `SET XX GET` on the tracked connection instead of the
/// script (Redis 7.0 pushes a script's writes back even to the
/// connection that made them, which would empty the cache of every record
/// it saved). The record it replaced shows whether another save landed
/// between the check and the write; if one did, that save's changes are
/// merged back at once, entry by entry, and the save reports
/// [`SaveOutcome::Merged`].
#[derive(Clone, Debug)]
pub struct RedisStore {
    handle: RedisHandle,
    keys: KeySpace,
    timeouts: Timeouts,
    /// Coalesced loads, started on first use (inside the runtime).
    gets: Arc<OnceLock<Coalescer<GetOp>>>,
    /// Coalesced whole-record writes (saves and touches).
    writes: Arc<OnceLock<Coalescer<WriteOp>>>,
    /// The in-process cache, when enabled.
    cache: Option<Arc<Cached>>,
}

/// The in-process cache and the tracked connection that keeps it exact.
#[derive(Debug)]
struct Cached {
    local: Arc<LocalCache>,
    /// Started on first use (inside the runtime); `None` if it could not
    /// be built.
    tracked: OnceLock<Option<Tracked>>,
}

/// Loads and writes whose records may be cached: on the tracked
/// connection, so that Redis reports every later change to them.
#[derive(Debug)]
struct Tracked {
    conn: TrackedConnection,
    gets: Coalescer<GetOp>,
    puts: Coalescer<PutOp>,
}

/// What a whole-record write found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Whole {
    /// Written over the record it was made from.
    Written,
    /// The record is gone (or past its absolute expiry): nothing written.
    Gone,
    /// Another save came first: nothing written (the caller merges).
    Raced,
    /// Written over another save that came first, whose changes were then
    /// merged back.
    Repaired,
}

/// One plain whole-record write on the tracked connection: `SET key json
/// XX GET PX ttl`.
#[derive(Debug)]
struct Put {
    key: String,
    json: String,
    ttl: i64,
}

/// Concurrent plain writes, sent together in one round trip (a command
/// each: Redis has no multi-key conditional `SET`). A plain command, unlike a
/// script, is one Redis does not push back to the connection that made it
/// (in Redis 7.0 `NOLOOP` does not cover script writes), so what it
/// wrote stays cached. Each answers the record it replaced (`None`: there
/// was none, and nothing was written).
#[derive(Debug)]
struct PutOp;

impl BatchOp for PutOp {
    type Item = Put;
    type Output = Option<bytes::Bytes>;

    fn slot(&self, p: &Put) -> u16 {
        tollgate_redis::slot(&p.key)
    }

    async fn execute(
        &self,
        conn: BatchConn<'_>,
        puts: Vec<Put>,
    ) -> Result<Vec<Option<bytes::Bytes>>, tollgate_redis::Error> {
        // Queued together rather than as a fred pipeline: the client
        // flushes a pipeline's commands one by one (a write each), while
        // commands queued at once go out in one write.
        let client = conn.client();
        let sets = puts.into_iter().map(|p| {
            client.set::<Value, _, _>(
                p.key,
                p.json,
                Some(Expiration::PX(p.ttl)),
                Some(SetOptions::XX),
                true,
            )
        });
        join_all(sets)
            .await
            .into_iter()
            .map(|v| {
                Ok(match v? {
                    Value::Null => None,
                    v => v.into_bytes(),
                })
            })
            .collect()
    }
}

/// The top-level generation of a stored record, read without decoding
/// it: the first `"generation":<digits>`, as `save_fast.lua` reads it
/// (entry values are JSON strings, their quotes escaped, so no entry can
/// spell that sequence; an entry *named* `generation` is followed by a
/// quote).
fn generation_of(raw: &[u8]) -> Option<u64> {
    const FIELD: &[u8] = b"\"generation\":";
    let mut rest = raw;
    loop {
        let at = rest.windows(FIELD.len()).position(|w| w == FIELD)? + FIELD.len();
        rest = &rest[at..];
        let digits = rest.iter().take_while(|b| b.is_ascii_digit()).count();
        if digits > 0 {
            return std::str::from_utf8(&rest[..digits]).ok()?.parse().ok();
        }
    }
}

/// A generation for a record written plainly: random, so that two saves
/// made from the same record never write the same one, and below 2^46, so
/// that Redis's Lua (whose JSON encoder prints 14 digits) keeps it exact.
fn fresh_generation(loaded: u64) -> u64 {
    loop {
        let g = rand::random_range(2..1u64 << 46);
        if g != loaded {
            return g;
        }
    }
}

/// What a plain write of `written` (made by applying `diff` to the record
/// it loaded) took away from `replaced`, the record another save had
/// written meanwhile: that save's changes to the entries `diff` did not
/// touch, and its binding when `diff` did not bind. Merging it back gives
/// what the scripted path gives (the later save wins on the entries both
/// wrote).
fn lost_changes(written: &Record, replaced: &Record, diff: &Diff) -> Diff {
    let mut lost = Diff::default();
    if !diff.clear {
        let touched = |k: &str| diff.set.contains_key(k) || diff.remove.contains(k);
        for (k, v) in &replaced.data {
            if !touched(k) && written.data.get(k) != Some(v) {
                lost.set.insert(k.clone(), v.clone());
            }
        }
        for k in written.data.keys() {
            if !touched(k) && !replaced.data.contains_key(k) {
                lost.remove.insert(k.clone());
            }
        }
    }
    if diff.user.is_none() && replaced.user != written.user {
        lost.user = Some(replaced.user.clone());
    }
    lost
}

/// One whole-record write: key, loaded generation, record JSON, TTL (ms).
#[derive(Debug)]
struct Write {
    key: String,
    loaded: u64,
    json: String,
    ttl: i64,
}

/// Concurrent whole-record writes in one script call (per slot on a
/// cluster).
#[derive(Debug)]
struct WriteOp;

impl BatchOp for WriteOp {
    type Item = Write;
    type Output = i64;

    fn slot(&self, w: &Write) -> u16 {
        tollgate_redis::slot(&w.key)
    }

    async fn execute(
        &self,
        conn: BatchConn<'_>,
        writes: Vec<Write>,
    ) -> Result<Vec<i64>, tollgate_redis::Error> {
        let mut keys = Vec::with_capacity(writes.len());
        let mut args = Vec::with_capacity(writes.len() * 3);
        for w in writes {
            keys.push(w.key);
            args.extend([w.loaded.to_string(), w.json, w.ttl.to_string()]);
        }
        conn.eval(&SAVE_FAST, keys, args).await
    }
}

impl RedisStore {
    /// A store on `handle` enforcing `timeouts`.
    pub fn new(handle: RedisHandle, timeouts: Timeouts) -> Self {
        RedisStore {
            keys: handle.keys("session"),
            handle,
            timeouts,
            gets: Arc::new(OnceLock::new()),
            writes: Arc::new(OnceLock::new()),
            cache: None,
        }
    }

    /// Keeps up to about `capacity` records in process, each served for
    /// at most `max_age`, kept exact by Redis's client tracking on a
    /// connection of their own: a record changed or deleted anywhere is
    /// dropped here when Redis says so, normally well under a millisecond
    /// later. A load served from it costs no round trip. On Redis
    /// Cluster every primary is tracked. Off while the breaker is open,
    /// while that connection (any primary's, on a cluster) is down, and
    /// while Redis refuses `CLIENT TRACKING` (an ACL without it).
    ///
    /// The connection opens at once when called inside a Tokio runtime,
    /// else on first use.
    pub fn with_local_cache(mut self, capacity: usize, max_age: Duration) -> Self {
        self.cache = Some(Arc::new(Cached {
            local: Arc::new(LocalCache::new(capacity, max_age)),
            tracked: OnceLock::new(),
        }));
        if tokio::runtime::Handle::try_current().is_ok() {
            let _ = self.tracked_started();
        }
        self
    }

    /// Whether loads are served from the in-process cache right now: it
    /// is enabled, its connection is up with tracking on, and the breaker
    /// is closed.
    pub fn local_cache_live(&self) -> bool {
        self.tracked().is_some()
    }

    /// The tracked path, when the cache is enabled and live.
    fn tracked(&self) -> Option<(&Tracked, &LocalCache)> {
        let (tracked, local) = self.tracked_started()?;
        tracked.conn.is_live().then_some((tracked, local))
    }

    /// The tracked path, started on first use, live or not.
    fn tracked_started(&self) -> Option<(&Tracked, &LocalCache)> {
        let cached = self.cache.as_deref()?;
        let tracked = cached
            .tracked
            .get_or_init(|| {
                let sink: Weak<dyn Invalidate> = {
                    let strong: Arc<dyn Invalidate> = cached.local.clone();
                    Arc::downgrade(&strong)
                };
                let prefix = format!("{}:{{", self.keys.prefix());
                match TrackedConnection::start(&self.handle, vec![prefix], sink) {
                    Ok(conn) => {
                        let client = conn.client().clone();
                        Some(Tracked {
                            gets: Coalescer::on_client(
                                self.handle.clone(),
                                client.clone(),
                                GetOp,
                                CoalesceConfig::default(),
                            ),
                            puts: Coalescer::on_client(
                                self.handle.clone(),
                                client,
                                PutOp,
                                CoalesceConfig::default(),
                            ),
                            conn,
                        })
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "session cache off: no tracked connection");
                        None
                    }
                }
            })
            .as_ref()?;
        Some((tracked, &*cached.local))
    }

    /// Drops the cached copy of `id_hash`'s record (after a write that did
    /// not go through the tracked path).
    fn forget(&self, id_hash: &str) {
        if let Some(c) = &self.cache {
            c.local.forget(&self.record_key(id_hash));
        }
    }

    /// The shared handle.
    pub fn handle(&self) -> &RedisHandle {
        &self.handle
    }

    /// The Redis key of a session record.
    pub fn record_key(&self, id_hash: &str) -> String {
        self.keys.tagged(id_hash, &[])
    }

    /// The Redis key of a user's index.
    pub fn index_key(&self, user_hash: &str) -> String {
        self.keys.tagged(user_hash, &["user"])
    }

    async fn index_add(
        &self,
        user_hash: &str,
        id_hash: &str,
        expires_at: u64,
    ) -> Result<(), Error> {
        let score = expires_at.saturating_add(INDEX_SLACK_MS);
        let _: i64 = self
            .handle
            .eval(
                &INDEX_ADD,
                vec![self.index_key(user_hash)],
                vec![id_hash.to_owned(), score.to_string()],
            )
            .await?;
        Ok(())
    }

    async fn index_members(&self, user_hash: &str) -> Result<Vec<String>, Error> {
        Ok(self
            .handle
            .eval(
                &INDEX_LIST,
                vec![self.index_key(user_hash)],
                Vec::<String>::new(),
            )
            .await?)
    }

    /// How long a record written at `now` may live in Redis: the smaller
    /// of the idle timeout and what is left of its absolute lifetime;
    /// `None` when that is nothing.
    fn ttl_of(&self, r: &Record, now: u64) -> Option<i64> {
        let ttl = millis(self.timeouts.idle).min(r.expires_at.saturating_sub(now));
        (ttl > 0).then(|| i64::try_from(ttl).unwrap_or(i64::MAX))
    }

    /// Writes `record` (made from the record loaded at `loaded` by
    /// applying `diff`) whole, unless the record is gone. With `bump` it
    /// gets a new generation (a save); without, it keeps `loaded` (a
    /// touch, which changes no entry).
    ///
    /// When the in-process cache still holds the loaded record (no change
    /// heard of since the load), the write is a plain `SET XX GET` on the
    /// tracked connection and what it wrote stays cached (moved in: the
    /// caller is done with `record`). The record it replaced tells whether
    /// another save landed in between (in the moment between the check
    /// and the write): if one did, its changes are merged back at once,
    /// entry by entry. Otherwise a short script writes only if nobody
    /// saved since the load.
    async fn write_whole(
        &self,
        id_hash: &str,
        mut record: Record,
        loaded: u64,
        bump: bool,
        diff: &Diff,
        now: u64,
    ) -> Result<Whole, Error> {
        let Some(ttl) = self.ttl_of(&record, now) else {
            return Ok(Whole::Gone);
        };
        let key = self.record_key(id_hash);
        if let Some((tracked, local)) = self.tracked()
            && let Some(ticket) = local.begin_write(&key, loaded)
        {
            if bump {
                record.generation = fresh_generation(loaded);
            }
            let replaced = async {
                let json = serde_json::to_string(&record).map_err(Error::Corrupt)?;
                let put = Put {
                    key: key.clone(),
                    json,
                    ttl,
                };
                Ok::<_, Error>(tracked.puts.submit(put).await?)
            }
            .await;
            if let Ok(Some(raw)) = &replaced
                && generation_of(raw) == Some(loaded)
            {
                local.wrote(&key, ticket, Some(record));
                return Ok(Whole::Written);
            }
            // Gone, failed, or written over another save: nothing cached.
            local.forget(&key);
            return match replaced? {
                None => Ok(Whole::Gone),
                Some(raw) => Box::pin(self.merge_back(id_hash, &record, &raw, diff)).await,
            };
        }
        if bump {
            record.generation = loaded + 1;
        }
        let json = serde_json::to_string(&record).map_err(Error::Corrupt)?;
        let writes = self.writes.get_or_init(|| {
            Coalescer::new(self.handle.clone(), WriteOp, CoalesceConfig::default())
        });
        let written = writes
            .submit(Write {
                key,
                loaded,
                json,
                ttl,
            })
            .await;
        // Any cached copy is behind now (and a read in flight whose reply
        // may predate the write must not fill).
        self.forget(id_hash);
        Ok(match written? {
            0 => Whole::Gone,
            1 => Whole::Written,
            _ => Whole::Raced,
        })
    }

    /// After a plain write of `written` replaced `replaced`, a record
    /// another save wrote after this request loaded: merges that save's
    /// changes back, entry by entry (never recreating a record deleted in
    /// the meantime).
    async fn merge_back(
        &self,
        id_hash: &str,
        written: &Record,
        replaced: &[u8],
        diff: &Diff,
    ) -> Result<Whole, Error> {
        let replaced = match parse(replaced) {
            Ok(r) => r,
            Err(e) => {
                // Nothing readable to merge back: what was written stands.
                tracing::warn!(error = %e, "session save replaced an unreadable record");
                return Ok(Whole::Written);
            }
        };
        let lost = lost_changes(written, &replaced, diff);
        if !lost.is_empty() {
            self.save(id_hash, None, &lost, written.generation).await?;
        }
        Ok(Whole::Repaired)
    }

    async fn get(&self, id_hash: &str) -> Result<Option<Record>, Error> {
        let key = self.record_key(id_hash);
        let raw: Option<String> = self
            .handle
            .call(|c| async move { c.get(key).await })
            .await?;
        raw.as_deref().map(Record::from_json).transpose()
    }

    /// Members of the user's index whose records still belong to the user.
    async fn user_records(
        &self,
        user_hash: &str,
        user_id: &str,
    ) -> Result<Vec<(String, Record)>, Error> {
        let members = self.index_members(user_hash).await?;
        let records = join_all(members.iter().map(|m| self.get(m))).await;
        let mut live = Vec::new();
        let mut stale = Vec::new();
        for (m, r) in members.into_iter().zip(records) {
            match r? {
                Some(r) if r.user.as_deref() == Some(user_id) => live.push((m, r)),
                // Bound to nobody yet (a login in flight adds the index
                // entry first) or to someone else: left to expire.
                Some(_) => {}
                None => stale.push(m),
            }
        }
        if !stale.is_empty() {
            let key = self.index_key(user_hash);
            let _: i64 = self
                .handle
                .call(|c| async move { c.zrem(key, stale).await })
                .await?;
        }
        Ok(live)
    }
}

/// Counts a load the in-process cache answered (`hit`) or sent to Redis
/// (`miss`), while the cache is live.
fn cache_counter(result: &'static str) {
    tollgate_redis::counters::increment(
        "tollgate_session_local_cache_total",
        [None, None],
        [Some(("result", result)), None],
    );
}

/// A stored record from its raw bytes.
fn parse(raw: &[u8]) -> Result<Record, Error> {
    let raw = std::str::from_utf8(raw).map_err(|e| Error::Corrupt(serde::de::Error::custom(e)))?;
    Record::from_json(raw)
}

impl SessionStore for RedisStore {
    async fn create(
        &self,
        id_hash: &str,
        user_hash: Option<&str>,
        new: &NewRecord,
    ) -> Result<bool, Error> {
        if let Some(u) = user_hash {
            let expires = new
                .expires_at
                .unwrap_or_else(|| super::now_ms().saturating_add(millis(self.timeouts.absolute)));
            self.index_add(u, id_hash, expires).await?;
        }
        let now = super::now_ms();
        let record = new.record_at(now, self.timeouts.absolute);
        let Some(ttl) = self.ttl_of(&record, now) else {
            // A rotation whose absolute expiry has passed: nothing written.
            return Ok(false);
        };
        let json = serde_json::to_string(&record).map_err(Error::Corrupt)?;
        let key = self.record_key(id_hash);
        let set: Option<String> = self
            .handle
            .call(|c| async move {
                c.set(
                    key,
                    json,
                    Some(Expiration::PX(ttl)),
                    Some(SetOptions::NX),
                    false,
                )
                .await
            })
            .await?;
        self.forget(id_hash);
        Ok(set.is_some())
    }

    async fn load(&self, id_hash: &str) -> Result<Option<Record>, Error> {
        let key = self.record_key(id_hash);
        let tracked = self.tracked();
        let hit = tracked.and_then(|(_, local)| local.get(&key));
        let (mut record, fill) = match hit {
            Some(r) => {
                cache_counter("hit");
                (r, None)
            }
            None => {
                // On the tracked path the key is marked before the read is
                // sent, for its reply to fill. (A read that fails leaves
                // its mark: nothing is served for the key until the next
                // read replaces it.)
                let fill = tracked.map(|(_, local)| {
                    cache_counter("miss");
                    (local, local.begin(&key), key.clone())
                });
                let gets = match tracked {
                    Some((t, _)) => &t.gets,
                    None => self.gets.get_or_init(|| {
                        Coalescer::new(self.handle.clone(), GetOp, CoalesceConfig::default())
                    }),
                };
                let Some(raw) = gets.submit(key).await? else {
                    return Ok(None);
                };
                (parse(&raw)?, fill)
            }
        };
        let now = super::now_ms();
        if record.is_expired(now, self.timeouts.idle) {
            // Redis's own expiry would drop it soon; drop it now. (Boxed,
            // as is the touch below: rare steps kept out of the size of
            // every load's future, which callers move and box.)
            Box::pin(self.delete(id_hash)).await?;
            return Ok(None);
        }
        if let Some((local, ticket, key)) = fill {
            local.fill(&key, ticket, record.clone());
        }
        if now.saturating_sub(record.last_seen) >= millis(self.timeouts.touch_after) {
            let loaded = record.generation;
            record.last_seen = now;
            // A save that came first refreshed the record itself; a record
            // gone meanwhile stays gone. (The touch caches what it wrote.)
            let none = Diff::default();
            let touch = self.write_whole(id_hash, record.clone(), loaded, false, &none, now);
            if Box::pin(touch).await? == Whole::Gone {
                return Ok(None);
            }
        }
        Ok(Some(record))
    }

    async fn save(
        &self,
        id_hash: &str,
        user_hash: Option<&str>,
        diff: &Diff,
        generation: u64,
    ) -> Result<SaveOutcome, Error> {
        if let (Some(u), Some(Some(_))) = (user_hash, &diff.user) {
            // The record's expiry is not known here; the absolute timeout
            // from now bounds it.
            let expires = super::now_ms().saturating_add(millis(self.timeouts.absolute));
            self.index_add(u, id_hash, expires).await?;
        }
        let wire = serde_json::json!({
            "clear": diff.clear,
            "set": diff.set,
            "remove": diff.remove,
            "bind": diff.user.is_some(),
            "user": diff.user.clone().flatten(),
        });
        let reply: Vec<Value> = self
            .handle
            .eval(
                &SAVE,
                vec![self.record_key(id_hash)],
                vec![
                    millis(self.timeouts.idle).to_string(),
                    wire.to_string(),
                    generation.to_string(),
                ],
            )
            .await?;
        // Merged in Redis: the cached copy, if any, is behind.
        self.forget(id_hash);
        let status = reply.first().and_then(Value::as_i64).unwrap_or(0);
        Ok(match status {
            1 => SaveOutcome::Saved,
            2 => SaveOutcome::Merged,
            _ => SaveOutcome::Missing,
        })
    }

    async fn save_from(
        &self,
        id_hash: &str,
        user_hash: Option<&str>,
        diff: &Diff,
        mut base: Record,
    ) -> Result<SaveOutcome, Error> {
        // The rare steps (a login's index entry, the merge after a race)
        // are boxed: their fred futures would make every save's future
        // kilobytes larger, and callers move and box it.
        if let (Some(u), Some(Some(_))) = (user_hash, &diff.user) {
            Box::pin(self.index_add(u, id_hash, base.expires_at)).await?;
        }
        let loaded = base.generation;
        diff.apply(&mut base);
        let now = super::now_ms();
        base.last_seen = now;
        match self
            .write_whole(id_hash, base, loaded, true, diff, now)
            .await?
        {
            Whole::Gone => Ok(SaveOutcome::Missing),
            Whole::Written => Ok(SaveOutcome::Saved),
            Whole::Repaired => Ok(SaveOutcome::Merged),
            // Another save came first: merge entry by entry in Redis (the
            // index entry, if any, is already there).
            Whole::Raced => Box::pin(self.save(id_hash, None, diff, loaded)).await,
        }
    }

    async fn take(&self, id_hash: &str) -> Result<Option<Record>, Error> {
        let key = self.record_key(id_hash);
        let raw: Option<String> = self
            .handle
            .call(|c| async move { c.getdel(key).await })
            .await?;
        self.forget(id_hash);
        let record = raw.as_deref().map(Record::from_json).transpose()?;
        let now = super::now_ms();
        Ok(record.filter(|r| !r.is_expired(now, self.timeouts.idle)))
    }

    async fn delete(&self, id_hash: &str) -> Result<bool, Error> {
        let key = self.record_key(id_hash);
        let n: i64 = self
            .handle
            .call(|c| async move { c.del(key).await })
            .await?;
        self.forget(id_hash);
        Ok(n > 0)
    }

    async fn list_user(&self, user_hash: &str, user_id: &str) -> Result<Vec<SessionInfo>, Error> {
        let mut list: Vec<SessionInfo> = self
            .user_records(user_hash, user_id)
            .await?
            .into_iter()
            .map(|(h, r)| SessionInfo::of(h, &r))
            .collect();
        list.sort_by_key(|s| s.created_at);
        Ok(list)
    }

    async fn revoke_user(
        &self,
        user_hash: &str,
        user_id: &str,
        except: Option<&str>,
    ) -> Result<usize, Error> {
        let members: Vec<String> = self
            .index_members(user_hash)
            .await?
            .into_iter()
            .filter(|m| Some(m.as_str()) != except)
            .collect();
        if members.is_empty() {
            return Ok(0);
        }
        // Only the user's own records: a member re-bound to someone else
        // since is left alone.
        let records = join_all(members.iter().map(|m| self.get(m))).await;
        let mut mine = Vec::new();
        let mut gone = Vec::new();
        for (m, r) in members.into_iter().zip(records) {
            match r? {
                Some(r) if r.user.as_deref() == Some(user_id) => mine.push(m),
                // See `user_records`: left to expire.
                Some(_) => {}
                None => gone.push(m),
            }
        }
        let deleted = join_all(mine.iter().map(|m| self.delete(m))).await;
        let mut n = 0;
        for d in deleted {
            n += usize::from(d?);
        }
        gone.extend(mine);
        if !gone.is_empty() {
            let key = self.index_key(user_hash);
            let _: i64 = self
                .handle
                .call(|c| async move { c.zrem(key, gone).await })
                .await?;
        }
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(data: &[(&str, &str)], user: Option<&str>) -> Record {
        Record {
            v: super::super::RECORD_VERSION,
            generation: 5,
            created_at: 0,
            last_seen: 0,
            expires_at: u64::MAX,
            user: user.map(str::to_owned),
            user_agent: None,
            ip: None,
            data: data
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
        }
    }

    #[test]
    fn the_generation_is_read_from_the_top_level_only() {
        let mut r = record(&[("generation", "7"), ("x", r#""\"generation\":8""#)], None);
        r.generation = 1 << 45;
        let json = serde_json::to_string(&r).expect("serialises");
        assert_eq!(generation_of(json.as_bytes()), Some(1 << 45));
        // Written by Lua's encoder: another key order, same answer.
        let lua = r#"{"data":{"generation":"7"},"v":1,"generation":12,"user":null}"#;
        assert_eq!(generation_of(lua.as_bytes()), Some(12));
        assert_eq!(generation_of(b"{}"), None);
        assert_eq!(generation_of(br#"{"generation":"x"}"#), None);
    }

    #[test]
    fn fresh_generations_are_new_and_exact_in_lua() {
        for _ in 0..1_000 {
            let g = fresh_generation(3);
            assert!(g != 3 && g > 1 && g < 1 << 46);
        }
    }

    #[test]
    fn what_a_plain_write_took_away_is_the_other_saves_changes_only() {
        // Both loaded {keep, mine, theirs, gone}; the other save changed
        // `theirs`, removed `gone`, added `new` and bound a user; this one
        // changed `mine` and removed `keep`.
        let diff = Diff {
            set: [("mine".to_owned(), "2".to_owned())].into_iter().collect(),
            remove: ["keep".to_owned()].into_iter().collect(),
            ..Diff::default()
        };
        let written = record(&[("mine", "2"), ("theirs", "1"), ("gone", "1")], None);
        let replaced = record(
            &[("keep", "1"), ("mine", "1"), ("theirs", "2"), ("new", "1")],
            Some("u"),
        );
        let lost = lost_changes(&written, &replaced, &diff);
        assert_eq!(
            lost.set,
            [
                ("new".to_owned(), "1".to_owned()),
                ("theirs".to_owned(), "2".to_owned())
            ]
            .into_iter()
            .collect(),
            "this save's own entries win"
        );
        assert_eq!(lost.remove, ["gone".to_owned()].into_iter().collect());
        assert_eq!(lost.user, Some(Some("u".to_owned())));
        assert!(!lost.clear);
        let mut merged = written.clone();
        lost.apply(&mut merged);
        assert_eq!(
            merged.data,
            record(&[("mine", "2"), ("theirs", "2"), ("new", "1")], None).data
        );

        // A save that binds, or clears, wins over the other's binding or
        // entries; nothing lost when the records agree.
        let binding = Diff {
            user: Some(Some("me".to_owned())),
            clear: true,
            ..Diff::default()
        };
        let lost = lost_changes(&record(&[], Some("me")), &replaced, &binding);
        assert!(lost.is_empty(), "{lost:?}");
        assert!(lost_changes(&written, &written, &Diff::default()).is_empty());
    }
}
