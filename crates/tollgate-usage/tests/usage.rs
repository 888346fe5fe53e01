//! Usage tracking against real Redis (standalone and cluster) and the
//! in-memory store: one suite, so the stores cannot drift apart.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use tollgate_redis::{RedisConfig, RedisHandle};
use tollgate_testkit::{LatencyProxy, RedisCluster, RedisServer};
use tollgate_usage::{
    Batch, Enforcement, Plan, Plans, QuotaOp, TenantIncrements, TenantSource, UsageConfig,
    UsageLayer, UsageTracker,
};
use tower::{Service, ServiceBuilder, ServiceExt, service_fn};

use tollgate_testkit::connect as handle;

fn quick() -> UsageConfig {
    UsageConfig::new().flush_interval(Duration::from_millis(50))
}

/// Each test body runs on the in-memory store, standalone Redis and a
/// 3-primary cluster.
macro_rules! store_suite {
    ($($name:ident),* $(,)?) => {
        mod memory {
            $(#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() {
                // One store shared by every "instance", as Redis would be.
                let store = tollgate_usage::Store::Memory(tollgate_usage::MemoryStore::new());
                super::$name(Box::new(move || tollgate_usage::UsageTracker::new(store.clone(), super::quick()))).await;
            })*
        }
        mod standalone {
            $(#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() {
                let server = tollgate_testkit::RedisServer::start();
                let h = super::handle(server.url()).await;
                super::$name(Box::new(move || tollgate_usage::UsageTracker::redis(h.clone(), super::quick()))).await;
            })*
        }
        mod cluster {
            $(#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() {
                let cluster = tollgate_testkit::RedisCluster::start();
                let h = super::handle(cluster.url()).await;
                super::$name(Box::new(move || tollgate_usage::UsageTracker::redis(h.clone(), super::quick()))).await;
            })*
        }
    };
}

type Make = Box<dyn Fn() -> UsageTracker + Send + Sync>;

store_suite!(
    records_flushes_and_reports,
    units_of_either_sign_are_counted,
    increments_from_many_threads_flush_as_one,
    a_retried_batch_counts_once,
    a_replayed_quota_operation_counts_once,
    hard_quota_is_exact_across_instances,
    exact_counts_across_instances,
    exact_counts_for_many_tenants_flushed_in_parts,
);

async fn records_flushes_and_reports(make: Make) {
    let t = make();
    t.record("acme", "api_request", 3);
    t.record("acme", "email_sent", 2);
    t.record("globex", "api_request", 10);
    t.record("initech", "api_request", 1);
    t.flush().await.expect("flush");
    let acme = t.usage("acme", None).await.expect("usage");
    assert_eq!(acme.get("api_request"), Some(&3));
    assert_eq!(acme.get("email_sent"), Some(&2));
    let top = t.top("api_request", None, 2).await.expect("top");
    assert_eq!(top, vec![("globex".to_owned(), 10), ("acme".to_owned(), 3)]);
    let csv = t.csv(&["acme"], None).await.expect("csv");
    let period = t.current_period().label;
    assert!(
        csv.contains(&format!("acme,{period},api_request,3")),
        "{csv}"
    );
    assert_eq!(t.stats().flushed, 16);
    assert_eq!(t.stats().pending, 0);
    // Recording again for a counter already seen returns the estimate.
    assert_eq!(t.record("acme", "api_request", 1), 4);
}

/// A refund (a negative increment) counts as units flushed like any
/// other: +5 on one metric and −5 on another are 10 units written, not 0.
async fn units_of_either_sign_are_counted(make: Make) {
    let t = make();
    t.record("acme", "donation_cents", 2_500);
    t.record("acme", "refund_cents", -500);
    t.record("globex", "donation_cents", -500);
    t.flush().await.expect("flush");
    let acme = t.usage("acme", None).await.expect("usage");
    assert_eq!(acme.get("refund_cents"), Some(&-500));
    let s = t.stats();
    assert_eq!((s.buffered, s.flushed, s.pending), (3_500, 3_500, 0));
}

