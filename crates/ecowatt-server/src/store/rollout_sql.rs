//! Firmware rollouts on [`SqlStore`]: which devices get which image, in
//! waves, and how far each one got.
//!
//! A rollout offers its current wave's devices the image on their syncs. A
//! wave ends when each of its devices has succeeded, failed or rolled back;
//! the next wave is then offered. When a wave's failures pass the rollout's
//! threshold the rollout aborts by itself. Device reports are applied in the
//! same transaction as the sync that carries them.

use serde_json::json;
use sqlx::Row;
use sqlx::any::AnyRow;

use sqlx::AnyConnection;

use super::sql::{SqlStore, Tx, firmware_from};
use super::*;

/// Device states that end its part in a rollout.
const FINAL: [&str; 4] = ["succeeded", "failed", "rolled_back", "cancelled"];
/// Device states in which the offer is (still) sent, as an SQL list: the
/// device has not started installing. Abort cancels these.
pub(super) const WAITING: &str = "('pending', 'offered', 'downloading', 'verifying')";

fn new_token() -> String {
    let mut buf = [0u8; 16];
    getrandom::fill(&mut buf).expect("the OS random number generator works");
    ecowatt_proto::hex::encode_upper(&buf)
}

/// The wave (from 0) of the `i`-th of `n` devices: the first whose
/// cumulative share covers it.
fn wave_of(i: usize, n: usize, waves: &[u32]) -> usize {
    waves.iter().position(|&pct| i < (n * pct as usize).div_ceil(100)).unwrap_or(waves.len() - 1)
}

/// A deterministic shuffle key, so that a percentage picks a spread of devices.
fn spread(rollout_seed: &str, name: &str) -> [u8; 32] {
    use sha2::Digest;
    sha2::Sha256::digest(format!("{rollout_seed}/{name}").as_bytes()).into()
}

fn rollout_from(row: &AnyRow) -> StoreResult<Rollout> {
    let waves: String = row.try_get("waves")?;
    Ok(Rollout {
        id: row.try_get("id")?,
        firmware_id: row.try_get("firmware_id")?,
        version: row.try_get("version")?,
        target: row.try_get("target")?,
        state: row.try_get("state")?,
        waves: serde_json::from_str(&waves)
            .map_err(|e| StoreError::Corrupt(format!("waves: {e}")))?,
        current_wave: row.try_get("current_wave")?,
        failure_threshold_pct: row.try_get("failure_threshold_pct")?,
        reason: row.try_get("reason")?,
        created_ms: row.try_get("created_ms")?,
        created_by: row.try_get("created_by")?,
        updated_ms: row.try_get("updated_ms")?,
        counts: BTreeMap::new(),
        devices_total: 0,
    })
}

const ROLLOUT_SELECT: &str =
    "SELECT r.*, f.version, f.target FROM rollouts r JOIN firmware f ON f.id = r.firmware_id";

impl SqlStore {
    async fn rollout_in(&self, c: &mut AnyConnection, id: i64, lock: bool) -> StoreResult<Rollout> {
        let lock = if lock { self.db().for_update_of("r") } else { String::new() };
        let row = sqlx::query(&format!("{ROLLOUT_SELECT} WHERE r.id = $1{lock}"))
            .bind(id)
            .fetch_optional(&mut *c)
            .await?;
        let mut r =
            rollout_from(&row.ok_or_else(|| StoreError::NotFound(format!("rollout {id}")))?)?;
        self.counts_in(c, &mut r).await?;
        Ok(r)
    }

    async fn counts_in(&self, c: &mut AnyConnection, r: &mut Rollout) -> StoreResult<()> {
        let rows = sqlx::query(
            "SELECT state, COUNT(*) AS n FROM rollout_devices WHERE rollout_id = $1 GROUP BY state",
        )
        .bind(r.id)
        .fetch_all(&mut *c)
        .await?;
        r.counts.clear();
        r.devices_total = 0;
        for row in rows {
            let n: i64 = row.try_get("n")?;
            r.counts.insert(row.try_get("state")?, n);
            r.devices_total += n;
        }
        Ok(())
    }

