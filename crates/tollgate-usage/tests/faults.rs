//! Usage tracking when writes fail or are cut short (answers lost, breaker
//! open, scripts missing, shutdown, cancelled flushes), and input from
//! outside (timestamps, tenant ids in exports, rate limiter headers).

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use tollgate_redis::{RedisConfig, RedisHandle};
use tollgate_testkit::{LatencyProxy, RedisCluster, RedisServer, Replicated};
use tollgate_usage::{
    Batch, Enforcement, MemoryStore, PeriodKind, Plan, Plans, QuotaOutcome, RedisStore, Store,
    TenantIncrements, TenantSource, UsageConfig, UsageLayer, UsageTracker, WriteMode, now_ms,
};
use tower::{ServiceBuilder, ServiceExt, service_fn};

use tollgate_testkit::connect as handle;

/// Waits (at most 30 s, far beyond what any step needs) until `done`.
async fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
    let give_up = tokio::time::Instant::now() + Duration::from_secs(30);
    while !done() {
        assert!(
            tokio::time::Instant::now() < give_up,
            "never happened: {what}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// A handle on `url` (often a latency proxy's) with a short deadline, so
/// a delayed answer is a lost one.
async fn through(url: String, deadline: Duration, threshold: u32) -> RedisHandle {
    RedisHandle::connect(
        RedisConfig::from_url(url)
            .deadline(deadline)
            .failure_threshold(threshold)
            .probe_interval(Duration::from_millis(50)),
    )
    .await
    .expect("connect")
}

/// A server behind a latency proxy (no delay yet), and a handle through
/// the proxy.
async fn proxied(deadline: Duration, threshold: u32) -> (RedisServer, LatencyProxy, RedisHandle) {
    let server = RedisServer::start();
    let proxy = LatencyProxy::start(server.port(), Duration::ZERO).await;
    let h = through(proxy.url(), deadline, threshold).await;
    (server, proxy, h)
}

/// A server whose data survives a restart (AOF, fsync always).
fn durable() -> RedisServer {
    RedisServer::start_with_args(&["--appendonly", "yes", "--appendfsync", "always"])
}

fn manual() -> UsageConfig {
    UsageConfig::new().flush_interval(Duration::from_secs(3600))
}

fn hget(server: &RedisServer, key: &str, field: &str) -> Option<i64> {
    server
        .read_command(&["HGET", key, field])
        .expect("HGET")
        .as_int()
}

/// acme's usage hash for the current period.
fn acme_key(h: &RedisHandle, t: &UsageTracker) -> String {
    RedisStore::new(h.clone()).usage_key("acme", &t.current_period().label)
}

/// Waits until the `api_request` total of `key` is `n` in Redis (a write
/// whose answer was lost still runs there).
async fn wait_for_requests(what: &str, server: &RedisServer, key: &str, n: i64) {
    wait_until(what, || hget(server, key, "api_request") == Some(n)).await;
}

async fn api_requests(t: &UsageTracker, tenant: &str) -> Option<i64> {
    t.usage(tenant, None)
        .await
        .expect("usage")
        .get("api_request")
        .copied()
}

/// A flush whose answer was lost (Redis applied it) is retried while the
/// breaker is open: refused without being sent, it stays pending under its
/// id rather than going back into the buffer, where the next flush would
/// send it again under a new id.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flush_retried_while_the_breaker_is_open_counts_once() {
    let server = RedisServer::start();
    let proxy = LatencyProxy::start(server.port(), Duration::ZERO).await;
    // One timeout opens the breaker.
    let h = through(proxy.url(), Duration::from_millis(200), 1).await;
    let t = UsageTracker::redis(h.clone(), manual());
    t.record("acme", "api_request", 5);
    t.flush().await.expect("warm up (loads scripts)");
    t.record("acme", "api_request", 10);
    // Answers now come after the deadline, and after the prober's timeout
    // (twice the deadline): the breaker stays open while the delay lasts.
    proxy.set_delay(Duration::from_millis(600));
    assert!(t.flush().await.is_err(), "the answer is lost");
    assert!(!h.is_available(), "the timeout opened the breaker");
    assert!(t.flush().await.is_err(), "refused by the open breaker");
    assert_eq!(t.stats().pending, 10);
    proxy.set_delay(Duration::ZERO);
    wait_until("the breaker closes", || h.is_available()).await;
    flush_until_ok(&t).await;
    let key = acme_key(&h, &t);
    assert_eq!(hget(&server, &key, "api_request"), Some(15));
    let stats = t.stats();
    assert_eq!((stats.flushed, stats.pending, stats.dropped), (15, 0, 0));
}

/// A buffer of thousands of tenants is written in round trips of a few
/// hundred counters, each within a deadline that one pipeline of it all
/// outlasts (it then timed out on every retry and opened the breaker).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flush_of_thousands_of_tenants_is_written_in_round_trips_within_the_deadline() {
    let server = RedisServer::start();
    let h = through(server.url(), Duration::from_millis(250), 1).await;
    let t = UsageTracker::redis(h.clone(), manual().flush_threshold(1_000_000));
    t.record("warm", "api_request", 1);
    t.flush().await.expect("warm up (loads scripts)");
    let tenants = 10_000;
    for i in 0..tenants {
        t.record(&format!("tenant-{i}"), "api_request", 1);
    }
    t.flush().await.expect("written within the deadline");
    assert!(h.is_available(), "no timeout opened the breaker");
    let s = t.stats();
    assert_eq!((s.flushed, s.pending, s.dropped), (tenants + 1, 0, 0));
    let store = RedisStore::new(h.clone());
    let label = t.current_period().label;
    for i in [0, 4_999, 9_999] {
        let key = store.usage_key(&format!("tenant-{i}"), &label);
        assert_eq!(hget(&server, &key, "api_request"), Some(1), "tenant-{i}");
    }
    let set = store.top_key("api_request", &label);
    let members = server.command(&["ZCARD", &set]).expect("ZCARD").as_int();
    assert_eq!(
        members,
        Some(10_001),
        "every part's tenants are in the top set"
    );
}

