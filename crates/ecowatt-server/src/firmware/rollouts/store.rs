//! The SQL of rollouts, on both dialects. A device's OTA reports and its
//! update offer are applied in the transaction of the sync that carries
//! them (`offer_in`, `ota_report_in`, called by the device protocol); the
//! devices whose offer appears or disappears are announced.

use serde_json::json;
use sqlx::any::AnyRow;
use sqlx::{AnyConnection, Row};

use super::{
    DeviceState, NewRollout, Offer, Rollout, RolloutAction, RolloutDevice, RolloutState,
    RolloutTarget, WaveOutcome, spread, sql_list, wave_of, wave_outcome,
};
use crate::db::{Db, StoreError, StoreResult, WriteTx, corrupt};
use crate::devices::DeviceId;
use crate::operators::audit;

fn new_token() -> String {
    crate::random_hex(16).to_ascii_uppercase()
}

fn state_of(row: &AnyRow) -> StoreResult<DeviceState> {
    let s: String = row.try_get("state")?;
    DeviceState::parse(&s).ok_or_else(|| corrupt("rollout device state", &s))
}

fn rollout_from(row: &AnyRow) -> StoreResult<Rollout> {
    let waves: String = row.try_get("waves")?;
    let state: String = row.try_get("state")?;
    Ok(Rollout {
        id: row.try_get("id")?,
        firmware_id: row.try_get("firmware_id")?,
        version: row.try_get("version")?,
        target: row.try_get("target")?,
        state: RolloutState::parse(&state).ok_or_else(|| corrupt("rollout state", &state))?,
        waves: serde_json::from_str(&waves).map_err(|e| corrupt("waves", e))?,
        current_wave: row.try_get("current_wave")?,
        failure_threshold_pct: row.try_get("failure_threshold_pct")?,
        reason: row.try_get("reason")?,
        encrypted: row.try_get::<i64, _>("encrypted")? != 0,
        created_ms: row.try_get("created_ms")?,
        created_by: row.try_get("created_by")?,
        updated_ms: row.try_get("updated_ms")?,
        counts: Default::default(),
        devices_total: 0,
    })
}

const SELECT: &str =
    "SELECT r.*, f.version, f.target FROM rollouts r JOIN firmware f ON f.id = r.firmware_id";

/// Whether a device has an offer waiting, as an SQL expression on
/// `device_expr` (the device protocol's one-read test of a quiet sync).
pub fn offer_waiting_sql(device_expr: &str) -> String {
    format!(
        "(SELECT COUNT(*) FROM rollout_devices rd JOIN rollouts r ON r.id = rd.rollout_id \
         WHERE rd.device_id = {device_expr} AND r.state = 'running' AND rd.wave <= r.current_wave \
         AND rd.state IN {})",
        sql_list(&DeviceState::WAITING)
    )
}

/// Which of `devices` have an update offer waiting ([`offer_waiting_sql`] for many).
pub async fn offers_waiting_in(
    c: &mut AnyConnection,
    devices: &[i64],
) -> StoreResult<std::collections::HashSet<i64>> {
    if devices.is_empty() {
        return Ok(Default::default());
    }
    let sql = format!(
        "SELECT DISTINCT rd.device_id FROM rollout_devices rd JOIN rollouts r ON r.id = rd.rollout_id \
         WHERE rd.device_id IN ({}) AND r.state = 'running' AND rd.wave <= r.current_wave \
         AND rd.state IN {}",
        crate::commands::store::id_list(devices),
        sql_list(&DeviceState::WAITING)
    );
    sqlx::query(&sql)
        .persistent(false)
        .fetch_all(c)
        .await?
        .iter()
        .map(|r| Ok(r.try_get("device_id")?))
        .collect()
}

