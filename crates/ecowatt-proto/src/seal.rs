//! The sealed envelope of device protocol v1 (`docs/protocol.md`):
//! AES-128-GCM with a key per direction derived from the device key, a 64-bit
//! message counter in the nonce, and the header (protocol version, message
//! type, direction, key version, device id, counter) as associated data.
//! Answers also bind the counter of the request they answer.
//!
//! ```text
//! 0      1      2      3      4          8                16        16+n   16+n+16
//! | ver  | type | dir  | kver | device id | counter (BE)  | ciphertext | tag |
//! ```

use aes_gcm::aead::{AeadInPlace, KeyInit};
use aes_gcm::{Aes128Gcm, Nonce, Tag};
use alloc::vec::Vec;
use core::fmt;
use hkdf::Hkdf;
use sha2::Sha256;

/// Protocol version carried in every envelope.
pub const VERSION: u8 = 1;
/// Header length; also the associated data of a request.
pub const HEADER_LEN: usize = 16;
/// GCM tag length.
pub const TAG_LEN: usize = 16;
/// Smallest envelope: header and tag around an empty body.
pub const MIN_LEN: usize = HEADER_LEN + TAG_LEN;
/// Largest envelope the protocol allows (header + 64 KiB body + tag).
pub const MAX_LEN: usize = HEADER_LEN + 65_536 + TAG_LEN;

/// Which way a message travels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// Device to server (requests).
    Up = 1,
    /// Server to device (answers).
    Down = 2,
}

impl Direction {
    fn from_byte(b: u8) -> Option<Self> {
        match b {
            1 => Some(Direction::Up),
            2 => Some(Direction::Down),
            _ => None,
        }
    }

    fn info(self) -> &'static [u8] {
        match self {
            Direction::Up => b"ecowatt/v1 up",
            Direction::Down => b"ecowatt/v1 down",
        }
    }
}

/// The device's 128-bit key.
pub type DeviceKey = [u8; 16];

/// The two direction keys derived from a device key with HKDF-SHA256 (no salt,
/// info `"ecowatt/v1 up"` or `"ecowatt/v1 down"`, 16 bytes each).
#[derive(Clone)]
pub struct Keys {
    up: Aes128Gcm,
    down: Aes128Gcm,
}

impl fmt::Debug for Keys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Keys(..)")
    }
}

/// One direction key, derived from `device_key`.
pub fn derive_key(device_key: &DeviceKey, direction: Direction) -> [u8; 16] {
    let mut out = [0u8; 16];
    Hkdf::<Sha256>::new(None, device_key)
        .expand(direction.info(), &mut out)
        .expect("16 bytes is a valid HKDF-SHA256 output length");
    out
}

impl Keys {
    /// Derives both direction keys.
    pub fn derive(device_key: &DeviceKey) -> Self {
        let cipher =
            |d| Aes128Gcm::new_from_slice(&derive_key(device_key, d)).expect("16-byte key");
        Keys { up: cipher(Direction::Up), down: cipher(Direction::Down) }
    }

    fn cipher(&self, direction: Direction) -> &Aes128Gcm {
        match direction {
            Direction::Up => &self.up,
            Direction::Down => &self.down,
        }
    }
}

/// The clear header of an envelope.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// Message type (see [`crate::messages::MessageType`]).
    pub msg_type: u8,
    /// Which way it travels.
    pub direction: Direction,
    /// Low byte of the key version that sealed it (key rotation).
    pub key_version: u8,
    /// The device's numeric id.
    pub device_id: u32,
    /// The sender's message counter for this direction.
    pub counter: u64,
}

/// Why an envelope was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EnvelopeError {
    /// Shorter than header + tag, or longer than [`MAX_LEN`].
    BadLength {
        /// Bytes received.
        len: usize,
    },
    /// A protocol version this implementation does not speak.
    UnsupportedVersion {
        /// The version byte.
        version: u8,
    },
    /// The direction byte is neither 1 nor 2.
    BadDirection {
        /// The direction byte.
        direction: u8,
    },
    /// The tag does not verify: wrong key, tampered bytes, or an answer to another request.
    BadTag,
}

