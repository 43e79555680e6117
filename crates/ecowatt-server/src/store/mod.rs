//! Durable state behind one [`Store`] trait. [`SqlStore`] implements it for
//! SQLite (the default: one WAL file in the data directory) and PostgreSQL
//! (`postgres://...`) from one code path, with the few dialect differences
//! kept in [`schema`] and [`sql::Dialect`]. Every change and its audit entry
//! are written in one transaction.

pub mod device_sql;
mod ingest;
pub mod rollout_sql;
pub mod sql;

pub use crate::db::sqlite_file;
pub use crate::db::{StoreError, StoreResult};

use std::collections::BTreeMap;

use async_trait::async_trait;
use serde::Serialize;

pub use crate::devices::{Device, DeviceCrypto, KeyLookup, KeySlot};
use crate::domain::{Action, CommandRequest, CommandStatus, ConfigPatch, DeviceConfig, Invalid};
pub use sql::SqlStore;

/// A device's config shadow: what it should run and what it reports running.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ConfigShadow {
    /// The device.
    pub device: String,
    /// Desired config version, increasing from 1.
    pub desired_version: i64,
    /// Desired config.
    pub desired: DeviceConfig,
    /// When the desired config was last changed.
    pub desired_ms: i64,
    /// Version the device reports it applied.
    pub reported_version: Option<i64>,
    /// Config the device reports running.
    pub reported: Option<DeviceConfig>,
    /// Fields the device rejected, with its reasons.
    pub rejected: Vec<Rejection>,
    /// When the device last reported.
    pub reported_ms: Option<i64>,
}

/// A field the device refused to apply, and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct Rejection {
    /// The field.
    pub field: String,
    /// The device's reason.
    pub reason: String,
}

/// One version of a device's desired config.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ConfigVersion {
    /// The version.
    pub version: i64,
    /// The config.
    pub config: DeviceConfig,
    /// Who set it.
    pub actor: String,
    /// When.
    pub at_ms: i64,
}

/// A queued inverter command and everything known about it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Command {
    /// Numeric id, never reused.
    pub id: i64,
    /// The device it is for.
    pub device: String,
    /// The seed's command type (`set_power_percentage`, ...).
    pub kind: String,
    /// The seed's `parameters`.
    pub parameters: serde_json::Value,
    /// What the device does on the inverter.
    pub action: Action,
    /// Where it is in its life.
    pub status: CommandStatus,
    /// When it was queued.
    pub created_ms: i64,
    /// Who queued it.
    pub created_by: String,
    /// When it expires if no result has arrived.
    pub expires_ms: i64,
    /// When it was last handed to the device.
    pub delivered_ms: Option<i64>,
    /// How often it was handed to the device.
    pub delivery_count: i64,
    /// When its result arrived (or it expired or was cancelled).
    pub completed_ms: Option<i64>,
    /// When the device says it executed it.
    pub executed_ms: Option<i64>,
    /// The device's message, or why it ended.
    pub result_message: Option<String>,
    /// The Modbus exception code, when the inverter refused.
    pub exception_code: Option<i64>,
    /// The register value read back (or read) by the device.
    pub result_value: Option<i64>,
    /// When a later reading confirmed the value.
    pub confirmed_ms: Option<i64>,
}

/// A device's report of how a command went.
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize, Serialize)]
pub struct CommandOutcome {
    /// Whether it succeeded.
    pub success: bool,
    /// Free text.
    pub message: Option<String>,
    /// Modbus exception code, when the inverter refused.
    pub exception_code: Option<u8>,
    /// Register value read back (or read).
    pub value: Option<u16>,
    /// When the device executed it.
    pub executed_ms: Option<i64>,
}

/// Which commands to list.
#[derive(Debug, Clone, Default)]
pub struct CommandFilter {
    /// Only this device's.
    pub device: Option<String>,
    /// Only in this status.
    pub status: Option<CommandStatus>,
    /// Only of this type.
    pub kind: Option<String>,
    /// Only ids below this (paging backwards, newest first).
    pub before_id: Option<i64>,
    /// Only queued at or after this time.
    pub since_ms: Option<i64>,
    /// At most this many.
    pub limit: i64,
}

/// Command statistics (the seed's fields and more).
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct CommandStats {
    /// All commands.
    pub total_commands: i64,
    /// Count by status.
    pub by_status: BTreeMap<String, i64>,
    /// Count by type.
    pub by_type: BTreeMap<String, i64>,
    /// Succeeded (or confirmed) over all finished by the device, percent.
    pub success_rate: f64,
    /// Mean time from queued to result, ms, over commands with a result.
    pub average_completion_ms: Option<f64>,
    /// Mean time from queued to first delivery, ms.
    pub average_delivery_ms: Option<f64>,
}

