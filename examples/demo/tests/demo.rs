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

#[test]
fn arguments_are_checked() {
    assert!(DemoConfig::from_env_and_args(["--addr".to_owned(), "nonsense".to_owned()]).is_err());
    assert!(DemoConfig::from_env_and_args(["--bogus".to_owned()]).is_err());
    let c = DemoConfig::from_env_and_args(["--addr=127.0.0.1:4000".to_owned()]).expect("ok");
    assert_eq!(c.addr.port(), 4000);
}
