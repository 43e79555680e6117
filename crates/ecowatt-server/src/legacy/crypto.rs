//! The primitives the original firmware uses: AES-CBC with PKCS#7 padding
//! (its uploads, AES-128, and its firmware delivery, AES-256) and
//! HMAC-SHA256 in lowercase hex.

use aes::cipher::{BlockDecrypt, BlockEncrypt, KeyInit, generic_array::GenericArray};
use hmac::{Hmac, Mac};
use sha2::Sha256;

type Block = GenericArray<u8, aes::cipher::consts::U16>;

/// A block cipher of either key length.
enum Cipher {
    Aes128(Box<aes::Aes128>),
    Aes256(Box<aes::Aes256>),
}

impl Cipher {
    fn new(key: &[u8]) -> Option<Cipher> {
        match key.len() {
            16 => aes::Aes128::new_from_slice(key).ok().map(|c| Cipher::Aes128(Box::new(c))),
            32 => aes::Aes256::new_from_slice(key).ok().map(|c| Cipher::Aes256(Box::new(c))),
            _ => None,
        }
    }

    fn encrypt(&self, b: &mut Block) {
        match self {
            Cipher::Aes128(c) => c.encrypt_block(b),
            Cipher::Aes256(c) => c.encrypt_block(b),
        }
    }

    fn decrypt(&self, b: &mut Block) {
        match self {
            Cipher::Aes128(c) => c.decrypt_block(b),
            Cipher::Aes256(c) => c.decrypt_block(b),
        }
    }
}

/// AES-CBC decryption with PKCS#7 padding removed (`None` when the key,
/// the length or the padding is wrong). AES-128 or AES-256 by the key's length.
pub fn decrypt_cbc(key: &[u8], iv: &[u8; 16], data: &[u8]) -> Option<Vec<u8>> {
    let cipher = Cipher::new(key)?;
    if data.is_empty() || data.len() % 16 != 0 {
        return None;
    }
    let mut out = Vec::with_capacity(data.len());
    let mut prev = *iv;
    for block in data.chunks(16) {
        let mut b = Block::clone_from_slice(block);
        cipher.decrypt(&mut b);
        b.iter_mut().zip(prev.iter()).for_each(|(o, p)| *o ^= p);
        out.extend_from_slice(&b);
        prev.copy_from_slice(block);
    }
    let pad = usize::from(*out.last()?);
    if pad == 0 || pad > 16 || out[out.len() - pad..].iter().any(|&b| usize::from(b) != pad) {
        return None;
    }
    out.truncate(out.len() - pad);
    Some(out)
}

/// AES-CBC encryption after PKCS#7 padding (`None` for a key of another length).
pub fn encrypt_cbc(key: &[u8], iv: &[u8; 16], data: &[u8]) -> Option<Vec<u8>> {
    let cipher = Cipher::new(key)?;
    let pad = 16 - data.len() % 16;
    let mut out = Vec::with_capacity(data.len() + pad);
    out.extend_from_slice(data);
    out.extend(std::iter::repeat_n(pad as u8, pad));
    let mut prev = *iv;
    for block in out.chunks_mut(16) {
        block.iter_mut().zip(prev.iter()).for_each(|(b, p)| *b ^= p);
        let mut b = Block::clone_from_slice(block);
        cipher.encrypt(&mut b);
        block.copy_from_slice(&b);
        prev.copy_from_slice(block);
    }
    Some(out)
}

/// HMAC-SHA256 of the concatenated `parts`, lowercase hex.
pub fn hmac_hex(key: &[u8], parts: &[&[u8]]) -> String {
    let mut m = <Hmac<Sha256> as Mac>::new_from_slice(key).expect("HMAC takes any key length");
    parts.iter().for_each(|p| m.update(p));
    m.finalize().into_bytes().iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use ecowatt_proto::hex::decode;

    /// NIST SP 800-38A F.2.1 and F.2.5 (CBC-AES128 and CBC-AES256, first
    /// two blocks); the padding block that follows is ours, checked by the
    /// round trip.
    #[test]
    fn cbc_matches_the_nist_vectors() {
        let iv: [u8; 16] = decode("000102030405060708090a0b0c0d0e0f").unwrap().try_into().unwrap();
        let plain =
            decode("6bc1bee22e409f96e93d7e117393172aae2d8a571e03ac9c9eb76fac45af8e51").unwrap();
        for (key, cipher) in [
            (
                "2b7e151628aed2a6abf7158809cf4f3c",
                "7649abac8119b246cee98e9b12e9197d5086cb9b507219ee95db113a917678b2",
            ),
            (
                "603deb1015ca71be2b73aef0857d77811f352c073b6108d72d9810a30914dff4",
                "f58c4c04d6e5f1ba779eabfb5f7bfbd69cfc4e967edb808d679f777bc6702c7d",
            ),
        ] {
            let key = decode(key).unwrap();
            let out = encrypt_cbc(&key, &iv, &plain).unwrap();
            assert_eq!(&out[..32], decode(cipher).unwrap().as_slice());
            assert_eq!(out.len(), 48, "a full block of padding");
            assert_eq!(decrypt_cbc(&key, &iv, &out).unwrap(), plain);
            // Cut or with a wrong last byte: refused.
            assert_eq!(decrypt_cbc(&key, &iv, &out[..47]), None);
            assert_eq!(decrypt_cbc(&key, &iv, &out[..32]), None, "no valid padding");
        }
        assert_eq!(encrypt_cbc(&[0; 24], &iv, b"x"), None);
    }

    #[test]
    fn hmac_matches_rfc_4231_case_2() {
        assert_eq!(
            hmac_hex(b"Jefe", &[b"what do ya want ", b"for nothing?"]),
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }
}
