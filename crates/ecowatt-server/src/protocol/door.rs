//! The door of the device endpoints: content type, envelope, device, key,
//! tag and message type, everything short of the replay check (which runs
//! in the transaction that applies the message). A refusal says what the
//! peer is told (only the code the spec lists) and the security event it
//! makes (the precise reason).

use std::net::IpAddr;

use ecowatt_proto::messages::MessageType;
use ecowatt_proto::seal::{self, Direction, Header, Keys};
use serde_json::{Value, json};

use super::SyncRefusal;
use crate::db::StoreError;
use crate::devices::{DeviceCrypto, DeviceId, Devices, KeyLookup};
use crate::security::Refusals;

/// What a refused peer is told.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer {
    /// Not `application/octet-stream`.
    UnsupportedMediaType,
    /// The envelope does not parse.
    MalformedEnvelope,
    /// Unknown device, unknown or retired key, bad tag: one answer for all.
    AuthFailed,
    /// The source has used up its refusals.
    RateLimited,
    /// An authentic message of the wrong type for the endpoint.
    WrongType,
    /// An authentic message whose body does not decode or does not add up.
    MalformedBody,
    /// A counter seen before.
    Replay,
    /// The device is disabled.
    DeviceDisabled,
    /// A sample stamped outside the times the server keeps.
    SampleTimeOutOfRange(String),
    /// An upload in a telemetry codec the server does not offer.
    CodecNotOffered(String),
    /// The store failed.
    Store(String),
}

impl Answer {
    /// The stable code.
    pub fn code(&self) -> &'static str {
        match self {
            Answer::UnsupportedMediaType => "unsupported_media_type",
            Answer::MalformedEnvelope => "malformed_envelope",
            Answer::AuthFailed => "auth_failed",
            Answer::RateLimited => "rate_limited",
            Answer::WrongType => "wrong_type",
            Answer::MalformedBody => "malformed_body",
            Answer::Replay => "replay",
            Answer::DeviceDisabled => "device_disabled",
            Answer::SampleTimeOutOfRange(_) => "sample_time_out_of_range",
            Answer::CodecNotOffered(_) => "codec_not_offered",
            Answer::Store(_) => "storage_unavailable",
        }
    }
}

/// A refused device request.
#[derive(Debug, Clone, PartialEq)]
pub struct Refused {
    /// What the peer is told.
    pub answer: Answer,
    /// The source was throttled when the request came: a refusal before
    /// authentication is then answered `rate_limited` instead.
    pub throttled: bool,
    /// The security event: its kind (`bad_tag`, `replay`, ...), none for a
    /// failure of the server's own.
    pub kind: Option<&'static str>,
    /// The device concerned, when known.
    pub device: Option<String>,
    /// Details (never key material).
    pub detail: Value,
}

impl Refused {
    /// A refusal with its security event.
    pub fn new(answer: Answer, kind: &'static str, device: Option<&str>, detail: Value) -> Self {
        Refused {
            answer,
            throttled: false,
            kind: Some(kind),
            device: device.map(str::to_owned),
            detail,
        }
    }

    /// A refusal by the store's admission of an authentic message.
    pub fn admission(device: &str, counter: u64, refusal: SyncRefusal) -> Self {
        match refusal {
            SyncRefusal::Replay(e) => Refused::new(
                Answer::Replay,
                "replay",
                Some(device),
                json!({"counter": counter, "reason": e.code()}),
            ),
            SyncRefusal::Disabled => {
                Refused::new(Answer::DeviceDisabled, "device_disabled", Some(device), json!({}))
            }
            SyncRefusal::StaleKey => Refused::new(
                Answer::AuthFailed,
                "stale_key",
                Some(device),
                json!({"counter": counter}),
            ),
        }
    }

    /// The store failed (no security event).
    pub fn store(e: StoreError) -> Self {
        Refused {
            answer: Answer::Store(e.to_string()),
            throttled: false,
            kind: None,
            device: None,
            detail: Value::Null,
        }
    }

    fn throttled(mut self, throttled: bool) -> Self {
        self.throttled = throttled;
        self
    }
}

