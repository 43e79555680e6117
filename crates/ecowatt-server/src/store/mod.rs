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

pub use crate::commands::{Command, CommandFilter, CommandOutcome, CommandStats};
use crate::config::DeviceConfig;
pub use crate::config::{ConfigShadow, ConfigVersion, Rejection};
pub use crate::devices::{Device, DeviceCrypto, KeyLookup, KeySlot};
use crate::domain::Invalid;
pub use sql::SqlStore;

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
