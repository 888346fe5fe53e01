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
        .header("host", "demo.test")
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

fn with_cookie(mut req: Request<Body>, cookie: &Option<String>) -> Request<Body> {
    if let Some(c) = cookie {
        req.headers_mut()
            .insert("cookie", c.parse().expect("cookie"));
    }
    req
}

fn set_cookie(headers: &http::HeaderMap) -> Option<String> {
    headers
        .get("set-cookie")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .map(str::to_owned)
}

#[tokio::test]
async fn login_me_sessions_logout() {
    login_me_sessions_logout_on(None).await;
}

/// The same flow on Redis, where the demo also caches session records in
/// process: a revoked device and a logged-out cookie stay out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn login_me_sessions_logout_with_redis() {
    let server = tollgate_testkit::RedisServer::start();
    login_me_sessions_logout_on(Some(server.url())).await;
}

async fn login_me_sessions_logout_on(redis_url: Option<String>) {
    let app = App::build(&config(redis_url), install_metrics())
        .await
        .expect("build");
    let (status, _, _) = call(&app, from_ip("GET", "/api/me", "192.0.2.1")).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);

    let login = || {
        let mut r = from_ip("POST", "/api/auth/login", "192.0.2.1");
        *r.body_mut() = Body::from(r#"{"user":"alice"}"#);
        r.headers_mut()
            .insert("content-type", "application/json".parse().expect("ct"));
        r
    };
    let (status, headers, body) = call(&app, login()).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body, r#"{"user":"alice"}"#);
    let cookie = set_cookie(&headers);
    assert!(
        cookie
            .as_deref()
            .is_some_and(|c| c.starts_with("tollgate_demo="))
    );
    for visits in 1..=2 {
        let (status, _, body) = call(
            &app,
            with_cookie(from_ip("GET", "/api/me", "192.0.2.1"), &cookie),
        )
        .await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(body, format!(r#"{{"user":"alice","visits":{visits}}}"#));
    }
    // A second device logs in; the first revokes it.
    let (_, headers, _) = call(&app, login()).await;
    let other = set_cookie(&headers);
    let (_, _, body) = call(
        &app,
        with_cookie(from_ip("GET", "/api/sessions", "192.0.2.1"), &cookie),
    )
    .await;
    let json: serde_json::Value = serde_json::from_str(&body).expect("json");
    assert_eq!(json["sessions"].as_array().map(Vec::len), Some(2), "{body}");
    let (_, _, body) = call(
        &app,
        with_cookie(from_ip("DELETE", "/api/sessions", "192.0.2.1"), &cookie),
    )
    .await;
    assert_eq!(body, r#"{"revoked":1}"#);
    let (status, _, _) = call(
        &app,
        with_cookie(from_ip("GET", "/api/me", "192.0.2.1"), &other),
    )
    .await;
    assert_eq!(
        status,
        StatusCode::UNAUTHORIZED,
        "the other device is logged out"
    );
    // Logout clears the cookie and stays logged out.
    let (status, headers, _) = call(
        &app,
        with_cookie(from_ip("POST", "/api/auth/logout", "192.0.2.1"), &cookie),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert!(
        headers["set-cookie"]
            .to_str()
            .expect("ascii")
            .contains("Max-Age=0")
    );
    let (status, _, _) = call(
        &app,
        with_cookie(from_ip("GET", "/api/me", "192.0.2.1"), &cookie),
    )
    .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_survives_a_restart_with_redis() {
    let server = tollgate_testkit::RedisServer::start();
    let first = App::build(&config(Some(server.url())), install_metrics())
        .await
        .expect("build");
    let mut login = from_ip("POST", "/api/auth/login", "192.0.2.9");
    *login.body_mut() = Body::from(r#"{"user":"bob"}"#);
    login
        .headers_mut()
        .insert("content-type", "application/json".parse().expect("ct"));
    let (status, headers, _) = call(&first, login).await;
    assert_eq!(status, StatusCode::OK);
    let cookie = set_cookie(&headers);
    drop(first);
    // A new process: new handle, same Redis, no SESSION_SECRET given.
    let second = App::build(&config(Some(server.url())), install_metrics())
        .await
        .expect("build");
    let (status, _, body) = call(
        &second,
        with_cookie(from_ip("GET", "/api/me", "192.0.2.9"), &cookie),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body, r#"{"user":"bob","visits":1}"#);
}

fn json_req(method: &str, path: &str, body: &str) -> Request<Body> {
    let mut r = from_ip(method, path, "192.0.2.50");
    *r.body_mut() = Body::from(body.to_owned());
    r.headers_mut()
        .insert("content-type", "application/json".parse().expect("ct"));
    r
}

/// Responses are written to the cache in the background once their body
/// has been sent: give that a moment.
async fn settle() {
    tokio::time::sleep(std::time::Duration::from_millis(20)).await;
}

#[tokio::test]
async fn a_donation_invalidates_its_campaign() {
    let app = App::build(&config(None), install_metrics())
        .await
        .expect("build");
    let get = || from_ip("GET", "/api/campaigns/church-42", "192.0.2.50");
    let (_, h, body) = call(&app, get()).await;
    assert_eq!(h["x-cache"], "MISS");
    assert!(
        !h.contains_key("x-cache-tags"),
        "the tag header is stripped"
    );
    assert!(body.contains(r#""raised_cents":0"#));
    let (_, h, _) = call(&app, get()).await;
    assert_eq!(h["x-cache"], "HIT");
    // Another church is its own entry and keeps its cache.
    let (_, h, _) = call(
        &app,
        from_ip("GET", "/api/campaigns/church-7", "192.0.2.50"),
    )
    .await;
    assert_eq!(h["x-cache"], "MISS");
    settle().await;
    let (status, _, _) = call(
        &app,
        json_req(
            "POST",
            "/api/donations",
            r#"{"church":"church-42","amount":2500}"#,
        ),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED);
    let (_, h, body) = call(&app, get()).await;
    assert_eq!(h["x-cache"], "MISS", "invalidated by the donation");
    assert!(body.contains(r#""raised_cents":2500"#), "{body}");
    let (_, h, _) = call(
        &app,
        from_ip("GET", "/api/campaigns/church-7", "192.0.2.50"),
    )
    .await;
    assert_eq!(h["x-cache"], "HIT", "{:?}", h.get("cache-status"));
}

#[tokio::test]
async fn updating_a_provider_invalidates_the_list() {
    let app = App::build(&config(None), install_metrics())
        .await
        .expect("build");
    let list = || from_ip("GET", "/api/providers", "192.0.2.51");
    let (_, h, _) = call(&app, list()).await;
    assert_eq!(h["x-cache"], "MISS");
    let (_, h, _) = call(&app, list()).await;
    assert_eq!(h["x-cache"], "HIT");
    let (status, _, _) = call(
        &app,
        json_req(
            "PUT",
            "/api/providers/2",
            r#"{"name":"Bright Dental Care"}"#,
        ),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    let (_, h, body) = call(&app, list()).await;
    assert_eq!(h["x-cache"], "MISS");
    assert!(body.contains("Bright Dental Care"));
    // Uncached routes say so.
    let (_, h, _) = call(&app, from_ip("GET", "/api/ping", "192.0.2.51")).await;
    assert_ne!(h.get("x-cache").map(|v| v.as_bytes()), Some(&b"HIT"[..]));
}

#[tokio::test]
async fn callers_with_api_keys_share_the_public_catalogue() {
    let app = App::build(&config(None), install_metrics())
        .await
        .expect("build");
    let list = |key: &str| {
        let mut req = from_ip("GET", "/api/providers", "192.0.2.52");
        req.headers_mut()
            .insert("x-api-key", http::HeaderValue::from_str(key).expect("key"));
        req
    };
    let (_, h, _) = call(&app, list("starter_a")).await;
    assert_eq!(h["x-cache"], "MISS");
    settle().await;
    let (_, h, _) = call(&app, list("starter_a")).await;
    assert_eq!(h["x-cache"], "HIT", "{:?}", h.get("cache-status"));
    let (_, h, _) = call(&app, list("pro_b")).await;
    assert_eq!(h["x-cache"], "HIT", "{:?}", h.get("cache-status"));
}

#[test]
fn arguments_are_checked() {
    assert!(DemoConfig::from_env_and_args(["--addr".to_owned(), "nonsense".to_owned()]).is_err());
    assert!(DemoConfig::from_env_and_args(["--bogus".to_owned()]).is_err());
    let c = DemoConfig::from_env_and_args(["--addr=127.0.0.1:4000".to_owned()]).expect("ok");
    assert_eq!(c.addr.port(), 4000);
}
