//! RSA-2048 PKCS#1 v1.5 / SHA-256 manifest signatures: our no_std verifier
//! (crypto-bigint) against signatures made by the `rsa` crate, an independent
//! implementation. Test keys only (made for these tests, never for firmware).

use ecowatt_proto::firmware::{FirmwareError, Manifest, PublicKey, Version, verify_rsa2048};
use rsa::RsaPrivateKey;
use rsa::pkcs1v15::SigningKey;
use rsa::pkcs8::DecodePrivateKey;
use rsa::signature::{SignatureEncoding, Signer};
use rsa::traits::PublicKeyParts;
use sha2::Sha256;

fn key(pem: &str) -> (RsaPrivateKey, [u8; 256]) {
    let k = RsaPrivateKey::from_pkcs8_pem(pem).unwrap();
    let n: [u8; 256] = k.n().to_bytes_be().try_into().unwrap();
    (k, n)
}

fn manifest() -> Manifest {
    Manifest {
        version: Version::parse("1.2.0").unwrap(),
        size: 123_456,
        sha256: [0x42; 32],
        security_counter: 3,
        target: "esp32c3".into(),
        created_ms: 1_800_000_000_000,
    }
}

#[test]
fn signatures_made_by_the_rsa_crate_verify_and_any_change_is_refused() {
    let (k1, n1) = key(include_str!("keys/rsa-test-1.pem"));
    let (_, n2) = key(include_str!("keys/rsa-test-2.pem"));
    let m = manifest();
    let bytes = m.signed_bytes().unwrap();
    let sig = SigningKey::<Sha256>::new(k1).sign(&bytes).to_vec();
    assert_eq!(sig.len(), 256);

    assert_eq!(verify_rsa2048(&n1, &bytes, &sig), Ok(()));
    let pk = PublicKey::from_bytes(&n1).unwrap();
    assert_eq!(pk.algorithm(), "rsa2048-pkcs1v15-sha256");
    assert_eq!(pk.verify(&m, &sig), Ok(()));

    // Another key, another manifest, any flipped bit of the signature.
    assert_eq!(verify_rsa2048(&n2, &bytes, &sig), Err(FirmwareError::BadSignature));
    let mut other = m.clone();
    other.version = Version::parse("1.2.1").unwrap();
    assert_eq!(pk.verify(&other, &sig), Err(FirmwareError::BadSignature));
    for i in (0..256).step_by(17) {
        let mut bad = sig.clone();
        bad[i] ^= 0x10;
        assert_eq!(verify_rsa2048(&n1, &bytes, &bad), Err(FirmwareError::BadSignature), "byte {i}");
    }
    // Wrong lengths, a signature not below the modulus, keys that are not 2048-bit odd moduli.
    assert_eq!(verify_rsa2048(&n1, &bytes, &sig[1..]), Err(FirmwareError::BadSignature));
    assert_eq!(verify_rsa2048(&n1, &bytes, &n1), Err(FirmwareError::BadSignature));
    assert_eq!(verify_rsa2048(&n1, &bytes, &[0xFF; 256]), Err(FirmwareError::BadSignature));
    let mut even = n1;
    even[255] &= 0xFE;
    assert_eq!(verify_rsa2048(&even, &bytes, &sig), Err(FirmwareError::BadKey));
    assert_eq!(PublicKey::from_bytes(&even), Err(FirmwareError::BadKey));
    assert_eq!(PublicKey::from_bytes(&n1[..255]), Err(FirmwareError::BadKey));
    // An Ed25519 signature length under an RSA key, and the reverse.
    assert_eq!(pk.verify(&m, &[0; 64]), Err(FirmwareError::BadSignature));
    let ed = PublicKey::from_bytes(&[
        0xd7, 0x5a, 0x98, 0x01, 0x82, 0xb1, 0x0a, 0xb7, 0xd5, 0x4b, 0xfe, 0xd3, 0xc9, 0x64, 0x07,
        0x3a, 0x0e, 0xe1, 0x72, 0xf3, 0xda, 0xa6, 0x23, 0x25, 0xaf, 0x02, 0x1a, 0x68, 0xf7, 0x07,
        0x51, 0x1a,
    ])
    .unwrap();
    assert_eq!(ed.verify(&m, &sig), Err(FirmwareError::BadSignature));
}

#[test]
fn a_signature_with_another_hash_or_padding_is_refused() {
    let (k1, n1) = key(include_str!("keys/rsa-test-1.pem"));
    let bytes = manifest().signed_bytes().unwrap();
    // PKCS#1 v1.5 over another hash: right padding, wrong DigestInfo.
    let other = SigningKey::<sha2::Sha512_256>::new(k1.clone()).sign(&bytes).to_vec();
    assert_eq!(verify_rsa2048(&n1, &bytes, &other), Err(FirmwareError::BadSignature));
    // Raw PKCS#1 v1.5 without a DigestInfo prefix.
    let raw = SigningKey::<Sha256>::new_unprefixed(k1).sign(&bytes).to_vec();
    assert_eq!(verify_rsa2048(&n1, &bytes, &raw), Err(FirmwareError::BadSignature));
}
