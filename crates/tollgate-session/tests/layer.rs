//! SessionLayer against real Redis: standalone and cluster.

mod common;

use std::time::Duration;

use common::*;
use futures::future::join_all;
use tollgate_session::store::SessionStore;
use tollgate_session::{Sessions, Timeouts};

redis_tests!(
    round_trips,
    survives_an_application_restart,
    parallel_writes_all_survive,
    logout_during_a_slow_request_stays_logged_out,
    rotate_id_kills_the_old_id,
    requests_racing_a_login_keep_its_cookie,
    revoke_all_others,
    idle_and_absolute_expiry_on_replay,
    redis_never_sees_raw_ids,
    signed_cookies,
    records_are_readable_json,
);

/// Counts the commands `f` costs.
async fn cost<F: std::future::Future<Output = Res>>(topo: &Topo, f: F) -> (Res, u64) {
    // Reading the counters is itself a command per node: calibrate.
    let first = topo.commands();
    let before = topo.commands();
    let noise = before - first;
    let res = f.await;
    (res, topo.commands() - before - noise)
}

async fn round_trips(topo: Topo) {
    topo.prime_scripts();
    let sessions = redis_sessions(connect(&topo.url()).await);
    let mut c = Client::new(app(sessions.clone()));

    // commands_processed() counts every command Redis runs, script
    // internals included: it proves the zero-cost paths.
    let (res, n) = cost(&topo, c.send("GET", "/noop")).await;
    assert_eq!((res.status.as_u16(), n), (200, 0), "untouched: 0 commands");
    assert!(res.set_cookie.is_empty());
    let (res, n) = cost(&topo, c.send("GET", "/get/a")).await;
    assert_eq!(
        (res.body.as_str(), n),
        ("none", 0),
        "read without a cookie: 0"
    );
    assert!(res.set_cookie.is_empty(), "no session is created by a read");

    // MONITOR counts what the layer sends (round trips).
    let m = Monitor::start(&topo);
    let (res, n, cmds) = m.round_trips(c.send("POST", "/set/a/1")).await;
    assert_eq!((res.status.as_u16(), n), (200, 1), "create: 1 {cmds:?}");
    assert_eq!(res.set_cookie.len(), 1);

    let key = sessions
        .redis_store()
        .unwrap()
        .record_key(&sessions.id_hash_of(&c.cookie_value().unwrap()).unwrap());
    let stored = topo.get(&key).expect("record stored");
    let (res, n, cmds) = m.round_trips(c.send("GET", "/get/a")).await;
    assert_eq!((res.body.as_str(), n), ("\"1\"", 1), "read: 1 {cmds:?}");
    assert!(res.set_cookie.is_empty());
    assert_eq!(
        topo.get(&key).unwrap(),
        stored,
        "a read inside the touch window writes nothing"
    );

    let (res, n, cmds) = m.round_trips(c.send("POST", "/set/b/2")).await;
    assert_eq!(
        (res.status.as_u16(), n),
        (200, 2),
        "read + write: 2 {cmds:?}"
    );

    let (res, n, cmds) = m.round_trips(c.send("GET", "/noop")).await;
    assert_eq!(
        (res.status.as_u16(), n),
        (200, 0),
        "untouched with a cookie: 0 {cmds:?}"
    );

    let (res, n, cmds) = m.round_trips(c.send("POST", "/logout")).await;
    assert_eq!((res.status.as_u16(), n), (200, 1), "logout: 1 {cmds:?}");
    assert!(res.set_cookie[0].contains("Max-Age=0"));
    assert!(topo.get(&key).is_none());
}

async fn survives_an_application_restart(topo: Topo) {
    let mut c = Client::new(app(redis_sessions(connect(&topo.url()).await)));
    c.send("POST", "/login/alice").await;
    c.send("POST", "/set/cart/3").await;
    // A new process: new handle, new layer, same Redis and secret.
    c.app = app(redis_sessions(connect(&topo.url()).await));
    assert_eq!(c.send("GET", "/whoami").await.body, "alice");
    assert_eq!(c.send("GET", "/get/cart").await.body, "\"3\"");
}

async fn parallel_writes_all_survive(topo: Topo) {
    let sessions = redis_sessions(connect(&topo.url()).await);
    let mut c = Client::new(app(sessions.clone()));
    c.send("POST", "/set/start/0").await;
    let cookie = c.cookie.clone().unwrap();
    let app = c.app.clone();
    let statuses = join_all((0..100).map(|i| {
        let (app, cookie) = (app.clone(), cookie.clone());
        async move {
            send_with(&app, "POST", &format!("/set/k{i}/{i}"), Some(&cookie))
                .await
                .status
        }
    }))
    .await;
    assert!(statuses.iter().all(|s| *s == 200));
    let hash = sessions.id_hash_of(&c.cookie_value().unwrap()).unwrap();
    let record = sessions
        .redis_store()
        .unwrap()
        .load(&hash)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(record.data.len(), 101, "every concurrent write survived");
    for i in 0..100 {
        assert_eq!(record.data[&format!("k{i}")], format!("\"{i}\""));
    }
}

