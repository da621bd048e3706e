//! Maintenance windows: when an appliance may reboot into a new release.
//!
//! A site (or one appliance, as an override) has a [`MaintenanceWindow`]. The coordinator
//! stores it and serves it as JSON in the check-in response; the agent asks it whether it may
//! reboot now ([`MaintenanceWindow::is_open`]) or when it next may
//! ([`MaintenanceWindow::next_open`]). The window is written in local wall-clock time because
//! operators think "02:00 at the site", not in UTC offsets that change twice a year.
//!
//! # Anchoring
//! A window belongs to the local date it starts on. On a listed day `D` it opens at `start` on
//! `D` and closes at `end` on `D`, or on `D + 1` if `end <= start` (a window that crosses
//! midnight). So a 22:00–02:00 window listed only for Sunday is open Sunday 23:30 and Monday
//! 01:30, but not Monday 23:30. Midnight is written `00:00`; `24:00` is rejected.
//!
//! # Daylight saving time
//! Both ends are resolved to instants independently with jiff's *compatible* disambiguation
//! (the RFC 5545 rule):
//! - **gap** (spring forward): a wall-clock time that does not exist is moved forward by the
//!   gap. In Europe/Berlin on 2026-03-29, a 02:00–05:00 window opens at 03:00 CEST and closes
//!   at 05:00 CEST: it is 2 real hours long, not 3. A window inside the gap moves with it
//!   (02:15–02:45 becomes 03:15–03:45 CEST). One that starts in the gap and would so end
//!   before it starts (02:30–03:00 becomes 03:30–03:00) does not open that day.
//! - **fold** (fall back): a wall-clock time that happens twice means its *first* occurrence.
//!   In Europe/Berlin on 2026-10-25, 02:00–05:00 opens at the first 02:00 (00:00 UTC) and
//!   closes at 05:00 CET (04:00 UTC): 4 real hours. A 01:00–02:30 window ends at the first
//!   02:30 (00:30 UTC), 1.5 real hours, so the repeated hour is not added to it.
//!
//! # Wire format
//! `{"start":"02:00","end":"05:00","timezone":"UTC","days":["mon","tue"]}`. Unknown fields are
//! ignored, so a newer coordinator may add fields. Weekdays are a closed set: an unknown
//! weekday string is a deserialization error, which is fine because the set will never grow.

use jiff::civil::{self, Date, Time};
use jiff::tz::TimeZone;
use jiff::{Timestamp, ToSpan};
use serde::{Deserialize, Serialize};

/// How many local dates past today are considered as window start days. Any non-empty
/// `days` has a start within 7 days; the extra day is slack, not a requirement.
const LOOKAHEAD_DAYS: i64 = 8;

/// A recurring time range, in a site's local time, in which an appliance may reboot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MaintenanceWindow {
    /// Opening time, `"HH:MM"` wall-clock time in `timezone`.
    pub start: String,
    /// Closing time, `"HH:MM"`; if `end <= start` the window closes on the next day.
    pub end: String,
    /// IANA time zone name, e.g. `"Europe/Berlin"` or `"UTC"`.
    pub timezone: String,
    /// Days on which a window *starts*. Empty means the window never opens.
    pub days: Vec<Weekday>,
}

/// A day of the week, serialized as `"mon"` … `"sun"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Weekday {
    Mon,
    Tue,
    Wed,
    Thu,
    Fri,
    Sat,
    Sun,
}

/// Why a [`MaintenanceWindow`] cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WindowError {
    /// `start` or `end` is not a `"HH:MM"` time between 00:00 and 23:59.
    #[error("maintenance window {field} is not an HH:MM time: {value:?}")]
    BadTime { field: &'static str, value: String },
    /// The time zone database has no zone by this name.
    #[error("unknown time zone {0:?}")]
    UnknownTimeZone(String),
    /// `start == end`: ambiguous between "never" and "always", so refused.
    #[error("maintenance window start and end are equal")]
    Empty,
}

