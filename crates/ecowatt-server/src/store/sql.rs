//! [`Store`] over SQL: SQLite and PostgreSQL through sqlx's `Any` driver, on
//! the database core ([`crate::db`]).

use async_trait::async_trait;
use serde_json::json;
use sqlx::Row;
use sqlx::any::AnyRow;

use super::*;
pub use crate::db::Dialect;
use crate::db::{Db, json_col};
use crate::domain::{Action, CommandRequest, CommandStatus, ConfigPatch, DeviceConfig};

/// The SQL store.
#[derive(Clone)]
pub struct SqlStore {
    db: Db,
    /// Telemetry uploads written in groups (`ingest.rs`).
    ingest: tokio::sync::mpsc::Sender<super::ingest::Job>,
    /// The ingest task's connection: on SQLite the writer; on PostgreSQL one
    /// of its own, so that a group never queues behind the reads and single
    /// writes of the shared pool (under a backlog it did, groups shrank to a
    /// few uploads each and the server fell further behind).
    ingest_pool: super::ingest::Target,
    /// The devices, with their keys in memory.
    devices: crate::devices::Devices,
}

pub(super) type Tx = crate::db::WriteTx;

enum Bind {
    I(i64),
    S(String),
}

fn bind_all<'q>(
    mut q: sqlx::query::Query<'q, sqlx::Any, sqlx::any::AnyArguments<'q>>,
    binds: &'q [Bind],
) -> sqlx::query::Query<'q, sqlx::Any, sqlx::any::AnyArguments<'q>> {
    for b in binds {
        q = match b {
            Bind::I(i) => q.bind(*i),
            Bind::S(s) => q.bind(s.as_str()),
        };
    }
    q
}

use crate::db::corrupt;

pub(super) fn firmware_from(row: &AnyRow) -> StoreResult<Firmware> {
    Ok(Firmware {
        id: row.try_get("id")?,
        version: row.try_get("version")?,
        target: row.try_get("target")?,
        size: row.try_get("size")?,
        sha256: row.try_get("sha256")?,
        security_counter: row.try_get("security_counter")?,
        created_ms: row.try_get("created_ms")?,
        manifest: json_col(row, "manifest")?,
        uploaded_ms: row.try_get("uploaded_ms")?,
        uploaded_by: row.try_get("uploaded_by")?,
    })
}

const COMMAND_COLUMNS: &str = "c.id, d.name AS device_name, c.kind, c.parameters, c.action, c.status, \
     c.created_ms, c.created_by, c.expires_ms, c.delivered_ms, c.delivery_count, c.completed_ms, \
     c.executed_ms, c.result_message, c.exception_code, c.result_value, c.confirmed_ms";

