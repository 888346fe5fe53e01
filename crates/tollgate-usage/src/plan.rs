//! Plans (monthly limits and overage prices per metric) and the bill.
//!
//! Money is kept in integer micro-dollars (1 USD = 1,000,000) so that
//! $0.0001 per request adds up exactly.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};

use crate::error::UsageError;

/// Micro-dollars (1 USD = 1,000,000).
pub type Micros = u64;

/// Formats micro-dollars as `$12.3456`, trimming trailing zeros past cents.
pub fn format_usd(m: Micros) -> String {
    let dollars = m / 1_000_000;
    let frac = m % 1_000_000;
    let mut s = format!("${dollars}.{frac:06}");
    while s.ends_with('0') && s.len() > s.find('.').map_or(0, |i| i + 3) {
        s.pop();
    }
    s
}

/// How a plan treats one metric.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MetricLimit {
    /// Units included per period; `None` is unlimited.
    pub included: Option<u64>,
    /// Price of each unit beyond `included`; `None` means no overage is
    /// sold: the limit is a hard stop when enforced.
    pub overage_micros: Option<Micros>,
}

/// Whether a plan's limits only inform (headers) or stop requests.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Enforcement {
    /// Headers only; usage beyond the limit is billed as overage.
    #[default]
    Soft,
    /// Requests beyond the limit are refused (429 or 402), decided
    /// atomically in Redis across instances.
    Hard,
}

/// A plan: a base price and per-metric limits.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Plan {
    /// Plan name (`free`, `starter`, ...).
    pub name: String,
    /// Monthly base price.
    pub base_micros: Micros,
    /// Limits by metric; a metric not listed is unlimited and free.
    pub limits: BTreeMap<String, MetricLimit>,
    /// Soft or hard enforcement of `api_request`-style limits.
    #[serde(default)]
    pub enforcement: Enforcement,
}

impl Plan {
    /// A plan with no limits.
    pub fn new(name: impl Into<String>, base_micros: Micros) -> Self {
        Plan {
            name: name.into(),
            base_micros,
            limits: BTreeMap::new(),
            enforcement: Enforcement::Soft,
        }
    }

    /// Adds a limit of `included` units of `metric`, with an optional overage
    /// unit price.
    #[must_use]
    pub fn limit(mut self, metric: &str, included: u64, overage_micros: Option<Micros>) -> Self {
        self.limits.insert(
            metric.to_owned(),
            MetricLimit {
                included: Some(included),
                overage_micros,
            },
        );
        self
    }

    /// Sets the enforcement.
    #[must_use]
    pub fn enforce(mut self, e: Enforcement) -> Self {
        self.enforcement = e;
        self
    }

    /// The included units of `metric` (`None`: unlimited).
    pub fn included(&self, metric: &str) -> Option<u64> {
        self.limits.get(metric).and_then(|l| l.included)
    }

    /// The bill for one period's usage: base price plus overage per metric.
    ///
    /// ```
    /// use tollgate_usage::{Plans, format_usd};
    /// let growth = Plans::example().get("growth").unwrap().clone();
    /// let bill = growth.bill([("api_request", 210_000), ("email_sent", 5_000)]);
    /// // $99 + 10,000 requests over × $0.0001
    /// assert_eq!(format_usd(bill.total_micros), "$100.00");
    /// ```
    pub fn bill<'a>(&self, usage: impl IntoIterator<Item = (&'a str, u64)>) -> Bill {
        let mut lines = Vec::new();
        let mut total = self.base_micros;
        for (metric, used) in usage {
            let Some(limit) = self.limits.get(metric) else {
                continue;
            };
            let over = limit.included.map_or(0, |inc| used.saturating_sub(inc));
            let price = limit.overage_micros.unwrap_or(0);
            let amount = over.saturating_mul(price);
            total = total.saturating_add(amount);
            lines.push(BillLine {
                metric: metric.to_owned(),
                used,
                included: limit.included,
                overage_units: over,
                unit_micros: price,
                amount_micros: amount,
            });
        }
        Bill {
            plan: self.name.clone(),
            base_micros: self.base_micros,
            lines,
            total_micros: total,
        }
    }
}

/// One metric's line on a bill.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct BillLine {
    /// The metric.
    pub metric: String,
    /// Units used in the period.
    pub used: u64,
    /// Units included (`None`: unlimited).
    pub included: Option<u64>,
    /// Units beyond `included`.
    pub overage_units: u64,
    /// Price per overage unit.
    pub unit_micros: Micros,
    /// `overage_units × unit_micros`.
    pub amount_micros: Micros,
}

