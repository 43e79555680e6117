//! Export control: a device's fail-safe, tags and control state
//! (`/api/v1/devices/{name}/failsafe|tags|control`), its schedule
//! (`/api/v1/devices/{name}/schedule`, `/api/v1/groups/{group}/schedule`),
//! and curtailments of a group (`/api/v1/curtailments`).

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use serde::Deserialize;
use serde_json::{Value, json};

use super::json::{ApiJson, Path};
use super::{AppState, Operator};
use crate::control::FailSafe;
use crate::control::plan::{Definition, PlanError};
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

/// A refused schedule: 400 with its own code and the field at fault.
fn refused(e: PlanError) -> ApiError {
    ApiError {
        status: StatusCode::BAD_REQUEST,
        code: e.code,
        message: e.message,
        field: Some(e.field),
    }
}

pub async fn schedule(
    State(state): State<AppState>,
    _op: Operator,
    Path(name): Path<String>,
) -> Result<Json<Value>, ApiError> {
    Ok(Json(state.control.schedule(&name, crate::now_ms()).await?))
}

/// Sets a device's schedule: `{"timezone", "default_pct"?, "entries"}`.
pub async fn set_schedule(
    State(state): State<AppState>,
    op: Operator,
    Path(name): Path<String>,
    ApiJson(body): ApiJson<Value>,
) -> Result<Json<Value>, ApiError> {
    op.require_admin()?;
    let def = Definition::parse(&body).map_err(refused)?;
    state.control.set_schedule(&name, Some(&def), &op.actor(), crate::now_ms()).await?;
    Ok(Json(state.control.schedule(&name, crate::now_ms()).await?))
}

pub async fn clear_schedule(
    State(state): State<AppState>,
    op: Operator,
    Path(name): Path<String>,
) -> Result<Json<Value>, ApiError> {
    op.require_admin()?;
    state.control.set_schedule(&name, None, &op.actor(), crate::now_ms()).await?;
    Ok(Json(state.control.schedule(&name, crate::now_ms()).await?))
}

/// Queues a return to the schedule: the device drops any command's limit
/// or lease and writes its schedule's limit in force (100 % without one).
pub async fn resume_schedule(
    State(state): State<AppState>,
    op: Operator,
    Path(name): Path<String>,
) -> Result<(StatusCode, Json<crate::commands::Command>), ApiError> {
    op.require_admin()?;
    let request = crate::commands::CommandRequest::SetPowerPercentage { percentage: 100 };
    let options = crate::commands::store::QueueOptions { resume: true, ..Default::default() };
    let command =
        state.commands.queue_with(&name, &request, &options, &op.actor(), crate::now_ms()).await?;
    state.metrics.inc("ecowatt_commands_queued_total", "");
    Ok((StatusCode::CREATED, Json(command)))
}

pub async fn set_group_schedule(
    State(state): State<AppState>,
    op: Operator,
    Path(group): Path<String>,
    ApiJson(body): ApiJson<Value>,
) -> Result<Json<Value>, ApiError> {
    op.require_admin()?;
    let def = Definition::parse(&body).map_err(refused)?;
    let n =
        state.control.set_group_schedule(&group, Some(&def), &op.actor(), crate::now_ms()).await?;
    Ok(Json(json!({"group": group, "devices": n, "schedule": def.json()})))
}

pub async fn clear_group_schedule(
    State(state): State<AppState>,
    op: Operator,
    Path(group): Path<String>,
) -> Result<Json<Value>, ApiError> {
    op.require_admin()?;
    let n = state.control.set_group_schedule(&group, None, &op.actor(), crate::now_ms()).await?;
    Ok(Json(json!({"group": group, "devices": n, "schedule": null})))
}
