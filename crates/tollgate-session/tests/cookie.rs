//! The id's transport without Redis: every Set-Cookie attribute, the
//! `__Host-` rules, header transport, and a parser that never panics.

mod common;

use std::time::Duration;

use axum::body::Body;
use common::*;
use http::{HeaderName, Request};
use proptest::prelude::*;
use tollgate_session::{CookieConfig, Error, SameSite, Sessions};
use tower::ServiceExt;

/// The Set-Cookie headers of a login then a logout, with the id replaced
/// by `<id>`.
async fn login_logout(sessions: Sessions) -> (String, String) {
    let mut c = Client::new(app(sessions));
    let res = c.send("POST", "/set/a/1").await;
    let value = c.cookie_value().unwrap();
    let set = res.set_cookie[0].replace(&value, "<id>");
    let res = c.send("POST", "/logout").await;
    (set, res.set_cookie[0].clone())
}

#[tokio::test]
async fn default_attributes() {
    let (set, removal) = login_logout(Sessions::in_memory()).await;
    assert_eq!(set, "id=<id>; HttpOnly; SameSite=Lax; Secure; Path=/");
    assert_eq!(
        removal,
        "id=; HttpOnly; SameSite=Lax; Secure; Path=/; Max-Age=0; Expires=Thu, 01 Jan 1970 00:00:00 GMT"
    );
}

#[tokio::test]
async fn configured_attributes() {
    let sessions = Sessions::builder()
        .cookie(
            CookieConfig::new()
                .name("sid")
                .domain("example.com")
                .path("/app")
                .same_site(SameSite::Strict)
                .max_age(Duration::from_secs(3600)),
        )
        .build()
        .unwrap();
    let (set, removal) = login_logout(sessions).await;
    assert_eq!(
        set,
        "sid=<id>; HttpOnly; SameSite=Strict; Secure; Path=/app; Domain=example.com; Max-Age=3600"
    );
    assert_eq!(
        removal,
        "sid=; HttpOnly; SameSite=Strict; Secure; Path=/app; Domain=example.com; Max-Age=0; Expires=Thu, 01 Jan 1970 00:00:00 GMT"
    );
}

#[tokio::test]
async fn host_prefix_and_same_site_none() {
    let sessions = Sessions::builder()
        .cookie(
            CookieConfig::new()
                .host_prefixed("sid")
                .same_site(SameSite::None),
        )
        .build()
        .unwrap();
    let (set, removal) = login_logout(sessions).await;
    assert_eq!(
        set,
        "__Host-sid=<id>; HttpOnly; SameSite=None; Secure; Path=/"
    );
    assert_eq!(
        removal,
        "__Host-sid=; HttpOnly; SameSite=None; Secure; Path=/; Max-Age=0; Expires=Thu, 01 Jan 1970 00:00:00 GMT"
    );
    let dev = Sessions::builder()
        .cookie(CookieConfig::new().secure(false).http_only(false))
        .build()
        .unwrap();
    let (set, _) = login_logout(dev).await;
    assert_eq!(set, "id=<id>; SameSite=Lax; Path=/");
}

fn field(r: Result<Sessions, Error>) -> &'static str {
    match r {
        Err(Error::Config { field, .. }) => field,
        other => panic!("expected a config error, got {other:?}"),
    }
}

