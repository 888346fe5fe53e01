//! The in-process L1: a bounded moka cache of raw values, with a small
//! per-thread front for the responses hit most.
//!
//! A moka hit records the read in shared structures (its read buffer, the
//! entry's access time) and clones the entry's `Arc`; on every worker
//! thread at once, those writes bounce between cores. A hot response is
//! therefore also kept in the current thread's front: a handful of slots
//! holding the decoded entry, checked before moka.
//!
//! The front never answers what the L1 would not:
//! - every change to the L1 (insert, invalidation, clear) bumps a
//!   generation after it is made, and a slot filled under an older
//!   generation is ignored (the generation is read before the moka read
//!   that fills a slot, so a slot can never hold a value older than its
//!   generation says);
//! - a slot expires when its L1 value does (the L1's time to live, from
//!   the value's creation, which precedes its insertion).
//!
//! Slots are found by the URL's key material, not by its store key: a hit
//! on a slot never hashes the URL (the store key is a hash of the
//! material, so one names the same entry as the other).
//!
//! A slot hit often enough under one generation gets a copy of the entry of
//! its own (body and headers), whose reference counts no other thread
//! touches; bodies above [`LOCAL_MAX_BYTES`] are never copied.

use std::cell::RefCell;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;

use crate::entry::{Entry, Stored};
use crate::key::UrlKey;

/// Slots in each thread's front.
const FRONT_SLOTS: usize = 16;

/// Hits under one generation after which a slot holds a copy of its own.
const LOCAL_AFTER_HITS: u32 = 8;

/// Largest entry a thread keeps a copy of its own of (here, and in the
/// per-thread memo of decoded store reads).
pub(crate) const LOCAL_MAX_BYTES: usize = 16 * 1024;

/// One L1 value: the raw bytes, and the decoded response (memoised: every
/// hit after the first shares it).
#[derive(Clone)]
pub(crate) struct L1Value {
    pub(crate) raw: Bytes,
    entry: Arc<std::sync::OnceLock<Option<Arc<Entry>>>>,
    /// When the value was made: it expires from the L1 no sooner than its
    /// time to live after this.
    made: Instant,
}

impl L1Value {
    pub(crate) fn new(raw: Bytes, entry: Option<Arc<Entry>>) -> Self {
        let memo = std::sync::OnceLock::new();
        if let Some(e) = entry {
            let _ = memo.set(Some(e));
        }
        L1Value {
            raw,
            entry: Arc::new(memo),
            made: Instant::now(),
        }
    }

    /// The stored response, when the value is one.
    pub(crate) fn entry(&self) -> Option<Arc<Entry>> {
        self.entry
            .get_or_init(|| match Stored::decode(&self.raw) {
                Ok(Stored::Response(e)) => Some(Arc::new(e)),
                _ => None,
            })
            .clone()
    }
}

/// The L1 of one cache. Cheap to clone (the invalidation listener holds
/// one).
#[derive(Clone)]
pub(crate) struct L1 {
    cache: moka::sync::Cache<String, L1Value>,
    ttl: Duration,
    /// Bumped after every change.
    generation: Arc<AtomicU64>,
    /// Which L1 a front slot belongs to (never reused in a process).
    id: u64,
}

struct Slot {
    l1: u64,
    generation: u64,
    /// The URL's key material.
    material: String,
    until: Instant,
    entry: Arc<Entry>,
    hits: u32,
}

#[derive(Default)]
struct Front {
    slots: Vec<Slot>,
    next: usize,
}

thread_local! {
    static FRONT: RefCell<Front> = RefCell::new(Front::default());
}

impl L1 {
    /// An L1 of at most `max_bytes` (keys and raw values), each value kept
    /// for `ttl`.
    pub(crate) fn new(ttl: Duration, max_bytes: u64) -> Self {
        static IDS: AtomicU64 = AtomicU64::new(0);
        L1 {
            cache: moka::sync::Cache::builder()
                .max_capacity(max_bytes)
                .weigher(|k: &String, v: &L1Value| {
                    u32::try_from(k.len() + v.raw.len()).unwrap_or(u32::MAX)
                })
                .time_to_live(ttl)
                .build(),
            ttl,
            generation: Arc::new(AtomicU64::new(0)),
            id: IDS.fetch_add(1, Ordering::Relaxed),
        }
    }

    /// The raw value under `key`.
    pub(crate) fn get(&self, key: &str) -> Option<L1Value> {
        self.cache.get(key)
    }

    /// Stores `value` under `key`.
    pub(crate) fn insert(&self, key: String, value: L1Value) {
        self.cache.insert(key, value);
        self.bump();
    }

    /// Drops `key`.
    pub(crate) fn invalidate(&self, key: &str) {
        self.cache.invalidate(key);
        self.bump();
    }

    /// Drops everything.
    pub(crate) fn invalidate_all(&self) {
        self.cache.invalidate_all();
        self.bump();
    }

    fn bump(&self) {
        self.generation.fetch_add(1, Ordering::AcqRel);
    }

