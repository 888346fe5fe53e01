//! Session ids, their keyed hash, and cookie signing.

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use hmac::{Hmac, Mac};
use rand::RngCore as _;
use sha2::Sha256;

type HmacSha256 = Hmac<Sha256>;

/// Random bytes in an id: 256 bits, twice the OWASP minimum.
const ID_BYTES: usize = 32;
/// Length of an id once base64url-encoded without padding.
pub(crate) const ID_LEN: usize = 43;
/// Length of a signature (HMAC-SHA256, base64url, no padding).
const SIG_LEN: usize = 43;

/// A raw session id. Never logged: its `Debug` is redacted.
#[derive(Clone, PartialEq, Eq)]
pub(crate) struct SessionId(String);

impl std::fmt::Debug for SessionId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SessionId(<redacted>)")
    }
}

impl SessionId {
    /// A fresh id from the thread-local CSPRNG (ChaCha, seeded by the OS).
    pub(crate) fn generate() -> Self {
        let mut bytes = [0u8; ID_BYTES];
        rand::rng().fill_bytes(&mut bytes);
        SessionId(URL_SAFE_NO_PAD.encode(bytes))
    }

    /// Accepts only what [`generate`](Self::generate) produces.
    pub(crate) fn parse(s: &str) -> Option<Self> {
        if s.len() != ID_LEN {
            return None;
        }
        let mut out = [0u8; ID_BYTES + 2];
        match URL_SAFE_NO_PAD.decode_slice(s.as_bytes(), &mut out) {
            Ok(ID_BYTES) => Some(SessionId(s.to_owned())),
            _ => None,
        }
    }

    pub(crate) fn as_str(&self) -> &str {
        &self.0
    }
}

/// HMAC-SHA256 with the server secret: what the stores key records by.
#[derive(Clone)]
pub(crate) struct IdHasher {
    mac: HmacSha256,
}

impl std::fmt::Debug for IdHasher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("IdHasher(..)")
    }
}

impl IdHasher {
    pub(crate) fn new(secret: &[u8]) -> Self {
        IdHasher {
            // HMAC accepts keys of any length.
            mac: HmacSha256::new_from_slice(secret).unwrap_or_else(|_| unreachable!()),
        }
    }

    /// Lowercase hex of HMAC(secret, "sid:" + id).
    pub(crate) fn session(&self, id: &SessionId) -> String {
        self.hash(b"sid:", id.as_str().as_bytes())
    }

    /// Lowercase hex of HMAC(secret, "uid:" + user id): user ids stay out
    /// of Redis keys too.
    pub(crate) fn user(&self, user: &str) -> String {
        self.hash(b"uid:", user.as_bytes())
    }

    fn hash(&self, domain: &[u8], v: &[u8]) -> String {
        let mut m = self.mac.clone();
        m.update(domain);
        m.update(v);
        tollgate_redis::hex_lower(&m.finalize().into_bytes())
    }
}

/// Cookie signing keys: the current one signs, every key verifies.
#[derive(Clone)]
pub(crate) struct KeyRing {
    keys: Vec<HmacSha256>,
}

impl std::fmt::Debug for KeyRing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyRing")
            .field("keys", &self.keys.len())
            .finish()
    }
}

/// What verifying a cookie value found.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Verified {
    /// Signed with the current key (or signing is off).
    Current(SessionId),
    /// Signed with a previous key: accept and re-sign.
    Previous(SessionId),
    /// Malformed or tampered.
    Invalid,
}

impl KeyRing {
    pub(crate) fn new(current: &[u8], previous: &[Vec<u8>]) -> Self {
        let keys = std::iter::once(current)
            .chain(previous.iter().map(Vec::as_slice))
            .map(|k| HmacSha256::new_from_slice(k).unwrap_or_else(|_| unreachable!()))
            .collect();
        KeyRing { keys }
    }

    fn mac(key: &HmacSha256, id: &str) -> HmacSha256 {
        let mut m = key.clone();
        m.update(b"tollgate-session:");
        m.update(id.as_bytes());
        m
    }

    pub(crate) fn sign(&self, id: &SessionId) -> String {
        let sig = Self::mac(&self.keys[0], id.as_str())
            .finalize()
            .into_bytes();
        format!("{}.{}", id.as_str(), URL_SAFE_NO_PAD.encode(sig))
    }

    pub(crate) fn verify(&self, value: &str) -> Verified {
        let Some((id, sig)) = value.split_once('.') else {
            return Verified::Invalid;
        };
        if sig.len() != SIG_LEN {
            return Verified::Invalid;
        }
        let Some(id) = SessionId::parse(id) else {
            return Verified::Invalid;
        };
        let Ok(sig) = URL_SAFE_NO_PAD.decode(sig) else {
            return Verified::Invalid;
        };
        for (i, key) in self.keys.iter().enumerate() {
            // Constant-time comparison.
            if Self::mac(key, id.as_str()).verify_slice(&sig).is_ok() {
                return if i == 0 {
                    Verified::Current(id)
                } else {
                    Verified::Previous(id)
                };
            }
        }
        Verified::Invalid
    }
}

/// Reads a cookie or header value into an id, with or without signing.
pub(crate) fn decode_value(value: &str, ring: Option<&KeyRing>) -> Verified {
    match ring {
        Some(r) => r.verify(value),
        None => SessionId::parse(value).map_or(Verified::Invalid, Verified::Current),
    }
}

/// The value that carries `id` (signed when a key ring is configured).
pub(crate) fn encode_value(id: &SessionId, ring: Option<&KeyRing>) -> String {
    match ring {
        Some(r) => r.sign(id),
        None => id.as_str().to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_random_and_parse_back() {
        let a = SessionId::generate();
        let b = SessionId::generate();
        assert_ne!(a, b);
        assert_eq!(a.as_str().len(), ID_LEN);
        assert_eq!(SessionId::parse(a.as_str()), Some(a.clone()));
        assert_eq!(SessionId::parse("short"), None);
        assert_eq!(SessionId::parse(&"!".repeat(ID_LEN)), None);
        assert!(!format!("{a:?}").contains(a.as_str()));
    }

    #[test]
    fn signing_with_rotation() {
        let old = KeyRing::new(b"old-key", &[]);
        let ring = KeyRing::new(b"new-key", &[b"old-key".to_vec()]);
        let id = SessionId::generate();
        assert_eq!(ring.verify(&ring.sign(&id)), Verified::Current(id.clone()));
        assert_eq!(ring.verify(&old.sign(&id)), Verified::Previous(id.clone()));
        let other = KeyRing::new(b"attacker", &[]);
        assert_eq!(ring.verify(&other.sign(&id)), Verified::Invalid);
        let mut tampered = ring.sign(&id);
        tampered.replace_range(0..1, if tampered.starts_with('A') { "B" } else { "A" });
        assert_eq!(ring.verify(&tampered), Verified::Invalid);
        assert_eq!(ring.verify(id.as_str()), Verified::Invalid);
    }

    #[test]
    fn keyed_hash_is_hex_and_secret_dependent() {
        let id = SessionId::generate();
        let a = IdHasher::new(b"secret-a").session(&id);
        assert_eq!(a.len(), 64);
        assert!(a.chars().all(|c| c.is_ascii_hexdigit()));
        assert_ne!(a, IdHasher::new(b"secret-b").session(&id));
        assert_ne!(
            IdHasher::new(b"s").user("1"),
            IdHasher::new(b"s").session(&id)
        );
    }
}
