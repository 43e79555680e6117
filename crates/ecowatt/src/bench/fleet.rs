//! `ecowatt bench fleet`: many devices in this process against an `ecowatt
//! server` child process on loopback, while an operator queues commands.
//! Each device is the core's device machine, as `ecowatt device` runs it
//! (sampling, sealed long-poll syncs, sealed uploads of 60-sample batches,
//! commands executed with read-back), with the simulator's model as its
//! inverter and memory as its stores, on a clock that runs fast enough for a
//! 5 s poll to fill a batch every `--upload-every`. Bounded in devices and time.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Args;
use ecowatt_core::kv::MemoryKv;
use ecowatt_core::link::Outcome;
use ecowatt_core::machine::{Action, Channel, Device, Event, Failure, Note, Settings};
use ecowatt_core::ota::{FlashError, Slot, Slots};
use ecowatt_core::session::Credentials;
use ecowatt_proto::firmware::Version;
use ecowatt_proto::modbus::{Exception, ExceptionCode, Request, Response};
use ecowatt_sim::model::{Model, ModelConfig};
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

use super::measure::{ProcFiles, ServerProcess, proc_usage};
use crate::units::parse_duration;

/// Bytes of a sealed upload besides its batch: envelope header and tag, and
/// the upload's fields (first seq, count, dropped total, codec, length).
const UPLOAD_OVERHEAD: u64 =
    (ecowatt_proto::seal::HEADER_LEN + ecowatt_proto::seal::TAG_LEN + 8 + 2 + 8 + 1 + 4) as u64;

/// Simulate a fleet against a server on loopback.
#[derive(Args, Debug)]
pub struct FleetArgs {
    /// Devices (each holds a long poll open).
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u64).range(1..=10_000))]
    devices: u64,
    /// Time before measuring: the devices connect (long polls spread over the
    /// first 5 s) and the server works off that connection storm (each new
    /// device's first sync is a transaction of its own: with 10,000 devices
    /// on PostgreSQL give it 60s).
    #[arg(long, default_value = "15s", value_parser = parse_duration)]
    warmup: Duration,
    /// How long to measure (after the warm-up).
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    duration: Duration,
    /// Real time between two uploads of one device; each carries 60 samples (5 min at a 5 s poll).
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    upload_every: Duration,
    /// Commands the operator queues per second (to random devices).
    #[arg(long, default_value_t = 5.0)]
    commands_per_sec: f64,
    /// PostgreSQL URL for the server (default: SQLite in a temporary directory).
    #[arg(long)]
    database: Option<String>,
    /// The server also publishes every batch to this MQTT broker (`--mqtt`),
    /// to measure what publishing costs the fleet.
    #[arg(long, value_name = "URL")]
    mqtt: Option<String>,
    /// How the devices reach the server: HTTP long polls and uploads, or the same sealed
    /// requests through an MQTT broker (a Mosquitto this bench starts; `--device-broker`).
    #[arg(long, value_enum, default_value = "http")]
    transport: Transport,
    /// Raw telemetry kept this long by the server (`--telemetry-retention-days`), e.g. 60s:
    /// with a run longer than it, the data directory's size (printed every 10 s) stays flat.
    #[arg(long, value_parser = parse_duration)]
    retention: Option<Duration>,
    /// Newest telemetry codec the devices may use (1, or 2: negotiated with the server).
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u8).range(1..=2))]
    codec: u8,
    /// Instead of commands: one curtailment of the whole fleet (`bench curtail`).
    #[arg(skip)]
    curtail: Option<CurtailPlan>,
}

/// How the fleet's devices reach the server.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transport {
    /// `POST /api/v1/device/*` on loopback.
    Http,
    /// Through a Mosquitto started for the run (`ecowatt server --device-broker`).
    Mqtt,
}

/// A fleet tagged `bench`, curtailed once after the warm-up.
#[derive(Args, Debug)]
pub struct CurtailArgs {
    /// Devices (each holds a long poll open), all in the curtailed group.
    #[arg(long, default_value_t = 1_000, value_parser = clap::value_parser!(u64).range(1..=10_000))]
    devices: u64,
    /// Time before the curtailment: the devices connect and settle.
    #[arg(long, default_value = "20s", value_parser = parse_duration)]
    warmup: Duration,
    /// How long to wait for every device to confirm.
    #[arg(long, default_value = "20s", value_parser = parse_duration)]
    timeout: Duration,
    /// Real time between two uploads of one device (60 samples each).
    #[arg(long, default_value = "60s", value_parser = parse_duration)]
    upload_every: Duration,
    /// The export limit asked, %.
    #[arg(long, default_value_t = 30)]
    percent: u8,
    /// PostgreSQL URL for the server (default: SQLite in a temporary directory).
    #[arg(long)]
    database: Option<String>,
}