    async fn set_rollout_state_in(
        &self,
        tx: &mut Tx,
        id: i64,
        state: &str,
        reason: Option<&str>,
        now: i64,
    ) -> StoreResult<()> {
        sqlx::query("UPDATE rollouts SET state = $1, reason = COALESCE($2, reason), updated_ms = $3 WHERE id = $4")
            .bind(state)
            .bind(reason)
            .bind(now)
            .bind(id)
            .execute(&mut **tx)
            .await?;
        Ok(())
    }

    /// Names of the devices in `wave` not yet finished (to wake their long polls).
    async fn wave_devices_in(&self, tx: &mut Tx, id: i64, wave: i64) -> StoreResult<Vec<String>> {
        let rows = sqlx::query(&format!(
            "SELECT d.name FROM rollout_devices rd JOIN devices d ON d.id = rd.device_id \
             WHERE rd.rollout_id = $1 AND rd.wave <= $2 AND rd.state IN {WAITING}"
        ))
        .bind(id)
        .bind(wave)
        .fetch_all(&mut **tx)
        .await?;
        let mut names = Vec::with_capacity(rows.len());
        for row in rows {
            let name: String = row.try_get("name")?;
            tx.announce(&name).await?;
            names.push(name);
        }
        Ok(names)
    }

    /// After a device's report: abort on too many failures, move to the next
    /// wave when this one is done, complete after the last.
    async fn evaluate_in(&self, tx: &mut Tx, id: i64, now: i64) -> StoreResult<Vec<String>> {
        let r = self.rollout_in(&mut *tx, id, true).await?;
        if r.state != "running" {
            return Ok(vec![]);
        }
        let mut wave = r.current_wave;
        loop {
            let rows = sqlx::query(
                "SELECT state FROM rollout_devices WHERE rollout_id = $1 AND wave = $2",
            )
            .bind(id)
            .bind(wave)
            .fetch_all(&mut **tx)
            .await?;
            let states: Vec<String> =
                rows.iter().map(|row| row.try_get("state")).collect::<Result<_, _>>()?;
            let failures =
                states.iter().filter(|s| *s == "failed" || *s == "rolled_back").count() as i64;
            if !states.is_empty() && failures * 100 > r.failure_threshold_pct * states.len() as i64
            {
                let reason = format!(
                    "failure threshold passed: {failures} of {} devices in wave {} failed (threshold {}%)",
                    states.len(),
                    wave + 1,
                    r.failure_threshold_pct
                );
                self.set_rollout_state_in(tx, id, "aborted", Some(&reason), now).await?;
                self.cancel_waiting_in(tx, id, now).await?;
                crate::operators::audit::record(
                    tx,
                    now,
                    "system",
                    "rollout.abort",
                    &id.to_string(),
                    json!({"reason": reason}),
                )
                .await?;
                return Ok(vec![]);
            }
            if states.iter().any(|s| !FINAL.contains(&s.as_str())) {
                break;
            }
            if wave + 1 >= r.waves.len() as i64 {
                self.set_rollout_state_in(tx, id, "completed", None, now).await?;
                return Ok(vec![]);
            }
            wave += 1;
        }
        if wave == r.current_wave {
            return Ok(vec![]);
        }
        sqlx::query("UPDATE rollouts SET current_wave = $1, updated_ms = $2 WHERE id = $3")
            .bind(wave)
            .bind(now)
            .bind(id)
            .execute(&mut **tx)
            .await?;
        self.wave_devices_in(tx, id, wave).await
    }

    async fn cancel_waiting_in(&self, tx: &mut Tx, id: i64, now: i64) -> StoreResult<()> {
        sqlx::query(&format!(
            "UPDATE rollout_devices SET state = 'cancelled', updated_ms = $1 \
             WHERE rollout_id = $2 AND state IN {WAITING}"
        ))
        .bind(now)
        .bind(id)
        .execute(&mut **tx)
        .await?;
        Ok(())
    }

