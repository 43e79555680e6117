//! Firmware manifests: what an image is (version, size, SHA-256, security
//! counter, hardware target, creation time) and who vouches for it (an Ed25519
//! or RSA-2048 PKCS#1 v1.5 / SHA-256 signature over the canonical bytes below). Semantic versions compare as
//! numbers, never as strings (`1.0.10 > 1.0.9`).
//!
//! Canonical signed bytes (all integers big-endian):
//! ```text
//! "ecowatt-fw/1\n" | u16 major | u16 minor | u16 patch | u8 len + pre-release
//! | u64 size | 32 B sha256 | u32 security_counter | u8 len + target | u64 created_ms
//! ```

use alloc::string::String;
use alloc::vec::Vec;
use core::cmp::Ordering;
use core::fmt;

use alloc::boxed::Box;
use crypto_bigint::modular::runtime_mod::{DynResidue, DynResidueParams};
use crypto_bigint::{Encoding, U2048};
use ed25519_dalek::{Signature, VerifyingKey};
use sha2::{Digest, Sha256};

/// A semantic version `major.minor.patch[-pre]` (build metadata not allowed).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Version {
    /// Major.
    pub major: u16,
    /// Minor.
    pub minor: u16,
    /// Patch.
    pub patch: u16,
    /// Pre-release identifiers (`rc.1`), empty for a release.
    pub pre: String,
}

/// Why a version or manifest was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FirmwareError {
    /// Not `major.minor.patch[-pre]` with numbers up to 65535.
    BadVersion,
    /// A text field longer than 255 bytes or not ASCII printable.
    BadField,
    /// The public key is not a valid Ed25519 point or RSA-2048 modulus.
    BadKey,
    /// The signature does not verify.
    BadSignature,
}

impl fmt::Display for FirmwareError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            FirmwareError::BadVersion => "version must be MAJOR.MINOR.PATCH[-PRE]",
            FirmwareError::BadField => "field too long or not printable ASCII",
            FirmwareError::BadKey => "not an Ed25519 public key or RSA-2048 modulus",
            FirmwareError::BadSignature => "signature does not verify",
        })
    }
}

impl core::error::Error for FirmwareError {}

fn printable(s: &str) -> bool {
    s.len() <= 255 && s.bytes().all(|b| b.is_ascii_graphic())
}

impl Version {
    /// Parses `1.2.3` or `1.2.3-rc.1`.
    pub fn parse(text: &str) -> Result<Version, FirmwareError> {
        let (core, pre) = match text.split_once('-') {
            Some((c, p)) if !p.is_empty() && printable(p) && !p.contains('+') => (c, p),
            Some(_) => return Err(FirmwareError::BadVersion),
            None => (text, ""),
        };
        let mut parts = core.split('.');
        let mut num = || -> Result<u16, FirmwareError> {
            let p = parts.next().ok_or(FirmwareError::BadVersion)?;
            if p.is_empty()
                || (p.len() > 1 && p.starts_with('0'))
                || !p.bytes().all(|b| b.is_ascii_digit())
            {
                return Err(FirmwareError::BadVersion);
            }
            p.parse().map_err(|_| FirmwareError::BadVersion)
        };
        let v = Version { major: num()?, minor: num()?, patch: num()?, pre: String::from(pre) };
        if parts.next().is_some() {
            return Err(FirmwareError::BadVersion);
        }
        Ok(v)
    }
}

impl fmt::Display for Version {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}.{}", self.major, self.minor, self.patch)?;
        if !self.pre.is_empty() {
            write!(f, "-{}", self.pre)?;
        }
        Ok(())
    }
}

