//! Grid-safe export control: the installer's fail-safe limit, leased
//! limits as devices report them, the episodes they report (a lease lapsed
//! into the fail-safe, or came back), device tags, and curtailments of a
//! group with their progress. The rules are plain functions here; [`store`]
//! holds the SQL.

pub mod plan;
pub mod schedules;
pub mod store;

use ecowatt_proto::messages::{
    ControlReport, EpisodeKind, EpisodeOutcome, ScheduleReport, failsafe,
};
use serde::Serialize;
use serde_json::{Value, json};

pub use store::Control;

use crate::domain::Invalid;

/// The installer's fail-safe limit, as stored (`devices.failsafe`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailSafe {
    /// The export limit in force stays when a lease lapses.
    Hold,
    /// This export limit, % of rated power.
    Percent(u16),
}

impl FailSafe {
    /// From the stored column (`-1`: hold).
    pub fn from_column(v: Option<i64>) -> Option<FailSafe> {
        match v? {
            -1 => Some(FailSafe::Hold),
            p => u16::try_from(p).ok().filter(|p| *p <= 100).map(FailSafe::Percent),
        }
    }

    /// As stored.
    pub fn column(self) -> i64 {
        match self {
            FailSafe::Hold => -1,
            FailSafe::Percent(p) => i64::from(p),
        }
    }

    /// On the wire (`None`: unset).
    pub fn wire(f: Option<FailSafe>) -> u16 {
        match f {
            None => failsafe::UNSET,
            Some(FailSafe::Hold) => failsafe::HOLD,
            Some(FailSafe::Percent(p)) => p,
        }
    }

    /// From the wire.
    pub fn from_wire(v: u16) -> Option<FailSafe> {
        match v {
            failsafe::HOLD => Some(FailSafe::Hold),
            p if p <= 100 => Some(FailSafe::Percent(p)),
            _ => None,
        }
    }

    /// As the API shows it: `"hold"`, a number, or `null`.
    pub fn json(f: Option<FailSafe>) -> Value {
        match f {
            None => Value::Null,
            Some(FailSafe::Hold) => json!("hold"),
            Some(FailSafe::Percent(p)) => json!(p),
        }
    }

    /// From the API: `"hold"`, a whole percentage 0..=100 (or `"40%"`), or `null` to unset.
    pub fn parse(v: &Value) -> Result<Option<FailSafe>, Invalid> {
        let bad = || {
            Invalid::new(
                "failsafe",
                "a percentage of rated power 0..=100, \"hold\" (no change), or null (unset)",
            )
        };
        match v {
            Value::Null => Ok(None),
            Value::String(s) if s == "hold" => Ok(Some(FailSafe::Hold)),
            Value::String(s) => {
                let p: i64 = s.trim_end_matches('%').trim().parse().map_err(|_| bad())?;
                Self::parse(&json!(p))
            }
            Value::Number(n) => match n.as_i64() {
                Some(p) if (0..=100).contains(&p) => Ok(Some(FailSafe::Percent(p as u16))),
                _ => Err(bad()),
            },
            _ => Err(bad()),
        }
    }
}

/// A device's report of its control, as stored (`devices.control_reported`,
/// JSON text) and shown.
pub fn reported_json(c: &ControlReport, s: Option<&ScheduleReport>) -> String {
    let mut v = json!({
        "failsafe": FailSafe::json(FailSafe::from_wire(c.failsafe)),
        "lease": c.lease.map(|l| json!({
            "command_id": l.command_id,
            "limit_pct": l.value,
            "lapsed": l.lapsed,
        })),
        "ramp": c.ramp.map(|r| json!({
            "command_id": r.command_id,
            "limit_pct": r.value,
            "target_pct": r.target,
        })),
    });
    if let Some(s) = s {
        v["schedule"] = schedules::reported(s);
    }
    v.to_string()
}

/// The fail-safe to send a device that reported `reported` (its wire value),
/// when the installer's differs.
pub fn failsafe_to_send(desired: Option<FailSafe>, reported: u16) -> Option<u16> {
    let want = FailSafe::wire(desired);
    (want != reported).then_some(want)
}

/// An episode's kind as stored and shown.
pub fn kind_name(k: EpisodeKind) -> &'static str {
    match k {
        EpisodeKind::FailSafe => "failsafe",
        EpisodeKind::Resumed => "resumed",
    }
}

