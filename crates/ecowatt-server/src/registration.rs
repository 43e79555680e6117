//! Registering a device: its row, key and audit entry (the devices
//! aggregate) and its config shadow with the first desired config (the
//! config aggregate), in one transaction, so that no device ever lacks a
//! shadow. Both aggregates stay ignorant of each other's tables.

use crate::db::StoreResult;
use crate::devices::{self, Device, Devices};

/// Registers device `name` (rated `rated_w` watts) with its key (hex).
pub async fn register(
    devices: &Devices,
    name: &str,
    rated_w: i64,
    key_hex: &str,
    actor: &str,
    now: i64,
) -> StoreResult<Device> {
    let mut tx = devices.db().write().await?;
    let device = devices::create_in(&mut tx, name, rated_w, key_hex, actor, now).await?;
    crate::config::create_in(&mut tx, device.id, actor, now).await?;
    tx.commit().await?;
    devices.learn_keys(device.id).await?;
    Ok(device)
}
