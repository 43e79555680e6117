//! The database core every aggregate builds on: the pools, the dialect and
//! the few SQL fragments that differ between SQLite and PostgreSQL, write
//! transactions that announce their news only once they commit, the
//! migrations, the SQLite file checks and the write probe behind `/healthz`.
//!
//! Queries use `$N` placeholders, which both databases accept. Write
//! transactions on SQLite start with `BEGIN IMMEDIATE` on a pool of one
//! connection, so writers queue there (fairly, without sleeping) instead of
//! in SQLite's busy handler; on PostgreSQL, rows a transaction will change
//! are read `FOR UPDATE` ([`Db::for_update`]).

pub mod migrate;
pub mod sqlite_file;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use sqlx::any::{AnyPoolOptions, AnyRow};
use sqlx::{Any, AnyConnection, AnyPool, Connection, Executor, Row, Transaction};

use crate::domain::Invalid;
use crate::news::News;

/// A PostgreSQL statement with its bound values (the typed driver's,
/// where a statement binds arrays).
pub type PgQuery<'q> = sqlx::query::Query<'q, sqlx::Postgres, sqlx::postgres::PgArguments>;

/// Why a store operation failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// No such record.
    #[error("{0} not found")]
    NotFound(String),
    /// The change conflicts with the current state (duplicate name, finished command).
    #[error("{0}")]
    Conflict(String),
    /// The value is not valid.
    #[error(transparent)]
    Invalid(#[from] Invalid),
    /// The database failed.
    #[error("database: {0}")]
    Db(#[from] sqlx::Error),
    /// A stored value could not be decoded (a bug or a tampered database).
    #[error("corrupt stored value: {0}")]
    Corrupt(String),
    /// The database cannot be used as it is (not a database, cut short, or
    /// missing where one was), with what to do.
    #[error("{0}")]
    Unusable(String),
    /// A change refused by a rule, with the rule's stable code.
    #[error("{message}")]
    Refused {
        /// The stable code (`last_admin_token`, ...).
        code: &'static str,
        /// What the rule is.
        message: String,
    },
}

/// Result of a store operation.
pub type StoreResult<T> = Result<T, StoreError>;

/// A stored value that does not decode.
pub fn corrupt(what: &str, e: impl std::fmt::Display) -> StoreError {
    StoreError::Corrupt(format!("{what}: {e}"))
}

/// A JSON text column, decoded.
pub fn json_col<T: serde::de::DeserializeOwned>(row: &AnyRow, col: &str) -> StoreResult<T> {
    let text: String = row.try_get(col)?;
    serde_json::from_str(&text).map_err(|e| corrupt(col, e))
}

/// The SQL dialect behind the pools.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dialect {
    /// SQLite 3.35 or newer (bundled).
    Sqlite,
    /// PostgreSQL 12 or newer.
    Postgres,
}

/// A read transaction (a consistent snapshot of several queries).
pub type Tx = Transaction<'static, Any>;

/// The database: pools, dialect, and the news its writes announce.
#[derive(Clone)]
pub struct Db {
    pool: AnyPool,
    /// Where write transactions run: on SQLite a pool of one connection; on
    /// PostgreSQL the same pool as reads.
    writer: AnyPool,
    dialect: Dialect,
    url: Arc<str>,
    news: Arc<News>,
    /// This open created the schema (the database was empty).
    created: Arc<AtomicBool>,
    /// The last write probe: when, and whether it wrote.
    health: Arc<tokio::sync::Mutex<Option<(Instant, bool)>>>,
}

/// The size of the PostgreSQL database at `url`, bytes (for benches that
/// watch retention keep it flat).
pub async fn postgres_bytes(url: &str) -> StoreResult<u64> {
    let mut conn = sqlx::PgConnection::connect(url).await?;
    let row = sqlx::query("SELECT pg_database_size(current_database()) AS n")
        .fetch_one(&mut conn)
        .await?;
    let n: i64 = row.try_get("n")?;
    conn.close().await?;
    Ok(n.max(0) as u64)
}

/// The URL of the SQLite database file at `path` (created when missing).
pub fn sqlite_url(path: &std::path::Path) -> String {
    format!("sqlite://{}?mode=rwc", path.display())
}

/// Whether a pooled connection may be handed out: not when sqlx still counts
/// it inside a transaction. A rollback queued when a transaction was dropped
/// runs before the ping returns, so only a connection whose rollback failed
/// (SQLite had already rolled back by itself: a full disk) is refused, and
/// the pool opens a new one; before, every later write on it failed.
pub async fn healthy<C: Connection>(conn: &mut C) -> Result<bool, sqlx::Error> {
    if !conn.is_in_transaction() {
        return Ok(true);
    }
    conn.ping().await?;
    let ok = !conn.is_in_transaction();
    if !ok {
        tracing::warn!("a database connection was left inside a failed transaction: replaced");
    }
    Ok(ok)
}

