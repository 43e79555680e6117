//! Telemetry ingest with group commit, on both backends.
//!
//! A profile of the fleet benchmark on SQLite showed the server spending most
//! of its time switching to and from sqlx's SQLite worker thread (one round
//! trip per statement), and on PostgreSQL every upload paid a commit's WAL
//! flush. So uploads queue here and one task per server writes them in groups
//! of up to [`GROUP_MAX`]: one transaction, one `SELECT` of the devices' replay
//! windows (locked in id order on PostgreSQL), the checks in memory in arrival
//! order, then the writes: on SQLite one script (an `UPDATE` per device, a
//! multi-row `INSERT`), one round trip; on PostgreSQL one
//! `UPDATE ... FROM (VALUES ...)` and one multi-row `INSERT`, with binds.
//! Every upload is still checked against its device's window exactly as
//! alone, answered only after its group is committed, and a refused upload
//! changes nothing. Quiet long polls (nothing to record, nothing to deliver)
//! take the same road with no batch: their window, counter and last-seen
//! time are written in the group too.

use std::collections::HashMap;

use ecowatt_proto::replay::ReplayWindow;
use sqlx::AnyPool;
use sqlx::Row;
use tokio::sync::{mpsc, oneshot};

use super::device_sql::window;
use super::sql::Dialect;
use super::{KeySlot, StoreError, StoreResult, StoredBatch, SyncRefusal};

/// Most uploads written in one transaction.
pub const GROUP_MAX: usize = 256;

/// One upload (or quiet sync, with no batch) waiting to be written.
pub struct Job {
    pub device_id: i64,
    pub key_slot: KeySlot,
    pub counter: u64,
    /// `None` for a sync that only advances the window (see `quiet_sync`).
    pub batch: Option<StoredBatch>,
    pub dropped_total: i64,
    pub now: i64,
    pub reply: oneshot::Sender<StoreResult<Result<u64, SyncRefusal>>>,
}

/// Starts the ingest task on `writer` (the one-connection write pool).
pub fn start(writer: AnyPool, dialect: Dialect) -> mpsc::Sender<Job> {
    let (tx, rx) = mpsc::channel(4 * GROUP_MAX);
    tokio::spawn(run(writer, dialect, rx));
    tx
}

