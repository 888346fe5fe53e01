//! Medians over rounds and the markdown table.

use std::fmt::Write as _;
use std::time::Duration;

use crate::variants::VariantSpec;

/// One variant measured once.
#[derive(Clone, Debug)]
pub struct Sample {
    /// Variant name.
    pub variant: &'static str,
    /// Round number, from 1.
    pub round: usize,
    /// wrk's requests per second.
    pub rps: f64,
    /// Requests wrk completed.
    pub requests: u64,
    /// Median latency, ms.
    pub p50_ms: f64,
    /// 99th percentile latency, ms.
    pub p99_ms: f64,
    /// Server CPU (user + system, all threads) per request, µs.
    pub app_cpu_us: f64,
    /// Redis CPU per request, µs (Redis variants only).
    pub redis_cpu_us: Option<f64>,
    /// Redis commands per request (Redis variants only).
    pub redis_cmds: Option<f64>,
    /// Responses that were not 2xx/3xx.
    pub non_2xx: u64,
    /// wrk socket errors (connect, read, write, timeout).
    pub socket_errors: u64,
    /// Share of the machine's CPU that went to other processes during the
    /// run, percent: anything high means the run was disturbed.
    pub other_cpu_pct: f64,
    /// Position in the whole run (0, 1, …): which runs were neighbours.
    pub seq: usize,
}

/// Above this share of the machine's CPU going elsewhere, a run is reported
/// as disturbed.
pub const DISTURBED_PCT: f64 = 5.0;

impl Sample {
    /// The line printed after each run.
    pub fn progress_line(&self, rounds: usize) -> String {
        let mut line = format!(
            "[round {}/{rounds}] {:<16} {:>10} req/s  p50 {:>8}  p99 {:>8}  app {:>6} µs/req",
            self.round,
            self.variant,
            thousands(self.rps),
            ms(self.p50_ms),
            ms(self.p99_ms),
            one_decimal(self.app_cpu_us),
        );
        if let (Some(cpu), Some(cmds)) = (self.redis_cpu_us, self.redis_cmds) {
            let _ = write!(
                line,
                "  redis {} µs/req, {cmds:.2} cmds/req",
                one_decimal(cpu)
            );
        }
        if self.other_cpu_pct > DISTURBED_PCT {
            let _ = write!(
                line,
                "  DISTURBED: {:.0}% of the CPU went to other processes",
                self.other_cpu_pct
            );
        }
        if self.non_2xx + self.socket_errors > 0 {
            let _ = write!(
                line,
                "  WARNING: {} non-2xx, {} socket errors",
                self.non_2xx, self.socket_errors
            );
        }
        line
    }
}

/// How the run was made, for the table's header.
#[derive(Clone, Debug)]
pub(crate) struct Settings {
    pub(crate) rounds: usize,
    pub(crate) duration: Duration,
    pub(crate) connections: u32,
    pub(crate) threads: u32,
    pub(crate) wrk_version: String,
    pub(crate) cpus: usize,
    pub(crate) redis: Option<String>,
    pub(crate) redis_note: Option<String>,
}

impl Settings {
    pub(crate) fn header(&self) -> String {
        let mut s = format!(
            "{}: {} threads, {} connections, {} s per run, {} round(s) interleaved; \
             {} CPU(s) shared by wrk, the server and Redis",
            self.wrk_version,
            self.threads,
            self.connections,
            self.duration.as_secs(),
            self.rounds,
            self.cpus,
        );
        if let Some(r) = &self.redis {
            let _ = write!(s, "; {r}");
        }
        s
    }
}

/// The median of `values` (mean of the middle two for an even count).
pub(crate) fn median(mut values: Vec<f64>) -> Option<f64> {
    if values.is_empty() {
        return None;
    }
    values.sort_by(f64::total_cmp);
    let mid = values.len() / 2;
    Some(if values.len().is_multiple_of(2) {
        (values[mid - 1] + values[mid]) / 2.0
    } else {
        values[mid]
    })
}

