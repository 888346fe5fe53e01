//! Shared helpers: topologies, scripts priming, an axum app and a client
//! with a one-cookie jar.
#![allow(dead_code)]

use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::Path;
use axum::routing::{get, post};
use http::{Request, StatusCode};
use tollgate_redis::{RedisConfig, RedisHandle};
use tollgate_session::{Session, SessionLayer, Sessions};
use tollgate_testkit::{RedisCluster, RedisServer, Reply};
use tower::ServiceExt;

pub const SECRET: [u8; 32] = [7u8; 32];

/// A random session id hash, as the layer would key a record.
pub fn id_hash() -> String {
    let mut b = [0u8; 32];
    rand::RngCore::fill_bytes(&mut rand::rng(), &mut b);
    tollgate_redis::hex_lower(&b)
}

/// Timeouts no test outlives: idle 10 min, absolute 1 h, touch after 1 min.
pub fn long_timeouts() -> tollgate_session::Timeouts {
    tollgate_session::Timeouts {
        idle: Duration::from_secs(600),
        absolute: Duration::from_secs(3600),
        touch_after: Duration::from_secs(60),
    }
}

/// Instantiates `async fn name(topo: Topo)` once per Redis topology.
#[macro_export]
macro_rules! redis_tests {
    ($($name:ident),* $(,)?) => {
        mod standalone {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name($crate::common::Topo::standalone()).await;
                }
            )*
        }
        mod cluster {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name($crate::common::Topo::cluster()).await;
                }
            )*
        }
    };
}

/// A running Redis, standalone or cluster.
pub enum Topo {
    Standalone(RedisServer),
    Cluster(RedisCluster),
}

const SCRIPTS: [&str; 4] = [
    include_str!("../../src/store/save.lua"),
    include_str!("../../src/store/save_fast.lua"),
    include_str!("../../src/store/index_add.lua"),
    include_str!("../../src/store/index_list.lua"),
];

impl Topo {
    pub fn standalone() -> Self {
        Topo::Standalone(RedisServer::start())
    }

    pub fn cluster() -> Self {
        Topo::Cluster(RedisCluster::start())
    }

    pub fn url(&self) -> String {
        match self {
            Topo::Standalone(s) => s.url(),
            Topo::Cluster(c) => c.url(),
        }
    }

    pub fn servers(&self) -> Vec<&RedisServer> {
        match self {
            Topo::Standalone(s) => vec![s],
            Topo::Cluster(c) => c.nodes().iter().collect(),
        }
    }

    /// Commands processed so far, all nodes.
    pub fn commands(&self) -> u64 {
        match self {
            Topo::Standalone(s) => s.commands_processed(),
            Topo::Cluster(c) => c.commands_processed(),
        }
    }

    /// Loads every script on every node, so round-trip counts do not see
    /// a NOSCRIPT → EVAL retry.
    pub fn prime_scripts(&self) {
        for s in self.servers() {
            for body in SCRIPTS {
                s.command(&["SCRIPT", "LOAD", body]).expect("SCRIPT LOAD");
            }
        }
    }

    /// Every key on every node, by SCAN.
    pub fn all_keys(&self) -> Vec<(usize, String)> {
        let mut out = Vec::new();
        for (i, s) in self.servers().into_iter().enumerate() {
            let mut cursor = "0".to_owned();
            loop {
                match s
                    .command(&["SCAN", &cursor, "COUNT", "1000"])
                    .expect("SCAN")
                {
                    Reply::Array(parts) if parts.len() == 2 => {
                        cursor = parts[0].as_str().unwrap().to_owned();
                        if let Reply::Array(keys) = &parts[1] {
                            out.extend(
                                keys.iter()
                                    .filter_map(|k| k.as_str().map(|k| (i, k.to_owned()))),
                            );
                        }
                    }
                    other => panic!("SCAN: {other:?}"),
                }
                if cursor == "0" {
                    break;
                }
            }
        }
        out
    }

    /// A key's value as text (string or sorted-set members).
    pub fn dump(&self, node: usize, key: &str) -> String {
        let s = self.servers()[node];
        match s.command(&["TYPE", key]).expect("TYPE").as_str() {
            Some("string") => s
                .command(&["GET", key])
                .expect("GET")
                .as_str()
                .unwrap_or_default()
                .to_owned(),
            Some("zset") => format!("{:?}", s.command(&["ZRANGE", key, "0", "-1", "WITHSCORES"])),
            other => format!("<{other:?}>"),
        }
    }

    /// The raw stored value of a key, searched on every node.
    pub fn get(&self, key: &str) -> Option<String> {
        self.servers()
            .into_iter()
            .find_map(|s| match s.command(&["GET", key]) {
                Ok(Reply::Bulk(v)) => Some(v),
                _ => None,
            })
    }