/// An upload (or quiet sync) accepted by the ingest task.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Accepted {
    /// The answer's down counter.
    pub down_counter: u64,
    /// The device has succeeded writes that no reading has confirmed yet
    /// (read with its row in the same group, so an upload only asks about
    /// confirmations when there are some; reads are never confirmed and do
    /// not count).
    pub unconfirmed: bool,
}

/// What an authentic sync request reports, to be applied once.
#[derive(Debug, Clone)]
pub struct SyncReport {
    /// The version of the key that sealed it.
    pub key_version: i64,
    /// Its counter.
    pub counter: u64,
    /// The config version and config the device runs.
    pub applied: Option<(i64, DeviceConfig)>,
    /// Fields it refused.
    pub rejected: Vec<Rejection>,
    /// Command results.
    pub results: Vec<(i64, CommandOutcome)>,
    /// Firmware version it runs.
    pub firmware: Option<String>,
    /// How its firmware update is going.
    pub ota: Option<ecowatt_proto::messages::OtaReport>,
}

/// Why an authentic message was not accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SyncRefusal {
    /// Its counter was seen before or is below the window.
    Replay(ecowatt_proto::replay::ReplayError),
    /// The device is disabled.
    Disabled,
    /// The key that sealed it is no longer one of the device's two (rotated
    /// out since the request's key was looked up).
    StaleKey,
}

/// What goes back to the device in a sync answer.
#[derive(Debug, Clone)]
pub struct SyncDelivery {
    /// The device's name.
    pub device: String,
    /// The server's counter for the answer.
    pub down_counter: u64,
    /// The desired config, when the device does not run it.
    pub config: Option<(i64, DeviceConfig)>,
    /// Commands handed out.
    pub commands: Vec<Command>,
    /// A firmware update to offer.
    pub update: Option<UpdateOfferRow>,
    /// Devices whose offer just became due (a rollout moved to its next
    /// wave): their long polls are woken.
    pub wake: Vec<String>,
}

/// A firmware update offered to one device in one rollout.
#[derive(Debug, Clone, PartialEq)]
pub struct UpdateOfferRow {
    /// Names the download (hex of 16 random bytes).
    pub token: String,
    /// The image's signed manifest JSON, as uploaded.
    pub manifest: serde_json::Value,
}

/// Which devices a rollout is for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RolloutTarget {
    /// These devices, by name.
    Devices(Vec<String>),
    /// This percentage (1-100) of the enabled devices.
    Percent(u32),
}

/// A rollout to create.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewRollout {
    /// The image.
    pub firmware_id: i64,
    /// The devices.
    pub target: RolloutTarget,
    /// Cumulative percentages of the rollout's devices per wave, ending at 100.
    pub waves: Vec<u32>,
    /// A wave whose failures (failed or rolled back) exceed this percentage of
    /// its devices aborts the rollout.
    pub failure_threshold_pct: u32,
}

/// What an operator does to a rollout.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RolloutAction {
    /// Stop offering; downloads in flight stop and keep their progress.
    Pause,
    /// Offer again.
    Resume,
    /// Stop for good: devices not yet installing are cancelled.
    Abort,
}

/// A rollout with its progress.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Rollout {
    /// Numeric id.
    pub id: i64,
    /// The image.
    pub firmware_id: i64,
    /// Its version.
    pub version: String,
    /// Its hardware target.
    pub target: String,
    /// `running`, `paused`, `aborted` or `completed`.
    pub state: String,
    /// Cumulative percentages per wave.
    pub waves: Vec<u32>,
    /// The wave being offered (from 0).
    pub current_wave: i64,
    /// Abort threshold, percent of a wave.
    pub failure_threshold_pct: i64,
    /// Why it was aborted.
    pub reason: Option<String>,
    /// When it was created.
    pub created_ms: i64,
    /// Who created it.
    pub created_by: String,
    /// Last change.
    pub updated_ms: i64,
    /// Devices per state.
    pub counts: BTreeMap<String, i64>,
    /// Devices in it.
    pub devices_total: i64,
}

/// One device's progress in a rollout.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RolloutDevice {
    /// Device name.
    pub device: String,
    /// Its wave (from 0).
    pub wave: i64,
    /// `pending`, `offered`, `downloading`, `verifying`, `installing`, `trial`,
    /// `succeeded`, `failed`, `rolled_back` or `cancelled`.
    pub state: String,
    /// Bytes downloaded.
    pub done: i64,
    /// Image size.
    pub total: i64,
    /// Download progress, percent.
    pub percent: i64,
    /// Why it failed or rolled back.
    pub reason: Option<String>,
    /// The version the device reports running.
    pub running: Option<String>,
    /// Last change.
    pub updated_ms: i64,
}

