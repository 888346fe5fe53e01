//! A fill racing an invalidation never puts the old response back.

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use tollgate_cache::{Cache, ResponseCacheLayer, RouteRule};
use tower::{Layer, ServiceExt, service_fn};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invalidation_during_a_fill_wins() {
    let cache = Cache::memory();
    let version = Arc::new(AtomicU64::new(1));
    let layer = ResponseCacheLayer::builder(cache.clone())
        .route(
            RouteRule::new("/campaign")
                .ttl(Duration::from_secs(300))
                .tags(["campaign"]),
        )
        .build()
        .expect("layer");
    let v = version.clone();
    let svc = layer.layer(service_fn(move |_req: Request<()>| {
        let v = v.clone();
        async move {
            // Reads the "database", then takes a while to answer.
            let seen = v.load(Ordering::SeqCst);
            tokio::time::sleep(Duration::from_millis(200)).await;
            Ok::<_, Infallible>(Response::new(Full::new(Bytes::from(seen.to_string()))))
        }
    }));
    let get = || {
        Request::get("/campaign")
            .header("host", "example.com")
            .body(())
            .expect("request")
    };
    let slow = tokio::spawn(svc.clone().oneshot(get()));
    tokio::time::sleep(Duration::from_millis(50)).await;
    // The data changes and the tag is invalidated while the fill runs.
    version.store(2, Ordering::SeqCst);
    cache.invalidate_tag("campaign").await.expect("invalidate");
    let res = slow.await.expect("task").expect("infallible");
    let body = res.into_body().collect().await.expect("body").to_bytes();
    assert_eq!(body, "1", "the slow request answers what it read");
    tokio::time::sleep(Duration::from_millis(50)).await;
    // The old answer was not stored: the next request reads version 2.
    let res = svc.clone().oneshot(get()).await.expect("infallible");
    assert_eq!(res.headers()["x-cache"], "MISS");
    let body = res.into_body().collect().await.expect("body").to_bytes();
    assert_eq!(body, "2");
}
