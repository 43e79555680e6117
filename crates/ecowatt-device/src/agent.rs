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
use std::sync::atomic::{AtomicBool, Ordering};

use ecowatt_core::ota::{self, Boot, BootRecord};
use ecowatt_proto::firmware::{PublicKey, Version};
use ecowatt_proto::messages::{OtaReport, OtaState, UpdateOffer, ota_reason};
use tokio::sync::{Mutex, Notify, watch};

use crate::slots::FileSlots;
use crate::update::{self, Ended, HttpSource, UpdateStatus};

use crate::ThreadDelay;
use crate::clock::{Clock, SystemClock};
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
    /// Public keys (hex: 32-byte Ed25519 or 256-byte RSA-2048 modulus) the
    /// device trusts for firmware manifests.
    #[serde(default)]
    pub firmware_keys: Vec<String>,
}

impl Provisioning {
    /// Reads a provisioning file.
    pub fn load(path: &Path) -> Result<Provisioning, AgentError> {
        let bad = |reason: String| AgentError::Provisioning { path: path.to_path_buf(), reason };
        let text = std::fs::read_to_string(path).map_err(|e| bad(e.to_string()))?;
        let p: Provisioning = serde_json::from_str(&text).map_err(|e| bad(e.to_string()))?;
        p.credentials().map_err(bad)?;
        p.trusted_keys().map_err(bad)?;
        Ok(p)
    }

    /// The firmware signing keys it names.
    pub fn trusted_keys(&self) -> Result<Vec<PublicKey>, String> {
        self.firmware_keys
            .iter()
            .map(|k| {
                ecowatt_proto::hex::decode(k)
                    .ok()
                    .and_then(|b| PublicKey::from_bytes(&b).ok())
                    .ok_or_else(|| {
                        format!("firmware key {k:?}: not an Ed25519 key or RSA-2048 modulus in hex")
                    })
            })
            .collect()
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
    /// The version this build is (what runs before any update; afterwards the
    /// boot record says).
    pub firmware: String,
    /// Keys whose firmware signatures the device accepts.
    pub firmware_keys: Vec<PublicKey>,
    /// Hardware target an image must be built for.
    pub target: String,
    /// How long a new image has, after its restart, to complete a sync
    /// with the server before the device returns to the old one.
    pub health_check: Duration,
    /// How the agent restarts into a new image.
    pub restart: RestartMode,
    /// Its clock: stamps samples and results, paces polls, uploads,
    /// back-offs and the health check.
    pub clock: Arc<dyn Clock>,
}

/// How the agent "reboots" after installing an image (or when a trial image
/// fails its health check).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RestartMode {
    /// Stop every loop and boot again in the same process.
    InProcess,
    /// Return [`Stopped::Restart`] (the CLI exits with status 75) so that a
    /// supervisor such as systemd starts the agent again.
    Exit,
}

/// Why [`run`] returned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stopped {
    /// The shutdown future completed.
    Shutdown,
    /// A restart is due and the restart mode is [`RestartMode::Exit`].
    Restart,
}

