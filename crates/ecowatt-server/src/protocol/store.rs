//! The device protocol's transactions: a message is admitted (key, replay
//! window, enabled) in the transaction that applies it, so that a replay
//! changes nothing. Quiet syncs and uploads go through the telemetry
//! ingest's group commit, checked exactly as alone.

use sqlx::Row;

use super::deliveries::Deliveries;
use super::{
    Accepted, Quietness, Stored, SyncDelivery, SyncRefusal, SyncReport, Upload, quietness,
};
use crate::commands::Commands;
use crate::db::{Db, StoreError, StoreResult, WriteTx};
use crate::devices::admission::admit_in;
use crate::devices::{DeviceId, Devices};
use crate::firmware::rollouts::store::{offer_waiting_sql, ota_report_in};
use crate::telemetry::Ingest;
use crate::telemetry::ingest::Record;

/// The device protocol's side of the store.
#[derive(Clone)]
pub struct Protocol {
    db: Db,
    devices: Devices,
    ingest: Ingest,
    deliveries: Deliveries,
}

impl Protocol {
    /// Over `db`, with the devices' keys, the telemetry ingest and the
    /// delivery task.
    pub fn new(db: Db, devices: Devices, ingest: Ingest, deliveries: Deliveries) -> Self {
        Protocol { db, devices, ingest, deliveries }
    }

