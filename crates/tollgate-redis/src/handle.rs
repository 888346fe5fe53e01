use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use fred::clients::{Client, Pool};
use fred::interfaces::{ClientLike, ClusterInterface, EventInterface, KeysInterface};
use fred::types::config::{ConnectionConfig, PerformanceConfig};
use fred::types::{FromValue, MultipleKeys, MultipleValues};
use tokio::task::JoinHandle;

use crate::breaker::{BreakerState, CircuitBreaker};
use crate::config::{RedisConfig, Topology};
use crate::error::{Error, is_outage_error};
use crate::health::{
    HealthReport, HealthStatus, LayerHealth, LayerMode, LocalCacheHealth, ServerSettings,
};
use crate::keys::KeySpace;
use crate::script::Script;

/// The settings a fred client is built from.
#[derive(Clone)]
struct Blueprint {
    config: fred::types::config::Config,
    perf: PerformanceConfig,
    conn: ConnectionConfig,
    policy: fred::types::config::ReconnectPolicy,
}

impl Blueprint {
    fn builder(&self) -> fred::types::Builder {
        let mut b = fred::types::Builder::from_config(self.config.clone());
        b.set_performance_config(self.perf.clone())
            .set_connection_config(self.conn.clone())
            .set_policy(self.policy.clone());
        b
    }
}

/// The one Redis client every layer shares: a fred pool, a key namespace,
/// a per-command deadline and a circuit breaker. Cheap to clone.
///
/// Every command a layer sends goes through [`run`](Self::run) (or a helper
/// built on it), which refuses at once while the breaker is open, cuts the
/// command off at the deadline, and feeds the breaker.
#[derive(Clone)]
pub struct RedisHandle {
    inner: Arc<Inner>,
}

struct Inner {
    pool: Pool,
    /// What the pool was built from, for a dedicated connection
    /// ([`dedicated_client`](RedisHandle::dedicated_client)).
    blueprint: Blueprint,
    namespace: String,
    topology: Topology,
    deadline: Duration,
    probe_interval: Duration,
    breaker: CircuitBreaker,
    prober: AtomicBool,
    scripts_reloaded: AtomicU64,
    layers: Mutex<Vec<&'static str>>,
    /// Tracked connections, for the health report: their prefixes and
    /// their state (not kept alive by the handle).
    tracked: Mutex<Vec<(Vec<String>, Weak<crate::tracking::Inner>)>>,
    /// Dedicated clients that follow the primary on a Sentinel switch,
    /// while their [`FollowPrimary`] guard lives.
    followers: Mutex<Vec<(Weak<()>, Client)>>,
    /// Clients connected to the Sentinels, announcing switches.
    watchers: Mutex<Vec<Client>>,
    /// Whether the health report's warnings were logged (once).
    warned: AtomicBool,
    tasks: Mutex<Vec<JoinHandle<()>>>,
}

impl Inner {
    /// A Sentinel names `to` primary: reconnects every client (the pool's
    /// and the followers) connected elsewhere. A reconnection asks a
    /// Sentinel for the primary again.
    fn primary_moved(&self, to: &fred::types::config::Server) {
        let mut clients: Vec<Client> = self.pool.clients().to_vec();
        if let Ok(mut f) = self.followers.lock() {
            f.retain(|(w, _)| w.strong_count() > 0);
            clients.extend(f.iter().map(|(_, c)| c.clone()));
        }
        let mut moving = 0;
        for client in clients {
            if crate::sentinel::elsewhere(&client, to) {
                moving += 1;
                tokio::spawn(async move {
                    let _ = client.force_reconnection().await;
                });
            }
        }
        if moving > 0 {
            tracing::warn!(namespace = %self.namespace, primary = %to, clients = moving, "Redis Sentinel switched the primary: reconnecting to it");
        }
    }
}

/// Closes `client` (a [`dedicated_client`](RedisHandle::dedicated_client))
/// from a `Drop`: `QUIT` in a task of its own, which stops fred's
/// reconnect loop. Does nothing outside a Tokio runtime.
pub fn quit_in_background(client: &Client) {
    if let Ok(rt) = tokio::runtime::Handle::try_current() {
        let client = client.clone();
        rt.spawn(async move {
            let _ = client.quit().await;
        });
    }
}