impl Default for MaintenanceWindow {
    /// 02:00–05:00 UTC, not starting on Friday or Saturday so nobody is paged at the weekend.
    fn default() -> Self {
        use Weekday::*;
        Self {
            start: "02:00".into(),
            end: "05:00".into(),
            timezone: "UTC".into(),
            days: vec![Mon, Tue, Wed, Thu, Sun],
        }
    }
}

impl MaintenanceWindow {
    /// Checks the times and the time zone; the coordinator calls this before storing a window.
    pub fn validate(&self) -> Result<(), WindowError> {
        self.parse().map(|_| ())
    }

    /// Whether an appliance may reboot at `now`.
    pub fn is_open(&self, now: Timestamp) -> Result<bool, WindowError> {
        Ok(self.current_or_next(now)?.is_some_and(|(start, _)| start <= now))
    }

    /// The earliest instant at or after `now` at which the window is open: `now` itself if it
    /// is open now, `None` if `days` is empty.
    pub fn next_open(&self, now: Timestamp) -> Result<Option<Timestamp>, WindowError> {
        Ok(self.current_or_next(now)?.map(|(start, _)| start.max(now)))
    }

    /// `[start, end)` of the window open at `now`, or else of the next one to open.
    pub fn current_or_next(
        &self,
        now: Timestamp,
    ) -> Result<Option<(Timestamp, Timestamp)>, WindowError> {
        let parsed = self.parse()?;
        let today = parsed.tz.to_datetime(now).date();
        // Start at yesterday: its window may cross midnight and still be open. Windows come
        // out in start order, so the first one not yet over is the current or next one.
        Ok((-1..=LOOKAHEAD_DAYS)
            .filter_map(|offset| today.checked_add(offset.days()).ok())
            .filter(|day| self.days.contains(&weekday_of(*day)))
            .filter_map(|day| parsed.window_on(day))
            .find(|&(_, end)| now < end))
    }

    fn parse(&self) -> Result<Parsed, WindowError> {
        let start = parse_hhmm("start", &self.start)?;
        let end = parse_hhmm("end", &self.end)?;
        if start == end {
            return Err(WindowError::Empty);
        }
        let unknown = || WindowError::UnknownTimeZone(self.timezone.clone());
        let tz = TimeZone::get(&self.timezone).map_err(|_| unknown())?;
        // jiff maps "Etc/Unknown" to a UTC-like sentinel; a window there would silently be UTC.
        if tz.is_unknown() {
            return Err(unknown());
        }
        Ok(Parsed { start, end, tz })
    }
}

/// A window's fields after validation.
struct Parsed {
    start: Time,
    end: Time,
    tz: TimeZone,
}

impl Parsed {
    /// The instants of the window starting on local date `day`; `None` if a DST gap makes it
    /// end before it starts, or past the dates jiff can represent (year 9999): it never opens.
    fn window_on(&self, day: Date) -> Option<(Timestamp, Timestamp)> {
        let end_day = if self.end <= self.start { day.tomorrow().ok()? } else { day };
        let start = self.tz.to_timestamp(day.to_datetime(self.start)).ok()?;
        let end = self.tz.to_timestamp(end_day.to_datetime(self.end)).ok()?;
        (start < end).then_some((start, end))
    }
}

/// Parses exactly `HH:MM`; stricter than jiff's parser, which also takes `02`, `0200` and
/// seconds, so that every stored window has one spelling.
fn parse_hhmm(field: &'static str, value: &str) -> Result<Time, WindowError> {
    let bad = || WindowError::BadTime { field, value: value.to_owned() };
    let b = value.as_bytes();
    if b.len() != 5 || b[2] != b':' || ![0, 1, 3, 4].iter().all(|&i| b[i].is_ascii_digit()) {
        return Err(bad());
    }
    let digit = |i: usize| (b[i] - b'0') as i8;
    Time::new(digit(0) * 10 + digit(1), digit(3) * 10 + digit(4), 0, 0).map_err(|_| bad())
}