/// What `bench curtail` does after the warm-up.
#[derive(Debug, Clone, Copy)]
pub struct CurtailPlan {
    percent: u8,
}

/// `ecowatt bench curtail`: the fleet bench with one group curtailment.
pub fn run_curtail(args: CurtailArgs) -> anyhow::Result<()> {
    run(FleetArgs {
        devices: args.devices,
        warmup: args.warmup,
        duration: args.timeout,
        upload_every: args.upload_every,
        commands_per_sec: 0.0,
        database: args.database,
        mqtt: None,
        transport: Transport::Http,
        retention: None,
        codec: 2,
        curtail: Some(CurtailPlan { percent: args.percent }),
    })
}

/// Loopback source addresses (127.0.1.1 up) the uploads connect from.
const UPLOAD_SOURCES: u8 = 64;

type Http = Client<hyper_util::client::legacy::connect::HttpConnector, Full<Bytes>>;

#[derive(Default)]
struct Stats {
    upload_lat_us: Vec<u32>,
    /// Slowest upload started in each 5 s of the measurement, µs.
    worst_per_5s: Vec<u32>,
    uploads: u64,
    batch_bytes: u64,
    /// The encoded batches alone (what the server stores).
    stored_bytes: u64,
    points: u64,
    errors: HashMap<String, u64>,
    delivery_lat_us: Vec<u32>,
    syncs: u64,
    /// Long polls answered after the measurement (the server's shutdown answers them).
    syncs_after: u64,
    /// Long polls that failed once the server was told to stop.
    stop_errors: u64,
    /// The server has been told to stop.
    stopping: bool,
}

async fn post(http: &Http, url: &str, body: Vec<u8>) -> Result<Vec<u8>, Failure> {
    let req = hyper::Request::post(url)
        .header("content-type", "application/octet-stream")
        .body(Full::new(Bytes::from(body)))
        .map_err(|e| Failure::unreachable(e.to_string()))?;
    let resp = http.request(req).await.map_err(|e| {
        // The first failure of each kind is printed whole, for diagnosis.
        use std::sync::atomic::{AtomicBool, Ordering};
        static SHOWN: [AtomicBool; 2] = [AtomicBool::new(false), AtomicBool::new(false)];
        let kind = if e.is_connect() { "connect" } else { "request" };
        if !SHOWN[usize::from(e.is_connect())].swap(true, Ordering::Relaxed) {
            eprintln!("fleet: first {kind} error: {:?}", std::error::Error::source(&e));
        }
        Failure::unreachable(kind)
    })?;
    let status = resp.status().as_u16();
    let bytes =
        resp.into_body().collect().await.map_err(|_| Failure::unreachable("read"))?.to_bytes();
    if status == 200 {
        Ok(bytes.to_vec())
    } else {
        Err(Failure { status: Some(status), message: String::from_utf8_lossy(&bytes).into() })
    }
}

/// How a failed request is counted.
fn kind(f: &Failure) -> String {
    match f.status {
        Some(s) => format!("http_{s}"),
        None => f.message.clone(),
    }
}

/// A device of the fleet has no image slots: it is never offered an update.
struct NoSlots;

impl Slots for NoSlots {
    fn erase(&mut self, _: Slot) -> Result<(), FlashError> {
        Err(FlashError("no image slots".into()))
    }
    fn write(&mut self, _: Slot, _: u64, _: &[u8]) -> Result<(), FlashError> {
        Err(FlashError("no image slots".into()))
    }
    fn read(&mut self, _: Slot, _: u64, _: &mut [u8]) -> Result<(), FlashError> {
        Err(FlashError("no image slots".into()))
    }
}

/// The simulator's model answering a Modbus request at `t_ms`.
fn inverter(model: &mut Model, request: &Request, t_ms: u64) -> Outcome {
    let regs = model.read(t_ms).to_registers();
    match *request {
        Request::ReadHoldingRegisters { start, quantity } => {
            match regs.get(start as usize..start as usize + quantity as usize) {
                Some(v) => Ok(Ok(Response::ReadHoldingRegisters(v.to_vec()))),
                None => Ok(Err(Exception { function: 3, code: ExceptionCode::IllegalDataAddress })),
            }
        }
        Request::WriteSingleRegister { address, value } => {
            // The export limit takes (read back from the next reading); other
            // registers are read-only, as on the simulator.
            if address != ecowatt_proto::registers::EXPORT_LIMIT || value > 100 {
                return Ok(Err(Exception { function: 6, code: ExceptionCode::IllegalDataAddress }));
            }
            model.set_limit_pct(value);
            Ok(Ok(Response::WriteSingleRegister { address, value }))
        }
    }
}

