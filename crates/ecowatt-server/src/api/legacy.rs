//! The seed's plain-JSON API (`shared/seed/phase4-cloud-features.md`), for
//! devices running the original firmware. Unauthenticated by design, so it is
//! served only with `--legacy-api`. Legacy devices are ordinary devices in the
//! store (add them with `ecowatt device add`); unknown `device_id`s get 404.
//!
//! It behaves as the guide shows (docs/migration.md lists each choice):
//! a config change is flagged once (`[legacy] config_repeat` flags it on
//! more polls), commands live a week unless a TTL is given, a write to any
//! register address is queued (`[legacy] strict_commands` refuses those
//! outside the map), ids are the original's `CMD_<n>_<unix>`. Fixed and kept:
//! a command is delivered again until its result arrives.

use axum::extract::State;

use super::json::{Path, Query};
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use axum::routing::{get, post};
use axum::{Json, Router};
use ecowatt_proto::firmware::Version;
use serde::Deserialize;
use serde_json::{Value, json};

use super::json::AnyJson;
use super::{AppState, Source};
use crate::commands::store::QueueOptions;
use crate::commands::{Command, CommandFilter, CommandOutcome, CommandRequest};
use crate::config::ConfigPatch;
use crate::domain::Invalid;
use crate::error::ApiError;

/// Who the audit log names for changes made through this API.
const ACTOR: &str = "legacy-api";
/// A delivered command with no result is delivered again after this long.
const REDELIVER_MS: i64 = 30_000;

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/config/update", post(config_update))
        .route("/changes", post(changes))
        .route("/config/status", get(config_status))
        .route("/command/queue", post(command_queue))
        .route("/command/poll", post(command_poll))
        .route("/command/result", post(command_result))
        .route("/command/status/{id}", get(command_status))
        .route("/command/history", get(command_history))
        .route("/command/pending", get(command_pending))
        .route("/command/statistics", get(command_statistics))
        .route("/command/logs", get(command_logs))
        .route("/process", post(process))
        .route("/ota/check", post(ota_check))
        .route("/ota/chunk", post(ota_chunk))
        .route("/ota/verify", post(ota_verify))
        .route("/ota/complete", post(ota_complete))
        .route("/ota/status", get(ota_status))
        .route("/ota/download/{file}", get(ota_download))
}

fn device_id(body: &Value) -> Result<String, ApiError> {
    body.get("device_id")
        .and_then(Value::as_str)
        .map(str::to_owned)
        .ok_or_else(|| Invalid::new("device_id", "required (a registered device's name)").into())
}

/// A required text field of a legacy body.
fn text<'a>(body: &'a Value, field: &str, hint: &str) -> Result<&'a str, ApiError> {
    body.get(field).and_then(Value::as_str).ok_or_else(|| Invalid::new(field, hint).into())
}

/// A required `MAJOR.MINOR.PATCH` field of a legacy body.
fn version_field<'a>(body: &'a Value, field: &str) -> Result<&'a str, ApiError> {
    let text = text(body, field, "required, e.g. 1.0.3")?;
    Version::parse(text)
        .map_err(|_| ApiError::from(Invalid::new(field, "MAJOR.MINOR.PATCH, e.g. 1.0.3")))?;
    Ok(text)
}

/// The device behind `device_id`, refused when disabled.
async fn enabled_device(state: &AppState, body: &Value) -> Result<String, ApiError> {
    let name = device_id(body)?;
    if !state.devices.get(&name).await?.enabled {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "device_disabled",
            format!("device {name:?} is disabled"),
        ));
    }
    Ok(name)
}

fn seconds(body: &Value, field: &str) -> Result<Option<i64>, ApiError> {
    match body.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => v
            .as_i64()
            .map(|s| Some(s.saturating_mul(1000)))
            .ok_or_else(|| Invalid::new(field, "whole seconds").into()),
    }
}

async fn config_update(
    State(state): State<AppState>,
    AnyJson(body): AnyJson<Value>,
) -> Result<Json<Value>, ApiError> {
    let device = device_id(&body)?;
    let patch = ConfigPatch {
        poll_interval_ms: seconds(&body, "poll_frequency")?,
        upload_interval_ms: seconds(&body, "upload_frequency")?,
        registers: None,
    };
    let shadow =
        state.configs.update(&device, &patch, ACTOR, crate::now_ms()).await.map_err(|e| {
            // Name the seed's fields in errors, not ours.
            let mut e = ApiError::from(e);
            e.field = e.field.map(|f| match f.as_str() {
                "poll_interval_ms" => "poll_frequency".to_owned(),
                "upload_interval_ms" => "upload_frequency".to_owned(),
                _ => f,
            });
            e
        })?;
    Ok(Json(json!({"status": "success", "version": shadow.desired_version})))
}

