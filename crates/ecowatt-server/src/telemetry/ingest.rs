//! Telemetry ingest with group commit, on both backends.
//!
//! A profile of the fleet benchmark on SQLite showed the server spending most
//! of its time switching to and from sqlx's SQLite worker thread (one round
//! trip per statement), and on PostgreSQL every upload paid a commit's WAL
//! flush. So uploads queue here and one task per server writes them in groups
//! of up to [`GROUP_MAX`]: one transaction, one `SELECT` of the devices' rows
//! (key versions, replay windows, whether writes await confirmation; locked
//! in id order on PostgreSQL), the checks in memory in arrival order, then the
//! writes: on SQLite one script (an `UPDATE` per device, a multi-row
//! `INSERT`), one round trip; on PostgreSQL one statement (the devices'
//! `UPDATE ... FROM UNNEST(...)`, the batches' and the rollups' `INSERT ...
//! SELECT FROM UNNEST(...)` as parts of one `WITH`), the values bound as
//! arrays, on a connection the task keeps.
//! Every upload is still checked exactly as alone (its key still one of the
//! device's, its counter new to that key's window), answered only after its
//! group is committed, and a refused upload changes nothing. Quiet long
//! polls (nothing to record, nothing to deliver) take the same road with no
//! batch: their window, counter and last-seen time are written in the group
//! too. So do light syncs (a long poll that brings command results or a
//! changed control state, and nothing else): their results are recorded by
//! the commands' rule ([`result_effect`]) and their control state written in
//! the group, with one more `SELECT` for the commands' states.

use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::Arc;

use ecowatt_proto::replay::ReplayWindow;
use sqlx::pool::PoolConnection;
use sqlx::{AnyPool, PgConnection, PgPool, Postgres, Row};
use tokio::sync::{mpsc, oneshot};

use super::{StoredBatch, trim};
use crate::commands::{CommandOutcome, CommandStatus, ResultEffect, result_effect};
use crate::db::{Db, Dialect, PgQuery, StoreError, StoreResult};
use crate::devices::DeviceId;
use crate::devices::admission::SyncRefusal;
use crate::devices::keys::{KeySlot, slot_of, window};
use crate::news::News;

/// An upload (or quiet sync) accepted by the ingest task.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Accepted {
    /// The answer's down counter.
    pub down_counter: u64,
    /// The device has succeeded writes that no reading has confirmed yet
    /// (read with its row in the same group, so an upload only asks about
    /// confirmations when there are some; reads are never confirmed and do
    /// not count).
    pub unconfirmed: bool,
}

/// Most uploads written in one transaction.
pub const GROUP_MAX: usize = 256;

/// What a light sync records with its admission: the results of its
/// device's commands, and the control state it reports
/// (`devices.control_reported`).
#[derive(Debug, Clone, Default)]
pub struct Record {
    /// Results, by command id.
    pub results: Vec<(i64, CommandOutcome)>,
    /// The control report, as stored.
    pub control_reported: Option<String>,
}

/// One upload (or quiet sync, with no batch) waiting to be written.
struct Job {
    pub device_id: DeviceId,
    /// The version of the key that sealed it (checked against the row).
    pub key_version: i64,
    pub counter: u64,
    /// `None` for a sync that only advances the window (a quiet sync).
    pub batch: Option<StoredBatch>,
    /// The batch decoded (for the rollups).
    pub decoded: Option<Arc<ecowatt_proto::codec::Batch>>,
    pub dropped_total: i64,
    pub now: i64,
    /// What a light sync records.
    pub record: Option<Record>,
    pub reply: oneshot::Sender<StoreResult<Result<Accepted, SyncRefusal>>>,
}

/// Where the ingest task writes: SQLite's one write connection (through
/// sqlx's `Any` driver, like the rest of the store), or a PostgreSQL
/// connection of its own, typed, so that a group's rows go as arrays.
#[derive(Clone)]
enum Target {
    Sqlite(AnyPool),
    Postgres(PgPool),
}

impl Target {
    /// Closes the connection.
    pub async fn close(&self) {
        match self {
            Target::Sqlite(pool) => pool.close().await,
            Target::Postgres(pool) => pool.close().await,
        }
    }
}

/// The ingest task's queue.
#[derive(Clone)]
pub struct Ingest {
    queue: mpsc::Sender<Job>,
    /// On SQLite the writer; on PostgreSQL a connection of its own, so that
    /// a group never queues behind the reads and single writes of the shared
    /// pool (under a backlog it did, groups shrank to a few uploads each and
    /// the server fell further behind).
    target: Target,
    /// Raw retention on SQLite ([`Ingest::keep_raw`]).
    retention: Arc<Retention>,
}

/// SQLite: raw batches past the retention limit are deleted by the ingest
/// groups themselves, a few more than each group stores, oldest first, in
/// the group's transaction. At the fleet bench's rate a separate sweep
/// deleted 8,000 batches every 5 s on the one writer, and the groups queued
/// behind it (upload p99 71 to 102 ms); spread over the groups, the same
/// work is a statement in transactions that happen anyway. (PostgreSQL drops
/// whole partitions instead, telemetry/partitions.rs.)
#[derive(Default)]
struct Retention {
    /// How long raw batches are kept, in ms; 0: for ever.
    keep_ms: std::sync::atomic::AtomicI64,
    /// Batches deleted so far and not yet counted ([`Ingest::take_purged`]).
    purged: std::sync::atomic::AtomicU64,
}

