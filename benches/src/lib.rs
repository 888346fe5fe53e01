//! The tollgate load harness: server variants and the code that serves them.
//!
//! The runner (`cargo run -p tollgate-benches --release`, binary
//! `tollgate-bench`) starts one server per [`variants::VARIANTS`] entry on
//! loopback, drives it with `wrk` and prints a table; see `benches/README.md`.
//! The same server can be started by hand with the `tollgate-bench-server`
//! binary, e.g. to profile one variant:
//!
//! ```text
//! cargo run -p tollgate-benches --release --bin tollgate-bench-server -- \
//!     --variant governor --addr 127.0.0.1:3000
//! ```

pub mod runner;
pub mod server;
pub mod variants;
pub mod zipf;

/// The Redis URL used when none is given: `$REDIS_URL`, else
/// `redis://127.0.0.1:6379`.
pub fn default_redis_url() -> String {
    std::env::var("REDIS_URL")
        .ok()
        .filter(|u| !u.is_empty())
        .unwrap_or_else(|| "redis://127.0.0.1:6379".to_owned())
}

/// Prints an error with its causes on one line (no backtrace: these are
/// messages for the person running the tool) and turns it into an exit code.
pub fn exit_code(result: anyhow::Result<()>) -> std::process::ExitCode {
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
