//! Real `redis-server` processes for tollgate's tests.
//!
//! Each server runs on a free loopback port in its own temporary directory
//! and is killed when dropped. Topologies: [`RedisServer`] (standalone),
//! [`RedisCluster`] (three primaries), [`RedisServer::start_tls`] (TLS with
//! a generated CA, plus an ACL user). Faults: [`pause`](RedisServer::pause)
//! (SIGSTOP: the socket stays open and nothing answers),
//! [`resume`](RedisServer::resume), [`kill`](RedisServer::kill),
//! [`restart`](RedisServer::restart) on the same port, and added latency
//! through a [`LatencyProxy`].
//!
//! Tests never skip: when `redis-server` is not on `PATH` every constructor
//! panics with one message saying how to install it.
#![allow(clippy::missing_panics_doc)]

mod proxy;
mod resp;
mod tls;

use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub use proxy::LatencyProxy;
pub use resp::Reply;
pub use tls::TlsMaterial;

/// A handle on `url` for tests that check behaviour rather than deadlines:
/// a 2 s deadline (debug builds under heavy concurrency) and a breaker that
/// probes every 50 ms, so recovery is quick. Panics if `url` is unusable.
pub async fn connect(url: impl Into<String>) -> tollgate_redis::RedisHandle {
    tollgate_redis::RedisHandle::connect(
        tollgate_redis::RedisConfig::from_url(url)
            .deadline(Duration::from_secs(2))
            .probe_interval(Duration::from_millis(50)),
    )
    .await
    .expect("connect")
}

/// The message every test fails with when `redis-server` is missing.
pub const INSTALL_HINT: &str = "redis-server was not found on PATH. tollgate's tests run against real Redis processes: \
     install it with `sudo apt-get install -y redis-server redis-tools` (Debian/Ubuntu), \
     `brew install redis` (macOS) or `dnf install redis` (Fedora), then run the tests again.";

/// Panics with [`INSTALL_HINT`] unless `redis-server` can be run.
pub fn require_redis_server() {
    let ok = Command::new("redis-server")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    assert!(ok, "{INSTALL_HINT}");
}

/// A port that was free a moment ago.
fn free_port() -> u16 {
    // Cluster bus ports are port + 10000: keep below 55535.
    loop {
        let l = TcpListener::bind("127.0.0.1:0").expect("bind an ephemeral port");
        let port = l.local_addr().expect("local addr").port();
        if port < 55_000 && TcpListener::bind(("127.0.0.1", port + 10_000)).is_ok() {
            return port;
        }
    }
}

/// Extra arguments for a server.
#[derive(Clone, Debug, Default)]
struct Flavor {
    cluster: bool,
    tls: Option<TlsMaterial>,
    extra: Vec<String>,
}

/// One `redis-server` process.
#[derive(Debug)]
pub struct RedisServer {
    port: u16,
    dir: tempfile::TempDir,
    child: Option<Child>,
    flavor: Flavor,
    paused: bool,
}

impl RedisServer {
    /// A standalone server on a free port.
    pub fn start() -> Self {
        Self::spawn(Flavor::default())
    }

    /// A standalone server started with extra `redis-server` arguments
    /// (e.g. `["--maxmemory", "10mb"]`).
    pub fn start_with_args(args: &[&str]) -> Self {
        Self::spawn(Flavor {
            extra: args.iter().map(|s| (*s).to_owned()).collect(),
            ..Flavor::default()
        })
    }

    /// A TLS-only server (no plaintext port) with a freshly generated CA and
    /// server certificate, the `default` user disabled and one ACL user
    /// ([`TLS_USER`] / [`TLS_PASSWORD`]). Connect with [`url`](Self::url)
    /// and trust [`ca_pem`](Self::ca_pem).
    pub fn start_tls() -> Self {
        Self::spawn(Flavor {
            tls: Some(TlsMaterial::generate()),
            ..Flavor::default()
        })
    }