/// Keeps a dedicated client following a Sentinel's switch of primary:
/// see [`RedisHandle::follow_primary`].
#[derive(Debug)]
#[must_use = "the client follows the primary only while the guard lives"]
pub struct FollowPrimary {
    _token: Arc<()>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        if let Ok(tasks) = self.tasks.get_mut() {
            for t in tasks.drain(..) {
                t.abort();
            }
        }
        // Stop fred's reconnect loops; nothing can use this pool any more.
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            let pool = self.pool.clone();
            let watchers = self
                .watchers
                .get_mut()
                .map(std::mem::take)
                .unwrap_or_default();
            rt.spawn(async move {
                let _ = pool.quit().await;
                for w in watchers {
                    let _ = w.quit().await;
                }
            });
        }
    }
}

impl std::fmt::Debug for RedisHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisHandle")
            .field("namespace", &self.inner.namespace)
            .field("topology", &self.inner.topology)
            .field("deadline", &self.inner.deadline)
            .field("breaker", &self.inner.breaker.state())
            .finish()
    }
}

impl RedisHandle {
    /// Connects the pool.
    ///
    /// Returns an error only for what retrying cannot fix: a bad URL or
    /// configuration, rejected credentials, a broken TLS setup. When Redis
    /// is merely unreachable the handle is returned **degraded** (breaker
    /// open): layers serve from their fallbacks and the handle recovers by
    /// itself when Redis appears.
    pub async fn connect(config: RedisConfig) -> Result<Self, Error> {
        config.validate()?;
        let (fred_cfg, topology) = config.fred_config()?;
        let perf = PerformanceConfig {
            // fred drops what we stopped waiting for, so its queue cannot
            // grow without bound while Redis is frozen.
            default_command_timeout: config.deadline.max(Duration::from_millis(1)),
            ..PerformanceConfig::default()
        };
        let conn = ConnectionConfig {
            connection_timeout: config.connect_timeout,
            internal_command_timeout: config.connect_timeout,
            max_command_attempts: 2,
            max_command_buffer_len: 100_000,
            ..ConnectionConfig::default()
        };
        let blueprint = Blueprint {
            config: fred_cfg,
            perf,
            conn,
            policy: config.reconnect(),
        };
        let pool = blueprint
            .builder()
            .build_pool(config.pool_size)
            .map_err(|e| Error::Config {
                field: "url",
                reason: e.details().to_owned(),
            })?;

        let breaker = CircuitBreaker::new(config.namespace.clone(), config.failure_threshold);
        let mut errors: Vec<_> = pool.clients().iter().map(|c| c.error_rx()).collect();
        let _connection_task = pool.connect();

        let started = Instant::now();
        let degraded = loop {
            if pool.clients().iter().all(|c| c.is_connected()) {
                break None;
            }
            let mut unreachable = false;
            for rx in &mut errors {
                while let Ok((e, _)) = rx.try_recv() {
                    if let Some(fatal) = fatal_startup_error(&e) {
                        let _ = pool.quit().await;
                        return Err(fatal);
                    }
                    unreachable |= is_outage_error(&e);
                }
            }
            if unreachable {
                // Refused or unreachable: start degraded right away.
                break Some("Redis is unreachable");
            }
            if started.elapsed() >= config.startup_timeout {
                break Some("Redis did not answer within the startup timeout");
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        };

        let handle = RedisHandle {
            inner: Arc::new(Inner {
                pool,
                blueprint,
                namespace: config.namespace.clone(),
                topology,
                deadline: config.deadline,
                probe_interval: config.probe_interval,
                breaker,
                prober: AtomicBool::new(false),
                scripts_reloaded: AtomicU64::new(0),
                layers: Mutex::new(Vec::new()),
                tracked: Mutex::new(Vec::new()),
                followers: Mutex::new(Vec::new()),
                watchers: Mutex::new(Vec::new()),
                warned: AtomicBool::new(false),
                tasks: Mutex::new(Vec::new()),
            }),
        };
        handle.watch_connections();
        handle.watch_sentinels()?;
        if degraded.is_none() {
            handle.warn_if_old();
        }
        if let Some(reason) = degraded {
            tracing::warn!(namespace = %handle.inner.namespace, reason, "starting degraded: Redis is unreachable, layers use their in-process fallbacks until it answers");
            handle.inner.breaker.trip(reason);
            handle.start_prober();
        }
        Ok(handle)
    }

    /// Logs, at connect, what fails on a Redis older than a layer needs
    /// (the layers are not known yet: every one is named). fred read the
    /// version when it connected: no command is sent.
    fn warn_if_old(&self) {
        let Some(version) = self.client().server_version() else {
            return;
        };
        for warning in crate::health::too_old(&version.to_string(), |_| true) {
            tracing::warn!(namespace = %self.inner.namespace, "{warning}");
        }
    }

    /// The fred pool, for commands tollgate has no helper for. Commands sent
    /// on it directly bypass the deadline and the breaker: wrap them in
    /// [`run`](Self::run).
    pub fn pool(&self) -> &Pool {
        &self.inner.pool
    }

    /// A new client with the pool's settings (URL, TLS, credentials,
    /// timeouts, reconnect policy) and a connection of its own, speaking
    /// RESP3 when `resp3`; not connected yet. For what needs its own
    /// connection, such as client tracking
    /// ([`TrackedConnection`](crate::TrackedConnection)); commands on it
    /// still go through [`run`](Self::run) for the deadline and the
    /// breaker.
    pub fn dedicated_client(&self, resp3: bool) -> Result<Client, Error> {
        let mut b = self.inner.blueprint.clone();
        if resp3 {
            b.config.version = fred::types::RespVersion::RESP3;
        }
        // Room for bursts of pushed messages (client tracking): a listener
        // that falls behind the default 32 loses them all.
        b.perf.broadcast_channel_capacity = b.perf.broadcast_channel_capacity.max(1024);
        b.builder().build().map_err(|e| Error::Config {
            field: "url",
            reason: e.details().to_owned(),
        })
    }

    /// The next client of the pool.
    pub fn client(&self) -> &Client {
        self.inner.pool.next()
    }

    /// The namespace every key starts with.
    pub fn namespace(&self) -> &str {
        &self.inner.namespace
    }

    /// Key builder for one layer: `{namespace}:{layer}:...`.
    pub fn keys(&self, layer: &str) -> KeySpace {
        KeySpace::new(&self.inner.namespace, layer)
    }

    /// The per-command deadline.
    pub fn deadline(&self) -> Duration {
        self.inner.deadline
    }

    /// Standalone, cluster or sentinel.
    pub fn topology(&self) -> &Topology {
        &self.inner.topology
    }

    /// Whether keys must be grouped by slot (Redis Cluster).
    pub fn is_cluster(&self) -> bool {
        self.inner.topology == Topology::Cluster
    }

    /// The shared circuit breaker.
    pub fn breaker(&self) -> &CircuitBreaker {
        &self.inner.breaker
    }

    /// Whether commands are currently sent to Redis (breaker closed). Layers
    /// check this to pick their store without paying for a refused call.
    #[inline]
    pub fn is_available(&self) -> bool {
        self.inner.breaker.allows()
    }

    /// How many times a script was missing from Redis's cache and was
    /// reloaded (after a restart or failover).
    pub fn scripts_reloaded(&self) -> u64 {
        self.inner.scripts_reloaded.load(Ordering::Relaxed)
    }

    /// Declares that a layer uses this handle, so that [`health`](Self::health)
    /// reports its mode.
    pub fn register_layer(&self, name: &'static str) {
        if let Ok(mut l) = self.inner.layers.lock()
            && !l.contains(&name)
        {
            l.push(name);
        }
    }

    /// The names of the registered layers.
    fn registered_layers(&self) -> Vec<&'static str> {
        self.inner
            .layers
            .lock()
            .map(|l| l.clone())
            .unwrap_or_default()
    }

