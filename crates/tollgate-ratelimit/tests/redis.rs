//! RateLimitLayer against real Redis: standalone and cluster.

mod common;

use std::time::Duration;

use common::*;
use futures::future::join_all;
use tollgate_ratelimit::{
    Algorithm, Cost, Outcome, Plan, Policy, PolicyTable, Quota, RateLimiter, Source,
};
use tollgate_redis::RedisHandle;
use tollgate_redis::fred::interfaces::{ClientLike, ClusterInterface, KeysInterface};
use tollgate_redis::fred::types::{ClusterHash, CustomCommand, Value};

redis_tests!(
    exact_across_three_instances,
    all_or_nothing,
    golden_headers,
    grpc_resource_exhausted,
    ipv6_prefix_shares_a_bucket,
    admin_peek_and_reset,
    plans_and_shadow,
    shadow_policy_stays_out_of_the_headers,
    windows_in_redis,
    a_clock_gone_back_keeps_counting_the_window,
    plans_with_other_windows_count_apart,
    lease_mode_stays_within_bound,
    lease_takes_one_chunk_at_a_time,
    a_shared_policy_leases_one_chunk_in_all,
    a_reset_reaches_every_instance,
    a_reset_is_heard_after_the_subscription_reconnects,
);

fn table(policies: Vec<Policy>, default: &[&str]) -> PolicyTable {
    let mut b = PolicyTable::builder();
    for p in policies {
        b = b.policy(p);
    }
    b.default_policies(default).build().unwrap()
}

/// Three instances (each its own handle and layer) sharing one Redis, 64
/// concurrent requests each, burst 100: exactly 100 admitted.
async fn exact_across_three_instances(url: String) {
    let mut svcs = Vec::new();
    for _ in 0..3 {
        let h = connect(&url).await;
        let t = table(vec![Policy::new("burst", Quota::per_hour(100))], &["burst"]);
        svcs.push(service(
            RateLimiter::builder(t).redis(h).deny_cache(0).build(),
        ));
    }
    let futs = svcs.iter().flat_map(|s| {
        (0..64).map(move |_| {
            let s = s.clone();
            async move {
                send(&s, req("/x", "198.51.100.1:1"))
                    .await
                    .status()
                    .as_u16()
            }
        })
    });
    let statuses = join_all(futs).await;
    let ok = statuses.iter().filter(|&&s| s == 200).count();
    let limited = statuses.iter().filter(|&&s| s == 429).count();
    assert_eq!((ok, limited), (100, 92), "{statuses:?}");
}

/// The second policy denies: the first policy's key is left untouched.
async fn all_or_nothing(url: String) {
    let h = connect(&url).await;
    let t = table(
        vec![
            Policy::new("wide", Quota::per_hour(10)),
            Policy::new("narrow", Quota::per_hour(1)),
        ],
        &["wide", "narrow"],
    );
    let limiter = RateLimiter::builder(t)
        .redis(h.clone())
        .deny_cache(0)
        .policy_header(true)
        .build();
    let svc = service(limiter.clone());
    assert_eq!(send(&svc, req("/", "192.0.2.1:1")).await.status(), 200);
    let key = h.keys("ratelimit").tagged("ip:192.0.2.1", &["wide"]);
    let before: Option<String> = h
        .call({
            let key = key.clone();
            |c| async move { c.get(key).await }
        })
        .await
        .unwrap();
    assert!(before.is_some());
    for _ in 0..3 {
        let res = send(&svc, req("/", "192.0.2.1:1")).await;
        assert_eq!(res.status(), 429);
        assert_eq!(header(&res, "x-ratelimit-policy"), Some("narrow"));
    }
    let after: Option<String> = h.call(|c| async move { c.get(key).await }).await.unwrap();
    assert_eq!(before, after, "a denied request consumed nothing");
    let wide = limiter.peek("wide", "ip:192.0.2.1").await.unwrap();
    assert_eq!(wide.remaining, 9);
    assert_eq!(wide.source, Source::Redis);
}