    fn spawn(flavor: Flavor) -> Self {
        require_redis_server();
        let mut last_err = String::new();
        for _ in 0..10 {
            let port = free_port();
            let mut s = RedisServer {
                port,
                dir: tempfile::Builder::new()
                    .prefix("tollgate-redis-")
                    .tempdir()
                    .expect("create a temp dir"),
                child: None,
                flavor: flavor.clone(),
                paused: false,
            };
            match s.launch() {
                Ok(()) => return s,
                Err(e) => last_err = e,
            }
        }
        panic!("could not start redis-server: {last_err}");
    }

    fn args(&self) -> Vec<String> {
        let mut a: Vec<String> = vec![
            "--bind".into(),
            "127.0.0.1".into(),
            "--save".into(),
            String::new(),
            "--appendonly".into(),
            "no".into(),
            "--dir".into(),
            self.dir.path().display().to_string(),
            "--logfile".into(),
            self.dir.path().join("redis.log").display().to_string(),
            "--protected-mode".into(),
            "no".into(),
        ];
        match &self.flavor.tls {
            Some(tls) => {
                tls.write(self.dir.path());
                a.extend(tls.server_args(self.dir.path(), self.port));
            }
            None => a.extend(["--port".into(), self.port.to_string()]),
        }
        if self.flavor.cluster {
            a.extend([
                "--cluster-enabled".into(),
                "yes".into(),
                "--cluster-config-file".into(),
                self.dir.path().join("nodes.conf").display().to_string(),
                "--cluster-node-timeout".into(),
                "2000".into(),
            ]);
        }
        a.extend(self.flavor.extra.iter().cloned());
        a
    }

    fn launch(&mut self) -> Result<(), String> {
        let child = Command::new("redis-server")
            .args(self.args())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| format!("spawning redis-server: {e}"))?;
        self.child = Some(child);
        let started = Instant::now();
        while started.elapsed() < Duration::from_secs(10) {
            if let Some(child) = self.child.as_mut()
                && let Ok(Some(status)) = child.try_wait()
            {
                self.child = None;
                return Err(format!(
                    "redis-server exited with {status}; log: {}",
                    self.log_tail()
                ));
            }
            if TcpStream::connect(("127.0.0.1", self.port)).is_ok() && self.ready() {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        Err(format!(
            "redis-server did not accept connections; log: {}",
            self.log_tail()
        ))
    }

    fn ready(&self) -> bool {
        if self.flavor.tls.is_some() {
            // The TCP accept is enough: the TLS port only opens once loaded.
            return true;
        }
        match self.command(&["PING"]) {
            Ok(Reply::Status(s)) => s == "PONG",
            // Password-protected: it answers, so it is up.
            Ok(Reply::Error(e)) => e.starts_with("NOAUTH"),
            _ => false,
        }
    }

    fn log_tail(&self) -> String {
        let log = std::fs::read_to_string(self.dir.path().join("redis.log")).unwrap_or_default();
        let lines: Vec<&str> = log.lines().rev().take(5).collect();
        lines.into_iter().rev().collect::<Vec<_>>().join(" | ")
    }

    /// The loopback port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The process id, while running.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// The server's working directory.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// `redis://127.0.0.1:PORT`, or for a TLS server
    /// `rediss://USER:PASSWORD@localhost:PORT`.
    pub fn url(&self) -> String {
        match &self.flavor.tls {
            Some(_) => format!("rediss://{TLS_USER}:{TLS_PASSWORD}@localhost:{}", self.port),
            None => format!("redis://127.0.0.1:{}", self.port),
        }
    }

    /// The CA certificate (PEM) that signed a TLS server's certificate.
    pub fn ca_pem(&self) -> Option<String> {
        self.flavor.tls.as_ref().map(|t| t.ca_pem.clone())
    }

    /// Sends one command over a fresh plaintext connection and returns the
    /// reply (not for TLS servers). For assertions and setup in tests.
    pub fn command(&self, args: &[&str]) -> Result<Reply, String> {
        resp::command(self.port, args)
    }

    /// `total_commands_processed` from INFO stats, minus the INFO itself.
    pub fn commands_processed(&self) -> u64 {
        let info = match self.command(&["INFO", "stats"]) {
            Ok(Reply::Bulk(s)) => s,
            other => panic!("INFO stats failed: {other:?}"),
        };
        info_field(&info, "total_commands_processed")
            .and_then(|v| v.parse::<u64>().ok())
            .map(|n| n.saturating_sub(1))
            .expect("total_commands_processed in INFO")
    }

    /// Freezes the process (SIGSTOP): connections stay open, nothing is
    /// answered, no error reaches the client.
    pub fn pause(&mut self) {
        if let Some(pid) = self.pid() {
            signal(pid, nix::sys::signal::Signal::SIGSTOP);
            self.paused = true;
        }
    }

    /// Resumes a paused process (SIGCONT).
    pub fn resume(&mut self) {
        if let Some(pid) = self.pid() {
            signal(pid, nix::sys::signal::Signal::SIGCONT);
            self.paused = false;
        }
    }

    /// Kills the process (SIGKILL); connections are reset.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            if self.paused {
                signal(child.id(), nix::sys::signal::Signal::SIGCONT);
                self.paused = false;
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts the server again on the same port (after [`kill`](Self::kill),
    /// or kills it first). Data is gone: the server keeps nothing on disk,
    /// and its script cache is empty.
    pub fn restart(&mut self) {
        self.kill();
        let started = Instant::now();
        loop {
            match self.launch() {
                Ok(()) => return,
                // The port may linger a moment after the kill.
                Err(e) if started.elapsed() > Duration::from_secs(10) => {
                    panic!("could not restart redis-server on port {}: {e}", self.port)
                }
                Err(_) => std::thread::sleep(Duration::from_millis(50)),
            }
        }
    }

    /// Whether the process is running (possibly paused).
    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
    }
}

fn signal(pid: u32, sig: nix::sys::signal::Signal) {
    let pid = nix::unistd::Pid::from_raw(i32::try_from(pid).expect("pid fits i32"));
    let _ = nix::sys::signal::kill(pid, sig);
}

/// A field of an INFO reply.
pub fn info_field<'a>(info: &'a str, field: &str) -> Option<&'a str> {
    info.lines().find_map(|l| {
        l.strip_prefix(field)
            .and_then(|r| r.strip_prefix(':'))
            .map(str::trim)
    })
}