async fn rollout_in(db: &Db, c: &mut AnyConnection, id: i64, lock: bool) -> StoreResult<Rollout> {
    let lock = if lock { db.for_update_of("r") } else { String::new() };
    let row = sqlx::query(&format!("{SELECT} WHERE r.id = $1{lock}"))
        .bind(id)
        .fetch_optional(&mut *c)
        .await?;
    let mut r = rollout_from(&row.ok_or_else(|| StoreError::NotFound(format!("rollout {id}")))?)?;
    counts_in(c, &mut r).await?;
    Ok(r)
}

async fn counts_in(c: &mut AnyConnection, r: &mut Rollout) -> StoreResult<()> {
    let rows = sqlx::query(
        "SELECT state, COUNT(*) AS n FROM rollout_devices WHERE rollout_id = $1 GROUP BY state",
    )
    .bind(r.id)
    .fetch_all(c)
    .await?;
    r.counts.clear();
    r.devices_total = 0;
    for row in rows {
        let n: i64 = row.try_get("n")?;
        r.counts.insert(state_of(&row)?, n);
        r.devices_total += n;
    }
    Ok(())
}

async fn set_state_in(
    tx: &mut WriteTx,
    id: i64,
    state: RolloutState,
    reason: Option<&str>,
    now: i64,
) -> StoreResult<()> {
    sqlx::query(
        "UPDATE rollouts SET state = $1, reason = COALESCE($2, reason), updated_ms = $3 WHERE id = $4",
    )
    .bind(state.as_str())
    .bind(reason)
    .bind(now)
    .bind(id)
    .execute(&mut **tx)
    .await?;
    Ok(())
}

/// Announces the devices of waves up to `wave` that have not started
/// installing: their offer just appeared or disappeared.
async fn announce_wave_in(tx: &mut WriteTx, id: i64, wave: i64) -> StoreResult<()> {
    let rows = sqlx::query(&format!(
        "SELECT d.name FROM rollout_devices rd JOIN devices d ON d.id = rd.device_id \
         WHERE rd.rollout_id = $1 AND rd.wave <= $2 AND rd.state IN {}",
        sql_list(&DeviceState::WAITING)
    ))
    .bind(id)
    .bind(wave)
    .fetch_all(&mut **tx)
    .await?;
    for row in rows {
        let name: String = row.try_get("name")?;
        tx.announce(&name).await?;
    }
    Ok(())
}

async fn cancel_waiting_in(tx: &mut WriteTx, id: i64, now: i64) -> StoreResult<()> {
    sqlx::query(&format!(
        "UPDATE rollout_devices SET state = 'cancelled', updated_ms = $1 \
         WHERE rollout_id = $2 AND state IN {}",
        sql_list(&DeviceState::WAITING)
    ))
    .bind(now)
    .bind(id)
    .execute(&mut **tx)
    .await?;
    Ok(())
}

/// After a device's report: the wave policy ([`wave_outcome`]) aborts on too
/// many failures, moves to the next wave when this one is done, completes
/// after the last.
async fn evaluate_in(db: &Db, tx: &mut WriteTx, id: i64, now: i64) -> StoreResult<()> {
    let r = rollout_in(db, tx, id, true).await?;
    if r.state != RolloutState::Running {
        return Ok(());
    }
    let mut wave = r.current_wave;
    loop {
        let states =
            sqlx::query("SELECT state FROM rollout_devices WHERE rollout_id = $1 AND wave = $2")
                .bind(id)
                .bind(wave)
                .fetch_all(&mut **tx)
                .await?
                .iter()
                .map(state_of)
                .collect::<StoreResult<Vec<_>>>()?;
        match wave_outcome(&states, r.failure_threshold_pct) {
            WaveOutcome::Abort { failures, total } => {
                let reason = format!(
                    "failure threshold passed: {failures} of {total} devices in wave {} failed (threshold {}%)",
                    wave + 1,
                    r.failure_threshold_pct
                );
                set_state_in(tx, id, RolloutState::Aborted, Some(&reason), now).await?;
                cancel_waiting_in(tx, id, now).await?;
                let detail = json!({"reason": reason});
                audit::record(tx, now, "system", "rollout.abort", &id.to_string(), detail).await?;
                return Ok(());
            }
            WaveOutcome::Open => break,
            WaveOutcome::Done if wave + 1 >= r.waves.len() as i64 => {
                return set_state_in(tx, id, RolloutState::Completed, None, now).await;
            }
            WaveOutcome::Done => wave += 1,
        }
    }
    if wave == r.current_wave {
        return Ok(());
    }
    sqlx::query("UPDATE rollouts SET current_wave = $1, updated_ms = $2 WHERE id = $3")
        .bind(wave)
        .bind(now)
        .bind(id)
        .execute(&mut **tx)
        .await?;
    announce_wave_in(tx, id, wave).await
}

