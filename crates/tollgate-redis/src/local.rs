//! Per-thread copies of shared strings.
//!
//! An `Arc` cloned on every request by every worker thread bounces its
//! reference count between cores: under load that costs more than the rest
//! of a cheap layer. A label the layers attach to each request (a route
//! template, a tenant) is therefore taken from the current thread's own set,
//! whose reference counts no other thread touches.

use std::cell::RefCell;
use std::collections::HashSet;
use std::sync::Arc;

/// A hash map for the request path whose keys may come from requests
/// (client identities, tenants): foldhash's seeded quality hasher, a
/// fraction of SipHash's cost per lookup. Maps of this kind are bounded by
/// their owners, which keeps crafted collisions cheap.
pub type RequestMap<K, V> = std::collections::HashMap<K, V, foldhash::quality::RandomState>;

/// Most strings one thread keeps; past that a string is allocated per call
/// (route templates and active tenants are bounded in practice).
pub const MAX_LOCAL_STRINGS: usize = 4096;

thread_local! {
    /// Strings may come from requests (a tenant's API key): the seeded
    /// quality hasher, and the size bound, keep crafted collisions cheap.
    static STRINGS: RefCell<HashSet<Arc<str>, foldhash::quality::RandomState>> =
        RefCell::new(HashSet::default());
}

/// `s` as an `Arc<str>` from this thread's own set: no allocation for a
/// string this thread has seen before, and no reference count shared with
/// other threads.
pub fn local_str(s: &str) -> Arc<str> {
    STRINGS.with(|set| {
        let Ok(mut set) = set.try_borrow_mut() else {
            return Arc::from(s);
        };
        if let Some(l) = set.get(s) {
            return l.clone();
        }
        let l: Arc<str> = Arc::from(s);
        if set.len() < MAX_LOCAL_STRINGS {
            set.insert(l.clone());
        }
        l
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_thread_shares_one_copy_other_threads_their_own() {
        let a = local_str("/api/items/{id}");
        let b = local_str("/api/items/{id}");
        assert!(Arc::ptr_eq(&a, &b));
        let other = std::thread::spawn(|| local_str("/api/items/{id}"))
            .join()
            .map_err(|_| "thread panicked");
        let other = other.as_ref().map(|o| Arc::ptr_eq(o, &a));
        assert_eq!(other, Ok(false));
        assert_eq!(&*a, "/api/items/{id}");
    }
}
