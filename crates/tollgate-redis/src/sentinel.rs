//! Following a Sentinel's switch of primary at once.
//!
//! fred finds the primary through a Sentinel when a connection opens, and
//! again whenever one drops. A switch that drops no connection leaves the
//! handle on the old primary: a planned `SENTINEL FAILOVER`, or a failover
//! while the old primary was cut off from the Sentinels but not from the
//! application. The old primary goes on taking writes until a Sentinel
//! demotes it, on its next look at it (up to ten seconds later), and a
//! demoted primary throws away everything it took since the switch when it
//! copies the new primary. Measured with a planned switch: ten seconds of
//! writes (sessions saved, usage counted) gone.
//!
//! So a handle built from a `redis-sentinel://` URL subscribes to
//! `+switch-master` on each Sentinel of its URL, and when its service's
//! primary moves it reconnects every client whose connection is elsewhere:
//! the pool's, and the dedicated connections that
//! [follow](crate::RedisHandle::follow_primary) it (client tracking,
//! subscriptions). A reconnection asks a Sentinel for the primary again.
//! Each time a watcher (re)subscribes it asks its Sentinel for the primary
//! too, so a switch announced while it was away is not missed.
//!
//! What this cannot prevent is Redis's own: writes the old primary took
//! between the promotion and the announcement (milliseconds), and writes
//! not yet copied to the replica when it was promoted, are lost.

use std::sync::Arc;

use fred::clients::Client;
use fred::interfaces::{ClientLike, EventInterface, PubsubInterface};
use fred::types::config::{Server, ServerConfig};
use fred::types::{ClusterHash, CustomCommand};
use tokio::sync::broadcast::error::RecvError;
use tokio::task::JoinHandle;

/// The Sentinel channel announcing a new primary:
/// `<service> <old ip> <old port> <new ip> <new port>`.
pub(crate) const SWITCH_CHANNEL: &str = "+switch-master";

/// How long a watcher waits for its Sentinel to answer (a frozen Sentinel
/// must not stall it for good; the next reconnection asks again).
const ASK_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(2);

/// The primary that `message`, published on [`SWITCH_CHANNEL`], names for
/// `service`, if it is about `service`.
pub(crate) fn switched_to(message: &str, service: &str) -> Option<Server> {
    let parts: Vec<&str> = message.split_whitespace().collect();
    match parts.as_slice() {
        [name, _, _, host, port] if *name == service => {
            Some(Server::new(*host, port.parse().ok()?))
        }
        _ => None,
    }
}

/// Whether `client` is connected, and to another server than `primary`.
pub(crate) fn elsewhere(client: &Client, primary: &Server) -> bool {
    let active = client.active_connections();
    !active.is_empty()
        && !active
            .iter()
            .any(|s| s.host == primary.host && s.port == primary.port)
}

/// One watcher per Sentinel of `config` (a Sentinel configuration): a
/// client connected to that Sentinel, and the task calling `moved` with
/// the primary whenever it may have changed. Quit the clients when done.
pub(crate) fn watch(
    config: &fred::types::config::Config,
    policy: &fred::types::config::ReconnectPolicy,
    moved: Arc<dyn Fn(Server) + Send + Sync>,
) -> Result<Vec<(Client, JoinHandle<()>)>, fred::error::Error> {
    let ServerConfig::Sentinel {
        hosts,
        service_name,
        username,
        password,
    } = &config.server
    else {
        return Ok(Vec::new());
    };
    let mut watchers = Vec::with_capacity(hosts.len());
    for host in hosts {
        let sentinel = fred::types::config::Config {
            server: ServerConfig::Centralized {
                server: host.clone(),
            },
            username: username.clone(),
            password: password.clone(),
            database: None,
            // RESP3: a subscribed connection may still ask for the primary.
            version: fred::types::RespVersion::RESP3,
            ..config.clone()
        };
        let client = fred::types::Builder::from_config(sentinel)
            .set_policy(policy.clone())
            .build()?;
        let task = tokio::spawn(listen(client.clone(), service_name.clone(), moved.clone()));
        watchers.push((client, task));
    }
    Ok(watchers)
}

/// Subscribes to [`SWITCH_CHANNEL`] on one Sentinel and reports the
/// primary it names, on each announcement and each (re)subscription.
async fn listen(client: Client, service: String, moved: Arc<dyn Fn(Server) + Send + Sync>) {
    // Taken before connecting: the first connection is announced as a
    // reconnection too.
    let mut messages = client.message_rx();
    let mut reconnects = client.reconnect_rx();
    let _connection = client.connect();
    loop {
        tokio::select! {
            m = messages.recv() => match m {
                Ok(msg) => {
                    if *msg.channel == *SWITCH_CHANNEL
                        && let Some(to) = msg.value.as_str().and_then(|m| switched_to(&m, &service))
                    {
                        moved(to);
                    }
                }
                // Announcements may have been lost: ask.
                Err(RecvError::Lagged(_)) => ask(&client, &service, &*moved).await,
                Err(RecvError::Closed) => return,
            },
            r = reconnects.recv() => match r {
                Ok(_) | Err(RecvError::Lagged(_)) => {
                    // A failed subscribe is retried on the next connection;
                    // meanwhile fred finds the primary on every reconnect.
                    let _ = tokio::time::timeout(ASK_TIMEOUT, client.subscribe(SWITCH_CHANNEL)).await;
                    ask(&client, &service, &*moved).await;
                }
                Err(RecvError::Closed) => return,
            },
        }
    }
}

/// Asks the Sentinel which primary `service` has now.
async fn ask(client: &Client, service: &str, moved: &(dyn Fn(Server) + Send + Sync)) {
    let cmd = CustomCommand::new_static("SENTINEL", ClusterHash::Random, false);
    let ask = client.custom(cmd, vec!["GET-MASTER-ADDR-BY-NAME", service]);
    let reply: Result<Result<Option<(String, u16)>, _>, _> =
        tokio::time::timeout(ASK_TIMEOUT, ask).await;
    if let Ok(Ok(Some((host, port)))) = reply {
        moved(Server::new(host, port));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_switch_names_the_new_primary_of_its_service_only() {
        let to = switched_to("tollgate 127.0.0.1 6379 10.0.0.2 6380", "tollgate");
        assert_eq!(to, Some(Server::new("10.0.0.2", 6380)));
        assert_eq!(
            switched_to("other 127.0.0.1 6379 10.0.0.2 6380", "tollgate"),
            None
        );
        assert_eq!(switched_to("tollgate 10.0.0.2 6380", "tollgate"), None);
        assert_eq!(
            switched_to("tollgate 127.0.0.1 6379 10.0.0.2 port", "tollgate"),
            None
        );
    }
}
