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

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct FailSafeBody {
    failsafe: Value,
}

#[utoipa::path(
    put,
    path = "/api/v1/devices/{name}/failsafe",
    operation_id = "control_set_failsafe",
    tag = "export control",
    summary = "Set the fail-safe export limit {failsafe: 0..100 | 'hold' | null}",
    params(("name" = String, Path, description = "Device name")),
    request_body = FailSafeBody,
    responses((status = 200, description = "the device's export control", body = serde_json::Value), crate::error::ErrorResponses),
    security(("bearer" = ["admin"])),
)]
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

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RampBody {
    ramp_pct_per_s: Option<f64>,
}

#[utoipa::path(
    put,
    path = "/api/v1/devices/{name}/ramp",
    operation_id = "control_set_ramp",
    tag = "export control",
    summary = "Default ramp of export limits {ramp_pct_per_s: 0.01..100 | null}",
    params(("name" = String, Path, description = "Device name")),
    request_body = RampBody,
    responses((status = 200, description = "the device's export control", body = serde_json::Value), crate::error::ErrorResponses),
    security(("bearer" = ["admin"])),
)]
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

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct TagsBody {
    tags: Vec<String>,
}

#[utoipa::path(
    put,
    path = "/api/v1/devices/{name}/tags",
    operation_id = "control_set_tags",
    tag = "export control",
    summary = "Replace a device's tags {tags: [..]}",
    params(("name" = String, Path, description = "Device name")),
    request_body = TagsBody,
    responses((status = 200, description = "the device's export control", body = serde_json::Value), crate::error::ErrorResponses),
    security(("bearer" = ["admin"])),
)]
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

#[utoipa::path(
    get,
    path = "/api/v1/devices/{name}/control",
    operation_id = "control_show",
    tag = "export control",
    summary = "Tags, fail-safe, the leased limit the device reports, its episodes",
    params(("name" = String, Path, description = "Device name")),
    responses((status = 200, description = "tags, fail-safe, ramp, what the device reports, episodes", body = serde_json::Value), crate::error::ErrorResponses),
    security(("bearer" = [])),
)]
pub async fn show(
    State(state): State<AppState>,
    _op: Operator,
    Path(name): Path<String>,
) -> Result<Json<Value>, ApiError> {
    Ok(Json(state.control.show(&name).await?))
}

#[derive(Deserialize, utoipa::ToSchema)]
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

#[utoipa::path(
    post,
    path = "/api/v1/curtailments",
    operation_id = "control_curtail",
    tag = "export control",
    summary = "Curtail a group {group, percent, lease_s?, ramp_pct_per_s?}; refused whole (group_empty, failsafe_not_configured)",
    request_body = CurtailBody,
    responses((status = 201, description = "started", body = crate::control::store::Curtailment), crate::error::ErrorResponses),
    security(("bearer" = ["admin"])),
)]
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

#[utoipa::path(
    post,
    path = "/api/v1/curtailments/{id}/release",
    operation_id = "control_release",
    tag = "export control",
    summary = "Release: its devices back to their schedule's limit, or 100 % without one",
    params(("id" = i64, Path, description = "Curtailment id")),
    responses((status = 201, description = "the release (a curtailment of its own)", body = crate::control::store::Curtailment), crate::error::ErrorResponses),
    security(("bearer" = ["admin"])),
)]
pub async fn release(
    State(state): State<AppState>,
    op: Operator,
    Path(id): Path<i64>,
) -> Result<(StatusCode, Json<Curtailment>), ApiError> {
    op.require_admin()?;
    let rid = state.control.release(id, &op.actor(), crate::now_ms()).await?;
    Ok((StatusCode::CREATED, Json(state.control.get(rid, crate::now_ms()).await?)))
}

#[utoipa::path(
    get,
    path = "/api/v1/curtailments/{id}",
    operation_id = "control_get",
    tag = "export control",
    summary = "A curtailment: confirmed, pending, offline, failed, time to confirm p50/p99, failures",
    params(("id" = i64, Path, description = "Curtailment id")),
    responses((status = 200, description = "with progress", body = crate::control::store::Curtailment), crate::error::ErrorResponses),
    security(("bearer" = [])),
)]
pub async fn get(
    State(state): State<AppState>,
    _op: Operator,
    Path(id): Path<i64>,
) -> Result<Json<Curtailment>, ApiError> {
    Ok(Json(state.control.get(id, crate::now_ms()).await?))
}