/// Each thread records into its own share of the buffer; a flush writes
/// the sum, and a thread that never saw a counter starts its estimate from
/// the store's total.
async fn increments_from_many_threads_flush_as_one(make: Make) {
    let t = make();
    let threads: Vec<_> = (0..8)
        .map(|i| {
            let t = t.clone();
            std::thread::spawn(move || {
                for _ in 0..1_000 {
                    t.record("acme", "api_request", 1);
                }
                t.record(&format!("tenant-{i}"), "email_sent", 10);
            })
        })
        .collect();
    for th in threads {
        th.join().expect("recording thread");
    }
    t.flush().await.expect("flush");
    let acme = t.usage("acme", None).await.expect("usage");
    assert_eq!(acme.get("api_request"), Some(&8_000));
    let top = t.top("email_sent", None, 10).await.expect("top");
    assert_eq!(top.len(), 8);
    assert!(top.iter().all(|(_, n)| *n == 10), "{top:?}");
    let stats = t.stats();
    assert_eq!(
        (stats.buffered, stats.flushed, stats.pending),
        (8_080, 8_080, 0)
    );
    let t2 = t.clone();
    let estimate = std::thread::spawn(move || t2.record("acme", "api_request", 1))
        .join()
        .expect("estimating thread");
    assert_eq!(estimate, 8_001);
}

fn batch(period: &str, tenant: &str, n: i64) -> Batch {
    Batch {
        id: "retry-test".into(),
        tenants: vec![TenantIncrements {
            tenant: Arc::from(tenant),
            period: Arc::from(period),
            expire_at: tollgate_usage::now_ms() / 1000 + 3600,
            metrics: vec![(Arc::from("api_request"), n)],
            top_only: Vec::new(),
        }],
        top: true,
    }
}

async fn a_retried_batch_counts_once(make: Make) {
    let t = make();
    let period = t.current_period().label;
    let b = batch(&period, "acme", 7);
    t.store().apply(&b).await.expect("first");
    t.store().apply(&b).await.expect("retry");
    let usage = t.usage("acme", None).await.expect("usage");
    assert_eq!(usage.get("api_request"), Some(&7));
    let top = t.top("api_request", None, 10).await.expect("top");
    assert_eq!(top, vec![("acme".to_owned(), 7)]);
}

async fn a_replayed_quota_operation_counts_once(make: Make) {
    let t = make();
    let period: Arc<str> = Arc::from(t.current_period().label.as_str());
    let op = QuotaOp {
        op_id: "op-1".into(),
        tenant: Arc::from("acme"),
        period,
        expire_at: tollgate_usage::now_ms() / 1000 + 3600,
        metric: Arc::from("sms_sent"),
        n: 2,
        limit: Some(5),
    };
    let a = t.store().quota(op.clone()).await.expect("quota");
    assert!(a.allowed);
    assert_eq!(a.total, 2);
    let b = t
        .store()
        .quota(QuotaOp {
            limit: None,
            ..op.clone()
        })
        .await
        .expect("replay");
    assert!(b.allowed);
    assert_eq!(b.total, 2, "a replay with the same id is not counted again");
    let c = t
        .store()
        .quota(QuotaOp {
            op_id: "op-2".into(),
            n: 4,
            ..op
        })
        .await
        .expect("over");
    assert!(!c.allowed, "2 + 4 > 5");
    assert_eq!(c.total, 2);
}

type Svc = tower::util::BoxCloneService<Request<()>, Response<Full<Bytes>>, Infallible>;

fn app(tracker: UsageTracker, plans: Plans) -> Svc {
    let layer =
        UsageLayer::new(tracker, TenantSource::header("x-api-key")).plans(plans, |key, _| {
            Some(
                if key.starts_with("free_") {
                    "free"
                } else {
                    "starter"
                }
                .to_owned(),
            )
        });
    tower::util::BoxCloneService::new(ServiceBuilder::new().layer(layer).service(service_fn(
        |_req: Request<()>| async {
            Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(b"ok"))))
        },
    )))
}

fn req(key: &str) -> Request<()> {
    Request::builder()
        .header("x-api-key", key)
        .body(())
        .expect("request")
}

