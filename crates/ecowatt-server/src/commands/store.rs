//! The SQL of commands, on both dialects. A command's action is kept in
//! typed columns (`op`, `register`, `value`), so that the rules of
//! `super` ([`super::awaits_confirmation`], [`super::deliverable`]) have SQL
//! twins here that a test holds them to.

use serde_json::json;
use sqlx::any::AnyRow;
use sqlx::{AnyConnection, Row};

use super::{
    Action, Command, CommandFilter, CommandOutcome, CommandRequest, CommandStats, CommandStatus,
    ResultEffect, result_effect,
};
use crate::db::{Db, StoreError, StoreResult, WriteTx, corrupt, json_col};
use crate::devices::{DeviceId, named_in};
use crate::operators::audit;

const COLUMNS: &str = "c.id, d.name AS device_name, c.kind, c.parameters, c.op, c.register, \
     c.value, c.status, c.created_ms, c.created_by, c.expires_ms, c.delivered_ms, \
     c.delivery_count, c.completed_ms, c.executed_ms, c.result_message, c.exception_code, \
     c.result_value, c.confirmed_ms, c.lease_ms, c.ramp_centi, c.curtailment_id, c.resume";

/// [`super::awaits_confirmation`] as SQL, on a row of `commands`.
pub const AWAITS_CONFIRMATION: &str = "status = 'succeeded' AND op = 'write'";

/// [`super::deliverable`] as SQL, on a row of `commands`, with the
/// placeholders that carry `now` and `redeliver_at`.
pub fn deliverable_sql(now: &str, redeliver_at: &str) -> String {
    format!(
        "expires_ms > {now} AND (status = 'queued' OR (status = 'delivered' AND delivered_ms <= {redeliver_at}))"
    )
}

fn command_from(row: &AnyRow) -> StoreResult<Command> {
    let status: String = row.try_get("status")?;
    let op: String = row.try_get("op")?;
    let (register, value) = (row.try_get("register")?, row.try_get("value")?);
    Ok(Command {
        id: row.try_get("id")?,
        device: row.try_get("device_name")?,
        kind: row.try_get("kind")?,
        parameters: json_col(row, "parameters")?,
        action: Action::from_columns(&op, register, value)
            .ok_or_else(|| corrupt("action", format!("{op} {register} {value:?}")))?,
        status: CommandStatus::parse(&status).ok_or_else(|| corrupt("status", &status))?,
        created_ms: row.try_get("created_ms")?,
        created_by: row.try_get("created_by")?,
        expires_ms: row.try_get("expires_ms")?,
        delivered_ms: row.try_get("delivered_ms")?,
        delivery_count: row.try_get("delivery_count")?,
        completed_ms: row.try_get("completed_ms")?,
        executed_ms: row.try_get("executed_ms")?,
        result_message: row.try_get("result_message")?,
        exception_code: row.try_get("exception_code")?,
        result_value: row.try_get("result_value")?,
        confirmed_ms: row.try_get("confirmed_ms")?,
        lease_ms: row.try_get("lease_ms")?,
        ramp_pct_per_s: row.try_get::<Option<i64>, _>("ramp_centi")?.map(|c| c as f64 / 100.0),
        curtailment_id: row.try_get("curtailment_id")?,
        resume: row.try_get::<i64, _>("resume")? != 0,
    })
}

async fn command_in(c: &mut AnyConnection, id: i64) -> StoreResult<Command> {
    let sql = format!(
        "SELECT {COLUMNS} FROM commands c JOIN devices d ON d.id = c.device_id WHERE c.id = $1"
    );
    let row = sqlx::query(&sql).bind(id).fetch_optional(c).await?;
    row.as_ref()
        .map(command_from)
        .transpose()?
        .ok_or_else(|| StoreError::NotFound(format!("command {id}")))
}