/// Semantic Versioning 2.0.0, section 11: numeric fields as numbers; a
/// pre-release is below its release; pre-release identifiers compare
/// numerically when both are numbers, else as ASCII, numbers below text.
impl Ord for Version {
    fn cmp(&self, other: &Self) -> Ordering {
        (self.major, self.minor, self.patch)
            .cmp(&(other.major, other.minor, other.patch))
            .then_with(|| match (self.pre.is_empty(), other.pre.is_empty()) {
                (true, true) => Ordering::Equal,
                (true, false) => Ordering::Greater,
                (false, true) => Ordering::Less,
                (false, false) => {
                    let mut a = self.pre.split('.');
                    let mut b = other.pre.split('.');
                    loop {
                        match (a.next(), b.next()) {
                            (None, None) => return Ordering::Equal,
                            (None, Some(_)) => return Ordering::Less,
                            (Some(_), None) => return Ordering::Greater,
                            (Some(x), Some(y)) => {
                                let o = match (x.parse::<u64>(), y.parse::<u64>()) {
                                    (Ok(m), Ok(n)) => m.cmp(&n),
                                    (Ok(_), Err(_)) => Ordering::Less,
                                    (Err(_), Ok(_)) => Ordering::Greater,
                                    (Err(_), Err(_)) => x.cmp(y),
                                };
                                if o != Ordering::Equal {
                                    return o;
                                }
                            }
                        }
                    }
                }
            })
    }
}

impl PartialOrd for Version {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

/// What an image is; signed as a whole.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Manifest {
    /// Its version.
    pub version: Version,
    /// Image size, bytes.
    pub size: u64,
    /// SHA-256 of the image.
    pub sha256: [u8; 32],
    /// Anti-rollback counter: a device refuses images below its own.
    pub security_counter: u32,
    /// Hardware target (`esp32c3`, `linux-x86_64`, ...).
    pub target: String,
    /// When it was signed, Unix ms.
    pub created_ms: u64,
}

impl Manifest {
    /// The bytes the signature covers.
    pub fn signed_bytes(&self) -> Result<Vec<u8>, FirmwareError> {
        if !printable(&self.target)
            || self.target.is_empty()
            || !printable(&self.version.pre) && !self.version.pre.is_empty()
        {
            return Err(FirmwareError::BadField);
        }
        let mut b = Vec::with_capacity(96 + self.target.len() + self.version.pre.len());
        b.extend_from_slice(b"ecowatt-fw/1\n");
        b.extend_from_slice(&self.version.major.to_be_bytes());
        b.extend_from_slice(&self.version.minor.to_be_bytes());
        b.extend_from_slice(&self.version.patch.to_be_bytes());
        b.push(self.version.pre.len() as u8);
        b.extend_from_slice(self.version.pre.as_bytes());
        b.extend_from_slice(&self.size.to_be_bytes());
        b.extend_from_slice(&self.sha256);
        b.extend_from_slice(&self.security_counter.to_be_bytes());
        b.push(self.target.len() as u8);
        b.extend_from_slice(self.target.as_bytes());
        b.extend_from_slice(&self.created_ms.to_be_bytes());
        Ok(b)
    }

    /// Checks an Ed25519 signature (strict: no malleable or small-order forms).
    pub fn verify_ed25519(
        &self,
        public_key: &[u8; 32],
        signature: &[u8; 64],
    ) -> Result<(), FirmwareError> {
        let key = VerifyingKey::from_bytes(public_key).map_err(|_| FirmwareError::BadKey)?;
        let sig = Signature::from_bytes(signature);
        key.verify_strict(&self.signed_bytes()?, &sig).map_err(|_| FirmwareError::BadSignature)
    }
}

/// The RSA public exponent accepted (the universal choice).
pub const RSA_EXPONENT: u32 = 65_537;

/// DER of the PKCS#1 v1.5 DigestInfo header for SHA-256 (RFC 8017, 9.2 note 1).
const SHA256_DIGEST_INFO: [u8; 19] = [
    0x30, 0x31, 0x30, 0x0d, 0x06, 0x09, 0x60, 0x86, 0x48, 0x01, 0x65, 0x03, 0x04, 0x02, 0x01, 0x05,
    0x00, 0x04, 0x20,
];

