//! [`Store`] over SQL: SQLite and PostgreSQL through sqlx's `Any` driver, on
//! the database core ([`crate::db`]).

use async_trait::async_trait;
use serde_json::json;
use sqlx::Row;
use sqlx::any::AnyRow;

use super::*;
pub use crate::db::Dialect;
use crate::db::{Db, json_col};

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

    /// The config shadows.
    pub fn configs(&self) -> crate::config::Configs {
        crate::config::Configs::new(self.db.clone())
    }

    /// The commands.
    pub fn commands(&self) -> crate::commands::Commands {
        crate::commands::Commands::new(self.db.clone())
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