impl EnvelopeError {
    /// A stable machine-readable code.
    pub fn code(&self) -> &'static str {
        match self {
            EnvelopeError::BadLength { .. } => "bad_length",
            EnvelopeError::UnsupportedVersion { .. } => "unsupported_version",
            EnvelopeError::BadDirection { .. } => "bad_direction",
            EnvelopeError::BadTag => "bad_tag",
        }
    }
}

impl fmt::Display for EnvelopeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            EnvelopeError::BadLength { len } => {
                write!(f, "envelope of {len} bytes is outside {MIN_LEN}..={MAX_LEN}")
            }
            EnvelopeError::UnsupportedVersion { version } => {
                write!(f, "protocol version {version} not supported")
            }
            EnvelopeError::BadDirection { direction } => {
                write!(f, "direction byte {direction} is not 1 or 2")
            }
            EnvelopeError::BadTag => f.write_str("authentication tag does not verify"),
        }
    }
}

impl core::error::Error for EnvelopeError {}

impl Header {
    /// The 16 header bytes.
    pub fn encode(&self) -> [u8; HEADER_LEN] {
        let mut h = [0u8; HEADER_LEN];
        h[0] = VERSION;
        h[1] = self.msg_type;
        h[2] = self.direction as u8;
        h[3] = self.key_version;
        h[4..8].copy_from_slice(&self.device_id.to_be_bytes());
        h[8..16].copy_from_slice(&self.counter.to_be_bytes());
        h
    }

    /// Reads the clear header of an envelope (before any key is known), checking
    /// length, version and direction.
    pub fn parse(envelope: &[u8]) -> Result<Header, EnvelopeError> {
        if !(MIN_LEN..=MAX_LEN).contains(&envelope.len()) {
            return Err(EnvelopeError::BadLength { len: envelope.len() });
        }
        if envelope[0] != VERSION {
            return Err(EnvelopeError::UnsupportedVersion { version: envelope[0] });
        }
        let direction = Direction::from_byte(envelope[2])
            .ok_or(EnvelopeError::BadDirection { direction: envelope[2] })?;
        Ok(Header {
            msg_type: envelope[1],
            direction,
            key_version: envelope[3],
            device_id: u32::from_be_bytes([envelope[4], envelope[5], envelope[6], envelope[7]]),
            counter: u64::from_be_bytes(envelope[8..16].try_into().expect("8 bytes")),
        })
    }

    /// The GCM nonce: direction byte, three zero bytes, counter big-endian.
    pub fn nonce(&self) -> [u8; 12] {
        let mut n = [0u8; 12];
        n[0] = self.direction as u8;
        n[4..].copy_from_slice(&self.counter.to_be_bytes());
        n
    }

    /// Associated data: the header, and for answers the counter of the request answered.
    fn aad(&self, answers: Option<u64>) -> ([u8; HEADER_LEN + 8], usize) {
        let mut aad = [0u8; HEADER_LEN + 8];
        aad[..HEADER_LEN].copy_from_slice(&self.encode());
        match answers {
            Some(request) => {
                aad[HEADER_LEN..].copy_from_slice(&request.to_be_bytes());
                (aad, HEADER_LEN + 8)
            }
            None => (aad, HEADER_LEN),
        }
    }
}

/// Seals `plaintext` under `header`. `answers` is the counter of the request
/// this message answers (server to device), `None` for requests.
pub fn seal(keys: &Keys, header: &Header, answers: Option<u64>, plaintext: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER_LEN + plaintext.len() + TAG_LEN);
    out.extend_from_slice(&header.encode());
    out.extend_from_slice(plaintext);
    let (aad, aad_len) = header.aad(answers);
    let tag = keys
        .cipher(header.direction)
        .encrypt_in_place_detached(
            Nonce::from_slice(&header.nonce()),
            &aad[..aad_len],
            &mut out[HEADER_LEN..],
        )
        .expect("plaintext within GCM limits");
    out.extend_from_slice(&tag);
    out
}