    /// Lists a tracked connection in the health report while it exists.
    pub(crate) fn register_tracked(
        &self,
        prefixes: Vec<String>,
        state: Weak<crate::tracking::Inner>,
    ) {
        if let Ok(mut t) = self.inner.tracked.lock() {
            t.retain(|(_, w)| w.strong_count() > 0);
            t.push((prefixes, state));
        }
    }

    /// Runs `fut` under the handle's rules: refused with
    /// [`Error::Unavailable`] while the breaker is open, cut off with
    /// [`Error::Timeout`] at the deadline, outcome fed to the breaker.
    pub async fn run<T, F>(&self, fut: F) -> Result<T, Error>
    where
        F: Future<Output = Result<T, Error>>,
    {
        if !self.inner.breaker.allows() {
            return Err(Error::Unavailable);
        }
        self.guarded(fut).await
    }

    /// [`run`](Self::run) for a closure over one pooled fred client (a
    /// cheap clone).
    ///
    /// ```no_run
    /// # async fn f(handle: tollgate_redis::RedisHandle) -> Result<(), tollgate_redis::Error> {
    /// use fred::interfaces::KeysInterface;
    /// let n: i64 = handle.call(|c| async move { c.incr("counter").await }).await?;
    /// # Ok(()) }
    /// ```
    pub async fn call<T, F, Fut>(&self, f: F) -> Result<T, Error>
    where
        F: FnOnce(Client) -> Fut,
        Fut: Future<Output = Result<T, fred::error::Error>>,
    {
        if !self.inner.breaker.allows() {
            return Err(Error::Unavailable);
        }
        let client = self.inner.pool.next().clone();
        self.guarded(async move { f(client).await.map_err(Error::Redis) })
            .await
    }

