//! Policies and the per-route policy table, in code or from serde.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use http::Method;
use serde::{Deserialize, Serialize};

use crate::error::ConfigError;
use crate::quota::{Algorithm, Quota, duration_repr};
use crate::route::{RouteId, RoutePattern};

/// What a policy does when Redis is unreachable (breaker open, timeout,
/// error).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FailureMode {
    /// Decide in process with `governor` (same quota, same headers): limits
    /// then hold per instance instead of globally. The default.
    #[default]
    Fallback,
    /// Allow every request (no limit while Redis is down).
    FailOpen,
    /// Refuse every request with 503 (gRPC `UNAVAILABLE`).
    FailClosed,
}

/// The quota a plan tier gets.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PlanQuota {
    /// This quota instead of the policy's.
    Limited(Quota),
    /// No limit for this plan.
    Unlimited,
}

/// A named limit: a quota, an algorithm, a failure mode, optional plan
/// tiers and shadow mode.
///
/// ```
/// use tollgate_ratelimit::{Algorithm, Policy, Quota};
///
/// let p = Policy::new("search", Quota::per_minute(30))
///     .with_algorithm(Algorithm::SlidingWindow)
///     .with_plan("pro", Quota::per_minute(300));
/// assert_eq!(p.name(), "search");
/// assert_eq!(p.quota_for(Some("pro")).map(|q| q.limit()), Some(300));
/// assert_eq!(p.quota_for(Some("free")).map(|q| q.limit()), Some(30));
/// ```
#[derive(Clone, Debug, PartialEq)]
#[must_use]
pub struct Policy {
    pub(crate) name: Arc<str>,
    pub(crate) quota: Quota,
    pub(crate) algorithm: Algorithm,
    pub(crate) failure: FailureMode,
    pub(crate) shadow: bool,
    pub(crate) plans: Vec<(String, PlanQuota)>,
}

impl Policy {
    /// A GCRA policy named `name` (used in Redis keys, headers and metrics).
    pub fn new(name: impl Into<String>, quota: Quota) -> Self {
        Policy {
            name: Arc::from(name.into()),
            quota,
            algorithm: Algorithm::Gcra,
            failure: FailureMode::Fallback,
            shadow: false,
            plans: Vec::new(),
        }
    }

    /// Sets the algorithm.
    pub fn with_algorithm(mut self, a: Algorithm) -> Self {
        self.algorithm = a;
        self
    }

    /// Sets the behaviour while Redis is down.
    pub fn with_failure_mode(mut self, m: FailureMode) -> Self {
        self.failure = m;
        self
    }

    /// Shadow mode: decisions are made and counted (`shadow_denied`) but the
    /// policy never denies.
    pub fn shadow(mut self, on: bool) -> Self {
        self.shadow = on;
        self
    }

    /// A different quota for callers whose [`Plan`](crate::Plan) is `plan`.
    pub fn with_plan(mut self, plan: impl Into<String>, quota: Quota) -> Self {
        self.set_plan(plan.into(), PlanQuota::Limited(quota));
        self
    }

    /// No limit for callers whose [`Plan`](crate::Plan) is `plan`.
    pub fn with_unlimited_plan(mut self, plan: impl Into<String>) -> Self {
        self.set_plan(plan.into(), PlanQuota::Unlimited);
        self
    }

    fn set_plan(&mut self, plan: String, q: PlanQuota) {
        self.plans.retain(|(p, _)| *p != plan);
        self.plans.push((plan, q));
    }

    /// The name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The default quota.
    pub fn quota(&self) -> Quota {
        self.quota
    }

    /// The algorithm.
    pub fn algorithm(&self) -> Algorithm {
        self.algorithm
    }

    /// The failure mode.
    pub fn failure_mode(&self) -> FailureMode {
        self.failure
    }

    /// Whether the policy is in shadow mode.
    pub fn is_shadow(&self) -> bool {
        self.shadow
    }

    /// The quota for a caller on `plan`; `None` when that plan is unlimited.
    pub fn quota_for(&self, plan: Option<&str>) -> Option<Quota> {
        if let Some(plan) = plan
            && let Some((_, q)) = self.plans.iter().find(|(p, _)| p == plan)
        {
            return match q {
                PlanQuota::Limited(q) => Some(*q),
                PlanQuota::Unlimited => None,
            };
        }
        Some(self.quota)
    }

