//! Where usage lands: Redis (shared by every instance) or process memory
//! (a deployment without Redis). Both apply the same batches with the same
//! once-only semantics, and one conformance suite runs against both.

mod memory;
mod redis;

use std::collections::BTreeMap;
use std::sync::Arc;

pub use memory::MemoryStore;
pub use redis::RedisStore;

use crate::error::UsageError;

/// One tenant's increments for one period, inside a flush batch.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TenantIncrements {
    /// The tenant.
    pub tenant: Arc<str>,
    /// The period's label.
    pub period: Arc<str>,
    /// Absolute expiry of the period's data (Unix seconds).
    pub expire_at: i64,
    /// `(metric, increment)` for the hash and the top sets.
    pub metrics: Vec<(Arc<str>, i64)>,
    /// `(metric, increment)` for the top sets only (the hash was already
    /// written by a hard-quota check).
    pub top_only: Vec<(Arc<str>, i64)>,
}

/// A flush batch. Its id makes a retry harmless: each part is applied at
/// most once.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Batch {
    /// Unique per instance and flush.
    pub id: String,
    /// The increments.
    pub tenants: Vec<TenantIncrements>,
    /// Whether to maintain the top-consumers sets.
    pub top: bool,
}

impl Batch {
    /// The net total of the batch's increments to its hashes (for the
    /// pending count).
    pub fn units(&self) -> i64 {
        self.increments().sum()
    }

    /// The batch's units without their signs (for the flushed and dropped
    /// counts): +5 on one metric and −5 on another are 10 units, not 0.
    pub fn magnitude(&self) -> u64 {
        self.increments().map(i64::unsigned_abs).sum()
    }

    fn increments(&self) -> impl Iterator<Item = i64> + '_ {
        self.tenants
            .iter()
            .flat_map(|t| t.metrics.iter().map(|(_, n)| *n))
    }
}

/// After a batch: each tenant-period's totals for the metrics it carried.
pub type Totals = Vec<(Arc<str>, Arc<str>, Vec<(Arc<str>, i64)>)>;

/// One hard-quota check (see [`Store::quota`]).
#[derive(Clone, Debug)]
pub struct QuotaOp {
    /// Unique id; replaying the same op never counts twice.
    pub op_id: String,
    /// The tenant.
    pub tenant: Arc<str>,
    /// Period label.
    pub period: Arc<str>,
    /// Absolute expiry of the period's data.
    pub expire_at: i64,
    /// The metric.
    pub metric: Arc<str>,
    /// Increment.
    pub n: i64,
    /// Limit for the period; `None` replays an op unconditionally.
    pub limit: Option<i64>,
}

/// A quota decision.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct QuotaAnswer {
    /// Whether the increment was applied.
    pub allowed: bool,
    /// The metric's total after the decision.
    pub total: i64,
}

/// How long batch and operation markers live: longer than any retry.
pub(crate) const MARKER_TTL_SECS: i64 = 2 * 24 * 3600;

/// A quota operation to settle after its answer was lost.
#[derive(Clone, Debug)]
pub(crate) enum Settle {
    /// The request was served: apply the operation (once, unconditionally:
    /// its limit is `None`).
    Apply(QuotaOp),
    /// The request was refused: undo the operation if it was applied, and
    /// keep it from applying if it is still on its way.
    Withdraw(QuotaOp),
}

impl Settle {
    /// The operation, whichever the outcome.
    pub(crate) fn op(&self) -> &QuotaOp {
        match self {
            Settle::Apply(op) | Settle::Withdraw(op) => op,
        }
    }
}

/// The store behind a tracker.
#[derive(Clone, Debug)]
pub enum Store {
    /// Shared through Redis.
    Redis(RedisStore),
    /// This process only.
    Memory(MemoryStore),
}

impl Store {
    /// Applies a batch (each tenant-period and top set at most once) and
    /// returns the totals.
    pub async fn apply(&self, batch: &Batch) -> Result<Totals, UsageError> {
        match self {
            Store::Redis(s) => s.apply(batch).await,
            Store::Memory(s) => Ok(s.apply(batch)),
        }
    }

    /// Checks a hard quota and consumes it when allowed, atomically.
    pub async fn quota(&self, op: QuotaOp) -> Result<QuotaAnswer, UsageError> {
        match self {
            Store::Redis(s) => s.quota(op).await,
            Store::Memory(s) => Ok(s.quota(&op)),
        }
    }

    /// Withdraws a quota operation whose answer was lost, for a request
    /// that was refused: its increment is undone if it was applied, and it
    /// will not apply if it arrives later. Returns whether an increment was
    /// undone. Harmless to repeat.
    pub async fn withdraw_quota(&self, op: &QuotaOp) -> Result<bool, UsageError> {
        match self {
            Store::Redis(s) => s.withdraw_quota(op).await,
            Store::Memory(s) => Ok(s.withdraw_quota(op)),
        }
    }

    /// Settles quota operations whose answers were lost, together: one
    /// pipelined round trip for Redis. Each is harmless to repeat (its
    /// marker makes it count once, or not at all once withdrawn). Returns
    /// one outcome per operation, in order; an error for the whole call
    /// settles none of them for certain.
    pub(crate) async fn settle(
        &self,
        ops: &[Settle],
    ) -> Result<Vec<Result<(), UsageError>>, UsageError> {
        match self {
            Store::Redis(s) => s.settle(ops).await,
            Store::Memory(s) => Ok(ops
                .iter()
                .map(|o| {
                    match o {
                        Settle::Apply(op) => {
                            s.quota(op);
                        }
                        Settle::Withdraw(op) => {
                            s.withdraw_quota(op);
                        }
                    }
                    Ok(())
                })
                .collect()),
        }
    }

    /// A tenant's usage in a period, by metric.
    pub async fn usage(
        &self,
        tenant: &str,
        period: &str,
    ) -> Result<BTreeMap<String, i64>, UsageError> {
        match self {
            Store::Redis(s) => s.usage(tenant, period).await,
            Store::Memory(s) => Ok(s.usage(tenant, period)),
        }
    }

    /// The `n` biggest consumers of `metric` in a period.
    pub async fn top(
        &self,
        metric: &str,
        period: &str,
        n: usize,
    ) -> Result<Vec<(String, i64)>, UsageError> {
        match self {
            Store::Redis(s) => s.top(metric, period, n).await,
            Store::Memory(s) => Ok(s.top(metric, period, n)),
        }
    }

    /// Whether this store is Redis and Redis is currently usable.
    pub fn is_redis(&self) -> bool {
        matches!(self, Store::Redis(_))
    }
}
