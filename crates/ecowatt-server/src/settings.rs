//! Server settings: defaults, overridden by an optional TOML file, overridden
//! by environment variables and flags (the CLI merges those two).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

/// Default listen address (the seed's port).
pub const DEFAULT_BIND: &str = "127.0.0.1:5001";
/// Default data directory.
pub const DEFAULT_DATA_DIR: &str = "./ecowatt-data";
/// Default request body limit, bytes.
pub const DEFAULT_BODY_LIMIT: usize = 64 * 1024;
/// Default time a request body may take to arrive (beyond its length's allowance).
pub const DEFAULT_BODY_TIMEOUT: Duration = Duration::from_secs(30);
/// Name of the admin token file in the data directory.
pub const ADMIN_TOKEN_FILE: &str = "admin.token";
/// The image key's file in the data directory ([`crate::firmware::at_rest`]).
pub const IMAGE_KEY_FILE: &str = "image.key";

/// Settings as an optional TOML file gives them; every key optional.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SettingsFile {
    /// Listen address.
    pub bind: Option<SocketAddr>,
    /// Data directory.
    pub data_dir: Option<PathBuf>,
    /// Database URL (default: SQLite in the data directory).
    pub database: Option<String>,
    /// Serve the seed's unauthenticated legacy API.
    pub legacy_api: Option<bool>,
    /// Largest request body, bytes.
    pub body_limit_bytes: Option<usize>,
    /// URL devices use to reach this server (written into provisioning files).
    pub public_url: Option<String>,
    /// Public keys (hex: Ed25519, or an RSA-2048 modulus) whose firmware signatures the server accepts.
    pub firmware_keys: Option<Vec<String>>,
    /// Seconds from a request's first byte to the end of its header.
    pub header_timeout_secs: Option<f64>,
    /// Seconds a request body may take to arrive (plus 1 s per 128 KiB).
    pub body_timeout_secs: Option<f64>,
    /// Seconds a connection may wait for its next request.
    pub idle_timeout_secs: Option<f64>,
    /// Seconds a response may wait for a peer that does not read it.
    pub send_timeout_secs: Option<f64>,
    /// Open connections in all.
    pub max_connections: Option<usize>,
    /// Open connections from one address.
    pub max_connections_per_source: Option<usize>,
    /// Seconds requests in flight get to finish after SIGINT or SIGTERM.
    pub shutdown_grace_secs: Option<f64>,
    /// Refusals of unauthenticated traffic one address may cause per minute
    /// before it is answered 429 without being looked at.
    pub refusals_per_minute: Option<u32>,
    /// Days security events are kept (0: forever).
    pub security_event_retention_days: Option<u32>,
    /// Days audit entries are kept (0: forever).
    pub audit_retention_days: Option<u32>,
    /// Days raw telemetry batches are kept (0: forever; fractions allowed), default 90.
    pub telemetry_retention_days: Option<f64>,
    /// Days 5-minute rollups are kept (0: forever), default 35; hour and day rollups stay.
    pub rollup_5m_retention_days: Option<u32>,
    /// Telemetry codec versions offered to devices (default `[1, 2]`; 1 is
    /// always among them: a device uploads v1 until it hears an offer).
    pub telemetry_codecs: Option<Vec<u8>>,
    /// The legacy API's behaviour (`[legacy]`).
    pub legacy: Option<LegacyFile>,
    /// MQTT broker to publish to (`mqtt://[user:password@]host[:port]`).
    pub mqtt: Option<String>,
    /// MQTT client id (default `ecowatt-server-<host>-<pid>`).
    pub mqtt_client_id: Option<String>,
    /// Prefix of EcoWatt's MQTT topics (default `ecowatt`).
    pub mqtt_prefix: Option<String>,
    /// Home Assistant discovery prefix (default `homeassistant`).
    pub mqtt_discovery_prefix: Option<String>,
    /// MQTT messages that may wait while the broker is away (default 10,000).
    pub mqtt_buffer: Option<usize>,
    /// CA (PEM) that signs an `mqtts://` broker's certificate (default: the system's roots).
    pub mqtt_ca_file: Option<PathBuf>,
    /// Also take the device protocol from this MQTT broker
    /// (`mqtt://[user:password@]host[:port]` or `mqtts://`; docs/protocol.md).
    pub device_broker: Option<String>,
    /// CA (PEM) of an `mqtts://` device broker (default: the system's roots).
    pub device_broker_ca_file: Option<PathBuf>,
    /// Client id on the device broker (default `ecowatt-server-<pid>-<random>`).
    pub device_broker_client_id: Option<String>,
    /// Shared-subscription group the server processes split devices in (default `ecowatt`).
    pub device_broker_group: Option<String>,
    /// Prefix of the device transport's topics (default `ecowatt-device`).
    pub device_broker_prefix: Option<String>,
    /// Requests from the broker handled at once (default 20,000; long polls count).
    pub device_broker_in_flight: Option<usize>,
    /// Serve HTTPS with this certificate chain (PEM, leaf first); with `tls_key`.
    pub tls_cert: Option<PathBuf>,
    /// The certificate's private key (PEM).
    pub tls_key: Option<PathBuf>,
    /// Also listen here for plain HTTP and redirect every request to HTTPS.
    pub tls_redirect_from: Option<SocketAddr>,
    /// The key firmware images are encrypted with at rest (default
    /// `DATA_DIR/image.key`, made at the first start).
    pub image_key_file: Option<PathBuf>,
    /// Get the HTTPS certificate for these public host names by ACME
    /// (HTTP-01 on `tls_redirect_from`, which must be port 80 to the world).
    pub acme_domains: Option<Vec<String>>,
    /// A contact address given to the CA.
    pub acme_contact: Option<String>,
    /// The ACME directory (default Let's Encrypt's production one).
    pub acme_directory: Option<String>,
    /// The CA (PEM) of an ACME directory with a private PKI (tests).
    pub acme_ca_file: Option<PathBuf>,
}