/// Applies a device's OTA report to its row in the rollout of that version.
pub async fn ota_report_in(
    db: &Db,
    tx: &mut WriteTx,
    device_id: DeviceId,
    report: &ecowatt_proto::messages::OtaReport,
    now: i64,
) -> StoreResult<()> {
    let row = sqlx::query(
        "SELECT rd.rollout_id, rd.state, rd.done FROM rollout_devices rd \
         JOIN rollouts r ON r.id = rd.rollout_id JOIN firmware f ON f.id = r.firmware_id \
         WHERE rd.device_id = $1 AND f.version = $2 ORDER BY rd.rollout_id DESC LIMIT 1",
    )
    .bind(device_id)
    .bind(report.version.as_str())
    .fetch_optional(&mut **tx)
    .await?;
    let Some(row) = row else { return Ok(()) };
    let rollout_id: i64 = row.try_get("rollout_id")?;
    let old = state_of(&row)?;
    let state = DeviceState::reported(report.state);
    let reason = ecowatt_proto::messages::ota_reason::name(report.reason);
    let reason = (!reason.is_empty()).then_some(reason);
    if old == state && row.try_get::<i64, _>("done")? == report.done as i64 {
        return Ok(());
    }
    sqlx::query(
        // Reports after the download (trial, succeeded, rolled back) carry
        // no byte counts: the download's stay.
        "UPDATE rollout_devices SET state = $1, \
         done = CASE WHEN $3 > 0 THEN $2 ELSE done END, \
         total = CASE WHEN $3 > 0 THEN $3 ELSE total END, \
         reason = $4, updated_ms = $5 WHERE rollout_id = $6 AND device_id = $7",
    )
    .bind(state.as_str())
    .bind(report.done as i64)
    .bind(report.total as i64)
    .bind(reason)
    .bind(now)
    .bind(rollout_id)
    .bind(device_id)
    .execute(&mut **tx)
    .await?;
    tx.device_changed(crate::news::Changed::Id(device_id.0));
    if old == state {
        return Ok(());
    }
    evaluate_in(db, tx, rollout_id, now).await
}

/// A device's row of a rollout (with its name and running version joined).
fn rollout_device(row: &AnyRow) -> StoreResult<RolloutDevice> {
    let done: i64 = row.try_get("done")?;
    let total: i64 = row.try_get("total")?;
    Ok(RolloutDevice {
        device: row.try_get("name")?,
        wave: row.try_get("wave")?,
        state: state_of(row)?,
        done,
        total,
        percent: if total > 0 { done * 100 / total } else { 0 },
        reason: row.try_get("reason")?,
        running: row.try_get("firmware")?,
        updated_ms: row.try_get("updated_ms")?,
    })
}