async fn golden_headers(url: String) {
    let h = connect(&url).await;
    let t = table(vec![Policy::new("api", Quota::per_minute(2))], &["api"]);
    let svc = service(RateLimiter::builder(t).redis(h).ietf_headers(true).build());
    let res = send(&svc, req("/a", "203.0.113.5:9")).await;
    assert_eq!(res.status(), 200);
    assert_eq!(header(&res, "x-ratelimit-limit"), Some("2"));
    assert_eq!(header(&res, "x-ratelimit-remaining"), Some("1"));
    assert_eq!(header(&res, "x-ratelimit-reset"), Some("30"));
    assert_eq!(header(&res, "retry-after"), None);
    assert_eq!(header(&res, "x-ratelimit-policy"), None, "opt-in only");
    let pk = header(&res, "ratelimit")
        .unwrap()
        .rsplit_once("pk=")
        .unwrap()
        .1
        .to_owned();
    assert!(pk.starts_with(':') && pk.ends_with(':') && !pk.contains("203.0.113.5"));
    assert_eq!(
        header(&res, "ratelimit-policy"),
        Some(format!("\"api\";q=2;w=60;pk={pk}").as_str())
    );
    assert_eq!(
        header(&res, "ratelimit"),
        Some(format!("\"api\";r=1;t=30;pk={pk}").as_str())
    );
    let res = send(&svc, req("/a", "203.0.113.5:9")).await;
    assert_eq!(header(&res, "x-ratelimit-remaining"), Some("0"));
    assert_eq!(header(&res, "x-ratelimit-reset"), Some("60"));
    let res = send(&svc, req("/a", "203.0.113.5:9")).await;
    assert_eq!(res.status(), 429);
    assert_eq!(header(&res, "retry-after"), Some("30"));
    assert_eq!(header(&res, "x-ratelimit-limit"), Some("2"));
    assert_eq!(header(&res, "x-ratelimit-remaining"), Some("0"));
    assert_eq!(header(&res, "x-ratelimit-reset"), Some("60"));
    assert_eq!(
        header(&res, "content-type"),
        Some("application/problem+json")
    );
    assert_eq!(
        header(&res, "ratelimit"),
        Some(format!("\"api\";r=0;t=60;pk={pk}").as_str())
    );
    let json: serde_json::Value = serde_json::from_str(&body(res).await).unwrap();
    assert_eq!(json["status"], 429);
    assert_eq!(json["title"], "Too Many Requests");
    assert_eq!(json["retry_after"], 30);
    // Another client has its own quota.
    let res = send(&svc, req("/a", "203.0.113.6:9")).await;
    assert_eq!(header(&res, "x-ratelimit-remaining"), Some("1"));
}

async fn grpc_resource_exhausted(url: String) {
    let h = connect(&url).await;
    let t = PolicyTable::builder()
        .policy(Policy::new("rpc", Quota::per_minute(1)))
        .route("/shop.Cart/*", ["rpc"])
        .build()
        .unwrap();
    let svc = service(RateLimiter::builder(t).redis(h).build());
    let grpc = || {
        let mut r = req("/shop.Cart/AddItem", "203.0.113.7:1");
        r.headers_mut()
            .insert("content-type", "application/grpc+proto".parse().unwrap());
        r
    };
    assert_eq!(send(&svc, grpc()).await.status(), 200);
    let res = send(&svc, grpc()).await;
    assert_eq!(res.status(), 200);
    assert_eq!(header(&res, "grpc-status"), Some("8"));
    assert_eq!(header(&res, "content-type"), Some("application/grpc"));
    assert_eq!(header(&res, "retry-after"), Some("60"));
    assert_eq!(header(&res, "x-ratelimit-remaining"), Some("0"));
    // Paths outside the table are not limited and get no headers.
    let res = send(&svc, req("/other", "203.0.113.7:1")).await;
    assert_eq!(header(&res, "x-ratelimit-limit"), None);
}

async fn ipv6_prefix_shares_a_bucket(url: String) {
    let h = connect(&url).await;
    let t = table(vec![Policy::new("api", Quota::per_hour(5))], &["api"]);
    let svc = service(RateLimiter::builder(t).redis(h).build());
    let a = send(&svc, req("/", "[2001:db8:0:1200::1]:1")).await;
    let b = send(&svc, req("/", "[2001:db8:0:12ff:abcd::9]:1")).await;
    let c = send(&svc, req("/", "[2001:db8:0:1300::1]:1")).await;
    assert_eq!(header(&a, "x-ratelimit-remaining"), Some("4"));
    assert_eq!(header(&b, "x-ratelimit-remaining"), Some("3"), "same /56");
    assert_eq!(
        header(&c, "x-ratelimit-remaining"),
        Some("4"),
        "another /56"
    );
    let d = send(&svc, req("/", "[::ffff:192.0.2.9]:1")).await;
    let e = send(&svc, req("/", "192.0.2.9:2")).await;
    assert_eq!(header(&d, "x-ratelimit-remaining"), Some("4"));
    assert_eq!(
        header(&e, "x-ratelimit-remaining"),
        Some("3"),
        "mapped IPv4 is IPv4"
    );
}