/// The `[legacy]` table: how the seed's API behaves (see docs/migration.md).
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LegacyFile {
    /// `/changes` flags a config change on this many polls (the guide: 1).
    pub config_repeat: Option<u32>,
    /// Time-to-live of a command queued without one, seconds.
    pub command_ttl_secs: Option<i64>,
    /// Refuse register writes outside EcoWatt's register map at queue time.
    pub strict_commands: Option<bool>,
    /// The original firmware's upload HMAC key (64 hex digits).
    pub upload_hmac_key: Option<String>,
    /// The original firmware's upload AES-128 key (32 hex digits).
    pub upload_aes_key: Option<String>,
    /// The original firmware's OTA AES-256 key (64 hex digits).
    pub ota_aes_key: Option<String>,
    /// The original firmware's OTA chunk HMAC key (text, as in its keys.h).
    pub ota_hmac_psk: Option<String>,
}

impl SettingsFile {
    /// Reads and parses a TOML settings file.
    pub fn load(path: &Path) -> Result<Self, String> {
        let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
        toml::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))
    }

    /// `self`, with every value `over` sets taking precedence.
    pub fn overridden_by(self, over: SettingsFile) -> SettingsFile {
        SettingsFile {
            bind: over.bind.or(self.bind),
            data_dir: over.data_dir.or(self.data_dir),
            database: over.database.or(self.database),
            legacy_api: over.legacy_api.or(self.legacy_api),
            body_limit_bytes: over.body_limit_bytes.or(self.body_limit_bytes),
            public_url: over.public_url.or(self.public_url),
            firmware_keys: over.firmware_keys.or(self.firmware_keys),
            header_timeout_secs: over.header_timeout_secs.or(self.header_timeout_secs),
            body_timeout_secs: over.body_timeout_secs.or(self.body_timeout_secs),
            idle_timeout_secs: over.idle_timeout_secs.or(self.idle_timeout_secs),
            send_timeout_secs: over.send_timeout_secs.or(self.send_timeout_secs),
            max_connections: over.max_connections.or(self.max_connections),
            max_connections_per_source: over
                .max_connections_per_source
                .or(self.max_connections_per_source),
            shutdown_grace_secs: over.shutdown_grace_secs.or(self.shutdown_grace_secs),
            refusals_per_minute: over.refusals_per_minute.or(self.refusals_per_minute),
            telemetry_retention_days: over
                .telemetry_retention_days
                .or(self.telemetry_retention_days),
            rollup_5m_retention_days: over
                .rollup_5m_retention_days
                .or(self.rollup_5m_retention_days),
            security_event_retention_days: over
                .security_event_retention_days
                .or(self.security_event_retention_days),
            audit_retention_days: over.audit_retention_days.or(self.audit_retention_days),
            telemetry_codecs: over.telemetry_codecs.or(self.telemetry_codecs),
            legacy: over.legacy.or(self.legacy),
            mqtt: over.mqtt.or(self.mqtt),
            mqtt_client_id: over.mqtt_client_id.or(self.mqtt_client_id),
            mqtt_prefix: over.mqtt_prefix.or(self.mqtt_prefix),
            mqtt_discovery_prefix: over.mqtt_discovery_prefix.or(self.mqtt_discovery_prefix),
            mqtt_buffer: over.mqtt_buffer.or(self.mqtt_buffer),
            mqtt_ca_file: over.mqtt_ca_file.or(self.mqtt_ca_file),
            device_broker: over.device_broker.or(self.device_broker),
            device_broker_ca_file: over.device_broker_ca_file.or(self.device_broker_ca_file),
            device_broker_client_id: over.device_broker_client_id.or(self.device_broker_client_id),
            device_broker_group: over.device_broker_group.or(self.device_broker_group),
            device_broker_prefix: over.device_broker_prefix.or(self.device_broker_prefix),
            device_broker_in_flight: over.device_broker_in_flight.or(self.device_broker_in_flight),
            tls_cert: over.tls_cert.or(self.tls_cert),
            tls_key: over.tls_key.or(self.tls_key),
            tls_redirect_from: over.tls_redirect_from.or(self.tls_redirect_from),
            image_key_file: over.image_key_file.or(self.image_key_file),
            acme_domains: over.acme_domains.or(self.acme_domains),
            acme_contact: over.acme_contact.or(self.acme_contact),
            acme_directory: over.acme_directory.or(self.acme_directory),
            acme_ca_file: over.acme_ca_file.or(self.acme_ca_file),
        }
    }
}

