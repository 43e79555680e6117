//! `ecowatt demo`: everything on one machine. A simulator with several
//! inverters on a fast clock, the cloud server (SQLite in a data directory the
//! demo names), and one provisioned device agent per inverter, all in this
//! process; live readings are printed as the server stores them.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::Args;
use ecowatt_device::agent::{self, AgentOptions, Provisioning};
use serde_json::{Value, json};

use crate::sim::{FleetArgs, parse_hhmm};
use crate::units::{parse_duration, parse_power_w};

/// Marks a directory as the demo's own, so that a rerun may recreate it.
const MARKER: &str = ".ecowatt-demo";

/// Run the demo: simulator, server and devices, with live readings.
#[derive(Args, Debug)]
pub struct DemoArgs {
    /// Number of simulated inverters (one device agent each).
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u8).range(1..=20))]
    inverters: u8,
    /// Simulated seconds per real second (the inverters' day runs this much faster).
    #[arg(long, default_value_t = 120.0)]
    speed: f64,
    /// Simulated local time of day to start at, HH:MM.
    #[arg(long, default_value = "08:00", value_parser = parse_hhmm)]
    start: u32,
    /// Seed of the weather.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Rated power of each inverter.
    #[arg(long, default_value = "10kW", value_parser = parse_power_w)]
    rated_power: u32,
    /// Address of the server.
    #[arg(long, default_value = "127.0.0.1:5001")]
    bind: std::net::SocketAddr,
    /// The demo's data directory; recreated on every run (only if the demo made it).
    #[arg(long, default_value = "ecowatt-demo")]
    data_dir: PathBuf,
    /// Real time between two printed readings.
    #[arg(long, default_value = "2s", value_parser = parse_duration)]
    interval: Duration,
    /// Stop by itself after this long (default: run until Ctrl-C).
    #[arg(long = "for", value_parser = parse_duration)]
    run_for: Option<Duration>,
    /// Show grid-safe export control (2 to 3 minutes, then it stops): the
    /// inverters (tagged `demo-feeder`, fail-safe 50 %) are curtailed to 20 %
    /// under a 60 s lease; the server stops, and a lease later each device
    /// applies its fail-safe; the server comes back and the curtailment
    /// resumes (docs/export-control.md).
    #[arg(long)]
    grid: bool,
    /// Also publish to this MQTT broker, with Home Assistant discovery:
    /// the demo's inverters appear in Home Assistant (docs/mqtt.md).
    #[arg(long, value_name = "URL")]
    mqtt: Option<String>,
}

/// The grid scenario's steps, in real seconds from the start.
const GRID_CURTAIL_AT: u64 = 6;
const GRID_STOP_AT: u64 = 20;
const GRID_LEASE_S: u64 = 60;
const GRID_RESTART_AT: u64 = GRID_STOP_AT + GRID_LEASE_S + 15;
/// A device retries a failed sync within 30 s (its longest back-off).
const GRID_END_AT: u64 = GRID_RESTART_AT + 35;
const GRID_GROUP: &str = "demo-feeder";
const GRID_FAILSAFE: u16 = 50;

/// How to run this binary from another terminal: `ecowatt` when that name on
/// PATH is this very file, else its full path (quoted if it needs it).
fn runnable_exe() -> String {
    let Ok(exe) = std::env::current_exe().and_then(std::fs::canonicalize) else {
        return "ecowatt".to_owned();
    };
    let on_path = std::env::var_os("PATH").is_some_and(|path| {
        std::env::split_paths(&path)
            .filter_map(|d| std::fs::canonicalize(d.join("ecowatt")).ok())
            .next()
            .is_some_and(|found| found == exe)
    });
    if on_path {
        return "ecowatt".to_owned();
    }
    let text = exe.display().to_string();
    if text.contains(|c: char| c.is_whitespace() || "'\"$`\\".contains(c)) {
        format!("'{}'", text.replace('\'', "'\\''"))
    } else {
        text
    }
}

fn fresh_dir(dir: &std::path::Path) -> anyhow::Result<()> {
    if dir.exists() {
        anyhow::ensure!(
            dir.join(MARKER).exists(),
            "{} exists and is not a demo directory; choose another with --data-dir",
            dir.display()
        );
        std::fs::remove_dir_all(dir).with_context(|| format!("removing {}", dir.display()))?;
    }
    std::fs::create_dir_all(dir)?;
    std::fs::write(dir.join(MARKER), "made by `ecowatt demo`; recreated on every run\n")?;
    Ok(())
}