/// The original's `/changes` answer.
fn changes_answer(changed: bool, poll: bool, upload: bool, timers: (i64, i64)) -> Json<Value> {
    Json(json!({
        "Changed": changed,
        "pollFreqChanged": poll,
        "newPollTimer": timers.0,
        "uploadFreqChanged": upload,
        "newUploadTimer": timers.1,
    }))
}

async fn changes(
    State(state): State<AppState>,
    AnyJson(body): AnyJson<Value>,
) -> Result<Json<Value>, ApiError> {
    let hot = state.legacy.hot();
    let name = device_id(&body)?;
    let now = crate::now_ms();
    if let Some(timers) = hot.quiet_timers(&name, now) {
        return Ok(changes_answer(false, false, false, timers));
    }
    let stamp = hot.stamp(&name);
    let device = enabled_device(&state, &body).await?;
    let repeat = state.settings.legacy.config_repeat;
    let c = state.configs.legacy_poll(&device, repeat, now).await?;
    hot.seen(&device, now);
    let timers = (c.config.poll_interval_ms / 1000, c.config.upload_interval_ms / 1000);
    hot.learn_timers(&device, stamp, (!c.changed).then_some(timers));
    Ok(changes_answer(c.changed, c.poll_changed, c.upload_changed, timers))
}

/// One device's config as the guide's troubleshooting step reads it.
async fn config_of(state: &AppState, name: &str) -> Result<Value, ApiError> {
    let device = state.devices.get(name).await?;
    let shadow = state.configs.shadow(name).await?;
    let applied = shadow.reported.as_ref();
    Ok(json!({
        "device_id": name,
        "poll_frequency": shadow.desired.poll_interval_ms / 1000,
        "upload_frequency": shadow.desired.upload_interval_ms / 1000,
        "version": shadow.desired_version,
        "changed": crate::config::legacy_pending(shadow.desired_version, shadow.reported_version),
        "applied_version": shadow.reported_version,
        "applied_poll_frequency": applied.map(|c| c.poll_interval_ms / 1000),
        "applied_upload_frequency": applied.map(|c| c.upload_interval_ms / 1000),
        "updated_time": crate::iso8601(shadow.desired_ms),
        "last_seen": device.last_seen_ms.map(crate::iso8601),
    }))
}

/// `GET /config/status[?device_id=]`: the desired timers, whether a change
/// still waits to be sent, and what the device last took.
async fn config_status(
    State(state): State<AppState>,
    Query(q): Query<DeviceQuery>,
) -> Result<Json<Value>, ApiError> {
    if let Some(name) = &q.device_id {
        return Ok(Json(config_of(&state, name).await?));
    }
    let mut devices = Vec::new();
    for d in state.devices.list().await? {
        devices.push(config_of(&state, &d.name).await?);
    }
    Ok(Json(json!({"count": devices.len(), "devices": devices})))
}

/// The command a legacy id names (404 when its timestamp names another).
async fn command_by_legacy_id(state: &AppState, text: &str) -> Result<Command, ApiError> {
    let id = crate::legacy::ids::parse(text)?;
    let command = state.commands.get(id.id).await?;
    if !id.matches(command.created_ms) {
        return Err(ApiError::not_found(format!("command {text}")));
    }
    Ok(command)
}

/// A command in the seed's shape.
fn seed_command(c: &Command) -> Value {
    let status = match c.status.as_str() {
        "delivered" => "sent",
        "succeeded" | "confirmed" => "completed",
        other => other,
    };
    json!({
        "command_id": crate::legacy::ids::format(c.id, c.created_ms),
        "device_id": c.device,
        "command_type": c.kind,
        "parameters": c.parameters,
        "status": status,
        "queued_time": crate::iso8601(c.created_ms),
        "sent_time": c.delivered_ms.map(crate::iso8601),
        "completed_time": c.completed_ms.map(crate::iso8601),
        "result": c.result_message,
    })
}