/// Complete settings.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Listen address.
    pub bind: SocketAddr,
    /// Data directory (SQLite database, admin token).
    pub data_dir: PathBuf,
    /// Database URL.
    pub database: String,
    /// Serve the legacy API.
    pub legacy_api: bool,
    /// Largest request body, bytes.
    pub body_limit: usize,
    /// URL devices use to reach this server.
    pub public_url: String,
    /// Public keys accepted for firmware signatures.
    pub firmware_keys: Vec<ecowatt_proto::firmware::PublicKey>,
    /// The listener's time limits and connection caps.
    pub limits: ecowatt_edge::Limits,
    /// The longest a request body may take (plus its length's allowance).
    pub body_timeout: Duration,
    /// Refusals one address may cause per minute before it is throttled.
    pub refusals_per_minute: u32,
    /// How long security events are kept (`None`: forever).
    pub security_event_retention: Option<Duration>,
    /// How long audit entries are kept (`None`: forever).
    pub audit_retention: Option<Duration>,
    /// How long raw telemetry batches are kept (`None`: forever).
    pub telemetry_retention: Option<Duration>,
    /// How long 5-minute rollups are kept (`None`: forever).
    pub rollup_5m_retention: Option<Duration>,
    /// Telemetry codecs offered to devices, a bit set (bit `v` = version `v`).
    pub codecs: u8,
    /// How the legacy API behaves.
    pub legacy: LegacySettings,
    /// The MQTT integration, when a broker is given.
    pub mqtt: Option<crate::mqtt::MqttSettings>,
    /// The device protocol over an MQTT broker, when one is given.
    pub device_broker: Option<BrokerSettings>,
    /// HTTPS: the certificate in use (reloaded when its files change).
    pub tls: Option<std::sync::Arc<ecowatt_edge::Tls>>,
    /// A plain-HTTP address whose requests are redirected to HTTPS.
    pub tls_redirect_from: Option<SocketAddr>,
    /// The file of the key firmware images are encrypted with at rest.
    pub image_key_file: PathBuf,
    /// Certificates by ACME (the listener's [`Settings::tls`] is set at start).
    pub acme: Option<crate::acme::AcmeSettings>,
}

