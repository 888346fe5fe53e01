//! Where decisions are made: Redis (exact, shared) or in process.

pub(crate) mod memory;
pub(crate) mod redis;

use smallvec::SmallVec;

use crate::quota::{Algorithm, Quota, Verdict};

/// The policies of one request: inline for up to two (no allocation).
pub(crate) type Checks = SmallVec<[PolicyCheck; 2]>;

/// One verdict per policy of a request, in order.
pub(crate) type Verdicts = SmallVec<[Verdict; 2]>;

/// One policy of one request, as the stores see it.
#[derive(Clone, Debug)]
pub(crate) struct PolicyCheck {
    /// Index of the policy in the table.
    pub index: usize,
    pub quota: Quota,
    pub algorithm: Algorithm,
    pub cost: u32,
    pub shadow: bool,
}

impl PolicyCheck {
    /// `(algorithm, a, b)` as the Lua script takes them.
    pub(crate) fn params(&self) -> (u8, u64, u64) {
        match self.algorithm {
            Algorithm::Gcra => (1, self.quota.t_us(), self.quota.tau_us()),
            a => (
                a.code(),
                u64::from(self.quota.limit()),
                self.quota.period_us(),
            ),
        }
    }
}