/// The first attempt of a flush is sent and partly applied (one script was
/// missing); reloading the scripts is then refused by the breaker. The
/// batch was sent, so it is retried under its id, never merged back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_partly_applied_before_a_script_reload_counts_once() {
    let server = RedisServer::start();
    let proxy = LatencyProxy::start(server.port(), Duration::ZERO).await;
    // No timeouts here; the prober waits long enough for the reload to
    // meet the open breaker.
    let h = RedisHandle::connect(
        RedisConfig::from_url(proxy.url())
            .deadline(Duration::from_secs(10))
            .failure_threshold(1)
            .probe_interval(Duration::from_secs(4)),
    )
    .await
    .expect("connect");
    let t = UsageTracker::redis(h.clone(), manual());
    t.record("acme", "api_request", 5);
    t.flush().await.expect("warm up (loads scripts)");
    // Redis lost the top-consumers script only: the tenant's hash is
    // written by the next flush, its top set answers NOSCRIPT.
    server.command(&["SCRIPT", "FLUSH"]).expect("SCRIPT FLUSH");
    server
        .command(&[
            "SCRIPT",
            "LOAD",
            include_str!("../src/store/flush_tenant.lua"),
        ])
        .expect("SCRIPT LOAD");
    let loads = || {
        let info = server
            .command(&["INFO", "commandstats"])
            .expect("INFO")
            .as_str()
            .unwrap_or_default()
            .to_owned();
        tollgate_testkit::info_field(&info, "cmdstat_script|load")
            .and_then(|v| v.strip_prefix("calls="))
            .and_then(|v| v.split(',').next())
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
    };
    let before = loads();
    t.record("acme", "api_request", 10);
    proxy.set_delay(Duration::from_secs(1));
    let flush = tokio::spawn({
        let t = t.clone();
        async move { t.flush().await }
    });
    // The first script of the reload has run in Redis; its answer is held
    // by the proxy for a second. The breaker opens now: the second load
    // is refused without being sent.
    wait_until("the reload starts", || loads() > before).await;
    h.observe(&tollgate_redis::Error::Timeout(Duration::ZERO));
    assert!(!h.is_available());
    assert!(flush.await.expect("flush task").is_err());
    proxy.set_delay(Duration::ZERO);
    wait_until("the breaker closes", || h.is_available()).await;
    flush_until_ok(&t).await;
    assert_eq!(api_requests(&t, "acme").await, Some(15));
    let top = t.top("api_request", None, 10).await.expect("top");
    assert_eq!(top, vec![("acme".to_owned(), 15)]);
    let stats = t.stats();
    assert_eq!((stats.flushed, stats.pending), (15, 0));
}

/// A batch unconfirmed for longer than its markers are guaranteed to live
/// is not retried (that could count it twice): it is counted as dropped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_unconfirmed_past_the_retry_age_is_counted_as_dropped() {
    let (_server, proxy, h) = proxied(Duration::from_millis(200), 100).await;
    let t = UsageTracker::redis(h.clone(), manual().max_retry_age(Duration::from_millis(1)));
    t.record("acme", "api_request", 5);
    t.flush().await.expect("warm up");
    t.record("acme", "api_request", 10);
    proxy.set_delay(Duration::from_millis(500));
    assert!(t.flush().await.is_err(), "the answer is lost");
    proxy.set_delay(Duration::ZERO);
    flush_until_ok(&t).await;
    let stats = t.stats();
    assert_eq!((stats.flushed, stats.dropped, stats.pending), (5, 10, 0));
}

fn hard_app(
    tracker: UsageTracker,
    fail_closed: bool,
) -> tower::util::BoxCloneService<Request<()>, Response<Full<Bytes>>, Infallible> {
    let plans = Plans::new()
        .with(
            Plan::new("free", 0)
                .limit("api_request", 1_000, None)
                .enforce(Enforcement::Hard),
        )
        .expect("plans");
    let layer = UsageLayer::new(tracker, TenantSource::header("x-api-key"))
        .plans(plans, |_, _| Some("free".to_owned()))
        .fail_closed(fail_closed);
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

/// Failing closed with Redis down: the refused requests are not counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_refused_while_redis_is_down_are_not_counted() {
    let mut server = durable();
    let h = handle(server.url()).await;
    let t = UsageTracker::redis(h.clone(), manual());
    let svc = hard_app(t.clone(), true);
    let res = svc.clone().oneshot(req("acme")).await.expect("infallible");
    assert_eq!(res.status(), StatusCode::OK);
    server.kill();
    wait_until("the breaker opens", || !h.is_available()).await;
    for _ in 0..5 {
        let res = svc.clone().oneshot(req("acme")).await.expect("infallible");
        assert_eq!(res.status(), StatusCode::SERVICE_UNAVAILABLE);
    }
    server.restart();
    wait_until("the breaker closes", || h.is_available()).await;
    t.flush().await.expect("flush");
    assert_eq!(api_requests(&t, "acme").await, Some(1));
    assert_eq!(t.stats().pending, 0);
}

