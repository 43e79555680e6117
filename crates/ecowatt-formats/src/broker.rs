//! The device protocol over an MQTT broker (docs/protocol.md, "Over an MQTT
//! broker"): the same sealed envelopes as over HTTP, on per-device topics.
//! A device publishes a request on `PREFIX/DEVICE/up/ROUTE` and hears the
//! answer on `PREFIX/DEVICE/down/ROUTE`; the servers take every device's
//! requests through one MQTT v5 shared subscription, so that several server
//! processes split them. MQTT is only a transport: replay windows, effects
//! and the store are those of the HTTP endpoints, which answer each request.
//!
//! Here: the topics, the answer frame (the HTTP status, what it answers,
//! the body), the image fetch request, the broker password a device derives
//! from its key, and Mosquitto's password hash.

use hkdf::Hkdf;
use sha2::{Sha256, Sha512};

/// Default prefix of the transport's topics (apart from the northbound
/// `ecowatt/...` topics, whose second level is a device name).
pub const DEFAULT_PREFIX: &str = "ecowatt-device";
/// Default shared-subscription group of the servers.
pub const DEFAULT_GROUP: &str = "ecowatt";
/// Most image bytes one fetch asks for (the device agent asks 64 KiB).
pub const MAX_FETCH: u32 = 128 * 1024;
/// Largest MQTT packet either side takes: a fetch's answer and its framing
/// (an encrypted image grows 16 bytes per 4 KiB chunk).
pub const MAX_PACKET: u32 = 256 * 1024;

/// What a request asks, by the HTTP endpoint that answers it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Route {
    /// `POST /api/v1/device/sync` (the long poll).
    Sync,
    /// `POST /api/v1/device/telemetry`.
    Telemetry,
    /// `GET /api/v1/device/firmware/{token}` with a range ([`FetchRequest`]).
    Firmware,
}

impl Route {
    /// Every route.
    pub const ALL: [Route; 3] = [Route::Sync, Route::Telemetry, Route::Firmware];

    /// Its topic level.
    pub const fn name(self) -> &'static str {
        match self {
            Route::Sync => "sync",
            Route::Telemetry => "telemetry",
            Route::Firmware => "firmware",
        }
    }

    /// The route of a topic level.
    pub fn from_name(name: &str) -> Option<Route> {
        Route::ALL.into_iter().find(|r| r.name() == name)
    }
}

/// The transport's topics under a prefix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceTopics {
    /// First level(s) of every topic (`ecowatt-device`).
    pub prefix: String,
}

impl Default for DeviceTopics {
    fn default() -> Self {
        DeviceTopics { prefix: DEFAULT_PREFIX.to_owned() }
    }
}

impl DeviceTopics {
    /// Where `device` publishes a request.
    pub fn up(&self, device: &str, route: Route) -> String {
        format!("{}/{device}/up/{}", self.prefix, route.name())
    }
    /// Where `device` hears the answers.
    pub fn down(&self, device: &str, route: Route) -> String {
        format!("{}/{device}/down/{}", self.prefix, route.name())
    }
    /// What `device` subscribes to: all its answers.
    pub fn down_all(&self, device: &str) -> String {
        format!("{}/{device}/down/+", self.prefix)
    }
    /// What the servers subscribe to: every device's requests, shared by `group`.
    pub fn up_shared(&self, group: &str) -> String {
        format!("$share/{group}/{}/+/up/+", self.prefix)
    }
    /// The device and route of a request topic.
    pub fn parse_up<'a>(&self, topic: &'a str) -> Option<(&'a str, Route)> {
        self.parse(topic, "up")
    }
    /// The device and route of an answer topic.
    pub fn parse_down<'a>(&self, topic: &'a str) -> Option<(&'a str, Route)> {
        self.parse(topic, "down")
    }
    fn parse<'a>(&self, topic: &'a str, way: &str) -> Option<(&'a str, Route)> {
        let rest = topic.strip_prefix(self.prefix.as_str())?.strip_prefix('/')?;
        let (device, rest) = rest.split_once('/')?;
        let route = rest.strip_prefix(way)?.strip_prefix('/')?;
        (!device.is_empty()).then_some(())?;
        Some((device, Route::from_name(route)?))
    }
    /// Mosquitto ACL lines for `device` (after its `user` line): it may
    /// publish only its requests and read only its answers.
    pub fn acl(&self, device: &str) -> String {
        format!(
            "user {device}\ntopic write {}/{device}/up/#\ntopic read {}/{device}/down/#\n",
            self.prefix, self.prefix
        )
    }
}

