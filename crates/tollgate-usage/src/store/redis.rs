//! Redis layout (all under the handle's namespace, layer `usage`):
//!
//! - `{tenant}:{period}`: hash, one field per metric (tenant hash tag);
//! - `{tenant}:b:{batch}:{period}`: marker of an applied flush batch;
//! - `{tenant}:q:{op}`: marker of an applied (`1`) or withdrawn (`x`) quota
//!   operation;
//! - `{top:{metric}:{period}}`: sorted set of tenants by usage, and
//!   `{top:{metric}:{period}}:b:{batch}` its batch markers.
//!
//! Data keys expire at an absolute time (period end + retention) written
//! with EXPIREAT, so later writes never push it forward.

use std::collections::BTreeMap;
use std::sync::{Arc, LazyLock};

use tollgate_redis::fred::interfaces::{HashesInterface, LuaInterface, SortedSetsInterface};

use tollgate_redis::fred::types::{ClusterHash, CustomCommand, Value};
use tollgate_redis::{
    BatchConn, BatchOp, CoalesceConfig, Coalescer, KeySpace, RedisHandle, Script,
};

use super::{Batch, MARKER_TTL_SECS, QuotaAnswer, QuotaOp, Settle, Totals};
use crate::error::UsageError;

static FLUSH_TENANT: LazyLock<Script> =
    LazyLock::new(|| Script::new("usage_flush_tenant", include_str!("flush_tenant.lua")));
static FLUSH_TOP: LazyLock<Script> =
    LazyLock::new(|| Script::new("usage_flush_top", include_str!("flush_top.lua")));
static QUOTA: LazyLock<Script> =
    LazyLock::new(|| Script::new("usage_quota", include_str!("quota.lua")));
static QUOTA_WITHDRAW: LazyLock<Script> =
    LazyLock::new(|| Script::new("usage_quota_withdraw", include_str!("quota_withdraw.lua")));

/// The Redis store. Cheap to clone.
#[derive(Clone)]
pub struct RedisStore {
    handle: RedisHandle,
    keys: KeySpace,
    quota: Coalescer<QuotaBatch>,
    /// Flushes wait for replicas (see [`wait_for_replicas`](Self::wait_for_replicas)).
    durable: Option<Arc<Durable>>,
}

/// The connection flushes are written on when they wait for replicas:
/// `WAIT` holds its connection until the replicas answer, and on the
/// pool's it would hold up every layer's commands behind it.
struct Durable {
    client: tollgate_redis::fred::clients::Client,
    replicas: u32,
    _follow: tollgate_redis::FollowPrimary,
}

impl Durable {
    fn wait(&self) -> CustomCommand {
        CustomCommand::new_static("WAIT", ClusterHash::Random, true)
    }

    fn wait_args(&self, ms: i64) -> Vec<Value> {
        vec![self.replicas.into(), ms.into()]
    }

    /// `WAIT` at each primary serving one of `keys`, at once; the fewest
    /// replicas any of them reached (the number asked for, when no key
    /// was written).
    async fn wait_at_primaries(
        &self,
        keys: &[String],
        ms: i64,
    ) -> Result<Value, tollgate_redis::fred::error::Error> {
        use tollgate_redis::fred::error::{Error, ErrorKind};
        use tollgate_redis::fred::interfaces::{ClientLike, ClusterInterface};
        let state = self
            .client
            .cached_cluster_state()
            .ok_or_else(|| Error::new(ErrorKind::Cluster, "no cluster state yet"))?;
        let mut servers = Vec::new();
        for k in keys {
            let server = state
                .get_server(tollgate_redis::slot(k))
                .ok_or_else(|| Error::new(ErrorKind::Cluster, "a slot without a primary"))?;
            if !servers.contains(server) {
                servers.push(server.clone());
            }
        }
        let waits = servers.into_iter().map(|s| {
            let node = self.client.with_cluster_node(s);
            let args = self.wait_args(ms);
            async move { node.custom::<i64, _>(self.wait(), args).await }
        });
        let acked = futures::future::try_join_all(waits).await?;
        let fewest = acked.into_iter().min().unwrap_or(i64::from(self.replicas));
        Ok(Value::Integer(fewest))
    }
}

