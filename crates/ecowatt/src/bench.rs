//! `ecowatt bench`: repeatable measurements, bounded in count and time, on
//! loopback only. Figures go to `docs/performance.md`.

use std::hint::black_box;
use std::time::{Duration, Instant};

use clap::Subcommand;
use ecowatt_core::link::Transport;
use ecowatt_device::transport::{ModbusTcp, SimHttp};
use ecowatt_proto::crc::crc16;
use ecowatt_proto::modbus::{Request, Response, rtu};

use crate::units::parse_duration;

/// What to measure.
#[derive(Subcommand, Debug)]
pub enum BenchCommand {
    /// Modbus RTU frame encode/decode (and CRC) operations per second, one core.
    Frames {
        /// Operations per measurement.
        #[arg(long, default_value_t = 2_000_000)]
        iterations: u64,
    },
    /// Simulator requests per second over the SIM HTTP API and Modbus TCP (loopback, in-process).
    Sim {
        /// Requests per protocol, at most.
        #[arg(long, default_value_t = 50_000)]
        requests: u64,
        /// Concurrent clients (one connection each).
        #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u64).range(1..=256))]
        clients: u64,
        /// Time limit per protocol.
        #[arg(long, default_value = "20s", value_parser = parse_duration)]
        max_time: Duration,
    },
}

pub fn run(cmd: BenchCommand) -> anyhow::Result<()> {
    match cmd {
        BenchCommand::Frames { iterations } => {
            frames(iterations.max(1));
            Ok(())
        }
        BenchCommand::Sim { requests, clients, max_time } => {
            sim(requests.max(1), clients, max_time)
        }
    }
}

fn rate(label: &str, iterations: u64, f: impl Fn(u64)) {
    let started = Instant::now();
    for i in 0..iterations {
        f(i);
    }
    let secs = started.elapsed().as_secs_f64();
    println!(
        "  {label:<44} {:>12.0} ops/s  {:>7.1} ns/op",
        iterations as f64 / secs,
        secs * 1e9 / iterations as f64
    );
}

fn frames(iterations: u64) {
    println!("Modbus RTU frames, {iterations} operations each (single thread):");
    let read10 = Request::ReadHoldingRegisters { start: 0, quantity: 10 };
    let answer = rtu::encode_response(0x11, &Response::ReadHoldingRegisters((0..10).collect()));
    rate("CRC-16 of a 25-byte frame", iterations, |i| {
        black_box(crc16(black_box(&answer[..23 + (i & 1) as usize])));
    });
    rate("encode read request (0x03, 10 registers)", iterations, |i| {
        let req = Request::ReadHoldingRegisters { start: (i & 1) as u16, quantity: 10 };
        black_box(rtu::encode_request(0x11, black_box(&req)));
    });
    rate("encode read response (10 registers)", iterations, |i| {
        let resp = Response::ReadHoldingRegisters(vec![i as u16; 10]);
        black_box(rtu::encode_response(0x11, black_box(&resp)));
    });
    rate("decode + validate read response", iterations, |_| {
        black_box(rtu::decode_reply(0x11, &read10, black_box(&answer)).unwrap());
    });
    let write = Request::WriteSingleRegister { address: 8, value: 50 };
    let echo = rtu::encode_request(0x11, &write);
    rate("decode + validate write echo", iterations, |_| {
        black_box(rtu::decode_reply(0x11, &write, black_box(&echo)).unwrap());
    });
}

struct Run {
    ok: u64,
    failed: u64,
    latencies_us: Vec<u32>,
    elapsed: Duration,
}

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

fn report(label: &str, run: &Run) {
    let pct = |p: f64| -> u32 {
        if run.latencies_us.is_empty() {
            return 0;
        }
        let i = ((run.latencies_us.len() as f64 - 1.0) * p).round() as usize;
        run.latencies_us[i]
    };
    println!(
        "  {label:<14} {:>9.0} req/s  ok {:>7}  failed {:>4}  p50 {:>6} us  p99 {:>6} us  max {:>7} us  ({:.1} s)",
        run.ok as f64 / run.elapsed.as_secs_f64(),
        run.ok,
        run.failed,
        pct(0.50),
        pct(0.99),
        run.latencies_us.last().copied().unwrap_or(0),
        run.elapsed.as_secs_f64()
    );
}

fn sim(requests: u64, clients: u64, max_time: Duration) -> anyhow::Result<()> {
    let rt = tokio::runtime::Runtime::new()?;
    let sim = rt.block_on(async {
        let http = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let tcp = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let clock = std::sync::Arc::new(ecowatt_sim::clock::ScaledClock::real());
        ecowatt_sim::spawn(&ecowatt_sim::fleet(1, 1, 10_000, 0), clock, None, http, tcp)
    })?;
    println!(
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
