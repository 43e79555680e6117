//! Devices and their keys: registration (name and rated-power rules),
//! enabling, key rotation (the previous key stays valid, with its own replay
//! window, until the next rotation), removal, and every device's keys kept in
//! memory ([`keys`]) so that a request needs no read before its transaction.

pub mod admission;
mod id;
pub mod keys;

use serde::Serialize;
use serde_json::json;
use sqlx::any::AnyRow;
use sqlx::{AnyConnection, Row};

pub use id::DeviceId;
pub use keys::{DeviceCrypto, KeyLookup, KeySlot};

use crate::db::{Db, StoreError, StoreResult, WriteTx};
use crate::domain::Invalid;
use crate::operators::audit;

/// A registered device (its key is never part of this).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct Device {
    /// Numeric id, never reused.
    pub id: DeviceId,
    /// Unique name (the seed's `device_id`).
    pub name: String,
    /// Rated AC power of its inverter, W.
    pub rated_power_w: i64,
    /// Disabled devices are refused by the device-facing APIs.
    pub enabled: bool,
    /// Incremented on each key rotation.
    pub key_version: i64,
    /// When it was added.
    pub created_ms: i64,
    /// When it last talked to the server.
    pub last_seen_ms: Option<i64>,
    /// The firmware version it last reported.
    pub firmware: Option<String>,
    /// It runs the original firmware: its legacy uploads are accepted.
    pub legacy: bool,
}

/// Validates a time zone name (IANA, e.g. `Europe/Berlin`, or `UTC`).
pub fn check_timezone(name: &str) -> Result<(), Invalid> {
    jiff::tz::TimeZone::get(name).map(|_| ()).map_err(|_| {
        Invalid::new("timezone", format!("{name:?} is not an IANA time zone (e.g. Europe/Berlin)"))
    })
}

/// Validates a device name: 1..=64 characters of letters, digits, `_`, `-`,
/// `.`, not only dots (a name made of dots is a path step in every URL that
/// names a device).
pub fn check_name(name: &str) -> Result<(), Invalid> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'))
        && name.chars().any(|c| c != '.');
    if ok {
        Ok(())
    } else {
        Err(Invalid::new("name", "use 1 to 64 letters, digits, '_', '-' or '.', not only dots"))
    }
}

/// Rated power limits, watts.
pub const RATED_W: (i64, i64) = (100, 65_000);

/// Validates a rated power.
pub fn check_rated_w(w: i64) -> Result<i64, Invalid> {
    if (RATED_W.0..=RATED_W.1).contains(&w) {
        Ok(w)
    } else {
        Err(Invalid::new(
            "rated_power_w",
            format!("{w} W is outside {}..={} W", RATED_W.0, RATED_W.1),
        ))
    }
}

/// A new device key: 128 random bits, hex.
pub fn new_key() -> String {
    crate::random_hex(16)
}

fn device_from(row: &AnyRow) -> StoreResult<Device> {
    Ok(Device {
        id: row.try_get("id")?,
        name: row.try_get("name")?,
        rated_power_w: row.try_get("rated_w")?,
        enabled: row.try_get::<i64, _>("enabled")? != 0,
        key_version: row.try_get("key_version")?,
        created_ms: row.try_get("created_ms")?,
        last_seen_ms: row.try_get("last_seen_ms")?,
        firmware: row.try_get("firmware")?,
        legacy: row.try_get::<i64, _>("legacy")? != 0,
    })
}

/// The device named `name` in a transaction (locked on PostgreSQL when
/// `lock`): what other aggregates that act on a device start from.
pub async fn named_in(
    db: &Db,
    c: &mut AnyConnection,
    name: &str,
    lock: bool,
) -> StoreResult<Device> {
    let lock = if lock { db.for_update() } else { "" };
    let row = sqlx::query(&format!("SELECT * FROM devices WHERE name = $1{lock}"))
        .bind(name)
        .fetch_optional(c)
        .await?;
    row.as_ref()
        .map(device_from)
        .transpose()?
        .ok_or_else(|| StoreError::NotFound(format!("device {name:?}")))
}

