//! ResponseCacheLayer against real Redis (standalone, cluster) and in
//! memory: HTTP semantics, leaks and poisoning, coalescing, invalidation
//! across instances, Redis failures.

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, Response};
use http_body_util::{BodyExt, Full};
use tollgate_cache::{Cache, ResponseCacheLayer, RouteRule, UserKey};
use tower::util::BoxCloneSyncService;
use tower::{Layer, ServiceExt, service_fn};

use tollgate_testkit::connect as handle;

type Make = Box<dyn Fn() -> Cache + Send + Sync>;

macro_rules! suite {
    ($($name:ident),* $(,)?) => {
        mod memory {
            $(#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() {
                let store = tollgate_cache::MemoryStore::new(1 << 26);
                super::$name(Box::new(move || tollgate_cache::Cache::builder().store(store.clone()).build())).await;
            })*
        }
        mod standalone {
            $(#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() {
                let server = tollgate_testkit::RedisServer::start();
                let h = super::handle(server.url()).await;
                super::$name(Box::new(move || tollgate_cache::Cache::builder().redis(h.clone()).l1(std::time::Duration::from_secs(30), 1 << 22).build())).await;
            })*
        }
        mod cluster {
            $(#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() {
                let cluster = tollgate_testkit::RedisCluster::start();
                let h = super::handle(cluster.url()).await;
                super::$name(Box::new(move || tollgate_cache::Cache::builder().redis(h.clone()).l1(std::time::Duration::from_secs(30), 1 << 22).build())).await;
            })*
        }
    };
}

suite!(
    miss_then_hit_with_headers,
    head_then_get_has_full_body,
    set_cookie_is_never_stored_or_replayed,
    one_users_response_never_reaches_another,
    hosts_are_isolated,
    vary_variants_coexist,
    query_flood_stays_bounded,
    unsafe_method_invalidates_across_instances,
    tag_invalidation_across_instances,
    concurrent_misses_one_origin_call_per_instance,
    conditional_requests_get_304,
    uncacheable_responses_are_not_stored,
    large_bodies_stream_through_unstored,
    bodies_of_unknown_length_are_not_announced_as_stored,
    stale_while_revalidate_and_stale_if_error,
    unkeyed_headers_cannot_poison,
    range_requests_bypass,
    host_header_disagreeing_with_the_authority_bypasses,
    forwarded_headers_cannot_poison,
    no_cache_request_falls_back_only_within_stale_if_error,
);

type Svc = BoxCloneSyncService<
    Request<Full<Bytes>>,
    Response<tollgate_cache::CacheBody<Full<Bytes>>>,
    Infallible,
>;

struct Origin {
    calls: Arc<AtomicUsize>,
    failing: Arc<AtomicBool>,
}

