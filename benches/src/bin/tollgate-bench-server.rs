//! One benchmark server variant on one address, for the load harness or for
//! profiling a variant by hand.
//!
//! Run with: `cargo run -p tollgate-benches --release --bin tollgate-bench-server -- --variant bare --addr 127.0.0.1:3000`
//! (`--list` shows the variants).

fn main() -> std::process::ExitCode {
    tollgate_benches::exit_code(tollgate_benches::server::main_with_args(
        std::env::args().skip(1),
    ))
}