    fn validate(&self) -> Result<(), ConfigError> {
        if self.name.is_empty() {
            return Err(ConfigError::Invalid {
                field: "policy name".into(),
                reason: "must not be empty".into(),
            });
        }
        let field = format!("policy `{}`", self.name);
        self.quota.validate(&field)?;
        for (plan, q) in &self.plans {
            if let PlanQuota::Limited(q) = q {
                q.validate(&format!("policy `{}` plan `{plan}`", self.name))?;
            }
        }
        Ok(())
    }
}

/// What a route rule applies.
#[derive(Clone, Debug, PartialEq, Eq)]
enum RuleLimit {
    Policies(Vec<Arc<str>>),
    Unlimited,
}

/// One row of the table: a route pattern (+ optional method) and the
/// policies that apply to it, or none ([`unlimited`](Self::unlimited)).
#[derive(Clone, Debug)]
#[must_use]
pub struct RouteRule {
    pattern: String,
    method: Option<Method>,
    limit: RuleLimit,
    cost: u32,
}

impl RouteRule {
    /// A rule for `pattern` applying `policies` (by name).
    pub fn new<I, S>(pattern: impl Into<String>, policies: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        RouteRule {
            pattern: pattern.into(),
            method: None,
            limit: RuleLimit::Policies(
                policies
                    .into_iter()
                    .map(|s| Arc::from(s.as_ref()))
                    .collect(),
            ),
            cost: 1,
        }
    }

    /// A rule exempting `pattern` from every limit (health checks, ...).
    pub fn unlimited(pattern: impl Into<String>) -> Self {
        RouteRule {
            pattern: pattern.into(),
            method: None,
            limit: RuleLimit::Unlimited,
            cost: 1,
        }
    }

    /// Only for this method.
    pub fn method(mut self, m: Method) -> Self {
        self.method = Some(m);
        self
    }

    /// What one request costs (default 1; 0 only peeks). A request may
    /// override it with a [`Cost`](crate::Cost) extension.
    pub fn cost(mut self, cost: u32) -> Self {
        self.cost = cost;
        self
    }

    fn label(&self) -> String {
        match &self.method {
            Some(m) => format!("{m} {}", self.pattern),
            None => self.pattern.clone(),
        }
    }
}

/// Builds a [`PolicyTable`].
#[derive(Clone, Debug, Default)]
#[must_use]
pub struct PolicyTableBuilder {
    policies: Vec<Policy>,
    rules: Vec<RouteRule>,
    default: Vec<Arc<str>>,
}

impl PolicyTableBuilder {
    /// Defines a policy.
    pub fn policy(mut self, p: Policy) -> Self {
        self.policies.push(p);
        self
    }

    /// Applies `policies` to `pattern` (any method).
    pub fn route<I, S>(self, pattern: &str, policies: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        self.rule(RouteRule::new(pattern, policies))
    }

    /// Exempts `pattern` from every limit.
    pub fn unlimited(self, pattern: &str) -> Self {
        self.rule(RouteRule::unlimited(pattern))
    }

    /// Adds a rule.
    pub fn rule(mut self, r: RouteRule) -> Self {
        self.rules.push(r);
        self
    }

    /// The policies for routes no rule matches (none by default: such
    /// routes are not limited).
    pub fn default_policies<I, S>(mut self, policies: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        self.default = policies
            .into_iter()
            .map(|s| Arc::from(s.as_ref()))
            .collect();
        self
    }

