//! Billing periods: calendar months in UTC (optionally anchored on a day of
//! the month, clamped in short months) or UTC days. Boundaries are exact to
//! the millisecond: a period is `[start, end)`.

use std::fmt;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use time::{Date, Month, OffsetDateTime};

use crate::error::UsageError;

/// How usage is bucketed in time.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum PeriodKind {
    /// Calendar months in UTC. `anchor_day` 1 is the calendar month; 2..=31
    /// starts each period on that day (clamped to the month's last day,
    /// so 31 means Feb 28/29, Apr 30, ...).
    Monthly {
        /// Day of the month the period starts on (1..=31).
        anchor_day: u8,
    },
    /// UTC days.
    Daily,
}

impl Default for PeriodKind {
    fn default() -> Self {
        PeriodKind::Monthly { anchor_day: 1 }
    }
}

/// One period: `[start_ms, end_ms)` in Unix milliseconds, and the label used
/// in Redis keys and reports (`2026-01`, or the start date `2026-01-31` for
/// anchored months and days).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Period {
    /// First millisecond of the period.
    pub start_ms: i64,
    /// First millisecond after the period.
    pub end_ms: i64,
    /// Key and report label.
    pub label: String,
}

impl Period {
    /// Whether `ms` falls in the period.
    pub fn contains(&self, ms: i64) -> bool {
        (self.start_ms..self.end_ms).contains(&ms)
    }

    /// Seconds from `now_ms` until the period ends (at least 1).
    pub fn seconds_left(&self, now_ms: i64) -> u64 {
        let ms = (self.end_ms - now_ms).max(1);
        u64::try_from((ms + 999) / 1000).unwrap_or(1)
    }
}

impl fmt::Display for Period {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.label)
    }
}

impl PeriodKind {
    /// Calendar months in UTC.
    pub fn monthly() -> Self {
        PeriodKind::Monthly { anchor_day: 1 }
    }

    /// Months starting on `day` (1..=31), clamped in short months.
    pub fn monthly_anchored(day: u8) -> Result<Self, UsageError> {
        if !(1..=31).contains(&day) {
            return Err(UsageError::Config {
                field: "period.anchor_day",
                reason: format!("{day} is not a day of the month (1..=31)"),
            });
        }
        Ok(PeriodKind::Monthly { anchor_day: day })
    }

    /// UTC days.
    pub fn daily() -> Self {
        PeriodKind::Daily
    }

    /// The period containing the Unix millisecond `ms`. For a time outside
    /// the supported calendar (see
    /// [`checked_period_at`](Self::checked_period_at)) it is the period of
    /// the Unix epoch: use `checked_period_at` for times from outside.
    ///
    /// ```
    /// use tollgate_usage::PeriodKind;
    /// // 2026-01-31T23:59:59.999Z and 2026-02-01T00:00:00Z
    /// let jan = PeriodKind::monthly().period_at(1_769_903_999_999);
    /// let feb = PeriodKind::monthly().period_at(1_769_904_000_000);
    /// assert_eq!((jan.label.as_str(), feb.label.as_str()), ("2026-01", "2026-02"));
    /// assert_eq!(jan.end_ms, feb.start_ms);
    /// ```
    pub fn period_at(&self, ms: i64) -> Period {
        self.checked_period_at(ms)
            .or_else(|| self.checked_period_at(0))
            .unwrap_or(Period {
                start_ms: 0,
                end_ms: 0,
                label: String::new(),
            })
    }

    /// The period containing the Unix millisecond `ms`, or `None` when the
    /// period or its end is outside the supported calendar (years -9999 to
    /// 9999): a timestamp in microseconds or nanoseconds, for instance.
    ///
    /// ```
    /// use tollgate_usage::PeriodKind;
    /// let now_us = 1_769_904_000_000_000; // microseconds, not milliseconds
    /// assert!(PeriodKind::monthly().checked_period_at(now_us).is_none());
    /// assert!(PeriodKind::monthly().checked_period_at(1_769_904_000_000).is_some());
    /// ```
    pub fn checked_period_at(&self, ms: i64) -> Option<Period> {
        let dt = OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000).ok()?;
        let date = dt.date();
        Some(match *self {
            PeriodKind::Daily => {
                let next = date.next_day()?;
                Period {
                    start_ms: midnight_ms(date),
                    end_ms: midnight_ms(next),
                    label: date_label(date),
                }
            }
            PeriodKind::Monthly { anchor_day } => {
                let (y, m) = (date.year(), date.month());
                let this = anchored(y, m, anchor_day)?;
                let (start, end) = if date >= this {
                    let (ny, nm) = next_month(y, m);
                    (this, anchored(ny, nm, anchor_day)?)
                } else {
                    let (py, pm) = prev_month(y, m);
                    (anchored(py, pm, anchor_day)?, this)
                };
                let label = if anchor_day == 1 {
                    format!("{:04}-{:02}", start.year(), u8::from(start.month()))
                } else {
                    date_label(start)
                };
                Period {
                    start_ms: midnight_ms(start),
                    end_ms: midnight_ms(end),
                    label,
                }
            }
        })
    }
}

/// Now, in Unix milliseconds.
pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

fn anchored(year: i32, month: Month, day: u8) -> Option<Date> {
    let day = day.min(month.length(year));
    Date::from_calendar_date(year, month, day).ok()
}

fn next_month(year: i32, month: Month) -> (i32, Month) {
    match month {
        Month::December => (year + 1, Month::January),
        m => (year, m.next()),
    }
}

fn prev_month(year: i32, month: Month) -> (i32, Month) {
    match month {
        Month::January => (year - 1, Month::December),
        m => (year, m.previous()),
    }
}

fn midnight_ms(date: Date) -> i64 {
    let secs = date.midnight().assume_utc().unix_timestamp();
    secs * 1000
}

