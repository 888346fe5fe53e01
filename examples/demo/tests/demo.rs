//! The demo in process: health and metrics, with and without Redis.

use axum::body::Body;
use http::{Request, StatusCode};
use http_body_util::BodyExt;
use tollgate_demo::{App, DemoConfig, install_metrics};
use tower::ServiceExt;

async fn get(app: &App, path: &str) -> (StatusCode, String) {
    let res = app
        .router()
        .oneshot(Request::get(path).body(Body::empty()).expect("request"))
        .await
        .expect("infallible");
    let status = res.status();
    let body = res.into_body().collect().await.expect("body").to_bytes();
    (status, String::from_utf8_lossy(&body).into_owned())
}

fn config(redis_url: Option<String>) -> DemoConfig {
    DemoConfig {
        addr: "127.0.0.1:0".parse().expect("addr"),
        redis_url,
    }
}

#[tokio::test]
async fn in_process_health_is_ok_and_metrics_render() {
    let app = App::build(&config(None), install_metrics())
        .await
        .expect("build");
    let (status, body) = get(&app, "/health/redis").await;
    assert_eq!(status, StatusCode::OK);
    assert!(body.contains("\"in_process\""), "{body}");
    let (status, _) = get(&app, "/metrics").await;
    assert_eq!(status, StatusCode::OK);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_redis_health_follows_the_server() {
    let mut server = tollgate_testkit::RedisServer::start();
    let app = App::build(&config(Some(server.url())), install_metrics())
        .await
        .expect("build");
    let (status, body) = get(&app, "/health/redis").await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert!(body.contains("\"healthy\""), "{body}");
    server.kill();
    let mut last = (StatusCode::OK, String::new());
    for _ in 0..100 {
        last = get(&app, "/health/redis").await;
        if last.0 == StatusCode::SERVICE_UNAVAILABLE {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert_eq!(last.0, StatusCode::SERVICE_UNAVAILABLE, "{}", last.1);
    assert!(last.1.contains("\"degraded\""), "{}", last.1);
    let (_, metrics) = get(&app, "/metrics").await;
    assert!(
        metrics.contains("tollgate_redis_breaker_state"),
        "{metrics}"
    );
}

async fn call(app: &App, req: Request<Body>) -> (StatusCode, http::HeaderMap, String) {
    let res = app.router().oneshot(req).await.expect("infallible");
    let (parts, body) = res.into_parts();
    let body = body.collect().await.expect("body").to_bytes();
    (
        parts.status,
        parts.headers,
        String::from_utf8_lossy(&body).into_owned(),
    )
}

fn from_ip(method: &str, path: &str, ip: &str) -> Request<Body> {
    let mut req = Request::builder()
        .method(method)
        .uri(path)
        .body(Body::empty())
        .expect("request");
    let addr: std::net::SocketAddr = format!("{ip}:40000").parse().expect("addr");
    req.extensions_mut()
        .insert(axum::extract::ConnectInfo(addr));
    req
}

#[tokio::test]
async fn the_route_table_limits_guest_checkout_per_ip() {
    let app = App::build(&config(None), install_metrics())
        .await
        .expect("build");
    for i in 0..3 {
        let (status, headers, _) =
            call(&app, from_ip("POST", "/api/guest-checkout", "203.0.113.1")).await;
        assert_eq!(status, StatusCode::OK, "request {i}");
        assert_eq!(headers["x-ratelimit-limit"], "3");
        assert_eq!(
            headers["x-ratelimit-remaining"],
            (2 - i).to_string().as_str()
        );
    }
    let (status, headers, body) =
        call(&app, from_ip("POST", "/api/guest-checkout", "203.0.113.1")).await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(headers["retry-after"], "100");
    assert_eq!(headers["content-type"], "application/problem+json");
    assert!(body.contains("guest_checkout"), "{body}");
    // Another client is not affected; other routes have their own limits.
    let (status, _, _) = call(&app, from_ip("POST", "/api/guest-checkout", "203.0.113.2")).await;
    assert_eq!(status, StatusCode::OK);
    let (status, headers, _) = call(&app, from_ip("GET", "/api/ping", "203.0.113.1")).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(headers["x-ratelimit-limit"], "100");
    // Outside /api nothing is limited.
    let (_, headers, _) = call(&app, from_ip("GET", "/health/redis", "203.0.113.1")).await;
    assert!(!headers.contains_key("x-ratelimit-limit"));
}

#[tokio::test]
async fn the_api_key_identifies_the_caller_and_its_plan() {
    let app = App::build(&config(None), install_metrics())
        .await
        .expect("build");
    let with_key = |path: &str, key: &str| {
        let mut r = from_ip("GET", path, "198.51.100.7");
        r.headers_mut()
            .insert("x-api-key", key.parse().expect("header"));
        r
    };
    let (status, headers, _) = call(&app, with_key("/api/ping", "free_alice")).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(headers["x-quota-limit"], "10000");
    // Bring the free key to its monthly limit, then one more request.
    app.usage().record("free_alice", "api_request", 9_999);
    app.usage().flush().await.expect("flush");
    let (status, headers, body) = call(&app, with_key("/api/ping", "free_alice")).await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS, "{body}");
    assert_eq!(headers["x-quota-limit"], "10000");
    assert_eq!(headers["x-quota-remaining"], "0");
    assert!(headers.contains_key("x-quota-reset"));
    // A starter key has no hard limit.
    let (status, headers, _) = call(&app, with_key("/api/ping", "acme")).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(headers["x-quota-limit"], "50000");
    let (status, _, body) = call(&app, with_key("/api/usage", "acme")).await;
    assert_eq!(status, StatusCode::OK);
    let json: serde_json::Value = serde_json::from_str(&body).expect("json");
    assert_eq!(json["plan"], "starter");
    assert_eq!(json["usage"]["api_request"], 2);
    let (_, _, body) = call(&app, with_key("/api/usage/top?metric=api_request", "acme")).await;
    let json: serde_json::Value = serde_json::from_str(&body).expect("json");
    assert_eq!(json["top"][0]["tenant"], "free_alice");
}

#[test]
fn arguments_are_checked() {
    assert!(DemoConfig::from_env_and_args(["--addr".to_owned(), "nonsense".to_owned()]).is_err());
    assert!(DemoConfig::from_env_and_args(["--bogus".to_owned()]).is_err());
    let c = DemoConfig::from_env_and_args(["--addr=127.0.0.1:4000".to_owned()]).expect("ok");
    assert_eq!(c.addr.port(), 4000);
}