/// Opens an envelope: parses the header, verifies the tag (binding `answers`
/// for server answers) and returns the header and plaintext. Nothing in the
/// envelope may be trusted unless this succeeds.
pub fn open(
    keys: &Keys,
    envelope: &[u8],
    answers: Option<u64>,
) -> Result<(Header, Vec<u8>), EnvelopeError> {
    let header = Header::parse(envelope)?;
    let (body, tag) = envelope[HEADER_LEN..].split_at(envelope.len() - HEADER_LEN - TAG_LEN);
    let mut plaintext = body.to_vec();
    let (aad, aad_len) = header.aad(answers);
    keys.cipher(header.direction)
        .decrypt_in_place_detached(
            Nonce::from_slice(&header.nonce()),
            &aad[..aad_len],
            &mut plaintext,
            Tag::from_slice(tag),
        )
        .map_err(|_| EnvelopeError::BadTag)?;
    Ok((header, plaintext))
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: DeviceKey = *b"\x00\x01\x02\x03\x04\x05\x06\x07\x08\x09\x0a\x0b\x0c\x0d\x0e\x0f";

    fn header(direction: Direction, counter: u64) -> Header {
        Header { msg_type: 1, direction, key_version: 1, device_id: 7, counter }
    }

    #[test]
    fn round_trip_and_binding() {
        let keys = Keys::derive(&KEY);
        let env = seal(&keys, &header(Direction::Up, 5), None, b"hello");
        assert_eq!(env.len(), HEADER_LEN + 5 + TAG_LEN);
        let (h, p) = open(&keys, &env, None).unwrap();
        assert_eq!((h, p.as_slice()), (header(Direction::Up, 5), &b"hello"[..]));

        let answer = seal(&keys, &header(Direction::Down, 1), Some(5), b"ok");
        assert!(open(&keys, &answer, Some(5)).is_ok());
        assert_eq!(open(&keys, &answer, Some(6)), Err(EnvelopeError::BadTag), "bound to request 5");
        assert_eq!(open(&keys, &answer, None), Err(EnvelopeError::BadTag));
    }

    #[test]
    fn every_flipped_bit_is_refused() {
        let keys = Keys::derive(&KEY);
        let env = seal(&keys, &header(Direction::Up, 9), None, b"telemetry");
        for bit in 0..env.len() * 8 {
            let mut bad = env.clone();
            bad[bit / 8] ^= 1 << (bit % 8);
            assert!(open(&keys, &bad, None).is_err(), "bit {bit}");
        }
    }

    #[test]
    fn directions_use_different_keys() {
        assert_ne!(derive_key(&KEY, Direction::Up), derive_key(&KEY, Direction::Down));
        let keys = Keys::derive(&KEY);
        let env = seal(&keys, &header(Direction::Up, 1), None, b"x");
        let mut as_down = env.clone();
        as_down[2] = 2;
        assert_eq!(open(&keys, &as_down, None), Err(EnvelopeError::BadTag));
        let other = Keys::derive(&[9u8; 16]);
        assert_eq!(open(&other, &env, None), Err(EnvelopeError::BadTag));
    }

    #[test]
    fn malformed_headers_are_refused_before_any_crypto() {
        let keys = Keys::derive(&KEY);
        assert_eq!(open(&keys, &[1u8; 31], None), Err(EnvelopeError::BadLength { len: 31 }));
        let mut env = seal(&keys, &header(Direction::Up, 1), None, b"x");
        env[0] = 2;
        assert_eq!(open(&keys, &env, None), Err(EnvelopeError::UnsupportedVersion { version: 2 }));
        env[0] = 1;
        env[2] = 3;
        assert_eq!(open(&keys, &env, None), Err(EnvelopeError::BadDirection { direction: 3 }));
    }
}
