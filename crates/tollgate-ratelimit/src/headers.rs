//! Response headers and the ready-made denial responses.

use std::sync::Arc;

use bytes::Bytes;
use http::header::{CONTENT_TYPE, HeaderName, HeaderValue, RETRY_AFTER};
use http::{HeaderMap, Response, StatusCode};
use sha2::{Digest, Sha256};
use tollgate_redis::header_value::{LastValue, SMALL_NUMBERS, number as num};

use crate::decision::{Decision, Report, RequestVerdict};

/// `X-RateLimit-Limit`.
pub static X_RATELIMIT_LIMIT: HeaderName = HeaderName::from_static("x-ratelimit-limit");
/// `X-RateLimit-Remaining`.
pub static X_RATELIMIT_REMAINING: HeaderName = HeaderName::from_static("x-ratelimit-remaining");
/// `X-RateLimit-Reset` (seconds until the quota is whole again).
pub static X_RATELIMIT_RESET: HeaderName = HeaderName::from_static("x-ratelimit-reset");
/// `X-RateLimit-Policy` (the name of the reported policy; sent only when
/// asked for, [`RateLimiterBuilder::policy_header`](crate::RateLimiterBuilder::policy_header)).
pub static X_RATELIMIT_POLICY: HeaderName = HeaderName::from_static("x-ratelimit-policy");
/// IETF `RateLimit-Policy`.
pub static RATELIMIT_POLICY: HeaderName = HeaderName::from_static("ratelimit-policy");
/// IETF `RateLimit`.
pub static RATELIMIT: HeaderName = HeaderName::from_static("ratelimit");

/// Which header sets a response carries.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct HeaderOptions {
    pub legacy: bool,
    pub policy: bool,
    pub ietf: bool,
}

thread_local! {
    /// The last policy-name and limit values this thread wrote: the same
    /// few repeat on every response.
    static LAST_POLICY: LastValue<Arc<str>> = const { LastValue::new() };
    static LAST_LIMIT: LastValue<u64> = const { LastValue::new() };
}

fn limit_value(n: u64) -> HeaderValue {
    if n < SMALL_NUMBERS {
        return num(n);
    }
    LAST_LIMIT
        .with(|last| last.get(|k| *k == n, || Some((n, num(n)))))
        .unwrap_or_else(|| num(n))
}

fn policy_value(name: &Arc<str>) -> Option<HeaderValue> {
    LAST_POLICY.with(|last| {
        last.get(
            |k| Arc::ptr_eq(k, name),
            || Some((name.clone(), HeaderValue::from_str(name).ok()?)),
        )
    })
}

/// What the headers of a request let through need from its report: the
/// few fields of the most constraining policy, kept in the response's
/// future instead of the whole report and key.
pub(crate) enum Stamp {
    /// `X-RateLimit-*` (and the name for `X-RateLimit-Policy`).
    Fields {
        legacy: Option<(u64, u64, u64)>,
        policy: Option<Arc<str>>,
    },
    /// The IETF fields name every policy and a hash of the key: the whole
    /// report.
    Full(Box<(Report, String, HeaderOptions)>),
}

impl Stamp {
    /// The stamp of a request `report` let through; `None` when it gets no
    /// header.
    pub(crate) fn of(report: Report, identity: String, opts: HeaderOptions) -> Option<Stamp> {
        if opts.ietf {
            return Some(Stamp::Full(Box::new((report, identity, opts))));
        }
        if !opts.legacy && !opts.policy {
            return None;
        }
        let d = report.most_constraining()?;
        Some(Stamp::Fields {
            legacy: opts.legacy.then_some((d.limit, d.remaining, d.reset)),
            policy: opts.policy.then(|| d.policy.clone()),
        })
    }

    /// Adds the headers to a response.
    pub(crate) fn apply(self, h: &mut HeaderMap) {
        match self {
            Stamp::Fields { legacy, policy } => fields(h, legacy, policy.as_ref()),
            Stamp::Full(full) => {
                let (report, identity, opts) = *full;
                apply(&report, &identity, opts, h);
            }
        }
    }
}

/// `X-RateLimit-Limit`, `-Remaining` and `-Reset` from `legacy`, and
/// `X-RateLimit-Policy` naming `policy`: the most constraining policy's
/// headers, from a whole report or from a [`Stamp`].
fn fields(h: &mut HeaderMap, legacy: Option<(u64, u64, u64)>, policy: Option<&Arc<str>>) {
    if let Some((limit, remaining, reset)) = legacy {
        h.reserve(3);
        h.insert(X_RATELIMIT_LIMIT.clone(), limit_value(limit));
        h.insert(X_RATELIMIT_REMAINING.clone(), num(remaining));
        h.insert(X_RATELIMIT_RESET.clone(), num(reset));
    }
    if let Some(v) = policy.and_then(policy_value) {
        h.insert(X_RATELIMIT_POLICY.clone(), v);
    }
}