    /// Validates and compiles the table.
    pub fn build(self) -> Result<PolicyTable, ConfigError> {
        let mut names = HashSet::new();
        for p in &self.policies {
            p.validate()?;
            if !names.insert(p.name.clone()) {
                return Err(ConfigError::DuplicatePolicy {
                    name: p.name.to_string(),
                });
            }
        }
        let policies: Vec<Arc<Policy>> = self.policies.into_iter().map(Arc::new).collect();
        let resolve = |route: &str, list: &[Arc<str>]| -> Result<Arc<[usize]>, ConfigError> {
            let mut out = Vec::with_capacity(list.len());
            for name in list {
                let idx = policies
                    .iter()
                    .position(|p| p.name == *name)
                    .ok_or_else(|| ConfigError::UnknownPolicy {
                        route: route.to_owned(),
                        policy: name.to_string(),
                    })?;
                if out.contains(&idx) {
                    return Err(ConfigError::Invalid {
                        field: format!("route `{route}`"),
                        reason: format!("policy `{name}` listed twice"),
                    });
                }
                out.push(idx);
            }
            Ok(out.into())
        };
        let mut seen = HashSet::new();
        let mut rules = Vec::with_capacity(self.rules.len());
        for r in &self.rules {
            let label = r.label();
            let pattern = RoutePattern::parse(&r.pattern)?;
            if !seen.insert((pattern.as_str().to_owned(), r.method.clone())) {
                return Err(ConfigError::DuplicateRoute { route: label });
            }
            let policies = match &r.limit {
                RuleLimit::Unlimited => None,
                RuleLimit::Policies(list) if list.is_empty() => {
                    return Err(ConfigError::Invalid {
                        field: format!("route `{label}`"),
                        reason: "no policies (use `unlimited` to exempt a route)".into(),
                    });
                }
                RuleLimit::Policies(list) => Some(resolve(&label, list)?),
            };
            rules.push(CompiledRule {
                label: Arc::from(pattern.as_str()),
                pattern,
                method: r.method.clone(),
                policies,
                cost: r.cost,
            });
        }
        // Most specific first, method-specific before any-method.
        rules.sort_by(|a, b| {
            let ka = (a.pattern.specificity(), a.method.is_some());
            let kb = (b.pattern.specificity(), b.method.is_some());
            kb.cmp(&ka)
        });
        let default = if self.default.is_empty() {
            None
        } else {
            Some(resolve("default", &self.default)?)
        };
        let lease_sets = lease_sets(&policies, &rules, default.as_deref());
        Ok(PolicyTable {
            inner: Arc::new(TableInner {
                policies,
                rules,
                default,
                lease_sets,
            }),
        })
    }
}

#[derive(Debug)]
struct CompiledRule {
    label: Arc<str>,
    pattern: RoutePattern,
    method: Option<Method>,
    policies: Option<Arc<[usize]>>,
    cost: u32,
}

#[derive(Debug)]
struct TableInner {
    policies: Vec<Arc<Policy>>,
    rules: Vec<CompiledRule>,
    default: Option<Arc<[usize]>>,
    /// Per policy, how many distinct policy lists a request may be checked
    /// against include it (see [`PolicyTable::lease_sets`]).
    lease_sets: Box<[u32]>,
}

/// For each policy, the number of distinct lists of policies that a request
/// can be checked against and that include it: the lists of the rules and
/// the default, each also without the policies a plan makes unlimited.
fn lease_sets(
    policies: &[Arc<Policy>],
    rules: &[CompiledRule],
    default: Option<&[usize]>,
) -> Box<[u32]> {
    let mut lists: HashSet<Vec<usize>> = HashSet::new();
    let listed = rules
        .iter()
        .filter_map(|r| r.policies.as_deref())
        .chain(default);
    for list in listed {
        let plans: HashSet<&str> = list
            .iter()
            .flat_map(|&i| policies[i].plans.iter().map(|(name, _)| name.as_str()))
            .collect();
        let variants = std::iter::once(None).chain(plans.into_iter().map(Some));
        for plan in variants {
            let checked: Vec<usize> = list
                .iter()
                .copied()
                .filter(|&i| policies[i].quota_for(plan).is_some())
                .collect();
            if !checked.is_empty() {
                lists.insert(checked);
            }
        }
    }
    let mut counts = vec![0u32; policies.len()];
    for list in &lists {
        for &i in list {
            counts[i] += 1;
        }
    }
    counts.into()
}

/// The validated policy table: route pattern (+ method) → policies, a
/// default, exempted routes. Cheap to clone.
///
/// ```
/// use tollgate_ratelimit::{Policy, PolicyTable, Quota};
///
/// let table = PolicyTable::builder()
///     .policy(Policy::new("api", Quota::per_minute(100)))
///     .policy(Policy::new("payment", Quota::per_minute(10)))
///     .route("/payments/{id}", ["payment", "api"])
///     .unlimited("/health")
///     .default_policies(["api"])
///     .build()
///     .unwrap();
/// assert_eq!(table.policies_for(&http::Method::POST, "/payments/7"), vec!["payment", "api"]);
/// assert!(table.policies_for(&http::Method::GET, "/health").is_empty());
/// assert_eq!(table.policies_for(&http::Method::GET, "/other"), vec!["api"]);
/// ```
#[derive(Clone, Debug)]
pub struct PolicyTable {
    inner: Arc<TableInner>,
}