#[test]
fn builder_refuses_what_would_break_the_cookie() {
    let host = || CookieConfig::new().host_prefixed("sid");
    let b = |c: CookieConfig| Sessions::builder().cookie(c).build();
    assert_eq!(field(b(host().domain("example.com"))), "cookie.domain");
    assert_eq!(field(b(host().path("/app"))), "cookie.path");
    assert_eq!(field(b(host().secure(false))), "cookie.secure");
    assert_eq!(
        field(b(CookieConfig::new().name("__Secure-x").secure(false))),
        "cookie.secure"
    );
    assert_eq!(
        field(b(CookieConfig::new()
            .same_site(SameSite::None)
            .secure(false))),
        "cookie.secure"
    );
    assert_eq!(field(b(CookieConfig::new().name("a b"))), "cookie.name");
    assert_eq!(field(b(CookieConfig::new().name(""))), "cookie.name");
    assert_eq!(field(b(CookieConfig::new().path("app"))), "cookie.path");
    assert_eq!(field(b(CookieConfig::new().domain("a;b"))), "cookie.domain");
    assert_eq!(
        field(Sessions::builder().secret([0u8; 8]).build()),
        "secret"
    );
    assert_eq!(
        field(
            Sessions::builder()
                .signing_keys([0u8; 32], [[0u8; 4]])
                .build()
        ),
        "signing_keys"
    );
    assert_eq!(
        field(Sessions::builder().idle_timeout(Duration::ZERO).build()),
        "idle_timeout"
    );
    assert_eq!(
        field(
            Sessions::builder()
                .idle_timeout(Duration::from_secs(1))
                .touch_after(Duration::from_secs(2))
                .build()
        ),
        "touch_after"
    );
    assert_eq!(
        field(Sessions::builder().memory_capacity(0).build()),
        "memory_capacity"
    );
    assert!(b(host()).is_ok());
}

#[test]
fn max_age_under_a_second_is_refused() {
    let b = |age: Duration| {
        Sessions::builder()
            .cookie(CookieConfig::new().max_age(age))
            .build()
    };
    // Max-Age counts whole seconds: these would be `Max-Age=0`, which
    // deletes the cookie on every response.
    for age in [
        Duration::ZERO,
        Duration::from_millis(1),
        Duration::from_millis(999),
    ] {
        assert_eq!(field(b(age)), "cookie.max_age", "{age:?}");
    }
    assert!(b(Duration::from_secs(1)).is_ok());
}