/// The update to offer the device, if its rollout is running and its wave
/// has come. A device already running the version has succeeded.
pub async fn offer_in(
    db: &Db,
    tx: &mut WriteTx,
    device_id: DeviceId,
    now: i64,
) -> StoreResult<Option<Offer>> {
    let row = sqlx::query(&format!(
        "SELECT rd.rollout_id, rd.state, rd.token, r.firmware_id, r.encrypted, f.manifest, f.version, f.size, d.firmware AS running \
         FROM rollout_devices rd JOIN rollouts r ON r.id = rd.rollout_id \
         JOIN firmware f ON f.id = r.firmware_id JOIN devices d ON d.id = rd.device_id \
         WHERE rd.device_id = $1 AND r.state = 'running' AND rd.wave <= r.current_wave \
         AND rd.state IN {} ORDER BY rd.rollout_id DESC LIMIT 1",
        sql_list(&DeviceState::WAITING)
    ))
    .bind(device_id)
    .fetch_optional(&mut **tx)
    .await?;
    let Some(row) = row else { return Ok(None) };
    let rollout_id: i64 = row.try_get("rollout_id")?;
    let version: String = row.try_get("version")?;
    let running: Option<String> = row.try_get("running")?;
    if running.as_deref() == Some(version.as_str()) {
        let size: i64 = row.try_get("size")?;
        sqlx::query(
            "UPDATE rollout_devices SET state = 'succeeded', done = $1, total = $1, updated_ms = $2 \
             WHERE rollout_id = $3 AND device_id = $4",
        )
        .bind(size)
        .bind(now)
        .bind(rollout_id)
        .bind(device_id)
        .execute(&mut **tx)
        .await?;
        evaluate_in(db, tx, rollout_id, now).await?;
        return Ok(None);
    }
    if state_of(&row)? == DeviceState::Pending {
        sqlx::query(
            "UPDATE rollout_devices SET state = 'offered', updated_ms = $1 WHERE rollout_id = $2 AND device_id = $3",
        )
        .bind(now)
        .bind(rollout_id)
        .bind(device_id)
        .execute(&mut **tx)
        .await?;
    }
    let manifest: String = row.try_get("manifest")?;
    let manifest = serde_json::from_str(&manifest).map_err(|e| corrupt("manifest", e))?;
    Ok(Some(Offer {
        token: row.try_get("token")?,
        firmware_id: row.try_get("firmware_id")?,
        manifest,
        encrypted: row.try_get::<i64, _>("encrypted")? != 0,
    }))
}

/// The rollouts.
#[derive(Clone)]
pub struct Rollouts {
    db: Db,
}

impl Rollouts {
    /// Over `db`.
    pub fn new(db: Db) -> Self {
        Rollouts { db }
    }

    /// A device cannot take the offer named by `token` (an encrypted
    /// rollout, a device that takes no encrypted images): it fails with
    /// `reason`, and the rollout weighs it like any failure.
    pub async fn refuse_offer(&self, token: &str, reason: &str, now: i64) -> StoreResult<()> {
        let mut tx = self.db.write().await?;
        let row = sqlx::query(&format!(
            "UPDATE rollout_devices SET state = 'failed', reason = $1, updated_ms = $2 \
             WHERE token = $3 AND state IN {} RETURNING rollout_id",
            sql_list(&DeviceState::WAITING)
        ))
        .bind(reason)
        .bind(now)
        .bind(token.to_ascii_uppercase())
        .fetch_optional(&mut *tx)
        .await?;
        if let Some(row) = row {
            evaluate_in(&self.db, &mut tx, row.try_get("rollout_id")?, now).await?;
        }
        tx.commit().await?;
        Ok(())
    }

    /// What a device download token names.
    pub async fn download(&self, token: &str) -> StoreResult<super::Download> {
        let row = sqlx::query(
            "SELECT r.firmware_id, r.encrypted, rd.device_id FROM rollout_devices rd \
             JOIN rollouts r ON r.id = rd.rollout_id WHERE rd.token = $1",
        )
        .bind(token.to_ascii_uppercase())
        .fetch_optional(self.db.reader())
        .await?;
        let row = row.ok_or_else(|| StoreError::NotFound("download".into()))?;
        Ok(super::Download {
            firmware_id: row.try_get("firmware_id")?,
            device_id: row.try_get("device_id")?,
            encrypted: row.try_get::<i64, _>("encrypted")? != 0,
        })
    }