/// Batches past retention a group deletes, besides one for each it stores.
const PURGE_EXTRA: usize = 16;

impl Ingest {
    /// Starts the ingest task for `db`.
    pub async fn start(db: &Db) -> StoreResult<Ingest> {
        let target = match db.dialect() {
            Dialect::Sqlite => Target::Sqlite(db.writer().clone()),
            Dialect::Postgres => Target::Postgres(
                sqlx::postgres::PgPoolOptions::new()
                    .max_connections(1)
                    .before_acquire(|conn, _| Box::pin(crate::db::healthy(conn)))
                    .connect(db.url())
                    .await?,
            ),
        };
        let (queue, rx) = mpsc::channel(4 * GROUP_MAX);
        let retention = Arc::new(Retention::default());
        tokio::spawn(run(target.clone(), rx, db.news().clone(), retention.clone()));
        Ok(Ingest { queue, target, retention })
    }

    /// Queues an upload (or, with no batch, a quiet sync) and waits for its
    /// group's commit: checked exactly as alone, answered only once durable.
    pub async fn submit(
        &self,
        device_id: DeviceId,
        key_version: i64,
        counter: u64,
        batch: Option<(StoredBatch, Arc<ecowatt_proto::codec::Batch>)>,
        dropped_total: i64,
        now: i64,
    ) -> StoreResult<Result<Accepted, SyncRefusal>> {
        let (reply, answer) = oneshot::channel();
        let (batch, decoded) = batch.unzip();
        let job = Job {
            device_id,
            key_version,
            counter,
            batch,
            decoded,
            dropped_total,
            now,
            record: None,
            reply,
        };
        self.send(job, answer).await
    }

    /// Queues a light sync: admitted, its results recorded and its control
    /// state written in a group, exactly as its own transaction would.
    pub async fn submit_record(
        &self,
        device_id: DeviceId,
        key_version: i64,
        counter: u64,
        record: Record,
        now: i64,
    ) -> StoreResult<Result<Accepted, SyncRefusal>> {
        let (reply, answer) = oneshot::channel();
        let job = Job {
            device_id,
            key_version,
            counter,
            batch: None,
            decoded: None,
            dropped_total: 0,
            now,
            record: Some(record),
            reply,
        };
        self.send(job, answer).await
    }

    async fn send(
        &self,
        job: Job,
        answer: oneshot::Receiver<StoreResult<Result<Accepted, SyncRefusal>>>,
    ) -> StoreResult<Result<Accepted, SyncRefusal>> {
        let gone = || StoreError::Db(sqlx::Error::Protocol("ingest task stopped".into()));
        self.queue.send(job).await.map_err(|_| gone())?;
        answer.await.map_err(|_| gone())?
    }

    /// Closes its connection.
    pub async fn close(&self) {
        self.target.close().await;
    }

    /// Keeps raw batches for `keep` (received earlier: deleted by the
    /// groups on SQLite, [`Retention`]), or for ever.
    pub fn keep_raw(&self, keep: Option<std::time::Duration>) {
        let ms = keep.map_or(0, |k| (k.as_millis() as i64).max(1));
        self.retention.keep_ms.store(ms, std::sync::atomic::Ordering::Relaxed);
    }

    /// Batches the groups deleted past retention since the last call.
    pub fn take_purged(&self) -> u64 {
        self.retention.purged.swap(0, std::sync::atomic::Ordering::Relaxed)
    }
}

