//! The SQL of export control on both dialects: fail-safe settings, tags,
//! reported control and episodes (in the sync's transaction), the control
//! orders of an answer, and curtailments of a group (one statement queues
//! the whole group).

use ecowatt_proto::messages::{CommandControl, ControlOrders, ControlReport, ScheduleReport};
use serde_json::{Value, json};
use sqlx::Row;

use super::{EpisodeRecord, FailSafe, Progress, failsafe_to_send, kind_name, outcome_name};
use crate::commands::store::record_result_in;
use crate::commands::{Command, CommandOutcome, CommandStatus, DEFAULT_LEASE_MS, DEFAULT_TTL_S};
use crate::db::{Db, StoreError, StoreResult, WriteTx, corrupt};
use crate::devices::{DeviceId, named_in};
use crate::operators::audit;

/// Export control.
#[derive(Clone)]
pub struct Control {
    pub(super) db: Db,
}

/// A curtailment of a group, or the release of one.
#[derive(Debug, Clone, serde::Serialize, utoipa::ToSchema)]
pub struct Curtailment {
    /// Its id.
    pub id: i64,
    /// The group (tag).
    pub group: String,
    /// The export limit asked, %.
    pub percent: i64,
    /// The lease, ms (`None` for a release).
    pub lease_ms: Option<i64>,
    /// The curtailment this releases.
    pub releases: Option<i64>,
    /// When, and by whom.
    pub created_ms: i64,
    /// Who.
    pub created_by: String,
    /// Where its devices stand.
    pub progress: Progress,
    /// Devices that failed, with why.
    pub failures: Vec<Value>,
}

impl Control {
    /// Over `db`.
    pub fn new(db: Db) -> Self {
        Control { db }
    }

    /// Sets (or unsets, `None`) a device's fail-safe limit; the device hears
    /// of it on its next answer.
    pub async fn set_failsafe(
        &self,
        device: &str,
        failsafe: Option<FailSafe>,
        actor: &str,
        now: i64,
    ) -> StoreResult<()> {
        let mut tx = self.db.write().await?;
        let d = named_in(&self.db, &mut tx, device, true).await?;
        sqlx::query("UPDATE devices SET failsafe = $1 WHERE id = $2")
            .bind(failsafe.map(FailSafe::column))
            .bind(d.id)
            .execute(&mut *tx)
            .await?;
        let detail = json!({"failsafe": FailSafe::json(failsafe)});
        audit::record(&mut tx, now, actor, "device.failsafe", device, detail).await?;
        tx.announce(device).await?;
        tx.commit().await?;
        Ok(())
    }

    /// Sets (or unsets, `None`) a device's default ramp rate for export
    /// limits, hundredths of % per second.
    pub async fn set_ramp(
        &self,
        device: &str,
        ramp_centi: Option<i64>,
        actor: &str,
        now: i64,
    ) -> StoreResult<()> {
        let mut tx = self.db.write().await?;
        let d = named_in(&self.db, &mut tx, device, true).await?;
        sqlx::query("UPDATE devices SET ramp_centi = $1 WHERE id = $2")
            .bind(ramp_centi)
            .bind(d.id)
            .execute(&mut *tx)
            .await?;
        let detail = json!({"ramp_pct_per_s": ramp_centi.map(|c| c as f64 / 100.0)});
        audit::record(&mut tx, now, actor, "device.ramp", device, detail).await?;
        tx.commit().await?;
        Ok(())
    }