/// Records a device's result for command `id` in the transaction that
/// admits its report ([`super::result_effect`]); another device's command
/// is as if it did not exist.
pub async fn record_result_in(
    db: &Db,
    tx: &mut WriteTx,
    device: &str,
    id: i64,
    outcome: &CommandOutcome,
    now: i64,
) -> StoreResult<Command> {
    let sql = format!(
        "SELECT c.status, d.name FROM commands c JOIN devices d ON d.id = c.device_id WHERE c.id = $1{}",
        db.for_update_of("c")
    );
    let row = sqlx::query(&sql).bind(id).fetch_optional(&mut **tx).await?;
    let row = row.ok_or_else(|| StoreError::NotFound(format!("command {id}")))?;
    let owner: String = row.try_get("name")?;
    if owner != device {
        return Err(StoreError::NotFound(format!("command {id}")));
    }
    let status: String = row.try_get("status")?;
    let status = CommandStatus::parse(&status).ok_or_else(|| corrupt("status", &status))?;
    let (next, late) = match result_effect(status, outcome) {
        ResultEffect::Repeat => return command_in(tx, id).await,
        ResultEffect::Record { status, late } => (status, late),
    };
    let message = super::result_text(outcome, late);
    tx.commands_changed().await?;
    tx.result_recorded(device);
    sqlx::query(
        "UPDATE commands SET status = $1, completed_ms = $2, executed_ms = $3, result_message = $4, \
         exception_code = $5, result_value = $6 WHERE id = $7",
    )
    .bind(next.as_str())
    .bind(now)
    .bind(outcome.executed_ms)
    .bind(message)
    .bind(outcome.exception_code.map(i64::from))
    .bind(outcome.value.map(i64::from))
    .bind(id)
    .execute(&mut **tx)
    .await?;
    command_in(tx, id).await
}

/// An SQL list of ids (`1,2,3`): numbers of our own, never text from outside.
pub fn id_list(ids: &[i64]) -> String {
    ids.iter().map(i64::to_string).collect::<Vec<_>>().join(",")
}

/// Hands out up to `max` deliverable commands of each of `devices`, oldest
/// first, in `tx` (on PostgreSQL skipping rows another server is
/// delivering): one `SELECT`, one `UPDATE`, one `SELECT` for any number of
/// devices (a wake storm's long polls are delivered in groups).
pub async fn deliver_many_in(
    db: &Db,
    tx: &mut WriteTx,
    devices: &[i64],
    redeliver_after_ms: i64,
    max: usize,
    now: i64,
) -> StoreResult<std::collections::HashMap<i64, Vec<Command>>> {
    let mut out: std::collections::HashMap<i64, Vec<Command>> = std::collections::HashMap::new();
    if devices.is_empty() {
        return Ok(out);
    }
    let sql = format!(
        "SELECT id, device_id FROM commands WHERE device_id IN ({}) AND {} ORDER BY id{}",
        id_list(devices),
        deliverable_sql("$1", "$2"),
        db.skip_locked()
    );
    let rows = sqlx::query(&sql)
        .persistent(false)
        .bind(now)
        .bind(now - redeliver_after_ms)
        .fetch_all(&mut **tx)
        .await?;
    let mut taken: std::collections::HashMap<i64, usize> = std::collections::HashMap::new();
    let mut ids = Vec::new();
    for r in &rows {
        let device: i64 = r.try_get("device_id")?;
        let n = taken.entry(device).or_default();
        if *n < max {
            *n += 1;
            ids.push(r.try_get::<i64, _>("id")?);
        }
    }
    if ids.is_empty() {
        return Ok(out);
    }
    let list = id_list(&ids);
    tx.commands_changed().await?;
    sqlx::query(&format!(
        "UPDATE commands SET status = 'delivered', delivered_ms = $1, \
         first_delivered_ms = COALESCE(first_delivered_ms, $1), delivery_count = delivery_count + 1 \
         WHERE id IN ({list})"
    ))
    .persistent(false)
    .bind(now)
    .execute(&mut **tx)
    .await?;
    let sql = format!(
        "SELECT {COLUMNS}, c.device_id FROM commands c JOIN devices d ON d.id = c.device_id \
         WHERE c.id IN ({list}) ORDER BY c.id"
    );
    for row in sqlx::query(&sql).persistent(false).fetch_all(&mut **tx).await? {
        out.entry(row.try_get("device_id")?).or_default().push(command_from(&row)?);
    }
    Ok(out)
}

/// The commands.
#[derive(Clone)]
pub struct Commands {
    db: Db,
}

enum Bind {
    I(i64),
    S(String),
}

