//! Test fixtures shared by EcoWatt's crates: a simulator on port 0 whose clock
//! moves only when the test says so, and ([`server`]) throw-away databases
//! and a server on port 0.

pub mod mosquitto;
pub mod server;

use std::sync::Arc;

use ecowatt_sim::clock::ManualClock;
use ecowatt_sim::{RunningSim, fleet};
use tokio::net::TcpListener;

/// 2026-06-21 12:00:00 UTC: a summer noon, the sun high.
pub const SUMMER_NOON_MS: u64 = 1_782_043_200_000;

/// A running simulator and the clock that drives it.
pub struct TestSim {
    /// The simulator (HTTP API and Modbus TCP on loopback ports).
    pub sim: RunningSim,
    /// Its clock: set or advance it to move simulated time.
    pub clock: Arc<ManualClock>,
}

impl TestSim {
    /// Starts `count` inverters (slaves `0x11..`, seed 1.., 10 kW) at summer noon.
    pub async fn start(count: u8) -> TestSim {
        TestSim::start_with(count, None).await
    }

    /// As [`TestSim::start`], requiring `api_key` on the SIM API when given.
    pub async fn start_with(count: u8, api_key: Option<&str>) -> TestSim {
        let clock = Arc::new(ManualClock::new(SUMMER_NOON_MS));
        let http = TcpListener::bind("127.0.0.1:0").await.expect("bind HTTP");
        let tcp = TcpListener::bind("127.0.0.1:0").await.expect("bind Modbus TCP");
        let sim = ecowatt_sim::spawn(
            &fleet(count, 1, 10_000, 0),
            clock.clone(),
            api_key.map(str::to_owned),
            http,
            tcp,
        )
        .expect("start simulator");
        TestSim { sim, clock }
    }

    /// Base URL of the SIM HTTP API.
    pub fn http_url(&self) -> String {
        self.sim.http_url()
    }

    /// `tcp://host:port` of the Modbus TCP server.
    pub fn tcp_url(&self) -> String {
        format!("tcp://{}", self.sim.tcp_addr)
    }

    /// Sets the export limit register of `slave` as a write would (what a
    /// command that reached the inverter before a power cut left behind).
    pub fn set_limit(&self, slave: u8, pct: u16) {
        let mut sim = self.sim.state.sim.lock().expect("simulator lock");
        let now = sim.now_ms();
        let write = ecowatt_proto::modbus::Request::WriteSingleRegister { address: 8, value: pct };
        sim.inverter_mut(slave).expect("no such slave").handle(&write, now);
    }

    /// The export limit register of `slave`, straight from the simulator.
    pub fn limit_pct(&self, slave: u8) -> u16 {
        let mut sim = self.sim.state.sim.lock().expect("simulator lock");
        let now = sim.now_ms();
        sim.inverter_mut(slave).expect("no such slave").read(now).limit_pct
    }

    /// The values the export limit of `slave` was written with, oldest first
    /// (what shows that a command ran once, not twice).
    pub fn limit_writes(&self, slave: u8) -> Vec<u16> {
        let mut sim = self.sim.state.sim.lock().expect("simulator lock");
        sim.inverter_mut(slave).expect("no such slave").writes().0
    }
}