async fn logout_during_a_slow_request_stays_logged_out(topo: Topo) {
    let sessions = redis_sessions(connect(&topo.url()).await);
    let mut c = Client::new(app(sessions.clone()));
    c.send("POST", "/login/alice").await;
    let cookie = c.cookie.clone().unwrap();
    let gate = Gate::default();
    let slow = {
        let (app, cookie) = (gated_app(sessions.clone(), gate.clone()), cookie.clone());
        tokio::spawn(async move {
            send_with(&app, "POST", "/gated-set/user/mallory", Some(&cookie)).await
        })
    };
    gate.reached().await;
    let res = c.send("POST", "/logout").await;
    assert_eq!(res.status, 200);
    assert!(res.set_cookie[0].contains("Max-Age=0"), "{res:?}");
    gate.release();
    let slow = slow.await.unwrap();
    assert_eq!(slow.status, 200, "a store miss on save is not an error");
    // Only the logout removes the cookie; the slow request leaves it be.
    assert!(slow.set_cookie.is_empty(), "{slow:?}");
    // Replaying the old cookie: still logged out, nothing resurrected.
    let res = send_with(&c.app, "GET", "/whoami", Some(&cookie)).await;
    assert_eq!(res.body, "anonymous");
    let hash = sessions
        .id_hash_of(cookie.split_once('=').unwrap().1)
        .unwrap();
    assert!(
        topo.get(&sessions.redis_store().unwrap().record_key(&hash))
            .is_none()
    );
}

async fn rotate_id_kills_the_old_id(topo: Topo) {
    let sessions = redis_sessions(connect(&topo.url()).await);
    let mut c = Client::new(app(sessions.clone()));
    c.send("POST", "/set/cart/7").await;
    let anon = c.cookie.clone().unwrap();
    let created = sessions
        .redis_store()
        .unwrap()
        .load(&sessions.id_hash_of(&c.cookie_value().unwrap()).unwrap())
        .await
        .unwrap()
        .unwrap();
    let res = c.send("POST", "/login/alice").await;
    assert_eq!(res.set_cookie.len(), 1);
    assert_ne!(c.cookie.as_deref(), Some(anon.as_str()), "new id on login");
    assert_eq!(
        c.send("GET", "/get/cart").await.body,
        "\"7\"",
        "entries move"
    );
    assert_eq!(c.send("GET", "/whoami").await.body, "alice");
    let res = send_with(&c.app, "GET", "/whoami", Some(&anon)).await;
    assert_eq!(res.body, "anonymous", "old id is dead");
    assert_eq!(
        send_with(&c.app, "GET", "/get/cart", Some(&anon))
            .await
            .body,
        "none"
    );
    let rotated = sessions
        .redis_store()
        .unwrap()
        .load(&sessions.id_hash_of(&c.cookie_value().unwrap()).unwrap())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        rotated.expires_at, created.expires_at,
        "rotation never extends a session"
    );
}

/// Requests carrying the old id while a login rotates it find no record:
/// one loads after the rotation, one saves after it, one rotates too late.
/// None of them answers with a Set-Cookie, so however late their
/// responses reach the browser, it keeps the login's new id.
async fn requests_racing_a_login_keep_its_cookie(topo: Topo) {
    let sessions = redis_sessions(connect(&topo.url()).await);
    let mut c = Client::new(app(sessions.clone()));
    c.send("POST", "/set/cart/7").await;
    let old = c.cookie.clone().unwrap();
    let start = |gate: &Gate, path: &'static str| {
        let app = gated_app(sessions.clone(), gate.clone());
        let old = old.clone();
        tokio::spawn(async move { send_with(&app, "POST", path, Some(&old)).await })
    };
    let (writer, late_login) = (Gate::default(), Gate::default());
    let write = start(&writer, "/gated-set/theme/dark");
    writer.reached().await;
    let second = start(&late_login, "/gated-login/alice");
    late_login.reached().await;

    // The login's response reaches the browser first.
    let res = c.send("POST", "/login/alice").await;
    assert_eq!(res.set_cookie.len(), 1, "{res:?}");
    assert_ne!(c.cookie.as_deref(), Some(old.as_str()));

    let read = send_with(&c.app, "GET", "/whoami", Some(&old)).await;
    assert_eq!(read.body, "anonymous", "the old id is dead");
    writer.release();
    let write = write.await.unwrap();
    late_login.release();
    let second = second.await.unwrap();
    for (what, res) in [
        ("a load that missed", &read),
        ("a save whose record was rotated away", &write),
        ("a rotation that found nothing to take", &second),
    ] {
        assert_eq!(res.status, 200, "{what}: {res:?}");
        assert!(res.set_cookie.is_empty(), "{what}: {res:?}");
        c.absorb(res);
    }
    assert_eq!(c.send("GET", "/whoami").await.body, "alice");
    assert_eq!(c.send("GET", "/get/cart").await.body, "\"7\"");
}

