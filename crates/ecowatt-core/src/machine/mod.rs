//! The device as one sans-IO machine: everything the device decides, decided
//! here; every shell (the Linux agent, the fleet bench's devices, tests on
//! virtual time, the ESP32-C3 firmware) only moves bytes.
//!
//! The shell feeds [`Event`]s with the time they happened ([`Device::handle`]),
//! carries out the [`Action`]s the machine asks for ([`Device::poll_action`])
//! and calls again no later than [`Device::next_wakeup`]. At most one inverter
//! request, one sync, one upload and one image fetch are outstanding at a time;
//! each answer comes back as the event named on its action.
//!
//! Durable state goes through two synchronous ports the machine owns: the
//! key-value store ([`KeyValue`]: sample log, counters, config, command
//! journal, boot record) and the image slots ([`Slots`]). On the chip both are
//! flash writes that block for milliseconds, and a write either is durable when
//! it returns or fails; every failure has a defined reaction here (the sample
//! is not taken, the acknowledgement is not recorded and the batch is sent
//! again, the update is reported failed), never a panic.
//!
//! Parts:
//! - [`inverter`](self): sampling and command execution with read-back, one
//!   Modbus request at a time;
//! - `sync`: the long poll that reports and brings config, commands, offers;
//! - `upload`: batches oldest first, acknowledgements, refused samples;
//! - `update`: offer, signature, download into the other slot, trial, confirm;
//! - `limit`: leased export limits, the fail-safe when the server goes
//!   silent, and the limit's return when it is heard again;
//! - `plan`: the export-limit schedule, run offline, and who wins among a
//!   command, a lease and the schedule.

mod inverter;
mod limit;
mod plan;
mod sync;
mod update;
mod upload;

use alloc::collections::VecDeque;
use alloc::string::String;
use alloc::vec::Vec;
use core::fmt;

use ecowatt_proto::firmware::{PublicKey, Version};
use ecowatt_proto::messages::{CommandResult, ConfigState, Episode, Operation, Rejection};
use ecowatt_proto::modbus::{Exception, Request};

use crate::control::{self, Journal};
use crate::kv::{KeyValue, KvError};
use crate::link::{Outcome, TransportError};
use crate::ota::{self, Boot, Slot, Slots};
use crate::samplelog::SampleLog;
use crate::schedule::{Scheduler, Uploader};
use crate::session::{Credentials, Session, SessionError};

pub use update::trusted_signer;

/// Answers larger than this are refused unread (the largest real answer, a
/// sync with 32 commands and an offer, is under 2 KiB).
pub const MAX_ANSWER: usize = 64 * 1024;

/// What the device is, apart from its identity.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Modbus address of the inverter.
    pub slave: u8,
    /// Samples the log holds before dropping the oldest.
    pub log_capacity: u64,
    /// Samples per upload batch; a full batch goes without waiting.
    pub batch_max: usize,
    /// How long the server may hold a sync open, ms.
    pub long_poll_ms: u32,
    /// The version this build is (what runs before any update).
    pub factory: Version,
    /// Hardware target an image must be built for.
    pub target: String,
    /// Keys whose firmware signatures the device accepts.
    pub firmware_keys: Vec<PublicKey>,
    /// How long a new image has after its restart to reach the server, ms.
    pub health_check_ms: u64,
    /// Image bytes asked for per fetch.
    pub chunk: u32,
    /// Telemetry codecs this device may upload with (bit `v` = version `v`,
    /// default every one this build has). With v1 alone it behaves as a
    /// protocol 1.2 device: it states none and the server offers none.
    pub codecs: u8,
    /// Firmware delivery forms this device takes besides clear images
    /// (default [`DELIVERY_ENCRYPTED`](ecowatt_proto::messages::DELIVERY_ENCRYPTED);
    /// 0: none, as a device of protocol ≤ 1.3).
    pub delivery: u8,
    /// The device has a server (default). Without one it only samples and
    /// takes export-limit commands from its own side ([`Device::command_local`]):
    /// no sync, no upload, no update (a home broker is all it talks to).
    pub cloud: bool,
}

impl Settings {
    /// Defaults for a device built as `factory` for `target`.
    pub fn new(factory: Version, target: &str) -> Self {
        Settings {
            slave: 0x11,
            log_capacity: 17_280,
            batch_max: 720,
            long_poll_ms: 25_000,
            factory,
            target: String::from(target),
            firmware_keys: Vec::new(),
            health_check_ms: 60_000,
            chunk: 16 * 1024,
            codecs: ecowatt_proto::codec::SUPPORTED,
            delivery: ecowatt_proto::messages::DELIVERY_ENCRYPTED,
            cloud: true,
        }
    }
}