/// A security event: refusals of one kind from one source address (about
/// one device, when known) within one minute, counted.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SecurityEvent {
    /// Numeric id.
    pub id: i64,
    /// The first of them.
    pub at_ms: i64,
    /// The last of them.
    pub last_ms: i64,
    /// How many.
    pub count: i64,
    /// The peer's address, when known.
    pub source: Option<String>,
    /// The device concerned, when known.
    pub device: Option<String>,
    /// What (`unknown_device`, `bad_tag`, `replay`, `operator_auth_failed`, ...).
    pub kind: String,
    /// Details of the first (never key material).
    pub detail: serde_json::Value,
}

/// A security event as [`crate::refusals::Refusals`] writes it: a new row
/// (`id` none) or a new count and last time for a row written before.
#[derive(Debug, Clone, PartialEq)]
pub struct SecurityEventRow {
    /// The row, once written.
    pub id: Option<i64>,
    /// The first refusal.
    pub at_ms: i64,
    /// The last refusal.
    pub last_ms: i64,
    /// The peer's address.
    pub source: Option<String>,
    /// The device concerned.
    pub device: Option<String>,
    /// The kind.
    pub kind: String,
    /// Details of the first.
    pub detail: serde_json::Value,
    /// How many so far.
    pub count: i64,
}

/// A telemetry batch as the device sent it, with what the server read from it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredBatch {
    /// First `seq` in it.
    pub first_seq: i64,
    /// Last `seq` in it.
    pub last_seq: i64,
    /// Number of samples.
    pub count: i64,
    /// Time of its first sample, Unix ms.
    pub first_ms: i64,
    /// Time of its last sample, Unix ms.
    pub last_ms: i64,
    /// Register mask.
    pub registers: i64,
    /// Codec (1: v1).
    pub codec: i64,
    /// The encoded samples.
    pub data: Vec<u8>,
}

/// A stored firmware image's record (the bytes are fetched separately).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Firmware {
    /// Numeric id.
    pub id: i64,
    /// Semantic version.
    pub version: String,
    /// Hardware target.
    pub target: String,
    /// Size, bytes.
    pub size: i64,
    /// SHA-256, hex.
    pub sha256: String,
    /// Anti-rollback counter.
    pub security_counter: i64,
    /// When it was signed.
    pub created_ms: i64,
    /// The signed manifest as uploaded.
    pub manifest: serde_json::Value,
    /// When it was uploaded.
    pub uploaded_ms: i64,
    /// Who uploaded it.
    pub uploaded_by: String,
}

/// Everything the server keeps.
#[async_trait]
pub trait Store: Send + Sync {
    /// Which backend this is (`sqlite`, `postgres`).
    fn backend(&self) -> &'static str;

    /// Whether the store can write now (a probe, reused for a second).
    async fn writable(&self) -> StoreResult<()>;

    /// Closes the connections (SQLite then folds its write-ahead log into
    /// the database file).
    async fn close(&self);

    // --- config shadow
    /// A device's config shadow.
    async fn config(&self, device: &str) -> StoreResult<ConfigShadow>;
    /// Applies `patch` to the desired config as a new version (validated).
    async fn update_config(
        &self,
        device: &str,
        patch: &ConfigPatch,
        actor: &str,
        now: i64,
    ) -> StoreResult<ConfigShadow>;
    /// Desired config versions, newest first.
    async fn config_history(&self, device: &str, limit: i64) -> StoreResult<Vec<ConfigVersion>>;
    /// Records what the device applied.
    async fn report_config(
        &self,
        device: &str,
        version: i64,
        applied: &DeviceConfig,
        rejected: &[Rejection],
        now: i64,
    ) -> StoreResult<ConfigShadow>;
    /// For the legacy `/changes`: the desired config, and whether to flag it as
    /// changed. A version is flagged on `repeat` polls, then counted as applied.
    async fn legacy_config_poll(
        &self,
        device: &str,
        repeat: i64,
        now: i64,
    ) -> StoreResult<(bool, DeviceConfig)>;

