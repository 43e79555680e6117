//! Request bodies at the edge: one over the route's limit is refused from
//! its declared `Content-Length` before a byte of it is read (413
//! `body_too_large`), and one that does not arrive in time is refused with
//! 408 `body_timeout`, so that no handler ever waits on a peer.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::Body;
use axum::http::{Request, StatusCode, header};
use axum::response::Response;
use http_body_util::BodyExt;
use tower::{Layer, Service};

use crate::error;

/// A body may arrive no slower than this on average, beyond the base time.
pub const MIN_BYTES_PER_SEC: u64 = 128 * 1024;

/// The time a body of `len` bytes is given: `base`, plus one second for
/// every [`MIN_BYTES_PER_SEC`].
pub fn allowance(base: Duration, len: u64) -> Duration {
    base + Duration::from_millis(len.saturating_mul(1000) / MIN_BYTES_PER_SEC)
}

/// Buffers request bodies of the routes it wraps, within `limit` bytes and
/// within [`allowance`]`(timeout, length)`.
#[derive(Debug, Clone, Copy)]
pub struct BodyGuardLayer {
    limit: usize,
    timeout: Duration,
}

impl BodyGuardLayer {
    /// Bodies of at most `limit` bytes, arriving within `timeout` (plus the
    /// time their length needs at [`MIN_BYTES_PER_SEC`]).
    pub fn new(limit: usize, timeout: Duration) -> Self {
        BodyGuardLayer { limit, timeout }
    }
}

impl<S> Layer<S> for BodyGuardLayer {
    type Service = BodyGuard<S>;

    fn layer(&self, inner: S) -> BodyGuard<S> {
        BodyGuard { inner, limit: self.limit, timeout: self.timeout }
    }
}

/// See [`BodyGuardLayer`].
#[derive(Debug, Clone)]
pub struct BodyGuard<S> {
    inner: S,
    limit: usize,
    timeout: Duration,
}

impl<S> Service<Request<Body>> for BodyGuard<S>
where
    S: Service<Request<Body>, Response = Response, Error = Infallible> + Clone + Send + 'static,
    S::Future: Send + 'static,
{
    type Response = Response;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Response, Infallible>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<Body>) -> Self::Future {
        // The clone is not ready; the one polled ready serves this call.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let (limit, timeout) = (self.limit, self.timeout);
        Box::pin(async move {
            match buffered(request, limit, timeout).await {
                Ok(request) => inner.call(request).await,
                Err(refusal) => Ok(refusal),
            }
        })
    }
}

/// The request with its body read in full, or the refusal.
pub async fn buffered(
    request: Request<Body>,
    limit: usize,
    timeout: Duration,
) -> Result<Request<Body>, Response> {
    let declared = request
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok());
    if let Some(len) = declared
        && len > limit as u64
    {
        return Err(too_large(limit));
    }
    if http_body::Body::is_end_stream(request.body()) {
        return Ok(request);
    }
    let (parts, body) = request.into_parts();
    let allowed = allowance(timeout, declared.unwrap_or(limit as u64));
    let limited = http_body_util::Limited::new(body, limit);
    match tokio::time::timeout(allowed, limited.collect()).await {
        Err(_) => Err(error::response(
            StatusCode::REQUEST_TIMEOUT,
            "body_timeout",
            &format!("the request body did not arrive within {} ms", allowed.as_millis()),
        )),
        Ok(Err(e)) if e.is::<http_body_util::LengthLimitError>() => Err(too_large(limit)),
        Ok(Err(e)) => Err(error::response(
            StatusCode::BAD_REQUEST,
            "body_incomplete",
            &format!("the request body could not be read: {e}"),
        )),
        Ok(Ok(collected)) => Ok(Request::from_parts(parts, Body::from(collected.to_bytes()))),
    }
}

fn too_large(limit: usize) -> Response {
    error::response(
        StatusCode::PAYLOAD_TOO_LARGE,
        "body_too_large",
        &format!("the request body is larger than this endpoint's limit of {limit} bytes"),
    )
}
