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
    /// Telemetry codec: bytes per sample on a simulated day and on constant night
    /// data, against raw registers and deflate (miniz_oxide) on the same batches.
    Codec {
        /// Samples per batch (60 = 5 min at a 5 s poll; 180 = 15 min).
        #[arg(long, default_value_t = 60)]
        batch: usize,
        /// Seed of the simulated weather.
        #[arg(long, default_value_t = 1)]
        seed: u64,
    },
    /// Device protocol: seal and open per second (one core), and sealed sync
    /// requests per second a server on loopback sustains (SQLite, in process).
    Protocol {
        /// Simulated devices, one thread and one connection each.
        #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u64).range(1..=256))]
        devices: u64,
        /// Sync requests in total, at most.
        #[arg(long, default_value_t = 20_000)]
        requests: u64,
        /// Time limit of the server measurement.
        #[arg(long, default_value = "20s", value_parser = parse_duration)]
        max_time: Duration,
    },
    /// A simulated fleet against a server process on loopback: uploads, data
    /// points and command delivery latency while devices hold long polls.
    Fleet(crate::fleet::FleetArgs),
    /// A firmware update's device side: download throughput (range requests,
    /// slot writes with a sync per chunk, SHA-256) and peak heap, against a
    /// server in a child process.
    Ota(crate::ota_bench::OtaArgs),
    /// Command queue -> deliver -> result cycles per second, and config updates
    /// per second, through the store (SQLite in a temp dir, or a throw-away
    /// PostgreSQL database).
    Commands {
        /// PostgreSQL server to create a throw-away database on
        /// (e.g. postgres://postgres@127.0.0.1:5432/postgres); SQLite if absent.
        #[arg(long)]
        postgres: Option<String>,
        /// Concurrent workers (one device each).
        #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u64).range(1..=256))]
        workers: u64,
        /// Cycles (and config updates) in total, at most.
        #[arg(long, default_value_t = 5_000)]
        cycles: u64,
        /// Time limit per measurement.
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
        BenchCommand::Fleet(args) => crate::fleet::run(args),
        BenchCommand::Ota(args) => crate::ota_bench::run(args),
        BenchCommand::Codec { batch, seed } => {
            codec_bench(batch.clamp(1, 4096), seed);
            Ok(())
        }
        BenchCommand::Protocol { devices, requests, max_time } => {
            protocol(devices, requests.max(1), max_time)
        }
        BenchCommand::Commands { postgres, workers, cycles, max_time } => {
            tokio::runtime::Runtime::new()?.block_on(commands(
                postgres,
                workers,
                cycles.max(1),
                max_time,
            ))
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

/// The `p` quantile (0..=1) of sorted latencies, 0 when there are none.
pub fn percentile(sorted: &[u32], p: f64) -> u32 {
    if sorted.is_empty() {
        return 0;
    }
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

fn report(label: &str, run: &Run) {
    let pct = |p: f64| percentile(&run.latencies_us, p);
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

async fn commands(
    postgres: Option<String>,
    workers: u64,
    cycles: u64,
    max_time: Duration,
) -> anyhow::Result<()> {
    use ecowatt_server::commands::{CommandOutcome, CommandRequest};
    use ecowatt_server::config::ConfigPatch;
    use ecowatt_server::store::Store;
    use ecowatt_server::testing::TempDb;

    let db = match &postgres {
        Some(url) => TempDb::postgres_at(url, "ecowatt_bench").await,
        None => TempDb::sqlite(),
    };
    let store = std::sync::Arc::new(Store::open(&db.url).await?);
    let now = ecowatt_server::now_ms();
    for w in 0..workers {
        ecowatt_server::registration::register(
            &store.devices(),
            &format!("bench-{w}"),
            10_000,
            "00",
            "bench",
            now,
        )
        .await?;
    }
    println!(
        "Command store, {} backend, {workers} workers (one device each), at most {cycles} operations or {max_time:?}:",
        store.db().backend()
    );
    let per_worker = cycles.div_ceil(workers);

    // queue -> deliver -> result, each worker on its own device.
    let run = |kind: u8| {
        let store = store.clone();
        async move {
            let started = Instant::now();
            let deadline = started + max_time;
            let mut tasks = Vec::new();
            for w in 0..workers {
                let store = store.clone();
                tasks.push(tokio::spawn(async move {
                    let device = format!("bench-{w}");
                    let mut lat = Vec::with_capacity(per_worker as usize);
                    for i in 0..per_worker {
                        if Instant::now() >= deadline {
                            break;
                        }
                        let t0 = Instant::now();
                        let now = ecowatt_server::now_ms();
                        if kind == 0 {
                            let r =
                                CommandRequest::SetPowerPercentage { percentage: (i % 101) as i64 };
                            let commands = store.commands();
                            let c = commands.queue(&device, &r, 600, "bench", now).await?;
                            let got = commands.deliver(&device, 600_000, 1, now).await?;
                            anyhow::ensure!(
                                got.len() == 1 && got[0].id == c.id,
                                "delivered {got:?}"
                            );
                            let ok = CommandOutcome {
                                success: true,
                                message: None,
                                exception_code: None,
                                value: None,
                                executed_ms: None,
                            };
                            commands.record_result(&device, c.id, &ok, now).await?;
                        } else {
                            let patch = ConfigPatch {
                                poll_interval_ms: Some(1_000 + (i % 1000) as i64),
                                ..Default::default()
                            };
                            store.configs().update(&device, &patch, "bench", now).await?;
                        }
                        lat.push(t0.elapsed().as_micros().min(u32::MAX as u128) as u32);
                    }
                    Ok::<_, anyhow::Error>(lat)
                }));
            }
            let mut all = Vec::new();
            for t in tasks {
                all.extend(t.await??);
            }
            all.sort_unstable();
            Ok::<_, anyhow::Error>(Run {
                ok: all.len() as u64,
                failed: 0,
                latencies_us: all,
                elapsed: started.elapsed(),
            })
        }
    };
    let cycles_run = run(0).await?;
    report("cmd cycles", &cycles_run);
    let config_run = run(1).await?;
    report("config upd", &config_run);
    store.close().await;
    db.cleanup().await;
    Ok(())
}

/// What a prober can learn from timing: the server's own time (in process,
/// through the router) to refuse an envelope for a device id no device has,
/// and one for a real device sealed with the wrong key. Both should cost
/// the same: the key lookup is in memory, and an unknown id is given the
/// work of a bad tag.
fn refusal_times(
    rt: &tokio::runtime::Runtime,
    server: &ecowatt_server::testing::TestServer,
    known: &ecowatt_core::session::Credentials,
) -> anyhow::Result<()> {
    use ecowatt_proto::messages::SyncRequest;
    use ecowatt_proto::seal::{self, Direction, Header, Keys};
    use tower::ServiceExt;
    let body = SyncRequest::default().encode();
    let forged = |device_id: u32, counter: u64| {
        let header =
            Header { msg_type: 1, direction: Direction::Up, key_version: 1, device_id, counter };
        seal::seal(&Keys::derive(&[0xEE; 16]), &header, None, &body)
    };
    let app = ecowatt_server::api::app(server.state.clone());
    let rounds = 5_000u64;
    let (mut unknown, mut bad_tag) = (Vec::new(), Vec::new());
    rt.block_on(async {
        for i in 0..rounds {
            for (device_id, out) in [(u32::MAX - 7, &mut unknown), (known.device_id, &mut bad_tag)]
            {
                let request = hyper::Request::post("/api/v1/device/sync")
                    .header("content-type", "application/octet-stream")
                    .body(axum::body::Body::from(forged(device_id, i + 1)))
                    .expect("request");
                let t0 = Instant::now();
                let answer = app.clone().oneshot(request).await.expect("infallible");
                out.push(t0.elapsed().as_nanos().min(u32::MAX as u128) as u32);
                assert_eq!(answer.status(), 401);
            }
        }
    });
    unknown.sort_unstable();
    bad_tag.sort_unstable();
    let us = |v: &[u32], p: f64| f64::from(percentile(v, p)) / 1000.0;
    println!(
        "Refusals, in process, {rounds} each, alternating: unknown device id p50 {:.1} µs p90 {:.1} µs; known device, bad tag p50 {:.1} µs p90 {:.1} µs",
        us(&unknown, 0.5),
        us(&unknown, 0.9),
        us(&bad_tag, 0.5),
        us(&bad_tag, 0.9)
    );
    Ok(())
}

fn protocol(devices: u64, requests: u64, max_time: Duration) -> anyhow::Result<()> {
    use ecowatt_core::kv::MemoryKv;
    use ecowatt_core::session::{Credentials, Session};
    use ecowatt_proto::messages::{CommandResult, MessageType, SyncRequest};
    use ecowatt_proto::seal::{self, Direction, Header, Keys};

    let body = SyncRequest {
        results: vec![CommandResult {
            command_id: 1,
            succeeded: true,
            exception: None,
            value: Some(50),
            executed_ms: 1,
        }],
        firmware: "1.0.0".into(),
        ..SyncRequest::default()
    }
    .encode();
    let keys = Keys::derive(&[7; 16]);
    let header = |counter| Header {
        msg_type: 1,
        direction: Direction::Up,
        key_version: 1,
        device_id: 1,
        counter,
    };
    let iterations = 200_000;
    println!(
        "Sealed envelopes, {}-byte sync request body, {iterations} each (single thread):",
        body.len()
    );
    rate("seal (AES-128-GCM)", iterations, |i| {
        black_box(seal::seal(&keys, &header(i + 1), None, black_box(&body)));
    });
    let sealed = seal::seal(&keys, &header(1), None, &body);
    rate("open + verify", iterations, |_| {
        black_box(seal::open(&keys, black_box(&sealed), None).expect("opens"));
    });

    let rt = tokio::runtime::Runtime::new()?;
    let db = ecowatt_server::testing::TempDb::sqlite();
    let server = rt.block_on(ecowatt_server::testing::TestServer::start(&db, false));
    let mut creds = Vec::new();
    for d in 0..devices {
        let key = [d as u8; 16];
        let device = rt.block_on(ecowatt_server::registration::register(
            &server.state.devices,
            &format!("bench-{d}"),
            10_000,
            &ecowatt_proto::hex::encode_upper(&key),
            "bench",
            ecowatt_server::now_ms(),
        ))?;
        creds.push(Credentials { device_id: device.id as u32, key, key_version: 1 });
    }
    println!(
        "Sealed syncs against the server on loopback (SQLite), {devices} devices, at most {requests} requests or {max_time:?}:"
    );
    let url = format!("{}/api/v1/device/sync", server.url);
    let per_device = requests.div_ceil(devices);
    let started = Instant::now();
    let deadline = started + max_time;
    let results: Vec<(u64, u64, Vec<u32>)> = std::thread::scope(|s| {
        let handles: Vec<_> = creds
            .iter()
            .map(|c| {
                let url = &url;
                s.spawn(move || {
                    let mut kv = MemoryKv::new();
                    let mut session = Session::start(c.clone(), &mut kv).expect("session");
                    let agent: ureq::Agent =
                        ureq::Agent::config_builder().http_status_as_error(false).build().into();
                    let body = SyncRequest::default().encode();
                    let (mut ok, mut failed, mut lat) = (0, 0, Vec::new());
                    for _ in 0..per_device {
                        if Instant::now() >= deadline {
                            break;
                        }
                        let t0 = Instant::now();
                        let sealed =
                            session.seal(&mut kv, MessageType::SyncRequest, &body).expect("seal");
                        let answer = agent
                            .post(url)
                            .header("content-type", "application/octet-stream")
                            .send(&sealed.bytes[..])
                            .ok()
                            .filter(|r| r.status() == 200)
                            .and_then(|mut r| r.body_mut().read_to_vec().ok());
                        match answer.map(|a| session.open(sealed.counter, &a)) {
                            Some(Ok(_)) => ok += 1,
                            _ => {
                                session.abandon(sealed.counter);
                                failed += 1
                            }
                        }
                        lat.push(t0.elapsed().as_micros().min(u32::MAX as u128) as u32);
                    }
                    (ok, failed, lat)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().expect("device thread")).collect()
    });
    let mut run = Run { ok: 0, failed: 0, latencies_us: Vec::new(), elapsed: started.elapsed() };
    for (ok, failed, lat) in results {
        run.ok += ok;
        run.failed += failed;
        run.latencies_us.extend(lat);
    }
    run.latencies_us.sort_unstable();
    report("sealed sync", &run);
    refusal_times(&rt, &server, &creds[0])?;

    // Push: one device long-polls; an operator queues a command through the API;
    // latency from the API's answer to the device holding the command.
    let name = "bench-push";
    let key = [0xA5u8; 16];
    let device = rt.block_on(ecowatt_server::registration::register(
        &server.state.devices,
        name,
        10_000,
        &ecowatt_proto::hex::encode_upper(&key),
        "bench",
        ecowatt_server::now_ms(),
    ))?;
    let c = Credentials { device_id: device.id as u32, key, key_version: 1 };
    let api: ureq::Agent = ureq::Agent::config_builder().http_status_as_error(false).build().into();
    let queue_url = format!("{}/api/v1/devices/{name}/commands", server.url);
    let token = format!("Bearer {}", server.admin_token);
    let rounds = 50;
    let mut push_lat = Vec::with_capacity(rounds);
    let mut kv = MemoryKv::new();
    let mut session = Session::start(c, &mut kv)?;
    let mut results = Vec::new();
    for _ in 0..rounds {
        // The device runs config v1, so only a command can end the wait.
        let applied = ecowatt_proto::messages::ConfigState {
            version: 1,
            poll_interval_ms: 5_000,
            upload_interval_ms: 900_000,
            registers: 0x03FF,
        };
        let body = SyncRequest {
            wait_ms: 10_000,
            applied: Some(applied),
            results: std::mem::take(&mut results),
            ..SyncRequest::default()
        }
        .encode();
        let sealed = session.seal(&mut kv, MessageType::SyncRequest, &body)?;
        let (tx, rx) = std::sync::mpsc::channel();
        let poll_url = url.clone();
        let counter = sealed.counter;
        let poller = std::thread::spawn(move || {
            let agent: ureq::Agent =
                ureq::Agent::config_builder().http_status_as_error(false).build().into();
            let answer = agent
                .post(&poll_url)
                .header("content-type", "application/octet-stream")
                .send(&sealed.bytes[..])
                .ok()
                .and_then(|mut r| r.body_mut().read_to_vec().ok());
            let _ = tx.send(Instant::now());
            answer
        });
        std::thread::sleep(Duration::from_millis(20));
        // From the moment the operator sends the command (an upper bound: it includes
        // the operator's own request).
        let queued = Instant::now();
        api.post(&queue_url).header("Authorization", &token).send_json(
            serde_json::json!({"type": "read_register", "parameters": {"register_address": 9}}),
        )?;
        let received = rx.recv_timeout(Duration::from_secs(15))?;
        let answer = poller.join().expect("poller").ok_or_else(|| anyhow::anyhow!("no answer"))?;
        let (_, plain) = session.open(counter, &answer)?;
        let resp = ecowatt_proto::messages::SyncResponse::decode(&plain)?;
        for cmd in resp.commands {
            results.push(CommandResult {
                command_id: cmd.id,
                succeeded: true,
                exception: None,
                value: Some(1),
                executed_ms: 0,
            });
        }
        anyhow::ensure!(received > queued, "the sync ended before the command was sent");
        push_lat.push(received.duration_since(queued).as_micros().min(u32::MAX as u128) as u32);
    }
    push_lat.sort_unstable();
    let push = Run {
        ok: rounds as u64,
        failed: 0,
        latencies_us: push_lat,
        elapsed: Duration::from_secs(1),
    };
    println!(
        "Push: operator sends a command to the API -> long-polling device holds it ({rounds} rounds):"
    );
    report("push latency", &push);
    rt.block_on(server.stop());
    anyhow::ensure!(run.failed == 0, "{} syncs failed", run.failed);
    Ok(())
}

fn codec_bench(batch: usize, seed: u64) {
    use ecowatt_proto::codec::{self, Sample};
    use ecowatt_sim::model::{Model, ModelConfig};

    // 2026-06-21 00:00 UTC; local solar time = UTC.
    let midnight: u64 = 1_782_000_000_000;
    let poll_ms = 5_000;
    let day: Vec<Sample> = {
        let mut m = Model::new(ModelConfig { seed, ..ModelConfig::default() });
        (0..17_280u64)
            .map(|i| {
                let t = midnight + i * poll_ms;
                Sample { seq: i + 1, unix_ms: t, values: m.read(t).to_registers().to_vec() }
            })
            .collect()
    };
    // Night, as the course SIM answers: every register constant.
    let night: Vec<Sample> = (0..1_440u64)
        .map(|i| Sample {
            seq: i + 1,
            unix_ms: midnight + i * poll_ms,
            values: vec![0x0904, 0, 0x138F, 0x066A, 0x0663, 0, 0, 0x0161, 0x0032, 0],
        })
        .collect();
    println!(
        "Telemetry codec, {batch}-sample batches of 10 registers (5 s poll); bytes per sample (per value):"
    );
    for (label, samples) in [("simulated day (24 h, seed)", &day), ("constant night (2 h)", &night)]
    {
        let (mut ours, mut raw, mut deflate, mut biggest) = (0usize, 0usize, 0usize, 0usize);
        for chunk in samples.chunks(batch) {
            let encoded = codec::encode(0x03FF, chunk).expect("valid batch");
            biggest = biggest.max(encoded.len());
            ours += encoded.len();
            // Raw: seq (8) + time (8) + 10 registers (20) per sample, as a naive device would send.
            let mut bytes = Vec::with_capacity(chunk.len() * 36);
            for s in chunk {
                bytes.extend_from_slice(&s.seq.to_be_bytes());
                bytes.extend_from_slice(&s.unix_ms.to_be_bytes());
                for v in &s.values {
                    bytes.extend_from_slice(&v.to_be_bytes());
                }
            }
            raw += bytes.len();
            deflate += miniz_oxide::deflate::compress_to_vec(&bytes, 6).len();
            assert_eq!(codec::decode(&encoded).expect("decodes").samples, chunk, "lossless");
        }
        let n = samples.len() as f64;
        let per = |b: usize| format!("{:>6.2} ({:.2})", b as f64 / n, b as f64 / n / 10.0);
        println!(
            "  {label:<28} codec v1 {}   raw {}   deflate {}   largest batch {biggest} B",
            per(ours),
            per(raw),
            per(deflate)
        );
    }
    println!(
        "  (raw registers alone, without seq and time: 20 B per sample; encoder state: a few integers besides its output)"
    );
}