/// Adds the rate-limit headers of `report` (most constraining policy).
pub(crate) fn apply(report: &Report, identity: &str, opts: HeaderOptions, h: &mut HeaderMap) {
    let Some(d) = report.most_constraining() else {
        return;
    };
    fields(
        h,
        opts.legacy.then_some((d.limit, d.remaining, d.reset)),
        opts.policy.then_some(&d.policy),
    );
    if let Some(r) = d.retry_after
        && report.verdict == RequestVerdict::Deny
    {
        h.insert(RETRY_AFTER, num(r));
    }
    if opts.ietf {
        let pk = partition_key(identity);
        let policies = report
            .decisions
            .iter()
            .map(|d| {
                format!(
                    "{};q={};w={};pk={pk}",
                    sf_string(&d.policy),
                    d.limit,
                    crate::quota::ceil_secs(
                        u64::try_from(d.window.as_micros()).unwrap_or(u64::MAX)
                    )
                    .max(1)
                )
            })
            .collect::<Vec<_>>()
            .join(", ");
        if let Ok(v) = HeaderValue::from_str(&policies) {
            h.insert(RATELIMIT_POLICY.clone(), v);
        }
        let field = format!(
            "{};r={};t={};pk={pk}",
            sf_string(&d.policy),
            d.remaining,
            d.reset
        );
        if let Ok(v) = HeaderValue::from_str(&field) {
            h.insert(RATELIMIT.clone(), v);
        }
    }
}

/// A structured-field string: quoted, `"` and `\` escaped, non-ASCII
/// replaced (policy names are ASCII in practice).
fn sf_string(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' | '\\' => {
                out.push('\\');
                out.push(c);
            }
            ' '..='~' => out.push(c),
            _ => out.push('_'),
        }
    }
    out.push('"');
    out
}

/// The `pk` parameter: a structured-field byte sequence holding the first
/// 12 bytes of SHA-256 of the key, never the key itself.
pub(crate) fn partition_key(identity: &str) -> String {
    let d = Sha256::digest(identity.as_bytes());
    format!(":{}:", base64(&d[..12]))
}