/// The variant's req/s divided by `bare`'s, one ratio per run of the
/// variant: `bare` is the mean of the `bare` runs right before and right
/// after it (either one alone at an end).
fn paired_ratios(samples: &[Sample], variant: &str) -> Vec<f64> {
    if variant == "bare" {
        return samples
            .iter()
            .filter(|s| s.variant == "bare")
            .map(|_| 1.0)
            .collect();
    }
    let bare_at = |seq: Option<usize>| {
        seq.and_then(|q| samples.iter().find(|b| b.seq == q && b.variant == "bare"))
            .map(|b| b.rps)
    };
    samples
        .iter()
        .filter(|s| s.variant == variant)
        .filter_map(|s| {
            let around: Vec<f64> = [bare_at(s.seq.checked_sub(1)), bare_at(Some(s.seq + 1))]
                .into_iter()
                .flatten()
                .collect();
            let bare = around.iter().sum::<f64>() / around.len() as f64;
            (!around.is_empty() && bare > 0.0).then(|| s.rps / bare)
        })
        .collect()
}

/// The results file: settings, the table of medians, notes, every round.
pub(crate) fn render(
    settings: &Settings,
    variants: &[&'static VariantSpec],
    samples: &[Sample],
) -> String {
    let of = |name: &'static str| samples.iter().filter(move |s| s.variant == name);
    let med = |name: &'static str, f: &dyn Fn(&Sample) -> Option<f64>| -> Option<f64> {
        median(of(name).filter_map(f).collect())
    };

    let mut rows = vec![vec![
        "variant".to_owned(),
        "req/s".to_owned(),
        "× bare".to_owned(),
        "per round".to_owned(),
        "p50".to_owned(),
        "p99".to_owned(),
        "app CPU µs/req".to_owned(),
        "Redis CPU µs/req".to_owned(),
        "Redis cmds/req".to_owned(),
    ]];
    let mut warnings = Vec::new();
    for v in variants {
        let rps = med(v.name, &|s| Some(s.rps));
        let errors: u64 = of(v.name).map(|s| s.non_2xx + s.socket_errors).sum();
        let mut name = v.name.to_owned();
        if errors > 0 {
            name.push_str(" ⚠");
            warnings.push(format!(
                "⚠ {}: {errors} non-2xx responses or socket errors over all rounds; \
                 its numbers include failures",
                v.name
            ));
        }
        let ratios = paired_ratios(samples, v.name);
        let ratio = median(ratios.clone()).map_or_else(dash, |r| format!("{r:.2}×"));
        let range = match (
            ratios.iter().copied().reduce(f64::min),
            ratios.iter().copied().reduce(f64::max),
        ) {
            (Some(lo), Some(hi)) => format!("{lo:.2}–{hi:.2}"),
            _ => dash(),
        };
        rows.push(vec![
            name,
            rps.map_or_else(dash, thousands),
            ratio,
            range,
            med(v.name, &|s| Some(s.p50_ms)).map_or_else(dash, ms),
            med(v.name, &|s| Some(s.p99_ms)).map_or_else(dash, ms),
            med(v.name, &|s| Some(s.app_cpu_us)).map_or_else(dash, one_decimal),
            med(v.name, &|s| s.redis_cpu_us).map_or_else(dash, one_decimal),
            med(v.name, &|s| s.redis_cmds).map_or_else(dash, |c| format!("{c:.2}")),
        ]);
    }

    let mut out = String::from("## tollgate load harness\n\n");
    let _ = writeln!(out, "{}.\n", settings.header());
    let _ = writeln!(
        out,
        "Medians over rounds. `× bare` is the median over rounds of the variant's req/s \
         divided by the mean of the `bare` runs just before and after it (runs minutes \
         apart are not compared); `per round` gives the lowest and highest of those \
         ratios. `–` means not measured (no Redis involved).\n"
    );
    out.push_str(&markdown_table(&rows, 1));
    let disturbed: Vec<String> = samples
        .iter()
        .filter(|s| s.other_cpu_pct > DISTURBED_PCT)
        .map(|s| format!("round {} {} ({:.0}%)", s.round, s.variant, s.other_cpu_pct))
        .collect();
    if !disturbed.is_empty() {
        warnings.push(format!(
            "Disturbed runs: other processes used more than {DISTURBED_PCT}% of the machine's \
             CPU during {}. Medians resist a disturbed minority of rounds; rerun on a quiet \
             machine if there are more.",
            disturbed.join(", ")
        ));
    }
    for w in warnings.iter().chain(&settings.redis_note) {
        let _ = writeln!(out, "\n{w}");
    }

    out.push_str("\n### Every run\n\n");
    let mut raw = vec![
        [
            "round",
            "variant",
            "req/s",
            "requests",
            "p50",
            "p99",
            "app CPU µs/req",
            "Redis CPU µs/req",
            "Redis cmds/req",
            "non-2xx",
            "socket errors",
            "other CPU %",
        ]
        .map(str::to_owned)
        .to_vec(),
    ];
    for s in samples {
        raw.push(vec![
            s.round.to_string(),
            s.variant.to_owned(),
            thousands(s.rps),
            thousands(s.requests as f64),
            ms(s.p50_ms),
            ms(s.p99_ms),
            one_decimal(s.app_cpu_us),
            s.redis_cpu_us.map_or_else(dash, one_decimal),
            s.redis_cmds.map_or_else(dash, |c| format!("{c:.2}")),
            s.non_2xx.to_string(),
            s.socket_errors.to_string(),
            format!("{:.0}", s.other_cpu_pct),
        ]);
    }
    out.push_str(&markdown_table(&raw, 2));
    out
}