/// Most local commands waiting for the inverter.
pub const MAX_LOCAL_QUEUED: usize = 8;
/// A local command not executed within this long is dropped, ms.
pub const LOCAL_COMMAND_TTL_MS: u64 = 60_000;
/// Local commands' ids have this bit set.
pub const LOCAL_ID_BASE: u64 = 1 << 62;

/// Why a local command was refused.
#[derive(Debug, Clone, PartialEq)]
pub enum LocalRefused {
    /// The device has a server, which takes commands (and audits them).
    HasServer,
    /// The value is not one the export limit takes.
    Invalid(ecowatt_proto::registers::WriteError),
    /// Too many commands wait already.
    Busy,
}

impl LocalRefused {
    /// A stable code.
    pub fn code(&self) -> &'static str {
        match self {
            LocalRefused::HasServer => "set_through_the_server",
            LocalRefused::Invalid(e) => e.code(),
            LocalRefused::Busy => "busy",
        }
    }
}

/// Which of the device protocol's two requests an answer belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Channel {
    /// `POST /api/v1/device/sync`.
    Sync,
    /// `POST /api/v1/device/telemetry`.
    Upload,
}

impl Channel {
    /// The path the request goes to.
    pub const fn path(self) -> &'static str {
        match self {
            Channel::Sync => "/api/v1/device/sync",
            Channel::Upload => "/api/v1/device/telemetry",
        }
    }
}

/// Why no answer came from the server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    /// The HTTP status, when the server answered with an error.
    pub status: Option<u16>,
    /// What went wrong (the error body, or the transport's error).
    pub message: String,
}

impl Failure {
    /// The server could not be reached or did not answer in time.
    pub fn unreachable(message: impl Into<String>) -> Self {
        Failure { status: None, message: message.into() }
    }
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.status {
            Some(s) => write!(f, "HTTP {s}: {}", self.message),
            None => f.write_str(&self.message),
        }
    }
}

/// Something that happened, fed to [`Device::handle`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// Only time passed.
    Tick,
    /// The inverter's answer to the [`Action::Inverter`] outstanding.
    Inverter(Outcome),
    /// The server's answer (its body on 200) to the [`Action::Post`] outstanding on `channel`.
    Server {
        /// Which request.
        channel: Channel,
        /// The body, or why there is none.
        answer: Result<Vec<u8>, Failure>,
    },
    /// Bytes of the image from the [`Action::Fetch`] outstanding.
    Chunk(Result<Vec<u8>, Failure>),
}

/// What the shell is to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Send this request to the inverter (with the link's retries); answer with [`Event::Inverter`].
    Inverter {
        /// Modbus address.
        slave: u8,
        /// The request.
        request: Request,
    },
    /// POST the sealed bytes; answer with [`Event::Server`].
    Post {
        /// Where.
        channel: Channel,
        /// The sealed envelope.
        body: Vec<u8>,
        /// Give up after this long, ms.
        timeout_ms: u64,
    },
    /// GET `len` bytes of the offered image from `offset`
    /// (`/api/v1/device/firmware/{token}`, a `Range` request); answer with [`Event::Chunk`].
    Fetch {
        /// The offer's download token.
        token: [u8; 16],
        /// First byte.
        offset: u64,
        /// How many bytes at most.
        len: u32,
    },
    /// Restart the device: boot again ([`Device::boot`]), which picks the slot.
    Restart,
    /// Something worth logging.
    Note(Note),
}

