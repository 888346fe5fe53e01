//! The shared handle against real Redis: every topology, faults, scripts,
//! coalescing and health.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tollgate_redis::fred::interfaces::{
    ClientLike, ClusterInterface, KeysInterface, PubsubInterface,
};
use tollgate_redis::fred::types::{ClusterHash, CustomCommand, Value};
use tollgate_redis::{
    BatchConn, BatchOp, BreakerState, CoalesceConfig, Coalescer, Error, HealthService, Notice,
    RedisConfig, RedisHandle, Script, Subscription, Topology,
};
use tollgate_testkit::{LatencyProxy, RedisCluster, RedisSentinel, RedisServer, Replicated, Reply};
use tower::ServiceExt;

const DEADLINE: Duration = Duration::from_millis(50);
/// Scheduling noise allowed on a shared 2-core machine on top of a deadline.
const SLACK: Duration = Duration::from_millis(250);

static INCR_BY: std::sync::LazyLock<Script> = std::sync::LazyLock::new(|| {
    Script::new(
        "incr_by",
        "-- KEYS[1]: counter; ARGV[1]: increment. Returns the new value.\n\
         return redis.call('INCRBY', KEYS[1], ARGV[1])",
    )
});

async fn connect(url: String) -> RedisHandle {
    tollgate_testkit::connect_with_deadline(url, DEADLINE).await
}

async fn wait_for_state(h: &RedisHandle, want: BreakerState, within: Duration) -> Duration {
    let started = Instant::now();
    while h.breaker().state() != want {
        assert!(
            started.elapsed() < within,
            "breaker still {} after {within:?}, wanted {want}",
            h.breaker().state()
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    started.elapsed()
}

/// Runs a test body against a standalone server, a 3-primary cluster and a
/// primary found through Sentinel.
macro_rules! topology_tests {
    ($($name:ident),* $(,)?) => {
        mod standalone {
            $(#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() {
                let server = tollgate_testkit::RedisServer::start();
                super::$name(super::connect(server.url()).await).await;
            })*
        }
        mod cluster {
            $(#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() {
                let cluster = tollgate_testkit::RedisCluster::start();
                super::$name(super::connect(cluster.url()).await).await;
            })*
        }
        mod sentinel {
            $(#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() {
                let sentinel = tollgate_testkit::RedisSentinel::start();
                super::$name(super::connect(sentinel.url()).await).await;
            })*
        }
    };
}

topology_tests!(
    round_trips_and_scripts,
    keys_of_one_identity_share_a_slot,
    coalesces_with_own_answers,
    reports_health,
    a_subscription_hears_its_channel_and_recovers,
);

async fn round_trips_and_scripts(h: RedisHandle) {
    assert_eq!(h.breaker().state(), BreakerState::Closed);
    let key = h.keys("test").tagged("user:1", &["n"]);
    let _: () = h
        .call({
            let key = key.clone();
            |c| async move { c.set(key, 41, None, None, false).await }
        })
        .await
        .expect("SET");
    let n: i64 = h
        .eval(&INCR_BY, vec![key.clone()], vec![1])
        .await
        .expect("script");
    assert_eq!(n, 42);
    let err = h
        .eval::<i64, _, _>(&INCR_BY, vec![key], vec!["not a number"])
        .await
        .expect_err("INCRBY with a string fails inside Redis");
    assert!(
        matches!(
            err,
            Error::Script {
                name: "incr_by",
                ..
            }
        ),
        "{err:?}"
    );
    assert!(!err.is_outage());
    assert_eq!(
        h.breaker().state(),
        BreakerState::Closed,
        "a script error is not an outage"
    );
}

async fn keys_of_one_identity_share_a_slot(h: RedisHandle) {
    // A script touching two keys of one identity must work on a cluster.
    let ks = h.keys("test");
    let a = ks.tagged("tenant:{7}", &["a"]);
    let b = ks.tagged("tenant:{7}", &["b"]);
    static TWO: std::sync::LazyLock<Script> = std::sync::LazyLock::new(|| {
        Script::new(
            "two",
            "-- KEYS[1], KEYS[2]: counters. Returns the sum after incrementing both.\n\
             return redis.call('INCR', KEYS[1]) + redis.call('INCR', KEYS[2])",
        )
    });
    let n: i64 = h
        .eval(&TWO, vec![a, b], Vec::<String>::new())
        .await
        .expect("cross-key script in one slot");
    assert_eq!(n, 2);
}

struct IncrOp {
    batches: Arc<AtomicU64>,
}

impl BatchOp for IncrOp {
    type Item = (String, i64);
    type Output = i64;

    fn slot(&self, item: &Self::Item) -> u16 {
        tollgate_redis::slot(&item.0)
    }

    async fn execute(
        &self,
        conn: BatchConn<'_>,
        items: Vec<Self::Item>,
    ) -> Result<Vec<i64>, Error> {
        self.batches.fetch_add(1, Ordering::Relaxed);
        let pipeline = conn.client().pipeline();
        for (k, by) in &items {
            let _: () = pipeline.incr_by(k.as_str(), *by).await?;
        }
        let out: Vec<i64> = pipeline.all().await?;
        Ok(out)
    }
}