async fn command_queue(
    State(state): State<AppState>,
    AnyJson(body): AnyJson<Value>,
) -> Result<Json<Value>, ApiError> {
    let device = device_id(&body)?;
    let kind = body.get("command_type").cloned().unwrap_or(Value::Null);
    let parameters = body.get("parameters").cloned().unwrap_or_else(|| json!({}));
    let request: CommandRequest =
        serde_json::from_value(json!({"type": kind, "parameters": parameters})).map_err(|e| {
            ApiError::from(Invalid::new(
                "command_type",
                format!(
                    "{e}; types: set_power, set_power_percentage, write_register, read_register"
                ),
            ))
        })?;
    let legacy = &state.settings.legacy;
    let ttl_s = match ["ttl", "ttl_s", "ttl_seconds"].iter().find_map(|k| body.get(*k)) {
        None | Some(Value::Null) => legacy.command_ttl_s,
        Some(v) => super::control::seconds("ttl", v)?,
    };
    let options =
        QueueOptions { ttl_s, any_address: !legacy.strict_commands, ..Default::default() };
    let command =
        state.commands.queue_with(&device, &request, &options, ACTOR, crate::now_ms()).await?;
    state.metrics.inc("ecowatt_commands_queued_total", "");
    Ok(Json(json!({
        "status": "success",
        "command_id": crate::legacy::ids::format(command.id, command.created_ms),
        "device_id": device,
        "command_type": command.kind,
        "parameters": command.parameters,
        "expires_time": crate::iso8601(command.expires_ms),
        "message": format!("Command {} queued successfully for {device}", command.kind),
    })))
}

async fn command_poll(
    State(state): State<AppState>,
    AnyJson(body): AnyJson<Value>,
) -> Result<Json<Value>, ApiError> {
    let hot = state.legacy.hot();
    let name = device_id(&body)?;
    let now = crate::now_ms();
    if hot.quiet_poll(&name, now) {
        return Ok(Json(json!({"command": null})));
    }
    let stamp = hot.stamp(&name);
    let device = enabled_device(&state, &body).await?;
    hot.seen(&device, now);
    let delivered = state.commands.deliver(&device, REDELIVER_MS, 1, now).await?;
    if delivered.is_empty() {
        let until = state.commands.next_redelivery(&device, REDELIVER_MS, now).await?;
        hot.learn_poll(&device, stamp, until.unwrap_or(i64::MAX));
    }
    Ok(Json(json!({
        "command": delivered.first().map(|c| json!({
            "command_id": crate::legacy::ids::format(c.id, c.created_ms),
            "command_type": c.kind,
            "parameters": c.parameters,
        }))
    })))
}

async fn command_result(
    State(state): State<AppState>,
    AnyJson(body): AnyJson<Value>,
) -> Result<Json<Value>, ApiError> {
    let id_text = text(&body, "command_id", "required")?;
    let command = command_by_legacy_id(&state, id_text).await?;
    let status = body.get("status").and_then(Value::as_str).unwrap_or("");
    let success = matches!(status, "completed" | "success" | "succeeded");
    if !success && !matches!(status, "failed" | "error") {
        return Err(Invalid::new("status", "completed or failed").into());
    }
    let message = body.get("result").map(|r| match r {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    });
    if !state.devices.get(&command.device).await?.enabled {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "device_disabled",
            format!("device {:?} is disabled", command.device),
        ));
    }
    let outcome =
        CommandOutcome { success, message, exception_code: None, value: None, executed_ms: None };
    state.commands.record_result(&command.device, command.id, &outcome, crate::now_ms()).await?;
    state.metrics.inc(
        "ecowatt_command_results_total",
        format!("outcome=\"{}\"", if success { "success" } else { "failure" }),
    );
    Ok(Json(json!({"status": "success"})))
}

async fn command_status(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    Ok(Json(seed_command(&command_by_legacy_id(&state, &id).await?)))
}

#[derive(Deserialize)]
struct DeviceQuery {
    device_id: Option<String>,
}

async fn listing(
    state: &AppState,
    device: Option<String>,
    open_only: bool,
) -> Result<Vec<Value>, ApiError> {
    if let Some(d) = &device {
        state.devices.get(d).await?;
    }
    let filter = CommandFilter { device, limit: 10_000, ..CommandFilter::default() };
    let commands = state.commands.list(&filter).await?;
    Ok(commands.iter().filter(|c| !open_only || c.status.is_open()).map(seed_command).collect())
}

async fn command_history(
    State(state): State<AppState>,
    Query(q): Query<DeviceQuery>,
) -> Result<Json<Value>, ApiError> {
    Ok(Json(json!({"commands": listing(&state, q.device_id, false).await?})))
}

