//! Export-limit schedules: a site's time-of-day plan (entries of weekdays,
//! a local start and end, a limit; the plan's default between them), in its
//! IANA time zone. Validated here (unknown zones, bad days or times, limits
//! out of range, overlaps: each refused with its own code), and compiled into
//! the UTC steps a device runs offline ([`compile`]), daylight saving
//! included:
//! - a local time the clocks skip (the spring gap) happens when the clocks
//!   reach it, at the end of the gap (02:30 on a 02:00→03:00 night is 03:00);
//! - a local time that happens twice (the autumn fold) happens the first
//!   time;
//! - so an entry that lies wholly inside a gap does not run that day, and an
//!   entry across a fold lasts an hour longer.

use jiff::Timestamp;
use jiff::civil::{Date, DateTime, Weekday};
use jiff::tz::{AmbiguousOffset, TimeZone};
use serde_json::{Value, json};

use ecowatt_proto::messages::{MAX_STEPS, NO_ENTRY, Plan, Step};

/// Entries a schedule holds at most.
pub const MAX_ENTRIES: usize = 32;
/// How far ahead a plan is compiled.
pub const HORIZON_MS: i64 = 14 * 86_400_000;
/// A device whose plan ends sooner than this is sent a longer one.
pub const REFRESH_MS: i64 = 7 * 86_400_000;

/// Why a schedule is refused: a stable code, the field, what is wrong.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlanError {
    /// `schedule_invalid`, `unknown_timezone`, `schedule_days_invalid`,
    /// `schedule_time_invalid`, `schedule_limit_invalid`, `schedule_overlap`
    /// or `schedule_too_many_entries`.
    pub code: &'static str,
    /// The field at fault (`entries[2].start`).
    pub field: String,
    /// What is wrong.
    pub message: String,
}

fn err(code: &'static str, field: impl Into<String>, message: impl Into<String>) -> PlanError {
    PlanError { code, field: field.into(), message: message.into() }
}

/// One entry: on `days` (bit 0 Monday .. bit 6 Sunday) from `start` to
/// `end` (minutes after local midnight; `end` 1440 is midnight after), the
/// export limit is `limit_pct`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Entry {
    /// Weekdays, bit 0 Monday .. bit 6 Sunday.
    pub days: u8,
    /// Local start, minutes after midnight.
    pub start: u16,
    /// Local end, minutes after midnight (1440: the midnight after).
    pub end: u16,
    /// The export limit, %.
    pub limit_pct: u8,
}

/// A schedule as the operator wrote it, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Definition {
    /// IANA zone name.
    pub timezone: String,
    /// The limit between entries, %.
    pub default_pct: u8,
    /// The entries, none overlapping another on a common day.
    pub entries: Vec<Entry>,
}

const DAYS: [&str; 7] = ["mon", "tue", "wed", "thu", "fri", "sat", "sun"];

const FULL: [&str; 7] =
    ["monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday"];

fn day_index(s: &str) -> Option<u8> {
    let s = s.to_ascii_lowercase();
    (0..7).find(|&i| s == DAYS[i] || s == FULL[i]).map(|i| i as u8)
}

/// `mon-fri`, `sat,sun`, `daily`, `weekdays`, `weekends`, `tue,thu-sat`.
fn parse_days(s: &str, field: &str) -> Result<u8, PlanError> {
    let bad = || {
        err(
            "schedule_days_invalid",
            field,
            format!(
                "{s:?} is not a set of days: use mon..sun, ranges (mon-fri), lists (sat,sun), daily, weekdays or weekends"
            ),
        )
    };
    let mut mask = 0u8;
    for part in s.split(',').map(str::trim) {
        mask |= match part.to_ascii_lowercase().as_str() {
            "daily" | "every day" => 0x7F,
            "weekdays" => 0x1F,
            "weekends" => 0x60,
            p => match p.split_once('-') {
                Some((a, b)) => {
                    let (a, b) = (
                        day_index(a.trim()).ok_or_else(bad)?,
                        day_index(b.trim()).ok_or_else(bad)?,
                    );
                    if a > b {
                        return Err(bad());
                    }
                    (a..=b).fold(0, |m, d| m | 1 << d)
                }
                None => 1 << day_index(p).ok_or_else(bad)?,
            },
        };
    }
    if mask == 0 { Err(bad()) } else { Ok(mask) }
}

