//! Lua scripts run with EVALSHA; a `NOSCRIPT` reply (Redis restarted, a
//! failover to a replica that never saw the script) is answered in the same
//! call by EVAL with the body, which also loads it into that node's cache.

/// A Lua script known by its SHA1. Keep the Lua in a `.lua` file next to the
/// code that runs it and build the script with `include_str!`.
///
/// ```
/// use tollgate_redis::Script;
///
/// static ECHO: std::sync::LazyLock<Script> =
///     std::sync::LazyLock::new(|| Script::new("echo", "return ARGV[1]"));
/// assert_eq!(ECHO.sha1().len(), 40);
/// assert_eq!(ECHO.name(), "echo");
/// ```
#[derive(Clone, Debug)]
pub struct Script {
    name: &'static str,
    body: &'static str,
    sha1: String,
}

impl Script {
    /// A script named `name` (used in errors and metrics) with this Lua body.
    pub fn new(name: &'static str, body: &'static str) -> Self {
        Script {
            name,
            body,
            sha1: fred::util::sha1_hash(body),
        }
    }

    /// The script's name.
    pub fn name(&self) -> &'static str {
        self.name
    }

    /// The Lua source.
    pub fn body(&self) -> &'static str {
        self.body
    }

    /// The SHA1 that EVALSHA uses.
    pub fn sha1(&self) -> &str {
        &self.sha1
    }
}

pub(crate) fn is_noscript(e: &fred::error::Error) -> bool {
    e.details().starts_with("NOSCRIPT")
}
