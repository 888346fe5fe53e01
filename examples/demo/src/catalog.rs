//! Providers and donation campaigns: the demo's cached data. The "database"
//! is process memory (it stands in for the application's own database);
//! the response cache in front of it is shared through Redis.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use serde::{Deserialize, Serialize};
use serde_json::json;
use tollgate::cache::Cache;
use tollgate::usage::Usage;

/// A service provider.
#[derive(Clone, Debug, Serialize)]
pub struct Provider {
    id: u32,
    name: String,
    city: String,
}

#[derive(Default)]
struct Campaign {
    donations: u64,
    raised_cents: u64,
}

/// The data and the cache that fronts it.
#[derive(Clone)]
pub struct Catalog {
    providers: Arc<Mutex<BTreeMap<u32, Provider>>>,
    campaigns: Arc<Mutex<HashMap<String, Campaign>>>,
    cache: Cache,
}

impl Catalog {
    /// Seeded with a few providers.
    pub fn new(cache: Cache) -> Self {
        let seed = [
            (1, "Acme Plumbing", "Leeds"),
            (2, "Bright Dental", "York"),
            (3, "City Yoga", "Hull"),
        ];
        let providers = seed
            .into_iter()
            .map(|(id, name, city)| {
                (
                    id,
                    Provider {
                        id,
                        name: name.into(),
                        city: city.into(),
                    },
                )
            })
            .collect();
        Catalog {
            providers: Arc::new(Mutex::new(providers)),
            campaigns: Arc::new(Mutex::new(HashMap::new())),
            cache,
        }
    }

    /// The cache (for invalidation).
    pub fn cache(&self) -> &Cache {
        &self.cache
    }
}

fn bad(status: StatusCode, title: &str) -> Response {
    (
        status,
        [(http::header::CONTENT_TYPE, "application/problem+json")],
        Json(json!({ "title": title, "status": status.as_u16() })),
    )
        .into_response()
}

/// The catalogue is the same for every caller: marked `public`, so the
/// cache may serve it to requests carrying an API key (a credential), which
/// it otherwise never shares.
const PUBLIC: [(axum::http::HeaderName, &str); 1] = [(axum::http::header::CACHE_CONTROL, "public")];

/// `GET /api/providers`: cached 60 s under the `providers` tag (route
/// config).
pub(crate) async fn providers(State(c): State<Catalog>) -> Response {
    let list: Vec<Provider> = match c.providers.lock() {
        Ok(p) => p.values().cloned().collect(),
        Err(_) => return bad(StatusCode::INTERNAL_SERVER_ERROR, "catalog unavailable"),
    };
    (PUBLIC, Json(json!({ "providers": list }))).into_response()
}

#[derive(Deserialize)]
pub(crate) struct ProviderUpdate {
    name: String,
    #[serde(default)]
    city: Option<String>,
}

/// `PUT /api/providers/{id}`: updates one and invalidates `providers`.
pub(crate) async fn update_provider(
    State(c): State<Catalog>,
    Path(id): Path<u32>,
    Json(body): Json<ProviderUpdate>,
) -> Response {
    let name = body.name.trim();
    if name.is_empty() || name.len() > 100 {
        return bad(
            StatusCode::UNPROCESSABLE_ENTITY,
            "name must be 1 to 100 characters",
        );
    }
    let updated = match c.providers.lock() {
        Ok(mut p) => {
            let entry = p.entry(id).or_insert_with(|| Provider {
                id,
                name: String::new(),
                city: String::new(),
            });
            entry.name = name.to_owned();
            if let Some(city) = body.city {
                entry.city = city;
            }
            entry.clone()
        }
        Err(_) => return bad(StatusCode::INTERNAL_SERVER_ERROR, "catalog unavailable"),
    };
    invalidate(&c, "providers").await;
    Json(json!({ "provider": updated })).into_response()
}

fn valid_church(church: &str) -> bool {
    !church.is_empty()
        && church.len() <= 64
        && church
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
}

/// `GET /api/campaigns/{church}`: cached 5 minutes under
/// `campaigns:{church}` (set through the `x-cache-tags` header, which the
/// cache layer strips).
pub(crate) async fn campaign(State(c): State<Catalog>, Path(church): Path<String>) -> Response {
    if !valid_church(&church) {
        return bad(StatusCode::NOT_FOUND, "no such campaign");
    }
    let (donations, raised) = match c.campaigns.lock() {
        Ok(m) => m
            .get(&church)
            .map_or((0, 0), |k| (k.donations, k.raised_cents)),
        Err(_) => return bad(StatusCode::INTERNAL_SERVER_ERROR, "catalog unavailable"),
    };
    (
        PUBLIC,
        [("x-cache-tags", format!("campaigns:{church}"))],
        Json(json!({
            "church": church,
            "donations": donations,
            "raised_cents": raised,
            "goal_cents": 1_000_000,
        })),
    )
        .into_response()
}

#[derive(Deserialize)]
pub(crate) struct Donation {
    church: String,
    /// In cents.
    amount: u64,
}

/// `POST /api/donations`: records a donation and invalidates that church's
/// campaign, so the next GET shows the new total.
pub(crate) async fn donate(
    State(c): State<Catalog>,
    usage: Option<Extension<Usage>>,
    Json(d): Json<Donation>,
) -> Response {
    if !valid_church(&d.church) {
        return bad(
            StatusCode::UNPROCESSABLE_ENTITY,
            "church must be [a-z0-9-]{1,64}",
        );
    }
    if d.amount == 0 || d.amount > 100_000_000 {
        return bad(
            StatusCode::UNPROCESSABLE_ENTITY,
            "amount must be 1 to 100,000,000 cents",
        );
    }
    let raised = match c.campaigns.lock() {
        Ok(mut m) => {
            let k = m.entry(d.church.clone()).or_default();
            k.donations += 1;
            k.raised_cents += d.amount;
            k.raised_cents
        }
        Err(_) => return bad(StatusCode::INTERNAL_SERVER_ERROR, "catalog unavailable"),
    };
    if let Some(Extension(u)) = usage {
        u.record("donations", 1);
        u.record(
            "donation_cents",
            i64::try_from(d.amount).unwrap_or(i64::MAX),
        );
    }
    invalidate(&c, &format!("campaigns:{}", d.church)).await;
    (
        StatusCode::CREATED,
        Json(json!({ "church": d.church, "raised_cents": raised })),
    )
        .into_response()
}

async fn invalidate(c: &Catalog, tag: &str) {
    let r = c.cache.invalidate_tag(tag).await;
    if let Err(e) = r {
        // The entries expire on their own; log it so it can be seen.
        tracing::warn!(tag, error = %e, "cache invalidation failed");
    }
}