    /// Replaces a device's tags.
    pub async fn set_tags(
        &self,
        device: &str,
        tags: &[String],
        actor: &str,
        now: i64,
    ) -> StoreResult<()> {
        for t in tags {
            super::check_tag(t)?;
        }
        let mut tx = self.db.write().await?;
        let d = named_in(&self.db, &mut tx, device, true).await?;
        sqlx::query("DELETE FROM device_tags WHERE device_id = $1")
            .bind(d.id)
            .execute(&mut *tx)
            .await?;
        let mut sorted: Vec<&String> = tags.iter().collect();
        sorted.sort();
        sorted.dedup();
        for t in &sorted {
            sqlx::query("INSERT INTO device_tags (device_id, tag) VALUES ($1, $2)")
                .bind(d.id)
                .bind(t.as_str())
                .execute(&mut *tx)
                .await?;
        }
        audit::record(&mut tx, now, actor, "device.tags", device, json!({"tags": sorted})).await?;
        tx.commit().await?;
        Ok(())
    }

    /// A device's control: tags, fail-safe, what it reported, its latest episodes.
    pub async fn show(&self, device: &str) -> StoreResult<Value> {
        let mut c = self.db.reader().acquire().await?;
        let d = named_in(&self.db, &mut c, device, false).await?;
        let row =
            sqlx::query("SELECT failsafe, ramp_centi, control_reported FROM devices WHERE id = $1")
                .bind(d.id)
                .fetch_one(&mut *c)
                .await?;
        let failsafe = FailSafe::from_column(row.try_get("failsafe")?);
        let ramp: Option<i64> = row.try_get("ramp_centi")?;
        let reported: Option<String> = row.try_get("control_reported")?;
        let reported: Value = match reported {
            Some(t) => serde_json::from_str(&t).map_err(|e| corrupt("control_reported", e))?,
            None => Value::Null,
        };
        let tags: Vec<String> =
            sqlx::query("SELECT tag FROM device_tags WHERE device_id = $1 ORDER BY tag")
                .bind(d.id)
                .fetch_all(&mut *c)
                .await?
                .iter()
                .map(|r| r.try_get("tag"))
                .collect::<Result<_, _>>()?;
        let episodes = sqlx::query(
            "SELECT kind, command_id, at_ms, value, outcome, received_ms FROM control_episodes \
             WHERE device_id = $1 ORDER BY id DESC LIMIT 50",
        )
        .bind(d.id)
        .fetch_all(&mut *c)
        .await?
        .iter()
        .map(|r| {
            Ok(EpisodeRecord {
                kind: r.try_get("kind")?,
                command_id: r.try_get("command_id")?,
                at_ms: r.try_get("at_ms")?,
                limit_pct: r.try_get("value")?,
                outcome: r.try_get("outcome")?,
                received_ms: r.try_get("received_ms")?,
            })
        })
        .collect::<StoreResult<Vec<_>>>()?;
        Ok(json!({
            "device": device,
            "tags": tags,
            "failsafe": FailSafe::json(failsafe),
            "ramp_pct_per_s": ramp.map(|c| c as f64 / 100.0),
            // null: the device has not reported control (its firmware holds no leases).
            "reported": reported,
            "episodes": episodes,
        }))
    }