impl Drop for Durable {
    fn drop(&mut self) {
        tollgate_redis::quit_in_background(&self.client);
    }
}

impl std::fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisStore")
            .field("keys", &self.keys)
            .finish()
    }
}

impl RedisStore {
    /// Usage kept in Redis through `handle` (needs a Tokio runtime: hard
    /// quota checks are coalesced by a background task).
    pub fn new(handle: RedisHandle) -> Self {
        handle.register_layer("usage");
        let keys = handle.keys("usage");
        let quota = Coalescer::new(
            handle.clone(),
            QuotaBatch { keys: keys.clone() },
            CoalesceConfig::default(),
        );
        RedisStore {
            handle,
            keys,
            quota,
            durable: None,
        }
    }

    /// See [`UsageConfig::wait_for_replicas`](crate::UsageConfig::wait_for_replicas),
    /// which the tracker applies to its Redis store.
    pub(crate) fn wait_for_replicas(mut self, replicas: u32) -> Self {
        self.durable = None;
        if replicas == 0 {
            return self;
        }
        match self.handle.dedicated_client(false) {
            Ok(client) => {
                let follow = self.handle.follow_primary(&client);
                let _connection = client.connect();
                self.durable = Some(Arc::new(Durable {
                    client,
                    replicas,
                    _follow: follow,
                }));
            }
            Err(e) => {
                tracing::warn!(error = %e, "usage: no connection for flushes that wait for replicas; flushes do not wait");
            }
        }
        self
    }

    /// The handle.
    pub fn handle(&self) -> &RedisHandle {
        &self.handle
    }

    /// Key of a tenant's usage hash for a period.
    pub fn usage_key(&self, tenant: &str, period: &str) -> String {
        self.keys.tagged(tenant, &[period])
    }

    /// Key of a metric's top-consumers set for a period.
    pub fn top_key(&self, metric: &str, period: &str) -> String {
        self.keys.tagged(&format!("top:{metric}:{period}"), &[])
    }

    /// Applies a batch. A [`not_sent`](UsageError::not_sent) error means
    /// nothing of it reached Redis; once a first attempt was sent (and may
    /// have been applied in part), every failure is
    /// [`Unconfirmed`](UsageError::Unconfirmed) or another error that is
    /// not "not sent", so the caller retries the batch under the same id.
    pub(super) async fn apply(&self, batch: &Batch) -> Result<Totals, UsageError> {
        match self.apply_once(batch).await {
            // Scripts were missing (first use, or Redis restarted) and are
            // loaded now: the same batch again is harmless.
            Err(UsageError::Retry(_)) => {
                self.apply_once(batch).await.map_err(UsageError::after_sent)
            }
            other => other,
        }
    }

