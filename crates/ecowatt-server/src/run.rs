//! Start-up and serving: the data directory, the store, the first admin
//! token, the background sweeps, and the HTTP server on the shared edge
//! (`ecowatt-edge`: time limits, connection caps, graceful shutdown).

use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;

use crate::api::{self, AppState};
use crate::db::StoreError;
use crate::news::News;
use crate::operators::{Role, generate_token, hash_token};
use crate::settings::{ADMIN_TOKEN_FILE, Settings};
use crate::store::Store;

/// Why the server could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The data directory or token file could not be written.
    #[error("{path}: {source}")]
    Io {
        /// The path.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// The store could not be opened or migrated.
    #[error("store: {0}")]
    Store(#[from] StoreError),
    /// No certificate to serve HTTPS with (ACME's files cannot be made or read).
    #[error("HTTPS: {0}")]
    Tls(String),
}

/// The state of a server ready to serve.
pub struct Prepared {
    /// Shared by every handler.
    pub state: AppState,
    /// Where the first admin token was written, if this start created it.
    pub admin_token_file: Option<PathBuf>,
}

/// Creates the data directory, opens and migrates the store, and on the very
/// first start creates an admin token in `DATA_DIR/admin.token`.
pub async fn prepare(mut settings: Settings) -> Result<Prepared, StartError> {
    let io = |path: &PathBuf| {
        let path = path.clone();
        move |source| StartError::Io { path, source }
    };
    std::fs::create_dir_all(&settings.data_dir).map_err(io(&settings.data_dir))?;
    if let Some(acme) = &settings.acme {
        // The certificate obtained before, or a placeholder until the CA answers.
        let unusable = |m: String| StartError::Tls(m);
        crate::acme::ensure_certificate(acme).map_err(|e| unusable(format!("ACME: {e}")))?;
        let tls = ecowatt_edge::Tls::load(&acme.cert(), &acme.key())
            .or_else(|e| {
                // An expired certificate of ours: start on a placeholder and renew.
                tracing::warn!(code = e.code(), error = %e, "ACME certificate unusable; a placeholder until renewed");
                let _ = std::fs::remove_file(acme.cert());
                crate::acme::ensure_certificate(acme).map_err(|e| unusable(format!("ACME: {e}")))?;
                ecowatt_edge::Tls::load(&acme.cert(), &acme.key())
                    .map_err(|e| unusable(format!("ACME: {e}")))
            })?;
        settings.tls = Some(tls);
    }
    let token_path = settings.data_dir.join(ADMIN_TOKEN_FILE);
    // A data directory that held a store (its admin token is there) whose
    // database is gone or empty: never start again empty over it.
    let had_store = token_path.exists();
    if had_store
        && let Some(path) = crate::db::sqlite_file::path_of(&settings.database)
        && crate::db::sqlite_file::check(&path)? != crate::db::sqlite_file::FileState::Database
    {
        return Err(StartError::Store(StoreError::Unusable(format!(
            "{} is missing or empty, but {} shows this data directory held a store: restore the \
             database from a backup; to start a new, empty store instead, move {} away",
            path.display(),
            token_path.display(),
            token_path.display()
        ))));
    }
    let news = Arc::new(News::default());
    let store = Store::open_with(&settings.database, Arc::clone(&news)).await?;
    if had_store && store.created() {
        store.close().await;
        return Err(StartError::Store(StoreError::Unusable(format!(
            "the database {} was empty (its tables were just created), but {} shows this data \
             directory belonged to a store with data: check the database URL, or restore the \
             database; to start a new, empty store, move {} away",
            redacted(&settings.database),
            token_path.display(),
            token_path.display()
        ))));
    }
    store.ingest().keep_raw(settings.telemetry_retention);
    let key_file = settings.image_key_file.clone();
    if let Err(e) = unlock_images(&store, &key_file).await {
        store.close().await;
        return Err(e);
    }
    let operators = store.operators();
    let mut admin_token_file = None;
    if operators.count().await? == 0 {
        let secret = generate_token();
        let now = crate::now_ms();
        operators.create("admin", Role::Admin, &hash_token(&secret), "system", now).await?;
        let path = settings.data_dir.join(ADMIN_TOKEN_FILE);
        ecowatt_formats::secret::write_secret(&path, &secret).map_err(io(&path))?;
        admin_token_file = Some(path);
    }
    let state = AppState::new(store, settings, news);
    Ok(Prepared { state, admin_token_file })
}

/// Loads the image key (making it when no image is sealed yet), checks that
/// every sealed image names it, and seals the images stored in clear.
async fn unlock_images(store: &Store, key_file: &std::path::Path) -> Result<(), StartError> {
    let firmware = store.firmwares();
    let heads = firmware.stored_heads().await?;
    let stored: Vec<[u8; 8]> = heads.iter().filter_map(|(_, _, key_id)| *key_id).collect();
    let unusable = |m: String| StartError::Store(StoreError::Unusable(m));
    let key = crate::firmware::at_rest::ImageKey::load_or_create(key_file, stored.is_empty())
        .map_err(|e| {
            unusable(format!(
                "image key: {e}; the stored firmware images are encrypted under it: copy the image \
                 key file of the server that stored them (setting image_key_file)"
            ))
        })?;
    if let Some(other) = stored.iter().find(|id| **id != key.id()) {
        return Err(unusable(format!(
            "stored firmware images are encrypted under image key {}, but {} holds key {}: give \
             this server the image key file of the server that stored them (setting image_key_file)",
            ecowatt_proto::hex::encode_upper(other),
            key_file.display(),
            key.id_hex()
        )));
    }
    firmware.set_key(key);
    let sealed = firmware.seal_in_clear(&heads).await?;
    if sealed > 0 {
        tracing::info!(
            images = sealed,
            "firmware images stored in clear are now encrypted at rest"
        );
    }
    Ok(())
}

/// A database URL without its password.
fn redacted(url: &str) -> String {
    match (url.split_once("://"), url.rfind('@')) {
        (Some((scheme, rest)), Some(at)) => {
            let user = rest[..at - scheme.len() - 3].split(':').next().unwrap_or("");
            format!("{scheme}://{user}@{}", &url[at + 1..])
        }
        _ => url.to_owned(),
    }
}

/// How often expired commands are swept.
const EXPIRE_EVERY: Duration = Duration::from_secs(5);
/// How often old security events and audit entries are deleted.
const PURGE_EVERY: Duration = Duration::from_secs(3600);

/// Serves the API on `listener` until `shutdown` completes; then answers
/// every waiting long poll at once, lets the requests in flight finish
/// within the settings' shutdown grace, writes the last tallied security
/// events, and returns.
pub async fn serve(
    listener: TcpListener,
    state: AppState,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let background = tokio::spawn(background(state.clone(), stopped));
    let listener_task = state.settings.database.starts_with("postgres").then(|| {
        tokio::spawn(listen_postgres(
            state.settings.database.clone(),
            Arc::clone(&state.news),
            state.devices.clone(),
        ))
    });
    let news = Arc::clone(&state.news);
    let shutdown = async move {
        shutdown.await;
        news.stop();
    };
    let limits = state.settings.limits;
    let mqtt = state.settings.mqtt.clone().map(|settings| {
        crate::mqtt::start(
            settings,
            crate::mqtt::Sources {
                news: Arc::clone(&state.news),
                devices: state.devices.clone(),
                commands: state.commands.clone(),
                configs: state.configs.clone(),
                rollouts: state.rollouts.clone(),
                telemetry: state.telemetry.clone(),
                metrics: Arc::clone(&state.metrics),
            },
        )
    });
    let device_broker =
        state.settings.device_broker.clone().map(|b| crate::broker::start(b, state.clone()));
    let stats = Arc::clone(&state.edge);
    let router = api::app(state.clone());
    let result = match state.settings.tls.clone() {
        None => ecowatt_edge::serve(listener, router, limits, stats, shutdown).await,
        Some(tls) => {
            let challenges = Arc::new(crate::acme::Challenges::default());
            let redirect = match state.settings.tls_redirect_from {
                Some(from) => {
                    let https_port = listener.local_addr()?.port();
                    let (app, answers) = (router.clone(), Arc::clone(&challenges));
                    Some(plain_port(from, https_port, app, answers, &state.settings).await?)
                }
                None => None,
            };
            let acme = state.settings.acme.clone().map(|a| {
                tokio::spawn(crate::acme::run(a, Arc::clone(&challenges), Arc::clone(&tls)))
            });
            let served =
                ecowatt_edge::serve_tls(listener, router, limits, stats, tls, shutdown).await;
            if let Some(task) = acme {
                task.abort();
            }
            if let Some((stop, task)) = redirect {
                let _ = stop.send(());
                let _ = task.await;
            }
            served
        }
    };
    let _ = stop.send(true);
    let _ = background.await;
    if let Some(task) = listener_task {
        task.abort();
    }
    if let Some(task) = device_broker {
        // It answers the long polls it holds, then disconnects (bounded by the grace period).
        let grace = state.settings.limits.shutdown_grace;
        let _ = tokio::time::timeout(grace + Duration::from_secs(3), task).await;
    }
    if let Some(task) = mqtt {
        // It tells the broker the server is offline, then ends.
        let _ = tokio::time::timeout(Duration::from_secs(3), task).await;
    }
    if let Err(e) = state.legacy.hot().flush_seen().await {
        tracing::warn!(error = %e, "cannot write legacy devices' last-seen times");
    }
    state.store.close().await;
    result
}

/// Paths served on the plain port too: the sealed device protocol (devices
/// need no TLS, and the ESP32-C3 firmware speaks plain HTTP) and, when it is
/// on, the legacy API of original firmware (plain by nature).
fn served_in_plain(path: &str, legacy: bool) -> bool {
    const LEGACY: [&str; 5] = ["/changes", "/config/", "/command/", "/process", "/ota/"];
    path.starts_with("/api/v1/device/") || (legacy && LEGACY.iter().any(|p| path.starts_with(p)))
}

/// Listens on `from` for plain HTTP: device traffic ([`served_in_plain`])
/// is served by `app`, every other request is redirected to HTTPS on
/// `https_port`; until told to stop.
async fn plain_port(
    from: std::net::SocketAddr,
    https_port: u16,
    app: axum::Router,
    challenges: Arc<crate::acme::Challenges>,
    settings: &crate::settings::Settings,
) -> std::io::Result<(tokio::sync::oneshot::Sender<()>, tokio::task::JoinHandle<()>)> {
    use tower::ServiceExt;
    let listener = TcpListener::bind(from).await.map_err(|e| {
        std::io::Error::new(e.kind(), format!("cannot listen on {from} (tls_redirect_from): {e}"))
    })?;
    tracing::info!(address = %from, "plain HTTP: device protocol served, everything else redirected to HTTPS");
    let legacy = settings.legacy_api;
    let redirect = ecowatt_edge::redirect_to_https(https_port);
    let acme = axum::Router::new().route(
        "/.well-known/acme-challenge/{token}",
        axum::routing::get(
            move |axum::extract::Path(token): axum::extract::Path<String>| async move {
                use axum::response::IntoResponse;
                match challenges.answer(&token) {
                    Some(answer) => answer.into_response(),
                    None => axum::http::StatusCode::NOT_FOUND.into_response(),
                }
            },
        ),
    );
    let router = axum::Router::new().fallback(move |request: axum::extract::Request| {
        let path = request.uri().path();
        let to = if path.starts_with(crate::acme::CHALLENGE_PATH) {
            &acme
        } else if served_in_plain(path, legacy) {
            &app
        } else {
            &redirect
        };
        to.clone().oneshot(request)
    });
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let stats = Arc::new(ecowatt_edge::Stats::default());
    let limits = settings.limits;
    let task = tokio::spawn(async move {
        let stopped = async {
            let _ = stopped.await;
        };
        if let Err(e) = ecowatt_edge::serve(listener, router, limits, stats, stopped).await {
            tracing::warn!(error = %e, "the plain-HTTP listener failed");
        }
    });
    Ok((stop, task))
}

/// The sweeps: expired commands, tallied security events, retention.
async fn background(state: AppState, mut stopped: tokio::sync::watch::Receiver<bool>) {
    let mut expire = tokio::time::interval(EXPIRE_EVERY);
    let mut flush = tokio::time::interval(crate::security::refusals::FLUSH_EVERY);
    let mut purge = tokio::time::interval(PURGE_EVERY);
    // Raw telemetry goes more often under a short retention (a bench's).
    let raw_every = state
        .settings
        .telemetry_retention
        .map_or(PURGE_EVERY, |keep| (keep / 10).clamp(Duration::from_secs(5), PURGE_EVERY));
    let mut purge_raw = tokio::time::interval(raw_every);
    for tick in [&mut expire, &mut flush, &mut purge, &mut purge_raw] {
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    }
    loop {
        tokio::select! {
            _ = expire.tick() => match state.commands.expire(crate::now_ms()).await {
                Ok(0) => {}
                Ok(n) => tracing::info!(count = n, "commands expired"),
                Err(e) => tracing::warn!(error = %e, "expiring commands failed"),
            },
            _ = flush.tick() => flush_refusals(&state).await,
            _ = purge.tick() => purge_old(&state).await,
            _ = purge_raw.tick() => purge_telemetry(&state, &stopped, raw_every).await,
            _ = stopped.changed() => break,
        }
    }
    flush_refusals(&state).await;
}

/// Raw batches past `telemetry_retention`: on PostgreSQL whole partitions
/// (telemetry/partitions.rs), and rows (SQLite's, PostgreSQL's default
/// partition's) removed in chunks of [`PURGE_CHUNK`] (each its own short
/// transaction, so that ingest groups pass in between); 5-minute rollups
/// past `rollup_5m_retention`.
async fn purge_telemetry(
    state: &AppState,
    stopped: &tokio::sync::watch::Receiver<bool>,
    every: Duration,
) {
    use crate::telemetry::partitions::{AHEAD_MIN, wanted, width_for};
    let now = crate::now_ms();
    // PostgreSQL: partitions made ahead (three widths, two sweeps, ten
    // minutes, whichever is longest), and those wholly past the retention
    // limit dropped.
    let keep = state.settings.telemetry_retention;
    let width = width_for(keep);
    let ahead = (3 * width).max(2 * every.as_millis() as i64).max(AHEAD_MIN);
    if let Err(e) = state.telemetry.make_partitions(&wanted(now, width, ahead)).await {
        tracing::warn!(error = %e, "making telemetry partitions failed");
    }
    if let Some(keep) = keep {
        let before = now - keep.as_millis() as i64;
        match state.telemetry.drop_partitions(before).await {
            Ok(0) => {}
            Ok(n) => {
                state.metrics.add("ecowatt_telemetry_partitions_dropped_total", "", n as u64);
                tracing::info!(count = n, "dropped raw telemetry partitions past retention");
            }
            Err(e) => tracing::warn!(error = %e, "dropping telemetry partitions failed"),
        }
    }
    if let Some(keep) = keep {
        let before = now - keep.as_millis() as i64;
        // Most go with the ingest groups on SQLite; this finds what is left
        // (when no uploads come) and PostgreSQL's default partition's rows.
        let mut total = state.store.ingest().take_purged();
        loop {
            match state.telemetry.purge_raw(before, PURGE_CHUNK).await {
                Ok(n) => {
                    total += n;
                    if n < PURGE_CHUNK as u64 || *stopped.borrow() {
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "telemetry retention sweep failed");
                    break;
                }
            }
        }
        if total > 0 {
            state.metrics.add("ecowatt_telemetry_batches_purged_total", "", total);
            tracing::info!(count = total, "deleted raw telemetry batches past retention");
        }
    }
    if let Some(keep) = state.settings.rollup_5m_retention {
        let before = now - keep.as_millis() as i64;
        let level = crate::telemetry::rollup::Level::Min5;
        if let Err(e) = state.telemetry.purge_rollups(level, before).await {
            tracing::warn!(error = %e, "rollup retention sweep failed");
        }
    }
}

/// Raw batches deleted per transaction by the retention sweep.
const PURGE_CHUNK: i64 = 5_000;

async fn flush_refusals(state: &AppState) {
    if let Err(e) = state.refusals.flush(&state.security_events, crate::now_ms()).await {
        tracing::warn!(error = %e, "could not write the security events tallied (kept for the next try)");
    }
}

async fn purge_old(state: &AppState) {
    let now = crate::now_ms();
    let before = |keep: Duration| now - keep.as_millis() as i64;
    let settings = &state.settings;
    if let Some(keep) = settings.security_event_retention {
        match state.security_events.purge(before(keep)).await {
            Ok(0) => {}
            Ok(n) => tracing::info!(count = n, "deleted security events past retention"),
            Err(e) => tracing::warn!(error = %e, "security event retention sweep failed"),
        }
    }
    if let Some(keep) = settings.audit_retention {
        match crate::operators::audit::purge(state.operators.db(), before(keep)).await {
            Ok(0) => {}
            Ok(n) => tracing::info!(count = n, "deleted audit entries past retention"),
            Err(e) => tracing::warn!(error = %e, "audit retention sweep failed"),
        }
    }
}

/// Forwards PostgreSQL notifications until the task is dropped: device news
/// to `news`, other servers' key changes to the store's copy of the keys
/// (which counts as complete only while this listens: `devices/keys.rs`).
async fn listen_postgres(url: String, news: Arc<News>, devices: crate::devices::Devices) {
    let keys = crate::devices::keys::CHANNEL;
    // Until the listener is up, other servers' news is not heard.
    news.set_hearing(false);
    loop {
        match sqlx::postgres::PgListener::connect(&url).await {
            Ok(mut listener) => match listener
                .listen_all([crate::news::CHANNEL, crate::news::COMMANDS_CHANNEL, keys])
                .await
            {
                Err(e) => tracing::warn!(error = %e, "LISTEN failed"),
                Ok(()) => {
                    news.set_hearing(true);
                    if let Err(e) = devices.reload_keys(true).await {
                        tracing::warn!(error = %e, "cannot reload the devices' keys");
                    }
                    loop {
                        match listener.recv().await {
                            Ok(n) if n.channel() == keys => {
                                let id =
                                    crate::devices::DeviceId(n.payload().parse().unwrap_or(-1));
                                if let Err(e) = devices.refresh_keys(id).await {
                                    // Start over: the reload after reconnecting
                                    // makes the copy whole again.
                                    tracing::warn!(error = %e, "cannot read a device's new keys");
                                    break;
                                }
                            }
                            Ok(n) if n.channel() == crate::news::COMMANDS_CHANNEL => {
                                news.commands_changed()
                            }
                            Ok(n) => news.device(n.payload()),
                            Err(e) => {
                                tracing::warn!(error = %e, "notification listener lost its connection");
                                break;
                            }
                        }
                    }
                }
            },
            Err(e) => tracing::warn!(error = %e, "notification listener cannot connect"),
        }
        devices.keys_unheard();
        news.set_hearing(false);
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}