async fn admin_peek_and_reset(url: String) {
    let h = connect(&url).await;
    let t = table(vec![Policy::new("api", Quota::per_hour(3))], &["api"]);
    let limiter = RateLimiter::builder(t).redis(h).build();
    let svc = service(limiter.clone());
    for _ in 0..4 {
        send(&svc, req("/", "192.0.2.1:1")).await;
    }
    let d = limiter.peek("api", "ip:192.0.2.1").await.unwrap();
    assert_eq!((d.remaining, d.limit), (0, 3));
    let d2 = limiter.peek("api", "ip:192.0.2.1").await.unwrap();
    assert_eq!(d2.remaining, 0, "peeking consumes nothing");
    assert!(limiter.peek("nope", "x").await.is_err());
    limiter.reset("api", "ip:192.0.2.1").await.unwrap();
    assert_eq!(
        limiter.peek("api", "ip:192.0.2.1").await.unwrap().remaining,
        3
    );
    let res = send(&svc, req("/", "192.0.2.1:1")).await;
    assert_eq!(res.status(), 200, "reset also clears the deny cache");
    assert_eq!(header(&res, "x-ratelimit-remaining"), Some("2"));
}

async fn plans_and_shadow(url: String) {
    let h = connect(&url).await;
    let t = table(
        vec![
            Policy::new("api", Quota::per_hour(1))
                .with_plan("pro", Quota::per_hour(3))
                .with_unlimited_plan("internal"),
            Policy::new("watch", Quota::per_hour(1)).shadow(true),
        ],
        &["api", "watch"],
    );
    let limiter = RateLimiter::builder(t).redis(h).build();
    let svc = service(limiter.clone());
    let with_plan = |plan: &str, ip: &str| {
        let mut r = req("/", ip);
        r.extensions_mut().insert(Plan(plan.to_owned()));
        r
    };
    for i in 0..3 {
        let res = send(&svc, with_plan("pro", "192.0.2.10:1")).await;
        assert_eq!(res.status(), 200, "pro request {i}");
    }
    assert_eq!(
        send(&svc, with_plan("pro", "192.0.2.10:1")).await.status(),
        429
    );
    assert_eq!(
        send(&svc, with_plan("free", "192.0.2.11:1")).await.status(),
        200
    );
    assert_eq!(
        send(&svc, with_plan("free", "192.0.2.11:1")).await.status(),
        429
    );
    // Shadow-only report: the shadow policy would deny but does not.
    let r = limiter
        .check(&with_plan("internal", "192.0.2.12:1"))
        .await
        .unwrap();
    assert!(r.allowed());
    let r = limiter
        .check(&with_plan("internal", "192.0.2.12:1"))
        .await
        .unwrap();
    assert!(r.allowed());
    assert_eq!(r.decisions.len(), 1, "internal is unlimited on `api`");
    assert_eq!(r.decisions[0].outcome, Outcome::ShadowDenied);
    // Cost: 0 peeks, more than the burst is its own outcome.
    let mut peek = req("/", "192.0.2.13:1");
    peek.extensions_mut().insert(Cost(0));
    assert_eq!(send(&svc, peek).await.status(), 200);
    let mut big = req("/", "192.0.2.13:1");
    big.extensions_mut().insert(Cost(2));
    let res = send(&svc, big).await;
    assert_eq!(res.status(), 400);
    assert_eq!(header(&res, "retry-after"), None);
    assert_eq!(
        send(&svc, req("/", "192.0.2.13:1")).await.status(),
        200,
        "nothing was consumed"
    );
}

