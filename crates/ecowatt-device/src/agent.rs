//! `ecowatt device`: the Linux device agent, a shell around the core's device
//! machine (`ecowatt_core::machine`), which decides everything: when to
//! sample, sync and upload, what to do with config, commands and update
//! offers, when to restart. This shell moves bytes: the machine's Modbus
//! requests go to the inverter transport on a blocking thread, its sealed
//! POSTs and image fetches to the server ([`crate::net`]), its notes to the
//! log; its stores are files in the state directory ([`FileKv`],
//! [`FileSlots`]); its time is the agent's [`Clock`].

use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use ecowatt_core::link::{Client, RetryPolicy, Transport};
use ecowatt_core::machine::{Action, BootError, Device, Event, Note, Settings};
use ecowatt_core::session::Credentials;
use ecowatt_proto::firmware::{PublicKey, Version};
use serde::Deserialize;
use tokio::sync::mpsc;

use crate::ThreadDelay;
use crate::broker::{BrokerIdentity, BrokerNet};
use crate::clock::{Clock, SystemClock};
use crate::filekv::FileKv;
use crate::mqtt::{CommandOutcome, Link, MqttSettings};
use crate::net::Net;
use crate::slots::FileSlots;
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
    /// The MQTT broker URL is not usable.
    #[error("MQTT broker: {0}")]
    Mqtt(String),
    /// The server's CA file is not usable.
    #[error("server TLS: {0}")]
    ServerTls(String),
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
    /// The identity of a device without a server (`ecowatt device --mqtt
    /// URL --name NAME`): its name; it seals nothing, so no key.
    pub fn local(device: &str) -> Provisioning {
        Provisioning {
            device: device.to_owned(),
            device_id: 0,
            key: "00".repeat(16),
            key_version: 1,
            server: String::new(),
            firmware_keys: Vec::new(),
        }
    }

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
    /// The CA certificate file of an `https://` server with a private PKI
    /// (default: the public roots).
    pub server_ca: Option<PathBuf>,
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
    /// It has a server (`false`: samples and takes the export limit from
    /// its broker only; see [`Provisioning::local`]).
    pub cloud: bool,
    /// Publishes to this broker too ([`crate::mqtt`]).
    pub mqtt: Option<MqttSettings>,
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
            server_ca: None,
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
            cloud: true,
            mqtt: None,
        }
    }
}

type Inverter = Arc<std::sync::Mutex<Client<Box<dyn Transport + Send>, ThreadDelay>>>;

/// Image bytes asked of the server per fetch.
pub const CHUNK: u32 = 64 * 1024;

/// How one boot of the agent ended.
enum Exit {
    Shutdown,
    /// A new image is installed (or a trial image failed its health check):
    /// boot again, which picks the slot.
    Restart,
}

/// Runs the agent until `shutdown` completes. A firmware update "reboots" it:
/// the machine asks for a restart, the boot decision is made again from the
/// boot record, and the agent starts over on the slot it names (`docs/firmware.md`).
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

impl AgentOptions {
    /// What the machine is told about this device.
    pub fn settings(&self) -> Result<Settings, String> {
        let factory = Version::parse(&self.firmware)
            .map_err(|e| format!("firmware version {:?}: {e}", self.firmware))?;
        let mut s = Settings::new(factory, &self.target);
        s.slave = self.slave;
        s.log_capacity = self.log_capacity;
        s.batch_max = self.batch_max;
        s.long_poll_ms = self.long_poll_ms;
        s.firmware_keys = self.firmware_keys.clone();
        s.health_check_ms = self.health_check.as_millis() as u64;
        s.chunk = CHUNK;
        s.cloud = self.cloud;
        Ok(s)
    }
}

