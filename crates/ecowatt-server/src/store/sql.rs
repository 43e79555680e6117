//! [`Store`] over SQL: SQLite and PostgreSQL through sqlx's `Any` driver, on
//! the database core ([`crate::db`]).

use async_trait::async_trait;

use super::*;
use crate::db::Db;
pub use crate::db::Dialect;

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

    /// Stored firmware images.
    pub fn firmwares(&self) -> crate::firmware::Firmwares {
        crate::firmware::Firmwares::new(self.db.clone())
    }

    /// Firmware rollouts.
    pub fn rollouts(&self) -> crate::firmware::Rollouts {
        crate::firmware::Rollouts::new(self.db.clone())
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
}