impl AgentOptions {
    /// Defaults for everything but identity, inverter and state directory.
    pub fn new(provisioning: Provisioning, inverter_url: String, state_dir: PathBuf) -> Self {
        let firmware_keys = provisioning.trusted_keys().unwrap_or_default();
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
            firmware_keys,
            target: format!("linux-{}", std::env::consts::ARCH),
            health_check: Duration::from_secs(60),
            restart: RestartMode::InProcess,
            clock: Arc::new(SystemClock),
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

/// How one boot of the agent ended.
enum Exit {
    Shutdown,
    /// A new image is installed (or a trial image failed its health check):
    /// boot again, which picks the slot.
    Restart,
}

/// Runs the agent until `shutdown` completes. A firmware update "reboots" it:
/// every loop stops, the boot decision is made again from the boot record,
/// and the agent starts over on the slot it names (`docs/firmware.md`).
pub async fn run(
    opts: AgentOptions,
    shutdown: impl Future<Output = ()>,
) -> Result<Stopped, AgentError> {
    tokio::pin!(shutdown);
    loop {
        match boot_once(&opts, shutdown.as_mut()).await? {
            Exit::Shutdown => return Ok(Stopped::Shutdown),
            Exit::Restart if opts.restart == RestartMode::Exit => return Ok(Stopped::Restart),
            Exit::Restart => tracing::info!("restarting into the slot the boot record names"),
        }
    }
}

async fn boot_once(
    opts: &AgentOptions,
    shutdown: std::pin::Pin<&mut impl Future<Output = ()>>,
) -> Result<Exit, AgentError> {
    let state_err = |reason: String| AgentError::State { path: opts.state_dir.clone(), reason };
    let creds = opts.provisioning.credentials().map_err(|reason| AgentError::Provisioning {
        path: PathBuf::from("(provisioning)"),
        reason,
    })?;
    let factory = Version::parse(&opts.firmware)
        .map_err(|e| state_err(format!("firmware version {:?}: {e}", opts.firmware)))?;
    let mut kv = FileKv::open(&opts.state_dir).map_err(|e| state_err(e.to_string()))?;
    let booted = ota::boot(&mut kv, &factory).map_err(|e| state_err(e.to_string()))?;
    let record = BootRecord::load(&mut kv, &factory).map_err(|e| state_err(e.to_string()))?;
    let (slot, running, trial) = match booted {
        Boot::Confirmed(slot, v) => (slot, v, false),
        Boot::Trial(slot, v) => (slot, v, true),
    };
    let first_report = if trial {
        Some(OtaReport {
            state: OtaState::Trial,
            version: running.to_string(),
            done: 0,
            total: 0,
            reason: 0,
        })
    } else {
        record.rolled_back.as_ref().map(|v| OtaReport {
            state: OtaState::RolledBack,
            version: v.to_string(),
            done: 0,
            total: 0,
            reason: ota_reason::HEALTH_CHECK,
        })
    };
    let session = Session::start(creds, &mut kv).map_err(|e| state_err(e.to_string()))?;
    let log = SampleLog::open(&mut kv, opts.log_capacity).map_err(|e| state_err(e.to_string()))?;
    let (config, rejected) = control::load_config(&mut kv).map_err(|e| state_err(e.to_string()))?;
    let mut journal = Journal::load(&mut kv).map_err(|e| state_err(e.to_string()))?;
    tracing::info!(
        device = %opts.provisioning.device,
        firmware = %running,
        ?slot,
        trial,
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
    if let Some((id, op)) = journal.interrupted() {
        resolve_interrupted(&inverter, opts.slave, &mut kv, &mut journal, id, op, &*opts.clock)
            .await
            .map_err(|e| state_err(e.to_string()))?;
    }
    let (config_tx, config_rx) = watch::channel(config);
    let core = Arc::new(Mutex::new(Core { kv, session, log, config, rejected, journal }));
    let server = opts.server.clone().unwrap_or_else(|| opts.provisioning.server.clone());
    let server = server.trim_end_matches('/').to_owned();
    let http: ureq::Agent =
        ureq::Agent::config_builder().http_status_as_error(false).build().into();
    let updates = Updates {
        status: Arc::new(std::sync::Mutex::new(UpdateStatus {
            report: first_report,
            ..Default::default()
        })),
        trial: Arc::new(AtomicBool::new(trial)),
        running: running.to_string(),
        factory,
        restart: Arc::new(Notify::new()),
        cancel: Arc::new(AtomicBool::new(false)),
    };

    let acquisition =
        acquire(core.clone(), inverter.clone(), opts.slave, config_rx.clone(), opts.clock.clone());
    let sync = sync_loop(
        core.clone(),
        inverter,
        opts.clone(),
        server.clone(),
        http.clone(),
        config_tx,
        updates.clone(),
    );
    let upload = upload_loop(core, opts.batch_max, server, http, config_rx, opts.clock.clone());
    let health = health_check(updates.trial.clone(), opts.health_check, opts.clock.clone());
    let exit = tokio::select! {
        _ = acquisition => Exit::Shutdown,
        _ = sync => Exit::Shutdown,
        _ = upload => Exit::Shutdown,
        _ = updates.restart.notified() => Exit::Restart,
        _ = health => {
            tracing::warn!(firmware = %updates.running, "the new image did not reach the server in time; returning to the old one");
            Exit::Restart
        }
        _ = shutdown => {
            tracing::info!("device agent stopping");
            Exit::Shutdown
        }
    };
    Ok(exit)
}

/// A command was being executed when the device stopped: it is not run
/// again; the register is read back and what it holds is reported.
async fn resolve_interrupted(
    inverter: &Inverter,
    slave: u8,
    kv: &mut FileKv,
    journal: &mut Journal,
    id: u64,
    op: Option<Operation>,
    clock: &dyn Clock,
) -> Result<(), ecowatt_core::kv::KvError> {
    let register = op.map(|o| match o {
        Operation::Write { register, .. } | Operation::Read { register } => register,
    });
    let read_back = match register {
        Some(r) => {
            let inv = inverter.clone();
            tokio::task::spawn_blocking(move || {
                inv.lock().expect("inverter lock").read_holding(slave, r, 1)
            })
            .await
            .ok()
            .and_then(|read| read.ok()?.ok())
            .and_then(|v| v.first().copied())
        }
        None => None,
    };
    journal.resolve(kv, read_back, clock.now_ms())?;
    tracing::warn!(
        command = id,
        ?op,
        ?read_back,
        "a command was cut short by a restart: not run again; reporting what the inverter holds"
    );
    Ok(())
}

/// Completes when a trial image has not confirmed itself within `bound`.
async fn health_check(trial: Arc<AtomicBool>, bound: Duration, clock: Arc<dyn Clock>) {
    if !trial.load(Ordering::SeqCst) {
        return std::future::pending().await;
    }
    clock.sleep(bound).await;
    if !trial.load(Ordering::SeqCst) {
        std::future::pending::<()>().await;
    }
}

/// The firmware update's shared state for one boot.
#[derive(Clone)]
struct Updates {
    status: Arc<std::sync::Mutex<UpdateStatus>>,
    /// Running a new image that has not confirmed itself yet.
    trial: Arc<AtomicBool>,
    /// The version running.
    running: String,
    factory: Version,
    restart: Arc<Notify>,
    cancel: Arc<AtomicBool>,
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
    clock: Arc<dyn Clock>,
) {
    let now_ms = || clock.now_ms();
    let mut cfg = *config.borrow_and_update();
    let mut sched = Scheduler::new(&cfg, now_ms());
    loop {
        let wait = Duration::from_millis(sched.next_poll().saturating_sub(now_ms()));
        tokio::select! {
            _ = clock.sleep(wait) => {}
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
            // A clock that was never set stamps 1970: such a sample would be
            // refused by the server, so it is not stored.
            Ok(Ok(Ok(_))) if now_ms() < ecowatt_proto::messages::EARLIEST_SAMPLE_MS => {
                tracing::warn!(
                    now_ms = now_ms(),
                    "the clock is not set (before 2020): reading not stored"
                );
            }
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

async fn execute(
    inverter: &Inverter,
    slave: u8,
    id: u64,
    op: Operation,
    clock: &dyn Clock,
) -> CommandResult {
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
        executed_ms: clock.now_ms(),
    }
}

async fn sync_loop(
    core: Arc<Mutex<Core>>,
    inverter: Inverter,
    opts: AgentOptions,
    server: String,
    http: ureq::Agent,
    config_tx: watch::Sender<ConfigState>,
    updates: Updates,
) {
    let url = format!("{server}/api/v1/device/sync");
    let mut failures = 0u32;
    loop {
        let (ota, busy) = {
            let st = updates.status.lock().expect("update status");
            (st.report.clone(), st.busy)
        };
        // While an update is under way its progress goes out every 2 s.
        let wait_ms =
            if ota.is_some() || busy { opts.long_poll_ms.min(2_000) } else { opts.long_poll_ms };
        let (sealed, reported) = {
            let mut c = core.lock().await;
            let reported = c.journal.results();
            let request = SyncRequest {
                wait_ms,
                applied: Some(c.config),
                rejected: c.rejected.clone(),
                results: reported.clone(),
                firmware: updates.running.clone(),
                ota: ota.clone(),
            };
            let Core { kv, session, .. } = &mut *c;
            match session.seal(kv, MessageType::SyncRequest, &request.encode()) {
                Ok(s) => (s, reported),
                Err(e) => {
                    tracing::error!(error = %e, "cannot seal a sync request");
                    drop(c);
                    opts.clock.sleep(backoff(6)).await;
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
            opts.clock.sleep(backoff(failures)).await;
            failures += 1;
            continue;
        };
        if failures > 0 {
            tracing::info!("server reachable again");
        }
        failures = 0;
        after_sync(&core, &opts, &server, &http, &updates, ota, response.update.clone()).await;
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
            if cmd.expires_ms < opts.clock.now_ms() {
                continue;
            }
            let run = {
                let mut c = core.lock().await;
                let Core { kv, journal, .. } = &mut *c;
                journal.begin(kv, cmd.id, cmd.op).unwrap_or(false)
            };
            if !run {
                continue; // already executed; its result is on its way
            }
            let result = execute(&inverter, opts.slave, cmd.id, cmd.op, &*opts.clock).await;
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

/// A sync went through: the trial image confirms itself, acknowledged final
/// reports are cleared, an installed image restarts, and an offer starts (or
/// its absence stops) a download.
async fn after_sync(
    core: &Arc<Mutex<Core>>,
    opts: &AgentOptions,
    server: &str,
    http: &ureq::Agent,
    updates: &Updates,
    sent: Option<OtaReport>,
    offer: Option<UpdateOffer>,
) {
    if updates.trial.load(Ordering::SeqCst) {
        let mut c = core.lock().await;
        match ota::confirm(&mut c.kv, &updates.factory) {
            Ok(()) => {
                updates.trial.store(false, Ordering::SeqCst);
                tracing::info!(firmware = %updates.running, "new image reached the server: confirmed");
                updates.status.lock().expect("update status").report = Some(OtaReport {
                    state: OtaState::Succeeded,
                    version: updates.running.clone(),
                    done: 0,
                    total: 0,
                    reason: 0,
                });
            }
            Err(e) => tracing::error!(error = %e, "cannot confirm the new image"),
        }
        return;
    }
    let clear_rollback = {
        let mut st = updates.status.lock().expect("update status");
        let mut clear_rollback = false;
        if let Some(sent) = &sent {
            let final_state =
                matches!(sent.state, OtaState::Succeeded | OtaState::Failed | OtaState::RolledBack);
            if final_state && st.report.as_ref() == Some(sent) {
                st.report = None;
                clear_rollback = sent.state == OtaState::RolledBack;
            }
            if sent.state == OtaState::Installing && st.restart {
                updates.restart.notify_one();
                return;
            }
        }
        match offer {
            Some(offer)
                if !st.busy && !st.restart && !st.refused.contains(&offer.manifest.sha256) =>
            {
                st.busy = true;
                updates.cancel.store(false, Ordering::SeqCst);
                let url = format!(
                    "{server}/api/v1/device/firmware/{}",
                    ecowatt_proto::hex::encode_upper(&offer.token)
                );
                tracing::info!(version = %offer.manifest.version, size = offer.manifest.size, "firmware update offered");
                let source = HttpSource { http: http.clone(), url };
                spawn_update(core.clone(), opts.clone(), updates.clone(), offer, source);
            }
            None if st.busy => updates.cancel.store(true, Ordering::SeqCst),
            _ => {}
        }
        clear_rollback
    };
    if clear_rollback {
        let mut c = core.lock().await;
        if let Err(e) = ota::take_rolled_back(&mut c.kv, &updates.factory) {
            tracing::error!(error = %e, "cannot clear the rollback record");
        }
    }
}

fn spawn_update(
    core: Arc<Mutex<Core>>,
    opts: AgentOptions,
    updates: Updates,
    offer: UpdateOffer,
    mut source: HttpSource,
) {
    let runtime = tokio::runtime::Handle::current();
    tokio::task::spawn_blocking(move || {
        let version = offer.manifest.version.to_string();
        let total = offer.manifest.size;
        let slots = FileSlots::open(&opts.state_dir.join("slots"));
        let status = updates.status.clone();
        let mut report = |r: OtaReport| status.lock().expect("update status").report = Some(r);
        let result = slots.map_err(|e| Ended::Failed(ota_reason::FLASH, e.to_string())).and_then(
            |mut slots| {
                let key = update::trusted_signer(&offer, &opts.firmware_keys)?;
                let cx = update::Context {
                    factory: &updates.factory,
                    target: &opts.target,
                    cancel: &updates.cancel,
                    report: &mut report,
                };
                update::install(
                    || tokio::sync::MutexGuard::map(core.blocking_lock(), |c| &mut c.kv),
                    &mut slots,
                    cx,
                    &offer,
                    &key,
                    &mut source,
                )
            },
        );
        drop(core);
        let mut st = updates.status.lock().expect("update status");
        st.busy = false;
        match result {
            Ok(()) => {
                tracing::info!(%version, "image verified and installed; restarting into it");
                st.restart = true;
                // Restart once the server has heard, or after 10 s without it.
                let (restart, clock) = (updates.restart.clone(), opts.clock.clone());
                runtime.spawn(async move {
                    clock.sleep(Duration::from_secs(10)).await;
                    restart.notify_one();
                });
            }
            Err(Ended::Cancelled) => {
                tracing::info!(%version, "update withdrawn by the server; progress kept");
                st.report = None;
            }
            Err(Ended::Failed(reason, message)) => {
                tracing::warn!(%version, reason = ota_reason::name(reason), %message, "firmware update refused or failed");
                let done = st.report.as_ref().map_or(0, |r| r.done);
                st.report =
                    Some(OtaReport { state: OtaState::Failed, version, done, total, reason });
                st.refused.push(offer.manifest.sha256);
            }
        }
    });
}

async fn upload_loop(
    core: Arc<Mutex<Core>>,
    batch_max: usize,
    server: String,
    http: ureq::Agent,
    mut config: watch::Receiver<ConfigState>,
    clock: Arc<dyn Clock>,
) {
    let now_ms = || clock.now_ms();
    let url = format!("{server}/api/v1/device/telemetry");
    let mut up = Uploader::new(&config.borrow_and_update(), batch_max, now_ms());
    loop {
        clock.sleep(Duration::from_millis(250)).await;
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
            let (sealed, last_seq) = {
                let mut c = core.lock().await;
                let (mask, samples) = c.log.batch(batch_max);
                let Some(last_seq) = samples.last().map(|s| s.seq) else { break };
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
                    Ok(s) => (s, last_seq),
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
                // The server will never take these (stamped by a clock that
                // was wrong): keeping them would block every later sample.
                Err(e) if e.contains("\"sample_time_out_of_range\"") => {
                    c.session.abandon(sealed.counter);
                    let Core { kv, log, .. } = &mut *c;
                    match log.discard(kv, last_seq) {
                        Ok(n) => tracing::error!(error = %e, discarded = n,
                            "the server refused the samples' times (is the clock right?); they are counted as dropped"),
                        Err(k) => tracing::error!(error = %k, "cannot discard refused samples"),
                    }
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