async fn coalesces_with_own_answers(h: RedisHandle) {
    let ks = h.keys("coalesce");
    let batches = Arc::new(AtomicU64::new(0));
    let op = IncrOp {
        batches: batches.clone(),
    };
    let co = Coalescer::new(h.clone(), op, CoalesceConfig::default());
    // 400 concurrent increments over 8 keys: every caller gets the value its
    // own increment produced, so the answers per key are exactly 1..=50.
    let mut tasks = Vec::new();
    for i in 0..400 {
        let co = co.clone();
        let key = ks.tagged(&format!("k{}", i % 8), &[]);
        tasks.push(tokio::spawn(async move {
            (key.clone(), co.submit((key, 1)).await)
        }));
    }
    let mut per_key: std::collections::HashMap<String, Vec<i64>> = Default::default();
    for t in tasks {
        let (key, r) = t.await.expect("task");
        per_key.entry(key).or_default().push(r.expect("submit"));
    }
    assert_eq!(per_key.len(), 8);
    let batches = batches.load(Ordering::Relaxed);
    assert!(
        batches < 400,
        "400 concurrent operations took {batches} round trips"
    );
    for (key, mut v) in per_key {
        v.sort_unstable();
        assert_eq!(v, (1..=50).collect::<Vec<_>>(), "answers for {key}");
    }
}

/// Concurrent lookups of one hot key: every caller gets its own key's
/// value, and no `MGET` names a key twice (Redis copies a hot value once
/// per batch, not once per caller).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hot_key_is_fetched_once_per_batch() {
    let server = RedisServer::start();
    let h =
        RedisHandle::connect(RedisConfig::from_url(server.url()).deadline(Duration::from_secs(5)))
            .await
            .expect("connect");
    let ks = h.keys("hot");
    let keys = [ks.key(&["hot"]), ks.key(&["cold"]), ks.key(&["missing"])];
    let run = |args: &[&str]| server.command(args).expect("command");
    run(&["SET", &keys[0], "H"]);
    run(&["SET", &keys[1], "C"]);
    run(&["CONFIG", "SET", "slowlog-log-slower-than", "0"]);
    run(&["CONFIG", "SET", "slowlog-max-len", "100000"]);
    run(&["SLOWLOG", "RESET"]);
    let gets = Coalescer::new(h.clone(), tollgate_redis::GetOp, CoalesceConfig::default());
    // While Redis is paused the first MGET waits there and the other
    // lookups queue behind it: they go out together, mostly the hot key.
    run(&["CLIENT", "PAUSE", "300", "ALL"]);
    let tasks: Vec<_> = (0..200)
        .map(|i| {
            let which = match i % 10 {
                0 => 1,
                1 => 2,
                _ => 0,
            };
            let (gets, key) = (gets.clone(), keys[which].clone());
            tokio::spawn(async move { (key.clone(), gets.submit(key).await) })
        })
        .collect();
    for t in tasks {
        let (key, value) = t.await.expect("task");
        let want = if key == keys[0] {
            Some("H")
        } else if key == keys[1] {
            Some("C")
        } else {
            None
        };
        let value = value.expect("lookup");
        assert_eq!(value.as_deref(), want.map(str::as_bytes), "value of {key}");
    }
    let Reply::Array(log) = run(&["SLOWLOG", "GET", "-1"]) else {
        panic!("SLOWLOG GET");
    };
    let mgets: Vec<Vec<String>> = log
        .iter()
        .filter_map(|entry| match entry {
            Reply::Array(fields) => match fields.get(3) {
                Some(Reply::Array(args)) => Some(
                    args.iter()
                        .filter_map(|a| match a {
                            Reply::Bulk(s) => Some(s.clone()),
                            _ => None,
                        })
                        .collect::<Vec<_>>(),
                ),
                _ => None,
            },
            _ => None,
        })
        .filter(|args| args.first().is_some_and(|c| c.eq_ignore_ascii_case("mget")))
        .collect();
    assert!(
        !mgets.is_empty() && mgets.len() < 200,
        "200 lookups took {} MGETs",
        mgets.len()
    );
    for args in &mgets {
        let keys = &args[1..];
        let distinct: std::collections::HashSet<&String> = keys.iter().collect();
        assert_eq!(
            distinct.len(),
            keys.len(),
            "an MGET repeats a key: {args:?}"
        );
    }
}

/// Sleeps for the longest item (ms) and answers each item with itself.
struct SleepOp {
    started: Arc<tokio::sync::Notify>,
}

impl BatchOp for SleepOp {
    type Item = u64;
    type Output = u64;

    fn slot(&self, _: &u64) -> u16 {
        0
    }

    async fn execute(&self, _: BatchConn<'_>, items: Vec<u64>) -> Result<Vec<u64>, Error> {
        self.started.notify_one();
        let ms = items.iter().copied().max().unwrap_or(0);
        tokio::time::sleep(Duration::from_millis(ms)).await;
        Ok(items)
    }
}

