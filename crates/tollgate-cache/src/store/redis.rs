use std::sync::{Arc, LazyLock, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use futures::future::BoxFuture;
use tollgate_redis::fred::interfaces::{KeysInterface, SortedSetsInterface};
use tollgate_redis::fred::types::{Expiration, ExpireOptions, Value};
use tollgate_redis::{CoalesceConfig, Coalescer, GetOp, KeySpace, RedisHandle, Script};

use super::{Store, now_ms};
use crate::error::Error;

static TAG_MEMBERS: LazyLock<Script> =
    LazyLock::new(|| Script::new("cache_tag_members", include_str!("tag_members.lua")));
static TAG_PRUNE: LazyLock<Script> =
    LazyLock::new(|| Script::new("cache_tag_prune", include_str!("tag_prune.lua")));

/// Members of a tag listed, deleted and pruned per round trip: a tag of
/// tens of thousands of entries is invalidated in rounds, each well within
/// a command deadline (in one, it outlasted the deadline every time it was
/// run, and each timeout counted against the shared breaker).
const TAG_CHUNK: usize = 1_000;

/// Keys deleted per `DEL` command.
const DEL_CHUNK: usize = 500;

/// The Redis store: an entry is a string key `{ns}:cache:{key}:e` with a
/// TTL; a tag is a sorted set `{ns}:cache:{tag}:t` of entry keys scored by
/// their expiry, trimmed of expired members on every write and expiring
/// itself with its last member.
///
/// Entries and tag indexes hash to different cluster slots: writes go out
/// as one pipeline of single-slot commands, and invalidation deletes the
/// members grouped by slot. Never `KEYS` or `SCAN`.
///
/// Invalidating a tag lists its members (changing nothing), deletes their
/// entries, then removes exactly those members from the index: cut off at
/// any step (an error, a reply past the deadline), it leaves the index in
/// place and can simply be run again.
///
/// Lookups are coalesced: the GETs of concurrent requests go out as one
/// `MGET` per round trip (per slot on a cluster), so a hit costs a fraction
/// of a round trip under load and one round trip when alone.
#[derive(Clone, Debug)]
pub struct RedisStore {
    handle: RedisHandle,
    keys: KeySpace,
    /// Started on first use (inside the runtime).
    gets: Arc<OnceLock<Coalescer<GetOp>>>,
}

impl RedisStore {
    /// A store on `handle`, under `{namespace}:cache:`.
    pub fn new(handle: RedisHandle) -> Self {
        let keys = handle.keys("cache");
        handle.register_layer("cache");
        RedisStore {
            handle,
            keys,
            gets: Arc::new(OnceLock::new()),
        }
    }

    /// The handle.
    pub fn handle(&self) -> &RedisHandle {
        &self.handle
    }

    /// The Redis key holding the entry `key` (for tests and debugging).
    pub fn entry_key(&self, key: &str) -> String {
        self.keys.tagged(key, &["e"])
    }

    /// The Redis key holding the index of `tag`.
    pub fn tag_key(&self, tag: &str) -> String {
        self.keys.tagged(tag, &["t"])
    }

    async fn delete_entries(&self, members: &[String]) -> Result<(), Error> {
        if members.is_empty() {
            return Ok(());
        }
        let mut groups: Vec<(u16, Vec<String>)> = Vec::new();
        for m in members {
            let k = self.entry_key(m);
            // One group on a standalone server; one per slot on a cluster,
            // so that no DEL spans two slots.
            let slot = if self.handle.is_cluster() {
                tollgate_redis::slot(&k)
            } else {
                0
            };
            match groups
                .iter_mut()
                .find(|(s, g)| *s == slot && g.len() < DEL_CHUNK)
            {
                Some((_, g)) => g.push(k),
                None => groups.push((slot, vec![k])),
            }
        }
        self.handle
            .call(move |c| async move {
                let p = c.pipeline();
                for (_, g) in groups {
                    let _: () = p.del(g).await?;
                }
                let _: Vec<Value> = p.all().await?;
                Ok(())
            })
            .await?;
        Ok(())
    }
}

impl Store for RedisStore {
    fn bounds_reads(&self) -> bool {
        true
    }

    fn get<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<Option<Bytes>, Error>> {
        Box::pin(async move {
            let k = self.entry_key(key);
            let gets = self.gets.get_or_init(|| {
                Coalescer::new(self.handle.clone(), GetOp, CoalesceConfig::default())
            });
            Ok(gets.submit(k).await?)
        })
    }

    fn put<'a>(
        &'a self,
        key: &'a str,
        value: Bytes,
        ttl: Duration,
        tags: &'a [String],
    ) -> BoxFuture<'a, Result<(), Error>> {
        Box::pin(async move {
            let ttl_ms = i64::try_from(ttl.as_millis()).unwrap_or(i64::MAX).max(1);
            let now = now_ms() as i64;
            let expires = now.saturating_add(ttl_ms);
            let entry = self.entry_key(key);
            let tag_keys: Vec<String> = tags.iter().map(|t| self.tag_key(t)).collect();
            let member = key.to_owned();
            self.handle
                .call(move |c| async move {
                    let p = c.pipeline();
                    let _: () = p
                        .set(entry, value, Some(Expiration::PX(ttl_ms)), None, false)
                        .await?;
                    for t in tag_keys {
                        let _: () = p
                            .zremrangebyscore(&t, f64::NEG_INFINITY, now as f64)
                            .await?;
                        let _: () = p
                            .zadd(
                                &t,
                                None,
                                None,
                                false,
                                false,
                                (expires as f64, member.clone()),
                            )
                            .await?;
                        // NX gives a new index a TTL; GT only ever extends it.
                        let _: () = p.pexpire_at(&t, expires, Some(ExpireOptions::NX)).await?;
                        let _: () = p.pexpire_at(&t, expires, Some(ExpireOptions::GT)).await?;
                    }
                    let _: Vec<Value> = p.all().await?;
                    Ok(())
                })
                .await?;
            Ok(())
        })
    }

    fn invalidate_key<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<bool, Error>> {
        Box::pin(async move {
            let k = self.entry_key(key);
            let n: i64 = self.handle.call(|c| async move { c.del(k).await }).await?;
            Ok(n > 0)
        })
    }

    fn invalidate_tag<'a>(&'a self, tag: &'a str) -> BoxFuture<'a, Result<Vec<String>, Error>> {
        Box::pin(async move {
            let tag_key = self.tag_key(tag);
            let mut members = Vec::new();
            // The members expiring first, a chunk at a time: each round
            // removes what it listed from the index, so the next lists the
            // following ones. A member stored again meanwhile stays listed
            // (under a later expiry): listed again, it is deleted again.
            loop {
                let listed: Vec<String> = self
                    .handle
                    .eval(
                        &TAG_MEMBERS,
                        vec![tag_key.clone()],
                        vec![now_ms() as i64, TAG_CHUNK as i64],
                    )
                    .await?;
                if listed.is_empty() {
                    break;
                }
                let round: Vec<String> = listed.iter().step_by(2).cloned().collect();
                self.delete_entries(&round).await?;
                let removed: i64 = self
                    .handle
                    .eval(&TAG_PRUNE, vec![tag_key.clone()], listed)
                    .await?;
                let last = round.len() < TAG_CHUNK;
                members.extend(round);
                // Nothing removed: every member listed was stored again
                // meanwhile; the next round would list them again.
                if last || removed == 0 {
                    break;
                }
            }
            Ok(members)
        })
    }

    fn is_available(&self) -> bool {
        self.handle.is_available()
    }
}