    /// Applies a device's OTA report to its row in the rollout of that version.
    pub(super) async fn ota_report_in(
        &self,
        tx: &mut Tx,
        device_id: i64,
        report: &ecowatt_proto::messages::OtaReport,
        now: i64,
    ) -> StoreResult<Vec<String>> {
        let row = sqlx::query(
            "SELECT rd.rollout_id, rd.state, rd.done FROM rollout_devices rd \
             JOIN rollouts r ON r.id = rd.rollout_id JOIN firmware f ON f.id = r.firmware_id \
             WHERE rd.device_id = $1 AND f.version = $2 ORDER BY rd.rollout_id DESC LIMIT 1",
        )
        .bind(device_id)
        .bind(report.version.as_str())
        .fetch_optional(&mut **tx)
        .await?;
        let Some(row) = row else { return Ok(vec![]) };
        let rollout_id: i64 = row.try_get("rollout_id")?;
        let old: String = row.try_get("state")?;
        let state = report.state.name();
        let reason = ecowatt_proto::messages::ota_reason::name(report.reason);
        let reason = (!reason.is_empty()).then_some(reason);
        if old == state && row.try_get::<i64, _>("done")? == report.done as i64 {
            return Ok(vec![]);
        }
        sqlx::query(
            // Reports after the download (trial, succeeded, rolled back) carry
            // no byte counts: the download's stay.
            "UPDATE rollout_devices SET state = $1, \
             done = CASE WHEN $3 > 0 THEN $2 ELSE done END, \
             total = CASE WHEN $3 > 0 THEN $3 ELSE total END, \
             reason = $4, updated_ms = $5 WHERE rollout_id = $6 AND device_id = $7",
        )
        .bind(state)
        .bind(report.done as i64)
        .bind(report.total as i64)
        .bind(reason)
        .bind(now)
        .bind(rollout_id)
        .bind(device_id)
        .execute(&mut **tx)
        .await?;
        if old == state {
            return Ok(vec![]);
        }
        self.evaluate_in(tx, rollout_id, now).await
    }

    /// The update to offer the device, if its rollout is running and its wave
    /// has come. A device already running the version has succeeded.
    pub(super) async fn offer_in(
        &self,
        tx: &mut Tx,
        device_id: i64,
        now: i64,
    ) -> StoreResult<(Option<UpdateOfferRow>, Vec<String>)> {
        let row = sqlx::query(&format!(
            "SELECT rd.rollout_id, rd.state, rd.token, f.manifest, f.version, f.size, d.firmware AS running \
             FROM rollout_devices rd JOIN rollouts r ON r.id = rd.rollout_id \
             JOIN firmware f ON f.id = r.firmware_id JOIN devices d ON d.id = rd.device_id \
             WHERE rd.device_id = $1 AND r.state = 'running' AND rd.wave <= r.current_wave \
             AND rd.state IN {WAITING} ORDER BY rd.rollout_id DESC LIMIT 1"
        ))
        .bind(device_id)
        .fetch_optional(&mut **tx)
        .await?;
        let Some(row) = row else { return Ok((None, vec![])) };
        let rollout_id: i64 = row.try_get("rollout_id")?;
        let version: String = row.try_get("version")?;
        let running: Option<String> = row.try_get("running")?;
        if running.as_deref() == Some(version.as_str()) {
            let size: i64 = row.try_get("size")?;
            sqlx::query("UPDATE rollout_devices SET state = 'succeeded', done = $1, total = $1, updated_ms = $2 WHERE rollout_id = $3 AND device_id = $4")
                .bind(size)
                .bind(now)
                .bind(rollout_id)
                .bind(device_id)
                .execute(&mut **tx)
                .await?;
            let wake = self.evaluate_in(tx, rollout_id, now).await?;
            return Ok((None, wake));
        }
        let state: String = row.try_get("state")?;
        if state == "pending" {
            sqlx::query("UPDATE rollout_devices SET state = 'offered', updated_ms = $1 WHERE rollout_id = $2 AND device_id = $3")
                .bind(now)
                .bind(rollout_id)
                .bind(device_id)
                .execute(&mut **tx)
                .await?;
        }
        let manifest: String = row.try_get("manifest")?;
        let manifest = serde_json::from_str(&manifest)
            .map_err(|e| StoreError::Corrupt(format!("manifest: {e}")))?;
        Ok((Some(UpdateOfferRow { token: row.try_get("token")?, manifest }), vec![]))
    }