fn origin() -> (
    Origin,
    impl tower::Service<
        Request<Full<Bytes>>,
        Response = Response<Full<Bytes>>,
        Error = Infallible,
        Future = impl Send,
    > + Clone
    + Send
    + Sync
    + 'static,
) {
    let calls = Arc::new(AtomicUsize::new(0));
    let failing = Arc::new(AtomicBool::new(false));
    let o = Origin {
        calls: calls.clone(),
        failing: failing.clone(),
    };
    let svc = service_fn(move |req: Request<Full<Bytes>>| {
        let n = calls.fetch_add(1, Ordering::SeqCst) + 1;
        let failing = failing.load(Ordering::SeqCst);
        async move {
            let h = |name: &str| {
                req.headers()
                    .get(name)
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("")
                    .to_owned()
            };
            let mut b = Response::builder();
            let body: Bytes = match req.uri().path() {
                "/plain" | "/q" => format!("plain {n}").into(),
                "/slow" => {
                    tokio::time::sleep(Duration::from_millis(300)).await;
                    format!("slow {n}").into()
                }
                "/cookie" => {
                    b = b.header("set-cookie", format!("session=user-{n}"));
                    format!("cookie {n}").into()
                }
                "/slow-cookie" => {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    b = b.header("set-cookie", format!("session=user-{n}"));
                    format!("cookie {n}").into()
                }
                "/me" => {
                    b = b.header("cache-control", "max-age=60");
                    format!("hello {}", h("authorization")).into()
                }
                "/public" => {
                    b = b.header("cache-control", "public, max-age=60");
                    format!("public {n}").into()
                }
                "/private" => {
                    b = b.header("cache-control", "private, max-age=60");
                    format!("private {n}").into()
                }
                "/no-store" => {
                    b = b.header("cache-control", "no-store");
                    "x".into()
                }
                "/vary-star" => {
                    b = b.header("vary", "*");
                    "x".into()
                }
                "/host" => format!("host {}", h("host")).into(),
                "/xfh" => format!("link https://{}/", h("x-forwarded-host")).into(),
                "/fwd" => format!(
                    "forwarded {} proto {} scheme {} port {}",
                    h("forwarded"),
                    h("x-forwarded-proto"),
                    h("x-forwarded-scheme"),
                    h("x-forwarded-port")
                )
                .into(),
                "/mr" => {
                    if failing {
                        return Ok(Response::builder()
                            .status(503)
                            .body(Full::new(Bytes::from("down")))
                            .unwrap());
                    }
                    b = b.header("cache-control", "max-age=1, must-revalidate");
                    format!("mr {n}").into()
                }
                "/enc" => {
                    b = b.header("vary", "Accept-Encoding");
                    if h("accept-encoding").contains("gzip") {
                        b = b.header("content-encoding", "gzip");
                        format!("GZIP {n}").into()
                    } else {
                        format!("identity {n}").into()
                    }
                }
                "/etag" => {
                    b = b
                        .header("etag", "\"v1\"")
                        .header("last-modified", "Wed, 21 Oct 2015 07:28:00 GMT")
                        .header("cache-control", "max-age=60");
                    "etagged".into()
                }
                "/tagged" => {
                    b = b.header("x-cache-tags", "campaigns:church-42, campaigns");
                    format!("campaign {n}").into()
                }
                "/big" => Bytes::from(vec![b'x'; 300 * 1024]),
                "/swr" => {
                    b = b.header("cache-control", "max-age=1, stale-while-revalidate=30");
                    format!("swr {n}").into()
                }
                "/sie" => {
                    if failing {
                        return Ok(Response::builder()
                            .status(503)
                            .body(Full::new(Bytes::from("down")))
                            .unwrap());
                    }
                    b = b.header("cache-control", "max-age=1, stale-if-error=60");
                    format!("sie {n}").into()
                }
                _ => {
                    return Ok(Response::builder()
                        .status(404)
                        .header("cache-control", "no-store")
                        .body(Full::new(Bytes::new()))
                        .unwrap());
                }
            };
            Ok::<_, Infallible>(b.body(Full::new(body)).unwrap())
        }
    });
    (o, svc)
}

fn layer(cache: Cache) -> ResponseCacheLayer {
    ResponseCacheLayer::builder(cache)
        .allowed_hosts(["example.com", "a.example", "b.example"])
        .query_bounds(256, 8)
        .max_body_size(256 * 1024)
        .route(RouteRule::new("/me").per_user(UserKey::header("authorization")))
        .route(RouteRule::new("/tagged").tags(["route-tag"]))
        .build()
        .unwrap()
}

fn stack(cache: Cache) -> (Origin, Svc) {
    let (o, svc) = origin();
    (o, BoxCloneSyncService::new(layer(cache).layer(svc)))
}

fn get(path: &str) -> http::request::Builder {
    Request::builder().uri(path).header("host", "example.com")
}

async fn send(svc: &Svc, req: http::request::Builder) -> (Response<()>, String) {
    let res = svc
        .clone()
        .oneshot(req.body(Full::new(Bytes::new())).unwrap())
        .await
        .unwrap();
    let (parts, body) = res.into_parts();
    let body = body.collect().await.unwrap().to_bytes();
    (
        Response::from_parts(parts, ()),
        String::from_utf8_lossy(&body).into_owned(),
    )
}

fn xc(r: &Response<()>) -> &str {
    r.headers()
        .get("x-cache")
        .map(|v| v.to_str().unwrap())
        .unwrap_or("-")
}