fn date_label(d: Date) -> String {
    format!("{:04}-{:02}-{:02}", d.year(), u8::from(d.month()), d.day())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(y: i32, m: Month, d: u8, h: u8, min: u8, s: u8, milli: u16) -> i64 {
        let date = Date::from_calendar_date(y, m, d).expect("date");
        let t = time::Time::from_hms_milli(h, min, s, milli).expect("time");
        let dt = time::PrimitiveDateTime::new(date, t).assume_utc();
        i64::try_from(dt.unix_timestamp_nanos() / 1_000_000).expect("fits")
    }

    #[test]
    fn month_boundary_is_exact() {
        let m = PeriodKind::monthly();
        let a = m.period_at(ms(2026, Month::January, 31, 23, 59, 59, 999));
        let b = m.period_at(ms(2026, Month::February, 1, 0, 0, 0, 0));
        assert_eq!(a.label, "2026-01");
        assert_eq!(b.label, "2026-02");
        assert_eq!(a.end_ms, b.start_ms);
        assert_eq!(a.start_ms, ms(2026, Month::January, 1, 0, 0, 0, 0));
        assert!(a.contains(ms(2026, Month::January, 31, 23, 59, 59, 999)));
        assert!(!a.contains(b.start_ms));
    }

    #[test]
    fn december_rolls_over_the_year() {
        let p = PeriodKind::monthly().period_at(ms(2025, Month::December, 15, 12, 0, 0, 0));
        assert_eq!(p.label, "2025-12");
        assert_eq!(p.end_ms, ms(2026, Month::January, 1, 0, 0, 0, 0));
    }

    #[test]
    fn anchor_31_is_clamped_in_february() {
        let k = PeriodKind::monthly_anchored(31).expect("valid");
        // Feb 27: still in the period that started Jan 31.
        let p = k.period_at(ms(2026, Month::February, 27, 12, 0, 0, 0));
        assert_eq!(p.label, "2026-01-31");
        assert_eq!(p.end_ms, ms(2026, Month::February, 28, 0, 0, 0, 0));
        // Feb 28 (2026 is not a leap year): the anchor clamps to the 28th.
        let p = k.period_at(ms(2026, Month::February, 28, 0, 0, 0, 0));
        assert_eq!(p.label, "2026-02-28");
        assert_eq!(p.end_ms, ms(2026, Month::March, 31, 0, 0, 0, 0));
        // Leap year.
        let p = k.period_at(ms(2028, Month::February, 29, 0, 0, 0, 0));
        assert_eq!(p.label, "2028-02-29");
        let p = k.period_at(ms(2028, Month::February, 28, 23, 59, 59, 999));
        assert_eq!(p.label, "2028-01-31");
    }

    #[test]
    fn anchor_15_before_and_after() {
        let k = PeriodKind::monthly_anchored(15).expect("valid");
        let before = k.period_at(ms(2026, Month::March, 14, 23, 59, 59, 999));
        let after = k.period_at(ms(2026, Month::March, 15, 0, 0, 0, 0));
        assert_eq!(before.label, "2026-02-15");
        assert_eq!(after.label, "2026-03-15");
        assert_eq!(before.end_ms, after.start_ms);
        let jan = k.period_at(ms(2026, Month::January, 2, 0, 0, 0, 0));
        assert_eq!(jan.label, "2025-12-15");
    }

    #[test]
    fn days() {
        let k = PeriodKind::daily();
        let a = k.period_at(ms(2026, Month::January, 31, 23, 59, 59, 999));
        let b = k.period_at(ms(2026, Month::February, 1, 0, 0, 0, 0));
        assert_eq!(
            (a.label.as_str(), b.label.as_str()),
            ("2026-01-31", "2026-02-01")
        );
        assert_eq!(a.end_ms, b.start_ms);
        assert_eq!(b.end_ms - b.start_ms, 86_400_000);
    }

    #[test]
    fn bad_anchor_names_the_field() {
        assert!(matches!(
            PeriodKind::monthly_anchored(0),
            Err(UsageError::Config {
                field: "period.anchor_day",
                ..
            })
        ));
        assert!(PeriodKind::monthly_anchored(32).is_err());
    }

    #[test]
    fn times_outside_the_calendar_have_no_period() {
        // Microseconds since the epoch, read as milliseconds: year ~58,000.
        let us = 1_769_904_000_000_000;
        // The last day and month the calendar has: their end is not in it.
        let last_day = ms(9999, Month::December, 31, 12, 0, 0, 0);
        for k in [PeriodKind::monthly(), PeriodKind::daily()] {
            assert_eq!(k.checked_period_at(us), None);
            assert_eq!(k.checked_period_at(last_day), None);
            assert_eq!(k.checked_period_at(i64::MIN), None);
        }
        assert_eq!(PeriodKind::monthly().period_at(us).label, "1970-01");
        let p = PeriodKind::daily()
            .checked_period_at(ms(9999, Month::December, 30, 12, 0, 0, 0))
            .expect("in range");
        assert_eq!(p.label, "9999-12-30");
        assert!(p.end_ms > p.start_ms);
    }

    proptest::proptest! {
        #[test]
        fn every_instant_is_in_exactly_its_period(t in 0i64..4_102_444_800_000, anchor in 1u8..=31) {
            for k in [PeriodKind::monthly(), PeriodKind::Monthly { anchor_day: anchor }, PeriodKind::daily()] {
                let p = k.period_at(t);
                proptest::prop_assert!(p.contains(t));
                proptest::prop_assert_eq!(k.period_at(p.end_ms).start_ms, p.end_ms);
                proptest::prop_assert_eq!(k.period_at(p.end_ms - 1).label, p.label.clone());
            }
        }
    }
}