/// What the table decided for one request.
#[derive(Clone, Debug)]
pub(crate) struct Resolved<'a> {
    /// The metrics label: the rule's pattern, axum's template or `default`.
    pub route: Arc<str>,
    /// Indexes into the table's policies (empty: not limited), borrowed:
    /// no reference count shared by every worker thread is touched.
    pub policies: &'a [usize],
    pub cost: u32,
}

impl PolicyTable {
    /// A builder.
    pub fn builder() -> PolicyTableBuilder {
        PolicyTableBuilder::default()
    }

    /// Every policy.
    pub fn policies(&self) -> impl Iterator<Item = &Policy> {
        self.inner.policies.iter().map(|p| p.as_ref())
    }

    /// A policy by name.
    pub fn policy(&self, name: &str) -> Option<&Policy> {
        self.inner
            .policies
            .iter()
            .find(|p| &*p.name == name)
            .map(|p| p.as_ref())
    }

    pub(crate) fn policy_at(&self, i: usize) -> &Arc<Policy> {
        &self.inner.policies[i]
    }

    pub(crate) fn len(&self) -> usize {
        self.inner.policies.len()
    }

    /// How many distinct policy lists that include policy `i` a request
    /// can be checked against (at least 1). Lease mode keeps a lease per
    /// list and identity, each debiting every policy of its list, so a
    /// policy in several lists gets this share of the chunk in each.
    pub(crate) fn lease_sets(&self, i: usize) -> u32 {
        self.inner.lease_sets.get(i).copied().unwrap_or(1).max(1)
    }

    /// The names of the policies that apply to `method` + `path` (empty
    /// when the route is exempt or nothing applies).
    pub fn policies_for(&self, method: &Method, path: &str) -> Vec<&str> {
        let id = RouteId {
            template: None,
            path,
            method,
        };
        self.resolve(&id)
            .map(|r| {
                r.policies
                    .iter()
                    .map(|&i| &*self.inner.policies[i].name)
                    .collect()
            })
            .unwrap_or_default()
    }

    pub(crate) fn resolve(&self, id: &RouteId<'_>) -> Option<Resolved<'_>> {
        let find = |path: &str| {
            self.inner.rules.iter().find(|r| {
                r.method.as_ref().is_none_or(|m| m == id.method) && r.pattern.matches(path)
            })
        };
        let rule = id.template.and_then(find).or_else(|| find(id.path));
        match rule {
            Some(r) => r.policies.as_deref().map(|p| Resolved {
                route: tollgate_redis::local::local_str(&r.label),
                policies: p,
                cost: r.cost,
            }),
            None => self.inner.default.as_deref().map(|p| Resolved {
                route: tollgate_redis::local::local_str(id.template.unwrap_or("default")),
                policies: p,
                cost: 1,
            }),
        }
    }

    /// Builds the table from its serde form.
    pub fn from_config(cfg: TableConfig) -> Result<Self, ConfigError> {
        cfg.try_into()
    }
}

/// The serde form of a [`PolicyTable`] (TOML, YAML, JSON, ...).
///
/// ```
/// use tollgate_ratelimit::{PolicyTable, TableConfig};
///
/// let cfg: TableConfig = serde_json::from_str(r#"{
///     "policies": { "auth": { "limit": 5, "period": "15m" } },
///     "routes": [ { "path": "/login", "method": "POST", "policies": ["auth"] } ]
/// }"#).unwrap();
/// let table = PolicyTable::from_config(cfg).unwrap();
/// assert_eq!(table.policy("auth").map(|p| p.quota().limit()), Some(5));
/// ```
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TableConfig {
    /// Policies by name.
    #[serde(default)]
    pub policies: BTreeMap<String, PolicyConfig>,
    /// Route rules.
    #[serde(default)]
    pub routes: Vec<RouteConfig>,
    /// Policies for unmatched routes.
    #[serde(default)]
    pub default: Vec<String>,
}

/// The serde form of a [`Policy`].
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicyConfig {
    /// Requests per period.
    pub limit: u32,
    /// The period: `"1s"`, `"15m"`, `"500ms"` or seconds.
    #[serde(with = "duration_repr")]
    pub period: Duration,
    /// Burst (GCRA), default the limit.
    #[serde(default)]
    pub burst: Option<u32>,
    /// Algorithm, default `gcra`.
    #[serde(default)]
    pub algorithm: Algorithm,
    /// Behaviour while Redis is down, default `fallback`.
    #[serde(default)]
    pub failure_mode: FailureMode,
    /// Shadow mode.
    #[serde(default)]
    pub shadow: bool,
    /// Plan tiers.
    #[serde(default)]
    pub plans: BTreeMap<String, PlanConfig>,
}

/// The serde form of a plan tier: a quota, or `unlimited = true`.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PlanConfig {
    /// Requests per period.
    #[serde(default)]
    pub limit: Option<u32>,
    /// The period (default the policy's).
    #[serde(default, with = "opt_duration")]
    pub period: Option<Duration>,
    /// Burst.
    #[serde(default)]
    pub burst: Option<u32>,
    /// No limit for this plan.
    #[serde(default)]
    pub unlimited: bool,
}