fn cs(r: &Response<()>) -> &str {
    r.headers()
        .get("cache-status")
        .map(|v| v.to_str().unwrap())
        .unwrap_or("-")
}

/// Stores are written in the background once the body ends.
async fn settle() {
    tokio::time::sleep(Duration::from_millis(100)).await;
}

async fn miss_then_hit_with_headers(make: Make) {
    let (o, svc) = stack(make());
    let (r, body) = send(&svc, get("/plain")).await;
    assert_eq!(body, "plain 1");
    assert_eq!(xc(&r), "MISS");
    assert_eq!(
        cs(&r),
        "tollgate; fwd=uri-miss; fwd-status=200; stored; ttl=300"
    );
    settle().await;
    let (r, body) = send(&svc, get("/plain")).await;
    assert_eq!(body, "plain 1");
    assert_eq!(xc(&r), "HIT");
    assert!(cs(&r).starts_with("tollgate; hit; ttl=29"), "{}", cs(&r));
    assert_eq!(r.headers()["age"], "0");
    assert!(!cs(&r).contains("key="), "key hidden by default");
    assert_eq!(o.calls.load(Ordering::SeqCst), 1);
    // POST/OPTIONS are not cached.
    let (r, _) = send(&svc, get("/plain").method(Method::OPTIONS)).await;
    assert_eq!(xc(&r), "-");
}

async fn head_then_get_has_full_body(make: Make) {
    let (o, svc) = stack(make());
    let (r, body) = send(&svc, get("/plain").method(Method::HEAD)).await;
    assert_eq!(xc(&r), "MISS");
    assert!(!cs(&r).contains("stored"), "HEAD never stores: {}", cs(&r));
    assert_eq!(body, "plain 1", "the test origin ignores HEAD");
    settle().await;
    let (r, body) = send(&svc, get("/plain")).await;
    assert_eq!(xc(&r), "MISS");
    assert_eq!(body, "plain 2", "GET after HEAD has the full body");
    settle().await;
    let (r, body) = send(&svc, get("/plain").method(Method::HEAD)).await;
    assert_eq!(xc(&r), "HIT", "HEAD shares GET's entry");
    assert_eq!(body, "");
    assert_eq!(r.headers()["content-length"], "7");
    assert_eq!(o.calls.load(Ordering::SeqCst), 2);
}

async fn set_cookie_is_never_stored_or_replayed(make: Make) {
    let (o, svc) = stack(make());
    for i in 1..=3 {
        let (r, body) = send(&svc, get("/cookie")).await;
        assert_eq!(body, format!("cookie {i}"));
        assert_eq!(r.headers()["set-cookie"], format!("session=user-{i}"));
        settle().await;
    }
    // Concurrent requests: nobody is handed somebody else's cookie.
    let mut tasks = Vec::new();
    for _ in 0..20 {
        let svc = svc.clone();
        tasks.push(tokio::spawn(async move {
            send(&svc, get("/slow-cookie")).await
        }));
    }
    let mut seen = std::collections::HashSet::new();
    for t in tasks {
        let (r, body) = t.await.unwrap();
        let cookie = r.headers()["set-cookie"].to_str().unwrap().to_owned();
        let n = body.strip_prefix("cookie ").unwrap();
        assert_eq!(cookie, format!("session=user-{n}"), "own cookie, own body");
        assert!(seen.insert(cookie), "a Set-Cookie was replayed");
    }
    assert_eq!(o.calls.load(Ordering::SeqCst), 23);
}

