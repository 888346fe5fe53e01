//! The layer behind a real HTTP server (axum on hyper, over a socket):
//! what the server does with the body (hyper drops a body that says it has
//! ended without polling it) is part of what is tested.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use axum::Router;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tollgate_cache::{Cache, ResponseCacheLayer};

use tollgate_testkit::connect as handle;

macro_rules! suite {
    ($($name:ident),* $(,)?) => {
        mod memory {
            $(#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() {
                super::$name(tollgate_cache::Cache::memory()).await;
            })*
        }
        mod standalone {
            $(#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() {
                let server = tollgate_testkit::RedisServer::start();
                let h = super::handle(server.url()).await;
                super::$name(tollgate_cache::Cache::redis(h)).await;
            })*
        }
    };
}

suite!(empty_bodies_are_stored_and_hit);

/// Serves `router` behind the cache on a loopback port; returns the port.
async fn serve(cache: Cache, router: Router) -> u16 {
    let layer = ResponseCacheLayer::builder(cache).build().expect("layer");
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let port = listener.local_addr().expect("addr").port();
    tokio::spawn(async move {
        let _ = axum::serve(listener, router.layer(layer)).await;
    });
    port
}

/// One HTTP/1.1 request on a connection of its own: the status and the
/// response headers (the body is not needed).
async fn request(port: u16, path: &str) -> (u16, HeaderMap) {
    let mut conn = TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("connect");
    let req = format!("GET {path} HTTP/1.1\r\nHost: example.com\r\nConnection: close\r\n\r\n");
    conn.write_all(req.as_bytes()).await.expect("write");
    let mut raw = Vec::new();
    conn.read_to_end(&mut raw).await.expect("read");
    let text = String::from_utf8_lossy(&raw);
    let head = text.split("\r\n\r\n").next().unwrap_or_default();
    let mut lines = head.split("\r\n");
    let status = lines
        .next()
        .and_then(|l| l.split(' ').nth(1))
        .and_then(|s| s.parse().ok())
        .expect("status line");
    let mut headers = HeaderMap::new();
    for line in lines {
        let (name, value) = line.split_once(':').expect("header line");
        headers.append(
            header::HeaderName::try_from(name.trim()).expect("name"),
            value.trim().parse().expect("value"),
        );
    }
    (status, headers)
}

fn text<'a>(h: &'a HeaderMap, name: &str) -> &'a str {
    h.get(name).and_then(|v| v.to_str().ok()).unwrap_or("-")
}

/// A response without a body is complete the moment it is built: the
/// server never polls its body, and it is stored all the same (and only
/// then reported `stored`).
async fn empty_bodies_are_stored_and_hit(cache: Cache) {
    let calls = Arc::new(AtomicUsize::new(0));
    let counted = |status: StatusCode| {
        let calls = calls.clone();
        move || async move {
            calls.fetch_add(1, Ordering::SeqCst);
            (status, [(header::CACHE_CONTROL, "max-age=60")]).into_response()
        }
    };
    let router = Router::new()
        .route("/no-content", get(counted(StatusCode::NO_CONTENT)))
        .route("/empty", get(counted(StatusCode::OK)))
        .route(
            "/moved",
            get({
                let calls = calls.clone();
                move || async move {
                    calls.fetch_add(1, Ordering::SeqCst);
                    (
                        StatusCode::MOVED_PERMANENTLY,
                        [
                            (header::CACHE_CONTROL, "max-age=60"),
                            (header::LOCATION, "/elsewhere"),
                        ],
                    )
                        .into_response()
                }
            }),
        );
    let port = serve(cache, router).await;
    for (path, status) in [("/no-content", 204), ("/empty", 200), ("/moved", 301)] {
        let (s, h) = request(port, path).await;
        assert_eq!((s, text(&h, "x-cache")), (status, "MISS"), "{path}");
        assert!(
            text(&h, "cache-status").contains("stored; ttl=60"),
            "{path}"
        );
        // Stores are written in the background.
        tokio::time::sleep(Duration::from_millis(100)).await;
        let (s, h) = request(port, path).await;
        assert_eq!(
            (s, text(&h, "x-cache")),
            (status, "HIT"),
            "{path}: {}",
            text(&h, "cache-status")
        );
        if status == 301 {
            assert_eq!(text(&h, "location"), "/elsewhere");
        }
    }
    assert_eq!(calls.load(Ordering::SeqCst), 3, "one origin call per path");
}
