//! Operators authenticate with `Authorization: Bearer <token>`. Tokens are
//! stored as SHA-256 hashes; viewers may read, admins may also change.

use axum::extract::FromRequestParts;
use axum::http::StatusCode;
use axum::http::request::Parts;

use super::{AppState, Source};
use crate::error::ApiError;
use crate::operators::{Role, Token, hash_token};

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

/// The token of an `Authorization` header: the `Bearer` scheme in any case
/// (RFC 7235 scheme names are case-insensitive), then the token.
fn bearer(header: &str) -> Option<&str> {
    let (scheme, token) = header.trim_start().split_once(' ')?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
}

impl FromRequestParts<AppState> for Operator {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &AppState,
    ) -> Result<Self, Self::Rejection> {
        let Source(source) = Source::from_request_parts(parts, state).await.unwrap_or(Source(None));
        // An address that keeps failing is answered without a look at the store.
        if state.refusals.throttled(source) {
            return Err(ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                "rate_limited",
                "too many refused requests from this address; try again in a minute",
            ));
        }
        let refuse = |reason: &'static str, message: &str| {
            state.metrics.inc("ecowatt_auth_failures_total", format!("reason=\"{reason}\""));
            let detail = serde_json::json!({"reason": reason, "path": parts.uri.path()});
            if state.refusals.refused(source, None, "operator_auth_failed", detail, crate::now_ms())
            {
                tracing::warn!(
                    ?source,
                    reason,
                    "operator request refused (repeats this minute are counted, not logged)"
                );
            }
            ApiError::new(StatusCode::UNAUTHORIZED, "unauthorized", message)
        };
        let header =
            parts.headers.get(axum::http::header::AUTHORIZATION).and_then(|v| v.to_str().ok());
        let Some(token) = header.and_then(bearer) else {
            return Err(refuse("missing", "send Authorization: Bearer <token>"));
        };
        match state.operators.by_hash(&hash_token(token)).await? {
            Some(t) => Ok(Operator(t)),
            None => Err(refuse("invalid", "unknown or revoked token")),
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_bearer_scheme_is_case_insensitive() {
        for h in ["Bearer abc", "bearer abc", "BEARER abc", "  Bearer   abc  "] {
            assert_eq!(super::bearer(h), Some("abc"), "{h:?}");
        }
        for h in ["Basic abc", "Bearer", "Bearer ", "Bearerabc", ""] {
            assert_eq!(super::bearer(h), None, "{h:?}");
        }
    }
}
