//! The demo's rate-limit table and plans: the limits of a booking/payments
//! API, and usage plans by API-key prefix.

use tollgate::ratelimit::{HeaderKey, KeyExtractor, PeerIp, Policy, PolicyTable, Quota, key_fn};
use tollgate::usage::Plans;

use std::time::Duration;

/// Each route's limit (at most N requests per window); any other `/api`
/// route gets 100 per minute; routes outside `/api` are not limited.
pub fn policy_table() -> PolicyTable {
    let per = |n, secs| Quota::new(n, Duration::from_secs(secs));
    PolicyTable::builder()
        .policy(Policy::new("payments", per(10, 60)))
        .policy(Policy::new("webhooks", per(10, 1)))
        .policy(Policy::new("auth", per(5, 15 * 60)))
        .policy(Policy::new("search", per(30, 60)))
        .policy(Policy::new("bookings", per(5, 5 * 60)))
        .policy(Policy::new("guest_checkout", per(3, 5 * 60)))
        .policy(Policy::new("api", per(100, 60)))
        .rule(route("POST", "/api/payments", "payments"))
        .rule(route("POST", "/api/webhooks/stripe", "webhooks"))
        .rule(route("POST", "/api/auth/login", "auth"))
        .rule(route("GET", "/api/search", "search"))
        .rule(route("POST", "/api/bookings", "bookings"))
        .rule(route("POST", "/api/guest-checkout", "guest_checkout"))
        .route("/api/*", ["api"])
        .build()
        .expect("the demo's table is valid")
}

fn route(method: &str, path: &str, policy: &str) -> tollgate::ratelimit::RouteRule {
    tollgate::ratelimit::RouteRule::new(path, [policy])
        .method(method.parse().expect("a valid method"))
}

/// The caller: the `X-Api-Key` header when present (hashed before it
/// reaches Redis), else the client IP.
pub fn caller() -> impl KeyExtractor {
    let key = HeaderKey::new(http::HeaderName::from_static("x-api-key"));
    let ip = PeerIp::new();
    key_fn(move |r| key.key(r).or_else(|| ip.key(r)))
}

/// The plan of an API key: `free_…` is free (hard monthly limits), `pro_…`
/// is growth, anything else starter.
pub fn plan_of(api_key: &str) -> &'static str {
    if api_key.starts_with("free_") {
        "free"
    } else if api_key.starts_with("pro_") {
        "growth"
    } else {
        "starter"
    }
}

/// The example plans.
pub fn plans() -> Plans {
    Plans::example()
}
