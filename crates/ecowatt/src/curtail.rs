//! `ecowatt curtail`: hold a group's export limit (devices tagged with it)
//! under a lease, follow how many devices confirmed it by read-back, and
//! release it.

use std::time::{Duration, Instant};

use clap::{Args, Subcommand};
use serde_json::{Value, json};

use crate::client::{Api, ServerConn, when};
use crate::units::parse_duration;

/// Curtail a group, or manage curtailments.
#[derive(Args, Debug)]
#[command(args_conflicts_with_subcommands = true)]
pub struct CurtailArgs {
    #[command(subcommand)]
    cmd: Option<CurtailCommand>,
    /// The group: devices tagged with it (`ecowatt device tag NAME TAG`).
    #[arg(long)]
    group: Option<String>,
    /// The export limit, percent of rated power, e.g. 30%.
    #[arg(value_parser = parse_percent)]
    percent: Option<i64>,
    /// The lease (1m..=7d): a device that hears nothing from the server for
    /// this long applies its fail-safe limit.
    #[arg(long, default_value = "15m", value_parser = parse_duration)]
    lease: Duration,
    /// Reach the limit at this rate, % of rated power per second [default: each device's ramp].
    #[arg(long)]
    ramp: Option<f64>,
    #[command(flatten)]
    follow: Follow,
}

#[derive(Args, Debug)]
pub struct Follow {
    /// Follow until every device confirmed or failed (exits non-zero if any failed).
    #[arg(long)]
    wait: bool,
    /// How long --wait follows.
    #[arg(long, default_value = "60s", value_parser = parse_duration)]
    wait_timeout: Duration,
}

/// Curtailments.
#[derive(Subcommand, Debug)]
pub enum CurtailCommand {
    /// Release a curtailment: its devices go back to their schedule's limit
    /// (`ecowatt schedule`), or to 100 % without one; no lease.
    Release {
        /// Curtailment id.
        id: i64,
        #[command(flatten)]
        follow: Follow,
    },
    /// Show a curtailment's progress and its failures.
    Show {
        /// Curtailment id.
        id: i64,
    },
    /// List curtailments, newest first.
    List,
}

fn parse_percent(s: &str) -> Result<i64, String> {
    s.trim_end_matches('%')
        .parse::<i64>()
        .map_err(|_| format!("{s:?} is not a percentage such as 30%"))
}

fn line(c: &Value) -> String {
    let p = &c["progress"];
    let ms = |v: &Value| v.as_i64().map_or("-".to_owned(), |m| format!("{m} ms"));
    format!(
        "{} {} {}: {}% of {}{} — {} devices: {} confirmed, {} pending, {} offline, {} failed; confirm p50 {} p99 {}",
        if c["releases"].is_null() { "curtailment" } else { "release" },
        c["id"],
        when(&c["created_ms"]),
        c["percent"],
        c["group"].as_str().unwrap_or("?"),
        c["lease_ms"].as_i64().map(|l| format!(", lease {} s", l / 1000)).unwrap_or_default(),
        p["devices"],
        p["confirmed"],
        p["pending"],
        p["offline"],
        p["failed"],
        ms(&p["confirm_p50_ms"]),
        ms(&p["confirm_p99_ms"]),
    )
}

fn failures(c: &Value) {
    for f in c["failures"].as_array().into_iter().flatten() {
        outln!(
            "  {} {}: {}",
            f["device"].as_str().unwrap_or("?"),
            f["status"].as_str().unwrap_or("?"),
            f["reason"].as_str().unwrap_or("")
        );
    }
}

/// Prints progress as it changes until settled or `timeout`.
fn follow(api: &Api, c: Value, f: &Follow) -> anyhow::Result<()> {
    let id = c["id"].as_i64().unwrap_or_default();
    let start = Instant::now();
    let mut last = line(&c);
    outln!("{last}");
    let mut c = c;
    if f.wait {
        while c["progress"]["settled"] != true && start.elapsed() < f.wait_timeout {
            std::thread::sleep(Duration::from_millis(100));
            c = api.call("GET", &format!("/api/v1/curtailments/{id}"), None)?;
            let now = line(&c);
            if now != last {
                outln!("{now}");
                last = now;
            }
        }
    }
    failures(&c);
    let p = &c["progress"];
    if f.wait && p["failed"].as_i64().unwrap_or(0) > 0 {
        anyhow::bail!("{} device(s) failed", p["failed"]);
    }
    if f.wait && p["settled"] != true {
        anyhow::bail!(
            "not settled after {:?}: {} pending, {} offline",
            f.wait_timeout,
            p["pending"],
            p["offline"]
        );
    }
    Ok(())
}

pub fn run(conn: &ServerConn, args: CurtailArgs) -> anyhow::Result<()> {
    let api = conn.connect()?;
    match args.cmd {
        Some(CurtailCommand::Release { id, follow: f }) => {
            let c = api.call("POST", &format!("/api/v1/curtailments/{id}/release"), None)?;
            follow(&api, c, &f)
        }
        Some(CurtailCommand::Show { id }) => {
            let c = api.call("GET", &format!("/api/v1/curtailments/{id}"), None)?;
            outln!("{}", line(&c));
            failures(&c);
            Ok(())
        }
        Some(CurtailCommand::List) => {
            let v = api.call("GET", "/api/v1/curtailments", None)?;
            for c in v["curtailments"].as_array().into_iter().flatten() {
                outln!("{}", line(c));
            }
            Ok(())
        }
        None => {
            let (Some(group), Some(percent)) = (args.group, args.percent) else {
                anyhow::bail!(
                    "give a group and a limit: ecowatt curtail --group feeder-7 30% --lease 15m --wait"
                );
            };
            let body = json!({"group": group, "percent": percent,
                              "lease_s": args.lease.as_secs() as i64,
                              "ramp_pct_per_s": args.ramp});
            let c = api.call("POST", "/api/v1/curtailments", Some(&body))?;
            follow(&api, c, &args.follow)
        }
    }
}
