//! The demo's handlers: small JSON bodies.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use serde::Deserialize;
use serde_json::json;
use tollgate::session::Session;
use tollgate::usage::{QuotaOutcome, Usage, UsageTracker};

use crate::limits;

/// Shared by the handlers.
#[derive(Clone)]
pub struct DemoState {
    /// Usage tracker.
    pub usage: UsageTracker,
    next_id: Arc<AtomicU64>,
}

impl DemoState {
    /// State around `usage`.
    pub fn new(usage: UsageTracker) -> Self {
        DemoState {
            usage,
            next_id: Arc::new(AtomicU64::new(1)),
        }
    }

    fn id(&self) -> u64 {
        self.next_id.fetch_add(1, Ordering::Relaxed)
    }
}

fn problem(status: StatusCode, title: &str) -> Response {
    (
        status,
        [(http::header::CONTENT_TYPE, "application/problem+json")],
        Json(json!({ "title": title, "status": status.as_u16() })),
    )
        .into_response()
}

pub(crate) async fn index() -> Json<serde_json::Value> {
    Json(json!({
        "service": "tollgate demo",
        "routes": [
            "GET /health/redis", "GET /metrics",
            "POST /api/payments", "POST /api/webhooks/stripe", "POST /api/auth/login",
            "GET /api/search?q=", "POST /api/bookings", "POST /api/guest-checkout",
            "GET /api/ping", "GET /api/usage", "GET /api/usage/top?metric=api_request",
            "POST /api/emails", "POST /api/auth/logout", "GET /api/me",
            "GET /api/sessions", "DELETE /api/sessions",
            "GET /api/providers", "PUT /api/providers/{id}",
            "GET /api/campaigns/{church}", "POST /api/donations",
        ],
    }))
}

pub(crate) async fn ping() -> Json<serde_json::Value> {
    Json(json!({ "pong": true }))
}

pub(crate) async fn payment(State(s): State<DemoState>) -> Json<serde_json::Value> {
    Json(json!({ "payment_id": s.id(), "status": "accepted" }))
}

pub(crate) async fn stripe_webhook() -> Json<serde_json::Value> {
    Json(json!({ "received": true }))
}

#[derive(Deserialize)]
pub(crate) struct Login {
    user: String,
}

#[derive(Deserialize)]
pub(crate) struct Search {
    #[serde(default)]
    q: String,
}

const PROVIDERS: &[&str] = &[
    "Acme Plumbing",
    "Bright Dental",
    "City Yoga",
    "Delta Movers",
];

pub(crate) async fn search(Query(s): Query<Search>) -> Json<serde_json::Value> {
    let q = s.q.to_lowercase();
    let results: Vec<&str> = PROVIDERS
        .iter()
        .copied()
        .filter(|p| p.to_lowercase().contains(&q))
        .collect();
    Json(json!({ "query": s.q, "results": results }))
}

pub(crate) async fn booking(State(s): State<DemoState>) -> Json<serde_json::Value> {
    Json(json!({ "booking_id": s.id(), "status": "confirmed" }))
}

pub(crate) async fn guest_checkout(State(s): State<DemoState>) -> Json<serde_json::Value> {
    Json(json!({ "order_id": s.id(), "status": "placed" }))
}

/// The caller's usage this period and its plan's limits.
pub(crate) async fn usage(State(s): State<DemoState>, usage: Option<Extension<Usage>>) -> Response {
    let Some(Extension(usage)) = usage else {
        return problem(StatusCode::UNAUTHORIZED, "send an X-Api-Key header");
    };
    let tenant = usage.tenant().to_owned();
    let plan_name = limits::plan_of(&tenant);
    let plans = limits::plans();
    let Some(plan) = plans.get(plan_name) else {
        return problem(StatusCode::INTERNAL_SERVER_ERROR, "unknown plan");
    };
    // What this instance has not written yet is included.
    if let Err(e) = s.usage.flush().await {
        tracing::debug!(error = %e, "usage flush before report failed");
    }
    let period = s.usage.current_period();
    match s.usage.usage(&tenant, Some(&period.label)).await {
        Ok(used) => {
            let bill = plan.bill(
                used.iter()
                    .map(|(m, v)| (m.as_str(), u64::try_from(*v).unwrap_or(0))),
            );
            Json(json!({
                "tenant": tenant,
                "plan": plan_name,
                "period": period.label,
                "usage": used,
                "limits": plan.limits,
                "bill": {
                    "total": tollgate::usage::format_usd(bill.total_micros),
                    "lines": bill.lines,
                },
            }))
            .into_response()
        }
        Err(e) => {
            tracing::warn!(error = %e, "usage report failed");
            problem(
                StatusCode::SERVICE_UNAVAILABLE,
                "usage store unavailable, try again",
            )
        }
    }
}

#[derive(Deserialize)]
pub(crate) struct Top {
    #[serde(default = "default_metric")]
    metric: String,
    #[serde(default = "default_n")]
    n: usize,
}

fn default_metric() -> String {
    "api_request".into()
}

fn default_n() -> usize {
    10
}