/// A shadow policy that would deny does not put `Remaining: 0` (and its
/// name) on a response the enforced policy lets through: clients would
/// back off from a limit that is not enforced. With only shadow policies
/// on a request, theirs are the figures sent.
async fn shadow_policy_stays_out_of_the_headers(url: String) {
    let h = connect(&url).await;
    let t = PolicyTable::builder()
        .policy(Policy::new("api", Quota::per_hour(3)))
        .policy(Policy::new("watch", Quota::per_hour(1)).shadow(true))
        .route("/watched", ["watch"])
        .default_policies(["api", "watch"])
        .build()
        .unwrap();
    let svc = service(RateLimiter::builder(t).redis(h).policy_header(true).build());
    send(&svc, req("/", "192.0.2.30:1")).await;
    let res = send(&svc, req("/", "192.0.2.30:1")).await;
    assert_eq!(res.status(), 200);
    assert_eq!(header(&res, "x-ratelimit-policy"), Some("api"));
    assert_eq!(header(&res, "x-ratelimit-limit"), Some("3"));
    assert_eq!(header(&res, "x-ratelimit-remaining"), Some("1"));
    send(&svc, req("/watched", "192.0.2.31:1")).await;
    let res = send(&svc, req("/watched", "192.0.2.31:1")).await;
    assert_eq!(res.status(), 200, "shadow mode never denies");
    assert_eq!(header(&res, "x-ratelimit-policy"), Some("watch"));
    assert_eq!(header(&res, "x-ratelimit-remaining"), Some("0"));
}

async fn windows_in_redis(url: String) {
    let h = connect(&url).await;
    let t = table(
        vec![
            Policy::new("fixed", Quota::per_hour(2)).with_algorithm(Algorithm::FixedWindow),
            Policy::new("sliding", Quota::per_hour(3)).with_algorithm(Algorithm::SlidingWindow),
        ],
        &["fixed", "sliding"],
    );
    let svc = service(RateLimiter::builder(t).redis(h).policy_header(true).build());
    let a = send(&svc, req("/", "192.0.2.20:1")).await;
    assert_eq!(header(&a, "x-ratelimit-remaining"), Some("1"));
    assert_eq!(header(&a, "x-ratelimit-policy"), Some("fixed"));
    send(&svc, req("/", "192.0.2.20:1")).await;
    let c = send(&svc, req("/", "192.0.2.20:1")).await;
    assert_eq!(c.status(), 429);
    let retry: u64 = header(&c, "retry-after").unwrap().parse().unwrap();
    assert!((1..=3600).contains(&retry));
    let _ = Duration::ZERO;
}

/// Redis's clock going back behind a window (a failover to a node whose
/// clock is behind) does not start the count again: two instances whose
/// script clocks stand on either side of a window's start share its count.
async fn a_clock_gone_back_keeps_counting_the_window(url: String) {
    for algorithm in [Algorithm::FixedWindow, Algorithm::SlidingWindow] {
        let t = || {
            table(
                vec![
                    Policy::new("w", Quota::new(3, Duration::from_secs(1)))
                        .with_algorithm(algorithm),
                ],
                &["w"],
            )
        };
        let ahead = RateLimiter::builder(t())
            .redis(connect(&url).await)
            .deny_cache(0)
            .synthetic_clock(10_000_500)
            .build();
        let behind = RateLimiter::builder(t())
            .redis(connect(&url).await)
            .deny_cache(0)
            .synthetic_clock(9_999_500)
            .build();
        let ip = if algorithm == Algorithm::FixedWindow {
            "192.0.2.50:1"
        } else {
            "192.0.2.51:1"
        };
        for _ in 0..3 {
            assert_eq!(
                send(&service(ahead.clone()), req("/", ip)).await.status(),
                200
            );
        }
        let res = send(&service(behind), req("/", ip)).await;
        assert_eq!(res.status(), 429, "{algorithm:?}: the count goes on");
    }
}