/// What every device of the fleet shares.
struct Fleet {
    http: Http,
    upload_http: Vec<Http>,
    upload_slots: Arc<tokio::sync::Semaphore>,
    stats: Arc<Mutex<Stats>>,
    queued: Arc<Mutex<HashMap<u64, Instant>>>,
    base: String,
    /// The device broker, with `--transport mqtt`.
    broker: Option<String>,
    devices: u64,
    every: Duration,
    /// The codecs the devices may use (a bit set).
    codecs: u8,
    start: Instant,
    measure_from: Instant,
    deadline: Instant,
}

/// Virtual ms per real ms: a 5 s poll fills a 60-sample batch every `every`.
fn speed(every: Duration) -> f64 {
    300_000.0 / (every.as_millis().max(1) as f64)
}

/// One device: boots when its turn comes (spread over one upload interval),
/// then replays its virtual time in order, carrying out what the machine asks.
async fn run_device(i: usize, creds: Credentials, fleet: Arc<Fleet>) {
    let speed = speed(fleet.every);
    // Boots spread over an upload interval (at most 10 s).
    let spread = fleet.every.min(Duration::from_secs(10));
    let boot_at = fleet.start + spread.mul_f64(i as f64 / fleet.devices as f64);
    tokio::time::sleep_until(boot_at.into()).await;
    // Daytime readings, a different hour for each device.
    let v0 = 1_782_043_200_000u64 - 6 * 3_600_000 + (i as u64 % 100) * 300_000;
    let vnow = || v0 + (boot_at.elapsed().as_secs_f64() * 1000.0 * speed) as u64;
    let mut settings = Settings::new(Version::parse("1.0.0").expect("a version"), "fleet");
    settings.log_capacity = 240;
    settings.batch_max = 60;
    settings.codecs = fleet.codecs;
    // Long polls run out at different times, as in a real fleet.
    settings.long_poll_ms = 15_000 + (i as u32 % 10) * 1_000;
    let creds_key = creds.key;
    let Ok(mut device) = Device::boot(MemoryKv::new(), NoSlots, creds, settings, v0) else {
        return;
    };
    let (answers, mut answered) = tokio::sync::mpsc::unbounded_channel::<Event>();
    let broker = match &fleet.broker {
        Some(url) => {
            let who = ecowatt_device::broker::BrokerIdentity {
                device: format!("fleet-{i}"),
                key: creds_key,
                key_version: 1,
            };
            let topics = ecowatt_formats::broker::DeviceTopics::default();
            match ecowatt_device::broker::BrokerNet::start(url, None, &who, topics) {
                Ok(b) => Some(b),
                Err(e) => {
                    eprintln!("fleet: device {i} cannot use the broker: {e}");
                    return;
                }
            }
        }
        None => None,
    };
    let mut shell = Shell {
        broker,
        model: Model::new(ModelConfig { seed: i as u64, ..ModelConfig::default() }),
        upload_http: fleet.upload_http[i % fleet.upload_http.len()].clone(),
        fleet,
        answers,
        upload_started: None,
        acked: 0,
    };
    let mut clock = v0;
    loop {
        // What the machine asked for (at boot, or after the last event).
        shell.carry(&mut device, clock);
        // Virtual time up to now, in order: each sample at its own time.
        let now = vnow();
        while device.next_wakeup() <= now {
            clock = clock.max(device.next_wakeup());
            device.handle(clock, Event::Tick);
            shell.carry(&mut device, clock);
        }
        let real_wait = ((device.next_wakeup().saturating_sub(now)) as f64 / speed) as u64;
        let wake = Instant::now() + Duration::from_millis(real_wait.clamp(50, 1_000));
        tokio::select! {
            Some(event) = answered.recv() => {
                if !shell.count(&event) {
                    return;
                }
                clock = clock.max(vnow());
                device.handle(clock, event);
            }
            _ = tokio::time::sleep_until(wake.into()) => {}
        }
    }
}

/// One device's shell: its inverter (the simulator's model), its upload
/// client, where answers go, and what the statistics need.
struct Shell {
    fleet: Arc<Fleet>,
    /// Its broker connection, with `--transport mqtt`.
    broker: Option<ecowatt_device::broker::BrokerNet>,
    model: Model,
    upload_http: Http,
    answers: tokio::sync::mpsc::UnboundedSender<Event>,
    /// The upload outstanding: when it left and its size.
    upload_started: Option<(Instant, u64)>,
    /// The highest seq the server acknowledged.
    acked: u64,
}