/// RSASSA-PKCS1-v1_5 verification with SHA-256 for a 2048-bit modulus `n`
/// (big-endian, top bit set) and exponent 65537: `s^e mod n` must be exactly
/// `00 01 FF..FF 00 || DigestInfo || SHA-256(message)`.
pub fn verify_rsa2048(
    modulus: &[u8; 256],
    message: &[u8],
    signature: &[u8],
) -> Result<(), FirmwareError> {
    if modulus[0] & 0x80 == 0 || modulus[255] & 1 == 0 {
        return Err(FirmwareError::BadKey); // not 2048 bits, or even
    }
    if signature.len() != 256 {
        return Err(FirmwareError::BadSignature);
    }
    let n = U2048::from_be_slice(modulus);
    let s = U2048::from_be_slice(signature);
    if s >= n {
        return Err(FirmwareError::BadSignature);
    }
    let params = DynResidueParams::new(&n);
    let m = DynResidue::new(&s, params)
        .pow_bounded_exp(&U2048::from_u32(RSA_EXPONENT), 17)
        .retrieve()
        .to_be_bytes();
    let mut expected = [0xFFu8; 256];
    expected[0] = 0x00;
    expected[1] = 0x01;
    let t = 256 - 32 - SHA256_DIGEST_INFO.len();
    expected[t - 1] = 0x00;
    expected[t..t + SHA256_DIGEST_INFO.len()].copy_from_slice(&SHA256_DIGEST_INFO);
    expected[256 - 32..].copy_from_slice(&Sha256::digest(message));
    // Not secret: the signature and the message are public.
    if m == expected { Ok(()) } else { Err(FirmwareError::BadSignature) }
}

/// A key that vouches for firmware.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PublicKey {
    /// Ed25519, 32 bytes.
    Ed25519([u8; 32]),
    /// RSA-2048 with exponent 65537: the modulus, big-endian.
    Rsa2048(Box<[u8; 256]>),
}

impl PublicKey {
    /// From its bytes: 32 for Ed25519, 256 (the modulus) for RSA-2048.
    pub fn from_bytes(bytes: &[u8]) -> Result<PublicKey, FirmwareError> {
        match bytes.len() {
            32 => {
                let k: [u8; 32] = bytes.try_into().expect("32 bytes");
                VerifyingKey::from_bytes(&k).map_err(|_| FirmwareError::BadKey)?;
                Ok(PublicKey::Ed25519(k))
            }
            256 if bytes[0] & 0x80 != 0 && bytes[255] & 1 == 1 => {
                Ok(PublicKey::Rsa2048(Box::new(bytes.try_into().expect("256 bytes"))))
            }
            _ => Err(FirmwareError::BadKey),
        }
    }

    /// Its bytes (as [`PublicKey::from_bytes`] takes them).
    pub fn as_bytes(&self) -> &[u8] {
        match self {
            PublicKey::Ed25519(k) => k,
            PublicKey::Rsa2048(n) => &n[..],
        }
    }

    /// The algorithm's name in manifests.
    pub fn algorithm(&self) -> &'static str {
        match self {
            PublicKey::Ed25519(_) => "ed25519",
            PublicKey::Rsa2048(_) => "rsa2048-pkcs1v15-sha256",
        }
    }

    /// Checks `signature` over the manifest.
    pub fn verify(&self, manifest: &Manifest, signature: &[u8]) -> Result<(), FirmwareError> {
        match self {
            PublicKey::Ed25519(k) => {
                let sig: &[u8; 64] =
                    signature.try_into().map_err(|_| FirmwareError::BadSignature)?;
                manifest.verify_ed25519(k, sig)
            }
            PublicKey::Rsa2048(n) => verify_rsa2048(n, &manifest.signed_bytes()?, signature),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_compare_as_numbers_and_prereleases_below_releases() {
        let v = |s| Version::parse(s).unwrap();
        assert!(v("1.0.10") > v("1.0.9"), "the original compared strings");
        assert!(v("2.0.0") > v("1.99.99"));
        assert!(v("1.0.0-rc.1") < v("1.0.0"));
        assert!(v("1.0.0-alpha") < v("1.0.0-alpha.1"));
        assert!(v("1.0.0-alpha.1") < v("1.0.0-alpha.beta"));
        assert!(v("1.0.0-beta.2") < v("1.0.0-beta.11"));
        assert!(v("1.0.0-rc.1") < v("1.0.0-rc.1.1"));
        let mut sorted = [v("1.0.10"), v("1.0.9"), v("1.0.0-rc.1"), v("0.9.0")];
        sorted.sort();
        assert_eq!(
            sorted.iter().map(|x| alloc::format!("{x}")).collect::<Vec<_>>(),
            ["0.9.0", "1.0.0-rc.1", "1.0.9", "1.0.10"]
        );
        for bad in ["1.0", "1.0.0.0", "01.0.0", "1.0.x", "1.0.0-", "", "1.0.0+build", "70000.0.0"] {
            assert!(Version::parse(bad).is_err(), "{bad}");
        }
    }
}