    /// Starts a rollout; its first wave's devices hear of it at once. One
    /// active rollout per device.
    pub async fn create(&self, new: &NewRollout, actor: &str, now: i64) -> StoreResult<Rollout> {
        new.validate()?;
        let mut tx = self.db.write().await?;
        let fw = sqlx::query("SELECT id FROM firmware WHERE id = $1")
            .bind(new.firmware_id)
            .fetch_optional(&mut *tx)
            .await?;
        if fw.is_none() {
            return Err(StoreError::NotFound(format!("firmware {}", new.firmware_id)));
        }
        let all = sqlx::query("SELECT id, name, enabled FROM devices ORDER BY name")
            .fetch_all(&mut *tx)
            .await?;
        let mut devices: Vec<(i64, String)> = Vec::new();
        match &new.target {
            RolloutTarget::Devices(names) => {
                for name in names {
                    let found = all
                        .iter()
                        .find(|r| r.try_get::<String, _>("name").ok().as_deref() == Some(name));
                    let Some(r) = found else {
                        return Err(StoreError::NotFound(format!("device {name}")));
                    };
                    if !devices.iter().any(|(_, n)| n == name) {
                        devices.push((r.try_get("id")?, name.clone()));
                    }
                }
            }
            RolloutTarget::Percent(pct) => {
                let seed = format!("{}/{now}", new.firmware_id);
                let mut enabled: Vec<(i64, String)> = Vec::new();
                for r in &all {
                    if r.try_get::<i64, _>("enabled")? != 0 {
                        enabled.push((r.try_get("id")?, r.try_get("name")?));
                    }
                }
                enabled.sort_by_key(|(_, n)| spread(&seed, n));
                let take = (enabled.len() * *pct as usize).div_ceil(100);
                devices = enabled.into_iter().take(take).collect();
                if devices.is_empty() {
                    return Err(crate::domain::Invalid::new(
                        "percent",
                        "there are no enabled devices",
                    )
                    .into());
                }
            }
        }
        for (id, name) in &devices {
            let busy = sqlx::query(&format!(
                "SELECT rd.rollout_id FROM rollout_devices rd JOIN rollouts r ON r.id = rd.rollout_id \
                 WHERE rd.device_id = $1 AND r.state IN ('running', 'paused') \
                 AND rd.state NOT IN {}",
                sql_list(&[DeviceState::Succeeded, DeviceState::Failed, DeviceState::RolledBack, DeviceState::Cancelled])
            ))
            .bind(*id)
            .fetch_optional(&mut *tx)
            .await?;
            if let Some(b) = busy {
                return Err(StoreError::Conflict(format!(
                    "device {name} is still in rollout {}",
                    b.try_get::<i64, _>("rollout_id")?
                )));
            }
        }
        let row = sqlx::query(
            "INSERT INTO rollouts (firmware_id, state, waves, current_wave, failure_threshold_pct, created_ms, created_by, updated_ms, encrypted) \
             VALUES ($1, 'running', $2, 0, $3, $4, $5, $4, $6) RETURNING id",
        )
        .bind(new.firmware_id)
        .bind(serde_json::to_string(&new.waves).expect("numbers serialise"))
        .bind(i64::from(new.failure_threshold_pct))
        .bind(now)
        .bind(actor)
        .bind(i64::from(new.encrypted))
        .fetch_one(&mut *tx)
        .await?;
        let id: i64 = row.try_get("id")?;
        let n = devices.len();
        for (i, (device_id, _)) in devices.iter().enumerate() {
            sqlx::query(
                "INSERT INTO rollout_devices (rollout_id, device_id, wave, state, token, updated_ms) VALUES ($1, $2, $3, 'pending', $4, $5)",
            )
            .bind(id)
            .bind(*device_id)
            .bind(wave_of(i, n, &new.waves) as i64)
            .bind(new_token())
            .bind(now)
            .execute(&mut *tx)
            .await?;
        }
        let detail = json!({"firmware_id": new.firmware_id, "devices": n, "waves": new.waves,
                            "failure_threshold_pct": new.failure_threshold_pct,
                            "encrypted": new.encrypted});
        audit::record(&mut tx, now, actor, "rollout.start", &id.to_string(), detail).await?;
        announce_wave_in(&mut tx, id, 0).await?;
        let r = rollout_in(&self.db, &mut tx, id, false).await?;
        tx.commit().await?;
        Ok(r)
    }

