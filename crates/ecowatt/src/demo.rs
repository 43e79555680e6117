//! `ecowatt demo`: everything on one machine. For now: a simulator with
//! several inverters on a fast clock, read over the real inverter link and
//! printed live. The cloud server, devices and dashboard join as they land.

use std::time::Duration;

use clap::Args;
use ecowatt_core::link::{Client, RetryPolicy};
use ecowatt_device::ThreadDelay;
use ecowatt_device::transport::{LinkOptions, SimHttp};
use ecowatt_proto::registers::{REGISTER_COUNT, REGISTERS};

use crate::sim::FleetArgs;
use crate::units::{parse_duration, parse_power_w};

/// Run the demo: a simulated fleet on a fast clock, with live readings.
#[derive(Args, Debug)]
pub struct DemoArgs {
    /// Number of simulated inverters.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u8).range(1..=20))]
    inverters: u8,
    /// Simulated seconds per real second.
    #[arg(long, default_value_t = 120.0)]
    speed: f64,
    /// Simulated local time of day to start at, HH:MM.
    #[arg(long, default_value = "08:00")]
    start: String,
    /// Seed of the weather.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Rated power of each inverter.
    #[arg(long, default_value = "10kW", value_parser = parse_power_w)]
    rated_power: u32,
    /// Real time between two printed readings.
    #[arg(long, default_value = "2s", value_parser = parse_duration)]
    interval: Duration,
    /// Stop by itself after this long (default: run until Ctrl-C).
    #[arg(long = "for", value_parser = parse_duration)]
    run_for: Option<Duration>,
}

pub fn run(args: DemoArgs) -> anyhow::Result<()> {
    let fleet_args = FleetArgs {
        inverters: args.inverters,
        seed: args.seed,
        rated_power: args.rated_power,
        speed: args.speed,
        start: Some(parse_start(&args.start)?),
        utc_offset: 0.0,
    };
    let (fleet, clock) = fleet_args.build()?;
    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(async move {
        let http = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let tcp = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let sim = ecowatt_sim::spawn(&fleet, clock, None, http, tcp)?;
        println!("EcoWatt demo: {} simulated inverters, clock x{}", fleet.len(), args.speed);
        println!("  Inverter SIM API : {}", sim.http_url());
        println!("  Modbus TCP       : tcp://{}", sim.tcp_addr);
        println!(
            "  try, in another terminal: ecowatt inverter set-limit 20 --url {}",
            sim.http_url()
        );
        println!("Ctrl-C stops the demo.\n");
        println!(
            "{:<6} {:<5} {:>7} {:>6} {:>7} {:>6} {:>7} {:>6} {:>8} {:>6}",
            "time",
            "inv",
            "Pac W",
            "limit",
            "Vpv1 V",
            "Ipv1 A",
            "Vpv2 V",
            "Ipv2 A",
            "Vac1 V",
            "Temp"
        );

        let url = sim.http_url();
        let slaves: Vec<u8> = fleet.iter().map(|(s, _)| *s).collect();
        let state = sim.state.clone();
        let ticker = async {
            let mut interval = tokio::time::interval(args.interval);
            loop {
                interval.tick().await;
                let sim_ms = state.sim.lock().expect("simulator lock").now_ms();
                let (url, slaves) = (url.clone(), slaves.clone());
                let lines = tokio::task::spawn_blocking(move || poll(&url, &slaves)).await?;
                let clock = format_time_of_day(sim_ms);
                for line in lines {
                    println!("{clock:<6} {line}");
                }
            }
            #[allow(unreachable_code)] // the loop only ends with an error or a cancel
            Ok::<(), anyhow::Error>(())
        };
        let stop = async {
            match args.run_for {
                Some(d) => tokio::time::sleep(d).await,
                None => {
                    let _ = tokio::signal::ctrl_c().await;
                }
            }
        };
        tokio::select! {
            result = ticker => result?,
            _ = stop => {}
        }
        println!("\nStopping the demo.");
        sim.shutdown().await;
        Ok(())
    })
}

fn parse_start(text: &str) -> anyhow::Result<u32> {
    let (h, m) =
        text.split_once(':').ok_or_else(|| anyhow::anyhow!("--start {text:?}: use HH:MM"))?;
    let (h, m): (u32, u32) = (h.parse()?, m.parse()?);
    anyhow::ensure!(h < 24 && m < 60, "--start {text:?}: use HH:MM");
    Ok(h * 60 + m)
}

/// Reads every inverter once over the SIM HTTP API, as a device would.
fn poll(url: &str, slaves: &[u8]) -> Vec<String> {
    let options = LinkOptions::default();
    let transport = SimHttp::new(url, options.api_key, options.timeout);
    let mut client = Client::new(transport, ThreadDelay).with_policy(RetryPolicy::default());
    slaves
        .iter()
        .map(|&slave| match client.read_holding(slave, 0, REGISTER_COUNT as u16) {
            Ok(Ok(r)) => {
                let v = |i: usize| REGISTERS[i].to_engineering(r[i]);
                format!(
                    "{slave:<#5x} {:>7.0} {:>5}% {:>7.1} {:>6.1} {:>7.1} {:>6.1} {:>8.1} {:>5.1}°",
                    v(9),
                    r[8],
                    v(3),
                    v(5),
                    v(4),
                    v(6),
                    v(0),
                    v(7)
                )
            }
            Ok(Err(exception)) => format!("{slave:<#5x} refused: {exception}"),
            Err(e) => format!("{slave:<#5x} no reading: {e}"),
        })
        .collect()
}

fn format_time_of_day(unix_ms: u64) -> String {
    let minutes = (unix_ms / 60_000) % (24 * 60);
    format!("{:02}:{:02}", minutes / 60, minutes % 60)
}
