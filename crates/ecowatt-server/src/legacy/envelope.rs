//! The original firmware's upload security layer: `{"nonce", "payload",
//! "mac", "encrypted"}`, where `payload` is the Base64 of the upload's JSON
//! (AES-128-CBC with a fixed IV and PKCS#7 padding when `encrypted`; the
//! original firmware never set it), and `mac` is the hex HMAC-SHA256 of
//! the nonce (4 bytes, big-endian) followed by the plain JSON.
//!
//! Its weakness is stated in docs/migration.md: one key shared by every
//! device of the firmware line and published with it, no per-device
//! identity in the envelope, a fixed IV. EcoWatt keeps what protection
//! there is (the MAC, and a nonce that must grow, now kept across restarts).

use base64::Engine;
use hmac::{Hmac, Mac};
use serde_json::Value;
use sha2::Sha256;

/// The original firmware's fixed AES IV.
pub const ORIGINAL_IV: [u8; 16] =
    [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 0x0a, 0x0b, 0x0c, 0x0d, 0x0e, 0x0f];

/// Why an envelope was refused (each with a stable code).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EnvelopeError {
    /// Not the security layer's shape.
    #[error("not a secured payload: {0}")]
    Malformed(String),
    /// The MAC does not match.
    #[error("HMAC verification failed")]
    BadMac,
    /// Decryption or padding failed.
    #[error("AES decryption failed")]
    BadCipher,
}

impl EnvelopeError {
    /// The stable error code.
    pub fn code(&self) -> &'static str {
        match self {
            EnvelopeError::Malformed(_) => "legacy_envelope_malformed",
            EnvelopeError::BadMac => "legacy_bad_mac",
            EnvelopeError::BadCipher => "legacy_bad_cipher",
        }
    }
}

/// Whether `v` carries the security layer (the original server's test).
pub fn is_secured(v: &Value) -> bool {
    ["nonce", "payload", "mac"].iter().all(|k| v.get(k).is_some())
}

/// An opened envelope.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Opened {
    /// The device's nonce (must exceed the last one accepted).
    pub nonce: u32,
    /// The upload's JSON text, authenticated.
    pub json: Vec<u8>,
}

/// Checks and opens an envelope with the firmware line's keys.
pub fn open(v: &Value, hmac_key: &[u8; 32], aes_key: &[u8; 16]) -> Result<Opened, EnvelopeError> {
    let bad = |m: &str| EnvelopeError::Malformed(m.to_owned());
    let nonce = v
        .get("nonce")
        .and_then(Value::as_u64)
        .and_then(|n| u32::try_from(n).ok())
        .ok_or_else(|| bad("nonce must be a 32-bit unsigned number"))?;
    let payload = v
        .get("payload")
        .and_then(Value::as_str)
        .ok_or_else(|| bad("payload must be Base64 text"))?;
    let mac_hex =
        v.get("mac").and_then(Value::as_str).ok_or_else(|| bad("mac must be hex text"))?;
    let encrypted = match v.get("encrypted") {
        None | Some(Value::Null) => false,
        Some(Value::Bool(b)) => *b,
        Some(_) => return Err(bad("encrypted must be true or false")),
    };
    let mac = ecowatt_proto::hex::decode(mac_hex)
        .ok()
        .filter(|m| m.len() == 32)
        .ok_or_else(|| bad("mac must be 64 hex digits"))?;
    let mut json = base64::engine::general_purpose::STANDARD
        .decode(payload)
        .map_err(|_| bad("payload is not Base64"))?;
    if encrypted {
        json = super::crypto::decrypt_cbc(aes_key, &ORIGINAL_IV, &json)
            .ok_or(EnvelopeError::BadCipher)?;
    }
    let mut m = <Hmac<Sha256> as Mac>::new_from_slice(hmac_key).expect("HMAC takes any key length");
    m.update(&nonce.to_be_bytes());
    m.update(&json);
    m.verify_slice(&mac).map_err(|_| EnvelopeError::BadMac)?;
    Ok(Opened { nonce, json })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::settings::ORIGINAL_UPLOAD_HMAC_KEY as KEY;
    use serde_json::json;

    /// The original's own self-test payload (`server_security_layer.py`):
    /// nonce 10001 over `{"device_id":"ESP32_Test","value":123}`.
    #[test]
    fn the_originals_test_vector_opens() {
        let text = r#"{"device_id":"ESP32_Test","value":123}"#;
        let payload = base64::engine::general_purpose::STANDARD.encode(text);
        // Computed with Python's hmac module, as the original server does.
        let mac = "e8bb2a64fe15623dc7dedf297367bf5a8ad0b7b4a4edf342c1e41b7710c1a61c";
        let aes: [u8; 16] = KEY[..16].try_into().unwrap();
        let v = json!({"nonce": 10001, "payload": payload, "mac": mac, "encrypted": false});
        assert!(is_secured(&v));
        let opened = open(&v, &KEY, &aes).unwrap();
        assert_eq!((opened.nonce, opened.json.as_slice()), (10001, text.as_bytes()));
        // Any change to what the MAC covers is refused.
        let mut tampered = v.clone();
        tampered["nonce"] = json!(10002);
        assert_eq!(open(&tampered, &KEY, &aes).unwrap_err(), EnvelopeError::BadMac);
        let mut tampered = v.clone();
        tampered["payload"] = json!(
            base64::engine::general_purpose::STANDARD
                .encode(r#"{"device_id":"ESP32_Test","value":124}"#)
        );
        assert_eq!(open(&tampered, &KEY, &aes).unwrap_err().code(), "legacy_bad_mac");
        for (field, value) in [
            ("nonce", json!(-1)),
            ("nonce", json!(1u64 << 32)),
            ("mac", json!("zz")),
            ("payload", json!("***")),
            ("encrypted", json!("no")),
        ] {
            let mut bad = v.clone();
            bad[field] = value;
            assert_eq!(
                open(&bad, &KEY, &aes).unwrap_err().code(),
                "legacy_envelope_malformed",
                "{field}"
            );
        }
        assert!(!is_secured(&json!({"device_id": "x", "compressed_data": []})));
    }

    /// `encrypted: true` as the original server decrypts it: AES-128-CBC
    /// with the fixed IV, PKCS#7, the MAC over the plain JSON.
    #[test]
    fn an_encrypted_payload_opens() {
        let aes: [u8; 16] = KEY[..16].try_into().unwrap();
        let text = br#"{"device_id":"ESP32_EcoWatt_Smart","compressed_data":[]}"#;
        let sealed = crate::legacy::crypto::encrypt_cbc(&aes, &ORIGINAL_IV, text).unwrap();
        let mac = crate::legacy::crypto::hmac_hex(&KEY, &[&7u32.to_be_bytes(), text]);
        let b64 = base64::engine::general_purpose::STANDARD;
        let v = json!({"nonce": 7, "payload": b64.encode(&sealed), "mac": mac, "encrypted": true});
        assert_eq!(open(&v, &KEY, &aes).unwrap().json, text);
        let mut cut = v.clone();
        cut["payload"] = json!(b64.encode(&sealed[..16]));
        assert_eq!(open(&cut, &KEY, &aes).unwrap_err(), EnvelopeError::BadCipher);
        assert_eq!(open(&v, &KEY, &[1; 16]).unwrap_err().code(), "legacy_bad_cipher");
    }
}
