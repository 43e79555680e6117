//! The config shadow: what each device should run (versioned, validated)
//! beside what it reports running, with the fields it refused.

use crate::db::{StoreResult, WriteTx};
use crate::domain::DeviceConfig;

/// Gives a new device its first desired config (version 1, the defaults),
/// in the transaction that registers it.
pub async fn create_in(tx: &mut WriteTx, device_id: i64, actor: &str, now: i64) -> StoreResult<()> {
    let config = serde_json::to_string(&DeviceConfig::default()).expect("config serialises");
    sqlx::query(
        "INSERT INTO device_configs (device_id, desired_version, desired, desired_ms) VALUES ($1, 1, $2, $3)",
    )
    .bind(device_id)
    .bind(&config)
    .bind(now)
    .execute(&mut **tx)
    .await?;
    sqlx::query(
        "INSERT INTO config_history (device_id, version, config, actor, at_ms) VALUES ($1, 1, $2, $3, $4)",
    )
    .bind(device_id)
    .bind(&config)
    .bind(actor)
    .bind(now)
    .execute(&mut **tx)
    .await?;
    Ok(())
}
