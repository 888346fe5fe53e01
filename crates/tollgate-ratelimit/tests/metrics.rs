//! What the layer reports through the `metrics` facade: allowed, denied and
//! fallback decisions, labelled by policy and route template, never by the
//! identity or the raw path.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::Duration;

use axum::Router;
use axum::extract::ConnectInfo;
use axum::routing::get;
use metrics_util::MetricKind;
use metrics_util::debugging::{DebugValue, DebuggingRecorder};
use tollgate_ratelimit::{Policy, PolicyTable, Quota, RateLimitLayer, RateLimiter};
use tollgate_redis::{RedisConfig, RedisHandle};
use tollgate_testkit::RedisServer;
use tower::ServiceExt;

/// `(name, sorted labels)` → counter value, for this crate's counters.
type Counters = HashMap<(String, Vec<(String, String)>), u64>;

fn counters(recorder: &DebuggingRecorder) -> Counters {
    recorder
        .snapshotter()
        .snapshot()
        .into_vec()
        .into_iter()
        .filter_map(|(key, _, _, value)| {
            let (kind, key) = key.into_parts();
            let name = key.name().to_owned();
            if kind != MetricKind::Counter || !name.starts_with("tollgate_ratelimit_") {
                return None;
            }
            let DebugValue::Counter(n) = value else {
                return None;
            };
            let mut labels: Vec<(String, String)> = key
                .labels()
                .map(|l| (l.key().to_owned(), l.value().to_owned()))
                .collect();
            labels.sort();
            Some(((name, labels), n))
        })
        .collect()
}

fn get_counter(c: &Counters, name: &str, labels: &[(&str, &str)]) -> u64 {
    let mut labels: Vec<(String, String)> = labels
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect();
    labels.sort();
    c.get(&(name.to_owned(), labels)).copied().unwrap_or(0)
}

const DECISIONS: &str = "tollgate_ratelimit_decisions_total";
const FALLBACK: &str = "tollgate_ratelimit_fallback_total";

#[test]
fn counters_carry_policy_and_route_never_the_key() {
    let mut server = RedisServer::start();
    let recorder = DebuggingRecorder::new();
    // A local recorder is per thread: a current-thread runtime keeps every
    // decision (and the batcher task) on this one.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    metrics::with_local_recorder(&recorder, || {
        rt.block_on(async {
            let handle = RedisHandle::connect(
                RedisConfig::from_url(server.url())
                    .namespace("t")
                    .deadline(Duration::from_millis(200)),
            )
            .await
            .unwrap();
            let table = PolicyTable::builder()
                .policy(Policy::new("users", Quota::per_hour(2)))
                .policy(Policy::new("api", Quota::per_hour(100)))
                .route("/users/{id}", ["users"])
                .default_policies(["api"])
                .build()
                .unwrap();
            let limiter = RateLimiter::builder(table).redis(handle).build();
            let app = Router::new()
                .route("/users/{user_id}", get(|| async { "user" }))
                .route("/orgs/{org}/items", get(|| async { "items" }))
                .layer(RateLimitLayer::new(limiter));
            let call = |path: &str, peer: &str| {
                let mut r = http::Request::builder()
                    .uri(path)
                    .body(axum::body::Body::empty())
                    .unwrap();
                r.extensions_mut()
                    .insert(ConnectInfo(peer.parse::<SocketAddr>().unwrap()));
                let app = app.clone();
                async move { app.oneshot(r).await.unwrap().status().as_u16() }
            };

            // Redis up: 2 allowed, then denied by Redis, then by the deny
            // cache (still a denial of `users`).
            let mut seen = Vec::new();
            for _ in 0..4 {
                seen.push(call("/users/42", "203.0.113.9:1").await);
            }
            assert_eq!(seen, [200, 200, 429, 429]);
            assert_eq!(call("/orgs/acme-corp/items", "203.0.113.9:1").await, 200);

            // Redis gone: the in-process fallback decides, and says so.
            server.kill();
            let mut seen = Vec::new();
            for _ in 0..3 {
                seen.push(call("/users/7", "198.51.100.7:1").await);
            }
            assert_eq!(seen, [200, 200, 429]);
        });
    });

    let c = counters(&recorder);
    let users = [("policy", "users"), ("route", "/users/{id}")];
    let with = |extra: (&'static str, &'static str)| {
        let mut l = users.to_vec();
        l.push(extra);
        l
    };
    assert_eq!(
        get_counter(&c, DECISIONS, &with(("outcome", "allowed"))),
        4,
        "{c:#?}"
    );
    assert_eq!(
        get_counter(&c, DECISIONS, &with(("outcome", "denied"))),
        3,
        "{c:#?}"
    );
    assert_eq!(get_counter(&c, FALLBACK, &users), 3, "{c:#?}");
    assert_eq!(
        get_counter(
            &c,
            DECISIONS,
            &[
                ("policy", "api"),
                ("route", "/orgs/{org}/items"),
                ("outcome", "allowed"),
            ],
        ),
        1,
        "the default policy is labelled by axum's route template: {c:#?}"
    );
    assert_eq!(
        get_counter(
            &c,
            "tollgate_ratelimit_deny_cache_hits_total",
            &[("route", "/users/{id}")],
        ),
        1,
        "{c:#?}"
    );
    // Nothing else was counted as a fallback (the `api` call was in Redis).
    let fallbacks: u64 = c
        .iter()
        .filter(|((name, _), _)| name == FALLBACK)
        .map(|(_, n)| n)
        .sum();
    assert_eq!(fallbacks, 3, "{c:#?}");

    // Neither the identity nor the raw path is ever a label value.
    for (name, labels) in c.keys() {
        for (k, v) in labels {
            for secret in [
                "203.0.113.9",
                "198.51.100.7",
                "ip:",
                "/users/42",
                "/users/7",
                "acme-corp",
            ] {
                assert!(!v.contains(secret), "{name} label {k}={v} leaks `{secret}`");
            }
        }
        assert!(
            labels
                .iter()
                .all(|(k, _)| ["policy", "route", "outcome"].contains(&k.as_str())),
            "{name} has unexpected labels {labels:?}"
        );
    }
}
