//! Department online hours (Live Helper Chat's work hours): weekly local ranges in an IANA
//! time zone and closed dates, as plain data. No clock reads: every question takes the
//! instant it is asked about, so the rules are unit-tested with any date, zone and DST change.
//!
//! Time zones come from the database bundled into the binary (jiff's `tzdb-bundle-always`),
//! so a machine without `/usr/share/zoneinfo` answers the same as one with it.

use std::collections::{BTreeMap, BTreeSet};

use jiff::Timestamp;
use jiff::civil::{Date, DateTime, Time};
use jiff::tz::TimeZone;
use serde::{Deserialize, Serialize};

/// Ranges a day may hold.
const MAX_RANGES: usize = 24;
/// Closed dates a department may list.
const MAX_CLOSED_DATES: usize = 1000;
/// How far ahead an opening is looked for (about ten years): past it `opens_at` is null.
const HORIZON_DAYS: i64 = 3660;
/// Days looked at past the last closed date: after it the week repeats for ever.
const WEEK: i64 = 8;

/// Weekday keys of `weekly`, Monday first.
pub const DAYS: [&str; 7] = ["mon", "tue", "wed", "thu", "fri", "sat", "sun"];

/// `hours` as the API takes it and the store keeps it (always validated by [`Schedule::parse`]
/// before it is accepted).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Hours {
    /// IANA name, e.g. `Europe/Vilnius`.
    pub timezone: String,
    /// Day key (`mon` … `sun`) → ranges `HH:MM-HH:MM`; a day left out is closed all day.
    #[serde(default)]
    pub weekly: BTreeMap<String, Vec<String>>,
    /// Whole local dates (`YYYY-MM-DD`) closed whatever the weekday.
    #[serde(default)]
    pub closed_dates: Vec<String>,
}

/// Why `hours` was refused: the message names the field and the bad value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct HoursError(pub String);

/// Hours parsed: what the questions below run on.
#[derive(Debug, Clone)]
pub struct Schedule {
    tz: TimeZone,
    /// Per weekday (Monday = 0): sorted, merged ranges in minutes of the local day.
    weekly: [Vec<(u16, u16)>; 7],
    closed: BTreeSet<Date>,
}

/// Open or closed at an instant, and until when.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct State {
    pub open: bool,
    /// The next instant the answer may change (a range's start or end, or the end of the
    /// look-ahead); None = it never changes again.
    pub next_change: Option<Timestamp>,
    /// Closed only: the next opening; None = never again (or when open).
    pub opens_at: Option<Timestamp>,
}

impl Schedule {
    /// Validates hours; a bad zone, day, range or date is refused with a message naming it.
    pub fn parse(h: &Hours) -> Result<Schedule, HoursError> {
        let tz = TimeZone::get(&h.timezone).map_err(|_| {
            HoursError(format!(
                "hours.timezone: unknown IANA time zone {:?}",
                h.timezone
            ))
        })?;
        let mut weekly: [Vec<(u16, u16)>; 7] = Default::default();
        for (day, ranges) in &h.weekly {
            let i = DAYS.iter().position(|d| d == day).ok_or_else(|| {
                HoursError(format!(
                    "hours.weekly: unknown day {day:?} (one of mon, tue, wed, thu, fri, sat, sun)"
                ))
            })?;
            if ranges.len() > MAX_RANGES {
                return Err(HoursError(format!(
                    "hours.weekly.{day}: at most {MAX_RANGES} ranges a day"
                )));
            }
            let mut parsed = Vec::with_capacity(ranges.len());
            for (n, r) in ranges.iter().enumerate() {
                let range = parse_range(r)
                    .map_err(|why| HoursError(format!("hours.weekly.{day}[{n}]: {r:?} {why}")))?;
                parsed.push(range);
            }
            weekly[i] = merge(parsed);
        }
        if h.closed_dates.len() > MAX_CLOSED_DATES {
            return Err(HoursError(format!(
                "hours.closed_dates: at most {MAX_CLOSED_DATES} dates"
            )));
        }
        let mut closed = BTreeSet::new();
        for (n, d) in h.closed_dates.iter().enumerate() {
            let date = parse_date(d).ok_or_else(|| {
                HoursError(format!(
                    "hours.closed_dates[{n}]: {d:?} is not a date (YYYY-MM-DD)"
                ))
            })?;
            closed.insert(date);
        }
        Ok(Schedule { tz, weekly, closed })
    }