/// What the device tells its log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Note {
    /// A sample was stored.
    Sampled {
        /// Its sequence number.
        seq: u64,
    },
    /// The clock is not set (before 2020): a reading was not stored.
    ClockNotSet,
    /// The inverter refused a read.
    InverterRefused(Exception),
    /// No answer from the inverter, after the link's retries.
    InverterUnreachable(TransportError),
    /// The store failed; what was being recorded.
    StorageFailed(&'static str, KvError),
    /// A request could not be sealed.
    SealFailed(SessionError),
    /// A sync failed; the next try is in `retry_in_ms`.
    SyncFailed {
        /// Why.
        error: String,
        /// Back-off.
        retry_in_ms: u64,
    },
    /// A sync went through after failures.
    ServerBack,
    /// The server's clock at its answer, Unix ms (a device without a clock
    /// of its own sets it from this).
    ServerTime(u64),
    /// A new config is applied (some fields may have been refused).
    ConfigApplied {
        /// The config now running.
        config: ConfigState,
        /// Fields refused.
        rejected: Vec<Rejection>,
    },
    /// A command was executed.
    CommandExecuted {
        /// What it was.
        op: Operation,
        /// How it went.
        result: CommandResult,
    },
    /// A command cut short by a restart was read back and reported.
    InterruptedResolved(CommandResult),
    /// The server acknowledged samples.
    Uploaded {
        /// Highest sequence number stored.
        acked_through: u64,
        /// Samples still waiting.
        backlog: usize,
    },
    /// An upload failed; its samples are kept.
    UploadFailed {
        /// Why.
        error: String,
        /// Samples waiting.
        backlog: usize,
    },
    /// Uploads use another telemetry codec from now on (the server's offer
    /// changed, or it refused the one in use: the batch goes again).
    CodecInUse {
        /// The codec version.
        version: u8,
    },
    /// The server refused the samples' times (a wrong clock): they are counted as dropped.
    SamplesRefused {
        /// Why.
        error: String,
        /// How many.
        discarded: u64,
    },
    /// A firmware update was offered and starts.
    UpdateOffered {
        /// The offered version.
        version: Version,
        /// Image size.
        size: u64,
    },
    /// An image fetch failed; it is retried from where it stopped.
    FetchFailed {
        /// Why.
        error: String,
        /// Attempts so far.
        attempt: u32,
    },
    /// The offer went away; progress is kept for a later offer.
    UpdateWithdrawn,
    /// The update was refused or failed, with an `ota_reason` code.
    UpdateFailed {
        /// Why (code).
        reason: u8,
        /// Why (words).
        message: String,
    },
    /// The image is verified and installed; a restart follows.
    UpdateInstalled {
        /// Its version.
        version: Version,
    },
    /// The server set the fail-safe limit (a `failsafe` value of the protocol).
    FailSafeSet(u16),
    /// A lease lapsed into the fail-safe, or came back when the server was heard.
    Lease(Episode),
    /// The schedule's step was written to the export limit.
    Scheduled {
        /// The limit, %.
        value: u16,
        /// Read back equal.
        confirmed: bool,
    },
    /// A ramp stepped the export limit (each step read back).
    Ramp {
        /// The command.
        command_id: u64,
        /// The limit now, %.
        value: u16,
        /// Where it goes, %.
        target: u16,
    },
    /// The running trial image reached the server and confirmed itself.
    Confirmed {
        /// Its version.
        version: Version,
    },
    /// The trial image did not reach the server in time; the old one boots next.
    HealthCheckFailed,
}

/// Why the device cannot boot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BootError {
    /// The store could not be read or written.
    Storage(KvError),
    /// The protocol session could not start.
    Session(SessionError),
}

impl fmt::Display for BootError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BootError::Storage(e) => e.fmt(f),
            BootError::Session(e) => e.fmt(f),
        }
    }
}

impl core::error::Error for BootError {}

impl From<KvError> for BootError {
    fn from(e: KvError) -> Self {
        BootError::Storage(e)
    }
}

/// How this boot started.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Booted {
    /// The slot running.
    pub slot: Slot,
    /// The version running.
    pub running: Version,
    /// A new image on trial.
    pub trial: bool,
}

/// The device: its stores and everything it is doing.
pub struct Device<K, S> {
    kv: K,
    slots: S,
    settings: Settings,
    booted: Booted,
    session: Session,
    log: SampleLog,
    config: ConfigState,
    rejected: Vec<Rejection>,
    journal: Journal,
    sched: Scheduler,
    up: Uploader,
    inverter: inverter::Inverter,
    sync: sync::Sync,
    upload: upload::Upload,
    update: update::Update,
    limit: limit::Limit,
    schedule: plan::Schedule,
    actions: VecDeque<Action>,
    /// Local commands taken this boot (part of their ids).
    local_commands: u64,
}

impl<K: KeyValue, S: Slots> Device<K, S> {
    /// Boots at `now_ms`: the boot decision (trial, rollback), then the
    /// session, sample log, config and journal from the store. A command a
    /// restart cut short is read back first.
    pub fn boot(
        mut kv: K,
        slots: S,
        creds: Credentials,
        settings: Settings,
        now_ms: u64,
    ) -> Result<Self, BootError> {
        let (slot, running, trial) = match ota::boot(&mut kv, &settings.factory)? {
            Boot::Confirmed(slot, v) => (slot, v, false),
            Boot::Trial(slot, v) => (slot, v, true),
        };
        let record = ota::BootRecord::load(&mut kv, &settings.factory)?;
        let session = Session::start(creds, &mut kv).map_err(BootError::Session)?;
        let log = SampleLog::open(&mut kv, settings.log_capacity)?;
        let (config, rejected) = control::load_config(&mut kv)?;
        let journal = Journal::load(&mut kv)?;
        let limit = limit::Limit::load(&mut kv, now_ms)?;
        let schedule = plan::Schedule::load(&mut kv)?;
        let update = update::Update::new(
            &running,
            trial,
            record.rolled_back.as_ref(),
            now_ms,
            settings.health_check_ms,
        );
        let mut d = Device {
            sched: Scheduler::new(&config, now_ms),
            up: Uploader::new(&config, settings.batch_max, now_ms),
            kv,
            slots,
            booted: Booted { slot, running, trial },
            session,
            log,
            config,
            rejected,
            journal,
            inverter: inverter::Inverter::default(),
            sync: sync::Sync::new(now_ms),
            upload: upload::Upload::default(),
            update,
            limit,
            schedule,
            actions: VecDeque::new(),
            settings,
            local_commands: 0,
        };
        d.advance(now_ms);
        Ok(d)
    }

