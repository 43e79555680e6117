//! `ecowatt device`: the Linux device agent.
//!
//! Three loops share one core (key-value store, protocol session, sample log,
//! config, command journal):
//! - acquisition: every poll interval, one `0x03` read of registers 0..=9,
//!   appended to the sample log (faults are logged and counted, never stored);
//! - sync: a long poll that reports the applied config and command results and
//!   brings config changes and commands, which it executes (write, then read
//!   back) at most once each;
//! - upload: every upload interval (or when a batch is full), the oldest
//!   unacknowledged samples, sealed, until the backlog is gone; samples leave
//!   the log only when the server acknowledges them.
//!
//! It keeps sampling while the server is unreachable and catches up after.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use ecowatt_core::control::{self, Journal};
use ecowatt_core::link::{Client, RetryPolicy, Transport};
use ecowatt_core::samplelog::SampleLog;
use ecowatt_core::schedule::{BATCHES_PER_ROUND, Scheduler, Uploader};
use ecowatt_core::session::{Credentials, Session};
use ecowatt_proto::codec;
use ecowatt_proto::messages::{
    CommandResult, ConfigState, MessageType, Operation, Rejection, SyncRequest, SyncResponse,
    TelemetryAck, TelemetryUpload,
};
use ecowatt_proto::registers::REGISTER_COUNT;
use serde::Deserialize;
use tokio::sync::{Mutex, watch};

use crate::ThreadDelay;
use crate::filekv::FileKv;
use crate::transport::{self, LinkOptions};

