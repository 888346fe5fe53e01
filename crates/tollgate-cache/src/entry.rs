//! What is stored for a response, and its byte encoding.

use bytes::{BufMut, Bytes, BytesMut};
use http::{HeaderMap, HeaderName, HeaderValue, StatusCode};
use serde::{Deserialize, Serialize};

use crate::error::Error;

const RESPONSE: &[u8; 4] = b"TGR1";
const VARY: &[u8; 4] = b"TGV1";

/// A stored response: status, headers, body and freshness bookkeeping.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub(crate) struct Meta {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    /// When the response was received, Unix ms.
    pub stored_at_ms: u64,
    /// The origin's `Age` at that time, seconds.
    pub initial_age_s: u64,
    /// Freshness lifetime left when received, ms.
    pub fresh_ms: u64,
    /// stale-while-revalidate window after that, ms.
    pub swr_ms: u64,
    /// stale-if-error window after that, ms.
    pub sie_ms: u64,
    /// The response said `public`: it may serve requests carrying
    /// credentials.
    pub public: bool,
    /// The Vary'd request headers and the values they had.
    pub vary: Vec<(String, Option<String>)>,
}

#[derive(Clone, Debug)]
pub(crate) struct Entry {
    pub meta: Meta,
    pub body: Bytes,
    /// `meta.headers` as a header map, built once: a hit clones it.
    head: HeaderMap,
}

/// What a key holds.
#[derive(Clone, Debug)]
pub(crate) enum Stored {
    Response(Entry),
    /// The response at this URL varies on these request headers: look up
    /// the variant key.
    Vary(Vec<String>),
}

impl Stored {
    pub(crate) fn decode(b: &Bytes) -> Result<Stored, Error> {
        let bad = |what: &str| Error::Codec(what.into());
        if b.len() < 8 {
            return Err(bad("short entry"));
        }
        let (magic, rest) = b.split_at(4);
        let len = u32::from_be_bytes([rest[0], rest[1], rest[2], rest[3]]) as usize;
        if rest.len() < 4 + len {
            return Err(bad("truncated entry"));
        }
        let json = &rest[4..4 + len];
        if magic == RESPONSE {
            let meta: Meta =
                serde_json::from_slice(json).map_err(|e| Error::Codec(e.to_string().into()))?;
            Ok(Stored::Response(Entry::new(meta, b.slice(8 + len..))))
        } else if magic == VARY {
            let names: Vec<String> =
                serde_json::from_slice(json).map_err(|e| Error::Codec(e.to_string().into()))?;
            Ok(Stored::Vary(names))
        } else {
            Err(bad("unknown entry format"))
        }
    }

    pub(crate) fn encode(&self) -> Result<Bytes, Error> {
        let (magic, json, body) = match self {
            Stored::Response(e) => (RESPONSE, serde_json::to_vec(&e.meta), Some(&e.body)),
            Stored::Vary(names) => (VARY, serde_json::to_vec(names), None),
        };
        let json = json.map_err(|e| Error::Codec(e.to_string().into()))?;
        let len =
            u32::try_from(json.len()).map_err(|_| Error::Codec("headers too large".into()))?;
        let mut out = BytesMut::with_capacity(8 + json.len() + body.map_or(0, |b| b.len()));
        out.put_slice(magic);
        out.put_u32(len);
        out.put_slice(&json);
        if let Some(b) = body {
            out.put_slice(b);
        }
        Ok(out.freeze())
    }
}

impl Entry {
    pub(crate) fn new(meta: Meta, body: Bytes) -> Self {
        let mut head = HeaderMap::with_capacity(meta.headers.len() + 4);
        for (n, v) in &meta.headers {
            if let (Ok(n), Ok(v)) = (
                HeaderName::try_from(n.as_str()),
                HeaderValue::try_from(v.as_str()),
            ) {
                head.append(n, v);
            }
        }
        Entry { meta, body, head }
    }

    pub(crate) fn status(&self) -> StatusCode {
        StatusCode::from_u16(self.meta.status).unwrap_or(StatusCode::OK)
    }

    /// A copy of the stored headers with room for `extra` more, so the
    /// headers a hit adds (`Age`, `X-Cache`, ...) never grow the map.
    pub(crate) fn headers(&self, extra: usize) -> HeaderMap {
        let mut h = HeaderMap::with_capacity(self.head.len() + extra);
        for (name, value) in &self.head {
            h.append(name.clone(), value.clone());
        }
        h
    }

    pub(crate) fn header(&self, name: &str) -> Option<&str> {
        self.meta
            .headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// Current age in seconds.
    pub(crate) fn age_s(&self, now_ms: u64) -> u64 {
        self.meta.initial_age_s + now_ms.saturating_sub(self.meta.stored_at_ms) / 1000
    }

    /// Milliseconds of freshness left (negative: stale for that long).
    pub(crate) fn ttl_ms(&self, now_ms: u64) -> i64 {
        (self.meta.stored_at_ms + self.meta.fresh_ms) as i64 - now_ms as i64
    }
}

/// A fresh 200 response with one `ETag`, for tests.
#[cfg(test)]
pub(crate) fn test_entry(etag: &str, body: &'static [u8]) -> Entry {
    Entry::new(
        Meta {
            status: 200,
            headers: vec![("etag".into(), etag.into())],
            stored_at_ms: 1,
            initial_age_s: 0,
            fresh_ms: 1000,
            swr_ms: 0,
            sie_ms: 0,
            public: false,
            vary: vec![],
        },
        Bytes::from_static(body),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roundtrip() {
        let e = Stored::Response(test_entry("\"x\"", b"\0body"));
        let b = e.encode().unwrap();
        let Stored::Response(d) = Stored::decode(&b).unwrap() else {
            panic!()
        };
        assert_eq!(d.body, Bytes::from_static(b"\0body"));
        assert_eq!(d.header("ETag"), Some("\"x\""));
        let v = Stored::Vary(vec!["accept-encoding".into()])
            .encode()
            .unwrap();
        assert!(matches!(Stored::decode(&v).unwrap(), Stored::Vary(n) if n == ["accept-encoding"]));
        assert!(Stored::decode(&Bytes::from_static(b"garbage!")).is_err());
    }
}
