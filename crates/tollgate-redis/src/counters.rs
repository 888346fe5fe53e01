//! Per-request counters without per-request allocation.
//!
//! `metrics::counter!` with a dynamic label builds its key (a `Vec` of
//! labels, a clone of each value) on every call, recorder or not. The layers
//! count every request by route, so [`increment`] builds each key once per
//! thread and label set and reuses it, and a small per-thread memo of the
//! keys used last finds most of them without hashing. Only keys are kept,
//! not handles: a recorder installed after the first request still sees
//! every increment.

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

/// A key's identity, as words: the name's address and length; for each
/// dynamic label, its key's address and length and the address of its
/// value (the entry keeps the value alive, so no other string can take
/// that address while it exists); for each fixed label, the addresses and
/// lengths of its key and value. An absent label is zeros (no string is
/// at address zero). Static strings need their length too: literals may
/// share storage. Plain words compare and hash faster than a tuple of
/// options.
type Id = [usize; 16];

fn identity(
    name: &'static str,
    dynamic: &[Option<Dynamic<'_>>; 2],
    fixed: &[Option<Fixed>; 2],
) -> Id {
    /// A string's address and length at `at`.
    fn put(id: &mut Id, at: usize, s: &str) {
        id[at] = s.as_ptr() as usize;
        id[at + 1] = s.len();
    }
    let mut id = [0; 16];
    put(&mut id, 0, name);
    for (i, label) in dynamic.iter().enumerate() {
        if let Some((k, v)) = label {
            put(&mut id, 2 + 3 * i, k);
            id[4 + 3 * i] = Arc::as_ptr(v).cast::<u8>() as usize;
        }
    }
    for (i, label) in fixed.iter().enumerate() {
        if let Some((k, v)) = label {
            put(&mut id, 8 + 4 * i, k);
            put(&mut id, 10 + 4 * i, v);
        }
    }
    id
}

/// A built key, with the strings its identity points at.
type Entry = ([Option<Arc<str>>; 2], Key);

/// Slots of the memo in front of a thread's keys (a power of two).
const MEMO_SLOTS: usize = 16;

/// One thread's keys.
#[derive(Default)]
struct Keys {
    /// Where each identity's key is in `built`. Keyed by addresses and
    /// lengths, never by request data: the fast hasher is enough.
    index: HashMap<Id, usize, foldhash::fast::RandomState>,
    built: Vec<Entry>,
    /// The identities used last, each in a slot chosen by its addresses:
    /// most increments repeat one of a handful of keys, and comparing one
    /// identity costs less than hashing it for the map.
    memo: [Option<(Id, usize)>; MEMO_SLOTS],
}

/// The memo slot of an identity: the top bits of a multiplicative hash
/// of its words.
fn memo_slot(id: &Id) -> usize {
    let h = id.iter().fold(0usize, |h, w| h.rotate_left(7) ^ w);
    let top =
        (h as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15) >> (u64::BITS - MEMO_SLOTS.trailing_zeros());
    // Below `MEMO_SLOTS`: fits any `usize`.
    top as usize
}

impl Keys {
    /// The key of `id`, built by `make` the first time.
    fn get(&mut self, id: Id, make: impl FnOnce() -> Entry) -> &Key {
        let slot = memo_slot(&id);
        if let Some((seen, i)) = &self.memo[slot]
            && *seen == id
        {
            return &self.built[*i].1;
        }
        if self.index.len() >= MAX_KEYS && !self.index.contains_key(&id) {
            self.index.clear();
            self.built.clear();
            self.memo = Default::default();
        }
        let built = &mut self.built;
        let i = *self.index.entry(id).or_insert_with(|| {
            built.push(make());
            built.len() - 1
        });
        self.memo[slot] = Some((id, i));
        &self.built[i].1
    }
}

thread_local! {
    static KEYS: RefCell<Keys> = RefCell::new(Keys::default());
}

/// Adds 1 to the counter `name` labelled by up to two `dynamic` labels,
/// then up to two `fixed` ones, in order. Strings reused across requests
/// (route templates, policy names) make the key a lookup; a fresh string
/// each time builds a key each time, as `metrics::counter!` would.
pub fn increment(name: &'static str, dynamic: [Option<Dynamic<'_>>; 2], fixed: [Option<Fixed>; 2]) {
    let id = identity(name, &dynamic, &fixed);
    let count = |key: &Key| metrics::with_recorder(|r| r.register_counter(key, &META)).increment(1);
    let done = KEYS.with(|keys| {
        let Ok(mut keys) = keys.try_borrow_mut() else {
            return false;
        };
        let key = keys.get(id, || {
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

    /// Each counter's labels (`key=value`, in order) and count, sorted.
    fn counter_values(
        snapshotter: &metrics_util::debugging::Snapshotter,
    ) -> Vec<(Vec<String>, u64)> {
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
        seen
    }

    #[test]
    fn more_keys_than_memo_slots_each_count_alone() {
        // Twenty keys over sixteen slots: some share a slot, and each use
        // of one evicts the other from it.
        let recorder = DebuggingRecorder::new();
        let snapshotter = recorder.snapshotter();
        let routes: Vec<Arc<str>> = (0..20).map(|i| Arc::from(format!("/r{i:02}"))).collect();
        metrics::with_local_recorder(&recorder, || {
            for round in 0..3 {
                for (i, r) in routes.iter().enumerate() {
                    for _ in 0..=(i + round) % 3 {
                        increment("memo_total", [Some(("route", r)), None], [None, None]);
                    }
                }
            }
        });
        let expected: Vec<(Vec<String>, u64)> = (0..20)
            .map(|i| {
                let n: u64 = (0..3).map(|round| ((i + round) % 3 + 1) as u64).sum();
                (vec![format!("route=/r{i:02}")], n)
            })
            .collect();
        assert_eq!(counter_values(&snapshotter), expected);
    }

    #[test]
    fn counting_goes_on_after_the_keys_start_over() {
        let recorder = DebuggingRecorder::new();
        let snapshotter = recorder.snapshotter();
        let hot: Arc<str> = Arc::from("/hot");
        metrics::with_local_recorder(&recorder, || {
            increment("reset_total", [Some(("route", &hot)), None], [None, None]);
            // More distinct keys than a thread keeps: the set starts over.
            for i in 0..=MAX_KEYS {
                let r: Arc<str> = Arc::from(format!("/cold{i}"));
                increment(
                    "reset_cold_total",
                    [Some(("route", &r)), None],
                    [None, None],
                );
            }
            increment("reset_total", [Some(("route", &hot)), None], [None, None]);
        });
        let seen = counter_values(&snapshotter);
        assert!(
            seen.contains(&(vec!["route=/hot".to_owned()], 2)),
            "{:?}",
            &seen[..3]
        );
        assert_eq!(seen.len(), MAX_KEYS + 2);
    }

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
        let seen = counter_values(&snapshotter);
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
