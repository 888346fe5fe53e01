//! Shared helpers: a macro that runs each async test body against a
//! standalone Redis and a Redis Cluster, services and requests.
#![allow(dead_code)]

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use tollgate_ratelimit::{RateLimitLayer, RateLimiter};
use tollgate_redis::{RedisConfig, RedisHandle};
use tower::util::BoxCloneService;
use tower::{ServiceBuilder, ServiceExt, service_fn};

pub type Body = Full<Bytes>;
pub type Svc = BoxCloneService<Request<Body>, Response<Body>, Infallible>;

/// Instantiates `async fn name(url: String)` once per topology.
#[macro_export]
macro_rules! redis_tests {
    ($($name:ident),* $(,)?) => {
        mod standalone {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    let server = tollgate_testkit::RedisServer::start();
                    super::$name(server.url()).await;
                }
            )*
        }
        mod cluster {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    let cluster = tollgate_testkit::RedisCluster::start();
                    super::$name(cluster.url()).await;
                }
            )*
        }
    };
}

pub async fn connect(url: &str) -> RedisHandle {
    connect_with(url, Duration::from_secs(2)).await
}

pub async fn connect_with(url: &str, deadline: Duration) -> RedisHandle {
    let handle = RedisHandle::connect(RedisConfig::from_url(url).namespace("t").deadline(deadline))
        .await
        .expect("connect");
    assert!(handle.is_available(), "Redis should be up at start");
    handle
}

pub fn service(limiter: RateLimiter) -> Svc {
    BoxCloneService::new(
        ServiceBuilder::new()
            .layer(RateLimitLayer::new(limiter))
            .service(service_fn(|_req: Request<Body>| async {
                Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(b"ok"))))
            })),
    )
}

pub fn req(path: &str, peer: &str) -> Request<Body> {
    let mut r = Request::builder()
        .uri(path)
        .body(Full::new(Bytes::new()))
        .unwrap();
    r.extensions_mut()
        .insert(peer.parse::<SocketAddr>().unwrap());
    r
}

pub fn send(svc: &Svc, r: Request<Body>) -> impl Future<Output = Response<Body>> + Send + use<> {
    let svc = svc.clone();
    async move { svc.oneshot(r).await.unwrap() }
}

pub async fn body(res: Response<Body>) -> String {
    let b = res.into_body().collect().await.unwrap().to_bytes();
    String::from_utf8(b.to_vec()).unwrap()
}

pub fn header<'a>(res: &'a Response<Body>, name: &str) -> Option<&'a str> {
    res.headers().get(name).and_then(|v| v.to_str().ok())
}