/// `HH:MM`, 00:00..=24:00.
fn parse_time(s: &str, field: &str) -> Result<u16, PlanError> {
    let bad = || {
        err(
            "schedule_time_invalid",
            field,
            format!("{s:?} is not a time of day HH:MM (00:00..24:00)"),
        )
    };
    let (h, m) = s.trim().split_once(':').ok_or_else(bad)?;
    let (h, m): (u16, u16) = (h.parse().map_err(|_| bad())?, m.parse().map_err(|_| bad())?);
    if m >= 60 || h > 24 || (h == 24 && m != 0) || s.trim().len() != 5 {
        return Err(bad());
    }
    Ok(h * 60 + m)
}

fn parse_limit(v: &Value, field: &str) -> Result<u8, PlanError> {
    let bad = || err("schedule_limit_invalid", field, "a whole percentage of rated power 0..=100");
    let n = match v {
        Value::Number(n) => n.as_i64(),
        Value::String(s) => s.trim().trim_end_matches('%').trim().parse().ok(),
        _ => None,
    };
    n.filter(|n| (0..=100).contains(n)).map(|n| n as u8).ok_or_else(bad)
}

fn fmt_time(min: u16) -> String {
    format!("{:02}:{:02}", min / 60, min % 60)
}

/// Days as text: `mon-fri`, `sat,sun`, `daily`.
pub fn fmt_days(mask: u8) -> String {
    if mask == 0x7F {
        return "daily".into();
    }
    let mut parts = Vec::new();
    let mut d = 0;
    while d < 7 {
        if mask & 1 << d == 0 {
            d += 1;
            continue;
        }
        let start = d;
        while d < 7 && mask & 1 << d != 0 {
            d += 1;
        }
        parts.push(match d - start {
            1 => DAYS[start].to_string(),
            2 => format!("{},{}", DAYS[start], DAYS[start + 1]),
            _ => format!("{}-{}", DAYS[start], DAYS[d - 1]),
        });
    }
    parts.join(",")
}

impl Entry {
    /// `mon-fri 11:00-14:00 0%`.
    pub fn parse_text(s: &str, field: &str) -> Result<Entry, PlanError> {
        let words: Vec<&str> = s.split_whitespace().collect();
        let [days, span, limit] = words[..] else {
            return Err(err(
                "schedule_invalid",
                field,
                format!("{s:?}: an entry is DAYS START-END LIMIT, e.g. \"mon-fri 11:00-14:00 0%\""),
            ));
        };
        let (start, end) = span.split_once('-').ok_or_else(|| {
            err("schedule_time_invalid", field, format!("{span:?} is not START-END (11:00-14:00)"))
        })?;
        Entry::new(
            parse_days(days, field)?,
            parse_time(start, field)?,
            parse_time(end, field)?,
            parse_limit(&json!(limit), field)?,
            field,
        )
    }

    fn new(days: u8, start: u16, end: u16, limit_pct: u8, field: &str) -> Result<Entry, PlanError> {
        if start >= end {
            return Err(err(
                "schedule_time_invalid",
                field,
                format!(
                    "it starts at {} and ends at {}: an entry ends after it starts on the same day (split one across midnight in two, ending at 24:00)",
                    fmt_time(start),
                    fmt_time(end)
                ),
            ));
        }
        Ok(Entry { days, start, end, limit_pct })
    }

    fn parse(v: &Value, field: &str) -> Result<Entry, PlanError> {
        if let Value::String(s) = v {
            return Entry::parse_text(s, field);
        }
        let Value::Object(o) = v else {
            return Err(err("schedule_invalid", field, "an entry is an object or a text"));
        };
        if let Some(k) =
            o.keys().find(|k| !["days", "start", "end", "limit_pct"].contains(&k.as_str()))
        {
            return Err(err("schedule_invalid", format!("{field}.{k}"), "unknown field"));
        }
        let text = |k: &str| {
            o.get(k)
                .and_then(Value::as_str)
                .ok_or_else(|| err("schedule_invalid", format!("{field}.{k}"), "missing (a text)"))
        };
        Entry::new(
            parse_days(text("days")?, &format!("{field}.days"))?,
            parse_time(text("start")?, &format!("{field}.start"))?,
            parse_time(text("end")?, &format!("{field}.end"))?,
            parse_limit(o.get("limit_pct").unwrap_or(&Value::Null), &format!("{field}.limit_pct"))?,
            field,
        )
    }

    /// `mon-fri 11:00-14:00 0%`.
    pub fn text(&self) -> String {
        format!(
            "{} {}-{} {}%",
            fmt_days(self.days),
            fmt_time(self.start),
            fmt_time(self.end),
            self.limit_pct
        )
    }
}

