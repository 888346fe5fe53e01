//! The in-process store, for deployments without Redis. Same semantics as
//! the Redis store (batches and quota operations applied at most once),
//! bounded by the periods it keeps.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex};

use super::{Batch, QuotaAnswer, QuotaOp, Totals};

/// Usage in this process's memory. Cheap to clone (shared state).
#[derive(Clone, Debug, Default)]
pub struct MemoryStore {
    inner: Arc<Mutex<State>>,
}

#[derive(Debug, Default)]
struct State {
    /// (tenant, period) → metric → total.
    usage: HashMap<(Arc<str>, Arc<str>), BTreeMap<String, i64>>,
    /// Applied batch parts and quota operations, oldest first; bounded
    /// (they only matter while a retry may still come).
    markers: HashSet<String>,
    order: VecDeque<String>,
}

const MAX_MARKERS: usize = 100_000;

impl State {
    fn mark(&mut self, marker: String) -> bool {
        if !self.markers.insert(marker.clone()) {
            return false;
        }
        self.order.push_back(marker);
        while self.order.len() > MAX_MARKERS {
            if let Some(old) = self.order.pop_front() {
                self.markers.remove(&old);
            }
        }
        true
    }
}

impl MemoryStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    pub(super) fn apply(&self, batch: &Batch) -> Totals {
        let Ok(mut s) = self.inner.lock() else {
            return Vec::new();
        };
        let mut totals = Vec::with_capacity(batch.tenants.len());
        for t in batch.tenants.iter().filter(|t| !t.metrics.is_empty()) {
            let marker = format!("b:{}:{}:{}", batch.id, t.tenant, t.period);
            let fresh = s.mark(marker);
            let entry = s
                .usage
                .entry((t.tenant.clone(), t.period.clone()))
                .or_default();
            let mut out = Vec::with_capacity(t.metrics.len());
            for (m, n) in &t.metrics {
                let v = entry.entry(m.to_string()).or_insert(0);
                if fresh {
                    *v += n;
                }
                out.push((m.clone(), *v));
            }
            totals.push((t.tenant.clone(), t.period.clone(), out));
        }
        totals
    }

    pub(super) fn quota(&self, op: &QuotaOp) -> QuotaAnswer {
        let Ok(mut s) = self.inner.lock() else {
            return QuotaAnswer {
                allowed: true,
                total: 0,
            };
        };
        let marker = format!("q:{}:{}", op.tenant, op.op_id);
        let seen = s.markers.contains(&marker);
        let entry = s
            .usage
            .entry((op.tenant.clone(), op.period.clone()))
            .or_default();
        let v = entry.entry(op.metric.to_string()).or_insert(0);
        if seen {
            return QuotaAnswer {
                allowed: true,
                total: *v,
            };
        }
        if op.limit.is_some_and(|l| *v + op.n > l) {
            return QuotaAnswer {
                allowed: false,
                total: *v,
            };
        }
        *v += op.n;
        let total = *v;
        s.mark(marker);
        QuotaAnswer {
            allowed: true,
            total,
        }
    }

    pub(super) fn withdraw_quota(&self, op: &QuotaOp) -> bool {
        let Ok(mut s) = self.inner.lock() else {
            return false;
        };
        if !s.mark(format!("qx:{}:{}", op.tenant, op.op_id)) {
            return false;
        }
        // Marked as if applied: a late arrival of the operation is a no-op.
        if s.mark(format!("q:{}:{}", op.tenant, op.op_id)) {
            return false;
        }
        if let Some(v) = s
            .usage
            .get_mut(&(op.tenant.clone(), op.period.clone()))
            .and_then(|m| m.get_mut(op.metric.as_ref()))
        {
            *v -= op.n;
        }
        true
    }

    pub(super) fn usage(&self, tenant: &str, period: &str) -> BTreeMap<String, i64> {
        self.inner
            .lock()
            .ok()
            .and_then(|s| {
                s.usage
                    .get(&(Arc::from(tenant), Arc::from(period)))
                    .cloned()
            })
            .unwrap_or_default()
    }

    pub(super) fn top(&self, metric: &str, period: &str, n: usize) -> Vec<(String, i64)> {
        let Ok(s) = self.inner.lock() else {
            return Vec::new();
        };
        let mut v: Vec<(String, i64)> = s
            .usage
            .iter()
            .filter(|((_, p), _)| p.as_ref() == period)
            .filter_map(|((t, _), m)| m.get(metric).map(|v| (t.to_string(), *v)))
            .collect();
        v.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
        v.truncate(n);
        v
    }

    /// Forgets every period but the `keep` most recent labels (labels sort
    /// by date), bounding memory in a long-running process.
    pub fn retain_periods(&self, keep: &[&str]) {
        if let Ok(mut s) = self.inner.lock() {
            s.usage.retain(|(_, p), _| keep.contains(&p.as_ref()));
        }
    }
}