async fn run(writer: AnyPool, dialect: Dialect, mut rx: mpsc::Receiver<Job>) {
    let mut group = Vec::with_capacity(GROUP_MAX);
    while rx.recv_many(&mut group, GROUP_MAX).await > 0 {
        match write_group(&writer, dialect, &group).await {
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
    dialect: Dialect,
    group: &'a [Job],
) -> std::pin::Pin<Box<dyn std::future::Future<Output = Answers> + Send + 'a>> {
    Box::pin(write_group_inner(writer, dialect, group))
}

async fn write_group_inner(writer: &AnyPool, dialect: Dialect, group: &[Job]) -> Answers {
    let mut ids: Vec<i64> = group.iter().map(|j| j.device_id).collect();
    ids.sort_unstable();
    ids.dedup();
    let list = ids.iter().map(i64::to_string).collect::<Vec<_>>().join(",");
    // PostgreSQL: lock the rows in id order (another server's group waits, never deadlocks).
    let lock = if dialect == Dialect::Postgres { " ORDER BY id FOR UPDATE" } else { "" };
    let select = format!(
        "SELECT id, enabled, replay_high, replay_bitmap, prev_replay_high, prev_replay_bitmap, \
         down_counter, dropped_total, last_seen_ms FROM devices WHERE id IN ({list}){lock}"
    );
    let mut tx = match dialect {
        Dialect::Sqlite => writer.begin_with("BEGIN IMMEDIATE").await?,
        Dialect::Postgres => writer.begin().await?,
    };
    // Not kept in the prepared-statement cache: every group's text differs.
    let rows = sqlx::query(&select).persistent(false).fetch_all(&mut *tx).await?;
    let plan = plan(&rows, group)?;
    if dialect == Dialect::Sqlite {
        // One multi-statement write: one round trip to the connection's thread.
        let sql = sqlite_write(&plan, group);
        if !sql.is_empty() {
            sqlx::query(&sql).persistent(false).execute(&mut *tx).await?;
        }
        tx.commit().await?;
        return Ok(plan.answers);
    }
    if !plan.updates.is_empty() {
        let values = placeholders(plan.updates.len(), 8, |n| format!("CAST(${n} AS BIGINT)"));
        // VALUES columns are column1..column8 in both dialects.
        let sql = format!(
            "UPDATE devices SET replay_high = v.column2, replay_bitmap = v.column3, \
             prev_replay_high = v.column4, prev_replay_bitmap = v.column5, down_counter = v.column6, \
             dropped_total = v.column7, last_seen_ms = v.column8 \
             FROM (VALUES {values}) AS v WHERE devices.id = v.column1"
        );
        let mut q = sqlx::query(&sql).persistent(false);
        for u in &plan.updates {
            for v in u {
                q = q.bind(*v);
            }
        }
        q.execute(&mut *tx).await?;
    }
    for chunk in plan.accepted.chunks(200) {
        let values = placeholders(chunk.len(), 10, |n| format!("${n}"));
        let sql = format!(
            "INSERT INTO telemetry_batches (device_id, first_seq, last_seq, sample_count, first_ms, \
             last_ms, registers, codec, data, received_ms) VALUES {values} \
             ON CONFLICT (device_id, first_seq, last_seq) DO NOTHING"
        );
        let mut q = sqlx::query(&sql).persistent(false);
        for &i in chunk {
            let (job, b) = (&group[i], group[i].batch.as_ref().expect("accepted has a batch"));
            q = q
                .bind(job.device_id)
                .bind(b.first_seq)
                .bind(b.last_seq)
                .bind(b.count)
                .bind(b.first_ms)
                .bind(b.last_ms)
                .bind(b.registers)
                .bind(b.codec)
                .bind(b.data.clone())
                .bind(job.now);
        }
        q.execute(&mut *tx).await?;
    }
    tx.commit().await?;
    Ok(plan.answers)
}

/// `rows` tuples of `cols` numbered placeholders (`$1` up), each written by
/// `param`: the `VALUES` list of a multi-row statement with binds.
fn placeholders(rows: usize, cols: usize, param: impl Fn(usize) -> String) -> String {
    (0..rows)
        .map(|r| {
            let row: Vec<String> = (1..=cols).map(|c| param(r * cols + c)).collect();
            format!("({})", row.join(", "))
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// The group's writes as one SQLite script. Only integers and hex blob
/// literals are inlined, all of them produced here, none from a peer's text.
fn sqlite_write(plan: &Plan, group: &[Job]) -> String {
    use std::fmt::Write as _;
    let mut sql = String::with_capacity(256 * plan.updates.len() + 1400 * plan.accepted.len());
    for u in &plan.updates {
        let _ = writeln!(
            sql,
            "UPDATE devices SET replay_high = {}, replay_bitmap = {}, prev_replay_high = {}, \
             prev_replay_bitmap = {}, down_counter = {}, dropped_total = {}, last_seen_ms = {} \
             WHERE id = {};",
            u[1], u[2], u[3], u[4], u[5], u[6], u[7], u[0]
        );
    }
    for chunk in plan.accepted.chunks(200) {
        sql.push_str(
            "INSERT INTO telemetry_batches (device_id, first_seq, last_seq, sample_count, first_ms, \
             last_ms, registers, codec, data, received_ms) VALUES ",
        );
        for (n, &i) in chunk.iter().enumerate() {
            let (job, b) = (&group[i], group[i].batch.as_ref().expect("accepted has a batch"));
            let _ = write!(
                sql,
                "{}({}, {}, {}, {}, {}, {}, {}, {}, X'{}', {})",
                if n == 0 { "" } else { ", " },
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
    sql
}

/// What a group does: the answers in order, each touched device's new row
/// values (`id`, windows, counters, last seen), the uploads to store.
struct Plan {
    answers: Vec<Result<u64, SyncRefusal>>,
    updates: Vec<[i64; 8]>,
    accepted: Vec<usize>,
}

/// The checks on the rows read, and the SQL that writes the outcome.
fn plan(rows: &[sqlx::any::AnyRow], group: &[Job]) -> StoreResult<Plan> {
    let mut devices = HashMap::with_capacity(rows.len());
    for row in rows {
        devices.insert(
            row.try_get::<i64, _>("id")?,
            DeviceState {
                enabled: row.try_get::<i64, _>("enabled")? != 0,
                current: window(row, KeySlot::Current)?,
                previous: window(row, KeySlot::Previous)?,
                down_counter: row.try_get("down_counter")?,
                dropped_total: row.try_get("dropped_total")?,
                last_seen_ms: row.try_get::<Option<i64>, _>("last_seen_ms")?.unwrap_or(0),
                touched: false,
            },
        );
    }
    // The checks, in arrival order, on the rows as the group leaves them.
    let mut answers = Vec::with_capacity(group.len());
    let mut accepted = Vec::with_capacity(group.len());
    for (i, job) in group.iter().enumerate() {
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
        if job.batch.is_some() {
            accepted.push(i);
        }
    }
    let updates = devices
        .iter()
        .filter(|(_, d)| d.touched)
        .map(|(id, d)| {
            [
                *id,
                d.current.highest as i64,
                d.current.bitmap as i64,
                d.previous.highest as i64,
                d.previous.bitmap as i64,
                d.down_counter,
                d.dropped_total,
                d.last_seen_ms,
            ]
        })
        .collect();
    Ok(Plan { answers, updates, accepted })
}