/// How the legacy API behaves (`[legacy]`, docs/migration.md).
#[derive(Debug, Clone)]
pub struct LegacySettings {
    /// `/changes` flags a change on this many polls (1: the guide's reset after sending).
    pub config_repeat: i64,
    /// Time-to-live of a command queued without one, seconds.
    pub command_ttl_s: i64,
    /// Refuse writes outside the register map at queue time (EcoWatt's rule).
    pub strict_commands: bool,
    /// Upload HMAC-SHA256 key.
    pub upload_hmac_key: [u8; 32],
    /// Upload AES-128-CBC key.
    pub upload_aes_key: [u8; 16],
    /// The original's chunked OTA keys, when both are set.
    pub ota: Option<LegacyOtaKeys>,
}

/// The keys the original firmware's chunked OTA needs.
#[derive(Debug, Clone)]
pub struct LegacyOtaKeys {
    /// AES-256-CBC delivery key (`aes_firmware_key.bin`).
    pub aes_key: [u8; 32],
    /// Chunk HMAC key (`HMAC_PSK`).
    pub hmac_psk: Vec<u8>,
}

/// The original firmware's published upload key (its `keys.h`): every
/// device of that line shares it, which is why legacy uploads are weak.
pub const ORIGINAL_UPLOAD_HMAC_KEY: [u8; 32] = [
    0x2b, 0x7e, 0x15, 0x16, 0x28, 0xae, 0xd2, 0xa6, 0xab, 0xf7, 0x15, 0x88, 0x09, 0xcf, 0x4f, 0x3c,
    0x76, 0x2e, 0x71, 0x60, 0xf3, 0x8b, 0x4d, 0xa5, 0x6a, 0x78, 0x4d, 0x90, 0x45, 0x19, 0x0c, 0xfe,
];

impl Default for LegacySettings {
    fn default() -> Self {
        let mut aes = [0u8; 16];
        aes.copy_from_slice(&ORIGINAL_UPLOAD_HMAC_KEY[..16]);
        LegacySettings {
            config_repeat: 1,
            command_ttl_s: crate::commands::TTL_S.1,
            strict_commands: false,
            upload_hmac_key: ORIGINAL_UPLOAD_HMAC_KEY,
            upload_aes_key: aes,
            // No default: the original generated its own; without them,
            // chunked OTA answers that it is not configured.
            ota: None,
        }
    }
}

fn hex_key<const N: usize>(
    key: &str,
    text: Option<&String>,
    default: [u8; N],
) -> Result<[u8; N], String> {
    let Some(text) = text else { return Ok(default) };
    ecowatt_proto::hex::decode(text.trim())
        .ok()
        .and_then(|b| <[u8; N]>::try_from(b.as_slice()).ok())
        .ok_or_else(|| format!("legacy.{key} must be {} hex digits", 2 * N))
}