async fn run(
    target: Target,
    mut rx: mpsc::Receiver<Job>,
    news: Arc<News>,
    retention: Arc<Retention>,
) {
    let mut group = Vec::with_capacity(GROUP_MAX);
    // PostgreSQL: the connection, kept from group to group (taking it from
    // the pool and giving it back costs a round trip each: sqlx pings a
    // connection as it returns), let go when the pool closes or a group
    // fails on it.
    let mut held: Option<PoolConnection<Postgres>> = None;
    loop {
        let received = match (&target, held.is_some()) {
            (Target::Postgres(pool), true) => {
                let closing = pool.close_event();
                tokio::select! {
                    n = rx.recv_many(&mut group, GROUP_MAX) => n,
                    _ = closing => {
                        held = None;
                        continue;
                    }
                }
            }
            _ => rx.recv_many(&mut group, GROUP_MAX).await,
        };
        if received == 0 {
            break;
        }
        let started = std::time::Instant::now();
        let written = write_group(&target, &mut held, &retention, &group).await;
        tracing::debug!(
            jobs = group.len(),
            us = started.elapsed().as_micros() as u64,
            "ingest group"
        );
        match written {
            Ok(answers) => {
                // Results recorded: operators waiting on a command re-read it
                // (other server processes hear of it by NOTIFY in the group).
                if group.iter().any(|j| j.record.as_ref().is_some_and(|r| !r.results.is_empty())) {
                    news.commands_changed();
                    news.results_of(group.iter().filter_map(|j| {
                        let recorded = j.record.as_ref().is_some_and(|r| !r.results.is_empty());
                        recorded.then_some(crate::news::Changed::Id(j.device_id.0))
                    }));
                }
                news.telemetry(|| {
                    group.iter().zip(&answers).filter_map(|(job, answer)| {
                        let batch = job.batch.as_ref().filter(|_| answer.is_ok())?;
                        Some(crate::news::Telemetry {
                            device_id: job.device_id.0,
                            data: batch.data.as_slice().into(),
                        })
                    })
                });
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
    key_version: i64,
    previous_key_version: Option<i64>,
    unconfirmed: bool,
    current: ReplayWindow,
    previous: ReplayWindow,
    down_counter: i64,
    dropped_total: i64,
    last_seen_ms: i64,
    /// Highest `seq` stored for the device: a batch starting at or below it
    /// may repeat stored samples (a retry whose batch grew).
    stored_seq: i64,
    touched: bool,
    /// The site's time zone (days' rollups).
    timezone: String,
    /// Its newest stored sample, as the rollups know it.
    tail: super::rollup::Tail,
}

type Answers = StoreResult<Vec<Result<Accepted, SyncRefusal>>>;

/// The columns a group reads of each device's row, with whether writes
/// await confirmation by a reading (the commands' rule, as SQL).
static COLUMNS: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
    format!(
        "id, enabled, key_version, previous_key_version, replay_high, replay_bitmap, \
         prev_replay_high, prev_replay_bitmap, down_counter, dropped_total, last_seen_ms, stored_seq, \
         timezone, tail_ms, tail_pac, \
         (SELECT COUNT(*) FROM commands WHERE device_id = devices.id AND {}) AS unconfirmed",
        crate::commands::store::AWAITS_CONFIRMATION
    )
});

/// The stored batches of one device that share samples with `first_seq..=last_seq`.
const OVERLAPPING: &str = "SELECT first_seq, last_seq FROM telemetry_batches \
     WHERE device_id = $1 AND last_seq >= $2 AND first_seq <= $3";

/// For each upload of `plan.overlaps`, the `seq` ranges of the stored
/// batches it may repeat, read in the group's transaction `tx` (either
/// backend's: a macro, as their executors differ in type).
macro_rules! overlapping {
    ($tx:ident, $plan:ident, $group:ident) => {{
        let mut found = Vec::with_capacity($plan.overlaps.len());
        for &(i, _) in &$plan.overlaps {
            let (device, b) = ($group[i].device_id.0, $group[i].batch.as_ref().expect("a batch"));
            let rows = sqlx::query(OVERLAPPING).bind(device).bind(b.first_seq).bind(b.last_seq);
            let rows = rows.fetch_all(&mut *$tx).await?;
            found.push(rows.iter().map(range_of).collect::<StoreResult<Vec<_>>>()?);
        }
        found
    }};
}

/// For each upload of `plan.overlaps` (it may land before stored samples),
/// the stored samples at the edges it may border: the last of the batch
/// ending just before it and the first of the one starting just after.
macro_rules! bordering {
    ($tx:ident, $plan:ident, $group:ident) => {{
        let mut known: HashMap<(i64, i64), super::rollup::Point> = HashMap::new();
        for &(i, _) in &$plan.overlaps {
            let (device, b) = ($group[i].device_id.0, $group[i].batch.as_ref().expect("a batch"));
            for (sql, seq) in [(LAST_EDGE, b.first_seq - 1), (FIRST_EDGE, b.last_seq + 1)] {
                let row = sqlx::query(sql).bind(device).bind(seq).fetch_optional(&mut *$tx).await?;
                if let Some(row) = row {
                    let (ms, pac): (i64, Option<i64>) = (row.try_get("ms")?, row.try_get("pac")?);
                    let pac = pac.and_then(|p| u16::try_from(p).ok());
                    known.insert((device, seq), super::rollup::Point { seq, ms, pac });
                }
            }
        }
        known
    }};
}

/// The last sample of a device's batch ending at a seq.
const LAST_EDGE: &str = "SELECT last_ms AS ms, last_pac AS pac FROM telemetry_batches \
     WHERE device_id = $1 AND last_seq = $2";
/// The first sample of a device's batch starting at a seq.
const FIRST_EDGE: &str = "SELECT first_ms AS ms, first_pac AS pac FROM telemetry_batches \
     WHERE device_id = $1 AND first_seq = $2";

/// The devices' newest samples and time zones as the group found them.
fn tails_and_zones(
    states: &[(i64, DeviceState)],
) -> (HashMap<i64, super::rollup::Tail>, HashMap<i64, String>) {
    let tails = states.iter().map(|(id, d)| (*id, d.tail)).collect();
    let zones = states.iter().map(|(id, d)| (*id, d.timezone.clone())).collect();
    (tails, zones)
}

/// What the group's stored batches add to the rollups (telemetry/rollup.rs).
fn group_rollups(
    group: &[Job],
    stored: &[(usize, Cow<'_, StoredBatch>)],
    tails: HashMap<i64, super::rollup::Tail>,
    zones: &HashMap<i64, String>,
    known: HashMap<(i64, i64), super::rollup::Point>,
) -> super::rollup::GroupRollups {
    use super::rollup;
    let mut positions = Vec::with_capacity(stored.len());
    let items: Vec<rollup::Stored<'_>> = stored
        .iter()
        .enumerate()
        .filter_map(|(pos, (i, b))| {
            let original = group[*i].decoded.as_deref()?;
            // A resend that repeats stored samples: only the others are new.
            let new_seqs = match b {
                Cow::Borrowed(_) => None,
                Cow::Owned(kept) => Some(
                    ecowatt_proto::codec::decode(&kept.data)
                        .map(|d| d.samples.iter().map(|x| x.seq as i64).collect())
                        .unwrap_or_default(),
                ),
            };
            positions.push(pos);
            Some(rollup::Stored { device: group[*i].device_id.0, original, new_seqs })
        })
        .collect();
    let zone_of = |dev: i64| {
        zones
            .get(&dev)
            .and_then(|z| jiff::tz::TimeZone::get(z).ok())
            .unwrap_or(jiff::tz::TimeZone::UTC)
    };
    let mut out = rollup::of_group(&items, zone_of, tails, known);
    // Edges by position in `stored`.
    let mut edges = vec![(None, None); stored.len()];
    for (pos, e) in positions.into_iter().zip(out.edges) {
        edges[pos] = e;
    }
    out.edges = edges;
    out
}

/// A device's row as read, on either backend.
fn device_state<R: Row>(row: &R) -> StoreResult<(i64, DeviceState)>
where
    for<'r> i64: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    for<'r> Option<i64>: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    for<'r> String: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    for<'r> &'r str: sqlx::ColumnIndex<R>,
{
    let stored_seq: i64 = row.try_get("stored_seq")?;
    let state = DeviceState {
        enabled: row.try_get::<i64, _>("enabled")? != 0,
        key_version: row.try_get("key_version")?,
        previous_key_version: row.try_get("previous_key_version")?,
        unconfirmed: row.try_get::<i64, _>("unconfirmed")? > 0,
        current: window(row, KeySlot::Current)?,
        previous: window(row, KeySlot::Previous)?,
        down_counter: row.try_get("down_counter")?,
        dropped_total: row.try_get("dropped_total")?,
        last_seen_ms: row.try_get::<Option<i64>, _>("last_seen_ms")?.unwrap_or(0),
        stored_seq,
        touched: false,
        timezone: row.try_get("timezone")?,
        tail: super::rollup::Tail {
            seq: stored_seq,
            ms: row.try_get("tail_ms")?,
            pac: row.try_get::<Option<i64>, _>("tail_pac")?.and_then(|p| u16::try_from(p).ok()),
        },
    };
    Ok((row.try_get("id")?, state))
}

// Boxed with an explicit `Send` so that the spawned task's future is `Send`
// for every lifetime (sqlx's executor impls trip the compiler's inference).
fn write_group<'a>(
    target: &'a Target,
    held: &'a mut Option<PoolConnection<Postgres>>,
    retention: &'a Retention,
    group: &'a [Job],
) -> std::pin::Pin<Box<dyn std::future::Future<Output = Answers> + Send + 'a>> {
    match target {
        Target::Sqlite(pool) => Box::pin(write_group_sqlite(pool, retention, group)),
        Target::Postgres(pool) => Box::pin(async move {
            let conn = match held {
                Some(conn) => conn,
                None => held.insert(pool.acquire().await?),
            };
            let written = write_group_postgres(conn, group).await;
            if written.is_err() {
                *held = None; // back to the pool, which tests it
            }
            written
        }),
    }
}

/// The devices of `group`, each once, in id order.
fn device_ids(group: &[Job]) -> Vec<i64> {
    let mut ids: Vec<i64> = group.iter().map(|j| j.device_id.0).collect();
    ids.sort_unstable();
    ids.dedup();
    ids
}

async fn write_group_sqlite(writer: &AnyPool, retention: &Retention, group: &[Job]) -> Answers {
    let list = device_ids(group).iter().map(i64::to_string).collect::<Vec<_>>().join(",");
    let mut tx = writer.begin_with("BEGIN IMMEDIATE").await?;
    // Not kept in the prepared-statement cache: every group's text differs.
    let select = format!("SELECT {} FROM devices WHERE id IN ({list})", *COLUMNS);
    let rows = sqlx::query(&select).persistent(false).fetch_all(&mut *tx).await?;
    let states: Vec<_> = rows.iter().map(device_state).collect::<StoreResult<_>>()?;
    let (tails, zones) = tails_and_zones(&states);
    let plan = plan(states, group);
    let found = overlapping!(tx, plan, group);
    let stored = stored_batches(&plan, group, found);
    let known = bordering!(tx, plan, group);
    let rollups = group_rollups(group, &stored, tails, &zones, known);
    let ids = result_ids(&plan, group);
    let statuses = if ids.is_empty() {
        Vec::new()
    } else {
        let select = format!(
            "SELECT id, device_id, status FROM commands WHERE id IN ({})",
            crate::commands::store::id_list(&ids)
        );
        let rows = sqlx::query(&select).persistent(false).fetch_all(&mut *tx).await?;
        rows.iter().map(command_state).collect::<StoreResult<_>>()?
    };
    let records = records(&plan, group, statuses);
    // One multi-statement write: one round trip to the connection's thread.
    let mut sql = sqlite_write(&plan, group, &stored, &rollups);
    sqlite_records(&mut sql, &records);
    if !sql.is_empty() {
        sqlx::query(&sql).persistent(false).execute(&mut *tx).await?;
    }
    let keep_ms = retention.keep_ms.load(std::sync::atomic::Ordering::Relaxed);
    let purged = if keep_ms > 0 && !stored.is_empty() {
        let newest = group.iter().map(|j| j.now).max().unwrap_or_default();
        let done = sqlx::query(
            "DELETE FROM telemetry_batches WHERE id IN (SELECT id FROM telemetry_batches \
             WHERE received_ms < $1 ORDER BY received_ms LIMIT $2)",
        )
        .bind(newest - keep_ms)
        .bind((stored.len() + PURGE_EXTRA) as i64)
        .execute(&mut *tx)
        .await?;
        done.rows_affected()
    } else {
        0
    };
    tx.commit().await?;
    retention.purged.fetch_add(purged, std::sync::atomic::Ordering::Relaxed);
    Ok(plan.answers)
}

/// PostgreSQL: statements whose text never changes (prepared once on the
/// connection), the group's values bound as arrays (a profile showed the
/// ingest backend spending its time parsing and planning when each group
/// sent its own `VALUES` list of up to 2,000 placeholders); in the common
/// case four round trips: `BEGIN`, the devices' rows, the writes
/// ([`PG_WRITE`]), `COMMIT` (a fleet bench measured nine before: each
/// write a statement of its own, the connection taken from the pool and
/// given back each group).
async fn write_group_postgres(conn: &mut PgConnection, group: &[Job]) -> Answers {
    let ids = device_ids(group);
    let mut tx = sqlx::Connection::begin(conn).await?;
    // Locked in id order: another server's group waits, never deadlocks.
    let select =
        format!("SELECT {} FROM devices WHERE id = ANY($1) ORDER BY id FOR UPDATE", *COLUMNS);
    let rows = sqlx::query(&select).bind(&ids).fetch_all(&mut *tx).await?;
    let states: Vec<_> = rows.iter().map(device_state).collect::<StoreResult<_>>()?;
    let (tails, zones) = tails_and_zones(&states);
    let plan = plan(states, group);
    let found = overlapping!(tx, plan, group);
    let stored = stored_batches(&plan, group, found);
    let known = bordering!(tx, plan, group);
    let rollups = group_rollups(group, &stored, tails, &zones, known);
    let ids = result_ids(&plan, group);
    let statuses = if ids.is_empty() {
        Vec::new()
    } else {
        let select =
            "SELECT id, device_id, status FROM commands WHERE id = ANY($1) ORDER BY id FOR UPDATE";
        let rows = sqlx::query(select).bind(&ids).fetch_all(&mut *tx).await?;
        rows.iter().map(command_state).collect::<StoreResult<_>>()?
    };
    let records = records(&plan, group, statuses);
    if !records.results.is_empty() {
        sqlx::query("SELECT pg_notify($1, '')")
            .bind(crate::news::COMMANDS_CHANNEL)
            .execute(&mut *tx)
            .await?;
        let r = &records.results;
        sqlx::query(
            "UPDATE commands SET status = v.status, completed_ms = v.completed, executed_ms = v.executed, \
             result_message = v.message, exception_code = v.exception, result_value = v.value \
             FROM UNNEST($1::int8[], $2::text[], $3::int8[], $4::int8[], $5::text[], $6::int8[], $7::int8[]) \
             AS v(id, status, completed, executed, message, exception, value) WHERE commands.id = v.id",
        )
        .bind(r.iter().map(|w| w.id).collect::<Vec<_>>())
        .bind(r.iter().map(|w| w.status.to_owned()).collect::<Vec<_>>())
        .bind(r.iter().map(|w| w.completed).collect::<Vec<_>>())
        .bind(r.iter().map(|w| w.executed).collect::<Vec<_>>())
        .bind(r.iter().map(|w| w.message.clone()).collect::<Vec<_>>())
        .bind(r.iter().map(|w| w.exception).collect::<Vec<_>>())
        .bind(r.iter().map(|w| w.value).collect::<Vec<_>>())
        .execute(&mut *tx)
        .await?;
    }
    if !records.control.is_empty() {
        let c = &records.control;
        sqlx::query(
            "UPDATE devices SET control_reported = v.c FROM UNNEST($1::int8[], $2::text[]) AS v(id, c) \
             WHERE devices.id = v.id",
        )
        .bind(c.iter().map(|(id, _)| *id).collect::<Vec<_>>())
        .bind(c.iter().map(|(_, t)| t.clone()).collect::<Vec<_>>())
        .execute(&mut *tx)
        .await?;
    }
    if !plan.updates.is_empty() || !stored.is_empty() {
        let mut q = sqlx::query(PG_WRITE.as_str());
        q = bind_device_rows(q, &plan.updates, &rollups.tails);
        q = bind_batches(q, group, &stored, &rollups.edges);
        q = super::rollup::bind_pg_upsert(q, &rollups.rollups);
        q.execute(&mut *tx).await?;
    }
    tx.commit().await?;
    Ok(plan.answers)
}

/// PostgreSQL: a group's writes in one statement (one round trip): the
/// devices' rows (`$1..$12`: replay windows, counters, last seen, stored seq
/// and, where the group stored samples, the rollups' tail), the batches
/// (`$13..$24`) and the rollup upsert (`$25..`), each `UNNEST`ed from
/// arrays. Each device row is updated once (a second `UPDATE` of the same
/// rows would leave one more dead row version each group).
static PG_WRITE: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
    format!(
        "WITH d AS (UPDATE devices SET replay_high = v.rh, replay_bitmap = v.rb, \
         prev_replay_high = v.prh, prev_replay_bitmap = v.prb, down_counter = v.dc, \
         dropped_total = v.dt, last_seen_ms = v.ls, stored_seq = v.ss, \
         tail_ms = CASE WHEN v.tail THEN v.tms ELSE tail_ms END, \
         tail_pac = CASE WHEN v.tail THEN v.tpac ELSE tail_pac END \
         FROM UNNEST($1::int8[], $2::int8[], $3::int8[], $4::int8[], $5::int8[], $6::int8[], \
         $7::int8[], $8::int8[], $9::int8[], $10::bool[], $11::int8[], $12::int8[]) \
         AS v(id, rh, rb, prh, prb, dc, dt, ls, ss, tail, tms, tpac) \
         WHERE devices.id = v.id RETURNING 1), \
         b AS (INSERT INTO telemetry_batches (device_id, first_seq, last_seq, sample_count, \
         first_ms, last_ms, registers, codec, data, received_ms, first_pac, last_pac) \
         SELECT * FROM UNNEST($13::int8[], $14::int8[], $15::int8[], $16::int8[], $17::int8[], \
         $18::int8[], $19::int8[], $20::int8[], $21::bytea[], $22::int8[], $23::int8[], $24::int8[]) \
         ON CONFLICT DO NOTHING RETURNING 1) \
         {}",
        super::rollup::pg_upsert(25)
    )
});

