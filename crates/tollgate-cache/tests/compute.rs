//! `get_or_compute`: caching, coalescing, errors, invalidation across
//! instances; in memory, on standalone Redis and on a cluster.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tollgate_cache::Cache;

use tollgate_testkit::connect as handle;

/// `make()` returns a new "instance" sharing the backing store.
type Make = Box<dyn Fn() -> Cache + Send + Sync>;

macro_rules! suite {
    ($($name:ident),* $(,)?) => {
        mod memory {
            $(#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() {
                let store = tollgate_cache::MemoryStore::new(1 << 24);
                super::$name(Box::new(move || tollgate_cache::Cache::builder().store(store.clone()).build())).await;
            })*
        }
        mod standalone {
            $(#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() {
                let server = tollgate_testkit::RedisServer::start();
                let h = super::handle(server.url()).await;
                super::$name(Box::new(move || tollgate_cache::Cache::builder().redis(h.clone()).l1(std::time::Duration::from_secs(30), 1 << 20).build())).await;
            })*
        }
        mod cluster {
            $(#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() {
                let cluster = tollgate_testkit::RedisCluster::start();
                let h = super::handle(cluster.url()).await;
                super::$name(Box::new(move || tollgate_cache::Cache::builder().redis(h.clone()).l1(std::time::Duration::from_secs(30), 1 << 20).build())).await;
            })*
        }
    };
}

suite!(
    caches_values,
    errors_are_not_cached,
    concurrent_misses_compute_once_per_instance,
    invalidation_on_one_instance_is_seen_by_another,
    an_abandoned_tag_invalidation_still_completes,
);

async fn caches_values(make: Make) {
    let c = make();
    let calls = AtomicUsize::new(0);
    for _ in 0..3 {
        let v: u64 = c
            .get_or_compute("answer", Duration::from_secs(60), &["t"], || async {
                calls.fetch_add(1, Ordering::SeqCst);
                Ok::<_, std::io::Error>(42)
            })
            .await
            .unwrap();
        assert_eq!(v, 42);
    }
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    assert!(c.invalidate_key("answer").await.unwrap());
    let _: u64 = c
        .get_or_compute("answer", Duration::from_secs(60), &[], || async {
            calls.fetch_add(1, Ordering::SeqCst);
            Ok::<_, std::io::Error>(43)
        })
        .await
        .unwrap();
    assert_eq!(calls.load(Ordering::SeqCst), 2);
}

async fn errors_are_not_cached(make: Make) {
    let c = make();
    let r: Result<u64, &str> = c
        .get_or_compute("e", Duration::from_secs(60), &[], || async { Err("boom") })
        .await;
    assert_eq!(r, Err("boom"));
    let r: Result<u64, &str> = c
        .get_or_compute("e", Duration::from_secs(60), &[], || async { Ok(1) })
        .await;
    assert_eq!(r, Ok(1));
}

async fn concurrent_misses_compute_once_per_instance(make: Make) {
    let instances = [make(), make()];
    let calls = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for i in 0..1000 {
        let c = instances[i % 2].clone();
        let calls = calls.clone();
        tasks.push(tokio::spawn(async move {
            c.get_or_compute("hot", Duration::from_secs(60), &[], || async move {
                calls.fetch_add(1, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(200)).await;
                Ok::<_, std::io::Error>("value".to_owned())
            })
            .await
            .unwrap()
        }));
    }
    for t in tasks {
        assert_eq!(t.await.unwrap(), "value");
    }
    let n = calls.load(Ordering::SeqCst);
    assert!(
        (1..=2).contains(&n),
        "one computation per instance, got {n}"
    );
}

