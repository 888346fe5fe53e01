//! Real `redis-server` processes for tollgate's tests.
//!
//! Each server runs on a free loopback port in its own temporary directory
//! and is killed when dropped. Topologies: [`RedisServer`] (standalone),
//! [`RedisCluster`] (three primaries, with a replica each from
//! [`RedisCluster::start_with_replicas`]), [`RedisSentinel`] (a primary and
//! a replica watched by a Sentinel), [`RedisServer::start_tls`] and
//! [`RedisCluster::start_tls`] (TLS with a generated CA, plus an ACL
//! user). Faults: [`pause`](RedisServer::pause)
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
    connect_with_deadline(url, Duration::from_secs(2)).await
}

/// A handle on `url` with a production-like deadline, for tests of
/// outages and recovery: `deadline` per command and a breaker that probes
/// every 50 ms. Panics if `url` is unusable.
pub async fn connect_with_deadline(
    url: impl Into<String>,
    deadline: Duration,
) -> tollgate_redis::RedisHandle {
    tollgate_redis::RedisHandle::connect(
        tollgate_redis::RedisConfig::from_url(url)
            .deadline(deadline)
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
    /// A Sentinel watching the primary on this port.
    sentinel_of: Option<u16>,
    extra: Vec<String>,
}

/// One `redis-server` process.
#[derive(Debug)]
pub struct RedisServer {
    port: u16,
    /// A TLS cluster node's TLS port (its plaintext port is `port`).
    tls_port: Option<u16>,
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
                tls_port: (flavor.cluster && flavor.tls.is_some()).then(free_port),
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
        match (&self.flavor.tls, self.tls_port) {
            (Some(tls), Some(tls_port)) => {
                tls.write(self.dir.path());
                a.extend(tls.cluster_args(self.dir.path(), self.port, tls_port));
            }
            (Some(tls), None) => {
                tls.write(self.dir.path());
                a.extend(tls.server_args(self.dir.path(), self.port));
            }
            (None, _) => a.extend(["--port".into(), self.port.to_string()]),
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
        let mut cmd = Command::new("redis-server");
        if let Some(primary) = self.flavor.sentinel_of {
            // Sentinel mode needs a writable config file, named first. It
            // rewrites the file with what it learns: a restart keeps it.
            let conf = self.dir.path().join("sentinel.conf");
            if !conf.exists() {
                let text = format!(
                    "sentinel monitor {SENTINEL_SERVICE} 127.0.0.1 {primary} 1\n\
                     sentinel down-after-milliseconds {SENTINEL_SERVICE} 500\n\
                     sentinel failover-timeout {SENTINEL_SERVICE} 2000\n"
                );
                std::fs::write(&conf, text).map_err(|e| format!("writing {conf:?}: {e}"))?;
            }
            cmd.arg(conf).arg("--sentinel");
        }
        let child = cmd
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
        if self.flavor.tls.is_some() && self.tls_port.is_none() {
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
            Some(_) => format!(
                "rediss://{TLS_USER}:{TLS_PASSWORD}@localhost:{}",
                self.client_port()
            ),
            None => format!("redis://127.0.0.1:{}", self.port),
        }
    }

    /// The port clients connect to: the TLS port of a TLS cluster node.
    fn client_port(&self) -> u16 {
        self.tls_port.unwrap_or(self.port)
    }

    /// The CA certificate (PEM) that signed a TLS server's certificate.
    pub fn ca_pem(&self) -> Option<String> {
        self.flavor.tls.as_ref().map(|t| t.ca_pem.clone())
    }

    /// Sends one command over a fresh plaintext connection and returns the
    /// reply (not for TLS servers, but for the nodes of a TLS cluster). For
    /// assertions and setup in tests.
    pub fn command(&self, args: &[&str]) -> Result<Reply, String> {
        resp::command(self.port, args)
    }

    /// Like [`command`](Self::command), for reading what a replica holds:
    /// a cluster replica answers reads only after `READONLY` (sent first
    /// on the same connection; other servers need nothing).
    pub fn read_command(&self, args: &[&str]) -> Result<Reply, String> {
        if self.flavor.cluster {
            resp::commands(self.port, &[&["READONLY"], args], Duration::from_secs(5))
        } else {
            self.command(args)
        }
    }

    /// Whether this replica's link to its primary is up (it is in sync).
    fn replica_link_up(&self) -> bool {
        matches!(self.command(&["INFO", "replication"]), Ok(Reply::Bulk(info))
            if info_field(&info, "master_link_status") == Some("up"))
    }

    /// `CLUSTER INFO`'s `field`, if the node answers.
    fn cluster_info(&self, field: &str) -> Option<String> {
        match self.command(&["CLUSTER", "INFO"]) {
            Ok(Reply::Bulk(info)) => info_field(&info, field).map(str::to_owned),
            _ => None,
        }
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

/// Polls `done` every 50 ms until it holds; panics after `timeout`,
/// saying what it waited for and what `context` adds (a log tail, say).
fn wait_until(
    what: &str,
    timeout: Duration,
    mut done: impl FnMut() -> bool,
    context: impl Fn() -> String,
) {
    let started = Instant::now();
    while !done() {
        assert!(
            started.elapsed() < timeout,
            "timed out waiting until {what}{}",
            context()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The timeout of the test kit's waits on topologies.
const TOPOLOGY_WAIT: Duration = Duration::from_secs(60);

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

/// A Redis Cluster of three primaries, slots split evenly; with
/// [`start_with_replicas`](Self::start_with_replicas), each with a replica
/// that takes over when its primary fails.
#[derive(Debug)]
pub struct RedisCluster {
    nodes: Vec<RedisServer>,
    /// Whether node `i + SHARDS` started as the replica of node `i`.
    replicas: bool,
}

/// The number of primaries of a [`RedisCluster`].
const SHARDS: usize = 3;

impl RedisCluster {
    /// Starts three primaries, assigns the 16384 slots and waits until the
    /// cluster reports `cluster_state:ok` on every node.
    pub fn start() -> Self {
        Self::launch(false, None)
    }

    /// Three primaries that clients reach over TLS only, as an ACL user
    /// (connect with [`url`](Self::url), trusting
    /// [`ca_pem`](Self::ca_pem)); the cluster bus runs over TLS too. Each
    /// node also listens in plaintext, for the test kit's own setup and
    /// checks ([`RedisServer::command`]).
    pub fn start_tls() -> Self {
        Self::launch(false, Some(TlsMaterial::generate()))
    }

    /// Starts three primaries and one replica of each (nodes `3..6`, node
    /// `i + 3` replicating node `i`), and waits until every replica is in
    /// sync. A primary that stops answering is declared failed after one
    /// second, and its replica promoted (see [`fail_over`](Self::fail_over)).
    pub fn start_with_replicas() -> Self {
        Self::launch(true, None)
    }

    fn launch(replicas: bool, tls: Option<TlsMaterial>) -> Self {
        let count = if replicas { 2 * SHARDS } else { SHARDS };
        let timeout: &[&str] = if replicas {
            // Failure detection within a second, and any replica may be
            // promoted however long its link was down.
            &[
                "--cluster-node-timeout",
                "1000",
                "--cluster-replica-validity-factor",
                "0",
            ]
        } else {
            &[]
        };
        let nodes: Vec<RedisServer> = (0..count)
            .map(|_| {
                RedisServer::spawn(Flavor {
                    cluster: true,
                    tls: tls.clone(),
                    extra: timeout.iter().map(|s| (*s).to_owned()).collect(),
                    ..Flavor::default()
                })
            })
            .collect();
        let per = 16_384 / SHARDS;
        for (i, node) in nodes.iter().take(SHARDS).enumerate() {
            let from = i * per;
            let to = if i + 1 == SHARDS {
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
            // The bus port is the client port + 10000: the TLS port's on a
            // TLS cluster.
            let port = nodes[0].client_port().to_string();
            node.command(&["CLUSTER", "MEET", "127.0.0.1", &port])
                .expect("CLUSTER MEET");
        }
        let cluster = RedisCluster { nodes, replicas };
        if replicas {
            // A node replicates another only once it knows it.
            cluster.wait_until("every node knows every other", || {
                cluster.nodes.iter().all(|n| cluster.knows_all(n))
            });
            for i in 0..SHARDS {
                let id = match cluster.nodes[i].command(&["CLUSTER", "MYID"]) {
                    Ok(Reply::Bulk(id)) => id,
                    other => panic!("CLUSTER MYID: {other:?}"),
                };
                cluster.nodes[i + SHARDS]
                    .command(&["CLUSTER", "REPLICATE", &id])
                    .expect("CLUSTER REPLICATE");
            }
            cluster.wait_until("every replica is in sync", || {
                cluster.nodes[SHARDS..]
                    .iter()
                    .all(RedisServer::replica_link_up)
            });
        }
        cluster.wait_ok(Duration::from_secs(90));
        cluster
    }

    fn wait_until(&self, what: &str, done: impl FnMut() -> bool) {
        wait_until(what, TOPOLOGY_WAIT, done, String::new);
    }

    /// Whether node `n` knows every node of the cluster.
    fn knows_all(&self, n: &RedisServer) -> bool {
        n.cluster_info("cluster_known_nodes")
            .and_then(|v| v.parse::<usize>().ok())
            == Some(self.nodes.len())
    }

    /// The node that started in the other role of node `i`'s shard (its
    /// replica, or its primary). Panics on a cluster without replicas.
    pub fn partner(&self, i: usize) -> usize {
        assert!(self.replicas, "a cluster started without replicas");
        (i + SHARDS) % (2 * SHARDS)
    }

    /// The index of the node serving `key`'s slot now (the primary its
    /// shard has now).
    pub fn primary_for_key(&self, key: &str) -> usize {
        let slot = match self.running().command(&["CLUSTER", "KEYSLOT", key]) {
            Ok(Reply::Int(s)) => s,
            other => panic!("CLUSTER KEYSLOT: {other:?}"),
        };
        let per = i64::try_from(16_384 / SHARDS).expect("small");
        let shard = usize::try_from((slot / per).min(2)).expect("small");
        if !self.replicas {
            return shard;
        }
        let partner = self.partner(shard);
        [shard, partner]
            .into_iter()
            .find(|&i| {
                self.nodes[i].is_running() && role(&self.nodes[i]).as_deref() == Some("master")
            })
            .unwrap_or_else(|| panic!("no primary serves the slot of {key:?}"))
    }

    /// Waits until every write each primary took so far has reached its
    /// replica (`WAIT 1`), so that a failover loses none of them.
    pub fn wait_replicated(&self) {
        for (i, n) in self.nodes.iter().enumerate() {
            if n.is_running() && role(n).as_deref() == Some("master") {
                let acked = n.command(&["WAIT", "1", "5000"]);
                assert_eq!(
                    acked.as_ref().ok().and_then(Reply::as_int),
                    Some(1),
                    "WAIT 1 on node {i}: {acked:?}"
                );
            }
        }
    }

    /// Kills primary `i` and waits until its replica is promoted and the
    /// cluster is whole again (`cluster_state:ok` on every running node).
    /// Returns the promoted node's index.
    pub fn fail_over(&mut self, i: usize) -> usize {
        let new = self.partner(i);
        self.nodes[i].kill();
        self.wait_for_promotion(new)
    }

    /// Waits until node `new` (the replica of a primary killed with
    /// [`node_mut`](Self::node_mut)) is promoted and the cluster is whole
    /// again; returns `new`.
    pub fn wait_for_promotion(&self, new: usize) -> usize {
        self.wait_until("the replica is promoted", || {
            role(&self.nodes[new]).as_deref() == Some("master") && self.all_ok()
        });
        new
    }

    /// A planned switch (`CLUSTER FAILOVER` sent to primary `i`'s
    /// replica): the replica takes over in step with its primary, which
    /// becomes its replica; no connection is dropped. Waits until both
    /// have switched and returns the new primary's index.
    pub fn switch_over(&mut self, i: usize) -> usize {
        let new = self.partner(i);
        let switched = || {
            role(&self.nodes[new]).as_deref() == Some("master")
                && role(&self.nodes[i]).as_deref() == Some("slave")
                && self.all_ok()
        };
        // A replica whose link is not up yet (a primary just demoted) lets
        // a manual failover time out: wait for the link, and ask again if
        // the switch does not happen.
        self.wait_until("the replica is in sync", || {
            self.nodes[new].replica_link_up()
        });
        self.wait_until("the replica takes over", || {
            let reply = self.nodes[new].command(&["CLUSTER", "FAILOVER"]);
            assert_eq!(reply, Ok(Reply::Status("OK".into())), "CLUSTER FAILOVER");
            let asked = Instant::now();
            while asked.elapsed() < Duration::from_secs(10) {
                if switched() {
                    return true;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            false
        });
        new
    }

    /// Whether every running node reports `cluster_state:ok`.
    fn all_ok(&self) -> bool {
        self.nodes
            .iter()
            .filter(|n| n.is_running())
            .all(|n| n.cluster_info("cluster_state").as_deref() == Some("ok"))
    }

    /// A running node.
    fn running(&self) -> &RedisServer {
        self.nodes
            .iter()
            .find(|n| n.is_running())
            .expect("a running node")
    }

    /// Waits until every running node reports `cluster_state:ok` and knows
    /// every other node.
    pub fn wait_ok(&self, timeout: Duration) {
        let ready = || {
            self.all_ok()
                && self
                    .nodes
                    .iter()
                    .filter(|n| n.is_running())
                    .all(|n| self.knows_all(n))
        };
        wait_until("the Redis Cluster is ready", timeout, ready, String::new);
    }

    /// `redis-cluster://127.0.0.1:P1?node=127.0.0.1:P2&node=127.0.0.1:P3`,
    /// or for a TLS cluster
    /// `rediss-cluster://USER:PASSWORD@localhost:P1?node=localhost:P2&…`.
    pub fn url(&self) -> String {
        let (scheme, host) = match self.nodes[0].flavor.tls {
            Some(_) => ("rediss-cluster", "localhost"),
            None => ("redis-cluster", "127.0.0.1"),
        };
        let auth = match self.nodes[0].flavor.tls {
            Some(_) => format!("{TLS_USER}:{TLS_PASSWORD}@"),
            None => String::new(),
        };
        let mut url = format!("{scheme}://{auth}{host}:{}", self.nodes[0].client_port());
        for (i, n) in self.nodes[1..].iter().enumerate() {
            url.push(if i == 0 { '?' } else { '&' });
            url.push_str(&format!("node={host}:{}", n.client_port()));
        }
        url
    }

    /// The CA certificate (PEM) of a TLS cluster's nodes.
    pub fn ca_pem(&self) -> Option<String> {
        self.nodes[0].ca_pem()
    }

    /// The nodes: the three primaries, then (started with replicas) their
    /// replicas.
    pub fn nodes(&self) -> &[RedisServer] {
        &self.nodes
    }

    /// One node, for fault injection.
    pub fn node_mut(&mut self, i: usize) -> &mut RedisServer {
        &mut self.nodes[i]
    }

    /// Sum of `total_commands_processed` over the running nodes.
    pub fn commands_processed(&self) -> u64 {
        self.nodes
            .iter()
            .filter(|n| n.is_running())
            .map(RedisServer::commands_processed)
            .sum()
    }

    /// Restarts one node on its port. It comes back empty but keeps its
    /// `nodes.conf` (node id and slots), so it rejoins the cluster.
    pub fn restart_node(&mut self, i: usize) {
        self.nodes[i].restart();
        self.wait_ok(Duration::from_secs(90));
    }

    /// Sends a command to the node serving `key`'s slot (following one
    /// MOVED redirection).
    pub fn command_for_key(&self, key: &str, args: &[&str]) -> Result<Reply, String> {
        match self.running().command(args)? {
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

/// A primary with a replica that takes over when it dies: behind a
/// Sentinel ([`RedisSentinel`]) or a shard of a cluster
/// ([`RedisCluster::start_with_replicas`]), for tests that run on both.
/// Nodes are named by their index (see [`node`](Self::node)).
pub trait Replicated {
    /// The URL to connect with.
    fn url(&self) -> String;
    /// One node.
    fn node(&self, i: usize) -> &RedisServer;
    /// One node, for fault injection.
    fn node_mut(&mut self, i: usize) -> &mut RedisServer;
    /// The node that is primary for `key` now.
    fn primary_of(&self, key: &str) -> usize;
    /// Its replica.
    fn replica_of(&self, key: &str) -> usize;
    /// Waits until every primary's writes so far reached its replica.
    fn wait_replicated(&self);
    /// Kills `key`'s primary and waits until its replica is promoted and
    /// acts as primary; returns the replica.
    fn fail_over_primary_of(&mut self, key: &str) -> usize;
}

impl Replicated for RedisSentinel {
    fn url(&self) -> String {
        RedisSentinel::url(self)
    }
    fn node(&self, i: usize) -> &RedisServer {
        &self.nodes[i]
    }
    fn node_mut(&mut self, i: usize) -> &mut RedisServer {
        &mut self.nodes[i]
    }
    fn primary_of(&self, _: &str) -> usize {
        self.primary_index()
    }
    fn replica_of(&self, _: &str) -> usize {
        1 - self.primary_index()
    }
    fn wait_replicated(&self) {
        RedisSentinel::wait_replicated(self);
    }
    fn fail_over_primary_of(&mut self, _: &str) -> usize {
        self.fail_over()
    }
}

impl Replicated for RedisCluster {
    fn url(&self) -> String {
        RedisCluster::url(self)
    }
    fn node(&self, i: usize) -> &RedisServer {
        &self.nodes[i]
    }
    fn node_mut(&mut self, i: usize) -> &mut RedisServer {
        &mut self.nodes[i]
    }
    fn primary_of(&self, key: &str) -> usize {
        self.primary_for_key(key)
    }
    fn replica_of(&self, key: &str) -> usize {
        self.partner(self.primary_for_key(key))
    }
    fn wait_replicated(&self) {
        RedisCluster::wait_replicated(self);
    }
    fn fail_over_primary_of(&mut self, key: &str) -> usize {
        let primary = self.primary_for_key(key);
        self.fail_over(primary)
    }
}

/// The first field of `ROLE` (`master`, `slave`), if the server answers.
pub fn role(server: &RedisServer) -> Option<String> {
    match server.command(&["ROLE"]) {
        Ok(Reply::Array(r)) => r.first().and_then(Reply::as_str).map(str::to_owned),
        _ => None,
    }
}

/// The service name under which [`RedisSentinel`]'s Sentinel knows its
/// primary.
pub const SENTINEL_SERVICE: &str = "tollgate";

/// A primary and one replica, watched by one Sentinel under the name
/// [`SENTINEL_SERVICE`]: the topology behind `redis-sentinel://` URLs. The
/// Sentinel declares a primary down after 500 ms without an answer and
/// promotes the replica, so [`fail_over`](Self::fail_over) takes a second
/// or two.
#[derive(Debug)]
pub struct RedisSentinel {
    nodes: Vec<RedisServer>,
    sentinel: RedisServer,
}

impl RedisSentinel {
    /// Starts the primary, its replica and the Sentinel, and waits until
    /// the replica is in sync and the Sentinel knows it (so it can fail
    /// over to it).
    pub fn start() -> Self {
        let primary = RedisServer::start();
        let port = primary.port.to_string();
        let replica = RedisServer::start_with_args(&["--replicaof", "127.0.0.1", &port]);
        let sentinel = RedisServer::spawn(Flavor {
            sentinel_of: Some(primary.port),
            ..Flavor::default()
        });
        let s = RedisSentinel {
            nodes: vec![primary, replica],
            sentinel,
        };
        s.wait_until("the replica is in sync and known to the Sentinel", || {
            let synced = s.nodes[1].replica_link_up();
            let known = matches!(
                s.sentinel.command(&["SENTINEL", "REPLICAS", SENTINEL_SERVICE]),
                Ok(Reply::Array(r)) if !r.is_empty()
            );
            synced && known
        });
        s
    }

    /// `redis-sentinel://127.0.0.1:PORT/0?sentinelServiceName=tollgate`.
    pub fn url(&self) -> String {
        format!(
            "redis-sentinel://127.0.0.1:{}/0?sentinelServiceName={SENTINEL_SERVICE}",
            self.sentinel.port
        )
    }

    /// The two data nodes (the first started as the primary).
    pub fn nodes(&self) -> &[RedisServer] {
        &self.nodes
    }

    /// One data node, for fault injection (pause a replica, say).
    pub fn node_mut(&mut self, i: usize) -> &mut RedisServer {
        &mut self.nodes[i]
    }

    /// The Sentinel process.
    pub fn sentinel(&self) -> &RedisServer {
        &self.sentinel
    }

    /// The index in [`nodes`](Self::nodes) of the node the Sentinel names
    /// primary now.
    pub fn primary_index(&self) -> usize {
        let port =
            match self
                .sentinel
                .command(&["SENTINEL", "GET-MASTER-ADDR-BY-NAME", SENTINEL_SERVICE])
            {
                Ok(Reply::Array(a)) if a.len() == 2 => a[1].as_int(),
                other => panic!("SENTINEL GET-MASTER-ADDR-BY-NAME: {other:?}"),
            };
        self.nodes
            .iter()
            .position(|n| port == Some(i64::from(n.port)))
            .unwrap_or_else(|| panic!("the Sentinel names port {port:?}, not one of its nodes"))
    }

    /// The node the Sentinel names primary now.
    pub fn primary(&self) -> &RedisServer {
        &self.nodes[self.primary_index()]
    }

    /// Waits until every write the primary took so far has reached the
    /// replica (`WAIT 1`), so that a failover loses none of them.
    pub fn wait_replicated(&self) {
        let primary = self.primary();
        let acked = primary.command(&["WAIT", "1", "5000"]);
        assert_eq!(
            acked.as_ref().ok().and_then(Reply::as_int),
            Some(1),
            "WAIT 1: {acked:?}"
        );
    }

    /// Kills the primary and waits until the Sentinel has promoted the
    /// other node and that node acts as primary. Returns its index.
    pub fn fail_over(&mut self) -> usize {
        let new = self.kill_primary();
        self.wait_for_promotion(new)
    }

    /// Kills the primary, and returns the index of the node the Sentinel
    /// will promote (see [`wait_for_promotion`](Self::wait_for_promotion)).
    pub fn kill_primary(&mut self) -> usize {
        let old = self.primary_index();
        self.nodes[old].kill();
        1 - old
    }

    /// A planned switch (`SENTINEL FAILOVER`): the Sentinel promotes the
    /// replica and makes the old primary its replica, closing the old
    /// primary's client connections. Waits until the new primary acts as
    /// one and returns its index.
    pub fn switch_over(&mut self) -> usize {
        let old = self.primary_index();
        // Refused while the Sentinel has no fresh report of a replica in
        // sync (it asks replicas every few seconds): ask again.
        self.wait_until("the Sentinel starts a failover", || {
            match self
                .sentinel
                .command(&["SENTINEL", "FAILOVER", SENTINEL_SERVICE])
            {
                Ok(Reply::Status(s)) if s == "OK" => true,
                Ok(Reply::Error(e)) if e.starts_with("NOGOODSLAVE") || e.starts_with("INPROG") => {
                    false
                }
                other => panic!("SENTINEL FAILOVER: {other:?}"),
            }
        });
        self.wait_for_promotion(1 - old)
    }

    /// Waits until `handle` writes to the primary the Sentinel names (after
    /// a switch, once the handle has moved): writes a probe key through it
    /// until that primary holds the key. Panics after 30 s.
    pub async fn wait_for_handle(&self, handle: &tollgate_redis::RedisHandle) {
        use tollgate_redis::fred::interfaces::KeysInterface;
        let started = Instant::now();
        for n in 0.. {
            let key = format!("testkit:probe:{n}");
            let written = key.clone();
            let _ = handle
                .call(|c| async move { c.set::<(), _, _>(written, 1, None, None, false).await })
                .await;
            if self.primary().command(&["GET", &key]) == Ok(Reply::Bulk("1".into())) {
                return;
            }
            assert!(
                started.elapsed() < Duration::from_secs(30),
                "the handle never wrote to the primary the Sentinel names"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Waits until the Sentinel has promoted node `new` and it acts as
    /// primary; returns `new`.
    pub fn wait_for_promotion(&self, new: usize) -> usize {
        self.wait_until("the Sentinel promotes the replica", || {
            let named = matches!(
                self.sentinel.command(&["SENTINEL", "GET-MASTER-ADDR-BY-NAME", SENTINEL_SERVICE]),
                Ok(Reply::Array(a)) if a.len() == 2
                    && a[1].as_int() == Some(i64::from(self.nodes[new].port))
            );
            named && role(&self.nodes[new]) == Some("master".to_owned())
        });
        new
    }

    fn wait_until(&self, what: &str, done: impl FnMut() -> bool) {
        wait_until(what, TOPOLOGY_WAIT, done, || {
            format!("; Sentinel log: {}", self.sentinel.log_tail())
        });
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

    #[test]
    fn cluster_replicas_take_over_from_their_primaries() {
        let mut c = RedisCluster::start_with_replicas();
        assert_eq!(c.nodes().len(), 6);
        assert_eq!(c.url().matches("node=").count(), 5);
        let p = c.primary_for_key("foo");
        assert!(p < 3);
        assert_eq!(
            c.command_for_key("foo", &["SET", "foo", "1"]),
            Ok(Reply::Status("OK".into()))
        );
        c.wait_replicated();
        let new = c.fail_over(p);
        assert_eq!(new, p + 3);
        assert_eq!(c.primary_for_key("foo"), new);
        assert_eq!(
            c.command_for_key("foo", &["GET", "foo"]),
            Ok(Reply::Bulk("1".into())),
            "replicated before the failover"
        );
        // A planned switch in another shard.
        let other = (p + 1) % 3;
        let key = (0..)
            .map(|n| format!("k{n}"))
            .find(|k| c.primary_for_key(k) == other)
            .expect("a key of the other shard");
        assert_eq!(c.switch_over(other), other + 3);
        assert_eq!(c.primary_for_key(&key), other + 3);
        assert_eq!(role(&c.nodes()[other]).as_deref(), Some("slave"));
    }

    #[test]
    fn sentinel_fails_over_to_the_replica() {
        let mut s = RedisSentinel::start();
        assert!(s.url().starts_with("redis-sentinel://127.0.0.1:"));
        assert_eq!(s.primary_index(), 0);
        let primary = s.primary();
        assert_eq!(
            primary.command(&["SET", "k", "v"]),
            Ok(Reply::Status("OK".into()))
        );
        s.wait_replicated();
        assert_eq!(s.fail_over(), 1);
        assert_eq!(s.primary_index(), 1);
        assert_eq!(
            s.primary().command(&["GET", "k"]),
            Ok(Reply::Bulk("v".into()))
        );
        assert_eq!(
            s.primary().command(&["SET", "k", "w"]),
            Ok(Reply::Status("OK".into())),
            "the promoted replica takes writes"
        );
    }

    #[test]
    fn sentinel_switches_over_and_keeps_the_old_primary_as_replica() {
        let mut s = RedisSentinel::start();
        assert_eq!(s.switch_over(), 1);
        let started = Instant::now();
        while role(&s.nodes()[0]).as_deref() != Some("slave") {
            assert!(started.elapsed() < Duration::from_secs(30), "demoted");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}
