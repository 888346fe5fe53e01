//! With axum: `MatchedPath` picks the route, `ConnectInfo` the peer.

use std::net::SocketAddr;

use axum::Router;
use axum::extract::ConnectInfo;
use axum::routing::get;
use tollgate_ratelimit::{Policy, PolicyTable, Quota, RateLimitLayer, RateLimiter};
use tower::ServiceExt;

#[tokio::test]
async fn matched_path_and_connect_info() {
    let table = PolicyTable::builder()
        .policy(Policy::new("users", Quota::per_hour(2)))
        .policy(Policy::new("api", Quota::per_hour(100)))
        .route("/users/{id}", ["users"])
        .unlimited("/health")
        .default_policies(["api"])
        .build()
        .unwrap();
    let layer = RateLimitLayer::new(RateLimiter::builder(table).build());
    let app = Router::new()
        .route("/users/{user_id}", get(|| async { "user" }))
        .route("/health", get(|| async { "ok" }))
        .route("/other", get(|| async { "other" }))
        .layer(layer);
    let call = |path: &str| {
        let mut r = http::Request::builder()
            .uri(path)
            .body(axum::body::Body::empty())
            .unwrap();
        r.extensions_mut()
            .insert(ConnectInfo("198.51.100.4:7".parse::<SocketAddr>().unwrap()));
        app.clone().oneshot(r)
    };
    // Different ids share the route's bucket (by template).
    let a = call("/users/1").await.unwrap();
    assert_eq!(a.headers()["x-ratelimit-remaining"], "1");
    let b = call("/users/2").await.unwrap();
    assert_eq!(b.headers()["x-ratelimit-remaining"], "0");
    assert_eq!(call("/users/3").await.unwrap().status(), 429);
    let h = call("/health").await.unwrap();
    assert!(h.headers().get("x-ratelimit-limit").is_none());
    let o = call("/other").await.unwrap();
    assert_eq!(o.headers()["x-ratelimit-limit"], "100");
}
