//! The device protocol's transactions on [`SqlStore`]: the replay window is
//! checked and advanced in the same transaction that applies the message.

use serde_json::json;
use sqlx::Row;
use sqlx::any::AnyRow;

use super::sql::{SqlStore, Tx};
use super::*;
use crate::devices::keys::{slot_of, window, window_columns};

impl SqlStore {
    async fn device_row(&self, tx: &mut Tx, device_id: i64) -> StoreResult<AnyRow> {
        let lock = self.db().for_update();
        let row = sqlx::query(&format!("SELECT * FROM devices WHERE id = $1{lock}"))
            .bind(device_id)
            .fetch_optional(&mut **tx)
            .await?;
        row.ok_or_else(|| StoreError::NotFound(format!("device {device_id}")))
    }

    /// Locks the device's row, checks that the key that sealed the message is
    /// still one of the device's, checks and advances that key's replay
    /// window, and records that the device was seen. Returns
    /// the device's name and the firmware it last reported. The caller applies
    /// the message's effect in the same transaction. (Telemetry uploads are
    /// checked the same way, in groups, by `ingest.rs`.)
    async fn admit_in(
        &self,
        tx: &mut Tx,
        device_id: i64,
        key_version: i64,
        counter: u64,
        now: i64,
    ) -> StoreResult<Result<(String, Option<String>), SyncRefusal>> {
        let row = self.device_row(tx, device_id).await?;
        let current = row.try_get("key_version")?;
        let Some(key_slot) = slot_of(key_version, current, row.try_get("previous_key_version")?)
        else {
            return Ok(Err(SyncRefusal::StaleKey));
        };
        let mut w = window(&row, key_slot)?;
        if let Err(e) = w.accept(counter) {
            return Ok(Err(SyncRefusal::Replay(e)));
        }
        if row.try_get::<i64, _>("enabled")? == 0 {
            return Ok(Err(SyncRefusal::Disabled));
        }
        let (h, b) = window_columns(key_slot);
        sqlx::query(&format!(
            "UPDATE devices SET {h} = $1, {b} = $2, last_seen_ms = $3 WHERE id = $4"
        ))
        .bind(w.highest as i64)
        .bind(w.bitmap as i64)
        .bind(now)
        .bind(device_id)
        .execute(&mut **tx)
        .await?;
        Ok(Ok((row.try_get("name")?, row.try_get("firmware")?)))
    }

    /// Config and commands for the device, and the next down counter.
    async fn delivery_in(
        &self,
        tx: &mut Tx,
        device_id: i64,
        name: String,
        applied_version: Option<i64>,
        redeliver_after_ms: i64,
        now: i64,
    ) -> StoreResult<SyncDelivery> {
        let config = crate::config::to_send_in(tx, device_id, applied_version).await?;
        let commands = crate::commands::store::deliver_in(
            self.db(),
            tx,
            device_id,
            redeliver_after_ms,
            32,
            now,
        )
        .await?;
        let row = sqlx::query("UPDATE devices SET down_counter = down_counter + 1 WHERE id = $1 RETURNING down_counter")
            .bind(device_id)
            .fetch_one(&mut **tx)
            .await?;
        let down_counter = row.try_get::<i64, _>("down_counter")? as u64;
        let update =
            crate::firmware::rollouts::store::offer_in(self.db(), tx, device_id, now).await?;
        Ok(SyncDelivery { device: name, down_counter, config, commands, update })
    }

    pub(super) async fn device_sync_impl(
        &self,
        device_id: i64,
        report: &SyncReport,
        deliver: bool,
        redeliver_after_ms: i64,
        now: i64,
    ) -> StoreResult<Result<SyncDelivery, SyncRefusal>> {
        if deliver
            && let Some(quiet) = self.quiet_sync(device_id, report, redeliver_after_ms, now).await?
        {
            return Ok(self.reread_stale(device_id, quiet).await);
        }
        let mut tx = self.db().write().await?;
        let admitted =
            self.admit_in(&mut tx, device_id, report.key_version, report.counter, now).await?;
        let (name, firmware_before) = match admitted {
            Ok(a) => a,
            Err(refusal) => return Ok(self.reread_stale(device_id, Err(refusal)).await),
        };
        if report.firmware.is_some() && report.firmware != firmware_before {
            sqlx::query("UPDATE devices SET firmware = $1 WHERE id = $2")
                .bind(report.firmware.as_deref())
                .bind(device_id)
                .execute(&mut *tx)
                .await?;
        }

        for (id, outcome) in &report.results {
            match crate::commands::store::record_result_in(
                self.db(),
                &mut tx,
                &name,
                *id,
                outcome,
                now,
            )
            .await
            {
                Ok(_) => {}
                // A result for a command this device does not have: nothing to record.
                Err(StoreError::NotFound(_)) => {
                    tracing::warn!(device = %name, command = id, "result for an unknown command")
                }
                Err(e) => return Err(e),
            }
        }
        if let Some((version, applied)) = &report.applied {
            crate::config::report_in(&mut tx, device_id, *version, applied, &report.rejected, now)
                .await?;
        }
        if let Some(ota) = &report.ota {
            crate::firmware::rollouts::store::ota_report_in(
                self.db(),
                &mut tx,
                device_id,
                ota,
                now,
            )
            .await?;
        }
        let applied_version = report.applied.as_ref().map(|(v, _)| *v);
        let delivery = if deliver {
            self.delivery_in(&mut tx, device_id, name, applied_version, redeliver_after_ms, now)
                .await?
        } else {
            SyncDelivery {
                device: name,
                down_counter: 0,
                config: None,
                commands: vec![],
                update: None,
            }
        };
        tx.commit().await?;
        Ok(Ok(delivery))
    }