/// How long a write probe's answer is reused (`/healthz` may be polled often).
const HEALTH_FRESH: Duration = Duration::from_secs(1);

impl Db {
    /// Opens (creating if needed) the database at `url` and migrates it:
    /// `sqlite://PATH?mode=rwc` or `postgres://...`. Writes announce to `news`.
    pub async fn open(url: &str, news: Arc<News>) -> StoreResult<Db> {
        sqlx::any::install_default_drivers();
        let dialect = if url.starts_with("sqlite:") {
            Dialect::Sqlite
        } else if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            Dialect::Postgres
        } else {
            return Err(StoreError::Invalid(Invalid::new(
                "database",
                "use sqlite://PATH or postgres://USER@HOST/DB",
            )));
        };
        if let Some(path) = sqlite_file::path_of(url)
            && sqlite_file::check(&path)? == sqlite_file::FileState::Database
        {
            // One connection first: a file SQLite cannot read says why now,
            // where the pool would retry it for 30 s and say "timed out".
            let mut conn = AnyConnection::connect(url).await?;
            sqlx::query("SELECT COUNT(*) AS n FROM sqlite_master").fetch_one(&mut conn).await?;
            conn.close().await?;
        }
        let options = |max| {
            AnyPoolOptions::new()
                .max_connections(max)
                .before_acquire(|conn, _| Box::pin(healthy(conn)))
                .after_connect(move |conn, _| {
                    Box::pin(async move {
                        if dialect == Dialect::Sqlite {
                            conn.execute("PRAGMA foreign_keys = ON").await?;
                            conn.execute("PRAGMA busy_timeout = 10000").await?;
                            conn.execute("PRAGMA synchronous = NORMAL").await?;
                            // Statement journals and sorts in memory: no temporary
                            // files to open (a busy server may be short of descriptors).
                            conn.execute("PRAGMA temp_store = MEMORY").await?;
                        }
                        Ok(())
                    })
                })
        };
        let pool = options(if dialect == Dialect::Sqlite { 4 } else { 16 }).connect(url).await?;
        let writer = if dialect == Dialect::Sqlite {
            sqlx::query("PRAGMA journal_mode = WAL").fetch_optional(&pool).await?;
            options(1).connect(url).await?
        } else {
            pool.clone()
        };
        let db = Db {
            pool,
            writer,
            dialect,
            url: url.into(),
            news,
            created: Default::default(),
            health: Default::default(),
        };
        let created = migrate::run(&db).await?;
        db.created.store(created, Ordering::SeqCst);
        Ok(db)
    }

    /// The dialect.
    pub fn dialect(&self) -> Dialect {
        self.dialect
    }

    /// `sqlite` or `postgres`.
    pub fn backend(&self) -> &'static str {
        match self.dialect {
            Dialect::Sqlite => "sqlite",
            Dialect::Postgres => "postgres",
        }
    }

    /// The URL it was opened with.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// Where news of the writes goes.
    pub fn news(&self) -> &Arc<News> {
        &self.news
    }

    /// Whether this open created the schema: the database was empty.
    pub fn created(&self) -> bool {
        self.created.load(Ordering::SeqCst)
    }

    /// The pool reads run on.
    pub fn reader(&self) -> &AnyPool {
        &self.pool
    }

    /// The pool single statements that write run on.
    pub fn writer(&self) -> &AnyPool {
        &self.writer
    }

    /// A read transaction: several queries on one snapshot.
    pub async fn read(&self) -> StoreResult<Tx> {
        Ok(self.pool.begin().await?)
    }

    /// A write transaction; the devices it announces hear of it once it commits.
    pub async fn write(&self) -> StoreResult<WriteTx> {
        let tx = match self.dialect {
            Dialect::Sqlite => self.writer.begin_with("BEGIN IMMEDIATE").await?,
            Dialect::Postgres => self.writer.begin().await?,
        };
        Ok(WriteTx {
            tx,
            db: self.clone(),
            announced: Vec::new(),
            commands_changed: false,
            changed: Vec::new(),
        })
    }

    /// ` FOR UPDATE` on PostgreSQL (SQLite's write lock covers it).
    pub fn for_update(&self) -> &'static str {
        match self.dialect {
            Dialect::Sqlite => "",
            Dialect::Postgres => " FOR UPDATE",
        }
    }

    /// ` FOR UPDATE OF alias` on PostgreSQL: lock one table of a join.
    pub fn for_update_of(&self, alias: &str) -> String {
        match self.dialect {
            Dialect::Sqlite => String::new(),
            Dialect::Postgres => format!(" FOR UPDATE OF {alias}"),
        }
    }

    /// ` FOR UPDATE SKIP LOCKED` on PostgreSQL: rows another server is
    /// working on are left to it.
    pub fn skip_locked(&self) -> &'static str {
        match self.dialect {
            Dialect::Sqlite => "",
            Dialect::Postgres => " FOR UPDATE SKIP LOCKED",
        }
    }

    /// Writes one row (at most once per second; later calls reuse the
    /// answer): whether the store can write now (a full disk, a read-only
    /// file or a stuck connection say no).
    pub async fn writable(&self) -> StoreResult<()> {
        let mut last = self.health.lock().await;
        if let Some((at, ok)) = *last
            && at.elapsed() < HEALTH_FRESH
        {
            return if ok {
                Ok(())
            } else {
                Err(StoreError::Unusable("the store cannot write".into()))
            };
        }
        let probe = tokio::time::timeout(
            Duration::from_secs(5),
            sqlx::query(
                "INSERT INTO store_health (id, at_ms) VALUES (1, $1) \
                 ON CONFLICT (id) DO UPDATE SET at_ms = excluded.at_ms",
            )
            .bind(crate::now_ms())
            .execute(&self.writer),
        )
        .await;
        let result = match probe {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) => Err(StoreError::Db(e)),
            Err(_) => Err(StoreError::Unusable("the write probe took over 5 s".into())),
        };
        *last = Some((Instant::now(), result.is_ok()));
        result
    }

    /// Closes the pools (SQLite then folds its write-ahead log into the file).
    pub async fn close(&self) {
        self.writer.close().await;
        self.pool.close().await;
    }

    /// Test support: leaves the write connection as a full disk left it
    /// before [`healthy`] existed: SQLite ends a transaction on its own, and
    /// sqlx, whose ROLLBACK then fails, still counts it open.
    #[doc(hidden)]
    pub async fn wedge_writer_like_a_full_disk(&self) -> StoreResult<()> {
        let mut tx = self.write().await?;
        sqlx::query("ROLLBACK").execute(&mut *tx).await?;
        drop(tx);
        Ok(())
    }
}