/// Why a frame does not decode.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// Shorter than its fixed part.
    #[error("frame too short: {0} bytes")]
    TooShort(usize),
    /// A fetch request of the wrong length.
    #[error("fetch request of {0} bytes (expected {FETCH_LEN})")]
    FetchLength(usize),
}

/// An answer on a device's `down` topic: the HTTP status the endpoint gave,
/// what it answers (a sync's or upload's envelope counter, a fetch's
/// correlation), and the body (a sealed envelope, image bytes, or a JSON error).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answer {
    /// 200 (206 for a fetch) or the refusal's status.
    pub status: u16,
    /// The request answered.
    pub correlation: u64,
    /// As over HTTP.
    pub body: Vec<u8>,
}

/// Bytes of an answer before its body.
pub const ANSWER_HEAD: usize = 10;

impl Answer {
    /// `status (u16 BE) | correlation (u64 BE) | body`.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(ANSWER_HEAD + self.body.len());
        out.extend_from_slice(&self.status.to_be_bytes());
        out.extend_from_slice(&self.correlation.to_be_bytes());
        out.extend_from_slice(&self.body);
        out
    }

    /// Reads an answer.
    pub fn decode(bytes: &[u8]) -> Result<Answer, FrameError> {
        if bytes.len() < ANSWER_HEAD {
            return Err(FrameError::TooShort(bytes.len()));
        }
        let status = u16::from_be_bytes([bytes[0], bytes[1]]);
        let correlation = u64::from_be_bytes(bytes[2..10].try_into().expect("8 bytes"));
        Ok(Answer { status, correlation, body: bytes[ANSWER_HEAD..].to_vec() })
    }
}

/// An image fetch: the range `offset .. offset + len` of the download an
/// update offer names, asked by the device whose topic it comes on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FetchRequest {
    /// Echoed in the answer.
    pub correlation: u64,
    /// First byte.
    pub offset: u64,
    /// Bytes (at most [`MAX_FETCH`]).
    pub len: u32,
    /// The version byte of the key the device holds.
    pub key_version: u8,
    /// The offer's download token.
    pub token: [u8; 16],
}

/// Bytes of a fetch request.
pub const FETCH_LEN: usize = 8 + 8 + 4 + 1 + 16;

impl FetchRequest {
    /// `correlation u64 | offset u64 | len u32 | key version u8 | token [16]`, big-endian.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(FETCH_LEN);
        out.extend_from_slice(&self.correlation.to_be_bytes());
        out.extend_from_slice(&self.offset.to_be_bytes());
        out.extend_from_slice(&self.len.to_be_bytes());
        out.push(self.key_version);
        out.extend_from_slice(&self.token);
        out
    }

    /// Reads a fetch request.
    pub fn decode(b: &[u8]) -> Result<FetchRequest, FrameError> {
        if b.len() != FETCH_LEN {
            return Err(FrameError::FetchLength(b.len()));
        }
        Ok(FetchRequest {
            correlation: u64::from_be_bytes(b[0..8].try_into().expect("8")),
            offset: u64::from_be_bytes(b[8..16].try_into().expect("8")),
            len: u32::from_be_bytes(b[16..20].try_into().expect("4")),
            key_version: b[20],
            token: b[21..37].try_into().expect("16"),
        })
    }
}

/// The password a device gives the broker, user name its device name:
/// HKDF-SHA256 of its key (no salt, info `ecowatt/v1 broker password`), 16
/// bytes as 32 lowercase hex digits. The device holds it without being
/// told, the server can hash it for the broker's password file, and a new
/// key gives a new password.
pub fn broker_password(key: &[u8; 16]) -> String {
    let mut out = [0u8; 16];
    Hkdf::<Sha256>::new(None, key)
        .expand(b"ecowatt/v1 broker password", &mut out)
        .expect("16 bytes is a valid HKDF length");
    out.iter().map(|b| format!("{b:02x}")).collect()
}