async fn one_users_response_never_reaches_another(make: Make) {
    let (_o, svc) = stack(make());
    // Per-user route: each user gets their own entry.
    let (_, a) = send(&svc, get("/me").header("authorization", "Bearer alice")).await;
    assert_eq!(a, "hello Bearer alice");
    settle().await;
    let (r, b) = send(&svc, get("/me").header("authorization", "Bearer bob")).await;
    assert_eq!(b, "hello Bearer bob");
    assert_eq!(xc(&r), "MISS");
    settle().await;
    let (r, a2) = send(&svc, get("/me").header("authorization", "Bearer alice")).await;
    assert_eq!((xc(&r), a2.as_str()), ("HIT", "hello Bearer alice"));
    let (r, anon) = send(&svc, get("/me")).await;
    assert_eq!((xc(&r), anon.as_str()), ("MISS", "hello "));

    // Without a per-user route, a credentialed response is stored only when
    // public, and a credentialed request is served only public entries.
    let (r, _) = send(&svc, get("/plain").header("authorization", "Bearer alice")).await;
    assert!(!cs(&r).contains("stored"), "{}", cs(&r));
    settle().await;
    let (r, _) = send(&svc, get("/plain")).await;
    assert_eq!(xc(&r), "MISS", "alice's response was not stored");
    settle().await;
    let (r, _) = send(&svc, get("/plain").header("cookie", "sid=carol")).await;
    assert_eq!(
        xc(&r),
        "MISS",
        "a non-public entry never serves a cookie holder"
    );
    let (_, p) = send(&svc, get("/public").header("authorization", "Bearer alice")).await;
    settle().await;
    let (r, p2) = send(&svc, get("/public").header("authorization", "Bearer bob")).await;
    assert_eq!((xc(&r), p2), ("HIT", p), "explicitly public is shared");
}

async fn hosts_are_isolated(make: Make) {
    let (o, svc) = stack(make());
    let (_, a) = send(
        &svc,
        Request::builder().uri("/host").header("host", "a.example"),
    )
    .await;
    settle().await;
    let (r, b) = send(
        &svc,
        Request::builder().uri("/host").header("host", "b.example"),
    )
    .await;
    assert_eq!(
        (a.as_str(), b.as_str()),
        ("host a.example", "host b.example")
    );
    assert_eq!(xc(&r), "MISS");
    let (r, _) = send(
        &svc,
        Request::builder()
            .uri("/host")
            .header("host", "evil.example"),
    )
    .await;
    assert_eq!(xc(&r), "BYPASS");
    assert_eq!(cs(&r), "tollgate; fwd=bypass; detail=unknown-host");
    let (r, _) = send(&svc, Request::builder().uri("/host")).await;
    assert_eq!(xc(&r), "BYPASS", "no host");
    assert_eq!(o.calls.load(Ordering::SeqCst), 4);
}

async fn vary_variants_coexist(make: Make) {
    let (o, svc) = stack(make());
    let (r, gz) = send(&svc, get("/enc").header("accept-encoding", "gzip, br")).await;
    assert_eq!((xc(&r), gz.as_str()), ("MISS", "GZIP 1"));
    settle().await;
    let (r, id) = send(&svc, get("/enc")).await;
    assert_eq!((xc(&r), id.as_str()), ("MISS", "identity 2"));
    assert_eq!(
        cs(&r),
        "tollgate; fwd=vary-miss; fwd-status=200; stored; ttl=300"
    );
    settle().await;
    let (r, gz2) = send(&svc, get("/enc").header("accept-encoding", "gzip,br")).await;
    assert_eq!((xc(&r), gz2.as_str()), ("HIT", "GZIP 1"));
    assert_eq!(r.headers()["content-encoding"], "gzip");
    let (r, id2) = send(&svc, get("/enc")).await;
    assert_eq!((xc(&r), id2.as_str()), ("HIT", "identity 2"));
    assert!(r.headers().get("content-encoding").is_none());
    assert_eq!(o.calls.load(Ordering::SeqCst), 2);
}

async fn query_flood_stays_bounded(make: Make) {
    let (o, svc) = stack(make());
    // Order and tracking parameters do not make new entries.
    send(&svc, get("/q?b=2&a=1")).await;
    settle().await;
    let (r, _) = send(&svc, get("/q?a=1&b=2&utm_source=x&fbclid=y")).await;
    assert_eq!(xc(&r), "HIT");
    // Past the bounds: not cached at all.
    let long = format!("/q?x={}", "a".repeat(300));
    let (r, _) = send(&svc, get(&long)).await;
    assert_eq!(cs(&r), "tollgate; fwd=bypass; detail=query-too-long");
    let many: String = (0..9)
        .map(|i| format!("p{i}=1"))
        .collect::<Vec<_>>()
        .join("&");
    let (r, _) = send(&svc, get(&format!("/q?{many}"))).await;
    assert_eq!(cs(&r), "tollgate; fwd=bypass; detail=too-many-params");
    assert_eq!(o.calls.load(Ordering::SeqCst), 3);
}

