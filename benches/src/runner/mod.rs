//! The load-harness runner: starts each variant's server, drives it with
//! `wrk`, measures CPU and Redis work, and reports medians over rounds.
//!
//! Rounds interleave the variants (A B C, A B C, ...) so that a slow drift
//! of the machine (thermal, another job) spreads over all of them instead
//! of landing on one.

mod args;
mod process;
mod redis_stats;
mod report;
mod wrk;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::Context as _;

pub use args::{RunnerArgs, USAGE};
pub use report::Sample;

use crate::variants::{self, VariantSpec};
use process::{ServerProcess, children_cpu_seconds, clock_ticks_per_second, machine_busy_ticks};
use redis_stats::RedisStats;

/// Parses `args` (without the program name), runs the benchmark, prints
/// the table and writes it to the results file.
pub fn main_with_args(args: impl IntoIterator<Item = String>) -> anyhow::Result<()> {
    let Some(args) = RunnerArgs::parse(args)? else {
        return Ok(());
    };
    run(args)
}

/// Runs the benchmark described by `args`.
pub fn run(args: RunnerArgs) -> anyhow::Result<()> {
    if cfg!(debug_assertions) {
        eprintln!(
            "warning: this is a debug build; the numbers mean nothing. \
             Run with `cargo run -p tollgate-benches --release`."
        );
    }
    let wrk_version = wrk::version()?;
    // The servers are this very executable (`tollgate-bench serve ...`), so
    // they can never be older than the runner: `cargo run` builds only the
    // binary it runs.
    let exe = std::env::current_exe().context("locating the runner's own executable")?;
    let ticks = clock_ticks_per_second();

    let mut redis = None;
    let mut redis_note = None;
    let mut selected: Vec<&'static VariantSpec> = Vec::new();
    let wants_redis = args.variants.iter().any(|v| v.needs_redis);
    if wants_redis {
        match RedisStats::connect(&args.redis_url) {
            Ok(stats) => redis = Some(stats),
            Err(e) => {
                let note = format!(
                    "Redis at {} does not answer ({e:#}): skipping {}",
                    redis_stats::redact(&args.redis_url),
                    args.variants
                        .iter()
                        .filter(|v| v.needs_redis)
                        .map(|v| v.name)
                        .collect::<Vec<_>>()
                        .join(", ")
                );
                println!("note: {note}");
                redis_note = Some(note);
            }
        }
    }
    for v in &args.variants {
        if !v.needs_redis || redis.is_some() {
            selected.push(v);
        }
    }
    if !selected.iter().any(|v| v.name == "bare") {
        let bare = variants::find("bare").context("the bare variant is missing from VARIANTS")?;
        println!("note: adding `bare`: every ratio is relative to it");
        selected.insert(0, bare);
    }

    let settings = report::Settings {
        rounds: args.rounds,
        duration: args.duration,
        connections: args.connections,
        threads: args.threads,
        wrk_version,
        cpus: cpus() as usize,
        redis: redis.as_ref().map(|r| r.describe()),
        redis_note,
    };
    println!("{}", settings.header());

    // Each round runs `bare` between every two variants (bare A bare B
    // bare …): a variant's ratio is taken against the `bare` runs right
    // before and after it, so a machine whose speed drifts over a round
    // (shared hosts do) does not skew the variants run late in it.
    let bare = selected
        .iter()
        .copied()
        .find(|v| v.name == "bare")
        .context("the bare variant is missing")?;
    let others: Vec<&VariantSpec> = selected
        .iter()
        .copied()
        .filter(|v| v.name != "bare")
        .collect();
    let mut order: Vec<&VariantSpec> = vec![bare];
    for v in &others {
        order.push(v);
        order.push(bare);
    }
    let mut samples: Vec<Sample> = Vec::new();
    for round in 1..=args.rounds {
        for variant in &order {
            let mut best: Option<Sample> = None;
            for attempt in 0..=args.retries {
                if attempt > 0 {
                    println!(
                        "  other processes used the CPU during that run; retrying in 5 s \
                         ({attempt}/{})",
                        args.retries
                    );
                    std::thread::sleep(Duration::from_secs(5));
                }
                let redis = if variant.needs_redis {
                    redis.as_mut()
                } else {
                    None
                };
                let mut sample = run_one(&exe, &args, variant, round, redis, ticks)
                    .with_context(|| format!("round {round}, variant {}", variant.name))?;
                sample.seq = samples.len();
                println!("{}", sample.progress_line(args.rounds));
                let disturbed = sample.other_cpu_pct > report::DISTURBED_PCT;
                if best
                    .as_ref()
                    .is_none_or(|b| sample.other_cpu_pct < b.other_cpu_pct)
                {
                    best = Some(sample);
                }
                if !disturbed {
                    break;
                }
            }
            let sample = best.context("no attempt was made")?;
            samples.push(sample);
        }
    }

    let table = report::render(&settings, &selected, &samples);
    println!("\n{table}");
    let out = match &args.out {
        Some(p) => p.clone(),
        None => default_results_path(&exe),
    };
    std::fs::write(&out, &table).with_context(|| format!("writing {}", out.display()))?;
    println!("written to {}", out.display());
    Ok(())
}

