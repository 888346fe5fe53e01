//! Per-request counters without per-request allocation.
//!
//! `metrics::counter!` with a dynamic label builds its key (a `Vec` of
//! labels, a clone of each value) on every call, recorder or not. The layers
//! count every request by route, so [`increment`] builds each key once per
//! thread and label set and reuses it. Only keys are kept, not handles: a
//! recorder installed after the first request still sees every increment.

use std::cell::RefCell;
use std::collections::HashMap;
use std::sync::Arc;

use metrics::{Key, Label, Level, Metadata, SharedString};

static META: Metadata<'static> = Metadata::new(module_path!(), Level::INFO, Some(module_path!()));

/// Most keys one thread keeps; past that the set starts over (an
/// application has a bounded number of routes and policies).
const MAX_KEYS: usize = 4096;

/// A label whose value is a shared string: its address identifies it.
pub type Dynamic<'a> = (&'static str, &'a Arc<str>);

/// A label whose value is a static string.
pub type Fixed = (&'static str, &'static str);

/// A static string's identity: its address and length (literals may
/// share storage, so the address alone is not enough).
type Static = (usize, usize);

/// A key's identity: the name; each dynamic label's key and the address of
/// its value (the entry keeps the value alive, so no other string can take
/// that address while it exists); each fixed label.
type Id = (
    Static,
    [Option<(Static, usize)>; 2],
    [Option<(Static, Static)>; 2],
);

fn static_id(s: &'static str) -> Static {
    (s.as_ptr() as usize, s.len())
}

/// A built key, with the strings its identity points at.
type Entry = ([Option<Arc<str>>; 2], Key);

thread_local! {
    /// Keyed by addresses and lengths, never by request data: the fast
    /// hasher is enough.
    static KEYS: RefCell<HashMap<Id, Entry, foldhash::fast::RandomState>> =
        RefCell::new(HashMap::default());
}

/// Adds 1 to the counter `name` labelled by up to two `dynamic` labels,
/// then up to two `fixed` ones, in order. Strings reused across requests
/// (route templates, policy names) make the key a lookup; a fresh string
/// each time builds a key each time, as `metrics::counter!` would.
pub fn increment(name: &'static str, dynamic: [Option<Dynamic<'_>>; 2], fixed: [Option<Fixed>; 2]) {
    let id: Id = (
        static_id(name),
        dynamic.map(|d| d.map(|(k, v)| (static_id(k), Arc::as_ptr(v).cast::<u8>() as usize))),
        fixed.map(|f| f.map(|(k, v)| (static_id(k), static_id(v)))),
    );
    let count = |key: &Key| metrics::with_recorder(|r| r.register_counter(key, &META)).increment(1);
    let done = KEYS.with(|keys| {
        let Ok(mut keys) = keys.try_borrow_mut() else {
            return false;
        };
        if keys.len() >= MAX_KEYS && !keys.contains_key(&id) {
            keys.clear();
        }
        let (_, key) = keys.entry(id).or_insert_with(|| {
            (
                dynamic.map(|d| d.map(|(_, v)| v.clone())),
                build(name, &dynamic, fixed),
            )
        });
        count(key);
        true
    });
    if !done {
        count(&build(name, &dynamic, fixed));
    }
}

fn build(name: &'static str, dynamic: &[Option<Dynamic<'_>>; 2], fixed: [Option<Fixed>; 2]) -> Key {
    let labels: Vec<Label> = dynamic
        .iter()
        .flatten()
        .map(|(k, v)| Label::new(*k, SharedString::from(Arc::clone(v))))
        .chain(
            fixed
                .into_iter()
                .flatten()
                .map(|(k, v)| Label::from_static_parts(k, v)),
        )
        .collect();
    Key::from_parts(name, labels)
}

#[cfg(test)]
mod tests {
    use super::*;
    use metrics_util::debugging::{DebugValue, DebuggingRecorder};

    #[test]
    fn counts_under_the_labels_given() {
        let recorder = DebuggingRecorder::new();
        let snapshotter = recorder.snapshotter();
        let route: Arc<str> = Arc::from("/items/{id}");
        let policy: Arc<str> = Arc::from("burst");
        metrics::with_local_recorder(&recorder, || {
            for _ in 0..3 {
                increment(
                    "test_total",
                    [Some(("policy", &policy)), Some(("route", &route))],
                    [Some(("outcome", "allowed")), None],
                );
            }
            increment("test_total", [Some(("route", &route)), None], [None, None]);
            increment(
                "test_total",
                [None, None],
                [Some(("store", "redis")), Some(("result", "hit"))],
            );
        });
        let mut seen: Vec<(Vec<String>, u64)> = snapshotter
            .snapshot()
            .into_vec()
            .into_iter()
            .filter_map(|(k, _, _, v)| match v {
                DebugValue::Counter(n) => Some((
                    k.key()
                        .labels()
                        .map(|l| format!("{}={}", l.key(), l.value()))
                        .collect(),
                    n,
                )),
                _ => None,
            })
            .collect();
        seen.sort();
        assert_eq!(
            seen,
            vec![
                (
                    vec![
                        "policy=burst".to_owned(),
                        "route=/items/{id}".to_owned(),
                        "outcome=allowed".to_owned()
                    ],
                    3
                ),
                (vec!["route=/items/{id}".to_owned()], 1),
                (vec!["store=redis".to_owned(), "result=hit".to_owned()], 1),
            ]
        );
    }
}