    async fn apply_once(&self, batch: &Batch) -> Result<Totals, UsageError> {
        let conn_result = self
            .handle
            .run(async {
                let pipeline = match &self.durable {
                    Some(d) => d.client.pipeline(),
                    None => self.handle.client().pipeline(),
                };
                // On a cluster, the keys whose primaries must be waited on.
                let mut written = Vec::new();
                let cluster_wait = self.durable.is_some() && self.handle.is_cluster();
                for t in batch.tenants.iter().filter(|t| !t.metrics.is_empty()) {
                    let marker = self.keys.tagged(&t.tenant, &["b", &batch.id, &t.period]);
                    let hash = self.usage_key(&t.tenant, &t.period);
                    if cluster_wait {
                        written.push(hash.clone());
                    }
                    let mut args: Vec<Value> = vec![MARKER_TTL_SECS.into(), t.expire_at.into()];
                    for (m, n) in &t.metrics {
                        args.push(m.as_ref().into());
                        args.push((*n).into());
                    }
                    let (cmd, args) = evalsha(&FLUSH_TENANT, [marker, hash], args);
                    let _: () = pipeline.custom(cmd, args).await?;
                }
                let tops = if batch.top {
                    top_groups(batch)
                } else {
                    Vec::new()
                };
                for ((metric, period, expire_at), members) in &tops {
                    let set = self.top_key(metric, period);
                    let marker = format!("{set}:b:{}", batch.id);
                    if cluster_wait {
                        written.push(set.clone());
                    }
                    let mut args: Vec<Value> = vec![MARKER_TTL_SECS.into(), (*expire_at).into()];
                    for (tenant, n) in members {
                        args.push(tenant.as_ref().into());
                        args.push((*n).into());
                    }
                    let (cmd, args) = evalsha(&FLUSH_TOP, [marker, set], args);
                    let _: () = pipeline.custom(cmd, args).await?;
                }
                let Some(d) = &self.durable else {
                    return Ok((pipeline.try_all::<Value>().await, None));
                };
                // Half the deadline: the whole flush must fit in it.
                let ms = (self.handle.deadline() / 2).as_millis().max(1);
                let ms = i64::try_from(ms).unwrap_or(i64::MAX);
                if cluster_wait {
                    // Each primary confirms the writes it took, on the
                    // connection that sent them, once they are answered.
                    let results = pipeline.try_all::<Value>().await;
                    let acked = d.wait_at_primaries(&written, ms).await;
                    return Ok((results, Some(acked)));
                }
                let _: () = pipeline.custom(d.wait(), d.wait_args(ms)).await?;
                let mut results = pipeline.try_all::<Value>().await;
                let acked = results.pop();
                Ok::<_, tollgate_redis::Error>((results, acked))
            })
            .await;
        let (results, acked) = conn_result?;
        // A restarted Redis has no scripts: load them and let the caller
        // retry the same batch (harmless: each part is applied at most once).
        if results
            .iter()
            .any(|r| matches!(r, Err(e) if e.details().starts_with("NOSCRIPT")))
        {
            // The pipeline was sent: parts of the batch may be applied.
            self.load_scripts(&[&FLUSH_TENANT, &FLUSH_TOP])
                .await
                .map_err(UsageError::after_sent)?;
            return Err(UsageError::Retry("scripts were reloaded".into()));
        }
        let with_hash: Vec<_> = batch
            .tenants
            .iter()
            .filter(|t| !t.metrics.is_empty())
            .collect();
        let mut totals = Vec::with_capacity(with_hash.len());
        for (t, r) in with_hash.iter().zip(results.iter()) {
            let v = r.as_ref().map_err(|e| {
                let e = tollgate_redis::Error::Redis(e.clone());
                self.handle.observe(&e);
                UsageError::Store(e)
            })?;
            totals.push((
                t.tenant.clone(),
                t.period.clone(),
                parse_totals(v, &t.metrics),
            ));
        }
        for r in results.iter().skip(with_hash.len()) {
            if let Err(e) = r {
                return Err(UsageError::Store(tollgate_redis::Error::Redis(e.clone())));
            }
        }
        if let (Some(d), Some(acked)) = (&self.durable, acked) {
            let n = acked.ok().and_then(|v| v.as_i64()).unwrap_or(0);
            if n < i64::from(d.replicas) {
                // Applied on the primary, not yet safe from a failover:
                // retried under the same id (applied at most once).
                return Err(UsageError::Unconfirmed(tollgate_redis::Error::Protocol(
                    format!("the flush reached {n} of {} replicas", d.replicas).into(),
                )));
            }
        }
        Ok(totals)
    }

    async fn load_scripts(&self, scripts: &[&Script]) -> Result<(), UsageError> {
        for s in scripts {
            let body = s.body();
            self.handle
                .call(|c| async move {
                    if c.is_clustered() {
                        c.script_load_cluster::<(), _>(body).await
                    } else {
                        c.script_load::<(), _>(body).await
                    }
                })
                .await?;
        }
        Ok(())
    }

    pub(super) async fn quota(&self, op: QuotaOp) -> Result<QuotaAnswer, UsageError> {
        Ok(self.quota.submit(op).await?)
    }

