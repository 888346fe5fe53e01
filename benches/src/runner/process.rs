//! One server process: start, readiness, CPU time, stop.

use std::io::{BufRead as _, BufReader, Read as _, Write as _};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::{Child, ChildStdout, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

/// A running server; killed on drop if [`stop`](Self::stop) was not reached.
pub(crate) struct ServerProcess {
    child: Child,
    addr: SocketAddr,
    // Kept open: closing it would make the server's next write fail.
    _stdout: BufReader<ChildStdout>,
}

impl ServerProcess {
    /// Starts `exe serve --variant NAME` on a free loopback port and waits
    /// for its `listening on ADDR` line.
    pub(crate) fn start(exe: &Path, variant: &str, redis_url: &str) -> anyhow::Result<Self> {
        let mut child = Command::new(exe)
            .args(["serve", "--variant", variant, "--addr", "127.0.0.1:0"])
            .args(["--redis-url", redis_url])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .with_context(|| format!("starting {} serve --variant {variant}", exe.display()))?;
        let mut stdout = BufReader::new(
            child
                .stdout
                .take()
                .context("the server's stdout was not captured")?,
        );
        let mut line = String::new();
        let read = stdout.read_line(&mut line);
        let addr = match read {
            Ok(n) if n > 0 => line
                .trim()
                .strip_prefix("listening on ")
                .and_then(|a| a.parse::<SocketAddr>().ok()),
            _ => None,
        };
        let Some(addr) = addr else {
            let status = child.wait().ok();
            bail!(
                "the {variant} server did not start (first line {line:?}, exit {status:?}); \
                 its error is printed above"
            );
        };
        Ok(ServerProcess {
            child,
            addr,
            _stdout: stdout,
        })
    }

    /// Where the server listens.
    pub(crate) fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Sends `GET /api/ping` until it answers 200.
    pub(crate) fn wait_until_ready(&self, timeout: Duration) -> anyhow::Result<()> {
        let started = Instant::now();
        let mut last = String::from("no answer");
        while started.elapsed() < timeout {
            match ping(self.addr) {
                Ok(status) if status.starts_with("HTTP/1.1 200") => return Ok(()),
                Ok(status) => last = status,
                Err(e) => last = format!("{e:#}"),
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        bail!(
            "GET http://{}/api/ping did not answer 200 within {timeout:?}: {last}",
            self.addr
        )
    }

    /// User + system CPU time of the server so far, in clock ticks.
    pub(crate) fn cpu_ticks(&self) -> anyhow::Result<u64> {
        let path = format!("/proc/{}/stat", self.child.id());
        let stat = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
        // The command name (field 2) may hold spaces: count after its ')'.
        let rest = stat
            .rsplit_once(')')
            .map(|(_, r)| r)
            .with_context(|| format!("unexpected {path}: {stat:?}"))?;
        let fields: Vec<&str> = rest.split_whitespace().collect();
        // Fields 14 (utime) and 15 (stime); `rest` starts at field 3.
        let field = |n: usize| -> anyhow::Result<u64> {
            fields
                .get(n - 3)
                .and_then(|f| f.parse().ok())
                .with_context(|| format!("field {n} of {path}: {stat:?}"))
        };
        Ok(field(14)? + field(15)?)
    }

    /// SIGTERM, then SIGKILL if it has not exited within 5 s.
    pub(crate) fn stop(mut self) -> anyhow::Result<()> {
        let pid = Pid::from_raw(i32::try_from(self.child.id()).context("pid out of range")?);
        kill(pid, Signal::SIGTERM).context("sending SIGTERM to the server")?;
        let started = Instant::now();
        while started.elapsed() < Duration::from_secs(5) {
            if self
                .child
                .try_wait()
                .context("waiting for the server")?
                .is_some()
            {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        eprintln!("warning: server {pid} ignored SIGTERM for 5 s; killing it");
        self.child.kill().context("killing the server")?;
        self.child.wait().context("reaping the server")?;
        Ok(())
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// One HTTP/1.1 request on a fresh connection; returns the status line.
fn ping(addr: SocketAddr) -> anyhow::Result<String> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(1)).context("connect")?;
    s.set_read_timeout(Some(Duration::from_secs(2)))
        .context("set_read_timeout")?;
    s.write_all(b"GET /api/ping HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
        .context("write")?;
    let mut response = String::new();
    s.read_to_string(&mut response).context("read")?;
    Ok(response.lines().next().unwrap_or_default().to_owned())
}

/// `getconf CLK_TCK`: the unit of the CPU times in `/proc/PID/stat`.
pub(crate) fn clock_ticks_per_second() -> f64 {
    let out = Command::new("getconf").arg("CLK_TCK").output();
    match out
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse::<f64>().ok())
    {
        Some(t) if t > 0.0 => t,
        _ => {
            eprintln!("warning: `getconf CLK_TCK` failed; assuming 100 ticks per second");
            100.0
        }
    }
}

/// CPU time the whole machine spent running processes so far, or stolen by
/// the hypervisor (all CPUs, from the first line of `/proc/stat`), in clock
/// ticks. Interrupt and softirq time are left out: on loopback that is the
/// benchmark's own network traffic, which no process is billed for.
pub(crate) fn machine_busy_ticks() -> anyhow::Result<u64> {
    let stat = std::fs::read_to_string("/proc/stat").context("reading /proc/stat")?;
    let line = stat.lines().next().unwrap_or_default();
    // cpu  user nice system idle iowait irq softirq steal ...
    let fields: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .map(|f| f.parse().with_context(|| format!("/proc/stat: {line:?}")))
        .collect::<anyhow::Result<_>>()?;
    let busy = [0, 1, 2, 7].iter().filter_map(|&i| fields.get(i)).sum();
    Ok(busy)
}

/// User + system CPU seconds of this process's reaped children (wrk, once
/// its run has been waited for).
pub(crate) fn children_cpu_seconds() -> anyhow::Result<f64> {
    use nix::sys::resource::{UsageWho, getrusage};
    let usage = getrusage(UsageWho::RUSAGE_CHILDREN).context("getrusage(RUSAGE_CHILDREN)")?;
    let secs = |t: nix::sys::time::TimeVal| t.tv_sec() as f64 + t.tv_usec() as f64 / 1e6;
    Ok(secs(usage.user_time()) + secs(usage.system_time()))
}