impl LegacySettings {
    fn resolve(file: Option<LegacyFile>) -> Result<LegacySettings, String> {
        let file = file.unwrap_or_default();
        let d = LegacySettings::default();
        let config_repeat = i64::from(file.config_repeat.unwrap_or(1));
        if !(1..=100).contains(&config_repeat) {
            return Err(format!("legacy.config_repeat {config_repeat} is outside 1..=100"));
        }
        let command_ttl_s = file.command_ttl_secs.unwrap_or(d.command_ttl_s);
        crate::commands::check_ttl(command_ttl_s)
            .map_err(|e| format!("legacy.command_ttl_secs: {}", e.message))?;
        Ok(LegacySettings {
            config_repeat,
            command_ttl_s,
            strict_commands: file.strict_commands.unwrap_or(false),
            upload_hmac_key: hex_key(
                "upload_hmac_key",
                file.upload_hmac_key.as_ref(),
                d.upload_hmac_key,
            )?,
            upload_aes_key: hex_key(
                "upload_aes_key",
                file.upload_aes_key.as_ref(),
                d.upload_aes_key,
            )?,
            ota: match (&file.ota_aes_key, file.ota_hmac_psk) {
                (None, None) => None,
                (Some(_), Some(psk)) if !psk.is_empty() => Some(LegacyOtaKeys {
                    aes_key: hex_key("ota_aes_key", file.ota_aes_key.as_ref(), [0; 32])?,
                    hmac_psk: psk.into_bytes(),
                }),
                _ => return Err("legacy.ota_aes_key and legacy.ota_hmac_psk go together".into()),
            },
        })
    }
}

/// Default `refusals_per_minute`.
pub const DEFAULT_REFUSALS_PER_MINUTE: u32 = 120;
/// Default `security_event_retention_days`.
pub const DEFAULT_SECURITY_EVENT_RETENTION_DAYS: u32 = 30;
/// Default `audit_retention_days`.
pub const DEFAULT_AUDIT_RETENTION_DAYS: u32 = 365;
/// Default `telemetry_retention_days`.
pub const DEFAULT_TELEMETRY_RETENTION_DAYS: f64 = 90.0;

/// `secs` as a duration, refused outside `range` (seconds) with the key named.
fn seconds(
    key: &str,
    secs: Option<f64>,
    default: Duration,
    range: (f64, f64),
) -> Result<Duration, String> {
    let Some(secs) = secs else { return Ok(default) };
    if !(range.0..=range.1).contains(&secs) {
        return Err(format!("{key} {secs} is outside {}..={}", range.0, range.1));
    }
    Ok(Duration::from_secs_f64(secs))
}

fn mqtt_settings(file: &SettingsFile) -> Result<Option<crate::mqtt::MqttSettings>, String> {
    let (client_id, prefix, discovery, buffer) =
        (&file.mqtt_client_id, &file.mqtt_prefix, &file.mqtt_discovery_prefix, file.mqtt_buffer);
    let Some(url) = &file.mqtt else { return Ok(None) };
    let crate::mqtt::Broker { host, port, credentials, tls } =
        crate::mqtt::parse_url(url).map_err(|e| format!("mqtt: {e}"))?;
    let tls = crate::mqtt::Tls::for_broker(tls, file.mqtt_ca_file.as_deref())
        .map_err(|e| format!("mqtt_ca_file: {e}"))?;
    let buffer = buffer.unwrap_or(crate::mqtt::DEFAULT_BUFFER);
    if !(1..=1_000_000).contains(&buffer) {
        return Err(format!("mqtt_buffer {buffer} is outside 1..=1000000"));
    }
    Ok(Some(crate::mqtt::MqttSettings {
        host,
        port,
        credentials,
        client_id: client_id
            .clone()
            .unwrap_or_else(|| format!("ecowatt-server-{}", std::process::id())),
        tls,
        topics: crate::mqtt::payloads::Topics {
            prefix: topic_part("mqtt_prefix", prefix, crate::mqtt::DEFAULT_PREFIX)?,
            discovery: topic_part(
                "mqtt_discovery_prefix",
                discovery,
                crate::mqtt::DEFAULT_DISCOVERY_PREFIX,
            )?,
        },
        buffer,
    }))
}

/// Device-broker requests handled at once by default (a long poll holds
/// one while it waits).
pub const DEFAULT_IN_FLIGHT: usize = 20_000;