async fn hard_quota_is_exact_across_instances(make: Make) {
    let plans = Plans::new()
        .with(
            Plan::new("free", 0)
                .limit("api_request", 1_000, None)
                .enforce(Enforcement::Hard),
        )
        .and_then(|p| p.with(Plan::new("starter", 0)))
        .expect("plans");
    let apps: Vec<Svc> = (0..3).map(|_| app(make(), plans.clone())).collect();
    let mut tasks = Vec::new();
    for i in 0..5_000 {
        let svc = apps[i % 3].clone();
        tasks.push(tokio::spawn(async move {
            svc.oneshot(req("free_quota"))
                .await
                .expect("infallible")
                .status()
        }));
    }
    let mut ok = 0;
    for t in tasks {
        match t.await.expect("task") {
            StatusCode::OK => ok += 1,
            StatusCode::TOO_MANY_REQUESTS => {}
            other => panic!("unexpected status {other}"),
        }
    }
    assert_eq!(ok, 1_000, "exactly the quota succeeds");
    let res = apps[0]
        .clone()
        .oneshot(req("free_quota"))
        .await
        .expect("infallible");
    assert_eq!(res.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(res.headers()["x-quota-limit"], "1000");
    assert_eq!(res.headers()["x-quota-remaining"], "0");
    assert!(
        res.headers()["x-quota-reset"]
            .to_str()
            .expect("ascii")
            .parse::<u64>()
            .expect("secs")
            > 0
    );
    assert_eq!(res.headers()["content-type"], "application/problem+json");
}

async fn exact_counts_across_instances(make: Make) {
    let trackers: Vec<UsageTracker> = (0..3).map(|_| make()).collect();
    let plans = Plans::example();
    let mut tasks = Vec::new();
    for t in &trackers {
        let svc = app(t.clone(), plans.clone());
        for _ in 0..64 {
            let mut svc = svc.clone();
            tasks.push(tokio::spawn(async move {
                for _ in 0..1_000 {
                    let s = svc.ready().await.expect("ready");
                    let res = s.call(req("starter_exact")).await.expect("infallible");
                    assert_eq!(res.status(), StatusCode::OK);
                }
            }));
        }
    }
    for t in tasks {
        t.await.expect("task");
    }
    for t in &trackers {
        let s = t.shutdown().await;
        assert_eq!(s.pending, 0);
        assert_eq!(s.dropped, 0);
    }
    let usage = trackers[0]
        .usage("starter_exact", None)
        .await
        .expect("usage");
    assert_eq!(usage.get("api_request"), Some(&192_000));
}

/// Three instances recording for 1,500 tenants from many tasks while their
/// flushers run: every flush of that many counters goes out in several
/// parts, and every tenant's total comes out exact.
async fn exact_counts_for_many_tenants_flushed_in_parts(make: Make) {
    let trackers: Vec<UsageTracker> = (0..3).map(|_| make()).collect();
    let tenants: Arc<Vec<String>> = Arc::new((0..1_500).map(|i| format!("tenant-{i}")).collect());
    let mut tasks = Vec::new();
    for t in &trackers {
        for _ in 0..8 {
            let (t, tenants) = (t.clone(), tenants.clone());
            tasks.push(tokio::spawn(async move {
                for _ in 0..5 {
                    for tenant in tenants.iter() {
                        t.record(tenant, "api_request", 1);
                    }
                    tokio::task::yield_now().await;
                }
            }));
        }
    }
    for task in tasks {
        task.await.expect("task");
    }
    for t in &trackers {
        let s = t.shutdown().await;
        assert_eq!((s.pending, s.dropped), (0, 0));
        assert_eq!((s.buffered, s.flushed), (60_000, 60_000));
    }
    let top = trackers[0]
        .top("api_request", None, 2_000)
        .await
        .expect("top");
    assert_eq!(top.len(), 1_500);
    assert!(
        top.iter().all(|(_, n)| *n == 120),
        "{:?}",
        top.iter().find(|(_, n)| *n != 120)
    );
    for tenant in ["tenant-0", "tenant-749", "tenant-1499"] {
        let usage = trackers[0].usage(tenant, None).await.expect("usage");
        assert_eq!(usage.get("api_request"), Some(&120), "{tenant}");
    }
}

/// The hash expires at period end + retention, set once and never pushed
/// forward, including for increments larger than 1.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expiry_is_absolute_and_never_extended() {
    let server = RedisServer::start();
    let h = handle(server.url()).await;
    let retention = Duration::from_secs(90 * 24 * 3600);
    let t = UsageTracker::redis(h.clone(), quick().retention(retention));
    let period = t.current_period();
    let expected = (period.end_ms + 90 * 24 * 3600 * 1000) / 1000;
    let key = tollgate_usage::RedisStore::new(h.clone()).usage_key("acme", &period.label);
    let top = tollgate_usage::RedisStore::new(h.clone()).top_key("donation_cents", &period.label);
    for n in [1, 2500, 7] {
        t.record("acme", "donation_cents", n);
        t.flush().await.expect("flush");
        let at = server.command(&["EXPIRETIME", &key]).expect("EXPIRETIME");
        assert_eq!(at.as_int(), Some(expected), "hash expiry after +{n}");
        let at = server.command(&["EXPIRETIME", &top]).expect("EXPIRETIME");
        assert_eq!(at.as_int(), Some(expected), "top set expiry after +{n}");
    }
    let usage = t.usage("acme", None).await.expect("usage");
    assert_eq!(usage.get("donation_cents"), Some(&2508));
}