impl Definition {
    /// Validates a schedule from the API: `{"timezone": "Europe/Berlin",
    /// "default_pct": 100, "entries": [{"days": "mon-fri", "start": "11:00",
    /// "end": "14:00", "limit_pct": 0}, "sat,sun 10:00-16:00 30%"]}`.
    pub fn parse(v: &Value) -> Result<Definition, PlanError> {
        let Value::Object(o) = v else {
            return Err(err("schedule_invalid", "schedule", "a schedule is a JSON object"));
        };
        if let Some(k) =
            o.keys().find(|k| !["timezone", "default_pct", "entries"].contains(&k.as_str()))
        {
            return Err(err("schedule_invalid", k.as_str(), "unknown field"));
        }
        let timezone = o.get("timezone").and_then(Value::as_str).ok_or_else(|| {
            err(
                "schedule_invalid",
                "timezone",
                "missing: the site's IANA time zone (Europe/Berlin)",
            )
        })?;
        if TimeZone::get(timezone).is_err() {
            return Err(err(
                "unknown_timezone",
                "timezone",
                format!(
                    "{timezone:?} is not a time zone of the IANA database (e.g. Europe/Berlin, America/New_York, UTC)"
                ),
            ));
        }
        let default_pct = match o.get("default_pct") {
            None | Some(Value::Null) => 100,
            Some(v) => parse_limit(v, "default_pct")?,
        };
        let list = match o.get("entries") {
            Some(Value::Array(a)) => a,
            _ => return Err(err("schedule_invalid", "entries", "missing: a list of entries")),
        };
        if list.len() > MAX_ENTRIES {
            return Err(err(
                "schedule_too_many_entries",
                "entries",
                format!("{} entries; a schedule holds at most {MAX_ENTRIES}", list.len()),
            ));
        }
        let entries = list
            .iter()
            .enumerate()
            .map(|(i, e)| Entry::parse(e, &format!("entries[{i}]")))
            .collect::<Result<Vec<_>, _>>()?;
        for (i, a) in entries.iter().enumerate() {
            for (j, b) in entries.iter().enumerate().skip(i + 1) {
                let common = a.days & b.days;
                if common != 0 && a.start < b.end && b.start < a.end {
                    return Err(err(
                        "schedule_overlap",
                        format!("entries[{j}]"),
                        format!(
                            "{:?} overlaps {:?} (entries[{i}]) on {}",
                            b.text(),
                            a.text(),
                            fmt_days(common)
                        ),
                    ));
                }
            }
        }
        Ok(Definition { timezone: timezone.to_string(), default_pct, entries })
    }

    /// As stored and shown (entries as text).
    pub fn json(&self) -> Value {
        json!({
            "timezone": self.timezone,
            "default_pct": self.default_pct,
            "entries": self.entries.iter().map(Entry::text).collect::<Vec<_>>(),
        })
    }

    fn zone(&self) -> TimeZone {
        TimeZone::get(&self.timezone).unwrap_or(TimeZone::UTC)
    }
}

/// The instant local `date` at `minute` happens (see the module's rules).
fn instant(tz: &TimeZone, date: Date, minute: u16) -> i64 {
    let (date, minute) = if minute >= 1440 {
        (date.tomorrow().unwrap_or(date), minute - 1440)
    } else {
        (date, minute)
    };
    let dt: DateTime = date.at((minute / 60) as i8, (minute % 60) as i8, 0, 0);
    let ambiguous = tz.to_ambiguous_timestamp(dt);
    let ms = match ambiguous.offset() {
        // In a gap: when the clocks jump, the transition before the time
        // read with the offset from before the gap.
        AmbiguousOffset::Gap { before, .. } => before
            .to_timestamp(dt)
            .ok()
            .and_then(|late| tz.preceding(late).next().map(|t| t.timestamp())),
        // Otherwise the time itself, the first one in a fold.
        _ => ambiguous.earlier().ok(),
    };
    ms.map_or(0, |t| t.as_millisecond())
}

fn weekday_bit(d: Weekday) -> u8 {
    1 << d.to_monday_zero_offset()
}

