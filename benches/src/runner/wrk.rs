//! Running `wrk` and reading its report.

use std::io::ErrorKind;
use std::process::Command;
use std::time::Duration;

use anyhow::{Context as _, bail};

/// What one wrk run measured.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct WrkOutput {
    pub(crate) requests: u64,
    pub(crate) requests_per_sec: f64,
    pub(crate) p50_ms: f64,
    pub(crate) p99_ms: f64,
    pub(crate) non_2xx: u64,
    pub(crate) socket_errors: u64,
}

const INSTALL_HINT: &str = "\
wrk is not installed (or not on PATH). The load harness drives every server with it.
Install it with:
    sudo apt-get update && sudo apt-get install -y wrk     # Debian, Ubuntu
    brew install wrk                                       # macOS
or build it from https://github.com/wg/wrk";

/// The first line of `wrk -v` (`wrk 4.1.0 [epoll] ...`); a clear error with
/// install instructions when wrk is missing.
pub(crate) fn version() -> anyhow::Result<String> {
    let out = match Command::new("wrk").arg("-v").output() {
        Ok(out) => out,
        Err(e) if e.kind() == ErrorKind::NotFound => bail!("{INSTALL_HINT}"),
        Err(e) => return Err(e).context("running `wrk -v`"),
    };
    // wrk -v prints its banner and usage, then exits non-zero.
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    let first = text.lines().next().unwrap_or("wrk").trim();
    Ok(first.split(" Copyright").next().unwrap_or(first).to_owned())
}

/// `wrk -t T -c C -d D --latency URL`.
pub(crate) fn run(
    url: &str,
    threads: u32,
    connections: u32,
    duration: Duration,
) -> anyhow::Result<WrkOutput> {
    let out = Command::new("wrk")
        .args(["-t", &threads.to_string(), "-c", &connections.to_string()])
        .args(["-d", &format!("{}s", duration.as_secs()), "--latency", url])
        .output()
        .context("running wrk")?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        bail!(
            "wrk failed ({}):\n{stdout}{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    parse(&stdout).with_context(|| format!("reading wrk's report:\n{stdout}"))
}

/// Reads the report `wrk --latency` prints.
pub(crate) fn parse(report: &str) -> anyhow::Result<WrkOutput> {
    let (mut requests, mut rps, mut p50, mut p99) = (None, None, None, None);
    let (mut non_2xx, mut socket_errors) = (0, 0);
    for line in report.lines().map(str::trim) {
        let words: Vec<&str> = line.split_whitespace().collect();
        match words.as_slice() {
            ["50%", v] => p50 = Some(latency_ms(v)?),
            ["99%", v] => p99 = Some(latency_ms(v)?),
            [n, "requests", "in", ..] => {
                requests = Some(n.parse::<u64>().with_context(|| format!("{line:?}"))?);
            }
            ["Requests/sec:", v] => {
                rps = Some(v.parse::<f64>().with_context(|| format!("{line:?}"))?);
            }
            ["Non-2xx", "or", "3xx", "responses:", n] => {
                non_2xx = n.parse().with_context(|| format!("{line:?}"))?;
            }
            // Socket errors: connect 0, read 3, write 0, timeout 0
            ["Socket", "errors:", rest @ ..] => {
                for n in rest.iter().skip(1).step_by(2) {
                    let n = n.trim_end_matches(',');
                    socket_errors += n.parse::<u64>().with_context(|| format!("{line:?}"))?;
                }
            }
            _ => {}
        }
    }
    Ok(WrkOutput {
        requests: requests.context("no `N requests in` line")?,
        requests_per_sec: rps.context("no `Requests/sec:` line")?,
        p50_ms: p50.context("no 50% latency line (was --latency passed?)")?,
        p99_ms: p99.context("no 99% latency line (was --latency passed?)")?,
        non_2xx,
        socket_errors,
    })
}

/// `650.00us`, `1.21ms`, `2.00s`, `1.50m` in milliseconds.
fn latency_ms(v: &str) -> anyhow::Result<f64> {
    let split = v
        .find(|c: char| c.is_ascii_alphabetic())
        .with_context(|| format!("latency {v:?} has no unit"))?;
    let (n, unit) = v.split_at(split);
    let n: f64 = n.parse().with_context(|| format!("latency {v:?}"))?;
    let scale = match unit {
        "us" => 1e-3,
        "ms" => 1.0,
        "s" => 1e3,
        "m" => 60e3,
        "h" => 3600e3,
        _ => bail!("latency {v:?}: unknown unit"),
    };
    Ok(n * scale)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_a_wrk_report() {
        let report = "\
Running 5s test @ http://127.0.0.1:40000/api/ping
  2 threads and 64 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency   758.21us  512.35us  12.43ms   89.12%
    Req/Sec    42.66k     3.12k   48.07k    72.00%
  Latency Distribution
     50%  650.00us
     75%    0.88ms
     90%    1.21ms
     99%    2.60ms
  424539 requests in 5.00s, 53.04MB read
  Socket errors: connect 0, read 3, write 1, timeout 0
  Non-2xx or 3xx responses: 7
Requests/sec:  84898.46
Transfer/sec:     10.61MB
";
        let out = parse(report).expect("a complete report");
        assert_eq!(out.requests, 424_539);
        assert!((out.requests_per_sec - 84_898.46).abs() < 1e-9);
        assert!((out.p50_ms - 0.65).abs() < 1e-9);
        assert!((out.p99_ms - 2.6).abs() < 1e-9);
        assert_eq!(out.non_2xx, 7);
        assert_eq!(out.socket_errors, 4);
    }

    #[test]
    fn a_truncated_report_is_an_error() {
        assert!(parse("Running 5s test @ http://x\n").is_err());
    }
}
