//! The rate limiter's metrics, through the `metrics` facade.
//!
//! Counters are labelled by policy and route template, never by key. Their
//! keys are built once per thread and label set
//! ([`tollgate_redis::counters`]): a decision allocates nothing for its
//! metrics.

use std::sync::Arc;

use metrics::{Key, Label, Level, Metadata};
use tollgate_redis::counters::increment;

use crate::decision::Outcome;

static META: Metadata<'static> = Metadata::new(module_path!(), Level::INFO, Some(module_path!()));

fn outcome_label(o: Outcome) -> &'static str {
    match o {
        Outcome::Allowed => "allowed",
        Outcome::Denied => "denied",
        Outcome::ShadowDenied => "shadow_denied",
        Outcome::ExceedsCapacity => "exceeds_capacity",
    }
}

/// Counts one policy's decision on one request.
pub(crate) fn decision(policy: &Arc<str>, route: &Arc<str>, outcome: Outcome) {
    increment(
        "tollgate_ratelimit_decisions_total",
        [Some(("policy", policy)), Some(("route", route))],
        [Some(("outcome", outcome_label(outcome))), None],
    );
}

/// Counts a decision the in-process store made while Redis was down.
pub(crate) fn fallback(policy: &Arc<str>, route: &Arc<str>) {
    increment(
        "tollgate_ratelimit_fallback_total",
        [Some(("policy", policy)), Some(("route", route))],
        [None, None],
    );
}

/// Counts a request answered by the local deny cache.
pub(crate) fn deny_cache_hit(route: &Arc<str>) {
    increment(
        "tollgate_ratelimit_deny_cache_hits_total",
        [Some(("route", route)), None],
        [None, None],
    );
}

/// Where a decision was made, for the latency histogram's `store` label.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Store {
    Memory,
    Fallback,
    Redis,
    DenyCache,
}

const LATENCY: &str = "tollgate_ratelimit_decision_seconds";
static MEMORY: [Label; 1] = [Label::from_static_parts("store", "memory")];
static FALLBACK: [Label; 1] = [Label::from_static_parts("store", "fallback")];
static REDIS: [Label; 1] = [Label::from_static_parts("store", "redis")];
static DENY_CACHE: [Label; 1] = [Label::from_static_parts("store", "deny_cache")];
static LATENCY_KEYS: [Key; 4] = [
    Key::from_static_parts(LATENCY, &MEMORY),
    Key::from_static_parts(LATENCY, &FALLBACK),
    Key::from_static_parts(LATENCY, &REDIS),
    Key::from_static_parts(LATENCY, &DENY_CACHE),
];

/// Records how long a decision took.
pub(crate) fn latency(store: Store, seconds: f64) {
    let key = &LATENCY_KEYS[store as usize];
    metrics::with_recorder(|r| r.register_histogram(key, &META)).record(seconds);
}

#[cfg(test)]
mod tests {
    use super::*;
    use metrics_util::debugging::{DebugValue, DebuggingRecorder};

    type Row = (
        metrics_util::CompositeKey,
        Option<metrics::Unit>,
        Option<metrics::SharedString>,
        DebugValue,
    );

    fn counts(snapshot: Vec<Row>) -> Vec<(String, u64)> {
        let mut out: Vec<(String, u64)> = snapshot
            .into_iter()
            .filter_map(|(k, _, _, v)| match v {
                DebugValue::Counter(n) => {
                    let key = k.key();
                    let labels: Vec<String> = key
                        .labels()
                        .map(|l| format!("{}={}", l.key(), l.value()))
                        .collect();
                    Some((format!("{}{{{}}}", key.name(), labels.join(",")), n))
                }
                _ => None,
            })
            .collect();
        out.sort();
        out
    }

    #[test]
    fn reused_keys_count_under_the_right_labels_and_reach_a_later_recorder() {
        let (a, b): (Arc<str>, Arc<str>) = (Arc::from("burst"), Arc::from("sustained"));
        let route: Arc<str> = Arc::from("/api/items");
        // Before any recorder: counted nowhere, but the keys are built.
        decision(&a, &route, Outcome::Allowed);
        let recorder = DebuggingRecorder::new();
        let snapshotter = recorder.snapshotter();
        metrics::with_local_recorder(&recorder, || {
            decision(&a, &route, Outcome::Allowed);
            decision(&a, &route, Outcome::Allowed);
            decision(&b, &route, Outcome::Denied);
            fallback(&b, &route);
            deny_cache_hit(&route);
            latency(Store::Fallback, 0.001);
        });
        assert_eq!(
            counts(snapshotter.snapshot().into_vec()),
            vec![
                (
                    "tollgate_ratelimit_decisions_total{policy=burst,route=/api/items,outcome=allowed}"
                        .to_owned(),
                    2
                ),
                (
                    "tollgate_ratelimit_decisions_total{policy=sustained,route=/api/items,outcome=denied}"
                        .to_owned(),
                    1
                ),
                (
                    "tollgate_ratelimit_deny_cache_hits_total{route=/api/items}".to_owned(),
                    1
                ),
                (
                    "tollgate_ratelimit_fallback_total{policy=sustained,route=/api/items}"
                        .to_owned(),
                    1
                ),
            ]
        );
    }

    #[test]
    fn equal_strings_at_other_addresses_share_a_series() {
        let recorder = DebuggingRecorder::new();
        let snapshotter = recorder.snapshotter();
        metrics::with_local_recorder(&recorder, || {
            for _ in 0..3 {
                let (p, r): (Arc<str>, Arc<str>) = (Arc::from("p"), Arc::from("/r"));
                decision(&p, &r, Outcome::Allowed);
            }
        });
        assert_eq!(
            counts(snapshotter.snapshot().into_vec()),
            vec![(
                "tollgate_ratelimit_decisions_total{policy=p,route=/r,outcome=allowed}".to_owned(),
                3
            )]
        );
    }
}
