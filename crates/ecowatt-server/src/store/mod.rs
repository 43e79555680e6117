//! Durable state behind one [`Store`] trait. [`SqlStore`] implements it for
//! SQLite (the default: one WAL file in the data directory) and PostgreSQL
//! (`postgres://...`) from one code path, with the few dialect differences
//! kept in [`schema`] and [`sql::Dialect`]. Every change and its audit entry
//! are written in one transaction.

pub mod device_sql;
mod ingest;
pub mod sql;

pub use crate::db::sqlite_file;
pub use crate::db::{StoreError, StoreResult};

use async_trait::async_trait;
use serde::Serialize;

pub use crate::commands::{Command, CommandFilter, CommandOutcome, CommandStats};
use crate::config::DeviceConfig;
pub use crate::config::{ConfigShadow, ConfigVersion, Rejection};
pub use crate::devices::{Device, DeviceCrypto, KeyLookup, KeySlot};
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
    pub update: Option<crate::firmware::rollouts::Offer>,
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
