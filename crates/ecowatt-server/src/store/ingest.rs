//! Telemetry ingest on SQLite with group commit.
//!
//! Each statement through sqlx's SQLite driver is a round trip to the
//! connection's worker thread, and a profile of the fleet benchmark showed the
//! server spending most of its time switching threads, not in SQLite. So
//! uploads queue here and one task writes them in groups: one transaction per
//! group, one `SELECT` for the devices' replay windows, the checks in memory,
//! and one multi-statement write (the devices' new windows and counters, the
//! batches) — four round trips for up to [`GROUP_MAX`] uploads instead of five
//! for each. Every upload is still checked against its device's window in
//! order, answered only after its group is committed, and a refused upload
//! changes nothing. PostgreSQL keeps one transaction per upload.

use std::collections::HashMap;
use std::fmt::Write as _;

use ecowatt_proto::replay::ReplayWindow;
use sqlx::AnyPool;
use sqlx::Row;
use tokio::sync::{mpsc, oneshot};

use super::{KeySlot, StoreError, StoreResult, StoredBatch, SyncRefusal};

/// Most uploads written in one transaction.
pub const GROUP_MAX: usize = 256;

/// One upload waiting to be written.
pub struct Job {
    pub device_id: i64,
    pub key_slot: KeySlot,
    pub counter: u64,
    pub batch: StoredBatch,
    pub dropped_total: i64,
    pub now: i64,
    pub reply: oneshot::Sender<StoreResult<Result<u64, SyncRefusal>>>,
}

/// Starts the ingest task on `writer` (the one-connection write pool).
pub fn start(writer: AnyPool) -> mpsc::Sender<Job> {
    let (tx, rx) = mpsc::channel(4 * GROUP_MAX);
    tokio::spawn(run(writer, rx));
    tx
}

async fn run(writer: AnyPool, mut rx: mpsc::Receiver<Job>) {
    let mut group = Vec::with_capacity(GROUP_MAX);
    while rx.recv_many(&mut group, GROUP_MAX).await > 0 {
        match write_group(&writer, &group).await {
            Ok(answers) => {
                for (job, answer) in group.drain(..).zip(answers) {
                    let _ = job.reply.send(Ok(answer));
                }
            }
            Err(e) => {
                tracing::error!(error = %e, uploads = group.len(), "telemetry group not written");
                let msg = e.to_string();
                for job in group.drain(..) {
                    let _ = job.reply.send(Err(StoreError::Db(sqlx::Error::Protocol(msg.clone()))));
                }
            }
        }
    }
}

/// A device's row as the group changes it.
struct DeviceState {
    enabled: bool,
    current: ReplayWindow,
    previous: ReplayWindow,
    down_counter: i64,
    dropped_total: i64,
    last_seen_ms: i64,
    touched: bool,
}

type Answers = StoreResult<Vec<Result<u64, SyncRefusal>>>;

// Boxed with an explicit `Send` so that the spawned task's future is `Send`
// for every lifetime (sqlx's executor impls trip the compiler's inference).
fn write_group<'a>(
    writer: &'a AnyPool,
    group: &'a [Job],
) -> std::pin::Pin<Box<dyn std::future::Future<Output = Answers> + Send + 'a>> {
    Box::pin(write_group_inner(writer, group))
}

async fn write_group_inner(writer: &AnyPool, group: &[Job]) -> Answers {
    let mut ids: Vec<i64> = group.iter().map(|j| j.device_id).collect();
    ids.sort_unstable();
    ids.dedup();
    let list = ids.iter().map(i64::to_string).collect::<Vec<_>>().join(",");
    let select = format!(
        "SELECT id, enabled, replay_high, replay_bitmap, prev_replay_high, prev_replay_bitmap, \
         down_counter, dropped_total, last_seen_ms FROM devices WHERE id IN ({list})"
    );
    let mut tx = writer.begin_with("BEGIN IMMEDIATE").await?;
    // Not kept in the prepared-statement cache: every group's text differs.
    let rows = sqlx::query(&select).persistent(false).fetch_all(&mut *tx).await?;
    let (answers, sql) = plan(&rows, group)?;
    if !sql.is_empty() {
        sqlx::query(&sql).persistent(false).execute(&mut *tx).await?;
    }
    tx.commit().await?;
    Ok(answers)
}