async fn command_pending(
    State(state): State<AppState>,
    Query(q): Query<DeviceQuery>,
) -> Result<Json<Value>, ApiError> {
    let pending = listing(&state, q.device_id, true).await?;
    Ok(Json(json!({"pending_commands": pending, "count": pending.len()})))
}

async fn command_statistics(
    State(state): State<AppState>,
    Query(q): Query<DeviceQuery>,
) -> Result<Json<Value>, ApiError> {
    let s = state.commands.stats(q.device_id.as_deref()).await?;
    let n = |k: &str| s.by_status.get(k).copied().unwrap_or(0);
    let completed = n("succeeded") + n("confirmed");
    // The original's numbers: pending is queued or sent; success rate is
    // completed over all commands, in percent with two decimals;
    // active_devices are those with commands; total_queued every command
    // its queues held.
    let success_rate = if s.total_commands > 0 {
        (completed as f64 * 10_000.0 / s.total_commands as f64).round() / 100.0
    } else {
        0.0
    };
    Ok(Json(json!({
        "total_commands": s.total_commands,
        "completed": completed,
        "failed": n("failed"),
        "pending": n("queued") + n("delivered"),
        "success_rate": success_rate,
        "active_devices": s.devices_with_commands,
        "total_queued": s.total_commands,
        "queued": n("queued"),
        "sent": n("delivered"),
        "expired": n("expired"),
        "cancelled": n("cancelled"),
        "average_execution_time_ms": s.average_completion_ms,
        "command_types": s.by_type,
    })))
}

async fn command_logs(
    State(state): State<AppState>,
    Query(q): Query<DeviceQuery>,
) -> Result<Json<Value>, ApiError> {
    Ok(Json(json!({"logs": listing(&state, q.device_id, false).await?})))
}

async fn ota_check(
    State(state): State<AppState>,
    AnyJson(body): AnyJson<Value>,
) -> Result<Json<Value>, ApiError> {
    let device = enabled_device(&state, &body).await?;
    let current_text = version_field(&body, "current_version")?;
    let now = crate::now_ms();
    let offer = state.legacy.ota_check(&device, current_text, now).await?;
    let latest = || {
        json!({
            "update_available": false,
            "message": format!("Device is running latest version: {current_text}"),
        })
    };
    let Some(offer) = offer else { return Ok(Json(latest())) };
    let m = &offer.manifest;
    let version = m["version"].as_str().unwrap_or_default();
    let Some(keys) = &state.settings.legacy.ota else {
        tracing::warn!(
            device,
            version,
            "a legacy device is offered an update, but [legacy] ota_aes_key and \
            ota_hmac_psk are not set: the original firmware cannot take it (docs/migration.md)"
        );
        return Ok(Json(latest()));
    };
    let image = state.firmware.bytes(offer.firmware_id).await?;
    let e = state.legacy.encrypted(offer.firmware_id, &keys.aes_key, &image);
    let sha = m["sha256"].as_str().unwrap_or_default().to_lowercase();
    // The original firmware's fields (chunked, encrypted), and the guide's
    // (a plain download URL), in one answer.
    Ok(Json(json!({
        "update_available": true,
        "version": version,
        "original_size": image.len(),
        "encrypted_size": e.data.len(),
        "total_chunks": e.total_chunks(),
        "chunk_size": crate::legacy::ota::CHUNK_SIZE,
        "sha256_hash": sha,
        "signature": m["legacy_signature"],
        "iv": e.iv_base64(),
        "url": format!("/ota/download/firmware_{version}.bin"),
        "size": image.len(),
        "checksum": sha,
    })))
}