    /// Curtails every enabled device tagged `group` to `percent` under a
    /// lease (default [`DEFAULT_LEASE_MS`]), in one transaction; refused
    /// whole when the group is empty or a device in it has no fail-safe.
    pub async fn curtail(
        &self,
        group: &str,
        percent: i64,
        lease_ms: Option<i64>,
        ramp_pct_per_s: Option<f64>,
        actor: &str,
        now: i64,
    ) -> StoreResult<i64> {
        let ramp = ramp_pct_per_s.map(crate::commands::ramp_centi).transpose()?;
        super::check_tag(group).map_err(|e| crate::domain::Invalid::new("group", e.message))?;
        let percent = super::check_percent(percent)?;
        let lease_ms = crate::commands::check_lease(lease_ms.unwrap_or(DEFAULT_LEASE_MS))?;
        let mut tx = self.db.write().await?;
        let members = "FROM devices d JOIN device_tags t ON t.device_id = d.id WHERE t.tag = $1 AND d.enabled <> 0";
        let row = sqlx::query(&format!(
            "SELECT COUNT(*) AS n, SUM(CASE WHEN d.failsafe IS NULL THEN 1 ELSE 0 END) AS unset {members}"
        ))
        .bind(group)
        .fetch_one(&mut *tx)
        .await?;
        let n: i64 = row.try_get("n")?;
        if n == 0 {
            return Err(StoreError::Refused {
                code: "group_empty",
                message: format!("no enabled device is tagged {group:?}; nothing was queued"),
            });
        }
        let unset: Option<i64> = row.try_get("unset")?;
        if unset.unwrap_or(0) > 0 {
            let names: Vec<String> = sqlx::query(&format!(
                "SELECT d.name {members} AND d.failsafe IS NULL ORDER BY d.name LIMIT 10"
            ))
            .bind(group)
            .fetch_all(&mut *tx)
            .await?
            .iter()
            .map(|r| r.try_get("name"))
            .collect::<Result<_, _>>()?;
            return Err(StoreError::Refused {
                code: "failsafe_not_configured",
                message: format!(
                    "{} device(s) of {group:?} have no fail-safe limit (e.g. {}); set one first; nothing was queued",
                    unset.unwrap_or(0),
                    names.join(", ")
                ),
            });
        }
        let id = self
            .insert(&mut tx, group, i64::from(percent), Some(lease_ms), None, n, actor, now)
            .await?;
        let queued = sqlx::query(&format!(
            "INSERT INTO commands (device_id, kind, parameters, op, register, value, status, created_ms, \
             created_by, expires_ms, lease_ms, curtailment_id, ramp_centi) \
             SELECT d.id, 'set_power_percentage', $2, 'write', $3, $4, 'queued', $5, $6, $7, $8, $9, \
             COALESCE($10, d.ramp_centi) {members}"
        ))
        .bind(group)
        .bind(json!({"percentage": percent}).to_string())
        .bind(i64::from(ecowatt_proto::registers::EXPORT_LIMIT))
        .bind(i64::from(percent))
        .bind(now)
        .bind(actor)
        .bind(now + DEFAULT_TTL_S * 1000)
        .bind(lease_ms)
        .bind(id)
        .bind(ramp)
        .execute(&mut *tx)
        .await?;
        debug_assert_eq!(queued.rows_affected() as i64, n);
        let detail = json!({"group": group, "percent": percent, "lease_ms": lease_ms, "ramp_centi": ramp, "devices": n});
        audit::record(&mut tx, now, actor, "curtailment.start", &id.to_string(), detail).await?;
        self.announce_members(&mut tx, id).await?;
        tx.commit().await?;
        Ok(id)
    }

