//! One conformance suite for every [`Store`]: in memory, standalone Redis
//! and a Redis Cluster, so the fallback cannot drift from the primary.

use std::sync::Arc;
use std::time::Duration;

use tollgate_cache::{MemoryStore, RedisStore, Store};

use tollgate_testkit::connect as handle;

macro_rules! store_suite {
    ($($name:ident),* $(,)?) => {
        mod memory {
            $(#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() {
                super::$name(std::sync::Arc::new(tollgate_cache::MemoryStore::new(1 << 24))).await;
            })*
        }
        mod standalone {
            $(#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() {
                let server = tollgate_testkit::RedisServer::start();
                let h = super::handle(server.url()).await;
                super::$name(std::sync::Arc::new(tollgate_cache::RedisStore::new(h))).await;
            })*
        }
        mod cluster {
            $(#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() {
                let cluster = tollgate_testkit::RedisCluster::start();
                let h = super::handle(cluster.url()).await;
                super::$name(std::sync::Arc::new(tollgate_cache::RedisStore::new(h))).await;
            })*
        }
    };
}

store_suite!(
    get_put_roundtrip,
    entries_expire,
    invalidate_key_removes_one,
    invalidate_tag_removes_members_across_slots,
    invalidate_tag_removes_thousands_of_members,
    tag_members_expire_with_entries,
    overwrite_keeps_latest,
);

type S = Arc<dyn Store>;

fn tags(t: &[&str]) -> Vec<String> {
    t.iter().map(|s| (*s).to_owned()).collect()
}

async fn get_put_roundtrip(s: S) {
    assert_eq!(s.get("missing").await.unwrap(), None);
    s.put("a", "alpha".into(), Duration::from_secs(60), &[])
        .await
        .unwrap();
    assert_eq!(s.get("a").await.unwrap().as_deref(), Some(&b"alpha"[..]));
    // Binary values survive.
    let bin = bytes::Bytes::from(vec![0u8, 255, 10, 13, 0]);
    s.put("bin", bin.clone(), Duration::from_secs(60), &[])
        .await
        .unwrap();
    assert_eq!(s.get("bin").await.unwrap(), Some(bin));
}

async fn entries_expire(s: S) {
    s.put(
        "short",
        "x".into(),
        Duration::from_millis(150),
        &tags(&["t"]),
    )
    .await
    .unwrap();
    assert!(s.get("short").await.unwrap().is_some());
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(s.get("short").await.unwrap(), None);
}

async fn invalidate_key_removes_one(s: S) {
    s.put("k1", "1".into(), Duration::from_secs(60), &[])
        .await
        .unwrap();
    s.put("k2", "2".into(), Duration::from_secs(60), &[])
        .await
        .unwrap();
    assert!(s.invalidate_key("k1").await.unwrap());
    assert!(!s.invalidate_key("k1").await.unwrap());
    assert_eq!(s.get("k1").await.unwrap(), None);
    assert!(s.get("k2").await.unwrap().is_some());
}

async fn invalidate_tag_removes_members_across_slots(s: S) {
    // 50 keys spread over many cluster slots.
    for i in 0..50 {
        let t = if i % 2 == 0 {
            tags(&["campaigns:church-42", "even"])
        } else {
            tags(&["campaigns:church-42"])
        };
        s.put(
            &format!("entry-{i}"),
            "v".into(),
            Duration::from_secs(60),
            &t,
        )
        .await
        .unwrap();
    }
    s.put(
        "other",
        "v".into(),
        Duration::from_secs(60),
        &tags(&["other"]),
    )
    .await
    .unwrap();
    let mut gone = s.invalidate_tag("even").await.unwrap();
    gone.sort();
    assert_eq!(gone.len(), 25);
    assert_eq!(s.get("entry-0").await.unwrap(), None);
    assert!(s.get("entry-1").await.unwrap().is_some());
    let gone = s.invalidate_tag("campaigns:church-42").await.unwrap();
    assert_eq!(gone.len(), 50, "members of a tag are listed once each");
    for i in 0..50 {
        assert_eq!(
            s.get(&format!("entry-{i}")).await.unwrap(),
            None,
            "entry-{i}"
        );
    }
    assert!(
        s.get("other").await.unwrap().is_some(),
        "other tags untouched"
    );
    assert!(
        s.invalidate_tag("campaigns:church-42")
            .await
            .unwrap()
            .is_empty()
    );
    assert!(s.invalidate_tag("never-used").await.unwrap().is_empty());
}

/// A tag of more members than one round lists (Redis lists them a
/// thousand at a time) is removed whole.
async fn invalidate_tag_removes_thousands_of_members(s: S) {
    let n = 2_500;
    for i in 0..n {
        s.put(
            &format!("m-{i}"),
            "v".into(),
            Duration::from_secs(60),
            &tags(&["big"]),
        )
        .await
        .unwrap();
    }
    let mut gone = s.invalidate_tag("big").await.unwrap();
    gone.sort_unstable();
    gone.dedup();
    assert_eq!(gone.len(), n);
    for i in [0, 999, 1_000, 2_499] {
        assert_eq!(s.get(&format!("m-{i}")).await.unwrap(), None, "m-{i}");
    }
    assert!(
        s.invalidate_tag("big").await.unwrap().is_empty(),
        "the tag is gone"
    );
}