/// A plan whose window is not the policy's own counts in a key of its
/// own: sharing one, each plan read the other's state as an old window
/// and started over, so callers alternating plans (one address, two
/// accounts) were never limited. A reset clears both.
async fn plans_with_other_windows_count_apart(url: String) {
    let h = connect(&url).await;
    let t = table(
        vec![
            Policy::new("win", Quota::per_minute(2))
                .with_algorithm(Algorithm::SlidingWindow)
                .with_plan("pro", Quota::per_hour(2)),
        ],
        &["win"],
    );
    let limiter = RateLimiter::builder(t).redis(h).deny_cache(0).build();
    let svc = service(limiter.clone());
    let on = |plan: Option<&str>| {
        let mut r = req("/", "192.0.2.40:1");
        if let Some(plan) = plan {
            r.extensions_mut().insert(Plan(plan.to_owned()));
        }
        r
    };
    for _ in 0..2 {
        assert_eq!(send(&svc, on(None)).await.status(), 200);
        assert_eq!(send(&svc, on(Some("pro"))).await.status(), 200);
    }
    assert_eq!(send(&svc, on(None)).await.status(), 429);
    assert_eq!(send(&svc, on(Some("pro"))).await.status(), 429);
    limiter.reset("win", "ip:192.0.2.40").await.unwrap();
    assert_eq!(send(&svc, on(None)).await.status(), 200);
    assert_eq!(send(&svc, on(Some("pro"))).await.status(), 200);
}

/// Lease mode: 3 instances × 64 concurrent, burst 100, chunk 10. Tokens are
/// debited in Redis before they are spent: never more than the burst here
/// (no refill within the test). One lease request per key in flight per
/// instance: a cold burst is shared chunk by chunk, so at most a chunk per
/// instance is left unspent.
async fn lease_mode_stays_within_bound(url: String) {
    const BURST: usize = 100;
    const CHUNK: usize = 10;
    const INSTANCES: usize = 3;
    let mut svcs = Vec::new();
    for _ in 0..INSTANCES {
        let h = connect(&url).await;
        let t = table(
            vec![Policy::new("burst", Quota::per_hour(BURST as u32))],
            &["burst"],
        );
        svcs.push(service(
            RateLimiter::builder(t)
                .redis(h)
                .deny_cache(0)
                .lease(CHUNK as u32)
                .build(),
        ));
    }
    let futs = svcs.iter().flat_map(|s| {
        (0..64).map(move |_| {
            let s = s.clone();
            async move {
                send(&s, req("/x", "198.51.100.1:1"))
                    .await
                    .status()
                    .as_u16()
            }
        })
    });
    let statuses = join_all(futs).await;
    let ok = statuses.iter().filter(|&&s| s == 200).count();
    assert!(ok <= BURST, "admitted {ok}");
    assert!(ok >= BURST - CHUNK * INSTANCES, "admitted only {ok}");
    assert!(statuses.iter().all(|&s| s == 200 || s == 429));
}

/// One instance, 45 concurrent requests, chunk 10: they wait for each
/// other's lease instead of each taking a chunk, so Redis is debited
/// exactly 5 chunks and the instance holds the rest of the last one.
async fn lease_takes_one_chunk_at_a_time(url: String) {
    let h = connect(&url).await;
    let t = table(vec![Policy::new("burst", Quota::per_hour(100))], &["burst"]);
    let limiter = RateLimiter::builder(t)
        .redis(h)
        .deny_cache(0)
        .lease(10)
        .build();
    let svc = service(limiter.clone());
    let statuses = join_all((0..45).map(|_| async {
        send(&svc, req("/x", "198.51.100.2:1"))
            .await
            .status()
            .as_u16()
    }))
    .await;
    assert!(statuses.iter().all(|&s| s == 200), "{statuses:?}");
    let d = limiter.peek("burst", "ip:198.51.100.2").await.unwrap();
    assert_eq!(d.remaining, 50, "5 chunks taken from Redis");
    // Sequential requests spend the rest of the lease, which is topped up
    // in the background once three quarters are spent, with what was
    // spent: Redis is never debited more than one chunk ahead of what was
    // admitted, and every request is served.
    for spent in 46..=80u64 {
        assert_eq!(send(&svc, req("/x", "198.51.100.2:1")).await.status(), 200);
        let d = limiter.peek("burst", "ip:198.51.100.2").await.unwrap();
        let debited = 100 - d.remaining;
        assert!(
            (spent..=spent + 10).contains(&debited),
            "after {spent} requests Redis was debited {debited}"
        );
    }
}