/// A write transaction that announces news (device names whose long polls
/// should wake) only once it commits: on PostgreSQL through `NOTIFY` in the
/// transaction itself (delivered at commit, to every server), and in this
/// process after the commit.
pub struct WriteTx {
    tx: Tx,
    db: Db,
    announced: Vec<String>,
    commands_changed: bool,
    /// Devices whose command results or OTA progress changed (integrations
    /// hear of them).
    changed: Vec<crate::news::Changed>,
}

impl std::ops::Deref for WriteTx {
    type Target = AnyConnection;
    fn deref(&self) -> &AnyConnection {
        &self.tx
    }
}

impl std::ops::DerefMut for WriteTx {
    fn deref_mut(&mut self) -> &mut AnyConnection {
        &mut self.tx
    }
}

impl WriteTx {
    /// The database it writes.
    pub fn db(&self) -> &Db {
        &self.db
    }

    /// `device` has news (a command, a config, an update offer): its long
    /// poll wakes once this transaction commits.
    pub async fn announce(&mut self, device: &str) -> StoreResult<()> {
        if self.db.dialect == Dialect::Postgres {
            sqlx::query("SELECT pg_notify($1, $2)")
                .bind(crate::news::CHANNEL)
                .bind(device)
                .execute(&mut *self.tx)
                .await?;
        }
        self.announced.push(device.to_owned());
        Ok(())
    }

    /// Tells every server process (at commit, on PostgreSQL) on `channel` with `payload`.
    pub async fn notify(&mut self, channel: &str, payload: &str) -> StoreResult<()> {
        if self.db.dialect == Dialect::Postgres {
            sqlx::query("SELECT pg_notify($1, $2)")
                .bind(channel)
                .bind(payload)
                .execute(&mut *self.tx)
                .await?;
        }
        Ok(())
    }

    /// Some command's status changes in this transaction: operators waiting
    /// on a command (`GET /api/v1/commands/{id}?wait_ms=`) re-read theirs
    /// once it commits, in every server process.
    pub async fn commands_changed(&mut self) -> StoreResult<()> {
        if !self.commands_changed {
            self.commands_changed = true;
            self.notify(crate::news::COMMANDS_CHANNEL, "").await?;
        }
        Ok(())
    }

    /// A result of `device`'s was recorded: integrations hear of it after commit.
    pub fn result_recorded(&mut self, device: &str) {
        self.changed.push(crate::news::Changed::Name(device.to_owned()));
    }

    /// Something integrations show of a device changed (its OTA progress):
    /// they hear of it after commit.
    pub fn device_changed(&mut self, device: crate::news::Changed) {
        self.changed.push(device);
    }

    /// Commits, then wakes the long polls of the devices announced (and the
    /// operators waiting on commands, if some changed).
    pub async fn commit(self) -> StoreResult<()> {
        self.tx.commit().await?;
        for device in &self.announced {
            self.db.news.device(device);
        }
        if self.commands_changed {
            self.db.news.commands_changed();
        }
        if !self.changed.is_empty() {
            self.db.news.results_of(self.changed);
        }
        Ok(())
    }
}