impl Commands {
    /// Over `db`.
    pub fn new(db: Db) -> Self {
        Commands { db }
    }

    /// Validates `request` against the device (enabled; its rated power)
    /// and queues it with a time-to-live; the device hears of it at once.
    /// An export limit is leased as [`super::lease_for`] says.
    pub async fn queue(
        &self,
        device: &str,
        request: &CommandRequest,
        ttl_s: i64,
        actor: &str,
        now: i64,
    ) -> StoreResult<Command> {
        let options = QueueOptions { ttl_s, ..QueueOptions::default() };
        self.queue_with(device, request, &options, actor, now).await
    }

    /// [`Commands::queue`] with a lease asked for and a curtailment to belong to.
    pub async fn queue_with(
        &self,
        device: &str,
        request: &CommandRequest,
        options: &QueueOptions,
        actor: &str,
        now: i64,
    ) -> StoreResult<Command> {
        let mut tx = self.db.write().await?;
        let id = queue_in(&self.db, &mut tx, device, request, options, actor, now).await?;
        tx.announce(device).await?;
        let command = command_in(&mut tx, id).await?;
        tx.commit().await?;
        Ok(command)
    }

    /// One command.
    pub async fn get(&self, id: i64) -> StoreResult<Command> {
        let mut c = self.db.reader().acquire().await?;
        command_in(&mut c, id).await
    }

    /// Commands matching `filter`, newest first.
    pub async fn list(&self, filter: &CommandFilter) -> StoreResult<Vec<Command>> {
        let mut sql = format!(
            "SELECT {COLUMNS} FROM commands c JOIN devices d ON d.id = c.device_id WHERE c.id < $1"
        );
        let mut binds = vec![Bind::I(filter.before_id.unwrap_or(i64::MAX))];
        let mut add = |clause: &str, b: Bind| {
            binds.push(b);
            sql.push_str(&format!(" AND {clause} ${}", binds.len()));
        };
        if let Some(device) = &filter.device {
            add("d.name =", Bind::S(device.clone()));
        }
        if let Some(status) = filter.status {
            add("c.status =", Bind::S(status.as_str().to_owned()));
        }
        if let Some(kind) = &filter.kind {
            add("c.kind =", Bind::S(kind.clone()));
        }
        if let Some(since) = filter.since_ms {
            add("c.created_ms >=", Bind::I(since));
        }
        binds.push(Bind::I(filter.limit.clamp(1, 100_000)));
        sql.push_str(&format!(" ORDER BY c.id DESC LIMIT ${}", binds.len()));
        let mut q = sqlx::query(&sql);
        for b in &binds {
            q = match b {
                Bind::I(i) => q.bind(*i),
                Bind::S(s) => q.bind(s.as_str()),
            };
        }
        let rows = q.fetch_all(self.db.reader()).await?;
        rows.iter().map(command_from).collect()
    }

    /// Cancels an open command.
    pub async fn cancel(&self, id: i64, actor: &str, now: i64) -> StoreResult<Command> {
        let mut tx = self.db.write().await?;
        let sql = format!("SELECT status FROM commands WHERE id = $1{}", self.db.for_update());
        let row = sqlx::query(&sql).bind(id).fetch_optional(&mut *tx).await?;
        let status: String =
            row.ok_or_else(|| StoreError::NotFound(format!("command {id}")))?.try_get("status")?;
        if !CommandStatus::parse(&status).is_some_and(CommandStatus::is_open) {
            return Err(StoreError::Conflict(format!("command {id} is already {status}")));
        }
        tx.commands_changed().await?;
        sqlx::query(
            "UPDATE commands SET status = 'cancelled', completed_ms = $1, result_message = $2 WHERE id = $3",
        )
        .bind(now)
        .bind(format!("cancelled by {actor}"))
        .bind(id)
        .execute(&mut *tx)
        .await?;
        audit::record(
            &mut tx,
            now,
            actor,
            "command.cancel",
            &id.to_string(),
            json!({"was": status}),
        )
        .await?;
        let command = command_in(&mut tx, id).await?;
        tx.commit().await?;
        Ok(command)
    }

