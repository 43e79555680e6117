//! Export-limit schedules in the store: every version of a device's
//! schedule (set for one device or a whole group, cleared, audited), the
//! plan an answer carries to a device that runs another version or whose
//! plan's horizon nears, and what a device reports of it.

use ecowatt_proto::messages::{NO_ENTRY, Plan, ScheduleOrders, ScheduleReport, ScheduleState};
use serde_json::{Value, json};
use sqlx::Row;

use super::Control;
use super::plan::{Definition, REFRESH_MS, compile, describe};
use crate::commands::Command;
use crate::db::{StoreError, StoreResult, WriteTx, corrupt};
use crate::devices::{DeviceId, named_in};
use crate::operators::audit;

/// A schedule's state as reported and shown.
pub fn state_name(s: ScheduleState) -> &'static str {
    match s {
        ScheduleState::None => "none",
        ScheduleState::Following => "following",
        ScheduleState::Command => "command",
        ScheduleState::Lease => "lease",
        ScheduleState::FailSafe => "failsafe",
        ScheduleState::Ended => "ended",
    }
}

/// What a device reports of its schedule, as stored in `control_reported`.
pub fn reported(s: &ScheduleReport) -> Value {
    json!({
        "version": s.version,
        "until_ms": s.until_ms,
        "state": state_name(s.state),
        "entry": (s.entry != NO_ENTRY).then_some(s.entry),
        "limit_pct": (s.value <= 100).then_some(s.value),
        "last_step": s.last.map(|(at, ok)| json!({"at_ms": at, "confirmed": ok})),
    })
}

/// Whether a device reporting `s` is to be sent a plan: it runs another
/// version, or its plan ends within [`REFRESH_MS`].
pub fn plan_due(desired: i64, s: &ScheduleReport, now: i64) -> bool {
    s.version as i64 != desired || (desired > 0 && (s.until_ms as i64) < now + REFRESH_MS)
}

/// The schedule part of an answer: a plan when one is due (a cleared
/// schedule is a plan without steps), and the commands that return to the
/// plan; `None` to a device that never reported a schedule.
pub async fn orders_in(
    tx: &mut WriteTx,
    device_id: DeviceId,
    desired: i64,
    reported: Option<&Value>,
    commands: &[Command],
    now: i64,
) -> StoreResult<Option<ScheduleOrders>> {
    let Some(reported) = reported else { return Ok(None) };
    let s = &reported["schedule"];
    if s.is_null() {
        return Ok(None);
    }
    let (version, until) =
        (s["version"].as_i64().unwrap_or(0), s["until_ms"].as_u64().unwrap_or(0));
    let report = ScheduleReport { version: version as u64, until_ms: until, ..Default::default() };
    let mut plan = None;
    if plan_due(desired, &report, now) {
        let row =
            sqlx::query("SELECT definition FROM schedules WHERE device_id = $1 AND version = $2")
                .bind(device_id)
                .bind(desired)
                .fetch_optional(&mut **tx)
                .await?;
        let definition: Option<String> = match row {
            Some(r) => r.try_get("definition")?,
            None => None,
        };
        let compiled = match definition {
            Some(text) => {
                let v: Value = serde_json::from_str(&text).map_err(|e| corrupt("schedules", e))?;
                let def = Definition::parse(&v).map_err(|e| corrupt("schedules", e.message))?;
                compile(&def, desired as u64, now)
            }
            // Cleared: a plan without steps, which never needs refreshing.
            None => Plan {
                version: desired as u64,
                from_ms: now as u64,
                until_ms: u64::MAX,
                steps: vec![],
            },
        };
        // (Only a longer horizon is worth sending again for the same version.)
        if desired > 0 && (compiled.version != report.version || compiled.until_ms > until) {
            plan = Some(compiled);
        }
    }
    let resume: Vec<u64> = commands.iter().filter(|c| c.resume).map(|c| c.id as u64).collect();
    Ok((plan.is_some() || !resume.is_empty()).then_some(ScheduleOrders { plan, resume }))
}

impl Control {
    /// Sets (or clears, `None`) the schedule of `device`; returns its new
    /// version (the same one when nothing changed).
    pub async fn set_schedule(
        &self,
        device: &str,
        def: Option<&Definition>,
        actor: &str,
        now: i64,
    ) -> StoreResult<i64> {
        let mut tx = self.db.write().await?;
        let d = named_in(&self.db, &mut tx, device, true).await?;
        let version = set_in(&mut tx, d.id, def, actor, now).await?;
        let detail = json!({"version": version, "schedule": def.map(Definition::json)});
        audit::record(&mut tx, now, actor, "device.schedule", device, detail).await?;
        tx.announce(device).await?;
        tx.commit().await?;
        Ok(version)
    }

