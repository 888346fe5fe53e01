//! Recording for a tenant already seen does not allocate, and neither does
//! the layer's own bookkeeping for such a tenant beyond the request handle.
//!
//! Alone in its test binary: the allocation counter is process-wide. The
//! harness's own threads may allocate while a region is measured, so the
//! loop is measured several times and the quietest region is checked: a
//! recording that allocated would show in every one of them.

use stats_alloc::{INSTRUMENTED_SYSTEM, Region, StatsAlloc};
use std::alloc::System;
use tollgate_usage::{UsageConfig, UsageTracker};

#[global_allocator]
static GLOBAL: &StatsAlloc<System> = &INSTRUMENTED_SYSTEM;

#[tokio::test(flavor = "current_thread")]
async fn recording_for_a_known_tenant_does_not_allocate() {
    let tracker = UsageTracker::in_memory(UsageConfig::new());
    // First sight of the tenant and the metric: these may allocate.
    tracker.record("acme", "api_request", 1);
    tracker.record("acme", "email_sent", 1);

    // No await in between: nothing else runs on this runtime.
    let mut quietest: Option<stats_alloc::Stats> = None;
    for _ in 0..5 {
        let region = Region::new(GLOBAL);
        for _ in 0..200 {
            tracker.record("acme", "api_request", 1);
            tracker.record("acme", "email_sent", 2);
        }
        let stats = region.change();
        if quietest
            .as_ref()
            .is_none_or(|q| stats.allocations < q.allocations)
        {
            quietest = Some(stats);
        }
    }
    let stats = quietest.expect("measured");
    assert_eq!(
        stats.allocations, 0,
        "recording for a known tenant allocated: {stats:?}"
    );

    tracker.flush().await.expect("flush");
    let usage = tracker.usage("acme", None).await.expect("usage");
    assert_eq!(usage["api_request"], 1_001);
    assert_eq!(usage["email_sent"], 2_001);
}
