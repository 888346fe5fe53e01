//! Key naming: `{namespace}:{layer}:...`, with one hash tag per identity so
//! that every key a script touches for one identity lives in one cluster slot.

use std::fmt::Write as _;

/// Builds the Redis keys of one layer under the handle's namespace.
///
/// ```
/// use tollgate_redis::KeySpace;
///
/// let keys = KeySpace::new("myapp", "ratelimit");
/// assert_eq!(keys.key(&["admin"]), "myapp:ratelimit:admin");
/// // The identity becomes the hash tag; braces inside it cannot break out.
/// assert_eq!(keys.tagged("ip:1.2.3.4", &["burst"]), "myapp:ratelimit:{ip:1.2.3.4}:burst");
/// assert_eq!(keys.tagged("a}b", &[]), "myapp:ratelimit:{a%7Db}");
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeySpace {
    prefix: String,
}

impl KeySpace {
    /// Keys of `layer` under `namespace`.
    pub fn new(namespace: &str, layer: &str) -> Self {
        let mut prefix = String::with_capacity(namespace.len() + layer.len() + 2);
        push_escaped(&mut prefix, namespace);
        prefix.push(':');
        push_escaped(&mut prefix, layer);
        KeySpace { prefix }
    }

    /// `{namespace}:{layer}`.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// A key without a hash tag: `ns:layer:part:part`. Use it for keys that
    /// are touched alone.
    pub fn key(&self, parts: &[&str]) -> String {
        let mut k = self.prefix.clone();
        for p in parts {
            k.push(':');
            push_escaped(&mut k, p);
        }
        k
    }

    /// A key whose hash tag is `identity`: `ns:layer:{identity}:part...`.
    /// Every key built with the same identity hashes to the same cluster
    /// slot, the empty identity included (its tag is `{%}`, which no
    /// escaped identity can be: `{}` is no hash tag to Redis).
    pub fn tagged(&self, identity: &str, parts: &[&str]) -> String {
        let mut k = String::with_capacity(self.prefix.len() + identity.len() + 16);
        self.write_tagged(&mut k, identity, parts);
        k
    }

    /// [`tagged`](Self::tagged) into a reused buffer (cleared first), for hot
    /// paths that build many keys.
    pub fn write_tagged(&self, out: &mut String, identity: &str, parts: &[&str]) {
        out.clear();
        out.push_str(&self.prefix);
        out.push_str(":{");
        if identity.is_empty() {
            out.push('%');
        } else {
            push_escaped(out, identity);
        }
        out.push('}');
        for p in parts {
            out.push(':');
            push_escaped(out, p);
        }
    }
}

/// Lowercase hex of `bytes`, encoded in one pass (`hex::encode` builds its
/// string a character at a time; hashed ids and keys are encoded on every
/// request).
pub fn hex_lower(bytes: &[u8]) -> String {
    prefixed_hex("", bytes)
}

/// `prefix` followed by the lowercase hex of `bytes`, in one allocation.
pub fn prefixed_hex(prefix: &str, bytes: &[u8]) -> String {
    let mut out = Vec::with_capacity(prefix.len() + 2 * bytes.len());
    out.extend_from_slice(prefix.as_bytes());
    out.resize(prefix.len() + 2 * bytes.len(), 0);
    // Cannot fail: the tail is exactly twice the input's length.
    let _ = hex::encode_to_slice(bytes, &mut out[prefix.len()..]);
    // A `str` prefix and hex digits: valid UTF-8.
    String::from_utf8(out).unwrap_or_default()
}

/// The cluster hash slot (0..16384) of a key, honouring hash tags.
pub fn slot(key: &str) -> u16 {
    fred::util::redis_keyslot(key.as_bytes())
}

/// The first of `keys`'s keys `name:0`, `name:1`, … whose slot `owned`
/// accepts: a key that lands on one given primary of a cluster.
pub(crate) fn key_in_slots(
    keys: &KeySpace,
    name: &str,
    owned: impl Fn(u16) -> bool,
) -> Option<String> {
    // A primary holding a single slot takes 16,384 tries on average;
    // missing it in a million has odds below e^-60.
    (0..1_000_000u32)
        .map(|n| keys.key(&[name, &n.to_string()]))
        .find(|k| owned(slot(k)))
}

/// Braces would change which part of the key Redis hashes, and `%` is the
/// escape character itself; everything else is kept as is so keys stay
/// readable in `redis-cli`.
fn push_escaped(out: &mut String, s: &str) {
    if !s.contains(['{', '}', '%']) {
        out.push_str(s);
        return;
    }
    for c in s.chars() {
        match c {
            '{' | '}' | '%' => {
                let _ = write!(out, "%{:02X}", c as u32);
            }
            c => out.push(c),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_matches_the_hex_crate() {
        for v in [&b""[..], b"\x00\x01\xab\xff", b"tollgate"] {
            assert_eq!(hex_lower(v), hex::encode(v));
            assert_eq!(prefixed_hex("r:", v), format!("r:{}", hex::encode(v)));
        }
    }

    #[test]
    fn tagged_keys_share_a_slot() {
        let ks = KeySpace::new("ns", "rl");
        let a = ks.tagged("user:42", &["burst"]);
        let b = ks.tagged("user:42", &["sustained"]);
        assert_eq!(slot(&a), slot(&b));
        assert_eq!(slot(&a), slot("{user:42}"));
    }

    /// `{}` is no hash tag to Redis: the keys of an empty identity would
    /// land in different slots (a script touching them fails on a
    /// cluster). Its tag is one no escaped identity can be.
    #[test]
    fn an_empty_identity_still_shares_a_slot() {
        let ks = KeySpace::new("ns", "rl");
        let a = ks.tagged("", &["burst"]);
        let b = ks.tagged("", &["sustained"]);
        assert_eq!(slot(&a), slot(&b));
        assert_eq!(a, "ns:rl:{%}:burst");
        assert_ne!(a, ks.tagged("%", &["burst"]));
    }

    #[test]
    fn escaping_prevents_tag_injection() {
        let ks = KeySpace::new("ns", "rl");
        let k = ks.tagged("x}{evil", &["p"]);
        assert_eq!(k, "ns:rl:{x%7D%7Bevil}:p");
        assert_eq!(slot(&k), slot("{x%7D%7Bevil}"));
        assert_eq!(ks.key(&["100%"]), "ns:rl:100%25");
    }

    #[test]
    fn write_tagged_reuses_buffer() {
        let ks = KeySpace::new("ns", "rl");
        let mut buf = String::from("garbage");
        ks.write_tagged(&mut buf, "id", &["a", "b"]);
        assert_eq!(buf, "ns:rl:{id}:a:b");
    }
}