fn command_from(row: &AnyRow) -> StoreResult<Command> {
    let status: String = row.try_get("status")?;
    Ok(Command {
        id: row.try_get("id")?,
        device: row.try_get("device_name")?,
        kind: row.try_get("kind")?,
        parameters: json_col(row, "parameters")?,
        action: json_col(row, "action")?,
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
    })
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

impl SqlStore {
    /// Opens (creating if needed) the database at `url` and migrates it:
    /// `sqlite://PATH?mode=rwc` or `postgres://...`; writes announce to `news`.
    pub async fn open_with(
        url: &str,
        news: std::sync::Arc<crate::news::News>,
    ) -> StoreResult<Self> {
        let db = Db::open(url, news).await?;
        let ingest_pool = match db.dialect() {
            Dialect::Sqlite => super::ingest::Target::Sqlite(db.writer().clone()),
            Dialect::Postgres => super::ingest::Target::Postgres(
                sqlx::postgres::PgPoolOptions::new()
                    .max_connections(1)
                    .before_acquire(|conn, _| Box::pin(crate::db::healthy(conn)))
                    .connect(url)
                    .await?,
            ),
        };
        let ingest = super::ingest::start(ingest_pool.clone());
        let devices = crate::devices::Devices::open(db.clone()).await?;
        Ok(SqlStore { db, ingest, ingest_pool, devices })
    }

    /// Opens the store with news that reaches nobody (tools, tests).
    pub async fn open(url: &str) -> StoreResult<Self> {
        SqlStore::open_with(url, Default::default()).await
    }

    /// The database.
    pub fn db(&self) -> &Db {
        &self.db
    }

    /// Tokens and the audit log.
    pub fn operators(&self) -> crate::operators::Operators {
        crate::operators::Operators::new(self.db.clone())
    }

    /// Whether this open created the schema: the database was empty.
    pub fn created(&self) -> bool {
        self.db.created()
    }

    /// Whether the store can write now ([`Db::writable`]).
    pub async fn writable(&self) -> StoreResult<()> {
        self.db.writable().await
    }

    /// Test support: see [`Db::wedge_writer_like_a_full_disk`].
    #[doc(hidden)]
    pub async fn wedge_writer_like_a_full_disk(&self) -> StoreResult<()> {
        self.db.wedge_writer_like_a_full_disk().await
    }

    /// The URL of the SQLite database file at `path`.
    pub fn sqlite_url(path: &std::path::Path) -> String {
        format!("sqlite://{}?mode=rwc", path.display())
    }

    /// The dialect.
    pub fn dialect(&self) -> Dialect {
        self.db.dialect()
    }

    /// Closes the pools.
    pub async fn close(&self) {
        self.ingest_pool.close().await;
        self.db.close().await;
    }

    /// Devices' keys kept in memory.
    pub(super) fn keys(&self) -> &crate::devices::keys::KeyCache {
        self.devices.keys()
    }

    /// The devices.
    pub fn devices(&self) -> crate::devices::Devices {
        self.devices.clone()
    }

    /// The group-commit ingest queue.
    pub(super) fn ingest(&self) -> &tokio::sync::mpsc::Sender<super::ingest::Job> {
        &self.ingest
    }

    async fn command_in(tx: &mut Tx, id: i64) -> StoreResult<Command> {
        let sql = format!(
            "SELECT {COMMAND_COLUMNS} FROM commands c JOIN devices d ON d.id = c.device_id WHERE c.id = $1"
        );
        let row = sqlx::query(&sql).bind(id).fetch_optional(&mut **tx).await?;
        row.as_ref()
            .map(command_from)
            .transpose()?
            .ok_or_else(|| StoreError::NotFound(format!("command {id}")))
    }

    async fn shadow_in(tx: &mut Tx, device_id: i64) -> StoreResult<ConfigShadow> {
        let row = sqlx::query(
            "SELECT d.name, c.* FROM device_configs c JOIN devices d ON d.id = c.device_id WHERE c.device_id = $1",
        )
        .bind(device_id)
        .fetch_one(&mut **tx)
        .await?;
        shadow_from(&row)
    }

    /// Records a result inside `tx` (see [`Store::record_result`]).
    pub(super) async fn record_result_in(
        &self,
        tx: &mut Tx,
        device: &str,
        id: i64,
        outcome: &CommandOutcome,
        now: i64,
    ) -> StoreResult<Command> {
        let sql = format!(
            "SELECT c.status, d.name FROM commands c JOIN devices d ON d.id = c.device_id WHERE c.id = $1{}",
            match self.db.dialect() {
                Dialect::Sqlite => "",
                Dialect::Postgres => " FOR UPDATE OF c",
            }
        );
        let row = sqlx::query(&sql).bind(id).fetch_optional(&mut **tx).await?;
        let row = row.ok_or_else(|| StoreError::NotFound(format!("command {id}")))?;
        let owner: String = row.try_get("name")?;
        if owner != device {
            // Another device's command: as if it did not exist.
            return Err(StoreError::NotFound(format!("command {id}")));
        }
        let status: String = row.try_get("status")?;
        let status = CommandStatus::parse(&status).ok_or_else(|| corrupt("status", &status))?;
        if matches!(
            status,
            CommandStatus::Succeeded | CommandStatus::Failed | CommandStatus::Confirmed
        ) {
            // A repeated report (a retried upload): recorded once, answered the same.
            return Self::command_in(tx, id).await;
        }
        let next = if outcome.success { "succeeded" } else { "failed" };
        let mut message = outcome.message.clone().unwrap_or_default();
        if !status.is_open() {
            // Executed all the same (delivered before it expired or was cancelled): the truth wins.
            message =
                format!("{message} (result arrived after the command was {})", status.as_str())
                    .trim()
                    .to_owned();
        }
        sqlx::query(
            "UPDATE commands SET status = $1, completed_ms = $2, executed_ms = $3, result_message = $4, \
             exception_code = $5, result_value = $6 WHERE id = $7",
        )
        .bind(next)
        .bind(now)
        .bind(outcome.executed_ms)
        .bind(message)
        .bind(outcome.exception_code.map(i64::from))
        .bind(outcome.value.map(i64::from))
        .bind(id)
        .execute(&mut **tx)
        .await?;
        Self::command_in(tx, id).await
    }

    /// Hands out commands of `device_id` inside `tx` (see [`Store::deliver_commands`]).
    pub(super) async fn deliver_in(
        &self,
        tx: &mut Tx,
        device_id: i64,
        redeliver_after_ms: i64,
        max: i64,
        now: i64,
    ) -> StoreResult<Vec<Command>> {
        let lock = match self.db.dialect() {
            Dialect::Sqlite => "",
            Dialect::Postgres => " FOR UPDATE SKIP LOCKED",
        };
        let sql = format!(
            "SELECT id FROM commands WHERE device_id = $1 AND expires_ms > $2 \
             AND (status = 'queued' OR (status = 'delivered' AND delivered_ms <= $3)) ORDER BY id LIMIT $4{lock}"
        );
        let ids: Vec<i64> = sqlx::query(&sql)
            .bind(device_id)
            .bind(now)
            .bind(now - redeliver_after_ms)
            .bind(max.clamp(1, 100))
            .fetch_all(&mut **tx)
            .await?
            .iter()
            .map(|r| r.try_get("id"))
            .collect::<Result<_, _>>()?;
        let mut out = Vec::with_capacity(ids.len());
        for id in ids {
            sqlx::query(
                "UPDATE commands SET status = 'delivered', delivered_ms = $1, \
                 first_delivered_ms = COALESCE(first_delivered_ms, $1), delivery_count = delivery_count + 1 WHERE id = $2",
            )
            .bind(now)
            .bind(id)
            .execute(&mut **tx)
            .await?;
            out.push(Self::command_in(tx, id).await?);
        }
        Ok(out)
    }
}

#[async_trait]
impl Store for SqlStore {
    fn backend(&self) -> &'static str {
        match self.db.dialect() {
            Dialect::Sqlite => "sqlite",
            Dialect::Postgres => "postgres",
        }
    }

    async fn writable(&self) -> StoreResult<()> {
        SqlStore::writable(self).await
    }

    async fn close(&self) {
        SqlStore::close(self).await
    }

    async fn config(&self, device: &str) -> StoreResult<ConfigShadow> {
        let row = sqlx::query("SELECT d.name, c.* FROM device_configs c JOIN devices d ON d.id = c.device_id WHERE d.name = $1")
            .bind(device)
            .fetch_optional(self.db.reader())
            .await?;
        row.as_ref()
            .map(shadow_from)
            .transpose()?
            .ok_or_else(|| StoreError::NotFound(format!("device {device:?}")))
    }

    async fn update_config(
        &self,
        device: &str,
        patch: &ConfigPatch,
        actor: &str,
        now: i64,
    ) -> StoreResult<ConfigShadow> {
        let mut tx = self.db.write().await?;
        let d = crate::devices::named_in(&self.db, &mut tx, device, true).await?;
        let current = Self::shadow_in(&mut tx, d.id).await?;
        let next = current.desired.patched(patch)?;
        let version = current.desired_version + 1;
        let text = serde_json::to_string(&next).expect("config serialises");
        sqlx::query("UPDATE device_configs SET desired_version = $1, desired = $2, desired_ms = $3 WHERE device_id = $4")
            .bind(version)
            .bind(&text)
            .bind(now)
            .bind(d.id)
            .execute(&mut *tx)
            .await?;
        sqlx::query("INSERT INTO config_history (device_id, version, config, actor, at_ms) VALUES ($1, $2, $3, $4, $5)")
            .bind(d.id)
            .bind(version)
            .bind(&text)
            .bind(actor)
            .bind(now)
            .execute(&mut *tx)
            .await?;
        crate::operators::audit::record(
            &mut tx,
            now,
            actor,
            "config.set",
            device,
            json!({"version": version, "config": next}),
        )
        .await?;
        tx.announce(device).await?;
        let shadow = Self::shadow_in(&mut tx, d.id).await?;
        tx.commit().await?;
        Ok(shadow)
    }

    async fn config_history(&self, device: &str, limit: i64) -> StoreResult<Vec<ConfigVersion>> {
        let d = self.devices.get(device).await?;
        let rows = sqlx::query(
            "SELECT * FROM config_history WHERE device_id = $1 ORDER BY version DESC LIMIT $2",
        )
        .bind(d.id)
        .bind(limit.clamp(1, 1000))
        .fetch_all(self.db.reader())
        .await?;
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

    async fn report_config(
        &self,
        device: &str,
        version: i64,
        applied: &DeviceConfig,
        rejected: &[Rejection],
        now: i64,
    ) -> StoreResult<ConfigShadow> {
        let mut tx = self.db.write().await?;
        let d = crate::devices::named_in(&self.db, &mut tx, device, true).await?;
        let current = Self::shadow_in(&mut tx, d.id).await?;
        if version > current.desired_version || version < 1 {
            return Err(StoreError::Conflict(format!(
                "reported config version {version} was never issued (latest is {})",
                current.desired_version
            )));
        }
        sqlx::query(
            "UPDATE device_configs SET reported_version = $1, reported = $2, rejected = $3, reported_ms = $4 WHERE device_id = $5",
        )
        .bind(version)
        .bind(serde_json::to_string(applied).expect("config serialises"))
        .bind(serde_json::to_string(rejected).expect("rejections serialise"))
        .bind(now)
        .bind(d.id)
        .execute(&mut *tx)
        .await?;
        let shadow = Self::shadow_in(&mut tx, d.id).await?;
        tx.commit().await?;
        Ok(shadow)
    }

    async fn legacy_config_poll(
        &self,
        device: &str,
        repeat: i64,
        now: i64,
    ) -> StoreResult<(bool, DeviceConfig)> {
        let mut tx = self.db.write().await?;
        let d = crate::devices::named_in(&self.db, &mut tx, device, true).await?;
        let row = sqlx::query("SELECT * FROM device_configs WHERE device_id = $1")
            .bind(d.id)
            .fetch_one(&mut *tx)
            .await?;
        let desired: DeviceConfig = json_col(&row, "desired")?;
        let version: i64 = row.try_get("desired_version")?;
        let reported: Option<i64> = row.try_get("reported_version")?;
        if reported == Some(version) {
            tx.commit().await?;
            return Ok((false, desired));
        }
        let served: i64 = row.try_get("legacy_served_version")?;
        let count: i64 = row.try_get("legacy_served_count")?;
        let count = if served == version { count + 1 } else { 1 };
        sqlx::query("UPDATE device_configs SET legacy_served_version = $1, legacy_served_count = $2 WHERE device_id = $3")
            .bind(version)
            .bind(count)
            .bind(d.id)
            .execute(&mut *tx)
            .await?;
        if count >= repeat {
            // The original firmware cannot acknowledge: after `repeat` deliveries
            // of an idempotent change, count it as applied.
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
        Ok((true, desired))
    }

    async fn queue_command(
        &self,
        device: &str,
        request: &CommandRequest,
        action: Action,
        ttl_ms: i64,
        actor: &str,
        now: i64,
    ) -> StoreResult<Command> {
        let mut tx = self.db.write().await?;
        let d = crate::devices::named_in(&self.db, &mut tx, device, true).await?;
        let row = sqlx::query(
            "INSERT INTO commands (device_id, kind, parameters, action, status, created_ms, created_by, expires_ms) \
             VALUES ($1, $2, $3, $4, 'queued', $5, $6, $7) RETURNING id",
        )
        .bind(d.id)
        .bind(request.kind())
        .bind(request.parameters().to_string())
        .bind(serde_json::to_string(&action).expect("action serialises"))
        .bind(now)
        .bind(actor)
        .bind(now + ttl_ms)
        .fetch_one(&mut *tx)
        .await?;
        let id: i64 = row.try_get("id")?;
        crate::operators::audit::record(
            &mut tx,
            now,
            actor,
            "command.queue",
            &id.to_string(),
            json!({"device": device, "type": request.kind(), "parameters": request.parameters()}),
        )
        .await?;
        tx.announce(device).await?;
        let command = Self::command_in(&mut tx, id).await?;
        tx.commit().await?;
        Ok(command)
    }

    async fn command(&self, id: i64) -> StoreResult<Command> {
        let sql = format!(
            "SELECT {COMMAND_COLUMNS} FROM commands c JOIN devices d ON d.id = c.device_id WHERE c.id = $1"
        );
        let row = sqlx::query(&sql).bind(id).fetch_optional(self.db.reader()).await?;
        row.as_ref()
            .map(command_from)
            .transpose()?
            .ok_or_else(|| StoreError::NotFound(format!("command {id}")))
    }

    async fn commands(&self, filter: &CommandFilter) -> StoreResult<Vec<Command>> {
        let mut sql = format!(
            "SELECT {COMMAND_COLUMNS} FROM commands c JOIN devices d ON d.id = c.device_id WHERE c.id < $1"
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
        let rows = bind_all(sqlx::query(&sql), &binds).fetch_all(self.db.reader()).await?;
        rows.iter().map(command_from).collect()
    }

    async fn cancel_command(&self, id: i64, actor: &str, now: i64) -> StoreResult<Command> {
        let mut tx = self.db.write().await?;
        let sql = format!("SELECT status FROM commands WHERE id = $1{}", self.db.for_update());
        let row = sqlx::query(&sql).bind(id).fetch_optional(&mut *tx).await?;
        let status: String =
            row.ok_or_else(|| StoreError::NotFound(format!("command {id}")))?.try_get("status")?;
        if !CommandStatus::parse(&status).is_some_and(CommandStatus::is_open) {
            return Err(StoreError::Conflict(format!("command {id} is already {status}")));
        }
        sqlx::query("UPDATE commands SET status = 'cancelled', completed_ms = $1, result_message = $2 WHERE id = $3")
            .bind(now)
            .bind(format!("cancelled by {actor}"))
            .bind(id)
            .execute(&mut *tx)
            .await?;
        crate::operators::audit::record(
            &mut tx,
            now,
            actor,
            "command.cancel",
            &id.to_string(),
            json!({"was": status}),
        )
        .await?;
        let command = Self::command_in(&mut tx, id).await?;
        tx.commit().await?;
        Ok(command)
    }

    async fn expire_commands(&self, now: i64) -> StoreResult<u64> {
        let done = sqlx::query(
            "UPDATE commands SET status = 'expired', completed_ms = $1, \
             result_message = 'time-to-live passed before a result arrived' \
             WHERE status IN ('queued', 'delivered') AND expires_ms <= $1",
        )
        .bind(now)
        .execute(self.db.writer())
        .await?;
        Ok(done.rows_affected())
    }

    async fn deliver_commands(
        &self,
        device: &str,
        redeliver_after_ms: i64,
        max: i64,
        now: i64,
    ) -> StoreResult<Vec<Command>> {
        let mut tx = self.db.write().await?;
        let d = sqlx::query("SELECT id FROM devices WHERE name = $1")
            .bind(device)
            .fetch_optional(&mut *tx)
            .await?;
        let device_id: i64 =
            d.ok_or_else(|| StoreError::NotFound(format!("device {device:?}")))?.try_get("id")?;
        let out = self.deliver_in(&mut tx, device_id, redeliver_after_ms, max, now).await?;
        tx.commit().await?;
        Ok(out)
    }

    async fn record_result(
        &self,
        device: &str,
        id: i64,
        outcome: &CommandOutcome,
        now: i64,
    ) -> StoreResult<Command> {
        let mut tx = self.db.write().await?;
        let command = self.record_result_in(&mut tx, device, id, outcome, now).await?;
        tx.commit().await?;
        Ok(command)
    }

    async fn confirm_commands(
        &self,
        device: &str,
        register: u16,
        value: u16,
        reading_ms: i64,
    ) -> StoreResult<u64> {
        let action =
            serde_json::to_string(&Action::Write { register, value }).expect("action serialises");
        // Nearly every upload reads the register, nearly never with a write
        // to confirm: look first, on a reader, and leave the writer alone.
        let waiting = sqlx::query(
            "SELECT 1 AS one FROM commands WHERE status = 'succeeded' AND action = $1 \
             AND device_id = (SELECT id FROM devices WHERE name = $2) LIMIT 1",
        )
        .bind(action.as_str())
        .bind(device)
        .fetch_optional(self.db.reader())
        .await?;
        if waiting.is_none() {
            return Ok(0);
        }
        let done = sqlx::query(
            "UPDATE commands SET status = 'confirmed', confirmed_ms = $1 \
             WHERE status = 'succeeded' AND action = $2 AND COALESCE(executed_ms, completed_ms) <= $1 \
             AND device_id = (SELECT id FROM devices WHERE name = $3)",
        )
        .bind(reading_ms)
        .bind(action)
        .bind(device)
        .execute(self.db.writer())
        .await?;
        Ok(done.rows_affected())
    }

    async fn command_stats(&self, device: Option<&str>) -> StoreResult<CommandStats> {
        let (filter, binds) = match device {
            Some(name) => (
                "WHERE device_id = (SELECT id FROM devices WHERE name = $1)",
                vec![Bind::S(name.to_owned())],
            ),
            None => ("", vec![]),
        };
        let mut stats = CommandStats::default();
        let sql = format!(
            "SELECT status, kind, COUNT(*) AS n FROM commands {filter} GROUP BY status, kind"
        );
        for row in bind_all(sqlx::query(&sql), &binds).fetch_all(self.db.reader()).await? {
            let (status, kind, n): (String, String, i64) =
                (row.try_get("status")?, row.try_get("kind")?, row.try_get("n")?);
            *stats.by_status.entry(status).or_default() += n;
            *stats.by_type.entry(kind).or_default() += n;
            stats.total_commands += n;
        }
        let sql = format!(
            "SELECT CAST(AVG(CASE WHEN status IN ('succeeded','failed','confirmed') THEN completed_ms - created_ms END) AS DOUBLE PRECISION) AS completion, \
             CAST(AVG(first_delivered_ms - created_ms) AS DOUBLE PRECISION) AS delivery FROM commands {filter}"
        );
        let row = bind_all(sqlx::query(&sql), &binds).fetch_one(self.db.reader()).await?;
        stats.average_completion_ms = row.try_get("completion")?;
        stats.average_delivery_ms = row.try_get("delivery")?;
        let count = |s: &str| stats.by_status.get(s).copied().unwrap_or(0);
        let good = count("succeeded") + count("confirmed");
        let finished = good + count("failed");
        stats.success_rate = if finished > 0 { 100.0 * good as f64 / finished as f64 } else { 0.0 };
        for status in CommandStatus::ALL {
            stats.by_status.entry(status.as_str().to_owned()).or_default();
        }
        Ok(stats)
    }

    async fn device_sync(
        &self,
        device_id: i64,
        report: &SyncReport,
        deliver: bool,
        redeliver_after_ms: i64,
        now: i64,
    ) -> StoreResult<Result<SyncDelivery, SyncRefusal>> {
        self.device_sync_impl(device_id, report, deliver, redeliver_after_ms, now).await
    }

    async fn device_deliver(
        &self,
        device_id: i64,
        redeliver_after_ms: i64,
        now: i64,
    ) -> StoreResult<SyncDelivery> {
        self.device_deliver_impl(device_id, redeliver_after_ms, now).await
    }

    async fn save_security_events(&self, rows: &[SecurityEventRow]) -> StoreResult<Vec<i64>> {
        self.save_security_events_impl(rows).await
    }

    async fn purge_security_events(&self, before_ms: i64) -> StoreResult<u64> {
        self.purge_impl(before_ms).await
    }

    async fn security_events(
        &self,
        before_id: Option<i64>,
        limit: i64,
    ) -> StoreResult<Vec<SecurityEvent>> {
        self.security_events_impl(before_id, limit).await
    }

    async fn device_telemetry(
        &self,
        device_id: i64,
        key_version: i64,
        counter: u64,
        batch: &StoredBatch,
        dropped_total: i64,
        now: i64,
    ) -> StoreResult<Result<Accepted, SyncRefusal>> {
        self.device_telemetry_impl(device_id, key_version, counter, batch, dropped_total, now).await
    }

    async fn telemetry(
        &self,
        device: &str,
        from_ms: i64,
        to_ms: i64,
    ) -> StoreResult<Vec<StoredBatch>> {
        self.telemetry_impl(device, from_ms, to_ms).await
    }

    async fn telemetry_latest(&self, device: &str) -> StoreResult<Option<StoredBatch>> {
        self.telemetry_latest_impl(device).await
    }

    async fn dropped_total(&self, device: &str) -> StoreResult<i64> {
        self.dropped_total_impl(device).await
    }

    async fn add_firmware(&self, fw: &Firmware, data: &[u8], actor: &str) -> StoreResult<Firmware> {
        let mut tx = self.db.write().await?;
        let exists = sqlx::query("SELECT id FROM firmware WHERE version = $1 AND target = $2")
            .bind(fw.version.as_str())
            .bind(fw.target.as_str())
            .fetch_optional(&mut *tx)
            .await?;
        if exists.is_some() {
            return Err(StoreError::Conflict(format!(
                "firmware {} for {} is already stored",
                fw.version, fw.target
            )));
        }
        let row = sqlx::query(
            "INSERT INTO firmware (version, target, size, sha256, security_counter, created_ms, manifest, data, uploaded_ms, uploaded_by) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10) RETURNING id",
        )
        .bind(fw.version.as_str())
        .bind(fw.target.as_str())
        .bind(fw.size)
        .bind(fw.sha256.as_str())
        .bind(fw.security_counter)
        .bind(fw.created_ms)
        .bind(fw.manifest.to_string())
        .bind(data.to_vec())
        .bind(fw.uploaded_ms)
        .bind(actor)
        .fetch_one(&mut *tx)
        .await?;
        let id: i64 = row.try_get("id")?;
        crate::operators::audit::record(
            &mut tx,
            fw.uploaded_ms,
            actor,
            "firmware.upload",
            &id.to_string(),
            json!({"version": fw.version, "target": fw.target, "size": fw.size}),
        )
        .await?;
        tx.commit().await?;
        Ok(Firmware { id, uploaded_by: actor.to_owned(), ..fw.clone() })
    }

    async fn list_firmware(&self) -> StoreResult<Vec<Firmware>> {
        let rows = sqlx::query(
            "SELECT id, version, target, size, sha256, security_counter, created_ms, manifest, uploaded_ms, uploaded_by \
             FROM firmware ORDER BY id DESC",
        )
        .fetch_all(self.db.reader())
        .await?;
        rows.iter().map(firmware_from).collect()
    }

    async fn firmware_data(&self, id: i64) -> StoreResult<(Firmware, Vec<u8>)> {
        let row = sqlx::query("SELECT * FROM firmware WHERE id = $1")
            .bind(id)
            .fetch_optional(self.db.reader())
            .await?;
        let row = row.ok_or_else(|| StoreError::NotFound(format!("firmware {id}")))?;
        Ok((firmware_from(&row)?, row.try_get("data")?))
    }

    async fn firmware_by_token(&self, token: &str) -> StoreResult<(Firmware, Vec<u8>)> {
        self.firmware_by_token_impl(token).await
    }

    async fn create_rollout(
        &self,
        new: &NewRollout,
        actor: &str,
        now: i64,
    ) -> StoreResult<Rollout> {
        self.create_rollout_impl(new, actor, now).await
    }

    async fn rollouts(&self) -> StoreResult<Vec<Rollout>> {
        self.rollouts_impl().await
    }

    async fn rollout(&self, id: i64) -> StoreResult<(Rollout, Vec<RolloutDevice>)> {
        self.rollout_impl(id).await
    }

    async fn rollout_action(
        &self,
        id: i64,
        action: RolloutAction,
        actor: &str,
        now: i64,
    ) -> StoreResult<(Rollout, Vec<String>)> {
        self.rollout_action_impl(id, action, actor, now).await
    }
}
