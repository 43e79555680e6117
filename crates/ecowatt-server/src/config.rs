//! The config shadow: what each device should run (versioned, validated)
//! beside what it reports running, with the fields it refused. The device
//! validates again against its own limits and says which fields it kept.

use serde::{Deserialize, Serialize};
use serde_json::json;
use sqlx::any::AnyRow;
use sqlx::{AnyConnection, Row};

use ecowatt_proto::registers::REGISTER_COUNT;

use crate::db::{Db, StoreError, StoreResult, WriteTx, corrupt, json_col};
use crate::devices::{DeviceId, named_in};
use crate::domain::Invalid;
use crate::operators::audit;

/// Poll interval limits, milliseconds.
pub const POLL_MS: (i64, i64) = (1_000, 3_600_000);
/// Upload interval limits, milliseconds.
pub const UPLOAD_MS: (i64, i64) = (10_000, 86_400_000);

/// What the device should do: the desired side of the config shadow.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct DeviceConfig {
    /// Time between two register reads, ms (seed default 5 s).
    pub poll_interval_ms: i64,
    /// Time between two uploads, ms (seed default 900 s).
    pub upload_interval_ms: i64,
    /// Register addresses to sample (default: all of 0..=9).
    pub registers: Vec<u16>,
}

impl Default for DeviceConfig {
    fn default() -> Self {
        DeviceConfig {
            poll_interval_ms: 5_000,
            upload_interval_ms: 900_000,
            registers: (0..REGISTER_COUNT as u16).collect(),
        }
    }
}

/// A partial update of a [`DeviceConfig`]: absent fields keep their value.
#[derive(Debug, Clone, Default, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ConfigPatch {
    /// New poll interval, ms.
    pub poll_interval_ms: Option<i64>,
    /// New upload interval, ms.
    pub upload_interval_ms: Option<i64>,
    /// New register selection.
    pub registers: Option<Vec<u16>>,
}

impl DeviceConfig {
    /// `self` with `patch` applied, validated as a whole.
    pub fn patched(&self, patch: &ConfigPatch) -> Result<DeviceConfig, Invalid> {
        let next = DeviceConfig {
            poll_interval_ms: patch.poll_interval_ms.unwrap_or(self.poll_interval_ms),
            upload_interval_ms: patch.upload_interval_ms.unwrap_or(self.upload_interval_ms),
            registers: patch.registers.clone().unwrap_or_else(|| self.registers.clone()),
        };
        next.validate()?;
        Ok(next)
    }

    /// Checks every field against its limits.
    pub fn validate(&self) -> Result<(), Invalid> {
        let in_range = |field: &str, v: i64, (lo, hi): (i64, i64)| {
            if (lo..=hi).contains(&v) {
                Ok(())
            } else {
                Err(Invalid::new(field, format!("{v} ms is outside {lo}..={hi} ms")))
            }
        };
        in_range("poll_interval_ms", self.poll_interval_ms, POLL_MS)?;
        in_range("upload_interval_ms", self.upload_interval_ms, UPLOAD_MS)?;
        if self.upload_interval_ms < self.poll_interval_ms {
            return Err(Invalid::new(
                "upload_interval_ms",
                format!(
                    "{} ms is shorter than the poll interval ({} ms)",
                    self.upload_interval_ms, self.poll_interval_ms
                ),
            ));
        }
        if self.registers.is_empty() {
            return Err(Invalid::new("registers", "select at least one register (0..=9)"));
        }
        let mut seen = [false; REGISTER_COUNT];
        for &r in &self.registers {
            let slot = seen.get_mut(usize::from(r)).ok_or_else(|| {
                Invalid::new("registers", format!("no register {r}; the map is 0..=9"))
            })?;
            if *slot {
                return Err(Invalid::new("registers", format!("register {r} is listed twice")));
            }
            *slot = true;
        }
        Ok(())
    }
}