    /// Releases curtailment `id`: its devices go back to their schedule's
    /// limit in force, or 100 % without one (no lease), tracked as a
    /// curtailment of its own; returns its id.
    pub async fn release(&self, id: i64, actor: &str, now: i64) -> StoreResult<i64> {
        let mut tx = self.db.write().await?;
        let row = sqlx::query("SELECT tag, releases FROM curtailments WHERE id = $1")
            .bind(id)
            .fetch_optional(&mut *tx)
            .await?
            .ok_or_else(|| StoreError::NotFound(format!("curtailment {id}")))?;
        if row.try_get::<Option<i64>, _>("releases")?.is_some() {
            return Err(StoreError::Refused {
                code: "not_a_curtailment",
                message: format!("{id} is itself a release"),
            });
        }
        let group: String = row.try_get("tag")?;
        let done = sqlx::query("SELECT id FROM curtailments WHERE releases = $1")
            .bind(id)
            .fetch_optional(&mut *tx)
            .await?;
        if let Some(r) = done {
            let rid: i64 = r.try_get("id")?;
            return Err(StoreError::Refused {
                code: "already_released",
                message: format!("curtailment {id} was released by {rid}"),
            });
        }
        let n: i64 = sqlx::query("SELECT COUNT(*) AS n FROM commands WHERE curtailment_id = $1")
            .bind(id)
            .fetch_one(&mut *tx)
            .await?
            .try_get("n")?;
        let rid = self.insert(&mut tx, &group, 100, None, Some(id), n, actor, now).await?;
        sqlx::query(
            "INSERT INTO commands (device_id, kind, parameters, op, register, value, status, created_ms, \
             created_by, expires_ms, lease_ms, curtailment_id, ramp_centi, resume) \
             SELECT c.device_id, 'set_power_percentage', $1, 'write', $2, 100, 'queued', $3, $4, $5, NULL, $6, \
             c.ramp_centi, 1 \
             FROM commands c JOIN devices d ON d.id = c.device_id WHERE c.curtailment_id = $7",
        )
        .bind(json!({"percentage": 100}).to_string())
        .bind(i64::from(ecowatt_proto::registers::EXPORT_LIMIT))
        .bind(now)
        .bind(actor)
        .bind(now + DEFAULT_TTL_S * 1000)
        .bind(rid)
        .bind(id)
        .execute(&mut *tx)
        .await?;
        // What the curtailment still had waiting is overtaken.
        tx.commands_changed().await?;
        sqlx::query(
            "UPDATE commands SET status = 'cancelled', completed_ms = $1, result_message = $2 \
             WHERE curtailment_id = $3 AND status IN ('queued', 'delivered')",
        )
        .bind(now)
        .bind(format!("released by curtailment {rid}"))
        .bind(id)
        .execute(&mut *tx)
        .await?;
        audit::record(
            &mut tx,
            now,
            actor,
            "curtailment.release",
            &id.to_string(),
            json!({"release": rid}),
        )
        .await?;
        self.announce_members(&mut tx, rid).await?;
        tx.commit().await?;
        Ok(rid)
    }

    #[allow(clippy::too_many_arguments)]
    async fn insert(
        &self,
        tx: &mut WriteTx,
        group: &str,
        percent: i64,
        lease_ms: Option<i64>,
        releases: Option<i64>,
        devices: i64,
        actor: &str,
        now: i64,
    ) -> StoreResult<i64> {
        Ok(sqlx::query(
            "INSERT INTO curtailments (tag, percent, lease_ms, releases, devices, created_ms, created_by) \
             VALUES ($1, $2, $3, $4, $5, $6, $7) RETURNING id",
        )
        .bind(group)
        .bind(percent)
        .bind(lease_ms)
        .bind(releases)
        .bind(devices)
        .bind(now)
        .bind(actor)
        .fetch_one(&mut **tx)
        .await?
        .try_get("id")?)
    }

    async fn announce_members(&self, tx: &mut WriteTx, id: i64) -> StoreResult<()> {
        let names: Vec<String> = sqlx::query(
            "SELECT d.name FROM commands c JOIN devices d ON d.id = c.device_id WHERE c.curtailment_id = $1",
        )
        .bind(id)
        .fetch_all(&mut **tx)
        .await?
        .iter()
        .map(|r| r.try_get("name"))
        .collect::<Result<_, _>>()?;
        for n in names {
            tx.announce(&n).await?;
        }
        Ok(())
    }

