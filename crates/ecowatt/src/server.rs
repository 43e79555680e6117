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
    /// TOML settings file (keys as in docs/server.md: bind, data_dir, database, legacy_api, body_limit_bytes, public_url, timeouts, caps, retention, tls_*; [legacy] as in docs/migration.md).
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
    /// Serve the seed's unauthenticated plain-JSON API (/changes, /command/*, /process, /ota/*) for original firmware (docs/migration.md).
    #[arg(long, env = "ECOWATT_LEGACY_API")]
    legacy_api: bool,
    /// Publish readings, availability and Home Assistant discovery to this MQTT broker:
    /// mqtt://[user:password@]host[:port], or mqtts:// for TLS (docs/mqtt.md; more keys in the settings file).
    #[arg(long, env = "ECOWATT_MQTT", hide_env_values = true, value_name = "URL")]
    mqtt: Option<String>,
    /// CA certificate (PEM) of an mqtts:// broker's private PKI [default: the system's roots].
    #[arg(long, env = "ECOWATT_MQTT_CA_FILE", value_name = "PEM")]
    mqtt_ca_file: Option<PathBuf>,
    /// Also take the device protocol from this MQTT broker (devices publish their sealed requests
    /// there; several servers split them with a shared subscription): mqtt://[user:password@]host[:port]
    /// or mqtts:// (docs/protocol.md; `ecowatt broker mosquitto` writes the broker's accounts and ACL).
    #[arg(long, env = "ECOWATT_DEVICE_BROKER", hide_env_values = true, value_name = "URL")]
    device_broker: Option<String>,
    /// CA certificate (PEM) of an mqtts:// device broker [default: the system's roots].
    #[arg(long, env = "ECOWATT_DEVICE_BROKER_CA_FILE", value_name = "PEM")]
    device_broker_ca_file: Option<PathBuf>,
    /// Shared-subscription group of the server processes on the device broker [default: ecowatt].
    #[arg(long, env = "ECOWATT_DEVICE_BROKER_GROUP", value_name = "NAME")]
    device_broker_group: Option<String>,
    /// Serve HTTPS with this certificate chain (PEM, leaf first; with --tls-key). Reloaded
    /// without dropping connections when the files change or on SIGHUP.
    #[arg(long, env = "ECOWATT_TLS_CERT", value_name = "PEM", requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// The certificate's private key (PEM).
    #[arg(long, env = "ECOWATT_TLS_KEY", value_name = "PEM", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// Also listen here for plain HTTP (e.g. 0.0.0.0:80): the device protocol and ACME challenges
    /// are served, everything else is redirected to HTTPS.
    #[arg(long, env = "ECOWATT_TLS_REDIRECT_FROM", value_name = "ADDR")]
    tls_redirect_from: Option<SocketAddr>,
    /// Get the HTTPS certificate for this public host name by ACME (Let's Encrypt; repeatable;
    /// needs --tls-redirect-from on port 80 for the HTTP-01 challenge). Renewed by itself.
    #[arg(
        long = "acme-domain",
        env = "ECOWATT_ACME_DOMAINS",
        value_delimiter = ',',
        value_name = "NAME",
        conflicts_with = "tls_cert"
    )]
    acme_domains: Vec<String>,
    /// A contact address for the CA (expiry warnings).
    #[arg(long, env = "ECOWATT_ACME_CONTACT", value_name = "EMAIL")]
    acme_contact: Option<String>,
    /// The ACME directory URL [default: Let's Encrypt's production directory].
    #[arg(long, env = "ECOWATT_ACME_DIRECTORY", value_name = "URL")]
    acme_directory: Option<String>,
    /// The CA (PEM) of an ACME directory with a private PKI (a test CA).
    #[arg(long, env = "ECOWATT_ACME_CA_FILE", value_name = "PEM")]
    acme_ca_file: Option<PathBuf>,
    /// The key firmware images are encrypted with at rest; servers sharing one database
    /// need the same file [default: DATA_DIR/image.key, made at the first start].
    #[arg(long, env = "ECOWATT_IMAGE_KEY_FILE", value_name = "FILE")]
    image_key_file: Option<PathBuf>,
    /// Largest request body in bytes [default: 65536].
    #[arg(long, env = "ECOWATT_BODY_LIMIT")]
    body_limit: Option<usize>,
    /// URL devices use to reach this server, written into provisioning files [default: http://BIND].
    #[arg(long, env = "ECOWATT_PUBLIC_URL")]
    public_url: Option<String>,
    /// Trust firmware signed by this public key (Ed25519 or RSA-2048): the `.pub` file from `ecowatt keygen`, or its hex (repeatable).
    #[arg(long = "firmware-key")]
    firmware_keys: Vec<String>,
    /// Seconds from a request's first byte to the end of its header [default: 10].
    #[arg(long, env = "ECOWATT_HEADER_TIMEOUT", value_name = "SECS")]
    header_timeout: Option<f64>,
    /// Seconds a request body may take to arrive, plus 1 s per 128 KiB [default: 30].
    #[arg(long, env = "ECOWATT_BODY_TIMEOUT", value_name = "SECS")]
    body_timeout: Option<f64>,
    /// Seconds a connection may wait for its next request [default: 60].
    #[arg(long, env = "ECOWATT_IDLE_TIMEOUT", value_name = "SECS")]
    idle_timeout: Option<f64>,
    /// Seconds a response may wait for a client that does not read it [default: 30].
    #[arg(long, env = "ECOWATT_SEND_TIMEOUT", value_name = "SECS")]
    send_timeout: Option<f64>,
    /// Open connections in all [default: the open-files limit minus 128].
    #[arg(long, env = "ECOWATT_MAX_CONNECTIONS")]
    max_connections: Option<usize>,
    /// Open connections from one address (raise it for many devices behind one NAT) [default: 256].
    #[arg(long, env = "ECOWATT_MAX_CONNECTIONS_PER_SOURCE")]
    max_connections_per_source: Option<usize>,
    /// Seconds requests in flight get to finish after Ctrl-C or SIGTERM [default: 5].
    #[arg(long, env = "ECOWATT_SHUTDOWN_GRACE", value_name = "SECS")]
    shutdown_grace: Option<f64>,
    /// Refused requests one address may cause per minute before it gets 429 [default: 120].
    #[arg(long, env = "ECOWATT_REFUSALS_PER_MINUTE")]
    refusals_per_minute: Option<u32>,
    /// Days security events are kept, 0 for ever [default: 30].
    #[arg(long, env = "ECOWATT_SECURITY_EVENT_RETENTION_DAYS", value_name = "DAYS")]
    security_event_retention_days: Option<u32>,
    /// Days audit entries are kept, 0 for ever [default: 365].
    #[arg(long, env = "ECOWATT_AUDIT_RETENTION_DAYS", value_name = "DAYS")]
    audit_retention_days: Option<u32>,
    /// Days raw telemetry batches are kept (the rollups stay), 0 for ever; fractions allowed [default: 90].
    #[arg(long, env = "ECOWATT_TELEMETRY_RETENTION_DAYS", value_name = "DAYS")]
    telemetry_retention_days: Option<f64>,
    /// Days 5-minute rollups are kept, 0 for ever (hour and day rollups stay) [default: 35].
    #[arg(long, env = "ECOWATT_ROLLUP_5M_RETENTION_DAYS", value_name = "DAYS")]
    rollup_5m_retention_days: Option<u32>,
    /// Telemetry codec versions offered to devices, e.g. `1` to keep a fleet on
    /// v1 (1 is always offered) [default: 1,2].
    #[arg(long, env = "ECOWATT_TELEMETRY_CODECS", value_delimiter = ',', value_name = "VERSIONS")]
    telemetry_codecs: Vec<u8>,
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
        header_timeout_secs: args.header_timeout,
        body_timeout_secs: args.body_timeout,
        idle_timeout_secs: args.idle_timeout,
        send_timeout_secs: args.send_timeout,
        max_connections: args.max_connections,
        max_connections_per_source: args.max_connections_per_source,
        shutdown_grace_secs: args.shutdown_grace,
        refusals_per_minute: args.refusals_per_minute,
        security_event_retention_days: args.security_event_retention_days,
        telemetry_retention_days: args.telemetry_retention_days,
        rollup_5m_retention_days: args.rollup_5m_retention_days,
        audit_retention_days: args.audit_retention_days,
        telemetry_codecs: (!args.telemetry_codecs.is_empty()).then_some(args.telemetry_codecs),
        legacy: None,
        mqtt: args.mqtt,
        mqtt_client_id: None,
        mqtt_prefix: None,
        mqtt_discovery_prefix: None,
        mqtt_buffer: None,
        mqtt_ca_file: args.mqtt_ca_file,
        device_broker: args.device_broker,
        device_broker_ca_file: args.device_broker_ca_file,
        device_broker_client_id: None,
        device_broker_group: args.device_broker_group,
        device_broker_prefix: None,
        device_broker_in_flight: None,
        tls_cert: args.tls_cert,
        tls_key: args.tls_key,
        tls_redirect_from: args.tls_redirect_from,
        image_key_file: args.image_key_file,
        acme_domains: (!args.acme_domains.is_empty()).then_some(args.acme_domains),
        acme_contact: args.acme_contact,
        acme_directory: args.acme_directory,
        acme_ca_file: args.acme_ca_file,
    };
    // Before the settings: the default connection cap follows the limit.
    let open_files = ecowatt_edge::raise_open_files_limit();
    let settings = Settings::resolve(file.overridden_by(flags)).map_err(anyhow::Error::msg)?;
    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::bind(settings.bind)
            .await
            .with_context(|| format!("cannot listen on {}", settings.bind))?;
        let legacy = settings.legacy_api;
        let data_dir = settings.data_dir.clone();
        let prepared = ecowatt_server::run::prepare(settings).await?;
        let backend = prepared.state.store.db().backend();
        let limits = prepared.state.settings.limits;
        tracing::info!(address = %listener.local_addr()?, backend, data_dir = %data_dir.display(),
            open_files, max_connections = limits.max_connections, per_source = limits.max_per_source,
            "EcoWatt server listening");
        if let Some(path) = &prepared.admin_token_file {
            tracing::info!(path = %path.display(), "first start: admin token written (the CLI reads it from there)");
        }
        if legacy {
            tracing::warn!(
                "legacy API enabled: /changes, /config/update, /command/*, /process and /ota/* accept UNAUTHENTICATED requests \
                 (or requests under the original firmware's shared key); anyone who can reach this server can queue inverter \
                 commands. Use it only to migrate original firmware (docs/migration.md)."
            );
        }
        let scheme = if prepared.state.settings.tls.is_some() { "https" } else { "http" };
        if let Some(tls) = &prepared.state.settings.tls {
            tracing::info!(?tls, "HTTPS: TLS 1.2/1.3, certificate reloaded on change or SIGHUP");
        }
        outln!("EcoWatt server on {scheme}://{} (API docs: /api/docs)", listener.local_addr()?);
        let grace = limits.shutdown_grace;
        ecowatt_server::run::serve(listener, prepared.state, async move {
            crate::signals::stop_requested().await;
            tracing::info!(grace_ms = grace.as_millis() as u64,
                "shutting down: long polls answered now, requests in flight finish (a second Ctrl-C stops at once)");
        })
        .await?;
        tracing::info!("server stopped");
        Ok(())
    })
}