/// An episode's outcome as stored and shown.
pub fn outcome_name(o: EpisodeOutcome) -> &'static str {
    match o {
        EpisodeOutcome::Confirmed => "confirmed",
        EpisodeOutcome::Failed => "failed",
        EpisodeOutcome::Held => "held",
    }
}

/// One episode a device reported.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct EpisodeRecord {
    /// `failsafe` or `resumed`.
    pub kind: String,
    /// The lease's command.
    pub command_id: i64,
    /// When it happened on the device, Unix ms.
    pub at_ms: i64,
    /// The limit meant, %.
    pub limit_pct: i64,
    /// `confirmed` (read back), `failed`, or `held` (fail-safe "no change").
    pub outcome: String,
    /// When the server heard of it.
    pub received_ms: i64,
}

/// A curtailment's devices by where their limit stands.
#[derive(Debug, Clone, Default, PartialEq, Serialize, utoipa::ToSchema)]
pub struct Progress {
    /// Devices in it.
    pub devices: i64,
    /// Confirmed by read-back.
    pub confirmed: i64,
    /// Waiting for an online device.
    pub pending: i64,
    /// Waiting for a device not heard from recently.
    pub offline: i64,
    /// Failed, expired or cancelled.
    pub failed: i64,
    /// Time from the request to a confirmation, ms: median and 99th percentile.
    pub confirm_p50_ms: Option<i64>,
    /// 99th percentile.
    pub confirm_p99_ms: Option<i64>,
    /// The last confirmation.
    pub confirm_max_ms: Option<i64>,
    /// Every device has an outcome (confirmed or failed).
    pub settled: bool,
}

/// A device is offline when not heard from for this long.
pub const OFFLINE_AFTER_MS: i64 = 90_000;

/// Where one device's part of a curtailment stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Part {
    /// Confirmed by read-back, this long after the request.
    Confirmed(i64),
    /// No outcome yet, the device online.
    Pending,
    /// No outcome yet, the device offline.
    Offline,
    /// Failed (or expired, cancelled).
    Failed,
}

/// A device's part from its command's status, its completion time, and when
/// the device was last seen (`now` is the server's clock).
pub fn part(
    status: crate::commands::CommandStatus,
    created_ms: i64,
    completed_ms: Option<i64>,
    last_seen_ms: Option<i64>,
    now: i64,
) -> Part {
    use crate::commands::CommandStatus as S;
    match status {
        S::Succeeded | S::Confirmed => {
            Part::Confirmed(completed_ms.map_or(0, |c| (c - created_ms).max(0)))
        }
        S::Failed | S::Expired | S::Cancelled => Part::Failed,
        S::Queued | S::Delivered => {
            if last_seen_ms.is_some_and(|s| now - s <= OFFLINE_AFTER_MS) {
                Part::Pending
            } else {
                Part::Offline
            }
        }
    }
}

/// The progress of parts.
pub fn progress(parts: &[Part]) -> Progress {
    let mut p = Progress { devices: parts.len() as i64, ..Progress::default() };
    let mut times = Vec::new();
    for part in parts {
        match part {
            Part::Confirmed(t) => {
                p.confirmed += 1;
                times.push(*t);
            }
            Part::Pending => p.pending += 1,
            Part::Offline => p.offline += 1,
            Part::Failed => p.failed += 1,
        }
    }
    times.sort_unstable();
    let at = |q: f64| rank(times.len(), q).and_then(|i| times.get(i)).copied();
    p.confirm_p50_ms = at(0.50);
    p.confirm_p99_ms = at(0.99);
    p.confirm_max_ms = times.last().copied();
    p.settled = p.pending == 0 && p.offline == 0;
    p
}

/// The index of the `q` quantile among `n` sorted values (`None` when none).
pub fn rank(n: usize, q: f64) -> Option<usize> {
    (n > 0).then(|| ((n as f64 * q).ceil() as usize).saturating_sub(1))
}

/// The progress of parts counted (`(part, how many)`; a confirmed part's
/// time is not used): the counts, not yet the confirmation times.
pub fn counted(parts: &[(Part, i64)]) -> Progress {
    let mut p = Progress::default();
    for (part, n) in parts {
        p.devices += n;
        match part {
            Part::Confirmed(_) => p.confirmed += n,
            Part::Pending => p.pending += n,
            Part::Offline => p.offline += n,
            Part::Failed => p.failed += n,
        }
    }
    p.settled = p.pending == 0 && p.offline == 0;
    p
}