async fn revoke_all_others(topo: Topo) {
    let sessions = redis_sessions(connect(&topo.url()).await);
    let app = app(sessions.clone());
    let mut devices: Vec<Client> = (0..3).map(|_| Client::new(app.clone())).collect();
    for d in &mut devices {
        d.send("POST", "/login/alice").await;
    }
    let mut bob = Client::new(app.clone());
    bob.send("POST", "/login/bob").await;
    let listed: Vec<serde_json::Value> =
        serde_json::from_str(&devices[0].send("GET", "/sessions").await.body).unwrap();
    assert_eq!(listed.len(), 3);
    assert_eq!(listed[0]["user_agent"], "test-agent/1.0");

    assert_eq!(devices[0].send("POST", "/revoke-others").await.body, "2");
    for d in &mut devices[1..] {
        let res = d.send("GET", "/whoami").await;
        assert_eq!(res.body, "anonymous", "revoked sessions are rejected");
        // No removal cookie for a record merely not found (see
        // `requests_racing_a_login_keep_its_cookie`).
        assert!(res.set_cookie.is_empty(), "{res:?}");
    }
    assert_eq!(devices[0].send("GET", "/whoami").await.body, "alice");
    assert_eq!(bob.send("GET", "/whoami").await.body, "bob");
    let listed: Vec<serde_json::Value> =
        serde_json::from_str(&devices[0].send("GET", "/sessions").await.body).unwrap();
    assert_eq!(listed.len(), 1);
    // Revoke one by its id hash: only the owner's sessions.
    let bob_hash = sessions.id_hash_of(&bob.cookie_value().unwrap()).unwrap();
    assert!(
        !sessions.revoke("alice", &bob_hash).await.unwrap(),
        "not alice's"
    );
    assert_eq!(bob.send("GET", "/whoami").await.body, "bob");
    assert!(sessions.revoke("bob", &bob_hash).await.unwrap());
    assert_eq!(bob.send("GET", "/whoami").await.body, "anonymous");
    // Admin API: revoke everything.
    assert_eq!(sessions.revoke_all("alice", None).await.unwrap(), 1);
    assert_eq!(devices[0].send("GET", "/whoami").await.body, "anonymous");
}

async fn idle_and_absolute_expiry_on_replay(topo: Topo) {
    let h = connect(&topo.url()).await;
    let sessions = Sessions::builder()
        .redis(h)
        .secret(SECRET)
        .idle_timeout(Duration::from_millis(1000))
        .absolute_timeout(Duration::from_millis(2000))
        .touch_after(Duration::from_millis(100))
        .build()
        .unwrap();
    assert_eq!(
        sessions.timeouts().idle,
        Timeouts {
            idle: Duration::from_millis(1000),
            ..sessions.timeouts()
        }
        .idle
    );
    let mut c = Client::new(app(sessions.clone()));
    c.send("POST", "/login/alice").await;
    let old = c.cookie.clone().unwrap();
    tokio::time::sleep(Duration::from_millis(1300)).await;
    let res = send_with(&c.app, "GET", "/whoami", Some(&old)).await;
    assert_eq!(res.body, "anonymous", "idle timeout holds on replay");

    let mut c = Client::new(app(sessions));
    c.send("POST", "/login/alice").await;
    let cookie = c.cookie.clone().unwrap();
    let mut alive = 0;
    for _ in 0..6 {
        tokio::time::sleep(Duration::from_millis(450)).await;
        if send_with(&c.app, "GET", "/whoami", Some(&cookie))
            .await
            .body
            == "alice"
        {
            alive += 1;
        }
    }
    assert!((3..=4).contains(&alive), "alive for {alive} requests");
    let res = send_with(&c.app, "GET", "/whoami", Some(&cookie)).await;
    assert_eq!(
        res.body, "anonymous",
        "absolute timeout holds however active"
    );
}