/// A server running inside this process, on a listener already bound (the
/// demo, and the benches that measure the server without a child process).
pub struct InProcess {
    /// Its base URL.
    pub url: String,
    /// The admin token (read from the data directory).
    pub admin_token: String,
    /// Its state: the aggregates, for provisioning without going through HTTP.
    pub state: ecowatt_server::api::AppState,
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<std::io::Result<()>>,
}

impl InProcess {
    /// Starts a server on `listener` with `file`'s settings (its bind address
    /// is the listener's; `data_dir` must be set).
    pub async fn start(
        listener: tokio::net::TcpListener,
        file: SettingsFile,
    ) -> anyhow::Result<InProcess> {
        let addr = listener.local_addr()?;
        let settings = Settings::resolve(SettingsFile { bind: Some(addr), ..file })
            .map_err(anyhow::Error::msg)?;
        let token_file = settings.data_dir.join(ecowatt_server::settings::ADMIN_TOKEN_FILE);
        let prepared = ecowatt_server::run::prepare(settings).await?;
        let admin_token = std::fs::read_to_string(&token_file)
            .with_context(|| format!("reading {}", token_file.display()))?
            .trim()
            .to_owned();
        let state = prepared.state.clone();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(ecowatt_server::run::serve(listener, prepared.state, async {
            let _ = stopped.await;
        }));
        let scheme = if state.settings.tls.is_some() { "https" } else { "http" };
        Ok(InProcess { url: format!("{scheme}://{addr}"), admin_token, state, stop, task })
    }

    /// Stops it gracefully and waits.
    pub async fn stop(self) -> anyhow::Result<()> {
        let _ = self.stop.send(());
        Ok(self.task.await??)
    }
}