    /// Marks expired every open command past its time-to-live; returns how many.
    pub async fn expire(&self, now: i64) -> StoreResult<u64> {
        let done = sqlx::query(
            "UPDATE commands SET status = 'expired', completed_ms = $1, \
             result_message = 'time-to-live passed before a result arrived' \
             WHERE status IN ('queued', 'delivered') AND expires_ms <= $1",
        )
        .bind(now)
        .execute(self.db.writer())
        .await?;
        if done.rows_affected() > 0 {
            self.db.news().commands_changed();
        }
        Ok(done.rows_affected())
    }

    /// Hands out up to `max` deliverable commands of a device (the legacy API's poll).
    pub async fn deliver(
        &self,
        device: &str,
        redeliver_after_ms: i64,
        max: i64,
        now: i64,
    ) -> StoreResult<Vec<Command>> {
        let mut tx = self.db.write().await?;
        let d = named_in(&self.db, &mut tx, device, false).await?;
        let max = max.clamp(1, 100) as usize;
        let mut out =
            deliver_many_in(&self.db, &mut tx, &[d.id.0], redeliver_after_ms, max, now).await?;
        tx.commit().await?;
        Ok(out.remove(&d.id.0).unwrap_or_default())
    }

    /// When a delivered command of `device` without a result becomes
    /// deliverable again (`redeliver_after_ms` after its delivery), the
    /// earliest; `None` when none waits.
    pub async fn next_redelivery(
        &self,
        device: &str,
        redeliver_after_ms: i64,
        now: i64,
    ) -> StoreResult<Option<i64>> {
        let row = sqlx::query(
            "SELECT MIN(c.delivered_ms) AS first FROM commands c JOIN devices d ON d.id = c.device_id \
             WHERE d.name = $1 AND c.status = 'delivered' AND c.expires_ms > $2",
        )
        .bind(device)
        .bind(now)
        .fetch_one(self.db.reader())
        .await?;
        Ok(row.try_get::<Option<i64>, _>("first")?.map(|t| t + redeliver_after_ms))
    }

    /// Records a device's result once (the legacy API's report).
    pub async fn record_result(
        &self,
        device: &str,
        id: i64,
        outcome: &CommandOutcome,
        now: i64,
    ) -> StoreResult<Command> {
        let mut tx = self.db.write().await?;
        let command = record_result_in(&self.db, &mut tx, device, id, outcome, now).await?;
        tx.commit().await?;
        Ok(command)
    }

    /// A reading of `register` = `value` taken at `reading_ms` confirms the
    /// writes it shows ([`super::confirmed_by`]); returns how many.
    pub async fn confirm(
        &self,
        device_id: DeviceId,
        register: u16,
        value: u16,
        reading_ms: i64,
    ) -> StoreResult<u64> {
        let (op, register, value) = super::confirmed_by(register, value).columns();
        // Nearly every upload reads the register, nearly never with a write
        // to confirm: look first, on a reader, and leave the writer alone.
        let waiting = sqlx::query(&format!(
            "SELECT 1 AS one FROM commands WHERE device_id = $1 AND {AWAITS_CONFIRMATION} \
             AND op = $2 AND register = $3 AND value = $4 LIMIT 1"
        ))
        .bind(device_id)
        .bind(op)
        .bind(register)
        .bind(value)
        .fetch_optional(self.db.reader())
        .await?;
        if waiting.is_none() {
            return Ok(0);
        }
        let done = sqlx::query(&format!(
            "UPDATE commands SET status = 'confirmed', confirmed_ms = $1 \
             WHERE device_id = $2 AND {AWAITS_CONFIRMATION} AND op = $3 AND register = $4 \
             AND value = $5 AND COALESCE(executed_ms, completed_ms) <= $1"
        ))
        .bind(reading_ms)
        .bind(device_id)
        .bind(op)
        .bind(register)
        .bind(value)
        .execute(self.db.writer())
        .await?;
        if done.rows_affected() > 0 {
            self.db.news().commands_changed();
        }
        Ok(done.rows_affected())
    }

