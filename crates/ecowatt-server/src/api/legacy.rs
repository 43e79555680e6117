//! The seed's plain-JSON API (`shared/seed/phase4-cloud-features.md`), for
//! devices running the original firmware. Unauthenticated by design, so it is
//! served only with `--legacy-api`. Legacy devices are ordinary devices in the
//! store (add them with `ecowatt device add`); unknown `device_id`s get 404.
//!
//! Fixed here, kept compatible: a config change is flagged on several polls
//! (the original firmware cannot acknowledge), and a command is delivered
//! again until its result arrives.

use axum::extract::State;

use super::json::{Path, Query};
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use axum::routing::{get, post};
use axum::{Json, Router};
use ecowatt_proto::firmware::Version;
use serde::Deserialize;
use serde_json::{Value, json};

use super::AppState;
use super::json::ApiJson;
use crate::commands::{Command, CommandFilter, CommandOutcome};
use crate::config::ConfigPatch;
use crate::domain::Invalid;
use crate::error::ApiError;

/// Who the audit log names for changes made through this API.
const ACTOR: &str = "legacy-api";
/// A config change is flagged `Changed` on this many polls.
const CONFIG_REPEAT: i64 = 3;
/// A delivered command with no result is delivered again after this long.
const REDELIVER_MS: i64 = 30_000;

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/config/update", post(config_update))
        .route("/changes", post(changes))
        .route("/command/queue", post(command_queue))
        .route("/command/poll", post(command_poll))
        .route("/command/result", post(command_result))
        .route("/command/status/{id}", get(command_status))
        .route("/command/history", get(command_history))
        .route("/command/pending", get(command_pending))
        .route("/command/statistics", get(command_statistics))
        .route("/command/logs", get(command_logs))
        .route("/ota/check", post(ota_check))
        .route("/ota/download/{file}", get(ota_download))
}

fn device_id(body: &Value) -> Result<String, ApiError> {
    body.get("device_id")
        .and_then(Value::as_str)
        .map(str::to_owned)
        .ok_or_else(|| Invalid::new("device_id", "required (a registered device's name)").into())
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
    ApiJson(body): ApiJson<Value>,
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

async fn changes(
    State(state): State<AppState>,
    ApiJson(body): ApiJson<Value>,
) -> Result<Json<Value>, ApiError> {
    let device = enabled_device(&state, &body).await?;
    let now = crate::now_ms();
    let (changed, config) = state.configs.legacy_poll(&device, CONFIG_REPEAT, now).await?;
    state.devices.touch(&device, now).await?;
    Ok(Json(json!({
        "Changed": changed,
        "pollFreqChanged": changed,
        "newPollTimer": config.poll_interval_ms / 1000,
        "uploadFreqChanged": changed,
        "newUploadTimer": config.upload_interval_ms / 1000,
    })))
}

fn legacy_id(id: i64) -> String {
    format!("CMD_{id}")
}

fn parse_id(text: &str) -> Result<i64, ApiError> {
    text.strip_prefix("CMD_")
        .unwrap_or(text)
        .split('_')
        .next()
        .and_then(|n| n.parse().ok())
        .ok_or_else(|| {
            Invalid::new("command_id", format!("{text:?} is not a command id like CMD_12")).into()
        })
}

/// A command in the seed's shape.
fn seed_command(c: &Command) -> Value {
    let status = match c.status.as_str() {
        "delivered" => "sent",
        "succeeded" | "confirmed" => "completed",
        other => other,
    };
    json!({
        "command_id": legacy_id(c.id),
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
    ApiJson(body): ApiJson<Value>,
) -> Result<Json<Value>, ApiError> {
    let device = device_id(&body)?;
    let request = json!({
        "type": body.get("command_type").cloned().unwrap_or(Value::Null),
        "parameters": body.get("parameters").cloned().unwrap_or_else(|| json!({})),
    });
    let command = super::commands::queue_for(&state, &device, request, ACTOR).await?;
    state.metrics.inc("ecowatt_commands_queued_total", "");
    Ok(Json(json!({"command_id": legacy_id(command.id)})))
}

async fn command_poll(
    State(state): State<AppState>,
    ApiJson(body): ApiJson<Value>,
) -> Result<Json<Value>, ApiError> {
    let device = enabled_device(&state, &body).await?;
    let now = crate::now_ms();
    state.devices.touch(&device, now).await?;
    let delivered = state.commands.deliver(&device, REDELIVER_MS, 1, now).await?;
    Ok(Json(json!({
        "command": delivered.first().map(|c| json!({
            "command_id": legacy_id(c.id),
            "command_type": c.kind,
            "parameters": c.parameters,
        }))
    })))
}

async fn command_result(
    State(state): State<AppState>,
    ApiJson(body): ApiJson<Value>,
) -> Result<Json<Value>, ApiError> {
    let id_text = body
        .get("command_id")
        .and_then(Value::as_str)
        .ok_or_else(|| ApiError::from(Invalid::new("command_id", "required")))?;
    let id = parse_id(id_text)?;
    let status = body.get("status").and_then(Value::as_str).unwrap_or("");
    let success = matches!(status, "completed" | "success" | "succeeded");
    if !success && !matches!(status, "failed" | "error") {
        return Err(Invalid::new("status", "completed or failed").into());
    }
    let message = body.get("result").map(|r| match r {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    });
    let command = state.commands.get(id).await?;
    if !state.devices.get(&command.device).await?.enabled {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "device_disabled",
            format!("device {:?} is disabled", command.device),
        ));
    }
    let outcome =
        CommandOutcome { success, message, exception_code: None, value: None, executed_ms: None };
    state.commands.record_result(&command.device, id, &outcome, crate::now_ms()).await?;
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
    Ok(Json(seed_command(&state.commands.get(parse_id(&id)?).await?)))
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
    Ok(Json(json!({
        "total_commands": s.total_commands,
        "pending": n("queued"),
        "sent": n("delivered"),
        "completed": n("succeeded") + n("confirmed"),
        "failed": n("failed"),
        "expired": n("expired"),
        "cancelled": n("cancelled"),
        "success_rate": s.success_rate,
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
    ApiJson(body): ApiJson<Value>,
) -> Result<Json<Value>, ApiError> {
    enabled_device(&state, &body).await?;
    let current_text = body.get("current_version").and_then(Value::as_str).unwrap_or("0.0.0");
    let current = Version::parse(current_text).map_err(|_| {
        ApiError::from(Invalid::new("current_version", "MAJOR.MINOR.PATCH, e.g. 1.0.3"))
    })?;
    let images = state.firmware.list().await?;
    Ok(Json(match crate::firmware::newest_above(&images, &current) {
        Some((v, f)) => json!({
            "update_available": true,
            "version": v.to_string(),
            "url": format!("/ota/download/firmware_{v}.bin"),
            "size": f.size,
            "checksum": f.sha256.to_lowercase(),
            "signature": f.manifest["signature"],
        }),
        None => json!({
            "update_available": false,
            "message": format!("Device is running latest version: {current_text}"),
        }),
    }))
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