/// Adds a device with its key (version 1) and its audit entry in `tx`;
/// every server process learns its keys at commit ([`Devices::learn_keys`]
/// for this one). Registration (`crate::registration`) gives it its first
/// desired config in the same transaction.
pub async fn create_in(
    tx: &mut WriteTx,
    name: &str,
    rated_w: i64,
    key_hex: &str,
    actor: &str,
    now: i64,
) -> StoreResult<Device> {
    check_name(name)?;
    check_rated_w(rated_w)?;
    let exists = sqlx::query("SELECT id FROM devices WHERE name = $1")
        .bind(name)
        .fetch_optional(&mut **tx)
        .await?;
    if exists.is_some() {
        return Err(StoreError::Conflict(format!("a device named {name:?} already exists")));
    }
    let row = sqlx::query(
        "INSERT INTO devices (name, device_key, key_version, rated_w, enabled, created_ms) \
         VALUES ($1, $2, 1, $3, 1, $4) RETURNING *",
    )
    .bind(name)
    .bind(key_hex)
    .bind(rated_w)
    .bind(now)
    .fetch_one(&mut **tx)
    .await?;
    let device = device_from(&row)?;
    let detail = json!({"rated_power_w": rated_w});
    audit::record(tx, now, actor, "device.add", name, detail).await?;
    keys_changed_in(tx, device.id).await?;
    Ok(device)
}

/// The devices.
#[derive(Clone)]
pub struct Devices {
    db: Db,
    keys: std::sync::Arc<keys::KeyCache>,
}

impl Devices {
    /// Over `db`, with every device's keys loaded into memory.
    pub async fn open(db: Db) -> StoreResult<Devices> {
        let devices = Devices { db, keys: Default::default() };
        devices.reload_keys(false).await?;
        Ok(devices)
    }

    /// The keys kept in memory (shared with the ingest task).
    pub fn keys(&self) -> &std::sync::Arc<keys::KeyCache> {
        &self.keys
    }

    /// The database.
    pub fn db(&self) -> &Db {
        &self.db
    }

    /// Reads a device's keys into memory (after the commit that made them).
    pub async fn learn_keys(&self, device_id: DeviceId) -> StoreResult<()> {
        self.keys.read(&self.db, device_id).await.map(drop)
    }

    /// Every device, by name.
    pub async fn list(&self) -> StoreResult<Vec<Device>> {
        let rows =
            sqlx::query("SELECT * FROM devices ORDER BY name").fetch_all(self.db.reader()).await?;
        rows.iter().map(device_from).collect()
    }

    /// One device.
    pub async fn get(&self, name: &str) -> StoreResult<Device> {
        let mut c = self.db.reader().acquire().await?;
        named_in(&self.db, &mut c, name, false).await
    }

    /// A device with its current key (hex).
    pub async fn with_key(&self, name: &str) -> StoreResult<(Device, String)> {
        let row = sqlx::query("SELECT * FROM devices WHERE name = $1")
            .bind(name)
            .fetch_optional(self.db.reader())
            .await?;
        let row = row.ok_or_else(|| StoreError::NotFound(format!("device {name:?}")))?;
        Ok((device_from(&row)?, row.try_get("device_key")?))
    }

    /// Every enabled device's name and current key (hex), by name: whom the
    /// device broker admits.
    pub async fn enabled_keys(&self) -> StoreResult<Vec<(String, String)>> {
        let rows = sqlx::query("SELECT name, device_key FROM devices WHERE enabled ORDER BY name")
            .fetch_all(self.db.reader())
            .await?;
        rows.iter().map(|r| Ok((r.try_get("name")?, r.try_get("device_key")?))).collect()
    }

    /// Enables or disables a device.
    pub async fn set_enabled(
        &self,
        name: &str,
        enabled: bool,
        actor: &str,
        now: i64,
    ) -> StoreResult<Device> {
        let mut tx = self.db.write().await?;
        let device = named_in(&self.db, &mut tx, name, true).await?;
        sqlx::query("UPDATE devices SET enabled = $1 WHERE id = $2")
            .bind(i64::from(enabled))
            .bind(device.id)
            .execute(&mut *tx)
            .await?;
        let action = if enabled { "device.enable" } else { "device.disable" };
        audit::record(&mut tx, now, actor, action, name, json!({})).await?;
        // Copies of its state kept in memory (the legacy API's) are outdated.
        tx.announce(name).await?;
        tx.commit().await?;
        Ok(Device { enabled, ..device })
    }

    /// Sets the time zone of a device's site (its days' rollups from now on).
    pub async fn set_timezone(
        &self,
        name: &str,
        timezone: &str,
        actor: &str,
        now: i64,
    ) -> StoreResult<()> {
        check_timezone(timezone)?;
        let mut tx = self.db.write().await?;
        let device = named_in(&self.db, &mut tx, name, true).await?;
        sqlx::query("UPDATE devices SET timezone = $1 WHERE id = $2")
            .bind(timezone)
            .bind(device.id)
            .execute(&mut *tx)
            .await?;
        audit::record(&mut tx, now, actor, "device.timezone", name, json!({"timezone": timezone}))
            .await?;
        tx.commit().await?;
        Ok(())
    }