/// One measured run: start, wait, warm up, measure, stop.
fn run_one(
    exe: &Path,
    args: &RunnerArgs,
    variant: &VariantSpec,
    round: usize,
    mut redis: Option<&mut RedisStats>,
    ticks: f64,
) -> anyhow::Result<Sample> {
    let server = ServerProcess::start(exe, variant.name, &args.redis_url)?;
    let url = format!("http://{}/api/ping", server.addr());
    server.wait_until_ready(Duration::from_secs(10))?;
    if !args.warmup.is_zero() {
        wrk::run(&url, args.threads, args.connections, args.warmup).context("warm-up")?;
    }

    let cpu_before = server.cpu_ticks()?;
    let redis_before = redis.as_deref_mut().map(RedisStats::snapshot).transpose()?;
    let machine_before = machine_busy_ticks()?;
    let wrk_before = children_cpu_seconds()?;
    let started = Instant::now();
    let out = wrk::run(&url, args.threads, args.connections, args.duration)?;
    let wall = started.elapsed().as_secs_f64();
    let wrk_cpu = children_cpu_seconds()? - wrk_before;
    let machine = (machine_busy_ticks()?.saturating_sub(machine_before)) as f64 / ticks;
    let cpu_after = server.cpu_ticks()?;
    let redis_after = redis.map(RedisStats::snapshot).transpose()?;
    server.stop()?;

    let requests = out.requests.max(1) as f64;
    let app_cpu = (cpu_after.saturating_sub(cpu_before)) as f64 / ticks;
    let (redis_cpu, redis_cmds) = match (redis_before, redis_after) {
        (Some(b), Some(a)) => {
            let (cpu, cmds) = a.since(&b);
            (Some(cpu), Some(cmds))
        }
        _ => (None, None),
    };
    // Whatever the machine did besides wrk, the server and Redis: a build
    // or a test run next to the benchmark steals exactly this much.
    let other = machine - wrk_cpu - app_cpu - redis_cpu.unwrap_or(0.0);
    let other_cpu_pct = (other / (wall * cpus()) * 100.0).max(0.0);
    Ok(Sample {
        variant: variant.name,
        round,
        rps: out.requests_per_sec,
        requests: out.requests,
        p50_ms: out.p50_ms,
        p99_ms: out.p99_ms,
        app_cpu_us: app_cpu * 1e6 / requests,
        redis_cpu_us: redis_cpu.map(|c| c * 1e6 / requests),
        redis_cmds: redis_cmds.map(|c| c / requests),
        other_cpu_pct,
        non_2xx: out.non_2xx,
        socket_errors: out.socket_errors,
        seq: 0,
    })
}

fn cpus() -> f64 {
    std::thread::available_parallelism().map_or(1, |n| n.get()) as f64
}

/// `target/bench-results.md`: the runner lives in `target/release/`.
fn default_results_path(exe: &Path) -> PathBuf {
    exe.parent()
        .and_then(Path::parent)
        .map_or_else(|| PathBuf::from("bench-results.md"), Path::to_path_buf)
        .join("bench-results.md")
}