impl Shell {
    /// Carries out the machine's actions: the inverter at once (in process),
    /// the server's requests on tasks whose answers come back as events.
    fn carry(&mut self, device: &mut Device<MemoryKv, NoSlots>, clock: u64) {
        while let Some(action) = device.poll_action() {
            match action {
                Action::Inverter { request, .. } => {
                    let outcome = inverter(&mut self.model, &request, clock);
                    device.handle(clock, Event::Inverter(outcome));
                }
                // No request starts after the measurement (the server is stopping).
                Action::Post { .. } if Instant::now() >= self.fleet.deadline => {}
                Action::Post { channel, body, timeout_ms } if self.broker.is_some() => {
                    if channel == Channel::Upload {
                        self.upload_started = Some((Instant::now(), body.len() as u64));
                    }
                    let (answers, net) = (self.answers.clone(), self.broker.clone());
                    tokio::spawn(async move {
                        let net = net.expect("a broker");
                        let answer = net.post(channel, &body, timeout_ms).await;
                        let _ = answers.send(Event::Server { channel, answer });
                    });
                }
                Action::Post { channel, body, .. } => {
                    let (http, slots) = match channel {
                        Channel::Sync => (self.fleet.http.clone(), None),
                        Channel::Upload => {
                            self.upload_started = Some((Instant::now(), body.len() as u64));
                            (self.upload_http.clone(), Some(self.fleet.upload_slots.clone()))
                        }
                    };
                    let answers = self.answers.clone();
                    let url = format!("{}{}", self.fleet.base, channel.path());
                    tokio::spawn(async move {
                        let _slot = match &slots {
                            Some(s) => Some(s.acquire().await.expect("never closed")),
                            None => None,
                        };
                        let answer = post(&http, &url, body).await;
                        let _ = answers.send(Event::Server { channel, answer });
                    });
                }
                Action::Fetch { .. } => {
                    let answer = Err(Failure::unreachable("no image slots"));
                    let _ = self.answers.send(Event::Chunk(answer));
                }
                Action::Restart => {}
                Action::Note(note) => self.note(&note),
            }
        }
    }

    /// Counts an answer; `false` when the device is to stop (the server is
    /// stopping and this was not a long poll's answer).
    fn count(&self, event: &Event) -> bool {
        let Event::Server { channel, answer } = event else { return true };
        let now = Instant::now();
        let mut st = self.fleet.stats.lock().expect("stats");
        let stopping = st.stopping;
        let sync_ok = *channel == Channel::Sync && answer.is_ok();
        // Only answers within the measurement count towards the rate.
        if sync_ok && now >= self.fleet.deadline {
            st.syncs_after += 1;
        } else if sync_ok && now >= self.fleet.measure_from {
            st.syncs += 1;
        }
        if let Err(f) = answer {
            if stopping {
                st.stop_errors += 1;
            } else {
                let name = if *channel == Channel::Sync { "sync" } else { "upload" };
                *st.errors.entry(format!("{name} {}", kind(f))).or_default() += 1;
            }
        }
        !stopping || sync_ok
    }

    fn note(&mut self, note: &Note) {
        let fleet = &self.fleet;
        match note {
            Note::Uploaded { acked_through, .. } => {
                let points = acked_through.saturating_sub(self.acked) * 10;
                self.acked = self.acked.max(*acked_through);
                let Some((t0, bytes)) = self.upload_started.take() else { return };
                if t0 < fleet.measure_from {
                    return;
                }
                let us = t0.elapsed().as_micros().min(u32::MAX as u128) as u32;
                let mut st = fleet.stats.lock().expect("stats");
                st.uploads += 1;
                st.points += points;
                st.batch_bytes += bytes;
                // Less the envelope (header and tag) and the upload's own fields.
                st.stored_bytes += bytes.saturating_sub(UPLOAD_OVERHEAD);
                st.upload_lat_us.push(us);
                let slot = (t0 - fleet.measure_from).as_secs() as usize / 5;
                if st.worst_per_5s.len() <= slot {
                    st.worst_per_5s.resize(slot + 1, 0);
                }
                st.worst_per_5s[slot] = st.worst_per_5s[slot].max(us);
            }
            Note::UploadFailed { .. } => self.upload_started = None,
            Note::CommandExecuted { result, .. } => {
                if let Some(t) = fleet.queued.lock().expect("queued").remove(&result.command_id) {
                    let us = t.elapsed().as_micros().min(u32::MAX as u128) as u32;
                    fleet.stats.lock().expect("stats").delivery_lat_us.push(us);
                }
            }
            _ => {}
        }
    }
}