    pub(super) async fn firmware_by_token_impl(
        &self,
        token: &str,
    ) -> StoreResult<(Firmware, Vec<u8>)> {
        let row = sqlx::query(
            "SELECT f.* FROM rollout_devices rd JOIN rollouts r ON r.id = rd.rollout_id \
             JOIN firmware f ON f.id = r.firmware_id WHERE rd.token = $1",
        )
        .bind(token.to_ascii_uppercase())
        .fetch_optional(self.db().reader())
        .await?;
        let row = row.ok_or_else(|| StoreError::NotFound("download".into()))?;
        Ok((firmware_from(&row)?, row.try_get("data")?))
    }

    pub(super) async fn create_rollout_impl(
        &self,
        new: &NewRollout,
        actor: &str,
        now: i64,
    ) -> StoreResult<Rollout> {
        let invalid = |field: &str, msg: String| {
            StoreError::Invalid(Invalid { field: field.to_owned(), message: msg })
        };
        if new.waves.is_empty()
            || new.waves.len() > 10
            || new.waves.windows(2).any(|w| w[0] >= w[1])
            || new.waves[0] == 0
            || *new.waves.last().expect("not empty") != 100
        {
            return Err(invalid(
                "waves",
                "1 to 10 rising percentages of the rollout's devices, ending at 100 (e.g. [10, 50, 100])".into(),
            ));
        }
        if new.failure_threshold_pct > 100 {
            return Err(invalid("failure_threshold_pct", "a percentage, 0 to 100".into()));
        }
        let mut tx = self.db().write().await?;
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
                if names.is_empty() {
                    return Err(invalid("devices", "name at least one device".into()));
                }
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
                if !(1..=100).contains(pct) {
                    return Err(invalid("percent", "1 to 100".into()));
                }
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
                    return Err(invalid("percent", "there are no enabled devices".into()));
                }
            }
        }
        // One active rollout per device.
        for (id, name) in &devices {
            let busy = sqlx::query(
                "SELECT rd.rollout_id FROM rollout_devices rd JOIN rollouts r ON r.id = rd.rollout_id \
                 WHERE rd.device_id = $1 AND r.state IN ('running', 'paused') \
                 AND rd.state NOT IN ('succeeded', 'failed', 'rolled_back', 'cancelled')",
            )
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
            "INSERT INTO rollouts (firmware_id, state, waves, current_wave, failure_threshold_pct, created_ms, created_by, updated_ms) \
             VALUES ($1, 'running', $2, 0, $3, $4, $5, $4) RETURNING id",
        )
        .bind(new.firmware_id)
        .bind(serde_json::to_string(&new.waves).expect("numbers serialise"))
        .bind(i64::from(new.failure_threshold_pct))
        .bind(now)
        .bind(actor)
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
        crate::operators::audit::record(
            &mut tx,
            now,
            actor,
            "rollout.start",
            &id.to_string(),
            json!({"firmware_id": new.firmware_id, "devices": n, "waves": new.waves,
                   "failure_threshold_pct": new.failure_threshold_pct}),
        )
        .await?;
        self.wave_devices_in(&mut tx, id, 0).await?;
        let r = self.rollout_in(&mut tx, id, false).await?;
        tx.commit().await?;
        Ok(r)
    }

    pub(super) async fn rollouts_impl(&self) -> StoreResult<Vec<Rollout>> {
        let mut tx = self.db().read().await?;
        let rows = sqlx::query(&format!("{ROLLOUT_SELECT} ORDER BY r.id DESC LIMIT 200"))
            .fetch_all(&mut *tx)
            .await?;
        let mut out = Vec::with_capacity(rows.len());
        for row in &rows {
            let mut r = rollout_from(row)?;
            self.counts_in(&mut tx, &mut r).await?;
            out.push(r);
        }
        tx.commit().await?;
        Ok(out)
    }

    pub(super) async fn rollout_impl(&self, id: i64) -> StoreResult<(Rollout, Vec<RolloutDevice>)> {
        let mut tx = self.db().read().await?;
        let r = self.rollout_in(&mut tx, id, false).await?;
        let rows = sqlx::query(
            "SELECT d.name, d.firmware, rd.* FROM rollout_devices rd JOIN devices d ON d.id = rd.device_id \
             WHERE rd.rollout_id = $1 ORDER BY rd.wave, d.name",
        )
        .bind(id)
        .fetch_all(&mut *tx)
        .await?;
        tx.commit().await?;
        let devices = rows
            .iter()
            .map(|row| {
                let done: i64 = row.try_get("done")?;
                let total: i64 = row.try_get("total")?;
                Ok(RolloutDevice {
                    device: row.try_get("name")?,
                    wave: row.try_get("wave")?,
                    state: row.try_get("state")?,
                    done,
                    total,
                    percent: if total > 0 { done * 100 / total } else { 0 },
                    reason: row.try_get("reason")?,
                    running: row.try_get("firmware")?,
                    updated_ms: row.try_get("updated_ms")?,
                })
            })
            .collect::<StoreResult<Vec<_>>>()?;
        Ok((r, devices))
    }

    pub(super) async fn rollout_action_impl(
        &self,
        id: i64,
        action: RolloutAction,
        actor: &str,
        now: i64,
    ) -> StoreResult<(Rollout, Vec<String>)> {
        let mut tx = self.db().write().await?;
        let r = self.rollout_in(&mut tx, id, true).await?;
        let (from, to, name): (&[&str], &str, &str) = match action {
            RolloutAction::Pause => (&["running"], "paused", "rollout.pause"),
            RolloutAction::Resume => (&["paused"], "running", "rollout.resume"),
            RolloutAction::Abort => (&["running", "paused"], "aborted", "rollout.abort"),
        };
        if !from.contains(&r.state.as_str()) {
            return Err(StoreError::Conflict(format!(
                "rollout {id} is {}; it cannot be {}",
                r.state,
                match action {
                    RolloutAction::Pause => "paused",
                    RolloutAction::Resume => "resumed",
                    RolloutAction::Abort => "aborted",
                }
            )));
        }
        // The devices whose offer appears (resume) or disappears (pause, abort)
        // hear at once: those of the current waves that have not started installing.
        let wake = self.wave_devices_in(&mut tx, id, r.current_wave).await?;
        let reason = (action == RolloutAction::Abort).then(|| format!("aborted by {actor}"));
        self.set_rollout_state_in(&mut tx, id, to, reason.as_deref(), now).await?;
        if action == RolloutAction::Abort {
            self.cancel_waiting_in(&mut tx, id, now).await?;
        }
        crate::operators::audit::record(&mut tx, now, actor, name, &id.to_string(), json!({}))
            .await?;
        let r = self.rollout_in(&mut tx, id, false).await?;
        tx.commit().await?;
        Ok((r, wake))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn waves_split_by_cumulative_share() {
        let w = |n: usize, waves: &[u32]| (0..n).map(|i| wave_of(i, n, waves)).collect::<Vec<_>>();
        assert_eq!(w(10, &[10, 50, 100]), [0, 1, 1, 1, 1, 2, 2, 2, 2, 2]);
        assert_eq!(w(3, &[100]), [0, 0, 0]);
        // A small share of a small fleet still gets one device first.
        assert_eq!(w(3, &[1, 100]), [0, 1, 1]);
        assert_eq!(w(1, &[50, 100]), [0]);
    }
}