/// A markdown table with aligned columns: the first `text_cols` columns
/// left-aligned, the (numeric) rest right-aligned.
fn markdown_table(rows: &[Vec<String>], text_cols: usize) -> String {
    let cols = rows.first().map_or(0, Vec::len);
    let width = |c: usize| {
        rows.iter()
            .map(|r| r.get(c).map_or(0, |s| s.chars().count()))
            .max()
            .unwrap_or(0)
            .max(3)
    };
    let widths: Vec<usize> = (0..cols).map(width).collect();
    let mut out = String::new();
    for (i, row) in rows.iter().enumerate() {
        out.push('|');
        for (c, w) in widths.iter().enumerate() {
            let cell = row.get(c).map_or("", String::as_str);
            let pad = w - cell.chars().count();
            if c < text_cols {
                let _ = write!(out, " {cell}{} |", " ".repeat(pad));
            } else {
                let _ = write!(out, " {}{cell} |", " ".repeat(pad));
            }
        }
        out.push('\n');
        if i == 0 {
            out.push('|');
            for (c, w) in widths.iter().enumerate() {
                if c < text_cols {
                    let _ = write!(out, " {} |", "-".repeat(*w));
                } else {
                    let _ = write!(out, " {}: |", "-".repeat(w - 1));
                }
            }
            out.push('\n');
        }
    }
    out
}

fn dash() -> String {
    "–".to_owned()
}

fn ms(v: f64) -> String {
    format!("{v:.2} ms")
}

fn one_decimal(v: f64) -> String {
    format!("{v:.1}")
}

/// `84898.46` → `84,898`.
fn thousands(v: f64) -> String {
    let digits = format!("{:.0}", v.max(0.0));
    let mut out = String::new();
    for (i, ch) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(ch);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn medians() {
        assert_eq!(median(vec![]), None);
        assert_eq!(median(vec![3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(vec![4.0, 1.0, 2.0, 3.0]), Some(2.5));
    }

    fn sample(variant: &'static str, seq: usize, rps: f64) -> Sample {
        Sample {
            seq,
            variant,
            round: 1,
            rps,
            requests: 0,
            p50_ms: 0.0,
            p99_ms: 0.0,
            app_cpu_us: 0.0,
            redis_cpu_us: None,
            redis_cmds: None,
            non_2xx: 0,
            socket_errors: 0,
            other_cpu_pct: 0.0,
        }
    }

    #[test]
    fn ratios_pair_each_run_with_the_bare_runs_around_it() {
        let samples = [
            sample("bare", 0, 100.0),
            sample("x", 1, 90.0),
            sample("bare", 2, 80.0),
            sample("y", 3, 40.0),
            sample("bare", 4, 80.0),
            sample("x", 5, 60.0),
            // No bare next to it: not a ratio.
            sample("y", 7, 10.0),
        ];
        assert_eq!(paired_ratios(&samples, "x"), vec![1.0, 0.75]);
        assert_eq!(paired_ratios(&samples, "y"), vec![0.5]);
        assert_eq!(paired_ratios(&samples, "bare"), vec![1.0, 1.0, 1.0]);
        assert!(paired_ratios(&samples, "z").is_empty());
    }

    #[test]
    fn thousands_separators() {
        assert_eq!(thousands(84_898.46), "84,898");
        assert_eq!(thousands(999.0), "999");
        assert_eq!(thousands(1_000_000.0), "1,000,000");
    }
}