/// Waits until each cache's invalidation subscriber is listening.
async fn listening(caches: &[&Cache]) {
    for c in caches {
        let started = std::time::Instant::now();
        while !c.is_listening() {
            assert!(started.elapsed() < Duration::from_secs(5), "subscriber");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

async fn invalidation_on_one_instance_is_seen_by_another(make: Make) {
    let (a, b) = (make(), make());
    listening(&[&a, &b]).await;
    let get = |c: &Cache, v: u32| {
        let c = c.clone();
        async move {
            c.get_or_compute(
                "campaign:42",
                Duration::from_secs(60),
                &["campaigns:church-42"],
                || async move { Ok::<_, std::io::Error>(v) },
            )
            .await
            .unwrap()
        }
    };
    assert_eq!(get(&a, 1).await, 1);
    assert_eq!(
        get(&b, 2).await,
        1,
        "b reads a's value (and keeps it in its L1)"
    );
    assert_eq!(a.invalidate_tag("campaigns:church-42").await.unwrap(), 1);
    let started = std::time::Instant::now();
    loop {
        let v = get(&b, 3).await;
        if v == 3 {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "b still serves the invalidated value"
        );
        b.invalidate_key("never").await.unwrap();
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waiters_give_up_after_the_coalesce_timeout() {
    let c = Cache::builder()
        .coalesce_timeout(Duration::from_millis(50))
        .build();
    let calls = Arc::new(AtomicUsize::new(0));
    let slow = {
        let (c, calls) = (c.clone(), calls.clone());
        tokio::spawn(async move {
            c.get_or_compute("k", Duration::from_secs(60), &[], || async move {
                calls.fetch_add(1, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_secs(2)).await;
                Ok::<_, std::io::Error>(1u8)
            })
            .await
        })
    };
    tokio::time::sleep(Duration::from_millis(20)).await;
    let started = std::time::Instant::now();
    let v: u8 = c
        .get_or_compute("k", Duration::from_secs(60), &[], || async {
            Ok::<_, std::io::Error>(2)
        })
        .await
        .unwrap();
    assert_eq!(v, 2, "the waiter ran its own computation");
    assert!(started.elapsed() < Duration::from_secs(1));
    slow.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_down_computes() {
    let mut server = tollgate_testkit::RedisServer::start();
    let h = tollgate_testkit::connect_with_deadline(server.url(), Duration::from_millis(50)).await;
    let c = Cache::redis(h);
    server.kill();
    for i in 0..20u32 {
        let started = std::time::Instant::now();
        let v: u32 = c
            .get_or_compute("k", Duration::from_secs(60), &[], || async move {
                Ok::<_, std::io::Error>(i)
            })
            .await
            .unwrap();
        assert_eq!(v, i);
        assert!(started.elapsed() < Duration::from_millis(500));
    }
}

/// A value over `max_value_bytes` is computed and returned every time,
/// never stored; one within it is cached.
#[tokio::test]
async fn a_value_over_the_limit_is_returned_not_stored() {
    let c = Cache::builder().max_value_bytes(100).build();
    let calls = Arc::new(AtomicUsize::new(0));
    let get = |key: &'static str, len: usize| {
        let calls = calls.clone();
        c.get_or_compute(key, Duration::from_secs(60), &[], move || async move {
            calls.fetch_add(1, Ordering::SeqCst);
            Ok::<_, std::io::Error>("x".repeat(len))
        })
    };
    for _ in 0..2 {
        assert_eq!(get("big", 200).await.unwrap().len(), 200);
    }
    assert_eq!(calls.load(Ordering::SeqCst), 2, "computed each time");
    for _ in 0..2 {
        assert_eq!(get("small", 50).await.unwrap().len(), 50);
    }
    assert_eq!(calls.load(Ordering::SeqCst), 3, "the small one cached");
}

/// A tag invalidation that fails during an outage returns its error, and
/// the cache runs it again itself once Redis is back, before serving from
/// Redis again: the removed value is never read afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tag_invalidation_during_an_outage_runs_when_redis_is_back() {
    let mut server = tollgate_testkit::RedisServer::start();
    let h = tollgate_testkit::connect_with_deadline(server.url(), Duration::from_millis(50)).await;
    let c = Cache::redis(h.clone());
    let get = |v: u32| {
        c.get_or_compute(
            "total",
            Duration::from_secs(60),
            &["campaigns"],
            move || async move { Ok::<_, std::io::Error>(v) },
        )
    };
    assert_eq!(get(1).await.unwrap(), 1);
    assert_eq!(get(2).await.unwrap(), 1, "cached");
    server.pause();
    let err = c
        .invalidate_tag("campaigns")
        .await
        .expect_err("Redis is frozen");
    assert!(matches!(err, tollgate_cache::Error::Store(_)), "{err:?}");
    assert!(!c.is_available(), "not read until the invalidation has run");
    server.resume();
    let started = std::time::Instant::now();
    while !c.is_available() {
        assert_eq!(get(3).await.unwrap(), 3, "computed, never the old value");
        assert!(started.elapsed() < Duration::from_secs(10), "recovered");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(get(4).await.unwrap(), 4, "the old value is gone from Redis");
    assert_eq!(get(5).await.unwrap(), 4, "and the new one cached");
}

/// A caller that stops waiting for a tag invalidation (a timeout) does not
/// cut it off: the entries are deleted and the other instances told.
async fn an_abandoned_tag_invalidation_still_completes(make: Make) {
    let (a, b) = (make(), make());
    listening(&[&a, &b]).await;
    let get = |c: &Cache, v: u32| {
        let c = c.clone();
        async move {
            c.get_or_compute(
                "campaign:7",
                Duration::from_secs(60),
                &["campaigns"],
                || async move { Ok::<_, std::io::Error>(v) },
            )
            .await
            .unwrap()
        }
    };
    assert_eq!(get(&a, 1).await, 1);
    assert_eq!(get(&b, 2).await, 1, "b keeps a's value in its L1");
    // Polled once, then dropped (what a caller's timeout does).
    let _ = futures::FutureExt::now_or_never(a.invalidate_tag("campaigns"));
    let started = std::time::Instant::now();
    while get(&b, 3).await != 3 {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "the abandoned invalidation never finished"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(get(&a, 4).await, 3, "one store: a reads b's new value");
}

/// A store that never answers (a custom backend that hangs).
#[derive(Debug)]
struct Hanging;

impl tollgate_cache::Store for Hanging {
    fn get<'a>(
        &'a self,
        _key: &'a str,
    ) -> futures::future::BoxFuture<'a, Result<Option<bytes::Bytes>, tollgate_cache::Error>> {
        Box::pin(std::future::pending())
    }

    fn put<'a>(
        &'a self,
        _key: &'a str,
        _value: bytes::Bytes,
        _ttl: Duration,
        _tags: &'a [String],
    ) -> futures::future::BoxFuture<'a, Result<(), tollgate_cache::Error>> {
        Box::pin(std::future::pending())
    }

    fn invalidate_key<'a>(
        &'a self,
        _key: &'a str,
    ) -> futures::future::BoxFuture<'a, Result<bool, tollgate_cache::Error>> {
        Box::pin(std::future::pending())
    }

    fn invalidate_tag<'a>(
        &'a self,
        _tag: &'a str,
    ) -> futures::future::BoxFuture<'a, Result<Vec<String>, tollgate_cache::Error>> {
        Box::pin(std::future::pending())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hanging_store_does_not_hang_get_or_compute() {
    let c = Cache::builder().store(Hanging).build();
    for i in 0..3u32 {
        // A bound far past the store's own timer: it only catches a hang.
        let v = tokio::time::timeout(
            Duration::from_secs(30),
            c.get_or_compute("k", Duration::from_secs(60), &[], || async move {
                Ok::<_, std::io::Error>(i)
            }),
        )
        .await
        .expect("get_or_compute hung on the store")
        .unwrap();
        assert_eq!(v, i, "computed: nothing could be stored");
    }
}

