//! Redis killed under traffic: the in-memory fallback serves (no 5xx), a
//! session that lives in Redis is never authenticated by it, and fail
//! closed answers 503.

mod common;

use std::time::{Duration, Instant};

use common::*;
use tollgate_redis::{LayerMode, RedisConfig, RedisHandle};
use tollgate_session::{FailureMode, Sessions};
use tollgate_testkit::RedisServer;

async fn fragile(url: &str) -> RedisHandle {
    RedisHandle::connect(
        RedisConfig::from_url(url)
            .namespace("t")
            .deadline(Duration::from_millis(100))
            .probe_interval(Duration::from_millis(50)),
    )
    .await
    .unwrap()
}

async fn wait_until(what: &str, mut f: impl FnMut() -> bool) {
    let started = Instant::now();
    while !f() {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fallback_serves_while_redis_is_down() {
    let mut server = RedisServer::start();
    let h = fragile(&server.url()).await;
    let sessions = Sessions::builder()
        .redis(h.clone())
        .secret(SECRET)
        .build()
        .unwrap();
    let app = app(sessions.clone());
    let mut alice = Client::new(app.clone());
    alice.send("POST", "/login/alice").await;
    let redis_cookie = alice.cookie.clone().unwrap();

    server.kill();
    // Requests during the outage never fail, whether or not the breaker
    // has opened yet.
    for _ in 0..5 {
        let res = send_with(&app, "GET", "/whoami", Some(&redis_cookie)).await;
        assert_eq!(res.status, 200, "{res:?}");
        assert_eq!(
            res.body, "anonymous",
            "a Redis session is never served by the fallback"
        );
    }
    wait_until("breaker open", || !h.is_available()).await;
    let health = h.health().await;
    assert!(
        health
            .layers
            .iter()
            .any(|l| l.name == "session" && l.mode == LayerMode::Fallback),
        "{health:?}"
    );

    // A new session during the outage lives in the fallback.
    let mut bob = Client::new(app.clone());
    let res = bob.send("POST", "/login/bob").await;
    assert_eq!(res.status, 200);
    assert_eq!(bob.send("GET", "/whoami").await.body, "bob");
    assert_eq!(bob.send("POST", "/set/x/1").await.status, 200);
    assert_eq!(bob.send("GET", "/get/x").await.body, "\"1\"");
    assert_eq!(sessions.memory_store().len(), 1);
    let res = bob.send("POST", "/logout").await;
    assert_eq!(res.status, 200);
    assert_eq!(bob.send("GET", "/whoami").await.body, "anonymous");

    // Redis is back (empty): the handle recovers and Redis serves again.
    server.restart();
    wait_until("breaker closed", || h.is_available()).await;
    let mut carol = Client::new(app.clone());
    carol.send("POST", "/login/carol").await;
    assert_eq!(carol.send("GET", "/whoami").await.body, "carol");
    assert_eq!(sessions.memory_store().len(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fallback_never_serves_sessions_learned_from_redis() {
    let mut server = RedisServer::start();
    let h = fragile(&server.url()).await;
    let sessions = Sessions::builder()
        .redis(h.clone())
        .secret(SECRET)
        .build()
        .unwrap();
    let mut c = Client::new(app(sessions.clone()));
    c.send("POST", "/login/alice").await;
    // Read it through Redis (a fallback that cached reads would now know it).
    assert_eq!(c.send("GET", "/whoami").await.body, "alice");
    // Revoke it in Redis, then take Redis down.
    assert_eq!(sessions.revoke_all("alice", None).await.unwrap(), 1);
    server.kill();
    // The dropped connection opens the breaker without any request.
    wait_until("breaker open", || !h.is_available()).await;
    let res = c.send("GET", "/whoami").await;
    assert_eq!((res.status.as_u16(), res.body.as_str()), (200, "anonymous"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fail_closed_answers_503() {
    let mut server = RedisServer::start();
    let h = fragile(&server.url()).await;
    let sessions = Sessions::builder()
        .redis(h.clone())
        .secret(SECRET)
        .failure_mode(FailureMode::FailClosed)
        .build()
        .unwrap();
    let mut c = Client::new(app(sessions));
    c.send("POST", "/login/alice").await;
    assert_eq!(c.send("GET", "/whoami").await.body, "alice");
    server.kill();
    // Before the breaker opens: the load fails → 503 from the handler's `?`.
    let res = c.send("GET", "/whoami").await;
    assert_eq!(res.status, 503, "{res:?}");
    wait_until("breaker open", || !h.is_available()).await;
    let res = c.send("GET", "/noop").await;
    assert_eq!(res.status, 503);
    assert!(res.body.contains("\"status\":503"), "{}", res.body);
    server.restart();
    wait_until("breaker closed", || h.is_available()).await;
    assert_eq!(c.send("GET", "/noop").await.status, 200);
}
