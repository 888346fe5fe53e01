//! What is stored for a response, and its byte encoding.

use bytes::{BufMut, Bytes, BytesMut};
use http::{HeaderMap, HeaderName, HeaderValue, StatusCode, header};
use serde::{Deserialize, Serialize};
use tollgate_redis::header_value::number;

use crate::error::Error;
use crate::flow::{CACHE_STATUS, X_CACHE};

/// What the places of the headers a response fills in hold until then.
const UNSET: HeaderValue = HeaderValue::from_static("");

/// The headers the cache sets on each response it serves from an entry:
/// never stored.
pub(crate) fn is_filled(name: &HeaderName) -> bool {
    *name == header::AGE || *name == X_CACHE || *name == CACHE_STATUS
}

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
    /// `meta.headers` as a header map, built once, with `Content-Length`
    /// and a place for each header a response fills in: a hit clones it.
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
                // The cache's own headers are never stored; an entry from
                // elsewhere that has them does not get them twice.
                if !is_filled(&n) {
                    head.append(n, v);
                }
            }
        }
        // RFC 9110 §8.6: never on a 204 (a stored 304 or 1xx cannot be).
        if meta.status != 204 && !head.contains_key(header::CONTENT_LENGTH) {
            head.insert(header::CONTENT_LENGTH, number(body.len() as u64));
        }
        // The places of the values each response fills in.
        for name in [header::AGE, X_CACHE.clone(), CACHE_STATUS.clone()] {
            head.append(name, UNSET);
        }
        Entry { meta, body, head }
    }

    pub(crate) fn status(&self) -> StatusCode {
        StatusCode::from_u16(self.meta.status).unwrap_or(StatusCode::OK)
    }

    /// The stored headers (with `Content-Length`), as one map.
    pub(crate) fn stored_headers(&self) -> &HeaderMap {
        &self.head
    }

    /// The headers of a response served from this entry: the stored ones,
    /// `Content-Length`, and the given `Age`, `X-Cache` and `Cache-Status`
    /// (none when `cache_status` is `None`). A copy of the map built once,
    /// its three places filled by walking it: no header name is hashed and
    /// the map never grows.
    pub(crate) fn response_headers(
        &self,
        age: HeaderValue,
        x_cache: HeaderValue,
        cache_status: Option<HeaderValue>,
    ) -> HeaderMap {
        let mut h = self.head.clone();
        let absent = cache_status.is_none();
        let (mut age, mut x_cache, mut cache_status) = (Some(age), Some(x_cache), cache_status);
        for (name, value) in h.iter_mut() {
            let fill = if *name == header::AGE {
                age.take()
            } else if *name == X_CACHE {
                x_cache.take()
            } else if *name == CACHE_STATUS {
                cache_status.take()
            } else {
                continue;
            };
            if let Some(v) = fill {
                *value = v;
            }
        }
        if absent {
            h.remove(&CACHE_STATUS);
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

    fn entry_with(headers: &[(&str, &str)], body: &'static [u8]) -> Entry {
        let mut e = test_entry("\"x\"", body);
        e.meta.headers = headers
            .iter()
            .map(|(n, v)| ((*n).to_owned(), (*v).to_owned()))
            .collect();
        Entry::new(e.meta, e.body)
    }

    #[test]
    fn a_response_gets_its_own_values_in_the_stored_headers() {
        let e = entry_with(
            &[
                ("content-type", "text/plain"),
                ("link", "</a>"),
                ("link", "</b>"),
                // Never stored by this cache; one from elsewhere is dropped.
                ("age", "999"),
                ("x-cache", "HIT from elsewhere"),
            ],
            b"12345",
        );
        let h = e.response_headers(
            HeaderValue::from_static("7"),
            HeaderValue::from_static("HIT"),
            Some(HeaderValue::from_static("tollgate; hit; ttl=3")),
        );
        let all = |name: &str| -> Vec<&str> {
            h.get_all(name)
                .iter()
                .map(|v| v.to_str().expect("ascii"))
                .collect()
        };
        assert_eq!(all("content-type"), ["text/plain"]);
        assert_eq!(all("link"), ["</a>", "</b>"]);
        assert_eq!(all("content-length"), ["5"]);
        assert_eq!(all("age"), ["7"]);
        assert_eq!(all("x-cache"), ["HIT"]);
        assert_eq!(all("cache-status"), ["tollgate; hit; ttl=3"]);
        assert_eq!(h.len(), 7);
        assert!(
            h.values().all(|v| !v.is_empty()),
            "a place left unfilled: {h:?}"
        );

        // The next response starts from the stored map again.
        let h = e.response_headers(
            HeaderValue::from_static("8"),
            HeaderValue::from_static("STALE"),
            None,
        );
        assert_eq!(h.get("age"), Some(&HeaderValue::from_static("8")));
        assert_eq!(h.get("x-cache"), Some(&HeaderValue::from_static("STALE")));
        assert!(!h.contains_key("cache-status"));
        assert!(
            h.values().all(|v| !v.is_empty()),
            "a place left unfilled: {h:?}"
        );
    }

    #[test]
    fn a_stored_content_length_is_kept() {
        let e = entry_with(&[("content-length", "5")], b"12345");
        let h = e.response_headers(
            HeaderValue::from_static("0"),
            HeaderValue::from_static("HIT"),
            None,
        );
        assert_eq!(h.get_all("content-length").iter().count(), 1);
        assert_eq!(h.len(), 3);
    }

    #[test]
    fn a_no_content_response_gets_no_content_length() {
        let mut e = test_entry("\"x\"", b"");
        e.meta.status = 204;
        let e = Entry::new(e.meta, e.body);
        let h = e.response_headers(
            HeaderValue::from_static("0"),
            HeaderValue::from_static("HIT"),
            None,
        );
        assert!(!h.contains_key("content-length"), "{h:?}");
        assert_eq!(h.get("etag"), Some(&HeaderValue::from_static("\"x\"")));
    }
}
