//! The proxy against a local upstream: MISS, HIT, invalidation by POST.

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use caching_proxy::{Upstream, serve};
use http::{Request, Response};
use http_body_util::{BodyExt, Empty, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;
use tollgate_cache::Cache;

async fn upstream(calls: Arc<AtomicUsize>) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (stream, _) = listener.accept().await.unwrap();
            let calls = calls.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                    let n = calls.fetch_add(1, Ordering::SeqCst) + 1;
                    async move {
                        let body = format!("{} {} #{n}", req.method(), req.uri().path());
                        Ok::<_, Infallible>(
                            Response::builder()
                                .header("cache-control", "max-age=60")
                                .body(Full::new(Bytes::from(body)))
                                .unwrap(),
                        )
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    format!("http://{addr}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn caches_in_front_of_the_upstream() {
    let calls = Arc::new(AtomicUsize::new(0));
    let up = upstream(calls.clone()).await;
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let proxy = listener.local_addr().unwrap();
    tokio::spawn(serve(
        listener,
        Upstream::new(&up.parse().unwrap()).unwrap(),
        Cache::memory(),
    ));
    let client = Client::builder(TokioExecutor::new()).build_http::<Empty<Bytes>>();
    let send = |method: &str| {
        let req = Request::builder()
            .method(method)
            .uri(format!("http://{proxy}/campaigns/42"))
            .body(Empty::new())
            .unwrap();
        let client = client.clone();
        async move {
            let res = client.request(req).await.unwrap();
            let xc = res
                .headers()
                .get("x-cache")
                .map(|v| v.to_str().unwrap().to_owned());
            let body = res.into_body().collect().await.unwrap().to_bytes();
            (xc, String::from_utf8(body.to_vec()).unwrap())
        }
    };
    assert_eq!(
        send("GET").await,
        (Some("MISS".into()), "GET /campaigns/42 #1".into())
    );
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(
        send("GET").await,
        (Some("HIT".into()), "GET /campaigns/42 #1".into())
    );
    assert_eq!(send("POST").await.1, "POST /campaigns/42 #2");
    assert_eq!(
        send("GET").await,
        (Some("MISS".into()), "GET /campaigns/42 #3".into())
    );
    assert_eq!(calls.load(Ordering::SeqCst), 3);
}

/// Connection options stay on their own connection: the upstream never
/// sees the client's (`Connection` and the headers it names), and the
/// client never gets the upstream's, from a miss or from a hit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_headers_stay_on_their_connection() {
    let seen = Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let up = listener.local_addr().unwrap();
    let upstream_seen = seen.clone();
    tokio::spawn(async move {
        loop {
            let (stream, _) = listener.accept().await.unwrap();
            let seen = upstream_seen.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                    seen.lock()
                        .unwrap()
                        .extend(req.headers().keys().map(|k| k.as_str().to_owned()));
                    async move {
                        Ok::<_, Infallible>(
                            Response::builder()
                                .header("cache-control", "max-age=60")
                                .header("connection", "x-upstream-hop")
                                .header("x-upstream-hop", "1")
                                .header("keep-alive", "timeout=5")
                                .header("x-end-to-end", "kept")
                                .body(Full::new(Bytes::from_static(b"ok")))
                                .unwrap(),
                        )
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let proxy = listener.local_addr().unwrap();
    tokio::spawn(serve(
        listener,
        Upstream::new(&format!("http://{up}").parse().unwrap()).unwrap(),
        Cache::memory(),
    ));
    let client = Client::builder(TokioExecutor::new()).build_http::<Empty<Bytes>>();
    for want in ["MISS", "HIT"] {
        let req = Request::builder()
            .uri(format!("http://{proxy}/hop"))
            .header("connection", "x-client-hop")
            .header("x-client-hop", "1")
            .header("x-client-end-to-end", "1")
            .body(Empty::new())
            .unwrap();
        let res = client.request(req).await.unwrap();
        let h = res.headers().clone();
        assert_eq!(h.get("x-cache").unwrap(), want);
        assert_eq!(h.get("x-end-to-end").unwrap(), "kept");
        for hop in ["x-upstream-hop", "keep-alive", "connection"] {
            assert!(h.get(hop).is_none(), "{want}: the client got {hop}");
        }
        let _ = res.into_body().collect().await.unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let seen = seen.lock().unwrap().clone();
    assert!(seen.iter().any(|h| h == "x-client-end-to-end"), "{seen:?}");
    assert!(!seen.iter().any(|h| h == "x-client-hop"), "{seen:?}");
}