fn weekday_of(day: Date) -> Weekday {
    match day.weekday() {
        civil::Weekday::Monday => Weekday::Mon,
        civil::Weekday::Tuesday => Weekday::Tue,
        civil::Weekday::Wednesday => Weekday::Wed,
        civil::Weekday::Thursday => Weekday::Thu,
        civil::Weekday::Friday => Weekday::Fri,
        civil::Weekday::Saturday => Weekday::Sat,
        civil::Weekday::Sunday => Weekday::Sun,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use jiff::SignedDuration;

    fn ts(s: &str) -> Timestamp {
        s.parse().expect("test timestamp")
    }

    fn window(start: &str, end: &str, tz: &str, days: &[Weekday]) -> MaintenanceWindow {
        MaintenanceWindow {
            start: start.into(),
            end: end.into(),
            timezone: tz.into(),
            days: days.to_vec(),
        }
    }

    fn bounds(w: &MaintenanceWindow, now: &str) -> (Timestamp, Timestamp) {
        w.current_or_next(ts(now)).expect("valid window").expect("a window")
    }

    #[test]
    fn json_shape_and_unknown_fields() {
        let json = serde_json::to_string(&MaintenanceWindow::default()).expect("serialize");
        assert_eq!(
            json,
            r#"{"start":"02:00","end":"05:00","timezone":"UTC","days":["mon","tue","wed","thu","sun"]}"#
        );
        let newer = r#"{"start":"22:00","end":"02:00","timezone":"Europe/Berlin","days":["sun"],"jitter":"5m"}"#;
        let w: MaintenanceWindow = serde_json::from_str(newer).expect("unknown field ignored");
        assert_eq!(w, window("22:00", "02:00", "Europe/Berlin", &[Weekday::Sun]));
        let odd_day = r#"{"start":"02:00","end":"05:00","timezone":"UTC","days":["funday"]}"#;
        assert!(serde_json::from_str::<MaintenanceWindow>(odd_day).is_err());
    }

    #[test]
    fn validation_errors() {
        let now = ts("2026-03-01T00:00:00Z");
        assert_eq!(MaintenanceWindow::default().validate(), Ok(()));
        for bad in ["25:00", "24:00", "02:60", "2:00", "0200", "02:00:00", "", "+1:00", "٠٢:٠٠"]
        {
            let w = window(bad, "05:00", "UTC", &[Weekday::Mon]);
            let err = WindowError::BadTime { field: "start", value: bad.into() };
            assert_eq!(w.validate(), Err(err.clone()), "{bad:?}");
            assert_eq!(w.is_open(now), Err(err));
        }
        let w = window("02:00", "25:00", "UTC", &[]);
        assert_eq!(w.validate(), Err(WindowError::BadTime { field: "end", value: "25:00".into() }));
        for zone in ["Mars/Olympus_Mons", "Etc/Unknown", ""] {
            let w = window("02:00", "05:00", zone, &[Weekday::Mon]);
            assert_eq!(w.next_open(now), Err(WindowError::UnknownTimeZone(zone.into())));
        }
        assert_eq!(window("02:00", "02:00", "UTC", &[]).validate(), Err(WindowError::Empty));
    }

    #[test]
    fn window_belongs_to_its_start_day() {
        // 2026-03-01 is a Sunday.
        let w = window("22:00", "02:00", "UTC", &[Weekday::Sun]);
        assert!(w.is_open(ts("2026-03-01T23:30:00Z")).expect("valid"));
        assert!(w.is_open(ts("2026-03-02T01:30:00Z")).expect("valid"));
        assert!(!w.is_open(ts("2026-03-02T02:00:00Z")).expect("valid"), "end is exclusive");
        assert!(!w.is_open(ts("2026-03-02T23:30:00Z")).expect("valid"));
        assert!(!w.is_open(ts("2026-03-01T21:59:59Z")).expect("valid"));
        let expected = (ts("2026-03-01T22:00:00Z"), ts("2026-03-02T02:00:00Z"));
        assert_eq!(bounds(&w, "2026-03-02T01:30:00Z"), expected);
    }

    #[test]
    fn spring_forward_berlin_skips_the_missing_hour() {
        let w = window("02:00", "05:00", "Europe/Berlin", &[Weekday::Sun]);
        let (start, end) = bounds(&w, "2026-03-28T12:00:00Z");
        assert_eq!(start, ts("2026-03-29T03:00:00+02:00"));
        assert_eq!(start, ts("2026-03-29T01:00:00Z"));
        assert_eq!(end, ts("2026-03-29T05:00:00+02:00"));
        assert_eq!(end - start, SignedDuration::from_hours(2));
    }

    #[test]
    fn windows_touching_the_gap() {
        let w = window("02:15", "02:45", "Europe/Berlin", &[Weekday::Sun]);
        let expected = (ts("2026-03-29T03:15:00+02:00"), ts("2026-03-29T03:45:00+02:00"));
        assert_eq!(bounds(&w, "2026-03-28T12:00:00Z"), expected, "shifted by the gap");
        let w = window("02:30", "03:00", "Europe/Berlin", &[Weekday::Sun]);
        let (start, _) = bounds(&w, "2026-03-28T12:00:00Z");
        assert_eq!(start, ts("2026-04-05T02:30:00+02:00"), "next Sunday instead");
    }

    #[test]
    fn fall_back_berlin_uses_first_occurrence() {
        let w = window("02:00", "05:00", "Europe/Berlin", &[Weekday::Sun]);
        let (start, end) = bounds(&w, "2026-10-24T12:00:00Z");
        assert_eq!(start, ts("2026-10-25T00:00:00Z"));
        assert_eq!(end, ts("2026-10-25T04:00:00Z"));
        assert_eq!(end - start, SignedDuration::from_hours(4));

        let w = window("01:00", "02:30", "Europe/Berlin", &[Weekday::Sun]);
        let (start, end) = bounds(&w, "2026-10-24T12:00:00Z");
        assert_eq!(start, ts("2026-10-24T23:00:00Z"));
        assert_eq!(end, ts("2026-10-25T02:30:00+02:00"), "the first 02:30, still CEST");
        assert!(!w.is_open(ts("2026-10-25T02:30:00+01:00")).expect("valid"), "second 02:30");
    }

    #[test]
    fn spring_forward_new_york() {
        // 2026-03-08, 02:00 EST jumps to 03:00 EDT.
        let w = window("01:30", "04:00", "America/New_York", &[Weekday::Sun]);
        let (start, end) = bounds(&w, "2026-03-07T12:00:00Z");
        assert_eq!(start, ts("2026-03-08T06:30:00Z"));
        assert_eq!(end, ts("2026-03-08T08:00:00Z"));
        assert_eq!(end - start, SignedDuration::from_mins(90));
        assert!(w.is_open(ts("2026-03-08T03:30:00-04:00")).expect("valid"));
    }

    #[test]
    fn utc_window_and_next_open() {
        let w = MaintenanceWindow::default();
        // Thursday 2026-03-05, inside: next_open is now.
        let now = ts("2026-03-05T03:00:00Z");
        assert!(w.is_open(now).expect("valid"));
        assert_eq!(w.next_open(now), Ok(Some(now)));
        assert_eq!(
            bounds(&w, "2026-03-05T03:00:00Z"),
            (ts("2026-03-05T02:00:00Z"), ts("2026-03-05T05:00:00Z"))
        );
        // Friday afternoon: no window Friday or Saturday, so Sunday 02:00.
        assert_eq!(w.next_open(ts("2026-03-06T15:00:00Z")), Ok(Some(ts("2026-03-08T02:00:00Z"))));
    }

    #[test]
    fn no_days_never_opens() {
        let w = window("02:00", "05:00", "UTC", &[]);
        let now = ts("2026-03-05T03:00:00Z");
        assert_eq!(w.is_open(now), Ok(false));
        assert_eq!(w.next_open(now), Ok(None));
        assert_eq!(w.current_or_next(now), Ok(None));
    }

    #[test]
    fn one_day_a_week_is_found_within_the_lookahead() {
        // Monday 2026-03-02, just after its window closed: the next one is 7 days later.
        for (day, date) in [(Weekday::Mon, "2026-03-09"), (Weekday::Sun, "2026-03-08")] {
            let w = window("02:00", "05:00", "Pacific/Auckland", &[day]);
            let next = w.next_open(ts("2026-03-02T05:00:00+13:00")).expect("valid");
            assert_eq!(next, Some(ts(&format!("{date}T02:00:00+13:00"))), "{day:?}");
        }
    }
}