/// A caller queued behind a slow batch is answered by its own deadline,
/// counted from when it submitted: its batch is cut off when that comes,
/// though the batch alone would have fit in a deadline.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_queued_caller_is_answered_by_its_own_deadline() {
    let server = RedisServer::start();
    let h = RedisHandle::connect(
        RedisConfig::from_url(server.url()).deadline(Duration::from_millis(400)),
    )
    .await
    .expect("connect");
    let started = Arc::new(tokio::sync::Notify::new());
    let co = Coalescer::new(
        h.clone(),
        SleepOp {
            started: started.clone(),
        },
        CoalesceConfig::default(),
    );
    let first = tokio::spawn({
        let co = co.clone();
        async move { co.submit(200).await }
    });
    started.notified().await;
    // Queued while the first batch runs: about 200 ms of its 400 are gone
    // when its own 300 ms batch starts.
    let second = co.submit(300).await;
    assert!(matches!(second, Err(Error::Timeout(_))), "{second:?}");
    assert_eq!(first.await.expect("task").expect("first batch"), 200);
    assert_eq!(co.submit(10).await.expect("a later batch"), 10);
    assert_eq!(h.breaker().state(), BreakerState::Closed);
}

async fn reports_health(h: RedisHandle) {
    h.register_layer("ratelimit");
    let report = h.health().await;
    assert!(report.connected);
    assert!(
        report
            .server_version
            .as_deref()
            .is_some_and(|v| !v.is_empty())
    );
    // What the check at connect reads (fred's, without a command): the
    // same version.
    assert_eq!(
        h.client().server_version().map(|v| v.to_string()),
        report.server_version
    );
    assert!(report.used_memory_bytes.unwrap_or(0) > 0);
    let res = HealthService::new(h.clone())
        .oneshot(http::Request::new(()))
        .await
        .expect("infallible");
    assert_eq!(res.status(), 200);
    let body = http_body_util::BodyExt::collect(res.into_body())
        .await
        .expect("body")
        .to_bytes();
    let json: serde_json::Value = serde_json::from_slice(&body).expect("json");
    assert_eq!(json["status"], "healthy");
    assert_eq!(json["breaker"], "closed");
    assert_eq!(json["layers"][0]["name"], "ratelimit");
    assert_eq!(json["layers"][0]["mode"], "redis");
    // The test servers keep nothing on disk: said once a layer keeps data
    // that must outlive a restart.
    assert_eq!(report.appendonly, Some(false));
    assert_eq!(report.maxmemory_policy.as_deref(), Some("noeviction"));
    assert!(report.warnings.is_empty(), "{:?}", report.warnings);
    h.register_layer("session");
    let report = h.health().await;
    assert_eq!(report.warnings.len(), 1, "{:?}", report.warnings);
    assert!(report.warnings[0].starts_with("appendonly is off"));
}

/// A write through `h` goes through: `key`, new, is incremented to 1.
async fn increments_a_new_key(h: &RedisHandle, key: &'static str) {
    let n: i64 = h
        .call(|c| async move { c.incr(key).await })
        .await
        .unwrap_or_else(|e| panic!("INCR {key}: {e:?}"));
    assert_eq!(n, 1, "{key} was new");
}

/// Traffic from `n` tasks; returns the slowest call seen and a stop flag.
fn traffic(
    h: &RedisHandle,
    n: usize,
) -> (
    Arc<AtomicU64>,
    Arc<AtomicBool>,
    Vec<tokio::task::JoinHandle<()>>,
) {
    let slowest = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let tasks = (0..n)
        .map(|i| {
            let (h, slowest, stop) = (h.clone(), slowest.clone(), stop.clone());
            tokio::spawn(async move {
                let key = format!("traffic:{i}");
                while !stop.load(Ordering::Relaxed) {
                    let started = Instant::now();
                    let k = key.clone();
                    let _ = h.call(|c| async move { c.incr::<i64, _>(k).await }).await;
                    let us = u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX);
                    slowest.fetch_max(us, Ordering::Relaxed);
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
            })
        })
        .collect();
    (slowest, stop, tasks)
}