/// The checks on the rows read, and the SQL that writes the outcome.
fn plan(
    rows: &[sqlx::any::AnyRow],
    group: &[Job],
) -> StoreResult<(Vec<Result<u64, SyncRefusal>>, String)> {
    let mut devices = HashMap::with_capacity(rows.len());
    for row in rows {
        let w = |h: &str, b: &str| -> StoreResult<ReplayWindow> {
            Ok(ReplayWindow {
                highest: row.try_get::<i64, _>(h)? as u64,
                bitmap: row.try_get::<i64, _>(b)? as u64,
            })
        };
        devices.insert(
            row.try_get::<i64, _>("id")?,
            DeviceState {
                enabled: row.try_get::<i64, _>("enabled")? != 0,
                current: w("replay_high", "replay_bitmap")?,
                previous: w("prev_replay_high", "prev_replay_bitmap")?,
                down_counter: row.try_get("down_counter")?,
                dropped_total: row.try_get("dropped_total")?,
                last_seen_ms: row.try_get::<Option<i64>, _>("last_seen_ms")?.unwrap_or(0),
                touched: false,
            },
        );
    }
    // The checks, in arrival order, on the rows as the group leaves them.
    let mut answers = Vec::with_capacity(group.len());
    let mut accepted: Vec<&Job> = Vec::with_capacity(group.len());
    for job in group {
        let Some(d) = devices.get_mut(&job.device_id) else {
            answers.push(Err(SyncRefusal::Disabled)); // removed while its upload waited
            continue;
        };
        let window = match job.key_slot {
            KeySlot::Current => &mut d.current,
            KeySlot::Previous => &mut d.previous,
        };
        let mut next = *window;
        if let Err(e) = next.accept(job.counter) {
            answers.push(Err(SyncRefusal::Replay(e)));
            continue;
        }
        if !d.enabled {
            answers.push(Err(SyncRefusal::Disabled));
            continue;
        }
        *window = next;
        d.down_counter += 1;
        d.dropped_total = d.dropped_total.max(job.dropped_total);
        d.last_seen_ms = d.last_seen_ms.max(job.now);
        d.touched = true;
        answers.push(Ok(d.down_counter as u64));
        accepted.push(job);
    }
    // One multi-statement write. Only integers and hex blobs are inlined.
    let mut sql = String::with_capacity(256 * devices.len() + 1400 * accepted.len());
    for (id, d) in devices.iter().filter(|(_, d)| d.touched) {
        let _ = write!(
            sql,
            "UPDATE devices SET replay_high = {}, replay_bitmap = {}, prev_replay_high = {}, \
             prev_replay_bitmap = {}, down_counter = {}, dropped_total = {}, last_seen_ms = {} \
             WHERE id = {id};\n",
            d.current.highest as i64,
            d.current.bitmap as i64,
            d.previous.highest as i64,
            d.previous.bitmap as i64,
            d.down_counter,
            d.dropped_total,
            d.last_seen_ms,
        );
    }
    for chunk in accepted.chunks(200) {
        sql.push_str(
            "INSERT INTO telemetry_batches (device_id, first_seq, last_seq, sample_count, first_ms, \
             last_ms, registers, codec, data, received_ms) VALUES ",
        );
        for (i, job) in chunk.iter().enumerate() {
            let b = &job.batch;
            let _ = write!(
                sql,
                "{}({}, {}, {}, {}, {}, {}, {}, {}, X'{}', {})",
                if i == 0 { "" } else { ", " },
                job.device_id,
                b.first_seq,
                b.last_seq,
                b.count,
                b.first_ms,
                b.last_ms,
                b.registers,
                b.codec,
                ecowatt_proto::hex::encode_upper(&b.data),
                job.now
            );
        }
        sql.push_str(" ON CONFLICT (device_id, first_seq, last_seq) DO NOTHING;\n");
    }
    Ok((answers, sql))
}