    /// Most syncs are quiet long polls: the device reports what it reported
    /// last time and there is nothing to deliver. Those are found with one
    /// read (not on the writer) and admitted through the ingest task, whose
    /// group commit writes their window, down counter and last-seen time with
    /// the uploads'. Anything else (`None`) takes the full transaction. A
    /// command or config queued after the read wakes the long poll, which
    /// then delivers it in its own transaction, as it would have anyway.
    async fn quiet_sync(
        &self,
        device_id: i64,
        report: &SyncReport,
        redeliver_after_ms: i64,
        now: i64,
    ) -> StoreResult<Option<Result<SyncDelivery, SyncRefusal>>> {
        if !report.results.is_empty() || report.ota.is_some() {
            return Ok(None);
        }
        let row = sqlx::query(&format!(
            "SELECT d.name, d.firmware, c.desired_version, c.reported_version, c.reported, c.rejected, \
             (SELECT COUNT(*) FROM commands WHERE device_id = d.id AND {deliverable}) AS commands, \
             {offers} AS offers \
             FROM devices d JOIN device_configs c ON c.device_id = d.id WHERE d.id = $1",
            deliverable = crate::commands::store::deliverable_sql("$2", "$3"),
            offers = crate::firmware::rollouts::store::offer_waiting_sql("d.id"),
        ))
        .bind(device_id)
        .bind(now)
        .bind(now - redeliver_after_ms)
        .fetch_optional(self.db().reader())
        .await?;
        let Some(row) = row else { return Ok(None) };
        let firmware: Option<String> = row.try_get("firmware")?;
        let reported_version: Option<i64> = row.try_get("reported_version")?;
        let desired_version: i64 = row.try_get("desired_version")?;
        let same_report = match &report.applied {
            None => true,
            Some((version, applied)) => {
                let reported: Option<String> = row.try_get("reported")?;
                let rejected: Option<String> = row.try_get("rejected")?;
                Some(*version) == reported_version
                    && reported.as_deref()
                        == Some(serde_json::to_string(applied).expect("config serialises").as_str())
                    && rejected.as_deref()
                        == Some(
                            serde_json::to_string(&report.rejected)
                                .expect("rejections serialise")
                                .as_str(),
                        )
            }
        };
        let quiet = same_report
            && (report.firmware.is_none() || report.firmware == firmware)
            && report.applied.as_ref().map(|(v, _)| *v).or(reported_version)
                == Some(desired_version)
            && row.try_get::<i64, _>("commands")? == 0
            && row.try_get::<i64, _>("offers")? == 0;
        if !quiet {
            return Ok(None);
        }
        let name: String = row.try_get("name")?;
        let admitted =
            self.ingest_job(device_id, report.key_version, report.counter, None, 0, now).await?;
        Ok(Some(admitted.map(|accepted| SyncDelivery {
            device: name,
            down_counter: accepted.down_counter,
            config: None,
            commands: vec![],
            update: None,
        })))
    }

    /// Queues one job for the ingest task and waits for its group's commit.
    async fn ingest_job(
        &self,
        device_id: i64,
        key_version: i64,
        counter: u64,
        batch: Option<StoredBatch>,
        dropped_total: i64,
        now: i64,
    ) -> StoreResult<Result<Accepted, SyncRefusal>> {
        let (reply, answer) = tokio::sync::oneshot::channel();
        let job = super::ingest::Job {
            device_id,
            key_version,
            counter,
            batch,
            dropped_total,
            now,
            reply,
        };
        let gone = || StoreError::Db(sqlx::Error::Protocol("ingest task stopped".into()));
        self.ingest().send(job).await.map_err(|_| gone())?;
        answer.await.map_err(|_| gone())?
    }

