//! `/api/v1/firmware`: signed images, checked on upload against the server's
//! configured public keys (the private key never comes here), served with
//! byte ranges so that a cut download resumes.

use axum::Json;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use ecowatt_proto::hex;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use super::{AppState, Operator};
use crate::error::ApiError;
use crate::firmware::{byte_range, parse_manifest};
use crate::store::Firmware;

/// Header carrying the manifest JSON, hex-encoded, beside the raw image body.
pub const MANIFEST_HEADER: &str = "ecowatt-manifest";
/// Largest image accepted.
pub const MAX_IMAGE: usize = 32 * 1024 * 1024;

fn bad(code: &'static str, message: impl Into<String>) -> ApiError {
    ApiError::new(StatusCode::BAD_REQUEST, code, message)
}

/// `POST /api/v1/firmware`: the image as the body, its manifest in a header.
pub async fn upload(
    State(state): State<AppState>,
    op: Operator,
    headers: HeaderMap,
    body: Bytes,
) -> Result<(StatusCode, Json<Firmware>), ApiError> {
    op.require_admin()?;
    if state.settings.firmware_keys.is_empty() {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "no_firmware_keys",
            "the server has no firmware public keys: start it with --firmware-key (the .pub file from `ecowatt keygen`)",
        ));
    }
    let text = headers
        .get(MANIFEST_HEADER)
        .and_then(|v| v.to_str().ok())
        .and_then(|h| hex::decode(h).ok())
        .and_then(|b| String::from_utf8(b).ok())
        .ok_or_else(|| {
            bad(
                "invalid_manifest",
                format!("send the manifest JSON hex-encoded in the {MANIFEST_HEADER} header"),
            )
        })?;
    let json: Value =
        serde_json::from_str(&text).map_err(|e| bad("invalid_manifest", e.to_string()))?;
    let (manifest, signer, signature) =
        parse_manifest(&json).map_err(|e| bad("invalid_manifest", e.to_string()))?;
    if !state.settings.firmware_keys.contains(&signer) {
        return Err(bad(
            "unknown_signer",
            "the manifest is signed by a key this server does not trust",
        ));
    }
    manifest
        .verify_ed25519(&signer, &signature)
        .map_err(|e| bad("bad_signature", e.to_string()))?;
    let sha: [u8; 32] = Sha256::digest(&body).into();
    if body.len() as u64 != manifest.size || sha != manifest.sha256 {
        return Err(bad(
            "image_mismatch",
            "the image's size or SHA-256 differs from its signed manifest",
        ));
    }
    let now = crate::now_ms();
    let record = Firmware {
        id: 0,
        version: manifest.version.to_string(),
        target: manifest.target.clone(),
        size: manifest.size as i64,
        sha256: hex::encode_upper(&manifest.sha256),
        security_counter: i64::from(manifest.security_counter),
        created_ms: manifest.created_ms as i64,
        manifest: json,
        uploaded_ms: now,
        uploaded_by: op.actor(),
    };
    let stored = state.store.add_firmware(&record, &body, &op.actor()).await?;
    Ok((StatusCode::CREATED, Json(stored)))
}

/// `GET /api/v1/firmware`: every stored image's record.
pub async fn list(State(state): State<AppState>, _op: Operator) -> Result<Json<Value>, ApiError> {
    Ok(Json(json!({ "firmware": state.store.list_firmware().await? })))
}

/// The bytes of an image, whole or the range asked for.
pub fn serve_bytes(headers: &HeaderMap, data: Vec<u8>) -> Response {
    let len = data.len() as u64;
    match byte_range(headers.get(header::RANGE).and_then(|v| v.to_str().ok()), len) {
        Ok(None) => (
            [(header::CONTENT_TYPE, "application/octet-stream"), (header::ACCEPT_RANGES, "bytes")],
            data,
        )
            .into_response(),
        Ok(Some((start, end))) => (
            StatusCode::PARTIAL_CONTENT,
            [
                (header::CONTENT_TYPE, "application/octet-stream".to_owned()),
                (header::ACCEPT_RANGES, "bytes".to_owned()),
                (header::CONTENT_RANGE, format!("bytes {start}-{end}/{len}")),
            ],
            data[start as usize..=end as usize].to_vec(),
        )
            .into_response(),
        Err(_) => {
            (StatusCode::RANGE_NOT_SATISFIABLE, [(header::CONTENT_RANGE, format!("bytes */{len}"))])
                .into_response()
        }
    }
}

/// `GET /api/v1/firmware/{id}/image`: the bytes, honouring `Range`.
pub async fn image(
    State(state): State<AppState>,
    _op: Operator,
    Path(id): Path<i64>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let (_, data) = state.store.firmware_data(id).await?;
    Ok(serve_bytes(&headers, data))
}
