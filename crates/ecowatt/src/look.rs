//! Looking at the fleet from the terminal: `ecowatt telemetry DEVICE` (recent
//! samples in engineering units, `--watch`, `--csv`) and `ecowatt status`
//! (the fleet in a few lines).

use std::time::Duration;

use clap::Args;
use serde_json::Value;

use crate::client::{Api, ServerConn, segment, when};
use crate::units::parse_duration;

/// Recent samples of a device.
#[derive(Args, Debug)]
pub struct TelemetryArgs {
    /// Device name.
    device: String,
    /// How far back to look, e.g. 15m, 2h.
    #[arg(long, default_value = "15m", value_parser = parse_duration)]
    since: Duration,
    /// Registers to show, by name or address, e.g. Pac,Vac1 [default: all].
    #[arg(long)]
    registers: Option<String>,
    /// Show at most this many samples (the newest).
    #[arg(long, default_value_t = 20)]
    limit: usize,
    /// Keep following: print samples as the device uploads them (Ctrl-C ends).
    #[arg(long)]
    watch: bool,
    /// How often --watch asks the server.
    #[arg(long, default_value = "2s", value_parser = parse_duration)]
    every: Duration,
    /// CSV (the API's: seq, unix_ms, then NAME_UNIT columns) instead of a table.
    #[arg(long)]
    csv: bool,
}

/// One query of samples after `from_ms` (exclusive) up to now.
fn samples(api: &Api, args: &TelemetryArgs, from_ms: i64) -> anyhow::Result<Value> {
    let mut path = format!(
        "/api/v1/devices/{}/telemetry?from_ms={}&to_ms={}&max_points=10000",
        segment(&args.device),
        from_ms + 1,
        ecowatt_formats::time::now_ms() + 60_000
    );
    if let Some(r) = &args.registers {
        path.push_str(&format!("&registers={}", segment(r)));
    }
    api.call("GET", &path, None)
}

/// The column headers: each register's name and unit.
fn headers(v: &Value) -> Vec<String> {
    v["registers"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|r| {
            format!("{} {}", r["name"].as_str().unwrap_or("?"), r["unit"].as_str().unwrap_or(""))
        })
        .collect()
}

fn table_row(p: &Value, columns: usize) -> String {
    let mut line = format!("{:<19} {:>8}", when(&p["t"]), p["seq"].as_i64().unwrap_or(0));
    for i in 0..columns {
        let cell = p["v"][i].as_f64().map_or("-".to_owned(), |x| x.to_string());
        line.push_str(&format!(" {cell:>10}"));
    }
    line
}

fn csv_row(p: &Value, columns: usize) -> String {
    let mut line = format!("{},{}", p["seq"].as_i64().unwrap_or(0), p["t"].as_i64().unwrap_or(0));
    for i in 0..columns {
        line.push(',');
        if let Some(x) = p["v"][i].as_f64() {
            line.push_str(&x.to_string());
        }
    }
    line
}

pub fn telemetry(conn: &ServerConn, args: TelemetryArgs) -> anyhow::Result<()> {
    let api = conn.connect()?;
    let since_ms = args.since.as_millis() as i64;
    let v = samples(&api, &args, ecowatt_formats::time::now_ms() - since_ms)?;
    let heads = headers(&v);
    if args.csv {
        let names: Vec<String> =
            heads.iter().map(|h| h.replace(' ', "_").replace('°', "deg")).collect();
        outln!("seq,unix_ms,{}", names.join(","));
    } else {
        let mut line = format!("{:<19} {:>8}", "time (UTC)", "seq");
        for h in &heads {
            line.push_str(&format!(" {h:>10}"));
        }
        outln!("{line}");
    }
    let print = |p: &Value| {
        if args.csv {
            outln!("{}", csv_row(p, heads.len()));
        } else {
            outln!("{}", table_row(p, heads.len()));
        }
    };
    let points = v["points"].as_array().cloned().unwrap_or_default();
    for p in &points[points.len().saturating_sub(args.limit)..] {
        print(p);
    }
    let mut last = points.last().and_then(|p| p["t"].as_i64());
    if !args.watch {
        if points.is_empty() && !args.csv {
            let latest = api.call(
                "GET",
                &format!("/api/v1/devices/{}/latest", segment(&args.device)),
                None,
            )?;
            eprintln!("{}", no_samples_note(&latest, args.since));
        }
        return Ok(());
    }
    loop {
        std::thread::sleep(args.every);
        let from = last.unwrap_or_else(|| ecowatt_formats::time::now_ms() - since_ms);
        let v = samples(&api, &args, from)?;
        for p in v["points"].as_array().into_iter().flatten() {
            print(p);
            last = p["t"].as_i64().or(last);
        }
    }
}

