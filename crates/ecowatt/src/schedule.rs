//! `ecowatt schedule`: a device's (or a group's) time-of-day plan of export
//! limits in the site's time zone, run by the device offline; show it with
//! the entry in force, clear it, or send a device back to it.

use std::path::PathBuf;

use clap::{Args, Subcommand};
use serde_json::{Value, json};

use crate::client::{Api, ServerConn, segment, when};

/// Schedules.
#[derive(Subcommand, Debug)]
pub enum ScheduleCommand {
    /// Set the schedule of a device or a group, e.g. `ecowatt schedule set roof-1
    /// --tz Europe/Berlin --entry "mon-fri 11:00-14:00 0%" --entry "sat,sun 10:00-16:00 30%"`.
    Set(SetArgs),
    /// Show a device's schedule: its entries, the one in force and the next
    /// changes in the site's time, and what the device runs.
    Show {
        /// Device name.
        device: String,
    },
    /// Clear the schedule of a device or a group.
    Clear(Target),
    /// Send a device back to its schedule now: ends a command's limit or a
    /// lease (the device writes the schedule's limit in force).
    Resume {
        /// Device name.
        device: String,
    },
}

/// A device, or a group with `--group`.
#[derive(Args, Debug)]
pub struct Target {
    /// Device name.
    #[arg(required_unless_present = "group", conflicts_with = "group")]
    device: Option<String>,
    /// Every enabled device tagged with this group.
    #[arg(long)]
    group: Option<String>,
}

impl Target {
    fn path(&self) -> String {
        match (&self.device, &self.group) {
            (_, Some(g)) => format!("/api/v1/groups/{}/schedule", segment(g)),
            (Some(d), None) => format!("/api/v1/devices/{}/schedule", segment(d)),
            (None, None) => unreachable!("clap requires one"),
        }
    }
}

/// The schedule, from flags or a JSON file.
#[derive(Args, Debug)]
pub struct SetArgs {
    #[command(flatten)]
    target: Target,
    /// The site's IANA time zone (Europe/Berlin, America/New_York, UTC).
    #[arg(long, required_unless_present = "file")]
    tz: Option<String>,
    /// An entry: DAYS START-END LIMIT, e.g. "mon-fri 11:00-14:00 0%" (days:
    /// mon..sun, ranges, lists, daily, weekdays, weekends; END up to 24:00).
    #[arg(long = "entry")]
    entries: Vec<String>,
    /// The limit between entries [default: 100%].
    #[arg(long = "default")]
    default_pct: Option<String>,
    /// The schedule as JSON ({"timezone", "default_pct", "entries"}) instead of flags.
    #[arg(long, conflicts_with_all = ["tz", "entries", "default_pct"])]
    file: Option<PathBuf>,
}

fn print_schedule(v: &Value) {
    let name = v["device"].as_str().unwrap_or("?");
    let Some(s) = v["schedule"].as_object() else {
        outln!("{name}: no schedule (version {})", v["version"]);
        return print_reported(v);
    };
    outln!(
        "{name}: schedule version {} ({}, {}% between entries), set by {} at {}",
        v["version"],
        s["timezone"].as_str().unwrap_or("?"),
        s["default_pct"],
        v["set_by"].as_str().unwrap_or("?"),
        when(&v["set_ms"]),
    );
    for e in s["entries"].as_array().into_iter().flatten() {
        outln!("  {}", e.as_str().unwrap_or("?"));
    }
    let step = |x: &Value| {
        format!(
            "{} {}% ({})",
            x["local"].as_str().unwrap_or("?"),
            x["limit_pct"],
            x["entry"].as_str().unwrap_or("between entries")
        )
    };
    if !v["active"].is_null() {
        outln!("active since {}", step(&v["active"]));
    }
    for x in v["next"].as_array().into_iter().flatten() {
        outln!("  next {}", step(x));
    }
    print_reported(v);
}

fn print_reported(v: &Value) {
    let r = &v["reported"];
    if r.is_null() {
        outln!(
            "device: has not reported a schedule (firmware without schedules, or not heard yet)"
        );
        return;
    }
    let last = &r["last_step"];
    outln!(
        "device: runs version {}{}, limit from: {}{}{}",
        r["version"],
        if v["in_sync"] == true { "" } else { " (the new version is on its way)" },
        r["state"].as_str().unwrap_or("?"),
        r["limit_pct"].as_i64().map(|p| format!(", schedule says {p}%")).unwrap_or_default(),
        if last.is_null() {
            String::new()
        } else {
            format!(
                "; last step {} at {}",
                if last["confirmed"] == true { "confirmed" } else { "FAILED" },
                when(&last["at_ms"])
            )
        },
    );
}

pub fn run(conn: &ServerConn, cmd: ScheduleCommand) -> anyhow::Result<()> {
    let api: Api = conn.connect()?;
    match cmd {
        ScheduleCommand::Show { device } => {
            let v =
                api.call("GET", &format!("/api/v1/devices/{}/schedule", segment(&device)), None)?;
            print_schedule(&v);
        }
        ScheduleCommand::Set(a) => {
            let body = match &a.file {
                Some(f) => serde_json::from_slice(&std::fs::read(f)?)
                    .map_err(|e| anyhow::anyhow!("{}: not JSON: {e}", f.display()))?,
                None => json!({
                    "timezone": a.tz,
                    "default_pct": a.default_pct.as_deref().map(|p| p.trim_end_matches('%').to_owned()),
                    "entries": a.entries,
                }),
            };
            let v = api.call("PUT", &a.target.path(), Some(&body))?;
            match &a.target.group {
                Some(g) => outln!("schedule set on {} device(s) of {g}", v["devices"]),
                None => print_schedule(&v),
            }
        }
        ScheduleCommand::Clear(t) => {
            let v = api.call("DELETE", &t.path(), None)?;
            match &t.group {
                Some(g) => outln!("schedule cleared on {} device(s) of {g}", v["devices"]),
                None => print_schedule(&v),
            }
        }
        ScheduleCommand::Resume { device } => {
            let path = format!("/api/v1/devices/{}/schedule/resume", segment(&device));
            let c = api.call("POST", &path, None)?;
            outln!(
                "command {} queued: {device} returns to its schedule (`ecowatt commands show {}`)",
                c["id"],
                c["id"]
            );
        }
    }
    Ok(())
}
