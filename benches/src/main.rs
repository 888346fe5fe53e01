//! The tollgate load harness: builds nothing, runs everything.
//!
//! Run with: `cargo run -p tollgate-benches --release -- --rounds 3 --duration 10s`
//! (`-- --help` for every option, `benches/README.md` for the columns).
//! `cargo run -p tollgate-benches --release -- zipf` reports the response
//! cache's hit rate on a Zipf-distributed key workload.
//!
//! For each round and each variant it starts a server on a free loopback
//! port, warms it up, drives it with `wrk`, measures the server's and
//! Redis's CPU, stops it, and finally prints the medians as a markdown table
//! (also written to `target/bench-results.md`).
//!
//! The servers are this same executable started as `tollgate-bench serve
//! --variant NAME ...` (`cargo run` builds only the binary it runs, so a
//! separate server binary could be stale or missing); the
//! `tollgate-bench-server` binary serves the same variants for manual runs.

use std::process::ExitCode;

fn main() -> ExitCode {
    let mut args = std::env::args().skip(1).peekable();
    let result = if args.peek().map(String::as_str) == Some("serve") {
        args.next();
        tollgate_benches::server::main_with_args(args)
    } else if args.peek().map(String::as_str) == Some("zipf") {
        args.next();
        tollgate_benches::zipf::main_with_args(args)
    } else {
        tollgate_benches::runner::main_with_args(args)
    };
    tollgate_benches::exit_code(result)
}
