//! Encrypted firmware delivery (protocol 1.4): an image travels in chunks,
//! each sealed with AES-128-GCM under a key only the one device it is offered
//! to (and the server) can derive, so the device decrypts and checks each
//! chunk as it streams into its slot, holding one fetch at a time, and a cut
//! download resumes at a chunk boundary.
//!
//! ```text
//! key   = HKDF-SHA256(ikm = device key, salt = offer token (16 B), info = "ecowatt/v1 firmware")[..16]
//! chunk i (plaintext bytes [i*C, min((i+1)*C, size))) ->  ciphertext | tag (16 B)
//! nonce = 00 00 00 00 | i (u64, big-endian)        associated data = size (u64, big-endian)
//! ```
//!
//! `C` is `2^chunk_log2` bytes (the offer's delivery extension says which,
//! [`MIN_CHUNK_LOG2`]..=[`MAX_CHUNK_LOG2`]); the stream is the chunks in
//! order, `size + 16 * chunks` bytes. The token is fresh per device and
//! offer, so no two streams share a key. The signature over the manifest
//! still covers the plaintext: after the last chunk the device checks the
//! image's SHA-256 as for a clear download.

use aes_gcm::aead::{AeadInPlace, KeyInit};
use aes_gcm::{Aes128Gcm, Nonce, Tag};
use hkdf::Hkdf;
use sha2::Sha256;

use crate::seal::DeviceKey;

/// The GCM tag after each chunk.
pub const TAG_LEN: usize = 16;
/// Smallest chunk, `2^10` = 1 KiB.
pub const MIN_CHUNK_LOG2: u8 = 10;
/// Largest chunk, `2^16` = 64 KiB.
pub const MAX_CHUNK_LOG2: u8 = 16;
/// What the server uses: 4 KiB (a flash sector of the ESP32-C3).
pub const DEFAULT_CHUNK_LOG2: u8 = 12;

/// A chunk failed authentication: altered, truncated, or not encrypted for
/// this device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkRefused {
    /// Its index.
    pub index: u64,
}

impl core::fmt::Display for ChunkRefused {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(f, "image chunk {} failed authentication", self.index)
    }
}

/// The cipher of one device's delivery stream for one offer.
#[derive(Clone)]
pub struct Delivery {
    cipher: Aes128Gcm,
    /// Plaintext bytes per chunk.
    pub chunk: u64,
    /// The image's size.
    pub size: u64,
}

impl core::fmt::Debug for Delivery {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(f, "Delivery {{ chunk: {}, size: {}, key: .. }}", self.chunk, self.size)
    }
}

/// The delivery key of `device_key` for the offer named by `token`.
pub fn key(device_key: &DeviceKey, token: &[u8; 16]) -> [u8; 16] {
    let mut out = [0u8; 16];
    Hkdf::<Sha256>::new(Some(token), device_key)
        .expand(b"ecowatt/v1 firmware", &mut out)
        .expect("16 bytes is a valid HKDF-SHA256 output length");
    out
}

impl Delivery {
    /// The stream of an image of `size` bytes in chunks of `2^chunk_log2`
    /// (clamped to the allowed range), for `device_key` and `token`.
    pub fn new(device_key: &DeviceKey, token: &[u8; 16], chunk_log2: u8, size: u64) -> Self {
        let log2 = chunk_log2.clamp(MIN_CHUNK_LOG2, MAX_CHUNK_LOG2);
        let cipher = Aes128Gcm::new_from_slice(&key(device_key, token)).expect("16-byte key");
        Delivery { cipher, chunk: 1 << log2, size }
    }

    /// Chunks in the image.
    pub fn chunks(&self) -> u64 {
        self.size.div_ceil(self.chunk)
    }

    /// The stream's length.
    pub fn stream_len(&self) -> u64 {
        self.size + TAG_LEN as u64 * self.chunks()
    }

    /// Plaintext bytes of chunk `index`.
    pub fn plain_len(&self, index: u64) -> u64 {
        self.size.saturating_sub(index * self.chunk).min(self.chunk)
    }

    /// Where chunk `index` starts in the stream.
    pub fn stream_offset(&self, index: u64) -> u64 {
        index * (self.chunk + TAG_LEN as u64)
    }

    fn nonce(index: u64) -> Nonce<aes_gcm::aead::consts::U12> {
        let mut n = [0u8; 12];
        n[4..].copy_from_slice(&index.to_be_bytes());
        Nonce::from(n)
    }

