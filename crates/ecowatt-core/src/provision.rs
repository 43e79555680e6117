//! A device's provisioning as the firmware reads it from its own flash
//! partition (never compiled into the image): identity, key, server, Wi-Fi,
//! trusted firmware keys. `ecowatt device provision-image` writes it.
//!
//! Format: the line `ecowatt-provision/1`, then `name=value` lines (UTF-8,
//! no `\n` in values), then `end`; the rest of the partition is erased
//! (`0xFF`). Unknown names are refused, so a typo is found at the desk, not
//! on the roof.

use alloc::string::{String, ToString};
use alloc::vec::Vec;
use core::fmt;

use ecowatt_proto::firmware::PublicKey;

use crate::session::Credentials;

const MAGIC: &str = "ecowatt-provision/1";

/// The most a provisioning takes at the start of its partition (what a
/// device reads at boot; writers refuse more).
pub const MAX_LEN: usize = 4096;

/// What a device is told at provisioning.
#[derive(Clone, PartialEq, Eq)]
pub struct Provision {
    /// Its name on the server.
    pub device: String,
    /// Its protocol credentials.
    pub creds: Credentials,
    /// The server, `http://host[:port]`.
    pub server: String,
    /// The Wi-Fi network.
    pub wifi_ssid: String,
    /// The Wi-Fi password (empty for an open network).
    pub wifi_password: String,
    /// Keys whose firmware signatures the device accepts.
    pub firmware_keys: Vec<PublicKey>,
}

impl fmt::Debug for Provision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Provision")
            .field("device", &self.device)
            .field("device_id", &self.creds.device_id)
            .field("server", &self.server)
            .field("wifi_ssid", &self.wifi_ssid)
            .field("firmware_keys", &self.firmware_keys.len())
            .finish_non_exhaustive()
    }
}

/// Why a provisioning partition cannot be used.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProvisionError {
    /// The partition is erased: the device was never provisioned.
    Empty,
    /// Not this format (or another version of it).
    NotProvisioning,
    /// A line is wrong: its number (from 1) and what is wrong.
    Line(usize, String),
    /// A value is missing.
    Missing(&'static str),
}

impl fmt::Display for ProvisionError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ProvisionError::Empty => f.write_str("the provisioning partition is erased"),
            ProvisionError::NotProvisioning => f.write_str("not an ecowatt-provision/1 partition"),
            ProvisionError::Line(n, why) => write!(f, "line {n}: {why}"),
            ProvisionError::Missing(name) => write!(f, "{name} is missing"),
        }
    }
}

impl core::error::Error for ProvisionError {}

impl Provision {
    /// The partition's content (without the erased rest).
    pub fn encode(&self) -> Vec<u8> {
        let mut s = String::new();
        let mut line = |name: &str, value: &str| {
            s.push_str(name);
            s.push('=');
            s.push_str(value);
            s.push('\n');
        };
        line("device", &self.device);
        line("device_id", &self.creds.device_id.to_string());
        line("key", &ecowatt_proto::hex::encode_upper(&self.creds.key));
        line("key_version", &self.creds.key_version.to_string());
        line("server", &self.server);
        line("wifi_ssid", &self.wifi_ssid);
        line("wifi_password", &self.wifi_password);
        for k in &self.firmware_keys {
            line("firmware_key", &ecowatt_proto::hex::encode_upper(k.as_bytes()));
        }
        [MAGIC.as_bytes(), b"\n", s.as_bytes(), b"end\n"].concat()
    }