    /// Runs a script with EVALSHA (EVAL on `NOSCRIPT`), under the deadline
    /// and the breaker. All `keys` must share one hash slot.
    pub async fn eval<R, K, V>(&self, script: &Script, keys: K, args: V) -> Result<R, Error>
    where
        R: FromValue,
        K: Into<MultipleKeys>,
        V: TryInto<MultipleValues>,
        V::Error: Into<fred::error::Error>,
    {
        if !self.inner.breaker.allows() {
            return Err(Error::Unavailable);
        }
        let conn = crate::coalesce::BatchConn::new(self.client(), self.reload_counter());
        self.guarded(conn.eval(script, keys, args)).await
    }

    pub(crate) fn reload_counter(&self) -> &AtomicU64 {
        &self.inner.scripts_reloaded
    }

    async fn guarded<T, F>(&self, fut: F) -> Result<T, Error>
    where
        F: Future<Output = Result<T, Error>>,
    {
        match tokio::time::timeout(self.inner.deadline, fut).await {
            Ok(Ok(v)) => {
                self.inner.breaker.record_success();
                Ok(v)
            }
            Ok(Err(e)) => {
                // fred's own command timeout fires with ours: report one kind.
                let e = match e {
                    Error::Redis(f) if *f.kind() == fred::error::ErrorKind::Timeout => {
                        Error::Timeout(self.inner.deadline)
                    }
                    e => e,
                };
                self.observe(&e);
                Err(e)
            }
            Err(_) => {
                let e = Error::Timeout(self.inner.deadline);
                self.observe(&e);
                Err(e)
            }
        }
    }

    /// Feeds an error to the breaker (outage errors only) and starts the
    /// prober when it opens. Used by callers that send commands themselves.
    pub fn observe(&self, e: &Error) {
        if matches!(e, Error::Unavailable) {
            return;
        }
        if e.refuses_writes() {
            // A state of the server, not a lost reply: open at once. The
            // probe then waits for a write to succeed.
            let failed = self.inner.breaker.record_failure(false);
            if self.inner.breaker.trip("Redis refuses writes") || failed {
                self.start_prober();
            }
        } else if e.is_outage() {
            if self
                .inner
                .breaker
                .record_failure(matches!(e, Error::Timeout(_)))
            {
                self.start_prober();
            }
        } else {
            // Redis answered, with an error of its own: it is up.
            self.inner.breaker.record_success();
        }
    }

