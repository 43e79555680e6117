//! `ecowatt sim`: the inverter simulator as a long-running service.

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Context;
use clap::Args;
use ecowatt_sim::clock::{ScaledClock, unix_now_ms};

use crate::units::parse_power_w;

/// Options shared by `ecowatt sim` and `ecowatt demo`: the fleet and its clock.
#[derive(Args, Debug, Clone)]
pub struct FleetArgs {
    /// Number of inverters, at slave addresses 0x11, 0x12, ...
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u8).range(1..=200))]
    pub inverters: u8,
    /// Seed of the weather: the same seed gives the same day.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Rated AC power of each inverter (e.g. 10kW, 8000W).
    #[arg(long, default_value = "10kW", value_parser = parse_power_w)]
    pub rated_power: u32,
    /// Simulated seconds per real second (e.g. 60 runs a day in 24 minutes).
    #[arg(long, default_value_t = 1.0)]
    pub speed: f64,
    /// Simulated local time of day to start at, HH:MM (default: now).
    #[arg(long, value_parser = parse_hhmm)]
    pub start: Option<u32>,
    /// Offset of the inverters' local solar time from UTC, in hours (e.g. 5.5).
    #[arg(long, default_value_t = 0.0, allow_negative_numbers = true)]
    pub utc_offset: f64,
}

impl FleetArgs {
    /// The inverters and the clock these options describe.
    pub fn build(&self) -> anyhow::Result<(ecowatt_sim::Fleet, Arc<ScaledClock>)> {
        anyhow::ensure!(
            self.speed > 0.0 && self.speed <= 100_000.0,
            "--speed must be in (0, 100000]"
        );
        anyhow::ensure!(
            (-14.0..=14.0).contains(&self.utc_offset),
            "--utc-offset must be in -14..=14 hours"
        );
        let offset_min = (self.utc_offset * 60.0).round() as i32;
        let now = unix_now_ms();
        let origin = match self.start {
            None => now,
            Some(minute_of_day) => {
                let local_now = now as i64 + i64::from(offset_min) * 60_000;
                let local_midnight = local_now - local_now.rem_euclid(86_400_000);
                (local_midnight + i64::from(minute_of_day) * 60_000
                    - i64::from(offset_min) * 60_000) as u64
            }
        };
        let fleet = ecowatt_sim::fleet(self.inverters, self.seed, self.rated_power, offset_min);
        Ok((fleet, Arc::new(ScaledClock::new(origin, self.speed))))
    }
}

pub fn parse_hhmm(text: &str) -> Result<u32, String> {
    let err = || format!("{text:?} is not a time of day like 06:30");
    let (h, m) = text.split_once(':').ok_or_else(err)?;
    let (h, m): (u32, u32) = (h.parse().map_err(|_| err())?, m.parse().map_err(|_| err())?);
    if h > 23 || m > 59 {
        return Err(err());
    }
    Ok(h * 60 + m)
}

/// Run the inverter simulator.
///
/// Serves the course's Inverter SIM HTTP API (POST /api/inverter/read and
/// /write with {"frame": "<hex>"}, /api/user/error-flag/add, /api/inverter/error)
/// and Modbus TCP over the same inverters. GET /api/sim/state shows every
/// inverter in engineering units.
#[derive(Args, Debug)]
pub struct SimArgs {
    /// Address of the SIM HTTP API.
    #[arg(long, default_value = "127.0.0.1:8080")]
    pub http: SocketAddr,
    /// Address of the Modbus TCP server.
    #[arg(long, default_value = "127.0.0.1:1502")]
    pub modbus_tcp: SocketAddr,
    /// Require this key in the Authorization header of the SIM API (raw, no "Bearer").
    #[arg(long, env = "ECOWATT_SIM_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
    #[command(flatten)]
    pub fleet: FleetArgs,
}

pub fn run(args: SimArgs) -> anyhow::Result<()> {
    let (fleet, clock) = args.fleet.build()?;
    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(async move {
        let http = tokio::net::TcpListener::bind(args.http)
            .await
            .with_context(|| format!("cannot listen on {} (--http)", args.http))?;
        let tcp = tokio::net::TcpListener::bind(args.modbus_tcp)
            .await
            .with_context(|| format!("cannot listen on {} (--modbus-tcp)", args.modbus_tcp))?;
        let sim = ecowatt_sim::spawn(&fleet, clock, args.api_key.clone(), http, tcp)?;
        let slaves: Vec<String> = fleet.iter().map(|(s, _)| format!("{s:#04x}")).collect();
        outln!("EcoWatt inverter simulator");
        outln!("  SIM HTTP API : {}", sim.http_url());
        outln!("  Modbus TCP   : tcp://{}", sim.tcp_addr);
        outln!("  inverters    : {} (slaves {})", fleet.len(), slaves.join(", "));
        outln!(
            "  API key      : {}",
            if args.api_key.is_some() { "required" } else { "not required" }
        );
        outln!("Try: ecowatt inverter read --url {}", sim.http_url());
        tracing::info!(
            speed = args.fleet.speed,
            seed = args.fleet.seed,
            "simulator running; Ctrl-C stops it"
        );
        crate::signals::stop_requested().await;
        tracing::info!("stopping");
        sim.shutdown().await;
        Ok(())
    })
}
