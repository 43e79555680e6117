//! `/api/v1/firmware`: signed images, checked on upload against the server's
//! configured public keys (the private key never comes here), served with
//! byte ranges so that a cut download resumes.

use axum::Json;
use axum::body::Bytes;
use axum::extract::State;

use super::json::Path;
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use ecowatt_proto::hex;
use serde_json::{Value, json};

use serde::Deserialize;

use super::json::ApiJson;
use super::ranges::{serve_bytes, serve_stream};
use super::{AppState, Operator, Source};
use crate::db::StoreError;
use crate::domain::Invalid;
use crate::error::ApiError;
use crate::firmware::rollouts::{NewRollout, Rollout, RolloutAction, RolloutDevice, RolloutTarget};
use crate::firmware::{Firmware, ImageRefused};

/// Header carrying the manifest JSON, hex-encoded, beside the raw image body.
pub const MANIFEST_HEADER: &str = "ecowatt-manifest";
/// Largest image accepted.
pub const MAX_IMAGE: usize = 32 * 1024 * 1024;

fn bad(code: &'static str, message: impl Into<String>) -> ApiError {
    ApiError::new(StatusCode::BAD_REQUEST, code, message)
}

/// `POST /api/v1/firmware`: the image as the body, its manifest in a header.
#[utoipa::path(
    post,
    path = "/api/v1/firmware",
    operation_id = "firmware_upload",
    tag = "firmware",
    summary = "Upload a signed image (body) with its manifest (hex JSON in the ecowatt-manifest header)",
    params(("ecowatt-manifest" = String, Header, description = "The signed manifest JSON, hex-encoded")),
    request_body(content = Vec<u8>, content_type = "application/octet-stream", description = "The image, as signed"),
    responses((status = 201, description = "stored (refused: unknown_signer, bad_signature, image_mismatch, conflict; over 32 MiB: 413 body_too_large)", body = crate::firmware::Firmware), crate::error::ErrorResponses),
    security(("bearer" = ["admin"])),
)]
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
    let record = crate::firmware::verify(
        &state.settings.firmware_keys,
        &text,
        &body,
        &op.actor(),
        crate::now_ms(),
    )
    .map_err(|ImageRefused { code, message }| bad(code, message))?;
    let stored = state.firmware.add(&record, &body).await?;
    Ok((StatusCode::CREATED, Json(stored)))
}

/// `GET /api/v1/firmware`: every stored image's record.
#[utoipa::path(
    get,
    path = "/api/v1/firmware",
    operation_id = "firmware_list",
    tag = "firmware",
    summary = "Stored firmware images",
    responses((status = 200, description = "{firmware: [...]}", body = serde_json::Value), crate::error::ErrorResponses),
    security(("bearer" = [])),
)]
pub async fn list(State(state): State<AppState>, _op: Operator) -> Result<Json<Value>, ApiError> {
    Ok(Json(json!({ "firmware": state.firmware.list().await? })))
}

/// `GET /api/v1/firmware/{id}/image`: the bytes, honouring `Range`.
#[utoipa::path(
    get,
    path = "/api/v1/firmware/{id}/image",
    operation_id = "firmware_image",
    tag = "firmware",
    summary = "An image's bytes (Range supported)",
    params(("id" = i64, Path, description = "Firmware id")),
    responses((status = 200, description = "the image (206 with a Range header)", body = Vec<u8>), crate::error::ErrorResponses),
    security(("bearer" = [])),
)]
pub async fn image(
    State(state): State<AppState>,
    _op: Operator,
    Path(id): Path<i64>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let data = state.firmware.bytes(id).await?;
    Ok(serve_bytes(&headers, &data))
}

/// Who asks for a download (`?device=ID&key=VERSION`; the device agent
/// always says). Unauthenticated: a mismatch is refused and recorded, but
/// what keeps an encrypted image from others is that only its device can
/// derive the key.
#[derive(Debug, Default, Deserialize, utoipa::IntoParams)]
pub struct Asker {
    /// The asking device's numeric id.
    device: Option<i64>,
    /// The version byte of the key it holds (default: its current key's).
    key: Option<u8>,
}

impl Asker {
    /// Device `device` holding key version `key`.
    pub fn new(device: i64, key: u8) -> Self {
        Asker { device: Some(device), key: Some(key) }
    }
}