    pub fn pttl(&self, key: &str) -> Option<i64> {
        self.servers()
            .into_iter()
            .find_map(|s| match s.command(&["PTTL", key]) {
                Ok(Reply::Int(n)) if n >= 0 => Some(n),
                _ => None,
            })
    }
}

pub async fn connect(url: &str) -> RedisHandle {
    let handle = RedisHandle::connect(
        RedisConfig::from_url(url)
            .namespace("t")
            .deadline(Duration::from_secs(2)),
    )
    .await
    .expect("connect");
    assert!(handle.is_available(), "Redis should be up at start");
    handle
}

pub fn redis_sessions(h: RedisHandle) -> Sessions {
    Sessions::builder().redis(h).secret(SECRET).build().unwrap()
}

async fn get_key(
    session: Session,
    Path(key): Path<String>,
) -> Result<String, tollgate_session::Error> {
    Ok(match session.get::<serde_json::Value>(&key).await? {
        Some(v) => v.to_string(),
        None => "none".into(),
    })
}

async fn set_key(
    session: Session,
    Path((key, value)): Path<(String, String)>,
) -> Result<&'static str, tollgate_session::Error> {
    session.insert(&key, &value).await?;
    Ok("ok")
}

/// The test application.
pub fn app(sessions: Sessions) -> Router {
    Router::new()
        .route("/noop", get(|| async { "ok" }))
        .route("/get/{key}", get(get_key))
        .route("/set/{key}/{value}", post(set_key))
        .route(
            "/login/{user}",
            post(|session: Session, Path(user): Path<String>| async move {
                session.rotate_id().await?;
                session.bind_user(&user).await?;
                session.insert("user", &user).await?;
                Ok::<_, tollgate_session::Error>("ok")
            }),
        )
        .route(
            "/logout",
            post(|session: Session| async move {
                session.destroy().await?;
                Ok::<_, tollgate_session::Error>("ok")
            }),
        )
        .route(
            "/read-then-logout",
            post(|session: Session| async move {
                let _: Option<String> = session.get("user").await?;
                session.destroy().await?;
                Ok::<_, tollgate_session::Error>("ok")
            }),
        )
        .route(
            "/whoami",
            get(|session: Session| async move {
                Ok::<_, tollgate_session::Error>(
                    session
                        .user_id()
                        .await?
                        .unwrap_or_else(|| "anonymous".into()),
                )
            }),
        )
        .route(
            "/sessions",
            get(|session: Session| async move {
                let list = session.user_sessions().await?;
                Ok::<_, tollgate_session::Error>(serde_json::to_string(&list).unwrap())
            }),
        )
        .route(
            "/revoke-others",
            post(|session: Session| async move {
                Ok::<_, tollgate_session::Error>(session.revoke_other_sessions().await?.to_string())
            }),
        )
        .layer(SessionLayer::new(sessions))
}

/// A response, read.
#[derive(Debug)]
pub struct Res {
    pub status: StatusCode,
    pub body: String,
    pub set_cookie: Vec<String>,
}

/// A browser with one cookie.
#[derive(Clone)]
pub struct Client {
    pub app: Router,
    pub cookie: Option<String>,
}

impl Client {
    pub fn new(app: Router) -> Self {
        Client { app, cookie: None }
    }

    /// The cookie's value (`name=value` → `value`).
    pub fn cookie_value(&self) -> Option<String> {
        self.cookie
            .as_deref()
            .and_then(|c| c.split_once('='))
            .map(|(_, v)| v.to_owned())
    }

    pub async fn send(&mut self, method: &str, path: &str) -> Res {
        let res = send_with(&self.app, method, path, self.cookie.as_deref()).await;
        self.absorb(&res);
        res
    }

    /// Applies a response's Set-Cookie headers to the jar, as a browser
    /// does when that response arrives (also for responses to requests
    /// sent with [`send_with`]).
    pub fn absorb(&mut self, res: &Res) {
        for c in &res.set_cookie {
            let pair = c.split(';').next().unwrap().to_owned();
            if c.contains("Max-Age=0") {
                self.cookie = None;
            } else {
                self.cookie = Some(pair);
            }
        }
    }
}

pub async fn send_with(app: &Router, method: &str, path: &str, cookie: Option<&str>) -> Res {
    let mut req = Request::builder()
        .method(method)
        .uri(path)
        .header("user-agent", "test-agent/1.0");
    if let Some(c) = cookie {
        req = req.header("cookie", c);
    }
    let res = app
        .clone()
        .oneshot(req.body(Body::empty()).unwrap())
        .await
        .unwrap();
    let status = res.status();
    let set_cookie = res
        .headers()
        .get_all("set-cookie")
        .iter()
        .map(|v| v.to_str().unwrap().to_owned())
        .collect();
    let body = axum::body::to_bytes(res.into_body(), 1 << 20)
        .await
        .unwrap();
    Res {
        status,
        body: String::from_utf8(body.to_vec()).unwrap(),
        set_cookie,
    }
}

