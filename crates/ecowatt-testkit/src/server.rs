//! Server fixtures: a throw-away database on either backend, and a server
//! on port 0.
//!
//! PostgreSQL databases are created on the server named by
//! `ECOWATT_TEST_PG_URL` (e.g. `postgres://postgres@127.0.0.1:5432/postgres`),
//! one per fixture, named `ecowatt_t_<random>`, and dropped by
//! [`TempDb::cleanup`].

use std::net::SocketAddr;
use std::path::PathBuf;

use sqlx::Connection;
use tokio::net::TcpListener;
use tokio::sync::oneshot;

use ecowatt_server::api::AppState;
use ecowatt_server::run;
use ecowatt_server::settings::{ADMIN_TOKEN_FILE, Settings, SettingsFile};

/// Environment variable naming the PostgreSQL server for tests.
pub const PG_ENV: &str = "ECOWATT_TEST_PG_URL";

/// A database that exists for one test.
pub struct TempDb {
    /// Its URL.
    pub url: String,
    /// The data directory (SQLite file lives here).
    pub dir: tempfile::TempDir,
    pg: Option<(String, String)>,
}

impl TempDb {
    /// A fresh SQLite database in a temporary directory.
    pub fn sqlite() -> TempDb {
        let dir = tempfile::tempdir().expect("temp dir");
        let url = ecowatt_server::db::sqlite_url(&dir.path().join("ecowatt.db"));
        TempDb { url, dir, pg: None }
    }

    /// A fresh SQLite database in a new directory inside `parent` (a small
    /// file system a test fills, say).
    pub fn sqlite_in(parent: &std::path::Path) -> TempDb {
        let dir = tempfile::tempdir_in(parent).expect("temp dir");
        let url = ecowatt_server::db::sqlite_url(&dir.path().join("ecowatt.db"));
        TempDb { url, dir, pg: None }
    }

    /// A fresh PostgreSQL database, or `None` when `ECOWATT_TEST_PG_URL` is unset.
    pub async fn postgres() -> Option<TempDb> {
        let admin = std::env::var(PG_ENV).ok()?;
        Some(TempDb::postgres_at(&admin, "ecowatt_t").await)
    }

    /// A fresh PostgreSQL database named `PREFIX_<random>` on the server at `admin`.
    pub async fn postgres_at(admin: &str, prefix: &str) -> TempDb {
        let admin = admin.to_owned();
        let name = format!("{prefix}_{}", ecowatt_server::random_hex(6));
        let mut conn =
            sqlx::PgConnection::connect(&admin).await.expect("connect to ECOWATT_TEST_PG_URL");
        sqlx::query(&format!("CREATE DATABASE {name}"))
            .execute(&mut conn)
            .await
            .expect("create test database");
        conn.close().await.ok();
        let base = admin.rsplit_once('/').map_or(admin.as_str(), |(b, _)| b);
        let url = format!("{base}/{name}");
        TempDb { url, dir: tempfile::tempdir().expect("temp dir"), pg: Some((admin, name)) }
    }

    /// Both backends where available: SQLite always, PostgreSQL when configured.
    pub async fn each() -> Vec<TempDb> {
        let mut dbs = vec![TempDb::sqlite()];
        match TempDb::postgres().await {
            Some(pg) => dbs.push(pg),
            None => eprintln!("note: {PG_ENV} is unset; PostgreSQL part skipped"),
        }
        dbs
    }

    /// The backend's name.
    pub fn backend(&self) -> &'static str {
        if self.pg.is_some() { "postgres" } else { "sqlite" }
    }

    /// Drops a PostgreSQL test database (call when the stores are closed).
    pub async fn cleanup(self) {
        if let Some((admin, name)) = self.pg {
            if let Ok(mut conn) = sqlx::PgConnection::connect(&admin).await {
                let _ = sqlx::query(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                    .execute(&mut conn)
                    .await;
            }
        }
    }
}

/// A server on a loopback port 0.
pub struct TestServer {
    /// Its base URL.
    pub url: String,
    /// Its address.
    pub addr: SocketAddr,
    /// The admin token created on first start.
    pub admin_token: String,
    /// Its state (store, metrics).
    pub state: AppState,
    /// Its data directory.
    pub data_dir: PathBuf,
    stop: Option<oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl TestServer {
    /// Starts a server on `db`, with the legacy API if asked.
    pub async fn start(db: &TempDb, legacy_api: bool) -> TestServer {
        TestServer::start_on(db, legacy_api, "127.0.0.1:0").await
    }

    /// Starts a server on `db` listening on `addr` (to restart one on its old port).
    pub async fn start_on(db: &TempDb, legacy_api: bool, addr: &str) -> TestServer {
        TestServer::start_with(db, legacy_api, addr, Vec::new()).await
    }

    /// Starts a server trusting these firmware public keys (hex).
    pub async fn start_with(
        db: &TempDb,
        legacy_api: bool,
        addr: &str,
        firmware_keys: Vec<String>,
    ) -> TestServer {
        let file = SettingsFile {
            legacy_api: Some(legacy_api),
            firmware_keys: Some(firmware_keys),
            ..SettingsFile::default()
        };
        TestServer::start_tuned(db, addr, file).await
    }

    /// Starts a server with these settings (its bind address, data
    /// directory and database are the fixture's).
    pub async fn start_tuned(db: &TempDb, addr: &str, file: SettingsFile) -> TestServer {
        let listener = TcpListener::bind(addr).await.expect("bind");
        let addr = listener.local_addr().expect("address");
        let file = SettingsFile {
            bind: Some(addr),
            data_dir: Some(db.dir.path().to_path_buf()),
            database: Some(db.url.clone()),
            ..file
        };
        let settings = Settings::resolve(file).expect("settings");
        let data_dir = settings.data_dir.clone();
        let prepared = run::prepare(settings).await.expect("server starts");
        let admin_token = std::fs::read_to_string(data_dir.join(ADMIN_TOKEN_FILE))
            .expect("admin token file")
            .trim()
            .to_owned();
        let state = prepared.state.clone();
        let (stop, stopped) = oneshot::channel();
        let task = tokio::spawn(async move {
            run::serve(listener, prepared.state, async {
                let _ = stopped.await;
            })
            .await
            .expect("serve");
        });
        let scheme = if state.settings.tls.is_some() { "https" } else { "http" };
        TestServer {
            url: format!("{scheme}://{addr}"),
            addr,
            admin_token,
            state,
            data_dir,
            stop: Some(stop),
            task: Some(task),
        }
    }

    /// Writes the security events tallied so far (the server does every 5 s).
    pub async fn flush_security_events(&self) {
        self.state
            .refusals
            .flush(&self.state.security_events, ecowatt_formats::time::now_ms())
            .await
            .expect("flush");
    }

    /// Stops the server and waits for it.
    pub async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
    }
}
