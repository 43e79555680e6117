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

pub async fn show(
    State(state): State<AppState>,
    _op: Operator,
    Path(name): Path<String>,
) -> Result<Json<ConfigShadow>, ApiError> {
    Ok(Json(state.configs.shadow(&name).await?))
}

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

#[derive(Deserialize)]
pub struct HistoryQuery {
    limit: Option<i64>,
}

pub async fn history(
    State(state): State<AppState>,
    _op: Operator,
    Path(name): Path<String>,
    Query(q): Query<HistoryQuery>,
) -> Result<Json<Value>, ApiError> {
    let versions = state.configs.history(&name, q.limit.unwrap_or(100)).await?;
    Ok(Json(json!({ "device": name, "versions": versions })))
}