/// Bytes of the files in `dir` (the SQLite store, its WAL).
fn dir_bytes(dir: &std::path::Path) -> u64 {
    std::fs::read_dir(dir)
        .map(|d| d.flatten().filter_map(|e| e.metadata().ok()).map(|m| m.len()).sum())
        .unwrap_or(0)
}

/// This process's limit on open files (`/proc/self/limits`).
fn open_files_limit() -> Option<u64> {
    let limits = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    line.split_whitespace().nth(3)?.parse().ok()
}

pub fn run(args: FleetArgs) -> anyhow::Result<()> {
    let mut extra: Vec<&str> = Vec::new();
    if let Some(db) = &args.database {
        extra.extend(["--database", db]);
    }
    if let Some(broker) = &args.mqtt {
        extra.extend(["--mqtt", broker]);
    }
    let mosquitto = match args.transport {
        Transport::Mqtt => Some(Mosquitto::start()?),
        Transport::Http => None,
    };
    let device_broker = mosquitto.as_ref().map(|m| format!("mqtt://127.0.0.1:{}", m.port));
    let retention_days = args.retention.map(|r| format!("{}", r.as_secs_f64() / 86_400.0));
    if let Some(days) = &retention_days {
        extra.extend(["--telemetry-retention-days", days]);
    }
    if let Some(url) = &device_broker {
        extra.extend(["--device-broker", url]);
    }
    // The server's log filter: warnings, unless ECOWATT_FLEET_SERVER_LOG says
    // otherwise (`ecowatt_server::telemetry::ingest=debug` logs every group).
    let server = ServerProcess::start("fleet", &extra, "ECOWATT_FLEET_SERVER_LOG", "warn")?;
    let result =
        tokio::runtime::Runtime::new()?.block_on(drive(&args, &server, mosquitto.as_ref()));
    server.stop();
    result
}

/// A Mosquitto for `--transport mqtt`: anonymous, on a free loopback port,
/// with room for the fleet's answers in flight; killed when dropped.
struct Mosquitto {
    child: std::process::Child,
    port: u16,
    _dir: tempfile::TempDir,
}

impl Mosquitto {
    fn start() -> anyhow::Result<Mosquitto> {
        let dir = tempfile::tempdir()?;
        let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        // `user root`: as root it would otherwise switch to its own user (as
        // another user the line has no effect).
        let conf = format!(
            "user root\nlistener {port} 127.0.0.1\nallow_anonymous true\nmax_inflight_messages 1000\nmax_queued_messages 100000\nset_tcp_nodelay true\n"
        );
        std::fs::write(dir.path().join("mosquitto.conf"), conf)?;
        let child = std::process::Command::new("mosquitto")
            .arg("-c")
            .arg(dir.path().join("mosquitto.conf"))
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .context("--transport mqtt starts a Mosquitto: is `mosquitto` installed?")?;
        let mut m = Mosquitto { child, port, _dir: dir };
        let t0 = Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            if let Ok(Some(status)) = m.child.try_wait() {
                anyhow::bail!("mosquitto exited at start: {status}");
            }
            anyhow::ensure!(t0.elapsed() < Duration::from_secs(10), "mosquitto did not listen");
            std::thread::sleep(Duration::from_millis(20));
        }
        outln!(
            "Fleet: devices reach the server through Mosquitto at 127.0.0.1:{port} (pid {})",
            m.child.id()
        );
        Ok(m)
    }
}

