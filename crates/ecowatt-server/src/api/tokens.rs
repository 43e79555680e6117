//! `/api/v1/tokens` and `/api/v1/audit`.

use axum::Json;
use axum::extract::State;

use super::json::{Path, Query};
use axum::http::StatusCode;
use serde::Deserialize;
use serde_json::{Value, json};

use super::json::ApiJson;
use super::{AppState, Operator};
use crate::error::ApiError;
use crate::operators::{Role, Token, generate_token, hash_token};

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewToken {
    name: String,
    role: Role,
}

#[utoipa::path(
    post,
    path = "/api/v1/tokens",
    operation_id = "tokens_create",
    tag = "operators",
    summary = "Create a token {name, role: admin|viewer}; returns it once",
    request_body = NewToken,
    responses((status = 201, description = "{token, info}: the secret, shown only now", body = serde_json::Value), crate::error::ErrorResponses),
    security(("bearer" = ["admin"])),
)]
pub async fn create(
    State(state): State<AppState>,
    op: Operator,
    ApiJson(req): ApiJson<NewToken>,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    op.require_admin()?;
    let secret = generate_token();
    let token = state
        .operators
        .create(&req.name, req.role, &hash_token(&secret), &op.actor(), crate::now_ms())
        .await?;
    Ok((StatusCode::CREATED, Json(json!({ "token": secret, "info": token }))))
}

#[utoipa::path(
    get,
    path = "/api/v1/tokens",
    operation_id = "tokens_list",
    tag = "operators",
    summary = "List operator tokens",
    responses((status = 200, description = "{tokens: [...]}", body = serde_json::Value), crate::error::ErrorResponses),
    security(("bearer" = ["admin"])),
)]
pub async fn list(State(state): State<AppState>, op: Operator) -> Result<Json<Value>, ApiError> {
    op.require_admin()?;
    Ok(Json(json!({ "tokens": state.operators.list().await? })))
}

#[utoipa::path(
    delete,
    path = "/api/v1/tokens/{id}",
    operation_id = "tokens_revoke",
    tag = "operators",
    summary = "Revoke a token",
    params(("id" = i64, Path, description = "Token id")),
    responses((status = 200, description = "revoked", body = crate::operators::Token), crate::error::ErrorResponses),
    security(("bearer" = ["admin"])),
)]
pub async fn revoke(
    State(state): State<AppState>,
    op: Operator,
    Path(id): Path<i64>,
) -> Result<Json<Token>, ApiError> {
    op.require_admin()?;
    Ok(Json(state.operators.revoke(id, &op.actor(), crate::now_ms()).await?))
}

#[derive(Deserialize, utoipa::IntoParams)]
pub struct AuditQuery {
    before: Option<i64>,
    limit: Option<i64>,
}

#[utoipa::path(
    get,
    path = "/api/v1/audit",
    operation_id = "tokens_audit",
    tag = "operators",
    summary = "Audit log, newest first (before, limit)",
    params(AuditQuery),
    responses((status = 200, description = "{entries: [...], next_before}, newest first", body = serde_json::Value), crate::error::ErrorResponses),
    security(("bearer" = [])),
)]
pub async fn audit(
    State(state): State<AppState>,
    _op: Operator,
    Query(q): Query<AuditQuery>,
) -> Result<Json<Value>, ApiError> {
    let entries = state.operators.audit(q.before, q.limit.unwrap_or(100)).await?;
    let next = if entries.len() as i64 == q.limit.unwrap_or(100).clamp(1, 1000) {
        entries.last().map(|e| e.id)
    } else {
        None
    };
    Ok(Json(json!({ "entries": entries, "next_before": next })))
}

#[utoipa::path(
    get,
    path = "/api/v1/security-events",
    operation_id = "tokens_security_events",
    tag = "operators",
    summary = "Device protocol refusals, newest first",
    params(AuditQuery),
    responses((status = 200, description = "{events: [...], next_before}, newest first", body = serde_json::Value), crate::error::ErrorResponses),
    security(("bearer" = [])),
)]
pub async fn security_events(
    State(state): State<AppState>,
    _op: Operator,
    Query(q): Query<AuditQuery>,
) -> Result<Json<Value>, ApiError> {
    let events = state.security_events.list(q.before, q.limit.unwrap_or(100)).await?;
    Ok(Json(json!({ "events": events })))
}
