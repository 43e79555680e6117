//! Extractors whose rejections use the API's error shape: JSON bodies, path
//! segments and query strings.

use axum::extract::rejection::JsonRejection;
use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::StatusCode;
use axum::http::request::Parts;
use serde::de::DeserializeOwned;

use crate::error::ApiError;

/// Like `axum::Json`, but bad bodies get `{"error": {...}}` with a stable code.
pub struct ApiJson<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for ApiJson<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        match axum::Json::<T>::from_request(req, state).await {
            Ok(axum::Json(v)) => Ok(ApiJson(v)),
            Err(rejection) => Err(match &rejection {
                JsonRejection::JsonDataError(e) => {
                    ApiError::new(StatusCode::BAD_REQUEST, "invalid_body", e.body_text())
                }
                JsonRejection::JsonSyntaxError(e) => {
                    ApiError::new(StatusCode::BAD_REQUEST, "invalid_json", e.body_text())
                }
                JsonRejection::MissingJsonContentType(_) => ApiError::new(
                    StatusCode::UNSUPPORTED_MEDIA_TYPE,
                    "unsupported_media_type",
                    "send Content-Type: application/json",
                ),
                other if other.status() == StatusCode::PAYLOAD_TOO_LARGE => ApiError::new(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "body_too_large",
                    "the request body is too large",
                ),
                other => ApiError::new(StatusCode::BAD_REQUEST, "invalid_body", other.body_text()),
            }),
        }
    }
}

/// Like `axum::extract::Path`, but a path segment of the wrong kind (`/commands/abc`)
/// gets `400 invalid_path` in the API's error shape.
pub struct Path<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned + Send> FromRequestParts<S> for Path<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        match axum::extract::Path::<T>::from_request_parts(parts, state).await {
            Ok(axum::extract::Path(v)) => Ok(Path(v)),
            Err(rejection) => {
                Err(ApiError::new(StatusCode::BAD_REQUEST, "invalid_path", rejection.body_text()))
            }
        }
    }
}

/// Like `axum::extract::Query`, but a malformed query string gets
/// `400 invalid_query` in the API's error shape.
pub struct Query<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequestParts<S> for Query<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        match axum::extract::Query::<T>::from_request_parts(parts, state).await {
            Ok(axum::extract::Query(v)) => Ok(Query(v)),
            Err(rejection) => {
                Err(ApiError::new(StatusCode::BAD_REQUEST, "invalid_query", rejection.body_text()))
            }
        }
    }
}

/// A JSON body whatever its `Content-Type` says: the seed's devices and its
/// guide's `curl -d` send JSON with none or with a form type.
pub struct AnyJson<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for AnyJson<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        let bytes = axum::body::Bytes::from_request(req, state).await.map_err(|rejection| {
            if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
                ApiError::new(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "body_too_large",
                    "the request body is too large",
                )
            } else {
                ApiError::new(StatusCode::BAD_REQUEST, "invalid_body", rejection.body_text())
            }
        })?;
        serde_json::from_slice(&bytes).map(AnyJson).map_err(|e| {
            let code = if e.is_data() { "invalid_body" } else { "invalid_json" };
            ApiError::new(
                StatusCode::BAD_REQUEST,
                code,
                format!("the body is not the JSON expected: {e}"),
            )
        })
    }
}