impl Drop for Mosquitto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn drive(
    args: &FleetArgs,
    server: &ServerProcess,
    mosquitto: Option<&Mosquitto>,
) -> anyhow::Result<()> {
    let (ops, base, token) = server.operator().await?;
    let (dir, pid) = (server.dir.as_path(), server.pid());
    let auth = format!("Bearer {token}");
    // Devices, provisioned through the API (4 at a time).
    let mut creds = Vec::new();
    let started = Instant::now();
    for i in 0..args.devices {
        let (ops, base, auth) = (ops.clone(), base.clone(), auth.clone());
        let v: serde_json::Value = tokio::task::spawn_blocking(move || {
            ops.post(format!("{base}/api/v1/devices"))
                .header("Authorization", &auth)
                .send_json(serde_json::json!({
                    "name": format!("fleet-{i}"),
                    "tags": ["bench"],
                    "failsafe": "hold",
                }))
                .ok()
                .and_then(|mut r| r.body_mut().read_json().ok())
        })
        .await?
        .context("provisioning a device")?;
        let p = &v["provisioning"];
        let key: [u8; 16] = ecowatt_proto::hex::decode(p["key"].as_str().unwrap_or(""))
            .ok()
            .and_then(|k| k.try_into().ok())
            .context("key")?;
        creds.push(Credentials {
            device_id: p["device_id"].as_u64().unwrap_or(0) as u32,
            key,
            key_version: 1,
        });
    }
    outln!(
        "Fleet: {} devices provisioned in {:.1} s; server pid {pid}",
        args.devices,
        started.elapsed().as_secs_f64()
    );

    let http: Http =
        Client::builder(TokioExecutor::new()).pool_max_idle_per_host(usize::MAX).build_http();
    // A device uploads every few minutes: between two uploads its connection
    // is gone (the agent's idle timeout), so each upload opens its own rather
    // than borrowing one of thousands kept idle. Those connections come from
    // `UPLOAD_SOURCES` loopback addresses: from one, at 1,667 new connections
    // a second, the kernel's search for a free ephemeral port (28,000 of
    // them, most in use or in TIME_WAIT) took 40 % of this machine's CPU
    // (`__inet_check_established`), load-generator time that starved the
    // server it measures.
    let upload_http: Vec<Http> = (0..UPLOAD_SOURCES)
        .map(|k| {
            let mut connector = hyper_util::client::legacy::connect::HttpConnector::new();
            connector.set_local_address(Some(std::net::Ipv4Addr::new(127, 0, 1, k + 1).into()));
            Client::builder(TokioExecutor::new()).pool_max_idle_per_host(0).build(connector)
        })
        .collect();
    // This process holds a socket per long poll plus one per upload in
    // flight. While the server works off the first connection storm, uploads
    // pile up: past the open-files limit they failed here with EMFILE (a
    // load-generator error, not the server's). They wait for a slot instead;
    // the wait counts in their latency.
    let upload_slots = Arc::new(tokio::sync::Semaphore::new(
        open_files_limit().unwrap_or(1024).saturating_sub(args.devices + 500).max(64) as usize,
    ));
    let stats = Arc::new(Mutex::new(Stats::default()));
    let queued: Arc<Mutex<HashMap<u64, Instant>>> = Arc::default();
    let mut proc_files = ProcFiles::open(pid)?;
    let mut own_files = ProcFiles::open(std::process::id())?;
    let mut broker_files = match mosquitto {
        Some(m) => Some(ProcFiles::open(m.child.id())?),
        None => None,
    };
    let start = Instant::now();
    let fleet = Arc::new(Fleet {
        http,
        upload_http,
        upload_slots,
        stats: stats.clone(),
        queued: queued.clone(),
        base: base.clone(),
        broker: mosquitto.map(|m| format!("mqtt://127.0.0.1:{}", m.port)),
        devices: args.devices,
        every: args.upload_every,
        codecs: (2..=args.codec).fold(1 << ecowatt_proto::codec::CODEC_V1, |set, v| set | 1 << v),
        start,
        measure_from: start + args.warmup,
        deadline: start + args.warmup + args.duration,
    });
    let (measure_from, deadline) = (fleet.measure_from, fleet.deadline);
    let tasks: Vec<_> = creds
        .into_iter()
        .enumerate()
        .map(|(i, c)| tokio::spawn(run_device(i, c, fleet.clone())))
        .collect();
    // The operator.
    tokio::time::sleep_until(measure_from.into()).await;
    let usage_start = proc_usage(&mut proc_files);
    let own_start = proc_usage(&mut own_files);
    let broker_start = broker_files.as_mut().map(proc_usage);
    let measure_start = Instant::now();
    // The store's size every 10 s (SQLite: the data directory; PostgreSQL:
    // the database), flat once retention removes as much as arrives.
    let sizes: Arc<Mutex<Vec<u64>>> = Arc::default();
    {
        let (sizes, dir, database) = (sizes.clone(), dir.to_path_buf(), args.database.clone());
        tokio::spawn(async move {
            while Instant::now() < deadline {
                let bytes = match &database {
                    Some(url) => ecowatt_server::db::postgres_bytes(url).await.unwrap_or(0),
                    None => dir_bytes(&dir),
                };
                sizes.lock().expect("sizes").push(bytes);
                tokio::time::sleep(Duration::from_secs(10)).await;
            }
        });
    }
    let mut rng = 0x9E37_79B9u64;
    let gap = Duration::from_secs_f64(1.0 / args.commands_per_sec.max(0.1));
    let mut curtail_lines = Vec::new();
    if let Some(plan) = args.curtail {
        let (ops, base, auth) = (ops.clone(), base.clone(), auth.clone());
        curtail_lines =
            tokio::task::spawn_blocking(move || curtail_once(&ops, &base, &auth, plan, deadline))
                .await??;
        let (rss, peak, ticks) = proc_usage(&mut proc_files);
        let cpu = (ticks.saturating_sub(usage_start.2)) as f64
            / 100.0
            / measure_start.elapsed().as_secs_f64()
            * 100.0;
        curtail_lines.push(format!(
            "Server during the curtailment: CPU {cpu:.0} % (of one core), RSS {} MB (peak {} MB)",
            rss / 1024,
            peak / 1024
        ));
    }
    while args.curtail.is_none() && Instant::now() + gap < deadline {
        tokio::time::sleep(gap).await;
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        let device = format!("fleet-{}", rng % args.devices);
        let (ops, base, auth, queued) = (ops.clone(), base.clone(), auth.clone(), queued.clone());
        tokio::task::spawn_blocking(move || {
            let t = Instant::now();
            let v: Option<serde_json::Value> = ops
                .post(format!("{base}/api/v1/devices/{device}/commands"))
                .header("Authorization", &auth)
                .send_json(serde_json::json!({"type": "read_register", "parameters": {"register_address": 9}}))
                .ok()
                .and_then(|mut r| r.body_mut().read_json().ok());
            if let Some(id) = v.and_then(|v| v["id"].as_u64()) {
                queued.lock().expect("queued").insert(id, t);
            }
        });
    }
    // The last gap (or all of it, with a slow operator) runs to the end.
    tokio::time::sleep_until(deadline.into()).await;
    let sizes: Vec<String> =
        sizes.lock().expect("sizes").iter().map(|b| format!("{:.0}", *b as f64 / 1e6)).collect();
    let elapsed = measure_start.elapsed().as_secs_f64();
    let usage_end = proc_usage(&mut proc_files);
    let own_end = proc_usage(&mut own_files);
    let broker_end = broker_files.as_mut().map(proc_usage);
    // Shutdown under load: SIGTERM with every long poll open, then the time
    // until the process is gone and how the long polls ended.
    let open = {
        let (ops, base) = (ops.clone(), base.clone());
        tokio::task::spawn_blocking(move || connections_open(&ops, &base)).await?
    };
    stats.lock().expect("stats").stopping = true;
    let _ = std::process::Command::new("kill").args(["-TERM", &pid.to_string()]).status();
    let exited =
        tokio::task::spawn_blocking(move || wait_exit(pid, Duration::from_secs(60))).await?;
    // The long polls' answers (or errors) are in by the time the process is gone.
    tokio::time::sleep(Duration::from_millis(200)).await;
    for t in tasks {
        t.abort();
    }
    let mut st = stats.lock().expect("stats");
    let shutdown_line = format!(
        "Shutdown: SIGTERM with {} connections open; exited in {}; long polls answered at once: {}, failed: {}",
        open.map_or("?".to_owned(), |n| n.to_string()),
        exited.map_or("more than 60 s".to_owned(), |d| format!("{} ms", d.as_millis())),
        st.syncs_after,
        st.stop_errors,
    );
    let cpu = (usage_end.2.saturating_sub(usage_start.2)) as f64 / 100.0 / elapsed * 100.0;
    let own_cpu = (own_end.2.saturating_sub(own_start.2)) as f64 / 100.0 / elapsed * 100.0;
    let db_bytes = dir_bytes(dir);
    st.upload_lat_us.sort_unstable();
    st.delivery_lat_us.sort_unstable();
    let worst: Vec<String> =
        st.worst_per_5s.iter().map(|us| format!("{:.0}", f64::from(*us) / 1000.0)).collect();
    let ms = |v: &[u32], p: f64| f64::from(super::measure::percentile(v, p)) / 1000.0;
    let (u50, u99, umax) =
        (ms(&st.upload_lat_us, 0.5), ms(&st.upload_lat_us, 0.99), ms(&st.upload_lat_us, 1.0));
    let (d50, d99, dmax) =
        (ms(&st.delivery_lat_us, 0.5), ms(&st.delivery_lat_us, 0.99), ms(&st.delivery_lat_us, 1.0));
    outln!(
        "Measured {elapsed:.1} s: {} uploads ({:.0}/s), {:.0} data points/s; upload latency p50 {u50:.1} ms p99 {u99:.1} ms max {umax:.1} ms",
        st.uploads,
        st.uploads as f64 / elapsed,
        st.points as f64 / elapsed,
    );
    outln!("Slowest upload per 5 s, ms: {}", worst.join(" "));
    let what = if args.database.is_some() { "Database" } else { "Data directory" };
    outln!("{what} every 10 s, MB: {}", sizes.join(" "));
    outln!(
        "Long polls answered: {} ({:.0}/s); commands delivered through them: {}; latency p50 {d50:.1} ms p99 {d99:.1} ms max {dmax:.1} ms",
        st.syncs,
        st.syncs as f64 / elapsed,
        st.delivery_lat_us.len(),
    );
    let sqlite = if args.database.is_none() {
        format!(" ({db_bytes} B SQLite data directory)")
    } else {
        String::new()
    };
    outln!(
        "Server: RSS {} MB (peak {} MB), CPU {cpu:.0} % (of one core); {:.2} B per data point uploaded (sealed batches), {:.3} B stored (the encoded batches){sqlite}",
        usage_end.0 / 1024,
        usage_end.1 / 1024,
        if st.points > 0 { st.batch_bytes as f64 / st.points as f64 } else { 0.0 },
        if st.points > 0 { st.stored_bytes as f64 / st.points as f64 } else { 0.0 },
    );
    outln!(
        "Load generator (this process: the devices and the operator): CPU {own_cpu:.0} % (of one core), RSS {} MB",
        own_end.0 / 1024
    );
    if let (Some(s), Some(e)) = (broker_start, broker_end) {
        let cpu = (e.2.saturating_sub(s.2)) as f64 / 100.0 / elapsed * 100.0;
        outln!(
            "Broker (mosquitto): CPU {cpu:.0} % (of one core), RSS {} MB (peak {} MB)",
            e.0 / 1024,
            e.1 / 1024
        );
    }
    let mut errors: Vec<_> = st.errors.iter().collect();
    errors.sort();
    outln!("Errors: {}", if errors.is_empty() { "none".to_owned() } else { format!("{errors:?}") });
    outln!("{shutdown_line}");
    for l in curtail_lines {
        outln!("{l}");
    }
    Ok(())
}