async fn boot_once(
    opts: &AgentOptions,
    mut shutdown: std::pin::Pin<&mut impl Future<Output = ()>>,
) -> Result<Exit, AgentError> {
    let state_err = |reason: String| AgentError::State { path: opts.state_dir.clone(), reason };
    let creds = opts.provisioning.credentials().map_err(|reason| AgentError::Provisioning {
        path: PathBuf::from("(provisioning)"),
        reason,
    })?;
    let settings = opts.settings().map_err(state_err)?;
    let kv = FileKv::open(&opts.state_dir).map_err(|e| state_err(e.to_string()))?;
    let slots =
        FileSlots::open(&opts.state_dir.join("slots")).map_err(|e| state_err(e.to_string()))?;
    let clock = opts.clock.clone();
    let key = creds.key;
    let mut device = Device::boot(kv, slots, creds, settings, clock.now_ms())
        .map_err(|e: BootError| state_err(e.to_string()))?;
    let booted = device.booted().clone();
    let config = *device.config();
    tracing::info!(
        device = %opts.provisioning.device,
        firmware = %booted.running,
        slot = ?booted.slot,
        trial = booted.trial,
        backlog = device.log().len(),
        next_seq = device.log().next_seq(),
        config_version = config.version,
        poll_ms = config.poll_interval_ms,
        upload_ms = config.upload_interval_ms,
        "device agent starting"
    );
    let transport = transport::open(&opts.inverter_url, &opts.link)?;
    let client = Client::new(transport, ThreadDelay).with_policy(RetryPolicy::default());
    let inverter: Inverter = Arc::new(std::sync::Mutex::new(client));
    let server = opts.server.clone().unwrap_or_else(|| opts.provisioning.server.clone());
    let net = if server.starts_with("mqtt://") || server.starts_with("mqtts://") {
        let who = BrokerIdentity {
            device: opts.provisioning.device.clone(),
            key,
            key_version: opts.provisioning.key_version as u8,
        };
        let topics = ecowatt_formats::broker::DeviceTopics::default();
        Server::Broker(
            BrokerNet::start(&server, opts.server_ca.as_deref(), &who, topics)
                .map_err(AgentError::Mqtt)?,
        )
    } else {
        Server::Http(
            Net::new(
                &server,
                crate::net::trust(opts.server_ca.as_deref()).map_err(AgentError::ServerTls)?,
            )
            .asking_as(opts.provisioning.device_id, opts.provisioning.key_version),
        )
    };
    let (events, mut answers) = mpsc::unbounded_channel::<Event>();
    let name = &opts.provisioning.device;
    let (mut mqtt, mut from_broker) = match &opts.mqtt {
        Some(m) => {
            let (link, commands) = Link::start(m, name, !opts.cloud).map_err(AgentError::Mqtt)?;
            (Some(link), Some(commands))
        }
        None => (None, None),
    };
    // Local commands under way: id -> (percent, when taken).
    let mut local: std::collections::HashMap<u64, (u16, u64)> = Default::default();
    loop {
        while let Some(action) = device.poll_action() {
            match action {
                Action::Note(note) => {
                    log(&note);
                    if let Some(link) = mqtt.as_mut() {
                        match &note {
                            Note::Sampled { .. } => {
                                if let Some((mask, sample)) = device.log().newest() {
                                    link.sample(mask, sample);
                                }
                            }
                            Note::CommandExecuted { result, .. } => {
                                if let Some((percent, at)) = local.remove(&result.command_id) {
                                    link.command(
                                        Some(percent),
                                        at,
                                        CommandOutcome::Executed(*result),
                                    );
                                }
                            }
                            _ => {}
                        }
                    }
                }
                Action::Restart => {
                    if let Some(link) = mqtt.take() {
                        link.stop().await;
                    }
                    net.stop().await;
                    return Ok(Exit::Restart);
                }
                Action::Inverter { slave, request } => {
                    let (inverter, events) = (inverter.clone(), events.clone());
                    tokio::task::spawn_blocking(move || {
                        let outcome =
                            inverter.lock().expect("inverter lock").execute(slave, request);
                        let _ = events.send(Event::Inverter(outcome));
                    });
                }
                action => net.carry(action, events.clone()),
            }
        }
        // A local command the inverter never took (it expires in the core).
        let now = clock.now_ms();
        let stale = now.saturating_sub(2 * ecowatt_core::machine::LOCAL_COMMAND_TTL_MS);
        local.retain(|_, &mut (percent, at)| {
            let keep = at >= stale;
            if let (false, Some(link)) = (keep, mqtt.as_mut()) {
                link.command(Some(percent), at, CommandOutcome::Refused("expired"));
            }
            keep
        });
        let wait = device.next_wakeup().saturating_sub(now);
        let from_broker_next = async {
            match from_broker.as_mut() {
                Some(rx) => rx.recv().await,
                None => std::future::pending().await,
            }
        };
        let event = tokio::select! {
            Some(event) = answers.recv() => event,
            Some(asked) = from_broker_next => {
                let now = clock.now_ms();
                let taken = asked.map_err(CommandOutcome::Refused).and_then(|percent| {
                    device.command_local(now, percent).map(|id| (id, percent)).map_err(|refused| {
                        tracing::warn!(percent, code = refused.code(), "export-limit command from MQTT refused");
                        CommandOutcome::from(refused)
                    })
                });
                match taken {
                    Ok((id, percent)) => {
                        tracing::info!(percent, id, "export-limit command from MQTT");
                        local.insert(id, (percent, now));
                    }
                    Err(outcome) => {
                        if let Some(link) = mqtt.as_mut() {
                            link.command(asked.ok(), now, outcome);
                        }
                    }
                }
                Event::Tick
            }
            _ = clock.sleep(Duration::from_millis(wait)) => Event::Tick,
            _ = shutdown.as_mut() => {
                tracing::info!("device agent stopping");
                if let Some(link) = mqtt.take() {
                    link.stop().await;
                }
                net.stop().await;
                return Ok(Exit::Shutdown);
            }
        };
        device.handle(clock.now_ms(), event);
    }
}

/// How the agent reaches its server: HTTP(S), or an MQTT broker.
enum Server {
    Http(Net),
    Broker(BrokerNet),
}