async fn redis_never_sees_raw_ids(topo: Topo) {
    let sessions = redis_sessions(connect(&topo.url()).await);
    let app = app(sessions.clone());
    let mut ids = Vec::new();
    for i in 0..5 {
        let mut c = Client::new(app.clone());
        c.send("POST", "/set/x/1").await;
        ids.push(c.cookie_value().unwrap());
        c.send("POST", &format!("/login/user{i}")).await;
        ids.push(c.cookie_value().unwrap());
    }
    let keys = topo.all_keys();
    assert!(keys.len() >= 5, "{keys:?}");
    let mut hashes_seen = 0;
    for (node, key) in &keys {
        let value = topo.dump(*node, key);
        for id in &ids {
            assert!(!key.contains(id.as_str()), "raw id in key {key}");
            assert!(!value.contains(id.as_str()), "raw id in value of {key}");
        }
        if ids
            .iter()
            .any(|id| key.contains(&sessions.id_hash_of(id).unwrap()))
        {
            hashes_seen += 1;
        }
        assert!(!value.contains("user0") || key.contains("session"), "{key}");
    }
    assert_eq!(
        hashes_seen, 5,
        "the logged-in sessions are stored under keyed hashes"
    );
}

async fn signed_cookies(topo: Topo) {
    topo.prime_scripts();
    let h = connect(&topo.url()).await;
    let old_key = [1u8; 32];
    let new_key = [2u8; 32];
    let signed = |current: [u8; 32], previous: Vec<[u8; 32]>| {
        Sessions::builder()
            .redis(h.clone())
            .secret(SECRET)
            .signing_keys(current, previous)
            .build()
            .unwrap()
    };
    let mut c = Client::new(app(signed(old_key, vec![])));
    c.send("POST", "/set/a/1").await;
    let value = c.cookie_value().unwrap();
    assert!(value.contains('.'), "signed: id.signature");

    // Rotate the signing key: the old signature is still accepted, and the
    // cookie comes back signed with the new key.
    c.app = app(signed(new_key, vec![old_key]));
    let res = c.send("GET", "/get/a").await;
    assert_eq!(res.body, "\"1\"");
    assert_eq!(res.set_cookie.len(), 1, "re-signed");
    let resigned = c.cookie_value().unwrap();
    assert_ne!(resigned, value);
    assert_eq!(
        resigned.split('.').next(),
        value.split('.').next(),
        "same id"
    );
    assert!(c.send("GET", "/get/a").await.set_cookie.is_empty());

    // A tampered cookie costs no Redis command and yields a new session.
    let (id, sig) = resigned.split_once('.').unwrap();
    let flipped = if id.starts_with('A') { "B" } else { "A" };
    let tampered = format!("id={flipped}{}.{sig}", &id[1..]);
    let (res, n) = cost(&topo, send_with(&c.app, "GET", "/get/a", Some(&tampered))).await;
    assert_eq!(n, 0, "tampered: no Redis command");
    assert_eq!(res.status, 200);
    assert_eq!(res.body, "none");
    assert!(
        res.set_cookie.is_empty(),
        "an invalid cookie is ignored, not removed: {res:?}"
    );
    let unsigned = format!("id={id}");
    let res = send_with(&c.app, "GET", "/get/a", Some(&unsigned)).await;
    assert_eq!(
        res.body, "none",
        "an unsigned id is refused when signing is on"
    );
}

async fn records_are_readable_json(topo: Topo) {
    let sessions = redis_sessions(connect(&topo.url()).await);
    let mut c = Client::new(app(sessions.clone()));
    c.send("POST", "/set/cart/3").await;
    c.send("POST", "/login/alice").await;
    let key = sessions
        .redis_store()
        .unwrap()
        .record_key(&sessions.id_hash_of(&c.cookie_value().unwrap()).unwrap());
    let raw = topo.get(&key).unwrap();
    let v: serde_json::Value = serde_json::from_str(&raw).unwrap();
    assert_eq!(v["user"], "alice");
    assert_eq!(v["data"]["cart"], "\"3\"");
    assert_eq!(v["data"]["user"], "\"alice\"");
    assert_eq!(v["user_agent"], "test-agent/1.0");
    assert_eq!(v["v"], 1);
    for field in ["created_at", "last_seen", "expires_at", "generation"] {
        assert!(v[field].is_u64(), "{field} in {raw}");
    }
    // PX = min(idle, absolute remaining).
    let pttl = topo.pttl(&key).unwrap();
    assert!(pttl > 0 && pttl <= 30 * 60 * 1000, "{pttl}");

    // A corrupt record is a new session, not a 500.
    for s in topo.servers() {
        let _ = s.command(&["SET", &key, "not json"]);
    }
    let res = c.send("GET", "/whoami").await;
    assert_eq!((res.status.as_u16(), res.body.as_str()), (200, "anonymous"));
}
