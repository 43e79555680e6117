//! The audit log: who changed what, when; written in the transaction of the
//! change it records, kept `audit_retention_days`.

use serde::Serialize;
use sqlx::Row;

use crate::db::{Db, StoreResult, WriteTx, json_col};

/// One audit-log entry.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct AuditEntry {
    /// Numeric id, increasing.
    pub id: i64,
    /// When.
    pub at_ms: i64,
    /// Who (an operator token's name, `legacy-api`, `local:<user>`, or `system`).
    pub actor: String,
    /// What (`device.add`, `command.queue`, ...).
    pub action: String,
    /// On what (a device name, a command id, a token id).
    pub target: String,
    /// Details.
    pub detail: serde_json::Value,
}

/// Records a change in the transaction that makes it.
pub async fn record(
    tx: &mut WriteTx,
    now: i64,
    actor: &str,
    action: &str,
    target: &str,
    detail: serde_json::Value,
) -> StoreResult<()> {
    sqlx::query(
        "INSERT INTO audit_log (at_ms, actor, action, target, detail) VALUES ($1, $2, $3, $4, $5)",
    )
    .bind(now)
    .bind(actor)
    .bind(action)
    .bind(target)
    .bind(detail.to_string())
    .execute(&mut **tx)
    .await?;
    Ok(())
}

/// Entries newest first, below `before_id`.
pub async fn list(db: &Db, before_id: Option<i64>, limit: i64) -> StoreResult<Vec<AuditEntry>> {
    let rows = sqlx::query("SELECT * FROM audit_log WHERE id < $1 ORDER BY id DESC LIMIT $2")
        .bind(before_id.unwrap_or(i64::MAX))
        .bind(limit.clamp(1, 1000))
        .fetch_all(db.reader())
        .await?;
    rows.iter()
        .map(|r| {
            Ok(AuditEntry {
                id: r.try_get("id")?,
                at_ms: r.try_get("at_ms")?,
                actor: r.try_get("actor")?,
                action: r.try_get("action")?,
                target: r.try_get("target")?,
                detail: json_col(r, "detail")?,
            })
        })
        .collect()
}

/// Deletes the entries older than `before_ms`; returns how many.
pub async fn purge(db: &Db, before_ms: i64) -> StoreResult<u64> {
    let done = sqlx::query("DELETE FROM audit_log WHERE at_ms < $1")
        .bind(before_ms)
        .execute(db.writer())
        .await?;
    Ok(done.rows_affected())
}