    /// See [`Store::settle`](super::Store::settle).
    pub(super) async fn settle(
        &self,
        ops: &[Settle],
    ) -> Result<Vec<Result<(), UsageError>>, UsageError> {
        match self.settle_once(ops).await {
            // Scripts were missing and are loaded now: every operation is
            // harmless to send again.
            Err(UsageError::Retry(_)) => self.settle_once(ops).await,
            other => other,
        }
    }

    async fn settle_once(&self, ops: &[Settle]) -> Result<Vec<Result<(), UsageError>>, UsageError> {
        let results = self
            .handle
            .run(async {
                let pipeline = self.handle.client().pipeline();
                for s in ops {
                    let op = s.op();
                    let keys = [
                        self.keys.tagged(&op.tenant, &["q", &op.op_id]),
                        self.keys.tagged(&op.tenant, &[&op.period]),
                    ];
                    let (cmd, args) = match s {
                        // An unconditional replay: limit -1.
                        Settle::Apply(op) => evalsha(
                            &QUOTA,
                            keys,
                            vec![
                                MARKER_TTL_SECS.into(),
                                op.metric.as_ref().into(),
                                op.n.into(),
                                (-1).into(),
                                op.expire_at.into(),
                            ],
                        ),
                        Settle::Withdraw(op) => evalsha(
                            &QUOTA_WITHDRAW,
                            keys,
                            vec![
                                MARKER_TTL_SECS.into(),
                                op.metric.as_ref().into(),
                                op.n.into(),
                            ],
                        ),
                    };
                    let _: () = pipeline.custom(cmd, args).await?;
                }
                Ok::<_, tollgate_redis::Error>(pipeline.try_all::<Value>().await)
            })
            .await?;
        if results
            .iter()
            .any(|r| matches!(r, Err(e) if e.details().starts_with("NOSCRIPT")))
        {
            self.load_scripts(&[&QUOTA, &QUOTA_WITHDRAW]).await?;
            return Err(UsageError::Retry("scripts were reloaded".into()));
        }
        if results.len() != ops.len() {
            return Err(UsageError::Store(tollgate_redis::Error::Protocol(
                format!(
                    "{} answers to {} quota operations",
                    results.len(),
                    ops.len()
                )
                .into(),
            )));
        }
        Ok(results
            .into_iter()
            .map(|r| {
                r.map(drop).map_err(|e| {
                    let e = tollgate_redis::Error::Redis(e);
                    self.handle.observe(&e);
                    UsageError::Store(e)
                })
            })
            .collect())
    }

    pub(super) async fn withdraw_quota(&self, op: &QuotaOp) -> Result<bool, UsageError> {
        let keys = vec![
            self.keys.tagged(&op.tenant, &["q", &op.op_id]),
            self.keys.tagged(&op.tenant, &[&op.period]),
        ];
        let args: Vec<Value> = vec![
            MARKER_TTL_SECS.into(),
            op.metric.as_ref().into(),
            op.n.into(),
        ];
        let undone: i64 = self.handle.eval(&QUOTA_WITHDRAW, keys, args).await?;
        Ok(undone == 1)
    }

    pub(super) async fn usage(
        &self,
        tenant: &str,
        period: &str,
    ) -> Result<BTreeMap<String, i64>, UsageError> {
        let key = self.usage_key(tenant, period);
        let map: BTreeMap<String, i64> = self
            .handle
            .call(|c| async move { c.hgetall(key).await })
            .await?;
        Ok(map)
    }

    pub(super) async fn top(
        &self,
        metric: &str,
        period: &str,
        n: usize,
    ) -> Result<Vec<(String, i64)>, UsageError> {
        if n == 0 {
            return Ok(Vec::new());
        }
        let key = self.top_key(metric, period);
        let stop = i64::try_from(n).unwrap_or(i64::MAX) - 1;
        let raw: Vec<(String, f64)> = self
            .handle
            .call(|c| async move { c.zrange(key, 0, stop, None, true, None, true).await })
            .await?;
        #[allow(clippy::cast_possible_truncation)]
        Ok(raw
            .into_iter()
            .map(|(t, s)| (t, s.round() as i64))
            .collect())
    }
}

