//! The Redis store: one Lua script decides every policy of a request,
//! all-or-nothing, and concurrent requests are coalesced into one script
//! call per batch (per cluster slot).

use std::collections::HashMap;
use std::sync::LazyLock;

use tollgate_redis::{BatchConn, BatchOp, Error, Script};

use crate::quota::{Status, Verdict};

pub(crate) static SCRIPT: LazyLock<Script> =
    LazyLock::new(|| Script::new("ratelimit", include_str!("gcra.lua")));

/// One request: its keys (one per policy, one hash tag) and checks.
#[derive(Debug)]
pub(crate) struct Item {
    pub keys: Vec<String>,
    pub checks: super::Checks,
    pub slot: u16,
}

/// The batch operation run by the coalescer.
#[derive(Debug, Default)]
pub(crate) struct DecideOp {
    /// A synthetic clock (µs) for tests; `None` uses Redis `TIME`.
    pub now: Option<u64>,
}

/// Builds `KEYS` and `ARGV` for a batch: each distinct key and each
/// distinct policy parameter set is sent once, every check refers to them
/// by index, and a run of identical requests (one busy client) is sent
/// once with its length (see `gcra.lua`). Such a run costs the script one
/// read and one write, and the command a handful of arguments.
pub(crate) fn encode(items: &[Item], now: Option<u64>) -> (Vec<String>, Vec<i64>) {
    let mut keys: Vec<String> = Vec::new();
    let mut key_index: HashMap<&str, i64> = HashMap::new();
    let mut params: Vec<[i64; 4]> = Vec::new();
    let mut groups: Vec<i64> = Vec::with_capacity(8);
    let mut ngroups = 0i64;
    // The open group: where its repeat count is in `groups`, and its
    // checks (key index, parameter index, cost), flattened.
    let mut open: Option<usize> = None;
    let mut checks: Vec<i64> = Vec::new();
    for it in items {
        checks.clear();
        for (k, c) in it.keys.iter().zip(&it.checks) {
            let ki = *key_index.entry(k.as_str()).or_insert_with(|| {
                keys.push(k.clone());
                keys.len() as i64
            });
            let (algo, a, b) = c.params();
            let set = [i64::from(algo), to_i64(a), to_i64(b), i64::from(c.shadow)];
            let pi = match params.iter().position(|p| *p == set) {
                Some(i) => i + 1,
                None => {
                    params.push(set);
                    params.len()
                }
            };
            checks.extend([ki, pi as i64, i64::from(c.cost)]);
        }
        match open {
            Some(at) if groups[at + 1..] == checks[..] => groups[at] += 1,
            _ => {
                groups.push(it.checks.len() as i64);
                open = Some(groups.len());
                groups.push(1);
                groups.extend_from_slice(&checks);
                ngroups += 1;
            }
        }
    }
    let mut args = Vec::with_capacity(3 + 4 * params.len() + groups.len());
    args.push(now.map_or(0, to_i64));
    args.push(ngroups);
    args.push(params.len() as i64);
    args.extend(params.iter().flatten());
    args.extend(groups);
    (keys, args)
}

fn to_i64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

/// Splits the flat reply into one list of verdicts per item.
pub(crate) fn decode(items: &[Item], reply: &[i64]) -> Result<Vec<Vec<Verdict>>, Error> {
    let want: usize = items.iter().map(|i| i.keys.len() * 4).sum();
    if reply.len() != want {
        return Err(Error::Protocol(
            format!(
                "rate-limit script returned {} values, expected {want}",
                reply.len()
            )
            .into(),
        ));
    }
    let mut out = Vec::with_capacity(items.len());
    let mut chunks = reply.chunks_exact(4);
    for it in items {
        let mut v = Vec::with_capacity(it.keys.len());
        for _ in 0..it.keys.len() {
            let Some(&[st, rem, reset, retry]) = chunks.next() else {
                return Err(Error::Protocol("short rate-limit reply".into()));
            };
            let status = Status::from_code(st)
                .ok_or_else(|| Error::Protocol(format!("unknown rate-limit status {st}").into()))?;
            v.push(Verdict {
                status,
                remaining: rem.max(0) as u64,
                reset_us: reset.max(0) as u64,
                retry_us: retry.max(0) as u64,
            });
        }
        out.push(v);
    }
    Ok(out)
}

impl BatchOp for DecideOp {
    type Item = Item;
    type Output = Vec<Verdict>;

    fn slot(&self, item: &Item) -> u16 {
        item.slot
    }