    /// A curtailment with its progress (`now`: the server's clock).
    pub async fn get(&self, id: i64, now: i64) -> StoreResult<Curtailment> {
        let mut c = self.db.reader().acquire().await?;
        let row = sqlx::query("SELECT * FROM curtailments WHERE id = $1")
            .bind(id)
            .fetch_optional(&mut *c)
            .await?
            .ok_or_else(|| StoreError::NotFound(format!("curtailment {id}")))?;
        // Counted in SQL (a curtailment of 10,000 devices is polled while it
        // runs: its rows are not fetched one by one).
        let counts = sqlx::query(
            "SELECT c.status, CASE WHEN d.last_seen_ms >= $2 THEN 1 ELSE 0 END AS online, COUNT(*) AS n \
             FROM commands c JOIN devices d ON d.id = c.device_id WHERE c.curtailment_id = $1 \
             GROUP BY c.status, CASE WHEN d.last_seen_ms >= $2 THEN 1 ELSE 0 END",
        )
        .bind(id)
        .bind(now - super::OFFLINE_AFTER_MS)
        .fetch_all(&mut *c)
        .await?;
        let mut parts = Vec::with_capacity(counts.len());
        for r in &counts {
            let status: String = r.try_get("status")?;
            let status = CommandStatus::parse(&status).ok_or_else(|| corrupt("status", &status))?;
            let seen = (r.try_get::<i64, _>("online")? == 1).then_some(now);
            parts.push((super::part(status, 0, None, seen, now), r.try_get::<i64, _>("n")?));
        }
        let mut progress = super::counted(&parts);
        let confirmed = usize::try_from(progress.confirmed).unwrap_or(0);
        let mut at = async |rank: Option<usize>| -> StoreResult<Option<i64>> {
            let Some(rank) = rank else { return Ok(None) };
            let row = sqlx::query(
                "SELECT CASE WHEN completed_ms IS NULL OR completed_ms < created_ms THEN 0 \
                 ELSE completed_ms - created_ms END AS t FROM commands \
                 WHERE curtailment_id = $1 AND status IN ('succeeded', 'confirmed') \
                 ORDER BY t LIMIT 1 OFFSET $2",
            )
            .bind(id)
            .bind(rank as i64)
            .fetch_optional(&mut *c)
            .await?;
            Ok(row.map(|r| r.try_get("t")).transpose()?)
        };
        progress.confirm_p50_ms = at(super::rank(confirmed, 0.50)).await?;
        progress.confirm_p99_ms = at(super::rank(confirmed, 0.99)).await?;
        progress.confirm_max_ms = at(confirmed.checked_sub(1)).await?;
        let failures = sqlx::query(
            "SELECT d.name, c.status, c.result_message FROM commands c JOIN devices d ON d.id = c.device_id \
             WHERE c.curtailment_id = $1 AND c.status IN ('failed', 'expired', 'cancelled') \
             ORDER BY d.name LIMIT 100",
        )
        .bind(id)
        .fetch_all(&mut *c)
        .await?
        .iter()
        .map(|r| {
            let status: String = r.try_get("status")?;
            let why: Option<String> = r.try_get("result_message")?;
            Ok(json!({"device": r.try_get::<String, _>("name")?, "status": status, "reason": why}))
        })
        .collect::<StoreResult<Vec<_>>>()?;
        Ok(Curtailment {
            id,
            group: row.try_get("tag")?,
            percent: row.try_get("percent")?,
            lease_ms: row.try_get("lease_ms")?,
            releases: row.try_get("releases")?,
            created_ms: row.try_get("created_ms")?,
            created_by: row.try_get("created_by")?,
            progress,
            failures,
        })
    }

    /// Curtailments, newest first (without their failures).
    pub async fn list(&self, now: i64) -> StoreResult<Vec<Curtailment>> {
        let ids: Vec<i64> = sqlx::query("SELECT id FROM curtailments ORDER BY id DESC LIMIT 50")
            .fetch_all(self.db.reader())
            .await?
            .iter()
            .map(|r| r.try_get("id"))
            .collect::<Result<_, _>>()?;
        let mut out = Vec::with_capacity(ids.len());
        for id in ids {
            let mut c = self.get(id, now).await?;
            c.failures.clear();
            out.push(c);
        }
        Ok(out)
    }
}

