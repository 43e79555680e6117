//! Security events: refusals of traffic that did not authenticate, or of
//! authentic messages the protocol refuses (replays, a disabled device),
//! tallied in memory per source, kind, device and minute ([`Refusals`],
//! which also throttles a source that refuses too often) and written as one
//! row per tally with its count.

pub mod refusals;

use serde::Serialize;
use serde_json::json;
use sqlx::Row;

pub use refusals::Refusals;

use crate::db::{Db, StoreResult};

/// A security event: refusals of one kind from one source address (about
/// one device, when known) within one minute, counted.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SecurityEvent {
    /// Numeric id.
    pub id: i64,
    /// The first of them.
    pub at_ms: i64,
    /// The last of them.
    pub last_ms: i64,
    /// How many.
    pub count: i64,
    /// The peer's address, when known.
    pub source: Option<String>,
    /// The device concerned, when known.
    pub device: Option<String>,
    /// What (`unknown_device`, `bad_tag`, `replay`, `operator_auth_failed`, ...).
    pub kind: String,
    /// Details of the first (never key material).
    pub detail: serde_json::Value,
}

/// A security event as [`Refusals`] writes it: a new row
/// (`id` none) or a new count and last time for a row written before.
#[derive(Debug, Clone, PartialEq)]
pub struct SecurityEventRow {
    /// The row, once written.
    pub id: Option<i64>,
    /// The first refusal.
    pub at_ms: i64,
    /// The last refusal.
    pub last_ms: i64,
    /// The peer's address.
    pub source: Option<String>,
    /// The device concerned.
    pub device: Option<String>,
    /// The kind.
    pub kind: String,
    /// Details of the first.
    pub detail: serde_json::Value,
    /// How many so far.
    pub count: i64,
}

/// The stored security events.
#[derive(Clone)]
pub struct SecurityEvents {
    db: Db,
}

impl SecurityEvents {
    /// Over `db`.
    pub fn new(db: Db) -> Self {
        SecurityEvents { db }
    }

    /// Writes tallied events in one transaction: inserts the rows without
    /// an id, updates the count and last time of the others; returns every
    /// row's id, in order.
    pub async fn save(&self, rows: &[SecurityEventRow]) -> StoreResult<Vec<i64>> {
        let mut tx = self.db.write().await?;
        let mut ids = Vec::with_capacity(rows.len());
        for r in rows {
            let id = match r.id {
                Some(id) => {
                    sqlx::query("UPDATE security_events SET count = $1, last_ms = $2 WHERE id = $3")
                        .bind(r.count)
                        .bind(r.last_ms)
                        .bind(id)
                        .execute(&mut *tx)
                        .await?;
                    id
                }
                None => sqlx::query(
                    "INSERT INTO security_events (at_ms, last_ms, count, source, device, kind, detail) \
                     VALUES ($1, $2, $3, $4, $5, $6, $7) RETURNING id",
                )
                .bind(r.at_ms)
                .bind(r.last_ms)
                .bind(r.count)
                .bind(r.source.as_deref())
                .bind(r.device.as_deref())
                .bind(r.kind.as_str())
                .bind(r.detail.to_string())
                .fetch_one(&mut *tx)
                .await?
                .try_get("id")?,
            };
            ids.push(id);
        }
        tx.commit().await?;
        Ok(ids)
    }

    /// Deletes the events whose last refusal is older than `before_ms`;
    /// returns how many.
    pub async fn purge(&self, before_ms: i64) -> StoreResult<u64> {
        let done = sqlx::query("DELETE FROM security_events WHERE last_ms < $1")
            .bind(before_ms)
            .execute(self.db.writer())
            .await?;
        Ok(done.rows_affected())
    }

    /// Events older than `before_id` (all when none), newest first, at most
    /// `limit` (1..=1000).
    pub async fn list(
        &self,
        before_id: Option<i64>,
        limit: i64,
    ) -> StoreResult<Vec<SecurityEvent>> {
        let rows =
            sqlx::query("SELECT * FROM security_events WHERE id < $1 ORDER BY id DESC LIMIT $2")
                .bind(before_id.unwrap_or(i64::MAX))
                .bind(limit.clamp(1, 1000))
                .fetch_all(self.db.reader())
                .await?;
        rows.iter()
            .map(|r| {
                let detail: String = r.try_get("detail")?;
                Ok(SecurityEvent {
                    id: r.try_get("id")?,
                    at_ms: r.try_get("at_ms")?,
                    last_ms: r.try_get("last_ms")?,
                    count: r.try_get("count")?,
                    source: r.try_get("source")?,
                    device: r.try_get("device")?,
                    kind: r.try_get("kind")?,
                    detail: serde_json::from_str(&detail).unwrap_or(json!(detail)),
                })
            })
            .collect()
    }
}
