//! Firmware manifests as JSON files (`IMAGE.manifest.json`), shared by the CLI
//! that signs them and the server that checks them.

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

/// A manifest file that cannot be read back, with what is wrong.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct ManifestError(pub String);

fn wrong(message: impl Into<String>) -> ManifestError {
    ManifestError(message.into())
}

/// Reads a manifest back: the manifest, the signer's public key and the signature.
pub fn parse_manifest(v: &Value) -> Result<(Manifest, PublicKey, Vec<u8>), ManifestError> {
    let missing = |k: &str| wrong(format!("manifest field {k} missing"));
    let s = |k: &str| v[k].as_str().ok_or_else(|| missing(k));
    let n = |k: &str| v[k].as_u64().ok_or_else(|| missing(k));
    let sha: [u8; 32] = hex::decode(s("sha256")?)
        .ok()
        .and_then(|b| b.try_into().ok())
        .ok_or_else(|| wrong("sha256 must be 32 bytes hex"))?;
    let key = hex::decode(s("public_key")?).map_err(|_| wrong("public_key must be hex"))?;
    let key = PublicKey::from_bytes(&key)
        .map_err(|_| wrong("public_key: not an Ed25519 key or RSA-2048 modulus"))?;
    let (algorithm, sig_len) = match &key {
        PublicKey::Ed25519(_) => ("ed25519", 64),
        PublicKey::Rsa2048(_) => ("rsa2048-pkcs1v15-sha256", 256),
    };
    if s("algorithm")? != algorithm {
        return Err(wrong(format!(
            "algorithm must be {algorithm} for this public key (ed25519 or rsa2048-pkcs1v15-sha256)"
        )));
    }
    let sig = hex::decode(s("signature")?)
        .ok()
        .filter(|b| b.len() == sig_len)
        .ok_or_else(|| wrong(format!("signature must be {sig_len} bytes hex")))?;
    let m = Manifest {
        version: Version::parse(s("version")?).map_err(|e| wrong(format!("version: {e}")))?,
        size: n("size")?,
        sha256: sha,
        security_counter: u32::try_from(n("security_counter")?)
            .map_err(|_| wrong("security_counter must fit 32 bits"))?,
        target: s("target")?.to_owned(),
        created_ms: n("created_ms")?,
    };
    Ok((m, key, sig))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_manifest_reads_back_and_each_bad_field_is_named() {
        let m = Manifest {
            version: Version::parse("1.2.3").unwrap(),
            size: 10,
            sha256: [7; 32],
            security_counter: 2,
            target: "esp32c3".into(),
            created_ms: 5,
        };
        // RFC 8032's first test key: a valid point.
        let key = PublicKey::from_bytes(
            &hex::decode("D75A980182B10AB7D54BFED3C964073A0EE172F3DAA62325AF021A68F707511A")
                .unwrap(),
        )
        .unwrap();
        let json = manifest_json(&m, &key, &[1; 64]);
        let (back, signer, sig) = parse_manifest(&json).unwrap();
        assert_eq!((back, signer, sig), (m, key, vec![1; 64]));
        let broken = |k: &str, v: Value| {
            let mut j = json.clone();
            j[k] = v;
            parse_manifest(&j).unwrap_err().0
        };
        assert!(broken("sha256", json!("AB")).contains("sha256"));
        assert!(broken("signature", json!("00")).contains("64 bytes"));
        assert!(broken("algorithm", json!("rsa")).contains("ed25519"));
        assert!(broken("version", json!("one")).contains("version"));
        assert!(broken("size", Value::Null).contains("size missing"));
        assert!(broken("security_counter", json!(1u64 << 40)).contains("32 bits"));
    }
}