/// Curtails group `bench` and follows its progress until every device
/// confirmed or failed (or `deadline`); returns the report's lines.
fn curtail_once(
    ops: &ureq::Agent,
    base: &str,
    auth: &str,
    plan: CurtailPlan,
    deadline: Instant,
) -> anyhow::Result<Vec<String>> {
    let t0 = Instant::now();
    let v: serde_json::Value = ops
        .post(format!("{base}/api/v1/curtailments"))
        .header("Authorization", auth)
        .send_json(serde_json::json!({"group": "bench", "percent": plan.percent, "lease_s": 900}))?
        .body_mut()
        .read_json()?;
    let answered = t0.elapsed();
    let id = v["id"].as_i64().context("a curtailment id")?;
    let mut last = v;
    let mut settled_at = None;
    while Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(250));
        last = ops
            .get(format!("{base}/api/v1/curtailments/{id}"))
            .header("Authorization", auth)
            .call()?
            .body_mut()
            .read_json()?;
        if last["progress"]["settled"] == true {
            settled_at = Some(t0.elapsed());
            break;
        }
    }
    let p = &last["progress"];
    let ms = |k: &str| p[k].as_i64().map_or("-".to_owned(), |v| format!("{v} ms"));
    Ok(vec![
        format!(
            "Curtailment of {} devices to {}% (lease 15 min): request answered in {} ms; {} confirmed by read-back, {} failed, {} pending, {} offline{}",
            p["devices"],
            plan.percent,
            answered.as_millis(),
            p["confirmed"],
            p["failed"],
            p["pending"],
            p["offline"],
            settled_at.map_or(" (not settled in time)".to_owned(), |t| format!(
                " (settled, seen {} ms after the request)",
                t.as_millis()
            )),
        ),
        format!(
            "Time from the request to confirmation (server clock): 50 % of devices {}, 99 % {}, 100 % {}",
            ms("confirm_p50_ms"),
            ms("confirm_p99_ms"),
            ms("confirm_max_ms"),
        ),
    ])
}

/// The server's open connections, from its `/metrics`.
fn connections_open(ops: &ureq::Agent, base: &str) -> Option<u64> {
    let text = ops.get(format!("{base}/metrics")).call().ok()?.body_mut().read_to_string().ok()?;
    let line = text.lines().find(|l| l.starts_with("ecowatt_connections_open "))?;
    line.split_whitespace().nth(1)?.parse::<f64>().ok().map(|n| n as u64)
}

/// How long until process `pid` has exited (a zombie or gone), polled every 5 ms.
fn wait_exit(pid: u32, limit: Duration) -> Option<Duration> {
    let t0 = Instant::now();
    while t0.elapsed() < limit {
        match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
            Err(_) => return Some(t0.elapsed()),
            Ok(stat) => {
                // The state follows the command name in parentheses.
                let state = stat.rsplit_once(')').and_then(|(_, r)| r.split_whitespace().next());
                if matches!(state, Some("Z" | "X")) {
                    return Some(t0.elapsed());
                }
            }
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    None
}