    /// Reads a partition's content (erased bytes after `end` are ignored).
    pub fn decode(bytes: &[u8]) -> Result<Provision, ProvisionError> {
        if bytes.iter().take(64).all(|b| *b == 0xFF) {
            return Err(ProvisionError::Empty);
        }
        let end = bytes.iter().position(|b| *b == 0xFF || *b == 0).unwrap_or(bytes.len());
        let text =
            core::str::from_utf8(&bytes[..end]).map_err(|_| ProvisionError::NotProvisioning)?;
        let mut lines = text.split('\n');
        if lines.next() != Some(MAGIC) {
            return Err(ProvisionError::NotProvisioning);
        }
        let (mut device, mut id, mut key, mut version, mut server) = (None, None, None, None, None);
        let (mut ssid, mut password, mut keys) = (None, String::new(), Vec::new());
        let mut ended = false;
        for (i, line) in lines.enumerate() {
            let n = i + 2;
            if line == "end" {
                ended = true;
                break;
            }
            if line.is_empty() {
                continue;
            }
            let bad = |why: &str| ProvisionError::Line(n, String::from(why));
            let (name, value) = line.split_once('=').ok_or_else(|| bad("expected name=value"))?;
            match name {
                "device" => device = Some(String::from(value)),
                "device_id" => id = Some(value.parse::<u32>().map_err(|_| bad("not a number"))?),
                "key" => {
                    let k = ecowatt_proto::hex::decode(value).ok().and_then(|k| k.try_into().ok());
                    key = Some(k.ok_or_else(|| bad("the key must be 32 hex digits"))?);
                }
                "key_version" => {
                    version = Some(value.parse::<u32>().map_err(|_| bad("not a number"))?)
                }
                "server" if value.starts_with("http://") => server = Some(String::from(value)),
                "server" => return Err(bad("the server must be an http:// URL")),
                "wifi_ssid" => ssid = Some(String::from(value)),
                "wifi_password" => password = String::from(value),
                "firmware_key" => {
                    let k = ecowatt_proto::hex::decode(value).ok();
                    let k = k.and_then(|b| PublicKey::from_bytes(&b).ok());
                    keys.push(k.ok_or_else(|| bad("not an Ed25519 key or RSA-2048 modulus"))?);
                }
                _ => return Err(bad("unknown name")),
            }
        }
        if !ended {
            return Err(ProvisionError::Missing("end"));
        }
        Ok(Provision {
            device: device.ok_or(ProvisionError::Missing("device"))?,
            creds: Credentials {
                device_id: id.ok_or(ProvisionError::Missing("device_id"))?,
                key: key.ok_or(ProvisionError::Missing("key"))?,
                key_version: version.ok_or(ProvisionError::Missing("key_version"))?,
            },
            server: server.ok_or(ProvisionError::Missing("server"))?,
            wifi_ssid: ssid.ok_or(ProvisionError::Missing("wifi_ssid"))?,
            wifi_password: password,
            firmware_keys: keys,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::{format, vec};

    fn sample() -> Provision {
        Provision {
            device: String::from("roof-1"),
            creds: Credentials { device_id: 7, key: [0xAB; 16], key_version: 2 },
            server: String::from("http://192.0.2.1:8000"),
            wifi_ssid: String::from("home"),
            wifi_password: String::from("pass word=1"),
            firmware_keys: vec![PublicKey::Ed25519([3; 32])],
        }
    }

    #[test]
    fn a_partition_reads_back_what_was_written() {
        let p = sample();
        let mut partition = p.encode();
        partition.resize(4096, 0xFF);
        assert_eq!(Provision::decode(&partition).unwrap(), p);
    }

    #[test]
    fn bad_partitions_say_what_is_wrong() {
        assert_eq!(Provision::decode(&[0xFF; 4096]), Err(ProvisionError::Empty));
        assert_eq!(Provision::decode(b"hello"), Err(ProvisionError::NotProvisioning));
        let text = String::from_utf8(sample().encode()).unwrap();
        let cases = [
            ("device_id=7", "device_id=seven", ProvisionError::Line(3, "not a number".into())),
            (
                "server=http://",
                "server=ftp://",
                ProvisionError::Line(6, "the server must be an http:// URL".into()),
            ),
            ("wifi_ssid=home\n", "", ProvisionError::Missing("wifi_ssid")),
            ("end\n", "", ProvisionError::Missing("end")),
            ("device=roof-1", "colour=red", ProvisionError::Line(2, "unknown name".into())),
        ];
        for (from, to, want) in cases {
            let changed = text.replacen(from, to, 1);
            assert_eq!(Provision::decode(changed.as_bytes()), Err(want), "{from} -> {to}");
        }
        assert!(format!("{:?}", sample()).contains("roof-1"));
        assert!(!format!("{:?}", sample()).contains("pass word"), "no password in logs");
    }
}