/// Stores what a sync reports of the device's control (in the sync's
/// transaction): the state, and each episode once.
pub async fn report_in(
    tx: &mut WriteTx,
    device_id: DeviceId,
    report: &ControlReport,
    schedule: Option<&ScheduleReport>,
    now: i64,
) -> StoreResult<()> {
    sqlx::query("UPDATE devices SET control_reported = $1 WHERE id = $2")
        .bind(super::reported_json(report, schedule))
        .bind(device_id)
        .execute(&mut **tx)
        .await?;
    for e in &report.episodes {
        sqlx::query(
            "INSERT INTO control_episodes (device_id, kind, command_id, at_ms, value, outcome, received_ms) \
             VALUES ($1, $2, $3, $4, $5, $6, $7) ON CONFLICT DO NOTHING",
        )
        .bind(device_id)
        .bind(kind_name(e.kind))
        .bind(e.command_id as i64)
        .bind(e.at_ms as i64)
        .bind(i64::from(e.value))
        .bind(outcome_name(e.outcome))
        .bind(now)
        .execute(&mut **tx)
        .await?;
    }
    Ok(())
}

/// The control and schedule parts of an answer carrying `commands`, from
/// the device's row as the answer's down-counter update returns it
/// (`failsafe`, `control_reported`, `schedule_version`).
pub async fn answer_in(
    db: &Db,
    tx: &mut WriteTx,
    device_id: DeviceId,
    device: &str,
    row: &sqlx::any::AnyRow,
    commands: &mut Vec<Command>,
    now: i64,
) -> StoreResult<(Option<ControlOrders>, Option<ecowatt_proto::messages::ScheduleOrders>)> {
    // Parsed once for both parts.
    let reported: Option<String> = row.try_get("control_reported")?;
    let reported: Option<Value> = reported
        .map(|t| serde_json::from_str(&t).map_err(|e| corrupt("control_reported", e)))
        .transpose()?;
    let schedule = super::schedules::orders_in(
        tx,
        device_id,
        row.try_get("schedule_version")?,
        reported.as_ref(),
        commands,
        now,
    )
    .await?;
    let control =
        orders_in(db, tx, device, row.try_get("failsafe")?, reported.as_ref(), commands, now)
            .await?;
    Ok((control, schedule))
}

/// The control part of an answer carrying `commands`: the fail-safe when the
/// device's differs, and the commands' leases. A device that never reported
/// control cannot hold a lease: its leased commands fail here, with why,
/// and leave the answer.
///
/// `failsafe` and `reported` are the device's `failsafe` and
/// `control_reported` columns, read by the caller with the answer's counter.
async fn orders_in(
    db: &Db,
    tx: &mut WriteTx,
    device: &str,
    failsafe: Option<i64>,
    reported: Option<&Value>,
    commands: &mut Vec<Command>,
    now: i64,
) -> StoreResult<Option<ControlOrders>> {
    let desired = FailSafe::from_column(failsafe);
    let Some(reported) = reported else {
        let (leased, rest): (Vec<Command>, Vec<Command>) =
            commands.drain(..).partition(|c| c.lease_ms.is_some());
        *commands = rest;
        for c in leased {
            let outcome = CommandOutcome {
                success: false,
                message: Some(
                    "the device's firmware cannot hold a leased limit (no control support); \
                     update it, or send the limit without a lease"
                        .into(),
                ),
                exception_code: None,
                value: None,
                executed_ms: None,
            };
            record_result_in(db, tx, device, c.id, &outcome, now).await?;
        }
        return Ok(None);
    };
    let reported_failsafe = FailSafe::wire(FailSafe::parse(&reported["failsafe"]).ok().flatten());
    let orders = commands
        .iter()
        .filter(|c| c.lease_ms.is_some() || c.ramp_pct_per_s.is_some())
        .map(|c| CommandControl {
            command_id: c.id as u64,
            lease_ms: c.lease_ms.and_then(|l| u32::try_from(l).ok()).unwrap_or(0),
            ramp_centi_pct_per_s: c
                .ramp_pct_per_s
                .map_or(0, |r| (r * 100.0).round().clamp(0.0, 10_000.0) as u16),
        })
        .collect();
    Ok(Some(ControlOrders {
        failsafe: failsafe_to_send(desired, reported_failsafe),
        commands: orders,
    }))
}
