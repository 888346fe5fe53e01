//! The whole stack (usage → rate limit → handler) on one shared handle
//! against real Redis, through an outage.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::routing::get;
use http::{Request, StatusCode};
use http_body_util::BodyExt;
use tollgate::Tollgate;
use tollgate::ratelimit::{HeaderKey, Policy, PolicyTable, Quota};
use tollgate::redis::{BreakerState, RedisConfig};
use tollgate::usage::{TenantSource, UsageConfig, UsageLayer};
use tollgate_testkit::RedisServer;
use tower::ServiceExt;

async fn wait_for(tg: &Tollgate, want: BreakerState) {
    let h = tg.redis().expect("redis");
    for _ in 0..500 {
        if h.breaker().state() == want {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("breaker never became {want}");
}

async fn health(app: &Router) -> serde_json::Value {
    let res = app
        .clone()
        .oneshot(
            Request::get("/health/redis")
                .body(Body::empty())
                .expect("request"),
        )
        .await
        .expect("infallible");
    let body = res.into_body().collect().await.expect("body").to_bytes();
    serde_json::from_slice(&body).expect("json")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_layer_falls_back_together_and_recovers() {
    // Durable, so usage written before the kill is still there afterwards.
    let mut server =
        RedisServer::start_with_args(&["--appendonly", "yes", "--appendfsync", "always"]);
    let tg = Tollgate::connect_with(
        RedisConfig::from_url(server.url())
            .deadline(Duration::from_millis(50))
            .probe_interval(Duration::from_millis(50)),
    )
    .await
    .expect("connect");
    let table = PolicyTable::builder()
        .policy(Policy::new("api", Quota::per_second(1_000_000)))
        .default_policies(["api"])
        .build()
        .expect("table");
    let usage = tg.usage_tracker(UsageConfig::new().flush_interval(Duration::from_millis(50)));
    let layers = tg
        .layers()
        .usage(UsageLayer::new(
            usage.clone(),
            TenantSource::header("x-api-key"),
        ))
        .rate_limit(
            tg.rate_limiter(table)
                .key(HeaderKey::new(http::HeaderName::from_static("x-api-key")))
                .build(),
        );
    let api = Router::new()
        .route("/api/ping", get(|| async { "pong" }))
        .layer(layers);
    let app = Router::new()
        .route_service("/health/redis", tg.health_service(&["ratelimit", "usage"]))
        .merge(api);

    let json = health(&app).await;
    assert_eq!(json["status"], "healthy");
    assert!(
        json["layers"]
            .as_array()
            .expect("layers")
            .iter()
            .all(|l| l["mode"] == "redis")
    );

    let stop = Arc::new(AtomicBool::new(false));
    let sent = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let (app, stop, sent) = (app.clone(), stop.clone(), sent.clone());
        tasks.push(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let req = Request::get("/api/ping")
                    .header("x-api-key", "acme")
                    .body(Body::empty())
                    .expect("request");
                let res = app.clone().oneshot(req).await.expect("infallible");
                assert_eq!(res.status(), StatusCode::OK, "no 5xx, no denial");
                assert!(
                    res.headers().contains_key("x-ratelimit-limit"),
                    "headers in every mode"
                );
                sent.fetch_add(1, Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    server.kill();
    wait_for(&tg, BreakerState::Open).await;
    let json = health(&app).await;
    assert_eq!(json["status"], "degraded");
    assert!(
        json["layers"]
            .as_array()
            .expect("layers")
            .iter()
            .all(|l| l["mode"] == "fallback")
    );
    tokio::time::sleep(Duration::from_secs(1)).await;
    server.restart();
    wait_for(&tg, BreakerState::Closed).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        t.await.expect("traffic");
    }
    assert_eq!(health(&app).await["status"], "healthy");
    let stats = usage.shutdown().await;
    let counted = usage.usage("acme", None).await.expect("usage")["api_request"];
    let sent = sent.load(Ordering::Relaxed);
    assert_eq!(
        u64::try_from(counted).expect("positive") + stats.dropped,
        sent,
        "every request counted through the outage"
    );
}
