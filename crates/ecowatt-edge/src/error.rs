//! The refusals of the edge, in the shape every EcoWatt API uses:
//! `{"error": {"code": "...", "message": "..."}}`.

use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};

/// The JSON text of an error.
pub fn body(code: &str, message: &str) -> String {
    serde_json::json!({"error": {"code": code, "message": message}}).to_string()
}

/// An error response.
pub fn response(status: StatusCode, code: &str, message: &str) -> Response {
    (status, [(header::CONTENT_TYPE, "application/json")], body(code, message)).into_response()
}