    /// Opens the breaker on a dropped connection, without waiting for
    /// requests to time out one by one.
    fn watch_connections(&self) {
        let weak = Arc::downgrade(&self.inner);
        let mut tasks = Vec::new();
        for client in self.inner.pool.clients() {
            let mut rx = client.error_rx();
            let weak = weak.clone();
            tasks.push(tokio::spawn(async move {
                loop {
                    let (e, _server) = match rx.recv().await {
                        Ok(v) => v,
                        Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => continue,
                        Err(_) => return,
                    };
                    let Some(inner) = weak.upgrade() else { return };
                    if matches!(e.kind(), fred::error::ErrorKind::IO) {
                        let handle = RedisHandle { inner };
                        if handle.inner.breaker.trip("connection to Redis lost") {
                            handle.start_prober();
                        }
                    }
                }
            }));
        }
        if let Ok(mut t) = self.inner.tasks.lock() {
            t.extend(tasks);
        }
    }

    /// With Sentinel: watches each Sentinel of the URL for a switch of
    /// primary (see [`crate::sentinel`]).
    fn watch_sentinels(&self) -> Result<(), Error> {
        let weak = Arc::downgrade(&self.inner);
        let moved = Arc::new(move |to: fred::types::config::Server| {
            if let Some(inner) = weak.upgrade() {
                inner.primary_moved(&to);
            }
        });
        let watchers = crate::sentinel::watch(
            &self.inner.blueprint.config,
            &self.inner.blueprint.policy,
            moved,
        )
        .map_err(|e| Error::Config {
            field: "url",
            reason: e.details().to_owned(),
        })?;
        if let (Ok(mut w), Ok(mut t)) = (self.inner.watchers.lock(), self.inner.tasks.lock()) {
            for (client, task) in watchers {
                w.push(client);
                t.push(task);
            }
        }
        Ok(())
    }

    /// Makes `client` (a [`dedicated_client`](Self::dedicated_client))
    /// follow a Sentinel's switch of primary at once, like the pool, while
    /// the returned guard lives. Without it, a switch that drops no
    /// connection reaches the client only when a Sentinel demotes the old
    /// primary, seconds later. Does nothing for other topologies.
    pub fn follow_primary(&self, client: &Client) -> FollowPrimary {
        let token = Arc::new(());
        if self.inner.topology == Topology::Sentinel
            && let Ok(mut f) = self.inner.followers.lock()
        {
            f.retain(|(w, _)| w.strong_count() > 0);
            f.push((Arc::downgrade(&token), client.clone()));
        }
        FollowPrimary { _token: token }
    }

    fn start_prober(&self) {
        if self.inner.prober.swap(true, Ordering::AcqRel) {
            return;
        }
        let weak: Weak<Inner> = Arc::downgrade(&self.inner);
        let interval = self.inner.probe_interval;
        let task = tokio::spawn(async move {
            loop {
                tokio::time::sleep(interval).await;
                let Some(inner) = weak.upgrade() else { return };
                if inner.breaker.state() == BreakerState::Closed {
                    inner.prober.store(false, Ordering::Release);
                    return;
                }
                inner.breaker.begin_probe();
                let timeout = (inner.deadline * 2).max(Duration::from_millis(100));
                if probe(&inner, timeout).await {
                    inner.breaker.close();
                    inner.prober.store(false, Ordering::Release);
                    // A close racing a new failure may have re-opened it.
                    if inner.breaker.state() != BreakerState::Closed {
                        RedisHandle { inner }.start_prober();
                    }
                    return;
                }
                inner.breaker.probe_failed();
            }
        });
        if let Ok(mut t) = self.inner.tasks.lock() {
            t.retain(|t| !t.is_finished());
            t.push(task);
        }
    }