    /// Sets (or clears) the schedule of every enabled device tagged
    /// `group`, in one transaction; returns how many. Refused when the
    /// group is empty.
    pub async fn set_group_schedule(
        &self,
        group: &str,
        def: Option<&Definition>,
        actor: &str,
        now: i64,
    ) -> StoreResult<usize> {
        super::check_tag(group).map_err(|e| crate::domain::Invalid::new("group", e.message))?;
        let mut tx = self.db.write().await?;
        let members: Vec<(i64, String)> = sqlx::query(
            "SELECT d.id, d.name FROM devices d JOIN device_tags t ON t.device_id = d.id \
             WHERE t.tag = $1 AND d.enabled <> 0 ORDER BY d.name",
        )
        .bind(group)
        .fetch_all(&mut *tx)
        .await?
        .iter()
        .map(|r| Ok((r.try_get("id")?, r.try_get("name")?)))
        .collect::<StoreResult<_>>()?;
        if members.is_empty() {
            return Err(StoreError::Refused {
                code: "group_empty",
                message: format!("no enabled device is tagged {group:?}; nothing was set"),
            });
        }
        for (id, _) in &members {
            set_in(&mut tx, DeviceId(*id), def, actor, now).await?;
        }
        let detail = json!({"group": group, "devices": members.len(), "schedule": def.map(Definition::json)});
        audit::record(&mut tx, now, actor, "group.schedule", group, detail).await?;
        for (_, name) in &members {
            tx.announce(name).await?;
        }
        tx.commit().await?;
        Ok(members.len())
    }

    /// A device's schedule: its definition and version, what is active now
    /// and next in the site's time, and what the device reports running.
    pub async fn schedule(&self, device: &str, now: i64) -> StoreResult<Value> {
        let mut c = self.db.reader().acquire().await?;
        let d = named_in(&self.db, &mut c, device, false).await?;
        let row = sqlx::query(
            "SELECT d.schedule_version, d.control_reported, s.definition, s.actor, s.at_ms \
             FROM devices d LEFT JOIN schedules s ON s.device_id = d.id AND s.version = d.schedule_version \
             WHERE d.id = $1",
        )
        .bind(d.id)
        .fetch_one(&mut *c)
        .await?;
        let version: i64 = row.try_get("schedule_version")?;
        let definition: Option<String> = row.try_get("definition")?;
        let def = definition
            .map(|t| {
                let v: Value = serde_json::from_str(&t).map_err(|e| corrupt("schedules", e))?;
                Definition::parse(&v).map_err(|e| corrupt("schedules", e.message))
            })
            .transpose()?;
        let reported: Option<String> = row.try_get("control_reported")?;
        let reported = match reported {
            Some(t) => {
                let v: Value =
                    serde_json::from_str(&t).map_err(|e| corrupt("control_reported", e))?;
                v["schedule"].clone()
            }
            None => Value::Null,
        };
        let mut out = json!({
            "device": device,
            "version": version,
            "schedule": def.as_ref().map(Definition::json),
            "set_by": row.try_get::<Option<String>, _>("actor")?,
            "set_ms": row.try_get::<Option<i64>, _>("at_ms")?,
            // null: the device's firmware cannot run schedules (it never reported one).
            "reported": reported,
            "in_sync": reported["version"].as_i64() == Some(version),
        });
        if let Some(def) = &def {
            let shown = describe(def, now, 6);
            out["active"] = shown["active"].clone();
            out["next"] = shown["next"].clone();
        }
        Ok(out)
    }
}

/// Stores version n+1 of a device's schedule unless it equals version n.
async fn set_in(
    tx: &mut WriteTx,
    device_id: DeviceId,
    def: Option<&Definition>,
    actor: &str,
    now: i64,
) -> StoreResult<i64> {
    let row = sqlx::query(
        "SELECT d.schedule_version, s.definition FROM devices d \
         LEFT JOIN schedules s ON s.device_id = d.id AND s.version = d.schedule_version WHERE d.id = $1",
    )
    .bind(device_id)
    .fetch_one(&mut **tx)
    .await?;
    let current: i64 = row.try_get("schedule_version")?;
    let text = def.map(|d| d.json().to_string());
    let stored: Option<String> = row.try_get("definition")?;
    if text == stored && (current > 0 || text.is_none()) {
        return Ok(current);
    }
    let version = current + 1;
    sqlx::query("INSERT INTO schedules (device_id, version, definition, actor, at_ms) VALUES ($1, $2, $3, $4, $5)")
        .bind(device_id)
        .bind(version)
        .bind(text)
        .bind(actor)
        .bind(now)
        .execute(&mut **tx)
        .await?;
    sqlx::query("UPDATE devices SET schedule_version = $1 WHERE id = $2")
        .bind(version)
        .bind(device_id)
        .execute(&mut **tx)
        .await?;
    Ok(version)
}