/// Increments on either side of a month boundary land in their own months.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn period_boundaries_in_redis() {
    let server = RedisServer::start();
    let h = handle(server.url()).await;
    // Long retention: January 2026 data would otherwise already be expired.
    let t = UsageTracker::redis(
        h.clone(),
        quick().retention(Duration::from_secs(10 * 365 * 86_400)),
    );
    // 2026-01-31T23:59:59.999Z and 2026-02-01T00:00:00.000Z
    t.record_at("acme", "api_request", 1, 1_769_903_999_999);
    t.record_at("acme", "api_request", 2, 1_769_904_000_000);
    t.flush().await.expect("flush");
    let jan = t.usage("acme", Some("2026-01")).await.expect("jan");
    let feb = t.usage("acme", Some("2026-02")).await.expect("feb");
    assert_eq!(jan.get("api_request"), Some(&1));
    assert_eq!(feb.get("api_request"), Some(&2));
}

/// A flush whose answer is lost (Redis slower than the deadline) but which
/// Redis applied is retried with the same batch id and not counted twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flush_retried_after_a_timeout_that_applied_counts_once() {
    let server = RedisServer::start();
    let proxy = LatencyProxy::start(server.port(), Duration::ZERO).await;
    let h = RedisHandle::connect(
        RedisConfig::from_url(proxy.url())
            .deadline(Duration::from_millis(100))
            .failure_threshold(100)
            .probe_interval(Duration::from_millis(50)),
    )
    .await
    .expect("connect");
    let t = UsageTracker::redis(
        h.clone(),
        UsageConfig::new().flush_interval(Duration::from_secs(3600)),
    );
    t.record("acme", "api_request", 5);
    t.flush().await.expect("warm up (loads scripts)");
    t.record("acme", "api_request", 10);
    proxy.set_delay(Duration::from_millis(300));
    assert!(
        t.flush().await.is_err(),
        "the answer arrives after the deadline"
    );
    // Redis did apply it.
    tokio::time::sleep(Duration::from_millis(400)).await;
    let direct =
        tollgate_usage::RedisStore::new(h.clone()).usage_key("acme", &t.current_period().label);
    let v = server
        .command(&["HGET", &direct, "api_request"])
        .expect("HGET");
    assert_eq!(v.as_int(), Some(15), "applied despite the timeout");
    proxy.set_delay(Duration::ZERO);
    tokio::time::sleep(Duration::from_millis(200)).await;
    t.flush().await.expect("retry");
    let usage = t.usage("acme", None).await.expect("usage");
    assert_eq!(
        usage.get("api_request"),
        Some(&15),
        "the retry did not count twice"
    );
    assert_eq!(t.stats().pending, 0);
}