/// Validates a tag: 1..=64 of letters, digits, `-`, `_`, `.`, `:`.
pub fn check_tag(tag: &str) -> Result<(), Invalid> {
    let ok = !tag.is_empty()
        && tag.len() <= 64
        && tag.chars().all(|c| c.is_ascii_alphanumeric() || "-_.:".contains(c));
    if ok {
        Ok(())
    } else {
        Err(Invalid::new("tags", format!("{tag:?}: 1..=64 of letters, digits, - _ . :")))
    }
}

/// A curtailment's percentage, checked.
pub fn check_percent(p: i64) -> Result<u16, Invalid> {
    if (0..=100).contains(&p) {
        Ok(p as u16)
    } else {
        Err(Invalid::new("percent", format!("{p} is outside 0..=100")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::commands::CommandStatus as S;

    #[test]
    fn failsafe_reads_and_writes_every_form() {
        assert_eq!(FailSafe::parse(&json!("hold")), Ok(Some(FailSafe::Hold)));
        assert_eq!(FailSafe::parse(&json!(40)), Ok(Some(FailSafe::Percent(40))));
        assert_eq!(FailSafe::parse(&json!("40%")), Ok(Some(FailSafe::Percent(40))));
        assert_eq!(FailSafe::parse(&Value::Null), Ok(None));
        for bad in [json!(101), json!(-1), json!("x"), json!(true), json!(4.5)] {
            assert!(FailSafe::parse(&bad).is_err(), "{bad}");
        }
        for f in
            [None, Some(FailSafe::Hold), Some(FailSafe::Percent(0)), Some(FailSafe::Percent(100))]
        {
            assert_eq!(FailSafe::from_column(f.map(FailSafe::column)), f);
            if f.is_some() {
                assert_eq!(FailSafe::from_wire(FailSafe::wire(f)), f);
            }
        }
        assert_eq!(failsafe_to_send(Some(FailSafe::Percent(40)), 40), None);
        assert_eq!(failsafe_to_send(Some(FailSafe::Hold), failsafe::UNSET), Some(failsafe::HOLD));
        assert_eq!(failsafe_to_send(None, 40), Some(failsafe::UNSET));
    }

    #[test]
    fn progress_counts_parts_and_takes_percentiles() {
        let now = 1_000_000;
        let seen = Some(now - 1_000);
        assert_eq!(part(S::Succeeded, 0, Some(700), seen, now), Part::Confirmed(700));
        assert_eq!(part(S::Confirmed, 0, Some(900), None, now), Part::Confirmed(900));
        assert_eq!(part(S::Delivered, 0, None, seen, now), Part::Pending);
        assert_eq!(part(S::Queued, 0, None, Some(now - OFFLINE_AFTER_MS - 1), now), Part::Offline);
        assert_eq!(part(S::Queued, 0, None, None, now), Part::Offline);
        for s in [S::Failed, S::Expired, S::Cancelled] {
            assert_eq!(part(s, 0, Some(1), seen, now), Part::Failed);
        }
        let mut parts: Vec<Part> = (1..=100).map(Part::Confirmed).collect();
        parts.push(Part::Failed);
        let p = progress(&parts);
        assert_eq!((p.devices, p.confirmed, p.failed), (101, 100, 1));
        assert_eq!((p.confirm_p50_ms, p.confirm_p99_ms, p.settled), (Some(50), Some(99), true));
        assert_eq!(p.confirm_max_ms, Some(100));
        let p = progress(&[Part::Pending, Part::Confirmed(5)]);
        assert!(!p.settled);
        assert_eq!(progress(&[]).confirm_p50_ms, None);
        // Counted (as the store does, the times taken apart): the same counts.
        let c = counted(&[(Part::Confirmed(0), 100), (Part::Failed, 1)]);
        assert_eq!((c.devices, c.confirmed, c.failed, c.settled), (101, 100, 1, true));
        assert!(!counted(&[(Part::Offline, 1)]).settled);
        assert_eq!(
            (rank(100, 0.5), rank(100, 0.99), rank(1, 0.99), rank(0, 0.5)),
            (Some(49), Some(98), Some(0), None)
        );
    }

    #[test]
    fn tags_and_percentages_are_checked() {
        assert!(check_tag("feeder-7").is_ok());
        assert!(check_tag("site:north.1_a").is_ok());
        for bad in ["", "a b", "ä", &"x".repeat(65)] {
            assert!(check_tag(bad).is_err(), "{bad:?}");
        }
        assert_eq!(check_percent(30), Ok(30));
        assert!(check_percent(101).is_err() && check_percent(-1).is_err());
    }
}
