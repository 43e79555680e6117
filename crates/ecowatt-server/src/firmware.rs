//! Firmware manifests as JSON files (`IMAGE.manifest.json`), shared by the CLI
//! that signs them and the server that checks them, and byte ranges for
//! resumable downloads.

use anyhow::Context;
use ecowatt_proto::firmware::{Manifest, PublicKey, Version};
use ecowatt_proto::hex;
use serde_json::{Value, json};

/// The JSON form of a signed manifest.
pub fn manifest_json(m: &Manifest, public: &PublicKey, signature: &[u8]) -> Value {
    json!({
        "format": "ecowatt-firmware-manifest/1",
        "version": m.version.to_string(),
        "size": m.size,
        "sha256": hex::encode_upper(&m.sha256),
        "security_counter": m.security_counter,
        "target": m.target,
        "created_ms": m.created_ms,
        "algorithm": public.algorithm(),
        "public_key": hex::encode_upper(public.as_bytes()),
        "signature": hex::encode_upper(signature),
    })
}

/// Reads a manifest back: the manifest, the signer's public key and the signature.
pub fn parse_manifest(v: &Value) -> anyhow::Result<(Manifest, PublicKey, Vec<u8>)> {
    let s = |k: &str| v[k].as_str().with_context(|| format!("manifest field {k} missing"));
    let n = |k: &str| v[k].as_u64().with_context(|| format!("manifest field {k} missing"));
    let sha: [u8; 32] = hex::decode(s("sha256")?)
        .ok()
        .and_then(|b| b.try_into().ok())
        .context("sha256 must be 32 bytes hex")?;
    let key = hex::decode(s("public_key")?).ok().context("public_key must be hex")?;
    let key = PublicKey::from_bytes(&key)
        .map_err(|_| anyhow::anyhow!("public_key: not an Ed25519 key or RSA-2048 modulus"))?;
    let (algorithm, sig_len) = match &key {
        PublicKey::Ed25519(_) => ("ed25519", 64),
        PublicKey::Rsa2048(_) => ("rsa2048-pkcs1v15-sha256", 256),
    };
    anyhow::ensure!(
        s("algorithm")? == algorithm,
        "algorithm must be {algorithm} for this public key (ed25519 or rsa2048-pkcs1v15-sha256)"
    );
    let sig = hex::decode(s("signature")?)
        .ok()
        .filter(|b| b.len() == sig_len)
        .with_context(|| format!("signature must be {sig_len} bytes hex"))?;
    let m = Manifest {
        version: Version::parse(s("version")?).map_err(|e| anyhow::anyhow!("version: {e}"))?,
        size: n("size")?,
        sha256: sha,
        security_counter: u32::try_from(n("security_counter")?)?,
        target: s("target")?.to_owned(),
        created_ms: n("created_ms")?,
    };
    Ok((m, key, sig))
}

/// A `Range` header that cannot be served (answered with 416).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Unsatisfiable;

/// A byte range asked for with `Range: bytes=...`, resolved against `len`:
/// `Ok(None)` for the whole body.
pub fn byte_range(header: Option<&str>, len: u64) -> Result<Option<(u64, u64)>, Unsatisfiable> {
    let Some(h) = header else { return Ok(None) };
    let spec = h.trim().strip_prefix("bytes=").ok_or(Unsatisfiable)?;
    if spec.contains(',') {
        return Err(Unsatisfiable); // one range at a time
    }
    let (a, b) = spec.split_once('-').ok_or(Unsatisfiable)?;
    let (start, end) = match (a.trim(), b.trim()) {
        ("", suffix) => {
            let n: u64 = suffix.parse().map_err(|_| Unsatisfiable)?;
            if n == 0 {
                return Err(Unsatisfiable);
            }
            (len.saturating_sub(n), len.checked_sub(1).ok_or(Unsatisfiable)?)
        }
        (s, "") => {
            (s.parse().map_err(|_| Unsatisfiable)?, len.checked_sub(1).ok_or(Unsatisfiable)?)
        }
        (s, e) => {
            let (s, e): (u64, u64) =
                (s.parse().map_err(|_| Unsatisfiable)?, e.parse().map_err(|_| Unsatisfiable)?);
            (s, e.min(len.saturating_sub(1)))
        }
    };
    if start > end || start >= len {
        return Err(Unsatisfiable);
    }
    Ok(Some((start, end)))
}

#[cfg(test)]
mod tests {
    use super::{Unsatisfiable, byte_range};

    #[test]
    fn ranges() {
        assert_eq!(byte_range(None, 100), Ok(None));
        assert_eq!(byte_range(Some("bytes=0-9"), 100), Ok(Some((0, 9))));
        assert_eq!(byte_range(Some("bytes=90-"), 100), Ok(Some((90, 99))));
        assert_eq!(byte_range(Some("bytes=-10"), 100), Ok(Some((90, 99))));
        assert_eq!(byte_range(Some("bytes=50-500"), 100), Ok(Some((50, 99))));
        for bad in
            ["bytes=100-", "bytes=5-1", "items=0-1", "bytes=0-1,5-6", "bytes=-0", "bytes=a-b"]
        {
            assert_eq!(byte_range(Some(bad), 100), Err(Unsatisfiable), "{bad}");
        }
    }
}
