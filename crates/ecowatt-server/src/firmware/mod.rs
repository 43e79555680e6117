//! Firmware images and their rollouts. An image is accepted only when its
//! manifest is signed by a key the server trusts and its bytes are the ones
//! the manifest names ([`verify`]); the private key never comes here. One
//! image per version and target.

pub mod at_rest;
pub mod rollouts;

use std::sync::{Arc, Mutex, OnceLock};

use ecowatt_proto::firmware::PublicKey;
use ecowatt_proto::hex;
use serde::Serialize;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use sqlx::Row;
use sqlx::any::AnyRow;

use ecowatt_formats::manifest::parse_manifest;
pub use rollouts::Rollouts;

use crate::db::{Db, StoreError, StoreResult, json_col};
use crate::operators::audit;

/// A stored firmware image's record (the bytes are fetched separately).
#[derive(Debug, Clone, PartialEq, Serialize, utoipa::ToSchema)]
pub struct Firmware {
    /// Numeric id.
    pub id: i64,
    /// Semantic version.
    pub version: String,
    /// Hardware target.
    pub target: String,
    /// Size, bytes.
    pub size: i64,
    /// SHA-256, hex.
    pub sha256: String,
    /// Anti-rollback counter.
    pub security_counter: i64,
    /// When it was signed.
    pub created_ms: i64,
    /// The signed manifest as uploaded.
    pub manifest: Value,
    /// When it was uploaded.
    pub uploaded_ms: i64,
    /// Who uploaded it.
    pub uploaded_by: String,
}

pub(crate) fn firmware_from(row: &AnyRow) -> StoreResult<Firmware> {
    Ok(Firmware {
        id: row.try_get("id")?,
        version: row.try_get("version")?,
        target: row.try_get("target")?,
        size: row.try_get("size")?,
        sha256: row.try_get("sha256")?,
        security_counter: row.try_get("security_counter")?,
        created_ms: row.try_get("created_ms")?,
        manifest: json_col(row, "manifest")?,
        uploaded_ms: row.try_get("uploaded_ms")?,
        uploaded_by: row.try_get("uploaded_by")?,
    })
}

/// Why an uploaded image was refused, with a stable code.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct ImageRefused {
    /// `invalid_manifest`, `unknown_signer`, `bad_signature` or `image_mismatch`.
    pub code: &'static str,
    /// What is wrong.
    pub message: String,
}

fn refused(code: &'static str, message: impl Into<String>) -> ImageRefused {
    ImageRefused { code, message: message.into() }
}

/// Checks an uploaded image: its manifest (JSON text) parses, is signed by
/// one of `trusted` with a good signature, and names exactly these bytes.
/// Gives the record to store (id 0 until stored).
pub fn verify(
    trusted: &[PublicKey],
    manifest_text: &str,
    image: &[u8],
    actor: &str,
    now: i64,
) -> Result<Firmware, ImageRefused> {
    let json: Value = serde_json::from_str(manifest_text)
        .map_err(|e| refused("invalid_manifest", e.to_string()))?;
    let (manifest, signer, signature) =
        parse_manifest(&json).map_err(|e| refused("invalid_manifest", e.to_string()))?;
    if !trusted.contains(&signer) {
        return Err(refused(
            "unknown_signer",
            "the manifest is signed by a key this server does not trust",
        ));
    }
    signer.verify(&manifest, &signature).map_err(|e| refused("bad_signature", e.to_string()))?;
    let sha: [u8; 32] = Sha256::digest(image).into();
    if image.len() as u64 != manifest.size || sha != manifest.sha256 {
        return Err(refused(
            "image_mismatch",
            "the image's size or SHA-256 differs from its signed manifest",
        ));
    }
    if let Some(sig) = json.get("legacy_signature") {
        check_legacy_signature(trusted, sig, image)?;
    }
    Ok(Firmware {
        id: 0,
        version: manifest.version.to_string(),
        target: manifest.target.clone(),
        size: manifest.size as i64,
        sha256: hex::encode_upper(&manifest.sha256),
        security_counter: i64::from(manifest.security_counter),
        created_ms: manifest.created_ms as i64,
        manifest: json,
        uploaded_ms: now,
        uploaded_by: actor.to_owned(),
    })
}

/// An image for the original firmware line carries `legacy_signature`: the
/// Base64 RSA-2048 PKCS#1 v1.5 signature over the image's SHA-256 that the
/// original firmware checks before switching (docs/migration.md). It must
/// verify against one of the trusted RSA keys, like the manifest.
fn check_legacy_signature(
    trusted: &[PublicKey],
    sig: &Value,
    image: &[u8],
) -> Result<(), ImageRefused> {
    use base64::Engine;
    let sig = sig
        .as_str()
        .and_then(|s| base64::engine::general_purpose::STANDARD.decode(s).ok())
        .filter(|s| s.len() == 256)
        .ok_or_else(|| {
            refused("invalid_manifest", "legacy_signature must be 256 bytes in Base64")
        })?;
    let good = trusted.iter().any(|k| match k {
        PublicKey::Rsa2048(n) => ecowatt_proto::firmware::verify_rsa2048(n, image, &sig).is_ok(),
        PublicKey::Ed25519(_) => false,
    });
    if good {
        Ok(())
    } else {
        Err(refused(
            "bad_legacy_signature",
            "legacy_signature does not verify against a trusted RSA-2048 key",
        ))
    }
}

