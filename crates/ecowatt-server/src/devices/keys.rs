//! Devices' keys, kept in memory.
//!
//! Every device request needs its device's key before anything else, and a
//! key changes only when an operator rotates it: reading it from the database
//! every time was the most frequent query of a fleet (one per request, ~2,200
//! per second for 10,000 devices). The copy here can be stale in only one way
//! that matters, a rotation made by another server process, and that is
//! caught where it counts: the transaction that admits a message checks the
//! key version against the device's row (`SyncRefusal::StaleKey`).
//! A version the copy does not hold is read again, and this process forgets
//! a device's entry when it rotates its key or deletes it.
//!
//! Every device's keys are loaded when the store opens, so the copy is
//! *complete*: a device id it does not hold is unknown, answered without a
//! read (an unknown id then costs what a bad tag costs, and ids cannot be
//! probed by timing; a flood of made-up ids costs the database nothing). On
//! SQLite one process owns the store, so the copy stays complete. On
//! PostgreSQL other servers add, rotate and remove devices too: they
//! announce it (`NOTIFY ecowatt_keys`), and the copy counts as complete only
//! while this process is listening; between a lost connection and the
//! reload after the next one, a miss is read from the database.

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};

use ecowatt_proto::replay::ReplayWindow;
use sqlx::Row;
use sqlx::any::AnyRow;

use super::DeviceId;
use crate::db::{Db, Dialect, StoreResult};

/// Which of a device's keys sealed a message: found in the transaction that
/// admits it, from the key version the door opened it with and the device's
/// row as it is then (a rotation since the door looked moves that key to
/// the previous slot, or out).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeySlot {
    /// The key from the latest rotation.
    Current,
    /// The key before it, still accepted so that nothing in flight is lost.
    Previous,
}

/// Which of the device's keys (as its row stands) has `key_version`.
pub fn slot_of(key_version: i64, current: i64, previous: Option<i64>) -> Option<KeySlot> {
    if key_version == current {
        Some(KeySlot::Current)
    } else if previous == Some(key_version) {
        Some(KeySlot::Previous)
    } else {
        None
    }
}

/// The columns of a device row that hold `slot`'s replay window.
pub fn window_columns(slot: KeySlot) -> (&'static str, &'static str) {
    match slot {
        KeySlot::Current => ("replay_high", "replay_bitmap"),
        KeySlot::Previous => ("prev_replay_high", "prev_replay_bitmap"),
    }
}

/// The replay window of `slot` as stored in a device row (read through
/// `Any` or, by the PostgreSQL ingest task, through the typed driver).
pub fn window<R: Row>(row: &R, slot: KeySlot) -> StoreResult<ReplayWindow>
where
    for<'r> i64: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    for<'r> &'r str: sqlx::ColumnIndex<R>,
{
    let (h, b) = window_columns(slot);
    // Stored as BIGINT: counters stay below 2^63, the bitmap is reinterpreted.
    Ok(ReplayWindow {
        highest: row.try_get::<i64, _>(h)? as u64,
        bitmap: row.try_get::<i64, _>(b)? as u64,
    })
}

/// What the server needs to open a device's envelopes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceCrypto {
    /// The device's id.
    pub id: DeviceId,
    /// Its name.
    pub name: String,
    /// The version of its current key.
    pub key_version: i64,
    /// Its key, hex.
    pub key_hex: String,
    /// The key before the latest rotation, hex, and its version.
    pub previous: Option<(String, i64)>,
}

impl DeviceCrypto {
    /// The key the header's version byte names, the current one or the one
    /// before it, with its full version.
    pub fn key_for(&self, key_version: u8) -> Option<(i64, [u8; 16])> {
        let decode = |hex: &str| -> Option<[u8; 16]> {
            ecowatt_proto::hex::decode(hex).ok()?.try_into().ok()
        };
        if self.key_version as u8 == key_version {
            return decode(&self.key_hex).map(|k| (self.key_version, k));
        }
        match &self.previous {
            Some((hex, v)) if *v as u8 == key_version => decode(hex).map(|k| (*v, k)),
            _ => None,
        }
    }

    /// Whether one of its keys has the version byte `key_version`.
    pub fn holds(&self, key_version: u8) -> bool {
        self.key_version as u8 == key_version
            || self.previous.as_ref().is_some_and(|(_, v)| *v as u8 == key_version)
    }
}

/// What the door learns of a device id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyLookup {
    /// Its keys.
    Found(DeviceCrypto),
    /// No such device.
    Unknown,
    /// Not in memory, and the caller asked not to read the database.
    NotLookedUp,
}

const KEY_COLUMNS: &str = "id, name, key_version, device_key, previous_key, previous_key_version";

