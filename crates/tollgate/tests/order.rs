//! The facade applies the layers in the one correct order.

use std::convert::Infallible;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use tollgate::Tollgate;
use tollgate::ratelimit::{HeaderKey, Policy, PolicyTable, Quota};
use tollgate::usage::{TenantSource, UsageConfig, UsageLayer};
use tower::{Layer, ServiceExt, service_fn};

#[tokio::test]
async fn layers_apply_in_the_one_correct_order() {
    let tg = Tollgate::in_process();
    let table = PolicyTable::builder()
        .policy(Policy::new("api", Quota::per_minute(2)))
        .default_policies(["api"])
        .build()
        .expect("table");
    let tracker = tg.usage_tracker(UsageConfig::new());
    // Given in the "wrong" order on purpose: the stack fixes it.
    let layers = tg
        .layers()
        .rate_limit(
            tg.rate_limiter(table)
                .key(HeaderKey::new(http::HeaderName::from_static("x-api-key")))
                .build(),
        )
        .usage(UsageLayer::new(
            tracker.clone(),
            TenantSource::header("x-api-key"),
        ));
    let svc = layers.layer(service_fn(|_req: Request<()>| async {
        Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(b"ok"))))
    }));
    let mut statuses = Vec::new();
    for _ in 0..5 {
        let req = Request::builder()
            .header("x-api-key", "acme")
            .body(())
            .expect("request");
        statuses.push(svc.clone().oneshot(req).await.expect("infallible").status());
    }
    assert_eq!(
        statuses,
        [200, 200, 429, 429, 429].map(|s| StatusCode::from_u16(s).expect("status"))
    );
    tracker.flush().await.expect("flush");
    let usage = tracker.usage("acme", None).await.expect("usage");
    // Usage is outside: it saw all five requests, and the three denials.
    assert_eq!(usage.get("api_request"), Some(&5));
    assert_eq!(usage.get("ratelimit_denied"), Some(&3));
}