use tollgate_redis::fred::interfaces::ClientLike;

/// EVALSHA as a custom command, because fred's pipelines have no Lua
/// interface; routed by the slot of the keys (which share one).
fn evalsha(script: &Script, keys: [String; 2], args: Vec<Value>) -> (CustomCommand, Vec<Value>) {
    let slot = tollgate_redis::slot(&keys[0]);
    let mut all: Vec<Value> = Vec::with_capacity(4 + args.len());
    all.push(script.sha1().into());
    all.push(2.into());
    all.extend(keys.into_iter().map(Value::from));
    all.extend(args);
    (
        CustomCommand::new_static("EVALSHA", ClusterHash::Custom(slot), false),
        all,
    )
}

type TopKey = (Arc<str>, Arc<str>, i64);
/// Tenants and their increments for one top set.
type Members = Vec<(Arc<str>, i64)>;

/// The batch's increments regrouped by (metric, period).
fn top_groups(batch: &Batch) -> Vec<(TopKey, Members)> {
    let mut groups: Vec<(TopKey, Members)> = Vec::new();
    for t in &batch.tenants {
        for (m, n) in t.metrics.iter().chain(&t.top_only) {
            let key = (m.clone(), t.period.clone(), t.expire_at);
            match groups
                .iter_mut()
                .find(|(k, _)| k.0 == key.0 && k.1 == key.1)
            {
                Some((_, members)) => match members.iter_mut().find(|(tn, _)| *tn == t.tenant) {
                    Some(m) => m.1 += *n,
                    None => members.push((t.tenant.clone(), *n)),
                },
                None => groups.push((key, vec![(t.tenant.clone(), *n)])),
            }
        }
    }
    groups
}

fn parse_totals(v: &Value, metrics: &[(Arc<str>, i64)]) -> Vec<(Arc<str>, i64)> {
    let Value::Array(items) = v else {
        return Vec::new();
    };
    // {applied, m1, t1, m2, t2, ...} in the order sent.
    metrics
        .iter()
        .enumerate()
        .map(|(i, (m, _))| {
            let total = items.get(2 + 2 * i).and_then(Value::as_i64).unwrap_or(0);
            (m.clone(), total)
        })
        .collect()
}

struct QuotaBatch {
    keys: KeySpace,
}

impl BatchOp for QuotaBatch {
    type Item = QuotaOp;
    type Output = QuotaAnswer;

    fn slot(&self, item: &QuotaOp) -> u16 {
        tollgate_redis::slot(&self.keys.tagged(&item.tenant, &[]))
    }

    async fn execute(
        &self,
        conn: BatchConn<'_>,
        items: Vec<QuotaOp>,
    ) -> Result<Vec<QuotaAnswer>, tollgate_redis::Error> {
        let mut keys = Vec::with_capacity(items.len() * 2);
        let mut args: Vec<Value> = Vec::with_capacity(1 + items.len() * 4);
        args.push(MARKER_TTL_SECS.into());
        for op in &items {
            keys.push(self.keys.tagged(&op.tenant, &["q", &op.op_id]));
            keys.push(self.keys.tagged(&op.tenant, &[&op.period]));
            args.push(op.metric.as_ref().into());
            args.push(op.n.into());
            args.push(op.limit.unwrap_or(-1).into());
            args.push(op.expire_at.into());
        }
        let out: Vec<i64> = conn.eval(&QUOTA, keys, args).await?;
        if out.len() != items.len() * 2 {
            return Err(tollgate_redis::Error::Protocol(
                format!(
                    "quota script returned {} values for {} operations",
                    out.len(),
                    items.len()
                )
                .into(),
            ));
        }
        Ok(out
            .chunks_exact(2)
            .map(|c| QuotaAnswer {
                allowed: c[0] == 1,
                total: c[1],
            })
            .collect())
    }
}