/// A field the device refused to apply, and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Rejection {
    /// The field.
    pub field: String,
    /// The device's reason.
    pub reason: String,
}

impl Rejection {
    /// A refusal as the device protocol reports it (`docs/protocol.md`:
    /// field 1 poll, 2 upload, 3 registers; reason 1 out of range, 2
    /// unsupported, 3 other).
    pub fn from_protocol(field: u8, reason: u8) -> Rejection {
        const FIELDS: [&str; 3] = ["poll_interval_ms", "upload_interval_ms", "registers"];
        let field = FIELDS.get(usize::from(field).wrapping_sub(1)).copied().unwrap_or("unknown");
        let reason = match reason {
            1 => "out of range for this device",
            2 => "not supported by this device",
            _ => "refused by the device",
        };
        Rejection { field: field.to_owned(), reason: reason.to_owned() }
    }
}

/// A device's config shadow: what it should run and what it reports running.
#[derive(Debug, Clone, PartialEq, Serialize, utoipa::ToSchema)]
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

/// Whether the desired config must go to a device running `running`: when
/// the device does not run the desired version.
pub fn to_send(desired_version: i64, running: Option<i64>) -> bool {
    running != Some(desired_version)
}

/// Whether a device may report running `version` when `desired` is the
/// latest issued: only versions that were issued.
pub fn issued(version: i64, desired: i64) -> bool {
    (1..=desired).contains(&version)
}

fn shadow_from(row: &AnyRow) -> StoreResult<ConfigShadow> {
    let reported: Option<String> = row.try_get("reported")?;
    let rejected: Option<String> = row.try_get("rejected")?;
    Ok(ConfigShadow {
        device: row.try_get("name")?,
        desired_version: row.try_get("desired_version")?,
        desired: json_col(row, "desired")?,
        desired_ms: row.try_get("desired_ms")?,
        reported_version: row.try_get("reported_version")?,
        reported: reported
            .map(|t| serde_json::from_str(&t))
            .transpose()
            .map_err(|e| corrupt("reported", e))?,
        rejected: rejected
            .map(|t| serde_json::from_str(&t))
            .transpose()
            .map_err(|e| corrupt("rejected", e))?
            .unwrap_or_default(),
        reported_ms: row.try_get("reported_ms")?,
    })
}

async fn shadow_in(c: &mut AnyConnection, device_id: DeviceId) -> StoreResult<ConfigShadow> {
    let row = sqlx::query(
        "SELECT d.name, c.* FROM device_configs c JOIN devices d ON d.id = c.device_id WHERE c.device_id = $1",
    )
    .bind(device_id)
    .fetch_one(c)
    .await?;
    shadow_from(&row)
}