impl Server {
    /// Carries out a request of the machine on a task of its own; its
    /// answer comes back on `events`.
    fn carry(&self, action: Action, events: mpsc::UnboundedSender<Event>) {
        match self {
            Server::Http(net) => {
                let net = net.clone();
                tokio::task::spawn_blocking(move || {
                    if let Some(event) = net.carry(&action) {
                        let _ = events.send(event);
                    }
                });
            }
            Server::Broker(net) => {
                let net = net.clone();
                tokio::spawn(async move {
                    if let Some(event) = net.carry(&action).await {
                        let _ = events.send(event);
                    }
                });
            }
        }
    }

    async fn stop(&self) {
        if let Server::Broker(net) = self {
            net.stop().await;
        }
    }
}

/// What the machine noted, in the agent's log.
fn log(note: &Note) {
    match note {
        Note::Sampled { seq } => tracing::debug!(seq, "sample"),
        Note::ClockNotSet => {
            tracing::warn!("the clock is not set (before 2020): reading not stored")
        }
        Note::InverterRefused(exception) => {
            tracing::warn!(%exception, "inverter refused the read")
        }
        Note::InverterUnreachable(e) => {
            tracing::warn!(error = %e, "no reading from the inverter (retried)")
        }
        Note::StorageFailed(what, e) => tracing::error!(error = %e, "could not store the {what}"),
        Note::SealFailed(e) => tracing::error!(error = %e, "cannot seal a request"),
        Note::SyncFailed { error, retry_in_ms } => {
            tracing::warn!(error = %error, retry_in_ms, "sync failed; sampling goes on")
        }
        Note::ServerBack => tracing::info!("server reachable again"),
        Note::ServerTime(ms) => tracing::trace!(server_time_ms = ms, "server clock"),
        Note::ConfigApplied { config, rejected } => tracing::info!(
            version = config.version,
            poll_ms = config.poll_interval_ms,
            upload_ms = config.upload_interval_ms,
            rejected = rejected.len(),
            "config applied"
        ),
        Note::CommandExecuted { op, result } => tracing::info!(
            command = result.command_id,
            ?op,
            succeeded = result.succeeded,
            value = ?result.value,
            exception = ?result.exception,
            "command executed"
        ),
        Note::InterruptedResolved(r) => tracing::warn!(
            command = r.command_id,
            succeeded = r.succeeded,
            value = ?r.value,
            "a command was cut short by a restart; read back and reported"
        ),
        Note::Uploaded { acked_through, backlog } => {
            tracing::info!(acked_through, backlog, "telemetry uploaded")
        }
        Note::UploadFailed { error, backlog } => {
            tracing::warn!(error = %error, backlog, "upload failed; samples kept")
        }
        Note::CodecInUse { version } => {
            tracing::info!(version, "telemetry codec in use (negotiated with the server)")
        }
        Note::SamplesRefused { error, discarded } => tracing::error!(
            error = %error,
            discarded,
            "the server refused the samples' times (is the clock right?); they are counted as dropped"
        ),
        Note::UpdateOffered { version, size } => {
            tracing::info!(%version, size, "firmware update offered")
        }
        Note::FetchFailed { error, attempt } => {
            tracing::warn!(error = %error, attempt, "image download failed; retrying")
        }
        Note::UpdateWithdrawn => tracing::info!("update withdrawn by the server; progress kept"),
        Note::UpdateFailed { reason, message } => tracing::warn!(
            reason = ecowatt_proto::messages::ota_reason::name(*reason),
            %message,
            "firmware update refused or failed"
        ),
        Note::UpdateInstalled { version } => {
            tracing::info!(%version, "image verified and installed; restarting into it")
        }
        Note::Confirmed { version } => {
            tracing::info!(firmware = %version, "new image reached the server: confirmed")
        }
        Note::HealthCheckFailed => tracing::warn!(
            "the new image did not reach the server in time; returning to the old one"
        ),
        Note::Ramp { command_id, value, target } => {
            tracing::info!(
                command = command_id,
                limit_pct = value,
                target_pct = target,
                "ramp step"
            )
        }
        Note::Scheduled { value, confirmed: true } => {
            tracing::info!(limit_pct = value, "schedule step written and read back")
        }
        Note::Scheduled { value, confirmed: false } => {
            tracing::warn!(limit_pct = value, "schedule step not taken by the inverter; retrying")
        }
        Note::FailSafeSet(v) => tracing::info!(failsafe = v, "fail-safe export limit set"),
        Note::Lease(e) => tracing::warn!(
            kind = ?e.kind,
            command = e.command_id,
            limit_pct = e.value,
            outcome = ?e.outcome,
            "leased export limit: {}",
            match e.kind {
                ecowatt_proto::messages::EpisodeKind::FailSafe =>
                    "the server was silent for the lease; fail-safe applied",
                ecowatt_proto::messages::EpisodeKind::Resumed =>
                    "the server is heard again; leased limit back",
            }
        ),
    }
}
