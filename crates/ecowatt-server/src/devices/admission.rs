//! Admitting an authentic message: the key that sealed it must still be one
//! of the device's two, its counter new to that key's replay window, and the
//! device enabled. Checked and advanced in the transaction that applies the
//! message (telemetry uploads are checked the same way, in groups, by
//! `telemetry/ingest.rs`, with [`slot_of`] and [`window`]).

use sqlx::Row;

use super::DeviceId;
use super::keys::{slot_of, window, window_columns};
use crate::db::{StoreError, StoreResult, WriteTx};

/// Why an authentic message was not accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SyncRefusal {
    /// Its counter was seen before or is below the window.
    Replay(ecowatt_proto::replay::ReplayError),
    /// The device is disabled (or was removed while its message waited).
    Disabled,
    /// The key that sealed it is no longer one of the device's two (rotated
    /// out since the request's key was looked up).
    StaleKey,
}

/// The device, as admitting a message finds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Admitted {
    /// Its name.
    pub name: String,
    /// The firmware version it last reported.
    pub firmware: Option<String>,
}

/// Locks the device's row, checks the key version and that key's window,
/// advances the window and records that the device was seen; the caller
/// applies the message in the same transaction.
pub async fn admit_in(
    tx: &mut WriteTx,
    device_id: DeviceId,
    key_version: i64,
    counter: u64,
    now: i64,
) -> StoreResult<Result<Admitted, SyncRefusal>> {
    let lock = tx.db().for_update();
    let row = sqlx::query(&format!("SELECT * FROM devices WHERE id = $1{lock}"))
        .bind(device_id)
        .fetch_optional(&mut **tx)
        .await?
        .ok_or_else(|| StoreError::NotFound(format!("device {device_id}")))?;
    let current = row.try_get("key_version")?;
    let Some(key_slot) = slot_of(key_version, current, row.try_get("previous_key_version")?) else {
        return Ok(Err(SyncRefusal::StaleKey));
    };
    let mut w = window(&row, key_slot)?;
    if let Err(e) = w.accept(counter) {
        return Ok(Err(SyncRefusal::Replay(e)));
    }
    if row.try_get::<i64, _>("enabled")? == 0 {
        return Ok(Err(SyncRefusal::Disabled));
    }
    let (h, b) = window_columns(key_slot);
    sqlx::query(&format!("UPDATE devices SET {h} = $1, {b} = $2, last_seen_ms = $3 WHERE id = $4"))
        .bind(w.highest as i64)
        .bind(w.bitmap as i64)
        .bind(now)
        .bind(device_id)
        .execute(&mut **tx)
        .await?;
    Ok(Ok(Admitted { name: row.try_get("name")?, firmware: row.try_get("firmware")? }))
}

/// The device's name, locking its row (a delivery without a message to admit).
pub async fn name_in(tx: &mut WriteTx, device_id: DeviceId) -> StoreResult<String> {
    let lock = tx.db().for_update();
    let row = sqlx::query(&format!("SELECT name FROM devices WHERE id = $1{lock}"))
        .bind(device_id)
        .fetch_optional(&mut **tx)
        .await?
        .ok_or_else(|| StoreError::NotFound(format!("device {device_id}")))?;
    Ok(row.try_get("name")?)
}
