//! Header values the layers write on every response.

use std::cell::RefCell;
use std::sync::LazyLock;

use http::HeaderValue;

/// Numbers below this have a value made once ([`number`] of one is a
/// pointer copy).
pub const SMALL_NUMBERS: u64 = 1024;

/// The values of the small numbers most responses carry (remaining
/// tokens, seconds to a reset, an `Age`), made once and static: a clone
/// copies a pointer (no allocation, no reference count).
static SMALL: LazyLock<Vec<HeaderValue>> = LazyLock::new(|| {
    (0..SMALL_NUMBERS)
        .map(|n| HeaderValue::from_static(Box::leak(n.to_string().into_boxed_str())))
        .collect()
});

/// `n` as a header value: shared for a small number, one allocation for a
/// larger one (`HeaderValue::from(u64)` makes two).
pub fn number(n: u64) -> HeaderValue {
    if let Some(v) = usize::try_from(n).ok().and_then(|i| SMALL.get(i)) {
        return v.clone();
    }
    let mut buf = itoa::Buffer::new();
    let digits = buf.format(n).as_bytes();
    HeaderValue::from_bytes(digits).unwrap_or_else(|_| HeaderValue::from(n))
}

/// A thread's last value of one header and what it was made from, for a
/// `thread_local!`: consecutive responses mostly carry the same value (a
/// limit, a policy name, a cache hit's `Cache-Status` within one second),
/// and cloning the kept one touches a reference count no other thread
/// does, where making it formats and allocates.
pub struct LastValue<K>(RefCell<Option<(K, HeaderValue)>>);

impl<K> LastValue<K> {
    /// Nothing kept yet.
    pub const fn new() -> Self {
        LastValue(RefCell::new(None))
    }

    /// The kept value if its key `matches`, else the one `make` returns
    /// with its key, which is kept instead (`None` when `make` fails).
    pub fn get(
        &self,
        matches: impl FnOnce(&K) -> bool,
        make: impl FnOnce() -> Option<(K, HeaderValue)>,
    ) -> Option<HeaderValue> {
        let Ok(mut last) = self.0.try_borrow_mut() else {
            return make().map(|(_, v)| v);
        };
        if let Some((k, v)) = &*last
            && matches(k)
        {
            return Some(v.clone());
        }
        let (k, v) = make()?;
        *last = Some((k, v.clone()));
        Some(v)
    }
}

impl<K> Default for LastValue<K> {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_last_value_is_kept_until_another_key_comes() {
        let last = LastValue::new();
        let mut made = 0;
        let mut get = |n: u64| {
            last.get(
                |k| *k == n,
                || {
                    made += 1;
                    Some((n, HeaderValue::from(n)))
                },
            )
        };
        assert_eq!(get(7), Some(HeaderValue::from_static("7")));
        assert_eq!(get(7), Some(HeaderValue::from_static("7")));
        assert_eq!(get(8), Some(HeaderValue::from_static("8")));
        assert_eq!(get(7), Some(HeaderValue::from_static("7")));
        assert_eq!(made, 3, "a repeat is the kept value, a change makes one");
        let failed: Option<HeaderValue> = last.get(|_| false, || None);
        assert_eq!(failed, None);
    }

    #[test]
    fn numbers_read_back_as_written() {
        for n in [0, 1, 9, 10, 1023, 1024, 65_535, 999_999, u64::MAX] {
            assert_eq!(number(n).to_str().ok(), Some(n.to_string().as_str()));
        }
    }
}