async fn tag_members_expire_with_entries(s: S) {
    s.put("old", "v".into(), Duration::from_millis(100), &tags(&["t"]))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    s.put("new", "v".into(), Duration::from_secs(60), &tags(&["t"]))
        .await
        .unwrap();
    assert_eq!(
        s.invalidate_tag("t").await.unwrap(),
        vec!["new".to_owned()],
        "an expired member is no longer listed"
    );
}

async fn overwrite_keeps_latest(s: S) {
    s.put("k", "1".into(), Duration::from_secs(60), &tags(&["a"]))
        .await
        .unwrap();
    s.put("k", "2".into(), Duration::from_secs(60), &tags(&["b"]))
        .await
        .unwrap();
    assert_eq!(s.get("k").await.unwrap().as_deref(), Some(&b"2"[..]));
    s.invalidate_tag("b").await.unwrap();
    assert_eq!(s.get("k").await.unwrap(), None);
}

#[test]
fn stores_are_objects() {
    fn takes(_: &dyn Store) {}
    takes(&MemoryStore::default());
    let _ = std::any::type_name::<RedisStore>();
}

/// An invalidation whose reply comes back after the deadline (the server
/// may have done some of the work) leaves the tag whole: running it again
/// deletes every entry.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tag_invalidation_cut_off_can_be_retried() {
    let server = tollgate_testkit::RedisServer::start();
    let proxy = tollgate_testkit::LatencyProxy::start(server.port(), Duration::ZERO).await;
    let h = tollgate_redis::RedisHandle::connect(
        tollgate_redis::RedisConfig::from_url(proxy.url())
            .deadline(Duration::from_millis(200))
            .probe_interval(Duration::from_millis(50)),
    )
    .await
    .unwrap();
    let s = RedisStore::new(h);
    for i in 0..10 {
        s.put(
            &format!("entry-{i}"),
            "v".into(),
            Duration::from_secs(60),
            &tags(&["t"]),
        )
        .await
        .unwrap();
    }
    // Scripts loaded while replies are quick: the slow attempt below runs
    // its commands on the server, only their replies come late.
    s.invalidate_tag("warm-up").await.unwrap();
    proxy.set_delay(Duration::from_secs(1));
    assert!(s.invalidate_tag("t").await.is_err(), "past the deadline");
    proxy.set_delay(Duration::ZERO);
    // Wait for the late replies to drain and the breaker to close.
    let started = std::time::Instant::now();
    let gone = loop {
        if let Ok(gone) = s.invalidate_tag("t").await {
            break gone;
        }
        assert!(started.elapsed() < Duration::from_secs(10), "no recovery");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(gone.len(), 10, "the retry found every member");
    for i in 0..10 {
        assert_eq!(
            s.get(&format!("entry-{i}")).await.unwrap(),
            None,
            "entry-{i}"
        );
    }
    assert!(s.invalidate_tag("t").await.unwrap().is_empty());
}

/// A tag of a hundred thousand entries is invalidated in rounds, each
/// within a deadline that one round trip for them all outlasts (it then
/// failed every time it was run, and opened the breaker).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tag_of_a_hundred_thousand_entries_is_invalidated_within_the_deadline() {
    let server = tollgate_testkit::RedisServer::start();
    let h = tollgate_redis::RedisHandle::connect(
        tollgate_redis::RedisConfig::from_url(server.url())
            .deadline(Duration::from_millis(100))
            .failure_threshold(1),
    )
    .await
    .unwrap();
    let s = RedisStore::new(h.clone());
    let n = 100_000;
    let expiry = (std::time::SystemTime::now() + Duration::from_secs(600))
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis()
        .to_string();
    let names: Vec<String> = (0..n).map(|i| format!("page-{i}")).collect();
    let keys: Vec<String> = names.iter().map(|m| s.entry_key(m)).collect();
    let tag = s.tag_key("campaigns");
    let mut zadd = vec!["ZADD", tag.as_str()];
    let mut mset = vec!["MSET"];
    for (name, key) in names.iter().zip(&keys) {
        zadd.extend([expiry.as_str(), name.as_str()]);
        mset.extend([key.as_str(), "v"]);
    }
    server.command(&zadd).expect("ZADD");
    server.command(&mset).expect("MSET");
    let gone = s
        .invalidate_tag("campaigns")
        .await
        .expect("within the deadline");
    assert_eq!(gone.len(), n);
    assert!(h.is_available(), "no timeout opened the breaker");
    assert_eq!(server.command(&["DBSIZE"]).unwrap().as_int(), Some(0));
}
