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

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NewToken {
    name: String,
    role: Role,
}

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

pub async fn list(State(state): State<AppState>, op: Operator) -> Result<Json<Value>, ApiError> {
    op.require_admin()?;
    Ok(Json(json!({ "tokens": state.operators.list().await? })))
}

pub async fn revoke(
    State(state): State<AppState>,
    op: Operator,
    Path(id): Path<i64>,
) -> Result<Json<Token>, ApiError> {
    op.require_admin()?;
    Ok(Json(state.operators.revoke(id, &op.actor(), crate::now_ms()).await?))
}

#[derive(Deserialize)]
pub struct AuditQuery {
    before: Option<i64>,
    limit: Option<i64>,
}

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

pub async fn security_events(
    State(state): State<AppState>,
    _op: Operator,
    Query(q): Query<AuditQuery>,
) -> Result<Json<Value>, ApiError> {
    let events = state.security_events.list(q.before, q.limit.unwrap_or(100)).await?;
    Ok(Json(json!({ "events": events })))
}
