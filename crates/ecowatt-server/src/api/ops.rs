//! `/healthz`, `/metrics` and the JSON 404.

use std::fmt::Write;

use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;

use super::AppState;
use crate::error::ApiError;

/// `ok` when the store answers and can write (a row written at most once a
/// second); 503 otherwise, so that a supervisor restarts or alerts.
#[utoipa::path(
    get,
    path = "/healthz",
    operation_id = "ops_healthz",
    tag = "operations",
    summary = "Health: 200 when the store answers and can write, else 503 with the reason",
    responses((status = 200, description = "`ok`", body = String), (status = 503, description = "why the store cannot write", body = String), crate::error::ErrorResponses),
)]
pub async fn healthz(State(state): State<AppState>) -> impl IntoResponse {
    match state.store.writable().await {
        Ok(()) => (StatusCode::OK, "ok".to_owned()),
        Err(e) => {
            tracing::warn!(error = %e, "health check: the store cannot write");
            (StatusCode::SERVICE_UNAVAILABLE, format!("store cannot write: {e}"))
        }
    }
}

#[utoipa::path(
    get,
    path = "/metrics",
    operation_id = "ops_metrics",
    tag = "operations",
    summary = "Prometheus metrics",
    responses((status = 200, description = "Prometheus text", body = String), crate::error::ErrorResponses),
)]
pub async fn metrics(State(state): State<AppState>) -> impl IntoResponse {
    let devices = state.devices.list().await.map(|d| d.len() as f64).unwrap_or(f64::NAN);
    let edge = &state.edge;
    let mut body = state.metrics.render(&[
        ("ecowatt_devices", "Registered devices.", devices),
        ("ecowatt_connections_open", "Connections open now.", edge.open() as f64),
    ]);
    let _ = write!(
        body,
        "# HELP ecowatt_connections_accepted_total Connections admitted.\n\
         # TYPE ecowatt_connections_accepted_total counter\n\
         ecowatt_connections_accepted_total {}\n\
         # HELP ecowatt_connections_closed_total Connections closed (or refused, 503) by the edge, by reason.\n\
         # TYPE ecowatt_connections_closed_total counter\n",
        edge.accepted()
    );
    for (reason, n) in edge.closed_counts() {
        let _ = writeln!(
            body,
            "ecowatt_connections_closed_total{{reason=\"{}\"}} {n}",
            reason.as_str()
        );
    }
    if let Some(tls) = &state.settings.tls {
        let n = |c: &std::sync::atomic::AtomicU64| c.load(std::sync::atomic::Ordering::Relaxed);
        let s = &tls.stats;
        let _ = write!(
            body,
            "# HELP ecowatt_tls_certificate_not_after_seconds When the certificate in use expires (Unix time).\n\
             # TYPE ecowatt_tls_certificate_not_after_seconds gauge\n\
             ecowatt_tls_certificate_not_after_seconds {}\n\
             # HELP ecowatt_tls_handshake_failures_total TLS handshakes that failed.\n\
             # TYPE ecowatt_tls_handshake_failures_total counter\n\
             ecowatt_tls_handshake_failures_total {}\n\
             # HELP ecowatt_tls_plain_http_total Plain HTTP requests sent to the HTTPS port (answered 400).\n\
             # TYPE ecowatt_tls_plain_http_total counter\n\
             ecowatt_tls_plain_http_total {}\n\
             # HELP ecowatt_tls_reloads_total Certificate reloads, by outcome.\n\
             # TYPE ecowatt_tls_reloads_total counter\n\
             ecowatt_tls_reloads_total{{outcome=\"ok\"}} {}\n\
             ecowatt_tls_reloads_total{{outcome=\"refused\"}} {}\n",
            tls.not_after(),
            n(&s.handshake_failures),
            n(&s.plain_http),
            n(&s.reloads),
            n(&s.reload_failures),
        );
    }
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], body)
}

pub async fn not_found() -> ApiError {
    ApiError::new(StatusCode::NOT_FOUND, "no_route", "no such endpoint; see /api/docs")
}
