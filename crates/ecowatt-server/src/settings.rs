//! Server settings: defaults, overridden by an optional TOML file, overridden
//! by environment variables and flags (the CLI merges those two).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;

/// Default listen address (the seed's port).
pub const DEFAULT_BIND: &str = "127.0.0.1:5001";
/// Default data directory.
pub const DEFAULT_DATA_DIR: &str = "./ecowatt-data";
/// Default request body limit, bytes.
pub const DEFAULT_BODY_LIMIT: usize = 64 * 1024;
/// Name of the admin token file in the data directory.
pub const ADMIN_TOKEN_FILE: &str = "admin.token";

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
    /// Ed25519 public keys (hex) whose firmware signatures the server accepts.
    pub firmware_keys: Option<Vec<String>>,
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
}

impl Settings {
    /// Fills in defaults.
    pub fn resolve(file: SettingsFile) -> Result<Settings, String> {
        let bind = file.bind.unwrap_or_else(|| DEFAULT_BIND.parse().expect("default bind parses"));
        let data_dir = file.data_dir.unwrap_or_else(|| PathBuf::from(DEFAULT_DATA_DIR));
        let database = file
            .database
            .unwrap_or_else(|| crate::store::SqlStore::sqlite_url(&data_dir.join("ecowatt.db")));
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
        Ok(Settings {
            firmware_keys,
            bind,
            public_url: file.public_url.unwrap_or_else(|| format!("http://{bind}")),
            data_dir,
            database,
            legacy_api: file.legacy_api.unwrap_or(false),
            body_limit,
        })
    }
}