pub fn run(args: DemoArgs) -> anyhow::Result<()> {
    let fleet_args = FleetArgs {
        inverters: args.inverters,
        seed: args.seed,
        rated_power: args.rated_power,
        speed: args.speed,
        start: Some(args.start),
        utc_offset: 0.0,
    };
    let (fleet, clock) = fleet_args.build()?;
    fresh_dir(&args.data_dir)?;
    let data_dir = std::fs::canonicalize(&args.data_dir)?;
    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(async move {
        // The simulator.
        let sim = ecowatt_sim::spawn(
            &fleet,
            clock,
            None,
            tokio::net::TcpListener::bind("127.0.0.1:0").await?,
            tokio::net::TcpListener::bind("127.0.0.1:0").await?,
        )?;
        // The server.
        let listener = tokio::net::TcpListener::bind(args.bind)
            .await
            .with_context(|| format!("cannot listen on {} (is a server running? use --bind 127.0.0.1:0)", args.bind))?;
        // A firmware signing key for the demo, so that images can be signed and uploaded.
        let key_path = data_dir.join("firmware-signing.key");
        let public = crate::firmware::make_key(&key_path)?;
        let file = file_for_restart(&data_dir, &public, &args.mqtt);
        let server = crate::server::InProcess::start(listener, file).await?;
        let (state, token, url) = (server.state.clone(), server.admin_token.clone(), server.url.clone());

        // One device per inverter, provisioned as an operator would, config'd for a demo.
        let mut agents = Vec::new();
        let mut names = Vec::new();
        for (i, (slave, _)) in fleet.iter().enumerate() {
            let name = format!("inverter-{}", i + 1);
            let key = ecowatt_server::devices::new_key();
            let now = ecowatt_formats::time::now_ms();
            let device = ecowatt_server::registration::register(&state.devices, &name, i64::from(args.rated_power), &key, "demo", now).await?;
            let patch = ecowatt_server::config::ConfigPatch {
                poll_interval_ms: Some(1_000),
                upload_interval_ms: Some(10_000),
                registers: None,
            };
            state.configs.update(&name, &patch, "demo", now).await?;
            // A feeder to curtail (`ecowatt curtail --group demo-feeder 30%`).
            state.control.set_tags(&name, &[GRID_GROUP.to_owned()], "demo", now).await?;
            let fs = ecowatt_server::control::FailSafe::Percent(GRID_FAILSAFE);
            state.control.set_failsafe(&name, Some(fs), "demo", now).await?;
            let provisioning = Provisioning {
                device: name.clone(),
                device_id: device.id.0 as u32,
                key,
                key_version: 1,
                server: url.clone(),
                firmware_keys: vec![public.clone()],
            };
            let mut opts = AgentOptions::new(provisioning, sim.http_url(), data_dir.join("devices").join(&name));
            opts.slave = *slave;
            opts.batch_max = 3;
            agents.push(tokio::spawn(agent::run(opts, std::future::pending())));
            names.push(name);
        }

        outln!("EcoWatt demo: {} inverters (clock x{}), {} devices, one server", fleet.len(), args.speed, names.len());
        outln!("  dashboard   : {url}/#/login/{token}");
        outln!("  admin token : {token}");
        outln!("  API         : {url}/api/docs");
        outln!("  data        : {}", data_dir.display());
        // The binary as it can be run from another terminal (`ecowatt` is on
        // PATH only after `cargo install --path crates/ecowatt`).
        let exe = runnable_exe();
        outln!("  firmware key: {} (sign with it: {exe} firmware sign IMAGE --version 1.1.0 --key ...)", key_path.display());
        outln!("  simulator   : {} and tcp://{}", sim.http_url(), sim.tcp_addr);
        if let Some(broker) = &args.mqtt {
            outln!("  MQTT        : {broker} (topics ecowatt/<device>/..., Home Assistant discovery under homeassistant/)");
        }
        outln!("  try         : ECOWATT_SERVER={url} ECOWATT_TOKEN={token} {exe} command {} set-power-percentage 20 --wait", names[0]);
        outln!("  or          : ... {exe} curtail --group {GRID_GROUP} 30% --lease 15m --wait (the devices' fail-safe is {GRID_FAILSAFE} %)");
        outln!("Ctrl-C stops the demo.\n");
        outln!("{:<12} {:<8} {:>7} {:>6} {:>7} {:>6} {:>8} {:>6} {:>8}", "device", "state", "Pac W", "limit", "Vpv1 V", "Ipv1 A", "Vac1 V", "Temp", "samples");

        if args.grid {
            grid(&args, server, file_for_restart(&data_dir, &public, &args.mqtt), &sim, &names).await?;
            for a in agents {
                a.abort();
            }
            sim.shutdown().await;
            return Ok(());
        }
        let ticker = async {
            let mut interval = tokio::time::interval(args.interval);
            loop {
                interval.tick().await;
                let (url, token, names) = (url.clone(), token.clone(), names.clone());
                let lines = tokio::task::spawn_blocking(move || report(&url, &token, &names)).await?;
                for line in lines {
                    outln!("{line}");
                }
            }
            #[allow(unreachable_code)] // the loop only ends with an error or a cancel
            Ok::<(), anyhow::Error>(())
        };
        let stop = async {
            // Ctrl-C or SIGTERM (a second one exits at once), or `--for`.
            let run_for = async {
                match args.run_for {
                    Some(d) => tokio::time::sleep(d).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                () = crate::signals::stop_requested() => {}
                () = run_for => {}
            }
        };
        tokio::select! {
            result = ticker => result?,
            _ = stop => {}
        }
        outln!("\nStopping the demo.");
        for a in agents {
            a.abort();
        }
        server.stop().await?;
        sim.shutdown().await;
        Ok(())
    })
}

/// One line per device, from what the server has stored.
fn report(url: &str, token: &str, names: &[String]) -> Vec<String> {
    let agent: ureq::Agent =
        ureq::Agent::config_builder().http_status_as_error(false).build().into();
    let get = |path: String| -> Value {
        agent
            .get(format!("{url}{path}"))
            .header("Authorization", &format!("Bearer {token}"))
            .call()
            .ok()
            .and_then(|mut r| r.body_mut().read_json().ok())
            .unwrap_or(json!(null))
    };
    names
        .iter()
        .map(|name| {
            let latest = get(format!("/api/v1/devices/{name}/latest"));
            let done = get(format!("/api/v1/devices/{name}/completeness"));
            let state = if latest["online"] == true { "online" } else { "offline" };
            let r = &latest["sample"]["readings"];
            if r.is_null() {
                return format!("{name:<12} {state:<8} (no data yet)");
            }
            let v = |i: usize| r[i]["value"].as_f64().unwrap_or(f64::NAN);
            format!(
                "{name:<12} {state:<8} {:>7.0} {:>5.0}% {:>7.1} {:>6.1} {:>8.1} {:>5.1}° {:>8}",
                v(9),
                v(8),
                v(3),
                v(5),
                v(0),
                v(7),
                done["received"].as_u64().unwrap_or(0)
            )
        })
        .collect()
}

/// The server's settings (again, for a restart).
fn file_for_restart(
    data_dir: &std::path::Path,
    public: &str,
    mqtt: &Option<String>,
) -> ecowatt_server::settings::SettingsFile {
    ecowatt_server::settings::SettingsFile {
        data_dir: Some(data_dir.join("server")),
        firmware_keys: Some(vec![public.to_owned()]),
        mqtt: mqtt.clone(),
        ..Default::default()
    }
}

/// A listener on `addr` even while the last one's connections linger.
fn rebind(addr: std::net::SocketAddr) -> anyhow::Result<tokio::net::TcpListener> {
    let socket = tokio::net::TcpSocket::new_v4()?;
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    Ok(socket.listen(1024)?)
}

/// Each inverter's export limit as the simulator holds it (what is true
/// on the inverter, whether the server is up or not).
fn limits(sim: &ecowatt_sim::RunningSim, names: &[String]) -> String {
    let snapshot = sim.state.sim.lock().expect("simulator").snapshot();
    names
        .iter()
        .zip(snapshot)
        .map(|(n, s)| format!("{n} {}%", s.limit_pct))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The grid-safe export control scenario (`--grid`).
async fn grid(
    args: &DemoArgs,
    server: crate::server::InProcess,
    file: ecowatt_server::settings::SettingsFile,
    sim: &ecowatt_sim::RunningSim,
    names: &[String],
) -> anyhow::Result<()> {
    let start = tokio::time::Instant::now();
    let at = |s: u64| start + Duration::from_secs(s);
    let say = |what: String| outln!("[{:>3} s] {what}", start.elapsed().as_secs());
    let addr: std::net::SocketAddr = server.url.trim_start_matches("http://").parse()?;
    say(format!(
        "{} inverters tagged {GRID_GROUP}, fail-safe {GRID_FAILSAFE} %; inverter limits: {}",
        names.len(),
        limits(sim, names)
    ));
    tokio::time::sleep_until(at(GRID_CURTAIL_AT)).await;
    let now = ecowatt_formats::time::now_ms();
    let id = server
        .state
        .control
        .curtail(GRID_GROUP, 20, Some(GRID_LEASE_S as i64 * 1000), None, "demo", now)
        .await?;
    say(format!(
        "curtail {GRID_GROUP} to 20 % under a {GRID_LEASE_S} s lease (curtailment {id}; `ecowatt curtail --group {GRID_GROUP} 20% --lease 1m --wait`)"
    ));
    loop {
        let c = server.state.control.get(id, ecowatt_formats::time::now_ms()).await?;
        if c.progress.settled || tokio::time::Instant::now() > at(GRID_STOP_AT - 2) {
            say(format!(
                "{} of {} devices confirmed 20 % by read-back ({} failed), in p50 {} ms, max {} ms; inverter limits: {}",
                c.progress.confirmed,
                c.progress.devices,
                c.progress.failed,
                c.progress.confirm_p50_ms.unwrap_or(-1),
                c.progress.confirm_max_ms.unwrap_or(-1),
                limits(sim, names)
            ));
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep_until(at(GRID_STOP_AT)).await;
    server.stop().await?;
    say(format!(
        "the server stops: the devices hold 20 % for the lease ({GRID_LEASE_S} s without an answer), then apply their fail-safe"
    ));
    // Prints the inverters' limits as they change, until `until` or `done`.
    let watch = |until: tokio::time::Instant, done: Option<String>| async move {
        let mut last = String::new();
        while tokio::time::Instant::now() < until && done.as_ref() != Some(&last) {
            let now = limits(sim, names);
            if now != last {
                say(format!("inverter limits: {now}"));
                last = now;
            }
            tokio::time::sleep(args.interval.min(Duration::from_millis(500))).await;
        }
    };
    watch(at(GRID_RESTART_AT), None).await;
    let server = crate::server::InProcess::start(rebind(addr)?, file).await?;
    say("the server is back: each device, at its next try (within 30 s), reports its episode and the curtailment resumes".into());
    let resumed = names.iter().map(|n| format!("{n} 20%")).collect::<Vec<_>>().join(", ");
    watch(at(GRID_END_AT), Some(resumed)).await;
    // The episode of the return rides on the sync after it (a long poll may
    // hold that one up to 25 s).
    let until = tokio::time::Instant::now() + Duration::from_secs(30);
    while tokio::time::Instant::now() < until {
        let mut all = true;
        for n in names {
            let v = server.state.control.show(n).await?;
            all &= v["episodes"].as_array().into_iter().flatten().any(|e| e["kind"] == "resumed");
        }
        if all {
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    for n in names {
        let v = server.state.control.show(n).await?;
        let episodes: Vec<String> = v["episodes"]
            .as_array()
            .into_iter()
            .flatten()
            .rev()
            .map(|e| {
                format!(
                    "{} {}% {}",
                    e["kind"].as_str().unwrap_or("?"),
                    e["limit_pct"],
                    e["outcome"].as_str().unwrap_or("?")
                )
            })
            .collect();
        say(format!(
            "{n}: episodes reported: {}",
            if episodes.is_empty() { "none".into() } else { episodes.join(", ") }
        ));
    }
    outln!("\nStopping the demo.");
    server.stop().await?;
    Ok(())
}