/// `GET /api/v1/device/firmware/{token}`: the image an update offer names,
/// honouring `Range` (the device resumes a cut download from where it got).
/// The token only names the download; the device checks the bytes against
/// the signed manifest it was offered. An encrypted rollout's image is the
/// stream of sealed chunks for the offer's device (`docs/firmware.md`), made
/// for just the range asked.
#[utoipa::path(
    get,
    path = "/api/v1/device/firmware/{token}",
    operation_id = "firmware_device_image",
    tag = "device protocol",
    summary = "Device: the image an update offer names (Range supported); see docs/firmware.md",
    params(("token" = String, Path, description = "Download token from the update offer"), Asker),
    responses((status = 200, description = "the image (206 with a Range header)", body = Vec<u8>), crate::error::ErrorResponses),
    security(()),
)]
pub async fn device_image(
    State(state): State<AppState>,
    Source(source): Source,
    Path(token): Path<String>,
    axum::extract::Query(asker): axum::extract::Query<Asker>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let no_such = || ApiError::new(StatusCode::NOT_FOUND, "not_found", "no such download");
    let token_bytes: [u8; 16] = match hex::decode(&token).ok().and_then(|t| t.try_into().ok()) {
        Some(t) => t,
        None => return Err(no_such()),
    };
    let download = state.rollouts.download(&token).await.map_err(|e| match e {
        StoreError::NotFound(_) => no_such(),
        e => e.into(),
    })?;
    if download.encrypted && asker.device.is_some_and(|d| d != download.device_id) {
        let detail = json!({"asked_by": asker.device, "offered_to": download.device_id});
        let kind = "image_for_another_device";
        state.metrics.inc("ecowatt_security_events_total", format!("kind=\"{kind}\""));
        if state.refusals.refused(source, None, kind, detail.clone(), crate::now_ms()) {
            tracing::warn!(?source, %detail, "a device asked for an image encrypted for another");
        }
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            kind,
            "this download is encrypted for another device; a device fetches only the offers made to it",
        ));
    }
    let data = state.firmware.bytes(download.firmware_id).await?;
    state.metrics.inc("ecowatt_firmware_downloads_total", "");
    if !download.encrypted {
        return Ok(serve_bytes(&headers, &data));
    }
    let id = crate::devices::DeviceId(download.device_id);
    let crypto = match state.devices.current_keys(id).await? {
        Some(c) => c,
        None => return Err(no_such()),
    };
    let key = asker.key.unwrap_or(crypto.key_version as u8);
    let Some((_, device_key)) = crypto.key_for(key) else {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "unknown_key_version",
            "the device holds no key of that version; it must be provisioned again",
        ));
    };
    let chunk_log2 = ecowatt_proto::delivery::DEFAULT_CHUNK_LOG2;
    let stream = ecowatt_proto::delivery::Delivery::new(
        &device_key,
        &token_bytes,
        chunk_log2,
        data.len() as u64,
    );
    let len = stream.stream_len();
    Ok(serve_stream(&headers, len, |first, last| stream.stream_range(&data, first, last)))
}

/// `POST /api/v1/rollouts` body.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RolloutRequest {
    /// The image by id...
    firmware_id: Option<i64>,
    /// ...or by version (and target, when several are stored).
    version: Option<String>,
    target: Option<String>,
    /// Device names...
    devices: Option<Vec<String>>,
    /// ...or a percentage of the enabled devices.
    percent: Option<u32>,
    /// Cumulative percentages per wave (default `[100]`: one wave).
    waves: Option<Vec<u32>>,
    /// Abort when a wave's failures pass this percentage (default 20).
    failure_threshold_pct: Option<u32>,
    /// Deliver the image to each device encrypted under a key only it can
    /// derive (default false); a device that cannot decrypt fails.
    encrypted: Option<bool>,
}

fn rollout_json(r: &Rollout, devices: Option<&[RolloutDevice]>) -> Value {
    let mut v = serde_json::to_value(r).expect("rollouts serialise");
    if let Some(d) = devices {
        v["devices"] = serde_json::to_value(d).expect("devices serialise");
    }
    v
}

