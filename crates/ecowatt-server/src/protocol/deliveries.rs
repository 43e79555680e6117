//! Deliveries to woken long polls, in groups. A curtailment wakes every
//! long poll of its group at once; delivered one transaction each, a wake
//! storm of 10,000 cost about seven statement round trips per device on the
//! one writer (`docs/performance.md`). Woken long polls queue here instead,
//! and one task delivers what is queued in one transaction per group of up
//! to [`GROUP_MAX`] devices, with set-based statements (the configs to
//! send, the commands to hand out, offers waiting, the down counters): a
//! handful of statements per group, each device's answer then built in
//! memory exactly as alone ([`Protocol::deliver`](super::Protocol)).

use std::collections::HashMap;

use tokio::sync::{mpsc, oneshot};

use super::{COMMANDS_PER_ANSWER, SyncDelivery};
use crate::db::{Db, Dialect, StoreError, StoreResult, WriteTx};
use crate::devices::DeviceId;

/// Most long polls delivered in one transaction.
pub const GROUP_MAX: usize = 256;

struct Job {
    device_id: DeviceId,
    redeliver_after_ms: i64,
    now: i64,
    reply: oneshot::Sender<StoreResult<SyncDelivery>>,
}

/// The delivery task's queue.
#[derive(Clone)]
pub struct Deliveries {
    queue: mpsc::Sender<Job>,
}

impl Deliveries {
    /// Starts the delivery task on `db`.
    pub fn start(db: Db) -> Self {
        let (queue, rx) = mpsc::channel(4 * GROUP_MAX);
        tokio::spawn(run(db, rx));
        Deliveries { queue }
    }

    /// What there is to deliver to `device_id` now, delivered in a group.
    pub async fn deliver(
        &self,
        device_id: DeviceId,
        redeliver_after_ms: i64,
        now: i64,
    ) -> StoreResult<SyncDelivery> {
        let (reply, answer) = oneshot::channel();
        let gone = || StoreError::Db(sqlx::Error::Protocol("delivery task stopped".into()));
        let job = Job { device_id, redeliver_after_ms, now, reply };
        self.queue.send(job).await.map_err(|_| gone())?;
        answer.await.map_err(|_| gone())?
    }
}

async fn run(db: Db, mut rx: mpsc::Receiver<Job>) {
    let mut queued = Vec::with_capacity(GROUP_MAX);
    while rx.recv_many(&mut queued, GROUP_MAX).await > 0 {
        // One group per redelivery rule and device: a device twice in the
        // queue (two long polls) is delivered again in the next group.
        while !queued.is_empty() {
            let first = queued[0].redeliver_after_ms;
            let mut group: Vec<Job> = Vec::with_capacity(queued.len());
            let mut rest = Vec::new();
            for job in queued.drain(..) {
                if job.redeliver_after_ms == first
                    && !group.iter().any(|g| g.device_id == job.device_id)
                {
                    group.push(job);
                } else {
                    rest.push(job);
                }
            }
            queued = rest;
            deliver_group(&db, group).await;
        }
    }
}

async fn deliver_group(db: &Db, group: Vec<Job>) {
    let ids: Vec<i64> = group.iter().map(|j| j.device_id.0).collect();
    let now = group.iter().map(|j| j.now).max().unwrap_or_else(crate::now_ms);
    let started = std::time::Instant::now();
    let result = Box::pin(deliver_many(db, &ids, group[0].redeliver_after_ms, now)).await;
    tracing::debug!(
        jobs = group.len(),
        us = started.elapsed().as_micros() as u64,
        "delivery group"
    );
    match result {
        Ok(mut answers) => {
            for job in group {
                let answer = answers
                    .remove(&job.device_id.0)
                    .ok_or_else(|| StoreError::NotFound(format!("device {}", job.device_id)));
                let _ = job.reply.send(answer);
            }
        }
        Err(e) => {
            tracing::error!(error = %e, jobs = group.len(), "delivery group failed");
            let msg = e.to_string();
            for job in group {
                let _ = job.reply.send(Err(StoreError::Db(sqlx::Error::Protocol(msg.clone()))));
            }
        }
    }
}

/// The answers to the long polls of `devices` (each once), in one
/// transaction; a device that is gone has no answer.
pub async fn deliver_many(
    db: &Db,
    devices: &[i64],
    redeliver_after_ms: i64,
    now: i64,
) -> StoreResult<HashMap<i64, SyncDelivery>> {
    let mut tx = db.write().await?;
    if db.dialect() == Dialect::Postgres {
        // Locked in id order, as the ingest's groups lock them: no deadlock.
        let list = crate::commands::store::id_list(devices);
        sqlx::query(&format!("SELECT id FROM devices WHERE id IN ({list}) ORDER BY id FOR UPDATE"))
            .persistent(false)
            .fetch_all(&mut *tx)
            .await?;
    }
    let out = answers_in(db, &mut tx, devices, None, redeliver_after_ms, now).await?;
    tx.commit().await?;
    Ok(out)
}

/// The answers to `devices` in `tx` (the config each does not run, or
/// `running` for a single sync's device; commands handed out; offers;
/// the next down counter; control and schedule parts), set-based: the same
/// statements for one device or 256.
pub async fn answers_in(
    db: &Db,
    tx: &mut WriteTx,
    devices: &[i64],
    running: Option<i64>,
    redeliver_after_ms: i64,
    now: i64,
) -> StoreResult<HashMap<i64, SyncDelivery>> {
    let list = crate::commands::store::id_list(devices);
    let mut configs = crate::config::to_send_many_in(tx, devices, running).await?;
    let mut commands = crate::commands::store::deliver_many_in(
        db,
        tx,
        devices,
        redeliver_after_ms,
        COMMANDS_PER_ANSWER as usize,
        now,
    )
    .await?;
    let offers = crate::firmware::rollouts::store::offers_waiting_in(tx, devices).await?;
    let rows = sqlx::query(&format!(
        "UPDATE devices SET down_counter = down_counter + 1 WHERE id IN ({list}) \
         RETURNING id, name, down_counter, failsafe, control_reported, schedule_version"
    ))
    .persistent(false)
    .fetch_all(&mut **tx)
    .await?;
    let mut out = HashMap::with_capacity(rows.len());
    for row in rows {
        use sqlx::Row;
        let id: i64 = row.try_get("id")?;
        let name: String = row.try_get("name")?;
        let mut cmds = commands.remove(&id).unwrap_or_default();
        let update = if offers.contains(&id) {
            crate::firmware::rollouts::store::offer_in(db, tx, DeviceId(id), now).await?
        } else {
            None
        };
        let (control, schedule) =
            crate::control::store::answer_in(db, tx, DeviceId(id), &name, &row, &mut cmds, now)
                .await?;
        let delivery = SyncDelivery {
            device: name,
            down_counter: row.try_get::<i64, _>("down_counter")? as u64,
            config: configs.remove(&id),
            commands: cmds,
            update,
            control,
            schedule,
        };
        out.insert(id, delivery);
    }
    Ok(out)
}