    /// Commands that failed or expired, by device id (the fleet view's alarm).
    pub async fn failed_by_device(&self) -> StoreResult<std::collections::HashMap<i64, i64>> {
        let rows = sqlx::query(
            "SELECT device_id, COUNT(*) AS n FROM commands \
             WHERE status IN ('failed', 'expired') GROUP BY device_id",
        )
        .fetch_all(self.db.reader())
        .await?;
        rows.iter().map(|r| Ok((r.try_get("device_id")?, r.try_get("n")?))).collect()
    }

    /// Statistics, for one device or all.
    pub async fn stats(&self, device: Option<&str>) -> StoreResult<CommandStats> {
        let filter = match device {
            Some(_) => "WHERE device_id = (SELECT id FROM devices WHERE name = $1)",
            None => "",
        };
        fn bind<'q>(
            sql: &'q str,
            device: Option<&str>,
        ) -> sqlx::query::Query<'q, sqlx::Any, sqlx::any::AnyArguments<'q>> {
            let q = sqlx::query(sql);
            match device {
                Some(name) => q.bind(name.to_owned()),
                None => q,
            }
        }
        let mut stats = CommandStats::default();
        let sql = format!(
            "SELECT status, kind, COUNT(*) AS n FROM commands {filter} GROUP BY status, kind"
        );
        for row in bind(&sql, device).fetch_all(self.db.reader()).await? {
            let (status, kind, n): (String, String, i64) =
                (row.try_get("status")?, row.try_get("kind")?, row.try_get("n")?);
            *stats.by_status.entry(status).or_default() += n;
            *stats.by_type.entry(kind).or_default() += n;
            stats.total_commands += n;
        }
        let sql = format!(
            "SELECT CAST(AVG(CASE WHEN status IN ('succeeded','failed','confirmed') THEN completed_ms - created_ms END) AS DOUBLE PRECISION) AS completion, \
             CAST(AVG(first_delivered_ms - created_ms) AS DOUBLE PRECISION) AS delivery, \
             COUNT(DISTINCT device_id) AS devices FROM commands {filter}"
        );
        let row = bind(&sql, device).fetch_one(self.db.reader()).await?;
        stats.average_completion_ms = row.try_get("completion")?;
        stats.average_delivery_ms = row.try_get("delivery")?;
        stats.devices_with_commands = row.try_get("devices")?;
        let count = |s: CommandStatus| stats.by_status.get(s.as_str()).copied().unwrap_or(0);
        let good = count(CommandStatus::Succeeded) + count(CommandStatus::Confirmed);
        let finished = good + count(CommandStatus::Failed);
        stats.success_rate = if finished > 0 { 100.0 * good as f64 / finished as f64 } else { 0.0 };
        for status in CommandStatus::ALL {
            stats.by_status.entry(status.as_str().to_owned()).or_default();
        }
        Ok(stats)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The SQL twins agree with the rules on every status, operation and time.
    #[tokio::test]
    async fn the_sql_says_what_the_rules_say() {
        use sqlx::Connection;
        sqlx::any::install_default_drivers();
        let mut c = AnyConnection::connect("sqlite::memory:").await.unwrap();
        sqlx::query(
            "CREATE TABLE commands (id INTEGER PRIMARY KEY, status TEXT, op TEXT, delivered_ms BIGINT, expires_ms BIGINT)",
        )
        .execute(&mut c)
        .await
        .unwrap();
        let actions = [Action::Write { register: 8, value: 1 }, Action::Read { register: 8 }];
        let mut id = 0i64;
        let mut cases = Vec::new();
        for status in CommandStatus::ALL {
            for action in actions {
                for (delivered, expires) in [(None, 2_000), (Some(400), 2_000), (Some(600), 900)] {
                    id += 1;
                    sqlx::query("INSERT INTO commands VALUES ($1, $2, $3, $4, $5)")
                        .bind(id)
                        .bind(status.as_str())
                        .bind(action.columns().0)
                        .bind(delivered)
                        .bind(expires)
                        .execute(&mut c)
                        .await
                        .unwrap();
                    cases.push((id, status, action, delivered, expires));
                }
            }
        }
        let ids = |rows: Vec<AnyRow>| -> Vec<i64> { rows.iter().map(|r| r.get("id")).collect() };
        let awaiting = sqlx::query(&format!("SELECT id FROM commands WHERE {AWAITS_CONFIRMATION}"))
            .fetch_all(&mut c)
            .await
            .unwrap();
        let expected: Vec<i64> = cases
            .iter()
            .filter(|(_, s, a, _, _)| super::super::awaits_confirmation(*s, *a))
            .map(|c| c.0)
            .collect();
        assert_eq!(ids(awaiting), expected);
        let deliverable = sqlx::query(&format!(
            "SELECT id FROM commands WHERE {} ORDER BY id",
            deliverable_sql("$1", "$2")
        ))
        .bind(1_000i64)
        .bind(500i64)
        .fetch_all(&mut c)
        .await
        .unwrap();
        let expected: Vec<i64> = cases
            .iter()
            .filter(|(_, s, _, d, e)| super::super::deliverable(*s, *d, *e, 1_000, 500))
            .map(|c| c.0)
            .collect();
        assert_eq!(ids(deliverable), expected);
    }
}