    /// Every rollout (the newest 200), newest first.
    pub async fn list(&self) -> StoreResult<Vec<Rollout>> {
        let mut tx = self.db.read().await?;
        let rows = sqlx::query(&format!("{SELECT} ORDER BY r.id DESC LIMIT 200"))
            .fetch_all(&mut *tx)
            .await?;
        let mut out = Vec::with_capacity(rows.len());
        for row in &rows {
            let mut r = rollout_from(row)?;
            counts_in(&mut tx, &mut r).await?;
            out.push(r);
        }
        tx.commit().await?;
        Ok(out)
    }

    /// One rollout with every device's progress.
    pub async fn get(&self, id: i64) -> StoreResult<(Rollout, Vec<RolloutDevice>)> {
        let mut tx = self.db.read().await?;
        let r = rollout_in(&self.db, &mut tx, id, false).await?;
        let rows = sqlx::query(
            "SELECT d.name, d.firmware, rd.* FROM rollout_devices rd JOIN devices d ON d.id = rd.device_id \
             WHERE rd.rollout_id = $1 ORDER BY rd.wave, d.name",
        )
        .bind(id)
        .fetch_all(&mut *tx)
        .await?;
        tx.commit().await?;
        let devices = rows.iter().map(rollout_device).collect::<StoreResult<Vec<_>>>()?;
        Ok((r, devices))
    }

    /// A device's part in its newest rollout, with the version offered.
    pub async fn latest_for(&self, device: &str) -> StoreResult<Option<(String, RolloutDevice)>> {
        let row = sqlx::query(
            "SELECT d.name, d.firmware, f.version, rd.* FROM rollout_devices rd \
             JOIN devices d ON d.id = rd.device_id JOIN rollouts r ON r.id = rd.rollout_id \
             JOIN firmware f ON f.id = r.firmware_id WHERE d.name = $1 ORDER BY rd.rollout_id DESC LIMIT 1",
        )
        .bind(device)
        .fetch_optional(self.db.reader())
        .await?;
        row.map(|r| Ok((r.try_get("version")?, rollout_device(&r)?))).transpose()
    }

    /// Pauses, resumes or aborts a rollout; the devices whose offer appears
    /// or disappears hear at once.
    pub async fn act(
        &self,
        id: i64,
        action: RolloutAction,
        actor: &str,
        now: i64,
    ) -> StoreResult<Rollout> {
        let mut tx = self.db.write().await?;
        let r = rollout_in(&self.db, &mut tx, id, true).await?;
        let (audit_name, done) = action.names();
        let Some(to) = action.from_state(r.state) else {
            return Err(StoreError::Conflict(format!(
                "rollout {id} is {}; it cannot be {done}",
                r.state.as_str()
            )));
        };
        announce_wave_in(&mut tx, id, r.current_wave).await?;
        let reason = (action == RolloutAction::Abort).then(|| format!("aborted by {actor}"));
        set_state_in(&mut tx, id, to, reason.as_deref(), now).await?;
        if action == RolloutAction::Abort {
            cancel_waiting_in(&mut tx, id, now).await?;
        }
        audit::record(&mut tx, now, actor, audit_name, &id.to_string(), json!({})).await?;
        let r = rollout_in(&self.db, &mut tx, id, false).await?;
        tx.commit().await?;
        Ok(r)
    }
}
