//! Usage tracking: exact per-tenant usage per period, plan quotas, billing
//! and reporting, written off the request path.
//!
//! - [`UsageTracker`] aggregates increments in process and flushes them in
//!   one pipelined round trip per interval. Each flush batch carries an id
//!   and each part of it is applied at most once, so a flush retried after a
//!   timeout never counts twice. While Redis is unreachable increments stay
//!   buffered (up to a bound; beyond it they are counted as dropped, never
//!   silently lost). A hard-quota check whose answer was lost is settled
//!   later under its id (applied again for a served request, withdrawn for
//!   a refused one), many in one round trip, from a bounded queue.
//!   [`UsageTracker::shutdown`] flushes everything, waits for writes on
//!   their way, and accounts for every unit: flushed or dropped.
//! - Redis layout: one hash per tenant and period (a field per metric), one
//!   sorted set per metric and period (top consumers). Both expire at an
//!   absolute time, period end + retention (90 days by default), never
//!   pushed forward by later writes.
//! - [`UsageLayer`] counts `api_request` per tenant (and, optionally, per
//!   route template and status class), counts rate-limit denials
//!   ([`RATE_LIMITED`]) when a rate limiter inside it answers 429, gives
//!   handlers a [`Usage`] handle for custom metrics, and enforces plan
//!   quotas: soft (headers only) or hard (one atomic script per check,
//!   coalesced), answering 429 or 402 with `X-Quota-*` headers.
//! - [`Plan::bill`] computes base price plus overage.
#![warn(clippy::unwrap_used)]

mod error;
mod layer;
mod period;
mod plan;
mod service;
mod store;
mod tracker;

pub use error::UsageError;
pub use layer::{TenantSource, UsageLayer};
pub use period::{Period, PeriodKind, now_ms};
pub use plan::{Bill, BillLine, Enforcement, MetricLimit, Micros, Plan, Plans, format_usd};
pub use service::{ResponseFuture, Usage, UsageTracking};
pub use store::{Batch, MemoryStore, QuotaAnswer, QuotaOp, RedisStore, Store, TenantIncrements};
pub use tracker::{QuotaOutcome, UsageConfig, UsageStats, UsageTracker, WriteMode};

/// The metric every request counts under.
pub const API_REQUEST: &str = "api_request";
/// The metric counting a tenant's rate-limit denials.
pub const RATE_LIMITED: &str = "ratelimit_denied";