/// The device broker (`device_broker`): how this server reaches it
/// ([`crate::broker`] takes device requests from it).
#[derive(Debug, Clone)]
pub struct BrokerSettings {
    /// Address and credentials.
    pub broker: crate::mqtt::Broker,
    /// TLS (`mqtts://`).
    pub tls: Option<crate::mqtt::Tls>,
    /// Client id (unique per server process).
    pub client_id: String,
    /// Shared-subscription group of the server processes.
    pub group: String,
    /// The transport's topics.
    pub topics: ecowatt_formats::broker::DeviceTopics,
    /// Requests handled at once; beyond, `503 busy` at once. (Its body
    /// limit and shutdown grace are the HTTP listener's: `body_limit`,
    /// `limits.shutdown_grace`.)
    pub in_flight: usize,
}

/// A topic prefix given as `key` (or its default): levels without wildcards.
fn topic_part(key: &str, v: &Option<String>, default: &str) -> Result<String, String> {
    let v = v.clone().unwrap_or_else(|| default.to_owned());
    if v.is_empty() || v.contains(['+', '#']) || v.starts_with('/') || v.ends_with('/') {
        return Err(format!("{key} {v:?} must be a topic level path without wildcards"));
    }
    Ok(v)
}

fn device_broker_settings(file: &SettingsFile) -> Result<Option<BrokerSettings>, String> {
    use ecowatt_formats::broker as b;
    let Some(url) = &file.device_broker else { return Ok(None) };
    let broker = crate::mqtt::parse_url(url).map_err(|e| format!("device_broker: {e}"))?;
    let tls = crate::mqtt::Tls::for_broker(broker.tls, file.device_broker_ca_file.as_deref())
        .map_err(|e| format!("device_broker_ca_file: {e}"))?;
    let group = topic_part("device_broker_group", &file.device_broker_group, b::DEFAULT_GROUP)?;
    if group.contains('/') {
        return Err(format!("device_broker_group {group:?} must be one topic level"));
    }
    let prefix = topic_part("device_broker_prefix", &file.device_broker_prefix, b::DEFAULT_PREFIX)?;
    let in_flight = file.device_broker_in_flight.unwrap_or(DEFAULT_IN_FLIGHT);
    if !(1..=1_000_000).contains(&in_flight) {
        return Err(format!("device_broker_in_flight {in_flight} is outside 1..=1000000"));
    }
    let client_id = file.device_broker_client_id.clone().unwrap_or_else(|| {
        let mut r = [0u8; 4];
        let _ = getrandom::fill(&mut r);
        format!("ecowatt-server-{}-{}", std::process::id(), ecowatt_proto::hex::encode_upper(&r))
    });
    Ok(Some(BrokerSettings {
        broker,
        tls,
        client_id,
        group,
        topics: b::DeviceTopics { prefix },
        in_flight,
    }))
}

/// The codec bit set `telemetry_codecs` names (default: every codec this build has).
fn offered_codecs(list: Option<&Vec<u8>>) -> Result<u8, String> {
    use ecowatt_proto::codec;
    let Some(list) = list else { return Ok(codec::SUPPORTED) };
    let mut set = 0u8;
    for &v in list {
        if v >= 8 || codec::SUPPORTED & (1 << v) == 0 {
            return Err(format!("telemetry_codecs: codec {v} unknown (known: 1, 2)"));
        }
        set |= 1 << v;
    }
    if set & (1 << codec::CODEC_V1) == 0 {
        return Err(
            "telemetry_codecs must include 1: a device uploads v1 until it hears an offer".into()
        );
    }
    Ok(set)
}