    /// The decoded response under `url`'s key: from this thread's front
    /// when it holds it under the current generation, else from moka
    /// (filling a slot).
    pub(crate) fn entry(&self, url: &UrlKey) -> Option<Arc<Entry>> {
        let generation = self.generation.load(Ordering::Acquire);
        let now = Instant::now();
        let material = url.material.as_str();
        let found = FRONT.with(|f| {
            let mut f = f.try_borrow_mut().ok()?;
            let slot = f.slots.iter_mut().find(|s| {
                s.l1 == self.id
                    && s.generation == generation
                    && s.material == material
                    && s.until > now
            })?;
            slot.hits = slot.hits.saturating_add(1);
            if slot.hits == LOCAL_AFTER_HITS && slot.entry.body.len() <= LOCAL_MAX_BYTES {
                slot.entry = Arc::new(Entry::new(
                    slot.entry.meta.clone(),
                    Bytes::copy_from_slice(&slot.entry.body),
                ));
            }
            Some(slot.entry.clone())
        });
        if found.is_some() {
            return found;
        }
        // The generation was read before this read: a change made since
        // leaves the slot behind an older generation, never used.
        let value = self.cache.get(url.key())?;
        let entry = value.entry()?;
        let until = value.made + self.ttl;
        FRONT.with(|f| {
            let Ok(mut f) = f.try_borrow_mut() else {
                return;
            };
            let slot = Slot {
                l1: self.id,
                generation,
                material: material.to_owned(),
                until,
                entry: entry.clone(),
                hits: 0,
            };
            let Front { slots, next } = &mut *f;
            // This key's old slot, else a free one, else the next in turn.
            if let Some(old) = slots
                .iter_mut()
                .find(|s| s.l1 == self.id && s.material == material)
            {
                *old = slot;
            } else if slots.len() < FRONT_SLOTS {
                slots.push(slot);
            } else {
                slots[*next % FRONT_SLOTS] = slot;
                *next = next.wrapping_add(1);
            }
        });
        Some(entry)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::entry::test_entry;

    fn value(etag: &str) -> L1Value {
        L1Value::new(Bytes::new(), Some(Arc::new(test_entry(etag, b"body"))))
    }

    fn etag(e: &Entry) -> Option<&str> {
        e.header("etag")
    }

    fn url(material: &str) -> UrlKey {
        UrlKey::new(material.to_owned())
    }

    #[test]
    fn the_front_follows_every_change() {
        let l1 = L1::new(Duration::from_secs(60), 1 << 20);
        let (k, other) = (url("k"), url("other"));
        l1.insert(k.key().to_owned(), value("\"1\""));
        // Enough hits for the slot to hold a copy of its own.
        for _ in 0..2 * LOCAL_AFTER_HITS {
            let e = l1.entry(&k).expect("hit");
            assert_eq!(etag(&e), Some("\"1\""));
        }
        assert!(l1.entry(&other).is_none(), "another URL's slot");
        l1.insert(other.key().to_owned(), value("\"o\""));
        assert_eq!(l1.entry(&other).as_deref().and_then(etag), Some("\"o\""));
        l1.insert(k.key().to_owned(), value("\"2\""));
        assert_eq!(l1.entry(&k).as_deref().and_then(etag), Some("\"2\""));
        l1.invalidate(k.key());
        assert!(l1.entry(&k).is_none());
        assert_eq!(l1.entry(&other).as_deref().and_then(etag), Some("\"o\""));
        l1.insert(k.key().to_owned(), value("\"3\""));
        assert!(l1.entry(&k).is_some());
        l1.invalidate_all();
        assert!(l1.entry(&k).is_none());
    }

    #[test]
    fn fronts_of_two_caches_never_mix() {
        let (a, b) = (
            L1::new(Duration::from_secs(60), 1 << 20),
            L1::new(Duration::from_secs(60), 1 << 20),
        );
        let k = url("k");
        a.insert(k.key().to_owned(), value("\"a\""));
        assert!(a.entry(&k).is_some());
        assert!(b.entry(&k).is_none());
        b.insert(k.key().to_owned(), value("\"b\""));
        assert_eq!(b.entry(&k).as_deref().and_then(etag), Some("\"b\""));
        assert_eq!(a.entry(&k).as_deref().and_then(etag), Some("\"a\""));
    }

    #[test]
    fn a_slot_expires_with_its_value() {
        let l1 = L1::new(Duration::from_millis(50), 1 << 20);
        let k = url("k");
        l1.insert(k.key().to_owned(), value("\"1\""));
        assert!(l1.entry(&k).is_some());
        std::thread::sleep(Duration::from_millis(80));
        assert!(l1.entry(&k).is_none());
    }

    #[test]
    fn a_copy_of_its_own_answers_the_same() {
        let l1 = L1::new(Duration::from_secs(60), 1 << 20);
        let k = url("k");
        l1.insert(k.key().to_owned(), value("\"1\""));
        let first = l1.entry(&k).expect("hit");
        let mut last = first.clone();
        for _ in 0..2 * LOCAL_AFTER_HITS {
            last = l1.entry(&k).expect("hit");
        }
        assert!(!Arc::ptr_eq(&first, &last), "the slot was never copied");
        assert_eq!(first.body, last.body);
        assert_eq!(first.meta.headers, last.meta.headers);
        assert_eq!(first.stored_headers(), last.stored_headers());
    }
}
