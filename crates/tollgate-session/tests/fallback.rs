//! Redis killed under traffic: the in-memory fallback serves (no 5xx), a
//! session that lives in Redis is never authenticated by it, and fail
//! closed answers 503.

mod common;

use std::time::{Duration, Instant};

use common::*;
use tollgate_redis::{LayerMode, RedisConfig, RedisHandle};
use tollgate_session::{FailureMode, Sessions};
use tollgate_testkit::{RedisServer, Reply};

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

/// Freezes Redis and sends requests carrying `cookie` until the breaker
/// has opened (each load timing out is one failure); returns their
/// responses.
async fn freeze_until_open(
    server: &mut RedisServer,
    h: &RedisHandle,
    app: &axum::Router,
    cookie: &str,
) -> Vec<Res> {
    server.pause();
    let started = Instant::now();
    let mut responses = Vec::new();
    while h.is_available() {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "the breaker never opened"
        );
        responses.push(send_with(app, "GET", "/whoami", Some(cookie)).await);
    }
    responses
}

/// A logged-in user through a frozen Redis: loads time out, then the
/// breaker opens and the fallback answers. The user is anonymous meanwhile,
/// but no response removes the cookie, so the session is theirs again
/// once Redis answers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outage_never_removes_the_cookie() {
    let mut server = RedisServer::start();
    let h = fragile(&server.url()).await;
    let mut alice = Client::new(app(redis_sessions(h.clone())));
    alice.send("POST", "/login/alice").await;
    assert_eq!(alice.send("GET", "/whoami").await.body, "alice");

    let cookie = alice.cookie.clone().unwrap();
    let failed = freeze_until_open(&mut server, &h, &alice.app, &cookie).await;
    assert!(!failed.is_empty());
    for res in &failed {
        assert_eq!(
            (res.status.as_u16(), res.body.as_str()),
            (200, "anonymous"),
            "{res:?}"
        );
        assert!(
            res.set_cookie.is_empty(),
            "a failed load keeps the cookie: {res:?}"
        );
        alice.absorb(res);
    }
    // Breaker open: the fallback does not know the id.
    let res = alice.send("GET", "/whoami").await;
    assert_eq!((res.status.as_u16(), res.body.as_str()), (200, "anonymous"));
    assert!(res.set_cookie.is_empty(), "{res:?}");

    server.resume();
    wait_until("breaker closed", || h.is_available()).await;
    assert_eq!(alice.send("GET", "/whoami").await.body, "alice");
}

/// A change to a session Redis cannot read fails (503) and keeps the
/// cookie, before the breaker opens (the load times out) and after: saved,
/// it would have started a new session in the fallback under a new cookie,
/// and the user would have lost the Redis session once Redis answered. A
/// login (which rotates the id) still starts a new session. Once Redis
/// answers, the session is there, unchanged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_change_to_a_session_redis_cannot_read_fails_and_keeps_the_cookie() {
    let mut server = RedisServer::start();
    let h = fragile(&server.url()).await;
    let sessions = redis_sessions(h.clone());
    let mut alice = Client::new(app(sessions.clone()));
    alice.send("POST", "/login/alice").await;
    assert_eq!(alice.send("POST", "/set/x/1").await.status, 200);
    let cookie = alice.cookie.clone().unwrap();

    server.pause();
    let timed_out = send_with(&alice.app, "POST", "/set/x/2", Some(&cookie)).await;
    freeze_until_open(&mut server, &h, &alice.app, &cookie).await;
    let refused = send_with(&alice.app, "POST", "/set/x/3", Some(&cookie)).await;
    for res in [&timed_out, &refused] {
        assert_eq!(res.status, 503, "{res:?}");
        assert!(res.set_cookie.is_empty(), "the cookie stays: {res:?}");
    }
    assert_eq!(sessions.memory_store().len(), 0, "no session was started");
    let login = send_with(&alice.app, "POST", "/login/alice", Some(&cookie)).await;
    assert_eq!(login.status, 200, "{login:?}");
    assert_eq!(login.set_cookie.len(), 1, "a login starts a new session");
    assert_eq!(sessions.memory_store().len(), 1);

    server.resume();
    wait_until("breaker closed", || h.is_available()).await;
    assert_eq!(alice.send("GET", "/whoami").await.body, "alice");
    assert_eq!(alice.send("GET", "/get/x").await.body, "\"1\"");
}

/// Logging out while the breaker is open cannot delete the Redis record:
/// it fails (503), and the cookie stays, whether the handler read the
/// session first or not. Once Redis answers, logging out works and the
/// old cookie is dead.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logout_while_redis_is_down_fails_and_keeps_the_session() {
    let mut server = RedisServer::start();
    let h = fragile(&server.url()).await;
    let sessions = redis_sessions(h.clone());
    let mut alice = Client::new(app(sessions.clone()));
    alice.send("POST", "/login/alice").await;
    let cookie = alice.cookie.clone().unwrap();
    let key = sessions
        .redis_store()
        .unwrap()
        .record_key(&sessions.id_hash_of(&alice.cookie_value().unwrap()).unwrap());

    freeze_until_open(&mut server, &h, &alice.app, &cookie).await;
    for path in ["/logout", "/read-then-logout"] {
        let res = alice.send("POST", path).await;
        assert_eq!(res.status, 503, "{path}: {res:?}");
        assert!(res.set_cookie.is_empty(), "{path}: {res:?}");
    }
    assert_eq!(alice.cookie.as_deref(), Some(cookie.as_str()));

    server.resume();
    wait_until("breaker closed", || h.is_available()).await;
    assert_eq!(server.command(&["EXISTS", &key]), Ok(Reply::Int(1)));
    assert_eq!(alice.send("GET", "/whoami").await.body, "alice");
    let res = alice.send("POST", "/logout").await;
    assert_eq!(res.status, 200, "{res:?}");
    assert!(res.set_cookie[0].contains("Max-Age=0"), "{res:?}");
    assert_eq!(server.command(&["EXISTS", &key]), Ok(Reply::Int(0)));
    let replay = send_with(&alice.app, "GET", "/whoami", Some(&cookie)).await;
    assert_eq!(replay.body, "anonymous");
}

/// A loaded session whose delete fails (Redis froze after the load):
/// `destroy` reports the error and the response keeps the cookie.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_delete_keeps_the_cookie() {
    let mut server = RedisServer::start();
    let h = fragile(&server.url()).await;
    let sessions = redis_sessions(h.clone());
    let mut alice = Client::new(app(sessions.clone()));
    alice.send("POST", "/login/alice").await;
    let cookie = alice.cookie.clone().unwrap();
    let gate = Gate::default();
    let logout = {
        let app = gated_app(sessions, gate.clone());
        let cookie = cookie.clone();
        tokio::spawn(async move { send_with(&app, "POST", "/gated-logout", Some(&cookie)).await })
    };
    gate.reached().await;
    server.pause();
    gate.release();
    let res = logout.await.unwrap();
    server.resume();
    assert_eq!(res.status, 503, "{res:?}");
    assert!(res.set_cookie.is_empty(), "{res:?}");
}