/// A policy on several routes' lists (`api` here, on three) is leased a
/// third of the chunk in each list's lease, so one instance never holds
/// more than one chunk of it: the `chunk × instances` bound holds per
/// policy, not per list.
async fn a_shared_policy_leases_one_chunk_in_all(url: String) {
    let h = connect(&url).await;
    let t = PolicyTable::builder()
        .policy(Policy::new("api", Quota::per_hour(100)))
        .policy(Policy::new("write", Quota::per_hour(100)))
        .policy(Policy::new("other", Quota::per_hour(100)))
        .route("/a", ["api"])
        .route("/b", ["api", "write"])
        .default_policies(["api", "other"])
        .build()
        .unwrap();
    let limiter = RateLimiter::builder(t)
        .redis(h)
        .deny_cache(0)
        .lease(30)
        .build();
    let svc = service(limiter.clone());
    for path in ["/a", "/b", "/c"] {
        assert_eq!(send(&svc, req(path, "198.51.100.3:1")).await.status(), 200);
    }
    let d = limiter.peek("api", "ip:198.51.100.3").await.unwrap();
    assert_eq!(100 - d.remaining, 30, "three leases of 10 from `api`");
    let d = limiter.peek("write", "ip:198.51.100.3").await.unwrap();
    assert_eq!(100 - d.remaining, 10);
}

