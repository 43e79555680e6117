//! `ecowatt rollout`: start, follow, pause, resume and abort firmware rollouts.

use std::time::Duration;

use clap::Subcommand;
use serde_json::{Value, json};

use crate::client::{Api, ServerConn, when};

/// Firmware rollouts.
#[derive(Subcommand, Debug)]
pub enum RolloutCommand {
    /// Offer a stored image to devices (a list or a percentage of the fleet), in waves.
    #[command(disable_version_flag = true)]
    Start {
        /// The image's version (see `ecowatt firmware list` or the dashboard).
        #[arg(long)]
        version: String,
        /// Its hardware target, when the version is stored for several.
        #[arg(long)]
        target: Option<String>,
        /// Devices by name (comma-separated).
        #[arg(
            long,
            value_delimiter = ',',
            conflicts_with = "percent",
            required_unless_present = "percent"
        )]
        devices: Vec<String>,
        /// Or this percentage of the enabled devices (1-100).
        #[arg(long)]
        percent: Option<u32>,
        /// Cumulative percentages of the rollout's devices per wave, e.g. 10,50,100.
        #[arg(long, value_delimiter = ',', default_value = "100")]
        waves: Vec<u32>,
        /// Abort when failures in a wave pass this percentage of it.
        #[arg(long, default_value_t = 20)]
        failure_threshold: u32,
        /// Deliver the image to each device encrypted under a key only it can derive
        /// (a device that cannot decrypt fails with encryption_unsupported).
        #[arg(long)]
        encrypt: bool,
        /// Follow it until it completes or aborts.
        #[arg(long)]
        wait: bool,
    },
    /// List rollouts with their counts per state.
    List,
    /// Show a rollout and each device's progress.
    Show {
        /// Rollout id.
        id: i64,
    },
    /// Stop offering the image (downloads in flight stop and keep their progress).
    Pause {
        /// Rollout id.
        id: i64,
    },
    /// Offer it again.
    Resume {
        /// Rollout id.
        id: i64,
    },
    /// Stop for good: devices that have not installed are cancelled.
    Abort {
        /// Rollout id.
        id: i64,
    },
}

fn print(r: &Value) {
    outln!(
        "rollout {} of {} ({}{}): {}, wave {}/{}, threshold {}%{}",
        r["id"],
        r["version"].as_str().unwrap_or("?"),
        r["target"].as_str().unwrap_or("?"),
        if r["encrypted"] == true { ", encrypted" } else { "" },
        r["state"].as_str().unwrap_or("?"),
        r["current_wave"].as_i64().unwrap_or(0) + 1,
        r["waves"].as_array().map_or(0, Vec::len),
        r["failure_threshold_pct"],
        r["reason"].as_str().map(|s| format!(" ({s})")).unwrap_or_default()
    );
    let counts: Vec<String> = r["counts"]
        .as_object()
        .map(|m| m.iter().map(|(k, v)| format!("{k} {v}")).collect())
        .unwrap_or_default();
    outln!("  {} devices: {}", r["devices_total"], counts.join(", "));
    if let Some(devices) = r["devices"].as_array() {
        outln!(
            "  {:<24} {:>4} {:<12} {:>5} {:<10} {:<20} updated",
            "device",
            "wave",
            "state",
            "done",
            "running",
            "reason"
        );
        for d in devices {
            outln!(
                "  {:<24} {:>4} {:<12} {:>4}% {:<10} {:<20} {}",
                d["device"].as_str().unwrap_or("?"),
                d["wave"].as_i64().unwrap_or(0) + 1,
                d["state"].as_str().unwrap_or("?"),
                d["percent"],
                d["running"].as_str().unwrap_or("-"),
                d["reason"].as_str().unwrap_or(""),
                when(&d["updated_ms"])
            );
        }
    }
}

fn follow(api: &Api, id: i64) -> anyhow::Result<()> {
    let mut last = String::new();
    loop {
        let r = api.call("GET", &format!("/api/v1/rollouts/{id}"), None)?;
        let line = format!("{} {}", r["state"], r["counts"]);
        if line != last {
            print(&r);
            last = line;
        }
        match r["state"].as_str() {
            Some("completed") => return Ok(()),
            Some("aborted") => anyhow::bail!("rollout {id} aborted"),
            _ => std::thread::sleep(Duration::from_secs(1)),
        }
    }
}

pub fn run(conn: &ServerConn, cmd: RolloutCommand) -> anyhow::Result<()> {
    let api = conn.connect()?;
    match cmd {
        RolloutCommand::Start {
            version,
            target,
            devices,
            percent,
            waves,
            failure_threshold,
            encrypt,
            wait,
        } => {
            let mut body = json!({"version": version, "waves": waves,
                                  "failure_threshold_pct": failure_threshold,
                                  "encrypted": encrypt});
            if let Some(t) = target {
                body["target"] = json!(t);
            }
            match percent {
                Some(p) => body["percent"] = json!(p),
                None => body["devices"] = json!(devices),
            }
            let r = api.call("POST", "/api/v1/rollouts", Some(&body))?;
            print(&r);
            if wait {
                follow(&api, r["id"].as_i64().unwrap_or(0))?;
            }
        }
        RolloutCommand::List => {
            let v = api.call("GET", "/api/v1/rollouts", None)?;
            for r in v["rollouts"].as_array().into_iter().flatten() {
                print(r);
            }
        }
        RolloutCommand::Show { id } => {
            print(&api.call("GET", &format!("/api/v1/rollouts/{id}"), None)?)
        }
        RolloutCommand::Pause { id } => {
            print(&api.call("POST", &format!("/api/v1/rollouts/{id}/pause"), None)?)
        }
        RolloutCommand::Resume { id } => {
            print(&api.call("POST", &format!("/api/v1/rollouts/{id}/resume"), None)?)
        }
        RolloutCommand::Abort { id } => {
            print(&api.call("POST", &format!("/api/v1/rollouts/{id}/abort"), None)?)
        }
    }
    Ok(())
}
