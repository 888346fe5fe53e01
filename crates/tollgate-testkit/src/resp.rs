//! A minimal blocking RESP2 client, so the test kit can set up clusters and
//! read INFO without depending on `redis-cli`.

use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::time::Duration;

/// A RESP2 reply.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Reply {
    /// `+OK`
    Status(String),
    /// `-ERR ...`
    Error(String),
    /// `:42`
    Int(i64),
    /// `$n ...`
    Bulk(String),
    /// `$-1` / `*-1`
    Nil,
    /// `*n ...`
    Array(Vec<Reply>),
}

impl Reply {
    /// The text of a status or bulk reply.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Reply::Status(s) | Reply::Bulk(s) => Some(s),
            _ => None,
        }
    }

    /// The value of an integer reply (or a bulk string holding one).
    pub fn as_int(&self) -> Option<i64> {
        match self {
            Reply::Int(i) => Some(*i),
            Reply::Bulk(s) => s.parse().ok(),
            _ => None,
        }
    }
}

pub(crate) fn command(port: u16, args: &[&str]) -> Result<Reply, String> {
    command_with_timeout(port, args, Duration::from_secs(5))
}

pub(crate) fn command_with_timeout(
    port: u16,
    args: &[&str],
    timeout: Duration,
) -> Result<Reply, String> {
    commands(port, &[args], timeout)
}

/// Sends `cmds` in order on one connection; the reply to the last.
pub(crate) fn commands(port: u16, cmds: &[&[&str]], timeout: Duration) -> Result<Reply, String> {
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    let stream = TcpStream::connect_timeout(&addr, timeout).map_err(|e| e.to_string())?;
    stream
        .set_read_timeout(Some(timeout))
        .map_err(|e| e.to_string())?;
    let mut buf = Vec::new();
    for args in cmds {
        buf.extend_from_slice(format!("*{}\r\n", args.len()).as_bytes());
        for a in *args {
            buf.extend_from_slice(format!("${}\r\n", a.len()).as_bytes());
            buf.extend_from_slice(a.as_bytes());
            buf.extend_from_slice(b"\r\n");
        }
    }
    (&stream).write_all(&buf).map_err(|e| e.to_string())?;
    let mut r = BufReader::new(&stream);
    let mut last = Err("no command".to_owned());
    for _ in cmds {
        last = read(&mut r);
        last.as_ref().map_err(Clone::clone)?;
    }
    last
}

fn read(r: &mut impl BufRead) -> Result<Reply, String> {
    let mut line = String::new();
    r.read_line(&mut line).map_err(|e| e.to_string())?;
    let line = line.trim_end_matches("\r\n");
    let (kind, rest) = line.split_at_checked(1).ok_or("connection closed")?;
    let int = |s: &str| s.parse::<i64>().map_err(|e| format!("bad length {s}: {e}"));
    match kind {
        "+" => Ok(Reply::Status(rest.to_owned())),
        "-" => Ok(Reply::Error(rest.to_owned())),
        ":" => Ok(Reply::Int(int(rest)?)),
        "$" => {
            let n = int(rest)?;
            if n < 0 {
                return Ok(Reply::Nil);
            }
            let mut data = vec![0u8; usize::try_from(n).map_err(|e| e.to_string())? + 2];
            r.read_exact(&mut data).map_err(|e| e.to_string())?;
            data.truncate(data.len() - 2);
            Ok(Reply::Bulk(String::from_utf8_lossy(&data).into_owned()))
        }
        "*" => {
            let n = int(rest)?;
            if n < 0 {
                return Ok(Reply::Nil);
            }
            (0..n)
                .map(|_| read(r))
                .collect::<Result<_, _>>()
                .map(Reply::Array)
        }
        other => Err(format!("unexpected RESP type {other:?}")),
    }
}