/// `POST /ota/chunk {device_id, version, chunk_number}`: one encrypted
/// chunk with its HMAC, for a device whose rollout offers `version`.
async fn ota_chunk(
    State(state): State<AppState>,
    AnyJson(body): AnyJson<Value>,
) -> Result<Json<Value>, ApiError> {
    let device = enabled_device(&state, &body).await?;
    let version = text(&body, "version", "required")?;
    let n = body
        .get("chunk_number")
        .and_then(Value::as_u64)
        .and_then(|n| usize::try_from(n).ok())
        .ok_or_else(|| ApiError::from(Invalid::new("chunk_number", "a chunk number from 0")))?;
    let Some(keys) = &state.settings.legacy.ota else {
        return Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "legacy_ota_not_configured",
            "set [legacy] ota_aes_key and ota_hmac_psk to serve the original firmware's updates",
        ));
    };
    let done = ((n as i64) + 1).saturating_mul(crate::legacy::ota::CHUNK_SIZE as i64);
    let firmware_id = match state.legacy.ota_chunk(&device, version, done, crate::now_ms()).await {
        Err(crate::db::StoreError::Refused { code, message }) => {
            return Err(ApiError::new(StatusCode::BAD_REQUEST, code, message));
        }
        other => other?,
    };
    let image = state.firmware.bytes(firmware_id).await?;
    let e = state.legacy.encrypted(firmware_id, &keys.aes_key, &image);
    let total = e.total_chunks();
    let chunk = e.chunk(n).ok_or_else(|| {
        ApiError::new(
            StatusCode::NOT_FOUND,
            "chunk_not_found",
            format!("Chunk not found: {n} of {total} (0..{total})"),
        )
    })?;
    use base64::Engine;
    Ok(Json(json!({
        "chunk": {
            "chunk_number": n,
            "data": base64::engine::general_purpose::STANDARD.encode(chunk),
            "size": chunk.len(),
            "hmac": crate::legacy::ota::chunk_hmac(&keys.hmac_psk, chunk, n),
            "total_chunks": total,
        },
        "progress": {
            "chunks_received": n + 1,
            "total_chunks": total,
            "percentage": ((n + 1) as f64 * 1000.0 / total as f64).round() / 10.0,
        },
    })))
}

/// `POST /ota/verify {device_id, verified, version}`: the device's verdict.
async fn ota_verify(
    State(state): State<AppState>,
    AnyJson(body): AnyJson<Value>,
) -> Result<Json<Value>, ApiError> {
    let device = enabled_device(&state, &body).await?;
    let verified = body
        .get("verified")
        .and_then(Value::as_bool)
        .ok_or_else(|| ApiError::from(Invalid::new("verified", "true or false")))?;
    let version = body.get("version").and_then(Value::as_str).unwrap_or("unknown");
    state.legacy.ota_verified(&device, version, verified, crate::now_ms()).await?;
    Ok(Json(json!({"status": "acknowledged", "verified": verified})))
}

/// `POST /ota/complete {device_id, version}`: the device runs `version`.
async fn ota_complete(
    State(state): State<AppState>,
    AnyJson(body): AnyJson<Value>,
) -> Result<Json<Value>, ApiError> {
    let device = enabled_device(&state, &body).await?;
    let version = version_field(&body, "version")?;
    state.legacy.ota_check(&device, version, crate::now_ms()).await?;
    Ok(Json(json!({
        "status": "success",
        "message": format!("OTA update completed successfully for {device}"),
    })))
}

/// `GET /ota/status`: legacy devices' downloads (the original firmware's
/// post-update self-test needs a 200 here).
async fn ota_status(State(state): State<AppState>) -> Result<Json<Value>, ApiError> {
    let sessions: serde_json::Map<String, Value> = state
        .legacy
        .sessions()
        .await?
        .into_iter()
        .map(|s| {
            let chunks = |bytes: i64| (bytes as usize).div_ceil(crate::legacy::ota::CHUNK_SIZE);
            (
                s.device,
                json!({"version": s.version, "state": s.state, "chunks_downloaded": chunks(s.done),
                    "total_chunks": chunks(s.total), "updated_time": crate::iso8601(s.updated_ms)}),
            )
        })
        .collect();
    let mut versions: Vec<String> =
        state.firmware.list().await?.into_iter().map(|f| f.version).collect();
    versions.sort_by(|a, b| match (Version::parse(a), Version::parse(b)) {
        (Ok(a), Ok(b)) => b.cmp(&a),
        _ => b.cmp(a),
    });
    versions.dedup();
    Ok(Json(json!({
        "active_sessions": sessions.len(),
        "sessions": sessions,
        "available_versions": versions,
    })))
}

async fn ota_download(
    State(state): State<AppState>,
    Path(file): Path<String>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let version = file
        .strip_prefix("firmware_")
        .and_then(|f| f.strip_suffix(".bin"))
        .ok_or_else(|| ApiError::not_found(format!("firmware file {file:?}")))?;
    let record = state
        .firmware
        .list()
        .await?
        .into_iter()
        .find(|f| f.version == version)
        .ok_or_else(|| ApiError::not_found(format!("firmware file {file:?}")))?;
    let data = state.firmware.bytes(record.id).await?;
    Ok(super::ranges::serve_bytes(&headers, &data))
}