    async fn execute(
        &self,
        conn: BatchConn<'_>,
        items: Vec<Item>,
    ) -> Result<Vec<Vec<Verdict>>, Error> {
        let (keys, args) = encode(&items, self.now);
        let reply: Vec<i64> = conn.eval(&SCRIPT, keys, args).await?;
        decode(&items, &reply)
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use crate::store::PolicyCheck;

    use proptest::prelude::*;
    use proptest::test_runner::{Config, TestRunner};
    use tollgate_redis::{RedisConfig, RedisHandle};

    use super::*;
    use crate::quota::{Algorithm, Quota, WindowState, gcra, window};

    #[derive(Clone, Debug)]
    enum State {
        Tat(Option<u64>),
        Win(Option<WindowState>),
    }

    /// The Rust model of one script call for one request: the pure
    /// functions plus all-or-nothing.
    fn model(checks: &[PolicyCheck], states: &mut [State], now: u64) -> Vec<Verdict> {
        let mut out = Vec::new();
        let mut next = Vec::new();
        let mut denied = false;
        for (c, s) in checks.iter().zip(states.iter()) {
            let (mut v, n) = match (c.algorithm, s) {
                (Algorithm::Gcra, State::Tat(t)) => {
                    let (v, n) = gcra(c.quota.t_us(), c.quota.tau_us(), *t, now, c.cost);
                    (v, n.map(|n| State::Tat(Some(n))))
                }
                (a, State::Win(w)) => {
                    let (v, n) = window(
                        a == Algorithm::SlidingWindow,
                        u64::from(c.quota.limit()),
                        c.quota.period_us(),
                        *w,
                        now,
                        c.cost,
                    );
                    (v, n.map(|n| State::Win(Some(n))))
                }
                _ => unreachable!(),
            };
            if v.status != Status::Allowed {
                if c.shadow {
                    v.status = Status::ShadowDenied;
                } else {
                    denied = true;
                }
            }
            next.push(if v.status == Status::Allowed { n } else { None });
            out.push(v);
        }
        if !denied {
            for (s, n) in states.iter_mut().zip(next) {
                if let Some(n) = n {
                    *s = n;
                }
            }
        }
        out
    }

    /// The Lua script and the Rust model (itself tested against governor)
    /// agree on every field, on arbitrary multi-policy timelines, with
    /// several requests of one client decided in one call.
    #[test]
    fn lua_matches_rust_model() {
        let server = tollgate_testkit::RedisServer::start();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let handle = rt
            .block_on(RedisHandle::connect(
                RedisConfig::from_url(server.url()).deadline(Duration::from_secs(2)),
            ))
            .unwrap();
        let policy = (
            0u8..3,
            1u32..20,
            1u64..3_000,
            1u32..12,
            proptest::bool::weighted(0.2),
        );
        let strategy = (
            proptest::collection::vec(policy, 1..4),
            // Each step is one script call deciding 1..4 requests of the
            // same client (same keys), as a coalesced batch does.
            proptest::collection::vec(
                (0u64..1_500_000, proptest::collection::vec(0u32..5, 1..4)),
                1..40,
            ),
            0u64..10_000_000_000,
        );
        let mut runner = TestRunner::new(Config {
            cases: 96,
            ..Config::default()
        });
        let counter = std::sync::atomic::AtomicU64::new(0);
        runner
            .run(&strategy, |(policies, steps, offset)| {
                let case = counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let checks: crate::store::Checks = policies
                    .iter()
                    .enumerate()
                    .map(|(i, &(a, limit, period_ms, burst, shadow))| PolicyCheck {
                        index: i,
                        quota: Quota::new(limit, Duration::from_millis(period_ms))
                            .with_burst(burst),
                        algorithm: [
                            Algorithm::Gcra,
                            Algorithm::SlidingWindow,
                            Algorithm::FixedWindow,
                        ][usize::from(a)],
                        cost: 1,
                        shadow,
                    })
                    .collect();
                let keys: Vec<String> = (0..checks.len())
                    .map(|i| format!("t:{{case{case}}}:{i}"))
                    .collect();
                let mut states: Vec<State> = checks
                    .iter()
                    .map(|c| match c.algorithm {
                        Algorithm::Gcra => State::Tat(None),
                        _ => State::Win(None),
                    })
                    .collect();
                let mut now = 1_700_000_000_000_000 + offset;
                for (dt, costs) in steps {
                    now += dt;
                    let mut want = Vec::new();
                    let mut items = Vec::new();
                    for &cost in &costs {
                        let mut checks = checks.clone();
                        for c in &mut checks {
                            c.cost = cost;
                        }
                        want.push(model(&checks, &mut states, now));
                        items.push(Item {
                            keys: keys.clone(),
                            checks,
                            slot: 0,
                        });
                    }
                    let (k, a) = encode(&items, Some(now));
                    prop_assert_eq!(k.len(), keys.len(), "each key is sent once");
                    let reply: Vec<i64> = rt.block_on(handle.eval(&SCRIPT, k, a)).unwrap();
                    let got = decode(&items, &reply).unwrap();
                    prop_assert_eq!(got, want, "at now={} costs={:?}", now, costs);
                }
                Ok(())
            })
            .unwrap();
    }
}