    /// Replaces a device's key; the old one stays valid (with its own
    /// replay window) until the next rotation, so that nothing the device
    /// sealed before it is lost.
    pub async fn rotate_key(
        &self,
        name: &str,
        key_hex: &str,
        actor: &str,
        now: i64,
    ) -> StoreResult<Device> {
        let mut tx = self.db.write().await?;
        let device = named_in(&self.db, &mut tx, name, true).await?;
        sqlx::query(
            "UPDATE devices SET previous_key = device_key, previous_key_version = key_version, \
             prev_replay_high = replay_high, prev_replay_bitmap = replay_bitmap, \
             replay_high = 0, replay_bitmap = 0, device_key = $1, key_version = key_version + 1 \
             WHERE id = $2",
        )
        .bind(key_hex)
        .bind(device.id)
        .execute(&mut *tx)
        .await?;
        let key_version = device.key_version + 1;
        let detail = json!({"key_version": key_version});
        audit::record(&mut tx, now, actor, "device.rotate_key", name, detail).await?;
        keys_changed_in(&mut tx, device.id).await?;
        tx.commit().await?;
        self.keys.read(&self.db, device.id).await?;
        Ok(Device { key_version, ..device })
    }

    /// Removes a device; its config, commands, telemetry and rollout rows go
    /// with it (foreign keys cascade); the audit log keeps its history.
    pub async fn delete(&self, name: &str, actor: &str, now: i64) -> StoreResult<()> {
        let mut tx = self.db.write().await?;
        let device = named_in(&self.db, &mut tx, name, true).await?;
        // PostgreSQL's partitioned raw telemetry has no foreign key (making
        // and dropping partitions would lock `devices` against the ingest).
        sqlx::query("DELETE FROM telemetry_batches WHERE device_id = $1")
            .bind(device.id)
            .execute(&mut *tx)
            .await?;
        sqlx::query("DELETE FROM devices WHERE id = $1").bind(device.id).execute(&mut *tx).await?;
        let detail = json!({"id": device.id});
        audit::record(&mut tx, now, actor, "device.remove", name, detail).await?;
        keys_changed_in(&mut tx, device.id).await?;
        tx.announce(name).await?;
        tx.commit().await?;
        self.keys.forget(device.id);
        Ok(())
    }

    /// The keys of the device with this numeric id (see [`keys::KeyCache::lookup`]).
    pub async fn crypto(
        &self,
        device_id: DeviceId,
        key_version: u8,
        may_read: bool,
    ) -> StoreResult<KeyLookup> {
        self.keys.lookup(&self.db, device_id, key_version, may_read).await
    }

    /// The keys of the device with this numeric id as they are now (from
    /// memory, else the database).
    pub async fn current_keys(&self, device_id: DeviceId) -> StoreResult<Option<DeviceCrypto>> {
        match self.keys.get(device_id) {
            Some(c) => Ok(Some(c)),
            None => self.keys.read(&self.db, device_id).await,
        }
    }

    /// Reads every device's keys into memory; `listening` says whether this
    /// process hears other servers' key changes (always so on SQLite).
    pub async fn reload_keys(&self, listening: bool) -> StoreResult<()> {
        self.keys.reload(&self.db, listening).await
    }

    /// Another server changed this device's keys: read them again.
    pub async fn refresh_keys(&self, device_id: DeviceId) -> StoreResult<()> {
        self.keys.read(&self.db, device_id).await.map(|_| ())
    }

    /// This process stopped hearing other servers' key changes.
    pub fn keys_unheard(&self) {
        self.keys.set_incomplete();
    }
}

/// On PostgreSQL, tells every server process (at commit) that a device's
/// keys changed.
async fn keys_changed_in(tx: &mut WriteTx, device_id: DeviceId) -> StoreResult<()> {
    tx.notify(keys::CHANNEL, &device_id.to_string()).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_rated_powers_have_limits() {
        for ok in ["roof-1", "a", "roof.2", "A_b-9", &"x".repeat(64)] {
            assert!(check_name(ok).is_ok(), "{ok:?}");
        }
        for bad in ["", ".", "..", "...", "roof 2", "é", &"x".repeat(65)] {
            assert_eq!(check_name(bad).unwrap_err().field, "name", "{bad:?}");
        }
        assert!(check_rated_w(100).is_ok() && check_rated_w(65_000).is_ok());
        assert!(check_rated_w(99).is_err() && check_rated_w(65_001).is_err());
    }
}