/// The plan's steps from the one in force at `now_ms` until
/// [`HORIZON_MS`] later (sooner if it would hold more than [`MAX_STEPS`]).
pub fn compile(def: &Definition, version: u64, now_ms: i64) -> Plan {
    let tz = def.zone();
    let now_ts = Timestamp::from_millisecond(now_ms).unwrap_or(Timestamp::UNIX_EPOCH);
    let today = now_ts.to_zoned_datetime(tz.clone()).date();
    let first = today.yesterday().unwrap_or(today);
    // Changes, in order: the default from the day before's midnight, each
    // entry's start, and the default again at its end.
    let mut changes: Vec<(i64, u8, u8)> = vec![(instant(&tz, first, 0), def.default_pct, NO_ENTRY)];
    let mut date = first;
    for _ in 0..17 {
        let bit = weekday_bit(date.weekday());
        let mut todays: Vec<(usize, &Entry)> =
            def.entries.iter().enumerate().filter(|(_, e)| e.days & bit != 0).collect();
        todays.sort_by_key(|(_, e)| e.start);
        for (i, e) in todays {
            let (s, t) = (instant(&tz, date, e.start), instant(&tz, date, e.end));
            if s >= t {
                continue; // wholly inside a gap
            }
            changes.push((s, e.limit_pct, i as u8));
            changes.push((t, def.default_pct, NO_ENTRY));
        }
        date = match date.tomorrow() {
            Ok(d) => d,
            Err(_) => break,
        };
    }
    changes.sort_by_key(|c| c.0);
    // A later change at the same instant wins (an entry starting as one ends).
    let mut merged: Vec<(i64, u8, u8)> = Vec::with_capacity(changes.len());
    for c in changes {
        match merged.last_mut() {
            Some(last) if last.0 == c.0 => *last = if c.2 != NO_ENTRY { c } else { *last },
            _ => merged.push(c),
        }
    }
    merged.dedup_by(|b, a| a.1 == b.1 && a.2 == b.2);
    let start = merged.iter().rposition(|c| c.0 <= now_ms).unwrap_or(0);
    let mut until = now_ms + HORIZON_MS;
    let mut steps = Vec::new();
    for &(at, value, entry) in &merged[start..] {
        if at >= until {
            break;
        }
        if steps.len() == MAX_STEPS {
            until = at;
            break;
        }
        steps.push(Step { at_ms: at as u64, value, entry });
    }
    let from = steps.first().map_or(now_ms as u64, |s| s.at_ms);
    Plan { version, from_ms: from, until_ms: until as u64, steps }
}