/// A refused legacy upload: counted as a security event (the first of its
/// kind from its source this minute logged), answered with the original's 401.
fn upload_refused(
    state: &AppState,
    source: Option<std::net::IpAddr>,
    device: Option<&str>,
    status: StatusCode,
    code: &'static str,
    message: String,
) -> ApiError {
    state.metrics.inc("ecowatt_security_events_total", format!("kind=\"{code}\""));
    state.metrics.inc("ecowatt_legacy_uploads_total", format!("outcome=\"{code}\""));
    let detail = json!({"message": message});
    if state.refusals.refused(source, device, code, detail, crate::now_ms()) {
        tracing::warn!(?source, device, code, %message, "legacy upload refused (repeats this minute are counted, not logged)");
    }
    ApiError::new(status, code, message)
}

/// `POST /process`: the original firmware's upload, under its security
/// layer. Accepted only for devices an operator marked legacy; every batch
/// that decodes exactly is stored as telemetry, the others are counted
/// and named in the answer (docs/migration.md says which and why).
async fn process(
    State(state): State<AppState>,
    Source(source): Source,
    AnyJson(body): AnyJson<Value>,
) -> Result<Json<Value>, ApiError> {
    use crate::legacy::{envelope, parse_upload};
    let keys = &state.settings.legacy;
    if !envelope::is_secured(&body) {
        return Err(upload_refused(
            &state,
            source,
            None,
            StatusCode::UNAUTHORIZED,
            "legacy_unsecured",
            "uploads must carry the original firmware's security layer {nonce, payload, mac}"
                .into(),
        ));
    }
    let opened =
        envelope::open(&body, &keys.upload_hmac_key, &keys.upload_aes_key).map_err(|e| {
            upload_refused(
                &state,
                source,
                None,
                StatusCode::UNAUTHORIZED,
                e.code(),
                format!("Security verification failed: {e}"),
            )
        })?;
    let upload = parse_upload(&opened.json)?;
    let now = crate::now_ms();
    let shadow = state.configs.shadow(&upload.device).await?;
    let poll_ms = shadow.reported.as_ref().unwrap_or(&shadow.desired).poll_interval_ms;
    let stored = match state.legacy.store_upload(&upload, opened.nonce, poll_ms, now).await {
        Ok(s) => s,
        Err(crate::db::StoreError::Refused { code, message }) => {
            let status = if code == "legacy_replay" {
                StatusCode::UNAUTHORIZED
            } else {
                StatusCode::FORBIDDEN
            };
            return Err(upload_refused(
                &state,
                source,
                Some(&upload.device),
                status,
                code,
                message,
            ));
        }
        Err(e) => return Err(e.into()),
    };
    state.metrics.inc("ecowatt_legacy_uploads_total", "outcome=\"accepted\"");
    state.metrics.add("ecowatt_legacy_batches_total", "outcome=\"stored\"", stored.batches as u64);
    for (i, why) in &stored.undecodable {
        state.metrics.inc("ecowatt_legacy_batches_total", format!("outcome=\"{}\"", why.reason()));
        tracing::warn!(device = %upload.device, batch = i, reason = why.reason(), %why,
            "legacy batch not read whole: its samples with a value not known exactly are not stored");
    }
    tracing::warn!(device = %upload.device, nonce = opened.nonce, batches = stored.batches, samples = stored.samples,
        "accepted a legacy upload under the original firmware's shared, published key (migrate this device)");
    if let Some((value, at)) = stored.export_limit {
        let device = state.devices.get(&upload.device).await?;
        state
            .commands
            .confirm(device.id, ecowatt_proto::registers::EXPORT_LIMIT, value, at)
            .await?;
    }
    let undecodable: Vec<Value> = stored
        .undecodable
        .iter()
        .map(|(i, why)| json!({"entry": i + 1, "reason": why.reason(), "message": why.to_string()}))
        .collect();
    Ok(Json(json!({
        "status": "success",
        "device_id": upload.device,
        "processed_entries": upload.packets.len(),
        "decompression_successes": stored.batches,
        "total_samples_processed": stored.samples,
        "samples_not_decoded": stored.missing_samples,
        "undecodable": undecodable,
        "message": format!(
            "Stored {} samples from {} entries ({} samples not decoded exactly)",
            stored.samples,
            upload.packets.len(),
            stored.missing_samples
        ),
    })))
}