/// An authentic request, past the door.
pub struct Admitted {
    /// The device's keys as looked up.
    pub crypto: DeviceCrypto,
    /// The full version of the key that opened it (the store checks it is
    /// still one of the device's when it admits the message).
    pub key_version: i64,
    /// That key.
    pub key: [u8; 16],
    /// Its derived keys.
    pub keys: Keys,
    /// The authentic header.
    pub header: Header,
    /// The opened body.
    pub plaintext: Vec<u8>,
}

/// Whether a `Content-Type` value is `application/octet-stream`.
pub fn is_octet_stream(content_type: Option<&str>) -> bool {
    content_type
        .and_then(|v| v.split(';').next())
        .is_some_and(|v| v.trim().eq_ignore_ascii_case("application/octet-stream"))
}

/// Checks a request up to its tag and type: `Ok` with the opened message,
/// or the refusal.
pub async fn open(
    devices: &Devices,
    refusals: &Refusals,
    source: Option<IpAddr>,
    content_type: Option<&str>,
    body: &[u8],
    expected: MessageType,
) -> Result<Admitted, Refused> {
    let throttled = refusals.throttled(source);
    let refuse = |answer, kind, device: Option<&str>, detail| {
        Refused::new(answer, kind, device, detail).throttled(throttled)
    };
    if !is_octet_stream(content_type) {
        return Err(refuse(Answer::UnsupportedMediaType, "wrong_content_type", None, json!({})));
    }
    let header = Header::parse(body).map_err(|e| {
        let detail = json!({"reason": e.code(), "len": body.len()});
        refuse(Answer::MalformedEnvelope, "malformed_envelope", None, detail)
    })?;
    let device_id = i64::from(header.device_id);
    let crypto = match devices.crypto(DeviceId(device_id), header.key_version, !throttled).await {
        Ok(KeyLookup::Found(c)) => c,
        Ok(KeyLookup::Unknown) => {
            // The work a bad tag costs (derive, open), so that an unknown id
            // cannot be told from a known one by the time its refusal takes.
            let keys = Keys::derive(std::hint::black_box(&[0xA5; 16]));
            let _ = std::hint::black_box(seal::open(&keys, body, None));
            let detail = json!({"device_id": header.device_id});
            return Err(refuse(Answer::AuthFailed, "unknown_device", None, detail));
        }
        Ok(KeyLookup::NotLookedUp) => {
            let detail = json!({"device_id": header.device_id});
            return Err(refuse(Answer::RateLimited, "rate_limited", None, detail));
        }
        Err(e) => return Err(Refused::store(e)),
    };
    let name = crypto.name.clone();
    let Some((key_version, key)) = crypto.key_for(header.key_version) else {
        let detail = json!({"key_version": header.key_version});
        return Err(refuse(Answer::AuthFailed, "unknown_key_version", Some(&name), detail));
    };
    let keys = Keys::derive(&key);
    let (header, plaintext) = seal::open(&keys, body, None).map_err(|e| {
        let detail = json!({"reason": e.code(), "counter": header.counter});
        refuse(Answer::AuthFailed, "bad_tag", Some(&name), detail)
    })?;
    // Authentic from here on: the header is covered by the tag, and an
    // authentic request is never throttled.
    if header.direction != Direction::Up || header.msg_type != expected as u8 {
        let detail = json!({"type": header.msg_type});
        return Err(Refused::new(Answer::WrongType, "wrong_type", Some(&name), detail));
    }
    Ok(Admitted { crypto, key_version, key, keys, header, plaintext })
}

#[cfg(test)]
mod tests {
    use super::is_octet_stream;

    #[test]
    fn only_octet_streams_pass() {
        for ok in [
            "application/octet-stream",
            "Application/Octet-Stream; charset=x",
            " application/octet-stream ",
        ] {
            assert!(is_octet_stream(Some(ok)), "{ok}");
        }
        for bad in [None, Some("application/json"), Some(""), Some("application/octet-streams")] {
            assert!(!is_octet_stream(bad), "{bad:?}");
        }
    }
}
