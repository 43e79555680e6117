//! Firmware manifests as JSON files (`IMAGE.manifest.json`), shared by the CLI
//! that signs them and the server that checks them.

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