fn crypto_from(row: &AnyRow) -> StoreResult<DeviceCrypto> {
    let previous_key: Option<String> = row.try_get("previous_key")?;
    let previous_version: Option<i64> = row.try_get("previous_key_version")?;
    Ok(DeviceCrypto {
        id: row.try_get("id")?,
        name: row.try_get("name")?,
        key_version: row.try_get("key_version")?,
        key_hex: row.try_get("device_key")?,
        previous: previous_key.zip(previous_version),
    })
}

/// The PostgreSQL channel on which a server announces that a device's keys
/// changed (payload: the device id).
pub const CHANNEL: &str = "ecowatt_keys";

/// At most this many devices' keys are kept; past it the map starts over
/// (a fleet this size would be served by several processes anyway).
const MAX_ENTRIES: usize = 1_000_000;

/// Device id → keys.
#[derive(Default)]
pub struct KeyCache {
    map: Mutex<HashMap<DeviceId, DeviceCrypto>>,
    complete: AtomicBool,
}

impl KeyCache {
    /// The keys of the device with this numeric id, from memory; read from
    /// the database (if `may_read`) when the copy does not hold `key_version`
    /// (the low byte an envelope carries) or is not complete.
    pub async fn lookup(
        &self,
        db: &Db,
        device_id: DeviceId,
        key_version: u8,
        may_read: bool,
    ) -> StoreResult<KeyLookup> {
        match self.get(device_id) {
            Some(c) if c.holds(key_version) => return Ok(KeyLookup::Found(c)),
            // Not a device: answered from memory when the copy is complete.
            None if self.is_complete() => return Ok(KeyLookup::Unknown),
            // A version the copy lacks (a rotation elsewhere) or a copy that
            // may lack the device: read again, unless told not to.
            _ if !may_read => return Ok(KeyLookup::NotLookedUp),
            _ => {}
        }
        Ok(match self.read(db, device_id).await? {
            Some(c) => KeyLookup::Found(c),
            None => KeyLookup::Unknown,
        })
    }

    /// Reads one device's keys into memory (or forgets it, if it is gone).
    pub async fn read(&self, db: &Db, device_id: DeviceId) -> StoreResult<Option<DeviceCrypto>> {
        let row = sqlx::query(&format!("SELECT {KEY_COLUMNS} FROM devices WHERE id = $1"))
            .bind(device_id)
            .fetch_optional(db.reader())
            .await?;
        let Some(row) = row else {
            self.forget(device_id);
            return Ok(None);
        };
        let crypto = crypto_from(&row)?;
        self.put(crypto.clone());
        Ok(Some(crypto))
    }

    /// Reads every device's keys; complete when `listening` (or on SQLite).
    pub async fn reload(&self, db: &Db, listening: bool) -> StoreResult<()> {
        let rows = sqlx::query(&format!("SELECT {KEY_COLUMNS} FROM devices"))
            .fetch_all(db.reader())
            .await?;
        let all = rows.iter().map(crypto_from).collect::<StoreResult<Vec<_>>>()?;
        self.load(all, listening || db.dialect() == Dialect::Sqlite);
        Ok(())
    }

    /// Replaces the whole copy with `all` devices' keys; it is then complete
    /// if `complete` (see the module documentation).
    pub fn load(&self, all: Vec<DeviceCrypto>, complete: bool) {
        let mut map = self.lock();
        map.clear();
        if all.len() <= MAX_ENTRIES {
            map.extend(all.into_iter().map(|c| (c.id, c)));
            self.complete.store(complete, Ordering::SeqCst);
        } else {
            self.complete.store(false, Ordering::SeqCst);
        }
    }

    /// Whether a device id missing from the copy is unknown.
    pub fn is_complete(&self) -> bool {
        self.complete.load(Ordering::SeqCst)
    }

    /// The copy may miss changes from now on (another server's announcements
    /// are not being heard).
    pub fn set_incomplete(&self) {
        self.complete.store(false, Ordering::SeqCst);
    }

    /// The keys kept for `device_id`.
    pub fn get(&self, device_id: DeviceId) -> Option<DeviceCrypto> {
        self.lock().get(&device_id).cloned()
    }

    /// Keeps `crypto` (replacing what was kept for its device).
    pub fn put(&self, crypto: DeviceCrypto) {
        let mut map = self.lock();
        if map.len() >= MAX_ENTRIES && !map.contains_key(&crypto.id) {
            map.clear();
            self.complete.store(false, Ordering::SeqCst);
        }
        map.insert(crypto.id, crypto);
    }

    /// Drops what is kept for `device_id`.
    pub fn forget(&self, device_id: DeviceId) {
        self.lock().remove(&device_id);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<DeviceId, DeviceCrypto>> {
        // A panic while holding the lock cannot leave the map half-changed.
        self.map.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}
