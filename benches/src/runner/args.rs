//! The runner's command line.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context as _, bail, ensure};

use crate::variants::{self, VariantSpec};

/// Usage of the runner's command line.
pub const USAGE: &str = "\
usage: cargo run -p tollgate-benches --release -- [options]

  --rounds N          rounds; each runs every variant once, in order (default 3)
  --duration D        measured wrk run per variant and round: 10s, 1m (default 10s)
  --warmup D          wrk run before measuring, 0 to skip (default 1s)
  --connections N     wrk connections (default 64)
  --threads N         wrk threads (default 2)
  --variants A,B,...  variants to run, in this order (default: all; see --list)
  --retries N         re-run a run during which other processes used more than
                      5% of the CPU up to N times, keeping the quietest (default 2)
  --redis-url URL     Redis for the Redis variants (default $REDIS_URL,
                      else redis://127.0.0.1:6379)
  --out PATH          where to write the table (default target/bench-results.md)
  --list              list the variants and exit";

/// What to benchmark and how.
#[derive(Clone, Debug)]
pub struct RunnerArgs {
    /// Rounds; each round runs every variant once.
    pub rounds: usize,
    /// Length of each measured wrk run (whole seconds: wrk's resolution).
    pub duration: Duration,
    /// Length of the unmeasured wrk run before it.
    pub warmup: Duration,
    /// wrk `-c`.
    pub connections: u32,
    /// wrk `-t`.
    pub threads: u32,
    /// How many times a disturbed run is repeated.
    pub retries: u32,
    /// Variants, in run order.
    pub variants: Vec<&'static VariantSpec>,
    /// Redis for the variants that need it.
    pub redis_url: String,
    /// Results file; `None` for `target/bench-results.md`.
    pub out: Option<PathBuf>,
}

impl RunnerArgs {
    /// Parses the arguments after the program name. `Ok(None)` means the
    /// request was only informational (`--help`, `--list`) and was answered.
    pub fn parse(args: impl IntoIterator<Item = String>) -> anyhow::Result<Option<Self>> {
        let mut a = RunnerArgs {
            rounds: 3,
            duration: Duration::from_secs(10),
            warmup: Duration::from_secs(1),
            connections: 64,
            threads: 2,
            retries: 2,
            variants: variants::VARIANTS.iter().collect(),
            redis_url: crate::default_redis_url(),
            out: None,
        };
        let mut args = args.into_iter();
        while let Some(flag) = args.next() {
            let mut value = || {
                args.next()
                    .with_context(|| format!("{flag} needs a value\n\n{USAGE}"))
            };
            match flag.as_str() {
                "--rounds" => a.rounds = number(&flag, &value()?)?,
                "--duration" => a.duration = seconds(&flag, &value()?)?,
                "--warmup" => a.warmup = seconds(&flag, &value()?)?,
                "--connections" => a.connections = number(&flag, &value()?)?,
                "--threads" => a.threads = number(&flag, &value()?)?,
                "--retries" => a.retries = number(&flag, &value()?)?,
                "--variants" => a.variants = variant_list(&value()?)?,
                "--redis-url" => a.redis_url = value()?,
                "--out" => a.out = Some(PathBuf::from(value()?)),
                "--list" => {
                    for v in variants::VARIANTS {
                        let redis = if v.needs_redis { " [redis]" } else { "" };
                        println!("{:<16} {}{redis}", v.name, v.about);
                    }
                    return Ok(None);
                }
                "-h" | "--help" => {
                    println!("{USAGE}");
                    return Ok(None);
                }
                other => bail!("unknown argument {other:?}\n\n{USAGE}"),
            }
        }
        ensure!(a.rounds >= 1, "--rounds must be at least 1");
        ensure!(!a.duration.is_zero(), "--duration must be at least 1s");
        ensure!(a.threads >= 1, "--threads must be at least 1");
        ensure!(
            a.connections >= a.threads,
            "--connections ({}) must be at least --threads ({}): wrk gives each thread its own connections",
            a.connections,
            a.threads
        );
        Ok(Some(a))
    }
}

fn number<T: std::str::FromStr>(flag: &str, v: &str) -> anyhow::Result<T>
where
    T::Err: std::error::Error + Send + Sync + 'static,
{
    v.parse()
        .with_context(|| format!("{flag} {v:?}: not a whole number"))
}

/// `10s`, `2m`, `1h` or a bare number of seconds; wrk counts whole seconds.
fn seconds(flag: &str, v: &str) -> anyhow::Result<Duration> {
    let (digits, unit) = match v.find(|c: char| !c.is_ascii_digit()) {
        Some(i) => v.split_at(i),
        None => (v, "s"),
    };
    let n: u64 = digits
        .parse()
        .with_context(|| format!("{flag} {v:?}: expected whole seconds such as 10s or 1m"))?;
    let per = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        _ => bail!("{flag} {v:?}: unit must be s, m or h (wrk has no finer resolution)"),
    };
    Ok(Duration::from_secs(n * per))
}

fn variant_list(v: &str) -> anyhow::Result<Vec<&'static VariantSpec>> {
    let mut out: Vec<&'static VariantSpec> = Vec::new();
    for name in v.split(',').map(str::trim).filter(|n| !n.is_empty()) {
        let spec = variants::find(name).with_context(|| {
            format!(
                "--variants: unknown variant {name:?}; known: {}",
                variants::VARIANTS
                    .iter()
                    .map(|v| v.name)
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        })?;
        if !out.iter().any(|s| s.name == spec.name) {
            out.push(spec);
        }
    }
    ensure!(!out.is_empty(), "--variants: no variant given");
    Ok(out)
}