/// `POST /api/v1/rollouts`: offer an image to devices, in waves.
#[utoipa::path(
    post,
    path = "/api/v1/rollouts",
    operation_id = "firmware_start_rollout",
    tag = "firmware",
    summary = "Start a rollout {firmware_id | version [+target], devices | percent, waves?, failure_threshold_pct?, encrypted?}",
    request_body = RolloutRequest,
    responses((status = 201, description = "the rollout with its devices", body = serde_json::Value), crate::error::ErrorResponses),
    security(("bearer" = ["admin"])),
)]
pub async fn start_rollout(
    State(state): State<AppState>,
    op: Operator,
    ApiJson(req): ApiJson<RolloutRequest>,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    op.require_admin()?;
    let firmware_id = match (req.firmware_id, &req.version) {
        (Some(id), None) => id,
        (None, Some(v)) => state.firmware.by_version(v, req.target.as_deref()).await?.id,
        _ => {
            return Err(ApiError::invalid(Invalid::new(
                "firmware_id",
                "name the image by firmware_id or by version",
            )));
        }
    };
    let target = match (req.devices, req.percent) {
        (Some(d), None) => RolloutTarget::Devices(d),
        (None, Some(p)) => RolloutTarget::Percent(p),
        _ => {
            return Err(ApiError::invalid(Invalid::new(
                "devices",
                "give either devices (a list of names) or percent (of the enabled devices)",
            )));
        }
    };
    let new = NewRollout {
        firmware_id,
        target,
        waves: req.waves.unwrap_or_else(|| vec![100]),
        failure_threshold_pct: req.failure_threshold_pct.unwrap_or(20),
        encrypted: req.encrypted.unwrap_or(false),
    };
    let r = state.rollouts.create(&new, &op.actor(), crate::now_ms()).await?;
    let (r, devices) = state.rollouts.get(r.id).await?;
    Ok((StatusCode::CREATED, Json(rollout_json(&r, Some(&devices)))))
}

/// `GET /api/v1/rollouts`: every rollout with its counts per state.
#[utoipa::path(
    get,
    path = "/api/v1/rollouts",
    operation_id = "firmware_rollouts",
    tag = "firmware",
    summary = "Rollouts, newest first, with device counts per state",
    responses((status = 200, description = "{rollouts: [...]}, newest first, with counts per state", body = serde_json::Value), crate::error::ErrorResponses),
    security(("bearer" = [])),
)]
pub async fn rollouts(
    State(state): State<AppState>,
    _op: Operator,
) -> Result<Json<Value>, ApiError> {
    let list: Vec<Value> =
        state.rollouts.list().await?.iter().map(|r| rollout_json(r, None)).collect();
    Ok(Json(json!({ "rollouts": list })))
}

/// `GET /api/v1/rollouts/{id}`: one rollout with each device's progress.
#[utoipa::path(
    get,
    path = "/api/v1/rollouts/{id}",
    operation_id = "firmware_rollout",
    tag = "firmware",
    summary = "A rollout with each device's progress and running version",
    params(("id" = i64, Path, description = "Rollout id")),
    responses((status = 200, description = "the rollout with each device's progress and running version", body = serde_json::Value), crate::error::ErrorResponses),
    security(("bearer" = [])),
)]
pub async fn rollout(
    State(state): State<AppState>,
    _op: Operator,
    Path(id): Path<i64>,
) -> Result<Json<Value>, ApiError> {
    let (r, devices) = state.rollouts.get(id).await?;
    Ok(Json(rollout_json(&r, Some(&devices))))
}

/// `POST /api/v1/rollouts/{id}/pause|resume|abort`.
#[utoipa::path(
    post,
    path = "/api/v1/rollouts/{id}/{action}",
    operation_id = "firmware_act",
    tag = "firmware",
    summary = "Pause, resume or abort a rollout (abort: devices not installing are cancelled)",
    params(("id" = i64, Path, description = "Rollout id"), ("action" = String, Path, description = "pause, resume or abort")),
    responses((status = 200, description = "the rollout", body = serde_json::Value), crate::error::ErrorResponses),
    security(("bearer" = ["admin"])),
)]
pub async fn act(
    State(state): State<AppState>,
    op: Operator,
    Path((id, verb)): Path<(i64, String)>,
) -> Result<Json<Value>, ApiError> {
    let action = match verb.as_str() {
        "pause" => RolloutAction::Pause,
        "resume" => RolloutAction::Resume,
        "abort" => RolloutAction::Abort,
        _ => return Err(ApiError::not_found(format!("rollout action {verb:?}"))),
    };
    op.require_admin()?;
    state.rollouts.act(id, action, &op.actor(), crate::now_ms()).await?;
    let (r, devices) = state.rollouts.get(id).await?;
    Ok(Json(rollout_json(&r, Some(&devices))))
}