pub(crate) async fn top(State(s): State<DemoState>, Query(q): Query<Top>) -> Response {
    if let Err(e) = s.usage.flush().await {
        tracing::debug!(error = %e, "usage flush before report failed");
    }
    match s.usage.top(&q.metric, None, q.n.min(100)).await {
        Ok(top) => Json(json!({
            "metric": q.metric,
            "top": top.into_iter().map(|(t, v)| json!({ "tenant": t, "value": v })).collect::<Vec<_>>(),
        }))
        .into_response(),
        Err(_) => problem(StatusCode::SERVICE_UNAVAILABLE, "usage store unavailable, try again"),
    }
}

/// Sends (pretends to) an email: counts `email_sent`, refused past the
/// free plan's monthly limit.
pub(crate) async fn email(usage: Option<Extension<Usage>>) -> Response {
    let Some(Extension(usage)) = usage else {
        return problem(StatusCode::UNAUTHORIZED, "send an X-Api-Key header");
    };
    let plans = limits::plans();
    let plan = plans.get(limits::plan_of(usage.tenant()));
    let hard = plan.is_some_and(|p| p.enforcement == tollgate::usage::Enforcement::Hard);
    match plan.and_then(|p| p.included("email_sent")) {
        Some(limit) if hard => {
            match usage
                .try_consume("email_sent", 1, i64::try_from(limit).unwrap_or(i64::MAX))
                .await
            {
                QuotaOutcome::Exceeded { total } => (
                    StatusCode::TOO_MANY_REQUESTS,
                    Json(json!({ "title": "monthly email quota exceeded", "email_sent": total })),
                )
                    .into_response(),
                QuotaOutcome::Allowed { total } => {
                    Json(json!({ "sent": true, "email_sent": total })).into_response()
                }
                QuotaOutcome::Unavailable => Json(json!({ "sent": true })).into_response(),
            }
        }
        _ => {
            let total = usage.record("email_sent", 1);
            Json(json!({ "sent": true, "email_sent": total })).into_response()
        }
    }
}

/// Logs in: a new session id (the old one, if any, is dead), bound to the
/// user.
pub(crate) async fn login_session(session: Session, Json(body): Json<Login>) -> Response {
    let user = body.user.trim().to_owned();
    if user.is_empty() || user.len() > 64 {
        return problem(
            StatusCode::UNPROCESSABLE_ENTITY,
            "user must be 1 to 64 characters",
        );
    }
    let result = async {
        session.rotate_id().await?;
        session.bind_user(user.clone()).await?;
        session.insert("user", &user).await
    }
    .await;
    match result {
        Ok(()) => Json(json!({ "user": user })).into_response(),
        Err(e) => session_error(&e),
    }
}

/// Logs out: the session is destroyed and the cookie cleared (503 while
/// Redis cannot delete a session it holds: the cookie is kept).
pub(crate) async fn logout(session: Session) -> Response {
    match session.destroy().await {
        Ok(()) => Json(json!({ "logged_out": true })).into_response(),
        Err(e) => session_error(&e),
    }
}

/// The logged-in user and how many times this endpoint saw the session.
pub(crate) async fn me(session: Session) -> Response {
    let result = async {
        let Some(user) = session.get::<String>("user").await? else {
            return Ok(None);
        };
        let visits = session.get::<u64>("visits").await?.unwrap_or(0) + 1;
        session.insert("visits", &visits).await?;
        Ok::<_, tollgate::session::Error>(Some((user, visits)))
    }
    .await;
    match result {
        Ok(Some((user, visits))) => Json(json!({ "user": user, "visits": visits })).into_response(),
        Ok(None) => problem(
            StatusCode::UNAUTHORIZED,
            "log in first: POST /api/auth/login",
        ),
        Err(e) => session_error(&e),
    }
}

/// The current user's sessions.
pub(crate) async fn list_sessions(session: Session) -> Response {
    match session.user_id().await {
        Ok(Some(user)) => match session.user_sessions().await {
            Ok(list) => {
                let current = session.id_hash().await.ok().flatten();
                let list: Vec<_> = list
                    .into_iter()
                    .map(|s| {
                        json!({
                            "id": s.id_hash,
                            "current": current.as_deref() == Some(s.id_hash.as_str()),
                            "created_at_ms": s.created_at,
                            "last_seen_ms": s.last_seen,
                            "expires_at_ms": s.expires_at,
                            "user_agent": s.user_agent,
                            "ip": s.ip,
                        })
                    })
                    .collect();
                Json(json!({ "user": user, "sessions": list })).into_response()
            }
            Err(e) => session_error(&e),
        },
        Ok(None) => problem(
            StatusCode::UNAUTHORIZED,
            "log in first: POST /api/auth/login",
        ),
        Err(e) => session_error(&e),
    }
}

/// Revokes every other session of the current user.
pub(crate) async fn revoke_other_sessions(session: Session) -> Response {
    match session.user_id().await {
        Ok(Some(_)) => match session.revoke_other_sessions().await {
            Ok(n) => Json(json!({ "revoked": n })).into_response(),
            Err(e) => session_error(&e),
        },
        Ok(None) => problem(
            StatusCode::UNAUTHORIZED,
            "log in first: POST /api/auth/login",
        ),
        Err(e) => session_error(&e),
    }
}

fn session_error(e: &tollgate::session::Error) -> Response {
    tracing::warn!(error = %e, "session store error");
    problem(
        StatusCode::SERVICE_UNAVAILABLE,
        "session store unavailable, try again",
    )
}
