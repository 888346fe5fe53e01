//! In-process cost of each variant's layers: the same routers as the load
//! harness, called directly (no socket, no wrk), one request at a time.
//! Prints nanoseconds and heap allocations per request, and both relative
//! to `bare`. Useful for the variants that never wait (fallback, lease,
//! usage, L1 hits), where the network harness's figures are dominated by
//! the kernel; a variant that waits for Redis measures a full round trip
//! per request here, not its batched cost.
//!
//! Run with: `cargo run -p tollgate-benches --release --bin tollgate-bench-micro -- bare,ratelimit-fallback`
//! (`--requests N` per variant, default 200,000, split over `--rounds N`,
//! default 20, each round running `bare` between every two variants;
//! `--tasks N` to run N request loops at once, contending as the workers
//! of a server do; `--redis-url URL` for Redis variants). The allocation counter is itself a shared atomic: for
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

const USAGE: &str = "usage: tollgate-bench-micro [--requests N] [--rounds N] [--tasks N] [--redis-url URL] VARIANT[,VARIANT...]";

fn main() -> std::process::ExitCode {
    tollgate_benches::exit_code(run(std::env::args().skip(1)))
}

fn run(args: impl IntoIterator<Item = String>) -> anyhow::Result<()> {
    let mut requests: u64 = 200_000;
    let mut rounds: u64 = 20;
    let mut tasks: u64 = 1;
    let mut redis_url = tollgate_benches::default_redis_url();
    let mut names = Vec::new();
    let mut args = args.into_iter();
    while let Some(a) = args.next() {
        match a.as_str() {
            "--requests" => requests = number(&mut args, "--requests")?,
            "--rounds" => rounds = number(&mut args, "--rounds")?.max(1),
            "--tasks" => tasks = number(&mut args, "--tasks")?.max(1),
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
        .block_on(measure_all(&names, requests, rounds, tasks, &redis_url))
}

/// The value after `flag`, a count (`_` and `,` allowed as separators).
fn number(args: &mut impl Iterator<Item = String>, flag: &str) -> anyhow::Result<u64> {
    args.next()
        .with_context(|| format!("{flag} needs a value"))?
        .replace(['_', ','], "")
        .parse()
        .with_context(|| flag.to_owned())
}

async fn measure_all(
    names: &[String],
    requests: u64,
    rounds: u64,
    tasks: u64,
    redis_url: &str,
) -> anyhow::Result<()> {
    // Every router is built and warmed up first (caches filled, lazily
    // built state built); then each round runs `bare` between every two
    // variants (bare A bare B bare …), `requests / rounds` requests each.
    // A variant's cost is its run minus the mean of the `bare` runs right
    // before and after it, and the median of those over the rounds is
    // printed: a host whose speed drifts (shared hosts do, by tens of per
    // cent over seconds) shifts both sides of each difference alike.
    let mut apps = Vec::new();
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
        once(&app, requests / 10 + 1).await?;
        apps.push((name, app));
    }
    let per_run = (requests / rounds).max(1);
    let mut runs: Vec<Vec<Run>> = vec![Vec::new(); apps.len()];
    for _ in 0..rounds {
        let bare_before = measure(&apps[0].1, per_run, tasks).await?;
        runs[0].push(bare_before);
        let mut before = bare_before;
        for (i, (_, app)) in apps.iter().enumerate().skip(1) {
            let run = measure(app, per_run, tasks).await?;
            let after = measure(&apps[0].1, per_run, tasks).await?;
            runs[0].push(after);
            runs[i].push(Run {
                ns: run.ns - (before.ns + after.ns) / 2.0,
                allocs: run.allocs - (before.allocs + after.allocs) / 2.0,
            });
            before = after;
        }
    }
    println!(
        "{rounds} rounds of {per_run} requests per variant; medians\n\
         | variant | ns/req | Δ ns vs bare (range) | allocs/req | Δ allocs |\n\
         | --- | ---: | ---: | ---: | ---: |"
    );
    let bare_ns = median(runs[0].iter().map(|r| r.ns));
    let bare_allocs = median(runs[0].iter().map(|r| r.allocs));
    for (i, (name, _)) in apps.iter().enumerate() {
        if i == 0 {
            println!("| {name} | {bare_ns:.0} | +0 | {bare_allocs:.1} | +0.0 |");
            continue;
        }
        let d = median(runs[i].iter().map(|r| r.ns));
        let lo = runs[i].iter().map(|r| r.ns).fold(f64::MAX, f64::min);
        let hi = runs[i].iter().map(|r| r.ns).fold(f64::MIN, f64::max);
        let a = median(runs[i].iter().map(|r| r.allocs));
        println!(
            "| {name} | {:.0} | {d:+.0} ({lo:+.0} to {hi:+.0}) | {:.1} | {a:+.1} |",
            bare_ns + d,
            bare_allocs + a
        );
    }
    Ok(())
}

/// Nanoseconds and allocations per request of one run.
#[derive(Clone, Copy)]
struct Run {
    ns: f64,
    allocs: f64,
}

async fn measure(app: &axum::Router, requests: u64, tasks: u64) -> anyhow::Result<Run> {
    let allocs = allocations();
    let started = Instant::now();
    if tasks == 1 {
        once(app, requests).await?;
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
    Ok(Run {
        ns: busy / requests as f64,
        allocs: (allocations() - allocs) as f64 / requests as f64,
    })
}

fn median(values: impl Iterator<Item = f64>) -> f64 {
    let mut v: Vec<f64> = values.collect();
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
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