    /// Is the department inside its hours at `at`?
    pub fn is_open(&self, at: Timestamp) -> bool {
        self.state(at).open
    }

    /// The next opening after `at` (when closed at `at`); None when it never opens again.
    pub fn opens_at(&self, at: Timestamp) -> Option<Timestamp> {
        self.state(at).opens_at
    }

    /// Open or closed at `at`, the next boundary and, when closed, the next opening.
    pub fn state(&self, at: Timestamp) -> State {
        for (start, end) in self.open_intervals(at) {
            if end <= at {
                continue;
            }
            return if start <= at {
                State {
                    open: true,
                    next_change: Some(end),
                    opens_at: None,
                }
            } else {
                State {
                    open: false,
                    next_change: Some(start),
                    opens_at: Some(start),
                }
            };
        }
        // Nothing ahead within the look-ahead: closed for good (an interval that runs to the
        // look-ahead's end was returned above, its end a boundary to look again).
        State {
            open: false,
            next_change: None,
            opens_at: None,
        }
    }

    /// Open intervals `[start, end)` as instants, in order and merged (Monday 09:00-24:00
    /// and Tuesday 00:00-10:00 are one interval), from the day before `at`'s local date up
    /// to the look-ahead.
    fn open_intervals(&self, at: Timestamp) -> impl Iterator<Item = (Timestamp, Timestamp)> + '_ {
        let today = self.tz.to_datetime(at).date();
        let first = today.yesterday().unwrap_or(today);
        let days = self.look_ahead(today);
        let raw = (0..=days)
            .map_while(move |n| first.checked_add(jiff::Span::new().days(n)).ok())
            .flat_map(move |date| self.day_intervals(date));
        Merged {
            inner: raw,
            pending: None,
        }
    }

    /// Days to look ahead from `today`: a week past the last closed date still to come,
    /// within the horizon.
    fn look_ahead(&self, today: Date) -> i64 {
        let last = self.closed.range(today..).next_back();
        let until_last = last.map_or(0, |d| today.duration_until(*d).as_secs() / 86_400);
        (until_last + WEEK + 1).min(HORIZON_DAYS)
    }

    /// The open intervals of one local date (none on a closed date).
    fn day_intervals(&self, date: Date) -> Vec<(Timestamp, Timestamp)> {
        if self.closed.contains(&date) {
            return Vec::new();
        }
        let day = date.weekday().to_monday_zero_offset() as usize;
        self.weekly[day]
            .iter()
            .filter_map(|(s, e)| {
                let start = self.instant(date, *s)?;
                let end = self.instant(date, *e)?;
                // The skipped hour of a spring-forward maps to nothing.
                (start < end).then_some((start, end))
            })
            .collect()
    }

    /// The instant of a local minute of a date (1440 = next midnight). A time that does not
    /// exist (spring-forward gap) is moved forward by the gap (02:30 in a 02:00-03:00 gap is
    /// 03:30); a repeated one (fall back) is its first occurrence.
    fn instant(&self, date: Date, minute: u16) -> Option<Timestamp> {
        let (date, minute) = if minute >= 1440 {
            (date.tomorrow().ok()?, minute - 1440)
        } else {
            (date, minute)
        };
        let time = Time::new((minute / 60) as i8, (minute % 60) as i8, 0, 0).ok()?;
        self.tz.to_timestamp(DateTime::from_parts(date, time)).ok()
    }
}

/// Joins intervals that touch or overlap.
struct Merged<I> {
    inner: I,
    pending: Option<(Timestamp, Timestamp)>,
}

impl<I: Iterator<Item = (Timestamp, Timestamp)>> Iterator for Merged<I> {
    type Item = (Timestamp, Timestamp);

    fn next(&mut self) -> Option<Self::Item> {
        loop {
            match (self.pending, self.inner.next()) {
                (None, None) => return None,
                (Some(p), None) => {
                    self.pending = None;
                    return Some(p);
                }
                (None, Some(n)) => self.pending = Some(n),
                (Some((s, e)), Some((ns, ne))) if ns <= e => {
                    self.pending = Some((s, e.max(ne)));
                }
                (Some(p), Some(n)) => {
                    self.pending = Some(n);
                    return Some(p);
                }
            }
        }
    }
}