/// The entry in force at `now_ms` and the next changes, as shown.
pub fn describe(def: &Definition, now_ms: i64, next: usize) -> Value {
    let plan = compile(def, 1, now_ms);
    let tz = def.zone();
    let local = |ms: u64| {
        Timestamp::from_millisecond(ms as i64)
            .map(|t| t.to_zoned_datetime(tz.clone()).strftime("%Y-%m-%d %H:%M %Z").to_string())
            .unwrap_or_default()
    };
    let entry = |s: &Step| {
        json!({
            "at_ms": s.at_ms,
            "local": local(s.at_ms),
            "limit_pct": s.value,
            "entry": (s.entry != NO_ENTRY).then(|| def.entries[usize::from(s.entry)].text()),
        })
    };
    let now = plan.step_at(now_ms as u64);
    json!({
        "active": now.map(entry),
        "next": plan.steps.iter().filter(|s| s.at_ms > now_ms as u64).take(next).map(entry).collect::<Vec<_>>(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn def(tz: &str, entries: &[&str]) -> Definition {
        Definition::parse(&json!({"timezone": tz, "entries": entries})).unwrap()
    }

    fn ms(s: &str) -> i64 {
        s.parse::<Timestamp>().unwrap().as_millisecond()
    }

    fn utc(ms: u64) -> String {
        Timestamp::from_millisecond(ms as i64).unwrap().to_string()
    }

    /// The steps in a window, as (UTC time, limit).
    fn steps(d: &Definition, now: &str, days: i64) -> Vec<(String, u8)> {
        let p = compile(d, 1, ms(now));
        p.steps
            .iter()
            .filter(|s| (s.at_ms as i64) < ms(now) + days * 86_400_000)
            .map(|s| (utc(s.at_ms), s.value))
            .collect()
    }

    #[test]
    fn weekday_and_weekend_plans_become_utc_steps_in_the_sites_zone() {
        let d = def("Europe/Berlin", &["mon-fri 11:00-14:00 0%", "sat,sun 10:00-16:00 30%"]);
        // Friday 2026-12-04, 09:00 UTC (10:00 CET).
        let got = steps(&d, "2026-12-04T09:00:00Z", 3);
        assert_eq!(
            got,
            [
                ("2026-12-03T13:00:00Z".to_string(), 100), // in force: Thursday's end
                ("2026-12-04T10:00:00Z".into(), 0),
                ("2026-12-04T13:00:00Z".into(), 100),
                ("2026-12-05T09:00:00Z".into(), 30),
                ("2026-12-05T15:00:00Z".into(), 100),
                ("2026-12-06T09:00:00Z".into(), 30),
                ("2026-12-06T15:00:00Z".into(), 100),
            ]
        );
        let p = compile(&d, 7, ms("2026-12-04T09:00:00Z"));
        assert_eq!(p.version, 7);
        assert_eq!(p.from_ms, p.steps[0].at_ms);
        assert_eq!(p.until_ms as i64, ms("2026-12-04T09:00:00Z") + HORIZON_MS);
        assert_eq!(p.steps.len(), 1 + 10 * 2 + 4 * 2, "14 days: 10 weekdays, 4 weekend days");
        let shown = describe(&d, ms("2026-12-04T10:30:00Z"), 2);
        assert_eq!(shown["active"]["entry"], "mon-fri 11:00-14:00 0%");
        assert_eq!(shown["active"]["local"], "2026-12-04 11:00 CET");
        assert_eq!(shown["next"][0]["limit_pct"], 100);
        assert_eq!(shown["next"][1]["entry"], "sat,sun 10:00-16:00 30%");
    }

    #[test]
    fn daylight_saving_moves_the_utc_steps_and_gaps_and_folds_have_rules() {
        // Berlin: 2026-03-29 02:00 CET -> 03:00 CEST; 2026-10-25 03:00 CEST -> 02:00 CET.
        let d = def("Europe/Berlin", &["daily 11:00-14:00 0%"]);
        let got = steps(&d, "2026-03-28T00:00:00Z", 2);
        assert_eq!(got[1], ("2026-03-28T10:00:00Z".to_string(), 0), "CET: UTC+1");
        assert_eq!(got[3], ("2026-03-29T09:00:00Z".to_string(), 0), "CEST: UTC+2");
        let got = steps(&d, "2026-10-24T00:00:00Z", 2);
        assert_eq!(got[1], ("2026-10-24T09:00:00Z".to_string(), 0));
        assert_eq!(got[3], ("2026-10-25T10:00:00Z".to_string(), 0));

        // In the spring gap: 02:30 happens at 03:00 CEST (01:00 UTC); an
        // entry wholly inside the gap does not run that night.
        let gap = def("Europe/Berlin", &["daily 02:30-04:00 10%", "daily 02:05-02:25 20%"]);
        let got = steps(&gap, "2026-03-28T12:00:00Z", 1);
        assert_eq!(
            got[1..],
            [("2026-03-29T01:00:00Z".to_string(), 10), ("2026-03-29T02:00:00Z".into(), 100)]
        );
        // In the autumn fold: 02:30 is the first 02:30 (CEST, 00:30 UTC), so
        // 01:30-02:30 lasts an hour and 02:30-03:30 two.
        let fold = def("Europe/Berlin", &["daily 01:30-02:30 10%", "daily 02:30-03:30 20%"]);
        let got = steps(&fold, "2026-10-24T12:00:00Z", 1);
        assert_eq!(
            got[1..],
            [
                ("2026-10-24T23:30:00Z".to_string(), 10),
                ("2026-10-25T00:30:00Z".into(), 20),
                ("2026-10-25T02:30:00Z".into(), 100),
            ]
        );
        // New York changes on other dates (2026-03-08).
        let ny = def("America/New_York", &["daily 12:00-13:00 0%"]);
        let got = steps(&ny, "2026-03-07T00:00:00Z", 2);
        assert_eq!(got[1].0, "2026-03-07T17:00:00Z");
        assert_eq!(got[3].0, "2026-03-08T16:00:00Z");
    }

    #[test]
    fn entries_that_touch_make_one_change_and_midnight_ends_a_day() {
        let d = def("UTC", &["daily 00:00-06:00 50%", "daily 06:00-24:00 20%"]);
        let got = steps(&d, "2026-06-01T03:00:00Z", 2);
        assert_eq!(
            got,
            [
                ("2026-06-01T00:00:00Z".to_string(), 50),
                ("2026-06-01T06:00:00Z".into(), 20),
                ("2026-06-02T00:00:00Z".into(), 50),
                ("2026-06-02T06:00:00Z".into(), 20),
                ("2026-06-03T00:00:00Z".into(), 50),
            ]
        );
        // With no entry, one step: the default, for the whole horizon.
        let p = compile(&def("UTC", &[]), 1, ms("2026-06-01T03:00:00Z"));
        assert_eq!(p.steps.len(), 1);
        assert_eq!(p.steps[0].value, 100);
    }

    #[test]
    fn a_dense_plan_is_cut_to_the_steps_a_device_holds() {
        let entries: Vec<String> = (0..32)
            .map(|h| {
                format!(
                    "daily {:02}:{:02}-{:02}:{:02} {}%",
                    h / 2 + 1,
                    (h % 2) * 30,
                    h / 2 + 1,
                    (h % 2) * 30 + 15,
                    h
                )
            })
            .collect();
        let refs: Vec<&str> = entries.iter().map(String::as_str).collect();
        let p = compile(&def("UTC", &refs), 1, ms("2026-06-01T00:00:00Z"));
        assert_eq!(p.steps.len(), MAX_STEPS);
        assert!((p.until_ms as i64) < ms("2026-06-01T00:00:00Z") + HORIZON_MS);
        assert!(p.steps.last().unwrap().at_ms < p.until_ms);
    }

    #[test]
    fn bad_schedules_are_refused_with_their_code_and_field() {
        let cases = [
            (json!({"timezone": "Mars/Olympus", "entries": []}), "unknown_timezone", "timezone"),
            (
                json!({"timezone": "UTC", "entries": ["mon-fri 14:00-11:00 0%"]}),
                "schedule_time_invalid",
                "entries[0]",
            ),
            (
                json!({"timezone": "UTC", "entries": ["mon-fri 25:00-26:00 0%"]}),
                "schedule_time_invalid",
                "entries[0]",
            ),
            (
                json!({"timezone": "UTC", "entries": ["mon-fri 11:00-14:00 101%"]}),
                "schedule_limit_invalid",
                "entries[0]",
            ),
            (
                json!({"timezone": "UTC", "entries": ["fri-mon 11:00-14:00 0%"]}),
                "schedule_days_invalid",
                "entries[0]",
            ),
            (
                json!({"timezone": "UTC", "entries": ["someday 11:00-14:00 0%"]}),
                "schedule_days_invalid",
                "entries[0]",
            ),
            (
                json!({"timezone": "UTC", "entries": ["mon-fri 11:00-14:00"]}),
                "schedule_invalid",
                "entries[0]",
            ),
            (
                json!({"timezone": "UTC", "entries": ["mon-fri 11:00-14:00 0%", "fri,sat 13:00-15:00 50%"]}),
                "schedule_overlap",
                "entries[1]",
            ),
            (
                json!({"timezone": "UTC", "entries": [{"days": "mon", "start": "1:00", "end": "02:00", "limit_pct": 5}]}),
                "schedule_time_invalid",
                "entries[0].start",
            ),
            (
                json!({"timezone": "UTC", "entries": [{"days": "mon", "start": "01:00", "end": "02:00", "limit_pct": 5, "x": 1}]}),
                "schedule_invalid",
                "entries[0].x",
            ),
            (
                json!({"timezone": "UTC", "default_pct": -1, "entries": []}),
                "schedule_limit_invalid",
                "default_pct",
            ),
            (json!({"entries": []}), "schedule_invalid", "timezone"),
            (
                json!({"timezone": "UTC", "entries": vec!["daily 00:00-00:01 1%"; 33]}),
                "schedule_too_many_entries",
                "entries",
            ),
        ];
        for (v, code, field) in cases {
            let e = Definition::parse(&v).unwrap_err();
            assert_eq!((e.code, e.field.as_str()), (code, field), "{v}: {}", e.message);
        }
        let e = Definition::parse(&json!({"timezone": "UTC", "entries": ["mon-fri 11:00-14:00 0%", "fri,sat 13:00-15:00 50%"]})).unwrap_err();
        assert!(e.message.contains("on fri"), "{}", e.message);
        // Touching entries and the same times on other days are fine.
        def("UTC", &["mon-fri 11:00-14:00 0%", "mon-fri 14:00-15:00 50%", "sat 11:00-14:00 0%"]);
        let d = def("UTC", &["weekdays 09:00-10:00 5%", "tue,thu-sat 12:00-24:00 5%"]);
        assert_eq!(
            d.json()["entries"],
            json!(["mon-fri 09:00-10:00 5%", "tue,thu-sat 12:00-24:00 5%"])
        );
        assert_eq!(Definition::parse(&d.json()).unwrap(), d, "the stored form parses back");
    }
}
