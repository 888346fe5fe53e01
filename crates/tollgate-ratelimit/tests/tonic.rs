//! RateLimitLayer in front of a real tonic server, called by a real tonic
//! client over HTTP/2.
//!
//! No protoc: the service and the client are written by hand the way
//! tonic-build would generate them, over a codec that passes raw bytes.

mod common;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Buf, BufMut, Bytes};
use futures::future::{BoxFuture, Ready, ready};
use tollgate_ratelimit::{
    KeyExtractor, PeerIp, Policy, PolicyTable, Quota, RateLimitLayer, RateLimiter,
};
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::server::{Grpc, NamedService, UnaryService};
use tonic::transport::server::TcpIncoming;
use tonic::transport::{Channel, Server};
use tonic::{Code, Status};
use tower::{Service, ServiceBuilder};

redis_tests!(third_call_is_resource_exhausted);

/// A codec whose messages are the raw protobuf bytes.
#[derive(Clone, Copy, Debug, Default)]
struct RawCodec;

impl Codec for RawCodec {
    type Encode = Bytes;
    type Decode = Bytes;
    type Encoder = RawCodec;
    type Decoder = RawCodec;

    fn encoder(&mut self) -> RawCodec {
        RawCodec
    }

    fn decoder(&mut self) -> RawCodec {
        RawCodec
    }
}

impl Encoder for RawCodec {
    type Item = Bytes;
    type Error = Status;

    fn encode(&mut self, item: Bytes, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        dst.put(item);
        Ok(())
    }
}

impl Decoder for RawCodec {
    type Item = Bytes;
    type Error = Status;

    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Bytes>, Status> {
        Ok(Some(src.copy_to_bytes(src.remaining())))
    }
}

const SERVICE: &str = "tollgate.test.Echo";
const SAY: &str = "/tollgate.test.Echo/Say";

/// `service Echo { rpc Say(bytes) returns (bytes); }`, server side.
#[derive(Clone, Debug, Default)]
struct EchoServer;

impl NamedService for EchoServer {
    const NAME: &'static str = SERVICE;
}

/// The `Say` handler: echoes the request.
struct Say;

impl UnaryService<Bytes> for Say {
    type Response = Bytes;
    type Future = Ready<Result<tonic::Response<Bytes>, Status>>;

    fn call(&mut self, request: tonic::Request<Bytes>) -> Self::Future {
        ready(Ok(tonic::Response::new(request.into_inner())))
    }
}

impl Service<http::Request<tonic::body::Body>> for EchoServer {
    type Response = http::Response<tonic::body::Body>;
    type Error = Infallible;
    type Future = BoxFuture<'static, Result<Self::Response, Infallible>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<tonic::body::Body>) -> Self::Future {
        match req.uri().path() {
            SAY => Box::pin(async move { Ok(Grpc::new(RawCodec).unary(Say, req).await) }),
            _ => Box::pin(async move { Ok(Status::unimplemented("no such method").into_http()) }),
        }
    }
}

/// The client side of one unary call, as tonic-build would generate it.
async fn call(
    client: &mut tonic::client::Grpc<Channel>,
    path: &'static str,
    msg: &'static [u8],
) -> Result<tonic::Response<Bytes>, Status> {
    client
        .ready()
        .await
        .map_err(|e| Status::unavailable(e.to_string()))?;
    let request = tonic::Request::new(Bytes::from_static(msg));
    client
        .unary(
            request,
            http::uri::PathAndQuery::from_static(path),
            RawCodec,
        )
        .await
}

async fn say(
    client: &mut tonic::client::Grpc<Channel>,
    msg: &'static [u8],
) -> Result<tonic::Response<Bytes>, Status> {
    call(client, SAY, msg).await
}

/// The peer as tonic's server records it (`TcpConnectInfo`), read by
/// [`PeerIp`] with the `tonic` feature (on for this crate's tests).
fn tonic_peer() -> impl KeyExtractor {
    PeerIp::new()
}

/// Two calls per minute per peer: the third gets `RESOURCE_EXHAUSTED` with
/// the rate-limit headers as metadata.
async fn third_call_is_resource_exhausted(url: String) {
    let table = PolicyTable::builder()
        .policy(Policy::new("rpc", Quota::per_minute(2)))
        .route("/tollgate.test.Echo/*", ["rpc"])
        .build()
        .unwrap();
    let limiter = RateLimiter::builder(table)
        .redis(common::connect(&url).await)
        .key(tonic_peer())
        .policy_header(true)
        .build();

    let incoming = TcpIncoming::bind("127.0.0.1:0".parse::<SocketAddr>().unwrap()).unwrap();
    let addr = incoming.local_addr().unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(
        Server::builder()
            .layer(
                ServiceBuilder::new()
                    .layer(RateLimitLayer::new(limiter))
                    // The layer answers refusals itself, so it needs a body
                    // it can build from bytes; tonic's own body cannot be.
                    .map_response(|res: http::Response<tonic::body::Body>| {
                        res.map(axum::body::Body::new)
                    }),
            )
            .add_service(EchoServer)
            .serve_with_incoming_shutdown(incoming, async {
                let _ = stopped.await;
            }),
    );

    let channel = Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .timeout(Duration::from_secs(5))
        .connect()
        .await
        .unwrap();
    let mut client = tonic::client::Grpc::new(channel);

    let first = say(&mut client, b"one").await.unwrap();
    assert_eq!(first.get_ref().as_ref(), b"one");
    let md = first.metadata();
    assert_eq!(md.get("x-ratelimit-limit").unwrap(), "2");
    assert_eq!(md.get("x-ratelimit-remaining").unwrap(), "1");
    assert_eq!(md.get("x-ratelimit-reset").unwrap(), "30");
    assert!(md.get("retry-after").is_none());

    let second = say(&mut client, b"two").await.unwrap();
    assert_eq!(second.metadata().get("x-ratelimit-remaining").unwrap(), "0");

    let denied = say(&mut client, b"three").await.unwrap_err();
    assert_eq!(denied.code(), Code::ResourceExhausted, "{denied:?}");
    assert!(denied.message().contains("`rpc`"), "{}", denied.message());
    let md = denied.metadata();
    assert_eq!(md.get("retry-after").unwrap(), "30");
    assert_eq!(md.get("x-ratelimit-limit").unwrap(), "2");
    assert_eq!(md.get("x-ratelimit-remaining").unwrap(), "0");
    assert_eq!(md.get("x-ratelimit-reset").unwrap(), "60");
    assert_eq!(md.get("x-ratelimit-policy").unwrap(), "rpc");

    // A method the server does not have is still limited (by route), and
    // the handler never saw the denied call.
    let other = call(&mut client, "/tollgate.test.Echo/Nope", b"")
        .await
        .unwrap_err();
    assert_eq!(other.code(), Code::ResourceExhausted);

    stop.send(()).unwrap();
    server.await.unwrap().unwrap();
}