/// How a command is queued besides what it asks.
#[derive(Debug, Clone)]
pub struct QueueOptions {
    /// Time to live, s.
    pub ttl_s: i64,
    /// The lease asked for, ms (`None`: the device's default).
    pub lease_ms: Option<i64>,
    /// The ramp asked for, % per second (`None`: the device's default).
    pub ramp_pct_per_s: Option<f64>,
    /// The curtailment it belongs to.
    pub curtailment_id: Option<i64>,
    /// It returns the device to its schedule ([`super::Command::resume`]).
    pub resume: bool,
    /// A write to an address outside the register map is queued as the
    /// original server did (the device reports the inverter's refusal)
    /// instead of refused (the legacy API's default).
    pub any_address: bool,
}

impl Default for QueueOptions {
    fn default() -> Self {
        QueueOptions {
            ttl_s: super::DEFAULT_TTL_S,
            lease_ms: None,
            ramp_pct_per_s: None,
            curtailment_id: None,
            resume: false,
            any_address: false,
        }
    }
}

/// Queues `request` for `device` in `tx` (validated, leased, audited);
/// returns its id. The caller announces it after commit.
pub async fn queue_in(
    db: &Db,
    tx: &mut WriteTx,
    device: &str,
    request: &CommandRequest,
    options: &QueueOptions,
    actor: &str,
    now: i64,
) -> StoreResult<i64> {
    let ttl_s = super::check_ttl(options.ttl_s)?;
    let d = named_in(db, tx, device, true).await?;
    if !d.enabled {
        return Err(StoreError::Refused {
            code: "device_disabled",
            message: format!("device {device:?} is disabled"),
        });
    }
    let action = request.action_with(d.rated_power_w, options.any_address)?;
    let row = sqlx::query("SELECT failsafe, ramp_centi FROM devices WHERE id = $1")
        .bind(d.id)
        .fetch_one(&mut **tx)
        .await?;
    // A return to the schedule holds no lease: the schedule is what holds.
    let lease_ms = if options.resume {
        None
    } else {
        super::lease_for(&action, options.lease_ms, row.try_get("failsafe")?)?
    };
    let ramp = super::ramp_for(&action, options.ramp_pct_per_s, row.try_get("ramp_centi")?)?;
    let (op, register, value) = action.columns();
    let row = sqlx::query(
        "INSERT INTO commands (device_id, kind, parameters, op, register, value, status, created_ms, created_by, expires_ms, lease_ms, ramp_centi, curtailment_id, resume) \
         VALUES ($1, $2, $3, $4, $5, $6, 'queued', $7, $8, $9, $10, $11, $12, $13) RETURNING id",
    )
    .bind(d.id)
    .bind(request.kind())
    .bind(request.parameters().to_string())
    .bind(op)
    .bind(register)
    .bind(value)
    .bind(now)
    .bind(actor)
    .bind(now + ttl_s * 1000)
    .bind(lease_ms)
    .bind(ramp)
    .bind(options.curtailment_id)
    .bind(i64::from(options.resume))
    .fetch_one(&mut **tx)
    .await?;
    let id: i64 = row.try_get("id")?;
    let detail = json!({"device": device, "type": request.kind(), "parameters": request.parameters(), "lease_ms": lease_ms, "ramp_centi": ramp});
    audit::record(tx, now, actor, "command.queue", &id.to_string(), detail).await?;
    Ok(id)
}