/// Binds the devices' new rows ([`PG_WRITE`]'s `$1..$12`): each touched
/// device's windows and counters, with its tail where the group moved it (a
/// tail's device is always touched: only an accepted upload stores samples).
fn bind_device_rows<'q>(
    q: PgQuery<'q>,
    updates: &[[i64; 9]],
    tails: &HashMap<i64, super::rollup::Tail>,
) -> PgQuery<'q> {
    debug_assert!(tails.keys().all(|id| updates.iter().any(|u| u[0] == *id)));
    let mut columns: [Vec<i64>; 9] = Default::default();
    let (mut has_tail, mut tail_ms, mut tail_pac) = (vec![], vec![], vec![]);
    for u in updates {
        for (column, v) in columns.iter_mut().zip(u) {
            column.push(*v);
        }
        let tail = tails.get(&u[0]);
        has_tail.push(tail.is_some());
        tail_ms.push(tail.and_then(|t| t.ms));
        tail_pac.push(tail.and_then(|t| t.pac).map(i64::from));
    }
    let mut q = q;
    for column in columns {
        q = q.bind(column);
    }
    q.bind(has_tail).bind(tail_ms).bind(tail_pac)
}

/// Binds the batches to store ([`PG_WRITE`]'s `$13..$24`).
fn bind_batches<'q>(
    q: PgQuery<'q>,
    group: &'q [Job],
    stored: &'q [(usize, Cow<'q, StoredBatch>)],
    edges: &[(Option<u16>, Option<u16>)],
) -> PgQuery<'q> {
    let mut columns: [Vec<i64>; 9] = Default::default();
    let mut data: Vec<&[u8]> = Vec::with_capacity(stored.len());
    for (i, b) in stored {
        let (row, bytes) = stored_row(&group[*i], b);
        for (column, v) in columns.iter_mut().zip(row) {
            column.push(v);
        }
        data.push(bytes);
    }
    let first_pac: Vec<Option<i64>> = edges.iter().map(|e| e.0.map(i64::from)).collect();
    let last_pac: Vec<Option<i64>> = edges.iter().map(|e| e.1.map(i64::from)).collect();
    let [device, first_seq, last_seq, count, first_ms, last_ms, registers, codec, received] =
        columns;
    q.bind(device)
        .bind(first_seq)
        .bind(last_seq)
        .bind(count)
        .bind(first_ms)
        .bind(last_ms)
        .bind(registers)
        .bind(codec)
        .bind(data)
        .bind(received)
        .bind(first_pac)
        .bind(last_pac)
}

