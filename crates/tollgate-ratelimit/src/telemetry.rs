//! The rate limiter's metrics, through the `metrics` facade.
//!
//! Counters are labelled by policy and route template, never by key. Their
//! keys are built once per thread and label set, then reused: a decision
//! allocates nothing for its metrics. Only keys are kept, not handles, so
//! a recorder installed after the first request still sees every
//! increment.

use std::cell::RefCell;
use std::collections::HashMap;
use std::sync::Arc;

use metrics::{Key, Label, Level, Metadata, SharedString};

use crate::decision::Outcome;

static META: Metadata<'static> = Metadata::new(module_path!(), Level::INFO, Some(module_path!()));

/// A counter with route (and policy) labels.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Kind {
    /// `tollgate_ratelimit_decisions_total{policy, route, outcome}`.
    Decision(Outcome),
    /// `tollgate_ratelimit_fallback_total{policy, route}`.
    Fallback,
    /// `tollgate_ratelimit_deny_cache_hits_total{route}`.
    DenyCacheHit,
}

/// Most keys one thread keeps; past that the set starts over (an
/// application has a bounded number of routes and policies).
const MAX_KEYS: usize = 4096;

/// A key's identity: the addresses of its policy and route strings (the
/// entry keeps both alive, so no other string can take those addresses
/// while it exists) and the counter.
type Id = (usize, usize, Kind);

/// A built key, with the strings its identity points at.
type Entry = (Arc<str>, Arc<str>, Key);

thread_local! {
    static KEYS: RefCell<HashMap<Id, Entry>> = RefCell::new(HashMap::new());
}

fn increment(kind: Kind, policy: &Arc<str>, route: &Arc<str>) {
    let id = (
        Arc::as_ptr(policy).cast::<u8>() as usize,
        Arc::as_ptr(route).cast::<u8>() as usize,
        kind,
    );
    KEYS.with_borrow_mut(|keys| {
        if keys.len() >= MAX_KEYS && !keys.contains_key(&id) {
            keys.clear();
        }
        let (_, _, key) = keys
            .entry(id)
            .or_insert_with(|| (policy.clone(), route.clone(), build(kind, policy, route)));
        metrics::with_recorder(|r| r.register_counter(key, &META)).increment(1);
    });
}

fn build(kind: Kind, policy: &Arc<str>, route: &Arc<str>) -> Key {
    let label = |k: &'static str, v: &Arc<str>| Label::new(k, SharedString::from(v.clone()));
    match kind {
        Kind::Decision(outcome) => Key::from_parts(
            "tollgate_ratelimit_decisions_total",
            vec![
                label("policy", policy),
                label("route", route),
                Label::from_static_parts("outcome", outcome_label(outcome)),
            ],
        ),
        Kind::Fallback => Key::from_parts(
            "tollgate_ratelimit_fallback_total",
            vec![label("policy", policy), label("route", route)],
        ),
        Kind::DenyCacheHit => Key::from_parts(
            "tollgate_ratelimit_deny_cache_hits_total",
            vec![label("route", route)],
        ),
    }
}

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
    increment(Kind::Decision(outcome), policy, route);
}

/// Counts a decision the in-process store made while Redis was down.
pub(crate) fn fallback(policy: &Arc<str>, route: &Arc<str>) {
    increment(Kind::Fallback, policy, route);
}

/// Counts a request answered by the local deny cache.
pub(crate) fn deny_cache_hit(route: &Arc<str>) {
    increment(Kind::DenyCacheHit, route, route);
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
        Option<SharedString>,
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