/// Why a device shows no samples, from its `/latest`.
fn no_samples_note(latest: &Value, since: Duration) -> String {
    let due = match latest["next_upload_due_ms"].as_i64() {
        Some(t) => format!("; its next upload is due at {} UTC", when(&Value::from(t))),
        None => String::new(),
    };
    match latest["sample"]["t"].as_i64() {
        Some(t) => format!(
            "no samples in the last {since:?}: the newest is from {} UTC{due} (--since to look further back)",
            when(&Value::from(t))
        ),
        None => format!(
            "no samples yet{}: a device uploads its first sample as soon as it starts",
            if latest["online"] == true { " (the device is online)" } else { "" }
        ),
    }
}

/// The fleet in a few lines.
#[derive(Args, Debug)]
pub struct StatusArgs {}

pub fn status(conn: &ServerConn, _args: StatusArgs) -> anyhow::Result<()> {
    let api = conn.connect()?;
    let devices = api.call("GET", "/api/v1/devices", None)?;
    let devices = devices["devices"].as_array().cloned().unwrap_or_default();
    let online = devices.iter().filter(|d| d["online"] == true).count();
    let disabled = devices.iter().filter(|d| d["enabled"] == false).count();
    // Power now: the newest AC power of each online device (one request
    // each; a fleet-wide figure from the server is for a later version).
    let mut power_w = 0.0;
    let mut reporting = 0;
    for d in devices.iter().filter(|d| d["online"] == true) {
        let name = d["name"].as_str().unwrap_or_default();
        let latest = api.call("GET", &format!("/api/v1/devices/{}/latest", segment(name)), None)?;
        let pac = latest["sample"]["readings"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|r| r["name"] == "Pac")
            .and_then(|r| r["value"].as_f64());
        if let Some(w) = pac {
            power_w += w;
            reporting += 1;
        }
    }
    let stats = api.call("GET", "/api/v1/commands/statistics", None)?;
    let by_status = &stats["statistics"]["by_status"];
    let count = |s: &str| by_status[s].as_i64().unwrap_or(0);
    let rollouts = api.call("GET", "/api/v1/rollouts", None)?;
    let active: Vec<String> = rollouts["rollouts"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|r| matches!(r["state"].as_str(), Some("running" | "paused")))
        .map(|r| {
            format!(
                "{} ({} {}, wave {}/{})",
                r["id"],
                r["version"].as_str().unwrap_or("?"),
                r["state"].as_str().unwrap_or("?"),
                r["current_wave"].as_i64().unwrap_or(0) + 1,
                r["waves"].as_array().map_or(0, Vec::len)
            )
        })
        .collect();
    let hour_ago = ecowatt_formats::time::now_ms() - 3_600_000;
    let events = api.call("GET", "/api/v1/security-events?limit=1000", None)?;
    let recent: Vec<&Value> = events["events"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|e| e["at_ms"].as_i64().is_some_and(|t| t >= hour_ago))
        .collect();
    let mut kinds: std::collections::BTreeMap<&str, usize> = Default::default();
    for e in &recent {
        *kinds.entry(e["kind"].as_str().unwrap_or("?")).or_default() += 1;
    }
    // /healthz answers `ok`, or 503 with why the store cannot write.
    let health = match api.call_text("GET", "/healthz", None) {
        Ok(text) => text.trim().to_owned(),
        Err(e) => format!("UNHEALTHY: {e:#}"),
    };
    outln!("server     {} ({health})", conn.server);
    outln!(
        "devices    {} ({online} online, {} offline{})",
        devices.len(),
        devices.len() - online,
        if disabled > 0 { format!(", {disabled} disabled") } else { String::new() }
    );
    outln!("power now  {:.1} kW from {reporting} online devices", power_w / 1000.0);
    outln!(
        "commands   {} pending ({} queued, {} delivered), {} failed, {} expired",
        count("queued") + count("delivered"),
        count("queued"),
        count("delivered"),
        count("failed"),
        count("expired")
    );
    outln!(
        "rollouts   {}",
        if active.is_empty() { "none active".to_owned() } else { active.join(", ") }
    );
    outln!(
        "security   {} events in the last hour{}",
        recent.len(),
        if kinds.is_empty() {
            String::new()
        } else {
            format!(
                " ({})",
                kinds.iter().map(|(k, n)| format!("{k} {n}")).collect::<Vec<_>>().join(", ")
            )
        }
    );
    Ok(())
}

/// `ecowatt export DEVICE`.
#[derive(clap::Args, Debug)]
pub struct ExportArgs {
    /// Device name.
    device: String,
    /// samples (every raw sample, at most 7 days) or rollups.
    #[arg(long, default_value = "samples", value_parser = ["samples", "rollups"])]
    data: String,
    /// csv or parquet.
    #[arg(long, default_value = "csv", value_parser = ["csv", "parquet"])]
    format: String,
    /// How far back, e.g. 24h, 30m (ignored with --from-ms).
    #[arg(long, default_value = "24h", value_parser = parse_duration)]
    since: Duration,
    /// Start, Unix ms [default: now minus --since].
    #[arg(long)]
    from_ms: Option<i64>,
    /// End, Unix ms, included [default: now].
    #[arg(long)]
    to_ms: Option<i64>,
    /// Rollups: 5m, 1h or 1d [default: 1h].
    #[arg(long)]
    level: Option<String>,
    /// Registers by name or address, e.g. Pac,Vac1 [default: all].
    #[arg(long)]
    registers: Option<String>,
    /// Write to this file [default: standard output].
    #[arg(long, short = 'o')]
    out: Option<std::path::PathBuf>,
}

