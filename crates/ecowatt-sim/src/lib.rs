//! The EcoWatt inverter simulator.
//!
//! Speaks the course's Inverter SIM HTTP API ([`http`]) and Modbus TCP
//! ([`tcp`]) over one or more simulated inverters ([`inverter`]), each driven
//! by a physical model of a day of sun and clouds ([`model`]) on a clock that
//! can run faster than real time ([`clock`]). One-shot error flags
//! ([`faults`]) let tests and demos inject exceptions, CRC errors, garbage,
//! drops and delays.

pub mod clock;
pub mod faults;
pub mod http;
pub mod inverter;
pub mod model;
pub mod sim;
pub mod tcp;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::clock::SimClock;
use crate::model::ModelConfig;
use crate::sim::Simulator;

/// The slave address of the first inverter (the course SIM's `0x11`).
pub const FIRST_SLAVE: u8 = 0x11;
/// Default Modbus TCP port (502 needs root).
pub const DEFAULT_TCP_PORT: u16 = 1502;
/// Default SIM HTTP API port.
pub const DEFAULT_HTTP_PORT: u16 = 8080;

/// What is shared by the HTTP and Modbus TCP servers.
pub struct SimState {
    /// The simulator; every request holds the lock only to compute its answer.
    pub sim: Mutex<Simulator>,
    /// When set, the SIM API's `Authorization` header must carry exactly this.
    pub api_key: Option<String>,
}

/// Inverters by slave address, with their physics.
pub type Fleet = Vec<(u8, ModelConfig)>;

/// A fleet of `count` inverters at slave addresses `0x11, 0x12, ...`, with
/// seeds `seed, seed + 1, ...`.
pub fn fleet(count: u8, seed: u64, rated_w: u32, utc_offset_min: i32) -> Fleet {
    (0..count.min(0xFF - FIRST_SLAVE))
        .map(|i| {
            let config =
                ModelConfig { seed: seed.wrapping_add(u64::from(i)), rated_w, utc_offset_min };
            (FIRST_SLAVE + i, config)
        })
        .collect()
}

/// A simulator serving both protocols.
pub struct RunningSim {
    /// Where the SIM HTTP API listens.
    pub http_addr: SocketAddr,
    /// Where Modbus TCP listens.
    pub tcp_addr: SocketAddr,
    /// The shared state, for tests and the demo.
    pub state: Arc<SimState>,
    stop: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
}

impl RunningSim {
    /// Base URL of the SIM HTTP API.
    pub fn http_url(&self) -> String {
        format!("http://{}", self.http_addr)
    }

    /// Stops both servers and waits for them.
    pub async fn shutdown(self) {
        let _ = self.stop.send(true);
        for task in self.tasks {
            let _ = task.await;
        }
    }
}

/// Starts the simulator on the given listeners (bind port 0 in tests).
pub fn spawn(
    inverters: &[(u8, ModelConfig)],
    clock: Arc<dyn SimClock>,
    api_key: Option<String>,
    http: TcpListener,
    modbus_tcp: TcpListener,
) -> std::io::Result<RunningSim> {
    let state = Arc::new(SimState { sim: Mutex::new(Simulator::new(inverters, clock)), api_key });
    let http_addr = http.local_addr()?;
    let tcp_addr = modbus_tcp.local_addr()?;
    let (stop, stopped) = watch::channel(false);
    let until_stopped = |mut rx: watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|stop| *stop).await;
    };
    let router = http::app(Arc::clone(&state));
    let http_stop = until_stopped(stopped.clone());
    // The simulator serves a lab: no cap per address (every tool runs on
    // one machine), the edge's time limits all the same.
    let defaults = ecowatt_edge::Limits::default();
    let limits = ecowatt_edge::Limits { max_per_source: defaults.max_connections, ..defaults };
    let stats = Arc::new(ecowatt_edge::Stats::default());
    let http_task = tokio::spawn(async move {
        if let Err(e) = ecowatt_edge::serve(http, router, limits, stats, http_stop).await {
            tracing::error!(error = %e, "SIM HTTP server failed");
        }
    });
    let tcp_task = tokio::spawn(tcp::serve(modbus_tcp, Arc::clone(&state), until_stopped(stopped)));
    Ok(RunningSim { http_addr, tcp_addr, state, stop, tasks: vec![http_task, tcp_task] })
}