    /// Encrypts chunk `index` (its plaintext in `buf`) in place and appends its tag.
    pub fn seal(&self, index: u64, buf: &mut alloc::vec::Vec<u8>) {
        let tag = self
            .cipher
            .encrypt_in_place_detached(&Self::nonce(index), &self.size.to_be_bytes(), buf)
            .expect("a chunk is far below GCM's length limit");
        buf.extend_from_slice(&tag);
    }

    /// Decrypts chunk `index` (ciphertext and tag in `buf`) in place: the
    /// plaintext is `buf[..buf.len() - 16]`.
    pub fn open(&self, index: u64, buf: &mut [u8]) -> Result<(), ChunkRefused> {
        let refused = ChunkRefused { index };
        if buf.len() != self.plain_len(index) as usize + TAG_LEN || index >= self.chunks() {
            return Err(refused);
        }
        let (text, tag) = buf.split_at_mut(buf.len() - TAG_LEN);
        self.cipher
            .decrypt_in_place_detached(
                &Self::nonce(index),
                &self.size.to_be_bytes(),
                text,
                Tag::from_slice(tag),
            )
            .map_err(|_| refused)
    }

    /// The stream bytes `[start, end]` (inclusive) of `image`: only the
    /// chunks they touch are encrypted.
    pub fn stream_range(&self, image: &[u8], start: u64, end: u64) -> alloc::vec::Vec<u8> {
        let step = self.chunk + TAG_LEN as u64;
        let (first, last) = (start / step, end / step);
        let mut out = alloc::vec::Vec::new();
        for index in first..=last.min(self.chunks().saturating_sub(1)) {
            let from = (index * self.chunk) as usize;
            let mut buf = image[from..from + self.plain_len(index) as usize].to_vec();
            self.seal(index, &mut buf);
            out.extend_from_slice(&buf);
        }
        let skip = (start - first * step) as usize;
        let take = (end - start + 1) as usize;
        out.drain(..skip.min(out.len()));
        out.truncate(take);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::vec::Vec;

    fn image(n: usize) -> Vec<u8> {
        (0..n).map(|i| (i * 7 + i / 251) as u8).collect()
    }

    #[test]
    fn a_stream_decrypts_chunk_by_chunk_only_for_its_device_and_offer() {
        let img = image(10_000);
        let d = Delivery::new(&[1; 16], &[2; 16], 10, img.len() as u64);
        assert_eq!((d.chunk, d.chunks(), d.stream_len()), (1024, 10, 10_000 + 160));
        let stream = d.stream_range(&img, 0, d.stream_len() - 1);
        assert_eq!(stream.len() as u64, d.stream_len());
        let mut out = Vec::new();
        for i in 0..d.chunks() {
            let at = d.stream_offset(i) as usize;
            let mut buf = stream[at..at + d.plain_len(i) as usize + TAG_LEN].to_vec();
            d.open(i, &mut buf).unwrap();
            out.extend_from_slice(&buf[..buf.len() - TAG_LEN]);
        }
        assert_eq!(out, img);

        // Another device, another offer, a flipped bit, a swapped index, a cut: refused.
        let at = d.stream_offset(3) as usize;
        let chunk3 = stream[at..at + 1024 + TAG_LEN].to_vec();
        for other in [
            Delivery::new(&[9; 16], &[2; 16], 10, img.len() as u64),
            Delivery::new(&[1; 16], &[3; 16], 10, img.len() as u64),
            Delivery::new(&[1; 16], &[2; 16], 10, img.len() as u64 + 1),
        ] {
            assert_eq!(other.open(3, &mut chunk3.clone()), Err(ChunkRefused { index: 3 }));
        }
        let mut flipped = chunk3.clone();
        flipped[100] ^= 1;
        assert!(d.open(3, &mut flipped).is_err());
        assert!(d.open(4, &mut chunk3.clone()).is_err());
        assert!(d.open(3, &mut chunk3[..500].to_vec()).is_err());
        assert!(d.open(10, &mut chunk3.clone()).is_err());
    }

    #[test]
    fn any_range_of_the_stream_is_the_same_bytes_as_the_whole() {
        let img = image(5_000);
        let d = Delivery::new(&[4; 16], &[5; 16], 10, img.len() as u64);
        let whole = d.stream_range(&img, 0, d.stream_len() - 1);
        for (a, b) in [(0, 0), (0, 1039), (1040, 2079), (1000, 3000), (5000, 5079), (4159, 5079)] {
            assert_eq!(d.stream_range(&img, a, b), whole[a as usize..=b as usize], "{a}-{b}");
        }
    }
}