/// Every raw sample or rollup of a range, as CSV or Parquet (`/export`).
pub fn export(conn: &ServerConn, args: ExportArgs) -> anyhow::Result<()> {
    let api = conn.connect()?;
    let to = args.to_ms.unwrap_or_else(ecowatt_formats::time::now_ms);
    let from = args.from_ms.unwrap_or(to - args.since.as_millis() as i64);
    let mut path = format!(
        "/api/v1/devices/{}/export?data={}&format={}&from_ms={from}&to_ms={to}",
        segment(&args.device),
        args.data,
        args.format
    );
    if let Some(level) = &args.level {
        path.push_str(&format!("&level={}", segment(level)));
    }
    if let Some(r) = &args.registers {
        path.push_str(&format!("&registers={}", segment(r)));
    }
    let bytes = api.download(&path)?;
    match &args.out {
        Some(file) => {
            std::fs::write(file, &bytes)
                .map_err(|e| anyhow::anyhow!("cannot write {}: {e}", file.display()))?;
            eprintln!("{} bytes of {} written to {}", bytes.len(), args.data, file.display());
        }
        None => {
            use std::io::Write as _;
            std::io::stdout().write_all(&bytes)?;
        }
    }
    Ok(())
}

/// `ecowatt energy [DEVICE]`.
#[derive(clap::Args, Debug)]
pub struct EnergyArgs {
    /// Device name; without it, the fleet today (power now, energy today, groups, below peers).
    device: Option<String>,
    /// day, month or year.
    #[arg(long, default_value = "day")]
    period: String,
    /// First local date, YYYY-MM-DD [default: this month, this year, or ten years ago].
    #[arg(long)]
    from: Option<String>,
    /// Last local date, included [default: today].
    #[arg(long)]
    to: Option<String>,
    /// The API's JSON instead of a table.
    #[arg(long)]
    json: bool,
}

/// Energy of a device per local day, month or year, or the fleet today.
pub fn energy(conn: &ServerConn, args: EnergyArgs) -> anyhow::Result<()> {
    let api = conn.connect()?;
    let Some(device) = &args.device else {
        let v = api.call("GET", "/api/v1/fleet/energy", None)?;
        if args.json {
            outln!("{}", serde_json::to_string_pretty(&v)?);
            return Ok(());
        }
        outln!(
            "Fleet: {} devices, {} online; power now {:.1} kW; energy today {:.2} kWh",
            v["devices"],
            v["online"],
            v["power_now_w"].as_f64().unwrap_or(0.0) / 1000.0,
            v["energy_today_kwh"].as_f64().unwrap_or(0.0)
        );
        for g in v["groups"].as_array().into_iter().flatten() {
            outln!(
                "  group {:<16} {:>4} devices  {:>9.1} kW  {:>10.2} kWh today",
                g["tag"].as_str().unwrap_or("?"),
                g["devices"],
                g["power_now_w"].as_f64().unwrap_or(0.0) / 1000.0,
                g["energy_today_kwh"].as_f64().unwrap_or(0.0)
            );
        }
        let below = &v["underperforming"];
        for d in below["devices"].as_array().into_iter().flatten() {
            outln!(
                "  below its peers: {} ({:.2} kWh/kW today; median {:.2})",
                d["device"].as_str().unwrap_or("?"),
                d["kwh_per_kw"].as_f64().unwrap_or(0.0),
                below["median_kwh_per_kw"].as_f64().unwrap_or(0.0)
            );
        }
        return Ok(());
    };
    let mut path = format!(
        "/api/v1/devices/{}/energy?period={}",
        crate::client::segment(device),
        crate::client::segment(&args.period)
    );
    for (k, v) in [("from", &args.from), ("to", &args.to)] {
        if let Some(v) = v {
            path.push_str(&format!("&{k}={}", crate::client::segment(v)));
        }
    }
    let v = api.call("GET", &path, None)?;
    if args.json {
        outln!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    outln!(
        "{device}: {} to {} ({}), {:.2} kWh",
        v["from"].as_str().unwrap_or("?"),
        v["to"].as_str().unwrap_or("?"),
        v["timezone"].as_str().unwrap_or("?"),
        v["total_kwh"].as_f64().unwrap_or(0.0)
    );
    for p in v["periods"].as_array().into_iter().flatten() {
        let missing = p["missing"].as_i64().unwrap_or(0);
        outln!(
            "  {:<10} {:>10.2} kWh  {:>7} samples{}",
            p["period"].as_str().unwrap_or("?"),
            p["energy_kwh"].as_f64().unwrap_or(0.0),
            p["samples"],
            if missing > 0 { format!(", {missing} missing") } else { String::new() }
        );
    }
    Ok(())
}