async fn unsafe_method_invalidates_across_instances(make: Make) {
    let (a, b) = (make(), make());
    let (_, sa) = stack(a);
    let (_, sb) = stack(b.clone());
    wait_listening(&b).await;
    send(&sa, get("/plain?page=1")).await;
    settle().await;
    let (r, _) = send(&sb, get("/plain?page=1")).await;
    assert_eq!(xc(&r), "HIT");
    let (r, _) = send(&sa, get("/plain").method(Method::POST)).await;
    assert_eq!(r.status(), 200);
    // B's L1 copy is dropped by a pub/sub message: within milliseconds.
    let started = std::time::Instant::now();
    loop {
        let (r, body) = send(&sb, get("/plain?page=1")).await;
        if xc(&r) == "MISS" {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "POST to the path did not invalidate every query of it: {body}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

async fn wait_listening(c: &Cache) {
    let started = std::time::Instant::now();
    while !c.is_listening() {
        assert!(started.elapsed() < Duration::from_secs(5));
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

async fn tag_invalidation_across_instances(make: Make) {
    let (a, b) = (make(), make());
    let (_, sa) = stack(a.clone());
    let (_, sb) = stack(b.clone());
    wait_listening(&b).await;
    let (r, _) = send(&sa, get("/tagged")).await;
    assert!(
        r.headers().get("x-cache-tags").is_none(),
        "tag header stripped"
    );
    settle().await;
    let (r, _) = send(&sb, get("/tagged")).await;
    assert_eq!(xc(&r), "HIT");
    assert!(r.headers().get("x-cache-tags").is_none());
    assert_eq!(a.invalidate_tag("campaigns:church-42").await.unwrap(), 1);
    let started = std::time::Instant::now();
    while xc(&send(&sb, get("/tagged")).await.0) != "MISS" {
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "instance B did not see A's invalidation"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    settle().await;
    assert_eq!(b.invalidate_tag("route-tag").await.unwrap(), 1);
    let (r, _) = send(&sa, get("/tagged")).await;
    assert_eq!(xc(&r), "MISS");
}

async fn concurrent_misses_one_origin_call_per_instance(make: Make) {
    let (o1, s1) = stack(make());
    let (o2, s2) = stack(make());
    let mut tasks = Vec::new();
    for i in 0..1000 {
        let svc = if i % 2 == 0 { s1.clone() } else { s2.clone() };
        tasks.push(tokio::spawn(async move { send(&svc, get("/slow")).await }));
    }
    let mut collapsed = 0;
    for t in tasks {
        let (r, body) = t.await.unwrap();
        assert_eq!(r.status(), 200);
        assert!(body.starts_with("slow "), "{body}");
        collapsed += usize::from(cs(&r).contains("collapsed"));
    }
    let (c1, c2) = (
        o1.calls.load(Ordering::SeqCst),
        o2.calls.load(Ordering::SeqCst),
    );
    assert_eq!((c1, c2), (1, 1), "one origin call per instance");
    assert!(collapsed >= 900, "{collapsed}");
}

async fn conditional_requests_get_304(make: Make) {
    let (o, svc) = stack(make());
    send(&svc, get("/etag")).await;
    settle().await;
    let (r, body) = send(&svc, get("/etag").header("if-none-match", "W/\"v1\"")).await;
    assert_eq!((r.status().as_u16(), body.as_str()), (304, ""));
    assert_eq!(r.headers()["etag"], "\"v1\"");
    let (r, _) = send(&svc, get("/etag").header("if-none-match", "\"v0\"")).await;
    assert_eq!(r.status(), 200);
    let (r, _) = send(
        &svc,
        get("/etag").header("if-modified-since", "Thu, 22 Oct 2015 07:28:00 GMT"),
    )
    .await;
    assert_eq!(r.status(), 304);
    let (r, _) = send(
        &svc,
        get("/etag").header("if-modified-since", "Tue, 20 Oct 2015 07:28:00 GMT"),
    )
    .await;
    assert_eq!(r.status(), 200);
    assert_eq!(o.calls.load(Ordering::SeqCst), 1);
}

async fn uncacheable_responses_are_not_stored(make: Make) {
    let (o, svc) = stack(make());
    for path in ["/private", "/no-store", "/vary-star", "/nothing"] {
        send(&svc, get(path)).await;
        settle().await;
        let (r, _) = send(&svc, get(path)).await;
        assert_eq!(xc(&r), "MISS", "{path}");
        assert!(!cs(&r).contains("stored"), "{path}: {}", cs(&r));
    }
    assert_eq!(o.calls.load(Ordering::SeqCst), 8);
}

async fn large_bodies_stream_through_unstored(make: Make) {
    let (o, svc) = stack(make());
    let (_, body) = send(&svc, get("/big")).await;
    assert_eq!(body.len(), 300 * 1024);
    settle().await;
    let (r, body) = send(&svc, get("/big")).await;
    assert_eq!(body.len(), 300 * 1024);
    assert_eq!(xc(&r), "MISS");
    assert_eq!(o.calls.load(Ordering::SeqCst), 2);
}

/// A body of unknown length (streamed, no `Content-Length`) may turn out
/// over the cap: its `Cache-Status` does not say `stored`. It is stored
/// once complete within the cap, and not when over it.
async fn bodies_of_unknown_length_are_not_announced_as_stored(make: Make) {
    use http_body_util::StreamBody;
    let calls = Arc::new(AtomicUsize::new(0));
    let counted = calls.clone();
    let origin = service_fn(move |req: Request<Full<Bytes>>| {
        counted.fetch_add(1, Ordering::SeqCst);
        let chunks = if req.uri().path() == "/big-stream" {
            300
        } else {
            2
        };
        let frames = (0..chunks)
            .map(|_| Ok::<_, Infallible>(http_body::Frame::data(Bytes::from(vec![b'x'; 1024]))));
        let body = StreamBody::new(futures::stream::iter(frames));
        async move { Ok::<_, Infallible>(Response::new(body)) }
    });
    let svc = layer(make()).layer(origin);
    let fetch = |path: &'static str| {
        let svc = svc.clone();
        async move {
            let req = get(path).body(Full::new(Bytes::new())).unwrap();
            let res = svc.oneshot(req).await.unwrap();
            let (parts, body) = res.into_parts();
            let len = body.collect().await.unwrap().to_bytes().len();
            (Response::from_parts(parts, ()), len)
        }
    };
    for (path, len, hit) in [
        ("/stream", 2 * 1024, "HIT"),
        ("/big-stream", 300 * 1024, "MISS"),
    ] {
        let (r, n) = fetch(path).await;
        assert_eq!((xc(&r), n), ("MISS", len), "{path}");
        assert!(cs(&r).contains("ttl="), "{path}: {}", cs(&r));
        assert!(!cs(&r).contains("stored"), "{path}: {}", cs(&r));
        settle().await;
        let (r, n) = fetch(path).await;
        assert_eq!((xc(&r), n), (hit, len), "{path}");
    }
    assert_eq!(calls.load(Ordering::SeqCst), 3);
}

async fn stale_while_revalidate_and_stale_if_error(make: Make) {
    let (o, svc) = stack(make());
    send(&svc, get("/swr")).await;
    send(&svc, get("/sie")).await;
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let (r, body) = send(&svc, get("/swr")).await;
    assert_eq!((xc(&r), body.as_str()), ("STALE", "swr 1"));
    // Requests while the refresh is in flight or being stored don't start
    // another one.
    for _ in 0..20 {
        send(&svc, get("/swr")).await;
    }
    settle().await;
    let (r, body) = send(&svc, get("/swr")).await;
    assert_eq!(
        (xc(&r), body.as_str()),
        ("HIT", "swr 3"),
        "refreshed once in the background"
    );
    o.failing.store(true, Ordering::SeqCst);
    let (r, body) = send(&svc, get("/sie")).await;
    assert_eq!(
        (r.status().as_u16(), xc(&r), body.as_str()),
        (200, "STALE", "sie 2")
    );
    assert!(cs(&r).contains("fwd=stale; fwd-status=503"), "{}", cs(&r));
    assert_eq!(o.calls.load(Ordering::SeqCst), 4);
}

async fn unkeyed_headers_cannot_poison(make: Make) {
    let (_o, svc) = stack(make());
    let (r, body) = send(&svc, get("/xfh").header("x-forwarded-host", "evil.example")).await;
    assert_eq!(body, "link https://evil.example/");
    assert!(!cs(&r).contains("stored"));
    settle().await;
    let (_, body) = send(&svc, get("/xfh")).await;
    assert_eq!(
        body, "link https:///",
        "the poisoned response was not stored"
    );
}

/// A range request goes to the origin as it is: never answered from, nor
/// stored as, the whole response.
async fn range_requests_bypass(make: Make) {
    let (o, svc) = stack(make());
    let (r, body) = send(&svc, get("/public").header("range", "bytes=0-3")).await;
    assert_eq!((xc(&r), body.as_str()), ("BYPASS", "public 1"));
    settle().await;
    let (r, _) = send(&svc, get("/public")).await;
    assert_eq!(xc(&r), "MISS", "the ranged answer was not stored");
    settle().await;
    let (r, _) = send(&svc, get("/public").header("Range", "bytes=0-3")).await;
    assert_eq!(xc(&r), "BYPASS", "not served from the stored entry");
    assert_eq!(o.calls.load(Ordering::SeqCst), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_killed_bypasses_without_5xx() {
    let mut server = tollgate_testkit::RedisServer::start();
    let h = tollgate_testkit::connect_with_deadline(server.url(), Duration::from_millis(50)).await;
    let (o, svc) = stack(Cache::redis(h.clone()));
    send(&svc, get("/plain")).await;
    settle().await;
    assert_eq!(xc(&send(&svc, get("/plain")).await.0), "HIT");
    server.kill();
    for _ in 0..50 {
        let started = std::time::Instant::now();
        let (r, body) = send(&svc, get("/plain")).await;
        assert_eq!(r.status(), 200);
        assert!(body.starts_with("plain"));
        assert_eq!(xc(&r), "BYPASS");
        assert!(
            started.elapsed() < Duration::from_millis(50 + 250),
            "{:?}",
            started.elapsed()
        );
    }
    assert!(o.calls.load(Ordering::SeqCst) >= 50);
    server.restart();
    let started = std::time::Instant::now();
    loop {
        send(&svc, get("/plain")).await;
        settle().await;
        if xc(&send(&svc, get("/plain")).await.0) == "HIT" {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "did not recover"
        );
    }
}

/// A POST during an outage cannot remove the stored response of its URL.
/// The invalidation is kept, and once Redis is back it runs before anything
/// is served from Redis again: the old response is never a hit afterwards
/// (it was, until its TTL).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invalidation_during_an_outage_runs_before_redis_serves_again() {
    let mut server = tollgate_testkit::RedisServer::start();
    let h = tollgate_testkit::connect_with_deadline(server.url(), Duration::from_millis(50)).await;
    let (_o, svc) = stack(Cache::redis(h.clone()));
    send(&svc, get("/plain")).await;
    settle().await;
    let (r, stored) = send(&svc, get("/plain")).await;
    assert_eq!(xc(&r), "HIT");
    // Frozen: the entry stays in Redis, and lookups time out until the
    // breaker opens.
    server.pause();
    while h.breaker().state() == tollgate_redis::BreakerState::Closed {
        let (r, _) = send(&svc, get("/plain")).await;
        assert_eq!(r.status(), 200);
    }
    let (r, _) = send(&svc, get("/plain").method(Method::POST)).await;
    assert_eq!(r.status(), 200, "the POST itself is served");
    server.resume();
    let started = std::time::Instant::now();
    loop {
        let (r, body) = send(&svc, get("/plain")).await;
        assert!(
            !(xc(&r) == "HIT" && body == stored),
            "the response the POST invalidated was served after the outage"
        );
        if xc(&r) == "HIT" {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "did not serve from Redis again"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// An absolute-form request line (or an HTTP/2 `:authority`) names one
/// host, the `Host` header, which applications read, another: the response
/// may be built for the header's host, so it is neither served from nor
/// stored under the authority's entry.
async fn host_header_disagreeing_with_the_authority_bypasses(make: Make) {
    let (o, svc) = stack(make());
    let mismatched = || {
        Request::builder()
            .uri("http://example.com/host")
            .header("host", "a.example")
    };
    let (r, body) = send(&svc, mismatched()).await;
    assert_eq!((xc(&r), body.as_str()), ("BYPASS", "host a.example"));
    assert_eq!(cs(&r), "tollgate; fwd=bypass; detail=host-mismatch");
    settle().await;
    let (r, body) = send(&svc, get("/host")).await;
    assert_eq!(
        (xc(&r), body.as_str()),
        ("MISS", "host example.com"),
        "the other host's response was not stored"
    );
    settle().await;
    let (r, _) = send(&svc, mismatched()).await;
    assert_eq!(xc(&r), "BYPASS", "not served from the stored entry");
    // The same host spelled differently (case) is one host.
    let (r, body) = send(
        &svc,
        Request::builder()
            .uri("http://Example.COM/host")
            .header("host", "example.com"),
    )
    .await;
    assert_eq!((xc(&r), body.as_str()), ("HIT", "host example.com"));
    // A port on one side only is another authority.
    let (r, _) = send(
        &svc,
        Request::builder()
            .uri("http://example.com/host")
            .header("host", "example.com:8080"),
    )
    .await;
    assert_eq!(xc(&r), "BYPASS");
    assert_eq!(o.calls.load(Ordering::SeqCst), 4);
}

/// `Forwarded` (RFC 7239) and the scheme and port headers change links and
/// redirects without being keyed: a request carrying one is never stored.
async fn forwarded_headers_cannot_poison(make: Make) {
    let (o, svc) = stack(make());
    for (name, value) in [
        ("forwarded", "host=evil.example;proto=http"),
        ("Forwarded", "for=192.0.2.1;host=evil.example"),
        ("x-forwarded-proto", "http"),
        ("x-forwarded-scheme", "http"),
        ("x-forwarded-port", "8443"),
    ] {
        let (r, body) = send(&svc, get("/fwd").header(name, value)).await;
        assert!(body.contains(value), "{name}: {body}");
        assert!(!cs(&r).contains("stored"), "{name}: {}", cs(&r));
        settle().await;
    }
    let (r, body) = send(&svc, get("/fwd")).await;
    assert_eq!(
        (xc(&r), body.as_str()),
        ("MISS", "forwarded  proto  scheme  port "),
        "no forwarded response was stored"
    );
    assert_eq!(o.calls.load(Ordering::SeqCst), 6);
}

/// With request directives honoured, a client's `no-cache` goes to the
/// origin; on an origin error the entry is served only within its
/// stale-if-error window (none for `must-revalidate`).
async fn no_cache_request_falls_back_only_within_stale_if_error(make: Make) {
    let (o, svc) = origin();
    let layer = ResponseCacheLayer::builder(make())
        .request_directives(tollgate_cache::RequestDirectives::Honour)
        .build()
        .unwrap();
    let svc: Svc = BoxCloneSyncService::new(layer.layer(svc));
    send(&svc, get("/mr")).await;
    send(&svc, get("/sie")).await;
    // Both entries stale (max-age=1).
    tokio::time::sleep(Duration::from_millis(1200)).await;
    o.failing.store(true, Ordering::SeqCst);
    let no_cache = |path| get(path).header("cache-control", "no-cache");
    let (r, body) = send(&svc, no_cache("/mr")).await;
    assert_eq!(
        (r.status().as_u16(), xc(&r), body.as_str()),
        (503, "MISS", "down"),
        "must-revalidate: never served stale"
    );
    let (r, body) = send(&svc, no_cache("/sie")).await;
    assert_eq!(
        (r.status().as_u16(), xc(&r), body.as_str()),
        (200, "STALE", "sie 2"),
        "within stale-if-error"
    );
    assert_eq!(o.calls.load(Ordering::SeqCst), 4);
}
