//! One conformance suite for every store: memory, Redis standalone, Redis
//! Cluster. The fallback can never drift from the primary.

use std::collections::BTreeMap;
use std::time::Duration;

use tollgate_session::Timeouts;
use tollgate_session::store::{
    Diff, MemoryStore, NewRecord, RedisStore, SaveOutcome, SessionStore,
};

mod common;

/// Instantiates `async fn name<S: SessionStore>(mk: impl Fn(Timeouts) -> S)`
/// once per store.
macro_rules! conformance {
    ($($name:ident),* $(,)?) => {
        mod memory {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name(|t| tollgate_session::store::MemoryStore::new(1_000, t)).await;
                }
            )*
        }
        mod standalone {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    let server = tollgate_testkit::RedisServer::start();
                    let h = super::common::connect(&server.url()).await;
                    super::$name(move |t| tollgate_session::store::RedisStore::new(h.clone(), t)).await;
                }
            )*
        }
        mod standalone_cached {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    let server = tollgate_testkit::RedisServer::start();
                    let h = super::common::connect(&server.url()).await;
                    super::$name(move |t| super::cached(h.clone(), t)).await;
                }
            )*
        }
        mod cluster {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    let cluster = tollgate_testkit::RedisCluster::start();
                    let h = super::common::connect(&cluster.url()).await;
                    super::$name(move |t| tollgate_session::store::RedisStore::new(h.clone(), t)).await;
                }
            )*
        }
    };
}

conformance!(
    create_is_nx_and_loads_back,
    values_round_trip_exactly,
    concurrent_saves_merge,
    saves_from_a_loaded_record_merge_when_raced,
    never_resurrects,
    remove_and_clear,
    read_inside_touch_window_writes_nothing,
    idle_timeout,
    touch_extends_idle,
    absolute_timeout,
    take_moves_the_record,
    rotation_keeps_expiry,
    user_index,
);

// The suite is generic; make sure both stores are instantiated.
const _: fn() = || {
    fn is_store<S: SessionStore>() {}
    is_store::<MemoryStore>();
    is_store::<RedisStore>();
};