/// Polls `ok` every 20 ms until it holds; fails after `within`.
async fn eventually<F, Fut>(within: Duration, what: &str, mut ok: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let started = std::time::Instant::now();
    while !ok().await {
        assert!(started.elapsed() < within, "{what} within {within:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Exhausts `api` (2 an hour) for `ip` on instance `a`, then has `b` deny
/// it once through Redis, so that `b` answers it from its deny cache.
async fn deny_on_b(a: &RateLimiter, b: &RateLimiter, ip: &str) {
    let (sa, sb) = (service(a.clone()), service(b.clone()));
    while send(&sa, req("/", ip)).await.status() == 200 {}
    eventually(Duration::from_secs(3), "b caches the denial", || async {
        send(&sb, req("/", ip)).await.status() == 429
            && b.check(&req("/", ip)).await.unwrap().decisions[0].source == Source::DenyCache
    })
    .await;
}

/// Waits until every limiter's reset subscription is up.
async fn listening(limiters: &[&RateLimiter]) {
    for l in limiters {
        eventually(Duration::from_secs(5), "subscribed to resets", || async {
            l.is_listening()
        })
        .await;
    }
}

/// Two instances of a table with `api`, 2 an hour, on handles of their own.
async fn two_instances(url: &str) -> (RateLimiter, RateLimiter) {
    let t = || table(vec![Policy::new("api", Quota::per_hour(2))], &["api"]);
    let a = RateLimiter::builder(t()).redis(connect(url).await).build();
    let b = RateLimiter::builder(t()).redis(connect(url).await).build();
    listening(&[&a, &b]).await;
    (a, b)
}

/// A reset on one instance is heard by the others: `b`, which answers the
/// identity from its deny cache (for up to an hour here), lets it through
/// again at once instead of at the cached retry time.
async fn a_reset_reaches_every_instance(url: String) {
    let (a, b) = two_instances(&url).await;
    deny_on_b(&a, &b, "192.0.2.50:1").await;
    a.reset("api", "ip:192.0.2.50").await.unwrap();
    let sb = service(b.clone());
    eventually(Duration::from_secs(3), "b allows after a's reset", || {
        let sb = sb.clone();
        async move { send(&sb, req("/", "192.0.2.50:1")).await.status() == 200 }
    })
    .await;
}

/// `args` sent to every primary (the one server off a cluster).
async fn on_every_primary(h: &RedisHandle, args: &[&'static str]) -> Vec<Value> {
    let client = h.client();
    let primaries = match client.cached_cluster_state() {
        Some(state) => state.unique_primary_nodes().into_iter().map(Some).collect(),
        None => vec![None],
    };
    let mut replies = Vec::new();
    for primary in primaries {
        let cmd = CustomCommand::new_static(args[0], ClusterHash::Random, false);
        let rest: Vec<String> = args[1..].iter().map(|a| (*a).to_owned()).collect();
        let reply = match primary {
            Some(p) => client.with_cluster_node(p).custom(cmd, rest).await,
            None => client.custom(cmd, rest).await,
        };
        replies.push(reply.expect(args[0]));
    }
    replies
}

/// The ids of the connections subscribed to something, on every primary.
async fn pubsub_connections(h: &RedisHandle) -> Vec<u64> {
    let lists = on_every_primary(h, &["CLIENT", "LIST", "TYPE", "pubsub"]).await;
    lists
        .iter()
        .filter_map(Value::as_str)
        .flat_map(|list| {
            list.lines()
                .filter_map(|l| l.strip_prefix("id=")?.split(' ').next()?.parse().ok())
                .collect::<Vec<u64>>()
        })
        .collect()
}

/// The reset subscriptions' connections are cut (`CLIENT KILL TYPE
/// pubsub`): each listener connects and subscribes again, and a reset
/// made after that is heard.
async fn a_reset_is_heard_after_the_subscription_reconnects(url: String) {
    let (a, b) = two_instances(&url).await;
    let h = connect(&url).await;
    let before = pubsub_connections(&h).await;
    assert_eq!(before.len(), 2, "one subscription per instance");
    let killed: i64 = on_every_primary(&h, &["CLIENT", "KILL", "TYPE", "pubsub"])
        .await
        .iter()
        .filter_map(Value::as_i64)
        .sum();
    assert_eq!(killed, 2);
    eventually(Duration::from_secs(10), "both subscribe again", || async {
        let now = pubsub_connections(&h).await;
        now.len() == 2 && now.iter().all(|id| !before.contains(id))
    })
    .await;
    deny_on_b(&a, &b, "192.0.2.51:1").await;
    a.reset("api", "ip:192.0.2.51").await.unwrap();
    let sb = service(b.clone());
    eventually(Duration::from_secs(3), "b allows after a's reset", || {
        let sb = sb.clone();
        async move { send(&sb, req("/", "192.0.2.51:1")).await.status() == 200 }
    })
    .await;
}

/// The reset subscription does not keep the limiter alive: dropping the
/// limiter (every clone) closes its connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropping_the_limiter_closes_its_subscription() {
    let server = tollgate_testkit::RedisServer::start();
    let h = connect(&server.url()).await;
    let t = table(vec![Policy::new("api", Quota::per_hour(2))], &["api"]);
    let limiter = RateLimiter::builder(t).redis(h.clone()).build();
    let svc = service(limiter.clone());
    listening(&[&limiter]).await;
    assert_eq!(send(&svc, req("/", "192.0.2.52:1")).await.status(), 200);
    assert_eq!(pubsub_connections(&h).await.len(), 1);
    drop((limiter, svc));
    eventually(
        Duration::from_secs(3),
        "the subscription is closed",
        || async { pubsub_connections(&h).await.is_empty() },
    )
    .await;
}

/// A denial Redis decided before a reset, whose answer comes back after
/// the reset began, is not cached: the identity's next request is asked
/// of Redis again, not refused from a denial the reset made stale. (The
/// answers come through a proxy that holds them back; the broadcast of the
/// reset, held back too, arrives after the next request was decided.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_denial_answered_after_a_reset_is_not_cached() {
    let server = tollgate_testkit::RedisServer::start();
    let proxy = tollgate_testkit::LatencyProxy::start(server.port(), Duration::ZERO).await;
    let t = table(vec![Policy::new("api", Quota::per_hour(1))], &["api"]);
    let limiter = RateLimiter::builder(t)
        .redis(connect(&proxy.url()).await)
        .build();
    eventually(Duration::from_secs(3), "the limiter hears resets", || {
        let listening = limiter.is_listening();
        async move { listening }
    })
    .await;
    let svc = service(limiter.clone());
    let peer = "192.0.2.60:1";
    assert_eq!(send(&svc, req("/", peer)).await.status(), 200);
    proxy.set_delay(Duration::from_millis(400));
    let denied = tokio::spawn(send(&svc, req("/", peer)));
    tokio::time::sleep(Duration::from_millis(100)).await;
    let reset = {
        let limiter = limiter.clone();
        tokio::spawn(async move { limiter.reset("api", "ip:192.0.2.60").await })
    };
    // The reset's DEL ran (it forgets the local denials before it is sent).
    eventually(Duration::from_secs(3), "the key is deleted", || {
        let empty = server.command(&["DBSIZE"]).ok().and_then(|r| r.as_int()) == Some(0);
        async move { empty }
    })
    .await;
    let res = denied.await.unwrap();
    assert_eq!(res.status(), 429, "decided before the reset");
    let res = send(&svc, req("/", peer)).await;
    assert_eq!(res.status(), 200, "asked of Redis again");
    reset.await.unwrap().unwrap();
}
