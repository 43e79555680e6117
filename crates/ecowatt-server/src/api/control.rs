//! Export control: a device's fail-safe, tags and control state
//! (`/api/v1/devices/{name}/failsafe|tags|control`), and curtailments of a
//! group (`/api/v1/curtailments`).

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use serde::Deserialize;
use serde_json::{Value, json};

use super::json::{ApiJson, Path};
use super::{AppState, Operator};
use crate::control::FailSafe;
use crate::control::store::Curtailment;
use crate::domain::Invalid;
use crate::error::ApiError;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FailSafeBody {
    failsafe: Value,
}

pub async fn set_failsafe(
    State(state): State<AppState>,
    op: Operator,
    Path(name): Path<String>,
    ApiJson(body): ApiJson<FailSafeBody>,
) -> Result<Json<Value>, ApiError> {
    op.require_admin()?;
    let f = FailSafe::parse(&body.failsafe)?;
    state.control.set_failsafe(&name, f, &op.actor(), crate::now_ms()).await?;
    Ok(Json(state.control.show(&name).await?))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RampBody {
    ramp_pct_per_s: Option<f64>,
}

pub async fn set_ramp(
    State(state): State<AppState>,
    op: Operator,
    Path(name): Path<String>,
    ApiJson(body): ApiJson<RampBody>,
) -> Result<Json<Value>, ApiError> {
    op.require_admin()?;
    let centi = body.ramp_pct_per_s.map(crate::commands::ramp_centi).transpose()?;
    state.control.set_ramp(&name, centi, &op.actor(), crate::now_ms()).await?;
    Ok(Json(state.control.show(&name).await?))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TagsBody {
    tags: Vec<String>,
}

pub async fn set_tags(
    State(state): State<AppState>,
    op: Operator,
    Path(name): Path<String>,
    ApiJson(body): ApiJson<TagsBody>,
) -> Result<Json<Value>, ApiError> {
    op.require_admin()?;
    state.control.set_tags(&name, &body.tags, &op.actor(), crate::now_ms()).await?;
    Ok(Json(state.control.show(&name).await?))
}

pub async fn show(
    State(state): State<AppState>,
    _op: Operator,
    Path(name): Path<String>,
) -> Result<Json<Value>, ApiError> {
    Ok(Json(state.control.show(&name).await?))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CurtailBody {
    group: String,
    percent: Value,
    lease_s: Option<Value>,
    ramp_pct_per_s: Option<f64>,
}

/// Whole seconds from a JSON number.
pub fn seconds(field: &str, v: &Value) -> Result<i64, Invalid> {
    v.as_i64().ok_or_else(|| Invalid::new(field, "must be whole seconds"))
}

pub async fn curtail(
    State(state): State<AppState>,
    op: Operator,
    ApiJson(body): ApiJson<CurtailBody>,
) -> Result<(StatusCode, Json<Curtailment>), ApiError> {
    op.require_admin()?;
    let percent = body
        .percent
        .as_i64()
        .ok_or_else(|| Invalid::new("percent", "a whole percentage 0..=100"))?;
    let lease_ms = match &body.lease_s {
        None | Some(Value::Null) => None,
        Some(v) => Some(seconds("lease_s", v)?.saturating_mul(1000)),
    };
    let now = crate::now_ms();
    let id = state
        .control
        .curtail(&body.group, percent, lease_ms, body.ramp_pct_per_s, &op.actor(), now)
        .await?;
    state.metrics.inc("ecowatt_curtailments_total", "");
    Ok((StatusCode::CREATED, Json(state.control.get(id, crate::now_ms()).await?)))
}

pub async fn release(
    State(state): State<AppState>,
    op: Operator,
    Path(id): Path<i64>,
) -> Result<(StatusCode, Json<Curtailment>), ApiError> {
    op.require_admin()?;
    let rid = state.control.release(id, &op.actor(), crate::now_ms()).await?;
    Ok((StatusCode::CREATED, Json(state.control.get(rid, crate::now_ms()).await?)))
}

pub async fn get(
    State(state): State<AppState>,
    _op: Operator,
    Path(id): Path<i64>,
) -> Result<Json<Curtailment>, ApiError> {
    Ok(Json(state.control.get(id, crate::now_ms()).await?))
}

pub async fn list(State(state): State<AppState>, _op: Operator) -> Result<Json<Value>, ApiError> {
    Ok(Json(json!({"curtailments": state.control.list(crate::now_ms()).await?})))
}
