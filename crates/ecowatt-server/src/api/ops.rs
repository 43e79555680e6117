//! `/healthz`, `/metrics` and the JSON 404.

use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;

use super::AppState;
use crate::error::ApiError;

pub async fn healthz(State(state): State<AppState>) -> impl IntoResponse {
    match state.store.token_count().await {
        Ok(_) => (StatusCode::OK, "ok"),
        Err(_) => (StatusCode::SERVICE_UNAVAILABLE, "store unavailable"),
    }
}

pub async fn metrics(State(state): State<AppState>) -> impl IntoResponse {
    let devices = state.store.list_devices().await.map(|d| d.len() as f64).unwrap_or(f64::NAN);
    let body = state.metrics.render(&[("ecowatt_devices", "Registered devices.", devices)]);
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], body)
}

pub async fn not_found() -> ApiError {
    ApiError::new(StatusCode::NOT_FOUND, "no_route", "no such endpoint; see /api/docs")
}