async fn stop_traffic(stop: Arc<AtomicBool>, tasks: Vec<tokio::task::JoinHandle<()>>) {
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        t.await.expect("traffic task");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_opens_the_breaker_within_a_deadline_and_restart_closes_it() {
    let mut server = RedisServer::start();
    let h = connect(server.url()).await;
    let _: i64 = h
        .eval(&INCR_BY, vec!["k"], vec![1])
        .await
        .expect("load the script");
    let (slowest, stop, tasks) = traffic(&h, 16);
    tokio::time::sleep(Duration::from_millis(100)).await;
    slowest.store(0, Ordering::Relaxed);

    server.kill();
    let opened_after = wait_for_state(&h, BreakerState::Open, Duration::from_secs(5)).await;
    assert!(
        opened_after <= DEADLINE + SLACK,
        "breaker opened after {opened_after:?}"
    );
    // During the outage every call is refused at once.
    let started = Instant::now();
    assert!(matches!(
        h.call(|c| async move { c.get::<Option<i64>, _>("k").await })
            .await,
        Err(Error::Unavailable)
    ));
    assert!(started.elapsed() < Duration::from_millis(5));
    tokio::time::sleep(Duration::from_millis(300)).await;
    let worst = Duration::from_micros(slowest.load(Ordering::Relaxed));
    assert!(
        worst <= DEADLINE + SLACK,
        "a call took {worst:?} during the outage"
    );

    server.restart();
    wait_for_state(&h, BreakerState::Closed, Duration::from_secs(10)).await;
    stop_traffic(stop, tasks).await;
    // The restarted server has an empty script cache: EVALSHA gets NOSCRIPT
    // and the handle reloads the script in the same call.
    let before = h.scripts_reloaded();
    let n: i64 = h
        .eval(&INCR_BY, vec!["k"], vec![5])
        .await
        .expect("script after restart");
    assert_eq!(n, 5, "the restarted server starts empty");
    assert_eq!(h.scripts_reloaded(), before + 1);
    let n: i64 = h
        .eval(&INCR_BY, vec!["k"], vec![1])
        .await
        .expect("cached again");
    assert_eq!(n, 6);
    assert_eq!(h.scripts_reloaded(), before + 1, "loaded once");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pause_opens_the_breaker_within_a_deadline_and_resume_closes_it() {
    let mut server = RedisServer::start();
    let h = connect(server.url()).await;
    let (slowest, stop, tasks) = traffic(&h, 16);
    tokio::time::sleep(Duration::from_millis(100)).await;
    slowest.store(0, Ordering::Relaxed);

    // SIGSTOP: no reset, no error from fred; only our deadline notices.
    server.pause();
    let opened_after = wait_for_state(&h, BreakerState::Open, Duration::from_secs(5)).await;
    assert!(
        opened_after <= DEADLINE + SLACK,
        "breaker opened after {opened_after:?}"
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    let worst = Duration::from_micros(slowest.load(Ordering::Relaxed));
    assert!(
        worst <= DEADLINE + SLACK,
        "a call took {worst:?} while Redis was frozen"
    );
    let health = h.health().await;
    assert!(!health.connected);
    assert_eq!(health.http_status(), 503);

    server.resume();
    wait_for_state(&h, BreakerState::Closed, Duration::from_secs(10)).await;
    stop_traffic(stop, tasks).await;
    increments_a_new_key(&h, "after-resume").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_a_cluster_primary_opens_and_restart_closes() {
    let mut cluster = RedisCluster::start();
    let h = connect(cluster.url()).await;
    let (slowest, stop, tasks) = traffic(&h, 16);
    tokio::time::sleep(Duration::from_millis(100)).await;
    slowest.store(0, Ordering::Relaxed);
    cluster.node_mut(1).kill();
    wait_for_state(&h, BreakerState::Open, DEADLINE + SLACK).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let worst = Duration::from_micros(slowest.load(Ordering::Relaxed));
    assert!(
        worst <= DEADLINE + SLACK,
        "a call took {worst:?} during the outage"
    );
    cluster.restart_node(1);
    wait_for_state(&h, BreakerState::Closed, Duration::from_secs(15)).await;
    stop_traffic(stop, tasks).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_redis_is_cut_off_at_the_deadline() {
    let server = RedisServer::start();
    let proxy = LatencyProxy::start(server.port(), Duration::ZERO).await;
    let h = connect(proxy.url()).await;
    let _: i64 = h
        .call(|c| async move { c.incr("slow").await })
        .await
        .expect("fast");
    proxy.set_delay(Duration::from_millis(400));
    for _ in 0..3 {
        let started = Instant::now();
        let r = h
            .call(|c| async move { c.incr::<i64, _>("slow").await })
            .await;
        assert!(
            matches!(r, Err(Error::Timeout(_)) | Err(Error::Unavailable)),
            "{r:?}"
        );
        assert!(
            started.elapsed() <= DEADLINE + SLACK,
            "took {:?}",
            started.elapsed()
        );
    }
    assert_ne!(
        h.breaker().state(),
        BreakerState::Closed,
        "three timeouts open the breaker"
    );
    proxy.set_delay(Duration::ZERO);
    wait_for_state(&h, BreakerState::Closed, Duration::from_secs(10)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn starting_while_redis_is_down_is_degraded_then_recovers() {
    let mut server = RedisServer::start();
    let url = server.url();
    server.kill();
    let started = Instant::now();
    let h = connect(url).await;
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "a refused connection returns at once"
    );
    assert_ne!(h.breaker().state(), BreakerState::Closed);
    let res = HealthService::new(h.clone())
        .oneshot(http::Request::new(()))
        .await
        .expect("infallible");
    assert_eq!(res.status(), 503);
    assert!(matches!(
        h.call(|c| async move { c.incr::<i64, _>("x").await }).await,
        Err(Error::Unavailable)
    ));
    server.restart();
    wait_for_state(&h, BreakerState::Closed, Duration::from_secs(10)).await;
    increments_a_new_key(&h, "x").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_with_an_acl_user_connects() {
    let server = RedisServer::start_tls();
    let ca = server.ca_pem().expect("CA");
    let h = RedisHandle::connect(RedisConfig::from_url(server.url()).tls_root_ca_pem(ca.clone()))
        .await
        .expect("TLS + ACL connect");
    let n: i64 = h
        .call(|c| async move { c.incr("tls").await })
        .await
        .expect("INCR over TLS");
    assert_eq!(n, 1);
    assert!(h.health().await.connected);

    // The wrong password on the same server is a clear error, quickly.
    let wrong = server
        .url()
        .replace(tollgate_testkit::TLS_PASSWORD, "wrong");
    let started = Instant::now();
    let err = RedisHandle::connect(RedisConfig::from_url(wrong).tls_root_ca_pem(ca))
        .await
        .expect_err("wrong password");
    assert!(matches!(err, Error::Auth { .. }), "{err:?}");
    assert!(started.elapsed() < Duration::from_secs(3));

    // A server certificate nobody trusts is a TLS error, not a hang.
    let err = RedisHandle::connect(RedisConfig::from_url(server.url()))
        .await
        .expect_err("untrusted certificate");
    assert!(matches!(err, Error::Tls { .. }), "{err:?}");
}

/// A cluster reached over TLS as an ACL user (`rediss-cluster://`): the
/// nodes found through the first one are reached over TLS too, commands
/// and scripts run at every primary, and the health probe's write gets
/// through at each.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tls_cluster_with_an_acl_user_works() {
    let cluster = RedisCluster::start_tls();
    let ca = cluster.ca_pem().expect("CA");
    let h = RedisHandle::connect(
        RedisConfig::from_url(cluster.url())
            .tls_root_ca_pem(ca)
            .deadline(Duration::from_secs(2)),
    )
    .await
    .expect("TLS + ACL cluster connect");
    assert_eq!(*h.topology(), Topology::Cluster);
    round_trips_and_scripts(h.clone()).await;
    keys_of_one_identity_share_a_slot(h.clone()).await;
    let report = h.health().await;
    assert!(report.connected, "{report:?}");
    assert_eq!(report.http_status(), 200, "{report:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_password_is_a_clear_error() {
    let server = RedisServer::start_with_args(&["--requirepass", "right"]);
    let url = format!("redis://:wrong@127.0.0.1:{}", server.port());
    let started = Instant::now();
    let err = RedisHandle::connect(RedisConfig::from_url(url))
        .await
        .expect_err("refused");
    assert!(matches!(err, Error::Auth { .. }), "{err:?}");
    assert!(
        !err.to_string().contains("wrong"),
        "no password in the message: {err}"
    );
    assert!(started.elapsed() < Duration::from_secs(3));
    let ok = format!("redis://:right@127.0.0.1:{}", server.port());
    RedisHandle::connect(RedisConfig::from_url(ok))
        .await
        .expect("right password");
}

#[tokio::test]
async fn a_bad_url_is_a_clear_error() {
    for url in [
        "http://127.0.0.1:6379",
        "redis//nope",
        "",
        "redis://:pw@host:notaport",
    ] {
        let started = Instant::now();
        let err = RedisHandle::connect(RedisConfig::from_url(url))
            .await
            .expect_err(url);
        assert!(
            matches!(err, Error::Config { .. } | Error::InvalidUrl { .. }),
            "{url}: {err:?}"
        );
        assert!(!err.to_string().contains(":pw@"), "{err}");
        assert!(started.elapsed() < Duration::from_secs(1));
    }
}

/// What a test subscription's handler saw: a payload, or `None` for
/// [`Notice::Missed`].
type Seen = tokio::sync::mpsc::UnboundedReceiver<Option<Vec<u8>>>;

/// A subscription to `channel` whose notices arrive in the returned
/// receiver (`None`: messages may have been missed).
fn subscribe(h: &RedisHandle, channel: &str) -> (Subscription, Seen) {
    let (tx, seen) = tokio::sync::mpsc::unbounded_channel();
    let sub = Subscription::start(h, channel.to_owned(), move |n| {
        let _ = tx.send(match n {
            Notice::Message(m) => Some(m.to_vec()),
            Notice::Missed => None,
        });
    })
    .expect("subscription");
    (sub, seen)
}

/// Publishes `message` every 100 ms until the subscription hands it over
/// (the subscription may not be up again yet, and a publish may miss the
/// 50 ms deadline on a busy machine); `Missed` notices on the way are
/// skipped. Returns every other message seen before it.
async fn publish_until_heard(sub: &Subscription, seen: &mut Seen, message: &str) -> Vec<Vec<u8>> {
    let started = Instant::now();
    let mut others = Vec::new();
    loop {
        let _ = sub.publish(message.to_owned()).await;
        let wait = tokio::time::sleep(Duration::from_millis(100));
        tokio::pin!(wait);
        loop {
            tokio::select! {
                got = seen.recv() => match got.expect("listener running") {
                    Some(m) if m == message.as_bytes() => return others,
                    Some(m) => others.push(m),
                    None => {}
                },
                () = &mut wait => break,
            }
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "{message:?} was not heard"
        );
    }
}

/// A subscription hands over what is published on its channel and
/// nothing else; when its connection is cut it subscribes again and says
/// that messages may have been missed; dropping it stops the listener.
async fn a_subscription_hears_its_channel_and_recovers(h: RedisHandle) {
    let channel = h.keys("test").key(&["events"]);
    let (sub, mut seen) = subscribe(&h, &channel);
    assert_eq!(sub.channel(), channel);
    let started = Instant::now();
    while !sub.is_listening() {
        assert!(started.elapsed() < Duration::from_secs(5), "subscribed");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(publish_until_heard(&sub, &mut seen, "one").await.is_empty());
    // Another channel's message is not handed over.
    let other = h.keys("test").key(&["other"]);
    let _: i64 = h
        .call(|c| async move { c.publish(other, "elsewhere").await })
        .await
        .expect("PUBLISH");
    let others = publish_until_heard(&sub, &mut seen, "two").await;
    assert!(others.iter().all(|m| m == b"one"), "{others:?}");
    while seen.try_recv().is_ok() {}
    // Cut the connection at whichever primary holds the subscription.
    let client = h.client();
    let primaries = match client.cached_cluster_state() {
        Some(state) => state.unique_primary_nodes().into_iter().map(Some).collect(),
        None => vec![None],
    };
    let mut killed = 0;
    for primary in primaries {
        let cmd = CustomCommand::new_static("CLIENT", ClusterHash::Random, false);
        let args = vec!["KILL", "TYPE", "pubsub"];
        let reply: Value = match primary {
            Some(p) => client.with_cluster_node(p).custom(cmd, args).await,
            None => client.custom(cmd, args).await,
        }
        .expect("CLIENT KILL");
        killed += reply.as_i64().unwrap_or(0);
    }
    // A Sentinel holds a subscription of its own on the primary it watches
    // (its `__sentinel__:hello` channel); it subscribes again by itself.
    let sentinels = i64::from(*h.topology() == Topology::Sentinel);
    assert_eq!(killed, 1 + sentinels, "one subscribed connection");
    let started = Instant::now();
    while seen.recv().await.expect("listener running").is_some() {
        assert!(started.elapsed() < Duration::from_secs(10), "Missed");
    }
    publish_until_heard(&sub, &mut seen, "three").await;
    drop(sub);
    // The handler (and the sender it holds) goes with the listener.
    let closed = tokio::time::timeout(Duration::from_secs(3), async {
        while seen.recv().await.is_some() {}
    });
    assert!(closed.await.is_ok(), "the listener stopped");
}

/// Redis Cluster with replicas: the primary holding a subscription dies
/// and its replica is promoted. The subscription says messages may have
/// been missed, subscribes again at a node that runs, and hears its
/// channel there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscription_outlives_the_failover_of_its_primary() {
    let mut cluster = RedisCluster::start_with_replicas();
    let h = connect(cluster.url()).await;
    let channel = h.keys("test").key(&["events"]);
    let (sub, mut seen) = subscribe(&h, &channel);
    publish_until_heard(&sub, &mut seen, "before").await;
    while seen.try_recv().is_ok() {}
    // The node whose connection holds the subscription.
    let holder = cluster
        .nodes()
        .iter()
        .position(|n| {
            matches!(n.command(&["PUBSUB", "NUMSUB", &channel]),
                Ok(Reply::Array(a)) if a.get(1).and_then(Reply::as_int) == Some(1))
        })
        .expect("a node holds the subscription");
    tokio::task::block_in_place(|| {
        if holder < 3 {
            cluster.fail_over(holder);
        } else {
            cluster.node_mut(holder).kill();
        }
    });
    let started = Instant::now();
    while seen.recv().await.expect("listener running").is_some() {
        assert!(started.elapsed() < Duration::from_secs(10), "Missed");
    }
    publish_until_heard(&sub, &mut seen, "after").await;
}

/// Killing the primary of `k` cuts calls off at the deadline while its
/// replica is promoted; the handle then finds the new primary, closes the
/// breaker and runs scripts there (reloaded: each server has its own
/// script cache), on the data replicated before.
async fn a_failover_moves_the_handle_to_the_promoted_replica(redis: &mut impl Replicated) {
    let h = connect(redis.url()).await;
    let n: i64 = h.eval(&INCR_BY, vec!["k"], vec![41]).await.expect("script");
    assert_eq!(n, 41);
    redis.wait_replicated();
    let (slowest, stop, tasks) = traffic(&h, 16);
    tokio::time::sleep(Duration::from_millis(100)).await;
    slowest.store(0, Ordering::Relaxed);
    let opened = h.health().await.breaker_opened;

    let new = tokio::task::block_in_place(|| redis.fail_over_primary_of("k"));
    wait_for_state(&h, BreakerState::Closed, Duration::from_secs(10)).await;
    assert!(
        h.health().await.breaker_opened > opened,
        "the outage was seen"
    );
    let worst = Duration::from_micros(slowest.load(Ordering::Relaxed));
    assert!(
        worst <= DEADLINE + SLACK,
        "a call took {worst:?} during the failover"
    );
    stop_traffic(stop, tasks).await;

    let before = h.scripts_reloaded();
    let n: i64 = h
        .eval(&INCR_BY, vec!["k"], vec![1])
        .await
        .expect("script on the promoted replica");
    assert_eq!(n, 42, "the replicated value");
    assert_eq!(h.scripts_reloaded(), before + 1);
    assert_eq!(
        redis.node(new).command(&["GET", "k"]),
        Ok(Reply::Bulk("42".into())),
        "written to the new primary"
    );
}

/// Sentinel: the reconnection asks the Sentinel for the promoted replica.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sentinel_failover_moves_the_handle_to_the_promoted_replica() {
    a_failover_moves_the_handle_to_the_promoted_replica(&mut RedisSentinel::start()).await;
}

/// Redis Cluster with replicas: the cluster promotes the replica of the
/// primary holding the key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_failover_moves_the_handle_to_the_promoted_replica() {
    a_failover_moves_the_handle_to_the_promoted_replica(&mut RedisCluster::start_with_replicas())
        .await;
}

/// Sentinel: a planned switch (`SENTINEL FAILOVER`) drops no connection,
/// and the old primary goes on taking writes until a Sentinel demotes it
/// (seconds later), when it throws them away. The handle moves its writes,
/// and its subscriptions, to the new primary before that.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_planned_sentinel_switch_moves_the_handle_before_the_old_primary_is_demoted() {
    let mut sentinel = RedisSentinel::start();
    let h = connect(sentinel.url()).await;
    let (sub, mut seen) = subscribe(&h, &h.keys("test").key(&["events"]));
    publish_until_heard(&sub, &mut seen, "before").await;

    let new = tokio::task::block_in_place(|| sentinel.switch_over());
    let old = 1 - new;
    sentinel.wait_for_handle(&h).await;
    // Heard only if the subscription moved too: a publish reaches the
    // subscribers of the server it is sent to, and the pool sends it to
    // the new primary.
    publish_until_heard(&sub, &mut seen, "after").await;
    assert_eq!(
        tollgate_testkit::role(&sentinel.nodes()[old]).as_deref(),
        Some("master"),
        "the handle moved before the Sentinel demoted the old primary"
    );
}

/// Redis Cluster with replicas: a planned failover (`CLUSTER FAILOVER`)
/// drops no connection; the old primary answers the handle's writes with
/// a redirection to the new one. A call caught in the switch fails as an
/// outage (fred's attempts ran out while the primaries changed), so the
/// layers use their fallbacks, never a reply error of Redis's; none waits
/// past the deadline; no acknowledged write is lost with the demoted
/// primary; and the handle settles on the new primary.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_planned_cluster_failover_moves_the_writes_and_loses_none() {
    let mut cluster = RedisCluster::start_with_replicas();
    let h = connect(cluster.url()).await;
    let slowest = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let writers: Vec<_> = (0..16)
        .map(|i| {
            let (h, slowest, stop) = (h.clone(), slowest.clone(), stop.clone());
            tokio::spawn(async move {
                let (mut acked, mut failed) = (0_i64, 0_i64);
                while !stop.load(Ordering::Relaxed) {
                    let k = format!("planned:{i}");
                    let started = Instant::now();
                    match h.call(|c| async move { c.incr::<i64, _>(k).await }).await {
                        Ok(_) => acked += 1,
                        Err(e) => {
                            assert!(e.is_outage(), "not an outage: {e:?}");
                            failed += 1;
                        }
                    }
                    let us = u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX);
                    slowest.fetch_max(us, Ordering::Relaxed);
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
                (acked, failed)
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(100)).await;
    // Back and forth: each switch is a race the writes may or may not
    // lose to.
    let mut primary = cluster.primary_for_key("planned:0");
    for _ in 0..3 {
        primary = tokio::task::block_in_place(|| cluster.switch_over(primary));
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    stop.store(true, Ordering::Relaxed);
    let mut counts = Vec::new();
    for w in writers {
        counts.push(w.await.expect("writer"));
    }
    let worst = Duration::from_micros(slowest.load(Ordering::Relaxed));
    assert!(
        worst <= DEADLINE + SLACK,
        "a call took {worst:?} during the switch"
    );
    // Every acknowledged increment is in its key, at whichever primary
    // serves it now: none went to the demoted primary and was lost. (A
    // failed call may still have been applied.)
    for (i, (acked, failed)) in counts.iter().enumerate() {
        let k = format!("planned:{i}");
        let got = match cluster.command_for_key(&k, &["GET", &k]) {
            Ok(Reply::Bulk(n)) => n.parse::<i64>().expect("a count"),
            other => panic!("GET {k}: {other:?}"),
        };
        assert!(
            (*acked..=acked + failed).contains(&got),
            "{k}: {got}, {acked} acknowledged, {failed} failed"
        );
    }
    assert_eq!(cluster.primary_for_key("planned:0"), primary);
    wait_for_state(&h, BreakerState::Closed, Duration::from_secs(10)).await;
    increments_a_new_key(&h, "after-switch").await;
}

/// Sentinel: a switch announced while the handle's watcher was cut off
/// from its Sentinel is not heard; the watcher asks the Sentinel for the
/// primary when it reconnects, and the handle moves then, long before the
/// Sentinel demotes the old primary.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_switch_missed_while_cut_off_from_the_sentinel_is_found_on_reconnection() {
    let mut sentinel = RedisSentinel::start();
    // The handle reaches the Sentinel through a proxy that can be cut.
    let proxy = LatencyProxy::start(sentinel.sentinel().port(), Duration::ZERO).await;
    let url = sentinel.url().replace(
        &sentinel.sentinel().port().to_string(),
        &proxy.port().to_string(),
    );
    let h = connect(url).await;
    let subscribed = || {
        matches!(sentinel.sentinel().command(&["CLIENT", "LIST"]),
            Ok(Reply::Bulk(list)) if list.lines().any(|l| l.contains(" sub=1 ")))
    };
    let started = Instant::now();
    while !subscribed() {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "the watcher subscribes"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    proxy.cut();
    let new = tokio::task::block_in_place(|| sentinel.switch_over());
    proxy.restore();
    sentinel.wait_for_handle(&h).await;
    assert_eq!(
        tollgate_testkit::role(&sentinel.nodes()[1 - new]).as_deref(),
        Some("master"),
        "the handle moved before the Sentinel demoted the old primary"
    );
}

/// Writes `k` through `h`; the error, which must say Redis refuses
/// writes, and the breaker then open.
async fn refused_write(h: &RedisHandle, k: &str) {
    let k = k.to_owned();
    let err = h
        .call(|c| async move { c.set::<(), _, _>(k, 1, None, None, false).await })
        .await
        .expect_err("the write is refused");
    assert!(err.refuses_writes() && err.is_outage(), "{err:?}");
    assert_eq!(
        h.breaker().state(),
        BreakerState::Open,
        "open at the first refusal"
    );
    // PING is answered, but the probe waits for a write to succeed.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_ne!(h.breaker().state(), BreakerState::Closed);
}

/// A Redis that answers but refuses writes opens the breaker at the first
/// refusal, so every layer goes to its fallback rather than failing each
/// write (a session saved nowhere, a usage flush retried forever), and it
/// stays open until a write succeeds: over `maxmemory` with nothing to
/// evict (`OOM`, a script's write included), then turned into a replica
/// (`READONLY`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_that_refuses_writes_opens_the_breaker_until_a_write_succeeds() {
    let server = RedisServer::start();
    let h = connect(server.url()).await;
    let _: i64 = h.eval(&INCR_BY, vec!["k"], vec![1]).await.expect("script");
    let ok = Ok(Reply::Status("OK".into()));
    assert_eq!(server.command(&["CONFIG", "SET", "maxmemory", "1"]), ok);
    let err = h
        .eval::<i64, _, _>(&INCR_BY, vec!["k"], vec![1])
        .await
        .expect_err("a script's write is refused");
    assert!(err.refuses_writes() && err.is_outage(), "{err:?}");
    assert_eq!(h.breaker().state(), BreakerState::Open);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_ne!(h.breaker().state(), BreakerState::Closed);
    assert_eq!(server.command(&["CONFIG", "SET", "maxmemory", "0"]), ok);
    wait_for_state(&h, BreakerState::Closed, Duration::from_secs(5)).await;
    let n: i64 = h
        .eval(&INCR_BY, vec!["k"], vec![1])
        .await
        .expect("written again");
    assert_eq!(n, 2);

    let primary = RedisServer::start();
    let port = primary.port().to_string();
    assert_eq!(server.command(&["REPLICAOF", "127.0.0.1", &port]), ok);
    refused_write(&h, "k").await;
    assert_eq!(server.command(&["REPLICAOF", "NO", "ONE"]), ok);
    wait_for_state(&h, BreakerState::Closed, Duration::from_secs(5)).await;
}

/// On a cluster, one primary over `maxmemory` opens the breaker, and the
/// probe writes at every primary: the others taking writes do not close
/// it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_primary_that_refuses_writes_keeps_the_breaker_open() {
    let cluster = RedisCluster::start();
    let h = connect(cluster.url()).await;
    let full = &cluster.nodes()[1];
    let ok = Ok(Reply::Status("OK".into()));
    assert_eq!(full.command(&["CONFIG", "SET", "maxmemory", "1"]), ok);
    // A key of that primary's slots: it answers reads of it (others
    // answer MOVED).
    let key = (0..)
        .map(|n| format!("k{n}"))
        .find(|k| full.command(&["GET", k]) == Ok(Reply::Nil))
        .expect("a key");
    refused_write(&h, &key).await;
    assert_eq!(full.command(&["CONFIG", "SET", "maxmemory", "0"]), ok);
    wait_for_state(&h, BreakerState::Closed, Duration::from_secs(5)).await;
}

/// An ACL user that may not write the probe's key still recovers: the
/// probe's write refused for that key alone (`NOPERM`) shows that Redis
/// takes writes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_acl_user_without_the_probe_key_recovers() {
    let mut server = RedisServer::start();
    let ok = Ok(Reply::Status("OK".into()));
    let acl = [
        "ACL",
        "SETUSER",
        "limited",
        "on",
        ">limited-pw",
        "~tollgate:ratelimit:*",
        "+@all",
    ];
    assert_eq!(server.command(&acl), ok);
    let url = format!("redis://limited:limited-pw@127.0.0.1:{}", server.port());
    let h = connect(url).await;
    let key = h.keys("ratelimit").key(&["k"]);
    let n: i64 = h
        .call(|c| async move { c.incr(key).await })
        .await
        .expect("a permitted key");
    assert_eq!(n, 1);
    server.pause();
    while h.breaker().state() == BreakerState::Closed {
        let _ = h
            .call(|c| async move { c.get::<Option<i64>, _>("tollgate:ratelimit:k").await })
            .await;
    }
    server.resume();
    wait_for_state(&h, BreakerState::Closed, Duration::from_secs(5)).await;
}