/// ACME, when host names are given: not with a certificate of one's own,
/// and only with the plain port its challenges are answered on.
fn acme_settings(
    file: &SettingsFile,
    data_dir: &Path,
) -> Result<Option<crate::acme::AcmeSettings>, String> {
    let Some(domains) = file.acme_domains.clone().filter(|d| !d.is_empty()) else {
        return match (&file.acme_contact, &file.acme_directory, &file.acme_ca_file) {
            (None, None, None) => Ok(None),
            _ => Err("acme_contact, acme_directory and acme_ca_file need acme_domains".into()),
        };
    };
    if file.tls_cert.is_some() {
        return Err(
            "acme_domains and tls_cert exclude each other: ACME makes the certificate".into()
        );
    }
    if file.tls_redirect_from.is_none() {
        return Err("acme_domains needs tls_redirect_from (port 80, where the CA checks the HTTP-01 challenge)".into());
    }
    for d in &domains {
        let ok = d.len() <= 253
            && d.contains('.')
            && d.split('.').all(|l| {
                !l.is_empty()
                    && l.len() <= 63
                    && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
            });
        if !ok {
            return Err(format!("acme_domains: {d:?} is not a public host name"));
        }
    }
    Ok(Some(crate::acme::AcmeSettings {
        domains,
        directory: file.acme_directory.clone().unwrap_or_else(|| crate::acme::LETS_ENCRYPT.into()),
        contact: file.acme_contact.clone(),
        ca_file: file.acme_ca_file.clone(),
        dir: data_dir.join("acme"),
    }))
}

/// The certificate and key, both or neither, checked now.
fn tls_settings(file: &SettingsFile) -> Result<Option<std::sync::Arc<ecowatt_edge::Tls>>, String> {
    match (&file.tls_cert, &file.tls_key, file.tls_redirect_from) {
        (Some(cert), Some(key), _) => ecowatt_edge::Tls::load(cert, key)
            .map(Some)
            .map_err(|e| format!("TLS ({}): {e}", e.code())),
        (None, None, None) => Ok(None),
        (None, None, Some(_)) if file.acme_domains.is_some() => Ok(None),
        (None, None, Some(_)) => {
            Err("tls_redirect_from needs tls_cert and tls_key (or acme_domains)".into())
        }
        _ => Err("tls_cert and tls_key go together: give both".into()),
    }
}

fn days(d: u32) -> Option<Duration> {
    (d > 0).then(|| Duration::from_secs(u64::from(d) * 86_400))
}

