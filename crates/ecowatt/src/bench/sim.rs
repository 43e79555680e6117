//! The simulator's request rate over the SIM HTTP API and Modbus TCP.

use std::time::{Duration, Instant};

use ecowatt_core::link::Transport;
use ecowatt_device::transport::{ModbusTcp, SimHttp};
use ecowatt_proto::modbus::{Request, rtu};

use super::measure::{Run, report};

/// Runs `clients` threads, each with its own transport, sending read-10
/// requests until `requests` are done in total or `max_time` passes.
fn load(
    clients: u64,
    requests: u64,
    max_time: Duration,
    make: impl Fn() -> Box<dyn Transport + Send> + Sync,
) -> Run {
    let frame =
        rtu::encode_request(0x11, &Request::ReadHoldingRegisters { start: 0, quantity: 10 });
    let started = Instant::now();
    let deadline = started + max_time;
    let per_client = requests.div_ceil(clients);
    let results: Vec<(u64, u64, Vec<u32>)> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..clients)
            .map(|_| {
                let frame = &frame;
                let make = &make;
                s.spawn(move || {
                    let mut t = make();
                    let (mut ok, mut failed) = (0u64, 0u64);
                    let mut lat = Vec::with_capacity(per_client as usize);
                    for _ in 0..per_client {
                        if Instant::now() >= deadline {
                            break;
                        }
                        let t0 = Instant::now();
                        match t.transact(frame) {
                            Ok(answer) if rtu::split(&answer).is_ok() => ok += 1,
                            _ => failed += 1,
                        }
                        lat.push(t0.elapsed().as_micros().min(u32::MAX as u128) as u32);
                    }
                    (ok, failed, lat)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().expect("client thread")).collect()
    });
    let elapsed = started.elapsed();
    let mut run = Run { ok: 0, failed: 0, latencies_us: Vec::new(), elapsed };
    for (ok, failed, lat) in results {
        run.ok += ok;
        run.failed += failed;
        run.latencies_us.extend(lat);
    }
    run.latencies_us.sort_unstable();
    run
}

/// Requests per second a simulator on loopback serves, per protocol.
pub fn run(requests: u64, clients: u64, max_time: Duration) -> anyhow::Result<()> {
    let rt = tokio::runtime::Runtime::new()?;
    let sim = rt.block_on(async {
        let http = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let tcp = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let clock = std::sync::Arc::new(ecowatt_sim::clock::ScaledClock::real());
        ecowatt_sim::spawn(&ecowatt_sim::fleet(1, 1, 10_000, 0), clock, None, http, tcp)
    })?;
    outln!(
        "Simulator, read of 10 registers, {clients} clients, at most {requests} requests or {:?} per protocol:",
        max_time
    );
    let url = sim.http_url();
    let http = load(clients, requests, max_time, || {
        Box::new(SimHttp::new(&url, None, Duration::from_secs(5)))
    });
    report("SIM HTTP API", &http);
    let addr = sim.tcp_addr.to_string();
    let tcp = load(clients, requests, max_time, || {
        Box::new(ModbusTcp::new(addr.clone(), Duration::from_secs(5)))
    });
    report("Modbus TCP", &tcp);
    rt.block_on(sim.shutdown());
    anyhow::ensure!(http.failed == 0 && tcp.failed == 0, "some requests failed");
    Ok(())
}
