//! Route patterns and how a request's route is identified.

use http::{Extensions, Method};

pub use tollgate_redis::RoutePattern;

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