    pub(super) async fn device_deliver_impl(
        &self,
        device_id: i64,
        redeliver_after_ms: i64,
        now: i64,
    ) -> StoreResult<SyncDelivery> {
        let mut tx = self.db().write().await?;
        let row = self.device_row(&mut tx, device_id).await?;
        let name: String = row.try_get("name")?;
        let delivery =
            self.delivery_in(&mut tx, device_id, name, None, redeliver_after_ms, now).await?;
        tx.commit().await?;
        Ok(delivery)
    }

    pub(super) async fn device_telemetry_impl(
        &self,
        device_id: i64,
        key_version: i64,
        counter: u64,
        b: &StoredBatch,
        dropped_total: i64,
        now: i64,
    ) -> StoreResult<Result<Accepted, SyncRefusal>> {
        // Written in groups by the ingest task (`ingest.rs`), answered after commit.
        let answer = self
            .ingest_job(device_id, key_version, counter, Some(b.clone()), dropped_total, now)
            .await?;
        Ok(self.reread_stale(device_id, answer).await)
    }

    /// Passes `answer` on, reading the device's keys again if it says the
    /// copy in memory was stale (rotated by another server process).
    async fn reread_stale<T>(
        &self,
        device_id: i64,
        answer: Result<T, SyncRefusal>,
    ) -> Result<T, SyncRefusal> {
        if matches!(answer, Err(SyncRefusal::StaleKey))
            && let Err(e) = self.keys().read(self.db(), device_id).await
        {
            tracing::warn!(device_id, error = %e, "cannot read a device's keys again");
        }
        answer
    }

    fn batch_from(row: &AnyRow) -> StoreResult<StoredBatch> {
        Ok(StoredBatch {
            first_seq: row.try_get("first_seq")?,
            last_seq: row.try_get("last_seq")?,
            count: row.try_get("sample_count")?,
            first_ms: row.try_get("first_ms")?,
            last_ms: row.try_get("last_ms")?,
            registers: row.try_get("registers")?,
            codec: row.try_get("codec")?,
            data: row.try_get("data")?,
        })
    }

    pub(super) async fn telemetry_impl(
        &self,
        device: &str,
        from_ms: i64,
        to_ms: i64,
    ) -> StoreResult<Vec<StoredBatch>> {
        let rows = sqlx::query(
            "SELECT b.* FROM telemetry_batches b JOIN devices d ON d.id = b.device_id \
             WHERE d.name = $1 AND b.last_ms >= $2 AND b.first_ms <= $3 ORDER BY b.first_seq, b.last_seq",
        )
        .bind(device)
        .bind(from_ms)
        .bind(to_ms)
        .fetch_all(self.db().reader())
        .await?;
        rows.iter().map(Self::batch_from).collect()
    }

    pub(super) async fn telemetry_latest_impl(
        &self,
        device: &str,
    ) -> StoreResult<Option<StoredBatch>> {
        let row = sqlx::query(
            "SELECT b.* FROM telemetry_batches b JOIN devices d ON d.id = b.device_id \
             WHERE d.name = $1 ORDER BY b.last_seq DESC LIMIT 1",
        )
        .bind(device)
        .fetch_optional(self.db().reader())
        .await?;
        row.as_ref().map(Self::batch_from).transpose()
    }

    pub(super) async fn dropped_total_impl(&self, device: &str) -> StoreResult<i64> {
        let row = sqlx::query("SELECT dropped_total FROM devices WHERE name = $1")
            .bind(device)
            .fetch_optional(self.db().reader())
            .await?;
        Ok(row
            .ok_or_else(|| StoreError::NotFound(format!("device {device:?}")))?
            .try_get("dropped_total")?)
    }

    pub(super) async fn save_security_events_impl(
        &self,
        rows: &[SecurityEventRow],
    ) -> StoreResult<Vec<i64>> {
        let mut tx = self.db().write().await?;
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

    pub(super) async fn purge_impl(&self, before_ms: i64) -> StoreResult<u64> {
        let done = sqlx::query("DELETE FROM security_events WHERE last_ms < $1")
            .bind(before_ms)
            .execute(self.db().writer())
            .await?;
        Ok(done.rows_affected())
    }

    pub(super) async fn security_events_impl(
        &self,
        before_id: Option<i64>,
        limit: i64,
    ) -> StoreResult<Vec<SecurityEvent>> {
        let rows =
            sqlx::query("SELECT * FROM security_events WHERE id < $1 ORDER BY id DESC LIMIT $2")
                .bind(before_id.unwrap_or(i64::MAX))
                .bind(limit.clamp(1, 1000))
                .fetch_all(self.db().reader())
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
