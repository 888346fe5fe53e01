//! The tollgate showcase service.
//!
//! Run with: `cargo run -p tollgate-demo` (in process), or
//! `REDIS_URL=redis://127.0.0.1:6379 cargo run -p tollgate-demo` (shared
//! state in Redis). Listens on 127.0.0.1:3000; `--addr` or `TOLLGATE_ADDR`
//! changes it.

use std::process::ExitCode;

use tollgate_demo::{DemoConfig, install_metrics};

#[tokio::main]
async fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "info,fred=warn".into()),
        )
        .init();

    let config = match DemoConfig::from_env_and_args(std::env::args().skip(1)) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("tollgate-demo: {e}");
            eprintln!("usage: tollgate-demo [--addr HOST:PORT]   (env: TOLLGATE_ADDR, REDIS_URL)");
            return ExitCode::from(2);
        }
    };
    let metrics = install_metrics();
    let app = match tollgate_demo::App::build(&config, metrics).await {
        Ok(app) => app,
        Err(e) => {
            eprintln!("tollgate-demo: {e}");
            return ExitCode::FAILURE;
        }
    };
    let listener = match tokio::net::TcpListener::bind(config.addr).await {
        Ok(l) => l,
        Err(e) => {
            eprintln!("tollgate-demo: cannot listen on {}: {e}", config.addr);
            return ExitCode::FAILURE;
        }
    };
    match &config.redis_url {
        Some(_) => {
            tracing::info!(addr = %config.addr, "tollgate demo listening; state is shared through Redis");
            // Logs, once, the Redis settings that could lose sessions or
            // usage counts (also listed by `/health/redis`).
            if let Some(redis) = app.redis() {
                let _ = redis.health().await;
            }
        }
        None => {
            tracing::info!(addr = %config.addr, "tollgate demo listening; REDIS_URL is unset, so everything runs in process (state is per process and lost on restart)")
        }
    }
    if let Err(e) = app.serve(listener, shutdown_signal()).await {
        eprintln!("tollgate-demo: {e}");
        return ExitCode::FAILURE;
    }
    tracing::info!("shut down cleanly");
    ExitCode::SUCCESS
}

/// Ctrl-C or SIGTERM.
async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {},
        () = term => {},
    }
    tracing::info!("shutdown signal received, draining connections");
}