/// An image's id and bytes.
type Cached = (i64, Arc<[u8]>);

/// The stored images.
#[derive(Clone)]
pub struct Firmwares {
    db: Db,
    /// The image served last, by id: a rollout's devices fetch one image in
    /// ranges, each range a request; reading the whole blob from the
    /// database for each would make a download quadratic in its size.
    /// Images never change once stored, so the copy is never stale.
    cache: Arc<Mutex<Option<Cached>>>,
    /// The key images are sealed with at rest ([`at_rest`]); set at start
    /// (`run::prepare`). Without it (tools, tests of the store alone)
    /// images are stored in clear and sealed ones cannot be read.
    key: Arc<OnceLock<at_rest::ImageKey>>,
}

impl Firmwares {
    /// Over `db`.
    pub fn new(db: Db) -> Self {
        Firmwares { db, cache: Arc::default(), key: Arc::default() }
    }

    /// Seals images with `key` from now on (once; later calls are ignored).
    pub fn set_key(&self, key: at_rest::ImageKey) {
        let _ = self.key.set(key);
    }

    /// Every stored image's id, SHA-256 (hex) and the key id it is sealed
    /// under (`None`: stored in clear), read from the first bytes of each.
    pub async fn stored_heads(&self) -> StoreResult<Vec<(i64, String, Option<[u8; 8]>)>> {
        let rows = sqlx::query("SELECT id, sha256, substr(data, 1, 44) AS head FROM firmware")
            .fetch_all(self.db.reader())
            .await?;
        rows.iter()
            .map(|row| {
                let head: Vec<u8> = row.try_get("head")?;
                Ok((row.try_get("id")?, row.try_get("sha256")?, at_rest::key_id_of(&head)))
            })
            .collect()
    }

    /// Seals the images of `heads` stored in clear (before this server
    /// encrypted them); how many.
    pub async fn seal_in_clear(
        &self,
        heads: &[(i64, String, Option<[u8; 8]>)],
    ) -> StoreResult<usize> {
        let Some(key) = self.key.get() else { return Ok(0) };
        let mut sealed = 0;
        for (id, sha, _) in heads.iter().filter(|(_, _, key_id)| key_id.is_none()) {
            let data: Vec<u8> = sqlx::query("SELECT data FROM firmware WHERE id = $1")
                .bind(id)
                .fetch_one(self.db.reader())
                .await?
                .try_get("data")?;
            let mut tx = self.db.write().await?;
            sqlx::query("UPDATE firmware SET data = $1 WHERE id = $2")
                .bind(key.seal(sha, &data))
                .bind(id)
                .execute(&mut *tx)
                .await?;
            tx.commit().await?;
            sealed += 1;
        }
        Ok(sealed)
    }

    /// The bytes of image `id`, from the cache when it holds that image.
    pub async fn bytes(&self, id: i64) -> StoreResult<Arc<[u8]>> {
        if let Some((cached, bytes)) = &*self.cache.lock().expect("image cache") {
            if *cached == id {
                return Ok(bytes.clone());
            }
        }
        let row = sqlx::query("SELECT data, sha256 FROM firmware WHERE id = $1")
            .bind(id)
            .fetch_optional(self.db.reader())
            .await?;
        let row = row.ok_or_else(|| StoreError::NotFound(format!("firmware {id}")))?;
        let blob: Vec<u8> = row.try_get("data")?;
        let sha: String = row.try_get("sha256")?;
        let data = match (self.key.get(), at_rest::key_id_of(&blob)) {
            (_, None) => blob,
            (Some(key), Some(_)) => key
                .open(&sha, &blob)
                .map_err(|e| StoreError::Unusable(format!("firmware {id}: {e}")))?,
            (None, Some(_)) => {
                return Err(StoreError::Unusable(format!(
                    "firmware {id} is encrypted at rest and this process has no image key"
                )));
            }
        };
        let bytes: Arc<[u8]> = data.into();
        *self.cache.lock().expect("image cache") = Some((id, bytes.clone()));
        Ok(bytes)
    }