/// Redis killed for 5 s under traffic: no 5xx, and afterwards the count is
/// exact or the shortfall equals the dropped metric.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_killed_under_traffic() {
    // Durable (AOF, fsync always), so what was written before the kill is
    // still there after the restart and the count can be checked exactly.
    let mut server =
        RedisServer::start_with_args(&["--appendonly", "yes", "--appendfsync", "always"]);
    let h = handle(server.url()).await;
    let t = UsageTracker::redis(h.clone(), quick());
    let svc = app(t.clone(), Plans::example());
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let sent = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let (svc, stop, sent) = (svc.clone(), stop.clone(), sent.clone());
        tasks.push(tokio::spawn(async move {
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let res = svc
                    .clone()
                    .oneshot(req("starter_outage"))
                    .await
                    .expect("infallible");
                assert!(!res.status().is_server_error(), "{}", res.status());
                sent.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    server.kill();
    tokio::time::sleep(Duration::from_secs(5)).await;
    server.restart();
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for task in tasks {
        task.await.expect("traffic");
    }
    let stats = t.shutdown().await;
    assert_eq!(stats.pending, 0);
    let sent = sent.load(std::sync::atomic::Ordering::Relaxed);
    let counted = t
        .usage("starter_outage", None)
        .await
        .expect("usage")
        .get("api_request")
        .copied()
        .unwrap_or(0);
    let counted = u64::try_from(counted).expect("positive");
    assert!(sent > 1_000, "traffic flowed: {sent}");
    assert_eq!(
        counted + stats.dropped,
        sent,
        "counted {counted}, dropped {}",
        stats.dropped
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_buffer_is_bounded_and_drops_are_counted() {
    let mut server = RedisServer::start();
    let h = handle(server.url()).await;
    server.kill();
    let t = UsageTracker::redis(h.clone(), quick().max_buffered(10));
    for i in 0..20 {
        t.record(&format!("tenant-{i}"), "api_request", 1);
    }
    // The ten first counters are kept; the others are dropped and counted.
    assert_eq!(t.stats().dropped, 10);
    assert_eq!(t.stats().pending, 10);
    // Existing counters keep aggregating without growing the buffer.
    t.record("tenant-0", "api_request", 5);
    assert_eq!(t.stats().pending, 15);
    server.restart();
    let s = t.shutdown().await;
    assert_eq!(s.pending, 0);
    assert_eq!(s.flushed, 15);
    let usage = t.usage("tenant-0", None).await.expect("usage");
    assert_eq!(usage.get("api_request"), Some(&6));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_limit_denials_and_custom_metrics_are_counted() {
    let server = RedisCluster::start();
    let h = handle(server.url()).await;
    let t = UsageTracker::redis(h.clone(), quick());
    let layer =
        UsageLayer::new(t.clone(), TenantSource::header("x-api-key")).per_status_class(true);
    let svc =
        ServiceBuilder::new()
            .layer(layer)
            .service(service_fn(|req: Request<()>| async move {
                // Only requests with a tenant get a handle.
                if let Some(usage) = req.extensions().get::<tollgate_usage::Usage>() {
                    usage.record("donation_cents", 2500);
                }
                // What a rate limiter inside the usage layer answers.
                let res = Response::builder()
                    .status(StatusCode::TOO_MANY_REQUESTS)
                    .header("x-ratelimit-limit", "10")
                    .body(Full::new(Bytes::new()))
                    .expect("response");
                Ok::<_, Infallible>(res)
            }));
    for _ in 0..3 {
        svc.clone().oneshot(req("acme")).await.expect("infallible");
    }
    // No tenant, no anonymous bucket: not counted.
    svc.clone()
        .oneshot(Request::new(()))
        .await
        .expect("infallible");
    t.flush().await.expect("flush");
    let u = t.usage("acme", None).await.expect("usage");
    assert_eq!(u.get("api_request"), Some(&3));
    assert_eq!(u.get("donation_cents"), Some(&7500));
    assert_eq!(u.get("ratelimit_denied"), Some(&3));
    assert_eq!(u.get("api_request:status:4xx"), Some(&3));
    let hits = t.rate_limited(None, 10).await.expect("top");
    assert_eq!(hits, vec![("acme".to_owned(), 3)]);
}

/// The tenant can come from the rate limiter's key extractors: here an
/// extension an auth layer set, and a closure; requests without one go to
/// the anonymous bucket. Header names are case-insensitive.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tenants_from_the_rate_limiters_key_extractors() {
    use tollgate_ratelimit::{ExtensionKey, RequestView, key_fn};

    #[derive(Clone)]
    struct Org(&'static str);

    let t = UsageTracker::in_memory(quick());
    let ok = || {
        service_fn(|_req: Request<()>| async {
            Ok::<_, Infallible>(Response::new(Full::new(Bytes::new())))
        })
    };
    let by_org = ServiceBuilder::new()
        .layer(
            UsageLayer::new(
                t.clone(),
                TenantSource::key(ExtensionKey::new(|o: &Org| format!("org:{}", o.0))),
            )
            .anonymous("anonymous"),
        )
        .service(ok());
    let mut with_org = Request::new(());
    with_org.extensions_mut().insert(Org("acme"));
    by_org.clone().oneshot(with_org).await.expect("infallible");
    by_org
        .clone()
        .oneshot(Request::new(()))
        .await
        .expect("infallible");

    let by_fn = ServiceBuilder::new()
        .layer(UsageLayer::new(
            t.clone(),
            TenantSource::key(key_fn(|r: &RequestView<'_>| {
                r.uri.path().strip_prefix("/t/").map(str::to_owned)
            })),
        ))
        .service(ok());
    for _ in 0..2 {
        let req = Request::get("/t/beta").body(()).expect("request");
        by_fn.clone().oneshot(req).await.expect("infallible");
    }

    let by_header = ServiceBuilder::new()
        .layer(UsageLayer::new(
            t.clone(),
            TenantSource::header("X-Api-Key"),
        ))
        .service(ok());
    by_header
        .clone()
        .oneshot(req("gamma"))
        .await
        .expect("infallible");

    t.flush().await.expect("flush");
    for (tenant, n) in [("org:acme", 1), ("anonymous", 1), ("beta", 2), ("gamma", 1)] {
        let u = t.usage(tenant, None).await.expect("usage");
        assert_eq!(u.get("api_request"), Some(&n), "{tenant}");
    }
}
