//! Route patterns and how a request's route is identified.

use http::{Extensions, Method};

use crate::error::ConfigError;

/// A route pattern: `/api/users/{id}` style, `:id` also accepted, with an
/// optional `*` (or `{*rest}`) wildcard as the last segment matching any
/// tail. gRPC paths are patterns too: `/shop.Cart/AddItem`, `/shop.Cart/*`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RoutePattern {
    raw: String,
    segments: Vec<Segment>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Segment {
    Literal(String),
    Param,
    Wildcard,
}

impl RoutePattern {
    /// Parses a pattern; it must start with `/` and a wildcard may only end it.
    pub fn parse(raw: &str) -> Result<Self, ConfigError> {
        let bad = |reason: &str| ConfigError::Invalid {
            field: format!("route `{raw}`"),
            reason: reason.to_owned(),
        };
        if !raw.starts_with('/') {
            return Err(bad("a route pattern must start with `/`"));
        }
        let parts = split(raw);
        let mut segments = Vec::with_capacity(parts.len());
        for (i, p) in parts.iter().enumerate() {
            let seg = if *p == "*" || (p.starts_with("{*") && p.ends_with('}')) {
                if i + 1 != parts.len() {
                    return Err(bad("a wildcard must be the last segment"));
                }
                Segment::Wildcard
            } else if (p.starts_with('{') && p.ends_with('}') && p.len() > 2)
                || (p.starts_with(':') && p.len() > 1)
            {
                Segment::Param
            } else if p.contains(['{', '}']) {
                return Err(bad("unbalanced `{` or `}` in a segment"));
            } else {
                Segment::Literal((*p).to_owned())
            };
            segments.push(seg);
        }
        Ok(RoutePattern {
            raw: raw.to_owned(),
            segments,
        })
    }

    /// The pattern as written (used as the metrics label).
    pub fn as_str(&self) -> &str {
        &self.raw
    }

    /// Whether `path` (a request path or an axum route template) matches.
    pub fn matches(&self, path: &str) -> bool {
        let parts = split(path);
        let mut i = 0;
        for seg in &self.segments {
            match seg {
                Segment::Wildcard => return true,
                Segment::Param => {
                    if i >= parts.len() || parts[i].is_empty() {
                        return false;
                    }
                }
                Segment::Literal(l) => {
                    if parts.get(i) != Some(&l.as_str()) {
                        return false;
                    }
                }
            }
            i += 1;
        }
        i == parts.len()
    }

    /// Orders overlapping matches: more literal segments first, then longer
    /// patterns, then patterns without a wildcard.
    pub(crate) fn specificity(&self) -> (usize, usize, bool) {
        let literals = self
            .segments
            .iter()
            .filter(|s| matches!(s, Segment::Literal(_)))
            .count();
        let wild = self.segments.iter().any(|s| matches!(s, Segment::Wildcard));
        (literals, self.segments.len(), !wild)
    }
}

fn split(path: &str) -> Vec<&str> {
    let p = path.strip_prefix('/').unwrap_or(path);
    let p = p.strip_suffix('/').unwrap_or(p);
    if p.is_empty() {
        Vec::new()
    } else {
        p.split('/').collect()
    }
}

/// How a request's route was identified, for the table lookup.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct RouteId<'a> {
    /// axum's `MatchedPath` (a template), when present.
    pub template: Option<&'a str>,
    /// The request path (for gRPC, `/package.Service/Method`).
    pub path: &'a str,
    /// The method.
    pub method: &'a Method,
}

/// The route template axum put in the request's extensions, if any.
#[cfg(feature = "axum")]
pub(crate) fn matched_path(ext: &Extensions) -> Option<&str> {
    ext.get::<axum::extract::MatchedPath>().map(|m| m.as_str())
}

/// Without the `axum` feature only the path is matched.
#[cfg(not(feature = "axum"))]
pub(crate) fn matched_path(_ext: &Extensions) -> Option<&str> {
    None
}

/// Whether the request is gRPC (`content-type: application/grpc*`).
pub(crate) fn is_grpc(headers: &http::HeaderMap) -> bool {
    headers
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/grpc"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patterns_match() {
        let p = RoutePattern::parse("/api/users/{id}").unwrap();
        assert!(p.matches("/api/users/42"));
        assert!(p.matches("/api/users/{id}"), "axum templates match too");
        assert!(p.matches("/api/users/42/"));
        assert!(!p.matches("/api/users"));
        assert!(!p.matches("/api/users/42/posts"));
        let w = RoutePattern::parse("/static/*").unwrap();
        assert!(w.matches("/static/a/b.css"));
        assert!(w.matches("/static"));
        assert!(!w.matches("/api"));
        let g = RoutePattern::parse("/shop.Cart/*").unwrap();
        assert!(g.matches("/shop.Cart/AddItem"));
        let c = RoutePattern::parse("/a/:id").unwrap();
        assert!(c.matches("/a/1"));
        assert!(RoutePattern::parse("/a/*/b").is_err());
        assert!(RoutePattern::parse("a").is_err());
        assert!(RoutePattern::parse("/a{").is_err());
        assert!(RoutePattern::parse("/").unwrap().matches("/"));
    }
}