/// Counts the commands clients send (round trips), on every node, with
/// MONITOR: commands that scripts run inside Redis (`[0 lua]`) are what
/// `commands_processed()` also counts, and are not round trips.
pub struct Monitor {
    lines: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
    streams: Vec<std::net::TcpStream>,
}

impl Monitor {
    pub fn start(topo: &Topo) -> Self {
        use std::io::{BufRead, Write};
        let lines = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let mut streams = Vec::new();
        for s in topo.servers() {
            let mut stream = std::net::TcpStream::connect(("127.0.0.1", s.port())).unwrap();
            stream.write_all(b"MONITOR\r\n").unwrap();
            let reader = std::io::BufReader::new(stream.try_clone().unwrap());
            let lines = lines.clone();
            std::thread::spawn(move || {
                for line in reader.lines() {
                    let Ok(line) = line else { return };
                    if line.starts_with('+') && line != "+OK" {
                        lines.lock().unwrap().push(line);
                    }
                }
            });
            streams.push(stream);
        }
        std::thread::sleep(Duration::from_millis(100));
        Monitor { lines, streams }
    }

    fn client_commands(&self) -> Vec<String> {
        self.lines
            .lock()
            .unwrap()
            .iter()
            .filter(|l| !l.contains(" lua]"))
            .cloned()
            .collect()
    }

    /// Round trips (client commands) `f` costs, and what they were.
    pub async fn round_trips<F: std::future::Future<Output = Res>>(
        &self,
        f: F,
    ) -> (Res, usize, Vec<String>) {
        tokio::time::sleep(Duration::from_millis(50)).await;
        let before = self.client_commands().len();
        let res = f.await;
        tokio::time::sleep(Duration::from_millis(150)).await;
        let cmds = self.client_commands()[before..].to_vec();
        (res, cmds.len(), cmds)
    }
}

impl Drop for Monitor {
    fn drop(&mut self) {
        for s in &self.streams {
            let _ = s.shutdown(std::net::Shutdown::Both);
        }
    }
}

/// A rendezvous with one request's handler: it signals once it has loaded
/// the session, then waits to be released (no sleeping to order requests).
#[derive(Clone, Default)]
pub struct Gate {
    loaded: std::sync::Arc<tokio::sync::Notify>,
    release: std::sync::Arc<tokio::sync::Notify>,
}

impl Gate {
    /// Waits until the gated handler has loaded its session.
    pub async fn reached(&self) {
        self.loaded.notified().await;
    }

    /// Lets the gated handler go on.
    pub fn release(&self) {
        self.release.notify_one();
    }

    async fn pass(&self) {
        self.loaded.notify_one();
        self.release.notified().await;
    }
}

/// The test application plus routes whose handlers load the session, stop
/// at `gate`, then go on: `/gated-set/{key}/{value}` (insert),
/// `/gated-login/{user}` (rotate, bind), `/gated-logout` (destroy). Use one
/// gate (and so one such app) per request held.
pub fn gated_app(sessions: Sessions, gate: Gate) -> Router {
    let (g1, g2, g3) = (gate.clone(), gate.clone(), gate);
    Router::new()
        .route(
            "/gated-set/{key}/{value}",
            post(
                move |session: Session, Path((key, value)): Path<(String, String)>| {
                    let gate = g1.clone();
                    async move {
                        let _: Option<String> = session.get("user").await?;
                        gate.pass().await;
                        session.insert(&key, &value).await?;
                        Ok::<_, tollgate_session::Error>("ok")
                    }
                },
            ),
        )
        .route(
            "/gated-login/{user}",
            post(move |session: Session, Path(user): Path<String>| {
                let gate = g2.clone();
                async move {
                    session.rotate_id().await?;
                    gate.pass().await;
                    session.bind_user(&user).await?;
                    session.insert("user", &user).await?;
                    Ok::<_, tollgate_session::Error>("ok")
                }
            }),
        )
        .route(
            "/gated-logout",
            post(move |session: Session| {
                let gate = g3.clone();
                async move {
                    let _: Option<String> = session.get("user").await?;
                    gate.pass().await;
                    session.destroy().await?;
                    Ok::<_, tollgate_session::Error>("ok")
                }
            }),
        )
        .layer(SessionLayer::new(sessions.clone()))
        .merge(app(sessions))
}