/// Failing closed with Redis slow: the checks ran in Redis but their
/// answers were lost; the requests were refused, so the checks are
/// withdrawn and the refused requests end up not counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_refused_after_a_lost_answer_are_withdrawn() {
    let (server, proxy, h) = proxied(Duration::from_millis(200), 100).await;
    let t = UsageTracker::redis(h.clone(), manual());
    let svc = hard_app(t.clone(), true);
    let res = svc.clone().oneshot(req("acme")).await.expect("infallible");
    assert_eq!(res.status(), StatusCode::OK);
    proxy.set_delay(Duration::from_millis(500));
    for _ in 0..5 {
        let res = svc.clone().oneshot(req("acme")).await.expect("infallible");
        assert_eq!(res.status(), StatusCode::SERVICE_UNAVAILABLE);
    }
    let key = acme_key(&h, &t);
    wait_for_requests("the lost checks run in Redis", &server, &key, 6).await;
    proxy.set_delay(Duration::ZERO);
    flush_until_ok(&t).await;
    assert_eq!(hget(&server, &key, "api_request"), Some(1));
    assert_eq!(t.stats().pending, 0);
}

/// Flushes until a flush succeeds (answers delayed earlier may still be
/// draining).
async fn flush_until_ok(t: &UsageTracker) {
    let give_up = tokio::time::Instant::now() + Duration::from_secs(30);
    while t.flush().await.is_err() {
        assert!(
            tokio::time::Instant::now() < give_up,
            "flush never succeeded"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Synchronous mode still buffers some increments (custom metrics, per
/// route and status counters); the in-memory store's flusher writes them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sync_mode_with_the_in_memory_store_flushes_buffered_metrics() {
    let t = UsageTracker::in_memory(
        UsageConfig::new()
            .mode(WriteMode::Sync)
            .flush_interval(Duration::from_millis(20)),
    );
    t.record("acme", "email_sent", 2);
    let give_up = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let u = t.usage("acme", None).await.expect("usage");
        if u.get("email_sent") == Some(&2) {
            break;
        }
        assert!(tokio::time::Instant::now() < give_up, "never flushed");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(t.stats().pending, 0);
}

/// Synchronous mode with a soft plan: while writes fail no total is known,
/// so no quota headers are sent (rather than "the whole quota is left").
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sync_mode_sends_no_quota_headers_it_cannot_know() {
    let mut server = durable();
    let h = handle(server.url()).await;
    let t = UsageTracker::redis(h.clone(), manual().mode(WriteMode::Sync));
    let plans = Plans::new()
        .with(Plan::new("starter", 0).limit("api_request", 100, None))
        .expect("plans");
    let layer = UsageLayer::new(t.clone(), TenantSource::header("x-api-key"))
        .plans(plans, |_, _| Some("starter".to_owned()));
    let svc = ServiceBuilder::new()
        .layer(layer)
        .service(service_fn(|_req: Request<()>| async {
            Ok::<_, Infallible>(Response::new(Full::new(Bytes::new())))
        }));
    for left in [99, 98, 97] {
        let res = svc.clone().oneshot(req("acme")).await.expect("infallible");
        assert_eq!(
            res.headers()["x-quota-remaining"],
            left.to_string().as_str()
        );
    }
    server.kill();
    wait_until("the breaker opens", || !h.is_available()).await;
    let res = svc.clone().oneshot(req("acme")).await.expect("infallible");
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(res.headers().get("x-quota-remaining"), None);
    assert_eq!(res.headers().get("x-quota-limit"), None);
    server.restart();
    wait_until("the breaker closes", || h.is_available()).await;
    flush_until_ok(&t).await;
    assert_eq!(api_requests(&t, "acme").await, Some(4), "still counted");
}

/// A 429 counts as a rate-limit denial when it carries a rate limiter's
/// headers, legacy or IETF (`RateLimit`, `RateLimit-Policy`) alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_limit_denials_with_ietf_headers_only_are_counted() {
    let t = UsageTracker::in_memory(manual());
    let responses: [&[(&str, &str)]; 4] = [
        &[("ratelimit", "\"default\";r=0;t=30")],
        &[("ratelimit-policy", "\"default\";q=10;w=60")],
        &[
            ("ratelimit", "\"default\";r=0;t=30"),
            ("ratelimit-policy", "\"default\";q=10;w=60"),
        ],
        // A 429 of the application's own, not a rate limiter's.
        &[],
    ];
    for headers in responses {
        let svc = ServiceBuilder::new()
            .layer(UsageLayer::new(
                t.clone(),
                TenantSource::header("x-api-key"),
            ))
            .service(service_fn(move |_req: Request<()>| async move {
                let mut res = Response::builder().status(StatusCode::TOO_MANY_REQUESTS);
                for (k, v) in headers {
                    res = res.header(*k, *v);
                }
                Ok::<_, Infallible>(res.body(Full::new(Bytes::new())).expect("response"))
            }));
        svc.oneshot(req("acme")).await.expect("infallible");
    }
    t.flush().await.expect("flush");
    let u = t.usage("acme", None).await.expect("usage");
    assert_eq!(u.get("ratelimit_denied"), Some(&3));
    assert_eq!(u.get("api_request"), Some(&4));
}

/// The CSV export neutralises fields a spreadsheet would run as formulas,
/// the period label included, and quotes separators.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn csv_export_neutralises_formulas() {
    let t = UsageTracker::new(Store::Memory(MemoryStore::new()), manual());
    let period = "@SUM(1,2)";
    let tenants = [
        "=HYPERLINK(\"http://x\")",
        "+1",
        "-1",
        "\tcmd",
        "\rcmd",
        "plain",
    ];
    let batch = Batch {
        id: "csv".into(),
        tenants: tenants
            .iter()
            .map(|tenant| TenantIncrements {
                tenant: Arc::from(*tenant),
                period: Arc::from(period),
                expire_at: now_ms() / 1000 + 3600,
                metrics: vec![(Arc::from("=cmd|' /C calc'!A0"), 3)],
                top_only: Vec::new(),
            })
            .collect(),
        top: false,
    };
    t.store().apply(&batch).await.expect("apply");
    let csv = t.csv(&tenants, Some(period)).await.expect("csv");
    let expected = [
        "tenant,period,metric,value",
        "\"'=HYPERLINK(\"\"http://x\"\")\",\"'@SUM(1,2)\",'=cmd|' /C calc'!A0,3",
        "'+1,\"'@SUM(1,2)\",'=cmd|' /C calc'!A0,3",
        "'-1,\"'@SUM(1,2)\",'=cmd|' /C calc'!A0,3",
        "'\tcmd,\"'@SUM(1,2)\",'=cmd|' /C calc'!A0,3",
        "\"'\rcmd\",\"'@SUM(1,2)\",'=cmd|' /C calc'!A0,3",
        "plain,\"'@SUM(1,2)\",'=cmd|' /C calc'!A0,3",
    ];
    assert_eq!(csv, expected.join("\n") + "\n");
}

/// A timestamp outside the calendar (here microseconds passed as
/// milliseconds, and the very last day) is never written, in 1970 or
/// anywhere: its units are counted as dropped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn timestamps_outside_the_calendar_are_dropped() {
    let store = MemoryStore::new();
    let t = UsageTracker::new(Store::Memory(store.clone()), manual());
    assert_eq!(t.record_at("acme", "api_request", 3, now_ms() * 1000), 0);
    let daily = UsageTracker::new(
        Store::Memory(store.clone()),
        manual().period(tollgate_usage::PeriodKind::daily()),
    );
    // 9999-12-31T12:00:00Z: the day has no end in the calendar.
    assert_eq!(
        daily.record_at("acme", "api_request", 4, 253_402_257_600_000),
        0
    );
    t.record("acme", "api_request", 1);
    t.flush().await.expect("flush");
    daily.flush().await.expect("flush");
    for (tracker, units) in [(&t, 3), (&daily, 4)] {
        let s = tracker.stats();
        assert_eq!((s.dropped, s.pending), (units, 0));
    }
    for label in ["1970-01", "1970-01-01", "9999-12-31"] {
        let u = t.usage("acme", Some(label)).await.expect("usage");
        assert!(u.is_empty(), "{label}: {u:?}");
    }
    assert_eq!(api_requests(&t, "acme").await, Some(1));
}

