//! Redis's own counters (`INFO`), read over a plain RESP connection so that
//! the measurement needs neither redis-cli nor an async runtime.

use std::io::{BufRead as _, BufReader, Read as _, Write as _};
use std::net::{TcpStream, ToSocketAddrs as _};
use std::time::Duration;

use anyhow::{Context as _, bail};

/// A connection used only for `INFO`.
pub(crate) struct RedisStats {
    reader: BufReader<TcpStream>,
    writer: TcpStream,
    url: String,
    version: String,
}

/// Redis's counters at one instant.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Snapshot {
    /// `used_cpu_sys + used_cpu_user`, seconds.
    cpu_seconds: f64,
    /// `total_commands_processed`.
    commands: u64,
}

impl Snapshot {
    /// (CPU seconds, commands) between `before` and `self`, not counting
    /// the `INFO` that took `before`.
    pub(crate) fn since(&self, before: &Snapshot) -> (f64, f64) {
        let cmds = self.commands.saturating_sub(before.commands + 1);
        (
            (self.cpu_seconds - before.cpu_seconds).max(0.0),
            cmds as f64,
        )
    }
}

impl RedisStats {
    /// Connects (and authenticates) to a `redis://[user:password@]host[:port][/db]` URL.
    pub(crate) fn connect(url: &str) -> anyhow::Result<Self> {
        let target = Target::parse(url)?;
        let addr = target
            .host_port
            .to_socket_addrs()
            .with_context(|| format!("resolving {}", target.host_port))?
            .next()
            .with_context(|| format!("{} resolves to no address", target.host_port))?;
        let stream = TcpStream::connect_timeout(&addr, Duration::from_secs(1))
            .with_context(|| format!("connecting to {addr}"))?;
        stream
            .set_read_timeout(Some(Duration::from_secs(5)))
            .context("set_read_timeout")?;
        let writer = stream.try_clone().context("cloning the socket")?;
        let mut conn = RedisStats {
            reader: BufReader::new(stream),
            writer,
            url: redact(url),
            version: String::new(),
        };
        if let Some(password) = &target.password {
            match &target.user {
                Some(user) => conn.command(&["AUTH", user, password])?,
                None => conn.command(&["AUTH", password])?,
            };
        }
        let info = conn.command(&["INFO", "server"])?;
        conn.version = field(&info, "redis_version").unwrap_or("?").to_owned();
        Ok(conn)
    }

    /// `Redis 7.2.4 at redis://127.0.0.1:6379`.
    pub(crate) fn describe(&self) -> String {
        format!("Redis {} at {}", self.version, self.url)
    }

    /// Reads the CPU and command counters.
    pub(crate) fn snapshot(&mut self) -> anyhow::Result<Snapshot> {
        let info = self.command(&["INFO"])?;
        let num = |name: &str| -> anyhow::Result<f64> {
            field(&info, name)
                .and_then(|v| v.parse().ok())
                .with_context(|| format!("INFO has no numeric {name}"))
        };
        Ok(Snapshot {
            cpu_seconds: num("used_cpu_sys")? + num("used_cpu_user")?,
            commands: num("total_commands_processed")? as u64,
        })
    }

    /// Sends one command; returns a simple or bulk string reply.
    fn command(&mut self, args: &[&str]) -> anyhow::Result<String> {
        let mut req = format!("*{}\r\n", args.len());
        for a in args {
            req.push_str(&format!("${}\r\n{a}\r\n", a.len()));
        }
        self.writer
            .write_all(req.as_bytes())
            .with_context(|| format!("sending {}", args[0]))?;
        let mut line = String::new();
        self.reader
            .read_line(&mut line)
            .with_context(|| format!("reading the reply to {}", args[0]))?;
        let line = line.trim_end();
        match line.split_at_checked(1) {
            Some(("+", s)) => Ok(s.to_owned()),
            Some(("-", e)) => bail!("{} failed: {e}", args[0]),
            Some(("$", n)) => {
                let n: usize = n
                    .parse()
                    .with_context(|| format!("bad bulk length {line:?}"))?;
                let mut body = vec![0; n + 2];
                self.reader
                    .read_exact(&mut body)
                    .with_context(|| format!("reading the reply to {}", args[0]))?;
                body.truncate(n);
                String::from_utf8(body).context("reply is not UTF-8")
            }
            _ => bail!("unexpected reply to {}: {line:?}", args[0]),
        }
    }
}

fn field<'a>(info: &'a str, name: &str) -> Option<&'a str> {
    info.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
        .map(str::trim)
}

struct Target {
    host_port: String,
    user: Option<String>,
    password: Option<String>,
}

impl Target {
    fn parse(url: &str) -> anyhow::Result<Self> {
        let Some(rest) = url.strip_prefix("redis://") else {
            bail!(
                "the harness reads Redis's counters over plain TCP and understands only \
                 redis:// URLs, not {}",
                redact(url)
            );
        };
        let authority = rest.split(['/', '?']).next().unwrap_or_default();
        let (userinfo, host) = match authority.rsplit_once('@') {
            Some((u, h)) => (Some(u), h),
            None => (None, authority),
        };
        let (user, password) = match userinfo.map(|u| u.split_once(':').unwrap_or((u, ""))) {
            Some((u, p)) if !p.is_empty() => ((!u.is_empty()).then(|| u.to_owned()), Some(p)),
            // `redis://password@host` is not a thing; `user@host` has no password.
            _ => (None, None),
        };
        let host = if host.is_empty() { "127.0.0.1" } else { host };
        // `[::1]` and `host` lack a port; `[::1]:6380` and `host:6380` have one.
        let has_port = if host.starts_with('[') {
            host.contains("]:")
        } else {
            host.contains(':')
        };
        let host_port = if has_port {
            host.to_owned()
        } else {
            format!("{host}:6379")
        };
        Ok(Target {
            host_port,
            user,
            password: password.map(str::to_owned),
        })
    }
}

/// The URL with any password replaced by `***`, for printing.
pub(crate) fn redact(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    let authority_end = rest.find(['/', '?']).unwrap_or(rest.len());
    let (authority, path) = rest.split_at(authority_end);
    match authority.rsplit_once('@') {
        Some((userinfo, host)) => {
            let user = userinfo.split_once(':').map_or(userinfo, |(u, _)| u);
            format!("{scheme}://{user}:***@{host}{path}")
        }
        None => url.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_urls() {
        let t = Target::parse("redis://127.0.0.1").expect("valid");
        assert_eq!(t.host_port, "127.0.0.1:6379");
        let t = Target::parse("redis://app:s3cret@[::1]/0").expect("valid");
        assert_eq!(t.host_port, "[::1]:6379");
        assert_eq!(t.user.as_deref(), Some("app"));
        assert_eq!(t.password.as_deref(), Some("s3cret"));
        let t = Target::parse("redis://:pw@localhost:6380").expect("valid");
        assert_eq!(t.host_port, "localhost:6380");
        assert_eq!((t.user, t.password.as_deref()), (None, Some("pw")));
        assert!(Target::parse("rediss://x").is_err());
    }

    #[test]
    fn redacts_passwords() {
        assert_eq!(redact("redis://u:pw@h:1/0"), "redis://u:***@h:1/0");
        assert_eq!(redact("redis://h:1"), "redis://h:1");
    }
}