/// `HH:MM-HH:MM` → minutes of the day; the end after the start, `24:00` ends a day.
fn parse_range(r: &str) -> Result<(u16, u16), &'static str> {
    let (a, b) = r.split_once('-').ok_or("is not a range HH:MM-HH:MM")?;
    let start = parse_minute(a).ok_or("has a bad start (HH:MM, 00:00 to 23:59)")?;
    let end = parse_minute(b).ok_or("has a bad end (HH:MM, 00:01 to 24:00)")?;
    if start >= 1440 {
        return Err("starts at 24:00 (a range starts at most at 23:59)");
    }
    if end <= start {
        return Err("must end after it starts");
    }
    Ok((start, end))
}

fn parse_minute(s: &str) -> Option<u16> {
    let (h, m) = s.split_once(':')?;
    if h.len() != 2 || m.len() != 2 || !h.bytes().chain(m.bytes()).all(|b| b.is_ascii_digit()) {
        return None;
    }
    let (h, m): (u16, u16) = (h.parse().ok()?, m.parse().ok()?);
    match (h, m) {
        (24, 0) => Some(1440),
        (0..=23, 0..=59) => Some(h * 60 + m),
        _ => None,
    }
}

fn parse_date(s: &str) -> Option<Date> {
    let b = s.as_bytes();
    if b.len() != 10 || b[4] != b'-' || b[7] != b'-' {
        return None;
    }
    let y: i16 = s[0..4].parse().ok()?;
    let m: i8 = s[5..7].parse().ok()?;
    let d: i8 = s[8..10].parse().ok()?;
    Date::new(y, m, d).ok()
}

