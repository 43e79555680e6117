//! Everything the server keeps, opened once: the database core ([`Db`]:
//! SQLite by default, one WAL file in the data directory, or PostgreSQL),
//! the devices' keys in memory and the telemetry ingest task, and a handle
//! on each aggregate over them. Each aggregate owns its SQL; this only
//! composes them.

use std::sync::Arc;

use crate::commands::Commands;
use crate::config::Configs;
use crate::db::{Db, Dialect, StoreResult};
use crate::devices::Devices;
use crate::firmware::{Firmwares, Rollouts};
use crate::news::News;
use crate::operators::Operators;
use crate::protocol::Protocol;
use crate::security::SecurityEvents;
use crate::telemetry::{Ingest, Telemetry};

/// The store.
#[derive(Clone)]
pub struct Store {
    db: Db,
    devices: Devices,
    ingest: Ingest,
    deliveries: crate::protocol::deliveries::Deliveries,
    firmwares: Firmwares,
}

impl Store {
    /// Opens (creating if needed) the database at `url` and migrates it:
    /// `sqlite://PATH?mode=rwc` or `postgres://...`; writes announce to `news`.
    pub async fn open_with(url: &str, news: Arc<News>) -> StoreResult<Self> {
        let db = Db::open(url, news).await?;
        let ingest = Ingest::start(&db).await?;
        let devices = Devices::open(db.clone()).await?;
        let firmwares = Firmwares::new(db.clone());
        let deliveries = crate::protocol::deliveries::Deliveries::start(db.clone());
        Ok(Store { db, devices, ingest, deliveries, firmwares })
    }

    /// Opens the store with news that reaches nobody (tools, tests).
    pub async fn open(url: &str) -> StoreResult<Self> {
        Store::open_with(url, Default::default()).await
    }

    /// The database.
    pub fn db(&self) -> &Db {
        &self.db
    }

    /// The dialect.
    pub fn dialect(&self) -> Dialect {
        self.db.dialect()
    }

    /// Whether this open created the schema: the database was empty.
    pub fn created(&self) -> bool {
        self.db.created()
    }

    /// Whether the store can write now ([`Db::writable`]).
    pub async fn writable(&self) -> StoreResult<()> {
        self.db.writable().await
    }

    /// The telemetry ingest task.
    pub fn ingest(&self) -> &Ingest {
        &self.ingest
    }

    /// Closes the ingest task's connection and the pools.
    pub async fn close(&self) {
        self.ingest.close().await;
        self.db.close().await;
    }

    /// Tokens and the audit log.
    pub fn operators(&self) -> Operators {
        Operators::new(self.db.clone())
    }

    /// The devices, with their keys in memory.
    pub fn devices(&self) -> Devices {
        self.devices.clone()
    }

    /// The config shadows.
    pub fn configs(&self) -> Configs {
        Configs::new(self.db.clone())
    }

    /// The commands.
    pub fn commands(&self) -> Commands {
        Commands::new(self.db.clone())
    }

    /// Stored firmware images (one handle, sharing its image cache).
    pub fn firmwares(&self) -> Firmwares {
        self.firmwares.clone()
    }

    /// Firmware rollouts.
    pub fn rollouts(&self) -> Rollouts {
        Rollouts::new(self.db.clone())
    }

    /// Stored telemetry.
    pub fn telemetry(&self) -> Telemetry {
        Telemetry::new(self.db.clone())
    }

    /// The device protocol's transactions.
    pub fn protocol(&self) -> Protocol {
        Protocol::new(
            self.db.clone(),
            self.devices.clone(),
            self.ingest.clone(),
            self.deliveries.clone(),
        )
    }

    /// Security events.
    pub fn security_events(&self) -> SecurityEvents {
        SecurityEvents::new(self.db.clone())
    }
}