mod opt_duration {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub(crate) fn serialize<S: Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
        match d {
            Some(d) => crate::quota::duration_repr::serialize(d, s),
            None => s.serialize_none(),
        }
    }

    pub(crate) fn deserialize<'de, D: Deserializer<'de>>(
        d: D,
    ) -> Result<Option<Duration>, D::Error> {
        #[derive(Deserialize)]
        struct W(#[serde(with = "crate::quota::duration_repr")] Duration);
        Ok(Option::<W>::deserialize(d)?.map(|w| w.0))
    }
}

/// The serde form of a [`RouteRule`].
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteConfig {
    /// The pattern.
    pub path: String,
    /// Only this method.
    #[serde(default)]
    pub method: Option<String>,
    /// Policies by name.
    #[serde(default)]
    pub policies: Vec<String>,
    /// Exempt from every limit.
    #[serde(default)]
    pub unlimited: bool,
    /// Cost per request (default 1).
    #[serde(default)]
    pub cost: Option<u32>,
}

impl TryFrom<TableConfig> for PolicyTable {
    type Error = ConfigError;

    fn try_from(cfg: TableConfig) -> Result<Self, ConfigError> {
        let mut b = PolicyTable::builder();
        for (name, p) in cfg.policies {
            let mut quota = Quota::new(p.limit, p.period);
            if let Some(burst) = p.burst {
                quota = quota.with_burst(burst);
            }
            let mut policy = Policy::new(name.clone(), quota)
                .with_algorithm(p.algorithm)
                .with_failure_mode(p.failure_mode)
                .shadow(p.shadow);
            for (plan, pc) in p.plans {
                if pc.unlimited {
                    policy = policy.with_unlimited_plan(plan);
                    continue;
                }
                let limit = pc.limit.ok_or_else(|| ConfigError::Invalid {
                    field: format!("policy `{name}` plan `{plan}`"),
                    reason: "needs `limit` or `unlimited = true`".into(),
                })?;
                let mut q = Quota::new(limit, pc.period.unwrap_or(p.period));
                if let Some(burst) = pc.burst {
                    q = q.with_burst(burst);
                }
                policy = policy.with_plan(plan, q);
            }
            b = b.policy(policy);
        }
        for r in cfg.routes {
            let mut rule = if r.unlimited {
                if !r.policies.is_empty() {
                    return Err(ConfigError::Invalid {
                        field: format!("route `{}`", r.path),
                        reason: "`unlimited` and `policies` are exclusive".into(),
                    });
                }
                RouteRule::unlimited(r.path.clone())
            } else {
                RouteRule::new(r.path.clone(), &r.policies)
            };
            if let Some(m) = &r.method {
                let m = Method::from_bytes(m.to_ascii_uppercase().as_bytes()).map_err(|_| {
                    ConfigError::Invalid {
                        field: format!("route `{}`", r.path),
                        reason: format!("invalid method `{m}`"),
                    }
                })?;
                rule = rule.method(m);
            }
            if let Some(c) = r.cost {
                rule = rule.cost(c);
            }
            b = b.rule(rule);
        }
        if !cfg.default.is_empty() {
            b = b.default_policies(&cfg.default);
        }
        b.build()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base() -> PolicyTableBuilder {
        PolicyTable::builder()
            .policy(Policy::new("api", Quota::per_minute(100)))
            .policy(Policy::new("write", Quota::per_minute(10)))
    }

    #[test]
    fn most_specific_rule_wins() {
        let t = base()
            .route("/api/*", ["api"])
            .route("/api/users/{id}", ["write"])
            .rule(RouteRule::new("/api/users/{id}", ["write", "api"]).method(Method::POST))
            .unlimited("/api/health")
            .build()
            .unwrap();
        assert_eq!(t.policies_for(&Method::GET, "/api/users/1"), vec!["write"]);
        assert_eq!(
            t.policies_for(&Method::POST, "/api/users/1"),
            vec!["write", "api"]
        );
        assert_eq!(t.policies_for(&Method::GET, "/api/other"), vec!["api"]);
        assert!(t.policies_for(&Method::GET, "/api/health").is_empty());
        assert!(t.policies_for(&Method::GET, "/elsewhere").is_empty());
    }

    #[test]
    fn validation_names_the_entry() {
        let e = base()
            .route("/a", ["api"])
            .route("/a", ["write"])
            .build()
            .unwrap_err();
        assert_eq!(e, ConfigError::DuplicateRoute { route: "/a".into() });
        let e = base().route("/a", ["nope"]).build().unwrap_err();
        assert!(e.to_string().contains("nope"), "{e}");
        let e = base()
            .policy(Policy::new("zero", Quota::per_second(0)))
            .build()
            .unwrap_err();
        assert!(e.to_string().contains("zero"), "{e}");
        let e = base()
            .policy(Policy::new("nob", Quota::per_second(3).with_burst(0)))
            .build()
            .unwrap_err();
        assert!(e.to_string().contains("nob"), "{e}");
        let e = base()
            .policy(Policy::new("api", Quota::per_second(1)))
            .build()
            .unwrap_err();
        assert!(matches!(e, ConfigError::DuplicatePolicy { .. }));
        // Same pattern with different methods is fine.
        base()
            .rule(RouteRule::new("/a", ["api"]).method(Method::GET))
            .rule(RouteRule::new("/a", ["api"]).method(Method::POST))
            .build()
            .unwrap();
    }

    const TOML: &str = r#"
default = ["api"]

[policies.api]
limit = 100
period = "1m"

[policies.payment]
limit = 10
period = 60
burst = 2
algorithm = "sliding_window"
failure_mode = "fail_closed"

[policies.payment.plans.pro]
limit = 100

[policies.payment.plans.enterprise]
unlimited = true

[[routes]]
path = "/payments/{id}"
method = "post"
policies = ["payment", "api"]
cost = 2

[[routes]]
path = "/health"
unlimited = true
"#;

    #[test]
    fn toml_yaml_json_build_the_same_table() {
        let from_toml: TableConfig = toml::from_str(TOML).unwrap();
        let json = serde_json::to_string(&from_toml).unwrap();
        let from_json: TableConfig = serde_json::from_str(&json).unwrap();
        let yaml = serde_yaml::to_string(&from_toml).unwrap();
        let from_yaml: TableConfig = serde_yaml::from_str(&yaml).unwrap();
        for cfg in [from_toml, from_json, from_yaml] {
            let t = PolicyTable::from_config(cfg).unwrap();
            let p = t.policy("payment").unwrap();
            assert_eq!(p.quota(), Quota::per_minute(10).with_burst(2));
            assert_eq!(p.algorithm(), Algorithm::SlidingWindow);
            assert_eq!(p.failure_mode(), FailureMode::FailClosed);
            assert_eq!(p.quota_for(Some("pro")), Some(Quota::per_minute(100)));
            assert_eq!(p.quota_for(Some("enterprise")), None);
            assert_eq!(
                t.policies_for(&Method::POST, "/payments/1"),
                vec!["payment", "api"]
            );
            assert_eq!(t.policies_for(&Method::GET, "/payments/1"), vec!["api"]);
            assert!(t.policies_for(&Method::GET, "/health").is_empty());
        }
    }

    #[test]
    fn bad_config_is_an_error() {
        let bad = "[policies.api]\nlimit = 0\nperiod = \"1m\"\n";
        let cfg: TableConfig = toml::from_str(bad).unwrap();
        assert!(
            PolicyTable::from_config(cfg)
                .unwrap_err()
                .to_string()
                .contains("api")
        );
        assert!(
            toml::from_str::<TableConfig>("[policies.api]\nlimit = 1\nperiod = \"1 fortnight\"\n")
                .is_err()
        );
        assert!(
            toml::from_str::<TableConfig>("[policies.api]\nlimit = 1\nperiod = 1\nlimt = 2\n")
                .is_err()
        );
    }
}
