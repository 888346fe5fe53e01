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
