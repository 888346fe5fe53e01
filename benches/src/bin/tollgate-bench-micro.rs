//! In-process cost of each variant's layers: the same routers as the load
//! harness, called directly (no socket, no wrk), one request at a time.
//! Prints nanoseconds and heap allocations per request, and both relative
//! to `bare`. Useful for the variants that never wait (fallback, lease,
//! usage, L1 hits), where the network harness's figures are dominated by
//! the kernel; a variant that waits for Redis measures a full round trip
//! per request here, not its batched cost.
//!
//! Run with: `cargo run -p tollgate-benches --release --bin tollgate-bench-micro -- bare,ratelimit-fallback`
//! (`--requests N`, default 200,000; `--tasks N` to run N request loops at
//! once, contending as the workers of a server do; `--redis-url URL` for
//! Redis variants). The allocation counter is itself a shared atomic: for
//! `--tasks 2`, build with `--no-default-features` (no counting).

use std::net::SocketAddr;
use std::time::Instant;

use anyhow::{Context as _, bail};
use axum::body::Body;
use axum::extract::ConnectInfo;
use axum::http::{Request, header};
use http_body_util::BodyExt as _;
use tollgate_benches::variants::{self, Deps};

// The system allocator, counting allocations (all threads).
#[cfg(feature = "count-allocs")]
#[global_allocator]
static GLOBAL: &stats_alloc::StatsAlloc<std::alloc::System> = &stats_alloc::INSTRUMENTED_SYSTEM;

/// Allocations so far (all threads); 0 without the `count-allocs` feature.
fn allocations() -> u64 {
    #[cfg(feature = "count-allocs")]
    return GLOBAL.stats().allocations as u64;
    #[cfg(not(feature = "count-allocs"))]
    0
}

const USAGE: &str =
    "usage: tollgate-bench-micro [--requests N] [--redis-url URL] VARIANT[,VARIANT...]";

fn main() -> std::process::ExitCode {
    tollgate_benches::exit_code(run(std::env::args().skip(1)))
}

fn run(args: impl IntoIterator<Item = String>) -> anyhow::Result<()> {
    let mut requests: u64 = 200_000;
    let mut tasks: u64 = 1;
    let mut redis_url = tollgate_benches::default_redis_url();
    let mut names = Vec::new();
    let mut args = args.into_iter();
    while let Some(a) = args.next() {
        match a.as_str() {
            "--requests" => {
                requests = args
                    .next()
                    .context("--requests needs a value")?
                    .replace(['_', ','], "")
                    .parse()
                    .context("--requests")?;
            }
            "--tasks" => {
                tasks = args
                    .next()
                    .context("--tasks needs a value")?
                    .parse::<u64>()
                    .context("--tasks")?
                    .max(1);
            }
            "--redis-url" => redis_url = args.next().context("--redis-url needs a value")?,
            "-h" | "--help" => {
                println!("{USAGE}");
                return Ok(());
            }
            list => names.extend(list.split(',').map(str::to_owned)),
        }
    }
    if names.is_empty() {
        bail!("{USAGE}");
    }
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("building the tokio runtime")?
        .block_on(measure_all(&names, requests, tasks, &redis_url))
}

async fn measure_all(
    names: &[String],
    requests: u64,
    tasks: u64,
    redis_url: &str,
) -> anyhow::Result<()> {
    let mut base: Option<(f64, f64)> = None;
    println!(
        "| variant | ns/req | Δ ns vs bare | allocs/req | Δ allocs |\n| --- | ---: | ---: | ---: | ---: |"
    );
    for name in
        std::iter::once("bare").chain(names.iter().map(String::as_str).filter(|n| *n != "bare"))
    {
        let spec = variants::find(name).with_context(|| format!("unknown variant {name:?}"))?;
        let redis = if spec.needs_redis {
            Some(tollgate_benches::server::connect_redis(redis_url).await?)
        } else {
            None
        };
        // `with_state` turns every handler into its layered route once, as
        // serving does (`into_make_service*`); without it the router
        // would rebuild each route's layers on every request.
        let app = variants::build(name, &Deps::new(redis).with_url(redis_url.to_owned()))
            .await?
            .with_state(());
        // Warm up (caches filled, lazily built state built), then measure
        // three times and keep the fastest: the least disturbed.
        once(&app, requests / 10 + 1).await?;
        let allocs = allocations();
        let mut ns = f64::MAX;
        for _ in 0..3 {
            let started = Instant::now();
            if tasks == 1 {
                once(&app, requests).await?;
            } else {
                let all: Vec<_> = (0..tasks)
                    .map(|_| {
                        let app = app.clone();
                        tokio::spawn(async move { once(&app, requests / tasks).await })
                    })
                    .collect();
                for t in all {
                    t.await.context("task")??;
                }
            }
            // CPU time per request when the tasks keep every worker busy.
            let busy = started.elapsed().as_nanos() as f64 * tasks.min(workers()) as f64;
            ns = ns.min(busy / requests as f64);
        }
        let per = (allocations() - allocs) as f64 / (3 * requests) as f64;
        let (bns, ballocs) = *base.get_or_insert((ns, per));
        println!(
            "| {name} | {ns:.0} | {:+.0} | {per:.1} | {:+.1} |",
            ns - bns,
            per - ballocs
        );
    }
    Ok(())
}

/// Worker threads of the runtime (one per core).
fn workers() -> u64 {
    std::thread::available_parallelism().map_or(1, |n| n.get() as u64)
}

/// Serves `n` requests through `app`, one after the other, reading each body.
async fn once(app: &axum::Router, n: u64) -> anyhow::Result<()> {
    let peer: SocketAddr = "192.0.2.7:40000".parse().context("peer address")?;
    let mut svc = app.clone();
    for _ in 0..n {
        let mut req = Request::get("/api/ping")
            .header(header::HOST, "127.0.0.1:3000")
            .body(Body::empty())
            .context("request")?;
        req.extensions_mut().insert(ConnectInfo(peer));
        let res = tower::Service::<Request<Body>>::call(&mut svc, req).await?;
        if !res.status().is_success() {
            bail!("status {}", res.status());
        }
        let _ = res.into_body().collect().await?;
    }
    Ok(())
}
