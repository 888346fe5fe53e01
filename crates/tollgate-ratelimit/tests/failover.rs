//! Redis down (killed, or a Sentinel failing over), frozen, back: no 5xx
//! (unless a policy fails closed), the headers stay, and decisions return
//! to Redis.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use common::*;
use tollgate_ratelimit::{
    FailureMode, MissingKey, Policy, PolicyTable, Quota, RateLimiter, Source,
};
use tollgate_testkit::{RedisCluster, RedisSentinel, RedisServer};

fn table(mode: FailureMode) -> PolicyTable {
    PolicyTable::builder()
        .policy(Policy::new("api", Quota::per_hour(100_000)).with_failure_mode(mode))
        .default_policies(["api"])
        .build()
        .unwrap()
}

async fn source_of(limiter: &RateLimiter) -> Source {
    let r = limiter.check(&req("/", "192.0.2.1:1")).await.unwrap();
    r.decisions[0].source
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_redis_under_traffic() {
    let mut server = RedisServer::start();
    let url = server.url();
    through_an_outage(&url, &mut server, RedisServer::kill, RedisServer::restart).await;
}

/// Behind a Sentinel: the primary killed, decisions fall back until the
/// replica is promoted, then return to Redis there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sentinel_failover_under_traffic() {
    let mut sentinel = RedisSentinel::start();
    let url = sentinel.url();
    through_an_outage(
        &url,
        &mut sentinel,
        |s| {
            s.kill_primary();
        },
        |s| {
            // The node still running is the replica the Sentinel promotes.
            let replica = s.nodes().iter().position(RedisServer::is_running);
            s.wait_for_promotion(replica.expect("a node still runs"));
        },
    )
    .await;
}

/// Redis Cluster: one primary dies and its replica takes over.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_failover_under_traffic() {
    let mut cluster = RedisCluster::start_with_replicas();
    let url = cluster.url();
    through_an_outage(
        &url,
        &mut cluster,
        |c| c.node_mut(0).kill(),
        |c| {
            c.wait_for_promotion(c.partner(0));
        },
    )
    .await;
}

