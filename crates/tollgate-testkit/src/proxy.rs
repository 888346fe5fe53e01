//! A TCP proxy that adds latency to every reply, for "slow Redis" tests,
//! and can cut the way to the server (a network partition).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

/// Forwards a loopback port to a Redis server, delaying each chunk the
/// server sends back by the current delay. Dropping it closes the listener
/// and every proxied connection.
#[derive(Debug)]
pub struct LatencyProxy {
    port: u16,
    delay_us: Arc<AtomicU64>,
    /// Whether connections are let through ([`cut`](Self::cut)).
    open: Arc<AtomicBool>,
    conns: Arc<Mutex<Vec<JoinHandle<()>>>>,
    task: JoinHandle<()>,
}

impl LatencyProxy {
    /// Starts proxying to `127.0.0.1:target_port` with `delay` (needs a
    /// Tokio runtime).
    pub async fn start(target_port: u16, delay: Duration) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the proxy");
        let port = listener.local_addr().expect("proxy addr").port();
        let delay_us = Arc::new(AtomicU64::new(micros(delay)));
        let open = Arc::new(AtomicBool::new(true));
        let conns: Arc<Mutex<Vec<JoinHandle<()>>>> = Arc::default();
        let (d, o, c) = (delay_us.clone(), open.clone(), conns.clone());
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                if !o.load(Ordering::Acquire) {
                    // Cut: the connection is closed at once.
                    continue;
                }
                let d = d.clone();
                let mut conns = c.lock().expect("proxy connections");
                conns.retain(|c| !c.is_finished());
                conns.push(tokio::spawn(async move {
                    if let Ok(server) = TcpStream::connect(("127.0.0.1", target_port)).await {
                        pipe(client, server, d).await;
                    }
                }));
            }
        });
        LatencyProxy {
            port,
            delay_us,
            open,
            conns,
            task,
        }
    }

    /// Cuts the way to the server: every proxied connection is closed, and
    /// new ones are closed as soon as they are accepted, until
    /// [`restore`](Self::restore).
    pub fn cut(&self) {
        self.open.store(false, Ordering::Release);
        self.close_all();
    }

    /// Lets new connections through again.
    pub fn restore(&self) {
        self.open.store(true, Ordering::Release);
    }

    fn close_all(&self) {
        for c in self.conns.lock().expect("proxy connections").drain(..) {
            c.abort();
        }
    }

    /// The proxy's port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// `redis://127.0.0.1:PROXY_PORT`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Changes the added latency for replies sent from now on.
    pub fn set_delay(&self, delay: Duration) {
        self.delay_us.store(micros(delay), Ordering::Relaxed);
    }
}

impl Drop for LatencyProxy {
    fn drop(&mut self) {
        self.task.abort();
        self.close_all();
    }
}

fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

async fn pipe(client: TcpStream, server: TcpStream, delay_us: Arc<AtomicU64>) {
    let (mut cr, mut cw) = client.into_split();
    let (mut sr, mut sw) = server.into_split();
    // One task for both directions: aborting it closes both connections.
    let up = async {
        let mut buf = vec![0u8; 16 * 1024];
        while let Ok(n) = cr.read(&mut buf).await {
            if n == 0 || sw.write_all(&buf[..n]).await.is_err() {
                break;
            }
        }
    };
    let down = async {
        let mut buf = vec![0u8; 16 * 1024];
        while let Ok(n) = sr.read(&mut buf).await {
            if n == 0 {
                break;
            }
            let d = delay_us.load(Ordering::Relaxed);
            if d > 0 {
                tokio::time::sleep(Duration::from_micros(d)).await;
            }
            if cw.write_all(&buf[..n]).await.is_err() {
                break;
            }
        }
    };
    tokio::select! {
        () = up => {}
        () = down => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{RedisServer, Reply, resp};

    fn ping(port: u16) -> Result<Reply, String> {
        resp::command_with_timeout(port, &["PING"], Duration::from_millis(500))
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_cut_closes_connections_until_restored() {
        let server = RedisServer::start();
        let proxy = LatencyProxy::start(server.port(), Duration::ZERO).await;
        let port = proxy.port();
        let pong = Ok(Reply::Status("PONG".into()));
        assert_eq!(
            tokio::task::spawn_blocking(move || ping(port))
                .await
                .unwrap(),
            pong
        );
        // A connection held open across the cut is closed by it.
        let held = tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .expect("connect through the proxy");
        tokio::time::sleep(Duration::from_millis(50)).await;
        proxy.cut();
        let mut buf = [0u8; 1];
        let read = tokio::time::timeout(Duration::from_secs(2), async {
            let mut held = held;
            held.read(&mut buf).await
        })
        .await
        .expect("closed, not left hanging");
        assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");
        assert!(
            tokio::task::spawn_blocking(move || ping(port))
                .await
                .unwrap()
                .is_err()
        );
        proxy.restore();
        assert_eq!(
            tokio::task::spawn_blocking(move || ping(port))
                .await
                .unwrap(),
            pong
        );
    }
}