/// Gives a new device its first desired config (version 1, the defaults),
/// in the transaction that registers it.
pub async fn create_in(
    tx: &mut WriteTx,
    device_id: DeviceId,
    actor: &str,
    now: i64,
) -> StoreResult<()> {
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

/// The desired config of each of `devices` that does not run it: what it
/// last reported running, or `running` (what a sync reports, for a
/// delivery to that one device; a version never issued included).
pub async fn to_send_many_in(
    c: &mut AnyConnection,
    devices: &[i64],
    running: Option<i64>,
) -> StoreResult<std::collections::HashMap<i64, (i64, DeviceConfig)>> {
    let mut out = std::collections::HashMap::new();
    if devices.is_empty() {
        return Ok(out);
    }
    let sql = format!(
        "SELECT device_id, desired_version, desired, reported_version FROM device_configs \
         WHERE device_id IN ({})",
        crate::commands::store::id_list(devices)
    );
    for row in sqlx::query(&sql).persistent(false).fetch_all(c).await? {
        let desired_version: i64 = row.try_get("desired_version")?;
        if to_send(desired_version, running.or(row.try_get("reported_version")?)) {
            out.insert(row.try_get("device_id")?, (desired_version, json_col(&row, "desired")?));
        }
    }
    Ok(out)
}

/// Records what a device reports running, in the transaction that admits
/// its report; a version never issued is ignored.
pub async fn report_in(
    tx: &mut WriteTx,
    device_id: DeviceId,
    version: i64,
    applied: &DeviceConfig,
    rejected: &[Rejection],
    now: i64,
) -> StoreResult<bool> {
    let desired: i64 =
        sqlx::query("SELECT desired_version FROM device_configs WHERE device_id = $1")
            .bind(device_id)
            .fetch_one(&mut **tx)
            .await?
            .try_get("desired_version")?;
    if !issued(version, desired) {
        return Ok(false);
    }
    sqlx::query(
        "UPDATE device_configs SET reported_version = $1, reported = $2, rejected = $3, reported_ms = $4 WHERE device_id = $5",
    )
    .bind(version)
    .bind(serde_json::to_string(applied).expect("config serialises"))
    .bind(serde_json::to_string(rejected).expect("rejections serialise"))
    .bind(now)
    .bind(device_id)
    .execute(&mut **tx)
    .await?;
    Ok(true)
}

/// The config shadows.
#[derive(Clone)]
pub struct Configs {
    db: Db,
}

impl Configs {
    /// Every device's desired and reported config versions, by device id.
    pub async fn versions(
        &self,
    ) -> StoreResult<std::collections::HashMap<i64, (i64, Option<i64>)>> {
        let rows =
            sqlx::query("SELECT device_id, desired_version, reported_version FROM device_configs")
                .fetch_all(self.db.reader())
                .await?;
        rows.iter()
            .map(|r| {
                let versions = (r.try_get("desired_version")?, r.try_get("reported_version")?);
                Ok((r.try_get("device_id")?, versions))
            })
            .collect()
    }

    /// Over `db`.
    pub fn new(db: Db) -> Self {
        Configs { db }
    }

    /// A device's config shadow.
    pub async fn shadow(&self, device: &str) -> StoreResult<ConfigShadow> {
        let row = sqlx::query(
            "SELECT d.name, c.* FROM device_configs c JOIN devices d ON d.id = c.device_id WHERE d.name = $1",
        )
        .bind(device)
        .fetch_optional(self.db.reader())
        .await?;
        row.as_ref()
            .map(shadow_from)
            .transpose()?
            .ok_or_else(|| StoreError::NotFound(format!("device {device:?}")))
    }

    /// Applies `patch` to the desired config as a new version (validated as
    /// a whole); the device hears of it at once.
    pub async fn update(
        &self,
        device: &str,
        patch: &ConfigPatch,
        actor: &str,
        now: i64,
    ) -> StoreResult<ConfigShadow> {
        let mut tx = self.db.write().await?;
        let d = named_in(&self.db, &mut tx, device, true).await?;
        let current = shadow_in(&mut tx, d.id).await?;
        let next = current.desired.patched(patch)?;
        let version = current.desired_version + 1;
        let text = serde_json::to_string(&next).expect("config serialises");
        sqlx::query(
            "UPDATE device_configs SET desired_version = $1, desired = $2, desired_ms = $3 WHERE device_id = $4",
        )
        .bind(version)
        .bind(&text)
        .bind(now)
        .bind(d.id)
        .execute(&mut *tx)
        .await?;
        sqlx::query(
            "INSERT INTO config_history (device_id, version, config, actor, at_ms) VALUES ($1, $2, $3, $4, $5)",
        )
        .bind(d.id)
        .bind(version)
        .bind(&text)
        .bind(actor)
        .bind(now)
        .execute(&mut *tx)
        .await?;
        let detail = json!({"version": version, "config": next});
        audit::record(&mut tx, now, actor, "config.set", device, detail).await?;
        tx.announce(device).await?;
        let shadow = shadow_in(&mut tx, d.id).await?;
        tx.commit().await?;
        Ok(shadow)
    }

    /// Desired config versions, newest first.
    pub async fn history(&self, device: &str, limit: i64) -> StoreResult<Vec<ConfigVersion>> {
        let rows = sqlx::query(
            "SELECT h.* FROM config_history h JOIN devices d ON d.id = h.device_id \
             WHERE d.name = $1 ORDER BY h.version DESC LIMIT $2",
        )
        .bind(device)
        .bind(limit.clamp(1, 1000))
        .fetch_all(self.db.reader())
        .await?;
        if rows.is_empty() {
            // No history at all means no such device (every device has version 1).
            self.shadow(device).await?;
        }
        rows.iter()
            .map(|r| {
                Ok(ConfigVersion {
                    version: r.try_get("version")?,
                    config: json_col(r, "config")?,
                    actor: r.try_get("actor")?,
                    at_ms: r.try_get("at_ms")?,
                })
            })
            .collect()
    }

    /// Records what the device applied (a version that was issued).
    pub async fn report(
        &self,
        device: &str,
        version: i64,
        applied: &DeviceConfig,
        rejected: &[Rejection],
        now: i64,
    ) -> StoreResult<ConfigShadow> {
        let mut tx = self.db.write().await?;
        let d = named_in(&self.db, &mut tx, device, true).await?;
        if !report_in(&mut tx, d.id, version, applied, rejected, now).await? {
            let latest = shadow_in(&mut tx, d.id).await?.desired_version;
            return Err(StoreError::Conflict(format!(
                "reported config version {version} was never issued (latest is {latest})"
            )));
        }
        let shadow = shadow_in(&mut tx, d.id).await?;
        tx.commit().await?;
        Ok(shadow)
    }

    /// For the legacy `/changes`: what to tell the device. A change is
    /// flagged on `repeat` polls (the guide: 1, the flag resets once sent),
    /// then counted as applied. A device nobody changed (version 1, never
    /// told anything) hears nothing: it keeps the timers it runs.
    pub async fn legacy_poll(
        &self,
        device: &str,
        repeat: i64,
        now: i64,
    ) -> StoreResult<LegacyChanges> {
        let mut tx = self.db.write().await?;
        let d = named_in(&self.db, &mut tx, device, true).await?;
        let row = sqlx::query("SELECT * FROM device_configs WHERE device_id = $1")
            .bind(d.id)
            .fetch_one(&mut *tx)
            .await?;
        let desired: DeviceConfig = json_col(&row, "desired")?;
        let version: i64 = row.try_get("desired_version")?;
        let reported_version: Option<i64> = row.try_get("reported_version")?;
        let quiet = LegacyChanges { config: desired.clone(), ..LegacyChanges::default() };
        if !legacy_pending(version, reported_version) {
            tx.commit().await?;
            return Ok(quiet);
        }
        // What the device runs: what it was last told, else the first config.
        let baseline: DeviceConfig = match reported_version {
            Some(_) => json_col(&row, "reported")?,
            None => {
                let first = sqlx::query(
                    "SELECT config FROM config_history WHERE device_id = $1 AND version = 1",
                )
                .bind(d.id)
                .fetch_optional(&mut *tx)
                .await?;
                match first {
                    Some(r) => json_col(&r, "config")?,
                    None => DeviceConfig::default(),
                }
            }
        };
        let changes = legacy_changes(&baseline, &desired);
        let served: i64 = row.try_get("legacy_served_version")?;
        let count: i64 = row.try_get("legacy_served_count")?;
        let count = if served == version { count + 1 } else { 1 };
        sqlx::query(
            "UPDATE device_configs SET legacy_served_version = $1, legacy_served_count = $2 WHERE device_id = $3",
        )
        .bind(version)
        .bind(count)
        .bind(d.id)
        .execute(&mut *tx)
        .await?;
        // Sent as often as asked (or nothing the original can apply changed):
        // the device runs it now.
        if count >= repeat || !changes.changed {
            sqlx::query(
                "UPDATE device_configs SET reported_version = $1, reported = desired, rejected = '[]', reported_ms = $2 WHERE device_id = $3",
            )
            .bind(version)
            .bind(now)
            .bind(d.id)
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(changes)
    }
}

/// Whether a legacy device has a config change to hear: the version it
/// took is not the desired one, unless nobody changed anything (version 1,
/// never told: it keeps the timers it runs).
pub fn legacy_pending(desired_version: i64, reported_version: Option<i64>) -> bool {
    to_send(desired_version, reported_version)
        && !(reported_version.is_none() && desired_version == 1)
}

/// What the legacy `/changes` tells a device: the original's per-timer flags.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct LegacyChanges {
    /// Something the original firmware can apply changed.
    pub changed: bool,
    /// The poll interval changed.
    pub poll_changed: bool,
    /// The upload interval changed.
    pub upload_changed: bool,
    /// The desired config.
    pub config: DeviceConfig,
}

/// The flags for a device running `baseline` that should run `desired`:
/// only the timers the original firmware knows, each flagged on its own
/// (its firmware applies a timer only when that timer's flag is set).
pub fn legacy_changes(baseline: &DeviceConfig, desired: &DeviceConfig) -> LegacyChanges {
    let poll_changed = baseline.poll_interval_ms != desired.poll_interval_ms;
    let upload_changed = baseline.upload_interval_ms != desired.upload_interval_ms;
    LegacyChanges {
        changed: poll_changed || upload_changed,
        poll_changed,
        upload_changed,
        config: desired.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_legacy_device_hears_of_changes_only() {
        assert!(!legacy_pending(1, None), "nobody changed anything");
        assert!(legacy_pending(2, None));
        assert!(legacy_pending(3, Some(2)));
        assert!(!legacy_pending(3, Some(3)));
        let d = DeviceConfig::default();
        let slower = DeviceConfig { upload_interval_ms: d.upload_interval_ms * 2, ..d.clone() };
        let c = legacy_changes(&d, &slower);
        assert_eq!((c.changed, c.poll_changed, c.upload_changed), (true, false, true));
        assert!(!legacy_changes(&d, &d).changed);
    }

    #[test]
    fn config_limits_name_the_field() {
        let c = DeviceConfig::default();
        assert!(c.validate().is_ok());
        let e = c
            .patched(&ConfigPatch { poll_interval_ms: Some(10), ..Default::default() })
            .unwrap_err();
        assert_eq!(e.field, "poll_interval_ms");
        assert!(e.message.contains("1000..=3600000"), "{e}");
        let e = c
            .patched(&ConfigPatch {
                poll_interval_ms: Some(60_000),
                upload_interval_ms: Some(30_000),
                ..Default::default()
            })
            .unwrap_err();
        assert_eq!(e.field, "upload_interval_ms");
        for regs in [vec![], vec![10], vec![1, 1]] {
            let e = c
                .patched(&ConfigPatch { registers: Some(regs), ..Default::default() })
                .unwrap_err();
            assert_eq!(e.field, "registers");
        }
    }

    #[test]
    fn a_config_goes_out_until_the_device_runs_its_version() {
        for (desired, running, send) in [(1, None, true), (2, Some(1), true), (2, Some(2), false)] {
            assert_eq!(to_send(desired, running), send, "{desired} {running:?}");
        }
        assert!(issued(1, 3) && issued(3, 3) && !issued(4, 3) && !issued(0, 3));
    }

    #[test]
    fn protocol_refusals_name_fields() {
        let r = Rejection::from_protocol(3, 2);
        assert_eq!(
            (r.field.as_str(), r.reason.as_str()),
            ("registers", "not supported by this device")
        );
        assert_eq!(Rejection::from_protocol(9, 9).field, "unknown");
    }
}