/// A time whose period's retention has already run out would be written
/// with an expiry in the past (Redis deletes such a key at once): it is
/// counted as dropped and not written.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn timestamps_past_their_retention_are_dropped() {
    let t = UsageTracker::in_memory(manual());
    let long_ago = now_ms() - 200 * 86_400_000;
    assert_eq!(t.record_at("acme", "api_request", 5, long_ago), 0);
    // Within the retention (last month, say): counted as usual.
    t.record_at("acme", "api_request", 2, now_ms() - 40 * 86_400_000);
    t.flush().await.expect("flush");
    let s = t.stats();
    assert_eq!((s.dropped, s.pending, s.flushed), (5, 0, 2));
}

/// Increments recorded after shutdown would never be written: they are
/// counted as dropped, not left pending.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn increments_after_shutdown_are_counted_as_dropped() {
    let t = UsageTracker::in_memory(manual());
    t.record("acme", "api_request", 2);
    let s = t.shutdown().await;
    assert_eq!((s.flushed, s.pending, s.dropped), (2, 0, 0));
    t.record("acme", "api_request", 3);
    t.record("globex", "api_request", 4);
    let s = t.stats();
    assert_eq!((s.pending, s.dropped), (0, 7));
    t.flush().await.expect("flush");
    assert_eq!(api_requests(&t, "acme").await, Some(2));
    assert_eq!(api_requests(&t, "globex").await, None);
}