fn range_of<R: Row>(row: &R) -> StoreResult<(i64, i64)>
where
    for<'r> i64: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    for<'r> &'r str: sqlx::ColumnIndex<R>,
{
    Ok((row.try_get("first_seq")?, row.try_get("last_seq")?))
}

/// What the group stores, by job: each accepted upload's batch, except that
/// one which may repeat stored samples keeps only the samples no stored batch
/// (`found`, in the order of `plan.overlaps`) and no earlier upload of the
/// group covers, re-encoded, or nothing when it adds none.
fn stored_batches<'g>(
    plan: &Plan,
    group: &'g [Job],
    found: Vec<Vec<(i64, i64)>>,
) -> Vec<(usize, Cow<'g, StoredBatch>)> {
    let mut trimmed: HashMap<usize, Option<StoredBatch>> = HashMap::new();
    for ((i, earlier), mut covered) in plan.overlaps.iter().zip(found) {
        covered.extend_from_slice(earlier);
        let batch = group[*i].batch.as_ref().expect("has a batch");
        trimmed.insert(*i, trim(batch, &covered));
    }
    plan.accepted
        .iter()
        .filter_map(|&i| match trimmed.remove(&i) {
            None => Some((i, Cow::Borrowed(group[i].batch.as_ref().expect("has a batch")))),
            Some(Some(kept)) => Some((i, Cow::Owned(kept))),
            Some(None) => None,
        })
        .collect()
}