    /// Takes in what happened at `now_ms`, then starts whatever is due.
    pub fn handle(&mut self, now_ms: u64, event: Event) {
        match event {
            Event::Tick => {}
            Event::Inverter(outcome) => self.on_inverter(now_ms, outcome),
            Event::Server { channel: Channel::Sync, answer } => self.on_sync(now_ms, answer),
            Event::Server { channel: Channel::Upload, answer } => self.on_upload(now_ms, answer),
            Event::Chunk(answer) => self.on_chunk(now_ms, answer),
        }
        self.advance(now_ms);
    }

    /// The next thing to do, oldest first.
    pub fn poll_action(&mut self) -> Option<Action> {
        self.actions.pop_front()
    }

    /// Call [`Device::handle`] with [`Event::Tick`] at this time at the latest.
    pub fn next_wakeup(&self) -> u64 {
        let mut at = u64::MAX;
        if self.inverter.idle() {
            at = at.min(self.sched.next_poll());
        }
        // (A sync waits for a limit write under way, whose answer wakes it.)
        if self.settings.cloud && !self.sync.busy() && !self.limit.writing() {
            at = at.min(self.sync.next_at());
        }
        if self.settings.cloud && !self.upload.busy() {
            if let Some(t) = self.up.next_due(self.log.len()) {
                at = at.min(t);
            }
        }
        if let Some(d) = self.limit.deadline() {
            at = at.min(d);
        }
        if let Some(r) = self.limit.ramp.filter(|_| self.inverter.idle()) {
            at = at.min(r.next_at);
        }
        // (A step that comes during a ramp waits for the ramp's end.)
        if let Some(t) = self.schedule.next_change().filter(|_| self.limit.ramp.is_none()) {
            at = at.min(t);
        }
        if let Some(t) = self.schedule.retry_at().filter(|_| self.inverter.idle()) {
            at = at.min(t);
        }
        at.min(self.update.next_wakeup())
    }

    /// How this boot started.
    pub fn booted(&self) -> &Booted {
        &self.booted
    }

    /// The config running.
    pub fn config(&self) -> &ConfigState {
        &self.config
    }

    /// The sample log.
    pub fn log(&self) -> &SampleLog {
        &self.log
    }

    fn say(&mut self, note: Note) {
        self.actions.push_back(Action::Note(note));
    }

    fn advance(&mut self, now_ms: u64) {
        self.advance_update(now_ms);
        self.advance_limit(now_ms);
        self.advance_plan(now_ms);
        self.advance_inverter(now_ms);
        if self.settings.cloud {
            self.advance_sync(now_ms);
            self.advance_upload(now_ms);
        }
    }

    /// An export-limit command from the device's own side (a home broker)
    /// on a device without a server: checked by the register map's rule,
    /// then written and read back like a server's command; its result is
    /// noted ([`Note::CommandExecuted`]) and not kept for a server. Returns
    /// the command's id. Refused on a device with a server (there the server
    /// queues, validates and audits every command), and while
    /// [`MAX_LOCAL_QUEUED`] commands wait.
    pub fn command_local(&mut self, now_ms: u64, percent: u16) -> Result<u64, LocalRefused> {
        if self.settings.cloud {
            return Err(LocalRefused::HasServer);
        }
        ecowatt_proto::registers::check_write(ecowatt_proto::registers::EXPORT_LIMIT, percent)
            .map_err(LocalRefused::Invalid)?;
        if self.inverter.queued() >= MAX_LOCAL_QUEUED {
            return Err(LocalRefused::Busy);
        }
        // Ids above 2^62 never meet a server's; unique across restarts
        // while the clock moves forward.
        self.local_commands = self.local_commands.wrapping_add(1);
        let id = LOCAL_ID_BASE | (now_ms << 4) | (self.local_commands & 0xF);
        let op = ecowatt_proto::messages::Operation::Write {
            register: ecowatt_proto::registers::EXPORT_LIMIT,
            value: percent,
        };
        let expires_ms = now_ms + LOCAL_COMMAND_TTL_MS;
        self.inverter.enqueue(alloc::vec![ecowatt_proto::messages::DeviceCommand {
            id,
            op,
            expires_ms
        }]);
        self.advance(now_ms);
        Ok(id)
    }
}
