//! The response cache's hit rate on a Zipf-distributed key workload: a few
//! keys are very popular, most are rarely asked for, as with real URLs.
//!
//! `cargo run -p tollgate-benches --release -- zipf [options]` builds an
//! axum router with `GET /api/items/{id}` behind `ResponseCacheLayer`
//! (Redis at `--redis-url`, with or without the in-process L1), sends
//! `--requests` requests in process (64 at a time) for ids drawn from
//! Zipf(`--keys`, `--exponent`), and counts what `X-Cache` said. Each run
//! uses a fresh key namespace, so the cache starts cold: the first request
//! for each id is a miss by necessity, and the report says how close the
//! hit rate came to that ceiling.

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use axum::Router;
use axum::extract::Path;
use axum::routing::get;
use futures::StreamExt as _;
use rand::SeedableRng as _;
use rand_distr::Distribution as _;
use tollgate::cache::{Cache, ResponseCacheLayer, RouteRule};
use tollgate_redis::{RedisConfig, RedisHandle};
use tower::ServiceExt as _;

/// Usage of `zipf`.
pub const USAGE: &str = "\
usage: cargo run -p tollgate-benches --release -- zipf [options]

  --keys N         distinct ids (default 10000)
  --requests N     requests sent (default 200000)
  --exponent S     Zipf exponent (default 1.0)
  --concurrency N  requests in flight (default 64)
  --l1             add the in-process L1 (1 s, 16 MiB)
  --redis-url URL  Redis (default $REDIS_URL, else redis://127.0.0.1:6379)";

/// What to run.
#[derive(Clone, Debug)]
pub struct ZipfArgs {
    /// Distinct ids.
    pub keys: u64,
    /// Requests sent.
    pub requests: u64,
    /// Zipf exponent.
    pub exponent: f64,
    /// Requests in flight.
    pub concurrency: usize,
    /// With the in-process L1.
    pub l1: bool,
    /// Redis.
    pub redis_url: String,
}

impl ZipfArgs {
    /// Parses the arguments after `zipf`; `Ok(None)` after `--help`.
    pub fn parse(args: impl IntoIterator<Item = String>) -> anyhow::Result<Option<Self>> {
        let mut a = ZipfArgs {
            keys: 10_000,
            requests: 200_000,
            exponent: 1.0,
            concurrency: 64,
            l1: false,
            redis_url: crate::default_redis_url(),
        };
        let mut args = args.into_iter();
        while let Some(flag) = args.next() {
            let mut value = || {
                args.next()
                    .with_context(|| format!("{flag} needs a value\n{USAGE}"))
            };
            match flag.as_str() {
                "--keys" => a.keys = value()?.parse().context("--keys")?,
                "--requests" => a.requests = value()?.parse().context("--requests")?,
                "--exponent" => a.exponent = value()?.parse().context("--exponent")?,
                "--concurrency" => a.concurrency = value()?.parse().context("--concurrency")?,
                "--l1" => a.l1 = true,
                "--redis-url" => a.redis_url = value()?,
                "-h" | "--help" => {
                    println!("{USAGE}");
                    return Ok(None);
                }
                other => bail!("unknown argument {other:?}\n{USAGE}"),
            }
        }
        if a.keys == 0 || a.requests == 0 || a.concurrency == 0 || a.exponent <= 0.0 {
            bail!("--keys, --requests, --concurrency and --exponent must be positive\n{USAGE}");
        }
        Ok(Some(a))
    }
}

/// What a run found.
#[derive(Clone, Debug)]
pub struct ZipfReport {
    /// Requests answered from the cache (`X-Cache: HIT`).
    pub hits: u64,
    /// Requests that went to the origin.
    pub misses: u64,
    /// Anything else (`BYPASS`, `STALE`, errors).
    pub other: u64,
    /// Distinct ids asked for: the misses a perfect cache cannot avoid.
    pub distinct: u64,
    /// Origin calls.
    pub origin_calls: u64,
    /// Wall time.
    pub elapsed: Duration,
}

impl ZipfReport {
    /// Hits ÷ requests.
    pub fn hit_rate(&self) -> f64 {
        self.hits as f64 / (self.hits + self.misses + self.other).max(1) as f64
    }

    /// The best any cache can do on the same requests: every id misses
    /// once.
    pub fn ceiling(&self) -> f64 {
        let n = self.hits + self.misses + self.other;
        (n - self.distinct.min(n)) as f64 / n.max(1) as f64
    }
}

/// Parses `args` and runs.
pub fn main_with_args(args: impl IntoIterator<Item = String>) -> anyhow::Result<()> {
    let Some(args) = ZipfArgs::parse(args)? else {
        return Ok(());
    };
    let r = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("building the tokio runtime")?
        .block_on(run(&args))?;
    println!(
        "zipf: {} keys, exponent {}, {} requests, {} in flight, {}",
        args.keys,
        args.exponent,
        args.requests,
        args.concurrency,
        if args.l1 { "Redis + L1" } else { "Redis" }
    );
    println!(
        "hits {}  misses {}  other {}  distinct ids {}  origin calls {}  ({:.1} s)",
        r.hits,
        r.misses,
        r.other,
        r.distinct,
        r.origin_calls,
        r.elapsed.as_secs_f64()
    );
    println!(
        "hit rate {:.1}% (ceiling with a cold cache {:.1}%)",
        100.0 * r.hit_rate(),
        100.0 * r.ceiling()
    );
    Ok(())
}

/// Runs the workload described by `args`.
pub async fn run(args: &ZipfArgs) -> anyhow::Result<ZipfReport> {
    // A fresh namespace: the cache starts cold and runs never share entries.
    let namespace = format!(
        "zipf{}",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or_default()
    );
    let redis = RedisHandle::connect(
        RedisConfig::from_url(&args.redis_url)
            .namespace(&namespace)
            .deadline(Duration::from_secs(1)),
    )
    .await
    .with_context(|| format!("connecting to Redis at {}", args.redis_url))?;
    if !redis.is_available() {
        bail!("Redis at {} does not answer", args.redis_url);
    }
    let mut cache = Cache::builder().redis(redis);
    if args.l1 {
        cache = cache.l1(Duration::from_secs(1), 16 << 20);
    }
    let origin_calls = Arc::new(AtomicU64::new(0));
    let calls = origin_calls.clone();
    let app = Router::new()
        .route(
            "/api/items/{id}",
            get(move |Path(id): Path<u64>| {
                calls.fetch_add(1, Ordering::Relaxed);
                async move { format!(r#"{{"id":{id},"name":"item {id}"}}"#) }
            }),
        )
        .layer(
            ResponseCacheLayer::builder(cache.build())
                .route(RouteRule::new("/api/items/{id}").ttl(Duration::from_secs(300)))
                .build()
                .context("cache layer")?,
        );

    let zipf = rand_distr::Zipf::new(args.keys as f64, args.exponent)
        .map_err(|e| anyhow::anyhow!("Zipf distribution: {e}"))?;
    let mut rng = rand::rngs::StdRng::seed_from_u64(42);
    let ids: Vec<u64> = (0..args.requests)
        .map(|_| zipf.sample(&mut rng) as u64)
        .collect();
    let distinct = ids.iter().collect::<HashSet<_>>().len() as u64;

    let started = Instant::now();
    let outcomes: Vec<Option<String>> = futures::stream::iter(ids)
        .map(|id| {
            let app = app.clone();
            async move {
                let req = axum::http::Request::get(format!("/api/items/{id}"))
                    .header("host", "localhost")
                    .body(axum::body::Body::empty())
                    .ok()?;
                let res = app.oneshot(req).await.ok()?;
                let x_cache = res
                    .headers()
                    .get("x-cache")
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_owned);
                // A response is stored once its body has been read whole,
                // as a client would.
                axum::body::to_bytes(res.into_body(), usize::MAX)
                    .await
                    .ok()?;
                x_cache
            }
        })
        .buffer_unordered(args.concurrency)
        .collect()
        .await;
    let elapsed = started.elapsed();
    let count = |what: &str| {
        outcomes
            .iter()
            .filter(|o| o.as_deref() == Some(what))
            .count() as u64
    };
    let (hits, misses) = (count("HIT"), count("MISS"));
    Ok(ZipfReport {
        hits,
        misses,
        other: outcomes.len() as u64 - hits - misses,
        distinct,
        origin_calls: origin_calls.load(Ordering::Relaxed),
        elapsed,
    })
}
