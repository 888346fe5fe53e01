//! The benchmark server: one variant from [`crate::variants`] on one address.
//!
//! Once it listens it prints `listening on ADDR` as its first line of
//! stdout (the runner binds port 0 and reads the real port from that line).
//! It stops on SIGTERM or Ctrl-C.

use std::io::Write as _;
use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{Context as _, bail};
use tollgate_redis::{RedisConfig, RedisHandle};

use crate::variants::{self, Deps};

/// The server's command line.
#[derive(Clone, Debug)]
pub struct ServerArgs {
    /// The variant to serve (`--variant`).
    pub variant: String,
    /// Where to listen (`--addr`, default `127.0.0.1:0`: any free port).
    pub addr: SocketAddr,
    /// Redis for the variants that need it (`--redis-url`, default
    /// [`crate::default_redis_url`]).
    pub redis_url: String,
}

/// Usage of the server's command line.
pub const USAGE: &str = "\
usage: tollgate-bench-server --variant NAME [--addr 127.0.0.1:0] [--redis-url URL]
       tollgate-bench-server --list";

impl ServerArgs {
    /// Parses the arguments after the program name. `Ok(None)` means the
    /// request was only informational (`--help`, `--list`) and was answered.
    pub fn parse(args: impl IntoIterator<Item = String>) -> anyhow::Result<Option<Self>> {
        let mut variant = None;
        let mut addr: SocketAddr = ([127, 0, 0, 1], 0).into();
        let mut redis_url = crate::default_redis_url();
        let mut args = args.into_iter();
        while let Some(flag) = args.next() {
            let mut value = || {
                args.next()
                    .with_context(|| format!("{flag} needs a value\n{USAGE}"))
            };
            match flag.as_str() {
                "--variant" => variant = Some(value()?),
                "--addr" => {
                    let v = value()?;
                    addr = v.parse().with_context(|| format!("--addr {v:?}"))?;
                }
                "--redis-url" => redis_url = value()?,
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
                other => bail!("unknown argument {other:?}\n{USAGE}"),
            }
        }
        let variant = variant.with_context(|| format!("--variant is required\n{USAGE}"))?;
        Ok(Some(ServerArgs {
            variant,
            addr,
            redis_url,
        }))
    }
}

/// Parses `args` (without the program name) and serves until SIGTERM.
pub fn main_with_args(args: impl IntoIterator<Item = String>) -> anyhow::Result<()> {
    let Some(args) = ServerArgs::parse(args)? else {
        return Ok(());
    };
    // Multi-threaded, one worker per core: what a production service runs.
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("building the tokio runtime")?
        .block_on(serve(args))
}

/// Serves `args.variant` on `args.addr` until SIGTERM or Ctrl-C.
pub async fn serve(args: ServerArgs) -> anyhow::Result<()> {
    let spec = variants::find(&args.variant).with_context(|| {
        format!(
            "unknown variant {:?} (see --list for the known ones)",
            args.variant
        )
    })?;
    let redis = if spec.needs_redis {
        Some(connect_redis(&args.redis_url).await?)
    } else {
        None
    };
    let app = variants::build(
        spec.name,
        &Deps::new(redis).with_url(args.redis_url.clone()),
    )
    .await
    .with_context(|| format!("building variant {}", spec.name))?;

    let listener = tokio::net::TcpListener::bind(args.addr)
        .await
        .with_context(|| format!("binding {}", args.addr))?;
    let local = listener.local_addr().context("reading the bound address")?;
    let mut stdout = std::io::stdout().lock();
    writeln!(stdout, "listening on {local}").context("writing to stdout")?;
    stdout.flush().context("flushing stdout")?;
    drop(stdout);

    axum::serve(
        listener,
        app.into_make_service_with_connect_info::<SocketAddr>(),
    )
    .with_graceful_shutdown(shutdown_signal())
    .await
    .context("serving")
}

/// Connects the shared handle. Unlike a real service, a benchmark must not
/// start degraded: numbers from the fallback path would be mislabelled.
pub async fn connect_redis(url: &str) -> anyhow::Result<RedisHandle> {
    let handle = RedisHandle::connect(
        RedisConfig::from_url(url)
            .namespace("bench")
            // Generous: under full load a queue of a few ms is normal, and a
            // timeout would open the breaker and turn the run into 503s.
            .deadline(Duration::from_secs(1)),
    )
    .await
    .with_context(|| format!("connecting to Redis at {url}"))?;
    if !handle.is_available() {
        bail!("Redis at {url} does not answer");
    }
    Ok(handle)
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = ctrl_c => {}
                _ = term.recv() => {}
            }
        }
        // Without a SIGTERM handler the default action still stops us.
        Err(_) => {
            let _ = ctrl_c.await;
        }
    }
}