    /// Applies an authentic sync once (firmware, command results, the
    /// config it runs, its OTA progress) and, when `deliver`, prepares the
    /// answer (config, commands not handed out within `redeliver_after_ms`,
    /// an update offer, the down counter).
    pub async fn sync(
        &self,
        device_id: DeviceId,
        report: &SyncReport,
        deliver: bool,
        redeliver_after_ms: i64,
        now: i64,
    ) -> StoreResult<Result<SyncDelivery, SyncRefusal>> {
        if deliver
            && let Some(quiet) = self.quiet(device_id, report, redeliver_after_ms, now).await?
        {
            return Ok(self.reread_stale(device_id, quiet).await);
        }
        let mut tx = self.db.write().await?;
        let admitted =
            match admit_in(&mut tx, device_id, report.key_version, report.counter, now).await? {
                Ok(a) => a,
                Err(refusal) => return Ok(self.reread_stale(device_id, Err(refusal)).await),
            };
        let name = admitted.name;
        if report.firmware.is_some() && report.firmware != admitted.firmware {
            sqlx::query("UPDATE devices SET firmware = $1 WHERE id = $2")
                .bind(report.firmware.as_deref())
                .bind(device_id)
                .execute(&mut *tx)
                .await?;
        }
        for (id, outcome) in &report.results {
            match crate::commands::store::record_result_in(
                &self.db, &mut tx, &name, *id, outcome, now,
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
            ota_report_in(&self.db, &mut tx, device_id, ota, now).await?;
        }
        if let Some(control) = &report.control {
            crate::control::store::report_in(
                &mut tx,
                device_id,
                control,
                report.schedule.as_ref(),
                now,
            )
            .await?;
        }
        let delivery = if deliver {
            let applied = report.applied.as_ref().map(|(v, _)| *v);
            self.delivery_in(&mut tx, device_id, applied, redeliver_after_ms, now).await?
        } else {
            SyncDelivery::empty(name, 0)
        };
        tx.commit().await?;
        Ok(Ok(delivery))
    }

    /// The answer to a long poll woken by news: what there is to deliver
    /// now, delivered with the other long polls woken with it
    /// ([`super::deliveries`]).
    pub async fn deliver(
        &self,
        device_id: DeviceId,
        redeliver_after_ms: i64,
        now: i64,
    ) -> StoreResult<SyncDelivery> {
        self.deliveries.deliver(device_id, redeliver_after_ms, now).await
    }

    /// Stores an upload (written in groups by the ingest task, answered after
    /// commit; a retry of stored samples stores nothing new). A reading of
    /// the export limit in it confirms the writes it shows took effect (asked
    /// only when the device has writes waiting for that).
    pub async fn upload(
        &self,
        device_id: DeviceId,
        key_version: i64,
        counter: u64,
        upload: &Upload,
        now: i64,
    ) -> StoreResult<Result<Accepted, SyncRefusal>> {
        let answer = self
            .ingest
            .submit(
                device_id,
                key_version,
                counter,
                Some((upload.batch.clone(), upload.decoded.clone())),
                upload.dropped_total,
                now,
            )
            .await?;
        let answer = self.reread_stale(device_id, answer).await;
        if let (Ok(accepted), Some((value, at_ms))) = (&answer, upload.export_limit)
            && accepted.unconfirmed
        {
            let register = ecowatt_proto::registers::EXPORT_LIMIT;
            if let Err(e) =
                Commands::new(self.db.clone()).confirm(device_id, register, value, at_ms).await
            {
                tracing::warn!(device_id = device_id.0, error = %e, "confirming writes by a reading failed");
            }
        }
        Ok(answer)
    }

    /// Config and commands for the device, an update offer, and the next
    /// down counter: the grouped delivery's statements for one device.
    async fn delivery_in(
        &self,
        tx: &mut WriteTx,
        device_id: DeviceId,
        applied_version: Option<i64>,
        redeliver_after_ms: i64,
        now: i64,
    ) -> StoreResult<SyncDelivery> {
        let mut answers = super::deliveries::answers_in(
            &self.db,
            tx,
            &[device_id.0],
            applied_version,
            redeliver_after_ms,
            now,
        )
        .await?;
        answers
            .remove(&device_id.0)
            .ok_or_else(|| StoreError::NotFound(format!("device {device_id}")))
    }

    /// Most syncs are quiet long polls, or light ones that only bring
    /// command results and a changed control state ([`quietness`]): those
    /// are found with one read (not on the writer) and admitted through the
    /// ingest task, whose group commit writes their window, down counter and
    /// last-seen time (and a light sync's results and control state) with
    /// the uploads'. Anything else (`None`) takes the full transaction. A
    /// command or config queued after the read wakes the long poll, which
    /// then delivers it in a delivery group, as it would have anyway.
    async fn quiet(
        &self,
        device_id: DeviceId,
        report: &SyncReport,
        redeliver_after_ms: i64,
        now: i64,
    ) -> StoreResult<Option<Result<SyncDelivery, SyncRefusal>>> {
        if report.ota.is_some() {
            return Ok(None); // busy, whatever is stored
        }
        // The commands it brings results for are not waiting for it.
        let reported: Vec<i64> = report.results.iter().map(|(id, _)| *id).collect();
        let others = if reported.is_empty() {
            String::new()
        } else {
            format!(" AND id NOT IN ({})", crate::commands::store::id_list(&reported))
        };
        let row = sqlx::query(&format!(
            "SELECT d.name, d.firmware, d.control_reported, d.failsafe, d.schedule_version, c.desired_version, c.reported_version, c.reported, c.rejected, \
             (SELECT COUNT(*) FROM commands WHERE device_id = d.id AND {deliverable}{others}) AS commands, \
             {offers} AS offers \
             FROM devices d JOIN device_configs c ON c.device_id = d.id WHERE d.id = $1",
            deliverable = crate::commands::store::deliverable_sql("$2", "$3"),
            offers = offer_waiting_sql("d.id"),
        ))
        .bind(device_id)
        .bind(now)
        .bind(now - redeliver_after_ms)
        .fetch_optional(self.db.reader())
        .await?;
        let Some(row) = row else { return Ok(None) };
        let stored = Stored {
            firmware: row.try_get("firmware")?,
            reported_version: row.try_get("reported_version")?,
            reported: row.try_get("reported")?,
            rejected: row.try_get("rejected")?,
            desired_version: row.try_get("desired_version")?,
            commands: row.try_get("commands")?,
            offers: row.try_get("offers")?,
            control_reported: row.try_get("control_reported")?,
            failsafe: row.try_get("failsafe")?,
            schedule_version: row.try_get("schedule_version")?,
        };
        let name: String = row.try_get("name")?;
        let admitted = match quietness(report, &stored, now) {
            Quietness::Busy => return Ok(None),
            Quietness::Quiet => {
                self.ingest
                    .submit(device_id, report.key_version, report.counter, None, 0, now)
                    .await?
            }
            Quietness::Light(control_reported) => {
                let record = Record { results: report.results.clone(), control_reported };
                self.ingest
                    .submit_record(device_id, report.key_version, report.counter, record, now)
                    .await?
            }
        };
        Ok(Some(admitted.map(|a| SyncDelivery::empty(name, a.down_counter))))
    }

    /// Passes `answer` on, reading the device's keys again if it says the
    /// copy in memory was stale (rotated by another server process).
    async fn reread_stale<T>(
        &self,
        device_id: DeviceId,
        answer: Result<T, SyncRefusal>,
    ) -> Result<T, SyncRefusal> {
        if matches!(answer, Err(SyncRefusal::StaleKey))
            && let Err(e) = self.devices.keys().read(&self.db, device_id).await
        {
            tracing::warn!(device_id = device_id.0, error = %e, "cannot read a device's keys again");
        }
        answer
    }
}
