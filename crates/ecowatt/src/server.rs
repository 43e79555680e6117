//! `ecowatt server`: the cloud server.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context;
use clap::Args;
use ecowatt_server::settings::{Settings, SettingsFile};

/// Run the cloud server: operator API, store, and (optionally) the seed's legacy API.
///
/// Settings come from defaults, then the TOML file given with --config, then
/// environment variables and flags. The first start creates an admin token in
/// DATA_DIR/admin.token, where the other commands find it.
#[derive(Args, Debug)]
pub struct ServerArgs {
    /// TOML settings file (keys: bind, data_dir, database, legacy_api, body_limit_bytes, public_url).
    #[arg(long, env = "ECOWATT_CONFIG")]
    config: Option<PathBuf>,
    /// Listen address [default: 127.0.0.1:5001].
    #[arg(long, env = "ECOWATT_BIND")]
    bind: Option<SocketAddr>,
    /// Data directory: SQLite database and admin token [default: ./ecowatt-data].
    #[arg(long, env = "ECOWATT_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// Database URL: postgres://USER@HOST/DB for PostgreSQL [default: SQLite in the data directory].
    #[arg(long, env = "ECOWATT_DATABASE", hide_env_values = true)]
    database: Option<String>,
    /// Serve the seed's unauthenticated plain-JSON API (/changes, /command/*, /ota/*) for original firmware.
    #[arg(long, env = "ECOWATT_LEGACY_API")]
    legacy_api: bool,
    /// Largest request body in bytes [default: 65536].
    #[arg(long, env = "ECOWATT_BODY_LIMIT")]
    body_limit: Option<usize>,
    /// URL devices use to reach this server, written into provisioning files [default: http://BIND].
    #[arg(long, env = "ECOWATT_PUBLIC_URL")]
    public_url: Option<String>,
    /// Trust firmware signed by this Ed25519 public key: the `.pub` file from `ecowatt keygen`, or its hex (repeatable).
    #[arg(long = "firmware-key")]
    firmware_keys: Vec<String>,
}

pub fn run(args: ServerArgs) -> anyhow::Result<()> {
    let file = match &args.config {
        Some(path) => SettingsFile::load(path).map_err(anyhow::Error::msg)?,
        None => SettingsFile::default(),
    };
    let flags = SettingsFile {
        bind: args.bind,
        data_dir: args.data_dir,
        database: args.database,
        legacy_api: args.legacy_api.then_some(true),
        body_limit_bytes: args.body_limit,
        public_url: args.public_url,
        firmware_keys: if args.firmware_keys.is_empty() {
            None
        } else {
            Some(
                args.firmware_keys
                    .iter()
                    .map(|k| match std::fs::read_to_string(k) {
                        Ok(text) => text.trim().to_owned(),
                        Err(_) => k.trim().to_owned(),
                    })
                    .collect(),
            )
        },
    };
    let settings = Settings::resolve(file.overridden_by(flags)).map_err(anyhow::Error::msg)?;
    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::bind(settings.bind)
            .await
            .with_context(|| format!("cannot listen on {}", settings.bind))?;
        let legacy = settings.legacy_api;
        let data_dir = settings.data_dir.clone();
        let prepared = ecowatt_server::run::prepare(settings).await?;
        let backend = prepared.state.store.backend();
        tracing::info!(address = %listener.local_addr()?, backend, data_dir = %data_dir.display(), "EcoWatt server listening");
        if let Some(path) = &prepared.admin_token_file {
            tracing::info!(path = %path.display(), "first start: admin token written (the CLI reads it from there)");
        }
        if legacy {
            tracing::warn!(
                "legacy API enabled: /changes, /config/update, /command/* and /ota/* accept UNAUTHENTICATED requests; \
                 anyone who can reach this server can queue inverter commands. Use it only to migrate original firmware."
            );
        }
        println!("EcoWatt server on http://{} (API docs: /api/docs)", listener.local_addr()?);
        ecowatt_server::run::serve(listener, prepared.state, async {
            let _ = tokio::signal::ctrl_c().await;
            tracing::info!("shutting down: finishing requests in flight");
        })
        .await?;
        Ok(())
    })
}