/// Routes answering with a public caching policy: one creating a session,
/// one ending it, one not touching it.
fn cacheable_app(sessions: Sessions) -> axum::Router {
    use axum::routing::{get, post};
    fn public() -> [(HeaderName, &'static str); 1] {
        [(http::header::CACHE_CONTROL, "public, max-age=600")]
    }
    axum::Router::new()
        .route(
            "/create",
            post(|s: tollgate_session::Session| async move {
                s.insert("a", &1).await?;
                Ok::<_, Error>((public(), "ok"))
            }),
        )
        .route(
            "/read",
            get(|s: tollgate_session::Session| async move {
                let _: Option<u32> = s.get("a").await?;
                Ok::<_, Error>((public(), "ok"))
            }),
        )
        .route(
            "/logout",
            post(|s: tollgate_session::Session| async move {
                s.destroy().await?;
                Ok::<_, Error>((public(), "ok"))
            }),
        )
        .route("/static", get(|| async { (public(), "ok") }))
        .layer(tollgate_session::SessionLayer::new(sessions))
}

/// A response that sets or removes the session id is never cacheable by
/// a shared cache, whatever the handler said; one that does not keeps the
/// handler's policy.
#[tokio::test]
async fn a_response_carrying_the_id_is_never_cached() {
    let cache_control = |res: &http::Response<Body>| -> Vec<String> {
        res.headers()
            .get_all(http::header::CACHE_CONTROL)
            .iter()
            .map(|v| v.to_str().unwrap().to_owned())
            .collect()
    };
    let call = |app: &axum::Router, method: &str, path: &str, cookie: Option<&str>| {
        let mut req = Request::builder().method(method).uri(path);
        if let Some(c) = cookie {
            req = req.header("cookie", c);
        }
        app.clone().oneshot(req.body(Body::empty()).unwrap())
    };
    // Max-Age: every response with a live session re-sends the cookie.
    let sessions = Sessions::builder()
        .cookie(CookieConfig::new().max_age(Duration::from_secs(3600)))
        .build()
        .unwrap();
    let app = cacheable_app(sessions);
    let res = call(&app, "POST", "/create", None).await.unwrap();
    let set = res.headers()["set-cookie"].to_str().unwrap().to_owned();
    assert_eq!(cache_control(&res), ["no-store"], "creating");
    let cookie = set.split(';').next().unwrap().to_owned();
    let res = call(&app, "GET", "/read", Some(&cookie)).await.unwrap();
    assert!(res.headers().contains_key("set-cookie"));
    assert_eq!(cache_control(&res), ["no-store"], "re-sending");
    let res = call(&app, "GET", "/static", Some(&cookie)).await.unwrap();
    assert!(!res.headers().contains_key("set-cookie"));
    assert_eq!(cache_control(&res), ["public, max-age=600"], "untouched");
    let res = call(&app, "POST", "/logout", Some(&cookie)).await.unwrap();
    assert!(
        res.headers()["set-cookie"]
            .to_str()
            .unwrap()
            .contains("Max-Age=0")
    );
    assert_eq!(cache_control(&res), ["no-store"], "removing");

    // The header transport: the id travels in a response header just the same.
    let name = HeaderName::from_static("x-session-id");
    let app = cacheable_app(Sessions::builder().header(name).build().unwrap());
    let res = call(&app, "POST", "/create", None).await.unwrap();
    assert!(res.headers().contains_key("x-session-id"));
    assert_eq!(cache_control(&res), ["no-store"], "header transport");
}

#[tokio::test]
async fn header_transport() {
    let name = HeaderName::from_static("x-session-id");
    let sessions = Sessions::builder().header(name.clone()).build().unwrap();
    let app = app(sessions);
    let call = |method: &str, path: &str, id: Option<&str>| {
        let mut req = Request::builder().method(method).uri(path);
        if let Some(id) = id {
            req = req.header("x-session-id", id);
        }
        app.clone().oneshot(req.body(Body::empty()).unwrap())
    };
    let res = call("POST", "/set/a/1", None).await.unwrap();
    assert!(res.headers().get("set-cookie").is_none());
    let id = res.headers()["x-session-id"].to_str().unwrap().to_owned();
    assert_eq!(id.len(), 43);
    let res = call("GET", "/get/a", Some(&id)).await.unwrap();
    let body = axum::body::to_bytes(res.into_body(), 1024).await.unwrap();
    assert_eq!(body, "\"1\"");
    let res = call("POST", "/logout", Some(&id)).await.unwrap();
    assert_eq!(res.headers()["x-session-id"], "");
    let res = call("GET", "/get/a", Some(&id)).await.unwrap();
    let body = axum::body::to_bytes(res.into_body(), 1024).await.unwrap();
    assert_eq!(body, "none");
}

#[tokio::test]
async fn ids_are_unique_and_long() {
    let app = app(Sessions::in_memory());
    let mut seen = std::collections::HashSet::new();
    for _ in 0..200 {
        let mut c = Client::new(app.clone());
        c.send("POST", "/set/a/1").await;
        let v = c.cookie_value().unwrap();
        assert_eq!(v.len(), 43, "256 bits, base64url");
        assert!(
            v.chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        );
        assert!(seen.insert(v));
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// Whatever a client sends as cookies, the answer is a fresh session
    /// and a 200, never a 500 or a panic.
    #[test]
    fn garbage_cookies_get_a_new_session(
        header in proptest::collection::vec(any::<u8>(), 0..200),
        text in "(id=)?[ -~]{0,120}",
    ) {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async {
            let app = app(Sessions::builder().signing_keys([3u8; 32], [[4u8; 32]]).build().unwrap());
            for raw in [header.clone(), text.clone().into_bytes()] {
                let Ok(value) = http::HeaderValue::from_bytes(&raw) else { continue };
                let req = Request::builder().uri("/get/a").header("cookie", value).body(Body::empty()).unwrap();
                let res = app.clone().oneshot(req).await.unwrap();
                prop_assert_eq!(res.status(), 200);
                let body = axum::body::to_bytes(res.into_body(), 1024).await.unwrap();
                prop_assert_eq!(body, "none");
            }
            Ok(())
        })?;
    }
}