/// The ACL user of a TLS server.
pub const TLS_USER: &str = "tollgate";
/// The ACL user's password.
pub const TLS_PASSWORD: &str = "tollgate-test-password";

/// A Redis Cluster of three primaries (no replicas), slots split evenly.
#[derive(Debug)]
pub struct RedisCluster {
    nodes: Vec<RedisServer>,
}

impl RedisCluster {
    /// Starts three primaries, assigns the 16384 slots and waits until the
    /// cluster reports `cluster_state:ok` on every node.
    pub fn start() -> Self {
        let nodes: Vec<RedisServer> = (0..3)
            .map(|_| {
                RedisServer::spawn(Flavor {
                    cluster: true,
                    ..Flavor::default()
                })
            })
            .collect();
        let per = 16_384 / nodes.len();
        for (i, node) in nodes.iter().enumerate() {
            let from = i * per;
            let to = if i + 1 == nodes.len() {
                16_383
            } else {
                from + per - 1
            };
            let mut args = vec!["CLUSTER".to_owned(), "ADDSLOTS".to_owned()];
            args.extend((from..=to).map(|s| s.to_string()));
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            node.command(&args).expect("CLUSTER ADDSLOTS");
        }
        for node in &nodes[1..] {
            let port = nodes[0].port.to_string();
            node.command(&["CLUSTER", "MEET", "127.0.0.1", &port])
                .expect("CLUSTER MEET");
        }
        let cluster = RedisCluster { nodes };
        cluster.wait_ok(Duration::from_secs(90));
        cluster
    }