    /// Connection state, latency, server version and memory, breaker state
    /// and counters, and each registered layer's mode. Sends PING and INFO
    /// even while the breaker is open (each bounded by the deadline).
    pub async fn health(&self) -> HealthReport {
        let client = self.inner.pool.next();
        let deadline = self.inner.deadline.max(Duration::from_millis(100));
        let started = Instant::now();
        let ping = tokio::time::timeout(deadline, client.ping::<String>(None)).await;
        let latency = started.elapsed();
        let connected = matches!(ping, Ok(Ok(_)));
        let mut settings = ServerSettings::default();
        if connected
            && let Ok(Ok(info)) = tokio::time::timeout(deadline, client.info::<String>(None)).await
        {
            settings = ServerSettings::from_info(&info);
        }
        let registered = self.registered_layers();
        let warnings = settings.warnings(&registered);
        if !warnings.is_empty() && !self.inner.warned.swap(true, Ordering::Relaxed) {
            for w in &warnings {
                tracing::warn!(namespace = %self.inner.namespace, "Redis settings: {w}");
            }
        }
        let breaker = self.inner.breaker.state();
        let mode = if breaker == BreakerState::Closed {
            LayerMode::Redis
        } else {
            LayerMode::Fallback
        };
        let layers = registered
            .iter()
            .map(|name| LayerHealth {
                name: (*name).to_owned(),
                mode,
            })
            .collect();
        let local_caches = self
            .inner
            .tracked
            .lock()
            .map(|t| {
                // Dropped ones are skipped here and pruned at the next
                // registration.
                t.iter()
                    .filter_map(|(prefixes, w)| {
                        Some(LocalCacheHealth {
                            prefixes: prefixes.clone(),
                            live: w.upgrade()?.is_live(),
                        })
                    })
                    .collect()
            })
            .unwrap_or_default();
        HealthReport {
            status: if connected && breaker == BreakerState::Closed {
                HealthStatus::Healthy
            } else {
                HealthStatus::Degraded
            },
            connected,
            latency_ms: connected.then_some(latency.as_secs_f64() * 1e3),
            server_version: settings.version,
            used_memory_bytes: settings.used_memory,
            maxmemory_bytes: settings.maxmemory,
            maxmemory_policy: settings.policy,
            appendonly: settings.appendonly,
            warnings,
            topology: Some(self.inner.topology.clone()),
            namespace: self.inner.namespace.clone(),
            breaker: Some(breaker),
            breaker_opened: self.inner.breaker.times_opened(),
            errors: self.inner.breaker.errors(),
            timeouts: self.inner.breaker.timeouts(),
            scripts_reloaded: self.scripts_reloaded(),
            layers,
            local_caches,
        }
    }
}

/// Whether Redis is usable again: every client of the pool gets a PONG,
/// and a write succeeds at every primary (a Redis that answers may still
/// refuse writes: see [`Error::refuses_writes`]).
async fn probe(inner: &Inner, timeout: Duration) -> bool {
    for client in inner.pool.clients() {
        match tokio::time::timeout(timeout, client.ping::<String>(None)).await {
            Ok(Ok(_)) => {}
            _ => return false,
        }
    }
    let client = inner.pool.next();
    let keys = KeySpace::new(&inner.namespace, "health");
    let probes = match client.cached_cluster_state() {
        Some(state) if inner.topology == Topology::Cluster => state
            .unique_primary_nodes()
            .iter()
            .map(|p| crate::keys::key_in_slots(&keys, "probe", |s| state.get_server(s) == Some(p)))
            .collect::<Option<Vec<_>>>(),
        _ => Some(vec![keys.key(&["probe"])]),
    };
    let Some(probes) = probes else { return false };
    for key in probes {
        let set = client.set::<(), _, _>(
            key,
            1,
            Some(fred::types::Expiration::PX(10_000)),
            None,
            false,
        );
        match tokio::time::timeout(timeout, set).await {
            Ok(Ok(())) => {}
            // Refused for another reason (an ACL without this key): Redis
            // takes writes, only not this one.
            Ok(Err(e)) if !crate::error::refuses_writes(&e) && !is_outage_error(&e) => {}
            _ => return false,
        }
    }
    true
}

/// Errors at start-up that retrying cannot fix.
fn fatal_startup_error(e: &fred::error::Error) -> Option<Error> {
    use fred::error::ErrorKind as K;
    let d = e.details();
    match e.kind() {
        K::Auth => Some(Error::Auth { source: e.clone() }),
        _ if d.contains("WRONGPASS") || d.contains("NOAUTH") || d.contains("NOPERM") => {
            Some(Error::Auth { source: e.clone() })
        }
        K::Tls => Some(Error::Tls {
            reason: d.to_owned(),
        }),
        // rustls failures surface as IO errors: a certificate nobody trusts
        // will not become trusted by retrying.
        _ if d.contains("certificate") || d.contains("InvalidCertificate") => Some(Error::Tls {
            reason: d.to_owned(),
        }),
        K::Config | K::Url => Some(Error::Config {
            field: "url",
            reason: d.to_owned(),
        }),
        _ => None,
    }
}