impl Settings {
    /// Fills in defaults.
    pub fn resolve(file: SettingsFile) -> Result<Settings, String> {
        let mqtt = mqtt_settings(&file)?;
        let device_broker = device_broker_settings(&file)?;
        let tls = tls_settings(&file)?;
        let data_dir = file.data_dir.clone().unwrap_or_else(|| PathBuf::from(DEFAULT_DATA_DIR));
        let acme = acme_settings(&file, &data_dir)?;
        let scheme = if tls.is_some() || acme.is_some() { "https" } else { "http" };
        let bind = file.bind.unwrap_or_else(|| DEFAULT_BIND.parse().expect("default bind parses"));
        let database =
            file.database.unwrap_or_else(|| crate::db::sqlite_url(&data_dir.join("ecowatt.db")));
        let body_limit = file.body_limit_bytes.unwrap_or(DEFAULT_BODY_LIMIT);
        if !(1024..=64 * 1024 * 1024).contains(&body_limit) {
            return Err(format!("body_limit_bytes {body_limit} is outside 1024..=67108864"));
        }
        let firmware_keys = file
            .firmware_keys
            .unwrap_or_default()
            .iter()
            .map(|k| {
                ecowatt_proto::hex::decode(k.trim())
                    .ok()
                    .and_then(|b| ecowatt_proto::firmware::PublicKey::from_bytes(&b).ok())
                    .ok_or_else(|| {
                        format!(
                            "firmware key {k:?} is neither an Ed25519 key (64 hex digits) nor an RSA-2048 modulus (512)"
                        )
                    })
            })
            .collect::<Result<Vec<_>, String>>()?;
        let edge = ecowatt_edge::Limits::default();
        let limits = ecowatt_edge::Limits {
            header_timeout: seconds(
                "header_timeout_secs",
                file.header_timeout_secs,
                edge.header_timeout,
                (0.1, 3600.0),
            )?,
            idle_timeout: seconds(
                "idle_timeout_secs",
                file.idle_timeout_secs,
                edge.idle_timeout,
                (0.1, 86_400.0),
            )?,
            send_timeout: seconds(
                "send_timeout_secs",
                file.send_timeout_secs,
                edge.send_timeout,
                (0.1, 3600.0),
            )?,
            shutdown_grace: seconds(
                "shutdown_grace_secs",
                file.shutdown_grace_secs,
                edge.shutdown_grace,
                (0.0, 3600.0),
            )?,
            max_connections: file.max_connections.unwrap_or(edge.max_connections),
            max_per_source: file.max_connections_per_source.unwrap_or(edge.max_per_source),
        };
        if limits.max_connections == 0 || limits.max_per_source == 0 {
            return Err("max_connections and max_connections_per_source must be at least 1".into());
        }
        let body_timeout = seconds(
            "body_timeout_secs",
            file.body_timeout_secs,
            DEFAULT_BODY_TIMEOUT,
            (0.1, 3600.0),
        )?;
        let image_key_file =
            file.image_key_file.clone().unwrap_or_else(|| data_dir.join(IMAGE_KEY_FILE));
        Ok(Settings {
            image_key_file,
            acme,
            codecs: offered_codecs(file.telemetry_codecs.as_ref())?,
            limits,
            body_timeout,
            refusals_per_minute: file.refusals_per_minute.unwrap_or(DEFAULT_REFUSALS_PER_MINUTE),
            security_event_retention: days(
                file.security_event_retention_days.unwrap_or(DEFAULT_SECURITY_EVENT_RETENTION_DAYS),
            ),
            audit_retention: days(
                file.audit_retention_days.unwrap_or(DEFAULT_AUDIT_RETENTION_DAYS),
            ),
            telemetry_retention: match file.telemetry_retention_days {
                Some(d) if !(0.0..=36_500.0).contains(&d) => {
                    return Err(format!("telemetry_retention_days {d} is outside 0..=36500"));
                }
                Some(0.0) => None,
                d => Some(Duration::from_secs_f64(
                    d.unwrap_or(DEFAULT_TELEMETRY_RETENTION_DAYS) * 86_400.0,
                )),
            },
            rollup_5m_retention: days(file.rollup_5m_retention_days.unwrap_or(35)),
            firmware_keys,
            bind,
            public_url: file.public_url.unwrap_or_else(|| format!("{scheme}://{bind}")),
            data_dir,
            database,
            legacy_api: file.legacy_api.unwrap_or(false),
            legacy: LegacySettings::resolve(file.legacy)?,
            mqtt,
            device_broker,
            tls,
            tls_redirect_from: file.tls_redirect_from,
            body_limit,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn legacy(toml_text: &str) -> Result<LegacySettings, String> {
        let file: SettingsFile = toml::from_str(toml_text).map_err(|e| e.to_string())?;
        Settings::resolve(file).map(|s| s.legacy)
    }

    #[test]
    fn the_legacy_table_is_checked() {
        let d = legacy("").unwrap();
        assert_eq!((d.config_repeat, d.command_ttl_s, d.strict_commands), (1, 604_800, false));
        assert_eq!(d.upload_hmac_key, ORIGINAL_UPLOAD_HMAC_KEY);
        assert!(d.ota.is_none());
        let text = format!(
            "[legacy]\nconfig_repeat = 3\nota_aes_key = \"{}\"\nota_hmac_psk = \"psk\"\n",
            "ab".repeat(32)
        );
        let s = legacy(&text).unwrap();
        assert_eq!((s.config_repeat, s.ota.unwrap().aes_key), (3, [0xAB; 32]));
        for (bad, says) in [
            ("[legacy]\nconfig_repeat = 0", "config_repeat"),
            ("[legacy]\ncommand_ttl_secs = 1", "command_ttl_secs"),
            ("[legacy]\nota_hmac_psk = \"x\"", "go together"),
            ("[legacy]\nota_aes_key = \"ab\"\nota_hmac_psk = \"x\"", "64 hex digits"),
            ("[legacy]\nupload_hmac_key = \"zz\"", "upload_hmac_key"),
            ("[legacy]\nnope = 1", "unknown field"),
        ] {
            let e = legacy(bad).unwrap_err();
            assert!(e.contains(says), "{bad}: {e}");
        }
    }
}
