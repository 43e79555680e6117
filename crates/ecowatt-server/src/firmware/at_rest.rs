//! Firmware images encrypted at rest: every stored image is sealed with
//! AES-256-GCM under the server's image key (a file beside the database,
//! never in it), bound to its record by its SHA-256, so that a copy of the
//! database alone does not give the images away.
//!
//! ```text
//! "EWI1" | key id (8 B) | nonce (12 B, random) | ciphertext | tag (16 B)
//! key id = SHA-256("ecowatt image key id" | key)[..8]    associated data = the image's SHA-256 (hex)
//! ```
//!
//! A blob without the magic was stored before images were encrypted: the
//! server encrypts those at start.

use std::path::Path;

use aes_gcm::aead::{Aead, KeyInit, Payload};
use aes_gcm::{Aes256Gcm, Nonce};
use sha2::{Digest, Sha256};

/// What an encrypted blob starts with.
pub const MAGIC: &[u8; 4] = b"EWI1";
const HEAD: usize = 4 + 8 + 12;

/// The server's image key.
#[derive(Clone)]
pub struct ImageKey {
    cipher: Aes256Gcm,
    id: [u8; 8],
}

impl std::fmt::Debug for ImageKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ImageKey({})", self.id_hex())
    }
}

/// Why a stored image cannot be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AtRestError {
    /// Sealed under another key than this server's.
    #[error(
        "the image was encrypted under image key {stored}, this server's is {ours}: give it the image key file of the server that stored it"
    )]
    OtherKey {
        /// The key id in the blob.
        stored: String,
        /// This server's.
        ours: String,
    },
    /// Altered, truncated, or not this record's.
    #[error("the stored image fails authentication (altered or not this record's)")]
    Corrupt,
}

impl ImageKey {
    /// The key of these 32 bytes.
    pub fn from_bytes(key: &[u8; 32]) -> ImageKey {
        let mut h = Sha256::new();
        h.update(b"ecowatt image key id");
        h.update(key);
        let id = h.finalize()[..8].try_into().expect("8 bytes");
        ImageKey { cipher: Aes256Gcm::new_from_slice(key).expect("32-byte key"), id }
    }

    /// Reads the key file (64 hex digits), or, when it is missing and
    /// `may_create`, makes a new key and writes it there (mode 0600).
    pub fn load_or_create(path: &Path, may_create: bool) -> Result<ImageKey, String> {
        match std::fs::read_to_string(path) {
            Ok(text) => {
                let bytes = ecowatt_proto::hex::decode(text.trim())
                    .ok()
                    .and_then(|b| <[u8; 32]>::try_from(b).ok())
                    .ok_or_else(|| {
                        format!("{}: not an image key (64 hex digits)", path.display())
                    })?;
                Ok(ImageKey::from_bytes(&bytes))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && may_create => {
                let mut key = [0u8; 32];
                getrandom::fill(&mut key).map_err(|e| format!("no randomness: {e}"))?;
                ecowatt_formats::secret::write_secret(
                    path,
                    &ecowatt_proto::hex::encode_upper(&key),
                )
                .map_err(|e| format!("{}: {e}", path.display()))?;
                Ok(ImageKey::from_bytes(&key))
            }
            Err(e) => Err(format!("{}: {e}", path.display())),
        }
    }

    /// Its id, hex (what blobs name).
    pub fn id_hex(&self) -> String {
        ecowatt_proto::hex::encode_upper(&self.id)
    }

    /// Its id.
    pub fn id(&self) -> [u8; 8] {
        self.id
    }

    /// `image` sealed for storage, bound to its SHA-256 (hex).
    pub fn seal(&self, sha256_hex: &str, image: &[u8]) -> Vec<u8> {
        let mut nonce = [0u8; 12];
        getrandom::fill(&mut nonce).expect("the system has randomness");
        let sealed = self
            .cipher
            .encrypt(Nonce::from_slice(&nonce), Payload { msg: image, aad: sha256_hex.as_bytes() })
            .expect("an image is far below GCM's length limit");
        [&MAGIC[..], &self.id, &nonce, &sealed].concat()
    }

    /// The image in `blob` (sealed by [`ImageKey::seal`], or stored in clear
    /// before images were encrypted).
    pub fn open(&self, sha256_hex: &str, blob: &[u8]) -> Result<Vec<u8>, AtRestError> {
        let Some(id) = key_id_of(blob) else { return Ok(blob.to_vec()) };
        if id != self.id {
            let stored = ecowatt_proto::hex::encode_upper(&id);
            return Err(AtRestError::OtherKey { stored, ours: self.id_hex() });
        }
        self.cipher
            .decrypt(
                Nonce::from_slice(&blob[12..HEAD]),
                Payload { msg: &blob[HEAD..], aad: sha256_hex.as_bytes() },
            )
            .map_err(|_| AtRestError::Corrupt)
    }
}

/// The key id a stored blob names, `None` for an image stored in clear.
pub fn key_id_of(blob: &[u8]) -> Option<[u8; 8]> {
    (blob.len() >= HEAD + 16 && blob.starts_with(MAGIC))
        .then(|| blob[4..12].try_into().expect("8 bytes"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_image_opens_only_with_its_key_and_its_record() {
        let key = ImageKey::from_bytes(&[1; 32]);
        let image = b"firmware bytes".repeat(100);
        let blob = key.seal("AB", &image);
        assert!(!blob.windows(14).any(|w| w == b"firmware bytes"), "stored in clear");
        assert_eq!(key_id_of(&blob), Some(key.id()));
        assert_eq!(key.open("AB", &blob).unwrap(), image);
        assert_eq!(key.open("CD", &blob), Err(AtRestError::Corrupt), "another record's");
        let mut altered = blob.clone();
        altered[40] ^= 1;
        assert_eq!(key.open("AB", &altered), Err(AtRestError::Corrupt));
        let other = ImageKey::from_bytes(&[2; 32]);
        assert!(matches!(other.open("AB", &blob), Err(AtRestError::OtherKey { .. })));
        // Stored before encryption: read as it is.
        assert_eq!(key.open("AB", &image).unwrap(), image);
        assert_eq!(key_id_of(&image), None);
    }

    #[test]
    fn a_key_file_is_made_once_and_read_back() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("image.key");
        assert!(ImageKey::load_or_create(&path, false).is_err(), "not made unless allowed");
        let made = ImageKey::load_or_create(&path, true).unwrap();
        let read = ImageKey::load_or_create(&path, false).unwrap();
        assert_eq!(made.id(), read.id());
        std::fs::write(&path, "nonsense").unwrap();
        assert!(ImageKey::load_or_create(&path, true).unwrap_err().contains("not an image key"));
    }
}
