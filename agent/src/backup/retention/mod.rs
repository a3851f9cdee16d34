//! Which backups a retention policy keeps, as restic's `forget` and Proxmox Backup Server's
//! prune choose them: the newest `keep_last`; then, per period kind, the newest backup of each
//! of the `keep_<period>` most recent periods that have one. A backup kept by any rule stays.
//! A policy with no rule keeps everything (nothing is deleted by omission).

use std::collections::BTreeSet;

use time::OffsetDateTime;

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Policy {
    pub keep_last: u32,
    pub keep_daily: u32,
    pub keep_weekly: u32,
    pub keep_monthly: u32,
}

impl Policy {
    pub fn keeps_all(&self) -> bool {
        *self == Policy::default()
    }
}

/// One backup as retention sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub id: String,
    pub created_ms: i64,
}

/// The ids `policy` keeps among `backups` (any order).
pub fn keep(backups: &[Entry], policy: Policy) -> BTreeSet<String> {
    if policy.keeps_all() {
        return backups.iter().map(|b| b.id.clone()).collect();
    }
    let mut newest_first: Vec<&Entry> = backups.iter().collect();
    newest_first.sort_by(|a, b| b.created_ms.cmp(&a.created_ms).then(b.id.cmp(&a.id)));
    let mut kept = BTreeSet::new();
    for b in newest_first.iter().take(policy.keep_last as usize) {
        kept.insert(b.id.clone());
    }
    let periods: [(u32, Period); 3] = [
        (policy.keep_daily, |t| (t.year(), t.ordinal() as u32)),
        (policy.keep_weekly, |t| {
            let (y, w, _) = t.to_iso_week_date();
            (y, w as u32)
        }),
        (policy.keep_monthly, |t| (t.year(), t.month() as u32)),
    ];
    for (count, period) in periods {
        let mut left = count;
        let mut last = None;
        for b in &newest_first {
            if left == 0 {
                break;
            }
            let p = period(at(b.created_ms));
            if last != Some(p) {
                kept.insert(b.id.clone());
                last = Some(p);
                left -= 1;
            }
        }
    }
    kept
}

/// The period (day, ISO week or month) a time falls in, as (year, number in the year).
type Period = fn(OffsetDateTime) -> (i32, u32);

fn at(ms: i64) -> OffsetDateTime {
    OffsetDateTime::from_unix_timestamp_nanos(ms as i128 * 1_000_000)
        .unwrap_or(OffsetDateTime::UNIX_EPOCH)
}

#[cfg(test)]
mod tests {
    use super::*;

    const HOUR: i64 = 3_600_000;
    const DAY: i64 = 24 * HOUR;
    /// 2026-02-02, a Monday.
    const MONDAY: i64 = 1_769_990_400_000;

    fn backups(times: &[i64]) -> Vec<Entry> {
        times
            .iter()
            .enumerate()
            .map(|(i, &t)| Entry {
                id: format!("b{i}"),
                created_ms: t,
            })
            .collect()
    }

    fn ids(set: &BTreeSet<String>) -> Vec<&str> {
        set.iter().map(String::as_str).collect()
    }

    #[test]
    fn no_rule_keeps_everything() {
        let b = backups(&[0, 1, 2]);
        assert_eq!(keep(&b, Policy::default()).len(), 3);
    }

    #[test]
    fn keep_last_keeps_the_newest() {
        let b = backups(&[MONDAY, MONDAY + 2, MONDAY + 1]);
        let p = Policy {
            keep_last: 2,
            ..Policy::default()
        };
        assert_eq!(ids(&keep(&b, p)), ["b1", "b2"]);
    }

    #[test]
    fn daily_keeps_the_newest_of_each_recent_day() {
        // Two a day for four days.
        let times: Vec<i64> = (0..4)
            .flat_map(|d| [MONDAY + d * DAY + HOUR, MONDAY + d * DAY + 5 * HOUR])
            .collect();
        let b = backups(&times);
        let p = Policy {
            keep_daily: 3,
            ..Policy::default()
        };
        // Days 3, 2 and 1, each its later backup.
        assert_eq!(ids(&keep(&b, p)), ["b3", "b5", "b7"]);
    }

    #[test]
    fn weekly_and_monthly_use_iso_weeks_and_calendar_months() {
        // Sunday 2026-02-01, Monday 2026-02-02 (a new ISO week), Tuesday, and 2026-03-02.
        let b = backups(&[MONDAY - DAY, MONDAY, MONDAY + DAY, MONDAY + 28 * DAY]);
        let weekly = Policy {
            keep_weekly: 3,
            ..Policy::default()
        };
        assert_eq!(ids(&keep(&b, weekly)), ["b0", "b2", "b3"]);
        let monthly = Policy {
            keep_monthly: 2,
            ..Policy::default()
        };
        assert_eq!(ids(&keep(&b, monthly)), ["b2", "b3"]);
    }

    #[test]
    fn rules_add_up() {
        let times: Vec<i64> = (0..10).map(|d| MONDAY + d * DAY).collect();
        let b = backups(&times);
        let p = Policy {
            keep_last: 1,
            keep_daily: 2,
            keep_weekly: 2,
            keep_monthly: 0,
        };
        // Last: b9; daily: b9, b8; weekly: b9 (week 2), b6 (Sunday, end of week 1).
        assert_eq!(ids(&keep(&b, p)), ["b6", "b8", "b9"]);
    }
}