fn base64(bytes: &[u8]) -> String {
    const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(char::from(A[((n >> (18 - 6 * i)) & 63) as usize]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// gRPC status codes used here.
pub(crate) mod grpc {
    pub(crate) const INVALID_ARGUMENT: u16 = 3;
    pub(crate) const RESOURCE_EXHAUSTED: u16 = 8;
    pub(crate) const UNAVAILABLE: u16 = 14;
}

/// A problem (RFC 9457) or, for gRPC, a trailers-only error response.
pub(crate) fn problem<B: From<Bytes>>(
    status: StatusCode,
    grpc_code: u16,
    title: &str,
    detail: &str,
    extra: Option<(&str, serde_json::Value)>,
    is_grpc: bool,
) -> Response<B> {
    if is_grpc {
        let mut res = Response::new(B::from(Bytes::new()));
        let h = res.headers_mut();
        h.insert(CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
        h.insert("grpc-status", HeaderValue::from(grpc_code));
        // grpc-message is percent-encoded; our messages are plain ASCII.
        let msg: String = detail
            .chars()
            .map(|c| {
                if (' '..='~').contains(&c) && c != '%' {
                    c
                } else {
                    '_'
                }
            })
            .collect();
        if let Ok(v) = HeaderValue::from_str(&msg) {
            h.insert("grpc-message", v);
        }
        return res;
    }
    let mut body = serde_json::json!({
        "type": "about:blank",
        "title": title,
        "status": status.as_u16(),
        "detail": detail,
    });
    if let (Some((k, v)), Some(obj)) = (extra, body.as_object_mut()) {
        obj.insert(k.to_owned(), v);
    }
    let bytes = serde_json::to_vec(&body).unwrap_or_default();
    let mut res = Response::new(B::from(Bytes::from(bytes)));
    *res.status_mut() = status;
    res.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("application/problem+json"),
    );
    res
}

/// The response to a refused request.
pub(crate) fn refusal<B: From<Bytes>>(
    report: &Report,
    identity: &str,
    opts: HeaderOptions,
    is_grpc: bool,
    exceeds_status: StatusCode,
) -> Response<B> {
    let d: Option<&Decision> = report.most_constraining();
    let policy = d.map(|d| d.policy.to_string()).unwrap_or_default();
    let mut res = match report.verdict {
        RequestVerdict::Unavailable => problem(
            StatusCode::SERVICE_UNAVAILABLE,
            grpc::UNAVAILABLE,
            "Service Unavailable",
            "the rate limiter cannot reach its store and this route fails closed",
            None,
            is_grpc,
        ),
        RequestVerdict::ExceedsCapacity => problem(
            exceeds_status,
            grpc::RESOURCE_EXHAUSTED,
            "Request Cost Exceeds Capacity",
            &format!("this request costs more than policy `{policy}` can ever allow"),
            Some(("policy", serde_json::Value::String(policy.clone()))),
            is_grpc,
        ),
        _ => {
            let retry = d.and_then(|d| d.retry_after).unwrap_or(1);
            problem(
                StatusCode::TOO_MANY_REQUESTS,
                grpc::RESOURCE_EXHAUSTED,
                "Too Many Requests",
                &format!("rate limit `{policy}` exceeded; retry after {retry} s"),
                Some(("retry_after", serde_json::Value::from(retry))),
                is_grpc,
            )
        }
    };
    if report.verdict != RequestVerdict::Unavailable {
        apply(report, identity, opts, res.headers_mut());
    }
    res
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_matches_rfc4648() {
        assert_eq!(base64(b""), "");
        assert_eq!(base64(b"f"), "Zg==");
        assert_eq!(base64(b"fo"), "Zm8=");
        assert_eq!(base64(b"foo"), "Zm9v");
        assert_eq!(base64(b"foobar"), "Zm9vYmFy");
    }

    #[test]
    fn partition_key_hides_the_key() {
        let pk = partition_key("ip:1.2.3.4");
        assert!(
            pk.starts_with(':') && pk.ends_with(':') && pk.len() == 18,
            "{pk}"
        );
        assert!(!pk.contains("1.2.3.4"));
        assert_eq!(sf_string("a\"b"), "\"a\\\"b\"");
    }

    fn report(policy: &Arc<str>, limit: u64) -> Report {
        let quota = crate::Quota::per_second(u32::try_from(limit).expect("limit"))
            .with_burst(u32::try_from(limit).expect("limit"));
        let v = crate::quota::Verdict {
            status: crate::quota::Status::Allowed,
            remaining: limit - 1,
            reset_us: 0,
            retry_us: 0,
        };
        Report {
            route: Arc::from("/"),
            verdict: RequestVerdict::Allow,
            decisions: vec![Decision::from_verdict(
                policy,
                &quota,
                crate::Algorithm::Gcra,
                v,
                crate::Source::Redis,
            )],
        }
    }

    /// `q` and `w` describe one capacity: a GCRA policy of 100 a minute
    /// with a burst of 10 allows 10 per 6 s (its `Limit` and `Remaining`
    /// count out of 10), not 10 per minute. A limit that does not divide
    /// the period still states the whole period.
    #[test]
    fn ietf_policy_states_the_capacity_and_its_window() {
        let name: Arc<str> = Arc::from("api");
        let opts = HeaderOptions {
            legacy: false,
            policy: false,
            ietf: true,
        };
        for (quota, want) in [
            (crate::Quota::per_minute(100).with_burst(10), "q=10;w=6;"),
            (crate::Quota::per_minute(7), "q=7;w=60;"),
        ] {
            let v = crate::quota::Verdict {
                status: crate::quota::Status::Allowed,
                remaining: 1,
                reset_us: 0,
                retry_us: 0,
            };
            let d = Decision::from_verdict(
                &name,
                &quota,
                crate::Algorithm::Gcra,
                v,
                crate::Source::Redis,
            );
            let r = Report {
                route: Arc::from("/"),
                verdict: RequestVerdict::Allow,
                decisions: vec![d],
            };
            let mut h = HeaderMap::new();
            apply(&r, "k", opts, &mut h);
            let field = h[&RATELIMIT_POLICY].to_str().unwrap();
            assert!(field.contains(want), "{field}");
        }
    }

    /// The values remembered between responses follow the policy and the
    /// limit of each response, in any order.
    #[test]
    fn remembered_values_follow_each_response() {
        let a: Arc<str> = Arc::from("burst");
        let b: Arc<str> = Arc::from("sustained");
        let opts = HeaderOptions {
            legacy: true,
            policy: true,
            ietf: false,
        };
        for (policy, limit) in [(&a, 5_000), (&a, 5_000), (&b, 70_000), (&a, 5_000), (&b, 3)] {
            let mut h = HeaderMap::new();
            apply(&report(policy, limit), "k", opts, &mut h);
            assert_eq!(h[&X_RATELIMIT_POLICY], policy.as_ref());
            assert_eq!(h[&X_RATELIMIT_LIMIT], limit.to_string().as_str());
            assert_eq!(h[&X_RATELIMIT_REMAINING], (limit - 1).to_string().as_str());
        }
    }

    /// A served request's stamp adds the same headers as the whole report
    /// would, in every combination of header sets.
    #[test]
    fn a_stamp_adds_what_the_report_would() {
        let policy: Arc<str> = Arc::from("api");
        for bits in 0..8u8 {
            let opts = HeaderOptions {
                legacy: bits & 1 != 0,
                policy: bits & 2 != 0,
                ietf: bits & 4 != 0,
            };
            let r = report(&policy, 100);
            let mut whole = HeaderMap::new();
            apply(&r, "ip:192.0.2.1", opts, &mut whole);
            let mut stamped = HeaderMap::new();
            if let Some(stamp) = Stamp::of(r, "ip:192.0.2.1".to_owned(), opts) {
                stamp.apply(&mut stamped);
            }
            assert_eq!(stamped, whole, "{opts:?}");
            assert_eq!(whole.contains_key(&X_RATELIMIT_LIMIT), opts.legacy);
            assert_eq!(whole.contains_key(&X_RATELIMIT_POLICY), opts.policy);
            assert_eq!(whole.contains_key(&RATELIMIT), opts.ietf);
        }
    }
}