/// A Redis store with the in-process cache, live before it is used.
fn cached(h: tollgate_redis::RedisHandle, t: Timeouts) -> RedisStore {
    let s = RedisStore::new(h, t).with_local_cache(1_000, Duration::from_secs(60));
    let started = std::time::Instant::now();
    while !s.local_cache_live() {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "the cache never went live"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    s
}

use common::{id_hash as hash, long_timeouts as long};

fn entry(k: &str, json: &str) -> (String, String) {
    (k.to_owned(), json.to_owned())
}

fn new_record(data: &[(&str, &str)], user: Option<&str>) -> NewRecord {
    NewRecord {
        data: data.iter().map(|(k, v)| entry(k, v)).collect(),
        user: user.map(str::to_owned),
        user_agent: Some("agent".into()),
        ip: Some("192.0.2.1".into()),
        ..NewRecord::default()
    }
}

fn set(k: &str, json: &str) -> Diff {
    Diff {
        set: [entry(k, json)].into_iter().collect(),
        ..Diff::default()
    }
}

async fn create_is_nx_and_loads_back<S: SessionStore>(mk: impl Fn(Timeouts) -> S) {
    let s = mk(long());
    let h = hash();
    assert!(
        s.create(&h, None, &new_record(&[("a", "1")], Some("u1")))
            .await
            .unwrap()
    );
    assert!(
        !s.create(&h, None, &new_record(&[("a", "2")], None))
            .await
            .unwrap(),
        "creation is NX"
    );
    let r = s.load(&h).await.unwrap().expect("record");
    assert_eq!(
        r.data,
        [entry("a", "1")].into_iter().collect::<BTreeMap<_, _>>()
    );
    assert_eq!(r.user.as_deref(), Some("u1"));
    assert_eq!(r.user_agent.as_deref(), Some("agent"));
    assert_eq!(r.ip.as_deref(), Some("192.0.2.1"));
    assert_eq!(r.generation, 1);
    assert_eq!(r.v, 1);
    assert!(r.last_seen >= r.created_at);
    let lifetime = r.expires_at - r.created_at;
    assert!((3_599_000..=3_601_000).contains(&lifetime), "{lifetime}");
    assert!(s.load(&hash()).await.unwrap().is_none());
}

async fn values_round_trip_exactly<S: SessionStore>(mk: impl Fn(Timeouts) -> S) {
    let s = mk(long());
    let h = hash();
    assert!(
        s.create(&h, None, &new_record(&[("empty_list", "[]")], None))
            .await
            .unwrap()
    );
    let values = [
        ("empty_list", "[]"),
        ("empty_map", "{}"),
        ("big", "18446744073709551615"),
        ("neg", "-9223372036854775808"),
        ("float", "0.1"),
        ("text", "\"h\u{e9}llo / \\\"world\\\" \u{1f600}\""),
        ("nested", "{\"a\":[1,{\"b\":null}],\"c\":true}"),
        ("1", "\"numeric key\""),
    ];
    let diff = Diff {
        set: values.iter().map(|(k, v)| entry(k, v)).collect(),
        ..Diff::default()
    };
    assert_eq!(
        s.save(&h, None, &diff, 1).await.unwrap(),
        SaveOutcome::Saved
    );
    let r = s.load(&h).await.unwrap().unwrap();
    for (k, v) in values {
        assert_eq!(r.data.get(k).map(String::as_str), Some(v), "{k}");
    }
}

async fn concurrent_saves_merge<S: SessionStore>(mk: impl Fn(Timeouts) -> S) {
    let s = mk(long());
    let h = hash();
    assert!(
        s.create(&h, None, &new_record(&[("keep", "0")], None))
            .await
            .unwrap()
    );
    // Two requests loaded generation 1 and write different keys.
    assert_eq!(
        s.save(&h, None, &set("a", "1"), 1).await.unwrap(),
        SaveOutcome::Saved
    );
    assert_eq!(
        s.save(&h, None, &set("b", "2"), 1).await.unwrap(),
        SaveOutcome::Merged
    );
    let r = s.load(&h).await.unwrap().unwrap();
    assert_eq!(r.data.len(), 3, "{:?}", r.data);
    assert_eq!(r.generation, 3);
}

/// `save_from`: the request holds the record it loaded. Nobody saved since:
/// the merged record is written. Another save came first: entries both
/// wrote survive (merged), and a tricky entry value that spells the
/// generation field cannot fool the check. Gone: nothing written.
async fn saves_from_a_loaded_record_merge_when_raced<S: SessionStore>(mk: impl Fn(Timeouts) -> S) {
    let s = mk(long());
    let h = hash();
    let tricky = r#"""generation":1,""#;
    assert!(
        s.create(
            &h,
            None,
            &new_record(&[("generation", "1"), ("x", tricky)], None)
        )
        .await
        .unwrap()
    );
    let a = s.load(&h).await.unwrap().expect("record");
    let b = s.load(&h).await.unwrap().expect("record");
    assert_eq!(
        s.save_from(&h, None, &set("a", "1"), a).await.unwrap(),
        SaveOutcome::Saved
    );
    assert_eq!(
        s.save_from(&h, None, &set("b", "2"), b).await.unwrap(),
        SaveOutcome::Merged,
        "b loaded before a saved"
    );
    let r = s.load(&h).await.unwrap().expect("record");
    // Moved by each save (by one, or to a fresh value on the cached path).
    assert_ne!(r.generation, 1);
    assert_eq!(r.data.get("a").map(String::as_str), Some("1"));
    assert_eq!(r.data.get("b").map(String::as_str), Some("2"));
    assert_eq!(r.data.get("x").map(String::as_str), Some(tricky));
    assert_eq!(r.data.get("generation").map(String::as_str), Some("1"));
    // A third save from the fresh record is a plain save again.
    assert_eq!(
        s.save_from(&h, None, &set("c", "3"), r.clone())
            .await
            .unwrap(),
        SaveOutcome::Saved
    );
    assert!(s.delete(&h).await.unwrap());
    assert_eq!(
        s.save_from(&h, None, &set("d", "4"), r).await.unwrap(),
        SaveOutcome::Missing
    );
    assert!(s.load(&h).await.unwrap().is_none());
}

async fn never_resurrects<S: SessionStore>(mk: impl Fn(Timeouts) -> S) {
    let s = mk(long());
    let h = hash();
    assert!(
        s.create(&h, None, &new_record(&[], Some("u")))
            .await
            .unwrap()
    );
    assert!(s.delete(&h).await.unwrap());
    assert!(!s.delete(&h).await.unwrap());
    assert_eq!(
        s.save(&h, None, &set("a", "1"), 1).await.unwrap(),
        SaveOutcome::Missing
    );
    assert!(s.load(&h).await.unwrap().is_none());
}

async fn remove_and_clear<S: SessionStore>(mk: impl Fn(Timeouts) -> S) {
    let s = mk(long());
    let h = hash();
    assert!(
        s.create(
            &h,
            None,
            &new_record(&[("a", "1"), ("b", "2"), ("c", "3")], Some("u"))
        )
        .await
        .unwrap()
    );
    let diff = Diff {
        remove: ["a".to_owned()].into_iter().collect(),
        ..Diff::default()
    };
    s.save(&h, None, &diff, 1).await.unwrap();
    let r = s.load(&h).await.unwrap().unwrap();
    assert_eq!(r.data.keys().collect::<Vec<_>>(), ["b", "c"]);
    let diff = Diff {
        clear: true,
        set: [entry("d", "4")].into_iter().collect(),
        user: Some(None),
        ..Diff::default()
    };
    s.save(&h, None, &diff, 2).await.unwrap();
    let r = s.load(&h).await.unwrap().unwrap();
    assert_eq!(r.data.keys().collect::<Vec<_>>(), ["d"]);
    assert_eq!(r.user, None, "unbound");
    let diff = Diff {
        clear: true,
        ..Diff::default()
    };
    s.save(&h, None, &diff, 3).await.unwrap();
    assert!(s.load(&h).await.unwrap().unwrap().data.is_empty());
}

async fn read_inside_touch_window_writes_nothing<S: SessionStore>(mk: impl Fn(Timeouts) -> S) {
    let s = mk(long());
    let h = hash();
    assert!(s.create(&h, None, &new_record(&[], None)).await.unwrap());
    let first = s.load(&h).await.unwrap().unwrap();
    tokio::time::sleep(Duration::from_millis(30)).await;
    let second = s.load(&h).await.unwrap().unwrap();
    assert_eq!(
        first, second,
        "a read inside the touch window changes nothing"
    );
}

async fn idle_timeout<S: SessionStore>(mk: impl Fn(Timeouts) -> S) {
    let s = mk(Timeouts {
        idle: Duration::from_millis(1000),
        absolute: Duration::from_secs(60),
        touch_after: Duration::from_millis(100),
    });
    let h = hash();
    assert!(s.create(&h, None, &new_record(&[], None)).await.unwrap());
    tokio::time::sleep(Duration::from_millis(1300)).await;
    assert!(s.load(&h).await.unwrap().is_none(), "idle session is gone");
    assert_eq!(
        s.save(&h, None, &set("a", "1"), 1).await.unwrap(),
        SaveOutcome::Missing
    );
}

async fn touch_extends_idle<S: SessionStore>(mk: impl Fn(Timeouts) -> S) {
    let s = mk(Timeouts {
        idle: Duration::from_millis(1000),
        absolute: Duration::from_secs(60),
        touch_after: Duration::from_millis(100),
    });
    let h = hash();
    assert!(s.create(&h, None, &new_record(&[], None)).await.unwrap());
    for _ in 0..4 {
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert!(s.load(&h).await.unwrap().is_some(), "reads keep it alive");
    }
}

async fn absolute_timeout<S: SessionStore>(mk: impl Fn(Timeouts) -> S) {
    let s = mk(Timeouts {
        idle: Duration::from_millis(1000),
        absolute: Duration::from_millis(1500),
        touch_after: Duration::from_millis(50),
    });
    let h = hash();
    assert!(s.create(&h, None, &new_record(&[], None)).await.unwrap());
    let mut alive = 0;
    for _ in 0..6 {
        tokio::time::sleep(Duration::from_millis(400)).await;
        if s.save(&h, None, &set("a", "1"), 0).await.unwrap() != SaveOutcome::Missing {
            alive += 1;
        }
    }
    assert!((2..=3).contains(&alive), "alive for {alive} saves");
    assert!(
        s.load(&h).await.unwrap().is_none(),
        "activity does not extend the absolute timeout"
    );
}

async fn take_moves_the_record<S: SessionStore>(mk: impl Fn(Timeouts) -> S) {
    let s = mk(long());
    let h = hash();
    assert!(
        s.create(&h, None, &new_record(&[("a", "1")], None))
            .await
            .unwrap()
    );
    let r = s.take(&h).await.unwrap().expect("taken");
    assert_eq!(r.data.len(), 1);
    assert!(s.load(&h).await.unwrap().is_none());
    assert!(s.take(&h).await.unwrap().is_none());
}

async fn rotation_keeps_expiry<S: SessionStore>(mk: impl Fn(Timeouts) -> S) {
    let s = mk(long());
    let old = hash();
    assert!(
        s.create(&old, None, &new_record(&[("a", "1")], None))
            .await
            .unwrap()
    );
    let r = s.take(&old).await.unwrap().unwrap();
    let new = hash();
    let rec = NewRecord {
        data: r.data.clone(),
        created_at: Some(r.created_at),
        expires_at: Some(r.expires_at),
        ..NewRecord::default()
    };
    assert!(s.create(&new, None, &rec).await.unwrap());
    let moved = s.load(&new).await.unwrap().unwrap();
    assert_eq!(
        (moved.created_at, moved.expires_at),
        (r.created_at, r.expires_at)
    );
    assert_eq!(moved.data, r.data);
    // A rotation past the absolute expiry creates nothing.
    let rec = NewRecord {
        expires_at: Some(1),
        ..NewRecord::default()
    };
    let dead = hash();
    assert!(!s.create(&dead, None, &rec).await.unwrap());
    assert!(s.load(&dead).await.unwrap().is_none());
}

async fn user_index<S: SessionStore>(mk: impl Fn(Timeouts) -> S) {
    let s = mk(long());
    let (alice, bob) = (hash(), hash());
    let mut mine = Vec::new();
    for _ in 0..3 {
        let h = hash();
        assert!(
            s.create(&h, Some(&alice), &new_record(&[], Some("alice")))
                .await
                .unwrap()
        );
        mine.push(h);
    }
    let theirs = hash();
    assert!(
        s.create(&theirs, Some(&bob), &new_record(&[], Some("bob")))
            .await
            .unwrap()
    );
    // Bound later, by a save.
    let late = hash();
    assert!(s.create(&late, None, &new_record(&[], None)).await.unwrap());
    let bind = Diff {
        user: Some(Some("alice".into())),
        ..Diff::default()
    };
    s.save(&late, Some(&alice), &bind, 1).await.unwrap();
    mine.push(late);

    let list = s.list_user(&alice, "alice").await.unwrap();
    assert_eq!(list.len(), 4);
    assert!(list.iter().all(|i| mine.contains(&i.id_hash)));
    assert_eq!(list[0].user_agent.as_deref(), Some("agent"));

    // One logs out: gone from the listing.
    assert!(s.delete(&mine[0]).await.unwrap());
    assert_eq!(s.list_user(&alice, "alice").await.unwrap().len(), 3);

    // Revoke all but the current one.
    assert_eq!(
        s.revoke_user(&alice, "alice", Some(&mine[1]))
            .await
            .unwrap(),
        2
    );
    let list = s.list_user(&alice, "alice").await.unwrap();
    assert_eq!(
        list.iter().map(|i| &i.id_hash).collect::<Vec<_>>(),
        [&mine[1]]
    );
    assert!(s.load(&mine[2]).await.unwrap().is_none());
    assert!(s.load(&mine[1]).await.unwrap().is_some());
    assert_eq!(
        s.list_user(&bob, "bob").await.unwrap().len(),
        1,
        "other users untouched"
    );
    assert_eq!(s.revoke_user(&alice, "alice", None).await.unwrap(), 1);
    assert!(s.list_user(&alice, "alice").await.unwrap().is_empty());
}