/// Traffic through `down(redis)` and `up(redis)`: no 5xx, the headers on
/// every response, no request stalled, decisions in process while Redis
/// is down and back on Redis afterwards.
async fn through_an_outage<T>(url: &str, redis: &mut T, down: fn(&mut T), up: fn(&mut T)) {
    let h = connect_with(url, Duration::from_millis(100)).await;
    let limiter = RateLimiter::builder(table(FailureMode::Fallback))
        .redis(h)
        .build();
    let svc = service(limiter.clone());
    let stop = Arc::new(AtomicBool::new(false));
    let traffic = tokio::spawn({
        let (svc, stop) = (svc.clone(), stop.clone());
        async move {
            let mut seen = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                let started = Instant::now();
                let res = send(&svc, req("/", "192.0.2.1:1")).await;
                seen.push((
                    res.status().as_u16(),
                    header(&res, "x-ratelimit-limit").map(str::to_owned),
                    started.elapsed(),
                ));
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            seen
        }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(source_of(&limiter).await, Source::Redis);
    tokio::task::block_in_place(|| down(redis));
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert_eq!(
        source_of(&limiter).await,
        Source::Memory,
        "fallback while Redis is dead"
    );
    tokio::task::block_in_place(|| up(redis));
    let back = Instant::now();
    while source_of(&limiter).await != Source::Redis {
        assert!(
            back.elapsed() < Duration::from_secs(15),
            "never went back to Redis"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    stop.store(true, Ordering::Relaxed);
    let seen = traffic.await.unwrap();
    assert!(seen.len() > 50, "{}", seen.len());
    for (status, limit, took) in &seen {
        assert_eq!(*status, 200, "{seen:?}");
        assert_eq!(limit.as_deref(), Some("100000"));
        assert!(
            *took < Duration::from_secs(1),
            "a request stalled for {took:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frozen_redis_costs_at_most_the_deadline() {
    let mut server = RedisServer::start();
    let h = connect_with(&server.url(), Duration::from_millis(50)).await;
    let limiter = RateLimiter::builder(table(FailureMode::Fallback))
        .redis(h)
        .build();
    let svc = service(limiter);
    assert_eq!(send(&svc, req("/", "192.0.2.1:1")).await.status(), 200);
    server.pause();
    for _ in 0..10 {
        let started = Instant::now();
        let res = send(&svc, req("/", "192.0.2.1:1")).await;
        assert_eq!(res.status(), 200);
        assert!(header(&res, "x-ratelimit-remaining").is_some());
        assert!(
            started.elapsed() < Duration::from_millis(500),
            "{:?}",
            started.elapsed()
        );
    }
    server.resume();
}

/// Lease mode with Redis frozen: the requests waiting on the one lease
/// request in flight share its failure and answer from the fallback within
/// the deadline, instead of each retrying after it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frozen_redis_with_lease_waiters() {
    let mut server = RedisServer::start();
    let h = connect_with(&server.url(), Duration::from_millis(50)).await;
    let limiter = RateLimiter::builder(table(FailureMode::Fallback))
        .redis(h)
        .lease(10)
        .build();
    let svc = service(limiter);
    assert_eq!(send(&svc, req("/", "192.0.2.1:1")).await.status(), 200);
    server.pause();
    let started = Instant::now();
    let all = futures::future::join_all((0..20).map(|_| send(&svc, req("/", "192.0.2.2:1")))).await;
    let took = started.elapsed();
    server.resume();
    for res in &all {
        assert_eq!(res.status(), 200);
        assert!(header(res, "x-ratelimit-remaining").is_some());
    }
    assert!(took < Duration::from_millis(500), "{took:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fail_closed_and_fail_open() {
    let mut server = RedisServer::start();
    let url = server.url();
    let closed = service(
        RateLimiter::builder(table(FailureMode::FailClosed))
            .redis(connect_with(&url, Duration::from_millis(100)).await)
            .build(),
    );
    let open_limiter = RateLimiter::builder(table(FailureMode::FailOpen))
        .redis(connect_with(&url, Duration::from_millis(100)).await)
        .build();
    let open = service(open_limiter.clone());
    assert_eq!(send(&closed, req("/", "192.0.2.1:1")).await.status(), 200);
    tokio::task::block_in_place(|| server.kill());
    tokio::time::sleep(Duration::from_millis(300)).await;
    let res = send(&closed, req("/", "192.0.2.1:1")).await;
    assert_eq!(res.status(), 503);
    assert_eq!(
        header(&res, "content-type"),
        Some("application/problem+json")
    );
    let res = send(&open, req("/", "192.0.2.1:1")).await;
    assert_eq!(res.status(), 200);
    assert_eq!(source_of(&open_limiter).await, Source::FailOpen);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deny_cache_answers_without_redis() {
    let server = RedisServer::start();
    let h = connect(&server.url()).await;
    let t = PolicyTable::builder()
        .policy(Policy::new("api", Quota::per_hour(1)))
        .default_policies(["api"])
        .build()
        .unwrap();
    let svc = service(RateLimiter::builder(t).redis(h).build());
    assert_eq!(send(&svc, req("/", "192.0.2.1:1")).await.status(), 200);
    assert_eq!(send(&svc, req("/", "192.0.2.1:1")).await.status(), 429);
    // Measure what reading the counter itself costs (its INFO).
    let probe = server.commands_processed();
    let before = server.commands_processed();
    let overhead = before - probe;
    for _ in 0..20 {
        let res = send(&svc, req("/", "192.0.2.1:1")).await;
        assert_eq!(res.status(), 429);
        assert!(header(&res, "retry-after").is_some());
    }
    assert_eq!(
        server.commands_processed(),
        before + overhead,
        "denials answered locally"
    );
    // Another identity still goes to Redis.
    assert_eq!(send(&svc, req("/", "192.0.2.2:1")).await.status(), 200);
    assert!(server.commands_processed() > before + 2 * overhead);
}

#[tokio::test]
async fn missing_key_is_a_response_never_a_panic() {
    let t = PolicyTable::builder()
        .policy(Policy::new("api", Quota::per_hour(1)))
        .default_policies(["api"])
        .build()
        .unwrap();
    let svc = service(RateLimiter::builder(t.clone()).build());
    let bare = || {
        http::Request::builder()
            .uri("/")
            .body(Default::default())
            .unwrap()
    };
    let res = send(&svc, bare()).await;
    assert_eq!(res.status(), 400);
    assert_eq!(
        header(&res, "content-type"),
        Some("application/problem+json")
    );
    let svc = service(
        RateLimiter::builder(t.clone())
            .missing_key(MissingKey::Reject(http::StatusCode::TOO_MANY_REQUESTS))
            .build(),
    );
    assert_eq!(send(&svc, bare()).await.status(), 429);
    let svc = service(
        RateLimiter::builder(t.clone())
            .missing_key(MissingKey::Allow)
            .build(),
    );
    for _ in 0..3 {
        assert_eq!(send(&svc, bare()).await.status(), 200);
    }
    let svc = service(
        RateLimiter::builder(t)
            .missing_key(MissingKey::Shared("anonymous".into()))
            .build(),
    );
    assert_eq!(send(&svc, bare()).await.status(), 200);
    assert_eq!(send(&svc, bare()).await.status(), 429);
}