/// Sorts ranges and joins those that overlap or touch.
fn merge(mut ranges: Vec<(u16, u16)>) -> Vec<(u16, u16)> {
    ranges.sort_unstable();
    let mut out: Vec<(u16, u16)> = Vec::with_capacity(ranges.len());
    for (s, e) in ranges {
        match out.last_mut() {
            Some(last) if s <= last.1 => last.1 = last.1.max(e),
            _ => out.push((s, e)),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hours(tz: &str, weekly: &[(&str, &[&str])], closed: &[&str]) -> Schedule {
        Schedule::parse(&Hours {
            timezone: tz.into(),
            weekly: weekly
                .iter()
                .map(|(d, r)| (d.to_string(), r.iter().map(|x| x.to_string()).collect()))
                .collect(),
            closed_dates: closed.iter().map(|d| d.to_string()).collect(),
        })
        .expect("valid hours")
    }

    fn ts(s: &str) -> Timestamp {
        s.parse().expect("RFC 3339 instant")
    }

    fn err(h: Hours) -> String {
        Schedule::parse(&h).expect_err("refused").0
    }

    #[test]
    fn hours_open_and_closed_by_zone_and_weekday() {
        // Vilnius is UTC+2 in winter. Monday 2026-11-30.
        let s = hours(
            "Europe/Vilnius",
            &[("mon", &["09:00-13:00", "14:00-18:00"])],
            &[],
        );
        assert!(!s.is_open(ts("2026-11-30T06:59:59Z")), "08:59:59 local");
        assert!(s.is_open(ts("2026-11-30T07:00:00Z")), "09:00 local");
        assert!(!s.is_open(ts("2026-11-30T11:00:00Z")), "13:00 local: lunch");
        assert!(s.is_open(ts("2026-11-30T12:30:00Z")), "14:30 local");
        assert!(
            !s.is_open(ts("2026-11-30T16:00:00Z")),
            "18:00 local: end is exclusive"
        );
        assert!(
            !s.is_open(ts("2026-12-01T08:00:00Z")),
            "Tuesday is left out: closed"
        );
        // The same instant is Monday 10:00 in Vilnius but Monday 03:00 in New York.
        let ny = hours("America/New_York", &[("mon", &["09:00-13:00"])], &[]);
        assert!(s.is_open(ts("2026-11-30T08:00:00Z")));
        assert!(!ny.is_open(ts("2026-11-30T08:00:00Z")));
    }

    #[test]
    fn hours_zone_far_from_utc() {
        // Kiritimati is UTC+14: Monday 09:00 local is Sunday 19:00 UTC.
        let s = hours("Pacific/Kiritimati", &[("mon", &["09:00-10:00"])], &[]);
        assert!(s.is_open(ts("2026-11-29T19:30:00Z")), "a Sunday in UTC");
        assert!(!s.is_open(ts("2026-11-30T19:30:00Z")), "Tuesday local");
        assert_eq!(
            s.opens_at(ts("2026-11-29T20:00:00Z")),
            Some(ts("2026-12-06T19:00:00Z"))
        );
        // Auckland in summer (NZDT, UTC+13).
        let a = hours("Pacific/Auckland", &[("tue", &["08:00-09:00"])], &[]);
        assert!(a.is_open(ts("2026-11-30T19:15:00Z")), "Tuesday 08:15 NZDT");
    }

    #[test]
    fn hours_across_a_dst_change() {
        // Europe/Vilnius springs forward on Sunday 2026-03-29 at 03:00 (UTC+2 → UTC+3).
        let s = hours(
            "Europe/Vilnius",
            &[("sat", &["09:00-17:00"]), ("sun", &["09:00-17:00"])],
            &[],
        );
        assert!(s.is_open(ts("2026-03-28T07:00:00Z")), "Saturday 09:00 EET");
        assert!(!s.is_open(ts("2026-03-28T06:30:00Z")));
        assert!(s.is_open(ts("2026-03-29T06:00:00Z")), "Sunday 09:00 EEST");
        assert!(!s.is_open(ts("2026-03-29T05:30:00Z")), "Sunday 08:30 EEST");
        assert_eq!(
            s.state(ts("2026-03-28T20:00:00Z")).opens_at,
            Some(ts("2026-03-29T06:00:00Z")),
            "the opening after the change is an hour earlier in UTC"
        );
        // The skipped hour itself (03:00-04:00 does not exist that day) never opens then.
        let gap = hours("Europe/Vilnius", &[("sun", &["03:00-04:00"])], &[]);
        assert_eq!(
            gap.opens_at(ts("2026-03-28T12:00:00Z")),
            Some(ts("2026-04-05T00:00:00Z")),
            "the next Sunday"
        );
        // Falling back on 2026-10-25 (04:00 EEST → 03:00 EET): a 25-hour Sunday.
        let all_day = hours("Europe/Vilnius", &[("sun", &["00:00-24:00"])], &[]);
        let st = all_day.state(ts("2026-10-25T12:00:00Z"));
        assert!(st.open);
        assert_eq!(st.next_change, Some(ts("2026-10-25T22:00:00Z")));
        assert_eq!(
            all_day.state(ts("2026-10-24T12:00:00Z")).next_change,
            Some(ts("2026-10-24T21:00:00Z")),
            "Sunday starts at 00:00 EEST"
        );
    }

    #[test]
    fn hours_24_00_ends_the_day_and_joins_the_next() {
        let s = hours(
            "UTC",
            &[("mon", &["20:00-24:00"]), ("tue", &["00:00-02:00"])],
            &[],
        );
        assert!(s.is_open(ts("2026-11-30T23:59:59Z")));
        assert!(s.is_open(ts("2026-12-01T00:00:00Z")));
        let st = s.state(ts("2026-11-30T21:00:00Z"));
        assert_eq!(
            st.next_change,
            Some(ts("2026-12-01T02:00:00Z")),
            "midnight is no boundary: one interval"
        );
        let only = hours("UTC", &[("mon", &["20:00-24:00"])], &[]);
        assert!(!only.is_open(ts("2026-12-01T00:00:00Z")));
    }

    #[test]
    fn hours_opens_at_next_opening() {
        let s = hours(
            "Europe/Vilnius",
            &[
                ("mon", &["09:00-13:00", "14:00-18:00"]),
                ("fri", &["10:00-12:00"]),
            ],
            &[],
        );
        let at = ts("2026-11-30T11:30:00Z"); // Monday 13:30
        let st = s.state(at);
        assert!(!st.open);
        assert_eq!(st.opens_at, Some(ts("2026-11-30T12:00:00Z")));
        assert_eq!(st.next_change, st.opens_at);
        // After Monday's last range: Friday.
        assert_eq!(
            s.opens_at(ts("2026-11-30T17:00:00Z")),
            Some(ts("2026-12-04T08:00:00Z"))
        );
        // While open: no opens_at, the next change is the range's end.
        let open = s.state(ts("2026-11-30T08:00:00Z"));
        assert_eq!((open.open, open.opens_at), (true, None));
        assert_eq!(open.next_change, Some(ts("2026-11-30T11:00:00Z")));
        // No range at all: closed for good.
        let never = hours("UTC", &[], &[]);
        assert_eq!(
            never.state(at),
            State {
                open: false,
                next_change: None,
                opens_at: None
            }
        );
    }

    #[test]
    fn hours_closed_dates_close_whole_local_days() {
        let s = hours(
            "Europe/Vilnius",
            &[("fri", &["09:00-17:00"])],
            &["2026-12-25"],
        );
        // Friday 2026-12-25 10:00 local is closed; the next opening is 2027-01-01.
        let at = ts("2026-12-25T08:00:00Z");
        assert!(!s.is_open(at));
        assert_eq!(s.opens_at(at), Some(ts("2027-01-01T07:00:00Z")));
        assert!(s.is_open(ts("2026-12-18T08:00:00Z")), "the Friday before");
        // The closed date is local: 23:30 UTC on the 24th is already the 25th in Vilnius.
        let late = hours(
            "Europe/Vilnius",
            &[("fri", &["00:00-24:00"])],
            &["2026-12-25"],
        );
        assert!(!late.is_open(ts("2026-12-24T22:30:00Z")));
        // Every remaining Monday closed up to the look-ahead: never again.
        let mut mondays = Vec::new();
        let mut d = Date::constant(2026, 11, 30);
        while d.year() < 2028 {
            mondays.push(d.to_string());
            d = d.checked_add(jiff::Span::new().days(7)).unwrap();
        }
        let sched = Schedule::parse(&Hours {
            timezone: "UTC".into(),
            weekly: [("mon".to_string(), vec!["09:00-10:00".to_string()])].into(),
            closed_dates: mondays,
        })
        .unwrap();
        assert_eq!(
            sched.opens_at(ts("2026-11-29T00:00:00Z")),
            Some(ts("2028-01-03T09:00:00Z")),
            "the first Monday not listed"
        );
    }

    #[test]
    fn hours_bad_zone_range_day_or_date_is_named() {
        let base = Hours {
            timezone: "Europe/Vilnius".into(),
            weekly: BTreeMap::new(),
            closed_dates: vec![],
        };
        let e = err(Hours {
            timezone: "Mars/Olympus".into(),
            ..base.clone()
        });
        assert!(
            e.contains("hours.timezone") && e.contains("Mars/Olympus"),
            "{e}"
        );
        for (bad, why) in [
            ("18:00-09:00", "must end after"),
            ("09:00", "not a range"),
            ("25:00-26:00", "bad start"),
            ("09:00-24:01", "bad end"),
            ("24:00-24:00", "starts at 24:00"),
            ("9:00-10:00", "bad start"),
        ] {
            let e = err(Hours {
                weekly: [(
                    "tue".to_string(),
                    vec!["08:00-09:00".into(), bad.to_string()],
                )]
                .into(),
                ..base.clone()
            });
            assert!(
                e.starts_with("hours.weekly.tue[1]") && e.contains(bad) && e.contains(why),
                "{e}"
            );
        }
        let e = err(Hours {
            weekly: [("funday".to_string(), vec![])].into(),
            ..base.clone()
        });
        assert!(e.contains("funday"), "{e}");
        let e = err(Hours {
            closed_dates: vec!["2026-02-30".into()],
            ..base.clone()
        });
        assert!(
            e.contains("hours.closed_dates[0]") && e.contains("2026-02-30"),
            "{e}"
        );
    }

    #[test]
    fn hours_overlapping_ranges_merge() {
        let s = hours("UTC", &[("mon", &["12:00-14:00", "09:00-12:30"])], &[]);
        let st = s.state(ts("2026-11-30T10:00:00Z"));
        assert_eq!(st.next_change, Some(ts("2026-11-30T14:00:00Z")));
    }

    #[test]
    fn hours_always_open_changes_only_at_the_look_ahead() {
        let all: Vec<(&str, &[&str])> = DAYS.iter().map(|d| (*d, &["00:00-24:00"][..])).collect();
        let s = hours("UTC", &all, &[]);
        let st = s.state(ts("2026-11-30T10:00:00Z"));
        assert!(st.open);
        assert!(
            st.next_change
                .is_some_and(|t| t > ts("2026-12-06T00:00:00Z"))
        );
    }
}
