//! The original firmware's chunked OTA (`/ota/check`, `/ota/chunk`): the
//! image encrypted with AES-256-CBC under the firmware line's delivery key,
//! served in 1 KiB chunks each with an HMAC-SHA256 (key: the line's
//! `HMAC_PSK`) over the chunk and its number in decimal; the device checks
//! each chunk's HMAC, decrypts into its OTA partition, then checks the
//! RSA-2048 signature over the image's SHA-256 before switching.
//!
//! EcoWatt stores images in plaintext and encrypts on demand; the IV is
//! derived from the key and the image (the original drew one at random and
//! kept it in its manifest), so every server process serves the same bytes.

use base64::Engine;
use sha2::{Digest, Sha256};

use super::crypto;

/// Bytes per chunk (the original's).
pub const CHUNK_SIZE: usize = 1024;

/// An image prepared for delivery.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Encrypted {
    /// The stored image's id.
    pub firmware_id: i64,
    /// The IV.
    pub iv: [u8; 16],
    /// The encrypted image (PKCS#7 padded).
    pub data: Vec<u8>,
}

/// The IV for `image` under `key`: the first 16 bytes of an HMAC of its SHA-256.
pub fn iv_for(key: &[u8; 32], image: &[u8]) -> [u8; 16] {
    let sha = Sha256::digest(image);
    let mac = crypto::hmac_hex(key, &[b"ecowatt-legacy-ota-iv", &sha]);
    let bytes = ecowatt_proto::hex::decode(&mac[..32]).expect("hex of our own");
    bytes.try_into().expect("16 bytes")
}

/// Encrypts an image for delivery.
pub fn encrypt(firmware_id: i64, key: &[u8; 32], image: &[u8]) -> Encrypted {
    let iv = iv_for(key, image);
    let data = crypto::encrypt_cbc(key, &iv, image).expect("a 32-byte key");
    Encrypted { firmware_id, iv, data }
}

impl Encrypted {
    /// Number of chunks.
    pub fn total_chunks(&self) -> usize {
        self.data.len().div_ceil(CHUNK_SIZE)
    }

    /// Chunk `n` (from 0), if there is one.
    pub fn chunk(&self, n: usize) -> Option<&[u8]> {
        let start = n.checked_mul(CHUNK_SIZE)?;
        (start < self.data.len())
            .then(|| &self.data[start..(start + CHUNK_SIZE).min(self.data.len())])
    }

    /// The IV in Base64, as the original's manifest carries it.
    pub fn iv_base64(&self) -> String {
        base64::engine::general_purpose::STANDARD.encode(self.iv)
    }
}

/// A chunk's HMAC as the original firmware checks it: over the chunk's
/// bytes, then its number in decimal.
pub fn chunk_hmac(psk: &[u8], chunk: &[u8], n: usize) -> String {
    crypto::hmac_hex(psk, &[chunk, n.to_string().as_bytes()])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_image_is_served_in_chunks_that_decrypt_back() {
        let key = [7u8; 32];
        let image: Vec<u8> = (0..2500u32).map(|i| (i * 31 % 251) as u8).collect();
        let e = encrypt(3, &key, &image);
        // 2500 bytes pad to 2512: three chunks, the last of 464 bytes.
        assert_eq!((e.data.len(), e.total_chunks()), (2512, 3));
        assert_eq!(e.chunk(2).map(<[u8]>::len), Some(464));
        assert_eq!(e.chunk(3), None);
        assert_eq!(e.chunk(usize::MAX), None);
        let joined: Vec<u8> = (0..3).flat_map(|n| e.chunk(n).unwrap().to_vec()).collect();
        assert_eq!(crypto::decrypt_cbc(&key, &e.iv, &joined).unwrap(), image);
        // The same image under the same key: the same bytes, in any process.
        assert_eq!(encrypt(3, &key, &image), e);
        assert_ne!(encrypt(3, &[8; 32], &image).iv, e.iv);
        assert_eq!(base64::engine::general_purpose::STANDARD.decode(e.iv_base64()).unwrap(), e.iv);
    }

    #[test]
    fn chunk_hmacs_cover_the_bytes_and_the_number() {
        // Python: hmac.new(b"psk", b"abc" + b"12", hashlib.sha256).hexdigest()
        assert_eq!(
            chunk_hmac(b"psk", b"abc", 12),
            "36ae526f2c151bc3db7c8be292ac093135312e1047081ff763c711494fb4bf63"
        );
        assert_ne!(chunk_hmac(b"psk", b"abc", 12), chunk_hmac(b"psk", b"abc", 13));
    }
}