/// What shutdown counted as dropped at its deadline is forgotten: a later
/// flush does not write it too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn units_dropped_at_the_shutdown_deadline_are_never_written() {
    let mut server = durable();
    let h = handle(server.url()).await;
    let t = UsageTracker::redis(
        h.clone(),
        manual().shutdown_timeout(Duration::from_millis(200)),
    );
    server.kill();
    wait_until("the breaker opens", || !h.is_available()).await;
    t.record("acme", "api_request", 4);
    let s = t.shutdown().await;
    assert_eq!((s.pending, s.dropped, s.flushed), (0, 4, 0));
    server.restart();
    wait_until("the breaker closes", || h.is_available()).await;
    t.flush().await.expect("flush");
    assert_eq!(api_requests(&t, "acme").await, None);
    assert_eq!(t.stats().pending, 0);
}

/// While Redis is down a full buffer does not spin the flusher: a failed
/// flush puts its units back, which would wake it again at once; it waits
/// for the interval instead (a handful of attempts a second, not
/// thousands).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_buffer_does_not_spin_the_flusher_during_an_outage() {
    let mut server = RedisServer::start();
    let h = handle(server.url()).await;
    let t = UsageTracker::redis(
        h.clone(),
        UsageConfig::new()
            .flush_interval(Duration::from_millis(200))
            .flush_threshold(1),
    );
    server.kill();
    wait_until("the breaker opens", || !h.is_available()).await;
    let before = t.stats().flush_errors;
    let started = tokio::time::Instant::now();
    while started.elapsed() < Duration::from_secs(1) {
        t.record("acme", "api_request", 1);
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let attempts = t.stats().flush_errors - before;
    assert!(attempts <= 20, "{attempts} failed flushes in a second");
    assert!(t.stats().pending > 0);
}

/// A flush dropped while it waits for Redis loses nothing: the batch was
/// queued for a retry under its id before it was sent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flush_cancelled_while_waiting_for_redis_loses_nothing() {
    let (_server, proxy, h) = proxied(Duration::from_secs(10), 100).await;
    let t = UsageTracker::redis(h.clone(), manual());
    t.record("acme", "api_request", 5);
    t.flush().await.expect("warm up");
    t.record("acme", "api_request", 10);
    proxy.set_delay(Duration::from_secs(1));
    let cut = tokio::time::timeout(Duration::from_millis(100), t.flush()).await;
    assert!(cut.is_err(), "the flush was cut short");
    proxy.set_delay(Duration::ZERO);
    flush_until_ok(&t).await;
    assert_eq!(api_requests(&t, "acme").await, Some(15));
    let s = t.stats();
    assert_eq!((s.flushed, s.pending, s.dropped), (15, 0, 0));
}

/// The keys of a standalone server (tests only).
fn keys(server: &RedisServer) -> Vec<String> {
    match server.command(&["KEYS", "*"]).expect("KEYS") {
        tollgate_testkit::Reply::Array(keys) => keys
            .iter()
            .filter_map(|k| k.as_str().map(str::to_owned))
            .collect(),
        other => panic!("KEYS answered {other:?}"),
    }
}

/// A daily tracker whose yesterday is kept until `margin` from now, and
/// the time of yesterday's last millisecond.
fn expiring_yesterday(h: &RedisHandle, margin: Duration) -> (UsageTracker, i64) {
    let now = now_ms();
    let today = PeriodKind::daily().period_at(now);
    let margin = i64::try_from(margin.as_millis()).expect("small");
    let keep = u64::try_from(now - today.start_ms + margin).expect("positive");
    let t = UsageTracker::redis(
        h.clone(),
        manual()
            .period(PeriodKind::daily())
            .retention(Duration::from_millis(keep)),
    );
    (t, today.start_ms - 1)
}

/// Waits until the Unix second holding `expire_at_ms` (an absolute expiry,
/// kept in whole seconds) is past.
async fn wait_past(expire_at_ms: i64) {
    wait_until("the retention runs out", || {
        now_ms() / 1000 > expire_at_ms / 1000
    })
    .await;
}

/// Units buffered while Redis was down for longer than their period's
/// retention would be written with an expiry in the past (Redis deletes
/// the key at once): they are counted as dropped and not written.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn units_buffered_past_their_retention_are_dropped_not_written() {
    let mut server = RedisServer::start();
    let h = handle(server.url()).await;
    let margin = Duration::from_secs(5);
    let (t, yesterday) = expiring_yesterday(&h, margin);
    let expires = now_ms() + i64::try_from(margin.as_millis()).expect("small");
    let label = PeriodKind::daily().period_at(yesterday).label;
    assert_eq!(t.record_at("acme", "api_request", 5, yesterday), 5);
    t.record("acme", "api_request", 2);
    server.kill();
    wait_until("the breaker opens", || !h.is_available()).await;
    assert!(t.flush().await.is_err(), "Redis is down");
    wait_past(expires).await;
    server.restart();
    wait_until("the breaker closes", || h.is_available()).await;
    flush_until_ok(&t).await;
    let s = t.stats();
    assert_eq!((s.flushed, s.dropped, s.pending), (2, 5, 0));
    let written: Vec<String> = keys(&server)
        .into_iter()
        .filter(|k| k.contains(&label))
        .collect();
    assert!(written.is_empty(), "written for {label}: {written:?}");
    assert_eq!(api_requests(&t, "acme").await, Some(2));
}