/// A store slower to write than the read deadline (a remote backend):
/// reads are answered in time, writes take 300 ms.
#[derive(Clone, Debug)]
struct SlowWrites(tollgate_cache::MemoryStore);

impl tollgate_cache::Store for SlowWrites {
    fn get<'a>(
        &'a self,
        key: &'a str,
    ) -> futures::future::BoxFuture<'a, Result<Option<bytes::Bytes>, tollgate_cache::Error>> {
        self.0.get(key)
    }

    fn put<'a>(
        &'a self,
        key: &'a str,
        value: bytes::Bytes,
        ttl: Duration,
        tags: &'a [String],
    ) -> futures::future::BoxFuture<'a, Result<(), tollgate_cache::Error>> {
        Box::pin(async move {
            tokio::time::sleep(Duration::from_millis(300)).await;
            self.0.put(key, value, ttl, tags).await
        })
    }

    fn invalidate_key<'a>(
        &'a self,
        key: &'a str,
    ) -> futures::future::BoxFuture<'a, Result<bool, tollgate_cache::Error>> {
        self.0.invalidate_key(key)
    }

    fn invalidate_tag<'a>(
        &'a self,
        tag: &'a str,
    ) -> futures::future::BoxFuture<'a, Result<Vec<String>, tollgate_cache::Error>> {
        self.0.invalidate_tag(tag)
    }
}

/// The read deadline bounds reads only: a store whose writes take longer
/// than it still gets its values stored, where cutting writes off at the
/// read deadline stored nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_slow_to_write_still_stores() {
    let c = Cache::builder()
        .store(SlowWrites(tollgate_cache::MemoryStore::new(1 << 20)))
        .build();
    for i in 0..2u32 {
        let v = c
            .get_or_compute("k", Duration::from_secs(60), &[], || async move {
                Ok::<_, std::io::Error>(i)
            })
            .await
            .unwrap();
        assert_eq!(v, 0, "the first value was stored");
    }
}
