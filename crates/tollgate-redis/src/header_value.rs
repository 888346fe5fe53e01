//! Header values the layers write on every response.

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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_read_back_as_written() {
        for n in [0, 1, 9, 10, 1023, 1024, 65_535, 999_999, u64::MAX] {
            assert_eq!(number(n).to_str().ok(), Some(n.to_string().as_str()));
        }
    }
}
