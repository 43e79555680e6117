//! `/api/v1/devices/{name}/config`: the config shadow.

use axum::Json;
use axum::extract::State;

use super::json::{Path, Query};
use serde::Deserialize;
use serde_json::{Value, json};

use super::json::ApiJson;
use super::{AppState, Operator};
use crate::config::ConfigPatch;
use crate::config::ConfigShadow;
use crate::error::ApiError;

#[utoipa::path(
    get,
    path = "/api/v1/devices/{name}/config",
    operation_id = "config_show",
    tag = "config",
    summary = "Config shadow: desired and reported",
    params(("name" = String, Path, description = "Device name")),
    responses((status = 200, description = "desired and reported", body = crate::config::ConfigShadow), crate::error::ErrorResponses),
    security(("bearer" = [])),
)]
pub async fn show(
    State(state): State<AppState>,
    _op: Operator,
    Path(name): Path<String>,
) -> Result<Json<ConfigShadow>, ApiError> {
    Ok(Json(state.configs.shadow(&name).await?))
}

#[utoipa::path(
    patch,
    path = "/api/v1/devices/{name}/config",
    operation_id = "config_update",
    tag = "config",
    summary = "Change the desired config {poll_interval_ms, upload_interval_ms, registers}",
    params(("name" = String, Path, description = "Device name")),
    request_body = crate::config::ConfigPatch,
    responses((status = 200, description = "the new desired version", body = crate::config::ConfigShadow), crate::error::ErrorResponses),
    security(("bearer" = ["admin"])),
)]
pub async fn update(
    State(state): State<AppState>,
    op: Operator,
    Path(name): Path<String>,
    ApiJson(patch): ApiJson<ConfigPatch>,
) -> Result<Json<ConfigShadow>, ApiError> {
    op.require_admin()?;
    let shadow = state.configs.update(&name, &patch, &op.actor(), crate::now_ms()).await?;
    state.metrics.inc("ecowatt_config_updates_total", "");
    Ok(Json(shadow))
}

#[derive(Deserialize, utoipa::IntoParams)]
pub struct HistoryQuery {
    limit: Option<i64>,
}

#[utoipa::path(
    get,
    path = "/api/v1/devices/{name}/config/history",
    operation_id = "config_history",
    tag = "config",
    summary = "Desired config versions, newest first",
    params(("name" = String, Path, description = "Device name"), HistoryQuery),
    responses((status = 200, description = "{versions: [...]}, newest first", body = serde_json::Value), crate::error::ErrorResponses),
    security(("bearer" = [])),
)]
pub async fn history(
    State(state): State<AppState>,
    _op: Operator,
    Path(name): Path<String>,
    Query(q): Query<HistoryQuery>,
) -> Result<Json<Value>, ApiError> {
    let versions = state.configs.history(&name, q.limit.unwrap_or(100)).await?;
    Ok(Json(json!({ "device": name, "versions": versions })))
}