/// The same for a batch sent before the outage whose answer was lost: its
/// retry would write the expired period again. Redis, paused, applies the
/// first attempt only when it resumes, past the expiry: nothing of it is
/// kept, and it is counted as dropped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_batch_retried_past_its_retention_is_dropped() {
    let mut server = RedisServer::start();
    let h = through(server.url(), Duration::from_millis(300), 100).await;
    let margin = Duration::from_secs(5);
    let (t, yesterday) = expiring_yesterday(&h, margin);
    let expires = now_ms() + i64::try_from(margin.as_millis()).expect("small");
    t.record("acme", "api_request", 1);
    t.flush().await.expect("warm up (loads scripts)");
    assert_eq!(t.record_at("acme", "api_request", 5, yesterday), 5);
    t.record("acme", "api_request", 2);
    server.pause();
    assert!(t.flush().await.is_err(), "the answer is lost");
    assert_eq!(t.stats().pending, 7);
    wait_past(expires).await;
    server.resume();
    wait_until("the breaker closes", || h.is_available()).await;
    flush_until_ok(&t).await;
    let s = t.stats();
    assert_eq!((s.flushed, s.dropped, s.pending), (3, 5, 0));
    assert_eq!(api_requests(&t, "acme").await, Some(3));
}

/// An old (but kept) time recorded for an import does not become the
/// tracker's current period: the next flush keeps the current period's
/// counters, so the estimate goes on from the store's total.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_old_time_does_not_replace_the_current_period() {
    let t = UsageTracker::in_memory(manual());
    let now = t.current_period();
    t.record("acme", "api_request", 5);
    // Last month, say: within the retention, counted in its own period.
    t.record_at("acme", "api_request", 1, now_ms() - 40 * 86_400_000);
    t.flush().await.expect("flush");
    assert_eq!(t.record("acme", "api_request", 1), 6);
    // A time in a later period does not either.
    t.record_at("acme", "api_request", 1, now.end_ms + 1);
    t.flush().await.expect("flush");
    assert_eq!(t.record("acme", "api_request", 1), 7);
    assert_eq!(t.current_period(), now);
}

/// A synchronous write on its way when shutdown starts, whose answer is
/// then lost, is waited for: shutdown retries it under its id, so it is
/// counted once, as flushed, in what shutdown returns (it was applied).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_on_its_way_at_shutdown_is_accounted_by_shutdown() {
    let (server, proxy, h) = proxied(Duration::from_secs(1), 100).await;
    let t = UsageTracker::redis(h.clone(), manual());
    t.record_now("acme", "api_request", 1)
        .await
        .expect("warm up (loads scripts)");
    let key = acme_key(&h, &t);
    // Answers now take 3 s: longer than the deadline.
    proxy.set_delay(Duration::from_secs(3));
    let write = tokio::spawn({
        let t = t.clone();
        async move { t.record_now("acme", "api_request", 5).await }
    });
    wait_for_requests("the write is applied", &server, &key, 6).await;
    // Its answer is still on its way, held for 3 s: the proxy takes the
    // delay when it reads the answer, so it is given time to read it
    // before the delay goes (within the write's 1 s deadline).
    tokio::time::sleep(Duration::from_millis(400)).await;
    proxy.set_delay(Duration::ZERO);
    let s = t.shutdown().await;
    assert_eq!((s.flushed, s.dropped, s.pending), (6, 0, 0));
    assert!(
        write.await.expect("write task").is_err(),
        "its answer was lost"
    );
    let after = t.stats();
    assert_eq!((after.flushed, after.dropped, after.pending), (6, 0, 0));
    assert_eq!(hget(&server, &key, "api_request"), Some(6));
}

/// Refused requests' checks whose answers were lost in a latency spike
/// (the breaker stays closed) are withdrawn together, in one round trip:
/// every withdrawal reaches Redis in one flush, even when that flush's
/// answer is lost too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lost_checks_are_settled_in_one_round_trip() {
    let (server, proxy, h) = proxied(Duration::from_millis(200), 100).await;
    let t = UsageTracker::redis(h.clone(), manual());
    let svc = hard_app(t.clone(), true);
    let res = svc.clone().oneshot(req("acme")).await.expect("infallible");
    assert_eq!(res.status(), StatusCode::OK);
    // Loaded before the spike: a withdrawal's first attempt meets it.
    server
        .command(&[
            "SCRIPT",
            "LOAD",
            include_str!("../src/store/quota_withdraw.lua"),
        ])
        .expect("SCRIPT LOAD");
    proxy.set_delay(Duration::from_millis(500));
    for _ in 0..5 {
        let res = svc.clone().oneshot(req("acme")).await.expect("infallible");
        assert_eq!(res.status(), StatusCode::SERVICE_UNAVAILABLE);
    }
    let key = acme_key(&h, &t);
    wait_for_requests("the lost checks run in Redis", &server, &key, 6).await;
    assert!(t.flush().await.is_err(), "the answer is lost");
    wait_for_requests("all five withdrawals run in Redis", &server, &key, 1).await;
    proxy.set_delay(Duration::ZERO);
    flush_until_ok(&t).await;
    assert_eq!(hget(&server, &key, "api_request"), Some(1));
    let s = t.stats();
    assert_eq!((s.pending, s.dropped), (0, 0));
}