/// Why the agent could not start.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// The provisioning file is missing or malformed.
    #[error("provisioning file {path}: {reason}")]
    Provisioning {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// The state directory cannot be used.
    #[error("state directory {path}: {reason}")]
    State {
        /// The directory.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// The inverter URL is not usable.
    #[error(transparent)]
    Inverter(#[from] transport::OpenError),
}

/// What `ecowatt device add` wrote for this device.
#[derive(Debug, Clone, Deserialize)]
pub struct Provisioning {
    /// Device name.
    pub device: String,
    /// Numeric id.
    pub device_id: u32,
    /// 128-bit key, hex.
    pub key: String,
    /// Key version.
    pub key_version: u32,
    /// Server URL.
    pub server: String,
}

impl Provisioning {
    /// Reads a provisioning file.
    pub fn load(path: &Path) -> Result<Provisioning, AgentError> {
        let bad = |reason: String| AgentError::Provisioning { path: path.to_path_buf(), reason };
        let text = std::fs::read_to_string(path).map_err(|e| bad(e.to_string()))?;
        let p: Provisioning = serde_json::from_str(&text).map_err(|e| bad(e.to_string()))?;
        p.credentials().map_err(bad)?;
        Ok(p)
    }

    /// The protocol credentials.
    pub fn credentials(&self) -> Result<Credentials, String> {
        let key: [u8; 16] = ecowatt_proto::hex::decode(&self.key)
            .ok()
            .and_then(|k| k.try_into().ok())
            .ok_or_else(|| "key must be 32 hex digits".to_owned())?;
        Ok(Credentials { device_id: self.device_id, key, key_version: self.key_version })
    }
}

/// How the agent runs.
#[derive(Debug, Clone)]
pub struct AgentOptions {
    /// Its identity and server.
    pub provisioning: Provisioning,
    /// The server, overriding the provisioning file's.
    pub server: Option<String>,
    /// The inverter (`http://`, `tcp://`, `serial:`).
    pub inverter_url: String,
    /// Inverter link options.
    pub link: LinkOptions,
    /// Modbus slave address.
    pub slave: u8,
    /// Where the key-value store lives.
    pub state_dir: PathBuf,
    /// Samples the log holds before dropping the oldest.
    pub log_capacity: u64,
    /// Samples per upload batch; a full batch is uploaded without waiting.
    pub batch_max: usize,
    /// How long the server may hold a sync open.
    pub long_poll_ms: u32,
    /// Reported firmware version.
    pub firmware: String,
}

impl AgentOptions {
    /// Defaults for everything but identity, inverter and state directory.
    pub fn new(provisioning: Provisioning, inverter_url: String, state_dir: PathBuf) -> Self {
        AgentOptions {
            provisioning,
            server: None,
            inverter_url,
            link: LinkOptions::default(),
            slave: 0x11,
            state_dir,
            log_capacity: 17_280,
            batch_max: 720,
            long_poll_ms: 25_000,
            firmware: env!("CARGO_PKG_VERSION").to_owned(),
        }
    }
}

struct Core {
    kv: FileKv,
    session: Session,
    log: SampleLog,
    config: ConfigState,
    rejected: Vec<Rejection>,
    journal: Journal,
}

type Inverter = Arc<std::sync::Mutex<Client<Box<dyn Transport + Send>, ThreadDelay>>>;

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Runs the agent until `shutdown` completes.
pub async fn run(opts: AgentOptions, shutdown: impl Future<Output = ()>) -> Result<(), AgentError> {
    let state_err = |reason: String| AgentError::State { path: opts.state_dir.clone(), reason };
    let creds = opts.provisioning.credentials().map_err(|reason| AgentError::Provisioning {
        path: PathBuf::from("(provisioning)"),
        reason,
    })?;
    let mut kv = FileKv::open(&opts.state_dir).map_err(|e| state_err(e.to_string()))?;
    let session = Session::start(creds, &mut kv).map_err(|e| state_err(e.to_string()))?;
    let log = SampleLog::open(&mut kv, opts.log_capacity).map_err(|e| state_err(e.to_string()))?;
    let (config, rejected) = control::load_config(&mut kv).map_err(|e| state_err(e.to_string()))?;
    let journal = Journal::load(&mut kv, now_ms()).map_err(|e| state_err(e.to_string()))?;
    tracing::info!(
        device = %opts.provisioning.device,
        backlog = log.len(),
        next_seq = log.next_seq(),
        config_version = config.version,
        poll_ms = config.poll_interval_ms,
        upload_ms = config.upload_interval_ms,
        "device agent starting"
    );
    let transport = transport::open(&opts.inverter_url, &opts.link)?;
    let client = Client::new(transport, ThreadDelay).with_policy(RetryPolicy::default());
    let inverter: Inverter = Arc::new(std::sync::Mutex::new(client));
    let (config_tx, config_rx) = watch::channel(config);
    let core = Arc::new(Mutex::new(Core { kv, session, log, config, rejected, journal }));
    let server = opts.server.clone().unwrap_or_else(|| opts.provisioning.server.clone());
    let server = server.trim_end_matches('/').to_owned();
    let http: ureq::Agent =
        ureq::Agent::config_builder().http_status_as_error(false).build().into();

    let acquisition = acquire(core.clone(), inverter.clone(), opts.slave, config_rx.clone());
    let sync =
        sync_loop(core.clone(), inverter, opts.clone(), server.clone(), http.clone(), config_tx);
    let upload = upload_loop(core, opts.batch_max, server, http, config_rx);
    tokio::select! {
        _ = acquisition => {}
        _ = sync => {}
        _ = upload => {}
        _ = shutdown => tracing::info!("device agent stopping"),
    }
    Ok(())
}

/// Values of the registers in `mask`, in address order.
fn selected(regs: &[u16], mask: u16) -> Vec<u16> {
    (0..REGISTER_COUNT).filter(|r| mask & (1 << r) != 0).map(|r| regs[r]).collect()
}

async fn acquire(
    core: Arc<Mutex<Core>>,
    inverter: Inverter,
    slave: u8,
    mut config: watch::Receiver<ConfigState>,
) {
    let mut cfg = *config.borrow_and_update();
    let mut sched = Scheduler::new(&cfg, now_ms());
    loop {
        let wait = Duration::from_millis(sched.next_poll().saturating_sub(now_ms()));
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = config.changed() => {
                cfg = *config.borrow_and_update();
                sched.reconfigure(&cfg, now_ms());
                continue;
            }
        }
        if !sched.poll_due(now_ms()) {
            continue;
        }
        let inv = inverter.clone();
        let read = tokio::task::spawn_blocking(move || {
            inv.lock().expect("inverter lock").read_holding(slave, 0, REGISTER_COUNT as u16)
        })
        .await;
        match read {
            Ok(Ok(Ok(regs))) => {
                let mut c = core.lock().await;
                let Core { kv, log, .. } = &mut *c;
                match log.append(kv, now_ms(), cfg.registers, selected(&regs, cfg.registers)) {
                    Ok(seq) => tracing::debug!(seq, pac_w = regs[9], "sample"),
                    Err(e) => tracing::error!(error = %e, "could not store a sample"),
                }
            }
            Ok(Ok(Err(exception))) => tracing::warn!(%exception, "inverter refused the read"),
            Ok(Err(e)) => tracing::warn!(error = %e, "no reading from the inverter (retried)"),
            Err(e) => tracing::error!(error = %e, "acquisition task failed"),
        }
    }
}

/// POSTs a sealed envelope; the answer's body on 200, else what went wrong.
async fn post(
    http: &ureq::Agent,
    url: String,
    body: Vec<u8>,
    timeout: Duration,
) -> Result<Vec<u8>, String> {
    let http = http.clone();
    tokio::task::spawn_blocking(move || {
        let mut resp = http
            .post(&url)
            .config()
            .timeout_global(Some(timeout))
            .build()
            .header("content-type", "application/octet-stream")
            .send(&body[..])
            .map_err(|e| format!("{url}: {e}"))?;
        let status = resp.status().as_u16();
        let bytes = resp.body_mut().read_to_vec().map_err(|e| format!("{url}: {e}"))?;
        if status == 200 {
            Ok(bytes)
        } else {
            Err(format!("{url}: HTTP {status} {}", String::from_utf8_lossy(&bytes)))
        }
    })
    .await
    .map_err(|e| e.to_string())?
}

fn backoff(failures: u32) -> Duration {
    Duration::from_millis(Uploader::backoff_ms(failures))
}

async fn execute(inverter: &Inverter, slave: u8, id: u64, op: Operation) -> CommandResult {
    let inv = inverter.clone();
    let outcome = tokio::task::spawn_blocking(move || {
        let mut client = inv.lock().expect("inverter lock");
        let register = match op {
            Operation::Write { register, value } => {
                match client.write_single(slave, register, value) {
                    Ok(Ok(())) => register,
                    Ok(Err(exception)) => return (false, Some(exception.code.as_u8()), None),
                    Err(_) => return (false, None, None),
                }
            }
            Operation::Read { register } => register,
        };
        // Success is what the register reads back, not the echo.
        match client.read_holding(slave, register, 1) {
            Ok(Ok(v)) => {
                let ok = match op {
                    Operation::Write { value, .. } => v[0] == value,
                    Operation::Read { .. } => true,
                };
                (ok, None, Some(v[0]))
            }
            Ok(Err(exception)) => (false, Some(exception.code.as_u8()), None),
            Err(_) => (false, None, None),
        }
    })
    .await
    .unwrap_or((false, None, None));
    CommandResult {
        command_id: id,
        succeeded: outcome.0,
        exception: outcome.1,
        value: outcome.2,
        executed_ms: now_ms(),
    }
}

async fn sync_loop(
    core: Arc<Mutex<Core>>,
    inverter: Inverter,
    opts: AgentOptions,
    server: String,
    http: ureq::Agent,
    config_tx: watch::Sender<ConfigState>,
) {
    let url = format!("{server}/api/v1/device/sync");
    let mut failures = 0u32;
    loop {
        let (sealed, reported) = {
            let mut c = core.lock().await;
            let reported = c.journal.results();
            let request = SyncRequest {
                wait_ms: opts.long_poll_ms,
                applied: Some(c.config),
                rejected: c.rejected.clone(),
                results: reported.clone(),
                firmware: opts.firmware.clone(),
            };
            let Core { kv, session, .. } = &mut *c;
            match session.seal(kv, MessageType::SyncRequest, &request.encode()) {
                Ok(s) => (s, reported),
                Err(e) => {
                    tracing::error!(error = %e, "cannot seal a sync request");
                    drop(c);
                    tokio::time::sleep(backoff(6)).await;
                    continue;
                }
            }
        };
        let timeout = Duration::from_millis(u64::from(opts.long_poll_ms) + 15_000);
        let answer = post(&http, url.clone(), sealed.bytes, timeout).await;
        let response = {
            let mut c = core.lock().await;
            let opened = answer.and_then(|bytes| {
                c.session.open(sealed.counter, &bytes).map_err(|e| e.to_string())
            });
            match opened
                .and_then(|(_, body)| SyncResponse::decode(&body).map_err(|e| e.to_string()))
            {
                Ok(r) => {
                    let Core { kv, journal, .. } = &mut *c;
                    if let Err(e) = journal.acknowledged(kv, &reported) {
                        tracing::error!(error = %e, "cannot update the command journal");
                    }
                    Some(r)
                }
                Err(e) => {
                    c.session.abandon(sealed.counter);
                    tracing::warn!(error = %e, retry_in = ?backoff(failures), "sync failed; sampling goes on");
                    None
                }
            }
        };
        let Some(response) = response else {
            tokio::time::sleep(backoff(failures)).await;
            failures += 1;
            continue;
        };
        if failures > 0 {
            tracing::info!("server reachable again");
        }
        failures = 0;
        if let Some(desired) = response.config {
            let mut c = core.lock().await;
            let (applied, rejected) = control::apply(&c.config, &desired);
            let Core { kv, .. } = &mut *c;
            match control::store_config(kv, &applied, &rejected) {
                Ok(()) => {
                    tracing::info!(
                        version = applied.version,
                        poll_ms = applied.poll_interval_ms,
                        upload_ms = applied.upload_interval_ms,
                        rejected = rejected.len(),
                        "config applied"
                    );
                    c.config = applied;
                    c.rejected = rejected;
                    let _ = config_tx.send(applied);
                }
                Err(e) => {
                    tracing::error!(error = %e, "cannot persist the config; keeping the old one")
                }
            }
        }
        for cmd in response.commands {
            if cmd.expires_ms < now_ms() {
                continue;
            }
            let run = {
                let mut c = core.lock().await;
                let Core { kv, journal, .. } = &mut *c;
                journal.begin(kv, cmd.id).unwrap_or(false)
            };
            if !run {
                continue; // already executed; its result is on its way
            }
            let result = execute(&inverter, opts.slave, cmd.id, cmd.op).await;
            tracing::info!(
                command = cmd.id,
                op = ?cmd.op,
                succeeded = result.succeeded,
                value = ?result.value,
                exception = ?result.exception,
                "command executed"
            );
            let mut c = core.lock().await;
            let Core { kv, journal, .. } = &mut *c;
            if let Err(e) = journal.finish(kv, result) {
                tracing::error!(error = %e, "cannot record a command result");
            }
        }
    }
}

async fn upload_loop(
    core: Arc<Mutex<Core>>,
    batch_max: usize,
    server: String,
    http: ureq::Agent,
    mut config: watch::Receiver<ConfigState>,
) {
    let url = format!("{server}/api/v1/device/telemetry");
    let mut up = Uploader::new(&config.borrow_and_update(), batch_max, now_ms());
    loop {
        tokio::time::sleep(Duration::from_millis(250)).await;
        if config.has_changed().unwrap_or(false) {
            up.reconfigure(&config.borrow_and_update());
        }
        let backlog = core.lock().await.log.len();
        if !up.due(now_ms(), backlog) {
            continue;
        }
        // Oldest first, until the backlog is gone (bounded per round so fresh
        // samples are reached soon).
        for _ in 0..BATCHES_PER_ROUND {
            let sealed = {
                let mut c = core.lock().await;
                let (mask, samples) = c.log.batch(batch_max);
                if samples.is_empty() {
                    break;
                }
                let batch = match codec::encode(mask, &samples) {
                    Ok(b) => b,
                    Err(e) => {
                        tracing::error!(error = %e, "cannot encode a batch");
                        break;
                    }
                };
                let upload = TelemetryUpload {
                    first_seq: samples[0].seq,
                    count: samples.len() as u16,
                    dropped_total: c.log.dropped_total(),
                    codec: codec::CODEC_V1,
                    batch,
                };
                let Core { kv, session, .. } = &mut *c;
                match session.seal(kv, MessageType::TelemetryUpload, &upload.encode()) {
                    Ok(s) => s,
                    Err(e) => {
                        tracing::error!(error = %e, "cannot seal an upload");
                        break;
                    }
                }
            };
            let answer = post(&http, url.clone(), sealed.bytes, Duration::from_secs(30)).await;
            let mut c = core.lock().await;
            let acked = answer
                .and_then(|bytes| c.session.open(sealed.counter, &bytes).map_err(|e| e.to_string()))
                .and_then(|(_, body)| TelemetryAck::decode(&body).map_err(|e| e.to_string()));
            match acked {
                Ok(ack) => {
                    let Core { kv, log, .. } = &mut *c;
                    if let Err(e) = log.ack(kv, ack.acked_through) {
                        tracing::error!(error = %e, "cannot record the acknowledgement");
                    }
                    tracing::info!(
                        acked_through = ack.acked_through,
                        backlog = log.len(),
                        "telemetry uploaded"
                    );
                    up.on_success(now_ms());
                }
                Err(e) => {
                    c.session.abandon(sealed.counter);
                    up.on_failure(now_ms());
                    tracing::warn!(error = %e, backlog = c.log.len(), "upload failed; samples kept");
                    break;
                }
            }
        }
    }
}
