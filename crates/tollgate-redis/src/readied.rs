//! The Tower convention every layer here follows when a request waits
//! before calling the inner service.

/// Takes the readied inner service for a request that calls it later (after
/// waiting for Redis), leaving a fresh clone in its place that will be
/// polled ready before its own call. A request that calls the inner service
/// at once uses it in place instead: no clone.
pub fn take_readied<S: Clone>(inner: &mut S) -> S {
    let clone = inner.clone();
    std::mem::replace(inner, clone)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A service whose clones are told apart, as a clone of a readied
    /// Tower service is a different, unreadied one.
    #[derive(Debug)]
    struct Svc(u32);

    impl Clone for Svc {
        fn clone(&self) -> Self {
            Svc(self.0 + 1)
        }
    }

    #[test]
    fn the_readied_one_is_taken_and_a_clone_stays() {
        let mut slot = Svc(0);
        let taken = take_readied(&mut slot);
        assert_eq!(taken.0, 0, "the readied instance goes with the request");
        assert_eq!(slot.0, 1, "a fresh clone stays for the next call");
    }
}