/// Lost checks wait in a bounded queue: beyond the bound the units of
/// served requests (failing open) and of refused ones (failing closed) are
/// counted as dropped, never silently lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lost_checks_beyond_the_bound_are_counted_as_dropped() {
    let (server, proxy, h) = proxied(Duration::from_millis(200), 100).await;
    let t = UsageTracker::redis(h.clone(), manual().max_unsettled(4));
    let open = hard_app(t.clone(), false);
    let closed = hard_app(t.clone(), true);
    let res = open.clone().oneshot(req("acme")).await.expect("infallible");
    assert_eq!(res.status(), StatusCode::OK);
    proxy.set_delay(Duration::from_millis(500));
    for _ in 0..3 {
        let res = open.clone().oneshot(req("acme")).await.expect("infallible");
        assert_eq!(res.status(), StatusCode::OK, "served: failing open");
    }
    for _ in 0..3 {
        let res = closed
            .clone()
            .oneshot(req("acme"))
            .await
            .expect("infallible");
        assert_eq!(res.status(), StatusCode::SERVICE_UNAVAILABLE);
    }
    // Three replays and one withdrawal are kept; two withdrawals are not.
    let s = t.stats();
    assert_eq!((s.pending, s.dropped), (3, 2));
    let key = acme_key(&h, &t);
    wait_for_requests("the lost checks run in Redis", &server, &key, 7).await;
    proxy.set_delay(Duration::ZERO);
    flush_until_ok(&t).await;
    // The kept withdrawal undid its check; the two dropped did not.
    assert_eq!(hget(&server, &key, "api_request"), Some(6));
    let s = t.stats();
    assert_eq!((s.flushed, s.pending, s.dropped), (3, 0, 2));
}

/// Synchronous writes whose answer was lost wait in a bounded queue too:
/// beyond the bound their units are counted as dropped. The kept ones are
/// retried under their ids and count once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lost_synchronous_writes_beyond_the_bound_are_counted_as_dropped() {
    let (server, proxy, h) = proxied(Duration::from_millis(200), 100).await;
    let t = UsageTracker::redis(h.clone(), manual().mode(WriteMode::Sync).max_unsettled(2));
    assert_eq!(t.record_now("acme", "api_request", 1).await.ok(), Some(1));
    proxy.set_delay(Duration::from_millis(500));
    for _ in 0..4 {
        assert!(
            t.record_now("acme", "api_request", 10).await.is_err(),
            "the answer is lost"
        );
    }
    // Two writes are kept for a retry, two are not.
    let s = t.stats();
    assert_eq!((s.pending, s.dropped), (20, 20));
    let key = acme_key(&h, &t);
    wait_for_requests("the lost writes run in Redis", &server, &key, 41).await;
    proxy.set_delay(Duration::ZERO);
    flush_until_ok(&t).await;
    // The retries were applied already: nothing counts twice.
    assert_eq!(hget(&server, &key, "api_request"), Some(41));
    let s = t.stats();
    assert_eq!((s.flushed, s.pending, s.dropped), (21, 0, 20));
    // Below the bound again, a lost write is kept.
    proxy.set_delay(Duration::from_millis(500));
    assert!(t.record_now("acme", "api_request", 1).await.is_err());
    assert_eq!((t.stats().pending, t.stats().dropped), (1, 20));
}

/// A caller that stops waiting for a synchronous write (a timeout around
/// it, a client gone) leaves the write to the flusher: retried under its
/// id, it counts once. A quota check stopped the same way is withdrawn:
/// its request was not served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_whose_caller_stops_waiting_are_settled() {
    let (server, proxy, h) = proxied(Duration::from_secs(5), 100).await;
    let t = UsageTracker::redis(h.clone(), manual().mode(WriteMode::Sync));
    assert_eq!(t.record_now("acme", "api_request", 1).await.ok(), Some(1));
    assert_eq!(
        t.try_consume("acme", "checks", 1, 100).await,
        QuotaOutcome::Allowed { total: 1 }
    );
    proxy.set_delay(Duration::from_millis(400));
    let cut = Duration::from_millis(50);
    let write = tokio::time::timeout(cut, t.record_now("acme", "api_request", 10)).await;
    assert!(write.is_err(), "the caller stopped waiting");
    let check = tokio::time::timeout(cut, t.try_consume("acme", "checks", 1, 100)).await;
    assert!(check.is_err(), "the caller stopped waiting");
    assert_eq!(t.stats().pending, 10, "the write awaits its retry");
    let key = acme_key(&h, &t);
    wait_for_requests("the write runs in Redis", &server, &key, 11).await;
    proxy.set_delay(Duration::ZERO);
    flush_until_ok(&t).await;
    assert_eq!(hget(&server, &key, "api_request"), Some(11), "counted once");
    assert_eq!(hget(&server, &key, "checks"), Some(1), "withdrawn");
    let s = t.stats();
    assert_eq!((s.pending, s.dropped), (0, 0));
}