    /// Waits until every running node reports `cluster_state:ok` and knows
    /// every other node.
    pub fn wait_ok(&self, timeout: Duration) {
        let started = Instant::now();
        loop {
            let ok = self.nodes.iter().filter(|n| n.is_running()).all(|n| {
                let info = match n.command(&["CLUSTER", "INFO"]) {
                    Ok(Reply::Bulk(s)) => s,
                    _ => return false,
                };
                info_field(&info, "cluster_state") == Some("ok")
                    && info_field(&info, "cluster_known_nodes")
                        .and_then(|v| v.parse::<usize>().ok())
                        == Some(self.nodes.len())
            });
            if ok {
                return;
            }
            assert!(
                started.elapsed() < timeout,
                "the Redis Cluster did not become ready within {timeout:?}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// `redis-cluster://127.0.0.1:P1?node=127.0.0.1:P2&node=127.0.0.1:P3`.
    pub fn url(&self) -> String {
        let mut url = format!("redis-cluster://127.0.0.1:{}", self.nodes[0].port);
        for (i, n) in self.nodes[1..].iter().enumerate() {
            url.push(if i == 0 { '?' } else { '&' });
            url.push_str(&format!("node=127.0.0.1:{}", n.port));
        }
        url
    }

    /// The primaries.
    pub fn nodes(&self) -> &[RedisServer] {
        &self.nodes
    }

    /// One primary, for fault injection.
    pub fn node_mut(&mut self, i: usize) -> &mut RedisServer {
        &mut self.nodes[i]
    }

    /// Sum of `total_commands_processed` over the primaries.
    pub fn commands_processed(&self) -> u64 {
        self.nodes
            .iter()
            .filter(|n| n.is_running())
            .map(RedisServer::commands_processed)
            .sum()
    }

    /// Restarts one primary on its port. It comes back empty but keeps its
    /// `nodes.conf` (node id and slots), so it rejoins the cluster.
    pub fn restart_node(&mut self, i: usize) {
        self.nodes[i].restart();
        self.wait_ok(Duration::from_secs(90));
    }

    /// Sends a command to the node serving `key`'s slot (following one
    /// MOVED redirection).
    pub fn command_for_key(&self, key: &str, args: &[&str]) -> Result<Reply, String> {
        let first = &self.nodes[0];
        match first.command(args)? {
            Reply::Error(e) if e.starts_with("MOVED") => {
                let addr = e.split_whitespace().nth(2).unwrap_or_default();
                let port: u16 = addr
                    .rsplit(':')
                    .next()
                    .and_then(|p| p.parse().ok())
                    .ok_or_else(|| format!("bad MOVED reply for {key}: {e}"))?;
                resp::command(port, args)
            }
            other => Ok(other),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn standalone_lifecycle() {
        let mut s = RedisServer::start();
        assert_eq!(
            s.command(&["SET", "k", "v"]),
            Ok(Reply::Status("OK".into()))
        );
        assert_eq!(s.command(&["GET", "k"]), Ok(Reply::Bulk("v".into())));
        s.kill();
        assert!(s.command(&["PING"]).is_err());
        s.restart();
        assert_eq!(s.command(&["GET", "k"]), Ok(Reply::Nil), "nothing kept");
        assert!(s.commands_processed() >= 1);
    }

    #[test]
    fn pause_freezes_and_resume_answers() {
        let mut s = RedisServer::start();
        s.pause();
        assert!(
            resp::command_with_timeout(s.port(), &["PING"], Duration::from_millis(200)).is_err()
        );
        s.resume();
        assert_eq!(s.command(&["PING"]), Ok(Reply::Status("PONG".into())));
    }

    #[test]
    fn cluster_forms() {
        let c = RedisCluster::start();
        assert!(c.url().starts_with("redis-cluster://127.0.0.1:"));
        assert_eq!(c.url().matches("node=").count(), 2);
        let r = c.command_for_key("foo", &["SET", "foo", "1"]);
        assert_eq!(r, Ok(Reply::Status("OK".into())));
    }
}