    /// Stores a verified image (Conflict if that version and target exist).
    pub async fn add(&self, fw: &Firmware, data: &[u8]) -> StoreResult<Firmware> {
        let mut tx = self.db.write().await?;
        let exists = sqlx::query("SELECT id FROM firmware WHERE version = $1 AND target = $2")
            .bind(fw.version.as_str())
            .bind(fw.target.as_str())
            .fetch_optional(&mut *tx)
            .await?;
        if exists.is_some() {
            return Err(StoreError::Conflict(format!(
                "firmware {} for {} is already stored",
                fw.version, fw.target
            )));
        }
        let row = sqlx::query(
            "INSERT INTO firmware (version, target, size, sha256, security_counter, created_ms, manifest, data, uploaded_ms, uploaded_by) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10) RETURNING id",
        )
        .bind(fw.version.as_str())
        .bind(fw.target.as_str())
        .bind(fw.size)
        .bind(fw.sha256.as_str())
        .bind(fw.security_counter)
        .bind(fw.created_ms)
        .bind(fw.manifest.to_string())
        .bind(match self.key.get() {
            Some(key) => key.seal(&fw.sha256, data),
            None => data.to_vec(),
        })
        .bind(fw.uploaded_ms)
        .bind(fw.uploaded_by.as_str())
        .fetch_one(&mut *tx)
        .await?;
        let id: i64 = row.try_get("id")?;
        let detail = json!({"version": fw.version, "target": fw.target, "size": fw.size});
        audit::record(
            &mut tx,
            fw.uploaded_ms,
            &fw.uploaded_by,
            "firmware.upload",
            &id.to_string(),
            detail,
        )
        .await?;
        tx.commit().await?;
        Ok(Firmware { id, ..fw.clone() })
    }

    /// Every image's record, newest upload first.
    pub async fn list(&self) -> StoreResult<Vec<Firmware>> {
        let rows = sqlx::query(
            "SELECT id, version, target, size, sha256, security_counter, created_ms, manifest, uploaded_ms, uploaded_by \
             FROM firmware ORDER BY id DESC",
        )
        .fetch_all(self.db.reader())
        .await?;
        rows.iter().map(firmware_from).collect()
    }

    /// The image of `version`, on `target` when given: NotFound when none,
    /// Invalid (`target`) when several targets have that version.
    pub async fn by_version(&self, version: &str, target: Option<&str>) -> StoreResult<Firmware> {
        let all = self.list().await?;
        let hits: Vec<&Firmware> = all
            .iter()
            .filter(|f| f.version == version && target.is_none_or(|t| f.target == t))
            .collect();
        match hits.as_slice() {
            [one] => Ok((*one).clone()),
            [] => Err(StoreError::NotFound(format!("firmware {version}"))),
            _ => Err(crate::domain::Invalid::new(
                "target",
                format!("firmware {version} is stored for several targets: name one"),
            )
            .into()),
        }
    }
}

#[cfg(test)]
mod tests {
    use ecowatt_proto::firmware::Manifest;
    use ed25519_dalek::{Signer, SigningKey};

    use ecowatt_formats::manifest::manifest_json;

    use super::*;

    fn public(key: &SigningKey) -> PublicKey {
        PublicKey::from_bytes(key.verifying_key().as_bytes()).unwrap()
    }

    fn signed(data: &[u8], key: &SigningKey) -> String {
        let m = Manifest {
            version: ecowatt_proto::firmware::Version::parse("1.2.3").unwrap(),
            size: data.len() as u64,
            sha256: Sha256::digest(data).into(),
            security_counter: 4,
            target: "esp32c3".into(),
            created_ms: 1_700_000_000_000,
        };
        let sig = key.sign(&m.signed_bytes().unwrap()).to_bytes();
        manifest_json(&m, &public(key), &sig).to_string()
    }

    #[test]
    fn verify_accepts_only_a_trusted_signature_over_these_bytes() {
        let key = SigningKey::from_bytes(&[7; 32]);
        let other = SigningKey::from_bytes(&[8; 32]);
        let data = b"image bytes";
        let text = signed(data, &key);
        let fw = verify(&[public(&key)], &text, data, "ops", 5).unwrap();
        assert_eq!((fw.version.as_str(), fw.size, fw.security_counter), ("1.2.3", 11, 4));
        assert_eq!((fw.uploaded_by.as_str(), fw.uploaded_ms), ("ops", 5));
        let code = |r: Result<Firmware, ImageRefused>| r.unwrap_err().code;
        assert_eq!(code(verify(&[public(&other)], &text, data, "ops", 5)), "unknown_signer");
        assert_eq!(
            code(verify(&[public(&key)], &text, b"image bytez", "ops", 5)),
            "image_mismatch"
        );
        assert_eq!(code(verify(&[public(&key)], &text, b"image", "ops", 5)), "image_mismatch");
        assert_eq!(code(verify(&[public(&key)], "{", data, "ops", 5)), "invalid_manifest");
        let forged = text.replace("1.2.3", "1.2.4");
        assert_eq!(code(verify(&[public(&key)], &forged, data, "ops", 5)), "bad_signature");
    }
}
