//! Route patterns, shared by the layers' route tables (rate limiting,
//! caching). Plain string matching: nothing here knows HTTP.

/// Why a route pattern was refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("route `{pattern}`: {reason}")]
pub struct RoutePatternError {
    /// The pattern as written.
    pub pattern: String,
    /// What is wrong with it.
    pub reason: &'static str,
}

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
    pub fn parse(raw: &str) -> Result<Self, RoutePatternError> {
        let bad = |reason: &'static str| RoutePatternError {
            pattern: raw.to_owned(),
            reason,
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

    /// The pattern as written (layers use it as the metrics label).
    pub fn as_str(&self) -> &str {
        &self.raw
    }

    /// Whether `path` (a request path or an axum route template) matches.
    pub fn matches(&self, path: &str) -> bool {
        // Walked segment by segment: a request's path is matched without
        // an allocation.
        let mut parts = segments(path);
        for seg in &self.segments {
            match (seg, parts.next()) {
                (Segment::Wildcard, _) => return true,
                (Segment::Param, Some(p)) if !p.is_empty() => {}
                (Segment::Literal(l), Some(p)) if p == l => {}
                _ => return false,
            }
        }
        parts.next().is_none()
    }

    /// Orders overlapping matches: more literal segments first, then longer
    /// patterns, then patterns without a wildcard.
    pub fn specificity(&self) -> (usize, usize, bool) {
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
    segments(path).collect()
}

/// The segments of `path` between slashes, one leading and one trailing
/// slash ignored; none for `/` or the empty path.
fn segments(path: &str) -> impl Iterator<Item = &str> {
    let p = path.strip_prefix('/').unwrap_or(path);
    let p = p.strip_suffix('/').unwrap_or(p);
    (!p.is_empty()).then(|| p.split('/')).into_iter().flatten()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patterns_match_paths_and_templates() {
        let p = RoutePattern::parse("/api/users/{id}").expect("valid");
        assert!(p.matches("/api/users/42"));
        assert!(p.matches("/api/users/{id}"));
        assert!(!p.matches("/api/users"));
        assert!(!p.matches("/api/users/42/posts"));
        let w = RoutePattern::parse("/static/*").expect("valid");
        assert!(w.matches("/static/a/b.css"));
        assert!(w.matches("/static"));
        assert!(
            RoutePattern::parse("/a/:id")
                .expect("valid")
                .matches("/a/1")
        );
        let e = RoutePattern::parse("/a/*/b").expect_err("wildcard in the middle");
        assert_eq!(
            e.to_string(),
            "route `/a/*/b`: a wildcard must be the last segment"
        );
        assert!(RoutePattern::parse("a").is_err());
        assert!(RoutePattern::parse("/a{").is_err());
        assert!(
            RoutePattern::parse("/a/b").expect("valid").specificity()
                > RoutePattern::parse("/a/{x}").expect("valid").specificity()
        );
    }
}