/// A period's bill.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Bill {
    /// Plan name.
    pub plan: String,
    /// Base price.
    pub base_micros: Micros,
    /// Per-metric lines.
    pub lines: Vec<BillLine>,
    /// Base plus every line.
    pub total_micros: Micros,
}

impl fmt::Display for Bill {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "plan {}: base {}",
            self.plan,
            format_usd(self.base_micros)
        )?;
        for l in &self.lines {
            writeln!(
                f,
                "  {}: {} used, {} over × {} = {}",
                l.metric,
                l.used,
                l.overage_units,
                format_usd(l.unit_micros),
                format_usd(l.amount_micros)
            )?;
        }
        write!(f, "total {}", format_usd(self.total_micros))
    }
}

/// A set of plans by name.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Plans {
    plans: BTreeMap<String, Plan>,
}

impl Plans {
    /// No plans.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a plan; a second plan with the same name is an error naming it.
    pub fn with(mut self, plan: Plan) -> Result<Self, UsageError> {
        if plan.name.is_empty() {
            return Err(UsageError::Config {
                field: "plans.name",
                reason: "a plan needs a name".into(),
            });
        }
        if self.plans.contains_key(&plan.name) {
            return Err(UsageError::Config {
                field: "plans.name",
                reason: format!("plan `{}` is defined twice", plan.name),
            });
        }
        self.plans.insert(plan.name.clone(), plan);
        Ok(self)
    }

    /// The plan called `name`.
    pub fn get(&self, name: &str) -> Option<&Plan> {
        self.plans.get(name)
    }

    /// Every plan.
    pub fn iter(&self) -> impl Iterator<Item = &Plan> {
        self.plans.values()
    }

    /// The example plans (monthly): free $0 — 10,000 api_request, 100
    /// email_sent, 0 sms_sent; starter $49 — 50,000 / 1,000 / 100; growth
    /// $99 — 200,000 / 5,000 / 500 with overage $0.0001 per request, $0.01
    /// per email, $0.05 per SMS; enterprise $299 — unlimited. Free is
    /// enforced hard; the others are soft.
    pub fn example() -> Self {
        let free = Plan::new("free", 0)
            .limit("api_request", 10_000, None)
            .limit("email_sent", 100, None)
            .limit("sms_sent", 0, None)
            .enforce(Enforcement::Hard);
        let starter = Plan::new("starter", 49_000_000)
            .limit("api_request", 50_000, None)
            .limit("email_sent", 1_000, None)
            .limit("sms_sent", 100, None);
        let growth = Plan::new("growth", 99_000_000)
            .limit("api_request", 200_000, Some(100))
            .limit("email_sent", 5_000, Some(10_000))
            .limit("sms_sent", 500, Some(50_000));
        let enterprise = Plan::new("enterprise", 299_000_000);
        let mut p = Plans::new();
        for plan in [free, starter, growth, enterprise] {
            p.plans.insert(plan.name.clone(), plan);
        }
        p
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_money() {
        assert_eq!(format_usd(0), "$0.00");
        assert_eq!(format_usd(100), "$0.0001");
        assert_eq!(format_usd(49_000_000), "$49.00");
        assert_eq!(format_usd(1_234_500), "$1.2345");
    }

    #[test]
    fn growth_overage() {
        let plans = Plans::example();
        let g = plans.get("growth").expect("growth");
        let bill = g.bill([
            ("api_request", 250_000),
            ("email_sent", 5_100),
            ("sms_sent", 510),
        ]);
        // 50,000 × $0.0001 = $5; 100 × $0.01 = $1; 10 × $0.05 = $0.50
        assert_eq!(
            bill.total_micros,
            99_000_000 + 5_000_000 + 1_000_000 + 500_000
        );
        assert_eq!(bill.lines[0].overage_units, 50_000);
        let under = g.bill([("api_request", 10)]);
        assert_eq!(under.total_micros, 99_000_000);
        let text = bill.to_string();
        assert!(text.contains("total $105.50"), "{text}");
    }

    #[test]
    fn enterprise_is_unlimited_and_duplicates_are_refused() {
        let plans = Plans::example();
        let e = plans.get("enterprise").expect("enterprise");
        assert_eq!(e.included("api_request"), None);
        assert_eq!(
            e.bill([("api_request", u64::MAX)]).total_micros,
            299_000_000
        );
        let dup = Plans::new()
            .with(Plan::new("a", 0))
            .and_then(|p| p.with(Plan::new("a", 1)));
        assert!(matches!(
            dup,
            Err(UsageError::Config {
                field: "plans.name",
                ..
            })
        ));
    }

    #[test]
    fn plans_load_from_json() {
        let json = serde_json::to_string(&Plans::example()).expect("serialise");
        let back: Plans = serde_json::from_str(&json).expect("deserialise");
        assert_eq!(back, Plans::example());
    }
}
