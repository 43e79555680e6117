//! Operators authenticate with `Authorization: Bearer <token>`. Tokens are
//! stored as SHA-256 hashes; viewers may read, admins may also change.

use axum::extract::FromRequestParts;
use axum::http::StatusCode;
use axum::http::request::Parts;
use sha2::{Digest, Sha256};

use super::AppState;
use crate::error::ApiError;
use crate::store::{Role, Token};

/// An authenticated operator.
pub struct Operator(pub Token);

impl Operator {
    /// The name written to the audit log.
    pub fn actor(&self) -> String {
        format!("{}#{}", self.0.name, self.0.id)
    }

    /// Refuses viewers.
    pub fn require_admin(&self) -> Result<(), ApiError> {
        match self.0.role {
            Role::Admin => Ok(()),
            Role::Viewer => Err(ApiError::new(
                StatusCode::FORBIDDEN,
                "forbidden",
                "this token has the viewer role; changes need an admin token",
            )),
        }
    }
}

/// Hex SHA-256 of a token, as stored.
pub fn hash_token(token: &str) -> String {
    Sha256::digest(token.as_bytes()).iter().map(|b| format!("{b:02x}")).collect()
}

/// `bytes` random bytes from the OS, as lowercase hex.
pub fn new_secret(bytes: usize) -> String {
    let mut buf = vec![0u8; bytes];
    getrandom::fill(&mut buf).expect("the OS random number generator works");
    buf.iter().map(|b| format!("{b:02x}")).collect()
}

impl FromRequestParts<AppState> for Operator {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &AppState,
    ) -> Result<Self, Self::Rejection> {
        let refuse = |reason: &'static str, message: &str| {
            state.metrics.inc("ecowatt_auth_failures_total", format!("reason=\"{reason}\""));
            ApiError::new(StatusCode::UNAUTHORIZED, "unauthorized", message)
        };
        let header =
            parts.headers.get(axum::http::header::AUTHORIZATION).and_then(|v| v.to_str().ok());
        let Some(token) = header.and_then(|h| h.strip_prefix("Bearer ")) else {
            return Err(refuse("missing", "send Authorization: Bearer <token>"));
        };
        match state.store.token_by_hash(&hash_token(token.trim())).await? {
            Some(t) => Ok(Operator(t)),
            None => Err(refuse("invalid", "unknown or revoked token")),
        }
    }
}
