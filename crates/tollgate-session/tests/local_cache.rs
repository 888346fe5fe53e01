//! The in-process session cache against real Redis: a cached load costs
//! no command, a change made through another instance reaches it, a
//! restarted, frozen or flushed Redis empties it, it works over TLS with an ACL
//! user and on Redis Cluster (every primary tracked, one restarted or
//! flushed on its own, a slot moved between primaries, a shard failed
//! over to its replica, planned or not), without
//! `CLIENT TRACKING` (ACL) it stays off while sessions keep working;
//! behind a Sentinel it follows a switch of primary; the health report
//! says whether it serves.

mod common;

use std::time::{Duration, Instant};

use tollgate_redis::RedisHandle;
use tollgate_session::store::{Diff, NewRecord, Record, RedisStore, SaveOutcome, SessionStore};
use tollgate_testkit::{RedisCluster, RedisSentinel, RedisServer, Reply};

use common::{id_hash as hash, long_timeouts as timeouts};

fn cached(h: RedisHandle) -> RedisStore {
    RedisStore::new(h, timeouts()).with_local_cache(1_000, Duration::from_secs(60))
}

async fn wait_until<F: std::future::Future<Output = bool>>(what: &str, mut f: impl FnMut() -> F) {
    let started = Instant::now();
    while !f().await {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn with_entry(k: &str, json: &str) -> NewRecord {
    NewRecord {
        data: [(k.to_owned(), json.to_owned())].into_iter().collect(),
        ..NewRecord::default()
    }
}

fn entry(r: &Option<Record>, k: &str) -> Option<String> {
    r.as_ref().and_then(|r| r.data.get(k).cloned())
}

/// A Redis whose commands can be counted: one server, or a cluster's
/// primaries together.
trait Counted {
    fn processed(&self) -> u64;
}

impl Counted for RedisServer {
    fn processed(&self) -> u64 {
        self.commands_processed()
    }
}

impl Counted for RedisCluster {
    fn processed(&self) -> u64 {
        self.commands_processed()
    }
}

/// Commands `redis` ran during `f`, the counters' own reads excluded.
async fn commands<T>(redis: &impl Counted, f: impl std::future::Future<Output = T>) -> (T, u64) {
    let first = redis.processed();
    let before = redis.processed();
    let noise = before - first;
    let out = f.await;
    (out, redis.processed() - before - noise)
}

/// A cached store on `server`, live, with one session (`n` = 1) that it
/// has loaded.
async fn live_session(server: &RedisServer) -> (RedisStore, String) {
    let a = cached(tollgate_testkit::connect(&server.url()).await);
    wait_until("the cache to go live", || async { a.local_cache_live() }).await;
    let h = hash();
    assert!(a.create(&h, None, &with_entry("n", "1")).await.unwrap());
    assert!(a.load(&h).await.unwrap().is_some());
    (a, h)
}

/// Waits until loads of `h` are served in process, three in a row, each
/// finding the record (with `n` = `n`, when given). (The push for the
/// record's creation may be handled after the first load filled the cache,
/// and then empty it once: a lost fill costs a read, never a stale record.)
async fn wait_cached(redis: &impl Counted, a: &RedisStore, h: &str, n: Option<&str>) {
    let in_a_row = std::cell::Cell::new(0);
    wait_until("loads served in process", || async {
        let (r, cost) = commands(redis, a.load(h)).await;
        let r = r.unwrap();
        assert!(r.is_some());
        if n.is_some() {
            assert_eq!(entry(&r, "n").as_deref(), n);
        }
        in_a_row.set(if cost == 0 { in_a_row.get() + 1 } else { 0 });
        in_a_row.get() >= 3
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cached_load_costs_no_command_and_changes_elsewhere_reach_it() {
    let server = RedisServer::start();
    let a = cached(tollgate_testkit::connect(&server.url()).await);
    // Another instance, without a cache.
    let b = RedisStore::new(tollgate_testkit::connect(&server.url()).await, timeouts());
    wait_until("the cache to go live", || async { a.local_cache_live() }).await;

    let h = hash();
    assert!(a.create(&h, None, &with_entry("n", "1")).await.unwrap());
    // The first load reads Redis; the next ones are served in process.
    assert_eq!(entry(&a.load(&h).await.unwrap(), "n").as_deref(), Some("1"));
    wait_cached(&server, &a, &h, None).await;
    let (r, cost) = commands(&server, async {
        for _ in 0..5 {
            assert_eq!(entry(&a.load(&h).await.unwrap(), "n").as_deref(), Some("1"));
        }
        a.load(&h).await
    })
    .await;
    assert_eq!(entry(&r.unwrap(), "n").as_deref(), Some("1"));
    assert_eq!(cost, 0, "cached loads send no command");

    // A change saved through the other instance reaches this one.
    let diff = Diff {
        set: [("n".to_owned(), "2".to_owned())].into_iter().collect(),
        ..Diff::default()
    };
    let loaded = b.load(&h).await.unwrap().expect("record");
    b.save(&h, None, &diff, loaded.generation).await.unwrap();
    wait_until("the change to reach the cache", || async {
        entry(&a.load(&h).await.unwrap(), "n").as_deref() == Some("2")
    })
    .await;

    // This instance's own save is read back at once.
    let base = a.load(&h).await.unwrap().expect("record");
    let diff = Diff {
        set: [("n".to_owned(), "3".to_owned())].into_iter().collect(),
        ..Diff::default()
    };
    a.save_from(&h, None, &diff, base).await.unwrap();
    assert_eq!(entry(&a.load(&h).await.unwrap(), "n").as_deref(), Some("3"));

    // Destroyed through the other instance: gone here too, for good.
    assert!(b.delete(&h).await.unwrap());
    wait_until("the deletion to reach the cache", || async {
        a.load(&h).await.unwrap().is_none()
    })
    .await;
    assert!(a.load(&h).await.unwrap().is_none());
}

/// How many of `commands` `server` has run successfully (commands a script
/// runs included; an `EVALSHA` answered `NOSCRIPT` not counted). Unlike
/// [`commands`], blind to the cache's own checks (`EXISTS`).
fn calls(server: &RedisServer, commands: &[&str]) -> u64 {
    let Ok(Reply::Bulk(info)) = server.command(&["INFO", "commandstats"]) else {
        panic!("INFO commandstats failed");
    };
    let stat = |cmd: &str, field: &str| -> u64 {
        tollgate_testkit::info_field(&info, &format!("cmdstat_{cmd}"))
            .and_then(|v| v.split(',').find_map(|f| f.strip_prefix(field)))
            .and_then(|n| n.parse().ok())
            .unwrap_or(0)
    };
    commands
        .iter()
        .map(|c| stat(c, "calls=") - stat(c, "failed_calls="))
        .sum()
}

/// How many scripts `server` has run.
fn scripts_run(server: &RedisServer) -> u64 {
    calls(server, &["evalsha", "eval"])
}

/// The commands a session load or save may send.
const SESSION_COMMANDS: &[&str] = &["get", "mget", "set", "evalsha", "eval"];

fn set(k: &str, json: &str) -> Diff {
    Diff {
        set: [(k.to_owned(), json.to_owned())].into_iter().collect(),
        ..Diff::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_save_from_a_cached_record_is_one_command_and_stays_cached() {
    let server = RedisServer::start();
    let (a, h) = live_session(&server).await;
    let b = RedisStore::new(tollgate_testkit::connect(&server.url()).await, timeouts());
    wait_cached(&server, &a, &h, None).await;
    for n in 2..5 {
        let (sets, all) = (calls(&server, &["set"]), calls(&server, SESSION_COMMANDS));
        let base = a.load(&h).await.unwrap().expect("record");
        let diff = set("n", &n.to_string());
        assert_eq!(
            a.save_from(&h, None, &diff, base).await.unwrap(),
            SaveOutcome::Saved
        );
        // Still cached after any push could have come back, and right.
        tokio::time::sleep(Duration::from_millis(100)).await;
        let r = a.load(&h).await.unwrap();
        assert_eq!(entry(&r, "n"), Some(n.to_string()));
        assert_eq!(
            (
                calls(&server, &["set"]) - sets,
                calls(&server, SESSION_COMMANDS) - all
            ),
            (1, 1),
            "a load, a save and a load again: one command, a SET (no script)"
        );
        assert_eq!(
            entry(&b.load(&h).await.unwrap(), "n"),
            Some(n.to_string()),
            "and is what Redis holds"
        );
    }
    // Another instance's save still reaches the cache.
    let loaded = b.load(&h).await.unwrap().expect("record");
    b.save_from(&h, None, &set("n", "9"), loaded).await.unwrap();
    wait_until("the change to reach the cache", || async {
        entry(&a.load(&h).await.unwrap(), "n").as_deref() == Some("9")
    })
    .await;
}

/// Two instances save the same session from the same cached record, both
/// writes reaching Redis together (it is paused while they are sent):
/// whichever lands second notices the first and merges its changes back,
/// so every change survives, removals and bindings included.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn racing_saves_from_cached_records_all_survive() {
    let mut server = RedisServer::start();
    let (a, h) = live_session(&server).await;
    let b = cached(tollgate_testkit::connect(&server.url()).await);
    wait_until("the second cache to go live", || async {
        b.local_cache_live()
    })
    .await;
    let mut expected: std::collections::BTreeMap<String, String> =
        [("n".to_owned(), "1".to_owned())].into_iter().collect();
    for round in 0..6 {
        // A removal on one side, entries and a binding on the other.
        let gone = format!("r{round}");
        let first = set(&gone, "0");
        let base = a.load(&h).await.unwrap().expect("record");
        assert_eq!(
            a.save_from(&h, None, &first, base).await.unwrap(),
            SaveOutcome::Saved
        );
        wait_cached(&server, &a, &h, None).await;
        let from_a = a.load(&h).await.unwrap().expect("record");
        // The other instance has heard of that save and holds its record.
        wait_until("both caches to hold the same record", || async {
            b.load(&h).await.unwrap().as_ref() == Some(&from_a)
        })
        .await;
        wait_cached(&server, &b, &h, None).await;
        let from_b = b.load(&h).await.unwrap().expect("record");
        assert_eq!(from_a, from_b);
        let removal = Diff {
            remove: [gone.clone()].into_iter().collect(),
            set: [(format!("a{round}"), "1".to_owned())]
                .into_iter()
                .collect(),
            ..Diff::default()
        };
        let user = format!("u{round}");
        let binding = Diff {
            set: [
                (format!("b{round}"), "2".to_owned()),
                ("n".to_owned(), round.to_string()),
            ]
            .into_iter()
            .collect(),
            user: Some(Some(user.clone())),
            ..Diff::default()
        };
        let scripts = scripts_run(&server);
        server.pause();
        let (ra, rb) = {
            let sa = a.save_from(&h, None, &removal, from_a);
            let sb = b.save_from(&h, None, &binding, from_b);
            let resume = async {
                tokio::time::sleep(Duration::from_millis(50)).await;
                server.resume();
            };
            let (ra, rb, ()) = tokio::join!(sa, sb, resume);
            (ra.unwrap(), rb.unwrap())
        };
        let mut outcomes = [ra, rb];
        outcomes.sort_by_key(|o| format!("{o:?}"));
        assert_eq!(
            outcomes,
            [SaveOutcome::Merged, SaveOutcome::Saved],
            "round {round}: one landed first, the other merged over it"
        );
        assert_eq!(
            scripts_run(&server) - scripts,
            1,
            "round {round}: both wrote plainly, one script merged back"
        );
        expected.insert(format!("a{round}"), "1".to_owned());
        expected.insert(format!("b{round}"), "2".to_owned());
        expected.insert("n".to_owned(), round.to_string());
        let plain = RedisStore::new(tollgate_testkit::connect(&server.url()).await, timeouts());
        let stored = plain.load(&h).await.unwrap().expect("record");
        assert_eq!(stored.data, expected, "round {round}");
        assert_eq!(stored.user.as_deref(), Some(user.as_str()), "round {round}");
        // Both caches come to hold what Redis holds.
        for s in [&a, &b] {
            wait_until("the caches to agree with Redis", || async {
                s.load(&h)
                    .await
                    .unwrap()
                    .is_some_and(|r| r.data == expected)
            })
            .await;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_redis_empties_the_cache() {
    let mut server = RedisServer::start();
    let (a, h) = live_session(&server).await;

    // Redis dies: nothing is served from the cache once that is known.
    server.kill();
    wait_until("the cache to go off", || async { !a.local_cache_live() }).await;
    assert!(
        !matches!(a.load(&h).await, Ok(Some(_))),
        "a cached record is not served while Redis is down"
    );

    // It comes back empty (no persistence): the session is gone.
    server.restart();
    wait_until("the cache to go live again", || async {
        a.local_cache_live()
    })
    .await;
    assert!(a.load(&h).await.unwrap().is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_redis_turns_the_cache_off_without_any_request() {
    let mut server = RedisServer::start();
    let (a, h) = live_session(&server).await;
    // Frozen: the connection stays open and no error arrives, so only the
    // canary check notices, with no request sent meanwhile.
    server.pause();
    wait_until("the cache to go off", || async { !a.local_cache_live() }).await;
    server.resume();
    wait_until("the cache to go live again", || async {
        a.local_cache_live()
    })
    .await;
    // Emptied while off: the next load reads Redis.
    let (r, cost) = commands(&server, a.load(&h)).await;
    assert!(r.unwrap().is_some());
    assert!(cost >= 1, "read from Redis after the freeze");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flushed_redis_empties_the_cache() {
    let server = RedisServer::start();
    let (a, h) = live_session(&server).await;
    wait_cached(&server, &a, &h, None).await;
    // Redis's notice of a flush names no key (and never reaches the cache);
    // the canary check catches it within about a second, well before the
    // cache's 60 s max age.
    assert!(matches!(
        server.command(&["FLUSHALL"]),
        Ok(Reply::Status(_))
    ));
    wait_until("the flush to reach the cache", || async {
        a.load(&h).await.unwrap().is_none()
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_client_tracking_the_cache_stays_off_and_sessions_work() {
    let server = RedisServer::start();
    let setup = server.command(&[
        "ACL",
        "SETUSER",
        "app",
        "on",
        ">app-password-long-enough",
        "~*",
        "&*",
        "+@all",
        "-client|tracking",
    ]);
    assert!(matches!(setup, Ok(Reply::Status(_))), "{setup:?}");
    let url = format!(
        "redis://app:app-password-long-enough@127.0.0.1:{}",
        server.port()
    );
    let a = cached(tollgate_testkit::connect(&url).await);
    let h = hash();
    assert!(a.create(&h, None, &with_entry("n", "1")).await.unwrap());
    // Give the refused attempt time to happen; the cache never goes live.
    for _ in 0..20 {
        assert!(!a.local_cache_live());
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(entry(&a.load(&h).await.unwrap(), "n").as_deref(), Some("1"));
    let (r, cost) = commands(&server, a.load(&h)).await;
    assert_eq!(entry(&r.unwrap(), "n").as_deref(), Some("1"));
    assert!(cost >= 1, "every load reads Redis");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_tls_with_an_acl_user_the_cache_works() {
    let server = RedisServer::start_tls();
    over_tls_the_cache_works(server.url(), server.ca_pem().expect("CA")).await;
}

/// On a cluster, the tracked connection reaches every primary over TLS.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_a_tls_cluster_with_an_acl_user_the_cache_works() {
    let cluster = RedisCluster::start_tls();
    over_tls_the_cache_works(cluster.url(), cluster.ca_pem().expect("CA")).await;
}

/// A cached store and another instance on `url`, over TLS as an ACL
/// user: a deletion through the other reaches the cache.
async fn over_tls_the_cache_works(url: String, ca: String) {
    let connect = || async {
        RedisHandle::connect(
            tollgate_redis::RedisConfig::from_url(url.clone())
                .tls_root_ca_pem(ca.clone())
                .deadline(Duration::from_secs(2)),
        )
        .await
        .expect("TLS + ACL connect")
    };
    // The tracked connection is built from the same settings as the pool:
    // TLS, CA and credentials included.
    let a = cached(connect().await);
    let b = RedisStore::new(connect().await, timeouts());
    wait_until("the cache to go live", || async { a.local_cache_live() }).await;
    let h = hash();
    assert!(a.create(&h, None, &with_entry("n", "1")).await.unwrap());
    assert_eq!(entry(&a.load(&h).await.unwrap(), "n").as_deref(), Some("1"));
    assert!(b.delete(&h).await.unwrap());
    wait_until("the deletion to reach the cache", || async {
        a.load(&h).await.unwrap().is_none()
    })
    .await;
}

/// Which of the test cluster's primaries serves `key` (the slots are split
/// evenly, in order).
fn node_of(key: &str) -> usize {
    usize::from(tollgate_redis::slot(key) / (16_384 / 3)).min(2)
}

/// One session per primary (the hash of the one on primary `i` at `i`),
/// created through `a` and loaded until its loads are served in process.
async fn a_session_on_each_primary(cluster: &RedisCluster, a: &RedisStore) -> Vec<String> {
    let mut sessions: Vec<Option<String>> = vec![None, None, None];
    while sessions.iter().any(Option::is_none) {
        let h = hash();
        let node = node_of(&a.record_key(&h));
        if sessions[node].is_none() {
            assert!(a.create(&h, None, &with_entry("n", "1")).await.unwrap());
            sessions[node] = Some(h);
        }
    }
    let sessions: Vec<String> = sessions.into_iter().flatten().collect();
    for h in &sessions {
        wait_cached(cluster, a, h, Some("1")).await;
    }
    sessions
}

/// A cached store on `cluster`, live, with a session on each primary that
/// it serves in process.
async fn live_on_cluster(cluster: &RedisCluster) -> (RedisStore, Vec<String>) {
    let a = cached(tollgate_testkit::connect(&cluster.url()).await);
    wait_until("the cache to go live", || async { a.local_cache_live() }).await;
    let sessions = a_session_on_each_primary(cluster, &a).await;
    (a, sessions)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_a_cluster_changes_at_every_primary_reach_the_cache() {
    let cluster = RedisCluster::start();
    // Served in process, whichever primary holds the record.
    let (a, sessions) = live_on_cluster(&cluster).await;
    let b = RedisStore::new(tollgate_testkit::connect(&cluster.url()).await, timeouts());

    // Each primary pushes the changes to its own keys.
    for h in &sessions {
        let loaded = b.load(h).await.unwrap().expect("record");
        b.save(h, None, &set("n", "2"), loaded.generation)
            .await
            .unwrap();
    }
    for h in &sessions {
        wait_until("the change to reach the cache", || async {
            entry(&a.load(h).await.unwrap(), "n").as_deref() == Some("2")
        })
        .await;
    }

    // This instance's own save is read back at once, from the cache.
    let base = a.load(&sessions[1]).await.unwrap().expect("record");
    a.save_from(&sessions[1], None, &set("n", "3"), base)
        .await
        .unwrap();
    let (r, cost) = commands(&cluster, a.load(&sessions[1])).await;
    assert_eq!(entry(&r.unwrap(), "n").as_deref(), Some("3"));
    assert_eq!(cost, 0, "what a save wrote stays cached");

    for h in &sessions {
        assert!(b.delete(h).await.unwrap());
    }
    for h in &sessions {
        wait_until("the deletion to reach the cache", || async {
            a.load(h).await.unwrap().is_none()
        })
        .await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_a_cluster_a_flushed_primary_empties_the_cache() {
    let cluster = RedisCluster::start();
    let (a, sessions) = live_on_cluster(&cluster).await;
    // One primary flushed: its notice names no key, and only its own
    // canary shows it.
    assert!(matches!(
        cluster.nodes()[1].command(&["FLUSHALL"]),
        Ok(Reply::Status(_))
    ));
    wait_until("the flush to reach the cache", || async {
        a.load(&sessions[1]).await.unwrap().is_none()
    })
    .await;
    for h in [&sessions[0], &sessions[2]] {
        assert_eq!(entry(&a.load(h).await.unwrap(), "n").as_deref(), Some("1"));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_a_cluster_a_restarted_primary_empties_the_cache_and_it_serves_again() {
    let mut cluster = RedisCluster::start();
    let (a, sessions) = live_on_cluster(&cluster).await;

    // The primary comes back empty (no persistence): its session is gone,
    // and the cache does not serve it.
    tokio::task::block_in_place(|| cluster.restart_node(2));
    wait_until("the restart to reach the cache", || async {
        matches!(a.load(&sessions[2]).await, Ok(None))
    })
    .await;
    wait_until("the cache to go live again", || async {
        a.local_cache_live()
    })
    .await;
    assert!(a.load(&sessions[2]).await.unwrap().is_none());
    // Tracked again at every primary: cached loads, and changes reach it.
    let again = a_session_on_each_primary(&cluster, &a).await;
    deletions_elsewhere_reach(&cluster, &a, &again).await;
    assert_eq!(
        entry(&a.load(&sessions[0]).await.unwrap(), "n").as_deref(),
        Some("1")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_a_cluster_a_record_whose_slot_moves_stays_exact() {
    let cluster = RedisCluster::start();
    let (a, sessions) = live_on_cluster(&cluster).await;
    let b = RedisStore::new(tollgate_testkit::connect(&cluster.url()).await, timeouts());
    let h = &sessions[0];
    let key = a.record_key(h);
    let slot = tollgate_redis::slot(&key).to_string();

    // Resharding: the record's slot moves from the first primary to the
    // second, the record with it.
    let nodes = cluster.nodes();
    let ids: Vec<String> = nodes
        .iter()
        .map(|n| match n.command(&["CLUSTER", "MYID"]) {
            Ok(Reply::Bulk(id)) => id,
            other => panic!("CLUSTER MYID: {other:?}"),
        })
        .collect();
    let ok = |r: Result<Reply, String>| assert!(matches!(r, Ok(Reply::Status(_))), "{r:?}");
    ok(nodes[1].command(&["CLUSTER", "SETSLOT", &slot, "IMPORTING", &ids[0]]));
    ok(nodes[0].command(&["CLUSTER", "SETSLOT", &slot, "MIGRATING", &ids[1]]));
    let port = nodes[1].port().to_string();
    ok(nodes[0].command(&["MIGRATE", "127.0.0.1", &port, "", "0", "5000", "KEYS", &key]));
    for n in nodes {
        ok(n.command(&["CLUSTER", "SETSLOT", &slot, "NODE", &ids[1]]));
    }

    // A change saved where the record lives now reaches the cache (the new
    // primary tracks it), and nothing older is served meanwhile.
    let loaded = b.load(h).await.unwrap().expect("record");
    assert_eq!(entry(&Some(loaded.clone()), "n").as_deref(), Some("1"));
    b.save(h, None, &set("n", "2"), loaded.generation)
        .await
        .unwrap();
    wait_until("the change to reach the cache", || async {
        entry(&a.load(h).await.unwrap(), "n").as_deref() == Some("2")
    })
    .await;
    // Served in process again once the cache has followed the move.
    wait_until("the cache to go live again", || async {
        a.local_cache_live()
    })
    .await;
    wait_cached(&cluster, &a, h, Some("2")).await;
    deletions_elsewhere_reach(&cluster, &a, std::slice::from_ref(h)).await;
}

/// Deletes `sessions` through another instance, each seen gone by `a`.
async fn deletions_elsewhere_reach(cluster: &RedisCluster, a: &RedisStore, sessions: &[String]) {
    let b = RedisStore::new(tollgate_testkit::connect(&cluster.url()).await, timeouts());
    for h in sessions {
        assert!(b.delete(h).await.unwrap());
        wait_until("the deletion to reach the cache", || async {
            a.load(h).await.unwrap().is_none()
        })
        .await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_health_report_says_whether_the_cache_serves() {
    let mut server = RedisServer::start();
    let handle = tollgate_testkit::connect(&server.url()).await;
    assert!(handle.health().await.local_caches.is_empty());
    let a = cached(handle.clone());
    wait_until("the cache to go live", || async { a.local_cache_live() }).await;
    let report = handle.health().await;
    assert_eq!(report.local_caches.len(), 1, "{report:?}");
    assert!(report.local_caches[0].live);
    assert!(
        report.local_caches[0]
            .prefixes
            .iter()
            .all(|p| p.contains(":session:")),
        "{:?}",
        report.local_caches[0].prefixes
    );

    // Frozen: reported off (and the report itself still answers).
    server.pause();
    wait_until("the cache to go off", || async { !a.local_cache_live() }).await;
    let report = handle.health().await;
    assert!(!report.local_caches[0].live, "{report:?}");
    assert!(
        serde_json::to_string(&report)
            .unwrap()
            .contains(r#""local_caches":[{"prefixes":"#)
    );
    server.resume();
    wait_until("the cache to go live again", || async {
        a.local_cache_live()
    })
    .await;
    assert!(handle.health().await.local_caches[0].live);

    // Gone with its store.
    drop(a);
    wait_until("the cache to leave the report", || async {
        handle.health().await.local_caches.is_empty()
    })
    .await;
}

/// Behind a Sentinel, a planned switch of primary drops no connection. The
/// cache's tracking connection moves with the pool, so a change saved on
/// the new primary reaches the cache, long before a Sentinel demotes the
/// old primary (which would close the connection). Left on the old
/// primary, the cache would hear nothing and serve the old record.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn behind_a_sentinel_a_switch_of_primary_keeps_the_cache_exact() {
    let mut sentinel = RedisSentinel::start();
    let handle = tollgate_testkit::connect(sentinel.url()).await;
    let a = cached(handle.clone());
    // Another store on the same pool, without a cache.
    let b = RedisStore::new(handle.clone(), timeouts());
    wait_until("the cache to go live", || async { a.local_cache_live() }).await;
    let h = hash();
    assert!(a.create(&h, None, &with_entry("n", "1")).await.unwrap());
    wait_cached(&Primary(&sentinel), &a, &h, Some("1")).await;
    sentinel.wait_replicated();

    let new = tokio::task::block_in_place(|| sentinel.switch_over());
    sentinel.wait_for_handle(&handle).await;
    let loaded = b.load(&h).await.unwrap().expect("replicated");
    b.save(&h, None, &set("n", "2"), loaded.generation)
        .await
        .unwrap();
    wait_until("the change to reach the cache", || async {
        entry(&a.load(&h).await.unwrap(), "n").as_deref() == Some("2")
    })
    .await;
    assert_eq!(
        tollgate_testkit::role(&sentinel.nodes()[1 - new]).as_deref(),
        Some("master"),
        "the cache followed before the Sentinel demoted the old primary"
    );
    wait_cached(&Primary(&sentinel), &a, &h, Some("2")).await;
}

/// The primary a Sentinel names, for counting commands.
struct Primary<'a>(&'a RedisSentinel);

impl Counted for Primary<'_> {
    fn processed(&self) -> u64 {
        self.0.primary().commands_processed()
    }
}

/// Redis Cluster with replicas: a planned failover (`CLUSTER FAILOVER`)
/// moves a shard to its replica without dropping a connection, and a
/// primary that dies is replaced by its replica. Either way the cache's
/// tracking moves to the new primary: a change saved there reaches the
/// cache, and loads are served in process again. While the dead primary
/// is being replaced, the cache serves nothing.
async fn on_a_cluster_a_failover_keeps_the_cache_exact(planned: bool) {
    let mut cluster = RedisCluster::start_with_replicas();
    let a = cached(tollgate_testkit::connect(&cluster.url()).await);
    // Another instance, without a cache.
    let b = RedisStore::new(tollgate_testkit::connect(&cluster.url()).await, timeouts());
    wait_until("the cache to go live", || async { a.local_cache_live() }).await;
    let h = hash();
    assert!(a.create(&h, None, &with_entry("n", "1")).await.unwrap());
    let old = cluster.primary_for_key(&a.record_key(&h));
    wait_cached(&cluster, &a, &h, Some("1")).await;
    cluster.wait_replicated();

    let new = tokio::task::block_in_place(|| {
        if planned {
            cluster.switch_over(old)
        } else {
            cluster.fail_over(old)
        }
    });
    assert_eq!(cluster.primary_for_key(&a.record_key(&h)), new);
    // Killed, the primary opened each handle's breaker; it closes once
    // its probe reaches the promoted replica.
    wait_until("the other instance to find the new primary", || async {
        b.load(&h).await.is_ok()
    })
    .await;
    let loaded = b.load(&h).await.unwrap().expect("replicated");
    b.save(&h, None, &set("n", "2"), loaded.generation)
        .await
        .unwrap();
    // Until this instance's own breaker closes, loads fail (and the
    // session layer uses its fallback); none may serve the old record.
    wait_until("the change to reach the cache", || async {
        match a.load(&h).await {
            Ok(r) => entry(&r, "n").as_deref() == Some("2"),
            Err(_) => false,
        }
    })
    .await;
    wait_until("the cache to go live again", || async {
        a.local_cache_live()
    })
    .await;
    wait_cached(&cluster, &a, &h, Some("2")).await;
    deletions_elsewhere_reach(&cluster, &a, std::slice::from_ref(&h)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_a_cluster_a_planned_failover_keeps_the_cache_exact() {
    on_a_cluster_a_failover_keeps_the_cache_exact(true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_a_cluster_a_dead_primary_replaced_by_its_replica_keeps_the_cache_exact() {
    on_a_cluster_a_failover_keeps_the_cache_exact(false).await;
}