/// PBKDF2 iterations of Mosquitto's `$7$` hashes (what `mosquitto_passwd` uses).
pub const MOSQUITTO_ITERATIONS: u32 = 101;

/// A password as Mosquitto's password file holds it (`$7$`: PBKDF2-HMAC-SHA512,
/// 101 iterations, this 12-byte salt, standard base64), after `user:`.
pub fn mosquitto_hash(password: &str, salt: &[u8; 12]) -> String {
    use base64::Engine;
    let mut out = [0u8; 64];
    pbkdf2::pbkdf2_hmac::<Sha512>(password.as_bytes(), salt, MOSQUITTO_ITERATIONS, &mut out);
    let b64 = base64::engine::general_purpose::STANDARD;
    format!("$7${MOSQUITTO_ITERATIONS}${}${}", b64.encode(salt), b64.encode(out))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topics_round_trip_and_refuse_what_is_not_theirs() {
        let t = DeviceTopics::default();
        assert_eq!(t.up("inv-1", Route::Sync), "ecowatt-device/inv-1/up/sync");
        assert_eq!(t.down("inv-1", Route::Firmware), "ecowatt-device/inv-1/down/firmware");
        assert_eq!(t.up_shared("g"), "$share/g/ecowatt-device/+/up/+");
        for r in Route::ALL {
            assert_eq!(t.parse_up(&t.up("a.b", r)), Some(("a.b", r)));
            assert_eq!(t.parse_down(&t.down("a.b", r)), Some(("a.b", r)));
            assert_eq!(t.parse_up(&t.down("a.b", r)), None);
        }
        for bad in [
            "ecowatt-device/x/up/other",
            "ecowatt-device//up/sync",
            "ecowatt-device/x/up/sync/more",
            "ecowatt/x/up/sync",
            "ecowatt-devicex/x/up/sync",
        ] {
            assert_eq!(t.parse_up(bad), None, "{bad}");
        }
        assert_eq!(
            t.acl("inv-1"),
            "user inv-1\ntopic write ecowatt-device/inv-1/up/#\ntopic read ecowatt-device/inv-1/down/#\n"
        );
    }

    #[test]
    fn frames_round_trip_and_short_ones_are_refused() {
        let a = Answer { status: 409, correlation: u64::MAX - 3, body: b"{}".to_vec() };
        assert_eq!(Answer::decode(&a.encode()), Ok(a.clone()));
        assert_eq!(&a.encode()[..2], &[0x01, 0x99]);
        assert_eq!(Answer::decode(&[0; 9]), Err(FrameError::TooShort(9)));
        let f = FetchRequest {
            correlation: 7,
            offset: 1 << 33,
            len: 65536,
            key_version: 2,
            token: [0xAB; 16],
        };
        let bytes = f.encode();
        assert_eq!(bytes.len(), FETCH_LEN);
        assert_eq!(FetchRequest::decode(&bytes), Ok(f));
        assert_eq!(FetchRequest::decode(&bytes[1..]), Err(FrameError::FetchLength(36)));
    }

    #[test]
    fn the_broker_password_is_the_keys_and_differs_between_keys() {
        let a = broker_password(&[1; 16]);
        assert_eq!(a.len(), 32);
        assert!(a.bytes().all(|b| b.is_ascii_hexdigit()));
        assert_eq!(a, broker_password(&[1; 16]));
        assert_ne!(a, broker_password(&[2; 16]));
    }

    #[test]
    fn mosquitto_hashes_have_its_shape() {
        let h = mosquitto_hash("secret", &[7; 12]);
        let parts: Vec<&str> = h.split('$').collect();
        assert_eq!(parts[..3], ["", "7", "101"]);
        assert_eq!(parts[3], "BwcHBwcHBwcHBwcH");
        assert_eq!(parts[4].len(), 88, "64 bytes in base64");
        assert_ne!(h, mosquitto_hash("other", &[7; 12]));
    }
}