    // --- commands
    /// Queues a validated command.
    async fn queue_command(
        &self,
        device: &str,
        request: &CommandRequest,
        action: Action,
        ttl_ms: i64,
        actor: &str,
        now: i64,
    ) -> StoreResult<Command>;
    /// One command.
    async fn command(&self, id: i64) -> StoreResult<Command>;
    /// Commands matching `filter`, newest first.
    async fn commands(&self, filter: &CommandFilter) -> StoreResult<Vec<Command>>;
    /// Cancels an open command.
    async fn cancel_command(&self, id: i64, actor: &str, now: i64) -> StoreResult<Command>;
    /// Marks expired every open command past its time-to-live; returns how many.
    async fn expire_commands(&self, now: i64) -> StoreResult<u64>;
    /// Hands out up to `max` open commands of a device, oldest first: queued
    /// ones, and delivered ones with no result for `redeliver_after_ms`.
    async fn deliver_commands(
        &self,
        device: &str,
        redeliver_after_ms: i64,
        max: i64,
        now: i64,
    ) -> StoreResult<Vec<Command>>;
    /// Records a device's result once; a repeat of a finished command's result
    /// returns the command unchanged.
    async fn record_result(
        &self,
        device: &str,
        id: i64,
        outcome: &CommandOutcome,
        now: i64,
    ) -> StoreResult<Command>;
    /// Marks confirmed the succeeded writes of `register` = `value` on `device`
    /// executed before `reading_ms`; returns how many.
    async fn confirm_commands(
        &self,
        device: &str,
        register: u16,
        value: u16,
        reading_ms: i64,
    ) -> StoreResult<u64>;
    /// Statistics, for one device or all.
    async fn command_stats(&self, device: Option<&str>) -> StoreResult<CommandStats>;

    // --- device protocol
    /// In one transaction: checks and advances the replay window of the key
    /// that sealed the message, applies what it reports, and (if `deliver`)
    /// hands out the config and commands the device is to get.
    async fn device_sync(
        &self,
        device_id: i64,
        report: &SyncReport,
        deliver: bool,
        redeliver_after_ms: i64,
        now: i64,
    ) -> StoreResult<Result<SyncDelivery, SyncRefusal>>;
    /// Hands out the config and commands for a sync answer after a long poll.
    async fn device_deliver(
        &self,
        device_id: i64,
        redeliver_after_ms: i64,
        now: i64,
    ) -> StoreResult<SyncDelivery>;
    /// In one transaction: checks the key version and advances that key's
    /// replay window, stores the batch (a retry of a stored batch changes
    /// nothing) and the device's drop count. Returns the answer's down counter
    /// and whether writes await confirmation.
    async fn device_telemetry(
        &self,
        device_id: i64,
        key_version: i64,
        counter: u64,
        batch: &StoredBatch,
        dropped_total: i64,
        now: i64,
    ) -> StoreResult<Result<Accepted, SyncRefusal>>;
    /// Batches of `device` with samples between `from_ms` and `to_ms`, in `seq` order.
    async fn telemetry(
        &self,
        device: &str,
        from_ms: i64,
        to_ms: i64,
    ) -> StoreResult<Vec<StoredBatch>>;
    /// The batch holding the device's newest sample.
    async fn telemetry_latest(&self, device: &str) -> StoreResult<Option<StoredBatch>>;
    /// Samples the device reported dropping.
    async fn dropped_total(&self, device: &str) -> StoreResult<i64>;
    /// Stores a verified firmware image (Conflict if that version and target exist).
    async fn add_firmware(&self, fw: &Firmware, data: &[u8], actor: &str) -> StoreResult<Firmware>;
    /// Every firmware image's record, newest upload first.
    async fn list_firmware(&self) -> StoreResult<Vec<Firmware>>;
    /// A firmware image's bytes.
    async fn firmware_data(&self, id: i64) -> StoreResult<(Firmware, Vec<u8>)>;
    /// The image a device download token names.
    async fn firmware_by_token(&self, token: &str) -> StoreResult<(Firmware, Vec<u8>)>;
    /// Starts a rollout (its first wave is offered at the devices' next sync).
    async fn create_rollout(&self, new: &NewRollout, actor: &str, now: i64)
    -> StoreResult<Rollout>;
    /// Every rollout, newest first.
    async fn rollouts(&self) -> StoreResult<Vec<Rollout>>;
    /// One rollout with every device's progress.
    async fn rollout(&self, id: i64) -> StoreResult<(Rollout, Vec<RolloutDevice>)>;
    /// Pauses, resumes or aborts a rollout; the devices whose long polls should
    /// wake come back with it.
    async fn rollout_action(
        &self,
        id: i64,
        action: RolloutAction,
        actor: &str,
        now: i64,
    ) -> StoreResult<(Rollout, Vec<String>)>;
    /// Writes tallied security events in one transaction: inserts the rows
    /// without an id, updates the count and last time of the others; returns
    /// every row's id, in order.
    async fn save_security_events(&self, rows: &[SecurityEventRow]) -> StoreResult<Vec<i64>>;
    /// Deletes security events whose last refusal is older than `before_ms`;
    /// returns how many.
    async fn purge_security_events(&self, before_ms: i64) -> StoreResult<u64>;
    /// Security events, newest first.
    async fn security_events(
        &self,
        before_id: Option<i64>,
        limit: i64,
    ) -> StoreResult<Vec<SecurityEvent>>;
}