/// An upload's `telemetry_batches` row: the integer columns in the order the
/// inserts name them (`data` goes between `codec` and `received_ms`), and the
/// batch bytes.
fn stored_row<'b>(job: &Job, b: &'b StoredBatch) -> ([i64; 9], &'b [u8]) {
    let row = [
        job.device_id.0,
        b.first_seq,
        b.last_seq,
        b.count,
        b.first_ms,
        b.last_ms,
        b.registers,
        b.codec,
        job.now,
    ];
    (row, &b.data)
}

/// The group's writes as one SQLite script. Only integers and hex blob
/// literals are inlined, all of them produced here, none from a peer's text.
fn sqlite_write(
    plan: &Plan,
    group: &[Job],
    stored: &[(usize, Cow<'_, StoredBatch>)],
    rollups: &super::rollup::GroupRollups,
) -> String {
    use std::fmt::Write as _;
    let mut sql = String::with_capacity(256 * plan.updates.len() + 1400 * stored.len());
    for u in &plan.updates {
        let _ = writeln!(
            sql,
            "UPDATE devices SET replay_high = {}, replay_bitmap = {}, prev_replay_high = {}, \
             prev_replay_bitmap = {}, down_counter = {}, dropped_total = {}, last_seen_ms = {}, \
             stored_seq = {} WHERE id = {};",
            u[1], u[2], u[3], u[4], u[5], u[6], u[7], u[8], u[0]
        );
    }
    let opt = |v: Option<u16>| v.map_or("NULL".to_owned(), |v| v.to_string());
    for (id, t) in &rollups.tails {
        let ms = t.ms.map_or("NULL".to_owned(), |v| v.to_string());
        let _ = writeln!(
            sql,
            "UPDATE devices SET tail_ms = {ms}, tail_pac = {} WHERE id = {id};",
            opt(t.pac)
        );
    }
    for (c, chunk) in stored.chunks(200).enumerate() {
        sql.push_str(
            "INSERT INTO telemetry_batches (device_id, first_seq, last_seq, sample_count, first_ms, \
             last_ms, registers, codec, data, received_ms, first_pac, last_pac) VALUES ",
        );
        for (n, (i, b)) in chunk.iter().enumerate() {
            let (
                [device, first_seq, last_seq, count, first_ms, last_ms, registers, codec, now],
                data,
            ) = stored_row(&group[*i], b);
            let (first_pac, last_pac) = rollups.edges[c * 200 + n];
            let _ = write!(
                sql,
                "{}({device}, {first_seq}, {last_seq}, {count}, {first_ms}, {last_ms}, {registers}, \
                 {codec}, X'{}', {now}, {}, {})",
                if n == 0 { "" } else { ", " },
                ecowatt_proto::hex::encode_upper(data),
                opt(first_pac),
                opt(last_pac),
            );
        }
        sql.push_str(" ON CONFLICT (device_id, first_seq, last_seq) DO NOTHING;\n");
    }
    super::rollup::literal_upsert(&rollups.rollups, &mut sql, Dialect::Sqlite);
    sql
}

/// The commands whose results accepted light syncs of the group bring.
fn result_ids(plan: &Plan, group: &[Job]) -> Vec<i64> {
    let mut ids: Vec<i64> = group
        .iter()
        .zip(&plan.answers)
        .filter(|(_, a)| a.is_ok())
        .filter_map(|(j, _)| j.record.as_ref())
        .flat_map(|r| r.results.iter().map(|(id, _)| *id))
        .collect();
    ids.sort_unstable();
    ids.dedup();
    ids
}

/// A command's row as a result finds it: its device and status.
fn command_state<R: Row>(row: &R) -> StoreResult<(i64, (i64, String))>
where
    for<'r> i64: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    for<'r> String: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    for<'r> &'r str: sqlx::ColumnIndex<R>,
{
    Ok((row.try_get("id")?, (row.try_get("device_id")?, row.try_get("status")?)))
}

/// A command's result as recorded.
struct ResultWrite {
    id: i64,
    status: &'static str,
    completed: i64,
    executed: Option<i64>,
    message: String,
    exception: Option<i64>,
    value: Option<i64>,
}

/// What the group's light syncs record.
#[derive(Default)]
struct Records {
    results: Vec<ResultWrite>,
    control: Vec<(i64, String)>,
}

/// The light syncs' writes, in arrival order: each result of an accepted
/// sync for a command of its own device recorded by the commands' rule
/// (once: a repeat, or a second result in the group, changes nothing; one
/// for a command not the device's is ignored, as alone), and its control
/// state.
fn records(plan: &Plan, group: &[Job], statuses: Vec<(i64, (i64, String))>) -> Records {
    let mut states: HashMap<i64, (i64, String)> = statuses.into_iter().collect();
    let mut out = Records::default();
    for (job, answer) in group.iter().zip(&plan.answers) {
        let (Some(record), Ok(_)) = (&job.record, answer) else { continue };
        for (id, outcome) in &record.results {
            let Some((device, status)) = states.get_mut(id) else {
                tracing::warn!(
                    device_id = job.device_id.0,
                    command = id,
                    "result for an unknown command"
                );
                continue;
            };
            let Some(current) = CommandStatus::parse(status).filter(|_| *device == job.device_id.0)
            else {
                tracing::warn!(
                    device_id = job.device_id.0,
                    command = id,
                    "result for an unknown command"
                );
                continue;
            };
            let ResultEffect::Record { status: next, late } = result_effect(current, outcome)
            else {
                continue;
            };
            *status = next.as_str().to_owned();
            out.results.push(ResultWrite {
                id: *id,
                status: next.as_str(),
                completed: job.now,
                executed: outcome.executed_ms,
                message: crate::commands::result_text(outcome, late),
                exception: outcome.exception_code.map(i64::from),
                value: outcome.value.map(i64::from),
            });
        }
        if let Some(c) = &record.control_reported {
            out.control.push((job.device_id.0, c.clone()));
        }
    }
    out
}

/// The light syncs' writes appended to the group's SQLite script. Text goes
/// as hex blob literals cast to text: nothing but integers and hex is inlined.
fn sqlite_records(sql: &mut String, records: &Records) {
    use std::fmt::Write as _;
    let text =
        |s: &str| format!("CAST(X'{}' AS TEXT)", ecowatt_proto::hex::encode_upper(s.as_bytes()));
    let num = |v: Option<i64>| v.map_or("NULL".to_owned(), |v| v.to_string());
    for w in &records.results {
        let _ = writeln!(
            sql,
            "UPDATE commands SET status = '{}', completed_ms = {}, executed_ms = {}, result_message = {}, \
             exception_code = {}, result_value = {} WHERE id = {};",
            w.status,
            w.completed,
            num(w.executed),
            text(&w.message),
            num(w.exception),
            num(w.value),
            w.id
        );
    }
    for (id, c) in &records.control {
        let _ = writeln!(sql, "UPDATE devices SET control_reported = {} WHERE id = {id};", text(c));
    }
}

/// What a group does: the answers in order, each touched device's new row
/// values (`id`, windows, counters, last seen, stored seq), the uploads to
/// store, and those of them that may repeat stored samples, each with the
/// ranges earlier uploads of the group cover for its device.
struct Plan {
    answers: Vec<Result<Accepted, SyncRefusal>>,
    updates: Vec<[i64; 9]>,
    accepted: Vec<usize>,
    overlaps: Vec<(usize, Vec<(i64, i64)>)>,
}

/// The checks on the rows read.
fn plan(rows: Vec<(i64, DeviceState)>, group: &[Job]) -> Plan {
    let mut devices: HashMap<i64, DeviceState> = rows.into_iter().collect();
    // The checks, in arrival order, on the rows as the group leaves them.
    let mut answers = Vec::with_capacity(group.len());
    let mut accepted = Vec::with_capacity(group.len());
    let mut overlaps = Vec::new();
    // Ranges stored by this group so far, by device (rarely more than one).
    let mut in_group: HashMap<i64, Vec<(i64, i64)>> = HashMap::new();
    for (i, job) in group.iter().enumerate() {
        let Some(d) = devices.get_mut(&job.device_id.0) else {
            answers.push(Err(SyncRefusal::Disabled)); // removed while its upload waited
            continue;
        };
        let window = match slot_of(job.key_version, d.key_version, d.previous_key_version) {
            Some(KeySlot::Current) => &mut d.current,
            Some(KeySlot::Previous) => &mut d.previous,
            None => {
                answers.push(Err(SyncRefusal::StaleKey));
                continue;
            }
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
        answers
            .push(Ok(Accepted { down_counter: d.down_counter as u64, unconfirmed: d.unconfirmed }));
        if let Some(b) = &job.batch {
            accepted.push(i);
            if b.first_seq <= d.stored_seq {
                overlaps.push((i, in_group.get(&job.device_id.0).cloned().unwrap_or_default()));
            }
            d.stored_seq = d.stored_seq.max(b.last_seq);
            in_group.entry(job.device_id.0).or_default().push((b.first_seq, b.last_seq));
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
                d.stored_seq,
            ]
        })
        .collect();
    Plan { answers, updates, accepted, overlaps }
}