#[utoipa::path(
    get,
    path = "/api/v1/curtailments",
    operation_id = "control_list",
    tag = "export control",
    summary = "Curtailments, newest first, with progress",
    responses((status = 200, description = "{curtailments: [...]}, newest first", body = serde_json::Value), crate::error::ErrorResponses),
    security(("bearer" = [])),
)]
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

#[utoipa::path(
    get,
    path = "/api/v1/devices/{name}/schedule",
    operation_id = "control_schedule",
    tag = "export control",
    summary = "The export-limit schedule: definition, version, active entry and next changes (site time), what the device reports",
    params(("name" = String, Path, description = "Device name")),
    responses((status = 200, description = "definition, version, active entry, next changes, what the device reports", body = serde_json::Value), crate::error::ErrorResponses),
    security(("bearer" = [])),
)]
pub async fn schedule(
    State(state): State<AppState>,
    _op: Operator,
    Path(name): Path<String>,
) -> Result<Json<Value>, ApiError> {
    Ok(Json(state.control.schedule(&name, crate::now_ms()).await?))
}

/// Sets a device's schedule: `{"timezone", "default_pct"?, "entries"}`.
#[utoipa::path(
    put,
    path = "/api/v1/devices/{name}/schedule",
    operation_id = "control_set_schedule",
    tag = "export control",
    summary = "Set the schedule {timezone, default_pct?, entries: ['mon-fri 11:00-14:00 0%' | {days, start, end, limit_pct}]}; refused: unknown_timezone, schedule_overlap, schedule_time_invalid, schedule_days_invalid, schedule_limit_invalid",
    params(("name" = String, Path, description = "Device name")),
    request_body(content = serde_json::Value, description = "{timezone, default_pct?, entries: [\"mon-fri 11:00-14:00 0%\" | {days, start, end, limit_pct}]} (docs/export-control.md#schedules)"),
    responses((status = 200, description = "the schedule as stored", body = serde_json::Value), crate::error::ErrorResponses),
    security(("bearer" = ["admin"])),
)]
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

#[utoipa::path(
    delete,
    path = "/api/v1/devices/{name}/schedule",
    operation_id = "control_clear_schedule",
    tag = "export control",
    summary = "Clear the schedule (a new version without entries)",
    params(("name" = String, Path, description = "Device name")),
    responses((status = 200, description = "the schedule (a new version without entries)", body = serde_json::Value), crate::error::ErrorResponses),
    security(("bearer" = ["admin"])),
)]
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
#[utoipa::path(
    post,
    path = "/api/v1/devices/{name}/schedule/resume",
    operation_id = "control_resume_schedule",
    tag = "export control",
    summary = "Return to the schedule: a command that ends any command's limit or lease and writes the schedule's limit in force",
    params(("name" = String, Path, description = "Device name")),
    responses((status = 201, description = "the command that returns the device to its schedule", body = crate::commands::Command), crate::error::ErrorResponses),
    security(("bearer" = ["admin"])),
)]
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

#[utoipa::path(
    put,
    path = "/api/v1/groups/{group}/schedule",
    operation_id = "control_set_group_schedule",
    tag = "export control",
    summary = "Set the schedule of every enabled device tagged group (group_empty when none)",
    params(("group" = String, Path, description = "Tag naming the group")),
    request_body(content = serde_json::Value, description = "{timezone, default_pct?, entries: [\"mon-fri 11:00-14:00 0%\" | {days, start, end, limit_pct}]} (docs/export-control.md#schedules)"),
    responses((status = 200, description = "the devices given the schedule", body = serde_json::Value), crate::error::ErrorResponses),
    security(("bearer" = ["admin"])),
)]
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

#[utoipa::path(
    delete,
    path = "/api/v1/groups/{group}/schedule",
    operation_id = "control_clear_group_schedule",
    tag = "export control",
    summary = "Clear the schedule of a group",
    params(("group" = String, Path, description = "Tag naming the group")),
    responses((status = 200, description = "the devices whose schedule was cleared", body = serde_json::Value), crate::error::ErrorResponses),
    security(("bearer" = ["admin"])),
)]
pub async fn clear_group_schedule(
    State(state): State<AppState>,
    op: Operator,
    Path(group): Path<String>,
) -> Result<Json<Value>, ApiError> {
    op.require_admin()?;
    let n = state.control.set_group_schedule(&group, None, &op.actor(), crate::now_ms()).await?;
    Ok(Json(json!({"group": group, "devices": n, "schedule": null})))
}
