//! A caching reverse proxy: [`ResponseCacheLayer`] in front of one HTTP
//! upstream, forwarded with hyper-util's client.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::uri::{Authority, Scheme};
use http::{HeaderMap, HeaderName, Request, Response, StatusCode, Uri, header};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tollgate_cache::{Cache, ResponseCacheLayer};
use tower::{Layer, Service};

/// Response body of the upstream service: the upstream's body or an error
/// page.
pub type ProxyBody = BoxBody<Bytes, hyper::Error>;

/// Headers that only concern one connection (RFC 9110 §7.6.1), besides
/// those a `Connection` header names.
const HOP_BY_HOP: [&str; 8] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

/// Forwards every request to the upstream (http only), keeping the path,
/// query and `Host`; an unreachable upstream is a 502.
#[derive(Clone, Debug)]
pub struct Upstream {
    client: Client<HttpConnector, Incoming>,
    scheme: Scheme,
    authority: Authority,
}

impl Upstream {
    /// An upstream at `uri` (`http://host:port`).
    pub fn new(uri: &Uri) -> Result<Self, String> {
        if uri.scheme() != Some(&Scheme::HTTP) {
            return Err(format!("upstream `{uri}`: only http:// is supported"));
        }
        let authority = uri
            .authority()
            .cloned()
            .ok_or_else(|| format!("upstream `{uri}` has no host"))?;
        let mut connector = HttpConnector::new();
        connector.set_connect_timeout(Some(Duration::from_secs(5)));
        Ok(Upstream {
            client: Client::builder(TokioExecutor::new()).build(connector),
            scheme: Scheme::HTTP,
            authority,
        })
    }
}

impl Service<Request<Incoming>> for Upstream {
    type Response = Response<ProxyBody>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Response<ProxyBody>, Infallible>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, mut req: Request<Incoming>) -> Self::Future {
        let client = self.client.clone();
        let mut parts = http::uri::Parts::default();
        parts.scheme = Some(self.scheme.clone());
        parts.authority = Some(self.authority.clone());
        parts.path_and_query = req.uri().path_and_query().cloned();
        let uri = Uri::from_parts(parts);
        Box::pin(async move {
            let Ok(uri) = uri else {
                return Ok(error(StatusCode::BAD_REQUEST, "bad request target"));
            };
            *req.uri_mut() = uri;
            strip_hop_by_hop(req.headers_mut());
            match client.request(req).await {
                Ok(mut res) => {
                    // The upstream's connection options (`Connection:
                    // close`, `Keep-Alive`) are not the client's.
                    strip_hop_by_hop(res.headers_mut());
                    Ok(res.map(BodyExt::boxed))
                }
                Err(e) => {
                    tracing::warn!(error = %e, "upstream request failed");
                    Ok(error(StatusCode::BAD_GATEWAY, "upstream unavailable"))
                }
            }
        })
    }
}

/// Removes the headers of one connection: the fixed list and every header
/// the `Connection` header names, so neither side's connection options
/// reach the other.
fn strip_hop_by_hop(h: &mut HeaderMap) {
    let named: Vec<HeaderName> = h
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|name| HeaderName::from_bytes(name.trim().as_bytes()).ok())
        .collect();
    for name in named {
        h.remove(name);
    }
    for name in HOP_BY_HOP {
        h.remove(name);
    }
}

fn error(status: StatusCode, msg: &'static str) -> Response<ProxyBody> {
    let mut res = Response::new(Full::new(Bytes::from(msg)).map_err(|n| match n {}).boxed());
    *res.status_mut() = status;
    res
}

/// The cache when `redis_url` is given (with a 1 s in-process L1 kept
/// coherent by pub/sub), in process otherwise. Redis being down at start
/// is not an error: the cache bypasses until it answers.
pub async fn cache(redis_url: Option<&str>) -> Result<Cache, tollgate_redis::Error> {
    match redis_url {
        Some(url) => {
            let handle =
                tollgate_redis::RedisHandle::connect(tollgate_redis::RedisConfig::from_url(url))
                    .await?;
            Ok(Cache::builder()
                .redis(handle)
                .l1(Duration::from_secs(1), 32 << 20)
                .build())
        }
        None => Ok(Cache::memory()),
    }
}

/// Serves the cached proxy on `listener` until the task is dropped.
pub async fn serve(
    listener: TcpListener,
    upstream: Upstream,
    cache: Cache,
) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let svc = ResponseCacheLayer::builder(cache).build()?.layer(upstream);
    loop {
        let (stream, peer): (_, SocketAddr) = listener.accept().await?;
        let svc = TowerToHyperService::new(svc.clone());
        tokio::spawn(async move {
            let conn = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), svc);
            if let Err(e) = conn.await {
                tracing::debug!(%peer, error = %e, "connection ended with an error");
            }
        });
    }
}