/// The same on a cluster: the withdrawals of tenants on every primary go
/// out in one pipeline, each routed to its own primary. The checks ran or
/// not (the primaries were frozen); either way they end up withdrawn.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lost_checks_are_settled_across_cluster_nodes() {
    let mut cluster = RedisCluster::start();
    let h = through(cluster.url(), Duration::from_millis(300), 100).await;
    let t = UsageTracker::redis(h.clone(), manual());
    let store = RedisStore::new(h.clone());
    let tenants = ["acme", "globex", "initech", "umbrella", "hooli", "stark"];
    let mut thirds: Vec<u16> = tenants
        .iter()
        .map(|t| tollgate_redis::slot(&store.usage_key(t, "p")) / 5462)
        .collect();
    thirds.sort_unstable();
    thirds.dedup();
    assert_eq!(thirds.len(), 3, "the tenants live on every primary");
    let svc = hard_app(t.clone(), true);
    for tenant in tenants {
        let res = svc.clone().oneshot(req(tenant)).await.expect("infallible");
        assert_eq!(res.status(), StatusCode::OK);
    }
    for node in cluster.nodes() {
        node.command(&[
            "SCRIPT",
            "LOAD",
            include_str!("../src/store/quota_withdraw.lua"),
        ])
        .expect("SCRIPT LOAD");
    }
    for i in 0..3 {
        cluster.node_mut(i).pause();
    }
    for tenant in tenants {
        let res = svc.clone().oneshot(req(tenant)).await.expect("infallible");
        assert_eq!(res.status(), StatusCode::SERVICE_UNAVAILABLE);
    }
    for i in 0..3 {
        cluster.node_mut(i).resume();
    }
    flush_until_ok(&t).await;
    for tenant in tenants {
        assert_eq!(api_requests(&t, tenant).await, Some(1), "{tenant}");
    }
    let s = t.stats();
    assert_eq!((s.pending, s.dropped), (0, 0));
}

/// With `wait_for_replicas(1)` a flush counts as written once the replica
/// has it: while the replica is frozen a flush is applied on the primary
/// but not confirmed, and is retried under its id (counted once) once the
/// replica answers. A primary killed after a confirmed flush loses none of
/// it: the promoted replica has every count.
async fn flushes_that_wait_for_a_replica_survive_a_failover(redis: &mut impl Replicated) {
    let h = tollgate_testkit::connect_with_deadline(redis.url(), Duration::from_millis(400)).await;
    let t = UsageTracker::redis(h.clone(), manual().wait_for_replicas(1));
    let key = acme_key(&h, &t);
    t.record("acme", "api_request", 5);
    t.flush().await.expect("the replica answers");
    let replica = redis.replica_of(&key);
    assert_eq!(hget(redis.node(replica), &key, "api_request"), Some(5));

    redis.node_mut(replica).pause();
    t.record("acme", "api_request", 10);
    assert!(t.flush().await.is_err(), "not on the replica: unconfirmed");
    let primary = redis.primary_of(&key);
    assert_eq!(
        hget(redis.node(primary), &key, "api_request"),
        Some(15),
        "on the primary"
    );
    assert_eq!(t.stats().flushed, 5);
    redis.node_mut(replica).resume();
    flush_until_ok(&t).await;
    assert_eq!(
        hget(redis.node(primary), &key, "api_request"),
        Some(15),
        "counted once"
    );
    let stats = t.stats();
    assert_eq!((stats.flushed, stats.pending, stats.dropped), (15, 0, 0));

    t.record("acme", "api_request", 100);
    t.flush().await.expect("flushed");
    let new = tokio::task::block_in_place(|| redis.fail_over_primary_of(&key));
    assert_eq!(hget(redis.node(new), &key, "api_request"), Some(115));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn behind_a_sentinel_flushes_that_wait_for_a_replica_survive_a_failover() {
    let mut sentinel = tollgate_testkit::RedisSentinel::start();
    flushes_that_wait_for_a_replica_survive_a_failover(&mut sentinel).await;
}

/// On a cluster each primary written to is asked for its replicas: a
/// flush to tenants on every shard is unconfirmed while any one shard's
/// replica is frozen.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_a_cluster_flushes_that_wait_for_a_replica_survive_a_failover() {
    let mut cluster = RedisCluster::start_with_replicas();
    let url = cluster.url();
    {
        let h =
            tollgate_testkit::connect_with_deadline(url.clone(), Duration::from_millis(400)).await;
        let t = UsageTracker::redis(h.clone(), manual().wait_for_replicas(1));
        let store = RedisStore::new(h.clone());
        let period = t.current_period().label;
        // A tenant on each primary.
        let mut tenants: Vec<Option<String>> = vec![None; 3];
        for n in 0.. {
            let tenant = format!("t{n}");
            let primary = cluster.primary_for_key(&store.usage_key(&tenant, &period));
            tenants[primary].get_or_insert(tenant);
            if tenants.iter().all(Option::is_some) {
                break;
            }
        }
        let tenants: Vec<String> = tenants.into_iter().flatten().collect();
        for shard in 0..3 {
            let replica = cluster.partner(shard);
            cluster.node_mut(replica).pause();
            for tenant in &tenants {
                t.record(tenant, "api_request", 1);
            }
            assert!(
                t.flush().await.is_err(),
                "unconfirmed while shard {shard}'s replica is frozen"
            );
            cluster.node_mut(replica).resume();
            flush_until_ok(&t).await;
        }
        for (shard, tenant) in tenants.iter().enumerate() {
            let key = store.usage_key(tenant, &period);
            let replica = cluster.nodes()[cluster.partner(shard)].read_command(&[
                "HGET",
                &key,
                "api_request",
            ]);
            assert_eq!(
                replica.ok().and_then(|r| r.as_int()),
                Some(3),
                "{tenant} on its replica"
            );
        }
    }
    flushes_that_wait_for_a_replica_survive_a_failover(&mut cluster).await;
}
